"""The ``wsgate`` command line against real ``twistd -n wsgate`` processes and a Node upstream.

The CLI runs as ``python -m wsgate.cli`` in a subprocess (the installed
package, as the console script would), from a scratch directory.
"""

import base64
import hashlib
import http.server
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import certs
from harness import ROOT, NodeUpstream, run_twistd_expecting_failure, start_gateway, write_config

import wsgate

CLI = [sys.executable, "-m", "wsgate.cli"]
ADMIN_TOKEN = "cli-test-token"
RUN_TIMEOUT = 30


def wsgate_cli(*args, cwd, input=None, env=None, timeout=RUN_TIMEOUT):
    """Run the CLI to completion; return the CompletedProcess (text)."""
    return subprocess.run(
        [*CLI, *map(str, args)], capture_output=True, text=True, input=input,
        timeout=timeout, cwd=cwd,
        stdin=None if input is not None else subprocess.DEVNULL,
        env={**os.environ, **(env or {})})


class CliProcess:
    """A CLI subprocess driven through pipes, its output lines collected as they come."""

    def __init__(self, *args, cwd):
        self.proc = subprocess.Popen(
            [*CLI, *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, bufsize=1, cwd=cwd)
        self.out, self.err = queue.Queue(), queue.Queue()
        self.out_lines, self.err_lines = [], []
        for stream, lines, sink in ((self.proc.stdout, self.out_lines, self.out),
                                    (self.proc.stderr, self.err_lines, self.err)):
            threading.Thread(target=self._pump, args=(stream, lines, sink), daemon=True).start()

    @staticmethod
    def _pump(stream, lines, sink):
        for line in stream:
            lines.append(line.rstrip("\n"))
            sink.put(line.rstrip("\n"))

    def expect(self, sink, predicate, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no such line; stdout {self.out_lines}, "
                                     f"stderr {self.err_lines}")
            try:
                line = sink.get(timeout=remaining)
            except queue.Empty:
                continue
            if predicate(line):
                return line

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout=15):
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def scratch(tmp_path):
    return tmp_path


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def upstream():
    node = NodeUpstream()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def ca():
    return certs.TestCA()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, upstream, ca):
    directory = tmp_path_factory.mktemp("cli")
    cert, key = ca.write_leaf(directory, "server", "127.0.0.1")
    ca.write_ca(directory / "ca.pem")
    gw = start_gateway(directory, f"""
        [admin]
        endpoint = tcp:0:interface=127.0.0.1
        token = {ADMIN_TOKEN}

        [listen:deflate]
        endpoint = tcp:0:interface=127.0.0.1
        compression = permessage-deflate

        [listen:secure]
        endpoint = tcp:0:interface=127.0.0.1
        tls_cert = {cert}
        tls_key = {key}

        [route:echo]
        path = /echo
        echo = yes

        [route:chat]
        path = /chat/{{room}}
        broadcast = room:{{room}}

        [route:vhost]
        host = api.example.com
        path = /v
        echo = yes

        [route:up]
        path = /up/*
        upstream = ws://127.0.0.1:{upstream.port}{{path}}
        forward_headers = X-Tenant
        # connect --origin sends a foreign Origin (the same-origin default would 403)
        allow_cross_origin = yes
        """, listeners=("main", "admin", "deflate", "secure"))
    gw.ca_path = directory / "ca.pem"
    yield gw
    assert gw.stop() == 0


# ------------------------------------------------------------------ --version, --help


def test_version_prints_the_package_version(scratch):
    result = wsgate_cli("--version", cwd=scratch)
    assert result.returncode == 0
    assert result.stdout.strip() == f"wsgate {wsgate.__version__}"


@pytest.mark.parametrize("command,mentions", [
    ("check", ["FILE", "/etc/wsgate/wsgate.ini", "--quiet"]),
    ("connect", ["-H", "-s", "--origin", "--ca", "--insecure", "--compress", "-x",
                 "--wait", "--ping", "exit status"]),
    ("publish", ["CHANNEL", "MESSAGE", "--admin", "--token"]),
    ("connections", ["--kick", "--admin", "--token", "--json"]),
])
def test_each_command_has_help(scratch, command, mentions):
    result = wsgate_cli(command, "--help", cwd=scratch)
    assert result.returncode == 0
    for word in mentions:
        assert word in result.stdout


