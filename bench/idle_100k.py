#!/usr/bin/env python3
"""100k idle WebSocket connections with pings on (a manual run, not part of CI or make bench).

Usage: .venv/bin/python bench/idle_100k.py [--connections 100000] [--workers 6]
                                            [--generators 6] [--hold 45]

The hard open-file limit here is 20,000 per process, so the gateway runs
``workers`` processes (each holds about connections/workers sockets) and the
load comes from ``generators`` Node processes, each from its own loopback
address (127.0.0.10, .11, ...) so that no source address runs out of ports.
Pings are on (``ping_interval = 20s``); the connections are held for ``hold``
seconds, so every one of them has answered at least one ping before the RSS
of the gateway's processes is read. Prints the connections reached, the time
to open them and the RSS per connection.
"""

import argparse
import json
import time

import benchlib as B


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=100000)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--generators", type=int, default=6)
    parser.add_argument("--hold", type=float, default=45)
    args = parser.parse_args()
    B.raise_nofile()
    import tempfile

    B.Proc.workdir = tempfile.mkdtemp(prefix="wsgate-idle-100k-")
    per_generator = args.connections // args.generators
    gateway = None
    generators = []
    try:
        gateway = B.start_wsgate(
            "wsgate-100k", "[route:echo]\npath = /echo\necho = yes\n", ping_interval="20s",
            wsgate_extra=f"workers = {args.workers}\nmax_connections = 200000\n", core=None)
        time.sleep(3)  # the workers adopt the socket
        baseline = sum(B.rss_kb(pid) for pid in gateway.proc.pids())
        started = time.monotonic()
        for k in range(args.generators):
            generators.append(B.Proc(f"gen-idle-{k}", [B.NODE, B.LOADGEN, json.dumps({
                "mode": "idle", "url": gateway.url("/echo"), "connections": per_generator,
                "concurrency": 100, "local_addresses": [f"127.0.0.{10 + k}"],
                "hold_max": args.hold + 600, "max_seconds": args.hold + 900})],
                core=None, cwd=B.HERE, stdin=True))
        opened = 0
        for gen in generators:
            event = gen.wait_for(lambda o: o.get("event") == "opened", 600, "opened")
            opened += event["connections"]
        open_seconds = time.monotonic() - started
        print(f"opened {opened} connections in {open_seconds:.0f}s; holding {args.hold:.0f}s "
              "with pings every 20s", flush=True)
        time.sleep(args.hold)
        pids = gateway.proc.pids()
        rss = sum(B.rss_kb(pid) for pid in pids)
        for gen in generators:
            gen.send("close\n")
        results = [gen.wait_for(lambda o: "result" in o, 120, "result")["result"]
                   for gen in generators]
        still_open = sum(r["still_open"] for r in results)
        pings = sum(r["pings"] for r in results)
        print(json.dumps({
            "connections_opened": opened, "still_open_after_hold": still_open,
            "pings_answered": pings, "seconds_to_open": round(open_seconds, 1),
            "gateway_processes": len(pids), "rss_total_mib": round(rss / 1024, 1),
            "rss_baseline_mib": round(baseline / 1024, 1),
            "rss_per_connection_kib": round((rss - baseline) / max(1, still_open), 2)}))
    finally:
        for gen in generators:
            gen.stop()
        if gateway is not None:
            gateway.stop()
        B.stop_all()


if __name__ == "__main__":
    main()
