"""The INI config file → frozen, validated settings.

Everything downstream reads these dataclasses, never raw strings. Every error
is a :class:`ConfigError` whose text names the file, the section, the key and
what was expected, so start-up can print it as one line and exit 1.
"""

import configparser
import os
import re
import socket
from dataclasses import dataclass, field

from wsgate import targets, units
from wsgate.forwarding import parse_networks
from wsgate.settings import SettingError
from wsgate.routing import HostPattern, PathPattern


class ConfigError(Exception):
    """A config problem, printed as ``<file>: [section] key: message``."""

    def __init__(self, path, section, key, message):
        self.path, self.section, self.key, self.message = path, section, key, message
        where = f"[{section}]" if section else ""
        if key:
            where += f" {key}"
        super().__init__(f"{path}: {where}: {message}" if where else f"{path}: {message}")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class CoreSettings:
    """``[wsgate]``: process-wide settings."""

    node_id: str
    log_format: str = "text"
    max_connections: int = 50000
    broker: str = None  # the [broker:NAME] broadcast routes use; None: in-process
    drain_timeout: float = 30.0
    log_messages: bool = False
    metrics: bool = True
    fast_paths: bool = True
    workers: int = 1
    router: str = "default"  # an IRouterFactory plugin name or package.module:factory


@dataclass(frozen=True)
class AdminSettings:
    """``[admin]``: the admin HTTP endpoint (health, metrics, publish, connections)."""

    endpoint: str = "tcp:8081:interface=127.0.0.1"
    token: str = None
    max_publish_size: int = 1024 * 1024


@dataclass(frozen=True)
class BrokerSettings:
    """``[broker:NAME]``: where broadcast channels (and shared rate limits) live."""

    name: str
    type: str  # "memory" or "redis"
    url: str = None
    prefix: str = "wsgate:"
    timeout: float = 2.0  # per Redis command
    ca: str = None  # PEM CA file for rediss://


@dataclass(frozen=True)
class ListenerSettings:
    """``[listen:NAME]``: one listening endpoint and its per-connection limits."""

    name: str
    endpoint: str
    tls: object = field(default=None, compare=False, repr=False)  # wsgate.tls.ServerTLS
    handshake_timeout: float = 10.0
    ping_interval: float = 30.0
    ping_timeout: float = 10.0
    idle_timeout: float = 0.0
    max_message_size: int = 1024 * 1024
    max_frame_size: int = 1024 * 1024
    compression: bool = False
    trusted_proxies: tuple = ()  # ipaddress networks whose X-Forwarded-For is believed
    max_fragments: int = 1024  # frames per message; beyond it 1009
    backlog: int = 1024  # the listen() queue of not yet accepted connections

    @property
    def is_tls(self):
        return self.tls is not None or self.endpoint.split(":", 1)[0] in ("ssl", "tls")


@dataclass(frozen=True)
class RouteSettings:
    """``[route:NAME]``: which requests it takes and what serves them."""

    name: str
    host: HostPattern
    path: PathPattern
    target: object
    listeners: tuple = None  # None: every listener
    policies: tuple = ()  # IPolicy providers, in order
    max_message_size: int = None  # None: the listener's
    idle_timeout: float = None  # None: the listener's


@dataclass(frozen=True)
class Config:
    """A whole, validated config file."""

    path: str
    core: CoreSettings
    listeners: tuple
    routes: tuple
    policies: dict = field(default_factory=dict)  # name → IPolicy
    brokers: dict = field(default_factory=dict)  # name → BrokerSettings
    admin: AdminSettings = None  # None: no admin endpoint


# --------------------------------------------------------------------------- loading

_REQUIRED = object()


