"""Upstream pools in memory: the balancers, the pool state on a Clock, the config.

The same behaviours over real sockets are in test_pools*.py; these point at
the failing line.
"""

import collections
import textwrap
from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock

from wsgate.config import ConfigError, load
from wsgate.upstreams import balance
from wsgate.upstreams.config import PoolSettings, parse_hash_key, parse_servers
from wsgate.upstreams.pools import Upstreams, hash_value

# ------------------------------------------------------------------ balancers


def test_least_conn_picks_the_fewest_per_weight_and_breaks_ties_in_turn():
    servers = ["a", "b", "c"]
    live = {"a": 4, "b": 2, "c": 2}
    weight = {"a": 2, "b": 1, "c": 1}
    chosen = [balance.least_conn(servers, live.get, weight.get, turn) for turn in range(6)]
    # a: 4/2 = 2, b and c: 2 → a three-way tie, taken in turn
    assert chosen == ["a", "b", "c", "a", "b", "c"]
    live["b"] = 1
    assert balance.least_conn(servers, live.get, weight.get, 0) == "b"


def test_smooth_weighted_round_robin_interleaves_like_nginx():
    weight = {"a": 5, "b": 1, "c": 1}
    current = {}
    order = [balance.smooth_weighted(["a", "b", "c"], str, weight.get, current)
             for _ in range(7)]
    assert order == ["a", "a", "b", "a", "c", "a", "a"]  # nginx's documented sequence
    more = [balance.smooth_weighted(["a", "b", "c"], str, weight.get, current)
            for _ in range(700)]
    assert collections.Counter(more) == {"a": 500, "b": 100, "c": 100}


def _owner(key, servers, weights=None):
    weights = weights or {}
    return balance.rendezvous_order(key, servers, str, lambda s: weights.get(s, 1))[0]


