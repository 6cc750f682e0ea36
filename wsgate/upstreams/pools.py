"""The live state of every pool's servers, kept across reloads.

A :class:`Server` counts its live connections as the set of
:class:`Lease` objects the handshakes and relays hold: a lease is taken
when a handshake chooses the server and released when that try fails, when
the client leaves before the hand-over, or when the relay ends. The counts
therefore come from the live connections themselves: a reload that adds,
removes or re-weights servers finds each server's state by ``(pool,
host:port)`` and keeps it, and a removed server keeps its state (shown as
``removed``) while it still carries connections.

Health has two sources. Passive: ``max_fails`` failed tries within
``fail_timeout`` take a server out for ``fail_timeout`` (nginx's
semantics); then one try decides (a success brings it back, a failure takes
it out again). Active: the health checks (:mod:`wsgate.upstreams.health`)
report each result; ``fall`` failures in a row take it down, ``rise``
successes in a row bring it back (HAProxy's). A server that comes back, or
joins by a reload, gets its share ramped over ``slow_start``.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

from twisted.application import service
from twisted.logger import Logger, LogLevel

from wsgate import observe
from wsgate.metrics import Histogram
from wsgate.upstreams import balance

_log = Logger()

# How many connect-time observations a pool's histogram keeps labels for is bounded
# by the pool names (config) and two results: no attacker-driven label.


class Lease:
    """One connection's (or one try's) claim on a server; :meth:`release` is idempotent."""

    __slots__ = ("server", "connection", "hash_value", "moving")

    def __init__(self, server: Server, connection: Any = None, hash_value: str | None = None):
        self.server = server
        self.connection = connection  # wsgate.gateway.Connection; .protocol once relaying
        self.hash_value = hash_value  # what a hash pool placed it by (rebalancing reads it)
        self.moving = False  # closed by a drain or a rebalance: no longer counted as movable
        server.leases.add(self)

    def release(self) -> None:
        server = self.server
        if self in server.leases:
            server.leases.discard(self)
            if self.moving:
                server.moving -= 1


class Server:
    """One server of one pool: its config entry and what the gateway knows of it."""

    def __init__(self, pool: str, spec: Any, joined_at: float):
        self.pool = pool
        self.spec = spec
        self.key = spec.key
        self.leases: set[Lease] = set()
        self.moving = 0  # leases closed by a drain or rebalance, not yet released
        self.joined_at = joined_at  # slow start counts from here
        self.removed = False  # no longer in the config; kept while it carries connections
        # passive health
        self.recent_failures: collections.deque[float] = collections.deque()
        self.out_until = 0.0
        self.probation = False  # back from a passive time-out: the next try decides
        # active health
        self.checked_up = True
        self.streak = 0  # consecutive check results that disagree with checked_up
        self.last_check: dict[str, Any] | None = None
        self.failures: collections.Counter[str] = collections.Counter()  # by reason
        self.admin_drain = False  # POST /drain/upstream/...: kept across reloads
        self.moved: collections.Counter[str] = collections.Counter()  # drain, rebalance
        self.drain: Any = None  # the running wsgate.upstreams.moving.Drain

    @property
    def live(self) -> int:
        return len(self.leases)

    @property
    def weight(self) -> int:
        return self.spec.weight

    def state(self, now: float) -> str:
        """``disabled`` (``down`` in the config), ``removed``, ``drain``, ``down`` (the
        health checks say so), ``failed`` (passive: out until fail_timeout passes) or
        ``up``. Only ``up`` servers take new connections."""
        if self.spec.down:
            return "disabled"
        if self.removed:
            return "removed"
        if self.draining_wanted:
            return "drain"
        if not self.checked_up:
            return "down"
        if now < self.out_until:
            return "failed"
        return "up"

    @property
    def draining_wanted(self) -> bool:
        """Whether its connections should be moved off: ``drain`` in the config, an admin
        drain, or no longer in the config (or in DNS)."""
        return self.spec.drain or self.admin_drain or self.removed

    def healthy(self, now: float) -> bool:
        """What ``wsgate_upstream_up`` says: neither health source holds it out and the
        config does not disable it (a draining server is healthy)."""
        return not self.spec.down and self.checked_up and now >= self.out_until

    def ramp(self, now: float, slow_start: float) -> float:
        """Its slow-start factor: 0 → 1 over *slow_start* seconds since it joined."""
        if slow_start <= 0:
            return 1.0
        return min(1.0, max(0.0, (now - self.joined_at) / slow_start))

    def describe(self, now: float) -> dict[str, Any]:
        return {"server": self.key, "url": self.spec.url.url, "state": self.state(now),
                "weight": self.weight, "backup": self.spec.backup,
                "connections": self.live, "failures": dict(self.failures),
                "last_check": self.last_check,
                "draining": self.drain is not None and not self.drain.done,
                "moved": dict(self.moved)}


def hash_value(hash_key: Any, request: Any) -> str | None:
    """The value *request* (a :class:`wsgate.targets.Accepted`) hashes on, or None when
    it has none (then the pool balances it by least connections)."""
    kind, name = hash_key.kind, hash_key.name
    if kind == "ip":
        return request.origin.ip
    if kind == "identity":
        return request.connection.identity
    if kind == "placeholder":
        return request.match.params.get(name)
    if kind == "header":
        return request.head.get(name)
    for part in (request.head.get("cookie") or "").split(";"):  # cookie
        cookie, sep, value = part.strip().partition("=")
        if sep and cookie == name:
            return value
    return None


def request_hash_value(settings: Any, request: Any) -> str | None:
    """What *request* hashes on in a ``hash`` pool (None in other pools, or without a key)."""
    if settings.balance != "hash":
        return None
    return hash_value(settings.hash_key, request)


class Pool:
    """One ``[upstream:NAME]`` as configured now, over :class:`Server` states."""

    def __init__(self, settings: Any, servers: list[Server], counters: PoolCounters):
        self.settings = settings
        self.name = settings.name
        self.servers = servers
        self.counters = counters  # round-robin state and the connect histogram

    def server(self, key: str) -> Server | None:
        for server in self.servers:
            if server.key == key:
                return server
        return None

    def choose(self, hashed: str | None, tried: set[str], now: float) -> Server | None:
        """The server for the next try of a request, not one in *tried* (keys), or None.

        *hashed* is the request's :func:`request_hash_value`: a request with one
        goes by the hash order, one without (in any pool) by the balance.
        Backups are chosen only when no other server is up and untried.
        """
        if hashed is not None:
            return self._by_hash(hashed, tried, now)
        for backup in (False, True):
            candidates = [s for s in self.servers if s.spec.backup is backup
                          and s.key not in tried and s.state(now) == "up"]
            if candidates:
                return self._balance(candidates, now)
        return None

    def _by_hash(self, value: str, tried: set[str], now: float) -> Server | None:
        for backup in (False, True):
            group = [s for s in self.servers if s.spec.backup is backup and not s.spec.down]
            for server in balance.rendezvous_order(value, group, _key, _weight):
                if server.key not in tried and server.state(now) == "up":
                    return server
        return None

    def _balance(self, candidates: list[Server], now: float) -> Server:
        settings, counters = self.settings, self.counters
        slow_start = settings.slow_start
        if settings.balance == "round_robin":
            return balance.smooth_weighted(
                candidates, _key, lambda s: s.weight * max(s.ramp(now, slow_start), 0.01),
                counters.current)
        counters.turn += 1
        if slow_start > 0:
            candidates = _within_ramp(candidates, now, slow_start)
        return balance.least_conn(candidates, _live, _weight, counters.turn)

    def lease(self, server: Server, connection: Any = None,
              hash_value: str | None = None) -> Lease:
        return Lease(server, connection, hash_value)


def _key(server: Server) -> str:
    return server.key


def _weight(server: Server) -> float:
    return server.weight


def _live(server: Server) -> int:
    return server.live


def _within_ramp(candidates: list[Server], now: float, slow_start: float) -> list[Server]:
    """Leave out servers in slow start that already hold their ramped share: a server
    whose factor is r may hold r × its weighted share of the candidates' connections
    (the one being placed included). Its connections grow in step with the ramp
    instead of taking every new connection until it catches up."""
    total = sum(s.live for s in candidates) + 1
    weights = sum(s.weight for s in candidates)
    kept = [s for s in candidates
            if s.ramp(now, slow_start) >= 1.0
            or s.live < s.ramp(now, slow_start) * total * s.weight / weights]
    return kept or candidates


class PoolCounters:
    """What a pool keeps across reloads besides its servers."""

    def __init__(self) -> None:
        self.turn = 0  # least_conn's tie breaker
        self.current: dict[str, float] = {}  # smooth round robin, by server key
        self.connect_seconds = Histogram()  # (result,): one observation per try
        self.settled: tuple[tuple[str, int], ...] | None = None  # hash rebalancing's


class Upstreams(service.Service):
    """Every pool of the config in force, with the state that outlives a reload.

    A service so that active health checks run while the gateway runs: they
    start with it and stop with it. :meth:`apply` takes a new config's pools
    (SIGHUP); live connections are not touched.
    """

    def __init__(self, clock: Any, checker_factory: Any = None, addresses: Any = None):
        self.clock = clock
        self.pools: dict[str, Pool] = {}
        self._settings: dict[str, Any] = {}
        self._servers: dict[tuple[str, str], Server] = {}
        self._counters: dict[str, PoolCounters] = {}
        self._checker_factory = checker_factory  # (upstreams, pool settings, server, tls)
        self._checkers: dict[tuple[str, str], Any] = {}
        self._tls: dict[str, Any] = {}
        self._started_once = False
        self._rebalancers: dict[str, Any] = {}
        self.addresses = addresses  # a wsgate.upstreams.dns.Addresses (resolve); or None
        self._resolved: dict[tuple[str, str], tuple[str, ...]] = {}  # (pool, entry) → addresses
        self._lookups: dict[str, Any] = {}  # pool → (interval, LoopingCall)

    # -- configuration

    def apply(self, pools: dict[str, Any], tls: dict[str, Any] | None = None) -> None:
        """Use *pools* (name → PoolSettings) from now on. *tls* maps a pool name to the
        client TLS options of its wss:// servers' health checks (by entry key).

        Servers keep their state by ``(pool, host:port)``; a server no longer
        listed is ``removed`` and drained (over its pool's ``drain_time``).
        """
        self._settings = dict(pools)
        self._tls = dict(tls or {})
        for key in [key for key in self._resolved if key[0] not in pools]:
            del self._resolved[key]
        self._rebuild()

    def _rebuild(self) -> None:
        now = self.clock.seconds()
        initial = not self._started_once and not self.pools
        new: dict[str, Pool] = {}
        kept: set[tuple[str, str]] = set()
        for name, settings in self._settings.items():
            servers = []
            for spec in self._specs(settings):
                if (name, spec.key) in kept:
                    continue  # two entries resolved to one address
                state = self._servers.get((name, spec.key))
                if state is None:
                    state = Server(name, spec, joined_at=-1e18 if initial else now)
                    self._servers[(name, spec.key)] = state
                elif state.removed:
                    state.removed = False
                    state.joined_at = now  # it rejoins: ramp it up again
                state.spec = spec
                servers.append(state)
                kept.add((name, spec.key))
            counters = self._counters.setdefault(name, PoolCounters())
            new[name] = Pool(settings, servers, counters)
        for key, state in list(self._servers.items()):
            if key not in kept:
                state.removed = True
                if not state.leases:
                    del self._servers[key]
        self.pools = new
        if self.running:
            self._sync_checkers()
            self._sync_moves()
            self._sync_lookups()

    def _specs(self, settings: Any) -> list[Any]:
        """The servers of *settings*, each host name replaced by the addresses ``resolve``
        found for it (until its first answer, the name itself is the server)."""
        if not settings.resolve:
            return list(settings.servers)
        specs = []
        for spec in settings.servers:
            found = self._resolved.get((settings.name, spec.key)) if spec.resolvable else None
            if found is None:
                specs.append(spec)
                continue
            for address in found:
                url = dataclasses.replace(spec.url, host=address, name=spec.url.host)
                specs.append(dataclasses.replace(spec, url=url, entry=spec.key))
        return specs

    def retired(self) -> list[Server]:
        """Servers no longer configured that still carry connections."""
        for key, state in list(self._servers.items()):
            if state.removed and not state.leases:
                del self._servers[key]
        return [s for s in self._servers.values() if s.removed]

    def pool(self, name: str) -> Pool:
        return self.pools[name]

    # -- what handshakes report

    def failed(self, server: Server, reason: str) -> None:
        """A try on *server* failed with *reason* (refused, timeout, closed, tls, http_5xx,
        http_4xx, bad_handshake); ``http_4xx`` and ``bad_handshake`` do not count
        towards ``max_fails`` (the server answered)."""
        server.failures[reason] += 1
        if reason in ("http_4xx", "bad_handshake"):
            return
        pool = self.pools.get(server.pool)
        if pool is None or pool.settings.max_fails == 0 or server.removed:
            return
        settings = pool.settings
        now = self.clock.seconds()
        recent = server.recent_failures
        recent.append(now)
        while recent and recent[0] <= now - settings.fail_timeout:
            recent.popleft()
        if server.probation or len(recent) >= settings.max_fails:
            was_up = server.state(now) == "up"
            why = (f"a try failed after its time out ({reason})" if server.probation else
                   f"{len(recent)} failed tries within {settings.fail_timeout:g}s "
                   f"(last: {reason})")
            server.out_until = now + settings.fail_timeout
            server.probation = True
            recent.clear()
            if was_up:
                self._event("down", server, f"{why}; out for {settings.fail_timeout:g}s")

    def succeeded(self, server: Server) -> None:
        """A try on *server* got its 101."""
        server.recent_failures.clear()
        if server.probation:
            server.probation = False
            now = self.clock.seconds()
            if now >= server.out_until and server.checked_up:
                server.joined_at = now
                self._event("up", server, "a try succeeded after fail_timeout")

    def observe_try(self, pool: str, ok: bool, seconds: float) -> None:
        counters = self._counters.get(pool)
        if counters is not None:
            counters.connect_seconds.observe(("ok" if ok else "error",), seconds)

    def checked(self, server: Server, ok: bool, detail: str) -> None:
        """An active health check of *server* ended (*ok*), *detail* says how."""
        pool = self.pools.get(server.pool)
        if pool is None:
            return
        now = self.clock.seconds()
        server.last_check = {"at": now, "ok": ok, "detail": detail}
        if not ok:
            server.failures["health_check"] += 1
        if ok == server.checked_up:
            server.streak = 0
            return
        server.streak += 1
        settings = pool.settings
        if ok and server.streak >= settings.rise:
            # the checks win over passive health (as HAProxy's): back means back
            server.checked_up, server.streak = True, 0
            server.out_until, server.probation = 0.0, False
            server.recent_failures.clear()
            server.joined_at = now
            self._event("up", server, f"{settings.rise} health checks passed ({detail})")
        elif not ok and server.streak >= settings.fall:
            was_up = server.state(now) == "up"
            server.checked_up, server.streak = False, 0
            if was_up:  # passive health may have taken it out (and said so) already
                self._event("down", server, f"{settings.fall} health checks failed "
                            f"({detail})")

    def _event(self, what: str, server: Server, why: str) -> None:
        observe.emit(f"wsgate.upstream.{what}",
                     "upstream {server} of pool {pool} is " + what + ": {why}",
                     level=LogLevel.warn if what == "down" else LogLevel.info,
                     pool=server.pool, server=server.key, why=why,
                     connections=server.live)

    # -- the admin API and metrics

    def describe(self) -> list[dict[str, Any]]:
        now = self.clock.seconds()
        result = []
        for name, pool in sorted(self.pools.items()):
            servers = [s.describe(now) for s in pool.servers]
            servers += [s.describe(now) for s in self.retired() if s.pool == name]
            result.append({"pool": name, "balance": pool.settings.balance,
                           "servers": servers})
        return result

    def all_servers(self) -> list[Server]:
        servers = [s for pool in self.pools.values() for s in pool.servers]
        return servers + self.retired()

    def counters(self) -> dict[str, PoolCounters]:
        return {name: self._counters[name] for name in self.pools}

    # -- active health checks

    def startService(self) -> None:
        super().startService()
        self._started_once = True
        self._sync_checkers()
        self._sync_moves()
        self._sync_lookups()

    def stopService(self) -> None:
        super().stopService()
        for checker in self._checkers.values():
            checker.stop()
        self._checkers = {}
        for rebalancer in self._rebalancers.values():
            rebalancer.stop()
        self._rebalancers = {}
        for server in self._servers.values():
            if server.drain is not None:
                server.drain.cancel()
                server.drain = None
        for _, loop in self._lookups.values():
            loop.stop()
        self._lookups = {}

    # -- moving connections (drain, rebalance)

    def drain_time(self, server: Server) -> float:
        settings = self._settings.get(server.pool)
        return settings.drain_time if settings is not None else 30.0

    def _sync_moves(self) -> None:
        """A drain runs for each server whose connections should move (and has some); a
        rebalancer for each pool with ``rebalance = yes``."""
        from wsgate.upstreams.moving import Drain, Rebalancer

        for server in list(self._servers.values()):
            if server.draining_wanted:
                if server.drain is None and server.leases:
                    why = ("no longer in the config" if server.removed and not server.spec.entry
                           else "no longer in DNS" if server.removed
                           else "drain in the config" if server.spec.drain
                           else "admin request")
                    server.drain = Drain(self.clock, server, self.drain_time(server), why)
                    server.drain.start()
            elif server.drain is not None:
                server.drain.cancel()
                server.drain = None
        for name, pool in self.pools.items():
            if pool.settings.rebalance and name not in self._rebalancers:
                self._rebalancers[name] = Rebalancer(self.clock, self, name)
                self._rebalancers[name].start()
        for name in [name for name in self._rebalancers
                     if name not in self.pools or not self.pools[name].settings.rebalance]:
            self._rebalancers.pop(name).stop()

    def drain(self, pool: str, key: str, on: bool) -> Server | None:
        """``POST`` (*on*) or ``DELETE /drain/upstream/{pool}/{key}``: the server, or None
        when the pool has no such server. A drain that finished is started again."""
        found = self.pools.get(pool)
        server = found.server(key) if found is not None else None
        if server is None:
            return None
        server.admin_drain = on
        if on and server.drain is not None and server.drain.done:
            server.drain = None
        if self.running:
            self._sync_moves()
        return server

    # -- DNS (resolve)

    def _sync_lookups(self) -> None:
        """A lookup loop for each pool with ``resolve`` and a server given by name."""
        from twisted.internet.task import LoopingCall

        wanted = {name: settings.resolve for name, settings in self._settings.items()
                  if settings.resolve and any(s.resolvable for s in settings.servers)}
        for name in list(self._lookups):
            interval, loop = self._lookups[name]
            if wanted.get(name) != interval:
                loop.stop()
                del self._lookups[name]
        if self.addresses is None:
            return
        for name, interval in wanted.items():
            if name not in self._lookups:
                loop = LoopingCall(self._look_up, name)
                loop.clock = self.clock
                self._lookups[name] = (interval, loop)
                loop.start(interval, now=True)

    def _look_up(self, name: str) -> None:
        settings = self._settings.get(name)
        if settings is None:
            return
        for spec in settings.servers:
            if spec.resolvable:
                d = self.addresses.lookup(spec.url.host)
                d.addCallbacks(self._found, self._not_found, callbackArgs=(name, spec),
                               errbackArgs=(name, spec))

    def _found(self, addresses: tuple[str, ...], pool: str, spec: Any) -> None:
        key = (pool, spec.key)
        settings = self._settings.get(pool)
        if settings is None or spec not in settings.servers:
            return  # the config changed meanwhile
        before = self._resolved.get(key)
        if before == addresses:
            return
        self._resolved[key] = addresses
        added = sorted(set(addresses) - set(before or ()))
        gone = sorted(set(before or ()) - set(addresses))
        observe.emit("wsgate.upstream.resolved",
                     "upstream {host} of pool {pool} resolves to {addresses}",
                     pool=pool, host=spec.url.host, addresses=list(addresses), added=added,
                     removed=gone)
        self._rebuild()

    def _not_found(self, failure: Any, pool: str, spec: Any) -> None:
        _log.warn("wsgate: pool {pool}: looking up {name} failed, keeping its servers: "
                  "{why}", pool=pool, name=spec.url.host, why=failure.getErrorMessage())

    def _sync_checkers(self) -> None:
        """One running checker per server of a pool with ``health_check``; a checker
        whose pool settings or server changed is restarted."""
        if self._checker_factory is None:
            return
        wanted = {}
        for name, pool in self.pools.items():
            if not pool.settings.health_check:
                continue
            for server in pool.servers:
                if not server.spec.down:
                    wanted[(name, server.key)] = (pool.settings, server)
        for key, checker in list(self._checkers.items()):
            settings_server = wanted.get(key)
            if settings_server is None or checker.settings != settings_server[0] or \
                    checker.spec != settings_server[1].spec:
                checker.stop()
                del self._checkers[key]
        for key, (settings, server) in wanted.items():
            if key not in self._checkers:
                tls = self._tls.get(key[0], {}).get(server.spec.entry_key)
                checker = self._checker_factory(self, settings, server, tls)
                self._checkers[key] = checker
                checker.start()
        for key, server in self._servers.items():  # no checks: nothing holds it down
            if key not in wanted and not server.checked_up:
                server.checked_up, server.streak = True, 0
