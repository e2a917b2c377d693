// Core messaging scenario driven by matrix-js-sdk against a real homeserver:
// registration, login, a room shared by two users, 200 concurrent messages,
// history, typing, receipts, profile changes, leaving, and a server restart
// in the middle that must keep history and sync tokens valid.
//
// The steps share state and run in order; a step that needs an earlier one
// fails (never skips) when that one did not produce its result.
import { describe } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";

import { HomeServer } from "./support/server.js";
import { sharedState, serverSteps } from "./support/steps.js";
import { sdk, makeClient, register, login, startSyncing, timelineIds, collectEventIds } from "./support/clients.js";
import { waitFor, waitForEvent, DEFAULT_TIMEOUT_MS } from "./support/wait.js";

const MESSAGES_PER_USER = 100;
const RUN = randomBytes(4).toString("hex");
const PASSWORD = `pw-${randomBytes(12).toString("hex")}`;

const hs = new HomeServer();
const { s, need } = sharedState(); // state shared between the ordered steps

/** Our test messages among `events` (raw JSON), in the given order. */
function testMessages(events, tag = `${RUN}:`) {
    return events.filter((ev) => ev.type === "m.room.message" && String(ev.content?.body ?? "").startsWith(tag));
}

function duplicates(ids) {
    const seen = new Set();
    const dups = new Set();
    for (const id of ids) (seen.has(id) ? dups : seen).add(id);
    return [...dups];
}

/** Pages /messages backwards from `from` until the server says there is no more. */
async function paginateBackwards(client, roomId, from, pageSize) {
    const events = [];
    let token = from;
    for (let page = 0; page < 200; page++) {
        const res = await client.createMessagesRequest(roomId, token, pageSize, sdk.Direction.Backward);
        assert.ok(Array.isArray(res.chunk), `/messages chunk is not an array: ${JSON.stringify(res)}`);
        assert.ok(res.chunk.length <= pageSize, `/messages returned ${res.chunk.length} > limit ${pageSize}`);
        events.push(...res.chunk);
        if (!res.end || res.chunk.length === 0) return events;
        assert.notEqual(res.end, token, "/messages returned end == from: pagination would not advance");
        token = res.end;
    }
    throw new Error("/messages did not reach the start of the room within 200 pages");
}