def test_no_command_is_a_usage_error(scratch):
    result = wsgate_cli(cwd=scratch)
    assert result.returncode == 2
    assert "usage: wsgate" in result.stderr


# ------------------------------------------------------------------ check


def test_check_default_config_lists_listeners_and_routes(scratch):
    result = wsgate_cli("check", os.path.join(ROOT, "etc", "wsgate.ini"), cwd=scratch)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout
    assert out.startswith(f"{os.path.join(ROOT, 'etc', 'wsgate.ini')}: OK (1 listener, ")
    listener = next(line for line in out.splitlines() if line.startswith("main "))
    assert listener.split()[:3] == ["main", "tcp:8080:interface=127.0.0.1", "no"]
    routes = [line.split() for line in out.splitlines() if line.startswith(("echo ", "chat "))]
    assert routes == [["echo", "*", "/echo", "all", "echo"],
                      ["chat", "*", "/chat/{room}", "all", "broadcast", "room:{room}"]]


def test_check_lists_routes_in_matching_order(scratch):
    path = write_config(scratch, """
        [listen:main]
        endpoint = tcp:0:interface=127.0.0.1

        [listen:tls]
        endpoint = tcp:0:interface=127.0.0.1
        max_message_size = 64KiB
        max_frame_size = 16KiB
        ping_interval = 0

        [route:prefix]
        path = /api/*
        echo = yes

        [route:pattern]
        path = /chat/{room}
        broadcast = room:{room}

        [route:exact]
        path = /chat/lobby
        echo = yes
        listeners = tls
        max_message_size = 4KiB

        [route:wild]
        host = *.example.com
        path = /api/*
        echo = yes

        [route:named]
        host = api.example.com
        path = /api/*
        echo = yes
        idle_timeout = 30s
        """)
    result = wsgate_cli("check", path, cwd=scratch)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    order = [line.split()[0] for line in lines[lines.index("routes, in matching order:") + 2:]]
    assert order == ["named", "wild", "exact", "pattern", "prefix"]
    rows = {line.split()[0]: line for line in lines if line.strip()}
    assert "4KiB" in rows["exact"] and " tls " in rows["exact"]
    assert "idle_timeout=30s" in rows["named"]
    assert rows["main"].split() == ["main", "tcp:0:interface=127.0.0.1", "no", "10s", "30s,",
                                    "timeout", "10s", "off", "1MiB", "off"]
    assert "64KiB (frames 16KiB)" in rows["tls"]
    assert rows["tls"].split()[4] == "off"  # ping_interval = 0


@pytest.mark.parametrize("body,where", [
    ("""
     [listen:main]
     endpoint = tcp:0:interface=127.0.0.1
     ping_timeout = forever
     """, "[listen:main] ping_timeout: expected a duration"),
    ("""
     [listen:main]
     endpoint = nonsense:1234

     [route:echo]
     path = /echo
     echo = yes
     """, "[listen:main] endpoint: expected a Twisted server endpoint"),
    ("""
     [listen:main]
     endpoint = tcp:0:interface=127.0.0.1

     [route:echo]
     path = /echo
     echo = yes
     colour = red
     """, "[route:echo] colour: unknown key"),
    ("""
     [listen:main]
     endpoint = tcp:0:interface=127.0.0.1

     [route:both]
     path = /both
     echo = yes
     broadcast = all
     """, "[route:both] broadcast: a route has one target"),
    ("""
     [listen:main]
     endpoint = tcp:0:interface=127.0.0.1

     [route:lost]
     path = /lost
     echo = yes
     listeners = elsewhere
     """, "[route:lost] listeners: unknown listener 'elsewhere'"),
    ("""
     [listen:main]
     endpoint = tcp:0:interface=127.0.0.1
     tls_cert = missing.pem
     """, "[listen:main] tls_cert: cannot read"),
])
def test_check_broken_config_prints_the_startup_error(scratch, body, where):
    path = write_config(scratch, body)
    result = wsgate_cli("check", path, cwd=scratch)
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"wsgate: {path}: {where}")
    code, startup_stderr, _ = run_twistd_expecting_failure(path)
    assert code == 1
    assert result.stderr == startup_stderr  # the very same line as start-up