def test_rendezvous_moves_about_one_nth_of_the_keys_when_a_server_joins_or_leaves():
    keys = [f"room-{i}" for i in range(8000)]
    three = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
    four = three + ["10.0.0.4:80"]
    before = {key: _owner(key, three) for key in keys}
    after = {key: _owner(key, four) for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert 0.22 < len(moved) / len(keys) < 0.28  # about 1/4
    assert {after[key] for key in moved} == {"10.0.0.4:80"}  # only to the new server
    # removing a server moves only the keys it held
    without = {key: _owner(key, three[:2]) for key in keys}
    assert all(without[key] == before[key] for key in keys if before[key] != three[2])


def test_rendezvous_next_server_takes_a_down_servers_keys_and_weights_count():
    servers = ["a:1", "b:1", "c:1"]
    for i in range(200):
        order = balance.rendezvous_order(f"k{i}", servers, str, lambda s: 1)
        assert sorted(order) == servers
        # when the first is down, the next in this key's order takes it: deterministic
        assert balance.rendezvous_order(f"k{i}", [s for s in servers if s != order[0]],
                                        str, lambda s: 1)[0] == order[1]
    owners = collections.Counter(_owner(f"k{i}", servers, {"a:1": 2}) for i in range(8000))
    assert 0.45 < owners["a:1"] / 8000 < 0.55  # weight 2 of 4


def test_a_huge_hash_key_is_digested_once_not_once_per_server(monkeypatch):
    """A header or cookie value is the client's to choose: its length must not be
    multiplied by the number of servers."""
    hashed = []
    blake2b = balance.hashlib.blake2b

    def counting(data, **kwargs):
        hashed.append(len(data))
        return blake2b(data, **kwargs)
    monkeypatch.setattr(balance.hashlib, "blake2b", counting)
    servers = [f"10.0.{i // 250}.{i % 250}:80" for i in range(1000)]
    order = balance.rendezvous_order("k" * 16384, servers, str, lambda s: 1)
    assert sorted(order) == sorted(servers)
    assert sum(hashed) < 16384 + 1000 * 64, sum(hashed)


# ------------------------------------------------------------------ pools on a clock


def _settings(servers="ws://h:1/x, ws://h:2/x, ws://h:3/x", **keys):
    return PoolSettings(name="app", servers=parse_servers(servers), **keys)


def _registry(settings, clock=None):
    clock = clock or Clock()
    upstreams = Upstreams(clock)
    upstreams.apply({"app": settings})
    return upstreams, upstreams.pool("app"), clock


def test_least_conn_spreads_leases_evenly_and_releases_count_down():
    upstreams, pool, clock = _registry(_settings())
    leases = [pool.lease(pool.choose(None, set(), 0)) for _ in range(30)]
    assert [s.live for s in pool.servers] == [10, 10, 10]
    for lease in leases[:10]:
        lease.release()
        lease.release()  # idempotent
    assert sum(s.live for s in pool.servers) == 20


def test_tried_servers_are_skipped_and_backups_only_used_when_no_primary_is_left():
    upstreams, pool, clock = _registry(_settings("ws://h:1/x, ws://h:2/x, ws://h:3/x backup"))
    assert pool.choose(None, set(), 0).key in ("h:1", "h:2")
    assert pool.choose(None, {"h:1"}, 0).key == "h:2"
    assert pool.choose(None, {"h:1", "h:2"}, 0).key == "h:3"
    assert pool.choose(None, {"h:1", "h:2", "h:3"}, 0) is None


def test_hash_keeps_a_room_on_one_server_and_moves_it_whole_when_that_server_is_down():
    settings = _settings(balance="hash", hash_key=parse_hash_key("{room}"))
    upstreams, pool, clock = _registry(settings)
    first = {room: pool.choose(room, set(), 0).key for room in map(str, range(60))}
    assert all(pool.choose(room, set(), 0).key == key
               for room, key in first.items())
    victim = pool.server("h:1")
    victim.checked_up = False
    moved = {room: pool.choose(room, set(), 0).key for room in first}
    for room, key in first.items():
        if key != "h:1":
            assert moved[room] == key  # other rooms stay
        else:
            assert moved[room] != "h:1"
            # the room's next server in hash order: the same for every request
            assert pool.choose(room, set(), 0).key == moved[room]
    # a request without the key is balanced by least connections
    assert pool.choose(None, set(), 0) is not None


def test_hash_values_from_each_source():
    head = {"x-tenant": "t1", "cookie": "a=1; session=s9; b=2"}
    request = SimpleNamespace(match=SimpleNamespace(params={"room": "r1"}),
                              origin=SimpleNamespace(ip="192.0.2.7"),
                              connection=SimpleNamespace(identity="alice"),
                              head=SimpleNamespace(get=head.get))
    values = {text: hash_value(parse_hash_key(text), request)
              for text in ("ip", "identity", "header:X-Tenant", "cookie:session", "{room}")}
    assert values == {"ip": "192.0.2.7", "identity": "alice", "header:X-Tenant": "t1",
                      "cookie:session": "s9", "{room}": "r1"}
    assert hash_value(parse_hash_key("cookie:none"), request) is None


def test_passive_health_takes_a_server_out_for_fail_timeout_then_one_try_decides():
    upstreams, pool, clock = _registry(_settings(max_fails=2, fail_timeout=10.0))
    server = pool.server("h:1")
    upstreams.failed(server, "refused")
    assert server.state(clock.seconds()) == "up"
    clock.advance(11)  # the first failure is older than fail_timeout: forgotten
    upstreams.failed(server, "refused")
    assert server.state(clock.seconds()) == "up"
    upstreams.failed(server, "timeout")
    assert server.state(clock.seconds()) == "failed"
    assert all(pool.choose(None, set(), clock.seconds()).key != "h:1"
               for _ in range(10))
    clock.advance(10)
    assert server.state(clock.seconds()) == "up"
    upstreams.failed(server, "refused")  # on probation: one failure is enough
    assert server.state(clock.seconds()) == "failed"
    clock.advance(10)
    upstreams.succeeded(server)
    upstreams.failed(server, "refused")
    assert server.state(clock.seconds()) == "up"  # back to max_fails after a success
    assert server.failures == {"refused": 4, "timeout": 1}
    upstreams.failed(server, "http_4xx")  # an answer, not a failure of the server
    upstreams.failed(server, "http_4xx")
    assert server.state(clock.seconds()) == "up"


def test_active_checks_need_fall_failures_to_take_down_and_rise_successes_to_bring_back():
    upstreams, pool, clock = _registry(_settings(health_check=1.0, rise=2, fall=3))
    server = pool.server("h:2")
    for ok in (False, False, True, False, False):  # a success resets the streak
        upstreams.checked(server, ok, "test")
    assert server.state(0) == "up"
    upstreams.checked(server, False, "test")
    assert server.state(0) == "down"
    upstreams.checked(server, True, "101")
    assert server.state(0) == "down"
    upstreams.checked(server, True, "101")
    assert server.state(0) == "up"
    assert server.last_check["ok"] is True


def test_slow_start_ramps_a_returning_server_share():
    upstreams, pool, clock = _registry(_settings(slow_start=10.0))
    leases = [pool.lease(pool.choose(None, set(), 0)) for _ in range(60)]
    late = pool.server("h:3")
    for lease in [lease for lease in leases if lease.server is late]:
        lease.release()
    late.joined_at = clock.seconds()  # it came back now
    picks = collections.Counter()
    for second in range(12):
        for _ in range(10):
            server = pool.choose(None, set(), clock.seconds())
            picks[(second, server.key)] += 1
            pool.lease(server)
        clock.advance(1)
    firsts = sum(picks[(s, "h:3")] for s in range(2))
    assert firsts <= 6  # least_conn alone would give it all 20
    assert late.live >= 35  # and it reaches its share (about 60 of 180) as the ramp ends


def test_a_reload_keeps_each_servers_live_count_and_shows_removed_ones():
    upstreams, pool, clock = _registry(_settings())
    leases = [pool.lease(pool.choose(None, set(), 0)) for _ in range(9)]
    clock.advance(5)
    upstreams.apply({"app": _settings("ws://h:2/x weight=2, ws://h:3/x, ws://h:4/x",
                                      balance="round_robin")})
    pool = upstreams.pool("app")
    assert [(s.key, s.live) for s in pool.servers] == [("h:2", 3), ("h:3", 3), ("h:4", 0)]
    assert pool.server("h:4").joined_at == 5  # joined now: slow start counts from here
    (removed,) = upstreams.retired()
    assert (removed.key, removed.live, removed.state(5)) == ("h:1", 3, "removed")
    assert [s["server"] for s in upstreams.describe()[0]["servers"]][-1] == "h:1"
    for lease in leases:
        lease.release()
    assert upstreams.retired() == []
    # back in the config: counts from its live connections again (none), ramped
    upstreams.apply({"app": _settings()})
    assert upstreams.pool("app").server("h:1").live == 0


# ------------------------------------------------------------------ config


def _load(tmp_path, text):
    path = tmp_path / "wsgate.ini"
    path.write_text(textwrap.dedent("""
        [listen:main]
        endpoint = tcp:0:interface=127.0.0.1
        """) + textwrap.dedent(text))
    return load(str(path))


POOL = """
[upstream:app]
servers = ws://127.0.0.1:9001/r/{room}, ws://127.0.0.1:9002/r/{room} weight=2
{extra}

[route:app]
path = /rooms/{room}
upstream = @app
"""


def test_a_pool_loads_with_its_defaults(tmp_path):
    config = _load(tmp_path, POOL.replace("{extra}", ""))
    pool = config.pools["app"]
    assert (pool.balance, pool.tries, pool.connect_timeout, pool.max_fails, pool.fail_timeout,
            pool.slow_start, pool.health_check, pool.rise, pool.fall) == (
        "least_conn", 3, 1.0, 3, 10.0, 0.0, 0.0, 2, 3)
    assert [s.weight for s in pool.servers] == [1, 2]
    assert config.routes[0].target.describe() == "upstream @app (2 servers, least_conn)"


@pytest.mark.parametrize("extra, key, message", [
    ("servers = ws://h:1/x weight=0", "servers", "weight of ws://h:1/x: expected 1 to 1000"),
    ("servers = ws://h:1/x heavy", "servers", "expected weight=N, backup, down or drain"),
    ("servers = ws://h:1/x, ws://h:1/y", "servers", "h:1 is listed twice"),
    ("servers = ws://h:1/x, wss://h:2/x", "servers", "mixes ws:// and wss://"),
    ("servers = ws://h:1/x backup", "servers", "every server is a backup"),
    ("servers = http://h:1/x", "servers", "expected ws://host:port/path"),
    ("servers = ws://h:1/x,", "servers", "an empty entry"),
    ("servers = " + ", ".join(f"ws://h:{port}/x" for port in range(1, 1002)), "servers",
     "at most 1000 servers"),
    ("servers = ws://h:1/x\nhash_key = ip", "hash_key", "applies with balance = hash only"),
    ("servers = ws://h:1/x\nbalance = hash", "hash_key", "is required with balance = hash"),
    ("servers = ws://h:1/x\nbalance = hash\nhash_key = ip\nslow_start = 5s", "slow_start",
     "does not apply to balance = hash"),
    ("servers = ws://h:1/x\nbalance = hash\nhash_key = body", "hash_key",
     "expected ip, identity, header:NAME"),
    ("servers = ws://h:1/x\nbalance = fastest", "balance", "expected one of"),
    ("servers = ws://h:1/x\nrise = 3", "rise", "applies with health_check"),
    ("servers = ws://h:1/x\ntries = 0", "tries", ""),
    ("servers = ws://h:1/x\nhealth_check = 10ms", "health_check", "at least 100ms"),
    ("servers = ws://h:1/x\nweight = 2", "weight", "unknown key"),
    ("servers = ws://h:1/x\nrebalance_rate = 0/s", "rebalance_rate", "expected a rate"),
    ("servers = ws://h:1/x\nresolve = 10ms", "resolve", "at least 100ms"),
])
def test_bad_pools_name_the_section_and_key(tmp_path, extra, key, message):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, f"[upstream:app]\n{extra}\n")
    assert (info.value.section, info.value.key) == ("upstream:app", key)
    assert message in info.value.message