class _Section:
    """Hands out a section's keys one by one and complains about leftovers."""

    def __init__(self, path, name, items):
        self.path, self.name = path, name
        self.items = dict(items)
        self.used = set()

    def error(self, key, message):
        return ConfigError(self.path, self.name, key, message)

    def has(self, key):
        return key in self.items

    def take(self, key, parse=str, default=_REQUIRED):
        self.used.add(key)
        if key not in self.items:
            if default is _REQUIRED:
                raise self.error(key, "is required")
            return default
        raw = self.items[key]
        try:
            return parse(raw)
        except ValueError as e:
            raise self.error(key, str(e)) from None

    def finish(self):
        unknown = sorted(set(self.items) - self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            raise self.error(unknown[0], f"unknown key (this section takes: {known})")


def load(path):
    """Read and validate the config file at *path*; raise :class:`ConfigError`."""
    parser = configparser.ConfigParser(
        interpolation=None, default_section="\0", strict=True, empty_lines_in_values=False)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f, source=path)
    except OSError as e:
        raise ConfigError(path, None, None, f"cannot read the config file: {e.strerror}")
    except UnicodeDecodeError:
        raise ConfigError(path, None, None, "expected a UTF-8 text file")
    except configparser.DuplicateSectionError as e:
        raise ConfigError(path, e.section, None, f"section appears twice (line {e.lineno})")
    except configparser.DuplicateOptionError as e:
        raise ConfigError(path, e.section, e.option, f"key appears twice (line {e.lineno})")
    except configparser.MissingSectionHeaderError as e:
        raise ConfigError(path, None, None, f"line {e.lineno}: expected a [section] first")
    except configparser.ParsingError as e:
        lineno = e.errors[0][0] if e.errors else "?"
        raise ConfigError(path, None, None, f"line {lineno}: expected 'key = value'")
    return _build(path, parser)


def _build(path, parser):
    base = os.path.dirname(os.path.abspath(path))
    core = admin = None
    listeners, routes, policy_sections, brokers = [], [], [], {}
    for name in parser.sections():
        section = _Section(path, name, parser.items(name))
        kind, _, label = name.partition(":")
        if name == "wsgate":
            core = _core(section)
        elif name == "admin":
            admin = _admin(section)
        elif kind == "listen" and label:
            listeners.append(_listener(section, label, base))
        elif kind == "broker" and label:
            brokers[label] = _broker(section, label, base)
        elif kind in ("route", "policy") and label:
            # built below: they refer to listeners, brokers and policies
            (routes if kind == "route" else policy_sections).append(section)
            continue
        else:
            raise ConfigError(
                path, name, None, "unknown section (expected [wsgate], [listen:NAME], "
                "[route:NAME], [policy:NAME], [broker:NAME] or [admin])")
        section.finish()
    if core is None:
        core = CoreSettings(node_id=socket.gethostname())
    if core.broker is not None and core.broker not in brokers:
        raise ConfigError(path, "wsgate", "broker", f"no [broker:{core.broker}] section")
    if not listeners:
        raise ConfigError(path, "listen:NAME", None, "at least one listener is required")
    _check_router(path, core.router)
    policies = _policies(policy_sections, base, brokers, core.broker)
    listener_names = tuple(listener.name for listener in listeners)
    built_routes = []
    for section in routes:
        built_routes.append(
            _route(section, section.name.partition(":")[2], listener_names, policies, base))
        section.finish()
    _check_workers(path, core, listeners, built_routes, brokers)
    return Config(path, core, tuple(listeners), tuple(built_routes), policies, brokers, admin)


def _admin(section):
    endpoint = section.take("endpoint", units.non_empty, AdminSettings.endpoint)
    _check_endpoint(section, endpoint)
    token = section.take("token", units.non_empty, None)
    if token is None and not _is_loopback_endpoint(endpoint):
        raise section.error("token", f"is required: the admin endpoint {endpoint} is not "
                            "loopback-only (set interface=127.0.0.1 or a token)")
    return AdminSettings(
        endpoint=endpoint, token=token,
        max_publish_size=section.take("max_publish_size", units.parse_size, 1024 * 1024))


def _is_loopback_endpoint(endpoint):
    """True for unix: sockets and tcp endpoints bound to a loopback interface."""
    import ipaddress

    parts = endpoint.replace("\\:", "\0").split(":")
    if parts[0] == "unix":
        return True
    if parts[0] not in ("tcp", "tcp6", "ssl"):
        return False
    for part in parts[1:]:
        if part.startswith("interface="):
            try:
                return ipaddress.ip_address(part[10:].replace("\0", ":")).is_loopback
            except ValueError:
                return part[10:] == "localhost"
    return False


def _workers(text):
    if text.strip().lower() == "auto":
        return max(1, os.cpu_count() or 1)
    return units.parse_positive_int(text)


