"""History and recovery on the wire: real ``twistd`` gateways, a real redis-server, the
``wsgate.v1.json`` subprotocol, ``?since=POS``, the admin history API and a Redis outage.

The in-memory logic is tests/test_history_logic.py; presence is tests/test_presence.py.
"""

import asyncio
import base64
import json
import signal
import time

import pytest
from websockets.asyncio.client import connect

import harness
from harness import RedisServer, admin_text, metric, start_gateway

TOKEN = "hist-token"
SUB = ["wsgate.v1.json"]

ROUTES = f"""
[admin]
endpoint = tcp:0:interface=127.0.0.1
token = {TOKEN}

[route:chat]
path = /chat/{{room}}
broadcast = room:{{room}}
history = 300

[route:short]
path = /short/{{room}}
broadcast = short:{{room}}
history = 5

[route:ttl]
path = /ttl/{{room}}
broadcast = ttl:{{room}}
history = 100
history_ttl = 1s

[route:plain]
path = /plain/{{room}}
broadcast = plain:{{room}}
"""


def redis_base(node, url):
    return f"""
[wsgate]
node_id = {node}
log_format = json
broker = shared

[broker:shared]
type = redis
url = {url}
prefix = h:
timeout = 1s

[listen:main]
endpoint = tcp:0:interface=127.0.0.1
"""


@pytest.fixture(scope="module")
def memory_gw(tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("hist-mem"), ROUTES, listeners=("main", "admin"))
    yield gw
    assert gw.stop() == 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("hist-redis")
    redis = RedisServer(base)
    gateways = []
    try:
        for name in ("a", "b"):
            (base / name).mkdir()
            gateways.append(start_gateway(base / name, ROUTES, base=redis_base(name, redis.url),
                                          listeners=("main", "admin")))
        wait_broker(gateways, "up")
        yield redis, gateways
    finally:
        for gw in gateways:
            assert gw.stop() == 0
        redis.stop()


@pytest.fixture(params=["memory", "redis"])
def pair(request):
    """(subscriber's gateway, publisher's gateway): one in-process gateway, or two
    gateways sharing Redis with the publisher on the other one."""
    if request.param == "memory":
        gw = request.getfixturevalue("memory_gw")
        return gw, gw
    _, (a, b) = request.getfixturevalue("cluster")
    return a, b


# ------------------------------------------------------------------ helpers

_OPEN = []  # the clients of the scenario running now


async def open_ws(url, **kwargs):
    """A websockets client, dropped at the end of :func:`run` if a failure left it open
    (a gateway stopping later would otherwise wait for it to answer its close)."""
    ws = await connect(url, **kwargs)
    _OPEN.append(ws)
    return ws


def run(coro):
    async def scenario():
        try:
            return await coro
        finally:
            for ws in _OPEN:
                ws.transport.abort()
            _OPEN.clear()
    return harness.run(scenario())


def wait_broker(gateways, state, timeout=15):
    deadline = time.monotonic() + timeout
    for gw in gateways:
        while True:
            _, body = admin_text(gw, "GET", "/healthz")
            if json.loads(body)["broker"] == state:
                break
            assert time.monotonic() < deadline, body
            time.sleep(0.05)


def publish(gw, channel, body, ctype="text/plain"):
    status, text = admin_text(gw, "POST", f"/publish/{channel}", TOKEN,
                              body.encode() if isinstance(body, str) else body, ctype)
    assert status == 202, (status, text)


def publish_many(gw, channel, bodies):
    for body in bodies:
        publish(gw, channel, body)


def seq(pos):
    epoch, _, n = pos.rpartition(":")
    assert epoch and n.isdigit(), pos
    return int(n)


def epoch(pos):
    return pos.rpartition(":")[0]


async def recv_json(ws, timeout=5):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def collect(ws, count, timeout=5):
    """Up to *count* JSON messages (fewer if none comes for *timeout* seconds)."""
    got = []
    try:
        while len(got) < count:
            got.append(json.loads(await asyncio.wait_for(ws.recv(), timeout)))
    except asyncio.TimeoutError:
        pass
    return got


