"""Hostile clients against proxy routes, over real sockets (issue 16, the proxy's part).

Deflate bombs, fragment and ping floods, forbidden close codes (both ways),
admin kick reasons, TLS closes and fds, TCP_NODELAY on both legs, and the
``closed`` event's close fields. Each load test prints the gateway's RSS, fd
and CPU figures and asserts a bound; every loop is bounded in count and time.
"""

import asyncio
import base64
import ctypes
import errno
import hashlib
import json
import os
import socket
import ssl
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from harness import (
    NodeUpstream,
    admin_text,
    parse_response,
    raw_request,
    run,
    start_gateway,
    upgrade_request,
)
from rawws import (OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, Figures, RawClient,
                   close_frame, deflate_bomb, frame, open_fds)

_BASE = """
[wsgate]
node_id = hostile-proxy
log_format = json

[listen:main]
endpoint = tcp:0:interface=127.0.0.1
compression = permessage-deflate

[listen:secure]
endpoint = tcp:0:interface=127.0.0.1
tls_cert = {cert}
tls_key = {key}

[admin]
endpoint = tcp:0:interface=127.0.0.1
token = T0KEN
"""


@pytest.fixture(scope="module")
def upstream():
    node = NodeUpstream()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    from certs import TestCA

    ca = TestCA()
    cert, key = ca.write_leaf(tmp_path_factory.mktemp("certs"), "gateway", "localhost",
                              "127.0.0.1")
    context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    context.check_hostname = False
    return cert, key, context


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream, tls):
    cert, key, _ = tls
    gw = start_gateway(tmp_path_factory.mktemp("hostile-proxy"), f"""
[route:app]
path = /app/*
upstream = ws://127.0.0.1:{upstream.port}{{path}}
""", base=_BASE.format(cert=cert, key=key), listeners=("main", "secure", "admin"))
    yield gw
    assert gw.stop() == 0


def _closed_event(gateway, port, timeout=10):
    return gateway.wait_event(lambda e: e.get("event") == "websocket.connection.closed"
                              and e.get("client") == f"127.0.0.1:{port}", timeout)


def _upstream_close(upstream, path, timeout=10):
    return upstream.wait_event(lambda e: e.get("event") == "close" and e.get("path") == path,
                               timeout)


def _admin(gw, method, path):
    return admin_text(gw, method, path, "T0KEN")


def _connection_id(gw, port):
    _, body = _admin(gw, "GET", "/connections")
    (entry,) = [c for c in json.loads(body)["connections"] if c["client"] == f"127.0.0.1:{port}"]
    return entry["id"]


# ------------------------------------------------------------------ deflate bombs

_BOMBS = {}


def _bomb(inflated):
    if inflated not in _BOMBS:
        _BOMBS[inflated] = deflate_bomb(inflated)
    return _BOMBS[inflated]


def _deflate_client(gateway, path):
    client = RawClient(gateway.port(), path, extensions="permessage-deflate")
    assert "permessage-deflate" in client.head
    return client


def test_deflate_bomb_gets_1009_and_never_reaches_the_upstream(gateway, upstream):
    """4 MiB inflated from ~4 KB on the wire, limit 1 MiB: refused before any byte goes on."""
    client = _deflate_client(gateway, "/app/echo-bomb")
    try:
        client.send(frame(OP_BINARY, _bomb(4 << 20), rsv1=True))
        code, reason, before = client.recv_until_close()
        assert (code, reason, before) == (1009, b"message too big", [])
    finally:
        client.close()
    assert _upstream_close(upstream, "/echo-bomb")["code"] == 1001  # a clean close, no message


