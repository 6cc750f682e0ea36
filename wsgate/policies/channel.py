"""``type = channel``: which broadcast channels a client may join, and publish to.

The route's resolved channel (its ``broadcast`` template with the path's
placeholders filled in, :attr:`~wsgate.policies.UpgradeRequest.channel`) is
checked against comma-separated patterns::

    subscribe = room:*, user:{identity}, {claim:rooms}
    publish = user:{identity}

In a pattern ``*`` matches any run of characters (``:`` included; the empty
run too), ``{identity}`` is the identity an earlier policy set (none: the
pattern matches nothing) and ``{claim:NAME}`` a claim an earlier policy
exposed (a JWT's verified claims, an API key's ``label``): a list claim
stands for each of its elements in turn, a number or boolean for its
``str()``, and a missing, null or object claim matches nothing. What is
substituted is literal: a ``*`` in an identity or a claim is a ``*``, never a
wildcard.

A channel no ``subscribe`` pattern matches is denied with 403 before the
upgrade. With ``publish`` set, a client allowed to subscribe but whose
channel no ``publish`` pattern matches is let in with a session that closes
the connection with 1008 on its first message; without ``publish`` only the
route's ``client_publish`` decides. The policy belongs on broadcast routes
only (:attr:`ChannelPolicy.needs_channel`, checked by the config's build).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from zope.interface import implementer

from wsgate import units
from wsgate.interfaces import IPolicy, IPolicySession
from wsgate.policies import Allow, Close, Deny
from wsgate.policies.base import PolicyType, Settings

if TYPE_CHECKING:
    from wsgate.policies import PolicyContext, UpgradeRequest

CLOSE_POLICY_VIOLATION = 1008


class _Star:
    """The wildcard of a pattern (one object, told apart from text by identity)."""

    def __repr__(self) -> str:
        return "*"


STAR = _Star()


@dataclass(frozen=True)
class Identity:
    """``{identity}`` in a pattern."""


@dataclass(frozen=True)
class Claim:
    """``{claim:NAME}`` in a pattern."""

    name: str


# A pattern's pieces: literal text, the wildcard, or a placeholder.
Piece = str | _Star | Identity | Claim


@dataclass(frozen=True)
class Pattern:
    """One channel pattern, parsed once at start-up."""

    text: str
    pieces: tuple[Piece, ...]

    @classmethod
    def parse(cls, text: str) -> Pattern:
        """Read one pattern; raise ``ValueError`` on a placeholder other than
        ``{identity}`` and ``{claim:NAME}``, or a stray brace."""
        pieces: list[Piece] = []
        rest = text
        while rest:
            literal, brace, rest = rest.partition("{")
            if "}" in literal:
                raise ValueError(f"unbalanced '}}' in pattern {text!r}")
            pieces.extend(_literal_pieces(literal))
            if not brace:
                break
            name, closing, rest = rest.partition("}")
            if not closing or "{" in name:
                raise ValueError(f"unbalanced '{{' in pattern {text!r}")
            pieces.append(_placeholder(name, text))
        return cls(text, tuple(pieces))

    def matches(self, channel: str, identity: str | None,
                claims: Mapping[str, Any]) -> bool:
        """Whether *channel* is one of the channels this pattern stands for, given the
        request's *identity* and *claims*.

        The pieces are matched in order, keeping the set of places in *channel*
        the pattern so far can end at: a placeholder's values are tried from each
        of them, so a list claim costs its length times the channel's, never the
        product of several lists' lengths (a token with a long list claim and a
        pattern with a few placeholders cannot make this explode).
        """
        ends = {0}
        for piece in self.pieces:
            values: Collection[str]
            if isinstance(piece, _Star):
                ends = set(range(min(ends), len(channel) + 1))
                continue
            if isinstance(piece, str):
                values = (piece,)
            elif isinstance(piece, Identity):
                values = () if identity is None else (str(identity),)
            else:  # only values that occur in the channel can be part of a match
                values = {value for value in claim_values(claims, piece.name)
                          if value in channel}
            ends = {end + len(value) for end in ends for value in values
                    if channel.startswith(value, end)}
            if not ends:
                return False
        return len(channel) in ends


def _literal_pieces(literal: str) -> list[str | _Star]:
    """*literal* (text between placeholders) split at its wildcards."""
    pieces: list[str | _Star] = []
    for i, text in enumerate(literal.split("*")):
        if i:
            pieces.append(STAR)
        if text:
            pieces.append(text)
    return pieces


def _placeholder(name: str, pattern: str) -> Identity | Claim:
    if name == "identity":
        return Identity()
    kind, colon, claim = name.partition(":")
    if kind == "claim" and colon and claim:
        return Claim(claim)
    raise ValueError(f"unknown placeholder {{{name}}} in pattern {pattern!r} (expected "
                     "{identity} or {claim:NAME})")


def claim_values(claims: Mapping[str, Any], name: str) -> list[str]:
    """The texts claim *name* stands for: a string itself, a number or boolean its
    ``str()``, a list each of those elements; missing, null, objects: none."""
    value = claims.get(name) if claims else None
    if isinstance(value, (list, tuple)):
        return [text for text in map(_scalar, value) if text is not None]
    text = _scalar(value)
    return [] if text is None else [text]


def _scalar(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    return None


@dataclass(frozen=True)
class Patterns:
    """A ``subscribe`` or ``publish`` list: a channel is allowed when any pattern matches."""

    patterns: tuple[Pattern, ...]

    @classmethod
    def parse(cls, text: str) -> Patterns:
        items = units.parse_list(text)
        if not items:
            raise ValueError("expected at least one pattern (comma-separated)")
        return cls(tuple(Pattern.parse(item) for item in items))

    def allow(self, channel: str, identity: str | None, claims: Mapping[str, Any]) -> bool:
        return any(pattern.matches(channel, identity, claims) for pattern in self.patterns)

    def __str__(self) -> str:
        return ", ".join(pattern.text for pattern in self.patterns)


@implementer(IPolicySession)
class PublishDenied:
    """The session of a client that may subscribe but not publish: its first message
    closes the connection with 1008. Holds no state (one instance serves all)."""

    def message(self, direction: Literal["in", "out"], is_binary: bool,
                size: int) -> Close | None:
        if direction != "in":
            return None
        return Close(CLOSE_POLICY_VIOLATION, "publishing to this channel is not allowed")

    def closed(self) -> None:
        pass


PUBLISH_DENIED = PublishDenied()


@implementer(IPolicy)
class ChannelPolicy:
    """See the module docstring."""

    mode = "enforce"
    # Only a route with a channel (broadcast) may list it: the config's build checks.
    needs_channel = True

    def __init__(self, name: str, subscribe: Patterns, publish: Patterns | None = None):
        self.name = name
        self.subscribe, self.publish = subscribe, publish

    def check(self, request: UpgradeRequest) -> Allow | Deny | None:
        channel, identity, claims = request.channel, request.identity, request.claims
        if channel is None or not self.subscribe.allow(channel, identity, claims):
            return Deny(403, "Channel not allowed")
        if self.publish is None or self.publish.allow(channel, identity, claims):
            return None
        return Allow(session=PUBLISH_DENIED)


def build(name: str, settings: Settings, context: PolicyContext) -> ChannelPolicy:
    return ChannelPolicy(name, settings.get("subscribe", Patterns.parse),
                         settings.get("publish", Patterns.parse, None))


channel = PolicyType("channel", ("subscribe", "publish"), build)