async def nothing_more(ws, seconds=0.3):
    """Whatever arrives within *seconds* (a list; [] when nothing does)."""
    extra = []
    try:
        while True:
            extra.append(await asyncio.wait_for(ws.recv(), seconds))
    except asyncio.TimeoutError:
        return extra


async def subscriber(gw, path, since=None):
    """A ``wsgate.v1.json`` client and its ``subscribed`` message."""
    url = gw.url(path if since is None else f"{path}?since={since}")
    ws = await open_ws(url, subprotocols=SUB)
    assert ws.subprotocol == "wsgate.v1.json"
    first = await recv_json(ws)
    assert first["type"] == "subscribed", first
    return ws, first


async def discard(ws):
    try:
        async for _ in ws:
            pass
    except Exception:
        pass


async def settle(gateways_are_redis):
    """Let SUBSCRIBEs reach Redis (nothing to wait for in-process)."""
    if gateways_are_redis:
        await asyncio.sleep(0.3)


def assert_deliveries(got, datas, after_seq, the_epoch):
    """*got* is exactly *datas*, in order, at the positions right after *after_seq*."""
    assert [g.get("data") for g in got] == datas, (
        f"expected {len(datas)} deliveries {datas[:3]}..{datas[-3:]}, got {len(got)}: "
        f"{[(g.get('data', g), g.get('pos')) for g in got]}")
    assert [seq(g["pos"]) for g in got] == list(range(after_seq + 1, after_seq + 1 + len(got)))
    epochs = {epoch(g["pos"]) for g in got}
    # "new": the client subscribed before the channel's first message, whose history then
    # got its epoch; the deliveries share one epoch all the same
    assert len(epochs) <= 1 and (the_epoch == "new" or epochs <= {the_epoch})


# ------------------------------------------------------------------ 1. recovery

# Holds Redis for ARGV[1] microseconds: commands sent meanwhile queue up and are then run
# together, which makes the ordering races of a recovery over Redis happen every time.
SPIN = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
while true do
  local now = redis.call('TIME')
  if now[1] * 1000000 + now[2] - start > tonumber(ARGV[1]) then break end
