"""Proxy routes against a real Node ``ws`` upstream, with Python ``websockets`` clients."""

import asyncio
import json
import os
import socket
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from harness import (
    NodeUpstream,
    free_port,
    parse_response,
    raw_request,
    run,
    start_gateway,
    upgrade_request,
)


@pytest.fixture(scope="module")
def upstream():
    node = NodeUpstream()
    yield node
    node.stop()


def _routes(port, dead_port):
    return f"""
[listen:trusting]
endpoint = tcp:0:interface=127.0.0.1
trusted_proxies = 127.0.0.0/8

[route:app]
path = /app/*
upstream = ws://127.0.0.1:{port}{{path}}
forward_headers = X-Tenant
# test_forwarded_headers_and_request_id sends a foreign Origin
allow_cross_origin = yes

[route:room]
path = /rooms/{{room}}/*
upstream = ws://127.0.0.1:{port}/r/{{room}}/{{tail}}
max_message_size = 4KiB

[route:dead]
path = /dead
upstream = ws://127.0.0.1:{dead_port}/echo
upstream_timeout = 2s
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream):
    gw = start_gateway(tmp_path_factory.mktemp("proxy"), _routes(upstream.port, free_port()),
                       listeners=("main", "trusting"))
    yield gw
    assert gw.stop() == 0


def test_echo_through_the_proxy_text_binary_and_1mib(gateway):
    async def scenario():
        async with connect(gateway.url("/app/echo")) as ws:
            await ws.send("hello")
            assert await ws.recv() == "echo: hello"
            await ws.send(b"\x00\x01\x02")
            assert await ws.recv() == b"\x00\x01\x02"
            big = os.urandom(1024 * 1024)
            await ws.send(big)
            assert await ws.recv() == big
    run(scenario())


def test_fragmented_message_is_relayed_whole(gateway):
    async def scenario():
        async with connect(gateway.url("/app/echo")) as ws:
            await ws.send(iter(["frag", "mented ", "message"]))
            assert await ws.recv() == "echo: fragmented message"
    run(scenario())


def test_upstream_chosen_subprotocol_reaches_client_and_offer_is_unchanged(gateway, upstream):
    async def scenario():
        async with connect(gateway.url("/app/subprotocol"),
                           subprotocols=["chat.v1", "chat.v2"]) as ws:
            assert ws.subprotocol == "chat.v2"
        async with connect(gateway.url("/app/headers"), subprotocols=["b", "a"]) as ws:
            seen = json.loads(await ws.recv())
            assert seen["headers"]["sec-websocket-protocol"] == "b, a"
    run(scenario())


def test_url_template_fills_room_and_tail_and_keeps_query(gateway):
    async def scenario():
        async with connect(gateway.url("/rooms/kitchen/x/headers?a=1&b=2")) as ws:
            seen = json.loads(await ws.recv())
            assert seen["url"] == "/r/kitchen/x/headers?a=1&b=2"
    run(scenario())


def test_upstream_close_code_and_reason_reach_the_client(gateway):
    async def scenario():
        async with connect(gateway.url("/app/close?code=4001&reason=bye")) as ws:
            await ws.send("trigger")
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (4001, "bye")
    run(scenario())


@pytest.mark.parametrize("code,reason", [(1008, "policy"), (4002, "cya")])
def test_client_close_code_and_reason_reach_the_upstream(gateway, upstream, code, reason):
    marker = f"/app/echo-{code}"

    async def scenario():
        ws = await connect(gateway.url(marker))
        await ws.send("x")
        await ws.recv()
        await ws.close(code, reason)
    run(scenario())
    event = upstream.wait_event(lambda e: e.get("event") == "close"
                                and e.get("path") == f"/echo-{code}")
    assert (event["code"], event["reason"]) == (code, reason)


def test_client_gone_without_close_gives_upstream_1001(gateway, upstream):
    with socket.create_connection(("127.0.0.1", gateway.port()), timeout=5) as sock:
        sock.sendall(upgrade_request("/app/echo-gone"))
        assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    event = upstream.wait_event(lambda e: e.get("event") == "close"
                                and e.get("path") == "/echo-gone")
    assert event["code"] == 1001


def test_upstream_lost_without_close_gives_client_1014(gateway):
    async def scenario():
        async with connect(gateway.url("/app/drop")) as ws:
            await ws.send("bye")
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            assert (info.value.rcvd.code, info.value.rcvd.reason) == (1014, "upstream lost")
    run(scenario())


def test_message_over_route_limit_gets_1009_and_upstream_1001(gateway, upstream):
    async def scenario():
        async with connect(gateway.url("/rooms/big/echo-limit")) as ws:
            await ws.send("y" * 4096)
            assert await ws.recv() == "echo: " + "y" * 4096
            await ws.send("y" * 4097)
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.code == 1009
    run(scenario())
    event = upstream.wait_event(lambda e: e.get("event") == "close"
                                and e.get("path") == "/echo-limit")
    assert event["code"] == 1001


def test_dead_upstream_port_gets_503_with_retry_after_and_no_101(gateway):
    status, headers, _ = parse_response(raw_request(gateway.port(), upgrade_request("/dead")))
    assert status == 503
    assert headers["retry-after"].isdigit()
    event = gateway.wait_event(lambda e: e.get("event") == "websocket.connection.rejected"
                               and e.get("route") == "dead")
    assert event["reason"] == "upstream_unreachable"


def test_upstream_answering_403_gets_502(gateway):
    async def scenario():
        with pytest.raises(InvalidStatus) as info:
            await connect(gateway.url("/app/reject"))
        assert info.value.response.status_code == 502
    run(scenario())


def test_forwarded_headers_and_request_id(gateway):
    async def scenario():
        async with connect(gateway.url("/app/headers"), origin="https://app.example",
                           user_agent_header="test-agent/1", additional_headers={
                               "Cookie": "session=abc", "Authorization": "Bearer t",
                               "X-Tenant": "acme", "X-Secret": "no", "TE": "trailers",
                               "X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6",
                               "X-Real-IP": "6.6.6.6"}) as ws:
            return json.loads(await ws.recv())["headers"]
    seen = run(scenario())
    assert seen["x-forwarded-for"] == "127.0.0.1"  # the spoofed value was replaced
    assert seen["x-real-ip"] == "127.0.0.1"
    assert seen["forwarded"] == 'for=127.0.0.1;proto=http;host="127.0.0.1:%d"' % gateway.port()
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == f"127.0.0.1:{gateway.port()}"
    assert seen["cookie"] == "session=abc" and seen["authorization"] == "Bearer t"
    assert seen["origin"] == "https://app.example" and seen["user-agent"] == "test-agent/1"
    assert seen["x-tenant"] == "acme"
    assert "x-secret" not in seen and "te" not in seen
    accepted = gateway.wait_event(
        lambda e: e.get("event") == "websocket.connection.accepted"
        and e.get("conn_id") == seen["x-request-id"])
    assert accepted["route"] == "app"


def test_trusted_proxy_chain_is_kept_and_client_is_taken_from_it(gateway):
    async def scenario():
        async with connect(gateway.url("/app/headers", name="trusting"), additional_headers={
                "X-Forwarded-For": "203.0.113.9, 10.0.0.1"}) as ws:
            return json.loads(await ws.recv())["headers"]
    seen = run(scenario())
    assert seen["x-forwarded-for"] == "203.0.113.9, 10.0.0.1, 127.0.0.1"
    assert seen["x-real-ip"] == "10.0.0.1"  # right-most address that is not a trusted proxy


def test_wss_upstream_verified_with_test_ca_and_wrong_name_refused(tmp_path):
    from certs import TestCA

    ca = TestCA()
    cert, key = ca.write_leaf(tmp_path, "upstream", "localhost")
    ca_file = ca.write_ca(tmp_path / "ca.pem")
    node = NodeUpstream(env={"WSGATE_TLS_CERT": str(cert), "WSGATE_TLS_KEY": str(key)})
    try:
        gw = start_gateway(tmp_path, f"""