def test_check_missing_file_is_one_line(scratch):
    result = wsgate_cli("check", scratch / "absent.ini", cwd=scratch)
    assert result.returncode == 1
    assert result.stderr == (f"wsgate: {scratch / 'absent.ini'}: cannot read the config "
                             "file: No such file or directory\n")


def test_check_quiet_prints_nothing_when_valid(scratch):
    result = wsgate_cli("check", "-q", os.path.join(ROOT, "etc", "wsgate.ini"), cwd=scratch)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_check_does_not_listen(scratch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(scratch, f"""
            [listen:main]
            endpoint = tcp:{port}:interface=127.0.0.1
            """)
        result = wsgate_cli("check", path, cwd=scratch)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------------ connect


def test_connect_x_through_the_echo_route(gateway, scratch):
    result = wsgate_cli("connect", "-x", "hello", "-x", "héllo wörld", gateway.url("/echo"),
                        cwd=scratch)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "hello\nhéllo wörld\n"
    assert f"connected to {gateway.url('/echo')}" in result.stderr
    assert result.stderr.splitlines()[-1] == "closed: 1000"


def test_connect_host_header_selects_a_host_route(gateway, scratch):
    result = wsgate_cli("connect", "-H", "Host: api.example.com", "-x", "by name",
                        "--wait", "300ms", gateway.url("/v"), cwd=scratch)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "by name\n"
    plain = wsgate_cli("connect", "-x", "by ip", gateway.url("/v"), cwd=scratch)
    assert plain.returncode == 1 and plain.stderr.startswith("handshake refused: 404")


def test_connect_binary_messages_print_as_hex_or_size(gateway, scratch):
    long = "a" * 65
    result = wsgate_cli("connect", "--binary", "-x", "hi", "-x", "a" * 64, "-x", long,
                        "--wait", "500ms", gateway.url("/echo"), cwd=scratch)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "<binary 2 bytes: 6869>", f"<binary 64 bytes: {'61' * 64}>", "<binary 65 bytes>"]


def test_connect_unknown_path_is_refused_with_404(gateway, scratch):
    result = wsgate_cli("connect", "-x", "hello", gateway.url("/nothing"), cwd=scratch)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("handshake refused: 404 ")


def test_connect_prints_status_and_body_of_a_refusal(upstream, scratch):
    result = wsgate_cli("connect", "-x", "x", f"ws://127.0.0.1:{upstream.port}/reject",
                        cwd=scratch)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0] == "handshake refused: 403 forbidden"


def test_connect_upstream_refusal_through_the_proxy_is_502(gateway, scratch):
    result = wsgate_cli("connect", "-x", "x", gateway.url("/up/reject"), cwd=scratch)
    assert result.returncode == 1
    assert result.stderr.startswith("handshake refused: 502 ")


def test_connect_subprotocol_reaches_the_upstream(gateway, upstream, scratch):
    result = wsgate_cli("connect", "-s", "chat.v1", "-s", "chat.v2", "-x", "hi",
                        "--wait", "500ms", gateway.url("/up/subprotocol"), cwd=scratch)
    assert result.returncode == 0, result.stderr
    assert "(subprotocol chat.v2)" in result.stderr
    assert result.stdout == "echo: hi\n"
    event = upstream.wait_event(lambda e: e.get("event") == "open"
                                and e.get("path") == "/subprotocol")
    assert event["protocol"] == "chat.v2"


