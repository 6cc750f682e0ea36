"""Upstream URLs and ``[upstream:NAME]`` pools as frozen data (the parse step).

A server URL is a template exactly as a single ``upstream = URL`` is: its
own path with ``{path}``, ``{tail}`` and the route's placeholders, the
client's query string appended. Which placeholders are allowed depends on
the route, so :func:`check_placeholders` runs when a route names the pool.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from wsgate import units
from wsgate.forwarding import query_without
from wsgate.units import fill_template, placeholders

BALANCES = ("least_conn", "round_robin", "hash")
MAX_WEIGHT = 1000
MAX_SERVERS = 1000

_AUTHORITY = re.compile(r"^(ws|wss)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(\d+))?")


@dataclass(frozen=True)
class UpstreamURL:
    """One upstream server's URL template, split up."""

    url: str  # as written in the config
    scheme: str  # ws or wss
    host: str  # without brackets; an address when found by ``resolve``
    port: int
    path_template: str  # may hold {path}, {tail}, route placeholders and a query
    name: str | None = None  # the host name ``host`` was resolved from (Host, SNI)

    @property
    def key(self) -> str:
        """``host:port`` (``[v6]:port``): the server's name in metrics, the admin API and
        hashing."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def host_header(self) -> str:
        host = self.name or self.host
        host = f"[{host}]" if ":" in host else host
        default = 443 if self.scheme == "wss" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def request_target(self, match: Any, head: Any, strip_query: tuple[str, ...] = ()) -> str:
        """The upstream request path: the template filled in, the client's query
        appended without the parameters named in *strip_query*."""
        values = dict(match.params, path=head.path, tail=match.tail)
        target = fill_template(self.path_template, values) or "/"
        if not target.startswith("/"):
            target = "/" + target
        query = query_without(head.query, strip_query) if head.query else ""
        if query:
            target += ("&" if "?" in target else "?") + query
        return target


def parse_url(text: str) -> UpstreamURL:
    """``ws://host:port/path`` or ``wss://...`` → :class:`UpstreamURL`; ValueError if not."""
    url = text.strip()
    match = _AUTHORITY.match(url)
    if not match or (len(url) > match.end() and url[match.end()] not in "/{?"):
        raise ValueError(f"expected ws://host:port/path or wss://..., got {url!r}")
    scheme, host, port_text = match.group(1), match.group(2).strip("[]"), match.group(3)
    port = int(port_text) if port_text else (443 if scheme == "wss" else 80)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range in {url!r}")
    path_template = url[match.end():]
    if "?" in path_template.split("{", 1)[0] and "{" in path_template.split("?", 1)[1]:
        raise ValueError("placeholders belong in the path, not the query")
    return UpstreamURL(url, scheme, host, port, path_template)


def check_placeholders(url: UpstreamURL, path: Any) -> None:
    """Raise ValueError unless every placeholder of *url* is ``{path}``, ``{tail}`` or one
    of the route path's (*path*: a :class:`wsgate.routing.PathPattern`)."""
    allowed = set(path.placeholders) | {"path", "tail"}
    for placeholder in placeholders(url.path_template):
        if placeholder not in allowed:
            raise ValueError(f"{{{placeholder}}} in {url.url} is not {{path}}, {{tail}} or a "
                             f"placeholder of path {path.text!r}")


@dataclass(frozen=True)
class ServerSpec:
    """One entry of ``servers``: a URL and its flags."""

    url: UpstreamURL
    weight: int = 1
    backup: bool = False  # used only when no other server can take the connection
    down: bool = False  # takes nothing (kept in the list, shown as disabled)
    drain: bool = False  # takes no new connections; live ones are moved over drain_time
    entry: str | None = None  # found by resolve: the key of the config entry it came from

    @property
    def key(self) -> str:
        return self.url.key

    @property
    def entry_key(self) -> str:
        """The config entry's ``host:port`` (TLS options are built per entry)."""
        return self.entry or self.url.key

    @property
    def resolvable(self) -> bool:
        """Whether its host is a name (``resolve`` looks it up), not an address."""
        try:
            ipaddress.ip_address(self.url.host)
        except ValueError:
            return True
        return False


def parse_servers(text: str) -> tuple[ServerSpec, ...]:
    """``ws://a:1/x weight=2, ws://b:2/x backup`` → ServerSpecs; ValueError if wrong."""
    entries = [entry.strip() for entry in text.split(",")]
    if not any(entries):
        raise ValueError("expected at least one server URL")
    if len(entries) > MAX_SERVERS:  # before parsing each one
        raise ValueError(f"at most {MAX_SERVERS} servers")
    servers, seen = [], set()
    for entry in entries:
        if not entry:
            raise ValueError("an empty entry between commas")
        words = entry.split()
        url = parse_url(words[0])
        flags: dict[str, Any] = {}
        for word in words[1:]:
            name, sep, value = word.partition("=")
            if sep and name == "weight":
                try:
                    weight = int(value)
                except ValueError:
                    weight = 0
                if not 1 <= weight <= MAX_WEIGHT:
                    raise ValueError(f"weight of {url.url}: expected 1 to {MAX_WEIGHT}, "
                                     f"got {value!r}")
                flags["weight"] = weight
            elif not sep and word in ("backup", "down", "drain"):
                flags[word] = True
            else:
                raise ValueError(f"after {url.url}: expected weight=N, backup, down or "
                                 f"drain, got {word!r}")
        if url.key in seen:
            raise ValueError(f"{url.key} is listed twice")
        seen.add(url.key)
        servers.append(ServerSpec(url, **flags))
    if all(server.backup for server in servers):
        raise ValueError("every server is a backup: at least one must not be")
    if len({server.url.scheme for server in servers}) > 1:
        raise ValueError("mixes ws:// and wss:// servers: a pool uses one scheme")
    return tuple(servers)


