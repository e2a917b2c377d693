//! Request routing for the client-server API and the node's own endpoints.
//! One module per area; each handler's doc names its endpoint.
//!
//! Paths are matched on segments after `/_matrix/client/{v3,r0,v1}`. A known
//! path with the wrong method answers 405 `M_UNRECOGNIZED`; an unknown path
//! 404 `M_UNRECOGNIZED`.

pub mod account;
pub mod extras;
pub mod info;
pub mod keys;
pub mod legacy;
pub mod backup;
pub mod dehydrated;
pub mod profile;
pub mod reports;
pub mod rooms;
pub mod spaces;
pub mod sync;
pub mod threads;
pub mod upgrade;
pub mod userdata;
pub mod visibility;

use std::rc::Rc;

use http::{Method, StatusCode};
use serde_json::Value;

use crate::error::{ApiError, ApiResult};
use crate::http::{Authed, Req, Resp, authenticate, json_response};
use crate::shard::Shard;

/// Matches `req.method` against the allowed methods, or answers 405.
/// Names the endpoint (its label in the request metrics) first.
macro_rules! methods {
    ($req:expr, $endpoint:literal, $( $m:ident => $e:expr ),+ $(,)?) => {{
        $req.endpoint.set($endpoint);
        match $req.method {
            $( Method::$m => $e, )+
            _ => Err(ApiError::method_not_allowed()),
        }
    }};
}

fn ok(v: Value) -> ApiResult<Resp> {
    Ok(json_response(StatusCode::OK, &v))
}

/// Routes a request to its handler.
pub async fn route(shard: &Rc<Shard>, req: &Req) -> ApiResult<Resp> {
    let segs: Vec<&str> = req.segs.iter().map(String::as_str).collect();
    match segs.as_slice() {
        ["_matrix", "client", "versions"] => methods!(req, "/_matrix/client/versions", GET => ok(info::versions())),
        [".well-known", "matrix", "client"] => methods!(req, "/.well-known/matrix/client", GET => ok(info::well_known_client(shard))),
        [".well-known", "matrix", "server"] => methods!(req, "/.well-known/matrix/server", GET => ok(info::well_known_server(shard))),
        [".well-known", "matrix", "support"] => methods!(req, "/.well-known/matrix/support", GET => ok(info::well_known_support(shard)?)),
        // Liveness for load balancers and orchestrators (as Synapse's `/health`).
        ["health"] => methods!(req, "/health", GET => Ok(crate::http::text_response(StatusCode::OK, "OK".into(), "text/plain")), HEAD => Ok(crate::http::text_response(StatusCode::OK, String::new(), "text/plain"))),
        ["metrics"] if shard.config.metrics.on_client_listener => methods!(req, "/metrics", GET => Ok(info::metrics(shard))),
        ["_matrix", "client", version, rest @ ..] if matches!(*version, "v3" | "r0" | "v1" | "unstable") => client(shard, req, rest).await,
        _ => Err(ApiError::unrecognized()),
    }
}

async fn client(shard: &Rc<Shard>, req: &Req, segs: &[&str]) -> ApiResult<Resp> {
    // Endpoints without authentication.
    match segs {
        ["login"] => return methods!(req, "/_matrix/client/login", GET => ok(info::login_flows()), POST => ok(account::login(shard, req).await?)),
        ["register"] => return methods!(req, "/_matrix/client/register", POST => ok(account::register(shard, req).await?)),
        ["register", "available"] => return methods!(req, "/_matrix/client/register/available", GET => ok(account::available(shard, req)?)),
        ["register", "m.login.registration_token", "validity"] => return methods!(req, "/_matrix/client/register/m.login.registration_token/validity", GET => ok(account::token_validity(shard, req)?)),
        ["refresh"] => return methods!(req, "/_matrix/client/refresh", POST => ok(account::refresh(shard, req)?)),
        ["profile", user] => return methods!(req, "/_matrix/client/profile/{user}", GET => ok(profile::get(shard, req, user, None)?)),
        ["profile", user, field] if req.method == Method::GET => {
            req.endpoint.set("/_matrix/client/profile/{user}/{field}");
            return ok(profile::get(shard, req, user, Some(field))?);
        }
        ["directory", "room", alias] if req.method == Method::GET => {
            req.endpoint.set("/_matrix/client/directory/room/{alias}");
            return ok(rooms::resolve_alias(shard, alias)?);
        }
        ["publicRooms"] if req.method == Method::GET => {
            req.endpoint.set("/_matrix/client/publicRooms");
            return ok(rooms::public_rooms(shard, req, None)?);
        }
        ["directory", "list", "room", room] if req.method == Method::GET => {
            req.endpoint.set("/_matrix/client/directory/list/room/{room}");
            return ok(rooms::visibility(shard, room)?);
        }
        ["capabilities"] | ["voip", "turnServer"] | ["account", "whoami"] => {}
        _ => {}
    }
    authed(shard, req, &LazyAuth { shard, req, cell: std::cell::OnceCell::new() }, segs).await
}

