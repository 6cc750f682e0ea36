"""RFC 6455 frame headers for the splice relay: scan a byte stream, build control frames.

The proxy passes data frames through unchanged (client frames stay masked,
upstream frames unmasked, compressed payloads stay compressed) and only reads
frame *headers*: to count messages and bytes, to enforce ``max_message_size``
before any byte of an oversize frame is forwarded, and to know the frame
boundaries where the gateway may inject its own control frames. Control frames
(close, ping, pong: at most 125 bytes) are collected whole so the relay can
read them (close codes) or swallow them (pongs answering the gateway's pings).
"""

import os
import struct

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA
_DATA_OPCODES = frozenset((OP_CONTINUATION, OP_TEXT, OP_BINARY))

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


class ControlFrame:
    """A whole control frame: *payload* unmasked, *raw* exactly as it arrived."""

    __slots__ = ("opcode", "payload", "raw")

    def __init__(self, opcode, payload, raw):
        self.opcode, self.payload, self.raw = opcode, payload, raw

    def close_code_reason(self):
        """``(code, reason)`` of a close frame; ``(None, "")`` when it has no status."""
        if len(self.payload) < 2:
            return None, ""
        code = _U16.unpack_from(self.payload)[0]
        return code, self.payload[2:].decode("utf-8", "replace")


class Violation:
    """The stream broke a rule: the relay closes with *code* and *reason*."""

    __slots__ = ("code", "reason")

    def __init__(self, code, reason):
        self.code, self.reason = code, reason


DROP_MESSAGE = object()


