"""RFC 6455 frame headers for the splice relay: scan a byte stream, build control frames.

The proxy passes data frames through unchanged (client frames stay masked,
upstream frames unmasked, compressed payloads stay compressed) and only reads
frame *headers*: to count messages and bytes, to enforce ``max_message_size``
and ``max_fragments`` before any byte of an offending frame is forwarded, and
to know the frame boundaries where the gateway may inject its own control
frames. Control frames (close, ping, pong: at most 125 bytes) are collected
whole so the relay can read them (close codes) or swallow them (pongs
answering the gateway's pings); a close frame RFC 6455 forbids on the wire is
never handed on. With permessage-deflate, :class:`InflateLimit` holds
``max_message_size`` on the inflated size of each message as well.

Once a rule is broken the scanner stops forwarding: it reads at most
:data:`CLOSE_REPLY_FRAMES` more frames looking for the peer's close reply,
then ignores its input, so a peer that goes on sending costs nothing more.
"""

from __future__ import annotations

import enum
import os
import struct
import zlib
from collections.abc import Callable
from typing import Final, Literal, Protocol, TypeAlias, final

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
_DATA_OPCODES = frozenset((OP_CONTINUATION, OP_TEXT, OP_BINARY))
_RSV1 = 0x40

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")

MAX_REASON_BYTES = 123  # a close frame's payload is at most 125 bytes, 2 of them the code
CLOSE_REPLY_FRAMES = 64  # frames still parsed after a violation, looking for the close reply
UNLIMITED = 1 << 62


def wire_close_code(code: int) -> bool:
    """Whether *code* may appear in a close frame on the wire (RFC 6455 §7.4, IANA).

    1000–1003 and 1007–1014 are defined for the wire (1004 is reserved; 1005,
    1006 and 1015 are for reporting only), 3000–4999 are for libraries and
    applications; everything else is forbidden.
    """
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def kick_code(code: int | None) -> bool:
    """Whether the admin API may close a connection with *code* (a kick): 1000, 1001,
    1008 or an application's 3000–4999."""
    return code in (1000, 1001, 1008) or (code is not None and 3000 <= code <= 4999)


def close_frame_error(payload: bytes) -> str | None:
    """Why a close frame with *payload* (unmasked) must not be relayed, or None.

    Empty is fine (no status); otherwise a 2-byte code allowed on the wire
    (:func:`wire_close_code`) followed by a UTF-8 reason (RFC 6455 §5.5.1).
    """
    if not payload:
        return None
    if len(payload) == 1:
        return "close frame with a 1-byte payload"
    code = _U16.unpack_from(payload)[0]
    if not wire_close_code(code):
        return f"close code {code} is not allowed on the wire"
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        return CLOSE_REASON_NOT_UTF8
    return None


CLOSE_REASON_NOT_UTF8 = "close reason is not UTF-8"


class ControlFrame:
    """A whole control frame: *payload* unmasked, *raw* exactly as it arrived."""

    __slots__ = ("opcode", "payload", "raw")

    def __init__(self, opcode: int, payload: bytes, raw: bytes):
        self.opcode, self.payload, self.raw = opcode, payload, raw

    def close_code_reason(self) -> tuple[int | None, str]:
        """``(code, reason)`` of a close frame; ``(None, "")`` when it has no status."""
        if len(self.payload) < 2:
            return None, ""
        code = _U16.unpack_from(self.payload)[0]
        return code, self.payload[2:].decode("utf-8", "replace")


@final
class Violation:
    """The stream broke a rule: the relay closes the sender with *code* and *reason*.

    *closed* is ``(code, reason)`` of the sender's own close frame when that
    frame was the offence (a code forbidden on the wire, an invalid reason, an
    oversize close): the sender has closed already, no reply will follow.
    """

    __slots__ = ("code", "reason", "closed")

    def __init__(self, code: int, reason: str, closed: tuple[int | None, str] | None = None):
        self.code, self.reason, self.closed = code, reason, closed

    def __repr__(self) -> str:
        return f"Violation({self.code}, {self.reason!r})"


class _Drop(enum.Enum):
    DROP_MESSAGE = "drop message"


