"""``workers = 2``: shared sockets, broadcast across workers, restarts, signals, pooled admin."""

import asyncio
import json
import os
import signal
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from harness import (
    RedisServer,
    admin_text,
    run,
    run_twistd_expecting_failure,
    start_gateway,
    write_config,
)


def _config(redis_url):
    return f"""
[wsgate]
node_id = pool
log_format = json
workers = 2
broker = shared
drain_timeout = 10s

[broker:shared]
type = redis
url = {redis_url}

[listen:main]
endpoint = tcp:0:interface=127.0.0.1

[admin]
endpoint = tcp:0:interface=127.0.0.1
token = T

[route:echo]
path = /echo
echo = yes

[route:chat]
path = /chat/{{room}}
broadcast = room:{{room}}
"""


def admin(gw, method, path, token="T"):
    return admin_text(gw, method, path, token)


def wait_healthy(gw, workers=2, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        status, body = admin(gw, "GET", "/healthz", token=None)
        if status == 200 and len(json.loads(body)["workers"]) == workers:
            return json.loads(body)
        assert time.monotonic() < deadline, body
        time.sleep(0.2)


def worker_pids(gw):
    pids = []
    for line in open(f"/proc/{gw.proc.pid}/task/{gw.proc.pid}/children").read().split():
        pids.append(int(line))
    return pids


def test_two_workers_share_the_port_broadcast_and_answer_as_one(tmp_path):
    redis = RedisServer(tmp_path)
    gw = start_gateway(tmp_path, "", base=_config(redis.url), listeners=("main", "admin"))
    try:
        health = wait_healthy(gw)
        assert [w["worker"] for w in health["workers"]] == [0, 1]

        async def scenario():
            clients = [await connect(gw.url("/chat/all")) for _ in range(30)]
            await asyncio.sleep(0.5)
            status, body = await asyncio.to_thread(admin, gw, "GET", "/connections")
            listed = json.loads(body)["connections"]
            assert len(listed) == 30
            assert {entry["worker"] for entry in listed} == {0, 1}  # the kernel spread them
            # subscribers added up over the workers; a channel's detail asked of one worker
            status, body = await asyncio.to_thread(admin, gw, "GET", "/channels")
            assert (status, json.loads(body)) == (
                200, {"channels": [{"channel": "room:all", "subscribers": 30}]})
            status, body = await asyncio.to_thread(admin, gw, "GET", "/channels/room:all/history")
            assert (status, json.loads(body)["error"]) == (404, "this channel keeps no history")
            status, body = await asyncio.to_thread(admin, gw, "GET", "/upstreams")
            assert (status, json.loads(body)) == (200, {"pools": []})
            await clients[0].send("to everyone")
            for ws in clients[1:]:
                assert await asyncio.wait_for(ws.recv(), 5) == "to everyone"
            # kick one connection through the parent
            status, _ = await asyncio.to_thread(
                admin, gw, "DELETE", f"/connections/{listed[5]['id']}?code=4005&reason=out")
            assert status == 200
            status, body = await asyncio.to_thread(admin, gw, "GET", "/metrics", None)
            assert 'wsgate_connections_active{route="chat",worker="0"}' in body
            assert 'wsgate_connections_active{route="chat",worker="1"}' in body
            for ws in clients:
                await ws.close()
        run(scenario())
    finally:
        assert gw.stop() == 0
        redis.stop()


def test_a_crashed_worker_is_restarted_and_signals_reach_every_worker(tmp_path):
    redis = RedisServer(tmp_path)
    path = write_config(tmp_path, _config(redis.url))
    from harness import GatewayProcess

    gw = GatewayProcess(path).wait_listening(("main", "admin"))
    try:
        wait_healthy(gw)
        first = worker_pids(gw)
        assert len(first) == 2
        os.kill(first[0], signal.SIGKILL)
        deadline = time.monotonic() + 15
        while True:
            now = worker_pids(gw)
            if len(now) == 2 and first[0] not in now:
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        wait_healthy(gw)

        # SIGHUP: checked by the parent, reloaded by every worker
        path.write_text(path.read_text() + "\n[route:fresh]\npath = /fresh\necho = yes\n")
        gw.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while json.loads(admin(gw, "GET", "/healthz", token=None)[1])["config_generation"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.2)

        async def scenario():
            clients = [await connect(gw.url("/fresh")) for _ in range(10)]
            for ws in clients:
                await ws.send("new route")
                assert await ws.recv() == "new route"
            pids[:] = worker_pids(gw)
            gw.signal(signal.SIGTERM)
            codes = []
            for ws in clients:
                try:
                    await asyncio.wait_for(ws.recv(), 10)
                except ConnectionClosed as e:
                    codes.append(e.rcvd.code)
            assert codes == [1001] * 10
        pids = []
        run(scenario())
        assert gw.proc.wait(20) == 0
        assert len(pids) == 2
        for pid in pids:  # both workers drained and ended before the parent did
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        gw.stop()
        redis.stop()


def test_workers_with_in_process_broadcast_is_a_config_error(tmp_path):
    path = write_config(tmp_path, """
        [wsgate]
        workers = 2
        [listen:main]
        endpoint = tcp:0:interface=127.0.0.1
        [route:chat]
        path = /chat/{room}
        broadcast = room:{room}
        """)
    code, stderr, _ = run_twistd_expecting_failure(path)
    assert code == 1 and "[wsgate] workers: workers > 1 with broadcast routes needs a Redis" \
        in stderr


POOL_ECHO = """
[wsgate]
node_id = pool
log_format = json
workers = 2

[listen:main]
endpoint = tcp:0:interface=127.0.0.1

[admin]
endpoint = tcp:0:interface=127.0.0.1

[route:echo]
path = /echo
echo = yes
"""


def _control_dirs(folder):
    return sorted(name for name in os.listdir(folder) if name.startswith("wsgate-workers-"))


def test_a_pool_leaves_no_temporary_folder_after_a_clean_exit_or_a_crash(tmp_path):
    """Issue 18, item 9: each pool left its workers' control folder behind."""
    import shutil
    import tempfile

    temp = tempfile.mkdtemp(prefix="wt")  # short: UNIX socket paths are at most 107 bytes
    for name in ("clean", "crash", "after"):
        (tmp_path / name).mkdir()
    started = []

    def pool(name):
        gw = start_gateway(tmp_path / name, "", base=POOL_ECHO, listeners=("main", "admin"),
                           env={"TMPDIR": temp})
        started.append(gw)
        wait_healthy(gw)
        return gw

    try:
        gw = pool("clean")
        assert len(_control_dirs(temp)) == 1
        assert gw.stop() == 0
        assert _control_dirs(temp) == []
        crashed = pool("crash")
        crashed.proc.kill()  # SIGKILL: no time to clean up; its workers follow it
        crashed.proc.wait(10)
        assert len(_control_dirs(temp)) == 1
        after = pool("after")
        assert len(_control_dirs(temp)) == 1  # its own; the crashed parent's is gone
        assert str(after.proc.pid) in _control_dirs(temp)[0]
        assert after.stop() == 0
        assert _control_dirs(temp) == []
    finally:
        for gw in started:
            gw.stop()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_pool_under_a_long_temp_folder_still_starts_its_workers(tmp_path):
    """A control socket path over 107 bytes cannot be bound: the workers would crash and
    be restarted for ever. The pool then uses /tmp."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    gw = start_gateway(tmp_path, "", base=POOL_ECHO, listeners=("main", "admin"),
                       env={"TMPDIR": str(deep)})
    try:
        wait_healthy(gw)
    finally:
        assert gw.stop() == 0
