"""Who is in a channel (``presence = yes``), across processes.

A member is ``{"id", "identity", "node", "since"}``: the connection id, the
identity the policies gave it, the gateway node and when it joined (Unix
time). :class:`MemoryPresence` knows this process's members only.
:class:`RedisPresence` keeps, per channel, a sorted set of members scored
by their expiry (Redis 7.0 has no per-field expiry): each node refreshes its
own members every ``ttl / 3`` and a read drops the expired ones first, so a
crashed node's members disappear within ``ttl`` (the broker's
``presence_ttl``, 30 s).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_log = Logger()


def member(conn_id: str, identity: str | None, node: str, since: float) -> dict[str, Any]:
    return {"id": conn_id, "identity": identity, "node": node, "since": round(since, 3)}


class MemoryPresence:
    """This process's members per channel."""

    def __init__(self) -> None:
        self._channels: dict[str, dict[str, dict[str, Any]]] = {}

    def join(self, channel: str, entry: dict[str, Any]) -> None:
        self._channels.setdefault(channel, {})[entry["id"]] = entry

    def leave(self, channel: str, conn_id: str) -> None:
        members = self._channels.get(channel)
        if members is not None:
            members.pop(conn_id, None)
            if not members:
                del self._channels[channel]

    def members(self, channel: str, limit: int = 0) -> defer.Deferred[list[dict[str, Any]]]:
        """The channel's members, oldest first; at most *limit* of them (0: all)."""
        members = sorted(self._channels.get(channel, {}).values(),
                         key=lambda m: (m["since"], m["id"]))
        return defer.succeed(members[:limit] if limit else members)


class RedisPresence(MemoryPresence):
    """Members in Redis (see the module docstring); this process's own are also kept
    locally, to refresh them and to take them out when they leave."""

    def __init__(self, broker: Any, clock: Any, ttl: float = 30.0):
        super().__init__()
        self.broker = broker
        self.clock = clock
        self.ttl = ttl
        self._refresh = LoopingCall(self.refresh)
        self._refresh.clock = clock

    def start(self) -> None:
        self._refresh.start(self.ttl / 3, now=False)

    def stop(self) -> None:
        if self._refresh.running:
            self._refresh.stop()

    def _key(self, channel: str) -> bytes:
        return self.broker.prefix + b"presence:" + channel.encode()

    @staticmethod
    def _value(entry: dict[str, Any]) -> bytes:
        return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode()

    def join(self, channel: str, entry: dict[str, Any]) -> None:
        super().join(channel, entry)
        self._write(channel, [entry])

    def leave(self, channel: str, conn_id: str) -> None:
        entry = self._channels.get(channel, {}).get(conn_id)
        super().leave(channel, conn_id)
        if entry is not None:
            self._command("ZREM", self._key(channel), self._value(entry))

    def refresh(self) -> None:
        """Push every local member's expiry forward (a crashed node stops doing this)."""
        for channel, members in list(self._channels.items()):
            self._write(channel, list(members.values()))

    def _write(self, channel: str, entries: list[dict[str, Any]]) -> None:
        expiry = int((self.clock.seconds() + self.ttl) * 1000)
        args: list[Any] = []
        for entry in entries:
            args += [expiry, self._value(entry)]
        key = self._key(channel)
        self._command("ZADD", key, *args)
        self._command("PEXPIRE", key, int(self.ttl * 1000))

    def _command(self, *args: Any) -> defer.Deferred[Any]:
        try:
            protocol = self.broker.command()
        except Exception as e:  # BrokerDown: the next refresh writes again
            return defer.fail(e)
        d = protocol.execute_command(*args)
        d.addErrback(lambda failure: None)  # an outage: the refresh repeats it
        return d

    def members(self, channel: str, limit: int = 0) -> defer.Deferred[list[dict[str, Any]]]:
        """The channel's members across processes (expired ones dropped first); at most
        *limit* of them (0: all), which ones then is Redis's choice."""
        try:
            protocol = self.broker.command()
        except Exception as e:
            return defer.fail(e)
        key = self._key(channel)
        now = int(self.clock.seconds() * 1000)
        d = protocol.execute_command("ZREMRANGEBYSCORE", key, b"-inf", now)
        d.addCallback(lambda _: protocol.execute_command("ZRANGE", key, 0, limit - 1))

        def parse(values: list[bytes]) -> list[dict[str, Any]]:
            result = []
            for value in values or ():
                try:
                    result.append(json.loads(value))
                except ValueError:
                    continue
            return sorted(result, key=lambda m: (m.get("since", 0), m.get("id", "")))
        return d.addCallback(parse)
