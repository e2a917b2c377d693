//! Persistent data units: the signed, hashed room events this node creates,
//! their storage record, and their client-facing format.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;

use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue};
use ruma::events::TimelineEventType;
use ruma::{EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UInt, UserId};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue as RawJsonValue;
use serde_json::{Value, json};

/// A room event as the federation API defines it (the fields we read).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Pdu {
    #[serde(skip_deserializing, skip_serializing)]
    pub event_id: Option<OwnedEventId>,
    /// The room; the create event of a room version 12 room has none in
    /// its JSON (the room id is derived from its event id, see
    /// `room_id_implied`).
    pub room_id: OwnedRoomId,
    #[serde(skip_deserializing, skip_serializing)]
    pub room_id_implied: bool,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    pub kind: TimelineEventType,
    pub content: Box<RawJsonValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_key: Option<String>,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redacts: Option<OwnedEventId>,
    pub depth: UInt,
}

/// What the node stores per event.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct StoredEvent {
    /// The full signed PDU, canonical JSON, stored as a JSON object (rows
    /// written before that hold it as a JSON string; both are read).
    #[serde(deserialize_with = "pdu_json")]
    pub json: Box<RawJsonValue>,
    /// Position in the owner shard's stream (orders the room timeline).
    pub pos: u64,
    /// The transaction id the sender used, returned only to the sending device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn: Option<(String, String)>,
    /// The redaction event that redacted this one, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redacted_by: Option<String>,
    /// That redaction in the client format, without `unsigned` (see
    /// [`redaction_summary`]): clients read who redacted and why from
    /// `unsigned.redacted_because`. Rows redacted before it was kept have
    /// only the id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redacted_because: Option<Box<RawJsonValue>>,
    /// Content of the state this event replaced (`unsigned.prev_content`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_content: Option<Box<RawJsonValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_sender: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces_state: Option<String>,
}

/// Reads the stored PDU: a JSON object, or the JSON string that older rows
/// kept it in.
fn pdu_json<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Box<RawJsonValue>, D::Error> {
    use serde::de::Error as _;
    let raw = Box::<RawJsonValue>::deserialize(d)?;
    if !raw.get().starts_with('"') {
        return Ok(raw);
    }
    let text: String = serde_json::from_str(raw.get()).map_err(D::Error::custom)?;
    RawJsonValue::from_string(text).map_err(D::Error::custom)
}

/// An event loaded for use: parsed fields plus its storage record.
#[derive(Clone, Debug)]
pub struct Event {
    pub pdu: Arc<Pdu>,
    pub stored: Arc<StoredEvent>,
}

impl Pdu {
    /// Parses a stored PDU's JSON and attaches its id.
    pub fn parse(json: &str, event_id: OwnedEventId) -> Result<Pdu, serde_json::Error> {
        let mut pdu: Pdu = match serde_json::from_str(json) {
            Ok(pdu) => pdu,
            Err(e) => return Pdu::parse_without_room_id(json, event_id).ok_or(e),
        };
        pdu.event_id = Some(event_id);
        Ok(pdu)
    }

    /// A room version 12 create event: no `room_id`, which is its own
    /// event id with `!` for `$` (its reference hash).
    fn parse_without_room_id(json: &str, event_id: OwnedEventId) -> Option<Pdu> {
        let mut value: Value = serde_json::from_str(json).ok()?;
        let obj = value.as_object_mut()?;
        if obj.contains_key("room_id") || obj.get("type")?.as_str()? != "m.room.create" {
            return None;
        }
        obj.insert("room_id".into(), json!(room_id_of_create(&event_id)?));
        let mut pdu: Pdu = serde_json::from_value(value).ok()?;
        pdu.event_id = Some(event_id);
        pdu.room_id_implied = true;
        Some(pdu)
    }

    /// The event id; every stored or built PDU has one.
    pub fn id(&self) -> &EventId {
        // `parse` and the builder always set it; the placeholder is never stored.
        self.event_id.as_deref().unwrap_or_else(|| <&EventId>::try_from("$unset").expect("static id is valid"))
    }

    /// The content as a JSON value.
    pub fn content_value(&self) -> Value {
        serde_json::from_str(self.content.get()).unwrap_or(Value::Object(Default::default()))
    }

