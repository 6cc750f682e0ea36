"""Channel history: which channels keep it, positions, and the in-process store.

History belongs to the channel, not to a connection: the broadcast route
whose channel template matches a channel configures it (``history`` = N
messages, ``history_ttl``), so that every publish to the channel is recorded
(clients, the admin API, other processes), while nobody is subscribed too.
:class:`ChannelSettings` answers "what does channel X keep?" from the
routes; two routes whose templates can name one channel must agree (a
config error otherwise: :func:`templates_overlap`).

A position is ``EPOCH:SEQ``: SEQ counts the channel's recorded messages,
EPOCH names the store that counted them (a process start for the in-process
broker; the channel's history in Redis, made anew when it was lost or
expired), so a position from before a restart or from another store is
recognised instead of being misread.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any



@dataclass(frozen=True)
class ChannelPolicy:
    """What one broadcast route says about its channels."""

    history: int = 0  # messages kept; 0: count not bounded here (history_ttl alone)
    history_ttl: float = 0.0  # seconds a message is kept; 0: no age limit
    presence: bool = False
    join_leave: bool = False

    @property
    def keeps_history(self) -> bool:
        return self.history > 0 or self.history_ttl > 0


NO_POLICY = ChannelPolicy()

# history_ttl alone still needs a bound on the count: the most a channel keeps.
HISTORY_TTL_ONLY_MAX = 10000


def template_regex(template: str) -> re.Pattern[str]:
    """The channels *template* (``room:{room}``) names: each placeholder is one or more
    characters."""
    parts = re.split(r"\{[^{}]*\}", template)
    return re.compile("".join(re.escape(part) + ("(.+)" if i < len(parts) - 1 else "")
                              for i, part in enumerate(parts)) + r"\Z")


_STAR = object()


def _tokens(template: str) -> list[object]:
    tokens: list[object] = []
    for i, part in enumerate(re.split(r"\{[^{}]*\}", template)):
        if i:
            tokens += [None, _STAR]  # one character, then any number
        tokens += list(part)
    return tokens


def templates_overlap(a: str, b: str) -> bool:
    """Whether some channel matches both templates (placeholders: 1+ characters)."""
    ta, tb = _tokens(a), _tokens(b)

    @lru_cache(maxsize=None)
    def meet(i: int, j: int) -> bool:
        if i == len(ta) and j == len(tb):
            return True
        if i < len(ta) and ta[i] is _STAR and meet(i + 1, j):
            return True
        if j < len(tb) and tb[j] is _STAR and meet(i, j + 1):
            return True
        if i < len(ta) and j < len(tb):
            x, y = ta[i], tb[j]
            if x is None or y is None or x is _STAR or y is _STAR or x == y:
                ni = i if x is _STAR else i + 1
                nj = j if y is _STAR else j + 1
                if (ni, nj) != (i, j) and meet(ni, nj):
                    return True
        return False

    return meet(0, 0)


class ChannelSettings:
    """Channel → :class:`ChannelPolicy`, from the broadcast routes (``(template, policy)``
    pairs; the first whose template matches wins: they agree where they overlap)."""

    def __init__(self, routes: Iterable[tuple[str, ChannelPolicy]] = (),
                 max_history_channels: int = 10000):
        self.routes = [(template_regex(template), policy) for template, policy in routes
                       if policy != NO_POLICY]
        self.max_history_channels = max_history_channels
        self._cache: dict[str, ChannelPolicy] = {}

    def __call__(self, channel: str) -> ChannelPolicy:
        policy = self._cache.get(channel)
        if policy is None:
            policy = NO_POLICY
            for regex, candidate in self.routes:
                if regex.match(channel):
                    policy = candidate
                    break
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[channel] = policy
        return policy


def check_routes(routes: list[tuple[str, str, ChannelPolicy]]) -> tuple[str, str] | None:
    """The names of two routes (``(name, template, policy)``) whose templates overlap with
    different settings, or None."""
    for i, (name_a, template_a, policy_a) in enumerate(routes):
        for name_b, template_b, policy_b in routes[i + 1:]:
            if policy_a != policy_b and templates_overlap(template_a, template_b):
                return name_a, name_b
    return None


# ------------------------------------------------------------------ positions

# The position of a channel whose history holds nothing yet. Reading a position makes no
# history (a client may subscribe to any channel its route allows), so such a position
# has no epoch of its own: a position with SEQ 0 means "seen nothing", whatever its epoch,
# and is served from the start of the history while it still holds message 1.
NEW_EPOCH = "new"
NOTHING_YET = f"{NEW_EPOCH}:0"


def accepts(parsed: tuple[str, int] | None, epoch: str, last: int) -> bool:
    """Whether a history of *epoch* whose last message is *last* can serve the parsed
    position *parsed* (None: not a position): its own epoch, or SEQ 0 of any."""
    return parsed is not None and parsed[1] <= last and \
        (parsed[0] == epoch or parsed[1] == 0)



def format_position(epoch: str, seq: int) -> str:
    return f"{epoch}:{seq}"


def parse_position(text: str | None) -> tuple[str, int] | None:
    """``EPOCH:SEQ`` → ``(epoch, seq)``; None for anything else."""
    if not text:
        return None
    epoch, sep, seq = text.rpartition(":")
    if not sep or not epoch or not seq.isdigit() or len(text) > 200:
        return None
    return epoch, int(seq)


@dataclass(frozen=True)
class Recovery:
    """What a store answers for ``since``: the channel's current position, and either
    the messages after *since* (``ok``) or that they cannot be had (``ok`` False)."""

    position: str | None  # the channel's last position now (None: no history)
    ok: bool
    entries: tuple = ()  # ((position, Message), ...) after since, oldest first


class MemoryHistory:
    """The in-process store: per channel a ring of its last messages, at most
    ``max_history_channels`` channels (the least recently used are forgotten).

    Each channel's history has its own epoch, ``<process epoch>-<n>``: a channel
    forgotten and made again counts from 1 under a new epoch, so a position from
    before is never misread as one of the new history.
    """

    def __init__(self, clock: Any, settings: ChannelSettings | None = None):
        self.clock = clock
        self.settings = settings or ChannelSettings()
        self.epoch = secrets.token_hex(4)
        self._made = 0  # histories made: each gets the next epoch
        self._channels: collections.OrderedDict[str, list[Any]] = collections.OrderedDict()

    def _state(self, channel: str, policy: ChannelPolicy) -> list[Any]:
        """``[epoch, last seq, ring]`` of *channel*, made (and the oldest channel
        forgotten beyond max_history_channels) when it has none."""
        state = self._channels.get(channel)
        if state is None:
            self._made += 1
            limit = policy.history or HISTORY_TTL_ONLY_MAX
            state = self._channels[channel] = [f"{self.epoch}-{self._made}", 0,
                                               collections.deque(maxlen=limit)]
            while len(self._channels) > self.settings.max_history_channels:
                self._channels.popitem(last=False)
        else:
            self._channels.move_to_end(channel)
        return state

    def append(self, channel: str, message: Any) -> str | None:
        """Record *message* (a :class:`wsgate.pubsub.Message`) with its position; return
        the position (None: the channel keeps no history)."""
        policy = self.settings(channel)
        if not policy.keeps_history:
            return None
        state = self._state(channel, policy)
        state[1] += 1
        position = format_position(state[0], state[1])
        recorded = dataclasses.replace(message, pos=position)
        state[2].append((state[1], self.clock.seconds(), recorded))
        return position

    def position(self, channel: str) -> str | None:
        """The channel's current position; ``new:0`` before anything was recorded (a
        read makes no history: subscribers may name any channel)."""
        policy = self.settings(channel)
        if not policy.keeps_history:
            return None
        state = self._channels.get(channel)
        return format_position(state[0], state[1]) if state else NOTHING_YET

    def since(self, channel: str, since: str | None, limit: int = 0) -> Recovery:
        """The messages after *since* (all kept ones when None)."""
        policy = self.settings(channel)
        if not policy.keeps_history:
            return Recovery(None, False)
        state = self._channels.get(channel)
        if state is None:  # nothing recorded, or forgotten: only "nothing seen" is served
            parsed = parse_position(since) if since is not None else (NEW_EPOCH, 0)
            return Recovery(NOTHING_YET, parsed is not None and parsed[1] == 0)
        epoch, last = state[0], state[1]
        position = format_position(epoch, last)
        parsed = parse_position(since) if since is not None else (epoch, 0)
        if not accepts(parsed, epoch, last):
            return Recovery(position, False)
        entries = self._fresh(state, policy)
        after = [(seq, message) for seq, message in entries if seq > parsed[1]]
        first = after[0][0] if after else last + 1
        if parsed[1] < last and first != parsed[1] + 1 and since is not None:
            return Recovery(position, False)  # what followed *since* is gone
        if limit:
            after = after[:limit]
        return Recovery(position, True, tuple((message.pos, message) for _, message in after))

    def _fresh(self, state: list[Any], policy: ChannelPolicy) -> list[tuple[int, Any]]:
        ring = state[2]
        if policy.history_ttl:
            cutoff = self.clock.seconds() - policy.history_ttl
            while ring and ring[0][1] < cutoff:
                ring.popleft()
        return [(seq, message) for seq, _, message in ring]

    def channels(self) -> int:
        return len(self._channels)
