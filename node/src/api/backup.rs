//! Server-side key backup (spec "Server-side key backups"):
//! `/room_keys/version[/{version}]` and `/room_keys/keys[/{roomId}[/{sessionId}]]`.
//!
//! Versions are numbered per user from 1 and never reused: a deleted
//! version is kept as a tombstone and its keys are removed. Keys are only
//! written to the current (newest live) version. Each version record keeps
//! the key count and an etag bumped on every change; writes to backups are
//! serialised on this node so the count stays exact. (Two nodes of a
//! cluster writing one user's backup at the same instant may miscount; the
//! keys themselves are never lost.)

use std::sync::Mutex;

use http::StatusCode;
use ruma::{RoomId, UserId};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::db::Db;
use crate::e2ee::{BackupKey, should_replace};
use crate::error::{ApiError, ApiResult};
use crate::http::{Authed, Req};
use crate::keystore::BackupVersion;
use crate::shard::Shard;
use crate::storage::Write;

/// Serialises backup writes of this node (they read, then write, the count).
static BACKUP_WRITES: Mutex<()> = Mutex::new(());

/// Versions read to find the newest live one.
const VERSIONS_SCAN: usize = 1_000;
/// Keys deleted per batch when a version or room is emptied.
const DELETE_BATCH: usize = 1_000;

fn no_version(version: &str) -> ApiError {
    ApiError::not_found(format!("Unknown backup version {version}"))
}

fn parse_version(version: &str) -> ApiResult<u64> {
    version.parse().map_err(|_| no_version(version))
}

/// The newest version that is not deleted.
fn current(shard: &Shard, user: &UserId) -> ApiResult<Option<(u64, BackupVersion)>> {
    Ok(shard.db.backup_versions(user, VERSIONS_SCAN)?.into_iter().find(|(_, v)| !v.deleted))
}

fn live(shard: &Shard, user: &UserId, version: &str) -> ApiResult<(u64, BackupVersion)> {
    let n = parse_version(version)?;
    match shard.db.backup_version(user, n)? {
        Some(v) if !v.deleted => Ok((n, v)),
        _ => Err(no_version(version)),
    }
}

fn version_json(n: u64, v: &BackupVersion) -> Value {
    json!({ "algorithm": v.algorithm, "auth_data": v.auth_data, "version": n.to_string(), "etag": v.etag.to_string(), "count": v.count })
}

#[derive(Deserialize)]
struct VersionBody {
    algorithm: String,
    auth_data: Map<String, Value>,
    version: Option<String>,
}

/// POST /_matrix/client/v3/room_keys/version
pub fn create_version(shard: &Shard, req: &Req, auth: &Authed) -> ApiResult<Value> {
    let body: VersionBody = req.json(shard)?;
    if body.algorithm.is_empty() {
        return Err(ApiError::bad_json("algorithm must not be empty"));
    }
    let record = BackupVersion { algorithm: body.algorithm, auth_data: Value::Object(body.auth_data), etag: 0, count: 0, deleted: false };
    // Numbers are taken with a conditional insert, so concurrent creations
    // get distinct versions.
    for _ in 0..16 {
        let next = shard.db.backup_versions(&auth.user, 1)?.first().map_or(1, |(n, _)| n + 1);
        if shard.db.create_backup_version(&auth.user, next, &record)? {
            return Ok(json!({ "version": next.to_string() }));
        }
    }
    Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "M_UNKNOWN", "Backup versions are being created concurrently; try again"))
}

/// GET /_matrix/client/v3/room_keys/version[/{version}]
pub fn get_version(shard: &Shard, auth: &Authed, version: Option<&str>) -> ApiResult<Value> {
    let (n, v) = match version {
        Some(version) => live(shard, &auth.user, version)?,
        None => current(shard, &auth.user)?.ok_or_else(|| ApiError::not_found("No current backup version"))?,
    };
    Ok(version_json(n, &v))
}

