"""Policies used by the tests through ``type = policy_fixtures:NAME`` (tests/ is on PYTHONPATH)."""

from twisted.internet import defer, reactor
from zope.interface import implementer

from wsgate.interfaces import IPolicy
from wsgate.policies import Allow, Deny


@implementer(IPolicy)
class _Slow:
    mode = "enforce"

    def __init__(self, name, verdict):
        self.name, self.verdict = name, verdict

    def check(self, request):
        d = defer.Deferred()
        reactor.callLater(0.2, d.callback, self.verdict)
        return d


@implementer(IPolicy)
class _Raises:
    mode = "enforce"

    def __init__(self, name):
        self.name = name

    def check(self, request):
        raise RuntimeError("secret internals: do not leak")


def slow_allow(name, settings, context):
    return _Slow(name, Allow(identity="slow-ok"))


def slow_deny(name, settings, context):
    return _Slow(name, Deny(403, "slowly denied"))


def raises(name, settings, context):
    return _Raises(name)


@implementer(IPolicy)
class _Headers:
    mode = "enforce"

    def __init__(self, name):
        self.name = name

    def check(self, request):
        # a mapping, as a plugin author would naturally write it (issue 16, item 14)
        return Allow(identity="mapped", headers={"X-Team": "blue", "X-Tier": "gold"})


@implementer(IPolicy)
class _Nonsense:
    mode = "enforce"

    def __init__(self, name):
        self.name = name

    def check(self, request):
        return Allow(headers={"X-Bad": "line\r\nInjected: yes"})


def dict_headers(name, settings, context):
    return _Headers(name)


def bad_headers(name, settings, context):
    return _Nonsense(name)
