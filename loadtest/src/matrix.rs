//! The Matrix client-server API calls the scenarios make, over [`Pool`].
//!
//! Only public, spec-defined endpoints (`/_matrix/client/v3/...`) are used,
//! so the generator works unchanged against any homeserver. Responses are
//! decoded into minimal structs holding just the fields the generator needs;
//! anything a server sends beyond them is ignored. No response is trusted:
//! every decoding failure becomes a [`CallError`].

use crate::http::{HttpError, Pool, Response, encode_component};
use bytes::Bytes;
use http::Method;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::time::Duration;

const V3: &str = "/_matrix/client/v3";

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No HTTP response (connect error, reset, timeout).
    #[error("{0}")]
    Transport(#[from] HttpError),
    /// The server answered with a non-success status.
    #[error("HTTP {status} {}", errcode.as_deref().unwrap_or("-"))]
    Status {
        /// HTTP status code.
        status: u16,
        /// The Matrix `errcode` of the body, when it had one.
        errcode: Option<String>,
    },
    /// A success response whose body is not what the spec says.
    #[error("unexpected response: {0}")]
    Decode(String),
    /// The server wants an authentication stage the generator cannot do.
    #[error("unsupported auth flow: {0}")]
    UnsupportedAuth(String),
}

impl CallError {
    /// Whether the server rate-limited the request (HTTP 429).
    pub fn is_rate_limited(&self) -> bool {
        matches!(self, CallError::Status { status: 429, .. })
    }

