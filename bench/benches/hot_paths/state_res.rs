//! State resolution of a forked room: ruma's `state_res::resolve` (the
//! crate and version the node uses for its auth rules) over the node's own
//! event type, `tessera_node::pdu::Pdu`.
//!
//! The room (version 11) has 1,000 joined members and 1,004 state events:
//! create, power levels (`@alice` at 100, `@bob` at 75, enough to change
//! power levels and join rules), join rules, history visibility, and one
//! `m.room.member` per member. From that state two branches diverge:
//!
//! - alice demotes bob and promotes a member in a new power-levels event,
//!   kicks 50 members, and 100 members leave;
//! - bob promotes another member, makes the room invite-only, bans 50
//!   members (10 of them members who left on alice's side), and 100 members
//!   change their display name.
//!
//! That gives 2 conflicting power-levels events, 101 other conflicting power
//! events and 200 ordinary member events to order and re-authorise, on top
//! of the members' original joins. Every event is signed with
//! `room::build_pdu` and passes the auth rules on its own branch (the setup
//! checks it), so the conflict is one a server can really meet. Alice has
//! more power, so her power-levels event is applied first: bob is demoted,
//! and his power events are rejected during resolution; the setup checks
//! that outcome before measuring.

use std::collections::{HashMap, HashSet};
use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion};
use ruma::events::{StateEventType, TimelineEventType};
use ruma::room_version_rules::{RoomVersionRules, StateResolutionVersion};
use ruma::signatures::Ed25519KeyPair;
use ruma::state_res::StateMap;
use ruma::state_res::utils::event_id_set::EventIdSet;
use ruma::{EventId, OwnedEventId, OwnedRoomId, OwnedUserId, RoomVersionId, UserId};
use serde_json::{Value, json};
use tessera_node::pdu::{Pdu, to_canonical};
use tessera_node::room::{PduFields, build_pdu};

const SERVER: &str = "bench.example";
/// Members besides the two admins: 998 + alice + bob = 1,000.
const MEMBERS: usize = 998;

fn user(name: &str) -> OwnedUserId {
    UserId::parse(format!("@{name}:{SERVER}")).expect("valid user id")
}

fn member(i: usize) -> OwnedUserId {
    user(&format!("m{i}"))
}

/// One line of history: its current state and its last event.
#[derive(Clone)]
struct Branch {
    state: StateMap<OwnedEventId>,
    head: Option<OwnedEventId>,
    depth: u64,
}

/// Builds signed events, every one authorised against its branch's state.
struct Room {
    id: OwnedRoomId,
    key: Ed25519KeyPair,
    rules: RoomVersionRules,
    events: HashMap<OwnedEventId, Arc<Pdu>>,
    ts: u64,
}

