#!/usr/bin/env python3
"""wsgate's benchmark suite: every scenario compares wsgate with its peers in one run.

usage: bench/run.py [--quick] [--only echo,proxy,pool,fanout,recovery,idle,handshake,workers]
                    [--compare-fast-paths] [--repeat N] [--no-setup]
       bench/idle_100k.py                 (manual: 100k idle connections over workers)

(``make bench`` runs it with the project's .venv.) Scenarios:

  echo       1, 100, 1000 connections x 64 B and 16 KiB request/response: wsgate's echo
             route vs bare Twisted+Autobahn, Python websockets, Node ws
  proxy      100 connections x 64 B and 16 KiB through wsgate's proxy route, nginx, a
             naive two-leg Autobahn relay, and directly, to one Node ws echo upstream
  pool       100 connections x 64 B and 16 KiB through wsgate's proxy route to a pool of
             three Node ws echo upstreams (balance = least_conn) vs nginx's upstream
             block of the same three (least_conn;), next to wsgate and nginx to one of
             them; and handshakes/s (new connection each, closed after the 101) through
             the pool vs through the single upstream (and the same through nginx)
  fanout     1k and 10k subscribers of one channel, one publisher at a paced rate
             (one message at a time, or bursts of 10 written at once):
             wsgate (in-memory broker, via Redis, and via Redis with ``history = 100``
             on the route: every publish recorded, issue 21's target is its CPU per
             delivery ≤ 1.2× that of Redis without history), a naive sendMessage loop,
             Node ws
  recovery   N clients of wsgate.v1.json note their position and leave, M messages are
             published, then all N reconnect at once with ?since=POS (route
             ``history`` ≥ M): seconds until every client has recovered all M, the
             gateway's CPU meanwhile (handshakes included) and per recovered message;
             wsgate's in-memory broker and Redis (1000 × 1000; --quick 200 × 200). No
             peer has history or recovery: nothing to compare with
  idle       N idle connections with pings on (30 s): RSS per connection
  handshake  new connection per handshake (close right after the 101): wsgate echo
             route with and without an apikey policy vs bare Autobahn
  workers    wsgate workers = 1 vs 2, 1000 x 64 B echo, unpinned (the generator
             shares the two cores with the workers)

The primary figure is the server's CPU time (utime + stime of the server process
and its children, from /proc/PID/stat) per message, read by the load generator at
the exact edges of its measurement window. The server runs alone on core 0, the
load generator (and the proxy upstream / Redis) on core 1. Results: a table on
stdout, bench/results/latest.json, bench/results/ratios.png and
bench/results/README-table.rst.
"""

import argparse
import atexit
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV_PY = os.path.join(ROOT, ".venv", "bin", "python")

if os.path.exists(VENV_PY) and os.path.realpath(sys.prefix) != os.path.realpath(
        os.path.join(ROOT, ".venv")) and not os.environ.get("WSGATE_BENCH_REEXEC"):
    # matplotlib, Twisted, Autobahn and wsgate live in the project's .venv
    os.environ["WSGATE_BENCH_REEXEC"] = "1"
    os.execv(VENV_PY, [VENV_PY, os.path.abspath(__file__), *sys.argv[1:]])

sys.path.insert(0, HERE)
import benchlib as B  # noqa: E402
import report  # noqa: E402

RESULTS = os.path.join(HERE, "results")
DEFAULT_SCENARIOS = ["echo", "proxy", "pool", "fanout", "recovery", "idle", "handshake",
                     "workers"]
ALL_SCENARIOS = DEFAULT_SCENARIOS
KEY = "bench-key-1"


def log(text):
    print(text, flush=True)


# ------------------------------------------------------------------ plan


def plan(args):
    """Sizes, counts and durations for --quick and the full run."""
    if args.quick:
        p = {
            "repeat": 1, "warmup": 0.5, "duration": 2.0,
            "echo": [(100, 64), (100, 16384), (1000, 64)],
            "proxy": [(100, 64), (100, 16384)],
            "pool": [(100, 64), (100, 16384)],
            "fanout": [(1000, 60, 20)],              # subscribers, messages, messages/s
            "recovery": [(200, 200)],                # clients, missed messages each
            "idle_connections": 2000, "idle_hold": 3.0,
            "handshake_duration": 2.0, "handshake_concurrency": 32,
        }
    else:
        p = {
            "repeat": 2, "warmup": 1.0, "duration": 5.0,
            "echo": [(c, s) for c in (1, 100, 1000) for s in (64, 16384)],
            "proxy": [(100, 64), (100, 16384)],
            "pool": [(100, 64), (100, 16384)],
            # 20k deliveries/s: no peer is saturated, so latency is delivery, not queueing;
            # 100k deliveries/s: the slower peers saturate (and then batch their writes)
            # bursts of 10 messages (one publisher write) at the same mean rates: what
            # per-iteration coalescing is for
            "fanout": [(1000, 200, 20), (10000, 20, 2), (1000, 1000, 100), (10000, 100, 10),
                       (1000, 1000, 100, 10), (10000, 100, 10, 10)],
            # issue 21: 1,000 clients reconnecting at once, 1,000 missed messages each
            "recovery": [(1000, 1000)],
            "idle_connections": 5000, "idle_hold": 35.0,
            "handshake_duration": 5.0, "handshake_concurrency": 32,
        }
    if args.repeat:
        p["repeat"] = args.repeat
    if args.duration:
        p["duration"] = args.duration
    if args.fanout:
        p["fanout"] = [tuple(int(x) for x in item.split(":")) for item in args.fanout.split(",")]
    if args.recovery:
        p["recovery"] = [tuple(int(x) for x in item.split(":"))
                         for item in args.recovery.split(",")]
    if args.echo:
        p["echo"] = [tuple(int(x) for x in item.split("x")) for item in args.echo.split(",")]
    if args.idle_connections:
        p["idle_connections"] = args.idle_connections
    return p


