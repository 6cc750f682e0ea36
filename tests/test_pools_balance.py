"""Upstream pools under load: how connections spread over real Node ``ws`` servers.

Every test runs a real ``twistd wsgate`` in front of real Node upstreams
(tests/peers/upstream.js, path ``/whoami``: the first message says which
server took the connection) and opens many Python ``websockets`` clients,
in concurrent batches. A client's server is the ``port:`` of its first
message; ``GET /upstreams`` (admin) is cross-checked against those counts.

* least_conn spreads 300 clients evenly and refills the server that lost some;
* weights are honoured by least_conn and by round_robin;
* slow start ramps a server added by SIGHUP (and, as a control, least_conn
  without it sends the new server every new connection at first);
* hash on ``{room}`` keeps a room on one server; adding a 4th server moves
  about a quarter of the rooms, whole, and nothing else, and closes nothing;
* hash with a server down (``down`` in the config, or killed and found down
  by the health checks): its rooms move whole, the other rooms stay;
* a SIGHUP that changes weights and balance and removes a server touches no
  live connection of the kept servers (the removed server's are left alone, or
  under issue 20 drained with 1012 only); ``/upstreams`` shows the removed
  server with the connections it still carries until they close.
"""

import asyncio
import collections
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from pool_helpers import TOKEN, key, live, pool_config, reload, run, upstreams, wait_until
from harness import NodeUpstream, admin_text, metric



# ----------------------------------------------------------------- helpers


class Client:
    __slots__ = ("ws", "port", "url")

    def __init__(self, ws, port, url):
        self.ws, self.port, self.url = ws, port, url


class Clients:
    """Every client a scenario opens, so that :meth:`close_all` closes each one."""

    def __init__(self):
        self.opened = []

    async def open(self, url):
        ws = await connect(url, open_timeout=15, close_timeout=2)
        self.opened.append(ws)
        first = await asyncio.wait_for(ws.recv(), 15)
        assert first.startswith("port:"), first
        return Client(ws, int(first[len("port:"):]), url)

    async def batch(self, urls):
        """Open a client for each of *urls* at the same time."""
        return list(await asyncio.gather(*(self.open(url) for url in urls)))

    async def batches(self, urls, size=50):
        """Open clients for *urls*, *size* at the same time."""
        clients = []
        for start in range(0, len(urls), size):
            clients += await self.batch(urls[start:start + size])
        return clients

    async def close_all(self):
        await asyncio.gather(*(ws.close() for ws in self.opened), return_exceptions=True)


async def echo_all(clients):
    """Every client still relays: its server echoes what it sends."""
    async def one(i, client):
        await client.ws.send(f"still here {i}")
        return await asyncio.wait_for(client.ws.recv(), 10)

    replies = await asyncio.gather(*(one(i, client) for i, client in enumerate(clients)))
    assert replies == [f"echo: still here {i}" for i in range(len(clients))]


async def echo_or_close_code(client):
    """``"echo"`` if *client* still relays, else the close code it got."""
    try:
        await client.ws.send("are you there")
        reply = await asyncio.wait_for(client.ws.recv(), 10)
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else None
    assert reply == "echo: are you there", reply
    return "echo"


def tally(clients):
    """server key → how many of *clients* it took."""
    return dict(collections.Counter(key(client.port) for client in clients))


def by_room(clients):
    """room → the set of server ports its *clients* went to."""
    rooms = collections.defaultdict(set)
    for client in clients:
        rooms[client.url.rsplit("/", 1)[1]].add(client.port)
    return rooms


def within(count, expected, fraction=0.05):
    return abs(count - expected) <= expected * fraction


# ----------------------------------------------------------------- least_conn


def test_least_conn_spreads_300_clients_evenly_and_refills_the_emptied_server(
        nodes, gateways):
    a, b, c = nodes[:3]
    gw = gateways(pool_config([a, b, c]))
    url = gw.url("/app")

    async def scenario():
        clients = Clients()
        try:
            opened = await clients.batches([url] * 300, size=50)
            counts = tally(opened)
            reported = await asyncio.to_thread(live, gw)
            metrics = (await asyncio.to_thread(admin_text, gw, "GET", "/metrics", TOKEN))[1]
            # 30 of a's clients leave: least_conn (live counts, not turns) sends the
            # next 30 all to a
            leaving = [client for client in opened if client.port == a.port][:30]
            await asyncio.gather(*(client.ws.close() for client in leaving))
            await wait_until(lambda: live(gw), lambda v: v[key(a)] == counts[key(a)] - 30)
            refill = await clients.batch([url] * 30)
            staying = [client for client in opened if client not in leaving]
            await echo_all(staying[::10] + refill)
            return counts, reported, metrics, tally(refill)
        finally:
            await clients.close_all()

    counts, reported, metrics, refill = run(scenario())
    assert set(counts) == {key(a), key(b), key(c)}, counts
    for server in (a, b, c):
        assert within(counts[key(server)], 100), counts
        assert reported[key(server)] == counts[key(server)], (reported, counts)
        assert metric(metrics, "wsgate_upstream_connections", pool="app",
                      server=key(server)) == counts[key(server)]
    assert refill == {key(a): 30}, refill


