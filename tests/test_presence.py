"""Presence on the wire: members across two gateway processes sharing a real redis-server,
leaving on close, a SIGKILLed process's members expiring after ``presence_ttl``, join/leave
messages to ``wsgate.v1.json`` clients with ``join_leave = yes``, and the in-process broker.
"""

import asyncio
import json
import signal
import time

import pytest
from websockets.asyncio.client import connect

import harness
from harness import RedisServer, admin_text, start_gateway

TOKEN = "presence-token"
SUB = ["wsgate.v1.json"]
KEYS = {"alice": "ka", "bob": "kb", "carol": "kc", "dave": "kd"}
PRESENCE_TTL = 2.0

ROUTES = f"""
[admin]
endpoint = tcp:0:interface=127.0.0.1
token = {TOKEN}

[policy:keys]
type = apikey
keys = {", ".join(f"{key}={name}" for name, key in KEYS.items())}

[route:room]
path = /room/{{r}}
broadcast = room:{{r}}
policies = keys
presence = yes
join_leave = yes

[route:quiet]
path = /quiet/{{r}}
broadcast = quiet:{{r}}
policies = keys
presence = yes

[route:plain]
path = /plain/{{r}}
broadcast = plain:{{r}}
policies = keys

[route:anon]
path = /anon/{{r}}
broadcast = anon:{{r}}
presence = yes
join_leave = yes
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
prefix = p:
timeout = 1s
presence_ttl = {PRESENCE_TTL:g}s

[listen:main]
endpoint = tcp:0:interface=127.0.0.1
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    base = tmp_path_factory.mktemp("presence")
    redis = RedisServer(base)
    gateways = []
    try:
        for name in ("a", "b"):
            (base / name).mkdir()
            gateways.append(start_gateway(base / name, ROUTES, base=redis_base(name, redis.url),
                                          listeners=("main", "admin")))
        wait_broker_up(gateways)
        yield redis, base, gateways
    finally:
        for gw in gateways:
            assert gw.stop() == 0
        redis.stop()


@pytest.fixture(scope="module")
def memory_gw(tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("presence-mem"), ROUTES,
                       listeners=("main", "admin"))
    yield gw
    assert gw.stop() == 0


# ------------------------------------------------------------------ helpers


def wait_broker_up(gateways, timeout=15):
    deadline = time.monotonic() + timeout
    for gw in gateways:
        while json.loads(admin_text(gw, "GET", "/healthz")[1])["broker"] != "up":
            assert time.monotonic() < deadline, "broker not up"
            time.sleep(0.05)


_OPEN = []


async def client(gw, path, who=None, structured=False):
    """A client of *gw* authenticated as *who* (an identity of KEYS), with the
    subprotocol when *structured* (its ``subscribed`` message read)."""
    headers = {"Authorization": f"Bearer {KEYS[who]}"} if who else {}
    ws = await connect(gw.url(path), additional_headers=headers,
                       subprotocols=SUB if structured else None)
    _OPEN.append(ws)
    if structured:
        assert ws.subprotocol == "wsgate.v1.json"
        first = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert first["type"] == "subscribed", first
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


def presence(gw, channel, token=TOKEN):
    status, body = admin_text(gw, "GET", f"/channels/{channel}/presence", token)
    if status != 200:
        return status, body
    body = json.loads(body)
    assert body["channel"] == channel
    return status, body["members"]


def members(gw, channel):
    status, found = presence(gw, channel)
    assert status == 200, (status, found)
    return found


def ids_by_identity(gw, route):
    """``{identity: [connection ids]}`` of *gw*'s open connections on *route*."""
    status, body = admin_text(gw, "GET", "/connections", TOKEN)
    assert status == 200
    result = {}
    for conn in json.loads(body)["connections"]:
        if conn["route"] == route:
            result.setdefault(conn["identity"], []).append(conn["id"])
    return result