# ------------------------------------------------------------------ helpers


class Results:
    def __init__(self):
        self.runs = []        # every measurement
        self.errors = []      # peers or runs that failed, with the reason

    def add(self, scenario, config, peer, result, rep):
        record = {"scenario": scenario, "config": config, "peer": peer, "rep": rep, **result}
        self.runs.append(record)
        return record

    def error(self, scenario, peer, config, message):
        self.errors.append({"scenario": scenario, "peer": peer, "config": config,
                            "error": message[-1500:]})
        log(f"  !! {scenario} {peer} {config}: {message.splitlines()[0] if message else ''}")


PEER_FILTER = []


def start_peers(results, scenario, starters):
    """Start each peer (name -> zero-argument function); a failure skips that peer only."""
    peers = {}
    for name, start in starters.items():
        if PEER_FILTER and name not in PEER_FILTER:
            continue
        try:
            peers[name] = start()
        except B.PeerFailed as exc:
            results.error(scenario, name, None, str(exc))
    return peers


def rotated(items, k):
    items = list(items)
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]


def fmt_size(size):
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def per_unit(result, count_key):
    count = result.get(count_key) or 0
    return result["server_cpu_s"] / count * 1e6 if count else None


def summary_line(peer, r, unit_key, rate_key):
    lat = r.get("latency") or {}
    us = r.get("server_us")
    return (f"    {peer:18} {r.get(rate_key, 0):>10.0f}/s  server {us if us is not None else 0:7.2f} µs"
            f"  p50 {lat.get('p50_us') or 0:8.0f} µs  p99 {lat.get('p99_us') or 0:8.0f} µs"
            f"  server {r.get('server_util', 0) * 100:5.1f}%  gen {r.get('gen_util', 0) * 100:5.1f}%")


# ------------------------------------------------------------------ scenarios


def wsgate_variants(args):
    """(name, [wsgate] extra lines) for the wsgate peers of a scenario."""
    variants = [("wsgate", args.wsgate_extra)]
    if args.compare_fast_paths:
        variants.append(("wsgate-nofast", args.wsgate_extra + "fast_paths = no\n"))
    return variants


def measure_rr(args, p, results, scenario, name, peer, config, other=(), core=B.CLIENT_CORE,
               path="/echo"):
    """One request/response measurement of *peer* (echo, proxy, workers); None on failure.

    Adds ``server_us`` (server CPU per round trip; None for a peer without a
    process of its own) and records the result under *scenario*.
    """
    try:
        r = B.generate(f"gen-{scenario}-{name}", {
            "mode": "rr", "url": peer.url(path), "connections": config["connections"],
            "size": config["size"], "warmup": p["warmup"], "duration": p["duration"],
            "client": args.client,
        }, server=peer.proc, other=other, timeout=p["warmup"] + p["duration"] + 90, core=core)
    except B.PeerFailed as exc:
        results.error(scenario, name, config, str(exc))
        return None
    r["server_us"] = per_unit(r, "messages") if peer.proc else None
    return r


def scenario_echo(args, p, results):
    log("== echo: request/response, server CPU per round trip")
    starters = {}
    for name, extra in wsgate_variants(args):
        starters[name] = (lambda name=name, extra=extra: B.start_wsgate(
            name, "[route:echo]\npath = /echo\necho = yes\n", wsgate_extra=extra))
    starters["autobahn"] = lambda: B.start_python("autobahn", "autobahn_echo.py")
    starters["websockets"] = lambda: B.start_python("websockets", "websockets_echo.py")
    starters["node-ws"] = lambda: B.start_node("node-ws", "echo")
    peers = start_peers(results, "echo", starters)
    try:
        for rep in range(p["repeat"]):
            for i, (conns, size) in enumerate(p["echo"]):
                config = {"connections": conns, "size": size}
                log(f"  {conns} connections x {fmt_size(size)} (run {rep + 1}/{p['repeat']})")
                for name in rotated(peers, i + rep):
                    r = measure_rr(args, p, results, "echo", name, peers[name], config)
                    if r is None:
                        continue
                    results.add("echo", config, name, r, rep)
                    log(summary_line(name, r, "messages", "msgs_per_s"))
    finally:
        for peer in peers.values():
            peer.stop()