impl Room {
    fn new() -> Self {
        let key = Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), "a_bench".into()).expect("generated key parses");
        Room {
            id: OwnedRoomId::try_from(format!("!fork:{SERVER}")).expect("valid room id"),
            key,
            rules: RoomVersionId::V11.rules().expect("v11 has rules"),
            events: HashMap::new(),
            ts: 1_700_000_000_000,
        }
    }

    /// Appends a state event to `branch`, with the auth events the auth
    /// rules ask for (as `room::append` picks them), and checks it is allowed.
    fn add(&mut self, branch: &mut Branch, sender: &UserId, kind: &str, state_key: &str, content: Value) -> OwnedEventId {
        let event_type = TimelineEventType::from(kind);
        let raw = serde_json::value::to_raw_value(&content).expect("content serialises");
        let auth_types = ruma::state_res::auth_types_for_event(&event_type, sender, Some(state_key), &raw, &self.rules.authorization).expect("auth types");
        let mut auth_events: Vec<OwnedEventId> = Vec::new();
        let create = (StateEventType::RoomCreate, String::new());
        for key in auth_types.into_iter().chain(std::iter::once(create)) {
            if let Some(id) = branch.state.get(&key)
                && !auth_events.contains(id)
            {
                auth_events.push(id.clone());
            }
        }
        let prev_events: Vec<OwnedEventId> = branch.head.iter().cloned().collect();
        self.ts += 1;
        let fields = PduFields {
            room: &self.id,
            sender,
            kind,
            state_key: Some(state_key),
            content: to_canonical(content).expect("canonical content"),
            prev_events: &prev_events,
            auth_events: &auth_events,
            depth: branch.depth + 1,
            ts: self.ts,
            redacts: None,
        };
        let (id, json) = build_pdu(&fields, SERVER, &self.key, &self.rules).expect("event builds");
        let pdu = Arc::new(Pdu::parse(&json, id.clone()).expect("event parses"));
        let auth = &self.rules.authorization;
        ruma::state_res::check_state_independent_auth_rules(auth, &pdu, |id: &EventId| self.events.get(id).cloned())
            .unwrap_or_else(|e| panic!("{kind} {state_key} fails the auth rules: {e}"));
        ruma::state_res::check_state_dependent_auth_rules(auth, &pdu, |ty: &StateEventType, sk: &str| {
            branch.state.get(&(ty.clone(), sk.to_owned())).and_then(|id| self.events.get(id)).cloned()
        })
        .unwrap_or_else(|e| panic!("{kind} {state_key} is not allowed on its branch: {e}"));
        self.events.insert(id.clone(), pdu);
        branch.state.insert((StateEventType::from(kind), state_key.to_owned()), id.clone());
        branch.head = Some(id.clone());
        branch.depth += 1;
        id
    }

    /// Every event that the events of `state` reach through `auth_events`
    /// (walked with a stack, not recursion).
    fn auth_chain(&self, state: &StateMap<OwnedEventId>) -> EventIdSet<OwnedEventId> {
        let mut seen: HashSet<OwnedEventId> = HashSet::new();
        let mut stack: Vec<OwnedEventId> = state.values().cloned().collect();
        while let Some(id) = stack.pop() {
            for parent in &self.events[&id].auth_events {
                if seen.insert(parent.clone()) {
                    stack.push(parent.clone());
                }
            }
        }
        seen.into_iter().collect()
    }
}

fn power_levels(users: &[(&OwnedUserId, i64)]) -> Value {
    let users: serde_json::Map<String, Value> = users.iter().map(|(u, l)| (u.to_string(), json!(l))).collect();
    json!({
        "users": users, "users_default": 0, "events_default": 0, "state_default": 50,
        "ban": 50, "kick": 50, "redact": 50, "invite": 0,
        "events": { "m.room.power_levels": 75, "m.room.join_rules": 75, "m.room.history_visibility": 100 }
    })
}

/// The forked room: both branches' state and auth chains, and every event.
struct Fork {
    room: Room,
    branches: [Branch; 2],
    auth_chains: Vec<EventIdSet<OwnedEventId>>,
}

