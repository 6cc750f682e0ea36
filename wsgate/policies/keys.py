"""What a per-client limit counts by: ``ip``, ``identity``, ``header:NAME`` or ``route``."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from wsgate.policies import UpgradeRequest

# ("ip" | "identity" | "route", None) or ("header", lower-case name)
KeySpec: TypeAlias = "tuple[str, str | None]"


def parse_key(text: str) -> KeySpec:
    """A ``key = ...`` value → the spec :func:`key_of` reads; ``ValueError`` otherwise."""
    text = text.strip()
    lower = text.lower()
    if lower in ("ip", "identity", "route"):
        return (lower, None)
    if lower.startswith("header:") and len(text) > 7:
        return ("header", text[7:].strip().lower())
    raise ValueError(f"expected ip, identity, header:NAME or route, got {text!r}")


def key_of(spec: KeySpec, request: UpgradeRequest) -> str:
    """The limit key of *request*; falls back to the client address when missing."""
    kind, name = spec
    if kind == "ip":
        return "ip:" + request.client
    if kind == "identity":
        return ("id:" + request.identity) if request.identity else "ip:" + request.client
    if kind == "route":
        return "route:" + request.route
    value = request.header(name)
    return ("h:" + value) if value else "ip:" + request.client
