"""Finding extension factories by name: policies, routers and route targets.

One lookup for the three kinds, so they are found and reported alike: a
plugin's ``name`` (twisted.plugin's ``getPlugins`` over the ``wsgate.plugins``
namespace, where built-ins are offered too) or ``package.module:attribute``.
"""

from __future__ import annotations

import importlib
from typing import Any

from zope.interface.interface import InterfaceClass


def plugins(interface: InterfaceClass) -> dict[str, Any]:
    """``{name: factory}`` for every plugin providing *interface*."""
    from twisted.plugin import getPlugins

    import wsgate.plugins

    return {factory.name: factory for factory in getPlugins(interface, wsgate.plugins)}


def find(interface: InterfaceClass, name: str, what: str,
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
