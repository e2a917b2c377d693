"""Bad requests, black box: each must be refused with the spec's status and
errcode, in the spec's error body shape, and must change nothing the client
can observe afterwards (room state, timeline, account data, joined rooms).
"""

from __future__ import annotations

import http.client
from urllib.parse import urlsplit

import pytest
import requests

from conftest import create_room, describe, join, latest_events, q, send_text, state_snapshot, unique

V3 = "/_matrix/client/v3"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
def room(api, new_user):
    """A public room with an owner (PL 100) and a plain member (PL 0)."""
    owner, member = new_user(), new_user()
    room_id = create_room(api, owner, preset="public_chat", name="Bad input")
    join(api, member, room_id)
    send_text(api, owner, room_id, "before")
    return {"id": room_id, "owner": owner, "member": member}


def joined_rooms(api, user):
    resp = api.request("GET", f"{V3}/joined_rooms", user.access_token)
    assert resp.status_code == 200, describe(resp)
    return sorted(resp.json()["joined_rooms"])


def account_data(api, user, data_type):
    resp = api.request("GET", f"{V3}/user/{q(user.user_id)}/account_data/{data_type}", user.access_token)
    return resp.status_code, (resp.json() if resp.status_code == 200 else None)


class Unchanged:
    """Snapshot of what a bad request must not change, compared after it."""

    def __init__(self, api, room):
        self.api, self.room = api, room
        self.before = self.take()

    def take(self):
        owner = self.room["owner"]
        return {
            "state": state_snapshot(self.api, owner, self.room["id"]),
            "timeline": latest_events(self.api, owner, self.room["id"]),
            "owner_rooms": joined_rooms(self.api, owner),
            "member_rooms": joined_rooms(self.api, self.room["member"]),
        }

    def check(self):
        after = self.take()
        for key, value in self.before.items():
            assert after[key] == value, f"the refused request changed {key}"


def send_path(room_id, txn=None):
    return f"{V3}/rooms/{q(room_id)}/send/m.room.message/{txn or unique('txn')}"


# --- malformed JSON: 400 M_NOT_JSON -------------------------------------------------------------

MALFORMED = [
    ("truncated", b'{"msgtype": "m.text", "body": "hi"'),
    ("not-json", b"this is not json"),
    ("trailing-garbage", b'{"msgtype": "m.text", "body": "hi"} trailing'),
    ("invalid-utf8", b'{"msgtype": "m.text", "body": "\xff\xfe"}'),
    ("single-quotes", b"{'msgtype': 'm.text', 'body': 'hi'}"),
]


@pytest.mark.parametrize("name,raw", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_send_malformed_json_400_not_json(api, check, room, name, raw):
    guard = Unchanged(api, room)
    resp = api.request("PUT", send_path(room["id"]), room["owner"].access_token, data=raw, headers=JSON)
    check.error(resp, 400, "M_NOT_JSON")
    guard.check()


def test_create_room_malformed_json_400_not_json(api, check, room):
    guard = Unchanged(api, room)
    resp = api.request("POST", f"{V3}/createRoom", room["owner"].access_token, data=b'{"name": "x",', headers=JSON)
    check.error(resp, 400, "M_NOT_JSON")
    guard.check()


def devices(api, user):
    resp = api.request("GET", f"{V3}/devices", user.access_token)
    assert resp.status_code == 200, describe(resp)
    return sorted(d["device_id"] for d in resp.json()["devices"])


def test_login_malformed_json_400_not_json(api, check, user):
    before = devices(api, user)
    body = f'{{"type": "m.login.password", "identifier": {{"type": "m.id.user", "user": "{user.localpart}"}}, "password": "{user.password}"'
    resp = api.request("POST", f"{V3}/login", data=body.encode(), headers=JSON)
    check.error(resp, 400, "M_NOT_JSON")
    assert devices(api, user) == before, "a refused login created a device"


def test_account_data_malformed_json_400_not_json(api, check, user):
    path = f"{V3}/user/{q(user.user_id)}/account_data/org.example.bad"
    before = account_data(api, user, "org.example.bad")
    resp = api.request("PUT", path, user.access_token, data=b"{nope}", headers=JSON)
    check.error(resp, 400, "M_NOT_JSON")
    assert account_data(api, user, "org.example.bad") == before


# --- well-formed JSON of the wrong shape: 400 M_BAD_JSON ----------------------------------------


def test_send_content_not_object_400_bad_json(api, check, room):
    guard = Unchanged(api, room)
    resp = api.request("PUT", send_path(room["id"]), room["owner"].access_token, json=["m.text", "hi"])
    check.error(resp, 400, "M_BAD_JSON")
    guard.check()


def test_state_content_not_object_400_bad_json(api, check, room):
    guard = Unchanged(api, room)
    resp = api.request("PUT", f"{V3}/rooms/{q(room['id'])}/state/m.room.topic/", room["owner"].access_token, json="a topic")
    check.error(resp, 400, "M_BAD_JSON")
    guard.check()


def test_create_room_invite_not_list_400_bad_json(api, check, room):
    guard = Unchanged(api, room)
    resp = api.request("POST", f"{V3}/createRoom", room["owner"].access_token, json={"invite": room["member"].user_id})
    check.error(resp, 400, "M_BAD_JSON")
    guard.check()


def test_create_room_name_not_string_400_bad_json(api, check, room):
    guard = Unchanged(api, room)
    resp = api.request("POST", f"{V3}/createRoom", room["owner"].access_token, json={"name": {"not": "a string"}})
    check.error(resp, 400, "M_BAD_JSON")
    guard.check()


def test_invite_user_id_not_string_400_bad_json(api, check, room):
    guard = Unchanged(api, room)
    resp = api.request("POST", f"{V3}/rooms/{q(room['id'])}/invite", room["owner"].access_token, json={"user_id": 42})
    check.error(resp, 400, "M_BAD_JSON")
    guard.check()


def test_typing_flag_not_bool_400_bad_json(api, check, room):
    owner = room["owner"]
    resp = api.request("PUT", f"{V3}/rooms/{q(room['id'])}/typing/{q(owner.user_id)}", owner.access_token, json={"typing": "yes"})
    check.error(resp, 400, "M_BAD_JSON")


def test_login_user_not_string_400_bad_json(api, check, user):
    before = devices(api, user)
    body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": 12345}, "password": user.password}
    check.error(api.request("POST", f"{V3}/login", json=body), 400, "M_BAD_JSON")
    assert devices(api, user) == before, "a refused login created a device"


def test_login_password_not_string_400_bad_json(api, check, user):
    before = devices(api, user)
    body = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.localpart}, "password": [user.password]}
    check.error(api.request("POST", f"{V3}/login", json=body), 400, "M_BAD_JSON")
    assert devices(api, user) == before, "a refused login created a device"


