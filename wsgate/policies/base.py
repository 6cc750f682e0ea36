"""Helpers for policy types: reading a section's settings, declaring a plugin."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from twisted.plugin import IPlugin
from zope.interface import implementer

from wsgate import units
from wsgate.interfaces import IPolicy, IPolicyFactory
from wsgate.settings import Settings

if TYPE_CHECKING:
    from wsgate.policies import PolicyContext


def parse_rate(text: str) -> tuple[float, float]:
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


def status_code(*allowed: int) -> Callable[[str], int]:
    """A parser accepting one of the HTTP statuses *allowed* → int."""
    def parse(text: str) -> int:
        value: int | None
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

    def __init__(self, name: str, keys: Iterable[str],
                 build: Callable[[str, Settings, PolicyContext], IPolicy]):
        self.name = name
        self.keys = tuple(keys)
        self._build = build

    def __call__(self, name: str, settings: Mapping[str, str], context: PolicyContext) -> IPolicy:
        return self._build(name, Settings(settings), context)


__all__ = ["Settings", "PolicyType", "parse_rate", "choice", "status_code", "units"]