def test_deflate_bombs_keep_gateway_memory_and_cpu_bounded(gateway, upstream, capsys):
    """Twenty 100 MiB bombs (2 GiB inflated on offer): each stops at the 1 MiB limit in the
    gateway, and the upstream (whose own limit is 64 MiB) never inflates any of them."""
    bomb = frame(OP_BINARY, _bomb(100 << 20), rsv1=True)
    figures = Figures(gateway.proc.pid, "proxy deflate bombs")
    deadline = time.monotonic() + 60
    for i in range(20):
        assert time.monotonic() < deadline, "bombs took too long"
        client = _deflate_client(gateway, f"/app/echo-bombs-{i}")
        try:
            client.send(bomb)
            assert client.recv_until_close()[0] == 1009
        finally:
            client.close()
    with capsys.disabled():
        figures.report(bombs=20, wire_kib=len(bomb) // 1024, inflated_mib_each=100)
    assert figures.rss_growth < 16
    assert figures.cpu < 5
    for i in range(20):
        assert _upstream_close(upstream, f"/echo-bombs-{i}")["code"] == 1001


def test_compressed_messages_under_the_limit_still_pass(gateway):
    """websockets compresses without context takeover, as the 101 now asks; the upstream
    reads such messages."""
    async def scenario():
        async with connect(gateway.url("/app/echo"), max_size=None) as ws:
            # added to the upstream's answer by wsgate (RFC 7692 §7.1.1.1)
            assert "client_no_context_takeover" in \
                ws.response.headers["Sec-WebSocket-Extensions"]
            (extension,) = ws.protocol.extensions
            assert extension.local_no_context_takeover
            for i in range(5):  # several messages: a kept context would break the second
                text = f"message {i} " + "repetitive text " * 4000  # 64 KB, well compressible
                await ws.send(text)
                assert await ws.recv() == "echo: " + text
            await ws.send(os.urandom(1000 * 1000))  # incompressible, just under 1 MiB
            assert len(await ws.recv()) == 1000 * 1000
    run(scenario())


# ------------------------------------------------------------------ fragments and pings


def test_a_million_empty_fragments_get_1009_quickly_and_cheaply(gateway, capsys):
    client = RawClient(gateway.port(), "/app/echo-fragments")
    cont = frame(OP_CONT, fin=False)  # one mask for all: what the gateway reads is the same
    stream = frame(OP_TEXT, fin=False) + cont * 999_998 + frame(OP_CONT)
    figures = Figures(gateway.proc.pid, "proxy 1,000,000 empty fragments")
    started = time.monotonic()
    try:
        for i in range(0, len(stream), 1 << 18):
            assert time.monotonic() - started < 20, "the gateway stopped reading"
            client.send(stream[i:i + (1 << 18)])
        code, reason, before = client.recv_until_close()
        elapsed = time.monotonic() - started
        # past the violation the gateway reads the rest unparsed, then drops the
        # connection when the close handshake times out (it no longer looks for a reply)
        dropped = client.wait_closed(10)
    finally:
        client.close()
    with capsys.disabled():
        figures.report(wire_mib=round(len(stream) / (1 << 20), 1),
                       seconds_to_1009=round(elapsed, 2))
    assert (code, reason) == (1009, b"too many fragments") and before == []
    assert dropped
    assert figures.cpu < 3
    assert elapsed < 10


def test_ping_flood_is_closed_with_1008(gateway, capsys):
    client = RawClient(gateway.port(), "/app/echo-pings")
    figures = Figures(gateway.proc.pid, "proxy ping flood")
    try:
        client.send(frame(OP_PING, b"flood") * 5000)  # max_fragments (1024) per second allowed
        code, reason, before = client.recv_until_close()
    finally:
        client.close()
    with capsys.disabled():
        figures.report(pings=5000, pongs=len(before))
    assert (code, reason) == (1008, b"too many control frames")
    assert len(before) <= 1024 and {opcode for opcode, _, _ in before} <= {0xA}


# ------------------------------------------------------------------ close codes

_FORBIDDEN = {
    "1005": struct.pack("!H", 1005), "1006": struct.pack("!H", 1006),
    "1015": struct.pack("!H", 1015), "999": struct.pack("!H", 999),
    "1004": struct.pack("!H", 1004), "2999": struct.pack("!H", 2999),
    "5000": struct.pack("!H", 5000), "one-byte": b"\x03",
    "bad-utf8": struct.pack("!H", 4000) + b"\xc3\x28",
}


@pytest.mark.parametrize("name", list(_FORBIDDEN))
def test_client_close_with_a_forbidden_code_gets_1002_and_upstream_1001(gateway, upstream, name):
    path = f"/echo-badclose-{name}"
    client = RawClient(gateway.port(), "/app" + path)
    try:
        client.send(frame(OP_CLOSE, _FORBIDDEN[name]))
        code, _, _ = client.recv_until_close()
        assert code == (1007 if name == "bad-utf8" else 1002)
        assert client.wait_closed(5)  # its handshake is over: the gateway closes TCP
    finally:
        client.close()
    assert _upstream_close(upstream, path)["code"] == 1001  # never the forbidden frame


class _RawUpstream:
    """An upstream that answers the upgrade, sends one close frame of the test's making
    (unmasked), and records the close frame the gateway sends back. Its 101 may carry a
    header of *pad* bytes and be written *chunk* bytes at a time (a hostile head)."""

    def __init__(self, payload, pad=0, chunk=None):
        self.payload = payload
        self.pad, self.chunk = pad, chunk
        self.reply = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(4096)
            key = [line.split(b":", 1)[1].strip() for line in data.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:")][0]
            accept = base64.b64encode(hashlib.sha1(
                key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
            head = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n")
            if self.pad:
                head += b"X-Pad: " + b"a" * self.pad + b"\r\n"
            head += b"\r\n"
            try:
                if self.chunk:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    for i in range(0, len(head), self.chunk):
                        conn.sendall(head[i:i + self.chunk])
                        time.sleep(0.001)
                else:
                    conn.sendall(head)
                conn.sendall(frame(OP_CLOSE, self.payload, mask=False))
                data = b""
                while len(data) < 8:  # the gateway's close: masked, at least 2 + 4 + 2 bytes
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    data += chunk
            except OSError:
                return  # the gateway cut it off
            masked = data[6:8]
            code = bytes(b ^ data[2 + i] for i, b in enumerate(masked))
            self.reply = (data[0] & 0x0F, struct.unpack("!H", code)[0])

    def stop(self):
        self.thread.join(10)
        self.listener.close()


@pytest.mark.parametrize("name", ["1005", "1015", "one-byte", "bad-utf8"])
def test_upstream_close_with_a_forbidden_code_gets_1002_and_client_1001(tmp_path, name):
    raw = _RawUpstream(_FORBIDDEN[name])
    gw = start_gateway(tmp_path, f"""
[route:raw]
path = /raw
upstream = ws://127.0.0.1:{raw.port}/
""")
    try:
        client = RawClient(gw.port(), "/raw")
        try:
            code, reason, _ = client.recv_until_close()
        finally:
            client.close()
        raw.stop()
        assert (code, reason) == (1001, b"going away")
        assert raw.reply == (OP_CLOSE, 1007 if name == "bad-utf8" else 1002)
    finally:
        assert gw.stop() == 0


def test_an_upstream_101_head_over_the_limit_gets_502_at_once(tmp_path):
    """A 101 whose head is larger than 16 KiB is refused on its size (as a client's
    request head is), however it arrives: not relayed, and not after the timeout."""
    raw = _RawUpstream(struct.pack("!H", 1000), pad=20 * 1024)
    gw = start_gateway(tmp_path, f"""
[route:raw]
path = /raw
upstream = ws://127.0.0.1:{raw.port}/
upstream_timeout = 5s
""")
    try:
        started = time.monotonic()
        status, _, _ = parse_response(raw_request(gw.port(), upgrade_request("/raw")))
        took = time.monotonic() - started
        raw.stop()
        assert status == 502
        assert took < 2.0, took
        event = gw.wait_event(lambda e: e.get("event") == "websocket.connection.rejected")
        assert event["reason"] == "upstream_rejected", event
    finally:
        assert gw.stop() == 0


def test_an_upstream_101_sent_byte_by_byte_is_read_whole_and_relayed(tmp_path):
    raw = _RawUpstream(struct.pack("!H", 4000) + b"done", chunk=1)
    gw = start_gateway(tmp_path, f"""
[route:raw]
path = /raw
upstream = ws://127.0.0.1:{raw.port}/
""")
    try:
        client = RawClient(gw.port(), "/raw")
        try:
            code, reason, _ = client.recv_until_close()
            client.send(close_frame(4000, b"done"))
            assert client.wait_closed(5)
        finally:
            client.close()
        raw.stop()
        assert (code, reason) == (4000, b"done")
        assert raw.reply == (OP_CLOSE, 4000)
    finally:
        assert gw.stop() == 0


# ------------------------------------------------------------------ admin kick reasons


def test_admin_kick_reason_is_cut_to_123_bytes_of_valid_utf8(gateway):
    client = RawClient(gateway.port(), "/app/echo-kick")
    port = client.sock.getsockname()[1]
    try:
        conn_id = _connection_id(gateway, port)
        query = urllib.parse.urlencode({"code": "4003", "reason": "é" * 100})
        assert _admin(gateway, "DELETE", f"/connections/{conn_id}?{query}")[0] == 200
        code, reason, _ = client.recv_until_close()
        assert code == 4003 and len(reason) <= 123
        assert reason.decode("utf-8") == "é" * 61
        client.send(close_frame(4003))
    finally:
        client.close()
    event = _closed_event(gateway, port)
    assert (event["close_code"], event["close_reason"], event["close_code_reply"],
            event["closed_by"]) == (4003, "é" * 61, 4003, "gateway")


# ------------------------------------------------------------------ TLS listener


def _tls_client(gateway, context, path):
    """A RawClient over TLS to the ``secure`` listener (RawClient speaks plain TCP only)."""
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", gateway.port("secure")),
                                                        timeout=10),
                               server_hostname="localhost")
    key = base64.b64encode(os.urandom(16))
    sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
                 b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " + key +
                 b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed during the handshake: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    client = RawClient.__new__(RawClient)
    client.sock, client.buffer, client.head = sock, rest, head.decode("latin-1")
    return client


def _closed_within(client, seconds):
    """Seconds until the gateway closed the TLS connection, or None if it did not."""
    started = time.monotonic()
    try:
        closed = client.wait_closed(seconds)
    except (ssl.SSLError, OSError):
        closed = True  # close_notify without a clean shutdown, or a reset: closed all the same
    return time.monotonic() - started if closed else None


def test_tls_client_close_the_gateway_closes_tcp_promptly(gateway, tls):
    client = _tls_client(gateway, tls[2], "/app/echo-tls-client")
    try:
        client.send(close_frame(1000))
        assert client.recv_until_close()[0] == 1000
        took = _closed_within(client, 3)
    finally:
        client.close()
    assert took is not None and took < 1.0, "the gateway did not close the TLS connection"


def test_tls_upstream_close_the_gateway_closes_tcp_promptly(gateway, tls):
    client = _tls_client(gateway, tls[2], "/app/close?code=4001&reason=bye")
    try:
        client.send(frame(OP_TEXT, b"trigger"))
        assert client.recv_until_close()[:2] == (4001, b"bye")
        client.send(close_frame(4001))
        took = _closed_within(client, 3)
    finally:
        client.close()
    assert took is not None and took < 1.0, "the gateway did not close the TLS connection"


def test_tls_proxy_connections_leave_no_fds_behind(gateway, tls, capsys):
    pid = gateway.proc.pid
    before = open_fds(pid)
    clients = []
    try:
        for i in range(20):
            client = _tls_client(gateway, tls[2], f"/app/echo-tls-fd-{i}")
            clients.append(client)
            client.send(close_frame(1000))
            assert client.recv_until_close()[0] == 1000
        for client in clients:  # our sockets stay open: the gateway must close its side
            assert _closed_within(client, 3) is not None
        deadline = time.monotonic() + 5
        while open_fds(pid) > before and time.monotonic() < deadline:
            time.sleep(0.05)
        after = open_fds(pid)
    finally:
        for client in clients:
            client.close()
    with capsys.disabled():
        print(f"\n[hostile] TLS proxy closes: gateway fds {before} -> {after} "
              f"with 20 clients still holding their sockets")
    assert after <= before


# ------------------------------------------------------------------ TCP_NODELAY

_SYS_PIDFD_GETFD = 438  # x86_64 and most others (asm-generic)


def _gateway_sockets(pid):
    """Duplicates of the gateway's TCP sockets (pidfd_getfd(2), Linux ≥ 5.6, ptrace rights)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    sockets = []
    try:
        for name in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                    continue
            except FileNotFoundError:
                continue
            fd = libc.syscall(_SYS_PIDFD_GETFD, pidfd, int(name), 0)
            if fd < 0:
                err = ctypes.get_errno()
                if err in (errno.EPERM, errno.ENOSYS):
                    if os.environ.get("CI"):
                        pytest.fail(f"pidfd_getfd: {os.strerror(err)}")
                    pytest.skip(f"pidfd_getfd: {os.strerror(err)}")
                continue  # closed meanwhile
            sock = socket.socket(fileno=fd)
            if sock.type == socket.SOCK_STREAM and sock.family == socket.AF_INET:
                sockets.append(sock)
            else:
                sock.close()
    finally:
        os.close(pidfd)
    return sockets


def _peer(sock):
    try:
        return sock.getpeername()
    except OSError:
        return None  # a listening socket


def test_both_legs_of_proxied_connections_set_tcp_nodelay(gateway, upstream, tls):
    """Read from the gateway's own sockets (duplicated with pidfd_getfd), plain and TLS."""
    async def scenario():
        async with connect(gateway.url("/app/echo"), compression=None) as plain, \
                connect(gateway.url("/app/echo", name="secure", scheme="wss"),
                        ssl=tls[2], server_hostname="localhost") as secure:
            await plain.send("x")
            await secure.send("y")
            assert [await plain.recv(), await secure.recv()] == ["echo: x", "echo: y"]
            clients = {plain.local_address[:2], secure.local_address[:2]}
            socks = await asyncio.to_thread(_gateway_sockets, gateway.proc.pid)
            try:
                flags = {}
                for sock in socks:
                    peer = _peer(sock)
                    if peer in clients or (peer and peer[1] == upstream.port):
                        leg = "client" if peer in clients else f"upstream from {sock.getsockname()}"
                        flags[leg, peer] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            finally:
                for sock in socks:
                    sock.close()  # our duplicates only: the gateway's sockets stay open
            return flags
    flags = run(scenario())
    client_legs = [v for (leg, _), v in flags.items() if leg == "client"]
    upstream_legs = [v for (leg, _), v in flags.items() if leg != "client"]
    assert len(client_legs) == 2 and len(upstream_legs) >= 2, flags
    assert all(client_legs) and all(upstream_legs), flags


# ------------------------------------------------------------------ the closed event


def test_closed_event_client_closes_first(gateway):
    async def scenario():
        ws = await connect(gateway.url("/app/echo-ev-client"), compression=None)
        port = ws.local_address[1]
        await ws.send("x")
        await ws.recv()
        await ws.close(4000, "bye")
        return port
    event = _closed_event(gateway, run(scenario()))
    assert (event["close_code"], event["close_reason"], event["close_code_reply"],
            event["closed_by"]) == (4000, "bye", 4000, "client")


def test_closed_event_upstream_closes_first(gateway):
    async def scenario():
        async with connect(gateway.url("/app/close?code=4001&reason=done"),
                           compression=None) as ws:
            port = ws.local_address[1]
            await ws.send("trigger")
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            return port
    event = _closed_event(gateway, run(scenario()))
    assert (event["close_code"], event["close_reason"], event["close_code_reply"],
            event["closed_by"]) == (4001, "done", 4001, "upstream")


def test_closed_event_upstream_lost_is_1014_by_upstream(gateway):
    async def scenario():
        async with connect(gateway.url("/app/drop"), compression=None) as ws:
            port = ws.local_address[1]
            await ws.send("bye")
            with pytest.raises(ConnectionClosed) as info:
                await ws.recv()
            assert info.value.rcvd.code == 1014
            return port
    event = _closed_event(gateway, run(scenario()))
    assert (event["close_code"], event["close_reason"], event["close_code_reply"],
            event["closed_by"]) == (1014, "upstream lost", 1014, "upstream")


def test_closed_event_client_gone_without_close_has_no_code(gateway):
    with socket.create_connection(("127.0.0.1", gateway.port()), timeout=5) as sock:
        port = sock.getsockname()[1]
        sock.sendall(b"GET /app/echo-gone HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    event = _closed_event(gateway, port)
    assert (event["close_code"], event["close_code_reply"], event["closed_by"]) == \
        (None, None, "client")


def test_closed_event_gateway_violation(gateway):
    client = RawClient(gateway.port(), "/app/echo-ev-violation")
    port = client.sock.getsockname()[1]
    try:
        client.send(frame(OP_BINARY, bytes((1 << 20) + 1)))
        assert client.recv_until_close()[0] == 1009
        client.send(close_frame(1009))
        assert client.wait_closed(5)
    finally:
        client.close()
    event = _closed_event(gateway, port)
    assert (event["close_code"], event["close_reason"], event["close_code_reply"],
            event["closed_by"]) == (1009, "message too big", 1009, "gateway")
