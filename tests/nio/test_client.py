"""matrix-nio, a Python client library, against a homeserver.

Two scenarios: plain messaging between two clients (registration, login,
rooms, concurrent messages, history, typing, receipts, profiles, state,
redactions, leaving), and end-to-end encrypted messages, where nio's Olm
and Megolm machinery (libolm) exchanges keys with the server's keys API
and to-device messages.

Waiting is always a bounded loop of long-polling syncs: the server answers
as soon as something arrives, and the loop fails after its last attempt.
"""

from __future__ import annotations

import asyncio
import secrets

from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinResponse,
    JoinedRoomsResponse,
    LoginResponse,
    MegolmEvent,
    ProfileGetResponse,
    RedactedEvent,
    RegisterResponse,
    RoomCreateResponse,
    RoomForgetResponse,
    RoomGetStateEventResponse,
    RoomLeaveResponse,
    RoomMemberEvent,
    RoomMessagesResponse,
    RoomMessageText,
    RoomPutStateResponse,
    RoomRedactResponse,
    RoomSendResponse,
    SyncResponse,
    WhoamiResponse,
)
from nio.events import ReceiptEvent, TypingNoticeEvent

RUN = secrets.token_hex(4)
PASSWORD = "pw-" + secrets.token_hex(12)
# Each wait is at most this many long-polls of SYNC_TIMEOUT_MS.
SYNC_ATTEMPTS = 30
SYNC_TIMEOUT_MS = 2000
# Timelines long enough that no sync here leaves a gap.
SYNC_FILTER = {"room": {"timeline": {"limit": 100}}}


async def registered(server, name: str, store=None) -> AsyncClient:
    """A client registered as a fresh user (with encryption when `store` is set)."""
    config = AsyncClientConfig(encryption_enabled=store is not None, store_sync_tokens=False)
    client = AsyncClient(server.base_url, config=config, store_path=str(store) if store else "")
    resp = await client.register(f"{name}-{RUN}-{secrets.token_hex(3)}", PASSWORD, device_name=f"nio {name}")
    assert isinstance(resp, RegisterResponse), resp
    return client


async def sync_until(client: AsyncClient, done, what: str) -> SyncResponse:
    """Syncs until `done(response)` holds; fails after SYNC_ATTEMPTS long-polls."""
    last = None
    for _ in range(SYNC_ATTEMPTS):
        resp = await client.sync(timeout=SYNC_TIMEOUT_MS, sync_filter=SYNC_FILTER)
        assert isinstance(resp, SyncResponse), f"{what}: {resp}"
        if done(resp):
            return resp
        last = resp
    raise AssertionError(f"{client.user_id}: never saw {what}; last sync: {last}")


def timeline(resp: SyncResponse, room_id: str) -> list:
    room = resp.rooms.join.get(room_id)
    return list(room.timeline.events) if room else []


def ephemeral(resp: SyncResponse, room_id: str) -> list:
    room = resp.rooms.join.get(room_id)
    return list(room.ephemeral) if room else []


async def share_room(alice: AsyncClient, bob: AsyncClient, **create) -> str:
    """A room alice creates and invites bob to, once both see bob joined."""
    resp = await alice.room_create(name=f"nio {RUN}", invite=[bob.user_id], **create)
    assert isinstance(resp, RoomCreateResponse), resp
    room_id = resp.room_id
    await sync_until(bob, lambda r: room_id in r.rooms.invite, "the invite")
    joined = await bob.join(room_id)
    assert isinstance(joined, JoinResponse) and joined.room_id == room_id, joined
    await sync_until(
        alice,
        lambda r: any(isinstance(e, RoomMemberEvent) and e.state_key == bob.user_id and e.membership == "join" for e in timeline(r, room_id)),
        "bob's join",
    )
    return room_id


def test_two_clients_talk_through_the_server(server):
    asyncio.run(_two_clients_talk(server))


