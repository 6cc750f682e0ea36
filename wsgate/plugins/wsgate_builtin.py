"""The built-in policy types and router, offered through the same plugin discovery as
third-party ones."""

from wsgate.policies.apikey import apikey
from wsgate.policies.connlimit import connlimit
from wsgate.policies.firewall import firewall
from wsgate.policies.jwtauth import jwt_type
from wsgate.policies.origin import origin
from wsgate.policies.ratelimit import ratelimit
from wsgate.routing import DefaultRouterFactory

default_router = DefaultRouterFactory()

__all__ = ["apikey", "jwt_type", "ratelimit", "firewall", "origin", "connlimit",
           "default_router"]