end
return 1
"""

class Deliveries:
    """A client's deliveries; with *dedupe*, a position it already got is dropped (so that
    a test can check for gaps and order while duplicates are a known bug)."""

    def __init__(self, dedupe):
        self.dedupe = dedupe
        self.seen = set()
        self.ws = None

    async def take(self, count, timeout=5):
        got = []
        try:
            while len(got) < count:
                message = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
                if self.dedupe and message.get("pos") in self.seen:
                    continue
                self.seen.add(message.get("pos"))
                got.append(message)
        except asyncio.TimeoutError:
            pass
        return got


async def hold_redis(redis, seconds):
    await asyncio.to_thread(redis.command, "EVAL", SPIN, 0, int(seconds * 1e6))


async def recovery_rounds(sub_gw, pub_gw, room, rounds, observer=False, hold=None,
                          dedupe=False):
    """A subprotocol client on *sub_gw* drops, 50 messages are published from *pub_gw*
    (30 while it is away, 20 while it reconnects, from a concurrent task), and it comes
    back with its last position: it must get exactly those 50, then live ones.

    With *hold* (the RedisServer), the first round holds Redis so that the 20 and the
    reconnecting client's history read are run by Redis together, after its SUBSCRIBE:
    the ordering races of a recovery then happen every time."""
    redis = sub_gw is not pub_gw or hold is not None
    kept = observer or sub_gw is pub_gw  # the channel stays subscribed in sub_gw
    channel, path = f"room:{room}", f"/chat/{room}"
    pub = await open_ws(pub_gw.url(path))  # a plain client that publishes
    background = [asyncio.create_task(discard(pub))]
    if observer:
        watcher = await open_ws(sub_gw.url(path))
        background.append(asyncio.create_task(discard(watcher)))
    await settle(redis)
    client = Deliveries(dedupe)
    client.ws, first = await subscriber(sub_gw, path)
    the_epoch, head = epoch(first["pos"]), seq(first["pos"])
    n = 0
    live = [f"m{n + i}" for i in range(1, 6)]
    n += 5
    for body in live:
        await pub.send(body)
    got = await client.take(5)
    assert_deliveries(got, live, head, the_epoch)
    the_epoch = epoch(got[0]["pos"])
    for round_no in range(rounds):
        last = got[-1]["pos"]
        await client.ws.close()
        away = [f"m{n + i}" for i in range(1, 31)]
        during = [f"m{n + i}" for i in range(31, 51)]
        n += 50
        await asyncio.to_thread(publish_many, pub_gw, channel, away)
        if hold is not None and round_no == 0 and kept:
            # the history read is sent at once: hold Redis while the 20 and it queue up
            spin = asyncio.create_task(hold_redis(hold, 0.5))
            await asyncio.sleep(0.05)
            for body in during:
                await pub.send(body)
            await asyncio.sleep(0.05)
            reconnect = asyncio.create_task(subscriber(sub_gw, path, since=last))
            await spin
            client.ws, first = await reconnect
        elif hold is not None and round_no == 0:
            # the history read follows the SUBSCRIBE's confirmation: hold Redis while the
            # SUBSCRIBE queues, stop sub_gw so that the confirmation waits in its socket,
            # hold Redis again, publish the 20, then let sub_gw read the confirmation and
            # send its history read, which Redis runs together with the 20
            spin = asyncio.create_task(hold_redis(hold, 0.4))
            await asyncio.sleep(0.05)
            reconnect = asyncio.create_task(subscriber(sub_gw, path, since=last))
            await asyncio.sleep(0.15)
            sub_gw.signal(signal.SIGSTOP)
            try:
                await spin
                await asyncio.sleep(0.05)
                spin = asyncio.create_task(hold_redis(hold, 0.4))
                await asyncio.sleep(0.05)
                for body in during:
                    await pub.send(body)
                await asyncio.sleep(0.05)
            finally:
                sub_gw.signal(signal.SIGCONT)
            await spin
            client.ws, first = await reconnect
        else:
            pace = (0, 0.001, 0.003)[round_no % 3]

            async def burst():
                for body in during:
                    await pub.send(body)
                    await asyncio.sleep(pace)
            task = asyncio.create_task(burst())
            await asyncio.sleep((0, 0.002, 0.01, 0.0005)[round_no % 4])
            client.ws, first = await subscriber(sub_gw, path, since=last)
            await task
        assert epoch(first["pos"]) == the_epoch
        got = await client.take(50)
        assert_deliveries(got, away + during, seq(last), the_epoch)
        live = [f"m{n + i}" for i in range(1, 6)]
        n += 5
        for body in live:
            await pub.send(body)
        more = await client.take(5)
        assert_deliveries(more, live, seq(got[-1]["pos"]), the_epoch)
        got = more
    assert await client.take(1, 0.3) == []  # nothing else came late
    await client.ws.close()
    await pub.close()
    if observer:
        await watcher.close()
    for task in background:
        task.cancel()


def test_recovery_in_process_exactly_the_missed_messages_then_live(memory_gw):
    run(recovery_rounds(memory_gw, memory_gw, "rec-mem", rounds=5))


def test_recovery_over_redis_publisher_on_the_other_process(cluster):
    """The client's process subscribes to the channel anew when it comes back."""
    redis, (a, b) = cluster
    run(recovery_rounds(a, b, "rec-redis-first", rounds=5, hold=redis))


def test_recovery_over_redis_publisher_on_the_other_process_channel_kept_subscribed(cluster):
    """Another client keeps the channel subscribed in the client's process."""
    redis, (a, b) = cluster
    run(recovery_rounds(a, b, "rec-redis-kept", rounds=5, observer=True, hold=redis))


