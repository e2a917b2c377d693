//! Pure rules of the key server: signature checks on signed JSON, the shape
//! of cross-signing keys, and which backed-up session key to keep.
//!
//! Nothing here touches storage; `crate::keystore` stores what these rules
//! accept and `crate::api::keys` answers clients.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Why a signed object was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    Malformed(String),
    #[error("signature is missing: {0}")]
    MissingSignature(String),
    #[error("signature does not verify: {0}")]
    BadSignature(String),
}

/// Decodes unpadded (or padded) standard base64, as Matrix keys use.
pub fn decode_b64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

/// Checks that `object` carries a valid ed25519 signature by `signer`
/// (a user id) with key `key_id` (`ed25519:<id>`) whose public key is
/// `public_key` (unpadded base64). `signatures` and `unsigned` are not signed.
pub fn verify_signature(object: &Value, signer: &str, key_id: &str, public_key: &str) -> Result<(), KeyError> {
    let signature = object
        .get("signatures")
        .and_then(|s| s.get(signer))
        .and_then(|s| s.get(key_id))
        .and_then(Value::as_str)
        .ok_or_else(|| KeyError::MissingSignature(format!("{signer} {key_id}")))?;
    let key = decode_b64(public_key).ok_or_else(|| KeyError::Malformed(format!("public key {key_id} is not base64")))?;
    let sig = decode_b64(signature).ok_or_else(|| KeyError::Malformed(format!("signature {key_id} is not base64")))?;
    let canonical = canonical_for_signing(object)?;
    ruma::signatures::verify_canonical_json_bytes(&ruma::signatures::SigningKeyAlgorithm::Ed25519, &key, &sig, canonical.as_bytes())
        .map_err(|e| KeyError::BadSignature(format!("{signer} {key_id}: {e}")))
}

/// The canonical JSON that signatures cover: the object without
/// `signatures` and `unsigned`.
pub fn canonical_for_signing(object: &Value) -> Result<String, KeyError> {
    let Value::Object(map) = object else { return Err(KeyError::Malformed("signed object must be a JSON object".into())) };
    let map = ruma::canonical_json::try_from_json_map(map.clone()).map_err(|e| KeyError::Malformed(format!("not canonical JSON: {e}")))?;
    ruma::signatures::to_canonical_json_string_for_signing(&map).map_err(|e| KeyError::Malformed(e.to_string()))
}

/// True when two signed objects carry the same signed content (their
/// signatures and unsigned parts may differ).
pub fn same_signed_content(a: &Value, b: &Value) -> bool {
    matches!((canonical_for_signing(a), canonical_for_signing(b)), (Ok(x), Ok(y)) if x == y)
}

/// Checks uploaded device keys: they belong to `user`/`device`, list
/// algorithms, carry the device's ed25519 key and are self-signed with it.
pub fn check_device_keys(keys: &Value, user: &str, device: &str) -> Result<(), KeyError> {
    if keys.get("user_id").and_then(Value::as_str) != Some(user) {
        return Err(KeyError::Malformed("device_keys.user_id does not match the authenticated user".into()));
    }
    if keys.get("device_id").and_then(Value::as_str) != Some(device) {
        return Err(KeyError::Malformed("device_keys.device_id does not match the authenticated device".into()));
    }
    if !keys.get("algorithms").is_some_and(|a| a.as_array().is_some_and(|a| a.iter().all(Value::is_string))) {
        return Err(KeyError::Malformed("device_keys.algorithms must be a list of strings".into()));
    }
    let key_id = format!("ed25519:{device}");
    let Some(map) = keys.get("keys").and_then(Value::as_object) else { return Err(KeyError::Malformed("device_keys.keys must be an object".into())) };
    if !map.values().all(Value::is_string) {
        return Err(KeyError::Malformed("device_keys.keys values must be strings".into()));
    }
    let public = map.get(&key_id).and_then(Value::as_str).ok_or_else(|| KeyError::Malformed(format!("device_keys.keys lacks {key_id}")))?;
    verify_signature(keys, user, &key_id, public)
}

/// Which cross-signing key an object is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    Master,
    SelfSigning,
    UserSigning,
}

impl Usage {
    pub const ALL: [Usage; 3] = [Usage::Master, Usage::SelfSigning, Usage::UserSigning];

    pub fn name(self) -> &'static str {
        match self {
            Usage::Master => "master",
            Usage::SelfSigning => "self_signing",
            Usage::UserSigning => "user_signing",
        }
    }
}

/// Checks a cross-signing key's shape and returns its single ed25519 key
/// as (`ed25519:<pub>`, `<pub>`).
pub fn cross_signing_key(key: &Value, user: &str, usage: Usage) -> Result<(String, String), KeyError> {
    if key.get("user_id").and_then(Value::as_str) != Some(user) {
        return Err(KeyError::Malformed(format!("{} key user_id does not match the authenticated user", usage.name())));
    }
    if !key.get("usage").and_then(Value::as_array).is_some_and(|u| u.iter().any(|x| x.as_str() == Some(usage.name()))) {
        return Err(KeyError::Malformed(format!("{} key usage must include \"{}\"", usage.name(), usage.name())));
    }
    let Some(keys) = key.get("keys").and_then(Value::as_object) else { return Err(KeyError::Malformed(format!("{} key lacks keys", usage.name()))) };
    if keys.len() != 1 {
        return Err(KeyError::Malformed(format!("{} key must hold exactly one key", usage.name())));
    }
    let (id, public) = keys.iter().next().expect("one key");
    let public = public.as_str().ok_or_else(|| KeyError::Malformed(format!("{} key is not a string", usage.name())))?;
    if id.strip_prefix("ed25519:") != Some(public) || decode_b64(public).is_none_or(|k| k.len() != 32) {
        return Err(KeyError::Malformed(format!("{} key id must be ed25519:<public key> with a 32-byte key", usage.name())));
    }
    Ok((id.clone(), public.to_owned()))
}

/// A session key in a server-side backup (`KeyBackupData`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackupKey {
    pub first_message_index: u64,
    pub forwarded_count: u64,
    pub is_verified: bool,
    pub session_data: Value,
}

/// Whether `new` replaces `existing` in a backup: a verified key beats an
/// unverified one; then the lower first message index wins (it decrypts
/// more history); then the lower forwarded count. Ties keep the existing key.
pub fn should_replace(existing: Option<&BackupKey>, new: &BackupKey) -> bool {
    let Some(old) = existing else { return true };
    if old.is_verified != new.is_verified {
        return new.is_verified;
    }
    if old.first_message_index != new.first_message_index {
        return new.first_message_index < old.first_message_index;
    }
    new.forwarded_count < old.forwarded_count
}

#[cfg(test)]
mod tests;