def _check_workers(path, core, listeners, routes, brokers):
    """With several worker processes, channels and sockets must be shareable."""
    if core.workers == 1:
        return
    broker = brokers.get(core.broker) if core.broker else None
    if any(route.target.needs_shared_broker for route in routes) and \
            (broker is None or broker.type != "redis"):
        raise ConfigError(path, "wsgate", "workers", "workers > 1 with broadcast routes needs "
                          "a Redis broker ([wsgate] broker naming a [broker:NAME] type = redis)")
    for listener in listeners:
        scheme = listener.endpoint.split(":", 1)[0]
        if scheme not in ("tcp", "tcp6", "unix", "haproxy"):
            raise ConfigError(path, f"listen:{listener.name}", "endpoint",
                              f"workers > 1 supports tcp:, tcp6:, unix: and haproxy:tcp: "
                              f"endpoints (use tls_cert for TLS), not {scheme}:")


def _check_router(path, name):
    from wsgate.routing import resolve_router_factory

    try:
        resolve_router_factory(name)
    except ValueError as e:
        raise ConfigError(path, "wsgate", "router", str(e)) from None


def _broker(section, name, base):
    kind = section.take("type", units.choice("memory", "redis"))
    if kind == "memory":
        return BrokerSettings(name, kind)
    url = section.take("url", units.non_empty)
    if not re.match(r"^rediss?://[^/]+(/\d+)?$", url):
        raise section.error("url", f"expected redis://host:port/db or rediss://..., got {url!r}")
    ca = section.take("ca", units.non_empty, None)
    if ca is not None and not url.startswith("rediss://"):
        raise section.error("ca", "only applies to rediss:// URLs")
    return BrokerSettings(
        name, kind, url=url, prefix=section.take("prefix", str, "wsgate:"),
        timeout=section.take("timeout", units.positive_duration, 2.0),
        ca=_resolve(base, ca) if ca else None)


def _policies(sections, base, brokers, default_broker):
    """Build every ``[policy:NAME]`` with its type's factory (built-in or plugin)."""
    from twisted.internet import reactor

    from wsgate import policies as policy_api

    if not sections:
        return {}
    known = policy_api.discovered_factories()
    context = policy_api.PolicyContext(reactor, base, brokers, default_broker)
    built = {}
    for section in sections:
        name = section.name.partition(":")[2]
        try:
            factory = policy_api.resolve_factory(section.take("type", units.non_empty), known)
        except policy_api.PolicyConfigError as e:
            raise section.error(e.key, e.message) from None
        mode = section.take("mode", units.choice(*policy_api.MODES), "enforce")
        keys = tuple(getattr(factory, "keys", ()))
        settings = {key: section.items[key] for key in keys if key in section.items}
        section.used.update(keys)
        section.finish()
        try:
            policy = factory(name, settings, context)
        except policy_api.PolicyConfigError as e:
            raise section.error(e.key, e.message) from None
        except Exception as e:  # a plugin's own bug: still one clear line
            raise section.error(None, f"the {factory!r} policy factory failed: {e}") from None
        policy.mode = mode
        if getattr(policy, "name", None) is None:
            policy.name = name
        built[name] = policy
    return built


def _core(section):
    return CoreSettings(
        node_id=section.take("node_id", units.non_empty, socket.gethostname()),
        log_format=section.take("log_format", units.choice("text", "json"), "text"),
        max_connections=section.take("max_connections", units.parse_positive_int, 50000),
        broker=section.take("broker", units.non_empty, None),
        drain_timeout=section.take("drain_timeout", units.positive_duration, 30.0),
        log_messages=section.take("log_messages", units.parse_bool, False),
        metrics=section.take("metrics", units.parse_bool, True),
        fast_paths=section.take("fast_paths", units.parse_bool, True),
        workers=section.take("workers", _workers, 1),
        router=section.take("router", units.non_empty, "default"),
    )