[route:good]
path = /good
upstream = wss://localhost:{node.port}/echo
upstream_ca = {ca_file}

[route:wrongname]
path = /wrong
upstream = wss://127.0.0.1:{node.port}/echo
upstream_ca = {ca_file}
""")
        try:
            async def scenario():
                async with connect(gw.url("/good")) as ws:
                    await ws.send("secure")
                    assert await ws.recv() == "echo: secure"
                with pytest.raises(InvalidStatus) as info:
                    await connect(gw.url("/wrong"))
                assert info.value.response.status_code == 502
            run(scenario())
            line = gw.wait_event(lambda e: "rejected the upgrade for route wrongname"
                                 in e.get("message", ""))
            assert "TLS verification failed" in line["message"]
        finally:
            assert gw.stop() == 0
    finally:
        node.stop()


def _rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_slow_reader_keeps_gateway_memory_bounded(gateway, upstream, capsys):
    """An upstream sends 200 MiB to a client that reads slowly: backpressure, not buffering."""
    pid = gateway.proc.pid
    baseline = _rss_kib(pid)
    peak = baseline
    total = 0
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(20)
        sock.connect(("127.0.0.1", gateway.port()))
        sock.sendall(upgrade_request("/app/flood?mib=200"))
        started = time.monotonic()
        while total < 200 * 1024 * 1024:
            chunk = sock.recv(256 * 1024)
            assert chunk, "connection closed early"
            total += len(chunk)
            time.sleep(0.001)  # a slow reader
            if total % (8 * 1024 * 1024) < len(chunk):
                peak = max(peak, _rss_kib(pid))
        elapsed = time.monotonic() - started
    peak = max(peak, _rss_kib(pid))
    growth_mib = (peak - baseline) / 1024
    with capsys.disabled():
        print(f"\nslow reader: 200 MiB in {elapsed:.1f}s, gateway RSS {baseline / 1024:.1f} MiB"
              f" -> peak {peak / 1024:.1f} MiB (growth {growth_mib:.1f} MiB)")
    assert growth_mib < 64


def test_each_leg_keeps_its_own_keepalive(tmp_path, upstream):
    """A proxied client that never answers pings is dropped; the upstream gets 1001."""
    gw = start_gateway(tmp_path, f"""
[route:app]
path = /app/*
upstream = ws://127.0.0.1:{upstream.port}{{path}}
""", base="""
[wsgate]
log_format = json

[listen:main]
endpoint = tcp:0:interface=127.0.0.1
ping_interval = 300ms
ping_timeout = 300ms
""")
    try:
        with socket.create_connection(("127.0.0.1", gw.port()), timeout=10) as sock:
            sock.sendall(upgrade_request("/app/echo-silent"))
            assert sock.recv(4096).startswith(b"HTTP/1.1 101")
            from harness import read_until_closed
            data = read_until_closed(sock)  # never answering: pinged, then dropped
            assert data[:1] == b"\x89"
        event = upstream.wait_event(lambda e: e.get("event") == "close"
                                    and e.get("path") == "/echo-silent")
        assert event["code"] == 1001

        async def answering_client_stays():  # websockets answers pings; so does Node ws
            async with connect(gw.url("/app/echo")) as ws:
                await asyncio.sleep(1.5)
                await ws.send("alive")
                assert await ws.recv() == "echo: alive"
        run(answering_client_stays())
    finally:
        assert gw.stop() == 0