async def wait_members(gw, channel, predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        found = await asyncio.to_thread(members, gw, channel)
        if predicate(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: presence of {channel} on {gw.config_path} is "
                                 f"{found}")
        await asyncio.sleep(0.05)


async def messages(ws, seconds=0.4):
    got = []
    try:
        while True:
            got.append(await asyncio.wait_for(ws.recv(), seconds))
    except asyncio.TimeoutError:
        return got


def publish(gw, channel, body):
    status, text = admin_text(gw, "POST", f"/publish/{channel}", TOKEN, body.encode())
    assert status == 202, (status, text)


def identities(found):
    return sorted(m["identity"] for m in found)


# ------------------------------------------------------------------ across processes


def test_members_of_both_processes_are_listed_by_each(cluster):
    _, _, (a, b) = cluster

    async def scenario():
        before = time.time()
        alice = await client(a, "/room/p1", "alice", structured=True)
        bob = await client(b, "/room/p1", "bob")
        carol = await client(a, "/room/p1", "carol")
        after = time.time()
        elsewhere = await client(b, "/room/p1-other", "dave")
        on_a = await wait_members(a, "room:p1", lambda m: len(m) == 3, 3, "three members")
        on_b = await asyncio.to_thread(members, b, "room:p1")
        assert on_a == on_b  # the same answer from either process
        ids_a = await asyncio.to_thread(ids_by_identity, a, "room")
        ids_b = await asyncio.to_thread(ids_by_identity, b, "room")
        expected = {("alice", ids_a["alice"][0], "a"), ("bob", ids_b["bob"][0], "b"),
                    ("carol", ids_a["carol"][0], "a")}
        assert {(m["identity"], m["id"], m["node"]) for m in on_a} == expected
        for m in on_a:
            assert set(m) == {"id", "identity", "node", "since"}
            assert before - 1 <= m["since"] <= after + 1
        assert [m["since"] for m in on_a] == sorted(m["since"] for m in on_a)
        assert identities(await asyncio.to_thread(members, a, "room:p1-other")) == ["dave"]
        for ws in (alice, bob, carol, elsewhere):
            await ws.close()
        await wait_members(a, "room:p1", lambda m: m == [], 1.0, "everybody left")
    run(scenario())


def test_a_member_leaves_on_close_before_any_expiry(cluster):
    _, _, (a, b) = cluster

    async def scenario():
        alice = await client(a, "/quiet/p2", "alice")
        bob = await client(b, "/quiet/p2", "bob", structured=True)
        await wait_members(a, "quiet:p2", lambda m: identities(m) == ["alice", "bob"], 3,
                           "both members")
        await bob.close()
        # well within presence_ttl * 2/3, the least an entry has left to live: ZREM, not expiry
        await wait_members(a, "quiet:p2", lambda m: identities(m) == ["alice"], 1.0,
                           "bob left")
        assert identities(await asyncio.to_thread(members, b, "quiet:p2")) == ["alice"]
        await alice.close()
        await wait_members(b, "quiet:p2", lambda m: m == [], 1.0, "alice left")
    run(scenario())


def test_a_sigkilled_process_members_expire_after_presence_ttl(cluster):
    redis, base, (a, _) = cluster
    (base / "c").mkdir(exist_ok=True)
    c = start_gateway(base / "c", ROUTES, base=redis_base("c", redis.url),
                      listeners=("main", "admin"))
    try:
        wait_broker_up([c])

        async def scenario():
            alice = await client(a, "/room/p3", "alice")
            dave = await client(c, "/room/p3", "dave")
            joined = time.monotonic()
            await wait_members(a, "room:p3", lambda m: identities(m) == ["alice", "dave"], 3,
                               "both members")
            c.proc.send_signal(signal.SIGKILL)
            c.proc.wait(10)
            killed = time.monotonic()
            found = await asyncio.to_thread(members, a, "room:p3")
            assert identities(found) == ["alice", "dave"]  # nobody took dave out
            assert [m["node"] for m in found if m["identity"] == "dave"] == ["c"]
            await wait_members(a, "room:p3", lambda m: identities(m) == ["alice"],
                               PRESENCE_TTL + 1.5, "dave expired")
            gone = time.monotonic() - killed
            assert gone > 0.3, f"dave went {gone:.2f}s after the kill: not by expiry"
            # alice's own node keeps refreshing her: still there after twice the ttl
            await asyncio.sleep(max(0.0, joined + 2 * PRESENCE_TTL + 0.5 - time.monotonic()))
            assert identities(await asyncio.to_thread(members, a, "room:p3")) == ["alice"]
            await alice.close()
            dave.transport.abort()
        run(scenario())
    finally:
        c.stop()


def test_join_and_leave_reach_subprotocol_clients_with_join_leave_only(cluster):
    _, _, (a, b) = cluster

    async def scenario():
        alice = await client(a, "/room/p4", "alice", structured=True)
        carol = await client(a, "/room/p4", "carol")  # plain: raw messages only
        dave = await client(a, "/quiet/p4", "dave", structured=True)  # no join_leave
        bob = await client(b, "/room/p4", "bob", structured=True)
        bob_quiet = await client(b, "/quiet/p4", "bob")
        bob_id = (await asyncio.to_thread(ids_by_identity, b, "room"))["bob"][0]
        carol_id = (await asyncio.to_thread(ids_by_identity, a, "room"))["carol"][0]
        # a plain client joins too (it just does not get join/leave messages)
        joins = [json.loads(await asyncio.wait_for(alice.recv(), 5)) for _ in range(2)]
        assert joins == [{"type": "join", "id": carol_id, "identity": "carol"},
                         {"type": "join", "id": bob_id, "identity": "bob"}]
        await bob.close()
        leave = json.loads(await asyncio.wait_for(alice.recv(), 5))
        assert leave == {"type": "leave", "id": bob_id, "identity": "bob"}
        await bob_quiet.close()
        assert await messages(alice, 0.3) == []
        # the plain client and the quiet route's client got none of it
        await asyncio.to_thread(publish, b, "room:p4", "hello")
        await asyncio.to_thread(publish, b, "quiet:p4", "hello quiet")
        assert await messages(carol) == ["hello"]
        got = [json.loads(m) for m in await messages(dave)]
        assert [m.get("data") for m in got] == ["hello quiet"] and "type" not in got[0]
        assert [json.loads(m).get("data") for m in await messages(alice)] == ["hello"]
        for ws in (alice, carol, dave):
            await ws.close()
    run(scenario())


def test_a_joining_client_does_not_get_its_own_join(cluster):
    _, _, (a, b) = cluster

    async def scenario():
        alice = await client(a, "/room/p5", "alice", structured=True)
        bob = await client(b, "/room/p5", "bob", structured=True)
        got = json.loads(await asyncio.wait_for(alice.recv(), 5))
        assert got["type"] == "join" and got["identity"] == "bob"
        assert await messages(bob, 0.3) == []  # neither its own join nor alice's (earlier)
        await alice.close()
        got = json.loads(await asyncio.wait_for(bob.recv(), 5))
        assert got["type"] == "leave" and got["identity"] == "alice"
        await bob.close()
    run(scenario())


def test_presence_is_off_by_default_and_needs_the_token(cluster):
    _, _, (a, b) = cluster

    async def scenario():
        alice = await client(a, "/plain/p6", "alice", structured=True)
        bob = await client(b, "/plain/p6", "bob", structured=True)
        await asyncio.sleep(0.3)
        assert await messages(alice, 0.3) == []  # no join/leave without join_leave
        status, _ = await asyncio.to_thread(presence, a, "plain:p6")
        assert status == 404
        await bob.close()
        assert await messages(alice, 0.3) == []
        await alice.close()
    run(scenario())
    assert presence(a, "room:p1", token=None)[0] == 401
    assert presence(a, "room:p1", token="wrong")[0] == 401
    assert presence(a, "nowhere:x")[0] == 404


# ------------------------------------------------------------------ in-process broker


def test_presence_and_join_leave_on_the_in_process_broker(memory_gw):
    gw = memory_gw

    async def scenario():
        alice = await client(gw, "/room/m1", "alice", structured=True)
        anon = await client(gw, "/anon/m1", structured=True)
        bob = await client(gw, "/room/m1", "bob")
        bob_id = (await asyncio.to_thread(ids_by_identity, gw, "room"))["bob"][0]
        assert json.loads(await asyncio.wait_for(alice.recv(), 5)) == {
            "type": "join", "id": bob_id, "identity": "bob"}
        found = await asyncio.to_thread(members, gw, "room:m1")
        assert [(m["identity"], m["node"]) for m in found] == [
            ("alice", "test-node"), ("bob", "test-node")]
        assert bob_id in [m["id"] for m in found]
        anon_members = await asyncio.to_thread(members, gw, "anon:m1")
        assert [m["identity"] for m in anon_members] == [None]  # no policy: no identity
        other = await client(gw, "/anon/m1")
        joined = json.loads(await asyncio.wait_for(anon.recv(), 5))
        assert joined["type"] == "join" and joined["identity"] is None
        await bob.close()
        assert json.loads(await asyncio.wait_for(alice.recv(), 5)) == {
            "type": "leave", "id": bob_id, "identity": "bob"}
        assert identities(await asyncio.to_thread(members, gw, "room:m1")) == ["alice"]
        for ws in (alice, anon, other):
            await ws.close()
        await wait_members(gw, "room:m1", lambda m: m == [], 1.0, "alice left")
    run(scenario())
