//! Event filters (spec "Filtering"): the subset of `Filter` and
//! `RoomEventFilter` the node applies to `/sync` and `/messages`.

use serde_json::Value;

use crate::pdu::Pdu;

/// A filter over events of one kind (timeline, state, ephemeral, account data, presence).
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    pub limit: Option<usize>,
    pub types: Option<Vec<String>>,
    pub not_types: Vec<String>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Vec<String>,
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    pub lazy_load_members: bool,
    pub include_redundant_members: bool,
    pub contains_url: Option<bool>,
    /// Timeline filters only: unread counts per thread, the main
    /// timeline's apart (spec `unread_thread_notifications`, also under
    /// its MSC3773 name).
    pub unread_thread_notifications: bool,
}

fn strings(v: &Value) -> Option<Vec<String>> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
}

/// Glob match with `*` wildcards, as filter `types` use.
fn type_matches(pattern: &str, kind: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == kind,
        Some((prefix, rest)) => {
            if !kind.starts_with(prefix) {
                return false;
            }
            let tail = &kind[prefix.len()..];
            if rest.is_empty() {
                return true;
            }
            (0..=tail.len()).any(|i| tail.is_char_boundary(i) && type_matches(rest, &tail[i..]))
        }
    }
}

impl EventFilter {
    pub fn from_value(v: &Value) -> EventFilter {
        EventFilter {
            limit: v.get("limit").and_then(Value::as_u64).map(|l| l as usize),
            types: v.get("types").and_then(strings),
            not_types: v.get("not_types").and_then(strings).unwrap_or_default(),
            senders: v.get("senders").and_then(strings),
            not_senders: v.get("not_senders").and_then(strings).unwrap_or_default(),
            rooms: v.get("rooms").and_then(strings),
            not_rooms: v.get("not_rooms").and_then(strings).unwrap_or_default(),
            lazy_load_members: v.get("lazy_load_members").and_then(Value::as_bool).unwrap_or(false),
            include_redundant_members: v.get("include_redundant_members").and_then(Value::as_bool).unwrap_or(false),
            contains_url: v.get("contains_url").and_then(Value::as_bool),
            unread_thread_notifications: ["unread_thread_notifications", "org.matrix.msc3773.unread_thread_notifications"].iter().any(|k| v.get(*k).and_then(Value::as_bool) == Some(true)),
        }
    }

    pub fn allows_type(&self, kind: &str) -> bool {
        if self.not_types.iter().any(|p| type_matches(p, kind)) {
            return false;
        }
        self.types.as_ref().is_none_or(|t| t.iter().any(|p| type_matches(p, kind)))
    }

    pub fn allows_room(&self, room: &str) -> bool {
        !self.not_rooms.iter().any(|r| r == room) && self.rooms.as_ref().is_none_or(|r| r.iter().any(|x| x == room))
    }

    pub fn allows_sender(&self, sender: &str) -> bool {
        !self.not_senders.iter().any(|s| s == sender) && self.senders.as_ref().is_none_or(|s| s.iter().any(|x| x == sender))
    }

    pub fn allows(&self, pdu: &Pdu) -> bool {
        if !self.allows_type(&pdu.kind.to_string()) || !self.allows_sender(pdu.sender.as_str()) || !self.allows_room(pdu.room_id.as_str()) {
            return false;
        }
        if let Some(want) = self.contains_url {
            let has = pdu.content_value().get("url").is_some_and(Value::is_string);
            if has != want {
                return false;
            }
        }
        true
    }
}

/// A full sync filter.
#[derive(Clone, Debug, Default)]
pub struct SyncFilter {
    pub rooms: Option<Vec<String>>,
    pub not_rooms: Vec<String>,
    pub timeline: EventFilter,
    pub state: EventFilter,
    pub ephemeral: EventFilter,
    pub room_account_data: EventFilter,
    pub account_data: EventFilter,
    pub presence: EventFilter,
    pub include_leave: bool,
    /// Leaves the device's to-device inbox alone: neither sends it nor
    /// acknowledges what the previous token covered. Set by the legacy
    /// `/events`, which cannot deliver to-device messages; no client filter
    /// sets it.
    pub without_to_device: bool,
}

impl SyncFilter {
    pub fn from_value(v: &Value) -> SyncFilter {
        let room = v.get("room").cloned().unwrap_or(Value::Null);
        let sub = |parent: &Value, key: &str| EventFilter::from_value(parent.get(key).unwrap_or(&Value::Null));
        SyncFilter {
            rooms: room.get("rooms").and_then(strings),
            not_rooms: room.get("not_rooms").and_then(strings).unwrap_or_default(),
            timeline: sub(&room, "timeline"),
            state: sub(&room, "state"),
            ephemeral: sub(&room, "ephemeral"),
            room_account_data: sub(&room, "account_data"),
            account_data: sub(v, "account_data"),
            presence: sub(v, "presence"),
            include_leave: room.get("include_leave").and_then(Value::as_bool).unwrap_or(false),
            without_to_device: false,
        }
    }

    pub fn allows_room(&self, room: &str) -> bool {
        !self.not_rooms.iter().any(|r| r == room) && self.rooms.as_ref().is_none_or(|r| r.iter().any(|x| x == room))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn type_globs() {
        assert!(type_matches("m.room.*", "m.room.message"));
        assert!(type_matches("*", "anything"));
        assert!(type_matches("m.*.message", "m.room.message"));
        assert!(!type_matches("m.room.*", "m.call.invite"));
        assert!(type_matches("m.room.message", "m.room.message"));
    }

    #[test]
    fn not_types_win_over_types() {
        let f = EventFilter::from_value(&json!({ "types": ["m.room.*"], "not_types": ["m.room.member"] }));
        assert!(f.allows_type("m.room.message"));
        assert!(!f.allows_type("m.room.member"));
        assert!(!f.allows_type("m.typing"));
    }

    #[test]
    fn sync_filter_reads_nested_sections() {
        let f = SyncFilter::from_value(&json!({ "room": { "timeline": { "limit": 5 }, "state": { "lazy_load_members": true }, "not_rooms": ["!a:x"] } }));
        assert_eq!(f.timeline.limit, Some(5));
        assert!(f.state.lazy_load_members);
        assert!(!f.allows_room("!a:x"));
        assert!(f.allows_room("!b:x"));
    }
}
