//! Accounts and sessions:
//! `POST /register`, `GET /register/available`,
//! `GET /register/m.login.registration_token/validity`, `POST /login`,
//! `POST /logout`, `POST /logout/all`, `GET /account/whoami`, `POST /refresh`,
//! `POST /account/password`, `POST /account/deactivate`, and devices:
//! `GET /devices`, `GET|PUT|DELETE /devices/{deviceId}`, `POST /delete_devices`.
//! (Spec: client-server API, "Client Authentication" and "Device Management".)
//!
//! User-interactive auth keeps no server-side session state: a session id is
//! handed out with the flows, and a request completes when its `auth` proves
//! the one stage required (password for sensitive account changes; dummy or
//! registration token for registration).

use std::rc::Rc;
use std::time::Instant;

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::{Algorithm, Argon2, Params, Version};
use http::StatusCode;
use rand::RngExt;
use ruma::{OwnedUserId, UserId};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::db::{Account, Device, TokenRecord};
use crate::error::{ApiError, ApiResult};
use crate::http::{Authed, Req};
use crate::ratelimit::Action;
use crate::room::now_ms;
use crate::shard::{Draft, RoomOp, Shard};

/// Random string from the URL-safe alphabet.
pub fn random_string(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

fn argon2(shard: &Shard) -> ApiResult<Argon2<'static>> {
    let params = Params::new(shard.config.auth.argon2_m_cost_kib, shard.config.auth.argon2_t_cost, 1, None).map_err(|e| ApiError::unknown(e.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Hashes a password on the blocking pool so the shard keeps serving.
async fn hash_password(shard: &Shard, password: String) -> ApiResult<String> {
    let argon = argon2(shard)?;
    glommio::executor()
        .spawn_blocking(move || argon.hash_password(password.as_bytes()).map(|h| h.to_string()).map_err(|e| ApiError::unknown(e.to_string())))
        .await
}

/// Verifies a password on the blocking pool.
async fn verify_password(shard: &Shard, hash: String, password: String) -> ApiResult<bool> {
    let argon = argon2(shard)?;
    Ok(glommio::executor()
        .spawn_blocking(move || argon.verify_password(password.as_bytes(), hash.as_str()).is_ok())
        .await)
}

fn client_ip(req: &Req) -> String {
    req.peer.map(|p| p.ip().to_string()).unwrap_or_default()
}

/// A new device session: device record plus tokens.
pub struct Session {
    pub device_id: String,
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_in_ms: Option<u64>,
}

/// Creates (or replaces the tokens of) a device.
pub fn open_session(shard: &Shard, user: &UserId, device_id: Option<String>, display_name: Option<String>, refresh: bool, ip: &str) -> ApiResult<Session> {
    let device_id = device_id.unwrap_or_else(|| random_string(10));
    let access_token = format!("syt_{}", random_string(32));
    let refresh_token = refresh.then(|| format!("syr_{}", random_string(32)));
    let lifetime = shard.config.auth.access_token_lifetime_secs * 1000;
    let expires_ms = refresh.then(|| now_ms() + lifetime);
    let old = shard.db.device(user, &device_id)?;
    let device = Device {
        display_name: display_name.or_else(|| old.as_ref().and_then(|d| d.display_name.clone())),
        last_seen_ts: Some(now_ms()),
        last_seen_ip: Some(ip.to_owned()),
        access_token: access_token.clone(),
        refresh_token: refresh_token.clone(),
    };
    let record = TokenRecord { user_id: user.to_string(), device_id: device_id.clone(), expires_ms, refresh_token: refresh_token.clone() };
    shard.db.put_device_session(user, &device_id, &device, &record, old.as_ref())?;
    Ok(Session { device_id, access_token, refresh_token, expires_in_ms: refresh.then_some(lifetime) })
}

fn session_json(user: &UserId, s: &Session, shard: &Shard) -> Value {
    let mut v = json!({ "user_id": user, "access_token": s.access_token, "device_id": s.device_id, "home_server": shard.server_name });
    if let Some(rt) = &s.refresh_token {
        v["refresh_token"] = json!(rt);
    }
    if let Some(ms) = s.expires_in_ms {
        v["expires_in_ms"] = json!(ms);
    }
    v
}

#[derive(Deserialize)]
struct AuthData {
    #[serde(rename = "type")]
    kind: Option<String>,
    session: Option<String>,
    token: Option<String>,
    password: Option<String>,
    identifier: Option<Identifier>,
    user: Option<String>,
}

#[derive(Deserialize)]
struct Identifier {
    #[serde(rename = "type")]
    kind: String,
    user: Option<String>,
}

fn uia_required(stages: &[&str], session: Option<&str>) -> ApiError {
    let session = session.map(str::to_owned).unwrap_or_else(|| random_string(24));
    let mut params = serde_json::Map::new();
    for s in stages {
        params.insert((*s).to_owned(), json!({}));
    }
    ApiError::new(StatusCode::UNAUTHORIZED, "M_FORBIDDEN", "Additional authentication is required")
        .with_extra(json!({ "flows": [ { "stages": stages } ], "params": params, "session": session }))
}

fn uia_body(stages: &[&str], session: Option<&str>) -> ApiError {
    // The initial 401 of UIA carries only flows, params and session.
    let mut e = uia_required(stages, session);
    e.errcode = "";
    e
}

#[derive(Deserialize)]
struct RegisterBody {
    username: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    inhibit_login: bool,
    #[serde(default)]
    refresh_token: bool,
    auth: Option<AuthData>,
}

/// Checks a localpart against the spec's historical-compatible grammar.
pub fn valid_localpart(localpart: &str) -> bool {
    !localpart.is_empty() && localpart.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'))
}

fn parse_new_user(shard: &Shard, localpart: &str) -> ApiResult<OwnedUserId> {
    if !valid_localpart(localpart) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "M_INVALID_USERNAME", "User ID may only contain a-z, 0-9, and ._=-/+"));
    }
    let id = format!("@{localpart}:{}", shard.server_name);
    if id.len() > 255 {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "M_INVALID_USERNAME", "User ID is too long"));
    }
    UserId::parse(id).map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "M_INVALID_USERNAME", "Invalid user ID"))
}