@pytest.mark.parametrize("pool, route, message", [
    ("servers = ws://h:1/{other}", "path = /rooms/{room}",
     "{other} in ws://h:1/{other} is not {path}, {tail} or a placeholder"),
    ("servers = ws://h:1/x\nbalance = hash\nhash_key = {user}", "path = /rooms/{room}",
     "hash_key {user} is not a placeholder of path"),
    ("servers = ws://h:1/x", "path = /x\nupstream_verify = no",
     "only applies to wss:// upstreams"),
])
def test_a_route_checks_the_pool_against_its_path(tmp_path, pool, route, message):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, f"[upstream:app]\n{pool}\n\n[route:app]\n{route}\nupstream = @app\n")
    assert info.value.section == "route:app"
    assert message in info.value.message


# ------------------------------------------------------------------ moving connections


class _Relay:
    """Stands for a proxied connection's relay: records the close it was asked for."""

    def __init__(self, closes):
        self.closes = closes

    def close_with(self, code, reason, upstream_code=None, upstream_reason=None):
        self.closes.append((code, reason, upstream_code, upstream_reason))


def _connect(pool, clock, closes, count, room=None, server=None):
    """*count* relayed connections placed by the pool (by *room* in a hash pool), or on
    *server*."""
    leases = []
    for _ in range(count):
        chosen = server or pool.choose(room, set(), clock.seconds())
        connection = SimpleNamespace(since=clock.seconds(), protocol=_Relay(closes))
        leases.append(pool.lease(chosen, connection, room))
    return leases


