// Threads as matrix-js-sdk with thread support sees them: per-thread unread
// counts (`unread_thread_notifications`), and threaded read receipts that
// clear one thread, or the main timeline, and leave the rest unread.
import { describe } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { isDeepStrictEqual } from "node:util";

import { HomeServer } from "./support/server.js";
import { sharedState, serverSteps } from "./support/steps.js";
import { sdk, makeClient, register, startSyncing } from "./support/clients.js";
import { waitFor, DEFAULT_TIMEOUT_MS } from "./support/wait.js";

const RUN = randomBytes(4).toString("hex");
const PASSWORD = `pw-${randomBytes(12).toString("hex")}`;

const hs = new HomeServer();
const { s, need } = sharedState();

/** The room's counts in the newest /sync response that carried the room. */
function wireCounts(tap, roomId) {
    for (let i = tap.responses.length - 1; i >= 0; i--) {
        const room = tap.responses[i].body.rooms?.join?.[roomId];
        if (room?.unread_notifications) return { main: room.unread_notifications, threads: room.unread_thread_notifications ?? {} };
    }
    return null;
}

/** Waits until the newest counts on the wire, and the SDK's, are `want`. */
async function countsAre(bob, roomId, rootId, want, what) {
    const counts = (n, h) => ({ notification_count: n, highlight_count: h });
    const expected = { main: counts(...want.main), threads: want.thread ? { [rootId]: counts(...want.thread) } : {} };
    await waitFor(() => isDeepStrictEqual(wireCounts(bob.tap, roomId), expected), {
        what: `${what}: counts on the wire to be ${JSON.stringify(expected)} (last: ${JSON.stringify(wireCounts(bob.tap, roomId))})`,
    });
    const room = bob.client.getRoom(roomId);
    const [tn, th] = want.thread ?? [0, 0];
    await waitFor(
        () =>
            room.getRoomUnreadNotificationCount(sdk.NotificationCountType.Total) === want.main[0] &&
            room.getThreadUnreadNotificationCount(rootId, sdk.NotificationCountType.Total) === tn &&
            room.getThreadUnreadNotificationCount(rootId, sdk.NotificationCountType.Highlight) === th,
        { what: `${what}: the SDK's counts` },
    );
}

describe(`js-threads against ${hs.kind}`, () => {
    const step = serverSteps(hs, () => ["alice", "bob"].map((key) => s[key]));

    step("two users with thread support share a room", async () => {
        for (const who of ["alice", "bob"]) {
            const res = await register(hs, `${who}-t-${RUN}`, PASSWORD);
            s[who] = { ...makeClient(hs, { userId: res.user_id, accessToken: res.access_token, deviceId: res.device_id }), userId: res.user_id };
        }
        const [alice, bob] = [s.alice, s.bob];
        await Promise.all(
            [alice, bob].map((c) => startSyncing(c.client, { timeoutMs: DEFAULT_TIMEOUT_MS, timeline: { unread_thread_notifications: true }, threadSupport: true })),
        );
        const { room_id: roomId } = await alice.client.createRoom({ preset: sdk.Preset.PrivateChat, name: `threads ${RUN}` });
        await alice.client.invite(roomId, bob.userId);
        await waitFor(() => bob.client.getRoom(roomId)?.getMyMembership() === "invite", { what: "bob's invite" });
        await bob.client.joinRoom(roomId);
        await waitFor(() => alice.client.getRoom(roomId)?.getMember(bob.userId)?.membership === "join", { what: "alice to see bob join" });
        s.roomId = roomId;
    });

    step("a thread reply counts in its thread, apart from the main timeline", async () => {
        const [alice, bob, roomId] = [need("alice"), need("bob"), need("roomId")];
        // Alice's events go out as plain requests: what is tested is Bob's
        // view, and the SDK's local echo of a send can race the sync that
        // brings the event back (it then throws from its scheduler).
        let txn = 0;
        const send = async (content) => {
            const path = `/rooms/${encodeURIComponent(roomId)}/send/m.room.message/${RUN}-${txn++}`;
            return alice.client.http.authedRequest(sdk.Method.Put, path, undefined, content);
        };
        const { event_id: rootId } = await send({ msgtype: "m.text", body: `root ${RUN}` });
        const { event_id: replyId } = await send({
            msgtype: "m.text",
            body: `reply ${RUN}`,
            "m.mentions": { user_ids: [bob.userId] },
            "m.relates_to": { rel_type: "m.thread", event_id: rootId, is_falling_back: true, "m.in_reply_to": { event_id: rootId } },
        });
        const { event_id: afterId } = await send({ msgtype: "m.text", body: `after ${RUN}` });
        Object.assign(s, { rootId, replyId, afterId });
        await countsAre(bob, roomId, rootId, { main: [2, 0], thread: [1, 1] }, "before any receipt");
    });

    step("a receipt in the thread clears the thread only", async () => {
        const [bob, roomId, rootId, replyId] = [need("bob"), need("roomId"), need("rootId"), need("replyId")];
        const room = bob.client.getRoom(roomId);
        const reply = await waitFor(() => room.getThread(rootId)?.findEventById(replyId), { what: "bob's SDK to place the reply in its thread" });
        await bob.client.sendReadReceipt(reply, sdk.ReceiptType.Read);
        const sent = bob.tap.requests.filter((r) => r.path.includes("/receipt/")).map((r) => JSON.parse(r.body ?? "{}"));
        assert.deepEqual(sent.at(-1), { thread_id: rootId }, "the SDK sent a threaded receipt");
        await countsAre(bob, roomId, rootId, { main: [2, 0], thread: null }, "after the thread's receipt");
    });

    step("a receipt in the main timeline clears it", async () => {
        const [bob, roomId, rootId, afterId] = [need("bob"), need("roomId"), need("rootId"), need("afterId")];
        const room = bob.client.getRoom(roomId);
        const after = await waitFor(() => room.findEventById(afterId), { what: "bob's SDK to have the main event" });
        await bob.client.sendReadReceipt(after, sdk.ReceiptType.Read);
        const sent = bob.tap.requests.filter((r) => r.path.includes("/receipt/")).map((r) => JSON.parse(r.body ?? "{}"));
        assert.deepEqual(sent.at(-1), { thread_id: "main" }, "the SDK sent a main-timeline receipt");
        await countsAre(bob, roomId, rootId, { main: [0, 0], thread: null }, "after the main receipt");
    });
});