def test_recovery_over_redis_subscriber_and_publisher_on_the_same_process(cluster):
    redis, (a, _) = cluster
    run(recovery_rounds(a, a, "rec-redis-same", rounds=3, hold=redis))


@pytest.mark.parametrize("observer", [False, True], ids=["first-subscriber", "kept"])
def test_recovery_over_redis_loses_nothing_and_keeps_order(cluster, observer):
    """The same races with repeated positions set aside: no gap, in order (the tests above
    also require no duplicate)."""
    redis, (a, b) = cluster
    run(recovery_rounds(a, b, f"rec-redis-order-{observer}", rounds=5, observer=observer,
                        hold=redis, dedupe=True))


# ------------------------------------------------------------------ 2. from `subscribed`


def test_a_client_that_got_nothing_recovers_from_its_subscribed_position(pair):
    sub_gw, pub_gw = pair
    room = f"quiet-{sub_gw is pub_gw}"
    channel, path = f"room:{room}", f"/chat/{room}"

    async def scenario():
        await asyncio.to_thread(publish_many, pub_gw, channel, ["old1", "old2", "old3"])
        ws, first = await subscriber(sub_gw, path)
        assert seq(first["pos"]) == 3  # the head: older messages are not replayed
        assert await nothing_more(ws) == []
        await ws.close()
        missed = [f"n{i}" for i in range(10)]
        await asyncio.to_thread(publish_many, pub_gw, channel, missed)
        ws, again = await subscriber(sub_gw, path, since=first["pos"])
        assert again["pos"] == f"{epoch(first['pos'])}:13"
        got = await collect(ws, 10)
        assert_deliveries(got, missed, 3, epoch(first["pos"]))
        await asyncio.sleep(0.2 if sub_gw is not pub_gw else 0)
        await asyncio.to_thread(publish, pub_gw, channel, "live")
        assert await recv_json(ws) == {"pos": f"{epoch(first['pos'])}:14", "data": "live"}
        assert await nothing_more(ws) == []
        await ws.close()
    run(scenario())


def test_since_at_the_head_gets_no_history_just_live(pair):
    sub_gw, pub_gw = pair
    room = f"head-{sub_gw is pub_gw}"

    async def scenario():
        await asyncio.to_thread(publish_many, pub_gw, f"room:{room}", ["a", "b"])
        ws, first = await subscriber(sub_gw, f"/chat/{room}")
        await ws.close()
        ws, again = await subscriber(sub_gw, f"/chat/{room}", since=first["pos"])
        assert again["pos"] == first["pos"]
        await asyncio.sleep(0.2 if sub_gw is not pub_gw else 0)
        await asyncio.to_thread(publish, pub_gw, f"room:{room}", "c")
        assert [g["data"] for g in await collect(ws, 5, 0.5)] == ["c"]
        await ws.close()
    run(scenario())


# ------------------------------------------------------------------ 3. recovery refused


async def expect_recovery_failed(gw, path, since, then_publish):
    """Connect with *since*: ``subscribed``, ``recovery_failed``, no history, then the live
    message *then_publish* = (gateway, channel, body)."""
    ws, first = await subscriber(gw, path, since=since)
    assert await recv_json(ws) == {"type": "recovery_failed"}
    assert await nothing_more(ws, 0.2) == []  # no history after the refusal
    pub_gw, channel, body = then_publish
    await asyncio.to_thread(publish, pub_gw, channel, body)
    live = await recv_json(ws)
    assert live["data"] == body and seq(live["pos"]) == seq(first["pos"]) + 1 \
        and epoch(live["pos"]) == epoch(first["pos"])
    assert await nothing_more(ws, 0.2) == []
    await ws.close()
    return first