def _started(settings, clock):
    upstreams = Upstreams(clock)
    upstreams.apply({"app": settings})
    upstreams.startService()
    return upstreams, upstreams.pool("app")


def test_a_drain_closes_a_servers_connections_evenly_over_drain_time_with_1012():
    clock = Clock()
    upstreams, pool = _started(_settings(drain_time=5.0), clock)
    closes = []
    leases = _connect(pool, clock, closes, 300)
    victim = pool.server("h:2")
    mine = [lease for lease in leases if lease.server is victim]
    assert upstreams.drain("app", "h:2", True) is victim
    assert victim.state(clock.seconds()) == "drain"
    assert all(pool.choose(None, set(), 0).key != "h:2" for _ in range(20))
    per_step = []
    for _ in range(12):
        before = len(closes)
        clock.advance(0.5)
        per_step.append(len(closes) - before)
    assert len(closes) == len(mine) == 100
    assert set(closes) == {(1012, "service restart", 1001, "going away")}
    assert max(per_step) <= 15  # spread over ten steps, not all at once
    assert sum(1 for n in per_step if n) >= 8
    assert victim.moved == {"drain": 100}
    assert all(lease.moving for lease in mine)
    assert not any(lease.moving for lease in leases if lease.server is not victim)
    for lease in mine:
        lease.release()
    clock.advance(1)
    assert victim.drain.done
    upstreams.stopService()


def test_deleting_a_drain_stops_it_and_the_server_takes_connections_again():
    clock = Clock()
    upstreams, pool = _started(_settings(drain_time=10.0), clock)
    closes = []
    _connect(pool, clock, closes, 90)
    upstreams.drain("app", "h:1", True)
    clock.advance(3)
    closed = len(closes)
    assert 0 < closed < 30
    upstreams.drain("app", "h:1", False)
    clock.advance(10)
    assert len(closes) == closed
    assert pool.server("h:1").state(clock.seconds()) == "up"
    assert upstreams.drain("app", "h:9", True) is None
    upstreams.stopService()


def test_a_server_removed_by_a_reload_is_drained():
    clock = Clock()
    upstreams, pool = _started(_settings(drain_time=2.0), clock)
    closes = []
    _connect(pool, clock, closes, 30)
    upstreams.apply({"app": _settings("ws://h:1/x, ws://h:2/x", drain_time=2.0)})
    clock.pump([0.25] * 12)
    assert len(closes) == 10
    upstreams.stopService()


