"""The HTTP/1.1 side of the upgrade: parse a request head, classify it, answer refusals.

The gateway reads the request head itself (rather than letting Autobahn do
it) so that routing, policies and limits decide *before* anything becomes a
WebSocket, and every refusal carries the status and headers an operator
expects (404, 405 + Allow, 426 + Upgrade, 503 + Retry-After, ...).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeVar, overload
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 16 * 1024
MAX_HEADERS = 100
RETRY_AFTER_SECONDS = 5  # what a 503 (draining, overloaded, upstream down) asks clients to wait


def retry_after() -> list[tuple[str, str]]:
    """The ``Retry-After`` header of every 503 the gateway sends."""
    return [("Retry-After", str(RETRY_AFTER_SECONDS))]

_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

TOKEN_CHARS = frozenset(
    "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")

_D = TypeVar("_D")


class HttpRefusal(Exception):
    """A request that is answered with an HTTP error instead of a 101.

    *reason* is a short label for logs and metrics (``no_route``,
    ``bad_handshake``, ...); *body* goes to the client; *headers* are extra
    response headers such as ``Retry-After``.
    """

    def __init__(self, status: int, reason: str, body: str | None = None,
                 headers: Iterable[tuple[str, str]] = (), route: str | None = None,
                 policy: str | None = None):
        super().__init__(status, reason)
        self.status = status
        self.reason = reason
        self.body = body if body is not None else _REASONS.get(status, "Error")
        self.headers = tuple(headers)
        self.route = route  # the route's name, when one matched (events, metrics)
        self.policy = policy  # the policy that refused, if one did
        self.identity: str | None = None  # set by the policy chain: the identity so far


@dataclass(frozen=True)
class RequestHead:
    """A parsed request head. Header names are lower-case; values keep their order."""

    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]  # ((name, value), ...) in arrival order, names lower-case
    raw: bytes

    @overload
    def get(self, name: str) -> str | None: ...

    @overload
    def get(self, name: str, default: _D) -> str | _D: ...

    def get(self, name: str, default: object = None) -> object:
        """The first value of header *name* (lower-case), or *default*."""
        for key, value in self.headers:
            if key == name:
                return value
        return default

    def get_all(self, name: str) -> list[str]:
        """Every value of header *name* (lower-case), in arrival order."""
        return [value for key, value in self.headers if key == name]

    def tokens(self, name: str) -> set[str]:
        """The comma-separated tokens of every *name* header, lower-cased."""
        return {
            token.strip().lower()
            for value in self.get_all(name) for token in value.split(",") if token.strip()
        }

    @property
    def host(self) -> str:
        """The Host header as sent (port included); empty when missing."""
        return self.get("host", "")

    @property
    def wants_websocket(self) -> bool:
        """Whether the client asked to upgrade to WebSocket (``Upgrade: websocket``)."""
        return "websocket" in self.tokens("upgrade")


def parse_head(raw: bytes) -> RequestHead:
    """Parse a complete request head (bytes up to and including the blank line).

    Raises :class:`HttpRefusal` (400) for anything that is not a well-formed
    HTTP/1.1 request head.
    """
    try:
        text = raw.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise HttpRefusal(400, "bad_handshake")
    lines = text[:-4].split("\r\n")
    request_line = lines[0].split(" ")
    if len(request_line) != 3:
        raise HttpRefusal(400, "bad_handshake", "Malformed request line")
    method, target, version = request_line
    if not method or not set(method) <= TOKEN_CHARS:
        raise HttpRefusal(400, "bad_handshake", "Malformed request line")
    if version != "HTTP/1.1":
        raise HttpRefusal(400, "bad_handshake", "HTTP/1.1 required")
    if not target.startswith("/"):
        raise HttpRefusal(400, "bad_handshake", "Malformed request target")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpRefusal(431, "bad_handshake", "Too many header fields")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name) <= TOKEN_CHARS:
            raise HttpRefusal(400, "bad_handshake", "Malformed header field")
        if any(ch in value for ch in "\r\n\0"):
            raise HttpRefusal(400, "bad_handshake", "Malformed header field")
        headers.append((name.lower(), value.strip(" \t")))
    split = urlsplit(target)
    if split.fragment or "#" in target:
        raise HttpRefusal(400, "bad_handshake", "Fragment in request target")
    head = RequestHead(method, split.path, split.query, tuple(headers), raw)
    if len(head.get_all("host")) != 1:
        raise HttpRefusal(400, "bad_handshake", "Exactly one Host header required")
    return head


def check_websocket_upgrade(head: RequestHead) -> None:
    """Validate the RFC 6455 parts of an upgrade request (after routing).

    Raises :class:`HttpRefusal` with the answer the contract gives: 405 for
    another method, 426 + ``Upgrade`` when the client did not ask to upgrade,
    426 + ``Sec-WebSocket-Version: 13`` for another version, 400 otherwise.
    """
    if head.method != "GET":
        raise HttpRefusal(405, "bad_handshake", "Method Not Allowed", [("Allow", "GET")])
    if not head.wants_websocket:
        raise HttpRefusal(
            426, "bad_handshake", "Expected Upgrade: websocket",
            [("Upgrade", "websocket"), ("Connection", "Upgrade, close")])
    if "upgrade" not in head.tokens("connection"):
        raise HttpRefusal(400, "bad_handshake", "Expected Connection: Upgrade")
    versions = head.get_all("sec-websocket-version")
    if len(versions) != 1 or versions[0].strip() != "13":
        raise HttpRefusal(
            426, "bad_handshake", "Unsupported WebSocket version",
            [("Sec-WebSocket-Version", "13")])
    keys = head.get_all("sec-websocket-key")
    if len(keys) != 1 or not _valid_key(keys[0]):
        raise HttpRefusal(400, "bad_handshake", "Missing or malformed Sec-WebSocket-Key")


def _valid_key(key: str) -> bool:
    key = key.strip()
    if len(key) != 24:
        return False
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def render_head(first_line: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """The bytes of an HTTP head: *first_line* (a status or request line), then each
    ``(name, value)`` of *headers*, then the blank line."""
    lines = [first_line]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def render_refusal(refusal: HttpRefusal) -> bytes:
    """The bytes of a complete HTTP response for *refusal* (``Connection: close``)."""
    body = (refusal.body + "\n").encode("utf-8")
    headers = [("Content-Type", "text/plain; charset=utf-8"),
               ("Content-Length", str(len(body)))]
    headers.extend(refusal.headers)
    if not any(name.lower() == "connection" for name, _ in refusal.headers):
        headers.append(("Connection", "close"))
    return render_head(f"HTTP/1.1 {refusal.status} {_REASONS.get(refusal.status, 'Error')}",
                       headers) + body


def render_file(body: bytes, content_type: str, head_only: bool = False) -> bytes:
    """A 200 response carrying *body* (static routes)."""
    head = render_head("HTTP/1.1 200 OK", [
        ("Content-Type", content_type), ("Content-Length", str(len(body))),
        ("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff"),
        ("Connection", "close")])
    return head + (b"" if head_only else body)
