"""Responses of the client-server API validated against the spec's schemas.

One test per (endpoint, status). Each test drives the server into the state
that produces the response, asserts the status, validates the JSON body
against the response schema of the spec's OpenAPI file, and checks what the
schema cannot: that the values mean what the request asked for.
"""

from __future__ import annotations

import pytest

from conftest import (
    create_room,
    describe,
    invite,
    join,
    q,
    register_user,
    room_state,
    send_text,
    unique,
    wait_until,
)

V3 = "/_matrix/client/v3"


def password_auth(user, session=None):
    auth = {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.user_id}, "password": user.password}
    if session:
        auth["session"] = session
    return auth


def login(api, user, **extra):
    resp = api.request(
        "POST",
        f"{V3}/login",
        json={"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.localpart}, "password": user.password, **extra},
    )
    assert resp.status_code == 200, f"login failed: {describe(resp)}"
    return resp.json()


def whoami_status(api, token) -> int:
    return api.request("GET", f"{V3}/account/whoami", token).status_code


# --- server discovery and login ------------------------------------------------------------


def test_versions_200(api, check):
    body = check(api.request("GET", "/_matrix/client/versions"), "GET", "/_matrix/client/versions", 200)
    assert any(v in body["versions"] for v in ("v1.16", "v1.17", "v1.18", "v1.19")), body["versions"]


def test_wellknown_client_200(api, check):
    body = check(api.request("GET", "/.well-known/matrix/client"), "GET", "/.well-known/matrix/client", 200)
    assert body["m.homeserver"]["base_url"].startswith("http")


def test_wellknown_support_200(api, check, server):
    if server.kind != "tessera":
        pytest.skip("support contacts are configured only for tessera")
    body = check(api.request("GET", "/.well-known/matrix/support"), "GET", "/.well-known/matrix/support", 200)
    assert body["contacts"][0]["role"] == "m.role.admin" and body["support_page"].startswith("https://")


def test_capabilities_200(api, check, user):
    body = check(api.request("GET", f"{V3}/capabilities", user.access_token), "GET", f"{V3}/capabilities", 200)
    assert isinstance(body["capabilities"], dict)


def test_login_flows_200(api, check):
    body = check(api.request("GET", f"{V3}/login"), "GET", f"{V3}/login", 200)
    assert "m.login.password" in [f["type"] for f in body["flows"]]


def test_register_401_uia_flows(api, check):
    resp = api.request("POST", f"{V3}/register", json={"username": unique("uia"), "password": "secret-pass-1"})
    body = check(resp, "POST", f"{V3}/register", 401)
    assert ["m.login.dummy"] in [f["stages"] for f in body["flows"]], body
    assert isinstance(body.get("session"), str) and body["session"]


def test_register_200(api, check):
    localpart = unique("reg")
    body = {"username": localpart, "password": "secret-pass-1"}
    session = api.request("POST", f"{V3}/register", json=body).json()["session"]
    resp = api.request("POST", f"{V3}/register", json={**body, "auth": {"type": "m.login.dummy", "session": session}})
    data = check(resp, "POST", f"{V3}/register", 200)
    assert data["user_id"].startswith(f"@{localpart}:")
    assert whoami_status(api, data["access_token"]) == 200


def test_register_available_200(api, check):
    resp = api.request("GET", f"{V3}/register/available", params={"username": unique("free")})
    assert check(resp, "GET", f"{V3}/register/available", 200)["available"] is True


def test_register_available_400_taken(api, check, user):
    resp = api.request("GET", f"{V3}/register/available", params={"username": user.localpart})
    body = check(resp, "GET", f"{V3}/register/available", 400)
    assert body["errcode"] == "M_USER_IN_USE"


def test_login_200(api, check, user):
    resp = api.request(
        "POST",
        f"{V3}/login",
        json={"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.localpart}, "password": user.password},
    )
    body = check(resp, "POST", f"{V3}/login", 200)
    assert body["user_id"] == user.user_id
    assert body["device_id"] != user.device_id
    assert whoami_status(api, body["access_token"]) == 200


def test_login_403_wrong_password(api, check, user):
    resp = api.request(
        "POST",
        f"{V3}/login",
        json={"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.localpart}, "password": "wrong-password"},
    )
    assert check(resp, "POST", f"{V3}/login", 403)["errcode"] == "M_FORBIDDEN"


def test_whoami_200(api, check, user):
    body = check(api.request("GET", f"{V3}/account/whoami", user.access_token), "GET", f"{V3}/account/whoami", 200)
    assert body["user_id"] == user.user_id
    assert body["device_id"] == user.device_id


def test_whoami_401_unknown_token(api, check):
    resp = api.request("GET", f"{V3}/account/whoami", "not-a-real-token")
    assert check(resp, "GET", f"{V3}/account/whoami", 401)["errcode"] == "M_UNKNOWN_TOKEN"


def test_logout_200(api, check, user):
    other = login(api, user)
    check(api.request("POST", f"{V3}/logout", other["access_token"], json={}), "POST", f"{V3}/logout", 200)
    assert whoami_status(api, other["access_token"]) == 401
    assert whoami_status(api, user.access_token) == 200, "logout ended another session"


def test_logout_all_200(api, check, user):
    other = login(api, user)
    check(api.request("POST", f"{V3}/logout/all", user.access_token, json={}), "POST", f"{V3}/logout/all", 200)
    assert whoami_status(api, other["access_token"]) == 401
    assert whoami_status(api, user.access_token) == 401


def test_refresh_200(api, check, user):
    first = login(api, user, refresh_token=True)
    assert "refresh_token" in first, f"server issued no refresh token when asked: {first}"
    resp = api.request("POST", f"{V3}/refresh", json={"refresh_token": first["refresh_token"]})
    body = check(resp, "POST", f"{V3}/refresh", 200)
    assert body["access_token"] != first["access_token"]
    assert whoami_status(api, body["access_token"]) == 200


def test_refresh_401_unknown_token(api, check):
    resp = api.request("POST", f"{V3}/refresh", json={"refresh_token": "not-a-refresh-token"})
    assert check(resp, "POST", f"{V3}/refresh", 401)["errcode"] == "M_UNKNOWN_TOKEN"


# --- account ---------------------------------------------------------------------------------


def test_account_password_401_uia(api, check, user):
    resp = api.request("POST", f"{V3}/account/password", user.access_token, json={"new_password": "new-pass-123"})
    body = check(resp, "POST", f"{V3}/account/password", 401)
    assert any("m.login.password" in f["stages"] for f in body["flows"])


def test_account_password_200(api, check, user):
    first = api.request("POST", f"{V3}/account/password", user.access_token, json={"new_password": "new-pass-123"})
    session = first.json().get("session")
    resp = api.request(
        "POST",
        f"{V3}/account/password",
        user.access_token,
        json={"new_password": "new-pass-123", "logout_devices": False, "auth": password_auth(user, session)},
    )
    check(resp, "POST", f"{V3}/account/password", 200)
    old = api.request(
        "POST",
        f"{V3}/login",
        json={"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.localpart}, "password": user.password},
    )
    assert old.status_code == 403, f"old password still works: {describe(old)}"
    user.password = "new-pass-123"
    login(api, user)


def test_account_deactivate_401_uia(api, check, user):
    resp = api.request("POST", f"{V3}/account/deactivate", user.access_token, json={})
    check(resp, "POST", f"{V3}/account/deactivate", 401)
    assert whoami_status(api, user.access_token) == 200, "deactivated without auth"


def test_account_deactivate_200(api, check, user):
    session = api.request("POST", f"{V3}/account/deactivate", user.access_token, json={}).json().get("session")
    resp = api.request("POST", f"{V3}/account/deactivate", user.access_token, json={"auth": password_auth(user, session)})
    body = check(resp, "POST", f"{V3}/account/deactivate", 200)
    assert body["id_server_unbind_result"] in ("success", "no-support")
    assert whoami_status(api, user.access_token) == 401
    relogin = api.request(
        "POST",
        f"{V3}/login",
        json={"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user.localpart}, "password": user.password},
    )
    assert relogin.status_code == 403, f"deactivated user can log in: {describe(relogin)}"


def test_account_3pid_get_200(api, check, user):
    body = check(api.request("GET", f"{V3}/account/3pid", user.access_token), "GET", f"{V3}/account/3pid", 200)
    assert body["threepids"] == []


# --- devices ---------------------------------------------------------------------------------


def test_devices_list_200(api, check, user):
    body = check(api.request("GET", f"{V3}/devices", user.access_token), "GET", f"{V3}/devices", 200)
    assert user.device_id in [d["device_id"] for d in body["devices"]]


def test_device_get_200(api, check, user):
    resp = api.request("GET", f"{V3}/devices/{q(user.device_id)}", user.access_token)
    assert check(resp, "GET", f"{V3}/devices/{{deviceId}}", 200)["device_id"] == user.device_id


def test_device_get_404(api, check, user):
    resp = api.request("GET", f"{V3}/devices/NOSUCHDEVICE", user.access_token)
    check(resp, "GET", f"{V3}/devices/{{deviceId}}", 404)


def test_device_put_200(api, check, user):
    resp = api.request("PUT", f"{V3}/devices/{q(user.device_id)}", user.access_token, json={"display_name": "renamed"})
    check(resp, "PUT", f"{V3}/devices/{{deviceId}}", 200)
    got = api.request("GET", f"{V3}/devices/{q(user.device_id)}", user.access_token).json()
    assert got.get("display_name") == "renamed"


def test_device_delete_401_uia(api, check, user):
    other = login(api, user)
    resp = api.request("DELETE", f"{V3}/devices/{q(other['device_id'])}", user.access_token, json={})
    check(resp, "DELETE", f"{V3}/devices/{{deviceId}}", 401)
    assert whoami_status(api, other["access_token"]) == 200


def test_device_delete_200(api, check, user):
    other = login(api, user)
    path = f"{V3}/devices/{q(other['device_id'])}"
    session = api.request("DELETE", path, user.access_token, json={}).json().get("session")
    resp = api.request("DELETE", path, user.access_token, json={"auth": password_auth(user, session)})
    check(resp, "DELETE", f"{V3}/devices/{{deviceId}}", 200)
    assert whoami_status(api, other["access_token"]) == 401
    listed = api.request("GET", f"{V3}/devices", user.access_token).json()["devices"]
    assert other["device_id"] not in [d["device_id"] for d in listed]


# --- profile ---------------------------------------------------------------------------------


def test_profile_get_200(api, check, user):
    api.request("PUT", f"{V3}/profile/{q(user.user_id)}/displayname", user.access_token, json={"displayname": "Prof"})
    body = check(api.request("GET", f"{V3}/profile/{q(user.user_id)}"), "GET", f"{V3}/profile/{{userId}}", 200)
    assert body.get("displayname") == "Prof"


def test_profile_get_404_unknown_user(api, check, server):
    resp = api.request("GET", f"{V3}/profile/{q('@nobody-' + unique('x') + ':' + server.launch['server_name'])}")
    check(resp, "GET", f"{V3}/profile/{{userId}}", 404)


def test_profile_displayname_put_200(api, check, user):
    path = f"{V3}/profile/{q(user.user_id)}/displayname"
    check(api.request("PUT", path, user.access_token, json={"displayname": "Alice Q"}), "PUT", f"{V3}/profile/{{userId}}/{{keyName}}", 200)
    assert api.request("GET", path).json() == {"displayname": "Alice Q"}


def test_profile_displayname_get_200(api, check, user):
    path = f"{V3}/profile/{q(user.user_id)}/displayname"
    api.request("PUT", path, user.access_token, json={"displayname": "Bob Q"})
    body = check(api.request("GET", path), "GET", f"{V3}/profile/{{userId}}/{{keyName}}", 200)
    assert body == {"displayname": "Bob Q"}


def test_profile_avatar_url_put_get_200(api, check, user, server):
    path = f"{V3}/profile/{q(user.user_id)}/avatar_url"
    mxc = f"mxc://{server.launch['server_name']}/abcdefAvatar"
    check(api.request("PUT", path, user.access_token, json={"avatar_url": mxc}), "PUT", f"{V3}/profile/{{userId}}/{{keyName}}", 200)
    body = check(api.request("GET", path), "GET", f"{V3}/profile/{{userId}}/{{keyName}}", 200)
    assert body == {"avatar_url": mxc}


def test_profile_custom_field_put_get_delete_200(api, check, user):
    path = f"{V3}/profile/{q(user.user_id)}/m.tz"
    template = f"{V3}/profile/{{userId}}/{{keyName}}"
    check(api.request("PUT", path, user.access_token, json={"m.tz": "Europe/London"}), "PUT", template, 200)
    assert check(api.request("GET", path), "GET", template, 200) == {"m.tz": "Europe/London"}
    assert check(api.request("DELETE", path, user.access_token), "DELETE", template, 200) == {}
    assert check(api.request("GET", f"{V3}/profile/{q(user.user_id)}"), "GET", f"{V3}/profile/{{userId}}", 200).get("m.tz") is None


def test_profile_put_400_too_large(api, check, user):
    base = f"{V3}/profile/{q(user.user_id)}"
    first = api.request("PUT", f"{base}/org.example.one", user.access_token, json={"org.example.one": "x" * (40 * 1024)})
    assert first.status_code == 200, describe(first)
    resp = api.request("PUT", f"{base}/org.example.two", user.access_token, json={"org.example.two": "x" * (40 * 1024)})
    assert check(resp, "PUT", f"{V3}/profile/{{userId}}/{{keyName}}", 400)["errcode"] == "M_PROFILE_TOO_LARGE"


# --- account data ----------------------------------------------------------------------------


def test_account_data_global_put_get_200(api, check, user):
    path = f"{V3}/user/{q(user.user_id)}/account_data/org.example.conformance"
    check(api.request("PUT", path, user.access_token, json={"n": 1}), "PUT", f"{V3}/user/{{userId}}/account_data/{{type}}", 200)
    body = check(api.request("GET", path, user.access_token), "GET", f"{V3}/user/{{userId}}/account_data/{{type}}", 200)
    assert body == {"n": 1}


def test_account_data_global_get_404(api, check, user):
    path = f"{V3}/user/{q(user.user_id)}/account_data/org.example.unset"
    assert check(api.request("GET", path, user.access_token), "GET", f"{V3}/user/{{userId}}/account_data/{{type}}", 404)["errcode"] == "M_NOT_FOUND"


def test_account_data_room_put_get_200(api, check, user):
    room_id = create_room(api, user)
    path = f"{V3}/user/{q(user.user_id)}/rooms/{q(room_id)}/account_data/org.example.room"
    template = f"{V3}/user/{{userId}}/rooms/{{roomId}}/account_data/{{type}}"
    check(api.request("PUT", path, user.access_token, json={"r": True}), "PUT", template, 200)
    assert check(api.request("GET", path, user.access_token), "GET", template, 200) == {"r": True}


# --- filters ---------------------------------------------------------------------------------

FILTER = {"room": {"timeline": {"limit": 7, "types": ["m.room.message"]}}, "presence": {"not_types": ["*"]}}


def test_filter_post_get_200(api, check, user):
    resp = api.request("POST", f"{V3}/user/{q(user.user_id)}/filter", user.access_token, json=FILTER)
    filter_id = check(resp, "POST", f"{V3}/user/{{userId}}/filter", 200)["filter_id"]
    got = api.request("GET", f"{V3}/user/{q(user.user_id)}/filter/{q(filter_id)}", user.access_token)
    body = check(got, "GET", f"{V3}/user/{{userId}}/filter/{{filterId}}", 200)
    assert body["room"]["timeline"]["limit"] == 7
    assert body["room"]["timeline"]["types"] == ["m.room.message"]


def test_filter_get_404(api, check, user):
    resp = api.request("GET", f"{V3}/user/{q(user.user_id)}/filter/999999", user.access_token)
    check(resp, "GET", f"{V3}/user/{{userId}}/filter/{{filterId}}", 404)


# --- rooms: creation and membership -----------------------------------------------------------


def test_create_room_200(api, check, user, spec):
    resp = api.request("POST", f"{V3}/createRoom", user.access_token, json={"name": "Conformance", "topic": "t"})
    room_id = check(resp, "POST", f"{V3}/createRoom", 200)["room_id"]
    state = {(e["type"], e["state_key"]): e for e in room_state(api, user, room_id)}
    assert state[("m.room.name", "")]["content"]["name"] == "Conformance"
    assert state[("m.room.member", user.user_id)]["content"]["membership"] == "join"
    for (etype, _), event in state.items():
        if spec.event_schema(etype) is not None:
            spec.validate_event_content(etype, event["content"])


def test_create_room_version_12_200(api, check, spec, new_user):
    owner, other = new_user(), new_user()
    resp = api.request(
        "POST", f"{V3}/createRoom", owner.access_token,
        json={"room_version": "12", "preset": "trusted_private_chat", "invite": [other.user_id], "name": "Twelve"},
    )
    room_id = check(resp, "POST", f"{V3}/createRoom", 200)["room_id"]
    assert ":" not in room_id, f"a room version 12 id has no server name: {room_id}"
    state = {(e["type"], e["state_key"]): e for e in room_state(api, owner, room_id)}
    create = state[("m.room.create", "")]
    assert create["event_id"] == "$" + room_id[1:], create
    assert create["content"]["additional_creators"] == [other.user_id], create
    assert owner.user_id not in state[("m.room.power_levels", "")]["content"].get("users", {})
    for (etype, _), event in state.items():
        if spec.event_schema(etype) is not None:
            spec.validate_event_content(etype, event["content"])


def test_create_room_400_unsupported_version(api, check, user):
    resp = api.request("POST", f"{V3}/createRoom", user.access_token, json={"room_version": "no-such-version"})
    assert check(resp, "POST", f"{V3}/createRoom", 400)["errcode"] == "M_UNSUPPORTED_ROOM_VERSION"


def test_join_by_id_200(api, check, new_user):
    owner, joiner = new_user(), new_user()
    room_id = create_room(api, owner, preset="public_chat")
    resp = api.request("POST", f"{V3}/join/{q(room_id)}", joiner.access_token, json={})
    assert check(resp, "POST", f"{V3}/join/{{roomIdOrAlias}}", 200)["room_id"] == room_id
    members = api.request("GET", f"{V3}/rooms/{q(room_id)}/joined_members", owner.access_token).json()["joined"]
    assert joiner.user_id in members


def test_join_room_id_endpoint_200(api, check, new_user):
    owner, joiner = new_user(), new_user()
    room_id = create_room(api, owner, preset="public_chat")
    resp = api.request("POST", f"{V3}/rooms/{q(room_id)}/join", joiner.access_token, json={})
    assert check(resp, "POST", f"{V3}/rooms/{{roomId}}/join", 200)["room_id"] == room_id


def test_join_by_alias_200(api, check, new_user, server):
    owner, joiner = new_user(), new_user()
    local = unique("alias")
    room_id = create_room(api, owner, preset="public_chat", room_alias_name=local)
    alias = f"#{local}:{server.launch['server_name']}"
    resp = api.request("POST", f"{V3}/join/{q(alias)}", joiner.access_token, json={})
    assert check(resp, "POST", f"{V3}/join/{{roomIdOrAlias}}", 200)["room_id"] == room_id


def test_join_403_invite_only(api, check, new_user):
    owner, outsider = new_user(), new_user()
    room_id = create_room(api, owner, preset="private_chat")
    resp = api.request("POST", f"{V3}/join/{q(room_id)}", outsider.access_token, json={})
    assert check(resp, "POST", f"{V3}/join/{{roomIdOrAlias}}", 403)["errcode"] == "M_FORBIDDEN"


# The spec files list user invites under ".../invite " (with a space) to keep
# them apart from third-party invites on the same path.
INVITE = f"{V3}/rooms/{{roomId}}/invite "


def test_knock_200(api, check, new_user):
    owner, knocker = new_user(), new_user()
    room_id = create_room(api, owner, preset="private_chat", initial_state=[{"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}])
    resp = api.request("POST", f"{V3}/knock/{q(room_id)}", knocker.access_token, json={"reason": "hello"})
    assert check(resp, "POST", f"{V3}/knock/{{roomIdOrAlias}}", 200)["room_id"] == room_id
    member = api.request("GET", f"{V3}/rooms/{q(room_id)}/state/m.room.member/{q(knocker.user_id)}", owner.access_token).json()
    assert member["membership"] == "knock"


def test_knock_403_not_knockable(api, check, new_user):
    room_id = create_room(api, new_user(), preset="private_chat")
    resp = api.request("POST", f"{V3}/knock/{q(room_id)}", new_user().access_token, json={})
    assert check(resp, "POST", f"{V3}/knock/{{roomIdOrAlias}}", 403)["errcode"] == "M_FORBIDDEN"


def test_knock_404_unknown_room(api, check, user, server):
    room_id = f"!{unique('nowhere')}:{server.launch['server_name']}"
    resp = api.request("POST", f"{V3}/knock/{q(room_id)}", user.access_token, json={})
    assert check(resp, "POST", f"{V3}/knock/{{roomIdOrAlias}}", 404)["errcode"] == "M_NOT_FOUND"


def test_initial_sync_200(api, check, new_user):
    owner, invitee = new_user(), new_user()
    room_id = create_room(api, owner, preset="private_chat", name="Legacy")
    send_text(api, owner, room_id, "hello")
    invite(api, owner, room_id, invitee)
    body = check(api.request("GET", f"{V3}/initialSync?limit=5", owner.access_token), "GET", f"{V3}/initialSync", 200)
    room = next(r for r in body["rooms"] if r["room_id"] == room_id)
    assert room["membership"] == "join"
    assert any(e["content"].get("body") == "hello" for e in room["messages"]["chunk"])
    body = check(api.request("GET", f"{V3}/initialSync", invitee.access_token), "GET", f"{V3}/initialSync", 200)
    assert next(r for r in body["rooms"] if r["room_id"] == room_id)["membership"] == "invite"


def test_room_initial_sync_200(api, check, new_user):
    owner = new_user()
    room_id = create_room(api, owner, preset="private_chat")
    send_text(api, owner, room_id, "hello")
    body = check(api.request("GET", f"{V3}/rooms/{q(room_id)}/initialSync", owner.access_token), "GET", f"{V3}/rooms/{{roomId}}/initialSync", 200)
    assert body["room_id"] == room_id and body["messages"]["chunk"][-1]["content"]["body"] == "hello"


def test_room_initial_sync_403(api, check, new_user):
    room_id = create_room(api, new_user(), preset="private_chat")
    resp = api.request("GET", f"{V3}/rooms/{q(room_id)}/initialSync", new_user().access_token)
    assert check(resp, "GET", f"{V3}/rooms/{{roomId}}/initialSync", 403)["errcode"] == "M_FORBIDDEN"


def test_events_200(api, check, new_user):
    owner = new_user()
    room_id = create_room(api, owner, preset="private_chat")
    end = api.request("GET", f"{V3}/initialSync?limit=1", owner.access_token).json()["end"]
    event_id = send_text(api, owner, room_id, "streamed")
    seen, frm = [], end
    for _ in range(20):
        body = check(api.request("GET", f"{V3}/events?from={q(frm)}&timeout=2000", owner.access_token), "GET", f"{V3}/events", 200)
        seen += [e["event_id"] for e in body["chunk"] if "event_id" in e]
        frm = body["end"]
        if event_id in seen:
            break
    assert event_id in seen


def test_event_by_id_200_and_404(api, check, new_user):
    owner = new_user()
    room_id = create_room(api, owner, preset="private_chat")
    event_id = send_text(api, owner, room_id, "one")
    body = check(api.request("GET", f"{V3}/events/{q(event_id)}", owner.access_token), "GET", f"{V3}/events/{{eventId}}", 200)
    assert body["event_id"] == event_id
    resp = api.request("GET", f"{V3}/events/{q(event_id)}", new_user().access_token)
    check(resp, "GET", f"{V3}/events/{{eventId}}", 404)


UPGRADE = f"{V3}/rooms/{{roomId}}/upgrade"


def test_upgrade_200(api, check, new_user):
    owner = new_user()
    room_id = create_room(api, owner, preset="private_chat", name="Before")
    resp = api.request("POST", f"{V3}/rooms/{q(room_id)}/upgrade", owner.access_token, json={"new_version": "10"})
    new_id = check(resp, "POST", UPGRADE, 200)["replacement_room"]
    state = {(e["type"], e["state_key"]): e for e in room_state(api, owner, new_id)}
    assert state[("m.room.create", "")]["content"]["predecessor"]["room_id"] == room_id
    assert state[("m.room.name", "")]["content"]["name"] == "Before"
    old = {(e["type"], e["state_key"]): e for e in room_state(api, owner, room_id)}
    assert old[("m.room.tombstone", "")]["content"]["replacement_room"] == new_id


def test_upgrade_400_unsupported_version(api, check, new_user):
    owner = new_user()
    room_id = create_room(api, owner, preset="private_chat")
    resp = api.request("POST", f"{V3}/rooms/{q(room_id)}/upgrade", owner.access_token, json={"new_version": "no-such-version"})
    assert check(resp, "POST", UPGRADE, 400)["errcode"] == "M_UNSUPPORTED_ROOM_VERSION"


def test_upgrade_403_not_permitted(api, check, new_user):
    owner, member = new_user(), new_user()
    room_id = create_room(api, owner, preset="public_chat")
    join(api, member, room_id)
    resp = api.request("POST", f"{V3}/rooms/{q(room_id)}/upgrade", member.access_token, json={"new_version": "10"})
    assert check(resp, "POST", UPGRADE, 403)["errcode"] == "M_FORBIDDEN"


def test_invite_200(api, check, new_user):
    owner, guest = new_user(), new_user()
    room_id = create_room(api, owner, preset="private_chat")
    resp = api.request("POST", f"{V3}/rooms/{q(room_id)}/invite", owner.access_token, json={"user_id": guest.user_id})
    check(resp, "POST", INVITE, 200)
    state = {(e["type"], e["state_key"]): e for e in room_state(api, owner, room_id)}
    assert state[("m.room.member", guest.user_id)]["content"]["membership"] == "invite"


def test_invite_403_not_in_room(api, check, new_user):
    owner, outsider, target = new_user(), new_user(), new_user()
    room_id = create_room(api, owner, preset="public_chat")
    resp = api.request("POST", f"{V3}/rooms/{q(room_id)}/invite", outsider.access_token, json={"user_id": target.user_id})
    assert check(resp, "POST", INVITE, 403)["errcode"] == "M_FORBIDDEN"


def test_leave_200(api, check, new_user):
    owner, member = new_user(), new_user()
    room_id = create_room(api, owner, preset="public_chat")
    join(api, member, room_id)
    check(api.request("POST", f"{V3}/rooms/{q(room_id)}/leave", member.access_token, json={}), "POST", f"{V3}/rooms/{{roomId}}/leave", 200)
    joined = api.request("GET", f"{V3}/joined_rooms", member.access_token).json()["joined_rooms"]
    assert room_id not in joined


def test_forget_200(api, check, new_user):
    owner, member = new_user(), new_user()
    room_id = create_room(api, owner, preset="public_chat")
    join(api, member, room_id)
    api.request("POST", f"{V3}/rooms/{q(room_id)}/leave", member.access_token, json={})
    resp = api.request("POST", f"{V3}/rooms/{q(room_id)}/forget", member.access_token, json={})
    check(resp, "POST", f"{V3}/rooms/{{roomId}}/forget", 200)


def test_kick_200(api, check, new_user):
    owner, member = new_user(), new_user()
    room_id = create_room(api, owner, preset="public_chat")
    join(api, member, room_id)
    resp = api.request("POST", f"{V3}/rooms/{q(room_id)}/kick", owner.access_token, json={"user_id": member.user_id, "reason": "test"})
    check(resp, "POST", f"{V3}/rooms/{{roomId}}/kick", 200)
    state = {(e["type"], e["state_key"]): e for e in room_state(api, owner, room_id)}
    assert state[("m.room.member", member.user_id)]["content"]["membership"] == "leave"


def test_ban_unban_200(api, check, new_user):
    owner, member = new_user(), new_user()
    room_id = create_room(api, owner, preset="public_chat")
    join(api, member, room_id)
    resp = api.request("POST", f"{V3}/rooms/{q(room_id)}/ban", owner.access_token, json={"user_id": member.user_id})
    check(resp, "POST", f"{V3}/rooms/{{roomId}}/ban", 200)
    rejoin = api.request("POST", f"{V3}/join/{q(room_id)}", member.access_token, json={})
    assert rejoin.status_code == 403, f"banned user could rejoin: {describe(rejoin)}"
    resp = api.request("POST", f"{V3}/rooms/{q(room_id)}/unban", owner.access_token, json={"user_id": member.user_id})
    check(resp, "POST", f"{V3}/rooms/{{roomId}}/unban", 200)
    join(api, member, room_id)


def test_joined_rooms_200(api, check, user):
    room_id = create_room(api, user)
    body = check(api.request("GET", f"{V3}/joined_rooms", user.access_token), "GET", f"{V3}/joined_rooms", 200)
    assert room_id in body["joined_rooms"]


def test_members_200(api, check, new_user, spec):
    owner, member = new_user(), new_user()
    room_id = create_room(api, owner, preset="public_chat")
    join(api, member, room_id)
    body = check(api.request("GET", f"{V3}/rooms/{q(room_id)}/members", owner.access_token), "GET", f"{V3}/rooms/{{roomId}}/members", 200)
    by_user = {e["state_key"]: e["content"]["membership"] for e in body["chunk"]}
    assert by_user == {owner.user_id: "join", member.user_id: "join"}
    for event in body["chunk"]:
        spec.validate_event_content("m.room.member", event["content"])


def test_members_403_not_member(api, check, new_user):
    owner, outsider = new_user(), new_user()
    room_id = create_room(api, owner, preset="private_chat")
    resp = api.request("GET", f"{V3}/rooms/{q(room_id)}/members", outsider.access_token)
    check(resp, "GET", f"{V3}/rooms/{{roomId}}/members", 403)


def test_joined_members_200(api, check, new_user):
    owner, member = new_user(), new_user()
    room_id = create_room(api, owner, preset="public_chat")
    join(api, member, room_id)
    body = check(api.request("GET", f"{V3}/rooms/{q(room_id)}/joined_members", owner.access_token), "GET", f"{V3}/rooms/{{roomId}}/joined_members", 200)
    assert set(body["joined"]) == {owner.user_id, member.user_id}


# --- room state and events -------------------------------------------------------------------


def test_state_all_200(api, check, user, spec):
    room_id = create_room(api, user, name="All state")
    body = check(api.request("GET", f"{V3}/rooms/{q(room_id)}/state", user.access_token), "GET", f"{V3}/rooms/{{roomId}}/state", 200)
    types = {e["type"] for e in body}
    assert {"m.room.create", "m.room.power_levels", "m.room.join_rules", "m.room.member", "m.room.name"} <= types
    for event in body:
        if spec.event_schema(event["type"]) is not None:
            spec.validate_event_content(event["type"], event["content"])


def test_state_one_200(api, check, user, spec):
    room_id = create_room(api, user, name="One state")
    resp = api.request("GET", f"{V3}/rooms/{q(room_id)}/state/m.room.name/", user.access_token)
    body = check(resp, "GET", f"{V3}/rooms/{{roomId}}/state/{{eventType}}/{{stateKey}}", 200)
    assert body == {"name": "One state"}
    spec.validate_event_content("m.room.name", body)


def test_state_one_404(api, check, user):
    room_id = create_room(api, user)
    resp = api.request("GET", f"{V3}/rooms/{q(room_id)}/state/org.example.unset/", user.access_token)
    assert check(resp, "GET", f"{V3}/rooms/{{roomId}}/state/{{eventType}}/{{stateKey}}", 404)["errcode"] == "M_NOT_FOUND"


def test_state_put_200(api, check, user):
    room_id = create_room(api, user)
    resp = api.request("PUT", f"{V3}/rooms/{q(room_id)}/state/m.room.topic/", user.access_token, json={"topic": "new topic"})
    event_id = check(resp, "PUT", f"{V3}/rooms/{{roomId}}/state/{{eventType}}/{{stateKey}}", 200)["event_id"]
    state = {(e["type"], e["state_key"]): e for e in room_state(api, user, room_id)}
    assert state[("m.room.topic", "")]["event_id"] == event_id
    assert state[("m.room.topic", "")]["content"]["topic"] == "new topic"


def test_send_200(api, check, user):
    room_id = create_room(api, user)
    resp = api.request(
        "PUT",
        f"{V3}/rooms/{q(room_id)}/send/m.room.message/{unique('txn')}",
        user.access_token,
        json={"msgtype": "m.text", "body": "hello"},
    )
    event_id = check(resp, "PUT", f"{V3}/rooms/{{roomId}}/send/{{eventType}}/{{txnId}}", 200)["event_id"]
    event = api.request("GET", f"{V3}/rooms/{q(room_id)}/event/{q(event_id)}", user.access_token).json()
    assert event["content"] == {"msgtype": "m.text", "body": "hello"}


def test_send_idempotent_txn_200(api, check, user):
    room_id = create_room(api, user)
    path = f"{V3}/rooms/{q(room_id)}/send/m.room.message/{unique('txn')}"
    first = check(api.request("PUT", path, user.access_token, json={"msgtype": "m.text", "body": "once"}), "PUT", f"{V3}/rooms/{{roomId}}/send/{{eventType}}/{{txnId}}", 200)
    again = check(api.request("PUT", path, user.access_token, json={"msgtype": "m.text", "body": "once"}), "PUT", f"{V3}/rooms/{{roomId}}/send/{{eventType}}/{{txnId}}", 200)
    assert first["event_id"] == again["event_id"], "retrying a transaction ID created a second event"


def test_send_400_duplicate_annotation(api, check, server, user):
    room_id = create_room(api, user)
    event_id = send_text(api, user, room_id, "react to me")
    reaction = {"m.relates_to": {"rel_type": "m.annotation", "event_id": event_id, "key": "+1"}}
    template = f"{V3}/rooms/{{roomId}}/send/{{eventType}}/{{txnId}}"
    check(api.request("PUT", f"{V3}/rooms/{q(room_id)}/send/m.reaction/{unique('txn')}", user.access_token, json=reaction), "PUT", template, 200)
    again = check(api.request("PUT", f"{V3}/rooms/{q(room_id)}/send/m.reaction/{unique('txn')}", user.access_token, json=reaction), "PUT", template, 400)
    # Synapse still answers with its older M_UNKNOWN code.
    assert again["errcode"] == ("M_DUPLICATE_ANNOTATION" if server.kind == "tessera" else "M_UNKNOWN")


def test_redact_200(api, check, user):
    room_id = create_room(api, user)
    event_id = send_text(api, user, room_id, "to be redacted")
    resp = api.request("PUT", f"{V3}/rooms/{q(room_id)}/redact/{q(event_id)}/{unique('txn')}", user.access_token, json={"reason": "test"})
    check(resp, "PUT", f"{V3}/rooms/{{roomId}}/redact/{{eventId}}/{{txnId}}", 200)
    event = api.request("GET", f"{V3}/rooms/{q(room_id)}/event/{q(event_id)}", user.access_token).json()
    assert event["content"] == {}, f"redacted event still has content: {event}"


def _room_with_messages(api, user, n):
    room_id = create_room(api, user)
    ids = [send_text(api, user, room_id, f"m{i}") for i in range(n)]
    return room_id, ids


def test_messages_backward_200(api, check, user):
    room_id, ids = _room_with_messages(api, user, 5)
    resp = api.request("GET", f"{V3}/rooms/{q(room_id)}/messages", user.access_token, params={"dir": "b", "limit": 3})
    body = check(resp, "GET", f"{V3}/rooms/{{roomId}}/messages", 200)
    assert [e["event_id"] for e in body["chunk"]] == ids[::-1][:3]
    resp = api.request("GET", f"{V3}/rooms/{q(room_id)}/messages", user.access_token, params={"dir": "b", "limit": 2, "from": body["end"]})
    body = check(resp, "GET", f"{V3}/rooms/{{roomId}}/messages", 200)
    assert [e["event_id"] for e in body["chunk"]] == ids[::-1][3:5]


def test_messages_forward_200(api, check, user):
    room_id, ids = _room_with_messages(api, user, 4)
    back = api.request("GET", f"{V3}/rooms/{q(room_id)}/messages", user.access_token, params={"dir": "b", "limit": 4}).json()
    resp = api.request("GET", f"{V3}/rooms/{q(room_id)}/messages", user.access_token, params={"dir": "f", "limit": 10, "from": back["end"]})
    body = check(resp, "GET", f"{V3}/rooms/{{roomId}}/messages", 200)
    forward = [e["event_id"] for e in body["chunk"]]
    assert forward == ids, f"forward pagination from the older token did not return exactly the messages in order: {forward}"


def test_context_200(api, check, user):
    room_id, ids = _room_with_messages(api, user, 5)
    resp = api.request("GET", f"{V3}/rooms/{q(room_id)}/context/{q(ids[2])}", user.access_token, params={"limit": 2})
    body = check(resp, "GET", f"{V3}/rooms/{{roomId}}/context/{{eventId}}", 200)
    assert body["event"]["event_id"] == ids[2]
    assert [e["event_id"] for e in body["events_before"]][:1] == [ids[1]]
    assert [e["event_id"] for e in body["events_after"]][:1] == [ids[3]]


V1 = "/_matrix/client/v1"


def test_relations_200(api, check, user):
    room_id = create_room(api, user)
    root = send_text(api, user, room_id, "root")
    children = []
    for i in range(3):
        content = {"msgtype": "m.text", "body": f"in thread {i}", "m.relates_to": {"rel_type": "m.thread", "event_id": root}}
        resp = api.request("PUT", f"{V3}/rooms/{q(room_id)}/send/m.room.message/{unique('txn')}", user.access_token, json=content)
        assert resp.status_code == 200, resp.text
        children.append(resp.json()["event_id"])
    path = f"{V1}/rooms/{q(room_id)}/relations/{q(root)}"
    body = check(api.request("GET", path, user.access_token, params={"limit": 2}), "GET", f"{V1}/rooms/{{roomId}}/relations/{{eventId}}", 200)
    assert [e["event_id"] for e in body["chunk"]] == children[::-1][:2]
    resp = api.request("GET", f"{path}/m.thread", user.access_token, params={"limit": 2, "from": body["next_batch"]})
    body = check(resp, "GET", f"{V1}/rooms/{{roomId}}/relations/{{eventId}}/{{relType}}", 200)
    assert [e["event_id"] for e in body["chunk"]] == children[:1] and "next_batch" not in body
    resp = api.request("GET", f"{path}/m.thread/m.room.message", user.access_token, params={"recurse": "true"})
    body = check(resp, "GET", f"{V1}/rooms/{{roomId}}/relations/{{eventId}}/{{relType}}/{{eventType}}", 200)
    assert [e["event_id"] for e in body["chunk"]] == children[::-1] and body["recursion_depth"] >= 3


def test_relations_404(api, check, user):
    room_id = create_room(api, user)
    resp = api.request("GET", f"{V1}/rooms/{q(room_id)}/relations/{q('$doesnotexist')}", user.access_token)
    assert check(resp, "GET", f"{V1}/rooms/{{roomId}}/relations/{{eventId}}", 404)["errcode"] == "M_NOT_FOUND"


def test_threads_200(api, check, user):
    room_id = create_room(api, user)
    roots = [send_text(api, user, room_id, f"root {i}") for i in range(2)]
    for root in roots[::-1]:
        content = {"msgtype": "m.text", "body": "reply", "m.relates_to": {"rel_type": "m.thread", "event_id": root}}
        resp = api.request("PUT", f"{V3}/rooms/{q(room_id)}/send/m.room.message/{unique('txn')}", user.access_token, json=content)
        assert resp.status_code == 200, resp.text
    resp = api.request("GET", f"{V1}/rooms/{q(room_id)}/threads", user.access_token, params={"limit": 1, "include": "participated"})
    body = check(resp, "GET", f"{V1}/rooms/{{roomId}}/threads", 200)
    assert [e["event_id"] for e in body["chunk"]] == [roots[0]]
    assert body["chunk"][0]["unsigned"]["m.relations"]["m.thread"]["count"] == 1
    resp = api.request("GET", f"{V1}/rooms/{q(room_id)}/threads", user.access_token, params={"limit": 1, "from": body["next_batch"]})
    body = check(resp, "GET", f"{V1}/rooms/{{roomId}}/threads", 200)
    assert [e["event_id"] for e in body["chunk"]] == [roots[1]] and "next_batch" not in body


def test_threads_403(api, check, user, new_user):
    room_id = create_room(api, user, preset="private_chat")
    resp = api.request("GET", f"{V1}/rooms/{q(room_id)}/threads", new_user().access_token)
    assert check(resp, "GET", f"{V1}/rooms/{{roomId}}/threads", 403)["errcode"] == "M_FORBIDDEN"


def test_timestamp_to_event_200(api, check, user):
    room_id, ids = _room_with_messages(api, user, 3)
    sent = api.request("GET", f"{V3}/rooms/{q(room_id)}/event/{q(ids[1])}", user.access_token).json()["origin_server_ts"]
    resp = api.request("GET", f"{V1}/rooms/{q(room_id)}/timestamp_to_event", user.access_token, params={"ts": sent, "dir": "b"})
    body = check(resp, "GET", f"{V1}/rooms/{{roomId}}/timestamp_to_event", 200)
    assert body["origin_server_ts"] <= sent and body["event_id"] in ids[1:]


def test_timestamp_to_event_404(api, check, user):
    room_id = create_room(api, user)
    resp = api.request("GET", f"{V1}/rooms/{q(room_id)}/timestamp_to_event", user.access_token, params={"ts": 1, "dir": "b"})
    assert check(resp, "GET", f"{V1}/rooms/{{roomId}}/timestamp_to_event", 404)["errcode"] == "M_NOT_FOUND"


def test_mutual_rooms_200(api, check, user, new_user):
    other = new_user()
    room_id = create_room(api, user, preset="public_chat")
    join(api, other, room_id)
    create_room(api, user)
    resp = api.request("GET", f"{V1}/mutual_rooms", user.access_token, params={"user_id": other.user_id})
    body = check(resp, "GET", f"{V1}/mutual_rooms", 200)
    assert (body["joined"], body["count"]) == ([room_id], 1) and "next_batch" not in body


def test_mutual_rooms_400_own_id(api, check, user):
    resp = api.request("GET", f"{V1}/mutual_rooms", user.access_token, params={"user_id": user.user_id})
    assert check(resp, "GET", f"{V1}/mutual_rooms", 400)["errcode"] == "M_INVALID_PARAM"


def test_space_hierarchy_200(api, check, user, new_user):
    space = create_room(api, user, preset="public_chat", name="Space", creation_content={"type": "m.space"})
    child = create_room(api, user, preset="public_chat", name="Child")
    resp = api.request("PUT", f"{V3}/rooms/{q(space)}/state/m.space.child/{q(child)}", user.access_token, json={"via": [user.user_id.split(":", 1)[1]]})
    assert resp.status_code == 200, resp.text
    other = new_user()
    resp = api.request("GET", f"{V1}/rooms/{q(space)}/hierarchy", other.access_token, params={"limit": 1})
    body = check(resp, "GET", f"{V1}/rooms/{{roomId}}/hierarchy", 200)
    assert [r["room_id"] for r in body["rooms"]] == [space]
    assert [c["state_key"] for c in body["rooms"][0]["children_state"]] == [child]
    resp = api.request("GET", f"{V1}/rooms/{q(space)}/hierarchy", other.access_token, params={"limit": 1, "from": body["next_batch"]})
    body = check(resp, "GET", f"{V1}/rooms/{{roomId}}/hierarchy", 200)
    assert [r["room_id"] for r in body["rooms"]] == [child] and "next_batch" not in body


def test_space_hierarchy_403(api, check, user, new_user):
    room_id = create_room(api, user, preset="private_chat")
    resp = api.request("GET", f"{V1}/rooms/{q(room_id)}/hierarchy", new_user().access_token)
    assert check(resp, "GET", f"{V1}/rooms/{{roomId}}/hierarchy", 403)["errcode"] == "M_FORBIDDEN"


def test_room_summary_200(api, check, user):
    room_id = create_room(api, user, preset="public_chat", name="Summarised", topic="what it is about")
    body = check(api.request("GET", f"{V1}/room_summary/{q(room_id)}", user.access_token), "GET", f"{V1}/room_summary/{{roomIdOrAlias}}", 200)
    assert (body["room_id"], body["name"], body["topic"], body["membership"], body["num_joined_members"]) == (room_id, "Summarised", "what it is about", "join", 1)


def test_room_summary_404(api, check, user, new_user):
    room_id = create_room(api, user, preset="private_chat")
    resp = api.request("GET", f"{V1}/room_summary/{q(room_id)}", new_user().access_token)
    assert check(resp, "GET", f"{V1}/room_summary/{{roomIdOrAlias}}", 404)["errcode"] == "M_NOT_FOUND"


def test_report_event_room_user_200(api, check, user, new_user):
    room_id = create_room(api, user, preset="public_chat")
    event_id = send_text(api, user, room_id, "report me")
    reporter = new_user()
    join(api, reporter, room_id)
    resp = api.request("POST", f"{V3}/rooms/{q(room_id)}/report/{q(event_id)}", reporter.access_token, json={"reason": "spam"})
    assert check(resp, "POST", f"{V3}/rooms/{{roomId}}/report/{{eventId}}", 200) == {}
    resp = api.request("POST", f"{V3}/rooms/{q(room_id)}/report", reporter.access_token, json={"reason": "spam room"})
    assert check(resp, "POST", f"{V3}/rooms/{{roomId}}/report", 200) == {}
    resp = api.request("POST", f"{V3}/users/{q(user.user_id)}/report", reporter.access_token, json={"reason": "spammer"})
    assert check(resp, "POST", f"{V3}/users/{{userId}}/report", 200) == {}


def test_report_event_room_user_404(api, check, user, server):
    room_id = create_room(api, user)
    resp = api.request("POST", f"{V3}/rooms/{q(room_id)}/report/{q('$doesnotexist')}", user.access_token, json={"reason": "x"})
    assert check(resp, "POST", f"{V3}/rooms/{{roomId}}/report/{{eventId}}", 404)["errcode"] == "M_NOT_FOUND"
    missing_room = f"!{unique('missing')}:{server.launch['server_name']}"
    resp = api.request("POST", f"{V3}/rooms/{q(missing_room)}/report", user.access_token, json={"reason": "x"})
    assert check(resp, "POST", f"{V3}/rooms/{{roomId}}/report", 404)["errcode"] == "M_NOT_FOUND"
    missing_user = f"@{unique('nobody')}:{server.launch['server_name']}"
    resp = api.request("POST", f"{V3}/users/{q(missing_user)}/report", user.access_token, json={"reason": "x"})
    assert check(resp, "POST", f"{V3}/users/{{userId}}/report", 404)["errcode"] == "M_NOT_FOUND"


def test_event_by_id_200(api, check, user):
    room_id = create_room(api, user)
    event_id = send_text(api, user, room_id, "fetch me")
    body = check(api.request("GET", f"{V3}/rooms/{q(room_id)}/event/{q(event_id)}", user.access_token), "GET", f"{V3}/rooms/{{roomId}}/event/{{eventId}}", 200)
    assert body["event_id"] == event_id and body["room_id"] == room_id and body["sender"] == user.user_id


def test_event_by_id_404(api, check, user):
    room_id = create_room(api, user)
    resp = api.request("GET", f"{V3}/rooms/{q(room_id)}/event/{q('$doesnotexist')}", user.access_token)
    assert check(resp, "GET", f"{V3}/rooms/{{roomId}}/event/{{eventId}}", 404)["errcode"] == "M_NOT_FOUND"


# --- directory -------------------------------------------------------------------------------


def test_directory_alias_put_get_delete_200(api, check, user, server):
    room_id = create_room(api, user)
    alias = f"#{unique('dir')}:{server.launch['server_name']}"
    path = f"{V3}/directory/room/{q(alias)}"
    template = f"{V3}/directory/room/{{roomAlias}}"
    check(api.request("PUT", path, user.access_token, json={"room_id": room_id}), "PUT", template, 200)
    body = check(api.request("GET", path, user.access_token), "GET", template, 200)
    assert body["room_id"] == room_id
    check(api.request("DELETE", path, user.access_token), "DELETE", template, 200)
    assert api.request("GET", path, user.access_token).status_code == 404


def test_directory_alias_put_409(api, check, user, server):
    room_id = create_room(api, user)
    alias = f"#{unique('dup')}:{server.launch['server_name']}"
    path = f"{V3}/directory/room/{q(alias)}"
    api.request("PUT", path, user.access_token, json={"room_id": room_id})
    resp = api.request("PUT", path, user.access_token, json={"room_id": room_id})
    check(resp, "PUT", f"{V3}/directory/room/{{roomAlias}}", 409)


def test_directory_alias_get_404(api, check, user, server):
    alias = f"#{unique('none')}:{server.launch['server_name']}"
    resp = api.request("GET", f"{V3}/directory/room/{q(alias)}", user.access_token)
    assert check(resp, "GET", f"{V3}/directory/room/{{roomAlias}}", 404)["errcode"] == "M_NOT_FOUND"


def test_room_aliases_200(api, check, user, server):
    local = unique("canon")
    room_id = create_room(api, user, room_alias_name=local)
    resp = api.request("GET", f"{V3}/rooms/{q(room_id)}/aliases", user.access_token)
    body = check(resp, "GET", f"{V3}/rooms/{{roomId}}/aliases", 200)
    assert f"#{local}:{server.launch['server_name']}" in body["aliases"]


def test_directory_list_room_get_put_200(api, check, user):
    room_id = create_room(api, user)
    path = f"{V3}/directory/list/room/{q(room_id)}"
    template = f"{V3}/directory/list/room/{{roomId}}"
    assert check(api.request("GET", path), "GET", template, 200)["visibility"] == "private"
    check(api.request("PUT", path, user.access_token, json={"visibility": "public"}), "PUT", template, 200)
    assert check(api.request("GET", path), "GET", template, 200)["visibility"] == "public"


def test_directory_list_room_get_404(api, check, server):
    resp = api.request("GET", f"{V3}/directory/list/room/{q('!nosuchroom:' + server.launch['server_name'])}")
    check(resp, "GET", f"{V3}/directory/list/room/{{roomId}}", 404)


def _public_room(api, user, name):
    return create_room(api, user, preset="public_chat", visibility="public", name=name)


def test_public_rooms_get_200(api, check, user):
    name = unique("Pub")
    room_id = _public_room(api, user, name)

    def listed():
        resp = api.request("GET", f"{V3}/publicRooms", user.access_token, params={"limit": 500})
        body = check(resp, "GET", f"{V3}/publicRooms", 200)
        return next((r for r in body["chunk"] if r["room_id"] == room_id), None)

    room = wait_until(listed, "the public room to be listed")
    assert room["name"] == name and room["num_joined_members"] == 1


def test_public_rooms_post_filter_200(api, check, user):
    name = unique("Findme")
    room_id = _public_room(api, user, name)
    _public_room(api, user, unique("Other"))

    def found():
        resp = api.request("POST", f"{V3}/publicRooms", user.access_token, json={"limit": 50, "filter": {"generic_search_term": name}})
        body = check(resp, "POST", f"{V3}/publicRooms", 200)
        return body if body["chunk"] else None

    body = wait_until(found, "the filtered public room list to find the room")
    assert [r["room_id"] for r in body["chunk"]] == [room_id]


# --- sync ------------------------------------------------------------------------------------


def test_sync_initial_200(api, check, user):
    room_id = create_room(api, user)
    event_id = send_text(api, user, room_id, "in initial sync")
    body = check(api.request("GET", f"{V3}/sync", user.access_token, params={"timeout": 0}), "GET", f"{V3}/sync", 200)
    timeline = [e["event_id"] for e in body["rooms"]["join"][room_id]["timeline"]["events"]]
    assert event_id in timeline


def test_sync_incremental_200(api, check, user):
    room_id = create_room(api, user)
    first = api.request("GET", f"{V3}/sync", user.access_token, params={"timeout": 0}).json()
    event_id = send_text(api, user, room_id, "after the token")
    resp = api.request("GET", f"{V3}/sync", user.access_token, params={"since": first["next_batch"], "timeout": 10000})
    body = check(resp, "GET", f"{V3}/sync", 200)
    timeline = [e["event_id"] for e in body["rooms"]["join"][room_id]["timeline"]["events"]]
    assert timeline == [event_id], f"incremental sync should hold exactly the new event: {timeline}"


def test_sync_use_state_after_200(api, check, server, user):
    room_id = create_room(api, user, name="After")
    send_text(api, user, room_id, "in initial sync")
    body = check(api.request("GET", f"{V3}/sync", user.access_token, params={"timeout": 0, "use_state_after": "true"}), "GET", f"{V3}/sync", 200)
    room = body["rooms"]["join"][room_id]
    if server.kind == "tessera":
        assert "state" not in room and any(e["type"] == "m.room.name" for e in room["state_after"]["events"]), room


def test_sync_with_filter_200(api, check, user):
    room_id = create_room(api, user)
    for i in range(3):
        send_text(api, user, room_id, f"f{i}")
    api.request("PUT", f"{V3}/rooms/{q(room_id)}/state/m.room.topic/", user.access_token, json={"topic": "x"})
    filter_id = api.request("POST", f"{V3}/user/{q(user.user_id)}/filter", user.access_token, json=FILTER).json()["filter_id"]
    for flt in (filter_id, '{"room":{"timeline":{"limit":2,"types":["m.room.message"]}}}'):
        resp = api.request("GET", f"{V3}/sync", user.access_token, params={"timeout": 0, "filter": flt})
        body = check(resp, "GET", f"{V3}/sync", 200)
        events = body["rooms"]["join"][room_id]["timeline"]["events"]
        assert {e["type"] for e in events} == {"m.room.message"}, f"filter {flt} not applied: {[e['type'] for e in events]}"
    # 3 messages match the inline filter's types; its limit of 2 applies to them,
    # not to the timeline before the types are filtered out.
    assert [e["content"]["body"] for e in events] == ["f1", "f2"], f"limit 2 of 3 matching messages: {events}"
    assert body["rooms"]["join"][room_id]["timeline"]["limited"] is True


def test_sync_unread_thread_notifications_200(api, check, new_user):
    owner, reader = new_user(), new_user()
    room_id = create_room(api, owner, preset="public_chat")
    join(api, reader, room_id)
    root = send_text(api, owner, room_id, "root")
    reply = {"msgtype": "m.text", "body": "in thread", "m.relates_to": {"rel_type": "m.thread", "event_id": root}}
    resp = api.request("PUT", f"{V3}/rooms/{q(room_id)}/send/m.room.message/{unique('txn')}", owner.access_token, json=reply)
    assert resp.status_code == 200, resp.text
    flt = '{"room":{"timeline":{"unread_thread_notifications":true}}}'

    def counted():
        resp = api.request("GET", f"{V3}/sync", reader.access_token, params={"timeout": 0, "filter": flt})
        body = check(resp, "GET", f"{V3}/sync", 200)
        room = body["rooms"]["join"].get(room_id, {})
        return room if room.get("unread_thread_notifications") else None

    room = wait_until(counted, "per-thread unread counts")
    assert room["unread_notifications"]["notification_count"] == 1, room
    assert room["unread_thread_notifications"][root]["notification_count"] == 1, room


# --- ephemeral: typing, receipts, read markers, presence --------------------------------------


def _sync_until(api, user, since, pred, what):
    token = {"since": since}

    def step():
        params = {"timeout": 1000, **({"since": token["since"]} if token["since"] else {})}
        body = api.request("GET", f"{V3}/sync", user.access_token, params=params).json()
        token["since"] = body["next_batch"]
        return pred(body)

    return wait_until(step, what)


def test_typing_200(api, check, new_user):
    owner, watcher = new_user(), new_user()
    room_id = create_room(api, owner, preset="public_chat")
    join(api, watcher, room_id)
    since = api.request("GET", f"{V3}/sync", watcher.access_token, params={"timeout": 0}).json()["next_batch"]
    resp = api.request("PUT", f"{V3}/rooms/{q(room_id)}/typing/{q(owner.user_id)}", owner.access_token, json={"typing": True, "timeout": 20000})
    check(resp, "PUT", f"{V3}/rooms/{{roomId}}/typing/{{userId}}", 200)

    def typing(body):
        room = body.get("rooms", {}).get("join", {}).get(room_id, {})
        return any(e["type"] == "m.typing" and owner.user_id in e["content"]["user_ids"] for e in room.get("ephemeral", {}).get("events", []))

    _sync_until(api, watcher, since, typing, "the watcher to see the typing notification")


def test_receipt_200(api, check, new_user):
    owner, reader = new_user(), new_user()
    room_id = create_room(api, owner, preset="public_chat")
    join(api, reader, room_id)
    event_id = send_text(api, owner, room_id, "read me")
    since = api.request("GET", f"{V3}/sync", owner.access_token, params={"timeout": 0}).json()["next_batch"]
    resp = api.request("POST", f"{V3}/rooms/{q(room_id)}/receipt/m.read/{q(event_id)}", reader.access_token, json={})
    check(resp, "POST", f"{V3}/rooms/{{roomId}}/receipt/{{receiptType}}/{{eventId}}", 200)

    def receipt(body):
        room = body.get("rooms", {}).get("join", {}).get(room_id, {})
        return any(
            e["type"] == "m.receipt" and reader.user_id in e["content"].get(event_id, {}).get("m.read", {})
            for e in room.get("ephemeral", {}).get("events", [])
        )

    _sync_until(api, owner, since, receipt, "the sender to see the read receipt")


def test_receipt_400_bad_type(api, check, user):
    room_id = create_room(api, user)
    event_id = send_text(api, user, room_id, "x")
    resp = api.request("POST", f"{V3}/rooms/{q(room_id)}/receipt/m.not_a_receipt/{q(event_id)}", user.access_token, json={})
    check(resp, "POST", f"{V3}/rooms/{{roomId}}/receipt/{{receiptType}}/{{eventId}}", 400)


def test_read_markers_200(api, check, user):
    room_id = create_room(api, user)
    event_id = send_text(api, user, room_id, "marker")
    resp = api.request("POST", f"{V3}/rooms/{q(room_id)}/read_markers", user.access_token, json={"m.fully_read": event_id, "m.read": event_id})
    check(resp, "POST", f"{V3}/rooms/{{roomId}}/read_markers", 200)
    marker = api.request("GET", f"{V3}/user/{q(user.user_id)}/rooms/{q(room_id)}/account_data/m.fully_read", user.access_token)
    assert marker.status_code == 200 and marker.json().get("event_id") == event_id, describe(marker)


def test_presence_put_get_200(api, check, user):
    path = f"{V3}/presence/{q(user.user_id)}/status"
    check(api.request("PUT", path, user.access_token, json={"presence": "online", "status_msg": "testing"}), "PUT", f"{V3}/presence/{{userId}}/status", 200)
    body = check(api.request("GET", path, user.access_token), "GET", f"{V3}/presence/{{userId}}/status", 200)
    assert body["presence"] == "online" and body.get("status_msg") == "testing"


def test_sync_presence_of_room_members_200(api, check, new_user, spec):
    owner, other = new_user(), new_user()
    room_id = create_room(api, owner, preset="public_chat")
    join(api, other, room_id)
    since = api.request("GET", f"{V3}/sync", other.access_token, params={"timeout": 0}).json()["next_batch"]
    path = f"{V3}/presence/{q(owner.user_id)}/status"
    check(api.request("PUT", path, owner.access_token, json={"presence": "unavailable", "status_msg": "away"}), "PUT", f"{V3}/presence/{{userId}}/status", 200)

    def presence_event():
        resp = api.request("GET", f"{V3}/sync", other.access_token, params={"since": since, "timeout": 2000})
        body = check(resp, "GET", f"{V3}/sync", 200)
        found = [e for e in body["presence"]["events"] if e["sender"] == owner.user_id]
        return found[0] if found else None

    event = wait_until(presence_event, "the room member's presence in /sync")
    assert event["type"] == "m.presence"
    assert event["content"]["presence"] == "unavailable" and event["content"].get("status_msg") == "away"
    spec.validate_event_content("m.presence", event["content"])


def test_user_directory_search_200(api, check, new_user):
    owner, other = new_user(), new_user()
    room_id = create_room(api, owner, preset="public_chat")
    join(api, other, room_id)
    name = unique("Dirname")
    api.request("PUT", f"{V3}/profile/{q(other.user_id)}/displayname", other.access_token, json={"displayname": name})

    def found():
        resp = api.request("POST", f"{V3}/user_directory/search", owner.access_token, json={"search_term": name, "limit": 10})
        body = check(resp, "POST", f"{V3}/user_directory/search", 200)
        return body if body["results"] else None

    body = wait_until(found, "the user directory to find the user by display name")
    assert [r["user_id"] for r in body["results"]] == [other.user_id]


# --- push rules and pushers ------------------------------------------------------------------

PR = f"{V3}/pushrules"


def test_pushrules_get_all_200(api, check, user):
    body = check(api.request("GET", f"{PR}/", user.access_token), "GET", f"{PR}/", 200)
    assert ".m.rule.master" in [r["rule_id"] for r in body["global"]["override"]]


def test_pushrules_get_global_200(api, check, user):
    body = check(api.request("GET", f"{PR}/global/", user.access_token), "GET", f"{PR}/global/", 200)
    assert ".m.rule.master" in [r["rule_id"] for r in body["override"]]


def test_pushrule_get_one_200(api, check, user):
    resp = api.request("GET", f"{PR}/global/override/.m.rule.master", user.access_token)
    body = check(resp, "GET", f"{PR}/global/{{kind}}/{{ruleId}}", 200)
    assert body["rule_id"] == ".m.rule.master" and body["default"] is True


def test_pushrule_get_one_404(api, check, user):
    resp = api.request("GET", f"{PR}/global/override/org.example.missing", user.access_token)
    assert check(resp, "GET", f"{PR}/global/{{kind}}/{{ruleId}}", 404)["errcode"] == "M_NOT_FOUND"


def test_pushrule_put_delete_200(api, check, user):
    path = f"{PR}/global/room/{q('!someroom:localhost')}"
    rule = {"actions": ["notify"]}
    check(api.request("PUT", path, user.access_token, json=rule), "PUT", f"{PR}/global/{{kind}}/{{ruleId}}", 200)
    got = api.request("GET", path, user.access_token)
    assert got.status_code == 200 and got.json()["actions"] == ["notify"], describe(got)
    check(api.request("DELETE", path, user.access_token), "DELETE", f"{PR}/global/{{kind}}/{{ruleId}}", 200)
    assert api.request("GET", path, user.access_token).status_code == 404


def test_pushrule_enabled_get_put_200(api, check, user):
    path = f"{PR}/global/override/.m.rule.suppress_notices/enabled"
    template = f"{PR}/global/{{kind}}/{{ruleId}}/enabled"
    check(api.request("PUT", path, user.access_token, json={"enabled": False}), "PUT", template, 200)
    assert check(api.request("GET", path, user.access_token), "GET", template, 200) == {"enabled": False}


def test_pushrule_actions_get_put_200(api, check, user):
    path = f"{PR}/global/override/.m.rule.suppress_notices/actions"
    template = f"{PR}/global/{{kind}}/{{ruleId}}/actions"
    check(api.request("PUT", path, user.access_token, json={"actions": ["notify"]}), "PUT", template, 200)
    assert check(api.request("GET", path, user.access_token), "GET", template, 200)["actions"] == ["notify"]


def test_pushers_get_set_200(api, check, user):
    pusher = {
        "pushkey": unique("key"),
        "kind": "http",
        "app_id": "org.example.conformance",
        "app_display_name": "Conformance",
        "device_display_name": "Test device",
        "lang": "en",
        "data": {"url": "http://127.0.0.1:9/_matrix/push/v1/notify"},
    }
    check(api.request("POST", f"{V3}/pushers/set", user.access_token, json=pusher), "POST", f"{V3}/pushers/set", 200)
    body = check(api.request("GET", f"{V3}/pushers", user.access_token), "GET", f"{V3}/pushers", 200)
    assert [p["pushkey"] for p in body["pushers"]] == [pusher["pushkey"]]


# --- third party, VoIP -----------------------------------------------------------------------


def test_thirdparty_protocols_200(api, check, user):
    body = check(api.request("GET", f"{V3}/thirdparty/protocols", user.access_token), "GET", f"{V3}/thirdparty/protocols", 200)
    assert isinstance(body, dict)


def test_thirdparty_protocol_404_unknown(api, check, user):
    resp = api.request("GET", f"{V3}/thirdparty/protocol/{unique('proto')}", user.access_token)
    assert check(resp, "GET", f"{V3}/thirdparty/protocol/{{protocol}}", 404)["errcode"] == "M_NOT_FOUND"


@pytest.mark.parametrize("kind,query", [("location", "alias=%23nowhere:example.org"), ("user", "userid=%40nobody:example.org")])
def test_thirdparty_lookups_200_empty(api, check, user, kind, query):
    body = check(api.request("GET", f"{V3}/thirdparty/{kind}?{query}", user.access_token), "GET", f"{V3}/thirdparty/{kind}", 200)
    assert body == []
    body = check(api.request("GET", f"{V3}/thirdparty/{kind}/{unique('proto')}", user.access_token), "GET", f"{V3}/thirdparty/{kind}/{{protocol}}", 200)
    assert body == []


def test_whois_200_self(api, check, user):
    body = check(api.request("GET", f"{V3}/admin/whois/{q(user.user_id)}", user.access_token), "GET", f"{V3}/admin/whois/{{userId}}", 200)
    assert body["user_id"] == user.user_id and user.device_id in body["devices"]


def test_voip_turn_server_200(api, check, user):
    body = check(api.request("GET", f"{V3}/voip/turnServer", user.access_token), "GET", f"{V3}/voip/turnServer", 200)
    assert body["uris"] and body["ttl"] > 0


# --- beyond the first scope: tags, openid, bulk device deletion, search, notifications, to-device


def test_tags_put_get_delete_200(api, check, user):
    room_id = create_room(api, user)
    base = f"{V3}/user/{q(user.user_id)}/rooms/{q(room_id)}/tags"
    check(api.request("PUT", f"{base}/u.work", user.access_token, json={"order": 0.25}), "PUT", f"{V3}/user/{{userId}}/rooms/{{roomId}}/tags/{{tag}}", 200)
    body = check(api.request("GET", base, user.access_token), "GET", f"{V3}/user/{{userId}}/rooms/{{roomId}}/tags", 200)
    assert body["tags"] == {"u.work": {"order": 0.25}}
    check(api.request("DELETE", f"{base}/u.work", user.access_token), "DELETE", f"{V3}/user/{{userId}}/rooms/{{roomId}}/tags/{{tag}}", 200)
    assert api.request("GET", base, user.access_token).json()["tags"] == {}


def test_openid_request_token_200(api, check, user, server):
    resp = api.request("POST", f"{V3}/user/{q(user.user_id)}/openid/request_token", user.access_token, json={})
    body = check(resp, "POST", f"{V3}/user/{{userId}}/openid/request_token", 200)
    assert body["token_type"] == "Bearer" and body["matrix_server_name"] == server.launch["server_name"]


def test_delete_devices_401_uia_then_200(api, check, user):
    others = [login(api, user) for _ in range(2)]
    ids = [o["device_id"] for o in others]
    first = api.request("POST", f"{V3}/delete_devices", user.access_token, json={"devices": ids})
    body = check(first, "POST", f"{V3}/delete_devices", 401)
    assert all(whoami_status(api, o["access_token"]) == 200 for o in others), "devices deleted without auth"
    resp = api.request("POST", f"{V3}/delete_devices", user.access_token, json={"devices": ids, "auth": password_auth(user, body.get("session"))})
    check(resp, "POST", f"{V3}/delete_devices", 200)
    assert all(whoami_status(api, o["access_token"]) == 401 for o in others)
    listed = [d["device_id"] for d in api.request("GET", f"{V3}/devices", user.access_token).json()["devices"]]
    assert listed == [user.device_id]


def test_search_200(api, check, user):
    room_id = create_room(api, user)
    word = unique("needle")
    event_id = send_text(api, user, room_id, f"a {word} in a haystack")
    send_text(api, user, room_id, "nothing to see")

    def found():
        resp = api.request("POST", f"{V3}/search", user.access_token, json={"search_categories": {"room_events": {"search_term": word}}})
        body = check(resp, "POST", f"{V3}/search", 200)
        return body if body["search_categories"]["room_events"].get("results") else None

    body = wait_until(found, "full-text search to find the message")
    assert [r["result"]["event_id"] for r in body["search_categories"]["room_events"]["results"]] == [event_id]


def test_notifications_200(api, check, new_user):
    owner, other = new_user(), new_user()
    room_id = create_room(api, owner, preset="public_chat")
    join(api, other, room_id)
    event_id = send_text(api, owner, room_id, "ping")

    def notified():
        resp = api.request("GET", f"{V3}/notifications", other.access_token)
        body = check(resp, "GET", f"{V3}/notifications", 200)
        return body if any(n["event"]["event_id"] == event_id for n in body["notifications"]) else None

    wait_until(notified, "a notification for a message in a two-person room")


def test_send_to_device_200(api, check, user):
    other = login(api, user)
    since = api.request("GET", f"{V3}/sync", other["access_token"], params={"timeout": 0}).json()["next_batch"]
    content = {"nonce": unique("n")}
    resp = api.request(
        "PUT",
        f"{V3}/sendToDevice/org.example.ping/{unique('txn')}",
        user.access_token,
        json={"messages": {user.user_id: {other["device_id"]: content}}},
    )
    check(resp, "PUT", f"{V3}/sendToDevice/{{eventType}}/{{txnId}}", 200)

    def delivered():
        body = api.request("GET", f"{V3}/sync", other["access_token"], params={"since": since, "timeout": 1000}).json()
        events = body.get("to_device", {}).get("events", [])
        return [e for e in events if e["type"] == "org.example.ping"]

    events = wait_until(delivered, "the to-device message in the target device's sync")
    assert [e["content"] for e in events] == [content] and events[0]["sender"] == user.user_id
