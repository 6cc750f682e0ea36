"""Prometheus metrics, counted in plain integers and exported on scrape.

The message path only bumps integers on the connection it already holds
(``Connection.messages_in`` and friends); per-route totals are the closed
connections' sums plus the live connections' counters, added up when
``/metrics`` is scraped. Rare events (handshakes, rejections, errors) go
straight into dicts here. prometheus_client only sees a custom collector.
"""

import bisect
from collections import defaultdict

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0)


class Stats:
    """The gateway's counters; see the module docstring."""

    def __init__(self):
        self.connections_total = defaultdict(int)  # route
        self.rejected = defaultdict(int)  # (route, status, reason)
        self.closed_messages = defaultdict(int)  # (route, direction)
        self.closed_bytes = defaultdict(int)  # (route, direction)
        self.handshake_buckets = defaultdict(lambda: [0] * (len(HANDSHAKE_BUCKETS) + 1))
        self.handshake_sum = defaultdict(float)
        self.upstream_errors = defaultdict(int)  # (route, kind)
        self.dropped = defaultdict(int)  # (route, reason)
        self.shadow_denials = defaultdict(int)  # (route, policy)
        self.reloads = defaultdict(int)  # result
        self.config_generation = 1

    # -- recorded by the gateway

    def accepted(self, route, seconds):
        self.connections_total[route] += 1
        self.handshake_buckets[route][bisect.bisect_left(HANDSHAKE_BUCKETS, seconds)] += 1
        self.handshake_sum[route] += seconds

    def rejected_handshake(self, route, status, reason):
        self.rejected[(route or "", str(status), reason)] += 1
        if reason in ("upstream_unreachable", "upstream_rejected"):
            kind = "unreachable" if reason == "upstream_unreachable" else "rejected"
            self.upstream_errors[(route or "", kind)] += 1

    def closed(self, connection):
        route = connection.route
        self.closed_messages[(route, "in")] += connection.messages_in
        self.closed_messages[(route, "out")] += connection.messages_out
        self.closed_bytes[(route, "in")] += connection.bytes_in
        self.closed_bytes[(route, "out")] += connection.bytes_out

    def upstream_error(self, route, kind):
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
        h = HistogramMetricFamily("wsgate_handshake_seconds",
                                  "Time from connection to 101", labels=["route"])
        for route, counts in stats.handshake_buckets.items():
            cumulative, buckets = 0, []
            for bound, count in zip(HANDSHAKE_BUCKETS + (float("inf"),), counts):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            h.add_metric([route], buckets, stats.handshake_sum[route])
        yield h
        yield _counter("wsgate_upstream_errors_total", "Upstream failures", ["route", "kind"],
                       stats.upstream_errors)
        broadcast = {route.name for route in gateway.config.routes
                     if route.target.kind == "broadcast"}
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


def _counter(name, documentation, labels, values):
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family
