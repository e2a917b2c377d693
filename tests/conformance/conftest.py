"""Fixtures for the conformance suite: one homeserver per test session,
an HTTP client, fresh users, and the spec's response schemas.

The server is started through tests/harness/hs.py, so HS_KIND picks tessera
(default) or synapse exactly as for the other suites.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import jsonschema
import pytest
import requests

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests" / "harness"))
sys.path.insert(0, str(HERE))

import hs  # noqa: E402
import results  # noqa: E402
from spec import Spec  # noqa: E402

WAIT_S = float(os.environ.get("TEST_WAIT_S", "30"))
REQUEST_TIMEOUT_S = 60


def q(value: str) -> str:
    """Percent-encode one path segment (ids contain '!', '$', '#', ':')."""
    return quote(value, safe="")


class Api:
    """A thin client: requests with an optional bearer token, nothing hidden."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.http = requests.Session()

    def request(self, method: str, path: str, token: str | None = None, *, headers=None, **kwargs) -> requests.Response:
        hdrs = dict(headers or {})
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        kwargs.setdefault("timeout", REQUEST_TIMEOUT_S)
        return self.http.request(method, self.base_url + path, headers=hdrs, **kwargs)


def describe(resp: requests.Response) -> str:
    req = resp.request
    body = req.body
    if isinstance(body, bytes):
        body = body[:300].decode("utf-8", "replace")
    elif body is not None and not isinstance(body, str):
        body = "<streamed>"
    elif isinstance(body, str):
        body = body[:300]
    return f"{req.method} {req.url} body={body!r} -> {resp.status_code} {resp.text[:600]!r}"


def json_body(resp: requests.Response):
    try:
        return resp.json()
    except ValueError:
        pytest.fail(f"response is not JSON: {describe(resp)}")


class Checker:
    """Asserts a response's status and validates its body against the spec."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.validated: set[tuple[str, str, int]] = set()

    def __call__(self, resp: requests.Response, method: str, template: str, status: int):
        assert resp.status_code == status, f"expected {status}: {describe(resp)}"
        body = json_body(resp)
        try:
            self.spec.validate_response(method, template, status, body)
        except jsonschema.ValidationError as err:
            pytest.fail(f"{err.message}\n  response: {describe(resp)}")
        self.validated.add((method.upper(), template, status))
        return body

    def error(self, resp: requests.Response, status: int, errcode: str):
        """Assert an error response: status, errcode, and the spec's error body shape."""
        assert resp.status_code == status, f"expected {status} {errcode}: {describe(resp)}"
        body = json_body(resp)
        errors = list(self.spec.validator_for_ref(self.spec.error_schema_ref()).iter_errors(body))
        assert not errors, f"error body breaks the spec's error schema ({errors[0].message}): {describe(resp)}"
        assert body.get("errcode") == errcode, f"expected errcode {errcode}: {describe(resp)}"
        return body


@dataclass
class User:
    user_id: str
    localpart: str
    password: str
    access_token: str
    device_id: str