def _listener(section, name, base):
    from wsgate import tls  # pyOpenSSL; imported when a config is actually loaded

    endpoint = section.take("endpoint", units.non_empty)
    _check_endpoint(section, endpoint)
    cert = section.take("tls_cert", units.non_empty, None)
    key = section.take("tls_key", units.non_empty, None)
    sni_dir = section.take("tls_sni_dir", units.non_empty, None)
    min_version = section.take("tls_min_version", units.choice("1.2", "1.3"), "1.2")
    scheme = endpoint.split(":", 1)[0]
    server_tls = None
    if cert or key or sni_dir:
        if scheme in ("ssl", "tls"):
            raise section.error(
                "tls_cert", f"a {scheme}: endpoint already does TLS; use a tcp: endpoint "
                "with tls_cert, or the endpoint's own certKey/privateKey, not both")
        if scheme == "unix":
            raise section.error("tls_cert", "expected a tcp: or haproxy:tcp: endpoint for TLS")
        if not cert:
            raise section.error("tls_cert", "is required with tls_key or tls_sni_dir")
        try:
            server_tls = tls.ServerTLS.load(
                _resolve(base, cert), _resolve(base, key) if key else None,
                _resolve(base, sni_dir) if sni_dir else None, min_version)
        except tls.TLSConfigError as e:
            raise section.error(e.key, e.message) from None
    max_message = section.take("max_message_size", units.parse_size, 1024 * 1024)
    settings = ListenerSettings(
        name=name,
        endpoint=endpoint,
        tls=server_tls,
        handshake_timeout=section.take("handshake_timeout", units.positive_duration, 10.0),
        ping_interval=section.take("ping_interval", units.parse_duration, 30.0),
        ping_timeout=section.take("ping_timeout", units.positive_duration, 10.0),
        idle_timeout=section.take("idle_timeout", units.parse_duration, 0.0),
        max_message_size=max_message,
        max_frame_size=section.take("max_frame_size", units.parse_size, max_message),
        compression=section.take(
            "compression", units.choice("off", "permessage-deflate"), "off") != "off",
        trusted_proxies=section.take(
            "trusted_proxies", lambda text: parse_networks(units.parse_list(text)), ()),
        max_fragments=section.take("max_fragments", units.bounded_int(1, 1 << 24), 1024),
        backlog=section.take("backlog", units.bounded_int(1, 65535), 1024),
    )
    if "backlog=" in endpoint:
        raise section.error("backlog", "set the backlog with this key, not in the endpoint "
                            "string too")
    if max_message < 1:
        raise section.error("max_message_size", "expected a size of at least 1 byte")
    if settings.max_frame_size < 1:
        raise section.error("max_frame_size", "expected a size of at least 1 byte")
    return settings


def _resolve(base, path):
    return path if os.path.isabs(path) else os.path.join(base, path)


def _check_endpoint(section, endpoint):
    """Refuse endpoint strings Twisted cannot parse, and ``haproxy:ssl:``."""
    from twisted.internet import endpoints, reactor

    scheme = endpoint.split(":", 1)[0]
    if scheme == "haproxy" and endpoint.split(":")[1:2] in (["ssl"], ["tls"]):
        raise section.error(
            "endpoint", "haproxy:ssl: is not supported: use haproxy:tcp:... with tls_cert "
            "(the PROXY header comes before the TLS handshake)")
    try:
        endpoints.serverFromString(reactor, endpoint)
    except Exception as e:  # Twisted raises ValueError, KeyError, TypeError, ...
        detail = str(e) or e.__class__.__name__
        raise section.error(
            "endpoint", f"expected a Twisted server endpoint such as "
            f"tcp:8080:interface=127.0.0.1, got {endpoint!r} ({detail})") from None


def _route(section, name, listener_names, policies, base):
    host = section.take("host", HostPattern.parse, HostPattern.parse("*"))
    path = section.take("path", PathPattern.parse)
    listeners = section.take("listeners", units.parse_list, None)
    if listeners is not None:
        for listener in listeners:
            if listener not in listener_names:
                raise section.error(
                    "listeners", f"unknown listener {listener!r} (known: "
                    f"{', '.join(listener_names)})")
    chosen = section.take("policies", units.parse_list, ())
    for policy in chosen:
        if policy not in policies:
            known = ", ".join(sorted(policies)) or "none"
            raise section.error("policies", f"no [policy:{policy}] section (known: {known})")
    try:
        target, keys = targets.build(name, section.items, targets.TargetContext(path, base))
    except SettingError as e:
        raise section.error(e.key, e.message) from None
    section.used.update(keys | {"target"})
    return RouteSettings(
        name=name, host=host, path=path, target=target, listeners=listeners,
        policies=tuple(policies[policy] for policy in chosen),
        max_message_size=section.take("max_message_size", units.parse_size, None),
        idle_timeout=section.take("idle_timeout", units.parse_duration, None),
    )
