"""The build step: parsed config data → the objects a gateway runs with.

TLS contexts (the certificate files are read here), policies (their
factories get the reactor passed in), targets (a static route reads its
files, a wss:// upstream gets its TLS options) and the router's lookup. It
listens on nothing and connects nowhere, so ``wsgate check`` runs it too.
Errors are :class:`~wsgate.config.model.ConfigError`, naming file, section
and key.
"""

import dataclasses

from wsgate import policies as policy_api
from wsgate import targets, units
from wsgate.config.model import Config, ConfigError, RouteSettings
from wsgate.settings import SettingError


def build(parsed, reactor):
    """The :class:`Config` for *parsed* (:class:`wsgate.config.parse.Parsed`)."""
    _check_router(parsed.path, parsed.core.router)
    listeners = tuple(_listener(parsed.path, listener) for listener in parsed.listeners)
    policies = _policies(parsed, reactor)
    routes = tuple(_route(parsed, route, policies) for route in parsed.routes)
    _check_workers(parsed, routes)
    _check_pool_tls(parsed, routes)
    _check_channels(parsed, routes)
    return Config(parsed.path, parsed.core, listeners, routes, policies, parsed.brokers,
                  parsed.admin, parsed.pools)


def _listener(path, listener):
    """*listener* with its TLS context, when it has TLS files."""
    files = listener.tls_files
    if files is None:
        return listener
    from wsgate import tls  # pyOpenSSL: imported when a TLS listener is built

    try:
        server_tls = tls.ServerTLS.load(files.cert, files.key, files.sni_dir, files.min_version)
    except tls.TLSConfigError as e:
        raise ConfigError(path, f"listen:{listener.name}", e.key, e.message) from None
    return dataclasses.replace(listener, tls=server_tls)


def _check_router(path, name):
    from wsgate.routing import resolve_router_factory

    try:
        resolve_router_factory(name)
    except ValueError as e:
        raise ConfigError(path, "wsgate", "router", str(e)) from None


def _policies(parsed, reactor):
    """Build every ``[policy:NAME]`` with its type's factory (built-in or plugin)."""
    if not parsed.policies:
        return {}
    known = policy_api.discovered_factories()
    context = policy_api.PolicyContext(reactor, parsed.base, parsed.brokers,
                                       parsed.core.broker)
    built = {}
    for section in parsed.policies:
        name = section.name.partition(":")[2]
        try:
            factory = policy_api.resolve_factory(section.take("type", units.non_empty), known)
        except SettingError as e:
            raise section.error(e.key, e.message) from None
        mode = section.take("mode", units.choice(*policy_api.MODES), "enforce")
        keys = tuple(getattr(factory, "keys", ()))
        settings = {key: section.items[key] for key in keys if key in section.items}
        section.used.update(keys)
        section.finish()
        try:
            policy = factory(name, settings, context)
        except SettingError as e:
            raise section.error(e.key, e.message) from None
        except Exception as e:  # a plugin's own bug: still one clear line
            raise section.error(None, f"the {factory!r} policy factory failed: {e}") from None
        policy.mode = mode
        if getattr(policy, "name", None) is None:
            policy.name = name
        built[name] = policy
    return built


def _route(parsed, route, policies):
    section = route.section
    try:
        target, keys = targets.build(route.name, section.items,
                                     targets.TargetContext(route.path, parsed.base,
                                                           parsed.pools))
    except SettingError as e:
        raise section.error(e.key, e.message) from None
    except ConfigError:
        raise
    except Exception as e:  # a plugin's own bug: still one clear line
        raise section.error(None, f"the target factory failed: {e}") from None
    section.used.update(keys | {"target"})
    section.finish()
    if route.allow_cross_origin and not target.websocket:
        raise section.error("allow_cross_origin", "applies to WebSocket routes only (this "
                            "route serves plain GET requests)")
    _check_channel_policies(section, target, route.policies, policies)
    return RouteSettings(
        name=route.name, host=route.host, path=route.path, target=target,
        listeners=route.listeners, policies=tuple(policies[name] for name in route.policies),
        max_message_size=route.max_message_size, idle_timeout=route.idle_timeout,
        allow_cross_origin=route.allow_cross_origin)


def _check_channel_policies(section, target, names, policies):
    """A policy that checks the route's channel (``needs_channel``: ``type = channel``)
    is listed on routes that have one (broadcast) only."""
    if getattr(target, "channel_for", None) is not None:
        return
    for name in names:
        if getattr(policies[name], "needs_channel", False):
            raise section.error("policies", f"[policy:{name}] checks a broadcast channel: "
                                "list it on broadcast routes only")


def _check_pool_tls(parsed, routes):
    """Routes that share a pool verify its wss:// servers alike: the pool's health checks
    use their settings."""
    seen = {}
    for route in routes:
        pool = getattr(route.target, "pool", None)
        if pool is None:
            continue
        tls = (route.target.verify, route.target.ca)
        first = seen.setdefault(pool, (route.name, tls))
        if first[1] != tls:
            section = next(r.section for r in parsed.routes if r.name == route.name)
            raise section.error("upstream_verify", f"routes sharing [upstream:{pool}] must "
                                f"set upstream_verify and upstream_ca alike (see "
                                f"[route:{first[0]}])")


def _broadcast_routes(routes):
    return [(route.name, route.target.channel, route.target.policy) for route in routes
            if getattr(route.target, "type", None) == "broadcast"
            and hasattr(route.target, "policy")]


def _check_channels(parsed, routes):
    """History, presence and join/leave belong to the channel: two broadcast routes that
    can name one channel must set them alike."""
    from wsgate.pubsub.history import check_routes

    clash = check_routes(_broadcast_routes(routes))
    if clash is not None:
        section = next(r.section for r in parsed.routes if r.name == clash[1])
        raise section.error("history", f"this route and [route:{clash[0]}] can name the same "
                            "channel: history, history_ttl, presence and join_leave belong "
                            "to the channel and must be set alike on both")


def channel_settings(config):
    """The :class:`wsgate.pubsub.history.ChannelSettings` of *config*'s broadcast routes."""
    from wsgate.pubsub.history import ChannelSettings

    return ChannelSettings([(template, policy) for _, template, policy in
                            _broadcast_routes(config.routes)],
                           config.core.max_history_channels)


def pool_health_tls(config):
    """``{pool: {server key: client TLS options}}`` for the health checks of wss:// pools,
    from the first route that names each pool (they all agree)."""
    result = {}
    for route in config.routes:
        pool = getattr(route.target, "pool", None)
        if pool is not None and pool not in result:
            result[pool] = dict(route.target.tls_by_server or {})
    return result


def _check_workers(parsed, routes):
    """With several worker processes, channels must live in a shared broker."""
    core = parsed.core
    if core.workers == 1:
        return
    broker = parsed.brokers.get(core.broker) if core.broker else None
    if any(route.target.needs_shared_broker for route in routes) and \
            (broker is None or broker.type != "redis"):
        raise ConfigError(parsed.path, "wsgate", "workers", "workers > 1 with broadcast "
                          "routes needs a Redis broker ([wsgate] broker naming a "
                          "[broker:NAME] type = redis)")