describe(`js-core against ${hs.kind}`, () => {
    const step = serverSteps(hs, () => ["alice", "bob"].map((key) => s[key]));

    step("registers two users through UIA m.login.dummy", async () => {
        for (const who of ["alice", "bob"]) {
            const username = `${who}-${RUN}`;
            const res = await register(hs, username, PASSWORD);
            assert.equal(res.user_id, `@${username}:${hs.serverName}`);
            assert.equal(typeof res.access_token, "string");
            s[`${who}Registered`] = res;
        }
    });

    step("logs in with password and gets a new device and working token", async () => {
        for (const who of ["alice", "bob"]) {
            const username = `${who}-${RUN}`;
            const res = await login(hs, username, PASSWORD);
            const registered = need(`${who}Registered`);
            assert.equal(res.user_id, registered.user_id);
            assert.notEqual(res.access_token, registered.access_token, "login reused the registration token");
            assert.notEqual(res.device_id, registered.device_id, "login reused the registration device");
            const { client, tap } = makeClient(hs, {
                userId: res.user_id,
                accessToken: res.access_token,
                deviceId: res.device_id,
            });
            const me = await client.whoami();
            assert.equal(me.user_id, res.user_id);
            assert.equal(me.device_id, res.device_id);
            s[who] = { client, tap, userId: res.user_id };
        }
    });

    step("both clients complete their first sync", async () => {
        await Promise.all(["alice", "bob"].map((who) => startSyncing(need(who).client, { timeoutMs: DEFAULT_TIMEOUT_MS })));
    });

    step("alice creates a room, invites bob, bob joins and alice sees it", async () => {
        const alice = need("alice");
        const bob = need("bob");
        const { room_id: roomId } = await alice.client.createRoom({
            name: `js-core ${RUN}`,
            preset: sdk.Preset.PrivateChat,
        });
        assert.match(roomId, /^!/);

        const invited = waitForEvent(
            bob.client,
            sdk.RoomMemberEvent.Membership,
            (_ev, member) => member.roomId === roomId && member.userId === bob.userId && member.membership === "invite",
            { what: "bob to see his invite" },
        );
        await alice.client.invite(roomId, bob.userId);
        await invited;

        const aliceSeesJoin = waitForEvent(
            alice.client,
            sdk.RoomMemberEvent.Membership,
            (_ev, member) => member.roomId === roomId && member.userId === bob.userId && member.membership === "join",
            { what: "alice to see bob's join" },
        );
        await bob.client.joinRoom(roomId);
        await aliceSeesJoin;
        await waitFor(() => bob.client.getRoom(roomId)?.getMyMembership() === "join", {
            what: "bob's client to consider itself joined",
        });
        s.roomId = roomId;
    });

    step(`200 messages sent concurrently from both sides arrive exactly once, in one order`, async () => {
        const roomId = need("roomId");
        const senders = ["alice", "bob"].map((who) => need(who));
        const sentIds = new Set();
        // What each client's SDK emits as live Room.timeline events.
        const emitted = { alice: [], bob: [] };
        const listeners = [];
        for (const who of ["alice", "bob"]) {
            const { client } = need(who);
            const onTimeline = (ev, room, toStart, _removed, data) => {
                if (room?.roomId === roomId && !toStart && data?.liveEvent && ev.getId()?.startsWith("$")) {
                    emitted[who].push(ev.event);
                }
            };
            client.on(sdk.RoomEvent.Timeline, onTimeline);
            listeners.push(() => client.removeListener(sdk.RoomEvent.Timeline, onTimeline));
        }
        // Both clients send at once; each client's SDK sends its own messages
        // one after the other, in call order, as Element does.
        await Promise.all(
            senders.map(async (sender, si) => {
                const bodies = Array.from({ length: MESSAGES_PER_USER }, (_, i) => `${RUN}:${si}:${i}`);
                const results = await Promise.all(bodies.map((body) => sender.client.sendTextMessage(roomId, body)));
                for (const r of results) {
                    assert.match(r.event_id, /^\$/);
                    sentIds.add(r.event_id);
                }
            }),
        );
        assert.equal(sentIds.size, 2 * MESSAGES_PER_USER, "send returned duplicate event IDs");

        const orders = {};
        for (const who of ["alice", "bob"]) {
            const { tap } = need(who);
            await waitFor(
                () => {
                    const got = new Set(tap.timeline(roomId).map((e) => e.event_id));
                    return [...sentIds].every((id) => got.has(id));
                },
                { what: `${who}'s /sync to deliver all ${sentIds.size} messages` },
            );
            const wire = testMessages(tap.timeline(roomId));
            const ids = wire.map((e) => e.event_id);
            assert.deepEqual(duplicates(ids), [], `${who} received some messages more than once via /sync`);
            assert.equal(ids.length, sentIds.size, `${who} received unexpected extra messages`);
            assert.ok(!tap.sawGap(roomId), `${who}'s incremental /sync reported a gap (limited: true)`);
            assert.deepEqual(duplicates(tap.timeline(roomId).map((e) => e.event_id)), [], `${who}: duplicate events in /sync`);
            orders[who] = ids;

            // The SDK's own timeline, built from the same sync loop, holds each
            // message once. (Its order is not compared: the SDK places a
            // client's own messages when their send completes.)
            const room = need(who).client.getRoom(roomId);
            const live = room
                .getLiveTimeline()
                .getEvents()
                .map((e) => e.event)
                .filter((e) => e.event_id?.startsWith("$"));
            const liveIds = testMessages(live).map((e) => e.event_id);
            assert.deepEqual(duplicates(liveIds), [], `${who}: SDK timeline holds a message twice`);
            assert.deepEqual([...liveIds].sort(), [...ids].sort(), `${who}: SDK timeline and /sync disagree`);
        }
        assert.deepEqual(orders.alice, orders.bob, "alice and bob saw the messages in different orders");

        // Room.timeline announced each of the other user's messages exactly
        // once, in the order the server sent them.
        for (const listenerOff of listeners) listenerOff();
        for (const [who, other] of [["alice", "bob"], ["bob", "alice"]]) {
            const otherId = need(other).userId;
            const fromOther = testMessages(emitted[who]).filter((e) => e.sender === otherId).map((e) => e.event_id);
            const wireFromOther = testMessages(need(who).tap.timeline(roomId))
                .filter((e) => e.sender === otherId)
                .map((e) => e.event_id);
            assert.equal(wireFromOther.length, MESSAGES_PER_USER);
            assert.deepEqual(fromOther, wireFromOther, `${who}: Room.timeline events differ from /sync`);
        }

        // Each sender's messages, sent one after the other, keep their order.
        for (const si of [0, 1]) {
            const mine = testMessages(need("alice").tap.timeline(roomId), `${RUN}:${si}:`);
            const indexes = mine.map((e) => Number(e.content.body.split(":")[2]));
            assert.deepEqual(indexes, Array.from({ length: MESSAGES_PER_USER }, (_, i) => i), `sender ${si}: order broken`);
        }
        s.order = orders.alice;
    });

    step("/messages pages back through history and finds all 200 in the same order", async () => {
        const roomId = need("roomId");
        const order = need("order");
        const alice = need("alice");
        const events = await paginateBackwards(alice.client, roomId, alice.tap.nextBatch, 30);
        const ids = testMessages(events).map((e) => e.event_id).reverse();
        assert.deepEqual(duplicates(ids), [], "/messages returned some events twice");
        assert.deepEqual(ids, order, "/messages order differs from /sync order");
        const create = events.find((e) => e.type === "m.room.create");
        assert.ok(create, "backwards pagination ended before reaching m.room.create");
    });

    step("bob sees alice typing, then stopping", async () => {
        const roomId = need("roomId");
        const alice = need("alice");
        const bob = need("bob");
        const room = bob.client.getRoom(roomId);
        const aliceTyping = () =>
            bob.tap
                .ephemeral(roomId)
                .filter((e) => e.type === "m.typing")
                .at(-1)
                ?.content.user_ids.includes(alice.userId);
        assert.ok(!aliceTyping(), "alice reported typing before she started");
        await alice.client.sendTyping(roomId, true, 30000);
        await waitFor(aliceTyping, { what: "bob's /sync to report alice typing" });
        await waitFor(() => room.getMember(alice.userId)?.typing === true, { what: "bob's SDK to mark alice typing" });
        await alice.client.sendTyping(roomId, false, 0);
        await waitFor(() => aliceTyping() === false, { what: "bob's /sync to report alice stopped typing" });
        await waitFor(() => room.getMember(alice.userId)?.typing === false, { what: "bob's SDK to clear alice typing" });
        const typingEvents = bob.tap.ephemeral(roomId).filter((e) => e.type === "m.typing");
        assert.ok(
            typingEvents.some((e) => e.content.user_ids.includes(alice.userId)),
            "no m.typing ephemeral event listing alice in bob's /sync",
        );
    });

    step("alice sees bob's read receipt", async () => {
        const roomId = need("roomId");
        need("order");
        const alice = need("alice");
        const bob = need("bob");
        // A fresh message from alice, so that it is the newest event and bob's
        // receipt cannot be implied by anything he sent himself.
        const { event_id: target } = await alice.client.sendTextMessage(roomId, `receipt-${RUN}`);
        const event = await waitFor(() => bob.client.getRoom(roomId).findEventById(target), {
            what: "bob's client to receive the receipt target",
        });
        const aliceRoom = alice.client.getRoom(roomId);
        await waitFor(() => aliceRoom.findEventById(target), { what: "alice's client to receive her own message" });

        const receiptOnWire = () =>
            alice.tap
                .ephemeral(roomId)
                .some((e) => e.type === "m.receipt" && e.content?.[target]?.["m.read"]?.[bob.userId]);
        assert.ok(!receiptOnWire(), "receipt seen before it was sent");
        assert.notEqual(aliceRoom.getEventReadUpTo(bob.userId), target, "bob counted as having read it already");
        await bob.client.sendReceipt(event, sdk.ReceiptType.Read);
        await waitFor(receiptOnWire, { what: "alice's /sync to carry bob's m.read receipt" });
        await waitFor(() => aliceRoom.getEventReadUpTo(bob.userId) === target, {
            what: "alice's SDK to show bob has read up to the event",
        });
    });

    step("bob changes his display name and alice sees the new m.room.member event", async () => {
        const roomId = need("roomId");
        const alice = need("alice");
        const bob = need("bob");
        const newName = `Bob ${RUN}`;
        const seen = waitForEvent(
            alice.client,
            sdk.RoomEvent.Timeline,
            (ev, room) =>
                room?.roomId === roomId &&
                ev.getType() === "m.room.member" &&
                ev.getStateKey() === bob.userId &&
                ev.getContent().membership === "join" &&
                ev.getContent().displayname === newName,
            { what: "alice to see bob's new display name" },
        );
        await bob.client.setDisplayName(newName);
        await seen;
        await waitFor(() => alice.client.getRoom(roomId).getMember(bob.userId)?.rawDisplayName === newName, {
            what: "alice's member list to show the new name",
        });
        const profile = await alice.client.getProfileInfo(bob.userId);
        assert.equal(profile.displayname, newName);
    });

    step("bob leaves and alice sees the leave", async () => {
        const roomId = need("roomId");
        const alice = need("alice");
        const bob = need("bob");
        const seen = waitForEvent(
            alice.client,
            sdk.RoomEvent.Timeline,
            (ev, room) =>
                room?.roomId === roomId &&
                ev.getType() === "m.room.member" &&
                ev.getStateKey() === bob.userId &&
                ev.getContent().membership === "leave",
            { what: "alice to see bob leave" },
        );
        await bob.client.leave(roomId);
        await seen;
        assert.equal(alice.client.getRoom(roomId).getMember(bob.userId)?.membership, "leave");
        const joined = await alice.client.getJoinedRoomMembers(roomId);
        assert.deepEqual(Object.keys(joined.joined), [alice.userId]);
    });

    step("server stops on SIGTERM with exit code 0 and restarts on the same data", async () => {
        const alice = need("alice");
        const bob = need("bob");
        alice.client.stopClient();
        bob.client.stopClient();
        s.tokenBeforeRestart = alice.tap.nextBatch;
        s.seenBeforeRestart = alice.tap.allEventIds();
        assert.ok(s.tokenBeforeRestart, "alice has no sync token to resume from");
        const status = await hs.stop();
        assert.deepEqual(status, { code: 0, signal: null }, `server exit after SIGTERM: ${JSON.stringify(status)}`);
        await hs.start();
        const me = await alice.client.whoami();
        assert.equal(me.user_id, alice.userId, "access token no longer valid after restart");
    });

    step("after restart, /messages still has the full history in order", async () => {
        const roomId = need("roomId");
        const order = need("order");
        need("tokenBeforeRestart");
        const alice = need("alice");
        const events = await paginateBackwards(alice.client, roomId, alice.tap.nextBatch, 50);
        const ids = testMessages(events).map((e) => e.event_id).reverse();
        assert.deepEqual(ids, order, "history after restart differs from before");
    });

    step("after restart, incremental sync from the saved token delivers only new events", async () => {
        const roomId = need("roomId");
        const alice = need("alice");
        const since = need("tokenBeforeRestart");
        const seenBefore = need("seenBeforeRestart");
        const filter = JSON.stringify({ room: { timeline: { limit: 100 } } });
        const sync = (params) =>
            alice.client.http.authedRequest(sdk.Method.Get, "/sync", { filter, timeout: "0", ...params });

        const quiet = await sync({ since });
        const repeated = [...collectEventIds(quiet)].filter((id) => seenBefore.has(id));
        assert.deepEqual(repeated, [], "sync from the pre-restart token repeated already delivered events");

        const sentAfter = [];
        for (let i = 0; i < 3; i++) {
            const res = await alice.client.sendTextMessage(roomId, `after-${RUN}:${i}`);
            sentAfter.push(res.event_id);
        }

        // The events exist before this request, so the long poll must return
        // them at once; the timeout only bounds a broken server.
        const res = await sync({ since, timeout: "10000" });
        assert.ok(res.rooms?.join?.[roomId], `room missing from sync after restart: ${JSON.stringify(res).slice(0, 500)}`);
        const timeline = res.rooms.join[roomId].timeline;
        const newMsgs = testMessages(timeline.events, `after-${RUN}:`).map((e) => e.event_id);
        assert.deepEqual(newMsgs, sentAfter, "new messages missing, repeated or out of order");
        assert.notEqual(timeline.limited, true, "3 new events reported as a gap (limited: true)");
        const repeatedNow = [...collectEventIds(res)].filter((id) => seenBefore.has(id));
        assert.deepEqual(repeatedNow, [], "sync from the pre-restart token repeated old events");
        assert.deepEqual(duplicates(timelineIds(res)), []);

        // The token the server hands out now continues the same stream.
        const next = await sync({ since: res.next_batch });
        const again = timelineIds(next).filter((id) => sentAfter.includes(id));
        assert.deepEqual(again, [], "sync from the newest token repeated the new messages");
    });

    step("after restart, the SDK sync loop starts again and sees the room", async () => {
        const roomId = need("roomId");
        const alice = need("alice");
        need("tokenBeforeRestart");
        await startSyncing(alice.client, { timeoutMs: DEFAULT_TIMEOUT_MS });
        const room = alice.client.getRoom(roomId);
        assert.ok(room, "room missing from the SDK after a fresh sync");
        assert.equal(room.getMyMembership(), "join");
        const bodies = room
            .getLiveTimeline()
            .getEvents()
            .map((e) => e.getContent().body);
        assert.ok(bodies.includes(`after-${RUN}:2`), "fresh initial sync lacks the newest message");
    });
});
