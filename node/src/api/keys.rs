//! The key server's client endpoints (spec "End-to-end encryption"):
//! `POST /keys/upload`, `/keys/query`, `/keys/claim`, `GET /keys/changes`,
//! `POST /keys/device_signing/upload`, `/keys/signatures/upload`, and the
//! device-list and one-time-key fields of `/sync`.
//!
//! A change of a user's keys is written in the same batch as a change row
//! for every local user who shares a room with them (and the user), at
//! this shard's next stream position; syncs and `/keys/changes` read those
//! rows between two tokens.

use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use http::StatusCode;
use ruma::{OwnedUserId, RoomId, UserId};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::api::sync::SyncToken;
use crate::db::Db;
use crate::e2ee::{self, KeyError, Usage};
use crate::error::{ApiError, ApiResult};
use crate::http::{Authed, Req};
use crate::keystore::FallbackKey;
use crate::shard::Shard;
use crate::storage::Write;

/// Most members read per room when finding who watches a user's keys.
const MEMBERS_PER_ROOM_MAX: usize = 100_000;
/// Most users one query or claim may name.
const USERS_PER_REQUEST_MAX: usize = 10_000;
/// Most changed users reported by one sync or `/keys/changes`.
const CHANGES_MAX: usize = 100_000;

fn key_error(e: KeyError) -> ApiError {
    match e {
        KeyError::Malformed(m) => ApiError::invalid_param(m),
        KeyError::MissingSignature(m) | KeyError::BadSignature(m) => ApiError::new(StatusCode::BAD_REQUEST, "M_INVALID_SIGNATURE", m),
    }
}

/// Local users who must hear of `user`'s key changes: the user and every
/// joined or invited member of the user's joined rooms, read from storage
/// (a member who joined before this request was answered is never missed).
pub(crate) fn watchers(shard: &Shard, user: &UserId) -> ApiResult<Vec<OwnedUserId>> {
    watchers_of(shard, user, |room| Ok(Rc::new(shard.db.memberships(room, MEMBERS_PER_ROOM_MAX)?)))
}

/// [`watchers`] from the shard's member-list cache, which may trail a
/// membership change on another shard by the moments its announcement
/// takes to arrive: good enough for presence, not for key changes.
pub(crate) fn presence_watchers(shard: &Shard, user: &UserId) -> ApiResult<Vec<OwnedUserId>> {
    watchers_of(shard, user, |room| shard.room_members(room, MEMBERS_PER_ROOM_MAX))
}

fn watchers_of(shard: &Shard, user: &UserId, members: impl Fn(&RoomId) -> ApiResult<crate::shard::MemberList>) -> ApiResult<Vec<OwnedUserId>> {
    let mut set = BTreeSet::from([user.to_owned()]);
    for (room, ur) in shard.db.user_rooms(user, shard.config.limits.rooms_per_user_max)? {
        if ur.membership != "join" {
            continue;
        }
        let Ok(room) = RoomId::parse(room.as_str()) else { continue };
        for (member, membership) in members(&room)?.iter() {
            if (membership == "join" || membership == "invite")
                && let Ok(m) = OwnedUserId::try_from(member.as_str())
                && m.server_name() == shard.server_name
            {
                set.insert(m);
            }
        }
    }
    Ok(set.into_iter().collect())
}

/// Writes `writes` together with change rows telling `watchers` that
/// `user`'s keys changed, and wakes their syncs.
fn commit_change(shard: &Shard, user: &UserId, watchers: Vec<OwnedUserId>, mut writes: Vec<Write>) -> ApiResult<()> {
    // No await from here to `publish`: positions are handed out in order.
    let pos = shard.next_pos();
    let me = shard.id as u16;
    writes.extend(watchers.iter().map(|w| Db::key_change_write(w, me, pos, user)));
    writes.push(Db::stream_head_write(me, pos));
    shard.db.store.write(writes)?;
    shard.publish(pos, vec![], watchers);
    Ok(())
}