    /// The `errcode`, when the server sent one.
    pub fn errcode(&self) -> Option<&str> {
        match self {
            CallError::Status { errcode, .. } => errcode.as_deref(),
            _ => None,
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    errcode: Option<String>,
}

fn status_error(resp: &Response) -> CallError {
    let errcode = serde_json::from_slice::<ErrorBody>(&resp.body)
        .ok()
        .and_then(|b| b.errcode);
    CallError::Status {
        status: resp.status.as_u16(),
        errcode,
    }
}

fn decode<'a, T: Deserialize<'a>>(resp: &'a Response) -> Result<T, CallError> {
    serde_json::from_slice(&resp.body).map_err(|e| CallError::Decode(e.to_string()))
}

fn ok(resp: Response) -> Result<Response, CallError> {
    if resp.status.is_success() {
        Ok(resp)
    } else {
        Err(status_error(&resp))
    }
}

fn json_body(v: &Value) -> Bytes {
    Bytes::from(v.to_string())
}

/// A logged-in device.
#[derive(Debug, Clone)]
pub struct Session {
    /// Full user id, `@name:server`.
    pub user_id: String,
    /// Access token for `Authorization: Bearer`.
    pub access_token: String,
}

#[derive(Deserialize)]
struct LoginResponse {
    user_id: String,
    access_token: String,
}

#[derive(Deserialize)]
struct UiaResponse {
    session: Option<String>,
    #[serde(default)]
    flows: Vec<UiaFlow>,
    #[serde(default)]
    completed: Vec<String>,
}

#[derive(Deserialize)]
struct UiaFlow {
    stages: Vec<String>,
}

/// `GET /_matrix/client/versions`: the spec versions and the `Server` header.
pub async fn versions(pool: &Pool) -> Result<(Vec<String>, Option<String>), CallError> {
    #[derive(Deserialize)]
    struct Versions {
        versions: Vec<String>,
    }
    let resp = ok(pool
        .request(Method::GET, "/_matrix/client/versions", None, None)
        .await?)?;
    let v: Versions = decode(&resp)?;
    Ok((v.versions, resp.server))
}

/// `POST /register` with user-interactive auth: completes `m.login.dummy`
/// and `m.login.registration_token` stages, whichever flow the server offers
/// that uses only those.
pub async fn register(
    pool: &Pool,
    username: &str,
    password: &str,
    registration_token: Option<&str>,
) -> Result<Session, CallError> {
    let path = format!("{V3}/register");
    let mut body = json!({
        "username": username,
        "password": password,
        "initial_device_display_name": "tessera-loadtest",
    });
    // At most a handful of stages: dummy, token, and the final answer.
    for _ in 0..4 {
        let resp = pool
            .request(Method::POST, &path, None, Some(json_body(&body)))
            .await?;
        if resp.status.is_success() {
            let r: LoginResponse = decode(&resp)?;
            return Ok(Session {
                user_id: r.user_id,
                access_token: r.access_token,
            });
        }
        if resp.status.as_u16() != 401 {
            return Err(status_error(&resp));
        }
        let uia: UiaResponse = decode(&resp)?;
        let next = next_stage(&uia, registration_token.is_some())?;
        let mut auth = json!({ "type": next });
        if let Some(session) = &uia.session {
            auth["session"] = json!(session);
        }
        if next == "m.login.registration_token" {
            auth["token"] = json!(registration_token);
        }
        body["auth"] = auth;
    }
    Err(CallError::Decode(
        "registration did not finish after 4 auth rounds".into(),
    ))
}

/// The next user-interactive auth stage to complete: the first stage not
/// yet completed of the first flow made only of stages the generator can do
/// (`m.login.dummy`, and `m.login.registration_token` when it has a token).
fn next_stage(uia: &UiaResponse, have_token: bool) -> Result<&str, CallError> {
    let usable = |stage: &String| {
        stage == "m.login.dummy" || (stage == "m.login.registration_token" && have_token)
    };
    let flow = uia
        .flows
        .iter()
        .find(|f| f.stages.iter().all(usable))
        .ok_or_else(|| {
            let offered: Vec<String> = uia.flows.iter().map(|f| f.stages.join("+")).collect();
            CallError::UnsupportedAuth(offered.join(", "))
        })?;
    flow.stages
        .iter()
        .find(|s| !uia.completed.contains(s))
        .map(String::as_str)
        .ok_or_else(|| CallError::Decode("401 with every stage completed".into()))
}

/// `POST /login` with a password.
pub async fn login(pool: &Pool, username: &str, password: &str) -> Result<Session, CallError> {
    let body = json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": username },
        "password": password,
        "initial_device_display_name": "tessera-loadtest",
    });
    let resp = ok(pool
        .request(
            Method::POST,
            &format!("{V3}/login"),
            None,
            Some(json_body(&body)),
        )
        .await?)?;
    let r: LoginResponse = decode(&resp)?;
    Ok(Session {
        user_id: r.user_id,
        access_token: r.access_token,
    })
}

/// `POST /createRoom` (public chat preset, so others may join); the room id.
pub async fn create_room(pool: &Pool, s: &Session, name: &str) -> Result<String, CallError> {
    #[derive(Deserialize)]
    struct Created {
        room_id: String,
    }
    let body = json!({ "name": name, "preset": "public_chat", "visibility": "private" });
    let resp = ok(pool
        .request(
            Method::POST,
            &format!("{V3}/createRoom"),
            Some(&s.access_token),
            Some(json_body(&body)),
        )
        .await?)?;
    Ok(decode::<Created>(&resp)?.room_id)
}

/// `POST /join/{roomIdOrAlias}`.
pub async fn join(pool: &Pool, s: &Session, room_id: &str) -> Result<(), CallError> {
    let path = format!("{V3}/join/{}", encode_component(room_id));
    ok(pool
        .request(
            Method::POST,
            &path,
            Some(&s.access_token),
            Some(Bytes::from_static(b"{}")),
        )
        .await?)?;
    Ok(())
}

/// `PUT /rooms/{roomId}/send/m.room.message/{txnId}`; the event id.
pub async fn send_message(
    pool: &Pool,
    s: &Session,
    room_id: &str,
    txn_id: &str,
    content: &Value,
) -> Result<String, CallError> {
    #[derive(Deserialize)]
    struct Sent {
        event_id: String,
    }
    let path = format!(
        "{V3}/rooms/{}/send/m.room.message/{}",
        encode_component(room_id),
        encode_component(txn_id)
    );
    let resp = ok(pool
        .request(
            Method::PUT,
            &path,
            Some(&s.access_token),
            Some(json_body(content)),
        )
        .await?)?;
    Ok(decode::<Sent>(&resp)?.event_id)
}