/// POST /_matrix/client/v3/register
pub async fn register(shard: &Rc<Shard>, req: &Req) -> ApiResult<Value> {
    let kind = req.query("kind").unwrap_or("user");
    let guest = match kind {
        "user" => false,
        "guest" => true,
        _ => return Err(ApiError::invalid_param("kind must be user or guest")),
    };
    let body: RegisterBody = req.json(shard)?;
    if guest && !shard.config.registration.allow_guests {
        return Err(ApiError::forbidden("Guest access is disabled"));
    }
    if !guest && !shard.config.registration.enabled {
        return Err(ApiError::forbidden("Registration has been disabled"));
    }
    shard.limiter.check(Action::Registration, &client_ip(req), Instant::now())?;
    let user = match (&body.username, guest) {
        (Some(u), false) => parse_new_user(shard, &u.to_lowercase())?,
        _ => parse_new_user(shard, &random_string(12).to_lowercase())?,
    };
    if shard.db.account(&user)?.is_some() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "M_USER_IN_USE", "User ID already taken"));
    }
    if !guest {
        let tokens = &shard.config.registration.tokens;
        let stages: &[&str] = if tokens.is_empty() { &["m.login.dummy"] } else { &["m.login.registration_token"] };
        let Some(auth) = &body.auth else { return Err(uia_body(stages, None)) };
        let passed = match auth.kind.as_deref() {
            Some("m.login.dummy") => tokens.is_empty(),
            Some("m.login.registration_token") => auth.token.as_ref().is_some_and(|t| tokens.iter().any(|c| c == t)),
            _ => false,
        };
        if !passed {
            let mut e = uia_required(stages, auth.session.as_deref());
            if auth.kind.as_deref() == Some("m.login.registration_token") {
                e.errcode = "M_UNAUTHORIZED";
                e.message = "Invalid registration token".into();
            }
            return Err(e);
        }
        if body.password.is_none() {
            return Err(ApiError::missing_param("Missing password"));
        }
    }
    if let Some(p) = &body.password
        && p.len() < shard.config.auth.password_min_len
    {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "M_WEAK_PASSWORD", "Password is too short"));
    }
    let password_hash = match body.password.clone() {
        Some(p) => Some(hash_password(shard, p).await?),
        None => None,
    };
    let account = Account { password_hash, deactivated: false, is_guest: guest, admin: false, displayname: Some(user.localpart().to_owned()), avatar_url: None, created_ms: now_ms(), fields: Default::default() };
    if !shard.db.create_account(&user, &account)? {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "M_USER_IN_USE", "User ID already taken"));
    }
    shard.db.put_directory_user(&user, &json!({ "displayname": account.displayname }))?;
    if body.inhibit_login {
        return Ok(json!({ "user_id": user, "home_server": shard.server_name }));
    }
    let session = open_session(shard, &user, body.device_id, body.initial_device_display_name, body.refresh_token, &client_ip(req))?;
    Ok(session_json(&user, &session, shard))
}

