#!/usr/bin/env python3
"""Kernel CPU of sending small UDP datagrams on loopback: one datagram per
sendto, against runs of GROUP datagrams sent as one UDP GSO message
(UDP_SEGMENT). The sender is pinned to CPU 0, a draining receiver to CPU 1;
the sender's system time per datagram is printed. On loopback the sender
also pays the receiving socket's network stack, as tessera-relay does in
bench/relay-peak.sh, so this is the floor under a relayed packet's send.

    python3 bench/udp-send-cost.py            # plain and GSO, groups 1 2 4 8
    N=500000 BYTES=1200 python3 bench/udp-send-cost.py
"""
import os
import resource
import socket
import struct
import time

UDP_SEGMENT = 103
N = int(os.environ.get("N", "200000"))
BYTES = int(os.environ.get("BYTES", "164"))


def run(gso, group):
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    dst = rx.getsockname()
    pid = os.fork()
    if pid == 0:
        os.sched_setaffinity(0, {1})
        rx.settimeout(1.0)
        try:
            while True:
                rx.recv(65536)
        except socket.timeout:
            pass
        os._exit(0)
    os.sched_setaffinity(0, {0})
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"x" * BYTES
    cmsg = [(socket.SOL_UDP, UDP_SEGMENT, struct.pack("H", BYTES))]
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    sent = 0
    while sent < N:
        if gso:
            tx.sendmsg([payload] * group, cmsg, 0, dst)
        else:
            for _ in range(group):
                tx.sendto(payload, dst)
        sent += group
        if sent % 2048 < group:
            time.sleep(0.0005)  # let the receiver drain
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    os.waitpid(pid, 0)
    return (r1.ru_stime - r0.ru_stime) * 1e6 / sent


if __name__ == "__main__":
    print(f"{N} datagrams of {BYTES} bytes; sender system CPU per datagram")
    for gso, group in [(False, 1), (True, 2), (True, 4), (True, 8), (False, 1)]:
        how = f"GSO, {group} per message" if gso else "one per sendto"
        print(f"{how:>22}: {run(gso, group):.2f} us")
