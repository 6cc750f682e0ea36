"""Test harness: real ``twistd -n wsgate`` processes, raw sockets, certificates.

A gateway under test listens on port 0 and logs JSON; :class:`GatewayProcess`
reads the ``wsgate.listening`` events to learn the real ports, so tests never
guess a free port.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")


def run(coro):
    """Run an asyncio coroutine from a plain pytest test."""
    return asyncio.run(asyncio.wait_for(coro, 30))


def wait_for_event(cond, events, predicate, timeout, explain):
    """Wait on *cond* until an item of *events* matches *predicate*; return it."""
    deadline = time.monotonic() + timeout
    with cond:
        while True:
            for event in events:
                if predicate(event):
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(explain())
            cond.wait(min(remaining, 0.2))


# Every gateway a test starts; conftest.py reads their logs after each test.
STARTED = []


def log_problem(line):
    """Why a log line is a problem (a ``critical`` entry or a traceback), or None."""
    try:
        event = json.loads(line)
    except ValueError:
        event = None
    if isinstance(event, dict):
        if event.get("level") == "critical":
            return "critical log entry"
        if event.get("traceback"):
            return "traceback in the log"
        return None
    if "Traceback (most recent call last)" in line or "[CRITICAL]" in line \
            or "Unhandled error in Deferred" in line:
        return "traceback or critical line in the log"
    return None


class GatewayProcess:
    """A ``twistd -n wsgate`` subprocess with its log lines collected.

    Its log is part of the test: a ``critical`` entry or a traceback fails the
    test that was running (conftest.py), or :meth:`stop`, unless a pattern
    given to :meth:`expect_log` (or the test's ``expect_log`` marker) matches it.
    """

    def __init__(self, config_path, env=None):
        self.config_path = config_path
        self.expected_log = []  # regular expressions of problem lines a test expects
        self._checked = 0  # lines already checked for problems
        STARTED.append(self)
        self.lines = []
        self.events = []
        self.stderr = ""
        self._listening = {}
        self.ready = False
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "wsgate", "--config", str(config_path)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=merged_env(env), cwd=os.path.dirname(str(config_path)))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._err_reader = threading.Thread(target=self._read_err, daemon=True)
        self._err_reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace")
            with self._cond:
                self.lines.append(line)
                try:
                    event = json.loads(line)
                except ValueError:
                    event = None
                if isinstance(event, dict):
                    self.events.append(event)
                    if event.get("event") == "wsgate.listening":
                        self._listening[event["listener"]] = event
                    elif event.get("event") == "wsgate.ready":
                        self.ready = True
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _read_err(self):
        data = self.proc.stderr.read()
        self.stderr = data.decode("utf-8", "replace")

    def wait_listening(self, names=("main",), timeout=20):
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (self.ready and all(name in self._listening for name in names)):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    self._err_reader.join(2)
                    raise AssertionError(
                        "gateway did not start:\n" + "".join(self.lines) + self.stderr)
                self._cond.wait(min(remaining, 0.2))
        return self

    def port(self, name="main"):
        return self._listening[name]["port"]

    def url(self, path, name="main", scheme="ws"):
        return f"{scheme}://127.0.0.1:{self.port(name)}{path}"

    def wait_event(self, predicate, timeout=10):
        """Wait for a JSON log event matching *predicate*; return it."""
        return wait_for_event(self._cond, self.events, predicate, timeout,
                              lambda: "no such event in:\n" + "".join(self.lines))

    def events_named(self, name):
        with self._cond:
            return [event for event in self.events if event.get("event") == name]

    def signal(self, signum):
        self.proc.send_signal(signum)

    def expect_log(self, pattern):
        """Declare that log lines matching *pattern* (a regex) are expected problems."""
        self.expected_log.append(pattern)
        return self

    def log_problems(self, expected=()):
        """The unexpected problem lines logged since the last call (see :func:`log_problem`)."""
        import re

        with self._cond:
            lines, self._checked = self.lines[self._checked:], len(self.lines)
        patterns = list(self.expected_log) + list(expected)
        found = []
        for line in lines:
            why = log_problem(line)
            if why and not any(re.search(p, line) for p in patterns):
                found.append(f"{why}: {line.strip()[:2000]}")
        if self.proc.poll() is not None and "Traceback (most recent call last)" in self.stderr \
                and not any(re.search(p, self.stderr) for p in patterns):
            found.append("traceback on standard error: " + self.stderr[-2000:])
            self.stderr = ""
        return found

    def stop(self, timeout=15):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        self._err_reader.join(5)
        problems = self.log_problems()
        if problems:
            raise AssertionError(f"gateway {self.config_path} logged:\n" + "\n".join(problems))
        return self.proc.returncode


def merged_env(extra):
    """The environment plus *extra*; a PYTHONPATH in *extra* goes before the inherited one
    (a developer's ``PYTHONPATH=.`` keeps testing the working tree)."""
    env = {**os.environ, **(extra or {})}
    inherited = os.environ.get("PYTHONPATH")
    if extra and "PYTHONPATH" in extra and inherited:
        env["PYTHONPATH"] = extra["PYTHONPATH"] + os.pathsep + inherited
    return env


def with_test_settings(text):
    """Apply WSGATE_TEST_FAST_PATHS=yes|no (the suite runs wire tests with both)."""
    fast = os.environ.get("WSGATE_TEST_FAST_PATHS")
    if not fast:
        return text
    if "[wsgate]" in text:
        return text.replace("[wsgate]", f"[wsgate]\nfast_paths = {fast}", 1)
    return f"[wsgate]\nfast_paths = {fast}\n" + text


def write_config(directory, text, name="wsgate.ini"):
    path = directory / name
    path.write_text(with_test_settings(textwrap.dedent(text)))
    return path


BASE_CONFIG = """
[wsgate]
node_id = test-node
log_format = json

[listen:main]
endpoint = tcp:0:interface=127.0.0.1
"""


def start_gateway(directory, extra, listeners=("main",), base=BASE_CONFIG, env=None):
    path = write_config(directory, textwrap.dedent(base) + textwrap.dedent(extra))
    gateway = GatewayProcess(path, env=env)
    try:
        return gateway.wait_listening(listeners)
    except BaseException:
        gateway.stop()  # never leave a half-started gateway behind
        raise


def run_twistd_expecting_failure(config_path, timeout=20):
    """Run a gateway that must refuse to start; return (exit code, stderr, stdout)."""
    proc = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "wsgate", "--config", str(config_path)],
        capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
        cwd=os.path.dirname(str(config_path)))
    return proc.returncode, proc.stderr.decode(), proc.stdout.decode()


