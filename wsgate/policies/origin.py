"""``type = origin``: the Origin header must be one of the allowed origins.

The defence against cross-site WebSocket hijacking: a browser always sends
Origin, and another site's page must not ride on the user's cookies. Allowed
origins are full origins (scheme, host, optional port); ``*`` stands for one
or more host labels (``https://*.example.com`` matches ``https://a.b.example.com``
but not ``https://example.com``). A route with this policy (enforcing or in
shadow mode) does not get the gateway's same-origin default: the policy's
list replaces it.
"""

import re

from zope.interface import implementer

from wsgate import units
from wsgate.interfaces import IPolicy
from wsgate.policies import Deny, PolicyConfigError
from wsgate.policies.base import PolicyType

_ORIGIN = re.compile(r"^(https?|wss?)://(\*\.)?([a-z0-9.-]+|\[[0-9a-f:.]+\])(:\d+)?$")


def _pattern(text):
    text = text.strip().lower().rstrip("/")
    if text == "null":
        return re.compile("^null$")
    match = _ORIGIN.match(text)
    if not match:
        raise ValueError(f"expected origins such as https://app.example.com or "
                         f"https://*.example.com, got {text!r}")
    scheme, wildcard, host, port = match.groups()
    regex = re.escape(scheme) + "://"
    if wildcard:
        regex += r"(?:[a-z0-9-]+\.)+"
    regex += re.escape(host) + re.escape(port or "")
    return re.compile("^" + regex + "$")


@implementer(IPolicy)
class OriginPolicy:
    mode = "enforce"
    # The route's Origin is decided here, so the gateway's same-origin default
    # (wsgate.sameorigin) steps aside, in shadow mode too.
    checks_origin = True

    def __init__(self, name, patterns, allow_missing):
        self.name, self.patterns, self.allow_missing = name, patterns, allow_missing

    def check(self, request):
        origin = request.header("origin")
        if origin is None:
            return None if self.allow_missing else Deny(403, "Origin required")
        origin = origin.strip().lower().rstrip("/")
        if any(pattern.match(origin) for pattern in self.patterns):
            return None
        return Deny(403, "Origin not allowed")


def build(name, settings, context):
    patterns = settings.get("allow", lambda t: tuple(_pattern(i) for i in units.parse_list(t)), ())
    if not patterns:
        raise PolicyConfigError("allow", "expected at least one origin")
    return OriginPolicy(name, patterns, settings.get("allow_missing", units.parse_bool, False))


origin = PolicyType("origin", ("allow", "allow_missing"), build)