def test_connect_headers_and_origin_reach_the_upstream(gateway, scratch):
    result = wsgate_cli("connect", "-H", "X-Tenant: acme", "-H", "Authorization: Bearer t0k",
                        "--origin", "https://app.example", "-s", "a", "-s", "b",
                        "--wait", "500ms", "-x", "ignored", gateway.url("/up/headers?q=1"),
                        cwd=scratch)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.splitlines()[0])
    assert seen["url"] == "/up/headers?q=1"
    headers = seen["headers"]
    assert headers["x-tenant"] == "acme"
    assert headers["authorization"] == "Bearer t0k"
    assert headers["origin"] == "https://app.example"
    assert headers["user-agent"] == f"wsgate/{wsgate.__version__}"
    assert [p.strip() for p in headers["sec-websocket-protocol"].split(",")] == ["a", "b"]


def test_connect_close_code_other_than_1000_exits_3(gateway, scratch):
    result = wsgate_cli("connect", "-x", "trigger", gateway.url("/up/close?code=4001&reason=bye"),
                        cwd=scratch)
    assert result.returncode == 3
    assert result.stderr.splitlines()[-1] == "closed: 4001 bye"


def test_connect_upstream_lost_shows_1014(gateway, scratch):
    result = wsgate_cli("connect", "-x", "bye", gateway.url("/up/drop"), cwd=scratch)
    assert result.returncode == 3
    assert result.stderr.splitlines()[-1] == "closed: 1014 upstream lost"


def test_connect_wss_with_a_test_ca(gateway, scratch):
    url = gateway.url("/echo", name="secure", scheme="wss")
    result = wsgate_cli("connect", "--ca", gateway.ca_path, "-x", "secret", url, cwd=scratch)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "secret\n"


def test_connect_wss_without_the_ca_is_a_connection_error(gateway, scratch):
    url = gateway.url("/echo", name="secure", scheme="wss")
    result = wsgate_cli("connect", "-x", "secret", url, cwd=scratch)
    assert result.returncode == 2
    assert result.stdout == ""
    assert f"cannot connect to {url}: TLS: certificate verify failed" in result.stderr


def test_connect_wss_checks_the_host_name(gateway, scratch):
    url = f"wss://localhost:{gateway.port('secure')}/echo"  # the certificate names 127.0.0.1
    result = wsgate_cli("connect", "--ca", gateway.ca_path, "-x", "secret", url, cwd=scratch)
    assert result.returncode == 2
    assert "not valid for this host name" in result.stderr


def test_connect_insecure_warns_and_connects(gateway, scratch):
    url = gateway.url("/echo", name="secure", scheme="wss")
    result = wsgate_cli("connect", "--insecure", "-x", "secret", url, cwd=scratch)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "secret\n"
    assert "warning: --insecure" in result.stderr.splitlines()[0]


def test_connect_compress_negotiates_permessage_deflate(gateway, scratch):
    text = "compress me " * 100
    result = wsgate_cli("connect", "--compress", "-x", text, "--wait", "500ms",
                        gateway.url("/echo", name="deflate"), cwd=scratch)
    assert result.returncode == 0, result.stderr
    assert "(permessage-deflate)" in result.stderr
    assert result.stdout == text + "\n"
    plain = wsgate_cli("connect", "--compress", "-x", "x", "--wait", "300ms",
                       gateway.url("/echo"), cwd=scratch)  # compression off on [listen:main]
    assert plain.returncode == 0 and "permessage-deflate" not in plain.stderr


def test_connect_ping_prints_the_round_trip_time(gateway, scratch):
    result = wsgate_cli("connect", "--ping", "--wait", "300ms", gateway.url("/echo"),
                        cwd=scratch)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^ping: \d+\.\d\d ms$", result.stderr, re.M)


def test_connect_refused_tcp_port_exits_2(scratch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = wsgate_cli("connect", "-x", "x", f"ws://127.0.0.1:{port}/echo", cwd=scratch)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"wsgate: cannot connect to ws://127.0.0.1:{port}/echo: "
                                     "connection refused")


@pytest.mark.parametrize("args,message", [
    (["http://127.0.0.1/echo"], "expected a ws:// or wss:// URL"),
    (["-H", "no colon", "ws://127.0.0.1/echo"], "-H expects 'Name: value'"),
    (["-H", "Sec-WebSocket-Protocol: a", "ws://127.0.0.1/echo"], "use -s"),
    (["--wait", "forever", "ws://127.0.0.1/echo"], "expected a duration"),
])
def test_connect_bad_arguments_are_usage_errors(scratch, args, message):
    result = wsgate_cli("connect", *args, cwd=scratch)
    assert result.returncode == 2
    assert message in result.stderr


