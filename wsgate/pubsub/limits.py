"""Rate limits shared by every gateway process: GCRA in one Redis Lua script.

The script reads the key's theoretical arrival time, decides and writes it
back atomically, using Redis's own clock so that every gateway agrees on
time. It returns ``{allowed, wait in ms}``.
"""

from twisted.internet import defer

from wsgate.pubsub.redis import BrokerDown

GCRA_SCRIPT = b"""
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval
local wait = new_tat - now - tolerance
if wait > 0 then return {0, wait} end
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil(new_tat - now) + 1)
return {1, 0}
"""


class SharedLimiter:
    """A GCRA limiter whose state lives in a Redis broker (attached at start-up)."""

    def __init__(self, broker_settings):
        self.broker_settings = broker_settings
        self.broker = None  # a RedisBroker, attached by the service

    def take(self, key, rate, burst):
        """A Deferred firing with 0 (allowed) or the seconds to wait; fails when Redis is down."""
        if self.broker is None:
            return defer.fail(BrokerDown("redis is not connected"))
        try:
            protocol = self.broker.command()
        except BrokerDown as e:
            return defer.fail(e)
        interval_ms = 1000.0 / rate
        prefix = self.broker.settings.prefix
        d = protocol.eval(GCRA_SCRIPT, keys=[f"{prefix}ratelimit:{key}"],
                          args=[repr(interval_ms), repr(interval_ms * burst)])
        return d.addCallback(lambda reply: 0 if int(reply[0]) else int(reply[1]) / 1000.0)