/// `PUT /rooms/{roomId}/typing/{userId}`.
pub async fn typing(pool: &Pool, s: &Session, room_id: &str) -> Result<(), CallError> {
    let path = format!(
        "{V3}/rooms/{}/typing/{}",
        encode_component(room_id),
        encode_component(&s.user_id)
    );
    let body = Bytes::from_static(br#"{"typing":true,"timeout":5000}"#);
    ok(pool
        .request(Method::PUT, &path, Some(&s.access_token), Some(body))
        .await?)?;
    Ok(())
}

/// `POST /rooms/{roomId}/receipt/m.read/{eventId}`.
pub async fn receipt(
    pool: &Pool,
    s: &Session,
    room_id: &str,
    event_id: &str,
) -> Result<(), CallError> {
    let path = format!(
        "{V3}/rooms/{}/receipt/m.read/{}",
        encode_component(room_id),
        encode_component(event_id)
    );
    ok(pool
        .request(
            Method::POST,
            &path,
            Some(&s.access_token),
            Some(Bytes::from_static(b"{}")),
        )
        .await?)?;
    Ok(())
}

/// `GET /profile/{userId}`.
pub async fn profile(pool: &Pool, s: &Session, user_id: &str) -> Result<(), CallError> {
    let path = format!("{V3}/profile/{}", encode_component(user_id));
    ok(pool
        .request(Method::GET, &path, Some(&s.access_token), None)
        .await?)?;
    Ok(())
}

/// `GET /rooms/{roomId}/messages?dir=b&limit=N`: back-pagination from the end.
pub async fn messages(
    pool: &Pool,
    s: &Session,
    room_id: &str,
    limit: u32,
) -> Result<usize, CallError> {
    #[derive(Deserialize)]
    struct Chunk {
        #[serde(default)]
        chunk: Vec<serde::de::IgnoredAny>,
    }
    let path = format!(
        "{V3}/rooms/{}/messages?dir=b&limit={limit}",
        encode_component(room_id)
    );
    let resp = ok(pool
        .request(Method::GET, &path, Some(&s.access_token), None)
        .await?)?;
    Ok(decode::<Chunk>(&resp)?.chunk.len())
}

/// TURN credentials from `GET /voip/turnServer`.
#[derive(Debug, Clone, Deserialize)]
pub struct TurnServer {
    /// Username (REST scheme: `expiry:user`).
    pub username: String,
    /// Password.
    pub password: String,
    /// `turn:` URIs.
    #[serde(default)]
    pub uris: Vec<String>,
}

/// `GET /voip/turnServer`.
pub async fn turn_server(pool: &Pool, s: &Session) -> Result<TurnServer, CallError> {
    let resp = ok(pool
        .request(
            Method::GET,
            &format!("{V3}/voip/turnServer"),
            Some(&s.access_token),
            None,
        )
        .await?)?;
    decode(&resp)
}

/// The marker the generator puts in each message it sends, so receivers can
/// match the event to its send time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Marker {
    /// Random id of the generator run; events of other runs are ignored.
    pub run: u64,
    /// Sequence number of the message within the run.
    pub seq: u64,
    /// Intended send time, microseconds after the run started.
    pub t_us: u64,
}

/// Name of the content field that carries the [`Marker`].
pub const MARKER_FIELD: &str = "org.tessera.loadtest";

/// Message content carrying a marker.
pub fn marked_message(marker: Marker) -> Value {
    json!({
        "msgtype": "m.text",
        "body": format!("loadtest {} {} {}", marker.run, marker.seq, marker.t_us),
        MARKER_FIELD: marker,
    })
}

