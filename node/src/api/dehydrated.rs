//! Dehydrated devices (MSC3814, unstable prefix `org.matrix.msc3814.v1`):
//! a device whose keys the server keeps while none of the user's clients
//! runs, so it can receive room keys; a later client rehydrates it, reads
//! its to-device messages and replaces it.
//!
//! `PUT|GET|DELETE /dehydrated_device` and
//! `GET|POST /dehydrated_device/{deviceId}/events`. A user has at most one
//! dehydrated device; it is a device without an access token, listed in
//! `/devices` and in key queries like any other.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::keys::{UploadBody, devices_changed, store_keys};
use crate::db::{Db, Device, encode};
use crate::error::{ApiError, ApiResult};
use crate::http::{Authed, Req};
use crate::room::now_ms;
use crate::shard::Shard;
use crate::storage::{Table, Write};

/// Most to-device messages returned by one `events` call.
const EVENTS_PER_CALL: usize = 100;
/// Largest `device_data` accepted, in bytes of JSON.
const DEVICE_DATA_MAX: usize = 64 * 1024;

/// The stored dehydrated device of a user.
#[derive(serde::Serialize, Deserialize)]
struct Dehydrated {
    device_id: String,
    device_data: Value,
}

fn current(shard: &Shard, auth: &Authed) -> ApiResult<Option<Dehydrated>> {
    let Some(bytes) = shard.db.store.get(Table::DehydratedDevices, auth.user.as_bytes(), b"")? else { return Ok(None) };
    Ok(serde_json::from_slice(&bytes).ok())
}

#[derive(Deserialize)]
struct PutBody {
    device_id: String,
    device_data: Value,
    initial_device_display_name: Option<String>,
    #[serde(flatten)]
    keys: UploadBody,
}

/// PUT /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device
pub fn put(shard: &Shard, req: &Req, auth: &Authed) -> ApiResult<Value> {
    let body: PutBody = req.json(shard)?;
    if body.device_id.is_empty() || body.device_id.contains('\0') {
        return Err(ApiError::invalid_param("Invalid device_id"));
    }
    if !body.device_data.is_object() {
        return Err(ApiError::bad_json("device_data must be an object"));
    }
    if serde_json::to_vec(&body.device_data).map_or(0, |v| v.len()) > DEVICE_DATA_MAX {
        return Err(ApiError::too_large("device_data is too large"));
    }
    let user = &*auth.user;
    if let Some(existing) = shard.db.device(user, &body.device_id)?
        && !existing.access_token.is_empty()
    {
        return Err(ApiError::invalid_param("device_id names a logged-in device"));
    }
    // The previous dehydrated device goes, with its keys and messages.
    if let Some(old) = current(shard, auth)?
        && old.device_id != body.device_id
    {
        shard.db.delete_device(user, &old.device_id)?;
        delete_inbox(shard, auth, &old.device_id, None)?;
    }
    let device = Device { display_name: body.initial_device_display_name.clone(), last_seen_ts: Some(now_ms()), last_seen_ip: None, access_token: String::new(), refresh_token: None };
    let record = Dehydrated { device_id: body.device_id.clone(), device_data: body.device_data };
    let writes = vec![
        Write::put(Table::Devices, user.as_bytes(), body.device_id.as_bytes(), encode(&device)),
        Write::put(Table::DehydratedDevices, user.as_bytes(), b"".to_vec(), encode(&record)),
    ];
    let had_keys = body.keys.device_keys.is_some();
    store_keys(shard, user, &body.device_id, body.keys, writes)?;
    if !had_keys {
        devices_changed(shard, user)?;
    }
    Ok(json!({ "device_id": body.device_id }))
}

/// GET /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device
pub fn get(shard: &Shard, auth: &Authed) -> ApiResult<Value> {
    let d = current(shard, auth)?.ok_or_else(|| ApiError::not_found("No dehydrated device available"))?;
    Ok(json!({ "device_id": d.device_id, "device_data": d.device_data }))
}

/// DELETE /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device
pub fn delete(shard: &Shard, auth: &Authed) -> ApiResult<Value> {
    let d = current(shard, auth)?.ok_or_else(|| ApiError::not_found("No dehydrated device available"))?;
    shard.db.store.write(vec![Write::delete(Table::DehydratedDevices, auth.user.as_bytes(), b"".to_vec())])?;
    shard.db.delete_device(&auth.user, &d.device_id)?;
    delete_inbox(shard, auth, &d.device_id, None)?;
    devices_changed(shard, &auth.user)?;
    Ok(json!({ "device_id": d.device_id }))
}

/// Deletes a device's to-device messages up to `upto` (clustering key,
/// included), or all: one range delete.
fn delete_inbox(shard: &Shard, auth: &Authed, device: &str, upto: Option<&[u8]>) -> ApiResult<()> {
    let to = upto.map_or_else(|| vec![0xff; crate::db::INBOX_CK_LEN], <[u8]>::to_vec);
    shard.db.store.write(vec![Write::delete_range(Table::ToDevice, Db::inbox_key(&auth.user, device), Vec::new(), to)])?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// GET (or POST) /_matrix/client/unstable/org.matrix.msc3814.v1/dehydrated_device/{deviceId}/events
///
/// Returns the device's to-device messages after the given token (`from`,
/// or `next_batch` in a POST body); messages up to it are acknowledged and
/// deleted. The answer's `next_batch` is absent when no message is left.
pub fn events(shard: &Shard, req: &Req, auth: &Authed, device: &str) -> ApiResult<Value> {
    #[derive(Deserialize)]
    struct Body {
        next_batch: Option<String>,
    }
    // Current clients send GET with the token as `from` in the query; the first
    // revision of the proposal used POST with a JSON body.
    let body: Body = match req.query("from").or_else(|| req.query("next_batch")) {
        Some(t) => Body { next_batch: Some(t.to_owned()) },
        None if req.body.is_empty() => Body { next_batch: None },
        None => req.json(shard)?,
    };
    let d = current(shard, auth)?;
    if d.as_ref().is_none_or(|d| d.device_id != device) {
        return Err(ApiError::forbidden("Not the user's dehydrated device"));
    }
    let after = match &body.next_batch {
        Some(t) => Some(unhex(t).ok_or_else(|| ApiError::invalid_param("Invalid next_batch"))?),
        None => None,
    };
    if let Some(after) = &after {
        delete_inbox(shard, auth, device, Some(after))?;
    }
    let rows = shard.db.inbox(&auth.user, device, EVENTS_PER_CALL)?;
    // `next_batch` is omitted once nothing is left: clients stop there.
    let next = rows.last().map(|(_, _, ck, _)| hex(ck));
    let events: Vec<Value> = rows.into_iter().map(|(_, _, _, m)| m).collect();
    let mut out = json!({ "events": events });
    if let Some(next) = next {
        out["next_batch"] = json!(next);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_tokens_round_trip() {
        let ck = [0u8, 1, 0, 0, 0, 0, 0, 0, 0, 42, 0, 0, 0, 7];
        assert_eq!(unhex(&hex(&ck)).as_deref(), Some(&ck[..]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }
}
