"""The parse step: the INI file → plain, validated data (:class:`Parsed`), no side effects.

Values are typed and checked here (durations, sizes, endpoints, patterns,
cross-references between sections); nothing is built that holds files,
sockets or timers: TLS contexts, policies, routers and targets are made by
:mod:`wsgate.config.build` from what this returns. Every error is a
:class:`~wsgate.config.model.ConfigError` naming the file, the section and
the key.
"""

import configparser
import os
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from wsgate import units
from wsgate.config.model import (
    AdminSettings,
    BrokerSettings,
    ConfigError,
    CoreSettings,
    ListenerSettings,
    TLSFiles,
)
from wsgate.forwarding import parse_networks
from wsgate.settings import REQUIRED, SettingError, Settings
from wsgate.routing import HostPattern, PathPattern
from wsgate.upstreams import dns
from wsgate.upstreams.config import parse_pool


@dataclass
class RouteSection:
    """A ``[route:NAME]`` with its routing keys parsed; its target and policies are built
    later (``section`` still holds the target's raw keys)."""

    section: object  # the _Section (error reporting, the target's keys)
    name: str
    host: HostPattern
    path: PathPattern
    listeners: tuple
    policies: tuple  # [policy:NAME] names, in order
    max_message_size: int
    idle_timeout: float
    allow_cross_origin: bool = False


@dataclass
class Parsed:
    """A whole config file, parsed; :func:`wsgate.config.build.build` makes it a Config."""

    path: str
    base: str  # the config file's folder: relative paths are relative to it
    core: CoreSettings
    admin: AdminSettings
    brokers: dict
    listeners: tuple
    routes: tuple  # RouteSection
    policies: tuple  # _Section of each [policy:NAME]
    pools: dict = None  # name → wsgate.upstreams.config.PoolSettings ([upstream:NAME])


# --------------------------------------------------------------------------- loading



