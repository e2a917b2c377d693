//! Persistent data units: the signed, hashed room events this node creates,
//! their storage record, and their client-facing format.

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
    pub room_id: OwnedRoomId,
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
    /// The full signed PDU as canonical JSON text.
    pub json: String,
    /// Position in the owner shard's stream (orders the room timeline).
    pub pos: u64,
    /// The transaction id the sender used, returned only to the sending device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn: Option<(String, String)>,
    /// The redaction event that redacted this one, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redacted_by: Option<String>,
    /// Content of the state this event replaced (`unsigned.prev_content`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_content: Option<Box<RawJsonValue>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_sender: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces_state: Option<String>,
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
        let mut pdu: Pdu = serde_json::from_str(json)?;
        pdu.event_id = Some(event_id);
        Ok(pdu)
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
            unsigned.insert("redacted_because".into(), json!({ "event_id": by }));
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
    pub event: Event,
    /// The client JSON up to and including `"unsigned":{` and the static
    /// unsigned members.
    head: String,
    has_static: bool,
}

impl Rendered {
    pub fn new(event: Event) -> Rendered {
        let mut value = event.to_client(0, None);
        let mut unsigned = match value.get_mut("unsigned").map(Value::take) {
            Some(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        unsigned.remove("age");
        unsigned.remove("transaction_id");
        if let Value::Object(m) = &mut value {
            m.remove("unsigned");
        }
        let body = serde_json::to_string(&value).unwrap_or_else(|_| "{}".into());
        let statics = serde_json::to_string(&Value::Object(unsigned)).unwrap_or_else(|_| "{}".into());
        let mut head = String::with_capacity(body.len() + statics.len() + 16);
        head.push_str(&body[..body.len() - 1]);
        if body.len() > 2 {
            head.push(',');
        }
        head.push_str("\"unsigned\":{");
        head.push_str(&statics[1..statics.len() - 1]);
        Rendered { has_static: statics.len() > 2, head, event }
    }

    /// The client JSON for `viewer` at `now_ms`.
    pub fn render(&self, now_ms: u64, viewer: Option<(&UserId, &str)>) -> Box<RawJsonValue> {
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
        out.push_str("}}");
        // The head is serde_json output and the tail is well-formed, so this
        // only fails on a bug; fall back to the slow path then.
        RawJsonValue::from_string(out).unwrap_or_else(|_| serde_json::value::to_raw_value(&self.event.to_client(now_ms, viewer)).unwrap_or_default())
    }
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
        Some(&self.room_id)
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

/// Converts a JSON value into canonical JSON, rejecting floats and
/// out-of-range integers (what canonical JSON cannot represent).
pub fn to_canonical(value: Value) -> Result<CanonicalJsonObject, String> {
    match CanonicalJsonValue::try_from(value) {
        Ok(CanonicalJsonValue::Object(o)) => Ok(o),
        Ok(_) => Err("content must be a JSON object".into()),
        Err(e) => Err(format!("content is not canonical JSON: {e}")),
    }
}
