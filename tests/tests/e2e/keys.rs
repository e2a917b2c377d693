//! Key server over HTTP: one-time key claims, fallback keys, device-list
//! changes, key backup rules and bad input. Signed paths (device keys,
//! cross-signing, signature uploads) are driven by real Rust crypto in the
//! js-crypto suite.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use tessera_tests::{Client, Node};

use super::{shared_room, two_users};

fn login(node: &Node, user: &str, device: &str) -> Client {
    let mut c = node.client();
    let (s, v) = c.post("/_matrix/client/v3/login", json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": user }, "password": "secret-pass", "device_id": device }));
    assert_eq!(s, 200, "login: {v}");
    c.token = v["access_token"].as_str().map(str::to_owned);
    c
}

fn whoami_device(c: &Client) -> String {
    let (s, v) = c.get("/_matrix/client/v3/account/whoami");
    assert_eq!(s, 200);
    v["device_id"].as_str().expect("device_id").to_owned()
}

/// Syncs from `since` (long-polling, always from the same token) until the
/// response satisfies `done`: a change written on another shard reaches
/// this shard's token moments after the write's answer.
#[test]
fn one_time_keys_are_claimed_exactly_once_then_fallback() {
    let node = Node::start("keys-claim", "");
    let (alice, bob) = two_users(&node);
    let device = whoami_device(&alice);
    let otks: serde_json::Map<String, Value> = (0..10).map(|i| (format!("signed_curve25519:K{i}"), json!({ "key": format!("key-{i}"), "signatures": {} }))).collect();
    let (s, v) = alice.post("/_matrix/client/v3/keys/upload", json!({ "one_time_keys": otks, "fallback_keys": { "signed_curve25519:FB": { "key": "fallback", "fallback": true, "signatures": {} } } }));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["one_time_key_counts"]["signed_curve25519"], 10);
    let (_, sync) = alice.get("/_matrix/client/v3/sync");
    assert_eq!(sync["device_one_time_keys_count"]["signed_curve25519"], 10);
    assert_eq!(sync["device_unused_fallback_key_types"], json!(["signed_curve25519"]));

    // 20 concurrent claims: 10 distinct one-time keys, 10 fallback keys.
    let claims: Vec<(String, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20)
            .map(|_| {
                let bob = Client::new(bob.base.clone(), bob.token.clone());
                let device = device.clone();
                scope.spawn(move || {
                    let (s, v) = bob.post("/_matrix/client/v3/keys/claim", json!({ "one_time_keys": { "@alice:localhost": { device.clone(): "signed_curve25519" } } }));
                    assert_eq!(s, 200, "{v}");
                    let keys = v["one_time_keys"]["@alice:localhost"][&device].as_object().expect("a key for every claim").clone();
                    assert_eq!(keys.len(), 1);
                    keys.into_iter().next().expect("one key")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("claim thread")).collect()
    });
    let otk_ids: Vec<&String> = claims.iter().map(|(id, _)| id).filter(|id| *id != "signed_curve25519:FB").collect();
    let distinct: BTreeSet<&String> = otk_ids.iter().copied().collect();
    assert_eq!(otk_ids.len(), 10, "ten one-time keys: {claims:?}");
    assert_eq!(distinct.len(), 10, "never a duplicate one-time key: {claims:?}");
    assert_eq!(claims.iter().filter(|(id, _)| id == "signed_curve25519:FB").count(), 10);

    // The keys are gone, the fallback key is used, and re-uploading a
    // claimed key does not hand it out again.
    let (_, sync) = alice.get("/_matrix/client/v3/sync");
    assert_eq!(sync["device_one_time_keys_count"]["signed_curve25519"], 0);
    assert_eq!(sync["device_unused_fallback_key_types"], json!([]));
    let again = |id: &str, key: &str| (format!("signed_curve25519:{id}"), json!({ "key": key, "signatures": {} }));
    let upload: serde_json::Map<String, Value> = [again("K0", "key-0"), again("K5", "key-5"), again("K55", "new"), again("K9", "key-9")].into_iter().collect();
    let (s, v) = alice.post("/_matrix/client/v3/keys/upload", json!({ "one_time_keys": upload }));
    assert_eq!(s, 200);
    assert_eq!(v["one_time_key_counts"]["signed_curve25519"], 1, "a claimed key is never stored again; a new one among them is");
    let (_, v) = bob.post("/_matrix/client/v3/keys/claim", json!({ "one_time_keys": { "@alice:localhost": { device.clone(): "signed_curve25519" } } }));
    assert_eq!(v["one_time_keys"]["@alice:localhost"][&device].as_object().and_then(|k| k.keys().next().cloned()).as_deref(), Some("signed_curve25519:K55"), "{v}");
}

#[test]
fn conflicting_or_malformed_uploads_store_nothing() {
    let node = Node::start("keys-bad", "");
    let (alice, _bob) = two_users(&node);
    let device = whoami_device(&alice);
    let (s, _) = alice.post("/_matrix/client/v3/keys/upload", json!({ "one_time_keys": { "signed_curve25519:A": { "key": "one", "signatures": {} } } }));
    assert_eq!(s, 200);
    // Same id, other content: refused, and the new key in the same upload is not stored.
    let (s, v) = alice.post("/_matrix/client/v3/keys/upload", json!({ "one_time_keys": { "signed_curve25519:A": { "key": "two", "signatures": {} }, "signed_curve25519:B": { "key": "three", "signatures": {} } } }));
    assert_eq!((s, v["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{v}");
    let (_, v) = alice.post("/_matrix/client/v3/keys/upload", json!({}));
    assert_eq!(v["one_time_key_counts"]["signed_curve25519"], 1);
    // Device keys of another user, or with a bad signature.
    let keys = |user: &str, sig: &str| {
        json!({ "device_keys": {
            "user_id": user, "device_id": device, "algorithms": ["m.megolm.v1.aes-sha2"],
            "keys": { format!("ed25519:{device}"): "6mbyCxIoaeSrBHW6dSjHOoDahnc4fOYCoDtJMdXhPzQ", format!("curve25519:{device}"): "c2FtcGxl" },
            "signatures": { user: { format!("ed25519:{device}"): sig } },
        } })
    };
    let (s, v) = alice.post("/_matrix/client/v3/keys/upload", keys("@bob:localhost", "AAAA"));
    assert_eq!((s, v["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{v}");
    let forged = "3mTGnq5pGvNMHrTtxlDrBlRLaWYHdoCcTIUwuXJPq9vqXg6R4mxXDdGVFr8PMWYz3VDMb4E0ZOrbDb7bnOeGAw";
    let (s, v) = alice.post("/_matrix/client/v3/keys/upload", keys("@alice:localhost", forged));
    assert_eq!((s, v["errcode"].as_str()), (400, Some("M_INVALID_SIGNATURE")), "{v}");
    let (s, v) = alice.post("/_matrix/client/v3/keys/upload", json!({ "one_time_keys": { "no-algorithm": "k" } }));
    assert_eq!((s, v["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{v}");
    let (s, v) = alice.post("/_matrix/client/v3/keys/upload", json!({ "one_time_keys": { "signed_curve25519:U": { "key": "unsigned" } } }));
    assert_eq!((s, v["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{v}");
    let (s, v) = alice.post("/_matrix/client/v3/keys/query", json!({ "device_keys": { "@alice:localhost": [] } }));
    assert_eq!(s, 200);
    assert_eq!(v["device_keys"]["@alice:localhost"], json!({}), "nothing stored: {v}");
    let (s, v) = alice.post("/_matrix/client/v3/keys/query", json!({ "device_keys": "nope" }));
    assert_eq!((s, v["errcode"].as_str()), (400, Some("M_BAD_JSON")), "{v}");
    // Cross-signing keys that are not self-consistent.
    let (s, v) = alice.post("/_matrix/client/v3/keys/device_signing/upload", json!({ "master_key": { "user_id": "@bob:localhost", "usage": ["master"], "keys": { "ed25519:x": "x" } } }));
    assert_eq!((s, v["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{v}");
}

#[test]
fn device_list_changes_reach_room_members() {
    let node = Node::start("keys-changes", "");
    let (alice, bob) = two_users(&node);
    shared_room(&alice, &bob);
    let mut carol = node.client();
    carol.register("carol");
    let (_, first) = bob.get("/_matrix/client/v3/sync");
    let since = first["next_batch"].as_str().expect("next_batch").to_owned();
    let (_, carol_first) = carol.get("/_matrix/client/v3/sync");
    let carol_since = carol_first["next_batch"].as_str().expect("next_batch").to_owned();

    // A new login of Alice wakes Bob's long-poll with Alice in `changed`.
    let waiter = {
        let bob = Client::new(bob.base.clone(), bob.token.clone());
        let since = since.clone();
        std::thread::spawn(move || bob.get(&format!("/_matrix/client/v3/sync?since={since}&timeout=20000")))
    };
    let second = login(&node, "alice", "SECOND");
    let (s, woke) = waiter.join().expect("sync thread");
    assert_eq!(s, 200);
    assert!(woke["device_lists"]["changed"].as_array().is_some_and(|a| a.contains(&json!("@alice:localhost"))), "{woke}");
    let mid = woke["next_batch"].as_str().expect("next_batch").to_owned();

    // Carol shares no room with Alice and hears nothing.
    let (_, v) = carol.get(&format!("/_matrix/client/v3/sync?since={carol_since}"));
    assert_eq!(v["device_lists"]["changed"], json!([]), "{v}");

    // Deleting the device is a change too; /keys/changes agrees with sync.
    let (s, v) = second.post("/_matrix/client/v3/logout", json!({}));
    assert_eq!(s, 200, "{v}");
    // A long-poll: the change was written on whichever shard served the
    // logout, and reaches this shard's token moments later.
    let after = bob.sync_until(&mid, |v| v["device_lists"]["changed"].as_array().is_some_and(|a| a.contains(&json!("@alice:localhost"))));
    let to = after["next_batch"].as_str().expect("next_batch");
    let (s, v) = bob.get(&format!("/_matrix/client/v3/keys/changes?from={since}&to={to}"));
    assert_eq!(s, 200);
    assert_eq!(v["changed"], json!(["@alice:localhost"]));
    let (_, v) = bob.get(&format!("/_matrix/client/v3/keys/changes?from={to}&to={to}"));
    assert_eq!(v["changed"], json!([]));
    let (s, v) = bob.get("/_matrix/client/v3/keys/changes?from=s0");
    assert_eq!((s, v["errcode"].as_str()), (400, Some("M_MISSING_PARAM")));

    // Carol joins: she and the members hear of each other. She leaves and
    // shares no other room: each is in the other's `left`.
    let room = alice.create_room(json!({ "preset": "public_chat" }));
    let (s, _) = bob.post(&format!("/_matrix/client/v3/join/{room}"), json!({}));
    assert_eq!(s, 200);
    let (_, before_carol) = bob.get(&format!("/_matrix/client/v3/sync?since={to}"));
    let mark = before_carol["next_batch"].as_str().expect("next_batch").to_owned();
    let (_, carol_sync) = carol.get("/_matrix/client/v3/sync");
    let carol_mark = carol_sync["next_batch"].as_str().expect("next_batch").to_owned();
    let (s, _) = carol.post(&format!("/_matrix/client/v3/join/{room}"), json!({}));
    assert_eq!(s, 200);
    let v = bob.sync_until(&mark, |v| v["device_lists"]["changed"] != json!([]));
    assert_eq!(v["device_lists"]["changed"], json!(["@carol:localhost"]), "{v}");
    let mark = v["next_batch"].as_str().expect("next_batch").to_owned();
    let v = carol.sync_until(&carol_mark, |v| v["device_lists"]["changed"] != json!([]));
    assert_eq!(v["device_lists"]["changed"], json!(["@alice:localhost", "@bob:localhost"]), "{v}");
    let (s, _) = carol.post(&format!("/_matrix/client/v3/rooms/{room}/leave"), json!({}));
    assert_eq!(s, 200);
    let v = bob.sync_until(&mark, |v| v["device_lists"]["left"] != json!([]));
    assert_eq!(v["device_lists"]["left"], json!(["@carol:localhost"]), "{v}");
    assert_eq!(v["device_lists"]["changed"], json!([]), "{v}");
}

fn backup_key(index: u64, forwarded: u64, verified: bool, tag: &str) -> Value {
    json!({ "first_message_index": index, "forwarded_count": forwarded, "is_verified": verified, "session_data": { "ciphertext": tag, "ephemeral": "e", "mac": "m" } })
}

#[test]
fn key_backup_versions_and_replacement_rules() {
    let node = Node::start("keys-backup", "");
    let (alice, _bob) = two_users(&node);
    let (s, v) = alice.get("/_matrix/client/v3/room_keys/version");
    assert_eq!((s, v["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    let auth_data = json!({ "public_key": "abcdefg", "signatures": {} });
    let (s, v) = alice.post("/_matrix/client/v3/room_keys/version", json!({ "algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": auth_data }));
    assert_eq!((s, v["version"].as_str()), (200, Some("1")), "{v}");
    let room = "!room:localhost";
    let url = |session: &str, version: &str| format!("/_matrix/client/v3/room_keys/keys/{room}/{session}?version={version}");

    let (s, v) = alice.put(&url("S1", "1"), backup_key(5, 0, false, "first"));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["count"], 1);
    let etag1 = v["etag"].clone();
    // Worse keys never replace better ones; better ones do.
    let (_, v) = alice.put(&url("S1", "1"), backup_key(7, 0, false, "worse index"));
    assert_eq!(v["etag"], etag1, "unchanged");
    let (_, v) = alice.put(&url("S1", "1"), backup_key(3, 2, false, "better index"));
    assert_ne!(v["etag"], etag1);
    assert_eq!(v["count"], 1);
    let (_, v) = alice.put(&url("S1", "1"), backup_key(9, 9, true, "verified"));
    assert_eq!(v["count"], 1);
    let (_, v) = alice.put(&url("S1", "1"), backup_key(0, 0, false, "unverified"));
    let (s, got) = alice.get(&url("S1", "1"));
    assert_eq!(s, 200);
    assert_eq!(got["session_data"]["ciphertext"], "verified", "{got} after {v}");

    // Whole-backup upload and read.
    let (s, v) = alice.put("/_matrix/client/v3/room_keys/keys?version=1", json!({ "rooms": { room: { "sessions": { "S2": backup_key(0, 0, false, "s2") } } } }));
    assert_eq!((s, v["count"].as_u64()), (200, Some(2)), "{v}");
    let (_, all) = alice.get("/_matrix/client/v3/room_keys/keys?version=1");
    assert_eq!(all["rooms"][room]["sessions"].as_object().map(|m| m.len()), Some(2), "{all}");
    let (_, info) = alice.get("/_matrix/client/v3/room_keys/version");
    assert_eq!((info["version"].as_str(), info["count"].as_u64()), (Some("1"), Some(2)));
    assert_eq!(info["auth_data"], auth_data);

    // A newer version makes the old one read-only for uploads.
    let (_, v) = alice.post("/_matrix/client/v3/room_keys/version", json!({ "algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": auth_data }));
    assert_eq!(v["version"], "2");
    let (s, v) = alice.put(&url("S3", "1"), backup_key(0, 0, false, "old"));
    assert_eq!((s, v["errcode"].as_str(), v["current_version"].as_str()), (403, Some("M_WRONG_ROOM_KEYS_VERSION"), Some("2")), "{v}");
    let (s, v) = alice.put(&url("S3", "9"), backup_key(0, 0, false, "unknown"));
    assert_eq!((s, v["errcode"].as_str()), (404, Some("M_NOT_FOUND")), "{v}");
    let (s, v) = alice.put(&url("S3", "2"), json!({ "first_message_index": "zero" }));
    assert_eq!((s, v["errcode"].as_str()), (400, Some("M_BAD_JSON")), "{v}");
    let (s, v) = alice.put("/_matrix/client/v3/room_keys/version/2", json!({ "algorithm": "other", "auth_data": {} }));
    assert_eq!((s, v["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{v}");

    // Deleting the newest version makes the previous one current again.
    let (s, _) = alice.request("DELETE", "/_matrix/client/v3/room_keys/version/2", None);
    assert_eq!(s, 200);
    let (_, info) = alice.get("/_matrix/client/v3/room_keys/version");
    assert_eq!(info["version"], "1");
    let (s, v) = alice.request("DELETE", &format!("/_matrix/client/v3/room_keys/keys/{room}?version=1"), None);
    assert_eq!((s, v["count"].as_u64()), (200, Some(0)), "{v}");
    let (s, _) = alice.get(&url("S1", "1"));
    assert_eq!(s, 404);
    let (_, v) = alice.post("/_matrix/client/v3/room_keys/version", json!({ "algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": auth_data }));
    assert_eq!(v["version"], "3", "deleted version numbers are never reused");
}
