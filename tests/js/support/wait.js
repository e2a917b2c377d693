// Bounded waiting on conditions: tests never sleep to synchronise; they poll
// or listen for a condition and fail once its deadline passes.

export const DEFAULT_TIMEOUT_MS = Number(process.env.TEST_WAIT_MS ?? 30000);

/**
 * Polls `condition` (sync or async) until it returns a truthy value, which is
 * returned. Rejects after `timeoutMs`, or at once if `condition` throws.
 */
export async function waitFor(condition, { timeoutMs = DEFAULT_TIMEOUT_MS, what = "condition", intervalMs = 50 } = {}) {
    const deadline = Date.now() + timeoutMs;
    let last;
    for (;;) {
        last = await condition();
        if (last) return last;
        if (Date.now() >= deadline) {
            throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
        }
        await new Promise((resolve) => setTimeout(resolve, intervalMs));
    }
}

/**
 * Resolves with the arguments of the first `event` emitted by `emitter` for
 * which `predicate(...args)` is true; rejects after `timeoutMs`.
 */
export function waitForEvent(emitter, event, predicate, { timeoutMs = DEFAULT_TIMEOUT_MS, what = event } = {}) {
    return new Promise((resolve, reject) => {
        const onEvent = (...args) => {
            let ok;
            try {
                ok = predicate(...args);
            } catch (err) {
                cleanup();
                reject(err);
                return;
            }
            if (ok) {
                cleanup();
                resolve(args);
            }
        };
        const timer = setTimeout(() => {
            cleanup();
            reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`));
        }, timeoutMs);
        const cleanup = () => {
            clearTimeout(timer);
            emitter.removeListener(event, onEvent);
        };
        emitter.on(event, onEvent);
    });
}

/** Runs `fn` over `items` with at most `limit` calls in flight; keeps result order. */
export async function mapLimit(items, limit, fn) {
    const results = new Array(items.length);
    let next = 0;
    const worker = async () => {
        while (next < items.length) {
            const i = next++;
            results[i] = await fn(items[i], i);
        }
    };
    await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
    return results;
}