/// PUT /_matrix/client/v3/room_keys/version/{version}: replaces `auth_data`.
pub fn update_version(shard: &Shard, req: &Req, auth: &Authed, version: &str) -> ApiResult<Value> {
    let body: VersionBody = req.json(shard)?;
    if body.version.as_deref().is_some_and(|v| v != version) {
        return Err(ApiError::invalid_param("The version in the body does not match the path"));
    }
    let _guard = BACKUP_WRITES.lock().unwrap_or_else(|p| p.into_inner());
    let (n, mut record) = live(shard, &auth.user, version)?;
    if record.algorithm != body.algorithm {
        return Err(ApiError::invalid_param("The algorithm of a backup version cannot change"));
    }
    record.auth_data = Value::Object(body.auth_data);
    shard.db.store.write(vec![Db::backup_version_write(&auth.user, n, &record)])?;
    Ok(json!({}))
}

/// Deletes keys of a version (all, or one room's), in bounded batches;
/// returns how many were deleted.
fn delete_all(shard: &Shard, user: &UserId, version: u64, room: Option<&str>) -> ApiResult<u64> {
    let mut deleted = 0;
    loop {
        let keys = shard.db.backup_keys(user, version, room, DELETE_BATCH)?;
        if keys.is_empty() {
            return Ok(deleted);
        }
        deleted += keys.len() as u64;
        let writes = keys.iter().map(|(r, s, _)| Db::backup_key_delete(user, version, r, s)).collect();
        shard.db.store.write(writes)?;
    }
}

/// DELETE /_matrix/client/v3/room_keys/version/{version}
pub fn delete_version(shard: &Shard, auth: &Authed, version: &str) -> ApiResult<Value> {
    let _guard = BACKUP_WRITES.lock().unwrap_or_else(|p| p.into_inner());
    let (n, mut record) = live(shard, &auth.user, version)?;
    // The tombstone first: a crash part-way leaves a deleted version with
    // some keys, never a live version with half its keys.
    record.deleted = true;
    record.count = 0;
    shard.db.store.write(vec![Db::backup_version_write(&auth.user, n, &record)])?;
    delete_all(shard, &auth.user, n, None)?;
    Ok(json!({}))
}

/// Deletes every backup version of `user` and their keys (account
/// deactivation).
pub(crate) fn delete_everything(shard: &Shard, user: &UserId) -> ApiResult<()> {
    let _guard = BACKUP_WRITES.lock().unwrap_or_else(|p| p.into_inner());
    for (n, mut record) in shard.db.backup_versions(user, VERSIONS_SCAN)? {
        if !record.deleted {
            record.deleted = true;
            record.count = 0;
            shard.db.store.write(vec![Db::backup_version_write(user, n, &record)])?;
        }
        delete_all(shard, user, n, None)?;
    }
    Ok(())
}

/// The `version` query parameter.
fn version_param(req: &Req) -> ApiResult<&str> {
    req.query("version").ok_or_else(|| ApiError::missing_param("Missing version"))
}

fn check_room(room: &str) -> ApiResult<&str> {
    RoomId::parse(room).map(|_| room).map_err(|_| ApiError::invalid_param(format!("Invalid room id {room}")))
}

fn check_session(session: &str) -> ApiResult<&str> {
    if session.is_empty() || session.contains('\0') {
        return Err(ApiError::invalid_param("Invalid session id"));
    }
    Ok(session)
}

fn parse_key(v: Value) -> ApiResult<BackupKey> {
    serde_json::from_value(v).map_err(|e| ApiError::bad_json(format!("Invalid KeyBackupData: {e}")))
}

fn parse_sessions(room: &str, v: Value, out: &mut Vec<(String, String, BackupKey)>) -> ApiResult<()> {
    let Some(Value::Object(sessions)) = v.get("sessions").cloned() else { return Err(ApiError::bad_json("sessions must be an object")) };
    for (session, key) in sessions {
        check_session(&session)?;
        out.push((room.to_owned(), session, parse_key(key)?));
    }
    Ok(())
}

