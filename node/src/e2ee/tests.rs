use proptest::prelude::*;
use ruma::signatures::Ed25519KeyPair;
use serde_json::json;

use super::*;

fn keypair(version: &str) -> Ed25519KeyPair {
    Ed25519KeyPair::from_der(&Ed25519KeyPair::generate(), version.to_owned()).expect("keypair")
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

fn sign(value: &mut Value, signer: &str, key: &Ed25519KeyPair) {
    let Value::Object(map) = value.clone() else { panic!("object") };
    let mut canonical = ruma::canonical_json::try_from_json_map(map).expect("canonical");
    ruma::signatures::sign_json(signer, key, &mut canonical).expect("sign");
    *value = serde_json::to_value(canonical).expect("json");
}

fn device_keys(user: &str, device: &str, key: &Ed25519KeyPair) -> Value {
    let mut keys = json!({
        "user_id": user, "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": { format!("ed25519:{device}"): b64(&key.public_key()), format!("curve25519:{device}"): "c2FtcGxlY3VydmU" },
    });
    sign(&mut keys, user, key);
    keys
}

#[test]
fn self_signed_device_keys_are_accepted() {
    let key = keypair("DEV1");
    let keys = device_keys("@a:x", "DEV1", &key);
    assert_eq!(check_device_keys(&keys, "@a:x", "DEV1"), Ok(()));
}

#[test]
fn device_keys_for_someone_else_or_tampered_are_refused() {
    let key = keypair("DEV1");
    let keys = device_keys("@a:x", "DEV1", &key);
    assert!(matches!(check_device_keys(&keys, "@b:x", "DEV1"), Err(KeyError::Malformed(_))));
    assert!(matches!(check_device_keys(&keys, "@a:x", "DEV2"), Err(KeyError::Malformed(_))));
    let mut tampered = keys.clone();
    tampered["algorithms"] = json!(["m.megolm.v1.aes-sha2"]);
    assert!(matches!(check_device_keys(&tampered, "@a:x", "DEV1"), Err(KeyError::BadSignature(_))));
    let mut unsigned = keys.clone();
    unsigned.as_object_mut().expect("object").remove("signatures");
    assert!(matches!(check_device_keys(&unsigned, "@a:x", "DEV1"), Err(KeyError::MissingSignature(_))));
    // Another key's signature under the device's key id does not verify.
    let other = keypair("DEV1");
    let mut forged = keys.clone();
    forged["keys"]["ed25519:DEV1"] = json!(b64(&other.public_key()));
    assert!(check_device_keys(&forged, "@a:x", "DEV1").is_err());
}

#[test]
fn unsigned_section_is_not_covered() {
    let key = keypair("DEV1");
    let mut keys = device_keys("@a:x", "DEV1", &key);
    keys["unsigned"] = json!({ "device_display_name": "phone" });
    assert_eq!(check_device_keys(&keys, "@a:x", "DEV1"), Ok(()));
    assert!(same_signed_content(&keys, &device_keys("@a:x", "DEV1", &key)));
}

#[test]
fn cross_signing_key_shape() {
    let master = keypair("m");
    let public = b64(&master.public_key());
    let key = json!({ "user_id": "@a:x", "usage": ["master"], "keys": { format!("ed25519:{public}"): public } });
    assert_eq!(cross_signing_key(&key, "@a:x", Usage::Master), Ok((format!("ed25519:{public}"), public.clone())));
    assert!(cross_signing_key(&key, "@a:x", Usage::SelfSigning).is_err(), "wrong usage");
    assert!(cross_signing_key(&key, "@b:x", Usage::Master).is_err(), "foreign user");
    let two = json!({ "user_id": "@a:x", "usage": ["master"], "keys": { format!("ed25519:{public}"): public, "ed25519:other": public } });
    assert!(cross_signing_key(&two, "@a:x", Usage::Master).is_err(), "two keys");
    let mismatched = json!({ "user_id": "@a:x", "usage": ["master"], "keys": { "ed25519:abc": public } });
    assert!(cross_signing_key(&mismatched, "@a:x", Usage::Master).is_err(), "id must name the key");
}

fn backup_key() -> impl Strategy<Value = BackupKey> {
    (0u64..5, 0u64..5, any::<bool>()).prop_map(|(i, f, v)| BackupKey { first_message_index: i, forwarded_count: f, is_verified: v, session_data: json!({ "i": i, "f": f }) })
}

#[test]
fn backup_replacement_examples() {
    let k = |i, f, v| BackupKey { first_message_index: i, forwarded_count: f, is_verified: v, session_data: json!({}) };
    assert!(should_replace(None, &k(9, 9, false)));
    assert!(should_replace(Some(&k(0, 0, false)), &k(9, 9, true)), "verified wins over a better index");
    assert!(!should_replace(Some(&k(9, 9, true)), &k(0, 0, false)), "unverified never replaces verified");
    assert!(should_replace(Some(&k(5, 0, true)), &k(3, 4, true)), "lower index wins");
    assert!(!should_replace(Some(&k(3, 4, true)), &k(5, 0, true)));
    assert!(should_replace(Some(&k(3, 4, false)), &k(3, 1, false)), "then lower forwarded count");
    assert!(!should_replace(Some(&k(3, 1, false)), &k(3, 1, false)), "ties keep the existing key");
}

proptest! {
    /// Uploading keys in any order leaves the best one stored: the result
    /// does not depend on the order of uploads.
    #[test]
    fn backup_keeps_the_best_key_whatever_the_order(keys in proptest::collection::vec(backup_key(), 1..8)) {
        let upload = |order: &[BackupKey]| {
            let mut stored: Option<BackupKey> = None;
            for k in order {
                if should_replace(stored.as_ref(), k) {
                    stored = Some(k.clone());
                }
            }
            stored.expect("one upload")
        };
        let forward = upload(&keys);
        let mut reversed = keys.clone();
        reversed.reverse();
        let backward = upload(&reversed);
        let rank = |k: &BackupKey| (!k.is_verified, k.first_message_index, k.forwarded_count);
        prop_assert_eq!(rank(&forward), rank(&backward));
        prop_assert_eq!(rank(&forward), keys.iter().map(rank).min().expect("one"));
    }
}
