// matrix-js-sdk clients for the suites, with a tap on /sync.
//
// The SDK de-duplicates events by ID when it builds its timelines, which
// would hide a server that sends an event twice. Each client therefore gets a
// fetch wrapper that records every /sync response body exactly as the server
// sent it, in order, so tests can check "exactly once" and ordering on the
// wire while the SDK's own sync loop drives the traffic.
import { EventEmitter } from "node:events";
import loglevel from "loglevel";
import * as sdk from "matrix-js-sdk";

// The SDK logs every sync step; keep test output readable unless asked.
const SDK_LOG = Boolean(process.env.SDK_LOG);
const quietLogger = {
    trace: (...a) => SDK_LOG && console.debug(...a),
    debug: (...a) => SDK_LOG && console.debug(...a),
    info: (...a) => SDK_LOG && console.info(...a),
    warn: (...a) => SDK_LOG && console.warn(...a),
    error: (...a) => SDK_LOG && console.error(...a),
    getChild: () => quietLogger,
};
if (!SDK_LOG) {
    // Modules that log through the SDK's global loglevel loggers.
    for (const log of Object.values(loglevel.getLoggers())) log.setLevel("silent", false);
    const getLogger = loglevel.getLogger.bind(loglevel);
    loglevel.getLogger = (name) => {
        const log = getLogger(name);
        const setLevel = log.setLevel.bind(log);
        log.setLevel = () => setLevel("silent", false);
        log.setLevel();
        return log;
    };
}

export { sdk };

export class SyncTap extends EventEmitter {
    constructor() {
        super();
        /** Every successful /sync response: { since, body }. */
        this.responses = [];
        /** Every successful non-GET request: { method, path, body }. */
        this.requests = [];
        /** Every request answered with an error status: { method, path, status }. */
        this.failures = [];
        this.nextBatch = null;
    }

    fetchFn = async (input, init) => {
        const res = await fetch(input, init);
        const url = new URL(typeof input === "string" || input instanceof URL ? input : input.url);
        const method = (init?.method ?? "GET").toUpperCase();
        if (method !== "GET" && res.ok) {
            // Successful writes, for tests that check what a client sent.
            this.requests.push({ method, path: url.pathname, body: typeof init?.body === "string" ? init.body : null });
        }
        if (!res.ok) this.failures.push({ method, path: url.pathname, status: res.status });
        if (url.pathname.endsWith("/sync") && res.status === 200) {
            const body = await res.clone().json();
            this.responses.push({ since: url.searchParams.get("since"), filter: url.searchParams.get("filter"), body });
            this.nextBatch = body.next_batch;
            this.emit("sync", body);
        }
        return res;
    };

    /** Timeline events of `roomId` (joined section) across all responses, in arrival order. */
    timeline(roomId) {
        const events = [];
        for (const { body } of this.responses) {
            const room = body.rooms?.join?.[roomId];
            for (const ev of room?.timeline?.events ?? []) events.push(ev);
        }
        return events;
    }

    /**
     * Whether a response after the room's first one (in the joined section)
     * marked its timeline as limited, i.e. left a gap. The first one may be
     * limited: it starts the timeline, and clients paginate back from it.
     */
    sawGap(roomId) {
        const withRoom = this.responses.filter(({ body }) => body.rooms?.join?.[roomId]);
        return withRoom.slice(1).some(({ body }) => body.rooms.join[roomId].timeline?.limited === true);
    }

    /** Ephemeral events of `roomId` across all responses. */
    ephemeral(roomId) {
        const events = [];
        for (const { body } of this.responses) {
            for (const ev of body.rooms?.join?.[roomId]?.ephemeral?.events ?? []) events.push(ev);
        }
        return events;
    }

    /** Every event ID in any room timeline or state section seen so far. */
    allEventIds() {
        const ids = new Set();
        for (const { body } of this.responses) collectEventIds(body, ids);
        return ids;
    }
}