/// PUT /_matrix/client/v3/room_keys/keys[/{roomId}[/{sessionId}]]?version=
///
/// Only the current version accepts keys; a stored key is replaced only by
/// a better one (`e2ee::should_replace`).
pub fn put_keys(shard: &Shard, req: &Req, auth: &Authed, path: &[&str]) -> ApiResult<Value> {
    let version = version_param(req)?;
    let body: Value = req.json(shard)?;
    let mut keys = Vec::new();
    match path {
        [] => {
            let Some(Value::Object(rooms)) = body.get("rooms").cloned() else { return Err(ApiError::bad_json("rooms must be an object")) };
            for (room, sessions) in rooms {
                check_room(&room)?;
                parse_sessions(&room, sessions, &mut keys)?;
            }
        }
        [room] => parse_sessions(check_room(room)?, body, &mut keys)?,
        [room, session] => keys.push((check_room(room)?.to_owned(), check_session(session)?.to_owned(), parse_key(body)?)),
        _ => return Err(ApiError::unrecognized()),
    }
    let user = &*auth.user;
    let _guard = BACKUP_WRITES.lock().unwrap_or_else(|p| p.into_inner());
    let (n, mut record) = live(shard, user, version)?;
    if let Some((cur, _)) = current(shard, user)?
        && cur != n
    {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "M_WRONG_ROOM_KEYS_VERSION", "Keys can only be added to the current backup version")
            .with_extra(json!({ "current_version": cur.to_string() })));
    }
    let mut writes: Vec<Write> = Vec::new();
    let mut added = 0u64;
    for (room, session, key) in &keys {
        let existing = shard.db.backup_key(user, n, room, session)?;
        if should_replace(existing.as_ref(), key) {
            if existing.is_none() {
                added += 1;
            }
            writes.push(Db::backup_key_write(user, n, room, session, key));
        }
    }
    if record.count + added > shard.config.limits.backup_keys_per_version_max as u64 {
        return Err(ApiError::forbidden(format!("A backup version may hold at most {} keys", shard.config.limits.backup_keys_per_version_max)));
    }
    if !writes.is_empty() {
        record.count += added;
        record.etag += 1;
        writes.push(Db::backup_version_write(user, n, &record));
        shard.db.store.write(writes)?;
    }
    Ok(json!({ "etag": record.etag.to_string(), "count": record.count }))
}

/// GET /_matrix/client/v3/room_keys/keys[/{roomId}[/{sessionId}]]?version=
pub fn get_keys(shard: &Shard, req: &Req, auth: &Authed, path: &[&str]) -> ApiResult<Value> {
    let (n, _) = live(shard, &auth.user, version_param(req)?)?;
    let max = shard.config.limits.backup_keys_per_version_max;
    let sessions_of = |room: &str| -> ApiResult<Map<String, Value>> {
        Ok(shard.db.backup_keys(&auth.user, n, Some(room), max)?.into_iter().map(|(_, s, k)| (s, json!(k))).collect())
    };
    match path {
        [] => {
            let mut rooms: Map<String, Value> = Map::new();
            for (room, session, key) in shard.db.backup_keys(&auth.user, n, None, max)? {
                let entry = rooms.entry(room).or_insert_with(|| json!({ "sessions": {} }));
                entry["sessions"][session.as_str()] = json!(key);
            }
            Ok(json!({ "rooms": rooms }))
        }
        [room] => Ok(json!({ "sessions": sessions_of(check_room(room)?)? })),
        [room, session] => {
            let key = shard.db.backup_key(&auth.user, n, check_room(room)?, check_session(session)?)?.ok_or_else(|| ApiError::not_found("No such key in the backup"))?;
            Ok(json!(key))
        }
        _ => Err(ApiError::unrecognized()),
    }
}

/// DELETE /_matrix/client/v3/room_keys/keys[/{roomId}[/{sessionId}]]?version=
pub fn delete_keys(shard: &Shard, req: &Req, auth: &Authed, path: &[&str]) -> ApiResult<Value> {
    let version = version_param(req)?;
    let user = &*auth.user;
    let _guard = BACKUP_WRITES.lock().unwrap_or_else(|p| p.into_inner());
    let (n, mut record) = live(shard, user, version)?;
    let deleted = match path {
        [] => delete_all(shard, user, n, None)?,
        [room] => delete_all(shard, user, n, Some(check_room(room)?))?,
        [room, session] => {
            let (room, session) = (check_room(room)?, check_session(session)?);
            if shard.db.backup_key(user, n, room, session)?.is_some() {
                shard.db.store.write(vec![Db::backup_key_delete(user, n, room, session)])?;
                1
            } else {
                0
            }
        }
        _ => return Err(ApiError::unrecognized()),
    };
    if deleted > 0 {
        record.count = record.count.saturating_sub(deleted);
        record.etag += 1;
        shard.db.store.write(vec![Db::backup_version_write(user, n, &record)])?;
    }
    Ok(json!({ "etag": record.etag.to_string(), "count": record.count }))
}