/// GET /_matrix/client/v3/register/available
pub fn available(shard: &Shard, req: &Req) -> ApiResult<Value> {
    let name = req.query("username").ok_or_else(|| ApiError::missing_param("Missing username"))?;
    let user = parse_new_user(shard, name)?;
    if shard.db.account(&user)?.is_some() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "M_USER_IN_USE", "User ID already taken"));
    }
    Ok(json!({ "available": true }))
}

/// GET /_matrix/client/v1/register/m.login.registration_token/validity
pub fn token_validity(shard: &Shard, req: &Req) -> ApiResult<Value> {
    let token = req.query("token").ok_or_else(|| ApiError::missing_param("Missing token"))?;
    Ok(json!({ "valid": shard.config.registration.tokens.iter().any(|t| t == token) }))
}

#[derive(Deserialize)]
struct LoginBody {
    #[serde(rename = "type")]
    kind: String,
    identifier: Option<Identifier>,
    user: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    refresh_token: bool,
}

/// Resolves a login identifier (`m.id.user` or the legacy `user` field) to a local user id.
fn login_user(shard: &Shard, identifier: Option<&Identifier>, user: Option<&String>) -> ApiResult<OwnedUserId> {
    let name = match identifier {
        Some(id) if id.kind == "m.id.user" => id.user.clone().ok_or_else(|| ApiError::bad_json("identifier.user is required"))?,
        Some(_) => return Err(ApiError::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", "Unsupported identifier type")),
        None => user.cloned().ok_or_else(|| ApiError::bad_json("identifier is required"))?,
    };
    let full = if name.starts_with('@') { name.to_lowercase() } else { format!("@{}:{}", name.to_lowercase(), shard.server_name) };
    UserId::parse(full).map_err(|_| ApiError::forbidden("Invalid username or password"))
}

/// POST /_matrix/client/v3/login
pub async fn login(shard: &Rc<Shard>, req: &Req) -> ApiResult<Value> {
    let body: LoginBody = req.json(shard)?;
    if body.kind != "m.login.password" {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "M_UNKNOWN", "Unknown login type"));
    }
    shard.limiter.check(Action::Login, &client_ip(req), Instant::now())?;
    let user = login_user(shard, body.identifier.as_ref(), body.user.as_ref())?;
    let password = body.password.ok_or_else(|| ApiError::bad_json("password is required"))?;
    let account = shard.db.account(&user)?;
    let hash = match &account {
        Some(a) if !a.deactivated => a.password_hash.clone(),
        Some(_) => return Err(ApiError::new(StatusCode::FORBIDDEN, "M_USER_DEACTIVATED", "This account has been deactivated")),
        None => None,
    };
    let ok = match hash {
        Some(h) => verify_password(shard, h, password).await?,
        None => false,
    };
    if !ok {
        return Err(ApiError::forbidden("Invalid username or password"));
    }
    let session = open_session(shard, &user, body.device_id, body.initial_device_display_name, body.refresh_token, &client_ip(req))?;
    // A new login is a new device for everyone who shares a room.
    crate::api::keys::devices_changed(shard, &user)?;
    let mut v = session_json(&user, &session, shard);
    v["well_known"] = json!({ "m.homeserver": { "base_url": shard.config.base_url() } });
    Ok(v)
}