_names = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}{next(_names)}x{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def spec() -> Spec:
    return Spec()


@pytest.fixture(scope="session")
def server():
    workdir = Path(tempfile.mkdtemp(prefix="tessera-conformance-"))
    srv = hs.Server(workdir)
    srv.start()
    # The CQL backend's results get their own section of the summary.
    storage = "_scylla" if srv.kind == "tessera" and os.environ.get("TESSERA_HS_STORAGE") == "scylla" else ""
    results.RUN_INFO.update(kind=srv.kind + storage, base_url=srv.base_url)
    try:
        resp = requests.get(srv.base_url + "/_matrix/client/versions", timeout=10)
        results.RUN_INFO["server_header"] = resp.headers.get("Server", "")
    except requests.RequestException:
        pass
    yield srv
    try:
        srv.stop()
    finally:
        srv.kill()
        if os.environ.get("KEEP_SERVER_DIR"):
            print(f"\nserver workdir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def api(server) -> Api:
    return Api(server.base_url)


@pytest.fixture(scope="session")
def check(spec) -> Checker:
    checker = Checker(spec)
    yield checker
    results.VALIDATED.update(checker.validated)
    results.SPEC_OPERATIONS.update((op.method, op.template) for op in spec.operations.values())


def register_user(api: Api, localpart: str | None = None, password: str | None = None) -> User:
    localpart = localpart or unique("user")
    password = password or secrets.token_hex(12)
    body = {"username": localpart, "password": password, "initial_device_display_name": "conformance"}
    first = api.request("POST", "/_matrix/client/v3/register", json=body)
    assert first.status_code == 401, f"expected UIA challenge: {describe(first)}"
    session = first.json().get("session")
    second = api.request(
        "POST", "/_matrix/client/v3/register", json={**body, "auth": {"type": "m.login.dummy", "session": session}}
    )
    assert second.status_code == 200, f"registration failed: {describe(second)}"
    data = second.json()
    return User(data["user_id"], localpart, password, data["access_token"], data["device_id"])


@pytest.fixture
def new_user(api):
    """Factory: a freshly registered user."""
    return lambda **kw: register_user(api, **kw)


@pytest.fixture
def user(new_user) -> User:
    return new_user()


def create_room(api: Api, user: User, **body) -> str:
    resp = api.request("POST", "/_matrix/client/v3/createRoom", user.access_token, json=body)
    assert resp.status_code == 200, f"createRoom failed: {describe(resp)}"
    return resp.json()["room_id"]


def send_text(api: Api, user: User, room_id: str, text: str) -> str:
    resp = api.request(
        "PUT",
        f"/_matrix/client/v3/rooms/{q(room_id)}/send/m.room.message/{unique('txn')}",
        user.access_token,
        json={"msgtype": "m.text", "body": text},
    )
    assert resp.status_code == 200, f"send failed: {describe(resp)}"
    return resp.json()["event_id"]


def join(api: Api, user: User, room_id_or_alias: str) -> None:
    resp = api.request("POST", f"/_matrix/client/v3/join/{q(room_id_or_alias)}", user.access_token, json={})
    assert resp.status_code == 200, f"join failed: {describe(resp)}"


def invite(api: Api, inviter: User, room_id: str, invitee: User) -> None:
    resp = api.request(
        "POST", f"/_matrix/client/v3/rooms/{q(room_id)}/invite", inviter.access_token, json={"user_id": invitee.user_id}
    )
    assert resp.status_code == 200, f"invite failed: {describe(resp)}"


def room_state(api: Api, user: User, room_id: str) -> list[dict]:
    resp = api.request("GET", f"/_matrix/client/v3/rooms/{q(room_id)}/state", user.access_token)
    assert resp.status_code == 200, f"state failed: {describe(resp)}"
    return resp.json()


def state_snapshot(api: Api, user: User, room_id: str) -> dict:
    """(type, state_key) -> event_id: changes whenever any state event is replaced."""
    return {(e["type"], e["state_key"]): e["event_id"] for e in room_state(api, user, room_id)}


def latest_events(api: Api, user: User, room_id: str, limit: int = 20) -> list[str]:
    resp = api.request(
        "GET", f"/_matrix/client/v3/rooms/{q(room_id)}/messages", user.access_token, params={"dir": "b", "limit": limit}
    )
    assert resp.status_code == 200, f"messages failed: {describe(resp)}"
    return [e["event_id"] for e in resp.json()["chunk"]]


def wait_until(condition, what: str, timeout_s: float = WAIT_S):
    """Poll `condition` until truthy (returned) or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)  # poll interval of a bounded wait


def pytest_runtest_logreport(report):
    results.record(report)


def pytest_sessionfinish(session, exitstatus):
    results.write_summary(REPO_ROOT / "docs" / "conformance-results.md")


def dump(value) -> str:
    return json.dumps(value, sort_keys=True)
