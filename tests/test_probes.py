"""Probes and draining behind a load balancer (issue 18, items 1 and 2).

The admin endpoint's ``/livez`` and ``/readyz`` (one process and a worker pool),
a listener's ``health_path`` and ``[wsgate] drain_delay``: over real sockets, and
the handshake's probe answer in memory where that points at a line better.
"""

import asyncio
import json
import os
import signal
import socket
import ssl
import time

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from harness import (
    RedisServer,
    admin_text,
    metric,
    parse_response,
    raw_request,
    run,
    start_gateway,
    upgrade_request,
    write_config,
)
from wsgate import config, gateway as gateway_module
from wsgate.pubsub.memory import MemoryBroker
from wsgate.routing import build_router

BASE = """
[wsgate]
node_id = probes
log_format = json
drain_timeout = 10s
{core}

[listen:main]
endpoint = tcp:0:interface=127.0.0.1
health_path = /lb

[admin]
endpoint = tcp:0:interface=127.0.0.1
token = T0KEN

[route:echo]
path = /echo
echo = yes
"""

DRAIN_DELAY = 2.0


def base(core=""):
    return BASE.format(core=core)


def probe(gw, path):
    """``(status, JSON body)`` of an admin probe (no token)."""
    status, body = admin_text(gw, "GET", path)
    return status, json.loads(body)


def lb_check(port, path="/lb", request=None):
    """What a load balancer sees: ``(status, headers, body)`` of a plain GET of *path*."""
    request = request or f"GET {path} HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n".encode()
    return parse_response(raw_request(port, request))


def refusing(port):
    """Whether *port* refuses connections (its listener closed)."""
    try:
        lb_check(port)
    except ConnectionRefusedError:
        return True
    return False