@pytest.mark.parametrize("balance", ["least_conn", "round_robin"])
def test_weights_are_honoured(nodes, gateways, balance):
    a, b, c = nodes[:3]
    gw = gateways(pool_config([(a, "weight=3"), b, c], f"balance = {balance}"))
    url = gw.url("/app")

    async def scenario():
        clients = Clients()
        try:
            opened = await clients.batches([url] * 300, size=50)
            reported = await asyncio.to_thread(live, gw)
            await echo_all(opened[::25])
            return tally(opened), reported
        finally:
            await clients.close_all()

    counts, reported = run(scenario())
    assert within(counts.get(key(a), 0), 180), counts
    assert within(counts.get(key(b), 0), 60), counts
    assert within(counts.get(key(c), 0), 60), counts
    assert reported == counts, (reported, counts)
    described = run(asyncio.to_thread(upstreams, gw))
    assert [described[key(s)]["weight"] for s in (a, b, c)] == [3, 1, 1]


# ----------------------------------------------------------------- slow start


BATCH = 15  # new clients per batch, one batch every PACE seconds
PACE = 0.5


@pytest.mark.parametrize("slow_start", ["6s", None], ids=["slow_start", "control"])
def test_slow_start_ramps_a_server_added_by_sighup(nodes, gateways, slow_start):
    """150 live clients on 3 servers; a 4th joins by SIGHUP; new clients arrive at
    BATCH per PACE. least_conn alone sends the newcomer every new connection until it
    holds as many as the others (the control run); with slow start it gets a share that
    grows with the ramp and reaches its even share by the end."""
    a, b, c, d = nodes
    settings = f"slow_start = {slow_start}" if slow_start else ""
    gw = gateways(pool_config([a, b, c], settings))
    url = gw.url("/app")
    rounds = 16 if slow_start else 4  # 8 s (the ramp is 6 s), or 2 s for the control

    async def scenario():
        clients = Clients()
        try:
            old = await clients.batches([url] * 150, size=50)
            assert tally(old) == {key(a): 50, key(b): 50, key(c): 50}, tally(old)
            await asyncio.to_thread(reload, gw, pool_config([a, b, c, d], settings))
            joined = time.monotonic()
            rounds_seen = []  # (seconds since the reload when the batch began, on d)
            for i in range(rounds):
                await asyncio.sleep(max(0.0, joined + i * PACE - time.monotonic()))
                began = time.monotonic() - joined
                batch = await clients.batch([url] * BATCH)
                rounds_seen.append((began, sum(client.port == d.port for client in batch)))
            final = await asyncio.to_thread(live, gw)
            await echo_all(old)  # the reload touched none of them
            return rounds_seen, final
        finally:
            await clients.close_all()

    rounds_seen, final = run(scenario())
    early = [on_d for began, on_d in rounds_seen if began < 1.5]
    early_share = sum(early) / (BATCH * len(early))
    if not slow_start:
        # least_conn alone: the empty newcomer takes (nearly) everything at first
        assert early_share >= 0.9, rounds_seen
        return
    # the first ~1.5 s: few for the newcomer (least_conn alone would give it all)
    assert early_share <= 0.6, rounds_seen
    # its share grows with the ramp
    middle = [on_d for began, on_d in rounds_seen if 3.0 <= began < 6.0]
    assert middle, rounds_seen
    middle_share = sum(middle) / (BATCH * len(middle))
    assert middle_share > early_share + 0.1, rounds_seen
    assert sum(on_d for _, on_d in rounds_seen) > sum(early), rounds_seen
    # and by the end it holds about its even share of everything
    total = sum(final.values())
    assert total == 150 + BATCH * rounds, final
    assert abs(final[key(d)] - total / 4) <= 0.15 * total / 4, (final, rounds_seen)


# ----------------------------------------------------------------- hash


ROOMS = [f"room{i}" for i in range(40)]