def test_rebalance_moves_the_excess_to_a_new_server_at_the_rate_and_stops_when_even():
    clock = Clock()
    settings = _settings("ws://h:1/x, ws://h:2/x", rebalance=True, rebalance_rate=50.0)
    upstreams, pool = _started(settings, clock)
    closes = []
    leases = _connect(pool, clock, closes, 600)
    upstreams.apply({"app": _settings(rebalance=True, rebalance_rate=50.0)})
    pool = upstreams.pool("app")

    def reconnect():  # what clients do on 1012: the pool places them again
        for lease in [lease for lease in leases if lease.moving and lease in
                      lease.server.leases]:
            lease.release()
            leases.extend(_connect(pool, clock, [], 1))

    for _ in range(20):  # 2 s
        clock.advance(0.1)
        reconnect()
    assert 95 <= len(closes) <= 105  # 50 per second
    for _ in range(100):
        clock.advance(0.1)
        reconnect()
    counts = [s.live for s in pool.servers]
    assert all(abs(count - 200) <= 10 for count in counts), counts  # within the tolerance
    moved = len(closes)
    assert moved <= 230  # about the 200 the new server needed; then it stopped
    clock.advance(5)
    assert len(closes) == moved
    upstreams.stopService()


def test_without_rebalance_nothing_moves():
    clock = Clock()
    upstreams, pool = _started(_settings("ws://h:1/x, ws://h:2/x"), clock)
    closes = []
    _connect(pool, clock, closes, 100)
    upstreams.apply({"app": _settings()})
    clock.advance(10)
    assert closes == []
    upstreams.stopService()


def test_hash_rebalance_moves_only_rooms_whose_server_changed_and_they_end_up_whole():
    clock = Clock()
    key = parse_hash_key("{room}")
    two = _settings("ws://h:1/x, ws://h:2/x", balance="hash", hash_key=key, rebalance=True,
                    rebalance_rate=1000.0)
    upstreams, pool = _started(two, clock)
    closes = []
    rooms = [str(i) for i in range(40)]
    leases = []
    for room in rooms:
        leases += _connect(pool, clock, closes, 3, room=room)
    upstreams.apply({"app": _settings(balance="hash", hash_key=key, rebalance=True,
                                      rebalance_rate=1000.0)})
    pool = upstreams.pool("app")
    clock.advance(1)
    moved = [lease for lease in leases if lease.moving]
    assert all(lease.hash_value and
               pool.choose(lease.hash_value, set(), 0).key == "h:3"
               for lease in moved)
    assert 5 <= len({lease.hash_value for lease in moved}) <= 25  # about a third of 40
    for lease in moved:  # they reconnect: whole rooms on the new server
        lease.release()
        leases += _connect(pool, clock, [], 1, room=lease.hash_value)
    for room in rooms:
        assert len({lease.server.key for lease in leases
                    if lease.hash_value == room and lease.server.leases and
                    lease in lease.server.leases}) == 1
    upstreams.stopService()


class _Addresses:
    def __init__(self, answers):
        self.answers = answers

    def lookup(self, name):
        from twisted.internet import defer

        return defer.succeed(tuple(self.answers[name]))


def test_resolve_makes_each_address_a_server_and_drains_the_ones_that_disappear():
    clock = Clock()
    addresses = _Addresses({"app.internal": ["127.0.0.2", "127.0.0.3"]})
    upstreams = Upstreams(clock, addresses=addresses)
    settings = _settings("wss://app.internal:9000/x", resolve=5.0, drain_time=1.0)
    upstreams.apply({"app": settings})
    pool = upstreams.pool("app")
    assert [s.key for s in pool.servers] == ["app.internal:9000"]  # before the answer
    upstreams.startService()
    pool = upstreams.pool("app")
    assert [s.key for s in pool.servers] == ["127.0.0.2:9000", "127.0.0.3:9000"]
    url = pool.servers[0].spec.url
    assert (url.host, url.name, url.host_header) == ("127.0.0.2", "app.internal",
                                                    "app.internal:9000")
    assert pool.servers[0].spec.entry_key == "app.internal:9000"  # its TLS options
    closes = []
    _connect(pool, clock, closes, 10)
    addresses.answers["app.internal"] = ["127.0.0.3", "127.0.0.4"]
    clock.advance(5)
    pool = upstreams.pool("app")
    assert [s.key for s in pool.servers] == ["127.0.0.3:9000", "127.0.0.4:9000"]
    assert pool.server("127.0.0.4:9000").joined_at == clock.seconds()
    clock.pump([0.2] * 10)
    assert len(closes) == 5  # the connections of 127.0.0.2 were moved
    upstreams.stopService()