def test_connect_interactive_session_through_a_pipe(gateway, scratch):
    client = CliProcess("connect", "--wait", "300ms", gateway.url("/echo"), cwd=scratch)
    try:
        client.expect(client.err, lambda line: line.startswith("connected to "))
        client.send("first line")
        assert client.expect(client.out, lambda line: True) == "first line"
        client.send("second line")
        assert client.expect(client.out, lambda line: True) == "second line"
        client.proc.stdin.write("no newline at the end")
        client.proc.stdin.close()  # end of input: wait 300ms for replies, then close 1000
        assert client.expect(client.out, lambda line: True) == "no newline at the end"
        assert client.wait() == 0
        client.expect(client.err, lambda line: line == "closed: 1000")
    finally:
        client.stop()


def test_connect_sessions_share_a_broadcast_room(gateway, scratch):
    listener = CliProcess("connect", gateway.url("/chat/cli-room"), cwd=scratch)
    try:
        listener.expect(listener.err, lambda line: line.startswith("connected to "))
        talker = wsgate_cli("connect", "-x", "hello room", "--wait", "300ms",
                            gateway.url("/chat/cli-room"), cwd=scratch)
        assert talker.returncode == 0, talker.stderr
        assert talker.stdout == ""  # include_sender = no
        assert listener.expect(listener.out, lambda line: True) == "hello room"
        listener.proc.stdin.close()
        assert listener.wait() == 0
    finally:
        listener.stop()


def test_connect_ctrl_c_closes_with_1000(gateway, scratch):
    client = CliProcess("connect", gateway.url("/echo"), cwd=scratch)
    try:
        client.expect(client.err, lambda line: line.startswith("connected to "))
        client.proc.send_signal(signal.SIGINT)
        assert client.wait() == 0
        client.expect(client.err, lambda line: line == "closed: 1000")
    finally:
        client.stop()


class CloseFirstServer:
    """A raw WebSocket server: completes one handshake, sends *close_payload* as a
    close frame at once, and keeps the client's answer (opcode, unmasked payload)."""

    def __init__(self, close_payload):
        self.close_payload = close_payload
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"ws://127.0.0.1:{self.sock.getsockname()[1]}/"
        self.reply = queue.Queue()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(4096)
            key = re.search(rb"(?im)^sec-websocket-key:[ \t]*(\S+)", head).group(1)
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
                         + bytes([0x88, len(self.close_payload)]) + self.close_payload)
            b0, b1 = _recv_exactly(conn, 2)
            mask = _recv_exactly(conn, 4) if b1 & 0x80 else bytes(4)
            payload = _recv_exactly(conn, b1 & 0x7F)  # a control frame: at most 125 bytes
            self.reply.put((b0 & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(payload))))

    def close(self):
        self.sock.close()


WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _recv_exactly(conn, size):
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {data!r}")
        data += chunk
    return data


@pytest.mark.parametrize("code, reason, shown", [
    (4003, "kicked", "closed: 4003 kicked"),
    (1001, "", "closed: 1001"),
    (1009, "message too big", "closed: 1009 message too big"),
    (1014, "upstream lost", "closed: 1014 upstream lost"),
    (None, "", "closed: no status code (1005)"),
])
def test_connect_answers_a_server_close_with_the_same_code(scratch, code, reason, shown):
    # RFC 6455 §5.5.1: the answer to a close frame echoes its status code.
    payload = b"" if code is None else code.to_bytes(2, "big") + reason.encode()
    server = CloseFirstServer(payload)
    try:
        result = wsgate_cli("connect", server.url, cwd=scratch)
        assert server.reply.get(timeout=10) == (0x8, payload)
    finally:
        server.close()
    assert result.stderr.splitlines()[-1] == shown
    assert result.returncode == 3


# ------------------------------------------------------------------ admin API, end to end


def _admin_args(gateway):
    return ["--admin", f"http://127.0.0.1:{gateway.port('admin')}", "--token", ADMIN_TOKEN]


