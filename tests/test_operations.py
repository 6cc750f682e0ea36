"""Operating it: metrics, events, health, the connections API, SIGHUP reload, SIGTERM drain."""

import asyncio
import json
import signal
import socket
import ssl
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from harness import (
    GatewayProcess,
    admin_text,
    metric,
    parse_response,
    raw_request,
    run,
    start_gateway,
    upgrade_request,
    write_config,
)

BASE = """
[wsgate]
node_id = ops-node
log_format = json
log_messages = yes
drain_timeout = 20s

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
path = /private
echo = yes
policies = keys
"""


def admin(gw, method, path, token="T0KEN"):
    return admin_text(gw, method, path, token)


@pytest.fixture
def gateway(tmp_path):
    gw = start_gateway(tmp_path, ROUTES, base=BASE, listeners=("main", "admin"))
    yield gw
    if gw.proc.poll() is None:
        assert gw.stop() == 0


def test_metrics_count_a_known_workload_exactly(gateway):
    async def scenario():
        for _ in range(2):
            async with connect(gateway.url("/echo")) as ws:
                for payload in ("abc", "defg", b"\x00" * 10):
                    await ws.send(payload)
                    await ws.recv()
        async with connect(gateway.url("/private"),
                           additional_headers={"X-API-Key": "good"}) as ws:
            await ws.send("x")
            await ws.recv()
    run(scenario())
    raw_request(gateway.port(), upgrade_request("/nowhere"))
    raw_request(gateway.port(), b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    raw_request(gateway.port(), upgrade_request("/private"))
    time.sleep(0.3)
    status, text = admin(gateway, "GET", "/metrics", token=None)
    assert status == 200
    assert metric(text, "wsgate_connections_total", route="echo") == 2
    assert metric(text, "wsgate_connections_active", route="echo") == 0
    assert metric(text, "wsgate_messages_total", route="echo", direction="in") == 6
    assert metric(text, "wsgate_messages_total", route="echo", direction="out") == 6
    assert metric(text, "wsgate_bytes_total", route="echo", direction="in") == 2 * 17
    assert metric(text, "wsgate_bytes_total", route="private", direction="out") == 1
    assert metric(text, "wsgate_handshakes_rejected_total",
                  route="", status="404", reason="no_route") == 1
    assert metric(text, "wsgate_handshakes_rejected_total",
                  route="echo", status="426", reason="bad_handshake") == 1
    assert metric(text, "wsgate_handshakes_rejected_total",
                  route="private", status="401", reason="keys") == 1
    assert metric(text, "wsgate_handshake_seconds_count", route="echo") == 2
    assert metric(text, "wsgate_broker_up") == 1
    assert metric(text, "wsgate_config_generation") == 1


def test_events_are_ndjson_with_the_contract_fields(gateway):
    async def scenario():
        async with connect(gateway.url("/private"),
                           additional_headers={"Authorization": "Bearer good"}) as ws:
            await ws.send("hello")
            await ws.recv()
            await ws.close(4000, "done")
    run(scenario())
    raw_request(gateway.port(), upgrade_request("/private"))
    closed = gateway.wait_event(lambda e: e.get("event") == "websocket.connection.closed")
    accepted = gateway.wait_event(lambda e: e.get("event") == "websocket.connection.accepted")
    rejected = gateway.wait_event(lambda e: e.get("event") == "websocket.connection.rejected")
    received = gateway.wait_event(lambda e: e.get("event") == "websocket.message.received")
    sent = gateway.wait_event(lambda e: e.get("event") == "websocket.message.sent")
    for event in (accepted, closed, received, sent):
        assert event["node_id"] == "ops-node" and event["route"] == "private"
        assert event["identity"] == "carol" and event["conn_id"] == accepted["conn_id"]
        assert event["client"].startswith("127.0.0.1:")
        assert event["time"].endswith("Z")
    assert (closed["messages_in"], closed["messages_out"]) == (1, 1)
    assert (closed["bytes_in"], closed["bytes_out"]) == (5, 5)
    assert (closed["close_code"], closed["close_reason"], closed["closed_by"]) == (
        4000, "done", "client")
    assert closed["duration_s"] >= 0
    assert (rejected["status"], rejected["reason"], rejected["policy"]) == (401, "keys", "keys")
    assert received["size"] == 5
    assert not any(line.startswith("\x1e") for line in gateway.lines)
    for line in gateway.lines:  # every line is one JSON object
        json.loads(line)


def test_connections_are_listed_and_kicked(gateway):
    async def scenario():
        ws = await connect(gateway.url("/echo"))
        await ws.send("x")
        await ws.recv()
        status, body = await asyncio.to_thread(admin, gateway, "GET", "/connections")
        assert status == 200
        (entry,) = json.loads(body)["connections"]
        assert entry["route"] == "echo" and entry["messages_in"] == 1
        assert set(entry) == {"id", "route", "client", "identity", "since", "messages_in",
                              "messages_out", "bytes_in", "bytes_out"}
        assert (await asyncio.to_thread(admin, gateway, "GET", "/connections", None))[0] == 401
        status, _ = await asyncio.to_thread(admin, gateway, "DELETE", "/connections/nope")
        assert status == 404
        status, body = await asyncio.to_thread(
            admin, gateway, "DELETE", f"/connections/{entry['id']}?code=4001&reason=bye")
        assert status == 200
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "bye")
        other = await connect(gateway.url("/echo"))
        status, body = await asyncio.to_thread(admin, gateway, "GET", "/connections")
        (entry,) = json.loads(body)["connections"]
        await asyncio.to_thread(admin, gateway, "DELETE", f"/connections/{entry['id']}")
        with pytest.raises(ConnectionClosed) as info:
            await other.recv()
        assert info.value.rcvd.code == 1008
    run(scenario())