def test_account_data_not_object_400_bad_json(api, check, user):
    path = f"{V3}/user/{q(user.user_id)}/account_data/org.example.bad"
    before = account_data(api, user, "org.example.bad")
    check.error(api.request("PUT", path, user.access_token, json=[1, 2, 3]), 400, "M_BAD_JSON")
    assert account_data(api, user, "org.example.bad") == before


def test_filter_limit_not_int_400_bad_json(api, check, user):
    body = {"room": {"timeline": {"limit": "ten"}}}
    check.error(api.request("POST", f"{V3}/user/{q(user.user_id)}/filter", user.access_token, json=body), 400, "M_BAD_JSON")


# --- oversized bodies: 413 M_TOO_LARGE ----------------------------------------------------------


def _oversized_account_data(limit: int) -> bytes:
    # Valid JSON, so the only thing wrong with it is its size.
    pad = "x" * (limit + 16 * 1024)
    return ('{"pad": "' + pad + '"}').encode()


def _fresh_put(server, path, token, data):
    # A new connection, so the result cannot depend on what an earlier
    # request left behind on a pooled one (that is tested on its own below).
    with requests.Session() as session:
        return session.put(
            server.base_url + path, data=data, headers={**JSON, "Authorization": f"Bearer {token}"}, timeout=60
        )


def test_oversized_body_413_too_large(api, check, server, user):
    limit = server.profile["request_body_bytes_max"]
    path = f"{V3}/user/{q(user.user_id)}/account_data/org.example.big"
    before = account_data(api, user, "org.example.big")
    resp = _fresh_put(server, path, user.access_token, _oversized_account_data(limit))
    check.error(resp, 413, "M_TOO_LARGE")
    assert account_data(api, user, "org.example.big") == before


def test_oversized_chunked_body_413_too_large(api, check, server, user):
    """Without Content-Length the server must count while it reads."""
    limit = server.profile["request_body_bytes_max"]
    body = _oversized_account_data(limit)
    chunk = 16 * 1024

    def chunks():
        for i in range(0, len(body), chunk):
            yield body[i : i + chunk]

    path = f"{V3}/user/{q(user.user_id)}/account_data/org.example.bigchunked"
    before = account_data(api, user, "org.example.bigchunked")
    try:
        resp = _fresh_put(server, path, user.access_token, chunks())
    except requests.ConnectionError as err:
        pytest.fail(f"server dropped the connection instead of answering 413 M_TOO_LARGE: {err}")
    check.error(resp, 413, "M_TOO_LARGE")
    assert account_data(api, user, "org.example.bigchunked") == before