def hash_config(servers, settings=""):
    return pool_config(servers, "balance = hash\nhash_key = {room}\n" + settings,
                       path="/rooms/{room}", template="/whoami/{room}")


def room_urls(gw, per_room, rooms=ROOMS):
    """*per_room* URLs for each room, interleaved so that a room's clients are opened in
    the same concurrent batch as other rooms' and not one after another."""
    return [gw.url(f"/rooms/{room}") for _ in range(per_room) for room in rooms]


def one_server_per_room(clients):
    """room → its server's port, after checking that each room's clients agree."""
    rooms = by_room(clients)
    split = {room: ports for room, ports in rooms.items() if len(ports) != 1}
    assert not split, f"rooms split across servers: {split}"
    return {room: next(iter(ports)) for room, ports in rooms.items()}


def test_hash_keeps_rooms_together_and_a_new_server_takes_about_a_quarter(nodes, gateways):
    a, b, c, d = nodes
    gw = gateways(hash_config([a, b, c]))

    async def scenario():
        clients = Clients()
        try:
            old = await clients.batches(room_urls(gw, 5), size=50)
            before = one_server_per_room(old)
            await asyncio.to_thread(reload, gw, hash_config([a, b, c, d]))
            new = await clients.batches(room_urls(gw, 2), size=40)
            after = one_server_per_room(new)
            await echo_all(old)  # the reload closed no live connection
            reported = await asyncio.to_thread(live, gw)
            return before, after, tally(old + new), reported
        finally:
            await clients.close_all()

    before, after, counts, reported = run(scenario())
    assert set(before) == set(after) == set(ROOMS)
    assert set(before.values()) == {a.port, b.port, c.port}, before
    moved = {room for room in ROOMS if after[room] != before[room]}
    # a room moves only to the new server; the others keep theirs
    assert {after[room] for room in moved} <= {d.port}, (before, after)
    # about a quarter of the rooms move (not none, not a rehash of most of them)
    assert 3 <= len(moved) <= 20, (len(moved), before, after)
    assert {name: n for name, n in reported.items() if n} == counts, (reported, counts)


def _down_scenario(gw, victim, take_out, victims_clients_stay):
    """30 rooms, one client each; take *victim* out (*take_out*, a blocking callable that
    returns when the gateway considers it down); then 3 new clients per room at once.

    Then the load is turned around: the remaining server with the fewest connections
    gets enough more (clients of one of its own rooms) to hold the most, and each of the
    victim's rooms gets one more client, which must go where the room went before. A
    room whose server is down follows the hash order, not the load of the moment."""
    rooms = ROOMS[:30]

    async def scenario():
        clients = Clients()
        try:
            old = await clients.batch(room_urls(gw, 1, rooms))
            before = one_server_per_room(old)
            await asyncio.to_thread(take_out)
            new = await clients.batches(room_urls(gw, 3, rooms), size=45)
            counts = await asyncio.to_thread(live, gw)
            others = sorted((n, name) for name, n in counts.items() if name != key(victim))
            (fewest, emptier), (most, _) = others[0], others[-1]
            own_room = next(room for room, port in before.items() if key(port) == emptier)
            extra = await clients.batch(room_urls(gw, most - fewest + 6, [own_room]))
            assert tally(extra) == {emptier: most - fewest + 6}, tally(extra)
            victims_rooms = [room for room, port in before.items() if port == victim.port]
            later = await clients.batch(room_urls(gw, 1, victims_rooms))
            await echo_all([client for client in old if victims_clients_stay
                            or client.port != victim.port])
            return before, by_room(new + later)
        finally:
            await clients.close_all()

    before, after_rooms = run(scenario())
    victims_rooms = {room for room, port in before.items() if port == victim.port}
    assert victims_rooms, f"no room on the victim {victim.port}: {before}"
    split = {room: ports for room, ports in after_rooms.items() if len(ports) != 1}
    assert not split, f"rooms split across servers while one is down: {split}"
    after = {room: next(iter(ports)) for room, ports in after_rooms.items()}
    for room in before:
        if room in victims_rooms:
            assert after[room] != victim.port, (room, before, after)
        else:
            assert after[room] == before[room], (room, before, after)


def test_hash_with_a_server_down_in_the_config_moves_only_its_rooms(nodes, gateways):
    a, b, c = nodes[:3]
    gw = gateways(hash_config([a, b, c]))
    victim = b

    def mark_down():
        reload(gw, hash_config([a, (b, "down"), c]))
        assert upstreams(gw)[key(b)]["state"] == "disabled"

    # b's own clients stay and still echo: down in the config takes no live connection
    _down_scenario(gw, victim, mark_down, victims_clients_stay=True)