def scenario_proxy(args, p, results):
    log("== proxy: request/response through a proxy to one Node ws echo upstream")
    try:
        upstream = B.start_node("upstream", "echo", core=B.CLIENT_CORE)
    except B.PeerFailed as exc:
        results.error("proxy", "upstream", None, str(exc))
        return
    starters = {}
    route = f"[route:proxy]\npath = /echo\nupstream = ws://127.0.0.1:{upstream.port}/echo\n"
    for name, extra in wsgate_variants(args):
        starters[name] = (lambda name=name, extra=extra: B.start_wsgate(
            name, route, wsgate_extra=extra))
    starters["nginx"] = lambda: B.start_nginx("nginx", upstream.port, args.nofile,
                                              extra=args.nginx_directives)
    starters["naive-relay"] = lambda: B.start_python(
        "naive-relay", "naive_relay.py", f"ws://127.0.0.1:{upstream.port}/echo")
    peers = start_peers(results, "proxy", starters)
    if not PEER_FILTER or "direct" in PEER_FILTER:
        peers["direct"] = B.Peer("direct", None, upstream.port)
    try:
        for rep in range(p["repeat"]):
            for i, (conns, size) in enumerate(p["proxy"]):
                config = {"connections": conns, "size": size}
                log(f"  {conns} connections x {fmt_size(size)} (run {rep + 1}/{p['repeat']})")
                for name in rotated(peers, i + rep):
                    r = measure_rr(args, p, results, "proxy", name, peers[name], config,
                                   other=[upstream.proc])
                    if r is None:
                        continue
                    r["upstream_us"] = (r["other_cpu_s"] / r["messages"] * 1e6
                                        if r["messages"] else None)
                    results.add("proxy", config, name, r, rep)
                    log(summary_line(name, r, "messages", "msgs_per_s")
                        + f"  upstream {r['upstream_us'] or 0:.2f} µs")
    finally:
        for name, peer in peers.items():
            if peer.proc is not None:
                peer.stop()
        upstream.stop()


POOL_SIZE = 3
POOL_BALANCE = "least_conn"


def add_upstream_figures(r, used, upstreams, before, unit):
    """Add to the generator's result *r* how many upstreams the peer used, how their CPU
    split since *before*, and their CPU µs per *unit* (messages or handshakes)."""
    r["upstreams"] = len(used)
    r["upstream_split"] = cpu_split(upstreams, before)
    r["upstream_us"] = r["other_cpu_s"] / r[unit] * 1e6 if r[unit] else None


def cpu_split(upstreams, before):
    """Each upstream's share of the upstreams' CPU since *before* (a list of CPU seconds)."""
    spent = [max(0.0, u.proc.cpu_seconds() - b) for u, b in zip(upstreams, before)]
    total = sum(spent)
    return [round(x / total, 3) for x in spent] if total > 0 else None


def fmt_split(split):
    return "/".join(f"{x * 100:.0f}" for x in split) + "%" if split else "–"


