"""Logs and metrics an operator can alert on: rejected events, close/process/build/latency
metrics, publishes refused while the broker is down, one line per Redis outage, and TLS
listeners that start without warnings."""

import asyncio
import json
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from harness import (
    NodeUpstream,
    RedisServer,
    admin_text,
    free_port,
    parse_response,
    raw_request,
    run,
    start_gateway,
    upgrade_request,
)

BASE = """
[wsgate]
node_id = obs-node
log_format = json

[listen:main]
endpoint = tcp:0:interface=127.0.0.1

[admin]
endpoint = tcp:0:interface=127.0.0.1
token = T0KEN
"""

ROUTES = """
[policy:keys]
type = apikey
keys = good=carol

[route:echo]
path = /echo
echo = yes

[route:private]
host = gw.example
path = /private
echo = yes
policies = keys
"""


def admin(gw, method, path, token="T0KEN", body=None, content_type="text/plain"):
    return admin_text(gw, method, path, token, body, content_type)


def samples(gw):
    """Every sample of ``/metrics`` as ``(name, {labels})`` → value."""
    status, text = admin(gw, "GET", "/metrics", token=None)
    assert status == 200
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found, name, **labels):
    return found.get((name, tuple(sorted(labels.items()))))


def named(found, name):
    return {labels: v for (n, labels), v in found.items() if n == name}


def test_histogram_buckets_are_cumulative_with_a_sum():
    from wsgate.metrics import Histogram

    histogram = Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 3.0):
        histogram.observe(("r",), seconds)
    family = histogram.family("h", "doc", ["route"])
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "h_bucket"}
    assert buckets == {"0.1": 2, "1.0": 3, "+Inf": 4}
    totals = {s.name: s.value for s in family.samples if s.name in ("h_count", "h_sum")}
    assert totals == {"h_count": 4, "h_sum": 3.65}
    assert all(s.labels["route"] == "r" for s in family.samples)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("obs"), ROUTES, base=BASE,
                       listeners=("main", "admin"))
    yield gw
    assert gw.stop() == 0


def _rejected(gw, **match):
    return gw.wait_event(lambda e: e.get("event") == "websocket.connection.rejected"
                         and all(e.get(k) == v for k, v in match.items()))


def test_rejected_events_name_host_path_route_user_agent_status_and_policy(gateway):
    port = gateway.port()
    denied = raw_request(port, upgrade_request(
        "/private?x=1", host="gw.example:8080", extra=b"User-Agent: probe/1.0\r\n"))
    assert parse_response(denied)[0] == 401
    event = _rejected(gateway, route="private")
    assert (event["host"], event["path"], event["user_agent"]) == (
        "gw.example:8080", "/private", "probe/1.0")
    assert (event["status"], event["reason"], event["policy"]) == (401, "keys", "keys")
    assert event["client"].startswith("127.0.0.1:") and event["identity"] is None

    raw_request(port, upgrade_request("/nowhere", host="other.example",
                                      extra=b"User-Agent: lost/2\r\n"))
    event = _rejected(gateway, path="/nowhere")
    assert (event["route"], event["host"], event["user_agent"], event["status"],
            event["reason"], event["policy"]) == (
        None, "other.example", "lost/2", 404, "no_route", None)

    raw_request(port, b"GET /echo HTTP/1.1\r\nHost: h\r\n\r\n")  # no user agent, no upgrade
    event = _rejected(gateway, path="/echo", status=426)
    assert (event["route"], event["user_agent"], event["reason"]) == (
        "echo", None, "bad_handshake")

    raw_request(port, b"NOT HTTP\r\n\r\n")  # nothing parsed: the fields are there, null
    event = _rejected(gateway, status=400, reason="bad_handshake")
    assert (event["host"], event["path"], event["user_agent"]) == (None, None, None)


def test_closes_are_counted_by_code_and_side(gateway):
    async def scenario():
        async with connect(gateway.url("/echo")) as ws:
            await ws.send("x")
            await ws.recv()
            await ws.close(4000, "done")
        kicked = await connect(gateway.url("/echo"))
        status, body = await asyncio.to_thread(admin, gateway, "GET", "/connections")
        (entry,) = json.loads(body)["connections"]
        await asyncio.to_thread(admin, gateway, "DELETE",
                                f"/connections/{entry['id']}?code=4003&reason=out")
        with pytest.raises(ConnectionClosed):
            await kicked.recv()
    run(scenario())
    with socket.create_connection(("127.0.0.1", gateway.port())) as sock:  # no close frame
        sock.sendall(upgrade_request("/echo"))
        assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = samples(gateway)
        closes = named(found, "wsgate_connections_closed_total")
        if sum(closes.values()) >= 3:
            break
        time.sleep(0.1)
    assert closes == {
        (("closed_by", "client"), ("code", "4000"), ("route", "echo")): 1,
        (("closed_by", "gateway"), ("code", "4003"), ("route", "echo")): 1,
        (("closed_by", "client"), ("code", "none"), ("route", "echo")): 1,
    }


