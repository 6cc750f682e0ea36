"""Broadcast across processes through a real redis-server, the publish API, slow consumers."""

import asyncio
import json
import socket
import time
import urllib.request

import pytest
from websockets.asyncio.client import connect

from harness import RedisServer, run, start_gateway, upgrade_request

TOKEN = "s3cret-admin-token"


def _config(redis_url, extra=""):
    return f"""
[wsgate]
node_id = NODE
log_format = json
broker = shared

[broker:shared]
type = redis
url = {redis_url}
prefix = t:
timeout = 1s

[listen:main]
endpoint = tcp:0:interface=127.0.0.1

[admin]
endpoint = tcp:0:interface=127.0.0.1
token = {TOKEN}
max_publish_size = 64KiB

[route:chat]
path = /chat/{{room}}
broadcast = room:{{room}}
{extra}
"""


def admin_request(gw, method, path, body=None, token=TOKEN, ctype="text/plain"):
    request = urllib.request.Request(
        f"http://127.0.0.1:{gw.port('admin')}{path}", data=body, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("cluster")
    redis = RedisServer(base)
    gateways = []
    for name in ("a", "b"):
        (base / name).mkdir()
        gateways.append(start_gateway(base / name, "", base=_config(redis.url).replace(
            "NODE", name), listeners=("main", "admin")))
    _wait_broker_up(gateways)
    yield redis, gateways
    for gw in gateways:
        assert gw.stop() == 0
    redis.stop()


def _wait_broker_up(gateways, timeout=15):
    deadline = time.monotonic() + timeout
    for gw in gateways:
        while True:
            status, _, body = admin_request(gw, "GET", "/healthz", token=None)
            if json.loads(body)["broker"] == "up":
                break
            assert time.monotonic() < deadline, body
            time.sleep(0.1)


async def _drain(ws, seconds=0.4):
    got = []
    try:
        while True:
            got.append(await asyncio.wait_for(ws.recv(), seconds))
    except asyncio.TimeoutError:
        return got


def test_message_from_a_reaches_clients_of_b_exactly_once_with_types(cluster):
    _, (a, b) = cluster

    async def scenario():
        sender = await connect(a.url("/chat/once"))
        here = await connect(a.url("/chat/once"))
        there = await connect(b.url("/chat/once"))
        await asyncio.sleep(0.3)  # subscriptions made
        await sender.send("text across")
        await sender.send(b"\x00binary across")
        for ws in (here, there):
            assert await _drain(ws) == ["text across", b"\x00binary across"]
        assert await _drain(sender) == []  # include_sender = no, across processes too
        for ws in (sender, here, there):
            await ws.close()
    run(scenario())


def test_twenty_clients_on_each_of_two_processes_in_one_room(cluster):
    _, (a, b) = cluster

    async def scenario():
        clients = [await connect(gw.url("/chat/crowd")) for gw in (a, b) for _ in range(20)]
        await asyncio.sleep(0.3)
        for i in (0, 25):  # one sender on a, one on b
            await clients[i].send(f"hello from {i}")
        results = await asyncio.gather(*(_drain(ws, 0.6) for ws in clients))
        for index, got in enumerate(results):
            expected = [f"hello from {i}" for i in (0, 25) if i != index]
            assert sorted(got) == sorted(expected), (index, got)
        for ws in clients:
            await ws.close()
    run(scenario())


def test_publish_api_reaches_subscribers_of_every_process(cluster):
    _, (a, b) = cluster

    async def scenario():
        on_a = await connect(a.url("/chat/news"))
        on_b = await connect(b.url("/chat/news"))
        await asyncio.sleep(0.3)
        status, _, body = await asyncio.to_thread(
            admin_request, a, "POST", "/publish/room:news", b'{"headline": 1}',
            ctype="application/json")
        assert status == 202
        assert json.loads(body) == {"channel": "room:news", "receivers": 2}  # 2 processes
        status, _, _ = await asyncio.to_thread(
            admin_request, b, "POST", "/publish/room:news", b"\xff\x00raw",
            ctype="application/octet-stream")
        assert status == 202
        for ws in (on_a, on_b):
            assert await _drain(ws) == ['{"headline": 1}', b"\xff\x00raw"]
        await on_a.close()
        await on_b.close()
    run(scenario())


@pytest.mark.parametrize("method,path,token,body,expected", [
    ("POST", "/publish/room:x", None, b"hi", 401),
    ("POST", "/publish/room:x", "wrong", b"hi", 401),
    ("GET", "/publish/room:x", TOKEN, None, 405),
    ("POST", "/publish/room:x", TOKEN, b"x" * (64 * 1024 + 1), 413),
    ("POST", "/publish/room:x", TOKEN, b"ok", 202),
])
def test_publish_api_answers(cluster, method, path, token, body, expected):
    _, (a, _) = cluster
    status, headers, _ = admin_request(a, method, path, body, token=token)
    assert status == expected
    if expected == 405:
        assert headers["Allow"] == "POST"


def test_redis_outage_keeps_connections_and_delivery_resumes(cluster):
    redis, (a, b) = cluster

    async def scenario():
        on_a = await connect(a.url("/chat/outage"))
        on_b = await connect(b.url("/chat/outage"))
        await asyncio.sleep(0.3)
        await asyncio.to_thread(redis.stop)
        await asyncio.sleep(3)
        status, _, body = await asyncio.to_thread(admin_request, a, "GET", "/healthz", None, None)
        assert status == 503 and json.loads(body)["status"] == "broker_down"
        # a client publishing during the outage is told: close 1013
        talker = await connect(a.url("/chat/outage-talk"))
        await talker.send("into the void")
        await talker.wait_closed()
        assert talker.close_code == 1013
        await asyncio.to_thread(redis.restart)
        await asyncio.to_thread(_wait_broker_up, [a, b])
        await asyncio.sleep(0.3)
        await on_a.send("after the outage")
        assert await _drain(on_b, 2) == ["after the outage"]
        assert on_a.state.name == "OPEN" and on_b.state.name == "OPEN"
        await on_a.close()
        await on_b.close()
    run(scenario())


# ----------------------------------------------------------- slow consumers


SLOW_BASE = """
[wsgate]
log_format = json

[listen:main]
endpoint = tcp:0:interface=127.0.0.1
; the load generator never answers pings
ping_interval = 0

[admin]
endpoint = tcp:0:interface=127.0.0.1
"""


def _slow_config(mode, buffer="64KiB"):
    return f"""
[route:feed]
path = /feed
broadcast = feed
max_send_buffer = {buffer}
slow_consumer = {mode}
max_message_size = 1MiB
"""


def _never_reading_subscriber(port, path):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(upgrade_request(path))
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    return sock


@pytest.mark.parametrize("mode", ["drop", "close"])
def test_slow_consumer_is_dropped_or_closed_while_others_get_everything(tmp_path, mode):
    gw = start_gateway(tmp_path, _slow_config(mode), base=SLOW_BASE, listeners=("main", "admin"))
    stuck = _never_reading_subscriber(gw.port(), "/feed")
    try:
        async def scenario():
            reader = await connect(gw.url("/feed"), max_size=None)
            publisher = await connect(gw.url("/feed"))
            await asyncio.sleep(0.2)
            chunk = b"z" * 32768
            for _ in range(200):  # 6.4 MiB: far past the stuck socket's buffers
                await publisher.send(chunk)  # in step with the reader, which never lags
                assert await asyncio.wait_for(reader.recv(), 10) == chunk
            await reader.close()
            await publisher.close()
        run(scenario())
        if mode == "close":
            # the close frame waits behind the unread data: read through it
            stuck.settimeout(10)
            data = b""
            while True:
                try:
                    piece = stuck.recv(1 << 20)
                except (ConnectionResetError, socket.timeout):
                    break
                if not piece:
                    break
                data += piece
            assert b"\x88\x0f\x03\xf5slow consumer" in data  # close 1013 "slow consumer"
        reason = "slow_consumer" if mode == "drop" else "slow_consumer_closed"
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{gw.port('admin')}/metrics", timeout=5).read().decode()
        line = next(line for line in metrics.splitlines() if line.startswith(
            f'wsgate_broadcast_dropped_total{{reason="{reason}",route="feed"}}'))
        assert float(line.split()[-1]) >= 1
    finally:
        stuck.close()
        assert gw.stop() == 0


def _rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_thousand_subscribers_ten_stuck_100mib_keeps_memory_bounded(tmp_path, capsys):
    """1,000 subscribers, 10 never read, 100 MiB published: RSS grows by under 64 MiB."""
    import subprocess
    import sys
    import threading

    from harness import PEERS

    gw = start_gateway(tmp_path, _slow_config("drop", buffer="1MiB"), base=SLOW_BASE,
                       listeners=("main", "admin"))
    try:
        load = subprocess.Popen(
            [sys.executable, f"{PEERS}/fanout_load.py", str(gw.port()), "/feed", "1000", "10",
             "1600", "65500", "32"], stdout=subprocess.PIPE, text=True)
        assert json.loads(load.stdout.readline())["ready"]
        pid, peak = gw.proc.pid, 0
        baseline = _rss_kib(pid)
        done = threading.Event()

        def sample():
            nonlocal peak
            while not done.wait(0.2):
                peak = max(peak, _rss_kib(pid))
        sampler = threading.Thread(target=sample)
        sampler.start()
        result = json.loads(load.stdout.readline())
        done.set()
        sampler.join()
        load.wait(30)
        peak = max(peak, _rss_kib(pid))
        growth = (peak - baseline) / 1024
        with capsys.disabled():
            print(f"\nfan-out 1000 subscribers (10 stuck), 100 MiB published: "
                  f"{result['complete']}/{result['readers']} readers complete in "
                  f"{result['seconds']}s; RSS {baseline / 1024:.1f} -> {peak / 1024:.1f} MiB "
                  f"(growth {growth:.1f} MiB)")
        assert result["complete"] == result["readers"] == 990
        assert growth < 64
        metrics = urllib.request.urlopen(
            f"http://127.0.0.1:{gw.port('admin')}/metrics", timeout=5).read().decode()
        dropped = next(line for line in metrics.splitlines() if line.startswith(
            'wsgate_broadcast_dropped_total{reason="slow_consumer",route="feed"}'))
        assert float(dropped.split()[-1]) > 0
    finally:
        assert gw.stop() == 0