fn fork() -> Fork {
    let mut room = Room::new();
    let (alice, bob) = (user("alice"), user("bob"));
    let mut base = Branch { state: StateMap::new(), head: None, depth: 0 };
    room.add(&mut base, &alice, "m.room.create", "", json!({ "room_version": "11" }));
    room.add(&mut base, &alice, "m.room.member", alice.as_str(), json!({ "membership": "join" }));
    room.add(&mut base, &alice, "m.room.power_levels", "", power_levels(&[(&alice, 100), (&bob, 75)]));
    room.add(&mut base, &alice, "m.room.join_rules", "", json!({ "join_rule": "public" }));
    room.add(&mut base, &alice, "m.room.history_visibility", "", json!({ "history_visibility": "shared" }));
    room.add(&mut base, &bob, "m.room.member", bob.as_str(), json!({ "membership": "join" }));
    for i in 0..MEMBERS {
        let m = member(i);
        room.add(&mut base, &m, "m.room.member", m.as_str(), json!({ "membership": "join" }));
    }
    assert_eq!(base.state.len(), 1_004);

    // Alice's branch.
    let mut a = base.clone();
    room.add(&mut a, &alice, "m.room.power_levels", "", power_levels(&[(&alice, 100), (&bob, 0), (&member(0), 50)]));
    for i in 1..=50 {
        let m = member(i);
        room.add(&mut a, &alice, "m.room.member", m.as_str(), json!({ "membership": "leave" }));
    }
    for i in 101..=200 {
        let m = member(i);
        room.add(&mut a, &m, "m.room.member", m.as_str(), json!({ "membership": "leave" }));
    }

    // Bob's branch, from the same state.
    let mut b = base.clone();
    room.add(&mut b, &bob, "m.room.power_levels", "", power_levels(&[(&alice, 100), (&bob, 75), (&member(2), 50)]));
    room.add(&mut b, &bob, "m.room.join_rules", "", json!({ "join_rule": "invite" }));
    // 50 bans; the last ten hit members who left on alice's side (101-110).
    for i in (51..=90).chain(101..=110) {
        let m = member(i);
        room.add(&mut b, &bob, "m.room.member", m.as_str(), json!({ "membership": "ban", "reason": "bench" }));
    }
    for i in 300..400 {
        let m = member(i);
        room.add(&mut b, &m, "m.room.member", m.as_str(), json!({ "membership": "join", "displayname": format!("member {i}") }));
    }

    let auth_chains = vec![room.auth_chain(&a.state), room.auth_chain(&b.state)];
    Fork { room, branches: [a, b], auth_chains }
}

impl Fork {
    fn resolve(&self, auth_chains: Vec<EventIdSet<OwnedEventId>>) -> StateMap<OwnedEventId> {
        let StateResolutionVersion::V2(rules) = self.room.rules.state_res else {
            unreachable!("room version 11 resolves state with v2");
        };
        let [a, b] = &self.branches;
        ruma::state_res::resolve(
            &self.room.rules.authorization,
            &rules,
            [&a.state, &b.state],
            auth_chains,
            |id: &EventId| self.room.events.get(id).cloned(),
            // Only room versions 12 and later ask for the conflicted subgraph.
            |_: &StateMap<Vec<OwnedEventId>>| None,
        )
        .expect("the fork resolves")
    }

    /// The content of the resolved state event at (`kind`, `state_key`).
    fn content(&self, resolved: &StateMap<OwnedEventId>, kind: StateEventType, state_key: &str) -> Value {
        let id = &resolved[&(kind, state_key.to_owned())];
        serde_json::from_str(self.room.events[id].content.get()).expect("content is JSON")
    }
}

pub fn bench_state_res(c: &mut Criterion) {
    let fork = fork();
    // The outcome described in the module docs, so the bench measures a
    // resolution that re-authorises events rather than a trivial merge.
    let resolved = fork.resolve(fork.auth_chains.clone());
    assert_eq!(resolved.len(), 1_004);
    let pl = fork.content(&resolved, StateEventType::RoomPowerLevels, "");
    assert_eq!(pl["users"][user("bob").as_str()], 0, "alice's power levels win");
    assert_eq!(fork.content(&resolved, StateEventType::RoomJoinRules, "")["join_rule"], "public", "bob's join rules are rejected");
    let member_content = |i: usize| fork.content(&resolved, StateEventType::RoomMember, member(i).as_str());
    assert_eq!(member_content(1)["membership"], "leave", "alice's kicks stand");
    assert_eq!(member_content(51)["membership"], "join", "bob's bans are rejected once he is demoted");
    assert_eq!(member_content(150)["membership"], "leave", "members who left on one side are gone");
    assert_eq!(member_content(300)["displayname"], "member 300", "display names changed on one side stay");

    c.bench_function("state res: resolve a 2-branch fork of a 1,000-member room (v11)", |b| {
        // The auth chains are inputs that a server computes beforehand; their
        // copy is not measured.
        b.iter_batched(|| fork.auth_chains.clone(), |chains| black_box(fork.resolve(chains)), BatchSize::SmallInput)
    });
}
