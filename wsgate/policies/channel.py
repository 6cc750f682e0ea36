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

import itertools
from collections.abc import Iterator, Mapping, Sequence
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
        request's *identity* and *claims*."""
        return any(_glob_match(glob, channel)
                   for glob in self._globs(channel, identity, claims))

    def _globs(self, channel: str, identity: str | None,
               claims: Mapping[str, Any]) -> Iterator[list[str | _Star]]:
        """The pattern with its placeholders substituted, one list of text and
        wildcards per combination of values. A value that does not occur in
        *channel* cannot be part of a match: leaving it out keeps the
        combinations of several list claims few."""
        choices: list[Sequence[str | _Star]] = []
        for piece in self.pieces:
            if isinstance(piece, (str, _Star)):
                choices.append((piece,))
                continue
            if isinstance(piece, Identity):
                values = [] if identity is None else [str(identity)]
            else:
                values = claim_values(claims, piece.name)
            values = [value for value in values if value in channel]
            if not values:
                return  # nothing to substitute: the pattern matches nothing
            choices.append(values)
        for combination in itertools.product(*choices):
            yield list(combination)


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


def _glob_match(glob: list[str | _Star], channel: str) -> bool:
    """Whether *channel* matches *glob* (text and wildcards), the whole of it.

    Adjacent texts are joined into pieces separated by wildcards; the first
    piece must start the channel, the last end it, and the others follow in
    order in between (taking each at its first place is never worse).
    """
    pieces = [""]
    for part in glob:
        if isinstance(part, _Star):
            pieces.append("")
        else:
            pieces[-1] += part
    if len(pieces) == 1:
        return channel == pieces[0]
    first, middle, last = pieces[0], pieces[1:-1], pieces[-1]
    start, end = len(first), len(channel) - len(last)
    if start > end or not channel.startswith(first) or not channel.endswith(last):
        return False
    for piece in middle:
        found = channel.find(piece, start, end)
        if found < 0:
            return False
        start = found + len(piece)
    return True


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