def test_connection_after_413_is_usable_or_closed_explicitly(server, user):
    """After a 413 the server either keeps serving the connection or says
    `Connection: close`; closing silently makes a keep-alive client send its
    next request into a dead connection."""
    limit = server.profile["request_body_bytes_max"]
    url = urlsplit(server.base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    auth = {"Authorization": f"Bearer {user.access_token}"}
    try:
        path = f"{V3}/user/{q(user.user_id)}/account_data/org.example.big413"
        conn.request("PUT", path, body=_oversized_account_data(limit), headers={**JSON, **auth})
        first = conn.getresponse()
        first.read()
        assert first.status == 413, f"expected 413, got {first.status}"
        # http.client reuses the socket unless the response said "close".
        try:
            conn.request("GET", f"{V3}/account/whoami", headers=auth)
            second = conn.getresponse()
            second.read()
        except (http.client.HTTPException, OSError) as err:
            pytest.fail(
                f"connection closed after 413 without 'Connection: close' "
                f"(413 headers: {dict(first.getheaders())}): {err!r}"
            )
        assert second.status == 200, f"request after a 413 on the same connection got {second.status}"
    finally:
        conn.close()


def test_body_at_limit_accepted(api, server, user):
    """The limit is a limit, not an off-by-some: a body just under it is served."""
    limit = server.profile["request_body_bytes_max"]
    prefix, suffix = '{"pad": "', '"}'
    body = (prefix + "y" * (limit - len(prefix) - len(suffix) - 64) + suffix).encode()
    assert len(body) < limit
    path = f"{V3}/user/{q(user.user_id)}/account_data/org.example.fits"
    resp = api.request("PUT", path, user.access_token, data=body, headers=JSON)
    assert resp.status_code == 200, describe(resp)


# --- unknown endpoints and wrong methods: 404 / 405 M_UNRECOGNIZED -------------------------------

UNKNOWN = [
    ("GET", "/_matrix/client/v3/definitely_not_an_endpoint"),
    ("POST", "/_matrix/client/v3/definitely/not/an/endpoint"),
    ("GET", "/_matrix/client/v1/definitely_not_an_endpoint"),
    ("GET", "/_matrix/client/unstable/org.example.nothing"),
]


@pytest.mark.parametrize("method,path", UNKNOWN, ids=[f"{m} {p}" for m, p in UNKNOWN])
@pytest.mark.parametrize("authed", [True, False], ids=["authed", "anonymous"])
def test_unknown_endpoint_404_unrecognized(api, check, user, method, path, authed):
    token = user.access_token if authed else None
    kwargs = {"json": {}} if method == "POST" else {}
    check.error(api.request(method, path, token, **kwargs), 404, "M_UNRECOGNIZED")


def test_unknown_room_action_404_unrecognized(api, check, room):
    resp = api.request("POST", f"{V3}/rooms/{q(room['id'])}/not_an_action", room["owner"].access_token, json={})
    check.error(resp, 404, "M_UNRECOGNIZED")


WRONG_METHOD = [
    ("GET", f"{V3}/createRoom"),
    ("DELETE", f"{V3}/joined_rooms"),
    ("POST", f"{V3}/account/whoami"),
    ("PUT", f"{V3}/login"),
    ("POST", "/_matrix/client/versions"),
]


@pytest.mark.parametrize("method,path", WRONG_METHOD, ids=[f"{m} {p}" for m, p in WRONG_METHOD])
def test_wrong_method_405_unrecognized(api, check, user, method, path):
    kwargs = {"json": {}} if method in ("POST", "PUT") else {}
    check.error(api.request(method, path, user.access_token, **kwargs), 405, "M_UNRECOGNIZED")


def test_wrong_method_on_room_path_405_unrecognized(api, check, room):
    guard = Unchanged(api, room)
    # send/{type}/{txnId} is PUT only.
    resp = api.request("POST", send_path(room["id"]), room["owner"].access_token, json={"msgtype": "m.text", "body": "x"})
    check.error(resp, 405, "M_UNRECOGNIZED")
    guard.check()


# --- authentication: 401 M_MISSING_TOKEN / M_UNKNOWN_TOKEN --------------------------------------


def test_missing_token_401_whoami(api, check):
    check.error(api.request("GET", f"{V3}/account/whoami"), 401, "M_MISSING_TOKEN")


def test_missing_token_401_send(api, check, room):
    guard = Unchanged(api, room)
    resp = api.request("PUT", send_path(room["id"]), json={"msgtype": "m.text", "body": "anon"})
    check.error(resp, 401, "M_MISSING_TOKEN")
    guard.check()


def test_missing_token_401_create_room(api, check):
    check.error(api.request("POST", f"{V3}/createRoom", json={}), 401, "M_MISSING_TOKEN")


def test_missing_token_401_sync(api, check):
    check.error(api.request("GET", f"{V3}/sync", params={"timeout": 0}), 401, "M_MISSING_TOKEN")


def test_unknown_token_401_whoami(api, check):
    check.error(api.request("GET", f"{V3}/account/whoami", "syt_not_a_real_token"), 401, "M_UNKNOWN_TOKEN")


def test_unknown_token_401_send(api, check, room):
    guard = Unchanged(api, room)
    resp = api.request("PUT", send_path(room["id"]), "syt_not_a_real_token", json={"msgtype": "m.text", "body": "forged"})
    check.error(resp, 401, "M_UNKNOWN_TOKEN")
    guard.check()


def test_unknown_token_401_set_state(api, check, room):
    guard = Unchanged(api, room)
    resp = api.request("PUT", f"{V3}/rooms/{q(room['id'])}/state/m.room.name/", "syt_not_a_real_token", json={"name": "hijack"})
    check.error(resp, 401, "M_UNKNOWN_TOKEN")
    guard.check()


def test_logged_out_token_401_unknown_token(api, check, room):
    member = room["member"]
    other = api.request(
        "POST",
        f"{V3}/login",
        json={"type": "m.login.password", "identifier": {"type": "m.id.user", "user": member.localpart}, "password": member.password},
    ).json()
    assert api.request("POST", f"{V3}/logout", other["access_token"], json={}).status_code == 200
    guard = Unchanged(api, room)
    resp = api.request("PUT", send_path(room["id"]), other["access_token"], json={"msgtype": "m.text", "body": "ghost"})
    check.error(resp, 401, "M_UNKNOWN_TOKEN")
    guard.check()


# --- forbidden actions: 403 M_FORBIDDEN ---------------------------------------------------------


def test_send_to_room_not_joined_403(api, check, room, new_user):
    outsider = new_user()
    guard = Unchanged(api, room)
    resp = api.request("PUT", send_path(room["id"]), outsider.access_token, json={"msgtype": "m.text", "body": "intruder"})
    check.error(resp, 403, "M_FORBIDDEN")
    guard.check()


def test_set_state_without_power_403(api, check, room):
    guard = Unchanged(api, room)
    resp = api.request("PUT", f"{V3}/rooms/{q(room['id'])}/state/m.room.name/", room["member"].access_token, json={"name": "mine now"})
    check.error(resp, 403, "M_FORBIDDEN")
    guard.check()


def test_raise_own_power_403(api, check, room):
    guard = Unchanged(api, room)
    member = room["member"]
    pl = api.request("GET", f"{V3}/rooms/{q(room['id'])}/state/m.room.power_levels/", member.access_token).json()
    pl.setdefault("users", {})[member.user_id] = 100
    resp = api.request("PUT", f"{V3}/rooms/{q(room['id'])}/state/m.room.power_levels/", member.access_token, json=pl)
    check.error(resp, 403, "M_FORBIDDEN")
    guard.check()


def test_kick_without_power_403(api, check, room):
    guard = Unchanged(api, room)
    resp = api.request("POST", f"{V3}/rooms/{q(room['id'])}/kick", room["member"].access_token, json={"user_id": room["owner"].user_id})
    check.error(resp, 403, "M_FORBIDDEN")
    guard.check()


def test_ban_without_power_403(api, check, room):
    guard = Unchanged(api, room)
    resp = api.request("POST", f"{V3}/rooms/{q(room['id'])}/ban", room["member"].access_token, json={"user_id": room["owner"].user_id})
    check.error(resp, 403, "M_FORBIDDEN")
    guard.check()


def test_redact_others_event_without_power_403(api, check, room):
    target = latest_events(api, room["owner"], room["id"], limit=1)[0]
    guard = Unchanged(api, room)
    resp = api.request("PUT", f"{V3}/rooms/{q(room['id'])}/redact/{q(target)}/{unique('txn')}", room["member"].access_token, json={})
    check.error(resp, 403, "M_FORBIDDEN")
    guard.check()


def test_set_other_users_profile_403(api, check, room):
    owner, member = room["owner"], room["member"]
    before = api.request("GET", f"{V3}/profile/{q(owner.user_id)}/displayname").json()
    resp = api.request("PUT", f"{V3}/profile/{q(owner.user_id)}/displayname", member.access_token, json={"displayname": "spoofed"})
    check.error(resp, 403, "M_FORBIDDEN")
    assert api.request("GET", f"{V3}/profile/{q(owner.user_id)}/displayname").json() == before


def test_other_users_account_data_403(api, check, room):
    owner, member = room["owner"], room["member"]
    resp = api.request("PUT", f"{V3}/user/{q(owner.user_id)}/account_data/org.example.x", member.access_token, json={"a": 1})
    check.error(resp, 403, "M_FORBIDDEN")
    assert account_data(api, owner, "org.example.x")[0] == 404
