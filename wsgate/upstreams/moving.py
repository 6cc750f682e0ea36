"""Moving live connections on purpose: draining a server, rebalancing a pool.

A moved connection is closed toward its client with 1012 ``service
restart`` (its upstream leg gets 1001 ``going away``): the client
reconnects and the pool places it anew. Nothing here chooses servers; it
only decides *which* connections to close and *when*:

* :class:`Drain` closes the relayed connections of one server evenly over
  ``drain_time``, in batches (an event per batch), so that the clients'
  reconnects are spread instead of arriving at once;
* :func:`to_shed` picks what a pool with ``rebalance = yes`` should move
  next: from the most loaded server while a server holds more, or less, than
  its weighted share by more than the tolerance (5 %, at least 2
  connections; least_conn, round_robin), or the
  connections whose key now maps to another server (hash). The pool's
  :class:`Rebalancer` spends a token bucket of ``rebalance_rate`` per second
  on them.

Both run on the injected clock.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.logger import Logger

from wsgate import observe
from wsgate.upstreams import balance

_log = Logger()

RESTART_CODE, RESTART_REASON = 1012, "service restart"
UPSTREAM_CODE, UPSTREAM_REASON = 1001, "going away"
TOLERANCE_SHARE = 0.05  # a server may hold its share ± 5 % ...
TOLERANCE_MIN = 2  # ... or ± 2 connections, whichever is more, before rebalancing moves one
TICK = 0.1  # seconds between the rebalancer's looks


def _relaying(lease: Any) -> bool:
    """Whether *lease*'s connection is past its handshake (it has a relay to close)."""
    return lease.connection is not None and lease.connection.protocol is not None


def _movable(lease: Any) -> bool:
    return not lease.moving and _relaying(lease)


def movable(server: Any) -> list[Any]:
    """The leases of *server* whose connection is relaying and not being moved already,
    the youngest first (they lose the least)."""
    leases = [lease for lease in server.leases if _movable(lease)]
    leases.sort(key=lambda lease: lease.connection.since, reverse=True)
    return leases


def _youngest(server: Any) -> Any:
    """``movable(server)[0]`` without sorting them all (one pass)."""
    return max((lease for lease in server.leases if _movable(lease)),
               key=lambda lease: lease.connection.since, default=None)


def move(lease: Any, reason: str) -> None:
    """Close *lease*'s connection with 1012 (its upstream 1001); count it by *reason*."""
    lease.moving = True
    lease.server.moving += 1
    lease.server.moved[reason] += 1
    protocol = lease.connection.protocol
    protocol.close_with(RESTART_CODE, RESTART_REASON, UPSTREAM_CODE, UPSTREAM_REASON)


class Drain:
    """Close every relayed connection of *server* with 1012, evenly over *seconds*.

    Each step closes ``ceil(left × step ÷ time left)``; connections that
    reach the server meanwhile (handshakes already under way) are closed too.
    It ends when the server carries nothing, or, at the deadline, after
    closing what is left. :meth:`cancel` stops it (``DELETE``): what is left
    stays.
    """

    def __init__(self, clock: Any, server: Any, seconds: float, why: str):
        self.clock = clock
        self.server = server
        self.seconds = seconds
        self.why = why
        self.started = clock.seconds()
        self.deadline = self.started + seconds
        self.step = min(1.0, max(0.05, seconds / 10))
        self.closed = 0
        self.batches = 0
        self._timer: Any = None
        self.done = False

    def start(self) -> None:
        server = self.server
        observe.emit("wsgate.upstream.drain.started",
                     "draining upstream {server} of pool {pool} over {drain_time}s "
                     "({connections} connections): {why}", pool=server.pool,
                     server=server.key, connections=len(movable(server)),
                     drain_time=self.seconds, why=self.why)
        self._tick()

    def _tick(self) -> None:
        self._timer = None
        server = self.server
        now = self.clock.seconds()
        left = movable(server)
        remaining = self.deadline - now
        if left:
            count = len(left) if remaining <= self.step / 2 else \
                min(len(left), math.ceil(len(left) * self.step / remaining))
            for lease in left[:count]:
                move(lease, "drain")
            self.closed += count
            self.batches += 1
            observe.emit("wsgate.upstream.drain.batch",
                         "drain of upstream {server} ({pool}): closed {closed}, {left} left",
                         pool=server.pool, server=server.key, closed=count,
                         left=len(left) - count, total_closed=self.closed)
        if not server.leases or (remaining <= self.step / 2 and not movable(server)
                                 and not _handshaking(server)):
            self._finish("finished")
            return
        self._timer = self.clock.callLater(self.step if remaining > 0 else TICK, self._tick)

    def _finish(self, how: str) -> None:
        self.done = True
        server = self.server
        observe.emit("wsgate.upstream.drain." + how,
                     "drain of upstream {server} ({pool}) " + how + ": {closed} closed in "
                     "{seconds}s", pool=server.pool, server=server.key, closed=self.closed,
                     seconds=round(self.clock.seconds() - self.started, 3),
                     left=len(server.leases))

    def cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if not self.done:
            self._finish("cancelled")