def scenario_pool(args, p, results):
    """wsgate's upstream pool vs nginx's upstream block, and both vs one upstream.

    Three Node ws echo upstreams on the client core. Request/response: wsgate with
    ``upstream = @bench`` (the three, least_conn) vs nginx with ``upstream { least_conn;
    ... }``, next to wsgate and nginx proxying to the first of them, all in this run.
    Handshakes: a new connection per handshake through the pool vs through the single
    upstream. Each measurement records every upstream's share of the upstreams' CPU
    (a pool that sends everything to one server shows as 100/0/0%).
    """
    log(f"== pool: proxy to a pool of {POOL_SIZE} Node ws echo upstreams ({POOL_BALANCE}) "
        "vs one upstream; wsgate vs nginx")
    upstreams = []
    try:
        for k in range(POOL_SIZE):
            upstreams.append(B.start_node(f"upstream-{k + 1}", "echo", core=B.CLIENT_CORE))
    except B.PeerFailed as exc:
        results.error("pool", "upstream", None, str(exc))
        for u in upstreams:
            u.stop()
        return
    ports = [u.port for u in upstreams]
    single = upstreams[0]
    pool_routes = B.pool_routes(ports, POOL_BALANCE)
    single_route = f"[route:proxy]\npath = /echo\nupstream = ws://127.0.0.1:{single.port}/echo\n"
    starters = {}  # name -> start; (path, upstreams it uses) per name in `uses`
    uses = {}
    for name, extra in wsgate_variants(args):
        starters[name + "-pool"] = (lambda name=name, extra=extra: B.start_wsgate(
            name + "-pool", pool_routes, wsgate_extra=extra))
        uses[name + "-pool"] = ("/pool", upstreams)
        starters[name] = (lambda name=name, extra=extra: B.start_wsgate(
            name, single_route, wsgate_extra=extra))
        uses[name] = ("/echo", [single])
    starters["nginx-pool"] = lambda: B.start_nginx("nginx-pool", ports, args.nofile,
                                                   extra=args.nginx_directives,
                                                   balance=POOL_BALANCE)
    uses["nginx-pool"] = ("/echo", upstreams)
    starters["nginx"] = lambda: B.start_nginx("nginx", single.port, args.nofile,
                                              extra=args.nginx_directives)
    uses["nginx"] = ("/echo", [single])
    peers = start_peers(results, "pool", starters)
    try:
        for rep in range(p["repeat"]):
            for i, (conns, size) in enumerate(p["pool"]):
                config = {"connections": conns, "size": size}
                log(f"  {conns} connections x {fmt_size(size)} (run {rep + 1}/{p['repeat']})")
                for name in rotated(peers, i + rep):
                    path, used = uses[name]
                    before = [u.proc.cpu_seconds() for u in upstreams]
                    r = measure_rr(args, p, results, "pool", name, peers[name], config,
                                   other=[u.proc for u in used], path=path)
                    if r is None:
                        continue
                    add_upstream_figures(r, used, upstreams, before, "messages")
                    results.add("pool", config, name, r, rep)
                    log(summary_line(name, r, "messages", "msgs_per_s")
                        + f"  upstream {r['upstream_us'] or 0:.2f} µs"
                        f"  split {fmt_split(r['upstream_split'])}  bad {r.get('bad', 0)}")
        config = {"concurrency": p["handshake_concurrency"]}
        for rep in range(p["repeat"]):
            log(f"  handshakes, concurrency {p['handshake_concurrency']} "
                f"(run {rep + 1}/{p['repeat']})")
            for name in rotated(peers, rep):
                path, used = uses[name]
                before = [u.proc.cpu_seconds() for u in upstreams]
                try:
                    r = B.generate(f"gen-pool-hs-{name}", {
                        "mode": "handshake", "url": peers[name].url(path),
                        "concurrency": p["handshake_concurrency"], "warmup": p["warmup"],
                        "duration": p["handshake_duration"],
                    }, server=peers[name].proc, other=[u.proc for u in used],
                        timeout=p["warmup"] + p["handshake_duration"] + 60)
                except B.PeerFailed as exc:
                    results.error("pool-handshake", name, config, str(exc))
                    continue
                r["server_us"] = per_unit(r, "handshakes")
                add_upstream_figures(r, used, upstreams, before, "handshakes")
                results.add("pool-handshake", config, name, r, rep)
                log(summary_line(name, r, "handshakes", "handshakes_per_s")
                    + f"  refused {r['refused']} errors {r['errors']} timeouts "
                    f"{r.get('timeouts', 0)}  split {fmt_split(r['upstream_split'])}")
    finally:
        for peer in peers.values():
            peer.stop()
        for u in upstreams:
            u.stop()


FANOUT_HISTORY = 100  # the -redis-history peers' history (messages kept per channel)