/// The parts of a `/sync` response the generator reads.
#[derive(Debug, Default, Deserialize)]
pub struct SyncResponse {
    /// Token for the next incremental sync.
    pub next_batch: String,
    /// Rooms.
    #[serde(default)]
    pub rooms: SyncRooms,
}

/// `rooms` of a sync response.
#[derive(Debug, Default, Deserialize)]
pub struct SyncRooms {
    /// Joined rooms by id.
    #[serde(default)]
    pub join: HashMap<String, JoinedRoom>,
}

/// One joined room of a sync response.
#[derive(Debug, Default, Deserialize)]
pub struct JoinedRoom {
    /// New timeline events.
    #[serde(default)]
    pub timeline: Timeline,
}

/// A room's timeline slice.
#[derive(Debug, Default, Deserialize)]
pub struct Timeline {
    /// The events.
    #[serde(default)]
    pub events: Vec<SyncEvent>,
    /// Whether events were left out between the previous sync and these.
    #[serde(default)]
    pub limited: bool,
}

/// A timeline event, reduced to what matching needs.
#[derive(Debug, Default, Deserialize)]
pub struct SyncEvent {
    /// Event type.
    #[serde(rename = "type", default)]
    pub kind: String,
    /// Event id.
    #[serde(default)]
    pub event_id: String,
    /// Sender's user id.
    #[serde(default)]
    pub sender: String,
    /// Content, reduced to the marker.
    #[serde(default)]
    pub content: SyncContent,
}

/// Event content, reduced to the marker.
#[derive(Debug, Default, Deserialize)]
pub struct SyncContent {
    /// The generator's marker, on messages it sent.
    #[serde(
        rename = "org.tessera.loadtest",
        default,
        deserialize_with = "lenient_marker"
    )]
    pub marker: Option<Marker>,
}

