"""Upstream pools, failover and health (issue 19) over real sockets.

Real ``twistd -n wsgate`` gateways, real Node ``ws`` upstreams
(tests/peers/upstream.js) and Python ``websockets`` clients: a server killed
under load, a black hole that never answers, servers that answer 403 or 503,
refused ports, passive health (``max_fails``/``fail_timeout``), active health
checks (``health_check``, ``rise``, ``fall``), ``/upstreams`` summed over
``workers = 2`` and ``wsgate check`` printing the pools. Balance itself is
tested in test_pools_balance.py.
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from harness import (
    NodeUpstream,
    admin_text,
    free_port,
    metric,
    start_gateway,
    write_config,
)
from pool_helpers import ADMIN, TOKEN, key, metrics, poll, run, upstreams

LISTENERS = ("main", "admin")


# ----------------------------------------------------------------- helpers


@pytest.fixture
def stack():
    """Everything a test starts (gateways, Node servers, sockets): stopped at teardown,
    last started first, even when the test failed half-way."""
    items = []
    yield items
    problems = []
    for item in reversed(items):
        try:
            if isinstance(item, socket.socket):
                item.close()
            else:
                item.stop()
        except Exception as e:  # keep stopping the rest; report at the end
            problems.append(f"{item!r}: {e}")
    if problems:
        pytest.fail("teardown:\n" + "\n".join(problems), pytrace=False)


def node(stack, **env):
    upstream = NodeUpstream(env={k: str(v) for k, v in env.items()})
    stack.append(upstream)
    return upstream


def gateway(stack, tmp_path, extra, base=None):
    kwargs = {"base": base} if base is not None else {}
    gw = start_gateway(tmp_path, ADMIN + extra, listeners=LISTENERS, **kwargs)
    stack.append(gw)
    return gw


def pool_config(urls, settings="", route="", name="app"):
    return f"""
[upstream:{name}]
servers = {", ".join(urls)}
{settings}