/// GET /_matrix/client/v3/account/whoami
pub fn whoami(auth: &Authed) -> Value {
    json!({ "user_id": auth.user, "device_id": auth.device, "is_guest": auth.is_guest })
}

/// POST /_matrix/client/v3/logout
pub fn logout(shard: &Shard, auth: &Authed) -> ApiResult<Value> {
    shard.db.delete_device(&auth.user, &auth.device)?;
    crate::api::keys::devices_changed(shard, &auth.user)?;
    Ok(json!({}))
}

/// POST /_matrix/client/v3/logout/all
pub fn logout_all(shard: &Shard, auth: &Authed) -> ApiResult<Value> {
    for (id, _) in shard.db.devices(&auth.user, usize::MAX)? {
        shard.db.delete_device(&auth.user, &id)?;
    }
    crate::api::keys::devices_changed(shard, &auth.user)?;
    Ok(json!({}))
}

#[derive(Deserialize)]
struct RefreshBody {
    refresh_token: String,
}

/// POST /_matrix/client/v3/refresh
pub fn refresh(shard: &Shard, req: &Req) -> ApiResult<Value> {
    let body: RefreshBody = req.json(shard)?;
    let record = shard.db.refresh_token(&body.refresh_token)?.ok_or_else(|| ApiError::unknown_token(false))?;
    let user = OwnedUserId::try_from(record.user_id).map_err(|e| crate::error::Error::Corrupt(e.to_string()))?;
    let device = shard.db.device(&user, &record.device_id)?.ok_or_else(|| ApiError::unknown_token(false))?;
    if device.refresh_token.as_deref() != Some(body.refresh_token.as_str()) {
        return Err(ApiError::unknown_token(false));
    }
    let session = open_session(shard, &user, Some(record.device_id), None, true, "")?;
    Ok(json!({ "access_token": session.access_token, "refresh_token": session.refresh_token, "expires_in_ms": session.expires_in_ms }))
}

/// Checks the `auth` of a sensitive request: `m.login.password` for the caller.
pub(crate) async fn require_password(shard: &Shard, req: &Req, auth: &Authed) -> ApiResult<()> {
    #[derive(Deserialize)]
    struct WithAuth {
        auth: Option<AuthData>,
    }
    let body: WithAuth = req.json(shard)?;
    let account = shard.db.account(&auth.user)?.ok_or_else(|| ApiError::unknown_token(false))?;
    let Some(hash) = account.password_hash else {
        // Accounts without a password (e.g. guests) can only use the dummy stage.
        return match body.auth.and_then(|a| a.kind) {
            Some(k) if k == "m.login.dummy" => Ok(()),
            _ => Err(uia_body(&["m.login.dummy"], None)),
        };
    };
    let Some(data) = body.auth else { return Err(uia_body(&["m.login.password"], None)) };
    if data.kind.as_deref() != Some("m.login.password") {
        return Err(uia_required(&["m.login.password"], data.session.as_deref()));
    }
    let claimed = login_user(shard, data.identifier.as_ref(), data.user.as_ref()).ok();
    if claimed.as_ref().is_some_and(|c| *c != auth.user) {
        return Err(ApiError::forbidden("Cannot authenticate as another user"));
    }
    let password = data.password.unwrap_or_default();
    if !verify_password(shard, hash, password).await? {
        let mut e = uia_required(&["m.login.password"], data.session.as_deref());
        e.message = "Invalid password".into();
        return Err(e);
    }
    Ok(())
}

/// POST /_matrix/client/v3/account/password
pub async fn change_password(shard: &Rc<Shard>, req: &Req, auth: &Authed) -> ApiResult<Value> {
    #[derive(Deserialize)]
    struct Body {
        new_password: String,
        #[serde(default = "yes")]
        logout_devices: bool,
    }
    fn yes() -> bool {
        true
    }
    let body: Body = req.json(shard)?;
    require_password(shard, req, auth).await?;
    if body.new_password.len() < shard.config.auth.password_min_len {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "M_WEAK_PASSWORD", "Password is too short"));
    }
    let hash = hash_password(shard, body.new_password).await?;
    let mut account = shard.db.account(&auth.user)?.ok_or_else(|| ApiError::unknown_token(false))?;
    account.password_hash = Some(hash);
    shard.db.put_account(&auth.user, &account)?;
    if body.logout_devices {
        for (id, _) in shard.db.devices(&auth.user, usize::MAX)? {
            if id != auth.device {
                shard.db.delete_device(&auth.user, &id)?;
            }
        }
        crate::api::keys::devices_changed(shard, &auth.user)?;
    }
    Ok(json!({}))
}