def scenario_fanout(args, p, results):
    log("== fanout: one publisher, N subscribers, paced; server CPU per delivery")
    redis = None
    try:
        redis = B.start_redis("redis")
    except B.PeerFailed as exc:
        results.error("fanout", "redis", None, str(exc))
    route = B.FANOUT_ROUTE.format(history="")
    history_route = B.FANOUT_ROUTE.format(history=f"history = {FANOUT_HISTORY}\n")
    starters = {}
    for name, extra in wsgate_variants(args):
        starters[name] = (lambda name=name, extra=extra: B.start_wsgate(
            name, route, wsgate_extra=extra))
        if redis is not None:
            broker = B.REDIS_BROKER.format(port=redis.port)
            # issue 21: the same channel on the same Redis with every publish recorded
            # (XADD + PUBLISH in one EVAL) against plain PUBLISH
            for suffix, routes in (("-redis", route), ("-redis-history", history_route)):
                starters[name + suffix] = (
                    lambda peer=name + suffix, routes=routes, extra=extra, broker=broker:
                    B.start_wsgate(peer, routes + broker,
                                   wsgate_extra=extra + B.REDIS_BROKER_KEY))
    starters["naive-loop"] = lambda: B.start_python("naive-loop", "naive_fanout.py")
    starters["node-ws"] = lambda: B.start_node("node-ws", "broadcast")
    peers = start_peers(results, "fanout", starters)
    try:
        for rep in range(1):  # long runs; one repetition
            for i, (subs, messages, rate, *more) in enumerate(p["fanout"]):
                burst = more[0] if more else 1
                config = {"subscribers": subs, "messages": messages, "rate": rate, "size": 64}
                if burst > 1:
                    config["burst"] = burst
                log(f"  {subs} subscribers, {messages} messages at {rate}/s"
                    + (f" in bursts of {burst}" if burst > 1 else ""))
                for name in rotated(peers, i):
                    peer = peers[name]
                    other = [redis.proc] if "-redis" in name else []
                    try:
                        r = B.generate(f"gen-fanout-{name}", {
                            "mode": "fanout", "url": peer.url("/fanout"), "subscribers": subs,
                            "messages": messages, "rate": rate, "size": 64, "drain_timeout": 20,
                            "burst": burst,
                        }, server=peer.proc, other=other, timeout=messages / rate + 150)
                    except B.PeerFailed as exc:
                        results.error("fanout", name, config, str(exc))
                        continue
                    r["server_us"] = per_unit(r, "delivered")
                    if other:
                        r["redis_us"] = (r["other_cpu_s"] / r["delivered"] * 1e6
                                         if r["delivered"] else None)
                    results.add("fanout", config, name, r, rep)
                    lat = r["latency"]
                    log(f"    {name:20} {r['deliveries_per_s']:>10.0f}/s  server "
                        f"{r['server_us'] or 0:7.3f} µs/delivery  p50 {lat['p50_us'] or 0:8.0f} µs"
                        f"  p99 {lat['p99_us'] or 0:8.0f} µs  missing {r['missing']}"
                        f"  server {r['server_util'] * 100:5.1f}%  gen {r['gen_util'] * 100:5.1f}%"
                        + (f"  Redis {r['redis_us'] or 0:.3f} µs/delivery" if other else ""))
    finally:
        for peer in peers.values():
            peer.stop()
        if redis is not None:
            redis.stop()


RECOVERY_HISTORY = 1000  # the recovery route's history (at least the missed messages)