def test_trimmed_history_is_told_then_live(pair):
    sub_gw, pub_gw = pair
    room = f"trim-{sub_gw is pub_gw}"
    channel, path = f"short:{room}", f"/short/{room}"

    async def scenario():
        ws, first = await subscriber(sub_gw, path)
        await ws.close()
        await asyncio.to_thread(publish_many, pub_gw, channel, [f"t{i}" for i in range(20)])
        await expect_recovery_failed(sub_gw, path, first["pos"], (pub_gw, channel, "after"))
        # a position still within the last 5 recovers
        ws, again = await subscriber(sub_gw, path)
        await ws.close()
        await asyncio.to_thread(publish_many, pub_gw, channel, ["x1", "x2", "x3"])
        ws, _ = await subscriber(sub_gw, path, since=again["pos"])
        got = await collect(ws, 3)
        assert_deliveries(got, ["x1", "x2", "x3"], seq(again["pos"]), epoch(again["pos"]))
        assert await nothing_more(ws, 0.2) == []
        await ws.close()
    run(scenario())


@pytest.mark.parametrize("since", [
    "garbage", "zz:3", ":", "EPOCH:abc", "E:-1", "%00", "x" * 300, "ffffffff:1:2",
])
def test_a_garbage_position_is_told_then_live(memory_gw, since):
    from urllib.parse import quote

    room = f"garbage-{abs(hash(since))}"

    async def scenario():
        await asyncio.to_thread(publish_many, memory_gw, f"room:{room}", ["before"])
        await expect_recovery_failed(memory_gw, f"/chat/{room}", quote(since, safe=":"),
                                     (memory_gw, f"room:{room}", "live"))
    run(scenario())


def test_garbage_or_foreign_positions_over_redis(cluster):
    _, (a, b) = cluster

    async def scenario():
        await asyncio.to_thread(publish, b, "room:foreign", "before")
        first = None
        for since in ("garbage", "zz:1", "00000000:1"):
            first = await expect_recovery_failed(a, "/chat/foreign", since,
                                                 (b, "room:foreign", f"live-{since}"))
        # a position beyond the channel's head (of its own epoch) is not accepted either
        ahead = f"{epoch(first['pos'])}:{seq(first['pos']) + 100}"
        await expect_recovery_failed(a, "/chat/foreign", ahead, (b, "room:foreign", "last"))
    run(scenario())


def test_a_position_from_before_a_restart_is_told_then_live(tmp_path):
    gw = start_gateway(tmp_path, ROUTES, listeners=("main", "admin"))
    try:
        async def before():
            await asyncio.to_thread(publish_many, gw, "room:r", ["a", "b", "c"])
            ws, first = await subscriber(gw, "/chat/r")
            await ws.close()
            return first["pos"]
        old = run(before())
        assert gw.stop() == 0
        gw = start_gateway(tmp_path, ROUTES, listeners=("main", "admin"))

        async def after():
            # the new process counts again from 1: seq 3, 4... exist, in another epoch
            await asyncio.to_thread(publish_many, gw, "room:r", ["d", "e", "f", "g"])
            first = await expect_recovery_failed(gw, "/chat/r", old, (gw, "room:r", "h"))
            assert epoch(first["pos"]) != epoch(old) and seq(first["pos"]) == 4
        run(after())
    finally:
        assert gw.stop() == 0


def test_history_ttl_forgets_old_messages(pair):
    sub_gw, pub_gw = pair
    room = f"ttl-{sub_gw is pub_gw}"
    channel, path = f"ttl:{room}", f"/ttl/{room}"

    async def scenario():
        ws, start = await subscriber(sub_gw, path)
        await asyncio.sleep(0.2 if sub_gw is not pub_gw else 0)
        await asyncio.to_thread(publish, pub_gw, channel, "stale")
        stale = await recv_json(ws)
        assert stale["data"] == "stale"
        await ws.close()
        await asyncio.sleep(1.4)  # history_ttl = 1s
        await asyncio.to_thread(publish, pub_gw, channel, "fresh")
        # "stale" is older than the ttl: from before it, recovery fails (never "stale")
        ws, _ = await subscriber(sub_gw, path, since=start["pos"])
        assert await recv_json(ws) == {"type": "recovery_failed"}
        assert await nothing_more(ws, 0.2) == []
        await ws.close()
        status, body = await asyncio.to_thread(
            admin_text, sub_gw, "GET", f"/channels/{channel}/history", TOKEN)
        assert status == 200
        assert [m["data"] for m in json.loads(body)["messages"]] == ["fresh"]
        if sub_gw is pub_gw:  # in-process: from "stale" on, "fresh" is all that followed
            ws, _ = await subscriber(sub_gw, path, since=stale["pos"])
            assert [g["data"] for g in await collect(ws, 5, 0.3)] == ["fresh"]
            await ws.close()
    run(scenario())


