// End-to-end encryption driven by matrix-js-sdk with Element's Rust crypto
// (matrix-sdk-crypto-wasm) against a real homeserver: megolm messages both
// ways with no undecryptable message, cross-signing and secret storage,
// server-side key backup restored on a fresh login with the recovery key,
// device-list tracking as devices come and go, and one-time key claims
// under concurrency.
//
// The steps share state and run in order; a step that needs an earlier one
// fails (never skips) when that one did not produce its result.
import { describe } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";

import { decodeRecoveryKey } from "matrix-js-sdk/lib/crypto-api/index.js";

import { HomeServer } from "./support/server.js";
import { sharedState, serverSteps } from "./support/steps.js";
import { sdk, makeClient, register, login, startSyncing } from "./support/clients.js";
import { waitFor, DEFAULT_TIMEOUT_MS } from "./support/wait.js";

const MESSAGES_EACH_WAY = 50;
const RUN = randomBytes(4).toString("hex");
const PASSWORD = `pw-${randomBytes(12).toString("hex")}`;

const hs = new HomeServer();
const { s, need } = sharedState(); // state shared between the ordered steps

const username = (who) => `${who}-${RUN}`;
const passwordAuth = (who) => ({ type: "m.login.password", identifier: { type: "m.id.user", user: username(who) }, password: PASSWORD });

/** Secret-storage keys a user has typed in, by key id (shared by the user's devices). */
const secretKeys = { alice: new Map(), bob: new Map() };

/** Logs `who` in on a new device with Rust crypto (in memory) and starts syncing. */
async function cryptoLogin(who) {
    const res = await login(hs, username(who), PASSWORD);
    const keys = secretKeys[who];
    const { client, tap } = makeClient(hs, {
        userId: res.user_id,
        accessToken: res.access_token,
        deviceId: res.device_id,
        cryptoCallbacks: {
            getSecretStorageKey: async ({ keys: wanted }) => {
                for (const id of Object.keys(wanted)) if (keys.has(id)) return [id, keys.get(id)];
                return null;
            },
            cacheSecretStorageKey: (keyId, _info, key) => keys.set(keyId, key),
        },
    });
    await client.initRustCrypto({ useIndexedDB: false });
    await startSyncing(client, { timeoutMs: DEFAULT_TIMEOUT_MS });
    return { client, tap, crypto: client.getCrypto(), userId: res.user_id, deviceId: res.device_id, accessToken: res.access_token };
}

/** Raw client-server request with an access token; returns [status, body]. */
async function api(token, method, path, body) {
    const res = await fetch(`${hs.baseUrl}/_matrix/client/v3${path}`, {
        method,
        headers: { Authorization: `Bearer ${token}`, ...(body ? { "Content-Type": "application/json" } : {}) },
        body: body ? JSON.stringify(body) : undefined,
    });
    return [res.status, await res.json()];
}

/** Encrypted events of `roomId` from `sender` in the client's live timeline. */
function encryptedFrom(client, roomId, sender) {
    const room = client.getRoom(roomId);
    if (!room) return [];
    return room.getLiveTimeline().getEvents().filter((ev) => ev.getWireType() === "m.room.encrypted" && ev.getSender() === sender);
}

/**
 * Waits until every `expected` body from `sender` is decrypted in the
 * client's view of the room, and checks no encrypted event failed.
 */
async function expectDecrypted(client, roomId, sender, expected, what, { sinceTs = 0, senderTap = null } = {}) {
    const want = new Set(expected);
    const events = () => encryptedFrom(client, roomId, sender).filter((ev) => ev.getTs() >= sinceTs);
    await waitFor(
        () => {
            const got = new Set(events().filter((ev) => !ev.isDecryptionFailure()).map((ev) => ev.getClearContent()?.body));
            return [...want].every((b) => got.has(b));
        },
        { what },
    ).catch((err) => {
        const evs = events();
        const failed = evs.filter((ev) => ev.isDecryptionFailure());
        // A request of the sender's that failed (a key claim, a to-device
        // send) is the usual reason a room key never arrived.
        const senderFailures = senderTap ? ` ; sender's failed requests: ${JSON.stringify(senderTap.failures)}` : "";
        throw new Error(`${err.message}: ${evs.length} encrypted events, ${failed.length} undecryptable (${failed[0]?.decryptionFailureReason ?? "-"})${senderFailures}`);
    });
    const failures = events().filter((ev) => ev.isDecryptionFailure());
    assert.deepEqual(failures.map((ev) => ev.getId()), [], `${what}: undecryptable events`);
}

async function sendAll(client, roomId, bodies) {
    for (const body of bodies) await client.sendTextMessage(roomId, body);
}