def wait_for(check, timeout=15, what="the condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


async def close_code(ws, timeout=15):
    try:
        await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else None
    return "no close"


# ------------------------------------------------------------------ one process


def test_livez_and_readyz_answer_without_a_token(tmp_path):
    gw = start_gateway(tmp_path, "", base=base(), listeners=("main", "admin"))
    try:
        assert probe(gw, "/livez") == (200, {"status": "ok"})
        assert probe(gw, "/readyz") == (200, {"status": "ok", "broker": "none"})
        assert probe(gw, "/healthz")[0] == 200  # the detail is still there
        status, body = admin_text(gw, "GET", "/connections")
        assert status == 401  # the token still guards the rest
    finally:
        assert gw.stop() == 0


def test_health_path_answers_a_plain_get_before_routing(tmp_path):
    gw = start_gateway(tmp_path, "", base=base(), listeners=("main", "admin"))
    try:
        port = gw.port()
        status, headers, body = lb_check(port)
        assert (status, body) == (200, b"ok\n")
        assert headers["content-type"].startswith("text/plain")
        assert headers["connection"] == "close"
        assert int(headers["content-length"]) == len(body)
        # the forms load balancers send: HTTP/1.0 without Host, HEAD, a query string,
        # and an upgrade to that path (it wins over routing: no route is needed)
        assert lb_check(port, request=b"GET /lb HTTP/1.0\r\n\r\n")[:3:2] == (200, b"ok\n")
        status, headers, body = lb_check(port, request=b"HEAD /lb HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (status, headers["content-length"], body) == (200, "3", b"")
        assert lb_check(port, "/lb?from=elb")[0] == 200
        assert parse_response(raw_request(port, upgrade_request("/lb")))[0] == 200
        # exactly that path: others are routed as before
        assert lb_check(port, "/lb/x")[0] == 404
        assert lb_check(port, "/echo")[0] == 426
        assert parse_response(raw_request(port, upgrade_request("/echo")))[0] == 101
        time.sleep(0.3)
        status, text = admin_text(gw, "GET", "/metrics")
        # probes are not rejected upgrades: only /lb/x (404) and /echo (426) count
        assert metric(text, "wsgate_handshakes_rejected_total",
                      route="", status="404", reason="no_route") == 1
        assert "status=\"200\"" not in text
        rejected = gw.events_named("websocket.connection.rejected")
        assert [event["path"] for event in rejected] == ["/lb/x", "/echo"]
    finally:
        assert gw.stop() == 0


def test_health_path_on_a_tls_listener(tmp_path):
    from certs import TestCA

    ca = TestCA()
    cert, key = ca.write_leaf(tmp_path, "gw", "gw.test", "127.0.0.1")
    gw = start_gateway(tmp_path, f"""
[listen:secure]
endpoint = tcp:0:interface=127.0.0.1
tls_cert = {cert}
tls_key = {key}
health_path = /ready
""", base=base(), listeners=("main", "secure", "admin"))
    try:
        context = ssl.create_default_context(cadata=ca.cert_pem.decode())
        context.check_hostname = False
        with socket.create_connection(("127.0.0.1", gw.port("secure")), timeout=5) as raw:
            with context.wrap_socket(raw) as sock:
                sock.sendall(b"GET /ready HTTP/1.1\r\nHost: gw.test\r\n\r\n")
                data = b""
                while chunk := sock.recv(4096):
                    data += chunk
        assert parse_response(data)[::2] == (200, b"ok\n")
        # each listener has its own: /lb is main's, /ready is secure's
        assert lb_check(gw.port(), "/ready")[0] == 404
    finally:
        assert gw.stop() == 0


def test_drain_delay_answers_503_on_open_listeners_then_drains(tmp_path):
    gw = start_gateway(tmp_path, "", base=base(f"drain_delay = {DRAIN_DELAY}s"),
                       listeners=("main", "admin"))
    port = gw.port()

    async def scenario():
        ws = await connect(gw.url("/echo"))
        gw.signal(signal.SIGTERM)
        signalled = time.monotonic()
        await asyncio.to_thread(wait_for, lambda: lb_check(port)[0] == 503,
                                what="health_path to turn 503")
        # the delay: the node says it is going, refuses newcomers, serves the others
        status, headers, body = await asyncio.to_thread(lb_check, port)
        assert (status, body) == (503, b"draining\n") and headers["retry-after"]
        status, headers, _ = parse_response(
            await asyncio.to_thread(raw_request, port, upgrade_request("/echo")))
        assert status == 503 and headers["retry-after"]
        assert await asyncio.to_thread(probe, gw, "/readyz") == (
            503, {"status": "draining", "broker": "none"})
        assert await asyncio.to_thread(probe, gw, "/livez") == (200, {"status": "ok"})
        await ws.send("still here")
        assert await ws.recv() == "still here"

        # then the listener closes (connect refused) and the drain proper begins
        await asyncio.to_thread(wait_for, lambda: refusing(port), what="the listener to close")
        assert time.monotonic() - signalled >= DRAIN_DELAY - 0.2
        assert await close_code(ws) == 1001
    run(scenario())
    assert gw.proc.wait(20) == 0
    rejected = gw.events_named("websocket.connection.rejected")
    assert {(e["path"], e["status"], e["reason"]) for e in rejected} == {
        ("/echo", 503, "draining")}


def test_a_second_sigterm_during_drain_delay_ends_at_once(tmp_path):
    gw = start_gateway(tmp_path, "", base=base("drain_delay = 60s"),
                       listeners=("main", "admin"))
    gw.signal(signal.SIGTERM)
    wait_for(lambda: lb_check(gw.port())[0] == 503, what="the drain delay")
    started = time.monotonic()
    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(10) == 0
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("requires", [True, False], ids=["ready_requires_broker",
                                                          "broker_not_required"])
def test_readyz_during_a_redis_outage(tmp_path, requires):
    redis = RedisServer(tmp_path)
    core = f"broker = r\nready_requires_broker = {'yes' if requires else 'no'}"
    try:
        gw = start_gateway(tmp_path, f"""
[broker:r]
type = redis
url = {redis.url}
timeout = 1s
""", base=base(core), listeners=("main", "admin"))
    except BaseException:
        redis.stop()
        raise
    try:
        wait_for(lambda: probe(gw, "/readyz") == (200, {"status": "ok", "broker": "up"}),
                 what="the broker to be up")
        redis.stop()
        wait_for(lambda: probe(gw, "/healthz")[1]["broker"] == "down", what="the outage")
        assert probe(gw, "/healthz")[0] == 503  # the detail says so either way
        assert probe(gw, "/livez") == (200, {"status": "ok"})  # never a restart
        if requires:
            assert probe(gw, "/readyz") == (503, {"status": "broker_down", "broker": "down"})
            assert lb_check(gw.port())[::2] == (503, b"broker_down\n")
        else:
            assert probe(gw, "/readyz") == (200, {"status": "ok", "broker": "down"})
            assert lb_check(gw.port())[::2] == (200, b"ok\n")
        # WebSockets keep working through the outage
        assert parse_response(raw_request(gw.port(), upgrade_request("/echo")))[0] == 101
        redis.start()
        wait_for(lambda: probe(gw, "/readyz") == (200, {"status": "ok", "broker": "up"}),
                 what="the broker to be back")
        assert lb_check(gw.port())[0] == 200
    finally:
        assert gw.stop() == 0
        redis.stop()


# ------------------------------------------------------------------ a worker pool


def _pool_config():
    return base(f"workers = 2\ndrain_delay = {DRAIN_DELAY}s")


def worker_pids(gw):
    path = f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children"
    return [int(pid) for pid in open(path).read().split()]


def test_a_worker_pool_answers_probes_for_all_workers_and_drains_after_the_delay(tmp_path):
    gw = start_gateway(tmp_path, "", base=_pool_config(), listeners=("main", "admin"))
    port = gw.port()
    try:
        ready = wait_for(lambda: probe(gw, "/readyz")[0] == 200 and probe(gw, "/readyz"),
                         what="both workers to be ready")
        assert ready[1]["workers"] == [{"worker": 0, "status": "ok", "broker": "none"},
                                       {"worker": 1, "status": "ok", "broker": "none"}]
        assert probe(gw, "/livez") == (200, {"status": "ok", "workers": [
            {"worker": 0, "status": "ok"}, {"worker": 1, "status": "ok"}]})

        # a hung worker: the pool is neither live nor ready until it turns again
        hung = worker_pids(gw)[0]
        os.kill(hung, signal.SIGSTOP)
        try:
            # a prober whose own timeout is shorter leaves before the answer: no error
            with socket.create_connection(("127.0.0.1", gw.port("admin"))) as impatient:
                impatient.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            status, body = probe(gw, "/livez")
            assert (status, body["status"]) == (503, "unresponsive")
            assert sorted(w["status"] for w in body["workers"]) == ["ok", "unresponsive"]
            status, body = probe(gw, "/readyz")
            assert (status, body["status"]) == (503, "unreachable")
            # a kick, asked of every worker in turn, does not wait for the hung one for ever
            started = time.monotonic()
            assert admin_text(gw, "DELETE", "/connections/nosuch", "T0KEN")[0] == 404
            assert time.monotonic() - started < 9
        finally:
            os.kill(hung, signal.SIGCONT)
        assert probe(gw, "/livez")[0] == 200 and probe(gw, "/readyz")[0] == 200

        async def scenario():
            clients = [await connect(gw.url("/echo")) for _ in range(6)]
            gw.signal(signal.SIGTERM)
            signalled = time.monotonic()
            await asyncio.to_thread(wait_for, lambda: lb_check(port)[0] == 503,
                                    what="health_path to turn 503")
            status, body = await asyncio.to_thread(probe, gw, "/readyz")
            assert (status, body["status"]) == (503, "draining")
            assert (await asyncio.to_thread(probe, gw, "/livez"))[0] == 200
            for _ in range(4):  # whichever worker takes them
                assert (await asyncio.to_thread(lb_check, port))[0] == 503
                status, headers, _ = parse_response(
                    await asyncio.to_thread(raw_request, port, upgrade_request("/echo")))
                assert status == 503 and headers["retry-after"]
            for i, ws in enumerate(clients):
                await ws.send(f"still {i}")
                assert await ws.recv() == f"still {i}"

            await asyncio.to_thread(wait_for, lambda: refusing(port),
                                    what="the shared socket to close")
            assert time.monotonic() - signalled >= DRAIN_DELAY - 0.2
            assert [await close_code(ws) for ws in clients] == [1001] * 6
        run(scenario())
        assert gw.proc.wait(20) == 0
    finally:
        gw.stop()


# ------------------------------------------------------------------ in memory

MEMORY_CONFIG = """
[wsgate]
node_id = memory
{core}

[listen:main]
endpoint = tcp:0:interface=127.0.0.1
health_path = /lb
ping_interval = 0

[listen:other]
endpoint = tcp:0:interface=127.0.0.1

[route:echo]
path = /echo
echo = yes
"""


class _DownBroker(MemoryBroker):
    state = "down"


def memory_gateway(tmp_path, core="", broker=None):
    path = tmp_path / "wsgate.ini"
    path.write_text(MEMORY_CONFIG.format(core=core))
    cfg = config.load(str(path))
    gateway = gateway_module.Gateway(cfg, build_router(cfg), broker or MemoryBroker(), Clock())
    gateway.refusals = []
    gateway.rejected = lambda refusal, *args, **kwargs: gateway.refusals.append(refusal.status)
    return gateway


def handshake(gateway, data, listener="main"):
    """A HandshakeProtocol on a StringTransport fed *data*: ``(status, headers, body,
    transport)``."""
    protocol = gateway_module.GatewayFactory(gateway, listener).buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(data)
    status, headers, body = parse_response(transport.value())
    return status, headers, body, transport


def test_the_probe_is_answered_and_closed_without_a_decision(tmp_path):
    gateway = memory_gateway(tmp_path)
    status, headers, body, transport = handshake(gateway, b"GET /lb HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, body, headers["connection"]) == (200, b"ok\n", "close")
    assert headers["cache-control"] == "no-store"
    assert transport.disconnecting
    assert gateway.clock.getDelayedCalls() == []  # the handshake timer is gone
    assert gateway.refusals == [] and gateway.connections == {}


def test_the_probe_is_503_while_draining(tmp_path):
    gateway = memory_gateway(tmp_path)
    gateway.draining = True
    status, headers, body, _ = handshake(gateway, b"GET /lb HTTP/1.0\r\n\r\n")
    assert (status, body, headers["retry-after"]) == (503, b"draining\n", "5")
    assert gateway.refusals == []


@pytest.mark.parametrize("requires, expected", [("yes", 503), ("no", 200)])
def test_the_probe_follows_ready_requires_broker(tmp_path, requires, expected):
    gateway = memory_gateway(tmp_path, f"ready_requires_broker = {requires}", _DownBroker())
    assert handshake(gateway, b"GET /lb HTTP/1.1\r\nHost: x\r\n\r\n")[0] == expected
    assert gateway.not_ready() == ("broker_down" if requires == "yes" else None)


@pytest.mark.parametrize("head", [
    b"POST /lb HTTP/1.1\r\nHost: x\r\n\r\n",  # not GET or HEAD
    b"GET /lb/ HTTP/1.1\r\nHost: x\r\n\r\n",  # not exactly the path
    b"GET /lb HTTP/2.0\r\nHost: x\r\n\r\n",
    b"GET /lb HTTP/1.1 extra\r\nHost: x\r\n\r\n",
])
def test_other_requests_are_not_probes(tmp_path, head):
    gateway = memory_gateway(tmp_path)
    status = handshake(gateway, head)[0]
    assert status != 200 and gateway.refusals == [status]


def test_a_listener_without_health_path_routes_that_path(tmp_path):
    gateway = memory_gateway(tmp_path)
    status = handshake(gateway, b"GET /lb HTTP/1.1\r\nHost: x\r\n\r\n", "other")[0]
    assert status == 404 and gateway.refusals == [404]


# ------------------------------------------------------------------ config


def test_probe_keys_have_their_defaults(tmp_path):
    path = write_config(tmp_path, "[listen:main]\nendpoint = tcp:0\n")
    cfg = config.load(str(path))
    assert (cfg.core.drain_delay, cfg.core.ready_requires_broker) == (0.0, False)
    assert cfg.listeners[0].health_path is None


@pytest.mark.parametrize("value", ["healthz", "/health?x=1", "/a b"])
def test_health_path_must_be_a_plain_path(tmp_path, value):
    path = write_config(tmp_path, f"[listen:main]\nendpoint = tcp:0\nhealth_path = {value}\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(str(path))
    assert "[listen:main] health_path: expected a path such as /healthz" in str(info.value)


def test_drain_delay_is_a_duration(tmp_path):
    path = write_config(tmp_path, "[wsgate]\ndrain_delay = soon\n"
                                  "[listen:main]\nendpoint = tcp:0\n")
    with pytest.raises(config.ConfigError) as info:
        config.load(str(path))
    assert "[wsgate] drain_delay: expected a duration" in str(info.value)