def test_healthz_reports_ok_broker_down_and_draining(tmp_path):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    down = start_gateway(tmp_path, ROUTES + f"""
[broker:r]
type = redis
url = redis://127.0.0.1:{port}/0
""", base=BASE.replace("drain_timeout = 20s", "drain_timeout = 20s\nbroker = r"),
        listeners=("main", "admin"))
    try:
        status, body = admin(down, "GET", "/healthz", token=None)
        assert status == 503 and json.loads(body)["status"] == "broker_down"
        assert json.loads(body)["broker"] == "down"
    finally:
        assert down.stop() == 0
    (tmp_path / "b").mkdir()
    gw = start_gateway(tmp_path / "b", ROUTES, base=BASE, listeners=("main", "admin"))
    status, body = admin(gw, "GET", "/healthz", token=None)
    assert status == 200
    assert json.loads(body) == {"status": "ok", "connections": 0, "broker": "none",
                                "config_generation": 1}
    # a client that never answers the close keeps the drain going for a moment
    stubborn = socket.create_connection(("127.0.0.1", gw.port()))
    stubborn.sendall(upgrade_request("/echo"))
    assert stubborn.recv(4096).startswith(b"HTTP/1.1 101")
    gw.signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    seen = None
    while time.monotonic() < deadline:
        status, body = admin(gw, "GET", "/healthz", token=None)
        seen = json.loads(body)
        if seen["status"] == "draining":
            break
        time.sleep(0.05)
    assert status == 503 and seen["status"] == "draining"
    stubborn.close()
    assert gw.proc.wait(20) == 0


# ------------------------------------------------------------ reload and drain


def _tls_config(cert, key, routes):
    return f"""
[wsgate]
node_id = reload-node
log_format = json
drain_timeout = 15s

[listen:main]
endpoint = tcp:0:interface=127.0.0.1

[listen:secure]
endpoint = tcp:0:interface=127.0.0.1
tls_cert = {cert}
tls_key = {key}

[admin]
endpoint = tcp:0:interface=127.0.0.1
token = T0KEN
{routes}
"""