# From *on_message*: the message's frames are not passed on (a sentinel; an enum
# member so that type checkers tell it from a Violation).
DROP_MESSAGE: Final = _Drop.DROP_MESSAGE
# What *on_message* returns: None (pass the message), DROP_MESSAGE or a Violation.
MessageVerdict: TypeAlias = "Violation | Literal[_Drop.DROP_MESSAGE] | None"

_DEFLATE_TAIL = b"\x00\x00\xff\xff"  # RFC 7692 §7.2.2: removed by the sender, appended back
_INFLATE_STEP = 64 * 1024  # inflated bytes produced (and discarded) per zlib call


class InflateLimit:
    """Measures how far each permessage-deflate message inflates, keeping none of it.

    The relay makes every client message a DEFLATE stream of its own (it
    answers the client with ``client_no_context_takeover``, RFC 7692
    §7.1.1.1), so :meth:`start` takes a fresh decompressor per message and the
    message's end drops it. Output comes at most ``_INFLATE_STEP`` bytes at a
    time and is discarded, and inflating stops past *limit*: per connection,
    memory is one decompressor and one step, CPU at most *limit* inflated bytes
    per message. A decompressor accepts every window size (``-15``).
    """

    __slots__ = ("limit", "size", "_inflater")

    def __init__(self, limit: int):
        self.limit = limit
        self.size = 0
        self._inflater: zlib._Decompress | None = None

    def start(self) -> None:
        """A compressed message begins."""
        self.size = 0
        self._inflater = zlib.decompressobj(-15)

    def end(self) -> None:
        """The message is abandoned (a violation): drop the decompressor."""
        self._inflater = None

    def feed(self, data: bytes, last: bool = False) -> Violation | None:
        """Inflate *data* (unmasked payload bytes of the message; *last*: its end).

        Returns None, or a :class:`Violation`: 1009 once the message inflates
        beyond the limit, 1007 when it is not DEFLATE data (or uses a context
        the ``client_no_context_takeover`` answer forbade). The message is over
        after *last* or a violation.
        """
        try:
            over = self._inflate(data) or (last and self._inflate(_DEFLATE_TAIL))
        except zlib.error:
            self._inflater = None
            return Violation(1007, "invalid compressed data")
        if over or last:
            self._inflater = None
        return Violation(1009, "message too big") if over else None

    def _inflate(self, data: bytes) -> bool:
        """Inflate *data*, counting; True as soon as the message is over the limit."""
        inflater = self._inflater
        assert inflater is not None, "feed() outside start() .. end()"
        while True:
            out = inflater.decompress(data, _INFLATE_STEP)
            self.size += len(out)
            if self.size > self.limit:
                return True
            if inflater.eof:  # a final block: what follows is a stream of its own
                data = inflater.unused_data
                inflater = self._inflater = zlib.decompressobj(-15)
                if not data:
                    return False
            else:
                data = inflater.unconsumed_tail
                if not data and len(out) < _INFLATE_STEP:
                    return False


class RateLimit(Protocol):
    """A control frame rate, e.g. :class:`wsgate.flow.ControlFrameRate`."""

    def allow(self) -> bool:
        """Count one control frame; False once over the rate."""


# (first byte, opcode, header length, payload length, mask, problem)
_Header: TypeAlias = "tuple[int, int, int, int, bytes | None, str | None]"