/// POST /_matrix/client/v3/account/deactivate: logs out every device, leaves
/// every room, clears the profile, deletes account data and key backups,
/// and marks the account deactivated. With `erase`, users who join the
/// user's rooms later get the user's events redacted (see
/// `RoomHead::erased`); the non-event data goes either way.
pub async fn deactivate(shard: &Rc<Shard>, req: &Req, auth: &Authed) -> ApiResult<Value> {
    require_password(shard, req, auth).await?;
    let mut account = shard.db.account(&auth.user)?.ok_or_else(|| ApiError::unknown_token(false))?;
    #[derive(Deserialize)]
    struct Body {
        #[serde(default)]
        erase: bool,
    }
    let erase = req.json::<Body>(shard)?.erase;
    // Offline: stored presence no longer says online, and the user leaves
    // the list of those a restart takes over.
    crate::presence::gone(shard, &auth.user)?;
    let rooms = shard.db.user_rooms(&auth.user, shard.config.limits.rooms_per_user_max)?;
    if erase {
        // Every room the user's events may be in, left ones included.
        for (room, _) in &rooms {
            let Ok(room) = ruma::RoomId::parse(room.as_str()) else { continue };
            shard.room_op(&room, RoomOp::Erase { user: auth.user.clone() }).await?;
        }
    }
    let member = |content: Value| Draft { sender: auth.user.clone(), kind: "m.room.member".into(), state_key: Some(auth.user.to_string()), content, txn: None, redacts: None };
    for (room, ur) in rooms {
        if matches!(ur.membership.as_str(), "join" | "invite" | "knock") {
            let Ok(room) = ruma::RoomId::parse(room.as_str()) else { continue };
            // Erasing clears the profile in the room first (as Synapse
            // does), so that the leave's `prev_content`, which everyone
            // reading the room's state sees, holds no name or avatar.
            if erase
                && ur.membership == "join"
                && let Err(e) = shard.room_op(&room, RoomOp::Send(member(json!({ "membership": "join" })))).await
            {
                tracing::warn!(room = %room, error = %e.message, "clearing the profile in a room on erasure failed");
            }
            if let Err(e) = shard.room_op(&room, RoomOp::Send(member(json!({ "membership": "leave" })))).await {
                tracing::warn!(room = %room, error = %e.message, "leaving room on deactivation failed");
            }
        }
    }
    account.deactivated = true;
    account.password_hash = None;
    account.displayname = None;
    account.avatar_url = None;
    shard.db.put_account(&auth.user, &account)?;
    for (id, _) in shard.db.devices(&auth.user, usize::MAX)? {
        shard.db.delete_device(&auth.user, &id)?;
    }
    // Nothing is pushed to a deactivated account, and it leaves the user
    // directory's profile.
    for pusher in shard.db.pushers(&auth.user, usize::MAX)? {
        if let (Some(app_id), Some(pushkey)) = (pusher["app_id"].as_str(), pusher["pushkey"].as_str()) {
            shard.db.put_pusher(&auth.user, app_id, pushkey, None)?;
        }
    }
    shard.db.put_directory_user(&auth.user, &json!({}))?;
    // Account data goes too (push rules, ignored users, direct chats, tags,
    // read markers), and so do the server-side key backups, as Synapse
    // does; `erase` asks for this non-event data to go.
    let ignored = shard.db.account_data(&auth.user, None, "m.ignored_user_list")?.map(|e| crate::api::userdata::ignored_list(&e.content)).unwrap_or_default();
    let mut writes = crate::db::Db::ignore_writes(&auth.user, &ignored, &std::collections::HashSet::new());
    writes.push(crate::db::Db::all_account_data_delete(&auth.user));
    shard.db.store.write(writes)?;
    shard.user_settings_changed();
    crate::api::backup::delete_everything(shard, &auth.user)?;
    Ok(json!({ "id_server_unbind_result": "no-support" }))
}

