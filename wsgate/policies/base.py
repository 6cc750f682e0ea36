"""Helpers for policy types: reading a section's settings, declaring a plugin."""

from zope.interface import implementer

from twisted.plugin import IPlugin

from wsgate import units
from wsgate.interfaces import IPolicyFactory
from wsgate.settings import Settings

def parse_rate(text):
    """``10/s``, ``100/m``, ``1000/h`` → (count, per-second rate)."""
    count, sep, unit = text.strip().partition("/")
    seconds = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(unit.strip())
    try:
        number = float(count)
    except ValueError:
        number = -1
    if not sep or seconds is None or not 0 < number <= 1e9:  # refuses inf, nan, 1e20
        raise ValueError(f"expected a rate such as 10/s, 100/m or 1000/h, got {text!r}")
    return number, number / seconds


choice = units.choice


def status_code(*allowed):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(map(str, allowed))}, got {text!r}")
        return value
    return parse


@implementer(IPlugin, IPolicyFactory)
class PolicyType:
    """A built-in policy type as a plugin: *build(name, settings, context)* makes the policy."""

    def __init__(self, name, keys, build):
        self.name = name
        self.keys = tuple(keys)
        self._build = build

    def __call__(self, name, settings, context):
        return self._build(name, Settings(settings), context)


__all__ = ["Settings", "PolicyType", "parse_rate", "choice", "status_code", "units"]