describe(`js-crypto against ${hs.kind}`, () => {
    const step = serverSteps(hs, () => ["alice", "bob", "alice2", "alice3", "bob2"].map((key) => s[key]));

    step("alice and bob register and log in with Rust crypto", async () => {
        for (const who of ["alice", "bob"]) await register(hs, username(who), PASSWORD);
        s.alice = await cryptoLogin("alice");
        s.bob = await cryptoLogin("bob");
        s.aliceLive = s.alice; // alice's device that is online now
        // The crypto machine uploads its device keys in the background.
        await waitFor(
            async () => {
                const [status, keys] = await api(s.alice.accessToken, "POST", "/keys/query", { device_keys: { [s.alice.userId]: [] } });
                assert.equal(status, 200);
                return keys.device_keys[s.alice.userId][s.alice.deviceId];
            },
            { what: "alice's device keys to be queryable" },
        );
    });

    step("alice creates an encrypted room and bob joins", async () => {
        const alice = need("alice");
        const bob = need("bob");
        const { room_id: roomId } = await alice.client.createRoom({
            name: `js-crypto ${RUN}`,
            preset: sdk.Preset.PrivateChat,
            invite: [bob.userId],
            initial_state: [{ type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } }],
        });
        await waitFor(() => bob.client.getRoom(roomId)?.getMyMembership() === "invite", { what: "bob to see his invite" });
        await bob.client.joinRoom(roomId);
        await waitFor(() => alice.client.getRoom(roomId)?.getMember(bob.userId)?.membership === "join", { what: "alice to see bob's join" });
        assert.equal(await alice.crypto.isEncryptionEnabledInRoom(roomId), true);
        // joinRoom returns before bob's own sync has brought him the room's
        // state; his crypto machine learns the room is encrypted from there.
        await waitFor(() => bob.client.getRoom(roomId)?.getMyMembership() === "join", { what: "bob's sync to bring his join" });
        await waitFor(() => bob.crypto.isEncryptionEnabledInRoom(roomId), { what: "bob's crypto to know the room is encrypted" });
        // Each crypto machine uploads its device keys in the background; a
        // room key can only reach a device the sender already knows.
        for (const [me, them] of [[alice, bob], [bob, alice]]) {
            await waitFor(
                async () => (await me.crypto.getUserDeviceInfo([them.userId], true)).get(them.userId)?.has(them.deviceId),
                { what: `${me.userId} to track ${them.userId}'s device` },
            );
        }
        s.roomId = roomId;
    });

    step(`${MESSAGES_EACH_WAY} messages each way all decrypt on the other side`, async () => {
        const alice = need("alice");
        const bob = need("bob");
        const roomId = need("roomId");
        const fromAlice = Array.from({ length: MESSAGES_EACH_WAY }, (_, i) => `${RUN}: alice ${i}`);
        const fromBob = Array.from({ length: MESSAGES_EACH_WAY }, (_, i) => `${RUN}: bob ${i}`);
        await Promise.all([sendAll(alice.client, roomId, fromAlice), sendAll(bob.client, roomId, fromBob)]);
        // On the wire every message is encrypted.
        const [status, page] = await api(bob.accessToken, "GET", `/rooms/${encodeURIComponent(roomId)}/messages?dir=b&limit=200`);
        assert.equal(status, 200);
        const plain = page.chunk.filter((ev) => ev.type === "m.room.message");
        assert.deepEqual(plain, [], "no plaintext message reached the server");
        await expectDecrypted(bob.client, roomId, alice.userId, fromAlice, "bob to decrypt alice's messages", { senderTap: alice.tap });
        await expectDecrypted(alice.client, roomId, bob.userId, fromBob, "alice to decrypt bob's messages", { senderTap: bob.tap });
        s.history = [...fromAlice];
    });

    step("alice bootstraps cross-signing and secret storage; bob sees her identity", async () => {
        const alice = need("alice");
        const bob = need("bob");
        const recovery = await alice.crypto.createRecoveryKeyFromPassphrase();
        await alice.crypto.bootstrapCrossSigning({
            authUploadDeviceSigningKeys: async (makeRequest) => {
                await makeRequest(passwordAuth("alice"));
            },
        });
        await alice.crypto.bootstrapSecretStorage({ createSecretStorageKey: async () => recovery, setupNewSecretStorage: true });
        assert.equal(await alice.crypto.isCrossSigningReady(), true, "cross-signing ready on alice's device");
        assert.equal(await alice.crypto.isSecretStorageReady(), true, "secret storage ready");
        const status = await alice.crypto.getCrossSigningStatus();
        assert.equal(status.publicKeysOnDevice, true);
        assert.equal(status.privateKeysInSecretStorage, true);
        const master = await alice.crypto.getCrossSigningKeyId();
        assert.ok(master, "alice has a master key");

        // Bob learns of the change through device_lists and sees alice's
        // master key, and her device signed by her self-signing key.
        await waitFor(
            async () => {
                const keys = await bob.crypto.getUserCrossSigningKeys(alice.userId);
                const device = await bob.crypto.getDeviceVerificationStatus(alice.userId, alice.deviceId);
                return Object.values(keys?.master_key?.keys ?? {}).includes(master) && device?.signedByOwner;
            },
            { what: "bob to see alice's cross-signing identity and her signed device" },
        );
        const trust = await bob.crypto.getUserVerificationStatus(alice.userId);
        assert.equal(trust.isCrossSigningVerified(), false, "bob has not verified alice himself");
        // Alice's own user-signing key is visible to her and to nobody else.
        const [, mine] = await api(alice.accessToken, "POST", "/keys/query", { device_keys: { [alice.userId]: [] } });
        const [, theirs] = await api(bob.accessToken, "POST", "/keys/query", { device_keys: { [alice.userId]: [] } });
        assert.ok(mine.user_signing_keys[alice.userId], "alice sees her user-signing key");
        assert.equal(theirs.user_signing_keys[alice.userId], undefined, "bob does not see alice's user-signing key");
        s.recoveryKey = recovery.encodedPrivateKey;
    });

    step("key backup on a fresh login restores the full history with the recovery key", async () => {
        const alice = need("alice");
        const roomId = need("roomId");
        const history = need("history");
        const recoveryKey = need("recoveryKey");
        await alice.crypto.resetKeyBackup();
        const version = await alice.crypto.getActiveSessionBackupVersion();
        assert.ok(version, "backup is active on alice's device");
        // Alice's device backs up her outbound session and bob's inbound one.
        await waitFor(
            async () => {
                const [status, info] = await api(alice.accessToken, "GET", "/room_keys/version");
                return status === 200 && info.version === version && info.count >= 2;
            },
            { what: "alice's room keys to reach the backup" },
        );

        // A new device: the user types the recovery key; nothing else is shared.
        secretKeys.alice.clear();
        const alice2 = await cryptoLogin("alice");
        s.alice2 = alice2;
        const typed = decodeRecoveryKey(recoveryKey);
        const ssssKeyId = await alice2.client.secretStorage.getDefaultKeyId();
        assert.ok(ssssKeyId, "secret storage has a default key");
        secretKeys.alice.set(ssssKeyId, typed);
        await alice2.crypto.loadSessionBackupPrivateKeyFromSecretStorage();
        const check = await alice2.crypto.checkKeyBackupAndEnable();
        assert.equal(check?.backupInfo?.version, version);
        const restored = await alice2.crypto.restoreKeyBackup();
        assert.ok(restored.imported >= 2, `imported ${restored.imported} keys of ${restored.total}`);
        // The new device syncs only the latest events; it pages back through the rest.
        const room = alice2.client.getRoom(roomId);
        for (let page = 0; page < 50 && room.getLiveTimeline().getPaginationToken(sdk.Direction.Backward) !== null; page++) {
            await alice2.client.scrollback(room, 100);
        }
        await expectDecrypted(alice2.client, roomId, alice.userId, history, "alice's new device to decrypt the history");
    });

    step("a dehydrated device receives keys while alice is offline; a new login rehydrates it", async () => {
        const alice = need("alice");
        const bob = need("bob");
        const roomId = need("roomId");
        need("alice2");
        assert.equal(await alice.crypto.isDehydrationSupported(), true);
        await alice.crypto.startDehydration({ createNewKey: true });
        const [status, dehydrated] = await api(alice.accessToken, "GET", "/../unstable/org.matrix.msc3814.v1/dehydrated_device");
        assert.equal(status, 200, JSON.stringify(dehydrated));
        const dehydratedId = dehydrated.device_id;
        await waitFor(
            async () => (await bob.crypto.getUserDeviceInfo([alice.userId])).get(alice.userId)?.get(dehydratedId)?.dehydrated,
            { what: "bob to see alice's dehydrated device" },
        );

        // Every client of alice stops; bob writes to her.
        for (const key of ["alice", "alice2"]) s[key].client.stopClient();
        const sinceTs = Date.now();
        const offline = `${RUN}: while alice is offline`;
        await bob.client.sendTextMessage(roomId, offline);

        const alice3 = await cryptoLogin("alice");
        s.alice3 = alice3;
        s.aliceLive = alice3;
        // The new device first learns its user's public identity, then
        // imports the private keys from secret storage.
        await waitFor(() => alice3.crypto.userHasCrossSigningKeys(alice.userId, true), { what: "alice's new device to see her identity" });
        await alice3.crypto.bootstrapCrossSigning({});
        await alice3.crypto.startDehydration();
        await expectDecrypted(alice3.client, roomId, bob.userId, [offline], "alice's new device to decrypt through the rehydrated device", { sinceTs });
        const failed = alice3.tap.failures.filter((r) => r.path.includes("/dehydrated_device"));
        assert.deepEqual(failed, [], "every dehydrated-device request succeeded");
        const [, replaced] = await api(alice3.accessToken, "GET", "/../unstable/org.matrix.msc3814.v1/dehydrated_device");
        assert.notEqual(replaced.device_id, dehydratedId, "rehydration leaves a fresh dehydrated device");
    });

    step("bob's second device receives alice's next message; a deleted device is no longer encrypted to", async () => {
        const alice = need("aliceLive");
        const bob = need("bob");
        const roomId = need("roomId");
        const bob2 = await cryptoLogin("bob");
        s.bob2 = bob2;
        await waitFor(
            async () => (await alice.crypto.getUserDeviceInfo([bob.userId])).get(bob.userId)?.has(bob2.deviceId),
            { what: "alice to track bob's new device" },
        );
        // Messages from before bob's second device existed were never shared with it.
        const sinceTs = Date.now();
        const first = `${RUN}: to both of bob's devices`;
        await alice.client.sendTextMessage(roomId, first);
        await expectDecrypted(bob2.client, roomId, alice.userId, [first], "bob's second device to decrypt", { sinceTs });
        await expectDecrypted(bob.client, roomId, alice.userId, [first], "bob's first device to decrypt");

        // Bob removes his first device (user-interactive auth with password).
        bob.client.stopClient();
        await assert.rejects(bob2.client.deleteDevice(bob.deviceId), (err) => err.httpStatus === 401);
        await bob2.client.deleteDevice(bob.deviceId, passwordAuth("bob"));
        await waitFor(
            async () => {
                const devices = (await alice.crypto.getUserDeviceInfo([bob.userId])).get(bob.userId);
                return devices && !devices.has(bob.deviceId) && devices.has(bob2.deviceId);
            },
            { what: "alice to drop bob's deleted device" },
        );
        const sentBefore = alice.tap.requests.length;
        const second = `${RUN}: after the deletion`;
        await alice.client.sendTextMessage(roomId, second);
        await expectDecrypted(bob2.client, roomId, alice.userId, [second], "bob's remaining device to decrypt", { sinceTs });
        const toDevice = alice.tap.requests.slice(sentBefore).filter((r) => r.path.includes("/sendToDevice/"));
        for (const r of toDevice) {
            const targets = JSON.parse(r.body).messages?.[bob.userId] ?? {};
            assert.equal(targets[bob.deviceId], undefined, `alice still sent ${r.path} to the deleted device`);
        }
    });

    step("20 concurrent claims of a device with 10 one-time keys: 10 distinct keys, then the fallback", async () => {
        const bob2 = need("bob2");
        const carolName = `carol-${RUN}`;
        const carol = await register(hs, carolName, PASSWORD);
        const otks = Object.fromEntries(Array.from({ length: 10 }, (_, i) => [`signed_curve25519:C${i}`, { key: `carol-key-${i}`, signatures: {} }]));
        const [status, up] = await api(carol.access_token, "POST", "/keys/upload", {
            one_time_keys: otks,
            fallback_keys: { "signed_curve25519:CFB": { key: "carol-fallback", fallback: true, signatures: {} } },
        });
        assert.equal(status, 200, JSON.stringify(up));
        assert.equal(up.one_time_key_counts.signed_curve25519, 10);
        const claims = await Promise.all(
            Array.from({ length: 20 }, async () => {
                const [st, body] = await api(bob2.accessToken, "POST", "/keys/claim", { one_time_keys: { [carol.user_id]: { [carol.device_id]: "signed_curve25519" } } });
                assert.equal(st, 200, JSON.stringify(body));
                const ids = Object.keys(body.one_time_keys[carol.user_id]?.[carol.device_id] ?? {});
                assert.equal(ids.length, 1, `one key per claim: ${JSON.stringify(body)}`);
                return ids[0];
            }),
        );
        const otkIds = claims.filter((id) => id !== "signed_curve25519:CFB");
        assert.equal(otkIds.length, 10, `ten one-time keys: ${claims}`);
        assert.equal(new Set(otkIds).size, 10, `no one-time key twice: ${claims}`);
        assert.equal(claims.filter((id) => id === "signed_curve25519:CFB").length, 10);
    });
});
