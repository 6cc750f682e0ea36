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


parse_rate = units.parse_rate
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