def test_hash_with_a_killed_server_found_down_by_health_checks(nodes, gateways):
    a, b = nodes[:2]
    victim = NodeUpstream()
    try:
        gw = gateways(hash_config([a, victim, b], """
            health_check = 200ms
            fall = 2
            connect_timeout = 500ms
        """))
        run(wait_until(lambda: upstreams(gw), lambda v: all(
            (s["last_check"] or {}).get("ok") for s in v.values())))

        def kill():
            victim.proc.kill()  # SIGKILL
            victim.proc.wait(10)
            gw.wait_event(lambda e: e.get("event") == "wsgate.upstream.down"
                          and e.get("server") == key(victim))
            assert upstreams(gw)[key(victim)]["state"] == "down"

        # the victim's own clients are closed by the gateway when it goes away
        _down_scenario(gw, victim, kill, victims_clients_stay=False)
    finally:
        victim.stop()


# ----------------------------------------------------------------- reload


def test_live_connections_survive_a_reload_that_reweighs_rebalances_and_removes(
        nodes, gateways):
    """The kept servers' connections all stay and keep their counts; the removed server
    is shown as ``removed`` with the connections it still carries until they close.

    Issue 19 leaves a removed server's connections alone; issue 20 drains them (1012,
    spread over ``drain_time``, at least one per second). So a client of the removed
    server either still echoes or was moved with 1012, nothing else, and ``/upstreams``
    must count exactly those still open."""
    a, b, c = nodes[:3]
    gw = gateways(pool_config([a, b, c]))
    url = gw.url("/app")

    def metrics():
        return admin_text(gw, "GET", "/metrics", TOKEN)[1]

    def still_open(clients):
        return sum(client.ws.state is State.OPEN for client in clients)

    async def on_c_matches(on_c):
        """``/upstreams`` for c once it agrees with the c clients still open."""
        return await wait_until(
            lambda: (upstreams(gw), still_open(on_c)),
            lambda v: v[0].get(key(c), {}).get("connections", 0) == v[1])

    async def scenario():
        clients = Clients()
        try:
            old = await clients.batch([url] * 30)
            assert tally(old) == {key(a): 10, key(b): 10, key(c): 10}, tally(old)
            on_c = [client for client in old if client.port == c.port]
            kept = [client for client in old if client.port != c.port]
            await asyncio.to_thread(reload, gw, pool_config(
                [(a, "weight=2"), b], "balance = round_robin"))
            await echo_all(kept)
            c_fates = await asyncio.gather(*(echo_or_close_code(client) for client in on_c))
            shown, c_open = await on_c_matches(on_c)
            shown_metrics = await asyncio.to_thread(metrics)
            new = await clients.batch([url] * 30)
            await echo_all(kept + new)

            left = [client for client in on_c if client.ws.state is State.OPEN]
            await asyncio.gather(*(client.ws.close() for client in left[:len(left) // 2]))
            partly, _ = await on_c_matches(on_c)
            await asyncio.gather(*(client.ws.close() for client in on_c))
            gone, _ = await on_c_matches(on_c)
            after_metrics = await asyncio.to_thread(metrics)
            return (c_fates, shown, c_open, shown_metrics, tally(new), partly, gone,
                    after_metrics)
        finally:
            await clients.close_all()

    c_fates, shown, c_open, shown_metrics, new, partly, gone, after_metrics = run(scenario())
    assert set(c_fates) <= {"echo", 1012}, c_fates
    assert c_fates.count("echo") >= 5, c_fates  # a drain moves at most ~1 a second
    assert shown[key(c)]["state"] == "removed", shown
    assert shown[key(c)]["connections"] == c_open >= 5, shown
    assert [shown[key(s)]["state"] for s in (a, b)] == ["up", "up"], shown
    # the kept servers' counts survived the reload
    assert [shown[key(s)]["connections"] for s in (a, b)] == [10, 10], shown
    assert [shown[key(s)]["weight"] for s in (a, b)] == [2, 1], shown
    assert metric(shown_metrics, "wsgate_upstream_connections", pool="app",
                  server=key(c)) == c_open
    # the new balance and weights apply to new connections: round robin 2:1, none on c
    assert new == {key(a): 20, key(b): 10}, new
    assert partly[key(c)]["state"] == "removed", partly
    assert gone.get(key(c), {}).get("connections", 0) == 0, gone
    assert metric(after_metrics, "wsgate_upstream_connections", pool="app",
                  server=key(c)) in (None, 0)