def scenario_recovery(args, p, results):
    """Recovery of missed messages by clients reconnecting at once (issue 21).

    loadgen.js's ``recover`` mode: N clients of ``wsgate.v1.json`` note their
    ``subscribed`` position and leave; one publisher sends M messages (the generator
    waits until a fresh client's position shows them all recorded); then all N
    reconnect at once with ``?since=POS``. The window runs from the first reconnect
    until every client has received its M messages (or ``recovery_failed``): its
    seconds, the gateway's CPU (the N handshakes included) and Redis's CPU. wsgate's
    in-memory broker and Redis; no peer has history or recovery.
    """
    log("== recovery: N clients reconnect at once with ?since and recover M missed messages")
    redis = None
    try:
        redis = B.start_redis("redis-recovery")
    except B.PeerFailed as exc:
        results.error("recovery", "redis", None, str(exc))
    history = max([RECOVERY_HISTORY] + [m for _, m in p["recovery"]])
    route = B.RECOVER_ROUTE.format(history=history)
    starters = {}
    for name, extra in wsgate_variants(args):
        starters[name] = (lambda name=name, extra=extra: B.start_wsgate(
            name, route, wsgate_extra=extra))
        if redis is not None:
            starters[name + "-redis"] = (lambda name=name, extra=extra: B.start_wsgate(
                name + "-redis", route + B.REDIS_BROKER.format(port=redis.port),
                wsgate_extra=extra + B.REDIS_BROKER_KEY))
    peers = start_peers(results, "recovery", starters)
    try:
        for rep in range(p["repeat"]):
            for i, (clients, messages) in enumerate(p["recovery"]):
                config = {"clients": clients, "messages": messages, "history": history}
                log(f"  {clients} clients x {messages} missed messages "
                    f"(run {rep + 1}/{p['repeat']})")
                wait = max(60, clients * messages // 10000)  # the generator's own limit
                for name in rotated(peers, i + rep):
                    peer = peers[name]
                    other = [redis.proc] if name.endswith("-redis") else []
                    try:
                        r = B.generate(f"gen-recovery-{name}", {
                            "mode": "recover", "url": peer.url("/recover"), "clients": clients,
                            "messages": messages, "timeout": wait,
                        }, server=peer.proc, other=other, timeout=wait + 150)
                    except B.PeerFailed as exc:
                        results.error("recovery", name, config, str(exc))
                        continue
                    r["server_us"] = per_unit(r, "delivered")
                    r["redis_cpu_s"] = r["other_cpu_s"] if other else None
                    results.add("recovery", config, name, r, rep)
                    log(f"    {name:18} {r['seconds']:7.2f} s  server {r['server_cpu_s']:6.2f} s"
                        f" CPU, {r['server_us'] or 0:6.2f} µs/message  recovered all "
                        f"{r['recovered_all']}/{clients}  failed {r['failed']}  dupes "
                        f"{r['dupes']}  recorded {r['recorded']}"
                        + (f"  Redis {r['other_cpu_s']:.2f} s" if other else "")
                        + f"  server {r['server_util'] * 100:5.1f}%  gen "
                        f"{r['gen_util'] * 100:5.1f}%  foreign {r['foreign_util'] * 100:4.0f}%")
    finally:
        for peer in peers.values():
            peer.stop()
        if redis is not None:
            redis.stop()


def idle_run(peer, connections, hold, name):
    """Open *connections* idle WebSockets to *peer*; RSS growth per connection."""
    url = peer.url("/idle")
    # warm-up: the first connections pay for imports, caches, buffers
    warm = B.Proc(f"gen-idle-warm-{name}", [B.NODE, B.LOADGEN, json.dumps({
        "mode": "idle", "url": url, "connections": 100, "hold_max": 30, "max_seconds": 60})],
        core=B.CLIENT_CORE, cwd=HERE, stdin=True)
    try:
        warm.wait_for(lambda o: o.get("event") == "opened", 60, "opened")
        warm.send("close\n")
        warm.wait_exit(30)
    finally:
        warm.stop()
    time.sleep(1.0)
    before = peer.proc.rss_kb()
    gen = B.Proc(f"gen-idle-{name}", [B.NODE, B.LOADGEN, json.dumps({
        "mode": "idle", "url": url, "connections": connections, "hold_max": hold + 120,
        "max_seconds": hold + 300})], core=B.CLIENT_CORE, cwd=HERE, stdin=True)
    try:
        cpu0 = peer.proc.cpu_seconds()
        opened = gen.wait_for(lambda o: o.get("event") == "opened", 180, "opened")
        time.sleep(hold)
        after = peer.proc.rss_kb()
        cpu1 = peer.proc.cpu_seconds()
        gen.send("close\n")
        gen.wait_exit(60)
        result = next((o["result"] for o in reversed(gen.read_objects()) if "result" in o), {})
    finally:
        gen.stop()
    n = opened["connections"]
    return {"connections": n, "failed": opened["failed"], "rss_before_kb": before,
            "rss_after_kb": after, "kb_per_connection": (after - before) / n if n else None,
            "still_open": result.get("still_open"), "pings_seen": result.get("pings"),
            "open_seconds": opened["seconds"], "hold_seconds": hold,
            "server_cpu_s": cpu1 - cpu0}


def scenario_idle(args, p, results):
    n, hold = p["idle_connections"], p["idle_hold"]
    log(f"== idle: {n} idle connections, pings every 30 s, held {hold:.0f} s; RSS per connection")
    starters = {}
    for name, extra in wsgate_variants(args):
        starters[name] = (lambda name=name, extra=extra: B.start_wsgate(
            name, "[route:idle]\npath = /idle\necho = yes\n", ping_interval="30s",
            wsgate_extra=extra))
    starters["autobahn"] = lambda: B.start_python("autobahn", "autobahn_echo.py", "--ping", "30")
    starters["websockets"] = lambda: B.start_python("websockets", "websockets_echo.py",
                                                    "--ping", "30")
    starters["node-ws"] = lambda: B.start_node("node-ws", "echo", "--ping", "30")
    config = {"connections": n, "ping_interval": 30}
    for name, start in starters.items():  # one at a time: RSS of one server at a time
        peers = start_peers(results, "idle", {name: start})
        if name not in peers:
            continue
        try:
            r = idle_run(peers[name], n, hold, name)
            results.add("idle", config, name, r, 0)
            log(f"    {name:18} {r['connections']} open ({r['failed']} failed), RSS "
                f"{r['rss_before_kb'] / 1024:.1f} -> {r['rss_after_kb'] / 1024:.1f} MiB: "
                f"{r['kb_per_connection'] or 0:.2f} KiB per connection; still open "
                f"{r['still_open']}")
        except B.PeerFailed as exc:
            results.error("idle", name, config, str(exc))
        finally:
            peers[name].stop()


def scenario_handshake(args, p, results):
    log("== handshake: new connection per handshake, close right after the 101")
    routes = ("[route:echo]\npath = /echo\necho = yes\n\n"
              f"[policy:k]\ntype = apikey\nkeys = {KEY}\n\n"
              "[route:private]\npath = /private\necho = yes\npolicies = k\n")
    starters = {}
    for name, extra in wsgate_variants(args):
        starters[name] = (lambda name=name, extra=extra: B.start_wsgate(
            name, routes, wsgate_extra=extra))
    starters["autobahn"] = lambda: B.start_python("autobahn", "autobahn_echo.py")
    peers = start_peers(results, "handshake", starters)
    targets = []  # (label, peer, path)
    for name, _ in wsgate_variants(args):
        if name in peers:
            targets.append((name, peers[name], "/echo"))
            targets.append((name + "+apikey", peers[name], "/private"))
    if "autobahn" in peers:
        targets.append(("autobahn", peers["autobahn"], "/echo"))
    config = {"concurrency": p["handshake_concurrency"]}
    try:
        for rep in range(p["repeat"]):
            log(f"  concurrency {p['handshake_concurrency']} (run {rep + 1}/{p['repeat']})")
            for label, peer, path in rotated(targets, rep):
                try:
                    r = B.generate(f"gen-hs-{label}", {
                        "mode": "handshake", "url": peer.url(path),
                        "headers": {"Authorization": f"Bearer {KEY}"},
                        "concurrency": p["handshake_concurrency"], "warmup": p["warmup"],
                        "duration": p["handshake_duration"],
                    }, server=peer.proc, timeout=p["warmup"] + p["handshake_duration"] + 60)
                except B.PeerFailed as exc:
                    results.error("handshake", label, config, str(exc))
                    continue
                r["server_us"] = per_unit(r, "handshakes")
                results.add("handshake", config, label, r, rep)
                log(summary_line(label, r, "handshakes", "handshakes_per_s")
                    + f"  refused {r['refused']} errors {r['errors']}")
    finally:
        for peer in peers.values():
            peer.stop()


def scenario_workers(args, p, results):
    """wsgate workers = 1 vs 2, echo 1000 x 64 B; nothing pinned (the workers need both cores)."""
    log("== workers: wsgate workers = 1 vs 2 (unpinned), 1000 connections x 64 B echo")
    config = {"connections": 1000, "size": 64}
    for workers in (1, 2):
        name = f"wsgate-w{workers}"
        extra = args.wsgate_extra + (f"workers = {workers}\n" if workers > 1 else "")
        peers = start_peers(results, "workers", {name: lambda: B.start_wsgate(
            name, "[route:echo]\npath = /echo\necho = yes\n", wsgate_extra=extra, core=None)})
        if name not in peers:
            continue
        try:
            time.sleep(1.0)
            for rep in range(p["repeat"]):
                r = measure_rr(args, p, results, "workers", name, peers[name], config,
                               core=None)
                if r is None:
                    continue
                r["server_processes"] = len(peers[name].proc.pids())
                results.add("workers", config, name, r, rep)
                log(summary_line(name, r, "messages", "msgs_per_s")
                    + f"  ({r['server_processes']} processes)")
        finally:
            peers[name].stop()


SCENARIOS = {"echo": scenario_echo, "proxy": scenario_proxy, "pool": scenario_pool,
             "fanout": scenario_fanout, "recovery": scenario_recovery, "idle": scenario_idle,
             "handshake": scenario_handshake, "workers": scenario_workers}


# ------------------------------------------------------------------ main


def _py_files(top):
    """{path relative to *top*: mtime} of the *.py files under *top*."""
    return {os.path.relpath(os.path.join(d, f), top): os.path.getmtime(os.path.join(d, f))
            for d, _, fs in os.walk(top) for f in fs if f.endswith(".py")}


def installed_wsgate_stale():
    """Whether the non-editable copy of wsgate in .venv is older than the sources, or
    lacks one of their modules (a package missing from setup.cfg's list is not installed)."""
    try:
        import wsgate
        installed = _py_files(os.path.dirname(wsgate.__file__))
        sources = _py_files(os.path.join(ROOT, "wsgate"))
        return (not set(sources) <= set(installed)
                or max(sources.values()) > max(installed.values()))
    except Exception:
        return True


def ensure_installed(args):
    if args.no_setup:
        if installed_wsgate_stale():
            # twistd runs from the run's temporary directory, so it would import the
            # older installed copy: measure the working tree instead, without installing
            os.environ["PYTHONPATH"] = ROOT + (
                os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
            log(f"   .venv's copy of wsgate is older than the sources or lacks some of them "
                f"(--no-setup): the gateway peers import the working tree (PYTHONPATH={ROOT})")
        return
    log("== setup (bench/setup.sh: nginx, node_modules, matplotlib; idempotent)")
    subprocess.run(["bash", os.path.join(HERE, "setup.sh")], check=True, timeout=900)
    # wsgate is installed non-editably: reinstall when a source file is newer
    if installed_wsgate_stale():
        log("   wsgate sources changed: pip install --no-deps . into .venv")
        subprocess.run([os.path.join(ROOT, ".venv", "bin", "pip"), "install", "-q", "--no-deps",
                        ROOT], check=True, timeout=600)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer sizes, shorter runs (~3 min)")
    parser.add_argument("--only", default="", help="comma-separated scenarios: "
                        + ", ".join(ALL_SCENARIOS))
    parser.add_argument("--repeat", type=int, default=0,
                        help="measurements per case (default 1 quick, 2 full); the figure "
                        "is the run with the lowest server CPU per unit")
    parser.add_argument("--duration", type=float, default=0, help="seconds per measurement")
    parser.add_argument("--idle-connections", type=int, default=0,
                        help="idle scenario's connections (default 2000 quick, 5000 full)")
    parser.add_argument("--echo", default="", help="echo cases, e.g. 100x64,1000x16384")
    parser.add_argument("--fanout", default="",
                        help="fan-out cases SUBSCRIBERS:MESSAGES:RATE[:BURST], e.g. 10000:100:10:10")
    parser.add_argument("--recovery", default="",
                        help="recovery cases CLIENTS:MESSAGES, e.g. 1000:1000")
    parser.add_argument("--compare-fast-paths", action="store_true",
                        help="add a wsgate peer with [wsgate] fast_paths = no")
    parser.add_argument("--wsgate-extra", default="",
                        help="extra [wsgate] lines for every wsgate peer, e.g. 'fast_paths = no'")
    parser.add_argument("--client", choices=("raw", "ws"), default="raw",
                        help="request/response client: raw frames (default) or npm ws clients")
    parser.add_argument("--nginx-directives", default="",
                        help="extra directives for nginx's proxy location, e.g. "
                        "'proxy_buffer_size 64k;'")
    parser.add_argument("--peers", default="",
                        help="only these peers, e.g. wsgate,autobahn (default: all)")
    parser.add_argument("--no-setup", action="store_true",
                        help="skip bench/setup.sh and the wsgate reinstall check")
    parser.add_argument("--output", default=None,
                        help="results directory (default bench/results for a complete full "
                        "run, bench/results/partial for --quick or a narrowed run, so that "
                        "the figures the README shows are only replaced by a full run)")
    args = parser.parse_args()
    args.wsgate_extra = "\n".join(x.strip() for x in args.wsgate_extra.split(";") if x.strip())
    if args.wsgate_extra:
        args.wsgate_extra += "\n"
    scenarios = [s.strip() for s in args.only.split(",") if s.strip()] or DEFAULT_SCENARIOS
    partial = (args.quick or scenarios != DEFAULT_SCENARIOS or args.peers or args.echo
               or args.fanout or args.recovery or args.duration or args.repeat or args.idle_connections
               or args.client != "raw" or args.nginx_directives or args.wsgate_extra
               or args.compare_fast_paths)
    if args.output is None:
        args.output = os.path.join(RESULTS, "partial") if partial else RESULTS
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")

    PEER_FILTER.extend(x.strip() for x in args.peers.split(",") if x.strip())
    args.nofile = B.raise_nofile()
    ensure_installed(args)
    p = plan(args)
    workdir = tempfile.mkdtemp(prefix="wsgate-bench-")
    B.Proc.workdir = workdir
    atexit.register(B.stop_all)

    def on_signal(signum, frame):
        B.stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    machine = B.machine_info()
    load_before = B.load_info()
    started = time.monotonic()
    date = datetime.datetime.now(datetime.timezone.utc)
    log(f"wsgate bench {'--quick ' if args.quick else ''}{date:%Y-%m-%d %H:%M} UTC on "
        f"{machine['nproc']} × {machine['cpu_model']}; load {load_before['loadavg']}"
        f"{'; wstest is running' if load_before['wstest_running'] else ''}; "
        f"pinning {'server core 0, generator core 1' if B.PIN else 'off'}; logs in {workdir}")
    if not B.PIN:
        log("   (fewer than 2 cores or no taskset: nothing is pinned)")
    results = Results()
    try:
        for scenario in scenarios:
            t0 = time.monotonic()
            SCENARIOS[scenario](args, p, results)
            log(f"   ({scenario}: {time.monotonic() - t0:.0f} s)")
    finally:
        B.stop_all()
    load_after = B.load_info()
    data = {
        "date": date.isoformat(timespec="seconds"), "quick": args.quick, "client": args.client,
        "partial": bool(partial), "argv": sys.argv[1:],
        "scenarios": scenarios, "plan": {k: v for k, v in p.items()},
        "machine": machine, "load_before": load_before, "load_after": load_after,
        "seconds": round(time.monotonic() - started, 1), "workdir": workdir,
        "runs": results.runs, "errors": results.errors,
    }
    data["summary"] = report.summarize(data)
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, "latest.json"), "w") as f:
        json.dump(data, f, indent=1)
    log("")
    log(report.text_report(data))
    rst = report.rst_report(data)
    with open(os.path.join(args.output, "README-table.rst"), "w") as f:
        f.write(rst)
    try:
        report.chart(data, os.path.join(args.output, "ratios.png"))
    except Exception as exc:  # the figures are in latest.json and the tables anyway
        log(f"chart not drawn: {exc}")
    log(f"\nwrote {args.output}/latest.json, README-table.rst, ratios.png "
        f"({data['seconds']:.0f} s; load before {load_before['loadavg']}, after "
        f"{load_after['loadavg']})")
    return 1 if results.errors and not results.runs else 0


if __name__ == "__main__":
    sys.exit(main())