/// Other clients may put anything under the marker's field name; such an
/// event is simply not one of ours, rather than a broken sync response.
fn lenient_marker<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Marker>, D::Error> {
    let v = Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

impl SyncResponse {
    /// Every marker in the timelines, with its room and sender.
    pub fn markers(&self) -> impl Iterator<Item = (&str, &str, Marker)> {
        self.rooms.join.iter().flat_map(|(room, r)| {
            r.timeline.events.iter().filter_map(move |e| {
                e.content
                    .marker
                    .map(|m| (room.as_str(), e.sender.as_str(), m))
            })
        })
    }

    /// Number of rooms whose timeline is `limited` (events were skipped).
    pub fn limited_timelines(&self) -> u64 {
        self.rooms
            .join
            .values()
            .filter(|r| r.timeline.limited)
            .count() as u64
    }

    /// Number of timeline events across rooms.
    pub fn event_count(&self) -> usize {
        self.rooms
            .join
            .values()
            .map(|r| r.timeline.events.len())
            .sum()
    }
}

/// A sync filter that keeps responses small: timeline events only, lazy
/// member loading, no presence or account data.
pub const SYNC_FILTER: &str = r#"{"room":{"timeline":{"limit":200},"state":{"lazy_load_members":true},"ephemeral":{"not_types":["*"]},"account_data":{"not_types":["*"]}},"presence":{"not_types":["*"]},"account_data":{"not_types":["*"]}}"#;

/// `GET /sync` (initial when `since` is `None`), long-polling for `timeout_ms`.
pub async fn sync(
    pool: &Pool,
    s: &Session,
    since: Option<&str>,
    timeout_ms: u64,
    request_timeout: Duration,
) -> Result<SyncResponse, CallError> {
    let resp = sync_raw(pool, s, since, timeout_ms, request_timeout).await?;
    SyncResponse::decode(&resp)
}

/// `GET /sync` as [`sync`], but the body is left undecoded: sync loops take
/// `next_batch` from it first (`syncloop::next_batch`) and decode the rest
/// later with [`SyncResponse::decode`]. Non-success statuses are errors.
pub async fn sync_raw(
    pool: &Pool,
    s: &Session,
    since: Option<&str>,
    timeout_ms: u64,
    request_timeout: Duration,
) -> Result<Response, CallError> {
    let mut path = format!(
        "{V3}/sync?timeout={timeout_ms}&filter={}",
        encode_component(SYNC_FILTER)
    );
    if let Some(since) = since {
        path.push_str("&since=");
        path.push_str(&encode_component(since));
    }
    ok(pool
        .request_with_timeout(
            Method::GET,
            &path,
            Some(&s.access_token),
            None,
            request_timeout,
        )
        .await?)
}

impl SyncResponse {
    /// Decodes a successful `/sync` response body.
    pub fn decode(resp: &Response) -> Result<Self, CallError> {
        decode(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_round_trip_through_a_sync_body() {
        let m = Marker {
            run: 7,
            seq: 42,
            t_us: 1_234_567,
        };
        let event = json!({
            "type": "m.room.message",
            "event_id": "$e",
            "sender": "@a:x",
            "content": marked_message(m),
            "unsigned": { "age": 3 },
        });
        let body = json!({
            "next_batch": "s1",
            "rooms": { "join": {
                "!r:x": { "timeline": { "events": [event, { "type": "m.room.member", "content": {"membership": "join"} }], "limited": false } },
            }, "invite": {} },
            "presence": { "events": [] },
        });
        let sync: SyncResponse = serde_json::from_value(body).expect("sync body decodes");
        assert_eq!(sync.next_batch, "s1");
        assert_eq!(sync.event_count(), 2);
        let found: Vec<_> = sync.markers().collect();
        assert_eq!(found, vec![("!r:x", "@a:x", m)]);
    }

    #[test]
    fn foreign_marker_field_is_ignored() {
        let body = br#"{"next_batch":"s","rooms":{"join":{"!r":{"timeline":{"events":[{"type":"m.room.message","content":{"org.tessera.loadtest":{"run":"x"}}}]}}}}}"#;
        let sync: SyncResponse = serde_json::from_slice(body).expect("decodes");
        assert_eq!(sync.event_count(), 1);
        assert_eq!(sync.markers().count(), 0);
        // A body that is not a sync response at all is an error.
        assert!(serde_json::from_slice::<SyncResponse>(b"[1]").is_err());
    }

    fn uia(body: Value) -> UiaResponse {
        serde_json::from_value(body).expect("UIA body decodes")
    }

    #[test]
    fn uia_picks_a_flow_the_generator_can_complete() {
        // Open registration, as Synapse offers it.
        let open =
            uia(json!({"session": "s", "flows": [{"stages": ["m.login.dummy"]}], "params": {}}));
        assert_eq!(next_stage(&open, false).expect("dummy"), "m.login.dummy");
        // Token-gated registration: token first, then dummy once completed.
        let gated = json!({"session": "s", "flows": [
            {"stages": ["m.login.email.identity"]},
            {"stages": ["m.login.registration_token", "m.login.dummy"]},
        ]});
        assert_eq!(
            next_stage(&uia(gated.clone()), true).expect("token"),
            "m.login.registration_token"
        );
        let mut after = gated.clone();
        after["completed"] = json!(["m.login.registration_token"]);
        assert_eq!(
            next_stage(&uia(after.clone()), true).expect("dummy"),
            "m.login.dummy"
        );
        // Without a token nothing in that server is doable.
        assert!(matches!(
            next_stage(&uia(gated), false),
            Err(CallError::UnsupportedAuth(_))
        ));
        // Every stage done yet still 401: a server bug, reported, not looped on.
        after["completed"] = json!(["m.login.registration_token", "m.login.dummy"]);
        assert!(matches!(
            next_stage(&uia(after), true),
            Err(CallError::Decode(_))
        ));
    }

    #[test]
    fn filter_is_valid_json() {
        let v: Value = serde_json::from_str(SYNC_FILTER).expect("filter parses");
        assert_eq!(v["room"]["timeline"]["limit"], 200);
    }
}
