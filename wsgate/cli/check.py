"""``wsgate check``: validate a config as start-up does and show what it means.

The validation is :func:`wsgate.config.load` (parse, then build: TLS contexts,
policies, targets), the very function ``twistd wsgate`` calls, so a file that
passes here passes at start-up, a port already in use aside: nothing listens
here and the reactor is not run. On success it prints the effective listeners
and the routes in the order the router tries them, and on standard error a
warning for each risky choice the file makes (``-q`` keeps the warnings).
"""

import dataclasses
import sys

from wsgate import sameorigin, units
from wsgate.routing import build_router


def run(path, out=None, err=None, quiet=False):
    """Check the config at *path*; print the tables (not if *quiet*) on *out* and return 0,
    or print the one-line start-up error on *err* and return 1."""
    from wsgate.config import ConfigError, load

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        config = load(path)
    except ConfigError as e:
        err.write(f"wsgate: {e}\n")
        return 1
    if not quiet:
        out.write(render(config))
    for warning in warnings(config):
        err.write(f"wsgate: warning: {warning}\n")
    return 0


def warnings(config):
    """What a valid *config* risks, one sentence each.

    A proxy route open to every origin (``allow_cross_origin = yes`` and no
    enforcing ``origin`` policy): the upstream always gets the client's
    ``Cookie`` (and ``Authorization``), so any site's page the user visits can
    open it with the user's session (cross-site WebSocket hijacking). Every
    proxy route is named, not only those whose upstream reads cookies: that
    cannot be told from here.
    """
    found = []
    for route in config.routes:
        enforced = any(sameorigin.checks_origin(policy) and policy.mode != "shadow"
                       for policy in route.policies)
        if route.allow_cross_origin and not enforced and route.target.type == "upstream":
            found.append(
                f"[route:{route.name}] allow_cross_origin = yes on a proxy route: pages of "
                "any site can open it with the user's cookies, which are forwarded "
                "upstream; list the sites in an origin policy instead, unless the "
                "upstream authenticates without cookies")
    return found


def render(config):
    """The whole report for a valid *config*, as text."""
    routes = build_router(config).routes
    parts = [
        f"{config.path}: OK ({_count(len(config.listeners), 'listener')}, "
        f"{_count(len(routes), 'route')})\n",
        _core_line(config.core),
        _admin_line(config.admin),
        "\n",
        table(["LISTENER", "ENDPOINT", "TLS", "HANDSHAKE", "PING", "IDLE", "MAX MESSAGE",
               "COMPRESSION"], [_listener_row(listener) for listener in config.listeners]),
        "\nroutes, in matching order:\n",
        table(["ROUTE", "HOST", "PATH", "LISTENERS", "TARGET", "POLICIES", "OVERRIDES"],
              [_route_row(route) for route in routes]),
    ]
    if config.pools:
        parts += ["\nupstream pools:\n", _pools(config.pools)]
    return "".join(parts)


def _pools(pools):
    """Each ``[upstream:NAME]``: its settings on one line, then a table of its servers."""
    text = []
    for name, pool in sorted(pools.items()):
        balance = pool.balance + (f" on {pool.hash_key.text}" if pool.hash_key else "")
        health = "off" if not pool.health_check else (
            f"every {units.format_duration(pool.health_check)} on {pool.health_path}, "
            f"rise {pool.rise}, fall {pool.fall}")
        passive = "off" if not pool.max_fails else (
            f"{pool.max_fails} fails in {units.format_duration(pool.fail_timeout)}")
        text.append(
            f"[upstream:{name}] balance={balance}, tries={pool.tries}, connect_timeout="
            f"{units.format_duration(pool.connect_timeout)}, passive health={passive}, "
            f"slow_start={_off_or_duration(pool.slow_start)}, health checks={health}, "
            f"drain_time={units.format_duration(pool.drain_time)}, rebalance="
            f"{f'{pool.rebalance_rate:g}/s' if pool.rebalance else 'no'}, "
            f"resolve={_off_or_duration(pool.resolve)}\n")
        rows = [[server.key, server.url.url, server.weight,
                 ",".join(flag for flag in ("backup", "down", "drain")
                          if getattr(server, flag)) or "-"]
                for server in pool.servers]
        text.append(table(["  SERVER", "URL", "WEIGHT", "FLAGS"],
                          [["  " + str(row[0])] + row[1:] for row in rows]))
    return "".join(text)


def table(headers, rows):
    """Left-aligned columns separated by two spaces; trailing blanks trimmed."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = []
    for row in [headers, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths)]
        lines.append("  ".join(cells).rstrip() + "\n")
    return "".join(lines)


def _count(n, noun):
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _core_line(core):
    """``[wsgate]``'s plain settings as ``key=value`` pairs (whatever fields it has)."""
    pairs = []
    for item in dataclasses.fields(core):
        value = getattr(core, item.name)
        if isinstance(value, bool):
            pairs.append(f"{item.name}={'yes' if value else 'no'}")
        elif isinstance(value, float):
            pairs.append(f"{item.name}={units.format_duration(value)}")
        elif isinstance(value, (str, int)) or value is None:
            pairs.append(f"{item.name}={'-' if value is None else value}")
    return "[wsgate] " + ", ".join(pairs) + "\n"


def _off_or_duration(seconds):
    return "off" if not seconds else units.format_duration(seconds)


def _listener_row(listener):
    ping = "off"
    if listener.ping_interval:
        ping = (f"{units.format_duration(listener.ping_interval)}, timeout "
                f"{units.format_duration(listener.ping_timeout)}")
    max_message = units.format_size(listener.max_message_size)
    if listener.max_frame_size != listener.max_message_size:
        max_message += f" (frames {units.format_size(listener.max_frame_size)})"
    return [
        listener.name,
        listener.endpoint,
        "yes" if listener.is_tls else "no",
        units.format_duration(listener.handshake_timeout),
        ping,
        _off_or_duration(listener.idle_timeout),
        max_message,
        "permessage-deflate" if listener.compression else "off",
    ]


def _route_row(route):
    overrides = []
    if route.max_message_size is not None:
        overrides.append(f"max_message_size={units.format_size(route.max_message_size)}")
    if route.idle_timeout is not None:
        overrides.append(f"idle_timeout={_off_or_duration(route.idle_timeout)}")
    if route.allow_cross_origin:
        overrides.append("allow_cross_origin=yes")
    return [
        route.name,
        route.host.text,
        route.path.text,
        "all" if route.listeners is None else ",".join(route.listeners),
        route.target.describe(),
        _policy_names(route.policies),
        " ".join(overrides),
    ]


def _policy_names(policies):
    """A route's ``IPolicy`` providers, in order, as ``name`` or ``name(shadow)``."""
    return ",".join(f"{policy.name}(shadow)" if policy.mode == "shadow" else policy.name
                    for policy in policies)


def _admin_line(admin):
    """``[admin]`` without its secret: the endpoint and whether a token is set."""
    if admin is None:
        return "[admin] none (no admin endpoint)\n"
    token = "token set" if admin.token else "no token"
    return f"[admin] {admin.endpoint} ({token})\n"