    /// `membership` of an `m.room.member` event's content.
    pub fn membership(&self) -> Option<String> {
        if self.kind != TimelineEventType::RoomMember {
            return None;
        }
        #[derive(Deserialize)]
        struct M {
            membership: String,
        }
        serde_json::from_str::<M>(self.content.get()).ok().map(|m| m.membership)
    }
}

impl Event {
    /// Builds the client-server API format of the event.
    /// `viewer_device` gets `unsigned.transaction_id` when it sent the event.
    pub fn to_client(&self, now_ms: u64, viewer: Option<(&UserId, &str)>) -> Value {
        let pdu = &self.pdu;
        let mut content: Value = pdu.content_value();
        let mut unsigned = serde_json::Map::new();
        if let Some(by) = &self.stored.redacted_by {
            content = redacted_content(pdu.kind.to_string().as_str(), content);
            let because = self.stored.redacted_because.as_ref().and_then(|b| serde_json::from_str(b.get()).ok()).unwrap_or_else(|| json!({ "event_id": by }));
            unsigned.insert("redacted_because".into(), because);
        }
        let ts: u64 = pdu.origin_server_ts.get().into();
        unsigned.insert("age".into(), json!(now_ms.saturating_sub(ts)));
        if let (Some((user, device)), Some((txn_device, txn_id))) = (viewer, &self.stored.txn)
            && pdu.sender == user
            && txn_device == device
        {
            unsigned.insert("transaction_id".into(), json!(txn_id));
        }
        if let Some(prev) = &self.stored.prev_content {
            unsigned.insert("prev_content".into(), serde_json::from_str(prev.get()).unwrap_or(Value::Null));
            if let Some(s) = &self.stored.prev_sender {
                unsigned.insert("prev_sender".into(), json!(s));
            }
            if let Some(r) = &self.stored.replaces_state {
                unsigned.insert("replaces_state".into(), json!(r));
            }
        }
        let mut ev = json!({
            "type": pdu.kind.to_string(),
            "content": content,
            "sender": pdu.sender,
            "origin_server_ts": pdu.origin_server_ts,
            "event_id": pdu.id(),
            "room_id": pdu.room_id,
            "unsigned": unsigned,
        });
        if let Some(sk) = &pdu.state_key {
            ev["state_key"] = json!(sk);
        }
        if let Some(r) = &pdu.redacts {
            ev["redacts"] = json!(r);
        }
        ev
    }

    /// The copy served to readers who must not see what an erased account
    /// wrote: the content redacted, and no `prev_content` (nothing says
    /// why: no redaction event exists).
    pub fn erased_copy(&self) -> Event {
        let mut pdu = (*self.pdu).clone();
        let content = redacted_content(&pdu.kind.to_string(), pdu.content_value());
        if let Ok(raw) = serde_json::value::to_raw_value(&content) {
            pdu.content = raw;
        }
        let mut stored = (*self.stored).clone();
        stored.prev_content = None;
        stored.prev_sender = None;
        Event { pdu: Arc::new(pdu), stored: Arc::new(stored) }
    }

    /// The stripped state format used for invites.
    pub fn to_stripped(&self) -> Value {
        json!({
            "type": self.pdu.kind.to_string(),
            "state_key": self.pdu.state_key.clone().unwrap_or_default(),
            "content": self.pdu.content_value(),
            "sender": self.pdu.sender,
        })
    }
}

/// An event pre-rendered in the client format once, so that fanning it out
/// to many syncing clients costs a copy, not a JSON round trip each. Only
/// the per-viewer parts of `unsigned` (age, transaction id) are added at
/// render time.
pub struct Rendered {
    /// The event, without its signed PDU JSON (`stored.json` is `{}`)
    /// when the rendering held the only reference to it: a rendering is
    /// built from the parsed fields and the JSON would double what a cached
    /// entry costs.
    pub event: Event,
    /// The client JSON up to and including `"unsigned":{` and the static
    /// unsigned members.
    head: String,
    has_static: bool,
}

