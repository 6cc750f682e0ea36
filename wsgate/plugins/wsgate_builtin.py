"""The built-in policy types, router and route targets, offered through the same plugin
discovery as third-party ones."""

from wsgate.policies.apikey import apikey
from wsgate.policies.channel import channel
from wsgate.policies.connlimit import connlimit
from wsgate.policies.firewall import firewall
from wsgate.policies.jwtauth import jwt_type
from wsgate.policies.origin import origin
from wsgate.policies.ratelimit import ratelimit
from wsgate.routing import DefaultRouterFactory
from wsgate.targets.broadcast import broadcast
from wsgate.targets.echo import echo
from wsgate.targets.proxy import proxy
from wsgate.targets.static import static

default_router = DefaultRouterFactory()

__all__ = ["apikey", "jwt_type", "ratelimit", "firewall", "origin", "connlimit", "channel",
           "default_router", "echo", "broadcast", "proxy", "static"]
