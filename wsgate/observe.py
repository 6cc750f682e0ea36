"""Structured events and the log observers that write them.

Connection events (``websocket.connection.accepted`` and friends) are ordinary
twisted.logger events that carry ``wsgate_event`` (the event name) and
``wsgate_fields`` (the contract's fields). The JSON observer writes each event
as one JSON object per line (NDJSON, no RFC 7464 separator), with ``level``
when it is above ``info``; the text observer keeps Twisted's readable format.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, TYPE_CHECKING, Any

from twisted.logger import (
    FileLogObserver,
    Logger,
    LogLevel,
    formatEvent,
    formatEventAsClassicLogText,
)

if TYPE_CHECKING:
    from constantly import NamedConstant
    from twisted.logger import LogEvent

events = Logger(namespace="wsgate.events")


def emit(name: str, text: str, level: NamedConstant = LogLevel.info, **fields: object) -> None:
    """Log the event *name* with its *fields* at *level* (a ``LogLevel``); *text* is the
    readable line.

    *text* may use the fields as ``{name}`` placeholders (twisted.logger format).
    """
    events.emit(level, text, wsgate_event=name, wsgate_fields=fields, **fields)


def _iso_time(timestamp: float | None) -> str:
    moment = datetime.fromtimestamp(timestamp or 0, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_as_json(event: LogEvent, node_id: str) -> str:
    """One log event → a JSON text line (with its newline)."""
    name = event.get("wsgate_event")
    record = {"event": name or "log", "time": _iso_time(event.get("log_time")),
              "node_id": node_id}
    if name:
        record.update(event.get("wsgate_fields", {}))
        level = event.get("log_level")
        if level is not None and level > LogLevel.info:
            record["level"] = level.name
    else:
        level = event.get("log_level")
        record["level"] = level.name if level is not None else "info"
        record["namespace"] = event.get("log_namespace")
        record["message"] = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
    return json.dumps(record, default=str, separators=(",", ":")) + "\n"


def json_observer(node_id: str, stream: IO[str] | None = None) -> FileLogObserver:
    """An ``ILogObserver`` writing NDJSON to *stream* (default: standard output)."""
    stream = stream if stream is not None else sys.stdout
    return FileLogObserver(stream, lambda event: event_as_json(event, node_id))


def text_observer(stream: IO[str] | None = None) -> FileLogObserver:
    """Twisted's classic text format, one event per line."""
    stream = stream if stream is not None else sys.stdout
    return FileLogObserver(stream, formatEventAsClassicLogText)


def format_address(address: object) -> str:
    """An ``IAddress`` → ``ip:port`` (``[ip]:port`` for IPv6, the path for UNIX sockets)."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None:
        name = getattr(address, "name", None)
        return name.decode() if isinstance(name, bytes) else str(name or "unix")
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def log_message(connection: Any, verb: str, size: int, is_binary: bool) -> None:
    """``websocket.message.received`` / ``.sent`` for *connection* (a
    :class:`wsgate.gateway.Connection`); only with ``log_messages = yes``."""
    emit(f"websocket.message.{verb}", f"message {verb} on {{route}}: {{size}} bytes",
         size=size, binary=is_binary, **connection.fields())
