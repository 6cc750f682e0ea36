"""Host and path matching: which route serves a request.

The default router orders routes once, at start-up, by specificity, so a
request is matched by walking a list and stopping at the first hit:

* host first: an exact name, then ``*.suffix`` (longest suffix first), then ``*``;
* then path: exact, then patterns with named segments (more literal segments
  first), then ``/prefix/*`` (longest prefix first);
* then the order of the routes in the config file.

Hosts compare case-insensitively with the port stripped; ``*.example.com``
does not match ``example.com``.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

from twisted.plugin import IPlugin
from zope.interface import implementer

from wsgate.interfaces import IRouter, IRouterFactory

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?$")


def strip_port(host: str) -> str:
    """``Example.COM:8080`` → ``example.com``; ``[::1]:80`` → ``[::1]``."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end >= 0 else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


@dataclass(frozen=True)
class HostPattern:
    """``*``, ``example.com`` or ``*.example.com``."""

    text: str
    suffix: str | None = None  # ".example.com" for a wildcard, None otherwise

    @classmethod
    def parse(cls, text: str) -> Self:
        """A host pattern from the config; ``ValueError`` says what was expected."""
        text = text.strip().lower()
        if text == "*":
            return cls("*")
        if text.startswith("*."):
            _check_host_labels(text[2:], text)
            return cls(text, suffix=text[1:])
        if "*" in text:
            raise ValueError(f"expected *, a host name or *.suffix, got {text!r}")
        _check_host_labels(text, text)
        return cls(text)

    def matches(self, host: str) -> bool:
        """Whether *host* (lower-case, without port: :func:`strip_port`) matches."""
        if self.text == "*":
            return True
        if self.suffix is not None:
            return host.endswith(self.suffix) and len(host) > len(self.suffix)
        return host == self.text

    @property
    def rank(self) -> tuple[int, int]:
        """Sort key: smaller is more specific."""
        if self.text == "*":
            return (2, 0)
        if self.suffix is not None:
            return (1, -len(self.suffix))
        return (0, 0)


def _check_host_labels(name: str, original: str) -> None:
    if name.startswith("[") and name.endswith("]"):
        return  # an IPv6 literal
    labels = name.split(".")
    if not all(_HOST_LABEL.match(label) for label in labels):
        raise ValueError(f"expected *, a host name or *.suffix, got {original!r}")


@dataclass(frozen=True)
class PathPattern:
    """``/echo`` (exact), ``/chat/{room}`` (named segments) or ``/api/*`` (prefix).

    A prefix pattern ``/api/*`` matches ``/api`` and everything below it; the
    part below is the *tail* (``/api/a/b`` → ``a/b``). A named segment matches
    one non-empty path segment.
    """

    text: str
    segments: tuple[tuple[str, str], ...]  # each ("lit", text) or ("var", name)
    prefix: bool

    @classmethod
    def parse(cls, text: str) -> Self:
        """A path pattern from the config; ``ValueError`` says what was expected."""
        text = text.strip()
        if not text.startswith("/"):
            raise ValueError(f"expected a path starting with /, got {text!r}")
        prefix = text == "/*" or text.endswith("/*")
        body = text[:-2] if prefix else text
        raw_segments = body.split("/")[1:] if body not in ("", "/") else []
        if text == "/":
            raw_segments = []
        segments: list[tuple[str, str]] = []
        names: set[str] = set()
        for raw in raw_segments:
            if raw.startswith("{") and raw.endswith("}"):
                name = raw[1:-1]
                if not _NAME.match(name) or name in ("path", "tail", "query"):
                    raise ValueError(
                        f"expected {{name}} placeholders with a letter first and not "
                        f"path/tail/query, got {raw!r} in {text!r}")
                if name in names:
                    raise ValueError(f"placeholder {raw} appears twice in {text!r}")
                names.add(name)
                segments.append(("var", name))
            elif "{" in raw or "}" in raw or "*" in raw:
                raise ValueError(
                    f"expected /exact, /with/{{name}} segments or /prefix/*, got {text!r}")
            elif raw == "" and raw_segments != [""]:
                raise ValueError(f"empty path segment in {text!r}")
            else:
                segments.append(("lit", raw))
        return cls(text, tuple(segments), prefix)

    @property
    def placeholders(self) -> tuple[str, ...]:
        """The names of the ``{name}`` segments, in order."""
        return tuple(value for kind, value in self.segments if kind == "var")

    @property
    def rank(self) -> tuple[int, int, int]:
        """Sort key: exact, then named-segment patterns, then prefixes."""
        literals = sum(1 for kind, _ in self.segments if kind == "lit")
        if self.prefix:
            return (2, -len(self.segments), -literals)
        if self.placeholders:
            return (1, -literals, -len(self.segments))
        return (0, 0, 0)

    def match(self, path: str) -> tuple[dict[str, str], str] | None:
        """Return ``(params, tail)`` when *path* matches, else ``None``."""
        parts = path.split("/")[1:] if path != "/" else [""]
        if self.text == "/":
            return ({}, "") if path == "/" else None
        n = len(self.segments)
        if self.prefix:
            if len(parts) < n:
                return None
            head, rest = parts[:n], parts[n:]
        else:
            if len(parts) != n:
                return None
            head, rest = parts, []
        params: dict[str, str] = {}
        for (kind, value), part in zip(self.segments, head):
            if kind == "lit":
                if part != value:
                    return None
            elif part == "":
                return None
            else:
                params[value] = part
        return params, "/".join(rest)


@dataclass(frozen=True)
class RouteMatch:
    """The outcome of routing: the route, its placeholder values and the tail."""

    route: Any  # the route's settings (wsgate.config.RouteSettings for the default router)
    params: dict[str, str] = field(default_factory=dict)
    tail: str = ""


class Routable(Protocol):
    """What the default router reads of a route (``wsgate.config.RouteSettings``)."""

    @property
    def host(self) -> HostPattern: ...

    @property
    def path(self) -> PathPattern: ...

    @property
    def listeners(self) -> Collection[str] | None:
        """The listeners it is served on; None: every one."""


@implementer(IRouter)
class DefaultRouter:
    """Matches routes by specificity (see the module docstring)."""

    def __init__(self, routes: Iterable[Routable]):
        indexed = list(enumerate(routes))
        indexed.sort(key=lambda item: (item[1].host.rank, item[1].path.rank, item[0]))
        self.routes = tuple(route for _, route in indexed)

    def route(self, host: str, path: str, listener: str) -> RouteMatch | None:
        host = strip_port(host)
        for route in self.routes:
            if route.listeners is not None and listener not in route.listeners:
                continue
            if not route.host.matches(host):
                continue
            found = route.path.match(path)
            if found is not None:
                params, tail = found
                return RouteMatch(route, params, tail)
        return None


@implementer(IPlugin, IRouterFactory)
class DefaultRouterFactory:
    """``[wsgate] router = default``: :class:`DefaultRouter`."""

    name = "default"

    def __call__(self, routes: Iterable[Routable]) -> DefaultRouter:
        return DefaultRouter(routes)


def resolve_router_factory(name: str) -> IRouterFactory:
    """The IRouterFactory for ``router = NAME`` (a plugin) or ``package.module:factory``;
    ``ValueError`` naming the known routers otherwise."""
    from wsgate import discovery

    return discovery.find(IRouterFactory, name, "router")


def build_router(config: Any) -> IRouter:
    """The router the config asks for (a ``wsgate.config.Config``), built over its routes."""
    return resolve_router_factory(config.core.router)(config.routes)
