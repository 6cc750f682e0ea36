"""A raw WebSocket client on a plain socket, for tests that must send what no library
would: floods of empty fragments, forbidden close codes, deflate bombs, pings never read.

Also the gateway-process figures the hostile tests print: RSS, open fds, CPU seconds.
"""

import base64
import os
import socket
import struct
import time
import zlib

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(opcode, payload=b"", fin=True, rsv1=False, mask=True):
    """One client frame (masked unless *mask* is False)."""
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, m | n))
    elif n < 65536:
        head = bytes((b0, m | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, m | 127)) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _mask(payload, key)


def _mask(payload, key):
    if not payload:
        return payload
    whole = (key * (len(payload) // 4 + 1))[:len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(whole, "big")).to_bytes(
        len(payload), "big")


def close_frame(code=None, reason=b""):
    return frame(OP_CLOSE, b"" if code is None else struct.pack("!H", code) + reason)


class RawClient:
    """A WebSocket client that sends exactly the bytes a test builds."""

    def __init__(self, port, path, host="127.0.0.1", extensions=None, rcvbuf=None,
                 extra_headers=b"", timeout=10):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        key = base64.b64encode(os.urandom(16))
        request = (b"GET " + path.encode() + b" HTTP/1.1\r\nHost: " + host.encode() +
                   b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: " +
                   key + b"\r\nSec-WebSocket-Version: 13\r\n" + extra_headers)
        if extensions:
            request += b"Sec-WebSocket-Extensions: " + extensions.encode() + b"\r\n"
        self.sock.sendall(request + b"\r\n")
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError(f"closed during the handshake: {self.buffer!r}")
            self.buffer += chunk
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        self.head = head.decode("latin-1")
        if not self.head.startswith("HTTP/1.1 101"):
            raise AssertionError(f"no 101: {self.head}")

    def send(self, data):
        self.sock.sendall(data)

    def send_message(self, payload, opcode=OP_BINARY):
        self.sock.sendall(frame(opcode, payload))

    def recv_frame(self, timeout=10):
        """``(opcode, payload, rsv1)`` of the next frame; None when the server closed TCP."""
        self.sock.settimeout(timeout)
        while True:
            parsed = _parse(self.buffer)
            if parsed is not None:
                result, used = parsed
                self.buffer = self.buffer[used:]
                return result
            try:
                chunk = self.sock.recv(1 << 20)
            except (ConnectionResetError, socket.timeout):
                return None
            if not chunk:
                return None
            self.buffer += chunk

    def recv_until_close(self, timeout=10):
        """Read frames until a close frame; return ``(code, reason bytes, frames before)``
        (code None for an empty close; ``(None, None, ...)`` if TCP ended without one)."""
        before = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.recv_frame(max(0.1, deadline - time.monotonic()))
            if got is None:
                return None, None, before
            opcode, payload, _ = got
            if opcode == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                return code, payload[2:], before
            before.append(got)
        raise AssertionError("no close frame in time")

    def wait_closed(self, timeout=10):
        """True once the server closed the TCP connection (FIN or RST) within *timeout*."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self.sock.recv(1 << 20):
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False
        return False

    def close(self):
        self.sock.close()


def _parse(buf):
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    n = b1 & 0x7F
    pos = 2
    if n == 126:
        if len(buf) < 4:
            return None
        n = struct.unpack("!H", buf[2:4])[0]
        pos = 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n = struct.unpack("!Q", buf[2:10])[0]
        pos = 10
    if b1 & 0x80:
        pos += 4  # the server never masks; tolerated for completeness
    if len(buf) < pos + n:
        return None
    return (b0 & 0x0F, buf[pos:pos + n], bool(b0 & 0x40)), pos + n


def deflate_bomb(inflated_size):
    """A permessage-deflate payload (RFC 7692: raw deflate, trailing 00 00 ff ff removed)
    that inflates to *inflated_size* zero bytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = bytes(1 << 20)
    out = []
    left = inflated_size
    while left > 0:
        out.append(compressor.compress(chunk[:min(left, len(chunk))]))
        left -= len(chunk)
    out.append(compressor.flush(zlib.Z_SYNC_FLUSH))
    data = b"".join(out)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


# ----------------------------------------------------------------- process figures


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


class Figures:
    """RSS, fds and CPU of a process before and after; printed by the hostile tests."""

    def __init__(self, pid, label):
        self.pid, self.label = pid, label
        self.rss0, self.fds0, self.cpu0 = rss_mib(pid), open_fds(pid), cpu_seconds(pid)

    def report(self, **extra):
        rss, fds, cpu = rss_mib(self.pid), open_fds(self.pid), cpu_seconds(self.pid)
        self.rss_growth, self.fd_growth, self.cpu = rss - self.rss0, fds - self.fds0, cpu - self.cpu0
        details = " ".join(f"{k}={v}" for k, v in extra.items())
        print(f"\n[hostile] {self.label}: RSS {self.rss0:.1f} -> {rss:.1f} MiB "
              f"(growth {self.rss_growth:.1f} MiB), fds {self.fds0} -> {fds}, "
              f"CPU {self.cpu:.2f} s {details}")
        return self