# ----------------------------------------------------------------- admin API


def admin_text(gw, method, path, token=None, body=None, content_type="text/plain"):
    """``(status, body text)`` of one call of a gateway's admin API (errors are answers too)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{gw.port('admin')}{path}",
                                     method=method, data=body)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text, name, **labels):
    """The value of sample *name* with exactly *labels* in Prometheus *text*, or None."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return None


# ----------------------------------------------------------------- raw HTTP


def raw_request(port, request, host="127.0.0.1", timeout=5):
    """Send raw bytes; return the response (all of it for a refusal, which the server
    closes, or just the head of a 101, after which the socket is closed)."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
            if data.startswith(b"HTTP/1.1 101") and b"\r\n\r\n" in data:
                break
    return data


def read_until_closed(sock):
    """Everything *sock* receives until the peer closes (a reset counts as closed)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def upgrade_request(path, host="127.0.0.1", extra=b"", version=b"13", method=b"GET"):
    return (method + b" " + path.encode() + b" HTTP/1.1\r\n"
            b"Host: " + host.encode() + b"\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: " + version + b"\r\n" + extra + b"\r\n")


def parse_response(data):
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


# ----------------------------------------------------------------- peers


def require_peer(path, what):
    """Return *path* if the peer program exists; fail under CI, skip otherwise."""
    import pytest

    if os.path.exists(path):
        return path
    message = f"{what} is missing at {path}: run `make peers` (scripts/install-peers.sh)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name):
    """Import scripts/<name>.py as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"wsgate_script_{name}", os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------- Node upstream

PEERS = os.path.join(ROOT, "tests", "peers")


class NodeUpstream:
    """tests/peers/upstream.js: a real Node ``ws`` server with test behaviours."""

    def __init__(self, env=None):
        import shutil

        node = shutil.which("node") or "/usr/bin/node"
        require_peer(node, "Node.js")
        require_peer(os.path.join(PEERS, "node_modules", "ws", "package.json"),
                     "the npm ws package")
        self.events = []
        self._cond = threading.Condition()
        self.port = None
        self.proc = subprocess.Popen(
            [node, os.path.join(PEERS, "upstream.js")], stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PORT": "0", **(env or {})})
        threading.Thread(target=self._read, daemon=True).start()
        with self._cond:
            deadline = time.monotonic() + 15
            while self.port is None:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(f"node upstream did not start: {self.events}")
                self._cond.wait(0.2)

    def _read(self):
        for raw in self.proc.stdout:
            try:
                event = json.loads(raw)
            except ValueError:
                event = {"raw": raw.decode("utf-8", "replace")}
            with self._cond:
                if "listening" in event:
                    self.port = event["listening"]
                self.events.append(event)
                self._cond.notify_all()

    def wait_event(self, predicate, timeout=10):
        return wait_for_event(self._cond, self.events, predicate, timeout,
                              lambda: f"no such upstream event in {self.events}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ----------------------------------------------------------------- redis-server


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A ``redis-server`` of the test's own on a free port (never the machine's 6379)."""

    def __init__(self, directory):
        import shutil

        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        require_peer(self.binary, "redis-server")
        self.directory = str(directory)
        self.port = None
        self.proc = None
        for _ in range(5):  # a probed port may be taken meanwhile: try another
            self.port = free_port()
            if self.start():
                return
        raise AssertionError("could not start redis-server")

    def start(self, timeout=10):
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.directory, "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(100).startswith(b"+PONG"):
                        return True
            except OSError:
                time.sleep(0.05)
        return False

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self):
        self.stop()
        assert self.start(), "redis-server did not come back on its port"

    def command(self, *args):
        """Send one command (RESP) and return the raw reply bytes."""
        payload = f"*{len(args)}\r\n".encode()
        for arg in args:
            arg = arg if isinstance(arg, bytes) else str(arg).encode()
            payload += b"$%d\r\n%s\r\n" % (len(arg), arg)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(payload)
            return sock.recv(65536)
