// Loaded with `node --import` before the tests.
//
// matrix-js-sdk declares Node.js >= 22 but, of the newer built-ins, uses only
// Promise.withResolvers (added in Node.js 22). Supply it when the running
// Node.js lacks it, so the suite also runs on Node.js 20.
if (typeof Promise.withResolvers !== "function") {
    Object.defineProperty(Promise, "withResolvers", {
        configurable: true,
        writable: true,
        value: function withResolvers() {
            let resolve;
            let reject;
            const promise = new this((res, rej) => {
                resolve = res;
                reject = rej;
            });
            return { promise, resolve, reject };
        },
    });
}