class FrameScanner:
    """Splits one direction of a WebSocket stream into pass-through bytes and control frames.

    ``feed(data)`` returns a list whose items are ``bytes`` (forward as they
    are), :class:`ControlFrame` or, last, a :class:`Violation` (close the
    sender). ``messages`` and ``payload_bytes`` count data messages and their
    payload bytes on the wire (compressed if compression was negotiated).

    Limits, each a :class:`Violation` before any byte of the offending frame
    is forwarded: *max_message_size* (payload bytes per message, 1009),
    *max_fragments* (frames per message, 1009), *control_rate* (an object
    whose ``allow()`` counts one control frame and says whether it is within
    the rate, e.g. :class:`wsgate.flow.ControlFrameRate`; 1008), close frames
    RFC 6455 forbids on the wire (1002), malformed framing (1002) and, with
    *inflate* (an :class:`InflateLimit`), the inflated size of compressed
    messages (1009 as soon as it is known, which may be in the middle of a
    frame: see :attr:`at_boundary`). *on_message(opcode, first frame size)* is called
    when a message starts; it may return a Violation or :data:`DROP_MESSAGE`
    (the message's frames are not passed on).
    """

    __slots__ = ("max_message_size", "max_fragments", "control_rate", "inflate",
                 "on_message", "remaining", "partial", "message_size", "fragments",
                 "in_message", "messages", "payload_bytes", "skipping", "frame_fin",
                 "inflating", "frame_mask", "mask_offset", "closing", "broken",
                 "cut_mid_frame")

    def __init__(self, max_message_size: int,
                 on_message: Callable[[int, int], MessageVerdict] | None = None,
                 max_fragments: int = UNLIMITED, control_rate: RateLimit | None = None,
                 inflate: InflateLimit | None = None):
        self.max_message_size = max_message_size
        self.max_fragments = max_fragments
        self.control_rate = control_rate  # None: unlimited
        self.inflate = inflate
        self.on_message = on_message
        self.remaining = 0  # payload bytes of the current data frame still to come
        self.partial: bytes = b""  # an incomplete frame header (or control frame) kept for later
        self.message_size = 0
        self.fragments = 0
        self.in_message = False
        self.messages = 0
        self.payload_bytes = 0
        self.skipping = False  # the current message's frames are not passed on
        self.frame_fin: int = False  # ... and the frame being skipped ends its message
        self.inflating = False  # the current frame's payload goes through self.inflate
        self.frame_mask: bytes | None = None
        self.mask_offset = 0
        # after a violation: frames still parsed for the close reply
        self.closing: int | None = None
        self.broken = False  # nothing more is parsed
        self.cut_mid_frame = False  # a violation stopped the output inside a frame

    @property
    def at_boundary(self) -> bool:
        """True when everything forwarded so far ends on a frame boundary."""
        return (not self.remaining or self.skipping) and not self.cut_mid_frame

    def feed(self, data: bytes) -> list[bytes | ControlFrame | Violation]:
        """Scan the next bytes of the stream: pass-through bytes, control frames and,
        last, a violation, in stream order (an incomplete frame waits for more)."""
        if self.broken:
            return []
        if self.partial:
            data = self.partial + data
            self.partial = b""
        out: list[bytes | ControlFrame | Violation] = []
        pos = 0
        end = len(data)
        pass_from = 0  # start of the bytes not yet emitted that may be passed through
        frame_start: int | None = None  # where the current compressed frame's header is in *data*
        while pos < end:
            if self.remaining:  # the rest of a data frame's payload
                step = min(self.remaining, end - pos)
                if self.skipping:
                    if pos > pass_from:
                        out.append(data[pass_from:pos])
                    pass_from = pos + step
                    self.remaining -= step
                    if not self.remaining and self.frame_fin and self.closing is None:
                        self.skipping = False  # the dropped message is over
                elif self.inflating:
                    violation = self._inflate(data, pos, step)
                    if violation is not None:
                        cut = pos if frame_start is None else frame_start
                        self.cut_mid_frame = frame_start is None
                        return self._stop(out, data, pass_from, cut, violation, resume=pos)
                    self.remaining -= step
                else:
                    self.remaining -= step
                pos += step
                continue
            header = self._parse_header(data, pos, end)
            if header is None:  # incomplete header: keep it for the next feed
                return self._keep(out, data, pass_from, pos)
            if type(header) is Violation:
                return self._stop(out, data, pass_from, pos, header, broken=True)
            b0, opcode, header_len, length, mask, problem = header
            if problem is not None:  # 1002; the frame's length is known: skipped after it
                if self.closing is None:
                    closed = (None, "") if opcode == OP_CLOSE else None  # an oversize close
                    return self._stop(out, data, pass_from, pos,
                                      Violation(1002, problem, closed), broken=bool(closed))
            elif opcode >= OP_CLOSE:
                total = header_len + length
                if end - pos < total:  # wait for the whole control frame
                    return self._keep(out, data, pass_from, pos)
                if self.closing is not None and self._reply_budget_spent():
                    return out
                payload = data[pos + header_len: pos + total]
                if mask is not None:
                    payload = _unmask(payload, mask)
                frame = ControlFrame(opcode, payload, data[pos: pos + total])
                violation = None if self.closing is not None else self._control(frame)
                if violation is not None:
                    return self._stop(out, data, pass_from, pos, violation, resume=pos + total,
                                      broken=violation.closed is not None)
                if pos > pass_from:
                    out.append(data[pass_from:pos])
                out.append(frame)
                pos += total
                pass_from = pos
                continue
            elif self.closing is None:
                verdict = self._data_frame(b0, opcode, length)
                if verdict is None and not self.skipping:
                    if self.inflating:  # the payload goes through the remaining branch
                        frame_start = pos
                        self.frame_mask, self.mask_offset = mask, 0
                        self.frame_fin = b0 & 0x80
                        pos += header_len
                        self.remaining = length
                        if not length and self.frame_fin:
                            violation = self._inflate(data, pos, 0)
                            if violation is not None:
                                return self._stop(out, data, pass_from, frame_start,
                                                  violation, resume=pos)
                        continue
                    pos += header_len
                    step = min(length, end - pos)
                    pos += step
                    self.remaining = length - step
                    continue
                if verdict is not None and verdict is not DROP_MESSAGE:
                    return self._stop(out, data, pass_from, pos, verdict)
                self.skipping = True  # a dropped message's frame
            if self.closing is not None and self._reply_budget_spent():
                return out
            # skip this frame: it belongs to a dropped message, or a violation came before
            if pos > pass_from:
                out.append(data[pass_from:pos])
            step = min(length, end - pos - header_len)
            pos += header_len + step
            pass_from = pos
            self.remaining = length - step
            self.frame_fin = b0 & 0x80
            if not self.remaining and self.frame_fin and self.closing is None:
                self.skipping = False
        if end > pass_from:
            out.append(data[pass_from:end] if pass_from else data)
        return out

    def _keep(self, out: list[bytes | ControlFrame | Violation], data: bytes, pass_from: int,
              pos: int) -> list[bytes | ControlFrame | Violation]:
        """Emit what precedes *pos*; keep the incomplete frame from *pos* for the next feed."""
        if pos > pass_from:
            out.append(data[pass_from:pos])
        self.partial = data[pos:]
        return out

    def _stop(self, out: list[bytes | ControlFrame | Violation], data: bytes, pass_from: int,
              cut: int, violation: Violation, resume: int | None = None,
              broken: bool = False) -> list[bytes | ControlFrame | Violation]:
        """A violation: emit up to *cut*, then stop forwarding.

        *broken*: nothing more can (or need) be parsed. Otherwise the input
        from *resume* (default *cut*) is read later for the close reply only.
        """
        if cut > pass_from:
            out.append(data[pass_from:cut])
        out.append(violation)
        if self.inflating:
            assert self.inflate is not None
            self.inflating = False
            self.inflate.end()
        if broken:
            self.broken = True
            self.partial = b""
        else:
            self.closing = CLOSE_REPLY_FRAMES
            self.skipping = True
            self.partial = data[cut if resume is None else resume:]
        return out

    def _reply_budget_spent(self) -> bool:
        """Count one frame read after a violation; past the budget, stop parsing."""
        assert self.closing is not None
        self.closing -= 1
        if self.closing >= 0:
            return False
        self.broken = True
        self.partial = b""
        return True

    def _parse_header(self, data: bytes, pos: int, end: int) -> _Header | Violation | None:
        """``(first byte, opcode, header length, payload length, mask, problem)``, None
        (incomplete) or a Violation (a length no frame can have: nothing more is parsed).
        *problem* says why a well-delimited frame breaks RFC 6455, or is None."""
        if end - pos < 2:
            return None
        b0 = data[pos]
        b1 = data[pos + 1]
        opcode = b0 & 0x0F
        length = b1 & 0x7F
        header_len = 2
        if length == 126:
            if end - pos < 4:
                return None
            length = _U16.unpack_from(data, pos + 2)[0]
            header_len = 4
        elif length == 127:
            if end - pos < 10:
                return None
            length = _U64.unpack_from(data, pos + 2)[0]
            header_len = 10
            if length >> 63:
                return Violation(1002, "invalid frame length")
        mask = None
        if b1 & 0x80:
            if end - pos < header_len + 4:
                return None
            mask = data[pos + header_len: pos + header_len + 4]
            header_len += 4
        problem = None
        if opcode >= OP_CLOSE:
            if length > 125 or not b0 & 0x80 or opcode > OP_PONG:
                problem = "invalid control frame"
        elif opcode not in _DATA_OPCODES:
            problem = "reserved opcode"
        return b0, opcode, header_len, length, mask, problem

    def _data_frame(self, b0: int, opcode: int, length: int) -> MessageVerdict:
        """Account a data frame: None (pass it), DROP_MESSAGE or a Violation."""
        verdict = None
        if opcode == OP_CONTINUATION:
            if not self.in_message:
                return Violation(1002, "continuation without a message")
            self.fragments += 1
            if self.fragments > self.max_fragments:
                return Violation(1009, "too many fragments")
        else:
            if self.in_message:
                return Violation(1002, "new message inside a fragmented one")
            self.in_message = True
            self.message_size = 0
            self.fragments = 0  # continuation frames: a message is 1 + max_fragments frames
            if self.on_message is not None:
                verdict = self.on_message(opcode, length)
                if verdict is not None and verdict is not DROP_MESSAGE:
                    return verdict
            if b0 & _RSV1 and self.inflate is not None and verdict is None:
                self.inflating = True
                self.inflate.start()
        self.message_size += length
        if self.message_size > self.max_message_size:
            return Violation(1009, "message too big")
        self.payload_bytes += length
        if b0 & 0x80:
            self.in_message = False
            self.messages += 1
        return verdict

    def _control(self, frame: ControlFrame) -> Violation | None:
        """Check a control frame: None, or a Violation (forbidden close, too many per second)."""
        if frame.opcode == OP_CLOSE:
            problem = close_frame_error(frame.payload)
            if problem is not None:
                # 1007 for a reason that is not UTF-8, as Autobahn answers on the
                # terminated routes (RFC 6455 §7.4.1: inconsistent data); else 1002
                code = 1007 if problem == CLOSE_REASON_NOT_UTF8 else 1002
                return Violation(code, problem, frame.close_code_reason())
        if self.control_rate is not None and not self.control_rate.allow():
            return Violation(1008, "too many control frames")
        return None

    def _inflate(self, data: bytes, pos: int, step: int) -> Violation | None:
        """Inflate *step* payload bytes of the current compressed frame at *pos*."""
        assert self.inflate is not None
        chunk = data[pos: pos + step]
        mask = self.frame_mask
        if mask is not None and chunk:
            shift = self.mask_offset & 3
            chunk = _unmask(chunk, mask[shift:] + mask[:shift])
            self.mask_offset += step
        last = bool(self.frame_fin) and step == self.remaining
        if last:
            self.inflating = False
        return self.inflate.feed(chunk, last)


def _unmask(payload: bytes, mask: bytes) -> bytes:
    if not payload:
        return payload
    key = int.from_bytes((mask * (len(payload) // 4 + 1))[: len(payload)], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(len(payload), "big")


def control_frame(opcode: int, payload: bytes = b"", masked: bool = False) -> bytes:
    """Build a control frame (≤ 125 bytes payload); masked for the client role."""
    if len(payload) > 125:
        raise ValueError("control frame payload over 125 bytes")
    if not masked:
        return bytes((0x80 | opcode, len(payload))) + payload
    mask = os.urandom(4)
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + _unmask(payload, mask)


def reason_bytes(reason: str) -> bytes:
    """*reason* as UTF-8, cut to at most 123 bytes on a character boundary.

    What a close frame may carry after its code (control frames hold at most
    125 bytes); cutting characters instead of bytes overflows the frame or
    splits a character into invalid UTF-8.
    """
    data = reason.encode("utf-8", "replace")
    if len(data) <= MAX_REASON_BYTES:
        return data
    return data[:MAX_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")


def close_payload(code: int | None, reason: str = "") -> bytes:
    """The payload of a close frame; no code means an empty payload."""
    if code is None:
        return b""
    return _U16.pack(code) + reason_bytes(reason)