def test_publish_reaches_a_connect_subscriber_in_the_same_room(gateway, scratch):
    subscriber = CliProcess("connect", gateway.url("/chat/published"), cwd=scratch)
    try:
        subscriber.expect(subscriber.err, lambda line: line.startswith("connected to "))
        result = wsgate_cli("publish", *_admin_args(gateway), "room:published", "from admin",
                            cwd=scratch)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"channel": "room:published", "receivers": 1}
        assert subscriber.expect(subscriber.out, lambda line: True) == "from admin"
        binary = wsgate_cli("publish", *_admin_args(gateway), "--binary", "room:published",
                            "-", input="\x01\x02", cwd=scratch)
        assert binary.returncode == 0, binary.stderr
        assert subscriber.expect(subscriber.out, lambda line: True) == "<binary 2 bytes: 0102>"
        subscriber.proc.stdin.close()
        assert subscriber.wait() == 0
    finally:
        subscriber.stop()


def test_publish_and_connections_read_the_admin_endpoint_and_token_from_config(gateway,
                                                                              scratch):
    """Issue 18, item 11: the operator's config names the admin endpoint and its token."""
    config = scratch / "ops.ini"
    config.write_text("[listen:main]\nendpoint = tcp:0:interface=127.0.0.1\n"
                      f"[admin]\nendpoint = tcp:{gateway.port('admin')}:interface=127.0.0.1\n"
                      f"token = {ADMIN_TOKEN}\n")
    listed = wsgate_cli("connections", "--config", config, "--json", cwd=scratch)
    assert listed.returncode == 0, listed.stderr
    assert "connections" in json.loads(listed.stdout)
    published = wsgate_cli("publish", "--config", config, "room:nobody", "hi", cwd=scratch)
    assert published.returncode == 0, published.stderr
    wrong = wsgate_cli("connections", "--config", config, "--token", "nope", cwd=scratch)
    assert wrong.returncode == 1 and "401" in wrong.stderr  # --token still wins
    config.write_text("[listen:main]\nendpoint = tcp:0:interface=127.0.0.1\n")
    missing = wsgate_cli("connections", "--config", config, cwd=scratch)
    assert missing.returncode == 2 and "has no [admin] section" in missing.stderr


def test_connections_lists_and_kicks_a_connect_session(gateway, scratch):
    session = CliProcess("connect", gateway.url("/chat/kick-me"), cwd=scratch)
    try:
        session.expect(session.err, lambda line: line.startswith("connected to "))
        listed = wsgate_cli("connections", *_admin_args(gateway), "--json", cwd=scratch)
        assert listed.returncode == 0, listed.stderr
        mine = [c for c in json.loads(listed.stdout)["connections"] if c["route"] == "chat"]
        assert len(mine) == 1
        table = wsgate_cli("connections", *_admin_args(gateway), cwd=scratch)
        assert any(line.split()[:2] == [mine[0]["id"], "chat"]
                   for line in table.stdout.splitlines())
        kicked = wsgate_cli("connections", *_admin_args(gateway), "--kick", mine[0]["id"],
                            "--code", "4002", "--reason", "bye now", cwd=scratch)
        assert kicked.returncode == 0, kicked.stderr
        assert json.loads(kicked.stdout)["closed"] is True
        assert session.wait() == 3
        session.expect(session.err, lambda line: line == "closed: 4002 bye now")
        again = wsgate_cli("connections", *_admin_args(gateway), "--kick", mine[0]["id"],
                           cwd=scratch)
        assert again.returncode == 1 and "404" in again.stderr
    finally:
        session.stop()


def test_admin_wrong_token_exits_1(gateway, scratch):
    result = wsgate_cli("connections", "--admin", f"http://127.0.0.1:{gateway.port('admin')}",
                        "--token", "wrong", cwd=scratch)
    assert result.returncode == 1
    assert result.stderr.startswith("wsgate: the admin API answered 401 ")


# ------------------------------------------------------------------ admin API clients
# Argument handling and printing, against a fake HTTP server that records
# what the commands send.


