"""What the upstream pool tests over real sockets share: Node upstreams, gateways with an
admin listener, pool configs, reloads and the admin API's view of a pool.

Imported by the test_pools*.py modules (pytest finds the fixtures where a test module
imports them).
"""

import asyncio
import json
import signal
import textwrap
import time

import pytest

from harness import BASE_CONFIG, NodeUpstream, admin_text, start_gateway, write_config

TOKEN = "T0KEN"
ADMIN = f"""
[admin]
endpoint = tcp:0:interface=127.0.0.1
token = {TOKEN}
"""


def run(coro, timeout=120):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def nodes():
    """Four Node upstreams on 127.0.0.1, shared by a module's tests (none is killed)."""
    started = []
    try:
        for _ in range(4):
            started.append(NodeUpstream())
        yield started
    finally:
        for node in started:
            node.stop()


@pytest.fixture
def gateways(tmp_path):
    """``start(pool config, base=...)``: a gateway with an admin listener, stopped after
    the test."""
    started = []

    def start(extra, base=BASE_CONFIG):
        gw = start_gateway(tmp_path, ADMIN + extra, listeners=("main", "admin"), base=base)
        gw.base = base
        started.append(gw)
        return gw

    yield start
    for gw in started:
        assert gw.stop() == 0


def key(node_or_port):
    port = getattr(node_or_port, "port", node_or_port)
    return f"127.0.0.1:{port}"


def pool_config(servers, settings="", path="/app", template="/whoami"):
    """``[upstream:app]`` over *servers* (nodes, or ``(node, "weight=3")`` pairs) and a
    route to it."""
    entries = []
    for server in servers:
        node, flags = server if isinstance(server, tuple) else (server, "")
        entries.append(f"ws://127.0.0.1:{node.port}{template} {flags}".rstrip())
    return f"""
[upstream:app]
servers = {", ".join(entries)}
{textwrap.dedent(settings).strip()}

[route:app]
path = {path}
upstream = @app
"""


def reload(gw, extra):
    """Rewrite *gw*'s config with *extra* (as given to the ``gateways`` fixture), SIGHUP it
    and wait until it says the new generation is in force."""
    generation = 1 + max([1] + [e["generation"] for e in gw.events_named(
        "wsgate.config.reloaded")])
    write_config(gw.config_path.parent, textwrap.dedent(gw.base) + ADMIN + extra)
    gw.signal(signal.SIGHUP)
    gw.wait_event(lambda e: e.get("event") == "wsgate.config.reloaded"
                  and e.get("generation") == generation)


def upstreams(gw, pool="app"):
    """``/upstreams`` of *pool*: server key → its description."""
    status, body = admin_text(gw, "GET", "/upstreams", TOKEN)
    assert status == 200, body
    (found,) = [p for p in json.loads(body)["pools"] if p["pool"] == pool]
    return {server["server"]: server for server in found["servers"]}


def metrics(gw):
    """``GET /metrics`` (admin): the Prometheus text."""
    status, body = admin_text(gw, "GET", "/metrics", TOKEN)
    assert status == 200, body
    return body


def live(gw, pool="app"):
    """server key → live connections, as ``/upstreams`` says."""
    return {name: server["connections"] for name, server in upstreams(gw, pool).items()}


async def wait_until(read, done, timeout=10, interval=0.05):
    """Poll the blocking *read* (in a thread) until *done* of its value; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(read)
        if done(value):
            return value
        assert time.monotonic() < deadline, f"still {value}"
        await asyncio.sleep(interval)


def poll(read, done, timeout=15, interval=0.05):
    """Call *read* until *done* of its value; return the value (fail with the last one)."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"timed out; last value: {value}"
        time.sleep(interval)