class FrameScanner:
    """Splits one direction of a WebSocket stream into pass-through bytes and control frames.

    ``feed(data)`` returns a list whose items are ``bytes`` (forward as they
    are), :class:`ControlFrame` or, last, a :class:`Violation` (stop relaying).
    ``messages`` and ``payload_bytes`` count completed data messages and their
    payload bytes (on the wire, compressed if compression was negotiated).
    """

    __slots__ = ("max_message_size", "remaining", "partial", "control", "message_size",
                 "in_message", "messages", "payload_bytes", "on_message", "broken",
                 "dropping", "current_fin", "discarding")

    def __init__(self, max_message_size, on_message=None):
        self.max_message_size = max_message_size
        self.remaining = 0  # payload bytes of the current data frame still to pass
        self.partial = b""  # an incomplete frame header (or whole control frame)
        self.control = None  # (opcode, header length, total length) while collecting one
        self.message_size = 0
        self.in_message = False
        self.messages = 0
        self.payload_bytes = 0
        # on_message(opcode, first frame size) when a message starts; it may
        # return a Violation (stop) or DROP_MESSAGE (its frames are not passed on).
        self.on_message = on_message
        self.broken = False
        self.dropping = False
        self.current_fin = False
        # after a message-level violation (1008, 1009) the stream is still well
        # framed: data frames are discarded, control frames (the close reply) still read
        self.discarding = False

    @property
    def at_boundary(self):
        """True when everything forwarded so far ends on a frame boundary."""
        return self.remaining == 0 and not self.partial

    def feed(self, data):
        if self.broken:
            return []
        out = []
        pos = 0
        end = len(data)
        if self.partial:
            data = self.partial + data
            self.partial = b""
            end = len(data)
        pass_from = 0  # start of the bytes not yet emitted that may be passed through
        while pos < end:
            if self.remaining:
                step = min(self.remaining, end - pos)
                self.remaining -= step
                if self.dropping:
                    if pos > pass_from:
                        out.append(data[pass_from:pos])
                    pass_from = pos + step
                    if not self.remaining and self.current_fin:
                        self.dropping = False
                pos += step
                continue
            header = self._parse_header(data, pos, end)
            if header is None:  # incomplete header: keep it for the next feed
                if pos > pass_from:
                    out.append(data[pass_from:pos])
                self.partial = data[pos:]
                return out
            if isinstance(header, Violation):
                if pos > pass_from:
                    out.append(data[pass_from:pos])
                self.broken = True
                out.append(header)
                return out
            fin, opcode, header_len, length, mask = header
            if opcode >= OP_CLOSE:
                total = header_len + length
                if end - pos < total:  # wait for the whole control frame
                    if pos > pass_from:
                        out.append(data[pass_from:pos])
                    self.partial = data[pos:]
                    return out
                if pos > pass_from:
                    out.append(data[pass_from:pos])
                payload = data[pos + header_len: pos + total]
                if mask is not None:
                    payload = _unmask(payload, mask)
                out.append(ControlFrame(opcode, payload, data[pos: pos + total]))
                pos += total
                pass_from = pos
                continue
            violation = None if self.discarding else self._data_frame(fin, opcode, length)
            if violation is not None:
                if pos > pass_from:
                    out.append(data[pass_from:pos])
                if violation.code == 1002:
                    self.broken = True
                else:  # skip this frame and every later data frame; keep reading controls
                    self.discarding = True
                    self.partial = data[pos:]
                out.append(violation)
                return out
            if self.discarding:
                self.dropping = True  # skip every data frame from now on
            if self.dropping:  # this frame belongs to a dropped message: skip it
                if pos > pass_from:
                    out.append(data[pass_from:pos])
                step = min(length, end - pos - header_len)
                pos += header_len + step
                pass_from = pos
                self.remaining = length - step
                self.current_fin = bool(fin) and not self.discarding
                if fin and not self.remaining and not self.discarding:
                    self.dropping = False
                continue
            pos += header_len
            step = min(length, end - pos)
            pos += step
            self.remaining = length - step
        if end > pass_from:
            out.append(data[pass_from:end] if pass_from or end != len(data) else data)
        return out

    def _parse_header(self, data, pos, end):
        """``(fin, opcode, header length, payload length, mask)``, None or a Violation."""
        if end - pos < 2:
            return None
        b0 = data[pos]
        b1 = data[pos + 1]
        fin = b0 & 0x80
        opcode = b0 & 0x0F
        masked = b1 & 0x80
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
        if masked:
            if end - pos < header_len + 4:
                return None
            mask = data[pos + header_len: pos + header_len + 4]
            header_len += 4
        if opcode >= OP_CLOSE:
            if length > 125 or not fin or opcode > OP_PONG:
                return Violation(1002, "invalid control frame")
        elif opcode not in _DATA_OPCODES:
            return Violation(1002, "reserved opcode")
        return fin, opcode, header_len, length, mask

    def _data_frame(self, fin, opcode, length):
        if opcode == OP_CONTINUATION:
            if not self.in_message:
                return Violation(1002, "continuation without a message")
        else:
            if self.in_message:
                return Violation(1002, "new message inside a fragmented one")
            self.in_message = True
            self.message_size = 0
            if self.on_message is not None:
                verdict = self.on_message(opcode, length)
                if verdict is DROP_MESSAGE:
                    self.dropping = True
                elif verdict is not None:
                    return verdict
        self.message_size += length
        if self.message_size > self.max_message_size:
            return Violation(1009, "message too big")
        self.payload_bytes += length
        if fin:
            self.in_message = False
            self.messages += 1
        return None


def _unmask(payload, mask):
    if not payload:
        return payload
    key = int.from_bytes((mask * (len(payload) // 4 + 1))[: len(payload)], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(len(payload), "big")


def control_frame(opcode, payload=b"", masked=False):
    """Build a control frame (≤ 125 bytes payload); masked for the client role."""
    if len(payload) > 125:
        raise ValueError("control frame payload over 125 bytes")
    if not masked:
        return bytes((0x80 | opcode, len(payload))) + payload
    mask = os.urandom(4)
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + _unmask(payload, mask)


def close_payload(code, reason=""):
    """The payload of a close frame; no code means an empty payload."""
    if code is None:
        return b""
    return _U16.pack(code) + reason.encode("utf-8")[:123]
