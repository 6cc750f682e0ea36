#!/usr/bin/env python3
"""What metrics cost per message: the echo route with ``metrics = yes`` and ``no``, same run.

Usage: .venv/bin/python bench/metrics_cost.py [--rounds 3] [--duration 5]

wsgate counts every message in plain integers on the connection object it
already holds and adds them up only when /metrics is scraped, so ``metrics =
no`` (which only turns the endpoint off) should cost the same per message; this
measures that claim instead of assuming it, alternating the two configs, and
scraping /metrics every second during the ``yes`` runs as Prometheus would.
"""

import argparse
import statistics
import tempfile
import threading
import urllib.request

import benchlib as B

ROUTE = "[route:echo]\npath = /echo\necho = yes\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    B.raise_nofile()
    B.Proc.workdir = tempfile.mkdtemp(prefix="wsgate-metrics-cost-")
    figures = {"yes": [], "no": []}
    try:
        for rnd in range(args.rounds):
            for setting in (("yes", "no") if rnd % 2 == 0 else ("no", "yes")):
                admin_port = B.free_port()
                peer = B.start_wsgate(
                    f"wsgate-metrics-{setting}-{rnd}",
                    ROUTE + f"[admin]\nendpoint = tcp:{admin_port}:interface=127.0.0.1\n",
                    wsgate_extra=f"metrics = {setting}\n")
                stop = threading.Event()

                def scrape():
                    while not stop.wait(1.0):
                        try:
                            urllib.request.urlopen(
                                f"http://127.0.0.1:{admin_port}/metrics", timeout=2).read()
                        except Exception:
                            pass
                scraper = threading.Thread(target=scrape)
                if setting == "yes":
                    scraper.start()
                try:
                    result = B.generate("gen", {
                        "mode": "rr", "url": peer.url("/echo"), "connections": 100,
                        "size": 64, "warmup": 1, "duration": args.duration},
                        server=peer.proc, timeout=args.duration + 60)
                finally:
                    stop.set()
                    if scraper.is_alive():
                        scraper.join()
                    peer.stop()
                us = result["server_cpu_s"] / result["messages"] * 1e6
                figures[setting].append(us)
                print(f"round {rnd + 1}: metrics = {setting}: {us:.1f} µs per round trip "
                      f"({result['msgs_per_s']:.0f}/s)", flush=True)
    finally:
        B.stop_all()
    yes, no = statistics.median(figures["yes"]), statistics.median(figures["no"])
    print(f"median: metrics = yes {yes:.1f} µs, no {no:.1f} µs per round trip: "
          f"ratio {yes / no:.3f}")


if __name__ == "__main__":
    main()