[route:{name}]
path = /{name}
upstream = @{name}
{route}
"""


def upstream_events(gw):
    return [(e["event"], e.get("server"), e.get("why")) for e in list(gw.events)
            if e.get("event", "").startswith("wsgate.upstream.")]


def failures(gw, server_key, reason, pool="app"):
    value = metric(metrics(gw), "wsgate_upstream_failures_total", pool=pool,
                   server=server_key, reason=reason)
    return 0 if value is None else value


class Refused:
    """A handshake the gateway answered with an HTTP status instead of 101."""

    def __init__(self, status, headers):
        self.status, self.headers = status, headers

    def __repr__(self):
        return f"Refused({self.status})"


async def handshake(url):
    """``(ws, first message)`` for a 101 (the /whoami servers send 'port:N' first), or
    a :class:`Refused`."""
    try:
        ws = await connect(url, open_timeout=10, ping_interval=None)
    except InvalidStatus as e:
        return Refused(e.response.status_code, e.response.headers)
    first = await asyncio.wait_for(ws.recv(), 5)
    return ws, first


async def close_all(clients):
    await asyncio.gather(*(ws.close() for ws in clients), return_exceptions=True)


def port_of(first):
    assert first.startswith("port:"), first
    return int(first[len("port:"):])


# ----------------------------------------------------------------- 1. a server dies


def test_a_killed_server_costs_its_clients_only_and_comes_back_after_rise(tmp_path, stack):
    ports = [free_port() for _ in range(3)]
    nodes = [node(stack, PORT=port) for port in ports]
    victim, victim_key = nodes[2], key(ports[2])
    gw = gateway(stack, tmp_path, pool_config(
        [f"ws://127.0.0.1:{port}/whoami" for port in ports],
        # max_fails = 0: the health checks alone decide down and up here (passive health
        # and its interplay with the checks are the next tests')
        "balance = least_conn\nmax_fails = 0\nhealth_check = 500ms\nfall = 2\nrise = 2"))

    async def scenario():
        clients = []
        for _ in range(60):
            ws, first = await handshake(gw.url("/app"))
            clients.append((ws, port_of(first)))
        placed = [port for _, port in clients]
        assert {port: placed.count(port) for port in ports} == {port: 20 for port in ports}

        # SIGKILL: no close frame, no FIN from the application; the kernel resets.
        victim.proc.kill()
        victim.proc.wait()
        # new handshakes right away, before two health checks (1 s) could notice
        concurrent = await asyncio.gather(*(handshake(gw.url("/app")) for _ in range(30)))
        sequential = [await handshake(gw.url("/app")) for _ in range(30)]
        fresh = concurrent + sequential
        refused = [result for result in fresh if isinstance(result, Refused)]
        assert refused == [], f"{len(refused)} of 60 handshakes failed: {refused[:5]}"
        fresh_ports = [port_of(first) for _, first in fresh]
        assert ports[2] not in fresh_ports
        # the handshakes did meet the dead server: failover, not luck
        tried_dead = (await asyncio.to_thread(upstreams, gw))[victim_key]["failures"]
        assert tried_dead.get("refused", 0) >= 1, tried_dead

        # exactly the victim's clients got 1014; every other one still echoes
        for ws, port in clients:
            if port == ports[2]:
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), 5)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1014, \
                    closed.value
            else:
                await ws.send("still here")
                assert await asyncio.wait_for(ws.recv(), 5) == "echo: still here"
        for ws, _ in fresh:
            await ws.send("new")
            assert await asyncio.wait_for(ws.recv(), 5) == "echo: new"
        return [ws for ws, _ in clients] + [ws for ws, _ in fresh]

    open_clients = run(scenario())

    # the health checks mark it down (fall = 2)
    down = gw.wait_event(lambda e: e.get("event") == "wsgate.upstream.down"
                         and e.get("server") == victim_key, timeout=10)
    assert down["pool"] == "app" and down["why"] and "connections" in down
    state = poll(lambda: upstreams(gw)[victim_key], lambda s: s["state"] == "down")
    assert state["last_check"] and state["last_check"]["ok"] is False
    assert metric(metrics(gw), "wsgate_upstream_up", pool="app", server=victim_key) == 0
    assert {k: s["state"] for k, s in upstreams(gw).items() if k != victim_key} == \
        {key(ports[0]): "up", key(ports[1]): "up"}

    # restart it on the same port: up again after rise, and it takes connections
    restarted_at = time.time()
    node(stack, PORT=ports[2])
    up = gw.wait_event(lambda e: e.get("event") == "wsgate.upstream.up"
                       and e.get("server") == victim_key, timeout=10)
    assert up["pool"] == "app" and up["why"]
    state = upstreams(gw)[victim_key]
    assert state["state"] == "up", (state, time.time() - restarted_at, upstream_events(gw))
    assert metric(metrics(gw), "wsgate_upstream_up", pool="app", server=victim_key) == 1

    async def after():
        results = [await handshake(gw.url("/app")) for _ in range(10)]
        assert not [r for r in results if isinstance(r, Refused)], results
        placed = [port_of(first) for _, first in results]
        await close_all([ws for ws, _ in results] + open_clients)
        return placed

    placed = run(after())
    # least_conn: the empty server takes every new connection until it catches up
    assert placed == [ports[2]] * 10, placed
    assert gw.stop() == 0


def test_a_server_back_after_rise_is_up_even_if_passive_health_had_taken_it_out(
        tmp_path, stack):
    """The health checks are the authority once they say rise: the ``up`` event, the
    state in /upstreams, wsgate_upstream_up and the balancer agree."""
    port = free_port()
    steady = node(stack)
    flaky = node(stack, PORT=port)
    flaky_key = key(port)
    gw = gateway(stack, tmp_path, pool_config(
        [f"ws://127.0.0.1:{steady.port}/whoami", f"ws://127.0.0.1:{port}/whoami"],
        "max_fails = 1\nfail_timeout = 60s\nhealth_check = 500ms\nfall = 2\nrise = 2"))

    async def kill_and_fail_over():
        held = [await handshake(gw.url("/app")) for _ in range(2)]  # one on each
        flaky.proc.kill()
        flaky.proc.wait()
        results = [await handshake(gw.url("/app")) for _ in range(3)]
        await close_all([ws for ws, _ in held + results])
        return results

    results = run(kill_and_fail_over())
    assert [port_of(first) for _, first in results] == [steady.port] * 3
    assert upstreams(gw)[flaky_key]["failures"].get("refused", 0) >= 1  # passive: out
    poll(lambda: upstreams(gw)[flaky_key], lambda s: s["state"] == "down")
    node(stack, PORT=port)
    gw.wait_event(lambda e: e.get("event") == "wsgate.upstream.up"
                  and e.get("server") == flaky_key, timeout=10)
    state = upstreams(gw)[flaky_key]
    assert state["state"] == "up", (state, upstream_events(gw))
    assert metric(metrics(gw), "wsgate_upstream_up", pool="app", server=flaky_key) == 1

    async def lands_there():
        ws, first = await handshake(gw.url("/app"))  # least_conn: the empty server
        await ws.close()
        return port_of(first)

    assert run(lands_there()) == port
    assert gw.stop() == 0


def test_a_backup_takes_connections_only_when_no_primary_is_left(tmp_path, stack):
    primary, backup = node(stack), node(stack)
    gw = gateway(stack, tmp_path, pool_config(
        [f"ws://127.0.0.1:{primary.port}/whoami", f"ws://127.0.0.1:{backup.port}/whoami backup"]))

    async def ten():
        results = [await handshake(gw.url("/app")) for _ in range(10)]
        assert not [r for r in results if isinstance(r, Refused)], results
        await close_all([ws for ws, _ in results])
        return [port_of(first) for _, first in results]

    assert run(ten()) == [primary.port] * 10  # the backup idles while the primary is up
    primary.proc.kill()
    primary.proc.wait()
    assert run(ten()) == [backup.port] * 10  # failover to it, then it alone
    assert upstreams(gw)[key(primary.port)]["failures"].get("refused", 0) >= 1
    assert gw.stop() == 0


# ----------------------------------------------------------------- 2. a black hole


def black_hole(stack, backlog_full):
    """A listening socket nobody accepts on. With *backlog_full*, its accept queue is
    filled first, so the kernel drops the gateway's SYNs (the connect times out);
    otherwise the kernel completes the connection and nobody ever answers the upgrade."""
    hole = socket.socket()
    stack.append(hole)
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)  # Linux queues backlog + 1 completed connections
    port = hole.getsockname()[1]
    if backlog_full:
        for _ in range(3):
            filler = socket.socket()
            stack.append(filler)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        time.sleep(0.2)
    return port


@pytest.mark.parametrize("backlog_full", [False, True], ids=["silent", "syn-dropped"])
def test_a_black_hole_costs_one_connect_timeout_then_the_next_server_answers(
        tmp_path, stack, backlog_full):
    hole = black_hole(stack, backlog_full)
    working = node(stack)
    gw = gateway(stack, tmp_path, pool_config(
        [f"ws://127.0.0.1:{hole}/whoami", f"ws://127.0.0.1:{working.port}/whoami"],
        "balance = round_robin\nconnect_timeout = 1s",  # round robin starts with the first
        route="upstream_timeout = 5s"))

    async def scenario():
        started = time.monotonic()
        ws, first = await handshake(gw.url("/app"))
        took = time.monotonic() - started
        await ws.send("through")
        assert await ws.recv() == "echo: through"
        await ws.close()
        return first, took

    first, took = run(scenario())
    assert port_of(first) == working.port
    # the feature: one connect_timeout (1 s), not the 5 s budget, not nothing
    assert 0.9 <= took < 2.5, took
    assert failures(gw, key(hole), "timeout") == 1
    assert upstreams(gw)[key(hole)]["failures"] == {"timeout": 1}
    assert upstreams(gw)[key(working.port)]["failures"] == {}
    assert gw.stop() == 0


# ----------------------------------------------------------------- 3.-5. none accepts


def test_a_4xx_from_every_server_is_a_502_after_one_try(tmp_path, stack):
    nodes = [node(stack) for _ in range(3)]
    gw = gateway(stack, tmp_path, pool_config(
        [f"ws://127.0.0.1:{n.port}/reject" for n in nodes], "tries = 3"))

    async def scenario():
        return [await handshake(gw.url("/app")) for _ in range(3)]

    results = run(scenario())
    assert [getattr(r, "status", r) for r in results] == [502] * 3
    servers = upstreams(gw)
    # one try per handshake: 3 handshakes, 3 tries in all, every one a 4xx
    assert sum(s["failures"].get("http_4xx", 0) for s in servers.values()) == 3, servers
    assert all(set(s["failures"]) <= {"http_4xx"} for s in servers.values()), servers
    text = metrics(gw)
    assert sum(metric(text, "wsgate_upstream_failures_total", pool="app", server=key(n.port),
                      reason="http_4xx") or 0 for n in nodes) == 3
    assert metric(text, "wsgate_upstream_pool_connect_seconds_count", pool="app",
                  result="error") == 3
    assert {s["state"] for s in servers.values()} == {"up"}  # 4xx is no failure of the server
    assert gw.stop() == 0


def test_a_5xx_from_every_server_is_a_502_after_tries_servers(tmp_path, stack):
    nodes = [node(stack, UPGRADE_STATUS=503) for _ in range(3)]
    urls = [f"ws://127.0.0.1:{n.port}/whoami" for n in nodes]
    gw = gateway(stack, tmp_path, pool_config(urls, "tries = 3")
                 + pool_config(urls, "tries = 2", name="two"))

    def refusals():
        return [sum(1 for e in list(n.events) if e.get("event") == "refused") for n in nodes]

    async def one(path):
        return await handshake(gw.url(path))

    result = run(one("/app"))
    assert getattr(result, "status", result) == 502
    assert poll(refusals, lambda counts: sum(counts) >= 3) == [1, 1, 1]
    servers = upstreams(gw)
    assert [servers[key(n.port)]["failures"] for n in nodes] == [{"http_5xx": 1}] * 3

    result = run(one("/two"))
    assert getattr(result, "status", result) == 502
    poll(refusals, lambda counts: sum(counts) >= 5)
    time.sleep(0.3)  # a third try would have reached a server by now
    assert sum(refusals()) == 5, refusals()
    two = upstreams(gw, "two")
    assert sorted(s["failures"].get("http_5xx", 0) for s in two.values()) == [0, 1, 1]
    assert gw.stop() == 0


def test_every_server_refused_is_a_503_with_retry_after(tmp_path, stack):
    ports = [free_port() for _ in range(3)]
    gw = gateway(stack, tmp_path, pool_config(
        [f"ws://127.0.0.1:{port}/whoami" for port in ports], "tries = 3"))

    result = run(handshake(gw.url("/app")))
    assert isinstance(result, Refused) and result.status == 503, result
    assert result.headers.get("Retry-After"), dict(result.headers)
    servers = upstreams(gw)
    assert [servers[key(port)]["failures"] for port in ports] == [{"refused": 1}] * 3
    assert [failures(gw, key(port), "refused") for port in ports] == [1, 1, 1]
    assert gw.stop() == 0


# ----------------------------------------------------------------- 6. passive health


def test_passive_health_takes_a_failing_server_out_for_fail_timeout(tmp_path, stack):
    dead = free_port()
    working = node(stack)
    dead_key = key(dead)
    gw = gateway(stack, tmp_path, pool_config(
        [f"ws://127.0.0.1:{dead}/whoami", f"ws://127.0.0.1:{working.port}/whoami"],
        "balance = round_robin\nmax_fails = 2\nfail_timeout = 3s"))

    def through(count):
        async def scenario():
            results = [await handshake(gw.url("/app")) for _ in range(count)]
            refused = [r for r in results if isinstance(r, Refused)]
            await close_all([r[0] for r in results if not isinstance(r, Refused)])
            assert refused == [], refused
            return [port_of(first) for _, first in results]
        return run(scenario())

    # round robin sends every other handshake to the dead port first: two of them fail
    # over, and the second failure takes it out
    for _ in range(10):
        assert through(1) == [working.port]
        state = upstreams(gw)[dead_key]
        if state["state"] == "failed":
            break
    assert state["state"] == "failed", state
    assert state["failures"] == {"refused": 2}
    assert metric(metrics(gw), "wsgate_upstream_up", pool="app", server=dead_key) == 0
    down = gw.wait_event(lambda e: e.get("event") == "wsgate.upstream.down"
                         and e.get("server") == dead_key, timeout=5)
    assert down["pool"] == "app"

    # while it is out, no handshake tries it
    assert through(20) == [working.port] * 20
    state = upstreams(gw)[dead_key]
    assert state["state"] == "failed", "the 20 handshakes outlasted fail_timeout"
    assert state["failures"] == {"refused": 2}

    # after fail_timeout it is up again, and one try decides: it fails, it is out again
    state = poll(lambda: upstreams(gw)[dead_key], lambda s: s["state"] != "failed",
                 timeout=10)
    assert state["state"] == "up"
    for _ in range(4):
        assert through(1) == [working.port]
        if upstreams(gw)[dead_key]["failures"] != {"refused": 2}:
            break
    state = upstreams(gw)[dead_key]
    assert state["failures"] == {"refused": 3}, state
    assert state["state"] == "failed", state
    assert through(6) == [working.port] * 6
    assert upstreams(gw)[dead_key]["failures"] == {"refused": 3}
    assert gw.stop() == 0


# ----------------------------------------------------------------- 7. workers = 2

WORKERS_BASE = """
[wsgate]
node_id = pool
log_format = json
workers = 2