# ------------------------------------------------------------------ 4. plain clients


def test_plain_clients_get_raw_messages_as_before(pair):
    sub_gw, pub_gw = pair
    room = f"raw-{sub_gw is pub_gw}"
    channel = f"room:{room}"

    async def scenario():
        await asyncio.to_thread(publish, pub_gw, channel, "from before")
        plain = await open_ws(sub_gw.url(f"/chat/{room}"))
        other = await open_ws(sub_gw.url(f"/chat/{room}"), subprotocols=["chat", "v2"])
        with_since = await open_ws(sub_gw.url(f"/chat/{room}?since=whatever:0"))
        no_history = await open_ws(sub_gw.url(f"/plain/{room}"))
        structured, first = await subscriber(sub_gw, f"/chat/{room}")
        assert plain.subprotocol is None and other.subprotocol is None
        assert with_since.subprotocol is None
        await asyncio.sleep(0.3 if sub_gw is not pub_gw else 0)
        binary = b"\x00\xff\x10raw"
        await asyncio.to_thread(publish, pub_gw, channel, "héllo {\"json\": 1}",
                                "text/plain; charset=utf-8")
        await asyncio.to_thread(publish, pub_gw, channel, binary, "application/octet-stream")
        await asyncio.to_thread(publish, pub_gw, f"plain:{room}", "héllo {\"json\": 1}")
        await asyncio.to_thread(publish, pub_gw, f"plain:{room}", binary,
                                "application/octet-stream")
        raw = await asyncio.gather(*(nothing_more(ws, 0.5)
                                     for ws in (plain, other, with_since, no_history)))
        for got in raw:
            assert got == ["héllo {\"json\": 1}", binary], got  # str = text, bytes = binary
        got = await collect(structured, 2)
        e, s = epoch(first["pos"]), seq(first["pos"])
        assert got == [{"pos": f"{e}:{s + 1}", "data": "héllo {\"json\": 1}"},
                       {"pos": f"{e}:{s + 2}", "b64": base64.b64encode(binary).decode()}]
        for ws in (plain, other, with_since, no_history, structured):
            await ws.close()
    run(scenario())


def test_a_subprotocol_client_on_a_route_without_history(memory_gw):
    async def scenario():
        ws, first = await subscriber(memory_gw, "/plain/nohist")
        assert first["pos"] is None
        await asyncio.to_thread(publish, memory_gw, "plain:nohist", "x")
        assert await recv_json(ws) == {"pos": None, "data": "x"}
        await ws.close()
        ws, first = await subscriber(memory_gw, "/plain/nohist", since="abc:1")
        assert first["pos"] is None
        assert await recv_json(ws) == {"type": "recovery_failed"}
        await ws.close()
    run(scenario())


def test_messages_clients_publish_are_recorded_and_recovered(pair):
    sub_gw, pub_gw = pair
    room = f"clients-{sub_gw is pub_gw}"

    async def scenario():
        talker, first = await subscriber(pub_gw, f"/chat/{room}")
        listener, _ = await subscriber(sub_gw, f"/chat/{room}")
        await listener.close()
        await talker.send("said")
        await talker.send(b"\x01bytes")
        assert await nothing_more(talker, 0.3) == []  # include_sender = no
        ws, _ = await subscriber(sub_gw, f"/chat/{room}", since=first["pos"])
        got = await collect(ws, 2)
        e, s = epoch(first["pos"]), seq(first["pos"])
        if e == "new":  # subscribed before the channel's first message: its epoch came later
            e = epoch(got[0]["pos"])
        assert got == [
            {"pos": f"{e}:{s + 1}", "data": "said"},
            {"pos": f"{e}:{s + 2}", "b64": base64.b64encode(b"\x01bytes").decode()}]
        await ws.close()
        await talker.close()
    run(scenario())