def test_sighup_and_sigterm_with_500_live_connections(tmp_path):
    from certs import TestCA

    ca = TestCA()
    cert1, key1 = ca.write_leaf(tmp_path, "one", "first.test", "127.0.0.1")
    cert2, key2 = ca.write_leaf(tmp_path, "two", "second.test", "127.0.0.1")
    old_routes = "[route:echo]\npath = /echo\necho = yes\n"
    new_routes = old_routes + "[route:fresh]\npath = /fresh\necho = yes\n"
    path = write_config(tmp_path, _tls_config(cert1, key1, old_routes))
    gw = GatewayProcess(path).wait_listening(("main", "secure", "admin"))
    client_tls = ssl.create_default_context(cadata=ca.cert_pem.decode())
    client_tls.check_hostname = False

    async def subject_cn():
        async with connect(gw.url("/echo", name="secure", scheme="wss"), ssl=client_tls) as ws:
            cert = ws.transport.get_extra_info("peercert")
            return dict(item[0] for item in cert["subject"])["commonName"]

    async def scenario():
        clients = [await connect(gw.url("/echo")) for _ in range(500)]
        assert await subject_cn() == "first.test"
        assert parse_response(raw_request(gw.port(), upgrade_request("/fresh")))[0] == 404

        # 1. a good reload: new route, new certificate
        path.write_text(_tls_config(cert2, key2, new_routes))
        gw.signal(signal.SIGHUP)
        await asyncio.to_thread(gw.wait_event, lambda e: e.get("event") ==
                                "wsgate.config.reloaded" and e.get("generation") == 2)
        assert parse_response(raw_request(gw.port(), upgrade_request("/fresh")))[0] == 101
        assert await subject_cn() == "second.test"

        # 2. a broken reload: still serving with the config in force
        path.write_text("[listen:main]\nendpoint = nonsense:1\n")
        gw.signal(signal.SIGHUP)
        await asyncio.to_thread(gw.wait_event, lambda e: "config reload failed" in
                                e.get("message", ""))
        assert parse_response(raw_request(gw.port(), upgrade_request("/fresh")))[0] == 101
        status, body = await asyncio.to_thread(admin, gw, "GET", "/metrics", None)
        assert metric(body, "wsgate_config_reloads_total", result="ok") == 1
        assert metric(body, "wsgate_config_reloads_total", result="error") == 1
        assert metric(body, "wsgate_config_generation") == 2

        # no connection was dropped: every one still echoes
        for i, ws in enumerate(clients):
            await ws.send(f"still {i}")
        for i, ws in enumerate(clients):
            assert await ws.recv() == f"still {i}"

        # 3. SIGTERM: every client gets 1001, the process exits 0 within drain_timeout
        started = time.monotonic()
        gw.signal(signal.SIGTERM)
        codes = await asyncio.gather(*(_close_code(ws) for ws in clients))
        assert codes == [1001] * 500
        return started
    started = run(scenario())
    assert gw.proc.wait(20) == 0
    assert time.monotonic() - started < 15


async def _close_code(ws):
    try:
        await asyncio.wait_for(ws.recv(), 15)
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else None
    return "no close"


def test_second_sigterm_ends_at_once(tmp_path):
    gw = start_gateway(tmp_path, ROUTES, base=BASE.replace("20s", "60s"),
                       listeners=("main", "admin"))
    stubborn = socket.create_connection(("127.0.0.1", gw.port()))
    stubborn.sendall(upgrade_request("/echo"))
    assert stubborn.recv(4096).startswith(b"HTTP/1.1 101")
    gw.signal(signal.SIGTERM)
    time.sleep(0.5)
    assert gw.proc.poll() is None  # still draining: the client never answered the close
    started = time.monotonic()
    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(10) == 0
    assert time.monotonic() - started < 5
    stubborn.close()


def test_sighup_adds_and_removes_listeners(tmp_path):
    one = """
[wsgate]
log_format = json

[listen:main]
endpoint = tcp:0:interface=127.0.0.1

[listen:old]
endpoint = tcp:0:interface=127.0.0.1

[route:echo]
path = /echo
echo = yes
"""
    path = write_config(tmp_path, one)
    gw = GatewayProcess(path).wait_listening(("main", "old"))
    try:
        old_port = gw.port("old")
        path.write_text(one.replace("[listen:old]", "[listen:extra]"))
        gw.signal(signal.SIGHUP)
        gw.wait_event(lambda e: e.get("event") == "wsgate.config.reloaded")
        extra = gw.wait_event(lambda e: e.get("event") == "wsgate.listening"
                              and e.get("listener") == "extra")
        assert parse_response(raw_request(extra["port"], upgrade_request("/echo")))[0] == 101
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", old_port), timeout=2)
    finally:
        assert gw.stop() == 0


def test_one_route_is_drained_from_the_admin_api(gateway):
    async def scenario():
        on_echo = await connect(gateway.url("/echo"))
        on_private = await connect(gateway.url("/private"), additional_headers={
            "X-API-Key": "good"})
        status, body = await asyncio.to_thread(admin, gateway, "POST", "/drain/route/echo")
        assert status == 202 and json.loads(body)["closing"] == 1
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(on_echo.recv(), 10)
        assert info.value.rcvd.code == 1001
        refused = parse_response(raw_request(gateway.port(), upgrade_request("/echo")))
        assert refused[0] == 503 and refused[1]["retry-after"]
        await on_private.send("unaffected")  # other routes carry on
        assert await on_private.recv() == "unaffected"
        assert (await asyncio.to_thread(admin, gateway, "POST", "/drain/route/nope"))[0] == 404
        assert (await asyncio.to_thread(admin, gateway, "POST", "/drain/route/echo", None))[0] \
            == 401
        status, _ = await asyncio.to_thread(admin, gateway, "DELETE", "/drain/route/echo")
        assert status == 200
        assert parse_response(raw_request(gateway.port(), upgrade_request("/echo")))[0] == 101
        await on_private.close()
    run(scenario())