def test_process_build_and_handshake_metrics_are_exported(gateway):
    from importlib.metadata import version

    raw_request(gateway.port(), upgrade_request("/echo"))
    found = samples(gateway)
    assert value(found, "process_resident_memory_bytes") > 10 * 2**20
    assert value(found, "process_open_fds") >= 3
    assert value(found, "process_cpu_seconds_total") > 0
    assert value(found, "process_max_fds") > 0
    (labels,) = named(found, "wsgate_build_info")
    assert dict(labels)["version"] == version("wsgate")
    assert value(found, "wsgate_build_info", **dict(labels)) == 1
    assert value(found, "wsgate_handshake_seconds_count", route="echo") >= 1


def test_upstream_connect_time_is_a_histogram(tmp_path):
    node = NodeUpstream()
    dead = free_port()  # closed again: nothing listens there
    gw = start_gateway(tmp_path, f"""
[route:app]
path = /app
upstream = ws://127.0.0.1:{node.port}/echo

[route:dead]
path = /dead
upstream = ws://127.0.0.1:{dead}/echo
""", base=BASE, listeners=("main", "admin"))
    try:
        async def scenario():
            for _ in range(3):
                async with connect(gw.url("/app")) as ws:
                    await ws.send("hi")
                    assert await ws.recv() == "echo: hi"
        run(scenario())
        assert parse_response(raw_request(gw.port(), upgrade_request("/dead")))[0] == 503
        found = samples(gw)
        ok = dict(route="app", result="ok")
        assert value(found, "wsgate_upstream_connect_seconds_count", **ok) == 3
        assert value(found, "wsgate_upstream_connect_seconds_bucket", le="+Inf", **ok) == 3
        assert 0 < value(found, "wsgate_upstream_connect_seconds_sum", **ok) < 3
        assert value(found, "wsgate_upstream_connect_seconds_count",
                     route="dead", result="error") == 1
        print("upstream connect p(sum/count): "
              f"{value(found, 'wsgate_upstream_connect_seconds_sum', **ok) / 3 * 1000:.2f} ms")
    finally:
        assert gw.stop() == 0
        node.stop()


def test_admin_publish_refused_while_the_broker_is_down(tmp_path):
    dead = free_port()  # closed again: nothing listens there
    gw = start_gateway(tmp_path, f"""
[broker:r]
type = redis
url = redis://127.0.0.1:{dead}/0

[route:chat]
path = /chat/{{room}}
broadcast = room:{{room}}
""", base=BASE.replace("log_format = json", "log_format = json\nbroker = r"),
        listeners=("main", "admin"))
    try:
        for _ in range(2):
            status, body = admin(gw, "POST", "/publish/room:a", body=b"hello")
            assert status == 503, body
        found = samples(gw)
        assert value(found, "wsgate_publish_refused_total", reason="broker_down") == 2
        assert value(found, "wsgate_publishes_total") == 0
    finally:
        assert gw.stop() == 0


def _broker_state(gw):
    return json.loads(admin(gw, "GET", "/healthz", token=None)[1])["broker"]


def _wait_broker(gw, state, timeout=15):
    deadline = time.monotonic() + timeout
    while _broker_state(gw) != state:
        assert time.monotonic() < deadline, f"broker never {state}"
        time.sleep(0.1)


def test_a_redis_outage_logs_one_warning_and_one_line_when_back(tmp_path):
    redis = RedisServer(tmp_path)
    gw = start_gateway(tmp_path, f"""
[broker:shared]
type = redis
url = {redis.url}

[route:chat]
path = /chat/{{room}}
broadcast = room:{{room}}
""", base=BASE.replace("log_format = json", "log_format = json\nbroker = shared"),
        listeners=("main", "admin"))
    try:
        _wait_broker(gw, "up")
        before = len(gw.lines)
        redis.stop()
        _wait_broker(gw, "down")
        time.sleep(4)  # several reconnect attempts of both connections
        redis.restart()
        _wait_broker(gw, "up")
        time.sleep(1)
        lines = gw.lines[before:]
        print("".join(lines))
        assert len(lines) == 2, lines
        down, back = (json.loads(line) for line in lines)
        assert down["event"] == "wsgate.broker.down" and down["level"] == "warn"
        assert down["broker"] == "shared"
        assert down["address"] == f"127.0.0.1:{redis.port}"
        assert down["error"]
        assert back["event"] == "wsgate.broker.up" and back["broker"] == "shared"
        assert back["down_s"] >= 4
        assert "password" not in lines[0]
    finally:
        assert gw.stop() == 0
        redis.stop()


