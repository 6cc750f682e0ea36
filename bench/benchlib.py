"""Processes, peers and measurement for bench/run.py.

Every process the benchmark starts is a :class:`Proc`: its own session (process
group), stdout and stderr in a log file under the run's temporary directory,
pinned to a core with ``taskset`` when the machine has two or more, and killed
(SIGTERM, then SIGKILL, the whole group) by :func:`stop_all`. Nothing here
waits without a deadline.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
PYTHON = os.path.join(VENV_BIN, "python")
TWISTD = os.path.join(VENV_BIN, "twistd")
NODE = shutil.which("node") or "/usr/bin/node"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
REDIS = shutil.which("redis-server") or "/usr/bin/redis-server"
SERVERS = os.path.join(HERE, "servers")
LOADGEN = os.path.join(HERE, "loadgen.js")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024

NCPU = os.cpu_count() or 1
PIN = NCPU >= 2 and shutil.which("taskset") is not None
SERVER_CORE = "0"   # the measured server (or proxy) alone on core 0
CLIENT_CORE = "1"   # load generator, and helpers (upstream, Redis) on core 1


class PeerFailed(Exception):
    """A peer did not start (missing binary, config key not supported, ...)."""


def raise_nofile():
    """Soft RLIMIT_NOFILE to the hard limit; every process started later inherits it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Proc:
    """A started process (its own process group), output in ``WORKDIR/NAME.log``."""

    registry = []
    workdir = None

    def __init__(self, name, argv, core=None, cwd=None, env=None, stdin=False):
        self.name = name
        self.log_path = os.path.join(Proc.workdir, f"{name}.log")
        while os.path.exists(self.log_path):
            self.log_path = self.log_path[:-4] + "_.log"
        cmd = (["taskset", "-c", core] if core is not None and PIN else []) + list(argv)
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            cwd=cwd or Proc.workdir, env={**os.environ, **(env or {})},
            start_new_session=True)
        self.pid = self.popen.pid
        self._offset = 0
        self._partial = b""
        self.objects = []
        Proc.registry.append(self)

    # ---- output

    def read_objects(self):
        """Parse the JSON lines written since the last call; return all so far."""
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                self.objects.append(obj)
        return self.objects

    def tail(self, n=2000):
        try:
            with open(self.log_path, "rb") as f:
                data = f.read()
            return data[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def wait_for(self, predicate, timeout, what="output"):
        """Wait (bounded) until an output object satisfies *predicate*; return it."""
        deadline = time.monotonic() + timeout
        while True:
            for obj in self.read_objects():
                if predicate(obj):
                    return obj
            if self.popen.poll() is not None:
                for obj in self.read_objects():
                    if predicate(obj):
                        return obj
                raise PeerFailed(f"{self.name} exited ({self.popen.returncode}) before {what}:\n"
                                 + self.tail())
            if time.monotonic() > deadline:
                raise PeerFailed(f"{self.name}: no {what} within {timeout}s:\n" + self.tail())
            time.sleep(0.05)

    def wait_exit(self, timeout):
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise PeerFailed(f"{self.name} did not finish within {timeout}s:\n" + self.tail())

    def send(self, text):
        try:
            self.popen.stdin.write(text.encode())
            self.popen.stdin.flush()
        except (BrokenPipeError, OSError, AttributeError):
            pass

    # ---- measurement

    def pids(self):
        """This process and all its descendants (workers, nginx's worker)."""
        return process_tree(self.pid)

    def cpu_seconds(self):
        return sum(cpu_seconds(pid) for pid in self.pids())

    def rss_kb(self):
        return sum(rss_kb(pid) for pid in self.pids())

    # ---- end

    def stop(self, timeout=8):
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # whatever is left of the group (twistd workers, nginx worker)
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass
        if self.popen.stdin:
            try:
                self.popen.stdin.close()
            except OSError:
                pass
        self._log.close()
        if self in Proc.registry:
            Proc.registry.remove(self)
        return self.popen.returncode


def stop_all():
    for proc in list(reversed(Proc.registry)):
        try:
            proc.stop(timeout=5)
        except Exception as exc:  # keep stopping the others
            print(f"bench: could not stop {proc.name}: {exc}", file=sys.stderr)


def _stat_fields(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read().decode("latin-1")
    return data[data.rindex(")") + 2:].split()


def cpu_seconds(pid):
    try:
        fields = _stat_fields(pid)
    except (OSError, ValueError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_kb(pid):
    try:
        fields = _stat_fields(pid)
    except (OSError, ValueError):
        return 0
    return int(fields[21]) * PAGE_KB


def process_tree(root):
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(_stat_fields(entry)[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo and len(out) < 10000:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


# ------------------------------------------------------------------ peers


class Peer:
    """A running server: its process, its base URL, and helper processes."""

    def __init__(self, name, proc, port, helpers=()):
        self.name = name
        self.proc = proc
        self.port = port
        self.helpers = list(helpers)

    def url(self, path):
        return f"ws://127.0.0.1:{self.port}{path}"

    def stop(self):
        if self.proc is not None:
            self.proc.stop()
        for helper in self.helpers:
            helper.stop()


WSGATE_BASE = """\
[wsgate]
node_id = bench
log_format = json
{wsgate_extra}
[listen:main]
endpoint = tcp:0:interface=127.0.0.1
backlog = 4096
ping_interval = {ping_interval}
max_message_size = 16MiB

"""


# The pool scenario's gateway routes (after WSGATE_BASE): an [upstream:NAME] pool of
# servers and a route proxying to it (tests/test_bench_configs.py loads it too)
POOL_ROUTES = """\
[upstream:bench]
servers = {servers}
balance = {balance}

[route:pool]
path = /pool
upstream = @bench
"""


def pool_routes(ports, balance="least_conn"):
    """POOL_ROUTES for Node ws echo upstreams on *ports* (127.0.0.1, path /echo)."""
    return POOL_ROUTES.format(
        servers=", ".join(f"ws://127.0.0.1:{port}/echo" for port in ports), balance=balance)


# The fan-out scenario's broadcast route (after WSGATE_BASE); {history} is "" or
# "history = N\n" (the -redis-history peers: every publish recorded, on Redis an EVAL of
# XADD + PUBLISH). tests/test_bench_configs.py loads it, with REDIS_BROKER, too.
FANOUT_ROUTE = """\
[route:fanout]
path = /fanout
broadcast = bench
{history}"""

# The recovery scenario's route: clients of wsgate.v1.json reconnect with ?since=POS
RECOVER_ROUTE = """\
[route:recover]
path = /recover
broadcast = recover
history = {history}
"""

# A Redis broker for the gateway (with "broker = shared" among its [wsgate] lines)
REDIS_BROKER = """
[broker:shared]
type = redis
url = redis://127.0.0.1:{port}/0
"""
REDIS_BROKER_KEY = "broker = shared\n"


def start_wsgate(name, routes, ping_interval="0", wsgate_extra="", core=SERVER_CORE, timeout=30):
    """``twistd -n wsgate`` on a generated config (port 0, JSON logs to its log file)."""
    path = os.path.join(Proc.workdir, f"{name}.ini")
    with open(path, "w") as f:
        f.write(WSGATE_BASE.format(ping_interval=ping_interval, wsgate_extra=wsgate_extra))
        f.write(routes)
    proc = Proc(name, [TWISTD, "-n", "--pidfile=", "wsgate", "--config", path], core=core)
    try:
        listening = proc.wait_for(
            lambda o: o.get("event") == "wsgate.listening" and o.get("listener") == "main",
            timeout, "wsgate.listening")
        proc.wait_for(lambda o: o.get("event") == "wsgate.ready", timeout, "wsgate.ready")
    except PeerFailed:
        proc.stop()
        raise
    return Peer(name, proc, listening["port"])


def start_script(name, argv, core=SERVER_CORE, timeout=20):
    """A peer that prints {"listening": PORT} (bench/servers/*)."""
    proc = Proc(name, argv, core=core)
    try:
        port = proc.wait_for(lambda o: "listening" in o, timeout, "listening")["listening"]
    except PeerFailed:
        proc.stop()
        raise
    return Peer(name, proc, port)


def start_python(name, script, *args, core=SERVER_CORE):
    return start_script(name, [PYTHON, os.path.join(SERVERS, script), *args], core=core)


def start_node(name, mode, *args, core=SERVER_CORE):
    if not os.path.exists(NODE):
        raise PeerFailed("node is not installed")
    return start_script(name, [NODE, os.path.join(SERVERS, "node_ws.js"), mode, *args], core=core)


def wait_tcp(port, timeout, proc):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise PeerFailed(f"{proc.name} exited ({proc.popen.returncode}):\n" + proc.tail())
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise PeerFailed(f"{proc.name}: port {port} not open within {timeout}s:\n" + proc.tail())


NGINX_CONF = """\
worker_processes 1;
worker_rlimit_nofile {nofile};
error_log {dir}/nginx-error.log warn;
events {{
    worker_connections {connections};
}}
http {{
    access_log {dir}/nginx-access.log;
    client_body_temp_path {dir}/nginx-tmp/body;
    proxy_temp_path {dir}/nginx-tmp/proxy;
    fastcgi_temp_path {dir}/nginx-tmp/fastcgi;
    uwsgi_temp_path {dir}/nginx-tmp/uwsgi;
    scgi_temp_path {dir}/nginx-tmp/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}
{upstream_block}    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            {extra}
        }}
    }}
}}
"""


# nginx's directive for each balance of a wsgate pool ([upstream:NAME] balance =);
# nginx's default is round robin
NGINX_BALANCE = {"round_robin": "", "least_conn": "least_conn;", "random": "random;"}


def nginx_upstream(upstream_port, balance=None):
    """(``upstream`` block, proxy_pass target) for one port or a list of ports.

    One port proxies to it directly, as the proxy scenario always has; a list
    becomes an ``upstream bench_pool`` block with *balance*'s directive.
    """
    if isinstance(upstream_port, int):
        if balance is not None:
            raise ValueError("balance needs a list of upstream ports")
        return "", f"127.0.0.1:{upstream_port}"
    ports = list(upstream_port)
    if not ports:
        raise ValueError("no upstream ports")
    balance = balance or "round_robin"
    if balance not in NGINX_BALANCE:
        raise ValueError(f"balance {balance!r}: nginx has no equivalent here "
                         f"({', '.join(NGINX_BALANCE)})")
    lines = ["    upstream bench_pool {"]
    if NGINX_BALANCE[balance]:
        lines.append(f"        {NGINX_BALANCE[balance]}")
    lines += [f"        server 127.0.0.1:{port};" for port in ports]
    lines.append("    }")
    return "\n".join(lines) + "\n", "bench_pool"


def start_nginx(name, upstream_port, nofile, core=SERVER_CORE, extra="", balance=None):
    """Debian's nginx as a WebSocket reverse proxy: own config, loopback port, no daemon.

    *upstream_port* is one port (``proxy_pass`` to it) or a list of ports (an
    ``upstream`` block of them, balanced by *balance*: round_robin, least_conn, random).
    """
    if not os.path.exists(NGINX):
        raise PeerFailed("nginx is not installed (bench/setup.sh installs it)")
    upstream_block, target = nginx_upstream(upstream_port, balance)
    directory = Proc.workdir
    os.makedirs(os.path.join(directory, "nginx-tmp"), exist_ok=True)
    for attempt in range(5):  # a probed port may be taken meanwhile
        port = free_port()
        conf = os.path.join(directory, f"{name}.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(dir=directory, port=port, upstream=target,
                                      upstream_block=upstream_block,
                                      nofile=nofile, connections=max(1024, nofile - 100),
                                      extra=extra))
        proc = Proc(name, [NGINX, "-e", os.path.join(directory, "nginx-error.log"), "-p", directory,
                           "-c", conf, "-g", f"daemon off; pid {directory}/{name}.pid;"], core=core)
        try:
            wait_tcp(port, 10, proc)
            return Peer(name, proc, port)
        except PeerFailed:
            proc.stop()
            if attempt == 4:
                raise
    raise PeerFailed("nginx did not start")


def start_redis(name, core=CLIENT_CORE):
    if not os.path.exists(REDIS):
        raise PeerFailed("redis-server is not installed")
    for attempt in range(5):
        port = free_port()
        proc = Proc(name, [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--dir", Proc.workdir, "--daemonize", "no",
                           "--maxclients", "1000"], core=core)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and proc.popen.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(100).startswith(b"+PONG"):
                        return Peer(name, proc, port)
            except OSError:
                time.sleep(0.05)
        proc.stop()
    raise PeerFailed("redis-server did not start")


# ------------------------------------------------------------------ generator


def generate(name, options, server=None, other=(), timeout=120, core=CLIENT_CORE):
    """Run bench/loadgen.js once (pinned to the client core); return its result dict."""
    if not os.path.exists(NODE):
        raise PeerFailed("node is not installed")
    opts = dict(options)
    opts["server_pids"] = server.pids() if server is not None else []
    opts["other_pids"] = [pid for proc in other for pid in proc.pids()]
    opts["clk_tck"] = CLK_TCK
    opts.setdefault("max_seconds", timeout)
    proc = Proc(name, [NODE, LOADGEN, json.dumps(opts)], core=core, cwd=HERE)
    try:
        proc.wait_exit(timeout + 15)
        objects = proc.read_objects()
    finally:
        proc.stop()
    for obj in reversed(objects):
        if "result" in obj:
            return obj["result"]
        if "error" in obj:
            raise PeerFailed(f"{name}: generator error: {obj['error']}")
    raise PeerFailed(f"{name}: generator printed no result:\n" + proc.tail())


def machine_info():
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {"python": sys.version.split()[0]}
    for module in ("twisted", "autobahn", "websockets"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:
            pass
    try:
        from importlib.metadata import version
        versions["wsgate"] = version("wsgate")
    except Exception:
        pass
    for label, argv in (("node", [NODE, "--version"]), ("nginx", [NGINX, "-v"]),
                        ("redis", [REDIS, "--version"])):
        try:
            out = subprocess.run(argv, capture_output=True, timeout=10, text=True)
            text = (out.stdout + out.stderr).strip().splitlines()[0]
            if label == "nginx":
                text = text.split("nginx/")[-1]
            elif label == "redis":
                text = text.split("v=")[1].split()[0] if "v=" in text else text
            versions[label] = text
        except Exception:
            pass
    try:
        with open(os.path.join(HERE, "node_modules", "ws", "package.json")) as f:
            versions["ws"] = json.load(f)["version"]
    except Exception:
        pass
    try:
        versions["git"] = subprocess.run(
            ["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True,
            text=True, timeout=10).stdout.strip()
    except Exception:
        pass
    return {"nproc": NCPU, "cpu_model": model, "kernel": os.uname().release,
            "pinned": PIN, "versions": versions}


def load_info():
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    wstest = subprocess.run(["pgrep", "-f", "wstest"], capture_output=True, text=True).stdout.split()
    return {"loadavg": [float(x) for x in load], "wstest_running": bool(wstest)}
