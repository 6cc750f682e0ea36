"""Hostile clients on the admin endpoint and the listening queues of every listener.

The admin endpoint gives each request (head and body) a fixed time to arrive,
however slowly its bytes trickle, and bounds the head; every listener binds
with its ``backlog`` (single process and ``workers = N``). The listening
queue's length is read from ``ss -ltn`` / ``ss -lx`` (Send-Q of a listening
socket is its backlog on Linux).
"""

import json
import os
import selectors
import socket
import subprocess
import time
import urllib.request

import pytest

from harness import admin_text, start_gateway
from wsgate.admin import REQUEST_TIMEOUT

MARGIN = 4.0

BASE = """
[wsgate]
node_id = hostile-admin
log_format = json

[listen:main]
endpoint = tcp:0:interface=127.0.0.1

[admin]
endpoint = tcp:0:interface=127.0.0.1
token = T0KEN

[route:echo]
path = /echo
echo = yes

[route:chat]
path = /chat/{room}
broadcast = room:{room}
"""


@pytest.fixture(autouse=True)
def _linux_only():
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("reads /proc and ss (Linux)")


def _fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def _healthz(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        return response.status


def _slow_clients(port):
    """Fifty connections that each trickle one byte a second, in three ways: the
    request line, a header, and the body of a POST."""
    openings = (
        [b"G"] * 20
        + [b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: a"] * 20
        + [b"POST /publish/room HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
           b"Content-Length: 100000\r\n\r\nx"] * 10)
    clients = []
    for opening in openings:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(opening)
        clients.append((sock, b"E" if opening == b"G" else b"a"))
    return clients


def _trickle_until_closed(clients, started, deadline):
    """Send one byte a second on each open client until *deadline*; return {socket:
    seconds from *started* until the gateway closed it}."""
    selector = selectors.DefaultSelector()
    for sock, _ in clients:
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    trickles = dict(clients)
    closed = {}
    next_byte = time.monotonic() + 1.0
    while len(closed) < len(clients) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.1):
            sock = key.fileobj
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionResetError:
                data = b""
            if not data:
                closed[sock] = time.monotonic() - started
                selector.unregister(sock)
        if time.monotonic() >= next_byte:
            next_byte += 1.0
            for sock, trickle in trickles.items():
                if sock not in closed:
                    try:
                        sock.send(trickle)
                    except OSError:
                        closed[sock] = time.monotonic() - started
                        selector.unregister(sock)
    selector.close()
    for sock in trickles:
        sock.close()
    return closed


def test_admin_slowloris_is_closed_within_the_request_timeout(tmp_path):
    gw = start_gateway(tmp_path, "", base=BASE, listeners=("main", "admin"))
    try:
        port = gw.port("admin")
        fds_before = _fds(gw.proc.pid)
        opened = time.monotonic()
        clients = _slow_clients(port)
        time.sleep(0.5)
        fds_during = _fds(gw.proc.pid)
        # meanwhile the endpoint answers everyone else at once
        started = time.monotonic()
        assert _healthz(port) == 200
        answer_s = time.monotonic() - started
        closed = _trickle_until_closed(clients, opened, opened + REQUEST_TIMEOUT + MARGIN + 2)
        still_open = len(clients) - len(closed)
        slowest = max(closed.values(), default=None)
        time.sleep(0.3)
        fds_after = _fds(gw.proc.pid)
        print(f"admin slowloris: {len(clients)} clients, {still_open} still open, slowest "
              f"closed after {slowest}s; gateway fds {fds_before} -> {fds_during} -> "
              f"{fds_after}; /healthz meanwhile in {answer_s * 1000:.1f} ms")
        assert still_open == 0
        assert slowest <= REQUEST_TIMEOUT + MARGIN
        assert min(closed.values()) >= REQUEST_TIMEOUT - 1  # a deadline, not a race
        assert fds_after <= fds_before + 1
        assert answer_s < 1.0
    finally:
        assert gw.stop() == 0


def test_admin_head_is_bounded_in_size_and_header_count(tmp_path):
    gw = start_gateway(tmp_path, "", base=BASE, listeners=("main", "admin"))
    try:
        port = gw.port("admin")
        for head in (
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 70000 + b"\r\n\r\n",
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                + b"".join(b"X-H%d: v\r\n" % i for i in range(150)) + b"\r\n",
                b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                + b"".join(b"X-Pad%d: %s\r\n" % (i, b"b" * 180) for i in range(95)) + b"\r\n"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                started = time.monotonic()
                try:
                    sock.sendall(head)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                data, closed = b"", False
                try:
                    while chunk := sock.recv(65536):
                        data += chunk
                    closed = True
                except ConnectionResetError:
                    closed = True
                except TimeoutError:
                    pass
                assert not data.startswith(b"HTTP/1.1 200"), head[:60]
                assert closed and time.monotonic() - started < 3
        # a keep-alive connection still takes one request after another
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            for _ in range(3):
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                    data += sock.recv(65536)
                assert data.startswith(b"HTTP/1.1 200")
    finally:
        assert gw.stop() == 0


HOSTILE_PATHS = [
    # an id, a route, a pool server or a channel that is not UTF-8, huge, or oddly shaped
    ("DELETE", "/connections/%ff", 404),
    ("DELETE", "/connections/" + "i" * 12000, 404),
    ("DELETE", "/connections/x?code=" + "9" * 4000, 400),
    ("DELETE", "/connections/x?code=1e3", 400),
    ("POST", "/drain/route/%ff", 404),
    ("POST", "/drain/route/" + "r" * 12000, 404),
    ("POST", "/drain/route/echo/extra", 404),
    ("DELETE", "/drain/upstream/%ff/%fe", 404),
    ("POST", "/drain/upstream/" + "p" * 6000 + "/" + "s" * 6000, 404),
    ("GET", "/channels/%ff/history", 404),
    ("GET", "/channels/room:" + "x" * 12000 + "/presence", 404),
    ("GET", "/channels/history", 404),
    ("GET", "/channels/kept:a/history?limit=" + "9" * 4000, 400),
    ("GET", "/channels/kept:a/history?limit=1e3", 400),
    ("GET", "/channels/kept:a/history?limit=-1", 400),
    ("GET", "/channels/kept:a/history?since=%ff", 200),
    ("GET", "/channels/kept:a/history?since=" + "z" * 12000, 200),
]


def test_admin_paths_with_hostile_ids_and_names_get_a_json_answer(tmp_path):
    """Never a 500 (a non-UTF-8 connection id was one) and nothing critical logged: the
    harness fails the stop on a logged traceback."""
    gw = start_gateway(tmp_path, """
        [route:kept]
        path = /kept/{room}
        broadcast = kept:{room}
        history = 10
        """, base=BASE, listeners=("main", "admin"))
    try:
        for method, path, expected in HOSTILE_PATHS:
            status, body = admin_text(gw, method, path, "T0KEN")
            assert status == expected, (method, path[:60], status, body[:200])
            assert isinstance(json.loads(body), dict)
    finally:
        assert gw.stop() == 0


def test_admin_channel_deadline_runs_from_the_connection_and_after_each_answer():
    """In memory: bytes do not reset the deadline; a complete request stops it; the
    answer starts it again for the next request on the connection."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.web import resource, server

    from wsgate.admin import bound_requests

    class Ok(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            return b"ok"

    clock = Clock()
    site = bound_requests(server.Site(Ok(), reactor=clock))
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    for byte in b"GET /ok HTTP/1.1\r\nHost: x\r\n\r"[:int(REQUEST_TIMEOUT) - 1]:
        channel.dataReceived(bytes([byte]))
        clock.advance(1)
    assert not transport.disconnecting
    clock.advance(1.01)
    assert transport.disconnecting  # dropped however recently a byte came

    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    clock.advance(REQUEST_TIMEOUT - 1)
    channel.dataReceived(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200")
    clock.advance(REQUEST_TIMEOUT - 0.5)  # a fresh deadline for the next request
    assert not transport.disconnecting
    clock.advance(1)
    assert transport.disconnecting


# ---------------------------------------------------------------- backlog


def _listen_queues():
    """{local address: backlog} of every listening TCP and UNIX stream socket."""
    queues = {}
    for args in (["ss", "-ltnH"], ["ss", "-lxH"]):
        output = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        for line in output.splitlines():
            fields = line.split()
            if args[1] == "-ltnH":  # State Recv-Q Send-Q Local Peer
                queues[fields[3]] = int(fields[2])
            elif len(fields) >= 5 and fields[1] == "LISTEN":  # Netid State Recv-Q Send-Q Local
                queues[fields[4]] = int(fields[3])
    return queues


def test_with_backlog_sets_the_listen_queue_of_endpoints_that_have_one():
    from twisted.internet import endpoints, reactor

    from wsgate.startup import with_backlog

    for text in ("tcp:0:interface=127.0.0.1", "haproxy:tcp:0", "unix:/tmp/x.sock"):
        endpoint = endpoints.serverFromString(reactor, with_backlog(text, 777))
        endpoint = getattr(endpoint, "_wrappedEndpoint", endpoint)
        assert endpoint._backlog == 777, text
    assert with_backlog("systemd:domain=INET:index=0", 777) == "systemd:domain=INET:index=0"
    assert with_backlog("tcp:0", None) == "tcp:0"


def test_every_listener_binds_with_its_backlog(tmp_path):
    from certs import TestCA

    cert, key = TestCA().write_leaf(tmp_path, "leaf", "localhost", "127.0.0.1")
    sock_path = tmp_path / "gw.sock"
    gw = start_gateway(tmp_path, f"""
[listen:main]
endpoint = tcp:0:interface=127.0.0.1
backlog = 700

[listen:plain]
endpoint = tcp:0:interface=127.0.0.1

[listen:secure]
endpoint = tcp:0:interface=127.0.0.1
tls_cert = {cert}
tls_key = {key}
backlog = 300

[listen:proxied]
endpoint = haproxy:tcp:0:interface=127.0.0.1
backlog = 400

[listen:local]
endpoint = unix:{sock_path}
backlog = 200

[route:echo]
path = /echo
echo = yes
""", base="[wsgate]\nnode_id = backlog\nlog_format = json\n",
        listeners=("main", "plain", "secure", "proxied", "local"))
    try:
        queues = _listen_queues()
        seen = {name: queues.get(f"127.0.0.1:{gw.port(name)}")
                for name in ("main", "plain", "secure", "proxied")}
        seen["local"] = queues.get(str(sock_path))
        print(f"listen queues: {seen}")
        assert seen == {"main": 700, "plain": 1024, "secure": 300, "proxied": 400,
                        "local": 200}
    finally:
        assert gw.stop() == 0


def test_workers_parent_binds_with_the_backlog_and_its_admin_has_the_timeout(tmp_path):
    gw = start_gateway(tmp_path, """
[wsgate]
node_id = pool-backlog
log_format = json
workers = 2

[listen:main]
endpoint = tcp:0:interface=127.0.0.1
backlog = 900

[listen:other]
endpoint = tcp:0:interface=127.0.0.1

[admin]
endpoint = tcp:0:interface=127.0.0.1
token = T0KEN

[route:echo]
path = /echo
echo = yes
""", base="",
        listeners=("main", "other", "admin"))
    try:
        queues = _listen_queues()
        assert queues.get(f"127.0.0.1:{gw.port('main')}") == 900
        assert queues.get(f"127.0.0.1:{gw.port('other')}") == 1024
        opened = time.monotonic()
        clients = _slow_clients(gw.port("admin"))
        closed = _trickle_until_closed(clients, opened, opened + REQUEST_TIMEOUT + MARGIN + 2)
        assert len(closed) == len(clients)
        assert max(closed.values()) <= REQUEST_TIMEOUT + MARGIN
    finally:
        assert gw.stop() == 0