class _AcceptAndClose:
    """A port that accepts connections and closes them at once, as a TCP proxy in front
    of a stopped Redis does."""

    def __init__(self, port):
        import threading

        self.accepted = 0
        self.sock = socket.create_server(("127.0.0.1", port))
        self.sock.settimeout(0.1)
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            conn.close()

    def stop(self):
        self.running = False
        self.thread.join(5)
        self.sock.close()


def test_a_redis_behind_a_proxy_that_accepts_and_closes_is_retried_until_back(tmp_path):
    redis = RedisServer(tmp_path)
    redis.stop()
    proxy = _AcceptAndClose(redis.port)
    gw = start_gateway(tmp_path, f"""
[broker:shared]
type = redis
url = {redis.url}

[route:chat]
path = /chat/{{room}}
broadcast = room:{{room}}
""", base=BASE.replace("log_format = json", "log_format = json\nbroker = shared"),
        listeners=("main", "admin"))
    try:
        time.sleep(2)
        assert proxy.accepted >= 4  # both connections, retried
        proxy.stop()
        assert redis.start()
        _wait_broker(gw, "up")
        time.sleep(0.5)
        names = [json.loads(line).get("event") for line in gw.lines
                 if "broker" in line or "retry" in line.lower()]
        assert names == ["wsgate.broker.down", "wsgate.broker.up"], gw.lines

        async def roundtrip():
            async with connect(gw.url("/chat/a")) as one, connect(gw.url("/chat/a")) as two:
                await asyncio.sleep(0.2)
                await one.send("through redis")
                assert await asyncio.wait_for(two.recv(), 5) == "through redis"
        run(roundtrip())
    finally:
        assert gw.stop() == 0
        redis.stop()


def test_a_redis_broker_unreachable_at_start_up_is_one_warning(tmp_path):
    dead = free_port()  # closed again: nothing listens there
    gw = start_gateway(tmp_path, f"""
[broker:r]
type = redis
url = redis://:secret@127.0.0.1:{dead}/0
""", base=BASE.replace("log_format = json", "log_format = json\nbroker = r"),
        listeners=("main", "admin"))
    try:
        time.sleep(3)
        redis_lines = [line for line in gw.lines if "redis" in line.lower()
                       or "retry" in line.lower() or "broker" in line.lower()]
        assert len(redis_lines) == 1, redis_lines
        (down,) = (json.loads(line) for line in redis_lines)
        assert down["event"] == "wsgate.broker.down"
        assert "refused" in down["error"].lower()
        assert "secret" not in redis_lines[0]
    finally:
        assert gw.stop() == 0


def test_tls_listeners_start_without_a_legacy_context_warning(tmp_path):
    import ssl

    from certs import TestCA

    ca = TestCA()
    cert, key = ca.write_leaf(tmp_path, "leaf", "localhost", "127.0.0.1")
    gw = start_gateway(tmp_path, f"""
[listen:secure]
endpoint = tcp:0:interface=127.0.0.1
tls_cert = {cert}
tls_key = {key}

[listen:proxied]
endpoint = haproxy:tcp:0:interface=127.0.0.1
tls_cert = {cert}
tls_key = {key}

[route:echo]
path = /echo
echo = yes
""", base=BASE, listeners=("main", "secure", "proxied", "admin"))
    try:
        client_tls = ssl.create_default_context(cadata=ca.cert_pem.decode())

        async def scenario():
            async with connect(gw.url("/echo", name="secure", scheme="wss"),
                               ssl=client_tls, server_hostname="localhost") as ws:
                await ws.send("over tls")
                assert await ws.recv() == "over tls"
        run(scenario())
        warnings = [line for line in gw.lines if "Warning" in line]
        assert warnings == []
    finally:
        assert gw.stop() == 0


def test_pooled_metrics_carry_closes_process_and_build_info_per_worker(tmp_path):
    gw = start_gateway(tmp_path, ROUTES, base=BASE.replace(
        "log_format = json", "log_format = json\nworkers = 2"), listeners=("main", "admin"))
    try:
        async def scenario():
            for _ in range(4):
                async with connect(gw.url("/echo")) as ws:
                    await ws.close(4000, "done")
        run(scenario())
        deadline = time.monotonic() + 10
        while True:  # until both workers have started and answer
            found = samples(gw)
            closes = named(found, "wsgate_connections_closed_total")
            workers = {dict(labels)["worker"] for labels in named(found, "wsgate_build_info")}
            if (sum(closes.values()) == 4 and workers == {"0", "1"}) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert sum(closes.values()) == 4
        assert {dict(labels)["code"] for labels in closes} == {"4000"}
        assert workers == {"0", "1"}
        rss = named(found, "process_resident_memory_bytes")
        assert {dict(labels)["worker"] for labels in rss} == {"0", "1"}
    finally:
        assert gw.stop() == 0
