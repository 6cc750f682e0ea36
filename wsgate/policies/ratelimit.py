"""``type = ratelimit``: upgrades per key (GCRA), and optionally messages per connection.

GCRA (the generic cell rate algorithm) keeps one number per key, the
theoretical arrival time, so a limit of ``rate`` with ``burst`` costs a dict
entry per active key and O(1) work per request. ``scope = broker`` keeps that
number in Redis and updates it in one Lua script, so several gateway processes
share the limit; when Redis is unreachable ``on_broker_down`` decides.
``messages = N/s`` limits each connection's incoming messages: over the limit
the connection is closed with 1008 (``message_action = close``) or the
message is dropped (``drop``).
"""

import math

from twisted.logger import Logger
from zope.interface import implementer

from wsgate import http, units
from wsgate.interfaces import IPolicy, IPolicySession
from wsgate.policies import DROP, Allow, Close, Deny, PolicyConfigError
from wsgate.policies.base import PolicyType, choice, parse_rate
from wsgate.policies.keys import key_of, parse_key

_log = Logger()
_SWEEP_EVERY = 1024


class Gcra:
    """Rate *rate* per second with *burst* requests allowed at once, per key."""

    def __init__(self, rate, burst, clock):
        self.interval = 1.0 / rate
        self.tolerance = self.interval * burst
        self.clock = clock
        self.tats = {}
        self._calls = 0

    def take(self, key=None):
        """Return 0 when allowed (and count it), else the seconds until it would be."""
        now = self.clock.seconds()
        tat = max(self.tats.get(key, now), now)
        new_tat = tat + self.interval
        wait = new_tat - now - self.tolerance
        if wait > 0:
            return wait
        self.tats[key] = new_tat
        self._calls += 1
        if self._calls % _SWEEP_EVERY == 0:
            self._sweep(now)
        return 0

    def _sweep(self, now):
        for key in [key for key, tat in self.tats.items() if tat <= now]:
            del self.tats[key]


@implementer(IPolicySession)
class MessageLimit:
    """One connection's message budget."""

    def __init__(self, gcra, action):
        self.gcra, self.action = gcra, action

    def message(self, direction, is_binary, size):
        if direction != "in" or not self.gcra.take():
            return None
        return DROP if self.action == "drop" else Close(1008, "message rate exceeded")

    def closed(self):
        pass


@implementer(IPolicy)
class RateLimitPolicy:
    mode = "enforce"

    def __init__(self, name, rate, burst, key, clock, messages=None, shared=None,
                 on_broker_down="allow"):
        self.name, self.key, self.clock = name, key, clock
        self.local = Gcra(rate, burst, clock)
        self.rate, self.burst = rate, burst
        self.messages = messages  # (rate, burst, action) or None
        self.shared = shared  # a wsgate.pubsub.limits.SharedLimiter, or None
        self.on_broker_down = on_broker_down
        self._warned_down = False

    def _allowed(self):
        if self.messages is None:
            return None
        rate, burst, action = self.messages
        return Allow(session=MessageLimit(Gcra(rate, burst, self.clock), action))

    @staticmethod
    def _deny(wait):
        return Deny(429, "Too many requests", (("Retry-After", str(max(1, math.ceil(wait)))),))

    def check(self, request):
        key = key_of(self.key, request)
        if self.shared is None:
            wait = self.local.take(key)
            return self._deny(wait) if wait else self._allowed()
        d = self.shared.take(f"{self.name}:{key}", self.rate, self.burst)
        d.addCallback(self._shared_verdict)
        d.addErrback(self._broker_down)
        return d

    def _shared_verdict(self, wait):
        self._warned_down = False  # the broker answers again
        return self._deny(wait) if wait else self._allowed()

    def _broker_down(self, failure):
        # Once per outage: every upgrade meets it, and clients can make many (the
        # broker itself logs the outage and its end).
        if not self._warned_down:
            self._warned_down = True
            _log.warn("wsgate: ratelimit {name}: broker unreachable ({why}); on_broker_down = "
                      "{action} until it is back", name=self.name,
                      why=failure.getErrorMessage(), action=self.on_broker_down)
        if self.on_broker_down == "deny":
            return Deny(503, "Rate limit unavailable", http.retry_after())
        return self._allowed()


def build(name, settings, context):
    count, rate = settings.get("rate", parse_rate)
    burst = settings.get("burst", units.parse_positive_int, max(1, int(count)))
    messages = None
    if settings.has("messages"):
        m_count, m_rate = settings.get("messages", parse_rate)
        messages = (m_rate, settings.get("message_burst", units.parse_positive_int,
                                         max(1, int(m_count))),
                    settings.get("message_action", choice("close", "drop"), "close"))
    else:
        for key in ("message_burst", "message_action"):
            if settings.has(key):
                raise PolicyConfigError(key, "only applies with messages = N/s")
    scope = settings.get("scope", choice("local", "broker"), "local")
    shared = None
    if scope == "broker":
        shared = context.shared_limiter(settings.get("broker", str, None))
    elif settings.has("broker") or settings.has("on_broker_down"):
        raise PolicyConfigError("scope", "broker and on_broker_down need scope = broker")
    return RateLimitPolicy(
        name, rate, burst, settings.get("key", parse_key, ("ip", None)), context.clock,
        messages, shared, settings.get("on_broker_down", choice("allow", "deny"), "allow"))


ratelimit = PolicyType(
    "ratelimit", ("rate", "burst", "key", "scope", "broker", "on_broker_down", "messages",
                  "message_burst", "message_action"), build)
