"""Route targets: what serves a route once its policies accepted a request.

A target provides :class:`wsgate.interfaces.ITarget`; its ``accept``
returns the protocol that takes the client's connection over. Built-in:

* :mod:`~wsgate.targets.echo` and :mod:`~wsgate.targets.broadcast`:
  WebSockets wsgate terminates itself, as :class:`~wsgate.interfaces.IWebSocketApp`
  objects run by :mod:`~wsgate.targets.websocket` (Autobahn);
* :mod:`~wsgate.targets.proxy`: the upstream-first handshake, then
  :mod:`~wsgate.targets.relay` splices the two WebSockets;
* :mod:`~wsgate.targets.static`: small files for plain GET requests.

More types are plugins (:class:`~wsgate.interfaces.ITargetFactory`), found
like policies and selected in a route with ``target = NAME``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from wsgate import discovery
from wsgate.interfaces import ITargetFactory
from wsgate.settings import SettingError, Settings

# The built-in types are chosen by the key that names them, as the config
# has always written them (echo = yes, broadcast = CHANNEL, upstream = URL,
# static = DIR); any type, a plugin's included, by target = NAME.
SELECTING_KEYS = ("echo", "broadcast", "upstream", "static")


@dataclass(frozen=True)
class TargetContext:
    """What a target factory may use besides its keys."""

    path: Any  # the route's wsgate.routing.PathPattern (placeholders a template may use)
    config_dir: str  # relative file names are relative to the config file's folder
    pools: Any = None  # name → wsgate.upstreams.config.PoolSettings ([upstream:NAME])


@dataclass
class Accepted:
    """A request the route and its policies accepted, handed to ``ITarget.accept``."""

    gateway: Any  # wsgate.gateway.Gateway: clock, broker, stats, listener settings
    listener: Any  # the ListenerSettings it arrived on
    match: Any  # wsgate.routing.RouteMatch: route, params, tail
    head: Any  # wsgate.http.RequestHead
    connection: Any  # wsgate.gateway.Connection: the bookkeeping, identity included
    origin: Any  # wsgate.forwarding.ClientOrigin: the client behind trusted proxies
    headers: tuple = ()  # (name, value) pairs the policies add to an upstream request
    fast: bool = False  # [wsgate] fast_paths
    strip_headers: tuple = ()  # client headers the policies keep from an upstream
    strip_query: tuple = ()  # query parameters the policies keep from an upstream

    @property
    def route(self):
        return self.match.route


def factories() -> dict[str, Any]:
    """``{type name: factory}`` for every ITargetFactory plugin (the built-ins included)."""
    return discovery.plugins(ITargetFactory)


def build(route: str, raw: dict[str, str], context: TargetContext,
          known: dict[str, Any] | None = None) -> tuple[Any, set[str]]:
    """The target for a route section's *raw* keys, and the keys it read.

    Raises :class:`SettingError` naming the key at fault.
    """
    chosen = [key for key in SELECTING_KEYS if key in raw]
    if "target" in raw:
        chosen.append("target")
    if not chosen:
        raise SettingError(None, "expected one target: echo = yes, broadcast = CHANNEL, "
                           "upstream = URL, static = DIR or target = NAME (a plugin)")
    if len(chosen) > 1:
        raise SettingError(chosen[1], f"a route has one target; {chosen[0]} is set too")
    name = raw["target"] if chosen[0] == "target" else chosen[0]
    try:
        factory = discovery.find(ITargetFactory, name.strip(), "target",
                                 factories() if known is None else known)
    except ValueError as e:
        raise SettingError("target", str(e)) from None
    keys = set(getattr(factory, "keys", ())) | {chosen[0]}
    settings = Settings({key: value for key, value in raw.items() if key in keys})
    return factory(route, settings, context), keys


class TargetType:
    """A target type as a plugin: ``build(route, settings, context)`` makes the target.

    The built-in types are offered this way too (``wsgate/plugins/wsgate_builtin.py``).
    """

    def __init__(self, name: str, keys: tuple[str, ...], build: Any):
        self.name = name
        self.keys = tuple(keys)
        self._build = build

    def __call__(self, route: str, settings: Settings, context: TargetContext) -> Any:
        return self._build(route, settings, context)


def _declare_plugin() -> None:
    from twisted.plugin import IPlugin
    from zope.interface import classImplements

    classImplements(TargetType, IPlugin, ITargetFactory)


_declare_plugin()
