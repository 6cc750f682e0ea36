"""Who the client is, and which headers an upstream gets (pure logic).

``trusted_proxies`` decides whose ``X-Forwarded-For`` is believed. From an
untrusted peer (the default: nobody is trusted, loopback included) an incoming
``X-Forwarded-For`` or ``Forwarded`` is discarded and replaced, never appended
to. From a trusted peer the chain is kept and extended, and the client is the
right-most address in it that is not itself a trusted proxy.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias
from urllib.parse import unquote_plus

if TYPE_CHECKING:
    from wsgate.http import RequestHead

Address: TypeAlias = "ipaddress.IPv4Address | ipaddress.IPv6Address"
Network: TypeAlias = "ipaddress.IPv4Network | ipaddress.IPv6Network"

# RFC 7230 hop-by-hop headers plus the handshake headers the gateway writes itself.
HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailer", "transfer-encoding", "upgrade", "content-length", "host",
))
ALWAYS_FORWARDED = ("cookie", "authorization", "origin", "user-agent")
GATEWAY_WRITTEN = frozenset((
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip", "forwarded",
    "x-request-id", "sec-websocket-key", "sec-websocket-version", "sec-websocket-protocol",
    "sec-websocket-extensions",
))


def parse_networks(text_items: Iterable[str]) -> tuple[Network, ...]:
    """CIDR strings → networks; raises ValueError naming the bad item."""
    networks = []
    for item in text_items:
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"expected CIDR networks such as 10.0.0.0/8 or ::1/128, "
                             f"got {item!r}") from None
    return tuple(networks)


def _address(text: str) -> Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # ipv4:port
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def is_trusted(address: str | Address, networks: Iterable[Network]) -> bool:
    """Whether *address* (text as in a header, or parsed) is in one of *networks*."""
    ip = _address(address) if isinstance(address, str) else address
    return ip is not None and any(ip in net for net in networks)


@dataclass(frozen=True)
class ClientOrigin:
    """The client as the gateway believes it, and the chain to forward."""

    ip: str  # the client's address (after trusted proxies)
    forwarded_for: str  # the X-Forwarded-For value to send upstream
    forwarded: tuple[str, ...]  # previous RFC 7239 Forwarded elements to keep (trusted peers only)
    trusted_peer: bool = False  # the TCP peer is a trusted proxy (its X-Forwarded-* count)


def client_origin(peer_ip: str, head: RequestHead, trusted: Collection[Network]) -> ClientOrigin:
    """Resolve the client behind *peer_ip* given the request *head* and *trusted* networks."""
    if not trusted or not is_trusted(peer_ip, trusted):
        return ClientOrigin(peer_ip, peer_ip, ())
    chain = [item.strip() for value in head.get_all("x-forwarded-for")
             for item in value.split(",") if item.strip()]
    client = peer_ip
    for hop in reversed(chain):
        ip = _address(hop)
        if ip is None:
            break  # garbage in the chain: believe nothing before it
        client = str(ip)
        if not is_trusted(ip, trusted):
            break
    forwarded_for = ", ".join(chain + [peer_ip])
    previous = tuple(value for value in head.get_all("forwarded"))
    return ClientOrigin(client, forwarded_for, previous, trusted_peer=True)


def _forwarded_node(ip: str) -> str:
    return f'"[{ip}]"' if ":" in ip else ip


def forwarded_headers(origin: ClientOrigin, head: RequestHead, conn_id: str, is_tls: bool,
                      route_forward_headers: Iterable[str] = (),
                      exclude: Collection[str] = ()) -> list[tuple[str, str]]:
    """The headers (name, value) the upstream gets besides the WebSocket handshake ones.

    *exclude* names (lower-case) client headers kept from the upstream although
    they would be forwarded (what policies strip, e.g. a consumed API key).
    """
    proto = "https" if is_tls else "http"
    host = head.host
    element = f"for={_forwarded_node(origin.forwarded_for.split(',')[-1].strip())};" \
              f"proto={proto}"
    if host:
        element += f';host="{host}"'
    forwarded = ", ".join(origin.forwarded + (element,))
    headers = [
        ("X-Forwarded-For", origin.forwarded_for),
        ("X-Forwarded-Proto", proto),
        ("X-Forwarded-Host", host),
        ("X-Real-IP", origin.ip),
        ("Forwarded", forwarded),
        ("X-Request-Id", conn_id),
    ]
    wanted = (set(ALWAYS_FORWARDED) | {name.lower() for name in route_forward_headers}) \
        - set(exclude)
    for name, value in head.headers:
        if name in wanted and name not in HOP_BY_HOP and name not in GATEWAY_WRITTEN:
            headers.append((_canonical(name), value))
    return headers


def query_without(query: str, names: Collection[str]) -> str:
    """The query string *query* without the parameters called *names* (compared decoded,
    as policies read them); the other parameters are kept byte for byte, in order."""
    if not names:
        return query
    return "&".join(part for part in query.split("&")
                    if unquote_plus(part.partition("=")[0]) not in names)


def _canonical(name: str) -> str:
    return "-".join(part.capitalize() for part in name.split("-"))