class FakeAdmin:
    """A tiny HTTP server answering canned (status, JSON) per (method, path)."""

    def __init__(self, answers):
        self.answers = answers
        self.requests = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.requests.append((self.command, self.path, dict(self.headers), body))
                status, payload = outer.answers.get((self.command, self.path),
                                                    (404, {"error": "not found"}))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _answer

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def admin():
    fake = FakeAdmin({
        ("POST", "/publish/room:lobby"): (202, {"channel": "room:lobby", "receivers": 2}),
        ("GET", "/connections"): (200, {"connections": [
            {"id": "c1", "route": "chat", "client": "127.0.0.1:5000", "identity": None,
             "since": 1700000000, "messages_in": 3, "messages_out": 4, "bytes_in": 30,
             "bytes_out": 40},
            {"id": "c2", "route": "echo", "client": "127.0.0.1:5001", "identity": "alice",
             "since": "2026-01-01T00:00:00Z", "messages_in": 0, "messages_out": 0,
             "bytes_in": 0, "bytes_out": 0}]}),
        ("DELETE", "/connections/c1?code=4000&reason=go+away"): (200, {"kicked": "c1"}),
    })
    yield fake
    fake.close()


def test_publish_posts_the_message_with_the_token(admin, scratch):
    result = wsgate_cli("publish", "--admin", admin.url, "--token", "s3cret", "room:lobby",
                        "hello", cwd=scratch)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"channel": "room:lobby", "receivers": 2}
    method, path, headers, body = admin.requests[0]
    assert (method, path, body) == ("POST", "/publish/room:lobby", b"hello")
    assert headers["Authorization"] == "Bearer s3cret"
    assert headers["Content-Type"].startswith("text/plain")


def test_publish_reads_standard_input_and_the_token_from_the_environment(admin, scratch):
    result = wsgate_cli("publish", "--admin", admin.url, "room:lobby", "-", cwd=scratch,
                        input="from stdin\n", env={"WSGATE_ADMIN_TOKEN": "envtoken"})
    assert result.returncode == 0, result.stderr
    _, _, headers, body = admin.requests[0]
    assert body == b"from stdin"
    assert headers["Authorization"] == "Bearer envtoken"


def test_publish_error_answer_exits_1(admin, scratch):
    result = wsgate_cli("publish", "--admin", admin.url, "nowhere", "x", cwd=scratch)
    assert result.returncode == 1
    assert result.stderr.startswith("wsgate: the admin API answered 404 Not Found: ")
    assert "Authorization" not in admin.requests[0][2]  # no token, no header


def test_connections_prints_a_table_or_the_json(admin, scratch):
    result = wsgate_cli("connections", "--admin", admin.url, cwd=scratch)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["ID", "ROUTE", "CLIENT", "IDENTITY", "SINCE"]
    assert lines[1].split() == ["c1", "chat", "127.0.0.1:5000", "-", "2023-11-14T22:13:20Z",
                                "3/4", "30/40"]
    assert lines[2].split()[:4] == ["c2", "echo", "127.0.0.1:5001", "alice"]
    raw = wsgate_cli("connections", "--json", "--admin", admin.url, cwd=scratch)
    assert json.loads(raw.stdout)["connections"][0]["id"] == "c1"


def test_connections_kick_sends_delete_with_code_and_reason(admin, scratch):
    result = wsgate_cli("connections", "--admin", admin.url, "--kick", "c1", "--code", "4000",
                        "--reason", "go away", cwd=scratch)
    assert result.returncode == 0, result.stderr
    assert admin.requests[0][:2] == ("DELETE", "/connections/c1?code=4000&reason=go+away")
    assert json.loads(result.stdout) == {"kicked": "c1"}


def test_connections_kick_unknown_id_exits_1(admin, scratch):
    result = wsgate_cli("connections", "--admin", admin.url, "--kick", "nope", cwd=scratch)
    assert result.returncode == 1
    assert "404" in result.stderr
    assert admin.requests[0][:2] == ("DELETE", "/connections/nope")