fn device_json(id: &str, d: &Device) -> Value {
    json!({ "device_id": id, "display_name": d.display_name, "last_seen_ip": d.last_seen_ip, "last_seen_ts": d.last_seen_ts })
}

/// GET /_matrix/client/v3/devices
pub fn devices(shard: &Shard, auth: &Authed) -> ApiResult<Value> {
    let list: Vec<Value> = shard.db.devices(&auth.user, 10_000)?.iter().map(|(id, d)| device_json(id, d)).collect();
    Ok(json!({ "devices": list }))
}

/// GET /_matrix/client/v3/admin/whois/{userId}
///
/// A user's devices with where and when each was last seen (as of its
/// login). Users may look themselves up; looking up others needs a server
/// administrator, which this server does not have yet, so it is 403.
pub fn whois(shard: &Shard, auth: &Authed, user: &str) -> ApiResult<Value> {
    let user = crate::api::rooms::parse_user(user)?;
    if user != auth.user {
        return Err(ApiError::forbidden("Only server administrators may look up other users"));
    }
    let mut devices = serde_json::Map::new();
    for (id, d) in shard.db.devices(&user, 10_000)? {
        let mut connection = json!({});
        if let Some(ip) = &d.last_seen_ip {
            connection["ip"] = json!(ip);
        }
        if let Some(ts) = d.last_seen_ts {
            connection["last_seen"] = json!(ts);
        }
        devices.insert(id, json!({ "sessions": [{ "connections": [connection] }] }));
    }
    Ok(json!({ "user_id": user, "devices": devices }))
}

/// GET /_matrix/client/v3/devices/{deviceId}
pub fn device(shard: &Shard, auth: &Authed, device: &str) -> ApiResult<Value> {
    let d = shard.db.device(&auth.user, device)?.ok_or_else(|| ApiError::not_found("Unknown device"))?;
    Ok(device_json(device, &d))
}

/// PUT /_matrix/client/v3/devices/{deviceId}
pub fn update_device(shard: &Shard, req: &Req, auth: &Authed, device: &str) -> ApiResult<Value> {
    #[derive(Deserialize)]
    struct Body {
        display_name: Option<String>,
    }
    let body: Body = req.json(shard)?;
    let mut d = shard.db.device(&auth.user, device)?.ok_or_else(|| ApiError::not_found("Unknown device"))?;
    if let Some(name) = body.display_name {
        d.display_name = Some(name);
    }
    shard.db.put_device(&auth.user, device, &d)?;
    crate::api::keys::devices_changed(shard, &auth.user)?;
    Ok(json!({}))
}

/// DELETE /_matrix/client/v3/devices/{deviceId} (user-interactive auth)
pub async fn delete_device(shard: &Rc<Shard>, req: &Req, auth: &Authed, device: &str) -> ApiResult<Value> {
    require_password(shard, req, auth).await?;
    if !shard.db.delete_device(&auth.user, device)? {
        return Err(ApiError::not_found("Unknown device"));
    }
    crate::api::keys::devices_changed(shard, &auth.user)?;
    Ok(json!({}))
}

/// POST /_matrix/client/v3/delete_devices (user-interactive auth)
pub async fn delete_devices(shard: &Rc<Shard>, req: &Req, auth: &Authed) -> ApiResult<Value> {
    #[derive(Deserialize)]
    struct Body {
        devices: Vec<String>,
    }
    let body: Body = req.json(shard)?;
    require_password(shard, req, auth).await?;
    for d in body.devices {
        shard.db.delete_device(&auth.user, &d)?;
    }
    crate::api::keys::devices_changed(shard, &auth.user)?;
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localpart_grammar() {
        assert!(valid_localpart("alice"));
        assert!(valid_localpart("a.b_c=d-e/f+g9"));
        assert!(!valid_localpart("Alice"));
        assert!(!valid_localpart("al ice"));
        assert!(!valid_localpart(""));
        assert!(!valid_localpart("a:b"));
    }
}