/// Whether two users are both joined to some room.
fn share_a_room(shard: &Shard, a: &UserId, b: &UserId) -> ApiResult<bool> {
    for (room, ur) in shard.db.user_rooms(a, shard.config.limits.rooms_per_user_max)? {
        if ur.membership == "join"
            && let Ok(room) = RoomId::parse(room.as_str())
            && shard.db.membership(&room, b)?.as_deref() == Some("join")
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// After `user` joined or left `room`: a join puts the user and every
/// local member in each other's `device_lists.changed`; a leave puts in
/// each other's `left` the members who no longer share any room with them.
pub fn membership_changed(shard: &Shard, room: &RoomId, user: &UserId, joined: bool) -> ApiResult<()> {
    let mut others = Vec::new();
    for member in shard.db.members(room, "join", MEMBERS_PER_ROOM_MAX)? {
        if let Ok(m) = OwnedUserId::try_from(member)
            && m != user
            && m.server_name() == shard.server_name
            && (joined || !share_a_room(shard, user, &m)?)
        {
            others.push(m);
        }
    }
    if others.is_empty() {
        return Ok(());
    }
    // No await from here to `publish`: positions are handed out in order.
    let pos = shard.next_pos();
    let me = shard.id as u16;
    let row = if joined { Db::key_change_write } else { Db::key_left_write };
    let mut writes: Vec<Write> = others.iter().flat_map(|m| [row(m, me, pos, user), row(user, me, pos, m)]).collect();
    writes.push(Db::stream_head_write(me, pos));
    shard.db.store.write(writes)?;
    others.push(user.to_owned());
    shard.publish(pos, vec![], others);
    Ok(())
}

/// `changed` and `left` for `watcher` between two tokens: a user counts as
/// left only if they share no room with the watcher now and did not change
/// in the range.
///
/// A range too long to read (a very old token) reports every user sharing
/// a room with the watcher as changed: clients then query their keys again,
/// which is always safe.
fn changed_and_left(shard: &Shard, watcher: &UserId, since: &[u64], upper: &[u64]) -> ApiResult<(BTreeSet<String>, BTreeSet<String>)> {
    let changes = shard.db.key_changes_and_left(watcher, since, upper, CHANGES_MAX)?;
    if changes.too_old {
        return Ok((watchers(shard, watcher)?.into_iter().map(|u| u.to_string()).collect(), BTreeSet::new()));
    }
    let (changed, candidates) = (changes.changed, changes.left);
    let mut left = BTreeSet::new();
    for user in candidates {
        if changed.contains(&user) {
            continue;
        }
        if let Ok(u) = UserId::parse(user.as_str())
            && !share_a_room(shard, watcher, &u)?
        {
            left.insert(user);
        }
    }
    Ok((changed, left))
}

/// Tells everyone sharing a room with `user` that their devices changed
/// (a device was added, renamed or removed).
pub fn devices_changed(shard: &Shard, user: &UserId) -> ApiResult<()> {
    let w = watchers(shard, user)?;
    commit_change(shard, user, w, Vec::new())
}

/// The keys of a `/keys/upload` body (also part of a dehydrated device).
#[derive(Deserialize, Default)]
pub(crate) struct UploadBody {
    pub(crate) device_keys: Option<Value>,
    #[serde(default)]
    one_time_keys: BTreeMap<String, Value>,
    #[serde(default)]
    fallback_keys: BTreeMap<String, Value>,
    #[serde(default, rename = "org.matrix.msc2732.fallback_keys")]
    fallback_keys_unstable: BTreeMap<String, Value>,
}

fn algorithm_of(key_id: &str) -> ApiResult<&str> {
    match key_id.split_once(':') {
        Some((alg, id)) if !alg.is_empty() && !id.is_empty() => Ok(alg),
        _ => Err(ApiError::invalid_param(format!("Key id {key_id} is not of the form algorithm:id"))),
    }
}

fn check_key_value(key_id: &str, key: &Value) -> ApiResult<()> {
    let ok = match key {
        Value::String(s) => !s.is_empty(),
        Value::Object(m) => m.get("key").is_some_and(Value::is_string) && m.get("signatures").is_some_and(Value::is_object),
        _ => false,
    };
    if ok { Ok(()) } else { Err(ApiError::invalid_param(format!("Key {key_id} must be a string or an object with a key and signatures"))) }
}

/// POST /_matrix/client/v3/keys/upload
pub fn upload(shard: &Shard, req: &Req, auth: &Authed) -> ApiResult<Value> {
    let body: UploadBody = req.json(shard)?;
    let counts = store_keys(shard, &auth.user, &auth.device, body, Vec::new())?;
    Ok(json!({ "one_time_key_counts": counts }))
}

/// Checks and stores a device's uploaded keys together with `writes`;
/// returns the device's one-time key counts. Everything is checked before
/// anything is written: a bad key refuses the whole upload.
pub(crate) fn store_keys(shard: &Shard, user: &UserId, device: &str, body: UploadBody, mut writes: Vec<Write>) -> ApiResult<BTreeMap<String, u64>> {
    let mut changed = false;
    if let Some(mut keys) = body.device_keys {
        e2ee::check_device_keys(&keys, user.as_str(), device).map_err(key_error)?;
        if let Some(m) = keys.as_object_mut() {
            m.remove("unsigned");
        }
        if shard.db.device_keys(user, device)?.as_ref() != Some(&keys) {
            writes.push(Db::device_keys_write(user, device, &keys));
            changed = true;
        }
    }
    let max = shard.config.limits.one_time_keys_per_device_max;
    // A device holds at most `max` keys, so this read sees all of them.
    let existing: BTreeMap<String, Value> = shard.db.one_time_keys(user, device, max + 1)?.into_iter().collect();
    let mut count = existing.len();
    let fresh: BTreeSet<&str> = body.one_time_keys.keys().filter(|id| !existing.contains_key(*id)).map(String::as_str).collect();
    let claimed = shard.db.claimed_among(user, device, &fresh)?;
    for (id, key) in &body.one_time_keys {
        algorithm_of(id)?;
        check_key_value(id, key)?;
        if let Some(existing) = existing.get(id) {
            if existing != key {
                return Err(ApiError::invalid_param(format!("One-time key {id} already exists with other content")));
            }
            continue;
        }
        if claimed.contains(id) {
            // A repeated upload of a key already handed out: never again.
            continue;
        }
        count += 1;
        if count > max {
            return Err(ApiError::invalid_param(format!("A device may hold at most {max} unclaimed one-time keys")));
        }
        writes.push(Db::one_time_key_write(user, device, id, key));
    }
    let stored: BTreeMap<String, FallbackKey> = shard.db.fallback_keys(user, device)?.into_iter().collect();
    for (id, key) in body.fallback_keys_unstable.iter().chain(&body.fallback_keys) {
        let algorithm = algorithm_of(id)?;
        check_key_value(id, key)?;
        if stored.get(algorithm).is_some_and(|f| f.key_id == *id && f.key == *key) {
            continue;
        }
        writes.push(Db::fallback_key_write(user, device, algorithm, &FallbackKey { key_id: id.clone(), key: key.clone(), used: false }));
    }
    if changed {
        let w = watchers(shard, user)?;
        commit_change(shard, user, w, writes)?;
    } else if !writes.is_empty() {
        shard.db.store.write(writes)?;
    }
    shard.db.key_counts_changed();
    Ok(shard.db.one_time_key_counts(user, device, max + 1)?)
}

/// Adds the signatures stored apart from a key object: those of its owner
/// (e.g. self-signing over a device) and those of `viewer` (user-signing
/// over another user's master key). Others' user-signing signatures stay private.
fn merge_signatures(object: &mut Value, target: &str, owner: &UserId, viewer: &UserId, signatures: &[(String, String, String, String)]) {
    for (t, signer, key_id, sig) in signatures {
        if t != target || (signer != owner.as_str() && signer != viewer.as_str()) {
            continue;
        }
        if !object.get("signatures").is_some_and(Value::is_object) {
            object["signatures"] = json!({});
        }
        let by_signer = &mut object["signatures"][signer.as_str()];
        if !by_signer.is_object() {
            *by_signer = json!({});
        }
        by_signer[key_id.as_str()] = json!(sig);
    }
}

fn public_of(key: &Value) -> Option<String> {
    key.get("keys")?.as_object()?.values().next()?.as_str().map(str::to_owned)
}

#[derive(Deserialize)]
struct QueryBody {
    device_keys: BTreeMap<String, Vec<String>>,
}

/// POST /_matrix/client/v3/keys/query
pub fn query(shard: &Shard, req: &Req, auth: &Authed) -> ApiResult<Value> {
    let body: QueryBody = req.json(shard)?;
    if body.device_keys.len() > USERS_PER_REQUEST_MAX {
        return Err(ApiError::too_large("too many users in one query"));
    }
    let mut device_keys = Map::new();
    let (mut masters, mut self_signing, mut user_signing) = (Map::new(), Map::new(), Map::new());
    let mut failures = Map::new();
    for (user, wanted) in &body.device_keys {
        let user = crate::api::rooms::parse_user(user)?;
        if user.server_name() != shard.server_name {
            failures.insert(user.server_name().to_string(), json!({ "status": 503, "message": "Federation is not available" }));
            continue;
        }
        let signatures = shard.db.key_signatures(&user)?;
        let names: BTreeMap<String, Option<String>> = shard.db.devices(&user, crate::keystore::DEVICES_PER_USER_MAX)?.into_iter().map(|(id, d)| (id, d.display_name)).collect();
        let mut devices = Map::new();
        for (device, mut keys) in shard.db.all_device_keys(&user)? {
            if !wanted.is_empty() && !wanted.contains(&device) {
                continue;
            }
            let Some(name) = names.get(&device) else { continue };
            merge_signatures(&mut keys, &device, &user, &auth.user, &signatures);
            keys["unsigned"] = json!({ "device_display_name": name });
            devices.insert(device, keys);
        }
        device_keys.insert(user.to_string(), Value::Object(devices));
        for (usage, mut key) in shard.db.cross_signing_keys(&user)? {
            let Some(public) = public_of(&key) else { continue };
            merge_signatures(&mut key, &public, &user, &auth.user, &signatures);
            match usage.as_str() {
                "master" => masters.insert(user.to_string(), key),
                "self_signing" => self_signing.insert(user.to_string(), key),
                "user_signing" if user == auth.user => user_signing.insert(user.to_string(), key),
                _ => None,
            };
        }
    }
    Ok(json!({
        "device_keys": device_keys,
        "master_keys": masters,
        "self_signing_keys": self_signing,
        "user_signing_keys": user_signing,
        "failures": failures,
    }))
}

#[derive(Deserialize)]
struct ClaimBody {
    one_time_keys: BTreeMap<String, BTreeMap<String, String>>,
}

/// POST /_matrix/client/v3/keys/claim: one unclaimed one-time key per
/// device, or its fallback key when none is left.
pub fn claim(shard: &Shard, req: &Req, auth: &Authed) -> ApiResult<Value> {
    let body: ClaimBody = req.json(shard)?;
    if body.one_time_keys.len() > USERS_PER_REQUEST_MAX {
        return Err(ApiError::too_large("too many users in one claim"));
    }
    let claimer = format!("{} {}", auth.user, auth.device);
    let mut out = Map::new();
    let mut failures = Map::new();
    for (user, devices) in &body.one_time_keys {
        let user = crate::api::rooms::parse_user(user)?;
        if user.server_name() != shard.server_name {
            failures.insert(user.server_name().to_string(), json!({ "status": 503, "message": "Federation is not available" }));
            continue;
        }
        let mut claimed = Map::new();
        for (device, algorithm) in devices {
            let key = match shard.db.claim_one_time_key(&user, device, algorithm, &claimer)? {
                Some(k) => Some(k),
                None => shard.db.claim_fallback_key(&user, device, algorithm)?,
            };
            if let Some((id, key)) = key {
                claimed.insert(device.clone(), json!({ id: key }));
            }
        }
        out.insert(user.to_string(), Value::Object(claimed));
    }
    Ok(json!({ "one_time_keys": out, "failures": failures }))
}

/// GET /_matrix/client/v3/keys/changes?from=&to=
pub fn changes(shard: &Shard, req: &Req, auth: &Authed) -> ApiResult<Value> {
    let parse = |name: &str| -> ApiResult<SyncToken> {
        let raw = req.query(name).ok_or_else(|| ApiError::missing_param(format!("Missing {name}")))?;
        SyncToken::parse(raw, shard.count).ok_or_else(|| ApiError::invalid_param(format!("Invalid {name} token")))
    };
    let (from, to) = (parse("from")?, parse("to")?);
    let (changed, left) = changed_and_left(shard, &auth.user, &from.heads, &to.heads)?;
    Ok(json!({ "changed": changed, "left": left }))
}

/// The key fields of a sync response: `device_lists`,
/// `device_one_time_keys_count`, `device_unused_fallback_key_types`, and
/// whether anything changed for a long-poll.
pub fn sync_fields(shard: &Shard, auth: &Authed, since: Option<&SyncToken>, upper: &SyncToken) -> ApiResult<(Value, Value, Value, bool)> {
    let (changed, left) = match since {
        Some(s) => changed_and_left(shard, &auth.user, &s.heads, &upper.heads)?,
        None => (BTreeSet::new(), BTreeSet::new()),
    };
    let (counts, unused) = key_counts(shard, auth)?;
    let any = !changed.is_empty() || !left.is_empty();
    Ok((json!({ "changed": changed, "left": left }), counts, unused, any))
}

/// The device's one-time key counts and unused fallback key types, from
/// the shard's cache while no key count changed anywhere on the node.
fn key_counts(shard: &Shard, auth: &Authed) -> ApiResult<(Value, Value)> {
    let key = (auth.user.clone(), auth.device.clone());
    let changes = shard.db.key_count_changes();
    if let Some((seen, counts, unused)) = shard.key_counts.borrow().get(&key)
        && *seen == changes
    {
        return Ok((counts.clone(), unused.clone()));
    }
    let counts = json!(shard.db.one_time_key_counts(&auth.user, &auth.device, shard.config.limits.one_time_keys_per_device_max + 1)?);
    let unused: Vec<String> = shard.db.fallback_keys(&auth.user, &auth.device)?.into_iter().filter(|(_, f)| !f.used).map(|(alg, _)| alg).collect();
    let unused = json!(unused);
    let mut cache = shard.key_counts.borrow_mut();
    if cache.len() >= crate::shard::KEY_COUNTS_CACHE_MAX {
        cache.clear();
    }
    cache.insert(key, (changes, counts.clone(), unused.clone()));
    Ok((counts, unused))
}

#[derive(Deserialize)]
struct SigningBody {
    master_key: Option<Value>,
    self_signing_key: Option<Value>,
    user_signing_key: Option<Value>,
}

/// POST /_matrix/client/v3/keys/device_signing/upload
///
/// User-interactive auth is needed unless the user has no master key yet
/// or every uploaded key equals the stored one.
pub async fn device_signing_upload(shard: &Shard, req: &Req, auth: &Authed) -> ApiResult<Value> {
    let body: SigningBody = req.json(shard)?;
    let user = &*auth.user;
    let existing = shard.db.cross_signing_keys(user)?;
    let uploaded: Vec<(Usage, Value)> = [(Usage::Master, body.master_key), (Usage::SelfSigning, body.self_signing_key), (Usage::UserSigning, body.user_signing_key)]
        .into_iter()
        .filter_map(|(u, k)| k.map(|k| (u, k)))
        .collect();
    let replaces = uploaded.iter().any(|(usage, key)| existing.get(usage.name()).is_none_or(|old| !e2ee::same_signed_content(old, key)));
    if existing.contains_key("master") && replaces {
        crate::api::account::require_password(shard, req, auth).await?;
    }
    for (usage, key) in &uploaded {
        e2ee::cross_signing_key(key, user.as_str(), *usage).map_err(key_error)?;
    }
    let master = uploaded.iter().find(|(u, _)| *u == Usage::Master).map(|(_, k)| k).or_else(|| existing.get("master"));
    let Some(master) = master else { return Err(ApiError::missing_param("No master key is uploaded or stored")) };
    let (master_id, master_public) = e2ee::cross_signing_key(master, user.as_str(), Usage::Master).map_err(key_error)?;
    for (usage, key) in &uploaded {
        if *usage != Usage::Master {
            e2ee::verify_signature(key, user.as_str(), &master_id, &master_public).map_err(key_error)?;
        }
    }
    if !replaces {
        return Ok(json!({}));
    }
    let writes = uploaded.iter().map(|(usage, key)| Db::cross_signing_write(user, usage.name(), key)).collect();
    let w = watchers(shard, user)?;
    commit_change(shard, user, w, writes)?;
    Ok(json!({}))
}

/// A per-key failure of a signature upload.
fn failure(errcode: &str, message: impl Into<String>) -> Value {
    json!({ "errcode": errcode, "error": message.into() })
}

/// The public keys the uploader may sign with: its devices' ed25519 keys
/// and its cross-signing keys, by key id.
fn signing_keys_of(shard: &Shard, user: &UserId) -> ApiResult<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (device, keys) in shard.db.all_device_keys(user)? {
        let id = format!("ed25519:{device}");
        if let Some(k) = keys.get("keys").and_then(|k| k.get(&id)).and_then(Value::as_str) {
            out.insert(id, k.to_owned());
        }
    }
    for (_, key) in shard.db.cross_signing_keys(user)? {
        if let Some(public) = public_of(&key) {
            out.insert(format!("ed25519:{public}"), public);
        }
    }
    Ok(out)
}

/// POST /_matrix/client/v3/keys/signatures/upload: signatures by the
/// uploader over its own devices and keys, or over other users' master
/// keys. Each signature is verified; failures are reported per key.
pub fn signatures_upload(shard: &Shard, req: &Req, auth: &Authed) -> ApiResult<Value> {
    let body: BTreeMap<String, BTreeMap<String, Value>> = req.json(shard)?;
    let signer = &*auth.user;
    let my_keys = signing_keys_of(shard, signer)?;
    let mut failures = Map::new();
    let mut own_writes = Vec::new();
    let mut other_writes = Vec::new();
    for (target_user, objects) in &body {
        let target_user = crate::api::rooms::parse_user(target_user)?;
        let stored_signatures = shard.db.key_signatures(&target_user)?;
        let cross = shard.db.cross_signing_keys(&target_user)?;
        for (key_id, object) in objects {
            let stored = if target_user == *signer {
                match shard.db.device_keys(&target_user, key_id)? {
                    Some(k) => Some(k),
                    None => cross.values().find(|k| public_of(k).as_deref() == Some(key_id.as_str())).cloned(),
                }
            } else {
                cross.get("master").filter(|k| public_of(k).as_deref() == Some(key_id.as_str())).cloned()
            };
            let Some(stored) = stored else {
                let what = if target_user == *signer { "Unknown device or key" } else { "Only other users' master keys can be signed" };
                failures.entry(target_user.to_string()).or_insert_with(|| json!({}))[key_id.as_str()] = failure("M_NOT_FOUND", what);
                continue;
            };
            if !e2ee::same_signed_content(&stored, object) {
                failures.entry(target_user.to_string()).or_insert_with(|| json!({}))[key_id.as_str()] = failure("M_INVALID_SIGNATURE", "The signed object does not match the stored key");
                continue;
            }
            let Some(sigs) = object.get("signatures").and_then(|s| s.get(signer.as_str())).and_then(Value::as_object) else {
                failures.entry(target_user.to_string()).or_insert_with(|| json!({}))[key_id.as_str()] = failure("M_INVALID_SIGNATURE", "No signature by the uploader");
                continue;
            };
            let mut accepted = Vec::new();
            let mut error = None;
            for (signer_key, sig) in sigs {
                let already = stored.get("signatures").and_then(|s| s.get(signer.as_str())).and_then(|s| s.get(signer_key)) == Some(sig)
                    || stored_signatures.iter().any(|(t, u, k, s)| t == key_id && u == signer.as_str() && k == signer_key && Some(s.as_str()) == sig.as_str());
                if already {
                    continue;
                }
                let Some(public) = my_keys.get(signer_key) else {
                    error = Some(failure("M_INVALID_SIGNATURE", format!("Unknown signing key {signer_key}")));
                    break;
                };
                if let Err(e) = e2ee::verify_signature(object, signer.as_str(), signer_key, public) {
                    error = Some(failure("M_INVALID_SIGNATURE", e.to_string()));
                    break;
                }
                accepted.push(Db::signature_write(&target_user, key_id, signer.as_str(), signer_key, sig.as_str().unwrap_or_default()));
            }
            match error {
                Some(f) => {
                    failures.entry(target_user.to_string()).or_insert_with(|| json!({}))[key_id.as_str()] = f;
                }
                None if target_user == *signer => own_writes.extend(accepted),
                None => other_writes.extend(accepted),
            }
        }
    }
    if !own_writes.is_empty() {
        let w = watchers(shard, signer)?;
        commit_change(shard, signer, w, own_writes)?;
    }
    if !other_writes.is_empty() {
        // A user-signing signature is the signer's own business.
        commit_change(shard, signer, vec![signer.to_owned()], other_writes)?;
    }
    Ok(json!({ "failures": failures }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ids_name_their_algorithm() {
        assert_eq!(algorithm_of("signed_curve25519:AAAAHQ").ok(), Some("signed_curve25519"));
        assert!(algorithm_of("signed_curve25519").is_err());
        assert!(algorithm_of(":AAAA").is_err());
        assert!(algorithm_of("alg:").is_err());
    }

    #[test]
    fn only_owner_and_viewer_signatures_are_merged() {
        let owner = UserId::parse("@a:x").expect("user");
        let viewer = UserId::parse("@b:x").expect("user");
        let sigs = vec![
            ("MASTER".to_owned(), "@a:x".to_owned(), "ed25519:DEV".to_owned(), "s1".to_owned()),
            ("MASTER".to_owned(), "@b:x".to_owned(), "ed25519:USK_B".to_owned(), "s2".to_owned()),
            ("MASTER".to_owned(), "@c:x".to_owned(), "ed25519:USK_C".to_owned(), "s3".to_owned()),
            ("OTHER".to_owned(), "@a:x".to_owned(), "ed25519:DEV".to_owned(), "s4".to_owned()),
        ];
        let mut key = json!({ "keys": { "ed25519:MASTER": "MASTER" }, "signatures": { "@a:x": { "ed25519:MASTER": "self" } } });
        merge_signatures(&mut key, "MASTER", &owner, &viewer, &sigs);
        assert_eq!(key["signatures"], json!({ "@a:x": { "ed25519:MASTER": "self", "ed25519:DEV": "s1" }, "@b:x": { "ed25519:USK_B": "s2" } }));
    }
}