impl Rendered {
    /// Writes the client JSON straight from the stored fields: the content
    /// and `prev_content` are canonical JSON already and are copied as they
    /// are; only a redacted event's content goes through a `Value`.
    pub fn new(event: Event) -> Rendered {
        use std::fmt::Write as _;
        let pdu = &event.pdu;
        let stored = &event.stored;
        let kind = pdu.kind.to_string();
        let mut head = String::with_capacity(256 + pdu.content.get().len() + stored.prev_content.as_ref().map_or(0, |p| p.get().len()));
        head.push_str("{\"content\":");
        if stored.redacted_by.is_some() {
            let redacted = redacted_content(&kind, pdu.content_value());
            head.push_str(&serde_json::to_string(&redacted).unwrap_or_else(|_| "{}".into()));
        } else {
            head.push_str(pdu.content.get());
        }
        head.push_str(",\"event_id\":");
        push_json_str(&mut head, pdu.id().as_str());
        let ts: u64 = pdu.origin_server_ts.get().into();
        let _ = write!(head, ",\"origin_server_ts\":{ts}");
        if let Some(r) = &pdu.redacts {
            head.push_str(",\"redacts\":");
            push_json_str(&mut head, r.as_str());
        }
        head.push_str(",\"room_id\":");
        push_json_str(&mut head, pdu.room_id.as_str());
        head.push_str(",\"sender\":");
        push_json_str(&mut head, pdu.sender.as_str());
        if let Some(sk) = &pdu.state_key {
            head.push_str(",\"state_key\":");
            push_json_str(&mut head, sk);
        }
        head.push_str(",\"type\":");
        push_json_str(&mut head, &kind);
        head.push_str(",\"unsigned\":{");
        let mut has_static = false;
        let mut member = |head: &mut String, name: &str| {
            if has_static {
                head.push(',');
            }
            has_static = true;
            push_json_str(head, name);
            head.push(':');
        };
        if let Some(prev) = &stored.prev_content {
            member(&mut head, "prev_content");
            head.push_str(prev.get());
            if let Some(s) = &stored.prev_sender {
                member(&mut head, "prev_sender");
                push_json_str(&mut head, s);
            }
        }
        if let Some(by) = &stored.redacted_by {
            member(&mut head, "redacted_because");
            match &stored.redacted_because {
                Some(because) => head.push_str(because.get()),
                None => {
                    head.push_str("{\"event_id\":");
                    push_json_str(&mut head, by);
                    head.push('}');
                }
            }
        }
        if stored.prev_content.is_some()
            && let Some(r) = &stored.replaces_state
        {
            member(&mut head, "replaces_state");
            push_json_str(&mut head, r);
        }
        let mut event = event;
        if let Some(stored) = Arc::get_mut(&mut event.stored) {
            stored.json = empty_object();
        }
        Rendered { has_static, head, event }
    }

    /// The client JSON for `viewer` at `now_ms`.
    pub fn render(&self, now_ms: u64, viewer: Option<(&UserId, &str)>) -> Box<RawJsonValue> {
        self.render_with(now_ms, viewer, None)
    }

    /// [`Rendered::render`] with `extra` (JSON object members, such as
    /// `"m.relations":{..}`) added to `unsigned`.
    pub fn render_with(&self, now_ms: u64, viewer: Option<(&UserId, &str)>, extra: Option<&str>) -> Box<RawJsonValue> {
        use std::fmt::Write as _;
        let mut out = String::with_capacity(self.head.len() + 64);
        out.push_str(&self.head);
        if self.has_static {
            out.push(',');
        }
        let ts: u64 = self.event.pdu.origin_server_ts.get().into();
        let _ = write!(out, "\"age\":{}", now_ms.saturating_sub(ts));
        if let (Some((user, device)), Some((txn_device, txn_id))) = (viewer, &self.event.stored.txn)
            && self.event.pdu.sender == user
            && txn_device == device
        {
            out.push_str(",\"transaction_id\":");
            out.push_str(&serde_json::to_string(txn_id).unwrap_or_else(|_| "\"\"".into()));
        }
        if let Some(extra) = extra {
            out.push(',');
            out.push_str(extra);
        }
        out.push_str("}}");
        // The head is serde_json output and the tail is well-formed, so this
        // only fails on a bug; fall back to the slow path then.
        RawJsonValue::from_string(out).unwrap_or_else(|_| serde_json::value::to_raw_value(&self.event.to_client(now_ms, viewer)).unwrap_or_default())
    }
}

