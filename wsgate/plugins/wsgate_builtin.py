"""The built-in policy types, offered through the same plugin discovery as third-party ones."""

from wsgate.policies.apikey import apikey
from wsgate.policies.connlimit import connlimit
from wsgate.policies.firewall import firewall
from wsgate.policies.jwtauth import jwt_type
from wsgate.policies.origin import origin
from wsgate.policies.ratelimit import ratelimit

__all__ = ["apikey", "jwt_type", "ratelimit", "firewall", "origin", "connlimit"]