class _Section:
    """Hands out a section's keys one by one (typed by :class:`wsgate.settings.Settings`,
    errors as :class:`ConfigError`) and complains about leftovers."""

    def __init__(self, path, name, items):
        self.path, self.name = path, name
        self.settings = Settings(items)
        self.items = self.settings.raw
        self.used = set()

    def error(self, key, message):
        return ConfigError(self.path, self.name, key, message)

    def has(self, key):
        return key in self.items

    def take(self, key, parse=str, default=REQUIRED):
        self.used.add(key)
        try:
            return self.settings.get(key, parse, default)
        except SettingError as e:
            raise self.error(e.key, e.message) from None

    def secret(self, key, base, parse=str, default=REQUIRED):
        """*key* or the content of the file ``<key>_file`` names (see
        :meth:`wsgate.settings.Settings.secret`)."""
        self.used.update((key, key + "_file"))
        try:
            return self.settings.secret(key, base, parse, default)
        except SettingError as e:
            raise self.error(e.key, e.message) from None

    def finish(self):
        unknown = sorted(set(self.items) - self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            raise self.error(unknown[0], f"unknown key (this section takes: {known})")


def parse(path):
    """Read and validate the config file at *path* into :class:`Parsed`; raise ConfigError."""
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
    return _parse(path, parser)


def _parse(path, parser):
    base = os.path.dirname(os.path.abspath(path))
    core = admin = None
    listeners, routes, policy_sections, brokers, pools = [], [], [], {}, {}
    for name in parser.sections():
        section = _Section(path, name, parser.items(name))
        kind, _, label = name.partition(":")
        if name == "wsgate":
            core = _core(section, base)
        elif name == "admin":
            admin = _admin(section, base)
        elif kind == "listen" and label:
            listeners.append(_listener(section, label, base))
        elif kind == "broker" and label:
            brokers[label] = _broker(section, label, base)
        elif kind == "upstream" and label:
            pools[label] = parse_pool(label, section)
        elif kind in ("route", "policy") and label:
            # built below: they refer to listeners, brokers and policies
            (routes if kind == "route" else policy_sections).append(section)
            continue
        else:
            raise ConfigError(
                path, name, None, "unknown section (expected [wsgate], [listen:NAME], "
                "[route:NAME], [policy:NAME], [broker:NAME], [upstream:NAME] or [admin])")
        section.finish()
    if core is None:
        core = CoreSettings(node_id=socket.gethostname())
    if core.broker is not None and core.broker not in brokers:
        raise ConfigError(path, "wsgate", "broker", f"no [broker:{core.broker}] section")
    if not listeners:
        raise ConfigError(path, "listen:NAME", None, "at least one listener is required")
    for section in policy_sections:
        section.take("type", units.non_empty)
    policy_names = {section.name.partition(":")[2] for section in policy_sections}
    listener_names = tuple(listener.name for listener in listeners)
    route_sections = tuple(_route(section, listener_names, policy_names)
                           for section in routes)
    _check_duplicate_routes(route_sections, listener_names)
    _check_listeners_for_workers(path, core, listeners)
    return Parsed(path, base, core, admin, brokers, tuple(listeners), route_sections,
                  tuple(policy_sections), pools)


def _admin(section, base):
    endpoint = section.take("endpoint", units.non_empty, AdminSettings.endpoint)
    _check_endpoint(section, endpoint)
    token = section.secret("token", base, units.non_empty, None)
    if token is None and not _is_loopback_endpoint(endpoint):
        raise section.error("token", f"is required: the admin endpoint {endpoint} is not "
                            "loopback-only (set interface=127.0.0.1, or token or token_file)")
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


def _check_duplicate_routes(routes, listener_names):
    """Two routes with the same host and path on a common listener: the second could
    never be chosen (routing breaks ties by file order), so it is a mistake."""
    seen = {}
    for route in routes:
        shape = (route.host.text, route.path.prefix,
                 tuple((kind, value if kind == "lit" else "") for kind, value in
                       route.path.segments))
        for listener in route.listeners or listener_names:
            earlier = seen.setdefault((shape, listener), route)
            if earlier is not route:
                raise route.section.error(
                    "path", f"the same host and path as [{earlier.section.name}] on listener "
                    f"{listener!r}: one of them could never be chosen")


def _check_listeners_for_workers(path, core, listeners):
    """With several worker processes the listening sockets are shared: plain ones only."""
    if core.workers == 1:
        return
    for listener in listeners:
        scheme = listener.endpoint.split(":", 1)[0]
        if scheme not in ("tcp", "tcp6", "unix", "haproxy"):
            raise ConfigError(path, f"listen:{listener.name}", "endpoint",
                              f"workers > 1 supports tcp:, tcp6:, unix: and haproxy:tcp: "
                              f"endpoints (use tls_cert for TLS), not {scheme}:")


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
    password = section.secret("password", base, units.non_empty, None)
    if password is not None and urlsplit(url).password is not None:
        key = "password_file" if section.has("password_file") else "password"
        raise section.error(key, "the url carries a password already: give it in one place")
    return BrokerSettings(
        name, kind, url=url, prefix=section.take("prefix", str, "wsgate:"),
        timeout=section.take("timeout", units.positive_duration, 2.0),
        ca=_resolve(base, ca) if ca else None, password=password,
        presence_ttl=section.take("presence_ttl", _presence_ttl, 30.0))


def _presence_ttl(text):
    value = units.positive_duration(text)
    if value < 1:
        raise ValueError(f"expected at least 1s, got {text!r}")
    return value


def _core(section, base):
    return CoreSettings(
        node_id=section.take("node_id", units.non_empty, socket.gethostname()),
        log_format=section.take("log_format", units.choice("text", "json"), "text"),
        max_connections=section.take("max_connections", units.parse_positive_int, 50000),
        max_history_channels=section.take("max_history_channels",
                                          units.bounded_int(1, 10_000_000), 10000),
        broker=section.take("broker", units.non_empty, None),
        drain_timeout=section.take("drain_timeout", units.positive_duration, 30.0),
        drain_delay=section.take("drain_delay", units.parse_duration, 0.0),
        ready_requires_broker=section.take("ready_requires_broker", units.parse_bool, False),
        log_messages=section.take("log_messages", units.parse_bool, False),
        metrics=section.take("metrics", units.parse_bool, True),
        fast_paths=section.take("fast_paths", units.parse_bool, True),
        workers=section.take("workers", _workers, 1),
        router=section.take("router", units.non_empty, "default"),
        dns_hosts=_resolve(base, section.take("dns_hosts", units.non_empty, "/etc/hosts")),
        dns_servers=section.take("dns_servers", dns.parse_servers, None),
    )


def _listener(section, name, base):
    endpoint = _files_relative_to(base, section.take("endpoint", units.non_empty))
    _check_endpoint(section, endpoint)
    cert = section.take("tls_cert", units.non_empty, None)
    key = section.take("tls_key", units.non_empty, None)
    sni_dir = section.take("tls_sni_dir", units.non_empty, None)
    min_version = section.take("tls_min_version", units.choice("1.2", "1.3"), "1.2")
    scheme = endpoint.split(":", 1)[0]
    tls_files = None
    if cert or key or sni_dir:
        if scheme in ("ssl", "tls"):
            raise section.error(
                "tls_cert", f"a {scheme}: endpoint already does TLS; use a tcp: endpoint "
                "with tls_cert, or the endpoint's own certKey/privateKey, not both")
        if scheme == "unix":
            raise section.error("tls_cert", "expected a tcp: or haproxy:tcp: endpoint for TLS")
        if not cert:
            raise section.error("tls_cert", "is required with tls_key or tls_sni_dir")
        tls_files = TLSFiles(_resolve(base, cert), _resolve(base, key) if key else None,
                             _resolve(base, sni_dir) if sni_dir else None, min_version)
    max_message = section.take("max_message_size", units.parse_size, 1024 * 1024)
    settings = ListenerSettings(
        name=name,
        endpoint=endpoint,
        tls_files=tls_files,
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
        health_path=section.take("health_path", _health_path, None),
    )
    if "backlog=" in endpoint:
        raise section.error("backlog", "set the backlog with this key, not in the endpoint "
                            "string too")
    if max_message < 1:
        raise section.error("max_message_size", "expected a size of at least 1 byte")
    if settings.max_frame_size < 1:
        raise section.error("max_frame_size", "expected a size of at least 1 byte")
    return settings


# The file arguments of ssl: endpoints (Twisted's names); they are relative to the
# config file's folder, as tls_cert is, not to the process's working directory.
_ENDPOINT_FILE_ARGS = ("privateKey", "certKey", "extraCertChain", "dhParameters", "caCertsDir")


def _files_relative_to(base, endpoint):
    """*endpoint* with the relative file arguments of an ``ssl:`` endpoint made absolute."""
    if endpoint.split(":", 1)[0] != "ssl":
        return endpoint
    parts = endpoint.replace("\\:", "\0").split(":")
    for i, part in enumerate(parts):
        name, sep, value = part.partition("=")
        if sep and name in _ENDPOINT_FILE_ARGS and value and not value.startswith("/"):
            parts[i] = f"{name}={_resolve(base, value)}".replace(":", "\0")
    return ":".join(parts).replace("\0", "\\:")


def _health_path(text):
    """A listener's ``health_path``: a path of its own, without query string or fragment."""
    path = units.non_empty(text)
    if not path.startswith("/") or any(c in path for c in "?# \t"):
        raise ValueError(f"expected a path such as /healthz (no query string), got {text!r}")
    return path


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


def _route(section, listener_names, policy_names):
    name = section.name.partition(":")[2]
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
        if policy not in policy_names:
            known = ", ".join(sorted(policy_names)) or "none"
            raise section.error("policies", f"no [policy:{policy}] section (known: {known})")
    return RouteSection(
        section, name, host, path, listeners, chosen,
        max_message_size=section.take("max_message_size", units.parse_size, None),
        idle_timeout=section.take("idle_timeout", units.parse_duration, None),
        allow_cross_origin=section.take("allow_cross_origin", units.parse_bool, False))