impl Rendered {
    /// Approximate bytes held: the rendering, the stored PDU, the parsed
    /// copy of its content and a fixed allowance for the parsed fields.
    pub fn size(&self) -> usize {
        self.head.len() + self.event.stored.json.get().len() + self.event.pdu.content.get().len() + 512
    }
}

/// `{}` as a raw value.
fn empty_object() -> Box<RawJsonValue> {
    RawJsonValue::from_string("{}".to_owned()).unwrap_or_default()
}

/// Rendered events by id within a byte budget, in two generations: new
/// renderings go to the young one; when it holds half the budget it becomes
/// the old one and the previous old one is dropped; a hit in the old
/// generation moves the entry back to the young one. What a busy shard
/// reads again and again stays; the rest ages out in two rotations.
#[derive(Default)]
pub struct RenderCache {
    young: HashMap<OwnedEventId, Rc<Rendered>>,
    old: HashMap<OwnedEventId, Rc<Rendered>>,
    young_bytes: usize,
    budget: usize,
}

impl RenderCache {
    /// A cache of about `budget` bytes; 0 caches nothing.
    pub fn new(budget: usize) -> RenderCache {
        RenderCache { budget, ..Default::default() }
    }

    pub fn get(&mut self, id: &EventId) -> Option<Rc<Rendered>> {
        if let Some(r) = self.young.get(id) {
            return Some(r.clone());
        }
        let r = self.old.remove(id)?;
        self.insert(id.to_owned(), r.clone());
        Some(r)
    }

    pub fn insert(&mut self, id: OwnedEventId, r: Rc<Rendered>) {
        if self.budget == 0 {
            return;
        }
        self.young_bytes += r.size();
        if let Some(prev) = self.young.insert(id, r) {
            self.young_bytes = self.young_bytes.saturating_sub(prev.size());
        }
        if self.young_bytes >= self.budget / 2 {
            self.old = std::mem::take(&mut self.young);
            self.young_bytes = 0;
        }
    }

    pub fn remove(&mut self, id: &EventId) {
        if let Some(r) = self.young.remove(id) {
            self.young_bytes = self.young_bytes.saturating_sub(r.size());
        }
        self.old.remove(id);
    }

    pub fn clear(&mut self) {
        self.young.clear();
        self.old.clear();
        self.young_bytes = 0;
    }

    /// Entries held, both generations.
    pub fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Appends `s` as a JSON string.
fn push_json_str(out: &mut String, s: &str) {
    use std::fmt::Write as _;
    out.reserve(s.len() + 2);
    out.push('"');
    let mut plain = 0;
    for (i, b) in s.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[plain..i]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{b:04x}");
        } else {
            out.push_str(escape);
        }
        plain = i + 1;
    }
    out.push_str(&s[plain..]);
    out.push('"');
}

/// The content left after redaction, per the room v11 rules: only the keys
/// the algorithm preserves for the event type survive.
pub fn redacted_content(kind: &str, content: Value) -> Value {
    let keep: &[&str] = match kind {
        "m.room.member" => &["membership", "join_authorised_via_users_server"],
        "m.room.create" => return content,
        "m.room.join_rules" => &["join_rule", "allow"],
        "m.room.power_levels" => &["ban", "events", "events_default", "invite", "kick", "redact", "state_default", "users", "users_default"],
        "m.room.history_visibility" => &["history_visibility"],
        "m.room.redaction" => &["redacts"],
        _ => &[],
    };
    let mut out = serde_json::Map::new();
    if let Value::Object(map) = content {
        for (k, v) in map {
            if keep.contains(&k.as_str()) {
                out.insert(k, v);
            }
        }
    }
    Value::Object(out)
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        // Built and parsed PDUs always carry their id (see `Pdu::parse`).
        self.event_id.as_ref().expect("pdu id is set on parse and build")
    }
    fn room_id(&self) -> Option<&RoomId> {
        (!self.room_id_implied).then_some(&*self.room_id)
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }
    fn content(&self) -> &RawJsonValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }
    fn rejected(&self) -> bool {
        false
    }
}

