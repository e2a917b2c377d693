// Ordered steps that share state, for suites whose steps build on each
// other: a step that needs an earlier one's result fails (never skips)
// when that one did not produce it.
import { it, before, after } from "node:test";

/** State shared between steps, and `need(key)` to read it. */
export function sharedState() {
    const s = {};
    const need = (key) => {
        if (s[key] === undefined) throw new Error(`an earlier step did not produce '${key}'`);
        return s[key];
    };
    return { s, need };
}

/**
 * Inside a `describe`: starts `hs` before the steps; afterwards stops the
 * clients `clients()` returns and the server, keeping the server's work
 * directory when a step failed. Returns `step(name, fn)`.
 */
export function serverSteps(hs, clients) {
    let passed = true;
    before(async () => {
        await hs.start();
    });
    after(async () => {
        for (const c of clients()) c?.client.stopClient();
        await hs.kill();
        if (passed) hs.cleanup();
        else console.log(`# server workdir kept for inspection: ${hs.workdir}`);
    });
    return (name, fn) =>
        it(name, async (t) => {
            try {
                await fn(t);
            } catch (err) {
                passed = false;
                throw err;
            }
        });
}
