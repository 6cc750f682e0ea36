"""Finding extension factories by name: policies, routers and route targets.

One lookup for the three kinds, so they are found and reported alike. A
name is ``package.module:attribute``, or a plugin's ``name`` found by:

1. twisted.plugin's ``getPlugins`` over the ``wsgate.plugins`` namespace
   (where the built-ins are offered too): a distribution ships
   ``wsgate/plugins/NAME.py``;
2. entry points of the group ``wsgate.policies``, ``wsgate.routers`` or
   ``wsgate.targets`` (these also work for editable installs, ``pip install -e``).

When two plugins claim one name, the first found in that order wins (so no
plugin can replace a built-in), and the other is named in a warning.
"""

from __future__ import annotations

import importlib
from typing import Any, TypeAlias

# A zope interface, typed as a class as twisted.plugin.getPlugins types it.
InterfaceType: TypeAlias = "type[Any]"


def _groups() -> dict[InterfaceType, str]:
    from wsgate.interfaces import IPolicyFactory, IRouterFactory, ITargetFactory

    return {IPolicyFactory: "wsgate.policies", IRouterFactory: "wsgate.routers",
            ITargetFactory: "wsgate.targets"}


def plugins(interface: InterfaceType) -> dict[str, Any]:
    """``{name: factory}`` for every plugin providing *interface* (see the module docstring)."""
    from importlib.metadata import entry_points

    from twisted.logger import Logger
    from twisted.plugin import getPlugins

    import wsgate.plugins

    found: dict[str, Any] = {}
    for factory in getPlugins(interface, wsgate.plugins):
        found.setdefault(factory.name, factory)
    group = _groups().get(interface)
    for entry in entry_points(group=group) if group else ():
        try:
            factory = entry.load()
        except Exception as e:  # a broken distribution: say which, use the others
            Logger().warn("wsgate: entry point {entry} ({group}) cannot be loaded: {error}",
                          entry=entry.value, group=group, error=e)
            continue
        name = getattr(factory, "name", entry.name)
        if name in found:
            if found[name] is not factory:
                Logger().warn("wsgate: {name!r} of entry point {entry} ({group}) is taken "
                              "by another plugin; ignored", name=name, entry=entry.value,
                              group=group)
            continue
        found[name] = factory
    return found


def find(interface: InterfaceType, name: str, what: str,
         known: dict[str, Any] | None = None) -> Any:
    """The factory called *name* (``NAME`` or ``package.module:attribute``).

    Raises ``ValueError`` naming the known *what* (``policy type``, ``router``,
    ``target``) when there is none.
    """
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import {name}: {e}") from None
    known = plugins(interface) if known is None else known
    if name not in known:
        raise ValueError(f"unknown {what} {name!r} (known: {', '.join(sorted(known))})")
    return known[name]