[listen:main]
endpoint = tcp:0:interface=127.0.0.1
"""


def test_upstreams_on_the_parent_sums_the_workers(tmp_path, stack):
    nodes = [node(stack) for _ in range(2)]
    disabled = free_port()
    gw = gateway(stack, tmp_path, pool_config(
        [f"ws://127.0.0.1:{n.port}/whoami" for n in nodes]
        + [f"ws://127.0.0.1:{disabled}/whoami down"]), base=WORKERS_BASE)
    poll(lambda: admin_text(gw, "GET", "/healthz"),
         lambda answer: answer[0] == 200 and len(json.loads(answer[1])["workers"]) == 2,
         timeout=20, interval=0.2)

    async def scenario():
        # 20 clients, opened concurrently so that both workers accept some (the sum means
        # something only then); a few more batches if the kernel gave them all to one
        results, listed = [], []
        while len(results) < 100:
            results += await asyncio.gather(*(handshake(gw.url("/app")) for _ in range(20)))
            assert not [r for r in results if isinstance(r, Refused)], results
            status, body = await asyncio.to_thread(admin_text, gw, "GET", "/connections",
                                                   TOKEN)
            listed = json.loads(body)["connections"]
            if {entry["worker"] for entry in listed} == {0, 1}:
                break
        placed = [port_of(first) for _, first in results]
        pools = await asyncio.to_thread(upstreams, gw)
        await close_all([ws for ws, _ in results])
        return placed, listed, pools

    placed, listed, servers = run(scenario())
    assert {entry["worker"] for entry in listed} == {0, 1}, listed
    assert len(listed) == len(placed)
    assert sum(s["connections"] for s in servers.values()) == len(placed)
    assert {k: s["connections"] for k, s in servers.items()} == {
        key(nodes[0].port): placed.count(nodes[0].port),
        key(nodes[1].port): placed.count(nodes[1].port), key(disabled): 0}
    for n in nodes:
        assert servers[key(n.port)]["workers"] == {"0": "up", "1": "up"}
        assert servers[key(n.port)]["state"] == "up"
    assert servers[key(disabled)]["workers"] == {"0": "disabled", "1": "disabled"}
    assert admin_text(gw, "GET", "/upstreams")[0] == 401  # the token is required
    # every connection closed: the sums come back to 0
    poll(lambda: upstreams(gw), lambda s: sum(entry["connections"] for entry in s.values()) == 0)
    assert gw.stop() == 0


# ----------------------------------------------------------------- 8. wsgate check


def test_check_prints_the_pools(tmp_path):
    path = write_config(tmp_path, """
        [listen:main]
        endpoint = tcp:0:interface=127.0.0.1

        [upstream:app]
        servers = ws://10.0.0.1:9001/ws, ws://10.0.0.2:9002/ws weight=2, ws://10.0.0.3:9003/ws backup
        tries = 2
        connect_timeout = 1500ms
        max_fails = 2
        fail_timeout = 3s
        health_check = 500ms
        fall = 2

        [upstream:rooms]
        servers = ws://10.0.1.1:9001/{room}, ws://10.0.1.2:9001/{room} drain
        balance = hash
        hash_key = {room}

        [route:app]
        path = /app
        upstream = @app

        [route:rooms]
        path = /rooms/{room}
        upstream = @rooms
        """)
    result = subprocess.run([sys.executable, "-m", "wsgate.cli", "check", str(path)],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path,
                            stdin=subprocess.DEVNULL, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    app = next(line for line in lines if line.startswith("[upstream:app] "))
    assert app.startswith("[upstream:app] balance=least_conn, tries=2, connect_timeout=1.5s")
    assert "passive health=2 fails in 3s" in app
    assert "health checks=every 500ms on /, rise 2, fall 2" in app
    rooms = next(line for line in lines if line.startswith("[upstream:rooms] "))
    assert rooms.startswith("[upstream:rooms] balance=hash on {room}, tries=3")
    assert "health checks=off" in rooms
    rows = [line.split() for line in lines if line.startswith("  ")]
    assert ["SERVER", "URL", "WEIGHT", "FLAGS"] in rows
    assert ["10.0.0.1:9001", "ws://10.0.0.1:9001/ws", "1", "-"] in rows
    assert ["10.0.0.2:9002", "ws://10.0.0.2:9002/ws", "2", "-"] in rows
    assert ["10.0.0.3:9003", "ws://10.0.0.3:9003/ws", "1", "backup"] in rows
    assert ["10.0.1.2:9001", "ws://10.0.1.2:9001/{room}", "1", "drain"] in rows
    # the table follows its pool's line
    assert lines.index(app) < lines.index(next(
        line for line in lines if line.strip().startswith("10.0.0.1:9001"))) < lines.index(rooms)