@dataclass(frozen=True)
class HashKey:
    """``hash_key``: where a request's key comes from."""

    kind: str  # ip, identity, header, cookie or placeholder
    name: str = ""  # the header, cookie or placeholder name

    @property
    def text(self) -> str:
        if self.kind == "placeholder":
            return "{" + self.name + "}"
        return f"{self.kind}:{self.name}" if self.name else self.kind


def parse_hash_key(text: str) -> HashKey:
    text = units.non_empty(text)
    if text in ("ip", "identity"):
        return HashKey(text)
    kind, sep, name = text.partition(":")
    if sep and kind in ("header", "cookie") and name.strip():
        return HashKey(kind, name.strip().lower() if kind == "header" else name.strip())
    if len(text) > 2 and text[0] == "{" and text[-1] == "}" and \
            re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text[1:-1]):
        return HashKey("placeholder", text[1:-1])
    raise ValueError(f"expected ip, identity, header:NAME, cookie:NAME or {{placeholder}}, "
                     f"got {text!r}")


@dataclass(frozen=True)
class PoolSettings:
    """``[upstream:NAME]``."""

    name: str
    servers: tuple[ServerSpec, ...]
    balance: str = "least_conn"
    hash_key: HashKey | None = None
    tries: int = 3  # servers tried per handshake
    connect_timeout: float = 1.0  # per try: connect, TLS and the upstream's answer
    max_fails: int = 3  # 0: passive health off
    fail_timeout: float = 10.0
    slow_start: float = 0.0
    health_check: float = 0.0  # interval; 0: off
    health_path: str = "/"
    rise: int = 2
    fall: int = 3
    drain_time: float = 30.0  # a drained server's connections are closed over this
    rebalance: bool = False
    rebalance_rate: float = 10.0  # connections moved per second, per pool
    resolve: float = 0.0  # interval between DNS lookups of host names; 0: off

    @property
    def scheme(self) -> str:
        return self.servers[0].url.scheme


def parse_pool(name: str, section: Any) -> PoolSettings:
    """``[upstream:NAME]`` read through *section* (``take(key, parse, default)``, ``has``,
    ``error(key, message)``: the config's _Section)."""
    servers = section.take("servers", parse_servers)
    balance = section.take("balance", units.choice(*BALANCES), "least_conn")
    hash_key = section.take("hash_key", parse_hash_key, None)
    if balance == "hash" and hash_key is None:
        raise section.error("hash_key", "is required with balance = hash")
    if balance != "hash" and hash_key is not None:
        raise section.error("hash_key", "applies with balance = hash only")
    slow_start = section.take("slow_start", units.parse_duration, 0.0)
    if slow_start and balance == "hash":
        raise section.error("slow_start", "does not apply to balance = hash (a ramp would "
                            "move keys back and forth)")
    health_check = section.take("health_check", _interval_or_off, 0.0)
    if not health_check:
        for key in ("health_path", "rise", "fall"):
            if section.has(key):
                raise section.error(key, "applies with health_check = INTERVAL only")
    return PoolSettings(
        name=name, servers=servers, balance=balance, hash_key=hash_key,
        tries=section.take("tries", units.bounded_int(1, 100), 3),
        connect_timeout=section.take("connect_timeout", units.positive_duration, 1.0),
        max_fails=section.take("max_fails", units.bounded_int(0, 1000), 3),
        fail_timeout=section.take("fail_timeout", units.positive_duration, 10.0),
        slow_start=slow_start,
        health_check=health_check,
        health_path=section.take("health_path", _path, "/"),
        rise=section.take("rise", units.bounded_int(1, 100), 2),
        fall=section.take("fall", units.bounded_int(1, 100), 3),
        drain_time=section.take("drain_time", units.parse_duration, 30.0),
        rebalance=section.take("rebalance", units.parse_bool, False),
        rebalance_rate=section.take("rebalance_rate", _per_second, 10.0),
        resolve=section.take("resolve", _interval_or_off, 0.0),
    )


def _per_second(text: str) -> float:
    return units.parse_rate(text)[1]


def _interval_or_off(text: str) -> float:
    if text.strip().lower() in ("off", "no", "0"):
        return 0.0
    value = units.positive_duration(text)
    if value < 0.1:
        raise ValueError(f"expected an interval of at least 100ms, got {text!r}")
    return value


def _path(text: str) -> str:
    path = units.non_empty(text)
    if not path.startswith("/") or any(c in path for c in "# \t{}"):
        raise ValueError(f"expected a path such as /healthz, got {text!r}")
    return path
