"""Same-origin by default: was an upgrade sent by a page of the site it addresses?

The defence against cross-site WebSocket hijacking for routes without an
``origin`` policy. A browser always sends ``Origin`` on a WebSocket upgrade
and a page cannot forge it, while the user's cookies go along whichever page
opened the socket. A request is cross-origin when its ``Origin`` names
another host or port than the one the request was sent to:

* the request's host is its ``Host`` header, or the first ``X-Forwarded-Host``
  value when the peer is a trusted proxy (``trusted_proxies``);
* hosts compare case-insensitively (a trailing dot ignored; IPv6 literals
  in their canonical form, ``[::1]`` = ``[0:0::1]``);
* an ``Origin`` without a port has its scheme's default (``http``/``ws`` 80,
  ``https``/``wss`` 443); a ``Host`` without a port has the default of the
  scheme the client used: 443 on a TLS listener, the ``X-Forwarded-Proto``
  of a trusted proxy, and otherwise 80 or 443 (a plain listener may sit
  behind a TLS-terminating proxy that does not say so);
* ``Origin: null`` (sandboxed frames, ``file:`` pages, some redirects), an
  origin of another scheme without a port, an unparseable one, or several
  ``Origin`` headers are cross-origin;
* no ``Origin`` at all passes: it is not a browser, and a non-browser
  client can send any ``Origin`` it likes anyway.

Schemes are not compared: a host and a port name one service, as the
contract pins it. Pure logic, no Twisted.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wsgate.http import RequestHead

DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}

# scheme://host[:port], host a name or a bracketed IPv6 literal; nothing after but an
# optional "/" (browsers send none; a hand-written client might).
_ORIGIN = re.compile(r"^([a-z][a-z0-9+.-]*)://(\[[0-9a-f:.]+\]|[^\[\]/:@?#\s]+)"
                     r"(?::(\d{1,5}))?/?$")
_AUTHORITY = re.compile(r"^(\[[0-9a-f:.]+\]|[^\[\]/:@?#\s]+)(?::(\d{1,5}))?$")


@dataclass(frozen=True)
class Authority:
    """A host (lower case, IPv6 literals canonical and bracketed) and a port (None: none
    given and no default known)."""

    host: str
    port: int | None


def _host(text: str) -> str | None:
    text = text.rstrip(".")
    if text.startswith("["):
        try:
            return f"[{ipaddress.IPv6Address(text[1:-1]).compressed}]"
        except ValueError:
            return None
    return text or None


def _port(text: str | None) -> int | None:
    if text is None:
        return None
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(port)
    return port


def parse_origin(value: str) -> Authority | None:
    """The host and port of an ``Origin`` value (the scheme's default port filled in),
    or None when it names no host and port: ``null``, garbage, or a scheme without a
    default port given without one."""
    match = _ORIGIN.match(value.strip().lower())
    if match is None:
        return None
    scheme, host, port = match.groups()
    host = _host(host)
    try:
        port = _port(port)
    except ValueError:
        return None
    if port is None:
        port = DEFAULT_PORTS.get(scheme)
    if host is None or port is None:
        return None
    return Authority(host, port)


def parse_authority(value: str) -> Authority | None:
    """``host[:port]`` as in ``Host`` or ``X-Forwarded-Host`` (port None when absent), or
    None when it is not one."""
    match = _AUTHORITY.match(value.strip().lower())
    if match is None:
        return None
    host = _host(match.group(1))
    try:
        port = _port(match.group(2))
    except ValueError:
        return None
    return None if host is None else Authority(host, port)


def _first(values: list[str]) -> str | None:
    """The first item of a comma-separated header (the client-facing hop's value)."""
    return values[0].split(",", 1)[0] if values else None


def request_authority(head: RequestHead, trusted_peer: bool) -> Authority | None:
    """Where the client sent the request: ``Host``, or a trusted proxy's
    ``X-Forwarded-Host`` (None: neither names a host)."""
    value = _first(head.get_all("x-forwarded-host")) if trusted_peer else None
    if not value or not value.strip():
        value = head.get("host")
    return parse_authority(value) if value else None


def request_default_port(head: RequestHead, tls: bool, trusted_peer: bool) -> int | None:
    """The port a ``Host`` without one stands for: 443 on a TLS listener, the trusted
    proxy's ``X-Forwarded-Proto``'s default, or None (80 or 443, it cannot be told)."""
    if tls:
        return 443
    if trusted_peer:
        proto = _first(head.get_all("x-forwarded-proto"))
        if proto is not None:
            return DEFAULT_PORTS.get(proto.strip().lower())
    return None


def same_authority(origin: Authority, target: Authority, default_port: int | None) -> bool:
    """Whether *origin* (port filled in) names *target*, whose missing port is
    *default_port*, or either default port when that is None."""
    if origin.host != target.host:
        return False
    port = target.port if target.port is not None else default_port
    if port is None:
        return origin.port in (80, 443)
    return origin.port == port


def is_cross_origin(head: RequestHead, tls: bool = False, trusted_peer: bool = False) -> bool:
    """Whether the upgrade *head* comes from another origin than the one it addresses.

    *tls*: it arrived on a TLS listener; *trusted_peer*: the peer is in the
    listener's ``trusted_proxies`` (its ``X-Forwarded-Host`` and
    ``X-Forwarded-Proto`` are believed). See the module docstring for the rules.
    """
    values = head.get_all("origin")
    if not values:
        return False
    if len(values) > 1:
        return True
    origin = parse_origin(values[0])
    target = request_authority(head, trusted_peer)
    if origin is None or target is None:
        return True
    return not same_authority(origin, target, request_default_port(head, tls, trusted_peer))


def checks_origin(policy: object) -> bool:
    """Whether *policy* decides on ``Origin`` itself (a ``checks_origin = True``
    attribute, as the built-in ``origin`` policy has), enforcing or in shadow mode."""
    return getattr(policy, "checks_origin", False) is True


def applies(allow_cross_origin: bool, policies: Iterable[object]) -> bool:
    """Whether a route gets the default check: it did not opt out
    (``allow_cross_origin = yes``) and none of its *policies* checks ``Origin`` itself."""
    return not allow_cross_origin and not any(checks_origin(p) for p in policies)