async def _two_clients_talk(server):
    alice = await registered(server, "alice")
    bob = await registered(server, "bob")
    again = AsyncClient(server.base_url, alice.user_id)
    try:
        # Login gives a second device of the same user.
        login = await again.login(PASSWORD, device_name="nio second")
        assert isinstance(login, LoginResponse), login
        assert login.device_id != alice.device_id
        me = await again.whoami()
        assert isinstance(me, WhoamiResponse) and me.user_id == alice.user_id and me.device_id == login.device_id, me

        room_id = await share_room(alice, bob)
        joined = await alice.joined_rooms()
        assert isinstance(joined, JoinedRoomsResponse) and room_id in joined.rooms, joined

        # Forty messages sent at once from both sides reach both in one order.
        sends = [alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": f"{RUN} alice {i}"}) for i in range(20)]
        sends += [bob.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": f"{RUN} bob {i}"}) for i in range(20)]
        for resp in await asyncio.gather(*sends):
            assert isinstance(resp, RoomSendResponse), resp
        seen: dict[str, list[str]] = {}
        for client in (alice, bob):
            events: list[RoomMessageText] = []

            def more(r, events=events):
                events.extend(e for e in timeline(r, room_id) if isinstance(e, RoomMessageText) and e.body.startswith(RUN))
                return len(events) >= 40

            await sync_until(client, more, "forty messages")
            bodies = [e.body for e in events]
            assert len(bodies) == 40 and len(set(bodies)) == 40, bodies
            seen[client.user_id] = bodies
        last_id = events[-1].event_id
        assert seen[alice.user_id] == seen[bob.user_id], "both clients see one order"

        # History pages back to the room's start, newest first.
        history: list[str] = []
        token = alice.next_batch
        for _ in range(50):
            page = await alice.room_messages(room_id, start=token, limit=7)
            assert isinstance(page, RoomMessagesResponse), page
            history.extend(e.body for e in page.chunk if isinstance(e, RoomMessageText) and e.body.startswith(RUN))
            if not page.chunk or not page.end:
                break
            token = page.end
        assert list(reversed(history)) == seen[alice.user_id]

        # Typing and read receipts.
        await bob.room_typing(room_id, True, timeout=10000)
        await sync_until(alice, lambda r: any(isinstance(e, TypingNoticeEvent) and bob.user_id in e.users for e in ephemeral(r, room_id)), "bob typing")
        await bob.room_read_markers(room_id, fully_read_event=last_id, read_event=last_id)

        def receipt(r):
            for e in ephemeral(r, room_id):
                if isinstance(e, ReceiptEvent) and any(x.user_id == bob.user_id and x.event_id == last_id for x in e.receipts):
                    return True
            return False

        await sync_until(alice, receipt, "bob's read receipt")

        # A new display name reaches the room's member event and the profile.
        await bob.set_displayname(f"Bob {RUN}")
        await sync_until(
            alice,
            lambda r: any(isinstance(e, RoomMemberEvent) and e.state_key == bob.user_id and e.content.get("displayname") == f"Bob {RUN}" for e in timeline(r, room_id)),
            "bob's new display name",
        )
        profile = await alice.get_profile(bob.user_id)
        assert isinstance(profile, ProfileGetResponse) and profile.displayname == f"Bob {RUN}", profile

        # State, and a redaction.
        put = await alice.room_put_state(room_id, "m.room.topic", {"topic": f"topic {RUN}"})
        assert isinstance(put, RoomPutStateResponse), put
        got = await bob.room_get_state_event(room_id, "m.room.topic")
        assert isinstance(got, RoomGetStateEventResponse) and got.content["topic"] == f"topic {RUN}", got
        doomed = await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": f"{RUN} doomed"})
        assert isinstance(doomed, RoomSendResponse), doomed
        redact = await alice.room_redact(room_id, doomed.event_id, reason="test")
        assert isinstance(redact, RoomRedactResponse), redact
        history = await bob.room_messages(room_id, start=(await bob.sync(timeout=0)).next_batch, limit=5)
        assert isinstance(history, RoomMessagesResponse), history
        assert any(isinstance(e, RedactedEvent) and e.event_id == doomed.event_id for e in history.chunk), history.chunk

        # Leaving, then forgetting.
        left = await bob.room_leave(room_id)
        assert isinstance(left, RoomLeaveResponse), left
        await sync_until(
            alice,
            lambda r: any(isinstance(e, RoomMemberEvent) and e.state_key == bob.user_id and e.membership == "leave" for e in timeline(r, room_id)),
            "bob's leave",
        )
        forgot = await bob.room_forget(room_id)
        assert isinstance(forgot, RoomForgetResponse), forgot
    finally:
        for c in (alice, bob, again):
            await c.close()


def test_end_to_end_encrypted_messages(server, store_dir):
    asyncio.run(_encrypted(server, store_dir))


async def _encrypted(server, store_dir):
    stores = {name: store_dir / name for name in ("alice", "bob")}
    for path in stores.values():
        path.mkdir()
    alice = await registered(server, "alice", stores["alice"])
    bob = await registered(server, "bob", stores["bob"])
    try:
        for c in (alice, bob):
            assert c.olm is not None, "encryption is on"
            if c.should_upload_keys:
                resp = await c.keys_upload()
                assert not hasattr(resp, "status_code") or resp.status_code is None, resp
        encryption = {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}
        room_id = await share_room(alice, bob, initial_state=[encryption])
        await sync_until(bob, lambda r: True, "a sync after joining")

        # Each side sends one encrypted message and reads the other's.
        for sender, reader in ((alice, bob), (bob, alice)):
            body = f"{RUN} secret from {sender.user_id}"
            sent = await sender.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body}, ignore_unverified_devices=True)
            assert isinstance(sent, RoomSendResponse), sent
            undecrypted: list = []

            def decrypted(r, body=body, sent=sent, undecrypted=undecrypted):
                for e in timeline(r, room_id):
                    if e.event_id != sent.event_id:
                        continue
                    if isinstance(e, MegolmEvent):
                        undecrypted.append(e)
                        return True
                    return isinstance(e, RoomMessageText) and e.body == body and e.decrypted
                return False

            await sync_until(reader, decrypted, f"the encrypted message from {sender.user_id}")
            assert not undecrypted, f"{reader.user_id} could not decrypt: {undecrypted}"
    finally:
        for c in (alice, bob):
            await c.close()
