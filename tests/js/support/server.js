// Starts and stops the homeserver under test for the JavaScript suites.
//
// Configuration is written by tests/harness/hs.py (shared with the Python
// suites), which knows how to configure each server kind (HS_KIND=tessera or
// synapse). This module owns the process, so it can check the exit status.
import { execFileSync, spawn } from "node:child_process";
import { mkdtempSync, openSync, closeSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";

import { waitFor } from "./wait.js";

const HERE = dirname(fileURLToPath(import.meta.url));
const HS_PY = join(HERE, "..", "..", "harness", "hs.py");
const PYTHON = process.env.PYTHON ?? "python3";

async function versionsOk(baseUrl) {
    try {
        const res = await fetch(`${baseUrl}/_matrix/client/versions`, { signal: AbortSignal.timeout(2000) });
        await res.arrayBuffer();
        return res.status === 200;
    } catch {
        return false;
    }
}

export class HomeServer {
    constructor() {
        this.workdir = mkdtempSync(join(tmpdir(), "tessera-js-"));
        const out = execFileSync(PYTHON, [HS_PY, "prepare", "--workdir", this.workdir], {
            encoding: "utf8",
            stdio: ["ignore", "pipe", "inherit"],
        });
        this.launch = JSON.parse(out);
        this.kind = this.launch.kind;
        this.baseUrl = this.launch.base_url;
        this.serverName = this.launch.server_name;
        this.profile = this.launch.profile;
        this.proc = null;
        this.exited = null;
    }

    async start() {
        if (this.proc) throw new Error("server already running");
        const logFd = openSync(this.launch.log_file, "a");
        const proc = spawn(this.launch.argv[0], this.launch.argv.slice(1), {
            cwd: this.launch.cwd,
            env: { ...process.env, ...this.launch.env },
            stdio: ["ignore", logFd, logFd],
        });
        closeSync(logFd);
        this.proc = proc;
        this.exited = new Promise((resolve) => {
            proc.on("exit", (code, signal) => resolve({ code, signal }));
        });
        let earlyExit = null;
        this.exited.then((status) => {
            earlyExit = status;
        });
        await waitFor(
            async () => {
                if (earlyExit) {
                    throw new Error(
                        `${this.kind} exited (${JSON.stringify(earlyExit)}) before it was ready; log tail:\n${this.logTail()}`,
                    );
                }
                return versionsOk(this.baseUrl);
            },
            { timeoutMs: this.profile.ready_timeout_s * 1000, what: `${this.kind} to answer /versions`, intervalMs: 100 },
        );
    }

    /** Sends SIGTERM and waits for the exit; resolves to { code, signal }. */
    async stop() {
        if (!this.proc) throw new Error("server not running");
        const proc = this.proc;
        proc.kill("SIGTERM");
        const limitMs = this.profile.stop_timeout_s * 1000;
        let timer;
        const timeout = new Promise((resolve) => {
            timer = setTimeout(() => resolve(null), limitMs);
        });
        const status = await Promise.race([this.exited, timeout]);
        clearTimeout(timer);
        if (status === null) {
            proc.kill("SIGKILL");
            await this.exited;
            this.proc = null;
            throw new Error(`${this.kind} did not exit within ${limitMs} ms of SIGTERM`);
        }
        this.proc = null;
        return status;
    }

    async kill() {
        if (this.proc) {
            this.proc.kill("SIGKILL");
            await this.exited;
            this.proc = null;
        }
    }

    logTail(bytes = 4000) {
        try {
            const data = readFileSync(this.launch.log_file, "utf8");
            return data.slice(-bytes);
        } catch {
            return "<no log>";
        }
    }

    cleanup() {
        rmSync(this.workdir, { recursive: true, force: true });
    }
}
