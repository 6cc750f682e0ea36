#!/usr/bin/env python3
"""What each built-in policy costs per upgrade: ``check()`` in µs, measured in-process.

Usage: .venv/bin/python bench/policy_cost.py [--iterations N]

Each policy is built from a config-like section by its plugin factory and
asked about a realistic upgrade request (headers as a browser sends them).
The figure is the median of 5 runs of N calls each. scope = broker adds one
Redis round trip (not included: it is network latency, not CPU).
"""

import argparse
import statistics
import tempfile
import time

import jwt
from twisted.internet.task import Clock

from wsgate.http import parse_head
from wsgate.policies import PolicyContext, UpgradeRequest, discovered_factories

SECRET = "bench-secret-bench-secret-bench-secret!"


def request(i):
    token = jwt.encode({"sub": f"user{i % 100}", "exp": 4102444800}, SECRET, algorithm="HS256")
    head = parse_head(
        b"GET /chat/room1?api_key=k-100 HTTP/1.1\r\nHost: gw.example.com\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        b"Origin: https://app.example.com\r\nUser-Agent: Mozilla/5.0\r\n"
        b"Authorization: Bearer " + token.encode() + b"\r\nCookie: a=b\r\n\r\n")
    return UpgradeRequest("c", "chat", "main", f"198.51.100.{i % 250}", "gw.example.com",
                          "/chat/room1", {"api_key": ["k-100"]}, {"room": "room1"}, head)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=20000)
    args = parser.parse_args()
    keys = ", ".join(f"k-{i}=user{i}" for i in range(1000))
    sections = {
        "apikey (1000 keys, query)": ("apikey", {"keys": keys}),
        "jwt (HS256)": ("jwt", {"secret": SECRET}),
        "ratelimit (local, per ip)": ("ratelimit", {"rate": "1000000/s"}),
        "ratelimit + messages": ("ratelimit", {"rate": "1000000/s", "messages": "10/s"}),
        "firewall (4 networks)": ("firewall", {
            "allow": "10.0.0.0/8, 198.51.100.0/24, 2001:db8::/32", "deny": "10.6.6.0/24"}),
        "origin (2 patterns)": ("origin", {
            "allow": "https://app.example.com, https://*.example.org"}),
        "connlimit (per ip, released)": ("connlimit", {"max": "1000000"}),
    }
    factories = discovered_factories()
    context = PolicyContext(Clock(), tempfile.gettempdir())
    requests = [request(i) for i in range(256)]
    print(f"{'policy':34} {'µs per upgrade':>15}")
    for label, (kind, settings) in sections.items():
        policy = factories[kind](kind, settings, context)
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            for i in range(args.iterations):
                decision = policy.check(requests[i & 255])
                session = getattr(decision, "session", None)
                if session is not None:
                    session.closed()
            runs.append((time.perf_counter() - started) / args.iterations * 1e6)
        print(f"{label:34} {statistics.median(runs):15.2f}")


if __name__ == "__main__":
    main()
