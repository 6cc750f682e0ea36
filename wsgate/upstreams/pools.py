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

    __slots__ = ("server", "connection")

    def __init__(self, server: Server, connection: Any = None):
        self.server = server
        self.connection = connection
        server.leases.add(self)

    def release(self) -> None:
        self.server.leases.discard(self)


class Server:
    """One server of one pool: its config entry and what the gateway knows of it."""

    def __init__(self, pool: str, spec: Any, joined_at: float):
        self.pool = pool
        self.spec = spec
        self.key = spec.key
        self.leases: set[Lease] = set()
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
        if self.spec.drain:
            return "drain"
        if not self.checked_up:
            return "down"
        if now < self.out_until:
            return "failed"
        return "up"

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
                "last_check": self.last_check}


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

    def choose(self, request: Any, tried: set[str], now: float) -> Server | None:
        """The server for the next try of *request*, not one in *tried* (keys), or None.

        Backups are chosen only when no other server is up and untried.
        """
        settings = self.settings
        if settings.balance == "hash":
            value = hash_value(settings.hash_key, request)
            if value is not None:
                return self._by_hash(value, tried, now)
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

    def lease(self, server: Server, connection: Any = None) -> Lease:
        return Lease(server, connection)


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


class Upstreams(service.Service):
    """Every pool of the config in force, with the state that outlives a reload.

    A service so that active health checks run while the gateway runs: they
    start with it and stop with it. :meth:`apply` takes a new config's pools
    (SIGHUP); live connections are not touched.
    """

    def __init__(self, clock: Any, checker_factory: Any = None):
        self.clock = clock
        self.pools: dict[str, Pool] = {}
        self._servers: dict[tuple[str, str], Server] = {}
        self._counters: dict[str, PoolCounters] = {}
        self._checker_factory = checker_factory  # (upstreams, pool settings, server, tls)
        self._checkers: dict[tuple[str, str], Any] = {}
        self._tls: dict[str, Any] = {}
        self._started_once = False

    # -- configuration

    def apply(self, pools: dict[str, Any], tls: dict[str, Any] | None = None) -> None:
        """Use *pools* (name → PoolSettings) from now on. *tls* maps a pool name to the
        client TLS options of its wss:// servers' health checks (by server key)."""
        now = self.clock.seconds()
        initial = not self._started_once and not self.pools
        new: dict[str, Pool] = {}
        kept: set[tuple[str, str]] = set()
        for name, settings in pools.items():
            servers = []
            for spec in settings.servers:
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
        self._tls = dict(tls or {})
        if self.running:
            self._sync_checkers()

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
            server.checked_up, server.streak = True, 0
            server.joined_at = now
            self._event("up", server, f"{settings.rise} health checks passed ({detail})")
        elif not ok and server.streak >= settings.fall:
            server.checked_up, server.streak = False, 0
            self._event("down", server, f"{settings.fall} health checks failed ({detail})")

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

    def stopService(self) -> None:
        super().stopService()
        for checker in self._checkers.values():
            checker.stop()
        self._checkers = {}

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
                checker = self._checker_factory(self, settings, server,
                                                self._tls.get(key[0], {}).get(key[1]))
                self._checkers[key] = checker
                checker.start()
        for key, server in self._servers.items():  # no checks: nothing holds it down
            if key not in wanted and not server.checked_up:
                server.checked_up, server.streak = True, 0