/// Authenticates on first use, so unknown paths answer 404 before any
/// token check (as clients and other servers expect).
struct LazyAuth<'a> {
    shard: &'a Shard,
    req: &'a Req,
    cell: std::cell::OnceCell<Authed>,
}

impl LazyAuth<'_> {
    fn get(&self) -> ApiResult<&Authed> {
        if let Some(a) = self.cell.get() {
            return Ok(a);
        }
        let a = authenticate(self.shard, self.req)?;
        Ok(self.cell.get_or_init(|| a))
    }
}

async fn authed(shard: &Rc<Shard>, req: &Req, auth: &LazyAuth<'_>, segs: &[&str]) -> ApiResult<Resp> {
    match segs {
        ["account", "whoami"] => methods!(req, "/_matrix/client/account/whoami", GET => ok(account::whoami(auth.get()?))),
        ["logout"] => methods!(req, "/_matrix/client/logout", POST => ok(account::logout(shard, auth.get()?)?)),
        ["logout", "all"] => methods!(req, "/_matrix/client/logout/all", POST => ok(account::logout_all(shard, auth.get()?)?)),
        ["account", "password"] => methods!(req, "/_matrix/client/account/password", POST => ok(account::change_password(shard, req, auth.get()?).await?)),
        ["account", "deactivate"] => methods!(req, "/_matrix/client/account/deactivate", POST => ok(account::deactivate(shard, req, auth.get()?).await?)),
        ["account", "3pid"] => methods!(req, "/_matrix/client/account/3pid", GET => ok(serde_json::json!({ "threepids": [] }))),
        ["devices"] => methods!(req, "/_matrix/client/devices", GET => ok(account::devices(shard, auth.get()?)?)),
        ["devices", device] => methods!(req, "/_matrix/client/devices/{device}",
            GET => ok(account::device(shard, auth.get()?, device)?),
            PUT => ok(account::update_device(shard, req, auth.get()?, device)?),
            DELETE => ok(account::delete_device(shard, req, auth.get()?, device).await?)),
        ["delete_devices"] => methods!(req, "/_matrix/client/delete_devices", POST => ok(account::delete_devices(shard, req, auth.get()?).await?)),
        ["capabilities"] => methods!(req, "/_matrix/client/capabilities", GET => ok(info::capabilities(shard))),
        // No application service bridges any protocol yet: every protocol
        // is unknown, and lookups find nothing (as Synapse answers them).
        ["thirdparty", "protocols"] => methods!(req, "/_matrix/client/thirdparty/protocols", GET => { auth.get()?; ok(serde_json::json!({})) }),
        ["thirdparty", "protocol", _] => methods!(req, "/_matrix/client/thirdparty/protocol/{protocol}", GET => { auth.get()?; Err(ApiError::not_found("Unknown protocol")) }),
        ["thirdparty", "location" | "user"] => methods!(req, "/_matrix/client/thirdparty/{kind}", GET => { auth.get()?; ok(serde_json::json!([])) }),
        ["thirdparty", "location" | "user", _] => methods!(req, "/_matrix/client/thirdparty/{kind}/{protocol}", GET => { auth.get()?; ok(serde_json::json!([])) }),
        ["admin", "whois", user] => methods!(req, "/_matrix/client/admin/whois/{user}", GET => ok(account::whois(shard, auth.get()?, user)?)),
        ["voip", "turnServer"] => methods!(req, "/_matrix/client/voip/turnServer", GET => ok(info::turn_server(shard, auth.get()?))),
        ["profile", user, field] => methods!(req, "/_matrix/client/profile/{user}/{field}",
            PUT => ok(profile::set(shard, req, auth.get()?, user, field).await?),
            DELETE => ok(profile::delete(shard, auth.get()?, user, field).await?)),
        ["user", user, "filter"] => methods!(req, "/_matrix/client/user/{user}/filter", POST => ok(userdata::create_filter(shard, req, auth.get()?, user)?)),
        ["user", user, "filter", id] => methods!(req, "/_matrix/client/user/{user}/filter/{id}", GET => ok(userdata::get_filter(shard, auth.get()?, user, id)?)),
        ["user", user, "account_data", kind] => methods!(req, "/_matrix/client/user/{user}/account_data/{kind}",
            GET => ok(userdata::get_account_data(shard, auth.get()?, user, None, kind)?),
            PUT => ok(userdata::put_account_data(shard, req, auth.get()?, user, None, kind)?)),
        ["user", user, "rooms", room, "account_data", kind] => methods!(req, "/_matrix/client/user/{user}/rooms/{room}/account_data/{kind}",
            GET => ok(userdata::get_account_data(shard, auth.get()?, user, Some(room), kind)?),
            PUT => ok(userdata::put_account_data(shard, req, auth.get()?, user, Some(room), kind)?)),
        ["user", user, "rooms", room, "tags"] => methods!(req, "/_matrix/client/user/{user}/rooms/{room}/tags", GET => ok(userdata::tags(shard, auth.get()?, user, room)?)),
        ["user", user, "rooms", room, "tags", tag] => methods!(req, "/_matrix/client/user/{user}/rooms/{room}/tags/{tag}",
            PUT => ok(userdata::put_tag(shard, req, auth.get()?, user, room, tag)?),
            DELETE => ok(userdata::delete_tag(shard, auth.get()?, user, room, tag)?)),
        ["pushrules"] | ["pushrules", ""] => methods!(req, "/_matrix/client/pushrules", GET => ok(userdata::push_rules(shard, auth.get()?)?)),
        ["pushrules", "global"] | ["pushrules", "global", ""] => methods!(req, "/_matrix/client/pushrules/global", GET => ok(userdata::push_rules_global(shard, auth.get()?)?)),
        ["pushrules", "global", kind, rule_id] => methods!(req, "/_matrix/client/pushrules/global/{kind}/{rule_id}",
            GET => ok(userdata::push_rule(shard, auth.get()?, kind, rule_id)?),
            PUT => ok(userdata::put_push_rule(shard, req, auth.get()?, kind, rule_id)?),
            DELETE => ok(userdata::delete_push_rule(shard, auth.get()?, kind, rule_id)?)),
        ["pushrules", "global", kind, rule_id, attr] => methods!(req, "/_matrix/client/pushrules/global/{kind}/{rule_id}/{attr}",
            GET => ok(userdata::push_rule_attr(shard, auth.get()?, kind, rule_id, attr)?),
            PUT => ok(userdata::put_push_rule_attr(shard, req, auth.get()?, kind, rule_id, attr)?)),
        ["pushers"] => methods!(req, "/_matrix/client/pushers", GET => ok(userdata::pushers(shard, auth.get()?)?)),
        ["pushers", "set"] => methods!(req, "/_matrix/client/pushers/set", POST => ok(userdata::set_pusher(shard, req, auth.get()?)?)),
        ["presence", user, "status"] => methods!(req, "/_matrix/client/presence/{user}/status",
            GET => ok(userdata::get_presence(shard, auth.get()?, user)?),
            PUT => ok(userdata::put_presence(shard, req, auth.get()?, user)?)),
        ["user", user, "openid", "request_token"] => methods!(req, "/_matrix/client/user/{user}/openid/request_token", POST => ok(extras::openid_token(shard, auth.get()?, user)?)),
        ["sendToDevice", kind, txn] => methods!(req, "/_matrix/client/sendToDevice/{kind}/{txn}", PUT => ok(extras::send_to_device(shard, req, auth.get()?, kind, txn)?)),
        ["notifications"] => methods!(req, "/_matrix/client/notifications", GET => ok(extras::notifications(shard, req, auth.get()?)?)),
        ["search"] => methods!(req, "/_matrix/client/search", POST => ok(extras::search(shard, req, auth.get()?)?)),
        ["user_directory", "search"] => methods!(req, "/_matrix/client/user_directory/search", POST => ok(userdata::search_users(shard, req, auth.get()?)?)),
        ["keys", "upload"] => methods!(req, "/_matrix/client/keys/upload", POST => ok(keys::upload(shard, req, auth.get()?)?)),
        ["keys", "query"] => methods!(req, "/_matrix/client/keys/query", POST => ok(keys::query(shard, req, auth.get()?)?)),
        ["keys", "claim"] => methods!(req, "/_matrix/client/keys/claim", POST => ok(keys::claim(shard, req, auth.get()?)?)),
        ["keys", "changes"] => methods!(req, "/_matrix/client/keys/changes", GET => ok(keys::changes(shard, req, auth.get()?)?)),
        ["keys", "device_signing", "upload"] => methods!(req, "/_matrix/client/keys/device_signing/upload", POST => ok(keys::device_signing_upload(shard, req, auth.get()?).await?)),
        ["keys", "signatures", "upload"] => methods!(req, "/_matrix/client/keys/signatures/upload", POST => ok(keys::signatures_upload(shard, req, auth.get()?)?)),
        ["org.matrix.msc3814.v1", "dehydrated_device"] => methods!(req, "/_matrix/client/org.matrix.msc3814.v1/dehydrated_device",
            GET => ok(dehydrated::get(shard, auth.get()?)?),
            PUT => ok(dehydrated::put(shard, req, auth.get()?)?),
            DELETE => ok(dehydrated::delete(shard, auth.get()?)?)),
        ["org.matrix.msc3814.v1", "dehydrated_device", device, "events"] => methods!(req, "/_matrix/client/org.matrix.msc3814.v1/dehydrated_device/{device}/events",
            GET => ok(dehydrated::events(shard, req, auth.get()?, device)?),
            POST => ok(dehydrated::events(shard, req, auth.get()?, device)?)),
        ["room_keys", "version"] => methods!(req, "/_matrix/client/room_keys/version",
            GET => ok(backup::get_version(shard, auth.get()?, None)?),
            POST => ok(backup::create_version(shard, req, auth.get()?)?)),
        ["room_keys", "version", version] => methods!(req, "/_matrix/client/room_keys/version/{version}",
            GET => ok(backup::get_version(shard, auth.get()?, Some(version))?),
            PUT => ok(backup::update_version(shard, req, auth.get()?, version)?),
            DELETE => ok(backup::delete_version(shard, auth.get()?, version)?)),
        ["room_keys", "keys", rest @ ..] if rest.len() <= 2 => methods!(req, "/_matrix/client/room_keys/keys/{rest..}",
            GET => ok(backup::get_keys(shard, req, auth.get()?, rest)?),
            PUT => ok(backup::put_keys(shard, req, auth.get()?, rest)?),
            DELETE => ok(backup::delete_keys(shard, req, auth.get()?, rest)?)),
        ["sync"] => methods!(req, "/_matrix/client/sync", GET => sync::sync(shard, req, auth.get()?).await),
        ["createRoom"] => methods!(req, "/_matrix/client/createRoom", POST => ok(rooms::create_room(shard, req, auth.get()?).await?)),
        ["joined_rooms"] => methods!(req, "/_matrix/client/joined_rooms", GET => ok(rooms::joined_rooms(shard, auth.get()?)?)),
        ["knock", target] => methods!(req, "/_matrix/client/knock/{target}", POST => ok(rooms::knock(shard, req, auth.get()?, target).await?)),
        ["join", target] => methods!(req, "/_matrix/client/join/{target}", POST => ok(rooms::join(shard, req, auth.get()?, target).await?)),
        ["rooms", room, "join"] => methods!(req, "/_matrix/client/rooms/{room}/join", POST => ok(rooms::join(shard, req, auth.get()?, room).await?)),
        ["rooms", room, action @ ("invite" | "leave" | "kick" | "ban" | "unban")] => methods!(req, "/_matrix/client/rooms/{room}/{action}", POST => ok(rooms::membership(shard, req, auth.get()?, room, action).await?)),
        ["initialSync"] => methods!(req, "/_matrix/client/initialSync", GET => ok(legacy::initial_sync(shard, req, auth.get()?).await?)),
        ["events"] => methods!(req, "/_matrix/client/events", GET => ok(legacy::events(shard, req, auth.get()?).await?)),
        ["events", event] => methods!(req, "/_matrix/client/events/{event}", GET => ok(legacy::event(shard, auth.get()?, event)?)),
        ["rooms", room, "initialSync"] => methods!(req, "/_matrix/client/rooms/{room}/initialSync", GET => ok(legacy::room_initial_sync(shard, req, auth.get()?, room)?)),
        ["rooms", room, "upgrade"] => methods!(req, "/_matrix/client/rooms/{room}/upgrade", POST => ok(upgrade::upgrade(shard, req, auth.get()?, room).await?)),
        ["rooms", room, "forget"] => methods!(req, "/_matrix/client/rooms/{room}/forget", POST => ok(rooms::forget(shard, auth.get()?, room)?)),
        ["rooms", room, "members"] => methods!(req, "/_matrix/client/rooms/{room}/members", GET => ok(rooms::members(shard, req, auth.get()?, room)?)),
        ["rooms", room, "joined_members"] => methods!(req, "/_matrix/client/rooms/{room}/joined_members", GET => ok(rooms::joined_members(shard, auth.get()?, room)?)),
        ["rooms", room, "state"] => methods!(req, "/_matrix/client/rooms/{room}/state", GET => ok(rooms::state(shard, auth.get()?, room)?)),
        ["rooms", room, "state", kind] => methods!(req, "/_matrix/client/rooms/{room}/state/{kind}",
            GET => ok(rooms::state_event(shard, req, auth.get()?, room, kind, "")?),
            PUT => ok(rooms::put_state(shard, req, auth.get()?, room, kind, "").await?)),
        ["rooms", room, "state", kind, state_key] => methods!(req, "/_matrix/client/rooms/{room}/state/{kind}/{state_key}",
            GET => ok(rooms::state_event(shard, req, auth.get()?, room, kind, state_key)?),
            PUT => ok(rooms::put_state(shard, req, auth.get()?, room, kind, state_key).await?)),
        ["rooms", room, "send", kind, txn] => methods!(req, "/_matrix/client/rooms/{room}/send/{kind}/{txn}", PUT => ok(rooms::send(shard, req, auth.get()?, room, kind, Some(txn)).await?)),
        ["rooms", room, "redact", event, txn] => methods!(req, "/_matrix/client/rooms/{room}/redact/{event}/{txn}", PUT => ok(rooms::redact(shard, req, auth.get()?, room, event, txn).await?)),
        ["rooms", room, "messages"] => methods!(req, "/_matrix/client/rooms/{room}/messages", GET => ok(rooms::messages(shard, req, auth.get()?, room)?)),
        ["rooms", room, "context", event] => methods!(req, "/_matrix/client/rooms/{room}/context/{event}", GET => ok(rooms::context(shard, req, auth.get()?, room, event)?)),
        ["rooms", room, "report", event] => methods!(req, "/_matrix/client/rooms/{room}/report/{event}", POST => ok(reports::event(shard, req, auth.get()?, room, event)?)),
        ["rooms", room, "report"] => methods!(req, "/_matrix/client/rooms/{room}/report", POST => ok(reports::room(shard, req, auth.get()?, room)?)),
        ["users", user, "report"] => methods!(req, "/_matrix/client/users/{user}/report", POST => ok(reports::user(shard, req, auth.get()?, user)?)),
        ["mutual_rooms"] | ["uk.half-shot.msc2666", "user", "mutual_rooms"] => methods!(req, "/_matrix/client/mutual_rooms", GET => ok(rooms::mutual_rooms(shard, req, auth.get()?)?)),
        ["rooms", room, "timestamp_to_event"] => methods!(req, "/_matrix/client/rooms/{room}/timestamp_to_event", GET => ok(rooms::timestamp_to_event(shard, req, auth.get()?, room)?)),
        ["rooms", room, "threads"] => methods!(req, "/_matrix/client/rooms/{room}/threads", GET => ok(threads::threads(shard, req, auth.get()?, room)?)),
        ["rooms", room, "hierarchy"] => methods!(req, "/_matrix/client/rooms/{room}/hierarchy", GET => ok(spaces::hierarchy(shard, req, auth.get()?, room)?)),
        ["room_summary", room] => methods!(req, "/_matrix/client/room_summary/{room}", GET => ok(spaces::summary(shard, auth.get()?, room)?)),
        ["rooms", room, "relations", event] => methods!(req, "/_matrix/client/rooms/{room}/relations/{event}", GET => ok(rooms::relations(shard, req, auth.get()?, room, event, None, None)?)),
        ["rooms", room, "relations", event, rel_type] => methods!(req, "/_matrix/client/rooms/{room}/relations/{event}/{rel_type}", GET => ok(rooms::relations(shard, req, auth.get()?, room, event, Some(rel_type), None)?)),
        ["rooms", room, "relations", event, rel_type, event_type] => methods!(req, "/_matrix/client/rooms/{room}/relations/{event}/{rel_type}/{event_type}", GET => ok(rooms::relations(shard, req, auth.get()?, room, event, Some(rel_type), Some(event_type))?)),
        ["rooms", room, "event", event] => methods!(req, "/_matrix/client/rooms/{room}/event/{event}", GET => ok(rooms::event(shard, auth.get()?, room, event)?)),
        ["rooms", room, "typing", user] => methods!(req, "/_matrix/client/rooms/{room}/typing/{user}", PUT => ok(rooms::typing(shard, req, auth.get()?, room, user).await?)),
        ["rooms", room, "receipt", kind, event] => methods!(req, "/_matrix/client/rooms/{room}/receipt/{kind}/{event}", POST => ok(rooms::receipt(shard, req, auth.get()?, room, kind, event).await?)),
        ["rooms", room, "read_markers"] => methods!(req, "/_matrix/client/rooms/{room}/read_markers", POST => ok(rooms::read_markers(shard, req, auth.get()?, room).await?)),
        ["rooms", room, "aliases"] => methods!(req, "/_matrix/client/rooms/{room}/aliases", GET => ok(rooms::room_aliases(shard, auth.get()?, room)?)),
        ["directory", "room", alias] => methods!(req, "/_matrix/client/directory/room/{alias}",
            PUT => ok(rooms::create_alias(shard, req, auth.get()?, alias)?),
            DELETE => ok(rooms::delete_alias(shard, auth.get()?, alias)?)),
        ["directory", "list", "room", room] => methods!(req, "/_matrix/client/directory/list/room/{room}",
            GET => ok(rooms::visibility(shard, room)?),
            PUT => ok(rooms::set_visibility(shard, req, auth.get()?, room)?)),
        ["publicRooms"] => methods!(req, "/_matrix/client/publicRooms", POST => ok(rooms::public_rooms(shard, req, Some(auth.get()?))?)),
        _ => Err(ApiError::unrecognized()),
    }
}