def test_admin_unreachable_exits_2(scratch):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for args in (["publish", "room:a", "x"], ["connections"], ["connections", "--kick", "c1"]):
        result = wsgate_cli(*args, "--admin", f"http://127.0.0.1:{port}", cwd=scratch)
        assert result.returncode == 2, args
        assert result.stderr.startswith(f"wsgate: cannot reach the admin API at "
                                        f"http://127.0.0.1:{port}/")


@pytest.mark.parametrize("args,message", [
    (["publish", "--admin", "ftp://x", "room:a", "x"], "--admin expects an http://"),
    (["connections", "--code", "4000"], "--code and --reason go with --kick"),
    (["connections", "--kick", "c1", "--code", "1005"], "expected 1000, 1001, 1008 or"),
])
def test_admin_bad_arguments_are_usage_errors(scratch, args, message):
    result = wsgate_cli(*args, cwd=scratch)
    assert result.returncode == 2
    assert message in result.stderr


# ------------------------------------------------------------------ pure logic


def test_parse_target_defaults_ports_and_keeps_the_query():
    from wsgate.cli.connect import parse_target

    assert parse_target("ws://example.com/a?b=1").port == 80
    assert parse_target("ws://example.com/a?b=1").resource == "/a?b=1"
    secure = parse_target("wss://[::1]")
    assert (secure.secure, secure.host, secure.port, secure.resource) == (True, "::1", 443, "/")
    assert secure.authority == "[::1]:443"
    for bad in ("http://x/", "ws:///path", "ws://x/#frag", "ws://x:99999/"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_repeated_headers_are_joined_and_host_agent_origin_are_separate():
    from wsgate.cli.connect import ConnectOptions, parse_header, parse_target

    headers = tuple(parse_header(text) for text in (
        "X-A: 1", "x-a: 2", "Host: h.example", "User-Agent: me/1", "Origin: https://o"))
    options = ConnectOptions(parse_target("ws://x/"), headers=headers)
    assert options.request_headers() == ("h.example", "me/1", "https://o", {"X-A": "1, 2"})
    assert ConnectOptions(parse_target("ws://x/"), headers=headers,
                          origin="https://flag").request_headers()[2] == "https://flag"


def test_describe_binary_shows_hex_up_to_64_bytes():
    from wsgate.cli.connect import describe_binary

    assert describe_binary(b"") == "<binary 0 bytes>"
    assert describe_binary(b"\x00") == "<binary 1 byte: 00>"
    assert describe_binary(b"\xff" * 64) == f"<binary 64 bytes: {'ff' * 64}>"
    assert describe_binary(b"\xff" * 65) == "<binary 65 bytes>"


def test_dechunk_waits_for_the_last_chunk():
    from wsgate.cli.connect import _dechunk

    assert _dechunk(b"5\r\nhello\r\n") is None
    assert _dechunk(b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n") == b"hello world"


def test_refusal_lines_show_status_body_and_useful_headers():
    from wsgate.cli.connect import Refusal

    refusal = Refusal(429, "Too Many Requests", {"retry-after": "5"}, b"slow down\n")
    assert refusal.lines() == ["handshake refused: 429 slow down", "  Retry-After: 5"]
    assert Refusal(503, "Service Unavailable", {}).lines() == [
        "handshake refused: 503 Service Unavailable"]


def test_publish_message_from_stdin_drops_one_line_ending():
    import io

    from wsgate.cli.admin import message_from

    assert message_from("hi", None, False) == b"hi"
    assert message_from("-", io.BytesIO(b"a\nb\n\n"), False) == b"a\nb\n"
    assert message_from(None, io.BytesIO(b"x\r\n"), False) == b"x"
    assert message_from("-", io.BytesIO(b"\xff\n"), True) == b"\xff\n"
    with pytest.raises(ValueError):
        message_from("-", io.BytesIO(b"\xff"), False)


def test_admin_requests_quote_channel_and_id():
    from wsgate.cli.admin import kick_request, publish_request

    request = publish_request("http://a:1/", "room:a b/c", b"m")
    assert request.url == "http://a:1/publish/room:a%20b%2Fc"
    assert kick_request("http://a:1", "x/y").url == "http://a:1/connections/x%2Fy"