/// A redaction event in the client format without `unsigned`, as the
/// events it redacts carry it in `unsigned.redacted_because`.
pub fn redaction_summary(pdu: &Pdu) -> Option<Box<RawJsonValue>> {
    let mut ev = json!({
        "content": serde_json::from_str::<Value>(pdu.content.get()).ok()?,
        "event_id": pdu.id(),
        "origin_server_ts": pdu.origin_server_ts,
        "room_id": pdu.room_id,
        "sender": pdu.sender,
        "type": pdu.kind.to_string(),
    });
    if let Some(r) = &pdu.redacts {
        ev["redacts"] = json!(r);
    }
    serde_json::value::to_raw_value(&ev).ok()
}

/// The id of the room whose create event is `create` (room version 12 and
/// later): the event's reference hash with `!` for `$`.
pub fn room_id_of_create(create: &EventId) -> Option<OwnedRoomId> {
    OwnedRoomId::try_from(format!("!{}", create.as_str().strip_prefix('$')?)).ok()
}

/// Converts a JSON value into canonical JSON, rejecting floats and
/// out-of-range integers (what canonical JSON cannot represent).
pub fn to_canonical(value: Value) -> Result<CanonicalJsonObject, String> {
    match CanonicalJsonValue::try_from(value) {
        Ok(CanonicalJsonValue::Object(o)) => Ok(o),
        Ok(_) => Err("content must be a JSON object".into()),
        Err(e) => Err(format!("content is not canonical JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(pdu: Value, stored: impl FnOnce(&mut StoredEvent)) -> Event {
        let json = serde_json::value::to_raw_value(&pdu).expect("raw");
        let pdu = Pdu::parse(json.get(), OwnedEventId::try_from("$abc:example.org").expect("id")).expect("pdu");
        let mut s = StoredEvent { json, pos: 7, txn: None, redacted_by: None, redacted_because: None, prev_content: None, prev_sender: None, replaces_state: None };
        stored(&mut s);
        Event { pdu: Arc::new(pdu), stored: Arc::new(s) }
    }

    fn base(kind: &str, state_key: Option<&str>, content: Value) -> Value {
        let mut v = json!({
            "room_id": "!r:example.org", "sender": "@a:example.org", "origin_server_ts": 1_000,
            "type": kind, "content": content, "prev_events": [], "auth_events": [], "depth": 3,
        });
        if let Some(sk) = state_key {
            v["state_key"] = json!(sk);
        }
        v
    }

    /// The pre-rendered bytes say the same as the `Value` rendering, for
    /// every viewer-dependent and static part of `unsigned`.
    #[test]
    fn rendered_matches_the_value_rendering() {
        let events = [
            event(base("m.room.message", None, json!({"body": "hi \"there\"\n\u{1}é", "msgtype": "m.text"})), |s| {
                s.txn = Some(("DEV".into(), "t1".into()));
            }),
            event(base("m.room.member", Some("@b:example.org"), json!({"membership": "join", "displayname": "B"})), |s| {
                s.prev_content = Some(RawJsonValue::from_string(r#"{"membership":"invite"}"#.into()).expect("raw"));
                s.prev_sender = Some("@a:example.org".into());
                s.replaces_state = Some("$old:example.org".into());
            }),
            event(base("m.room.message", None, json!({"body": "secret", "msgtype": "m.text"})), |s| {
                s.redacted_by = Some("$red:example.org".into());
            }),
            event(base("m.room.message", None, json!({"body": "secret", "msgtype": "m.text"})), |s| {
                s.redacted_by = Some("$red3:example.org".into());
                s.redacted_because = Some(RawJsonValue::from_string(r#"{"content":{"reason":"r"},"event_id":"$red3:example.org","sender":"@a:example.org","type":"m.room.redaction"}"#.into()).expect("raw"));
            }),
            event(base("m.room.member", Some("@c:example.org"), json!({"membership": "leave", "reason": "x"})), |s| {
                s.redacted_by = Some("$red2:example.org".into());
                s.prev_content = Some(RawJsonValue::from_string(r#"{"membership":"join"}"#.into()).expect("raw"));
            }),
            event(base("org.example.\"odd\"\ttype", Some("key with \\ and \u{7f}\u{1f}"), json!({})), |_| {}),
        ];
        let mut redaction = base("m.room.redaction", None, json!({"redacts": "$abc:example.org"}));
        redaction["redacts"] = json!("$abc:example.org");
        let events: Vec<Event> = events.into_iter().chain([event(redaction, |_| {})]).collect();
        let viewers = [None, Some(("@a:example.org", "DEV")), Some(("@a:example.org", "OTHER")), Some(("@b:example.org", "DEV"))];
        for ev in events {
            let rendered = Rendered::new(ev.clone());
            // A rendering that owns its stored record drops the PDU JSON
            // and renders the same.
            let owned = Rendered::new(Event { pdu: ev.pdu.clone(), stored: Arc::new((*ev.stored).clone()) });
            assert_eq!(owned.event.stored.json.get(), "{}");
            assert_eq!(rendered.event.stored.json.get(), ev.stored.json.get(), "a shared record is left alone");
            assert!(owned.size() < rendered.size());
            for viewer in viewers {
                let viewer = viewer.map(|(u, d)| (UserId::parse(u).expect("user"), d));
                let v = viewer.as_ref().map(|(u, d)| (u.as_ref(), *d));
                let fast: Value = serde_json::from_str(rendered.render(5_000, v).get()).expect("rendered JSON parses");
                assert_eq!(fast, ev.to_client(5_000, v), "event {:?} viewer {v:?}", ev.pdu.kind);
                assert_eq!(owned.render(5_000, v).get(), rendered.render(5_000, v).get());
            }
        }
    }

    /// Rows written before the PDU was stored as an object still read, to
    /// the same record; new rows hold the object itself.
    #[test]
    fn stored_events_of_both_layouts_read_alike() {
        let pdu = r#"{"content":{"body":"a \"q\" \u00e9"},"depth":1,"type":"m.room.message"}"#;
        let legacy = json!({ "json": pdu, "pos": 4, "txn": ["D", "t"] }).to_string();
        let old: StoredEvent = serde_json::from_str(&legacy).expect("legacy row");
        assert_eq!(old.json.get(), pdu);
        assert_eq!(old.pos, 4);
        let written = serde_json::to_string(&old).expect("encode");
        assert!(written.starts_with(&format!("{{\"json\":{pdu}")), "{written}");
        let new: StoredEvent = serde_json::from_str(&written).expect("new row");
        assert_eq!(new.json.get(), pdu);
        assert_eq!(new.txn, Some(("D".into(), "t".into())));
        assert!(serde_json::from_str::<StoredEvent>(r#"{"json":"not json","pos":1}"#).is_err(), "a string that is not JSON is corrupt");
    }

    fn rendered(i: u32) -> (OwnedEventId, Rc<Rendered>) {
        let id = OwnedEventId::try_from(format!("$e{i}:x")).expect("id");
        let pdu = json!({ "room_id": "!r:x", "sender": "@a:x", "origin_server_ts": 1, "type": "m.room.message", "content": { "body": "x".repeat(100) }, "prev_events": [], "auth_events": [], "depth": 1 });
        let json = serde_json::value::to_raw_value(&pdu).expect("raw");
        let parsed = Pdu::parse(json.get(), id.clone()).expect("pdu");
        let stored = StoredEvent { json, pos: u64::from(i), txn: None, redacted_by: None, redacted_because: None, prev_content: None, prev_sender: None, replaces_state: None };
        (id, Rc::new(Rendered::new(Event { pdu: Arc::new(parsed), stored: Arc::new(stored) })))
    }

    #[test]
    fn the_render_cache_keeps_what_is_read_and_stays_within_its_budget() {
        let one = rendered(0).1.size();
        let mut cache = RenderCache::new(one * 20);
        let (hot, hot_r) = rendered(0);
        cache.insert(hot.clone(), hot_r);
        for i in 1..200 {
            let (id, r) = rendered(i);
            cache.insert(id, r);
            assert!(cache.get(&hot).is_some(), "an entry read between rotations stays (after {i} inserts)");
            assert!(cache.len() <= 20, "{} entries over a budget of 20", cache.len());
        }
        assert!(cache.get(&rendered(5).0).is_none(), "an entry never read again ages out");
        cache.remove(&hot);
        assert!(cache.get(&hot).is_none());
        let mut none = RenderCache::new(0);
        none.insert(hot.clone(), rendered(0).1);
        assert!(none.is_empty(), "a zero budget caches nothing");
    }
}
