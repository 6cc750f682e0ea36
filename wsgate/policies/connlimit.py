"""``type = connlimit``: at most ``max`` concurrent connections per key (ip, identity, header).

A slot is taken when the policy allows a request and given back when the
connection ends, or when the upgrade fails later (its session's ``closed``).
"""

import math

from zope.interface import implementer

from wsgate import units
from wsgate.interfaces import IPolicy, IPolicySession
from wsgate.policies import Allow, Deny
from wsgate.policies.base import PolicyType
from wsgate.policies.keys import key_of, parse_key


@implementer(IPolicySession)
class _Slot:
    def __init__(self, counts, key):
        self.counts, self.key = counts, key

    def message(self, direction, is_binary, size):
        return None

    def closed(self):
        left = self.counts.get(self.key, 0) - 1
        if left > 0:
            self.counts[self.key] = left
        else:
            self.counts.pop(self.key, None)


@implementer(IPolicy)
class ConnLimitPolicy:
    mode = "enforce"

    def __init__(self, name, maximum, key, retry_after):
        self.name, self.maximum, self.key, self.retry_after = name, maximum, key, retry_after
        self.counts = {}

    def check(self, request):
        key = key_of(self.key, request)
        if self.counts.get(key, 0) >= self.maximum:
            return Deny(429, "Too many connections",
                        (("Retry-After", str(max(1, math.ceil(self.retry_after)))),))
        self.counts[key] = self.counts.get(key, 0) + 1
        return Allow(session=_Slot(self.counts, key))


def build(name, settings, context):
    return ConnLimitPolicy(name, settings.get("max", units.parse_positive_int),
                           settings.get("key", parse_key, ("ip", None)),
                           settings.get("retry_after", units.parse_duration, 5.0))


connlimit = PolicyType("connlimit", ("max", "key", "retry_after"), build)