# ------------------------------------------------------------------ 5. admin


def test_admin_history_endpoint(pair):
    sub_gw, pub_gw = pair
    room = f"adm-{sub_gw is pub_gw}"
    channel = f"room:{room}"
    publish_many(pub_gw, channel, [f"h{i}" for i in range(1, 11)])
    publish(pub_gw, channel, b"\x00\x01", "application/octet-stream")

    def get(query="", token=TOKEN, gw=sub_gw, name=channel):
        status, body = admin_text(gw, "GET", f"/channels/{name}/history{query}", token)
        return status, (json.loads(body) if body.strip().startswith("{") else body)

    status, body = get()
    assert status == 200
    head = body["pos"]
    assert body["channel"] == channel and body["recovered"] is True and seq(head) == 11
    assert [m.get("data") for m in body["messages"]] == [f"h{i}" for i in range(1, 11)] + [None]
    assert body["messages"][-1] == {"pos": head, "b64": base64.b64encode(b"\x00\x01").decode()}
    assert [seq(m["pos"]) for m in body["messages"]] == list(range(1, 12))
    third = body["messages"][2]["pos"]
    status, body = get(f"?since={third}")
    assert status == 200 and [m.get("data") for m in body["messages"]][:2] == ["h4", "h5"]
    assert len(body["messages"]) == 8
    status, body = get(f"?since={third}&limit=3")
    assert [m["data"] for m in body["messages"]] == ["h4", "h5", "h6"] and body["pos"] == head
    status, body = get("?limit=2")
    assert [m["data"] for m in body["messages"]] == ["h1", "h2"]
    status, body = get(f"?since={head}")
    assert status == 200 and body["messages"] == [] and body["recovered"] is True
    for bad in ("garbage", "zz:1", f"{epoch(head)}:99"):
        status, body = get(f"?since={bad}")
        assert status == 200 and body["recovered"] is False and body["messages"] == []
        assert body["pos"] == head
    for bad in ("0", "-1", "abc", "100000"):
        assert get(f"?limit={bad}")[0] == 400
    assert get(name=f"plain:{room}")[0] == 404  # no history on this channel
    assert get(name="nowhere")[0] == 404
    assert get(token=None)[0] == 401
    assert get(token="wrong")[0] == 401
    assert get(name=f"plain:{room}", token=None)[0] == 401


def test_admin_channels_counts_subscribers(pair):
    sub_gw, pub_gw = pair
    tag = "m" if sub_gw is pub_gw else "r"

    def channels():
        status, body = admin_text(sub_gw, "GET", "/channels", TOKEN)
        assert status == 200
        return {c["channel"]: c["subscribers"] for c in json.loads(body)["channels"]}

    async def wait_count(name, count):
        for _ in range(50):
            got = (await asyncio.to_thread(channels)).get(name, 0)
            if got == count:
                return
            await asyncio.sleep(0.05)
        assert got == count, (name, got)

    async def scenario():
        one = [await open_ws(sub_gw.url(f"/chat/cnt1{tag}")) for _ in range(3)]
        two, _ = await subscriber(sub_gw, f"/plain/cnt2{tag}")
        await wait_count(f"room:cnt1{tag}", 3)
        await wait_count(f"plain:cnt2{tag}", 1)
        await one[0].close()
        await wait_count(f"room:cnt1{tag}", 2)
        for ws in one[1:] + [two]:
            await ws.close()
        await wait_count(f"room:cnt1{tag}", 0)
        await wait_count(f"plain:cnt2{tag}", 0)
        assert f"room:cnt1{tag}" not in await asyncio.to_thread(channels)
    run(scenario())
    assert admin_text(sub_gw, "GET", "/channels")[0] == 401
    assert admin_text(sub_gw, "GET", "/channels", "wrong")[0] == 401