def _handshaking(server: Any) -> bool:
    return not all(_relaying(lease) for lease in server.leases)


def _tolerance(share: float) -> float:
    return max(TOLERANCE_MIN, TOLERANCE_SHARE * share)


def to_shed(pool: Any, now: float) -> Any:
    """The next lease *pool* should move to even out, or None when it is even enough."""
    servers = [s for s in pool.servers if not s.spec.backup and s.state(now) == "up"]
    if len(servers) < 2:
        return None
    if pool.settings.balance == "hash":
        return _misplaced(pool, servers)
    weights = {s.key: s.weight * s.ramp(now, pool.settings.slow_start) for s in servers}
    total_weight = sum(weights.values())
    if total_weight <= 0:
        return None
    # every connection the pool placed counts, handshakes under way included (least_conn
    # places by them): counting only the relaying ones would see a server whose 101s are
    # still coming as short, and shed the others' youngest connections for nothing
    counts = {s.key: len(s.leases) - s.moving for s in servers}
    total = sum(counts.values())
    worst, worst_excess, short = None, 0.0, False
    for server in servers:
        share = total * weights[server.key] / total_weight
        excess = counts[server.key] - share
        if excess > worst_excess:
            worst, worst_excess = server, excess
        if -excess > _tolerance(share):
            short = True  # a server (a new one) lacks more than the tolerance
    if worst is None or worst_excess < 1:
        return None
    share = total * weights[worst.key] / total_weight
    if worst_excess > _tolerance(share) or short:
        return _youngest(worst)  # None: all of them still handshaking
    return None


def _misplaced(pool: Any, servers: list[Any]) -> Any:
    """A relayed connection whose key's server (among the up ones) is another server.

    New connections are placed by the same hash, so once no connection is
    misplaced none becomes so until the up servers change: the pool's
    ``counters.settled`` remembers the set that was found in order, and the
    connections are not looked at again until it changes.
    """
    members = tuple(sorted((s.key, s.weight) for s in servers))
    if pool.counters.settled == members:
        return None
    owners: dict[str, str] = {}
    for server in servers:
        for lease in server.leases:
            value = lease.hash_value
            if value is None or not _movable(lease):
                continue
            owner = owners.get(value)
            if owner is None:
                owner = owners[value] = balance.rendezvous_order(
                    value, servers, lambda s: s.key, lambda s: s.weight)[0].key
            if owner != server.key:
                return lease
    if not any(_handshaking(server) for server in servers):
        pool.counters.settled = members
    return None


class Rebalancer:
    """Moves connections of one pool (``rebalance = yes``) at ``rebalance_rate`` per
    second while :func:`to_shed` finds one; a token bucket holds at most one
    second's worth, so a quiet pool does not save up a burst."""

    def __init__(self, clock: Any, upstreams: Any, name: str):
        self.clock = clock
        self.upstreams = upstreams
        self.name = name
        self.tokens = 0.0
        self.last = clock.seconds()
        self.moved = 0
        self._timer: Any = None

    def start(self) -> None:
        self.last = self.clock.seconds()
        self._timer = self.clock.callLater(TICK, self._tick)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _tick(self) -> None:
        self._timer = None
        pool = self.upstreams.pools.get(self.name)
        if pool is None or not pool.settings.rebalance:
            return
        rate = pool.settings.rebalance_rate
        now = self.clock.seconds()
        self.tokens = min(max(1.0, rate), self.tokens + rate * (now - self.last))
        self.last = now
        while self.tokens >= 1 - 1e-9:  # (sums of 0.1 s steps are not exact)
            lease = to_shed(pool, now)
            if lease is None:
                self.tokens = min(self.tokens, 1.0)
                break
            move(lease, "rebalance")
            self.moved += 1
            self.tokens -= 1
        self._timer = self.clock.callLater(TICK, self._tick)
