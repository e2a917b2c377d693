"""Key server responses validated against the spec's schemas (keys.yaml,
cross_signing.yaml, key_backup.yaml), with real ed25519 signatures, plus
the key server's bad-input errors: each error code, and that nothing was
stored.
"""

from __future__ import annotations

import base64
import json

import nacl.signing

from conftest import describe, q, register_user, unique

V3 = "/_matrix/client/v3"
ROOM = "!backup:example.org"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


def canonical(obj: dict) -> bytes:
    body = {k: v for k, v in obj.items() if k not in ("signatures", "unsigned")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sign(obj: dict, user_id: str, key_id: str, key: nacl.signing.SigningKey) -> dict:
    sig = b64(key.sign(canonical(obj)).signature)
    obj.setdefault("signatures", {}).setdefault(user_id, {})[f"ed25519:{key_id}"] = sig
    return obj


def device_keys(user, key: nacl.signing.SigningKey) -> dict:
    keys = {
        "user_id": user.user_id,
        "device_id": user.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {f"ed25519:{user.device_id}": b64(bytes(key.verify_key)), f"curve25519:{user.device_id}": b64(b"c" * 32)},
    }
    return sign(keys, user.user_id, user.device_id, key)


def cross_key(user, usage: str, key: nacl.signing.SigningKey) -> dict:
    public = b64(bytes(key.verify_key))
    return {"user_id": user.user_id, "usage": [usage], "keys": {f"ed25519:{public}": public}}


def upload(api, user, body):
    return api.request("POST", f"{V3}/keys/upload", user.access_token, json=body)


def test_keys_upload_query_claim_200(api, check, new_user):
    alice, bob = new_user(), new_user()
    dkey = nacl.signing.SigningKey.generate()
    otk = sign({"key": b64(b"o" * 32)}, alice.user_id, alice.device_id, dkey)
    fallback = sign({"key": b64(b"f" * 32), "fallback": True}, alice.user_id, alice.device_id, dkey)
    body = check(
        upload(api, alice, {"device_keys": device_keys(alice, dkey), "one_time_keys": {"signed_curve25519:AAAAAQ": otk}, "fallback_keys": {"signed_curve25519:AAAAAg": fallback}}),
        "POST",
        f"{V3}/keys/upload",
        200,
    )
    assert body["one_time_key_counts"]["signed_curve25519"] == 1

    resp = api.request("POST", f"{V3}/keys/query", bob.access_token, json={"device_keys": {alice.user_id: []}})
    body = check(resp, "POST", f"{V3}/keys/query", 200)
    got = body["device_keys"][alice.user_id][alice.device_id]
    assert got["keys"][f"ed25519:{alice.device_id}"] == b64(bytes(dkey.verify_key))
    assert "device_display_name" in got["unsigned"]

    claim = {"one_time_keys": {alice.user_id: {alice.device_id: "signed_curve25519"}}}
    first = check(api.request("POST", f"{V3}/keys/claim", bob.access_token, json=claim), "POST", f"{V3}/keys/claim", 200)
    assert first["one_time_keys"][alice.user_id][alice.device_id] == {"signed_curve25519:AAAAAQ": otk}
    second = check(api.request("POST", f"{V3}/keys/claim", bob.access_token, json=claim), "POST", f"{V3}/keys/claim", 200)
    assert second["one_time_keys"][alice.user_id][alice.device_id] == {"signed_curve25519:AAAAAg": fallback}


def test_keys_changes_200(api, check, user):
    since = api.request("GET", f"{V3}/sync", user.access_token).json()["next_batch"]
    check(upload(api, user, {"device_keys": device_keys(user, nacl.signing.SigningKey.generate())}), "POST", f"{V3}/keys/upload", 200)
    to = api.request("GET", f"{V3}/sync?since={since}", user.access_token).json()["next_batch"]
    body = check(api.request("GET", f"{V3}/keys/changes?from={since}&to={to}", user.access_token), "GET", f"{V3}/keys/changes", 200)
    assert user.user_id in body["changed"]


def test_cross_signing_and_signatures_upload_200(api, check, new_user):
    alice, bob = new_user(), new_user()
    dkey, master, ssk, usk = (nacl.signing.SigningKey.generate() for _ in range(4))
    check(upload(api, alice, {"device_keys": device_keys(alice, dkey)}), "POST", f"{V3}/keys/upload", 200)
    master_pub = b64(bytes(master.verify_key))
    keys = {
        "master_key": cross_key(alice, "master", master),
        "self_signing_key": sign(cross_key(alice, "self_signing", ssk), alice.user_id, master_pub, master),
        "user_signing_key": sign(cross_key(alice, "user_signing", usk), alice.user_id, master_pub, master),
    }
    # The first upload needs no user-interactive auth.
    resp = api.request("POST", f"{V3}/keys/device_signing/upload", alice.access_token, json=keys)
    check(resp, "POST", f"{V3}/keys/device_signing/upload", 200)
    # Replacing the keys does.
    other = {"master_key": cross_key(alice, "master", nacl.signing.SigningKey.generate())}
    resp = api.request("POST", f"{V3}/keys/device_signing/upload", alice.access_token, json=other)
    # (The spec describes this 401 with user-interactive auth, not in keys.yaml.)
    assert resp.status_code == 401, describe(resp)
    assert resp.json()["flows"], describe(resp)

    # Alice's self-signing key signs her device; one bad signature fails alone.
    signed_device = sign(device_keys(alice, dkey), alice.user_id, b64(bytes(ssk.verify_key)), ssk)
    bad = device_keys(alice, dkey)
    bad["signatures"][alice.user_id][f"ed25519:{master_pub}"] = b64(b"x" * 64)
    resp = api.request("POST", f"{V3}/keys/signatures/upload", alice.access_token, json={alice.user_id: {alice.device_id: signed_device, master_pub: {**keys["master_key"], "signatures": {alice.user_id: {f"ed25519:{master_pub}": b64(b'x' * 64)}}}}})
    body = check(resp, "POST", f"{V3}/keys/signatures/upload", 200)
    assert list(body["failures"].get(alice.user_id, {})) == [master_pub], body
    resp = api.request("POST", f"{V3}/keys/query", bob.access_token, json={"device_keys": {alice.user_id: []}})
    body = check(resp, "POST", f"{V3}/keys/query", 200)
    sigs = body["device_keys"][alice.user_id][alice.device_id]["signatures"][alice.user_id]
    assert f"ed25519:{b64(bytes(ssk.verify_key))}" in sigs
    assert alice.user_id in body["master_keys"] and alice.user_id in body["self_signing_keys"]
    assert alice.user_id not in body["user_signing_keys"], "only alice sees her user-signing key"


def test_room_keys_version_and_keys_200(api, check, user):
    auth_data = {"public_key": b64(b"p" * 32), "signatures": {}}
    body = check(
        api.request("POST", f"{V3}/room_keys/version", user.access_token, json={"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": auth_data}),
        "POST",
        f"{V3}/room_keys/version",
        200,
    )
    version = body["version"]
    body = check(api.request("GET", f"{V3}/room_keys/version", user.access_token), "GET", f"{V3}/room_keys/version", 200)
    assert body["version"] == version and body["count"] == 0
    check(api.request("GET", f"{V3}/room_keys/version/{version}", user.access_token), "GET", f"{V3}/room_keys/version/{{version}}", 200)
    resp = api.request("PUT", f"{V3}/room_keys/version/{version}", user.access_token, json={"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": auth_data, "version": version})
    check(resp, "PUT", f"{V3}/room_keys/version/{{version}}", 200)
    key = {"first_message_index": 0, "forwarded_count": 0, "is_verified": False, "session_data": {"ephemeral": "e", "ciphertext": "c", "mac": "m"}}
    url = f"{V3}/room_keys/keys/{q(ROOM)}/S1?version={version}"
    body = check(api.request("PUT", url, user.access_token, json=key), "PUT", f"{V3}/room_keys/keys/{{roomId}}/{{sessionId}}", 200)
    assert body["count"] == 1
    body = check(api.request("PUT", f"{V3}/room_keys/keys/{q(ROOM)}?version={version}", user.access_token, json={"sessions": {"S2": key}}), "PUT", f"{V3}/room_keys/keys/{{roomId}}", 200)
    body = check(api.request("PUT", f"{V3}/room_keys/keys?version={version}", user.access_token, json={"rooms": {ROOM: {"sessions": {"S3": key}}}}), "PUT", f"{V3}/room_keys/keys", 200)
    assert body["count"] == 3
    check(api.request("GET", url, user.access_token), "GET", f"{V3}/room_keys/keys/{{roomId}}/{{sessionId}}", 200)
    body = check(api.request("GET", f"{V3}/room_keys/keys/{q(ROOM)}?version={version}", user.access_token), "GET", f"{V3}/room_keys/keys/{{roomId}}", 200)
    assert set(body["sessions"]) == {"S1", "S2", "S3"}
    body = check(api.request("GET", f"{V3}/room_keys/keys?version={version}", user.access_token), "GET", f"{V3}/room_keys/keys", 200)
    assert set(body["rooms"][ROOM]["sessions"]) == {"S1", "S2", "S3"}
    body = check(api.request("DELETE", url, user.access_token), "DELETE", f"{V3}/room_keys/keys/{{roomId}}/{{sessionId}}", 200)
    assert body["count"] == 2
    body = check(api.request("DELETE", f"{V3}/room_keys/keys/{q(ROOM)}?version={version}", user.access_token), "DELETE", f"{V3}/room_keys/keys/{{roomId}}", 200)
    body = check(api.request("DELETE", f"{V3}/room_keys/keys?version={version}", user.access_token), "DELETE", f"{V3}/room_keys/keys", 200)
    assert body["count"] == 0
    check(api.request("DELETE", f"{V3}/room_keys/version/{version}", user.access_token), "DELETE", f"{V3}/room_keys/version/{{version}}", 200)


# --- bad input: clear errors, nothing stored ------------------------------------------------


def stored_device_keys(api, user) -> dict:
    resp = api.request("POST", f"{V3}/keys/query", user.access_token, json={"device_keys": {user.user_id: []}})
    assert resp.status_code == 200, describe(resp)
    return resp.json()["device_keys"].get(user.user_id, {})


def test_keys_upload_400_bad_signature(api, check, user):
    keys = device_keys(user, nacl.signing.SigningKey.generate())
    keys["algorithms"].append("org.example.tampered")
    check.error(upload(api, user, {"device_keys": keys}), 400, "M_INVALID_SIGNATURE")
    assert stored_device_keys(api, user) == {}


def test_keys_upload_400_foreign_user(api, check, new_user):
    alice, bob = new_user(), new_user()
    key = nacl.signing.SigningKey.generate()
    check.error(upload(api, alice, {"device_keys": device_keys(bob, key)}), 400, "M_INVALID_PARAM")
    assert stored_device_keys(api, bob) == {}
    assert stored_device_keys(api, alice) == {}


def test_keys_upload_400_malformed(api, check, user):
    check.error(upload(api, user, {"device_keys": {"user_id": user.user_id}}), 400, "M_INVALID_PARAM")
    check.error(upload(api, user, {"one_time_keys": {"no_colon": "k"}}), 400, "M_INVALID_PARAM")
    check.error(upload(api, user, {"one_time_keys": []}), 400, "M_BAD_JSON")
    check.error(api.request("POST", f"{V3}/keys/upload", user.access_token, data=b"{not json"), 400, "M_NOT_JSON")
    body = upload(api, user, {}).json()
    assert body["one_time_key_counts"].get("signed_curve25519", 0) == 0, body


def test_room_keys_404_unknown_version(api, check, user):
    check.error(api.request("GET", f"{V3}/room_keys/version", user.access_token), 404, "M_NOT_FOUND")
    check.error(api.request("GET", f"{V3}/room_keys/version/{unique('v')}", user.access_token), 404, "M_NOT_FOUND")
    key = {"first_message_index": 0, "forwarded_count": 0, "is_verified": False, "session_data": {}}
    check.error(api.request("PUT", f"{V3}/room_keys/keys/{q(ROOM)}/S?version=77", user.access_token, json=key), 404, "M_NOT_FOUND")


def test_room_keys_403_wrong_version(api, check, user):
    create = {"algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": {"public_key": "k"}}
    old = api.request("POST", f"{V3}/room_keys/version", user.access_token, json=create).json()["version"]
    new = api.request("POST", f"{V3}/room_keys/version", user.access_token, json=create).json()["version"]
    key = {"first_message_index": 0, "forwarded_count": 0, "is_verified": False, "session_data": {}}
    body = check.error(api.request("PUT", f"{V3}/room_keys/keys/{q(ROOM)}/S?version={old}", user.access_token, json=key), 403, "M_WRONG_ROOM_KEYS_VERSION")
    assert body["current_version"] == new
    info = api.request("GET", f"{V3}/room_keys/version/{old}", user.access_token).json()
    assert info["count"] == 0, "nothing stored in the old version"
