"""Prometheus metrics, counted in plain integers and exported on scrape.

The message path only bumps integers on the connection it already holds
(``Connection.messages_in`` and friends); per-route totals are the closed
connections' sums plus the live connections' counters, added up when
``/metrics`` is scraped. Rare events (handshakes, rejections, closes, errors)
go straight into dicts here. prometheus_client only sees custom collectors
(and its own process collector: RSS, open fds, CPU, read from /proc on scrape).
"""

import bisect
import functools
import platform
from collections import defaultdict

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

# Upper bounds (seconds) of the latency histograms: handshakes and upstream connects.
HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0)


class Histogram:
    """Bucket counts and a sum per label tuple; observing is one bisect and two adds."""

    def __init__(self, bounds=HANDSHAKE_BUCKETS):
        self.bounds = tuple(bounds)
        self.counts = defaultdict(lambda: [0] * (len(self.bounds) + 1))
        self.sums = defaultdict(float)

    def observe(self, labels, seconds):
        """Count one observation of *seconds* for the label tuple *labels*."""
        self.counts[labels][bisect.bisect_left(self.bounds, seconds)] += 1
        self.sums[labels] += seconds

    def family(self, name, documentation, label_names):
        """The cumulative ``HistogramMetricFamily`` of everything observed so far."""
        family = HistogramMetricFamily(name, documentation, labels=label_names)
        for labels, counts in sorted(self.counts.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(self.bounds + (float("inf"),), counts):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            family.add_metric(list(labels), buckets, self.sums[labels])
        return family


class Stats:
    """The gateway's counters; see the module docstring."""

    def __init__(self):
        self.connections_total = defaultdict(int)  # route
        self.rejected = defaultdict(int)  # (route, status, reason)
        self.closed_messages = defaultdict(int)  # (route, direction)
        self.closed_bytes = defaultdict(int)  # (route, direction)
        self.closes = defaultdict(int)  # (route, close code or "none", closed_by)
        self.handshake_seconds = Histogram()  # (route,)
        self.upstream_connect_seconds = Histogram()  # (route, "ok" | "error")
        self.publishes = 0  # admin publishes the broker took
        self.publish_refusals = defaultdict(int)  # reason
        self.upstream_errors = defaultdict(int)  # (route, kind)
        self.dropped = defaultdict(int)  # (route, reason)
        self.shadow_denials = defaultdict(int)  # (route, policy)
        self.reloads = defaultdict(int)  # result
        self.config_generation = 1

    # -- recorded by the gateway

    def accepted(self, route, seconds):
        self.connections_total[route] += 1
        self.handshake_seconds.observe((route,), seconds)

    def rejected_handshake(self, route, status, reason):
        self.rejected[(route or "", str(status), reason)] += 1
        if reason in ("upstream_unreachable", "upstream_rejected"):
            kind = "unreachable" if reason == "upstream_unreachable" else "rejected"
            self.upstream_errors[(route or "", kind)] += 1

    def closed(self, connection, close_code, closed_by):
        """Fold a closed connection's counters into the totals; count its close.

        *close_code* is the first close frame's code on the client's
        connection (None: no close frame, labelled ``none``).
        """
        route = connection.route
        self.closed_messages[(route, "in")] += connection.messages_in
        self.closed_messages[(route, "out")] += connection.messages_out
        self.closed_bytes[(route, "in")] += connection.bytes_in
        self.closed_bytes[(route, "out")] += connection.bytes_out
        code = "none" if close_code is None else str(close_code)
        self.closes[(route, code, closed_by)] += 1

    def upstream_connected(self, route, ok, seconds):
        """An upstream accepted (*ok*) or failed its handshake after *seconds*."""
        self.upstream_connect_seconds.observe((route, "ok" if ok else "error"), seconds)

    def published(self):
        self.publishes += 1

    def publish_refused(self, reason):
        """An admin publish was refused: ``broker_down``, ``too_large``, ``not_utf8``,
        ``no_channel`` or ``unauthorized``."""
        self.publish_refusals[reason] += 1

    def upstream_error(self, route, kind):
        """A proxied handshake failed at the upstream: ``unreachable`` (refused, timed
        out: 503) or ``rejected`` (an HTTP error, a bad 101, TLS: 502)."""
        self.upstream_errors[(route, kind)] += 1

    def shadow_denied(self, route, policy):
        self.shadow_denials[(route, policy)] += 1

    def drop(self, route, reason):
        self.dropped[(route, reason)] += 1


class GatewayCollector:
    """A prometheus_client collector reading :class:`Stats` and the live connections."""

    def __init__(self, gateway):
        self.gateway = gateway

    def collect(self):
        gateway, stats = self.gateway, self.gateway.stats
        live = list(gateway.connections.values())
        active = defaultdict(int)
        messages = defaultdict(int, stats.closed_messages)
        size = defaultdict(int, stats.closed_bytes)
        for connection in live:
            route = connection.route
            active[route] += 1
            messages[(route, "in")] += connection.messages_in
            messages[(route, "out")] += connection.messages_out
            size[(route, "in")] += connection.bytes_in
            size[(route, "out")] += connection.bytes_out
        routes = [route.name for route in gateway.config.routes]

        g = GaugeMetricFamily("wsgate_connections_active", "Open WebSockets", labels=["route"])
        for route in sorted(set(routes) | set(active)):
            g.add_metric([route], active.get(route, 0))
        yield g
        yield _counter("wsgate_connections_total", "WebSockets accepted", ["route"],
                       {(r,): n for r, n in stats.connections_total.items()})
        yield _counter("wsgate_handshakes_rejected_total", "Upgrade requests refused",
                       ["route", "status", "reason"], stats.rejected)
        yield _counter("wsgate_messages_total", "WebSocket messages", ["route", "direction"],
                       messages)
        yield _counter("wsgate_bytes_total", "WebSocket payload bytes", ["route", "direction"],
                       size)
        yield _counter("wsgate_connections_closed_total",
                       "WebSockets closed, by the first close frame's code (none: no close "
                       "frame) and the side that sent it", ["route", "code", "closed_by"],
                       stats.closes)
        yield stats.handshake_seconds.family(
            "wsgate_handshake_seconds", "Time from connection to 101", ["route"])
        yield stats.upstream_connect_seconds.family(
            "wsgate_upstream_connect_seconds",
            "Time for the upstream to accept (ok) or fail (error) the proxied handshake",
            ["route", "result"])
        yield _counter("wsgate_upstream_errors_total", "Upstream failures", ["route", "kind"],
                       stats.upstream_errors)
        yield from _pool_families(gateway.upstreams)
        broadcast = {route.name for route in gateway.config.routes
                     if route.target.type == "broadcast"}
        yield _counter("wsgate_broadcast_deliveries_total", "Broadcast messages delivered",
                       ["route"], {(r,): n for (r, d), n in messages.items()
                                   if d == "out" and r in broadcast})
        yield _counter("wsgate_broadcast_dropped_total", "Broadcast messages not delivered",
                       ["route", "reason"], stats.dropped)
        yield _counter("wsgate_policy_shadow_denials_total",
                       "Requests or messages a shadow-mode policy would have denied",
                       ["route", "policy"], stats.shadow_denials)
        yield _counter("wsgate_config_reloads_total", "Config reloads (SIGHUP)", ["result"],
                       {(r,): n for r, n in stats.reloads.items()})
        g = GaugeMetricFamily("wsgate_config_generation", "Config generation in force")
        g.add_metric([], stats.config_generation)
        yield g
        g = GaugeMetricFamily("wsgate_broker_up", "1 when the broker is reachable")
        g.add_metric([], 0 if gateway.broker.state == "down" else 1)
        yield g
        yield _counter("wsgate_publishes_total", "Admin publishes the broker took", [],
                       {(): stats.publishes})
        yield _counter("wsgate_publish_refused_total", "Admin publishes refused", ["reason"],
                       {(r,): n for r, n in stats.publish_refusals.items()})
        g = GaugeMetricFamily("wsgate_build_info", "Always 1; the labels say what runs",
                              labels=list(build_info()))
        g.add_metric(list(build_info().values()), 1)
        yield g


def _pool_families(upstreams):
    """The ``[upstream:NAME]`` pools' servers: live connections, health, failed tries,
    and each pool's try durations."""
    now = upstreams.clock.seconds()
    servers = upstreams.all_servers()
    connections = GaugeMetricFamily(
        "wsgate_upstream_connections", "Live proxied connections (and handshakes under way) "
        "on each pool server", labels=["pool", "server"])
    up = GaugeMetricFamily(
        "wsgate_upstream_up", "1 when neither the health checks nor passive health hold the "
        "server out and the config does not disable it", labels=["pool", "server"])
    draining = GaugeMetricFamily(
        "wsgate_upstream_draining", "1 while a drain closes the server's connections",
        labels=["pool", "server"])
    failures, moved = {}, {}
    for server in servers:
        labels = [server.pool, server.key]
        connections.add_metric(labels, server.live)
        up.add_metric(labels, 1 if server.healthy(now) else 0)
        draining.add_metric(labels, 1 if server.drain is not None and not server.drain.done
                            else 0)
        for reason, count in server.failures.items():
            failures[(server.pool, server.key, reason)] = count
        for reason, count in server.moved.items():
            moved[(server.pool, server.key, reason)] = count
    yield connections
    yield up
    yield draining
    yield _counter("wsgate_upstream_moved_total", "Connections closed with 1012 to move them "
                   "off a server: drain or rebalance", ["pool", "server", "reason"], moved)
    yield _counter("wsgate_upstream_failures_total", "Failed tries and health checks on pool "
                   "servers, by reason", ["pool", "server", "reason"], failures)
    seconds = Histogram()
    for pool, counters in upstreams.counters().items():
        for (result,), counts in counters.connect_seconds.counts.items():
            seconds.counts[(pool, result)] = counts
            seconds.sums[(pool, result)] = counters.connect_seconds.sums[(result,)]
    yield seconds.family("wsgate_upstream_pool_connect_seconds",
                         "Time of each try on a pool server, to its 101 (ok) or failure "
                         "(error)", ["pool", "result"])


def _counter(name, documentation, labels, values):
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


@functools.cache
def build_info():
    """``{version, python, twisted, autobahn}`` of this process (read once)."""
    import autobahn
    import twisted

    return {"version": _version(), "python": platform.python_version(),
            "twisted": twisted.__version__, "autobahn": autobahn.__version__}


def _version():
    """wsgate's version: the installed distribution's (setup.cfg), else the package's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("wsgate")
    except PackageNotFoundError:
        import wsgate

        return getattr(wsgate, "__version__", "unknown")


def registry(gateway):
    """The registry ``/metrics`` serves for *gateway*: its counters and the process's."""
    result = CollectorRegistry(auto_describe=False)
    result.register(GatewayCollector(gateway))
    ProcessCollector(registry=result)
    return result
