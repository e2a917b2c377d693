#!/usr/bin/env python3
"""Request latency of a homeserver back to back and after idle gaps.

    python3 bench/idle-wake.py --url http://127.0.0.1:8008 [--n 200] [--gaps 0,1,20]

One keep-alive connection; for each gap (milliseconds slept between two
requests) it times `whoami`, a typing notice and a message send in a room of
one member, then the same pattern against a plain TCP echo server in a child
process: the machine's own cost of waking an idle process, which the server
cannot avoid. Needs open registration with `m.login.dummy` (as the configs
of `tessera-loadtest server-config` have). Prints p50/p90/p99 in ms.
"""

import argparse
import http.client
import json
import os
import secrets
import socket
import time
import urllib.parse


def pct(samples, q):
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * q))]


def summary(name, gap, samples):
    return f"{name:<8} gap {gap:>3} ms: p50 {pct(samples, 0.5):6.3f}  p90 {pct(samples, 0.9):6.3f}  p99 {pct(samples, 0.99):6.3f} ms"


class Api:
    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        self.conn = http.client.HTTPConnection(u.hostname, u.port or 80)
        self.token = None

    def call(self, method, path, body=None):
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self.conn.request(method, "/_matrix/client/v3" + path, json.dumps(body) if body is not None else None, headers)
        res = self.conn.getresponse()
        data = res.read()
        return res.status, json.loads(data) if data else {}


def echo_server(sock):
    conn, _ = sock.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        data = conn.recv(4096)
        if not data:
            os._exit(0)
        conn.sendall(data)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--gaps", default="0,1,20")
    a = p.parse_args()
    gaps = [int(g) for g in a.gaps.split(",")]

    api = Api(a.url)
    user = "idle" + secrets.token_hex(4)
    status, first = api.call("POST", "/register", {"username": user, "password": "idle-wake-pass"})
    status, reg = api.call("POST", "/register", {"username": user, "password": "idle-wake-pass", "auth": {"type": "m.login.dummy", "session": first.get("session")}})
    if status != 200:
        raise SystemExit(f"registration failed: {status} {reg}")
    api.token = reg["access_token"]
    status, room = api.call("POST", "/createRoom", {})
    room_id = urllib.parse.quote(room["room_id"])
    user_id = urllib.parse.quote(reg["user_id"])
    txn = iter(range(10**9))
    kinds = {
        "whoami": lambda: api.call("GET", "/account/whoami"),
        "typing": lambda: api.call("PUT", f"/rooms/{room_id}/typing/{user_id}", {"typing": False}),
        "send": lambda: api.call("PUT", f"/rooms/{room_id}/send/m.room.message/t{next(txn)}", {"msgtype": "m.text", "body": "x"}),
    }
    for gap in gaps:
        for name, call in kinds.items():
            samples = []
            for _ in range(a.n):
                start = time.perf_counter()
                status, _ = call()
                samples.append((time.perf_counter() - start) * 1e3)
                if status != 200:
                    raise SystemExit(f"{name}: status {status}")
                if gap:
                    time.sleep(gap / 1e3)
            print(summary(name, gap, samples))

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    if os.fork() == 0:
        echo_server(sock)
    client = socket.create_connection(sock.getsockname())
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for gap in gaps:
        samples = []
        for _ in range(a.n):
            start = time.perf_counter()
            client.sendall(b"x" * 160)
            got = 0
            while got < 160:
                got += len(client.recv(4096))
            samples.append((time.perf_counter() - start) * 1e3)
            if gap:
                time.sleep(gap / 1e3)
        print(summary("echo", gap, samples))
    client.close()
    os.wait()


if __name__ == "__main__":
    main()