def test_admin_history_reads_what_the_other_process_published(cluster):
    _, (a, b) = cluster
    publish_many(b, "room:xproc", ["p1", "p2"])
    status, body = admin_text(a, "GET", "/channels/room:xproc/history", TOKEN)
    assert status == 200
    assert [m["data"] for m in json.loads(body)["messages"]] == ["p1", "p2"]


# ------------------------------------------------------------------ 6. Redis outage


def test_redis_outage_degrades_to_live_messages_and_counts_it(tmp_path):
    redis = RedisServer(tmp_path)
    gw = None
    try:
        gw = start_gateway(tmp_path, ROUTES, base=redis_base("solo", redis.url),
                           listeners=("main", "admin"))
        wait_broker([gw], "up")

        def dropped():
            _, text = admin_text(gw, "GET", "/metrics")
            return metric(text, "wsgate_broadcast_dropped_total", route="chat",
                          reason="history_unavailable") or 0

        async def scenario():
            before, first = await subscriber(gw, "/chat/out")
            await asyncio.to_thread(publish, gw, "room:out", "pre")
            pre = await recv_json(before)
            assert pre["data"] == "pre"
            await asyncio.to_thread(redis.stop)
            await asyncio.to_thread(wait_broker, [gw], "down")
            assert await asyncio.to_thread(dropped) == 0
            during, d_first = await subscriber(gw, "/chat/out")
            assert d_first["pos"] is None  # (type checked by subscriber())
            recovering, r_first = await subscriber(gw, "/chat/out", since=pre["pos"])
            assert r_first["pos"] is None
            assert await recv_json(recovering) == {"type": "recovery_failed"}
            plain = await open_ws(gw.url("/chat/out"))
            assert await asyncio.to_thread(dropped) == 2
            status, _ = await asyncio.to_thread(
                admin_text, gw, "GET", "/channels/room:out/history", TOKEN)
            assert status == 503
            await asyncio.to_thread(redis.restart)
            await asyncio.to_thread(wait_broker, [gw], "up")
            await asyncio.sleep(0.3)  # subscriptions made again
            await asyncio.to_thread(publish, gw, "room:out", "back")
            for ws in (before, during, recovering):
                got = await recv_json(ws)
                assert got["data"] == "back" and seq(got["pos"]) == 1, got
                assert epoch(got["pos"]) != epoch(pre["pos"])  # Redis lost the history
            assert await asyncio.wait_for(plain.recv(), 5) == "back"
            # the history was lost with Redis: a position from before is refused
            await expect_recovery_failed(gw, "/chat/out", pre["pos"], (gw, "room:out", "x"))
            for ws in (before, during, recovering, plain):
                await ws.close()
        run(scenario())
        assert gw.proc.poll() is None
        _, body = admin_text(gw, "GET", "/healthz")
        assert json.loads(body)["status"] == "ok"
    finally:
        if gw is not None:
            assert gw.stop() == 0
        redis.stop()


def test_subscribing_to_made_up_rooms_writes_nothing_to_redis(cluster):
    """A client names its room: subscribing, reading positions and recovering write no
    key to Redis (only publishes do, bounded by max_history_channels), and a room that
    gets its first message after a subscriber's "nothing yet" still recovers whole."""
    redis, (a, b) = cluster

    async def scenario():
        before = redis.command("DBSIZE")
        for n in range(50):
            ws, first = await subscriber(a, f"/chat/madeup{n}")
            assert first["pos"] == "new:0"
            await ws.close()
        ws, first = await subscriber(a, "/chat/madeup0", since="new:0")
        await ws.close()
        assert redis.command("DBSIZE") == before
        await asyncio.to_thread(publish_many, b, "room:madeup7", ["m1", "m2"])
        ws, again = await subscriber(a, "/chat/madeup7", since="new:0")
        got = await collect(ws, 2)
        assert [m["data"] for m in got] == ["m1", "m2"]
        await ws.close()
    run(scenario())