export function collectEventIds(syncBody, into = new Set()) {
    for (const section of ["join", "leave"]) {
        for (const room of Object.values(syncBody.rooms?.[section] ?? {})) {
            for (const ev of room.timeline?.events ?? []) into.add(ev.event_id);
            for (const ev of room.state?.events ?? []) into.add(ev.event_id);
        }
    }
    return into;
}

/** Timeline events of every joined room in one /sync body, as [eventId]. */
export function timelineIds(syncBody) {
    const ids = [];
    for (const room of Object.values(syncBody.rooms?.join ?? {})) {
        for (const ev of room.timeline?.events ?? []) ids.push(ev.event_id);
    }
    return ids;
}

export function makeClient(hs, { userId, accessToken, deviceId, ...options }) {
    const tap = new SyncTap();
    const client = sdk.createClient({
        baseUrl: hs.baseUrl,
        userId,
        accessToken,
        deviceId,
        fetchFn: tap.fetchFn,
        useAuthorizationHeader: true,
        timelineSupport: true,
        pendingEventOrdering: sdk.PendingEventOrdering.Detached,
        logger: quietLogger,
        ...options,
    });
    return { client, tap };
}

/**
 * Registers through User-Interactive Authentication. The first request is
 * made without auth and must be answered 401 with a flow of m.login.dummy;
 * the SDK's InteractiveAuth then completes that stage.
 */
export async function register(hs, username, password) {
    const anon = sdk.createClient({ baseUrl: hs.baseUrl, logger: quietLogger });
    let authData;
    try {
        await anon.registerRequest({ username, password });
        throw new Error("registration without auth succeeded; expected a 401 UIA challenge");
    } catch (err) {
        if (!(err instanceof sdk.MatrixError) || err.httpStatus !== 401) throw err;
        authData = err.data;
    }
    const dummyFlow = (authData.flows ?? []).some((f) => f.stages.length === 1 && f.stages[0] === "m.login.dummy");
    if (!dummyFlow) throw new Error(`no m.login.dummy flow offered: ${JSON.stringify(authData)}`);
    if (typeof authData.session !== "string") throw new Error(`no UIA session: ${JSON.stringify(authData)}`);

    const ia = new sdk.InteractiveAuth({
        matrixClient: anon,
        authData,
        supportedStages: ["m.login.dummy"],
        doRequest: (auth) =>
            anon.registerRequest({
                username,
                password,
                initial_device_display_name: "js-core register",
                ...(auth ? { auth } : {}),
            }),
        stateUpdated: () => {},
        requestEmailToken: async () => {
            throw new Error("email stage not supported by this test");
        },
    });
    return ia.attemptAuth();
}

export async function login(hs, username, password) {
    const anon = sdk.createClient({ baseUrl: hs.baseUrl, logger: quietLogger });
    return anon.loginRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user: username },
        password,
        initial_device_display_name: "js-core login",
    });
}

/**
 * Starts the SDK sync loop with a timeline limit large enough that no gap is
 * expected; `timeline` adds to the timeline filter, `threadSupport` turns on
 * the SDK's threads.
 */
export async function startSyncing(client, { timeoutMs, timeline = {}, threadSupport = false }) {
    const filter = new sdk.Filter(client.getUserId());
    filter.setDefinition({ room: { timeline: { limit: 1000, ...timeline } } });
    const ready = new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
            client.removeListener(sdk.ClientEvent.Sync, onSync);
            reject(new Error(`${client.getUserId()}: first sync not PREPARED within ${timeoutMs} ms`));
        }, timeoutMs);
        const onSync = (state, _prev, data) => {
            if (state === sdk.SyncState.Prepared) {
                clearTimeout(timer);
                client.removeListener(sdk.ClientEvent.Sync, onSync);
                resolve();
            } else if (state === sdk.SyncState.Error) {
                clearTimeout(timer);
                client.removeListener(sdk.ClientEvent.Sync, onSync);
                reject(new Error(`${client.getUserId()}: sync error: ${data?.error?.message ?? "unknown"}`));
            }
        };
        client.on(sdk.ClientEvent.Sync, onSync);
    });
    await client.startClient({ filter, lazyLoadMembers: false, threadSupport });
    await ready;
}
