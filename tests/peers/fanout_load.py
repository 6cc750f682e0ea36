#!/usr/bin/env python3
"""Fan-out load for the slow-consumer memory test (one process, raw sockets, epoll).

usage: fanout_load.py PORT PATH SUBSCRIBERS STUCK MESSAGES SIZE [WINDOW]

Opens SUBSCRIBERS WebSocket connections to PATH, STUCK of which never read
(tiny receive buffer), and one publisher. The publisher sends MESSAGES binary
messages of SIZE bytes, at most WINDOW messages ahead of the slowest *reading*
subscriber, so the readers keep up and only the stuck ones fall behind. Prints
one JSON line: {"complete": readers that got everything, "seconds": ...}.
"""

import json
import os
import resource
import selectors
import socket
import struct
import sys
import time


def handshake(port, path, rcvbuf=None):
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        piece = sock.recv(1)
        if not piece:
            raise SystemExit("closed during the handshake")
        head += piece
    if not head.startswith(b"HTTP/1.1 101"):
        raise SystemExit(f"refused: {head[:40]!r}")
    sock.setblocking(False)
    return sock


def frame(payload):
    n = len(payload)
    head = bytes((0x82,)) + (bytes((0x80 | n,)) if n < 126 else
                             bytes((0x80 | 126,)) + struct.pack("!H", n) if n < 65536 else
                             bytes((0x80 | 127,)) + struct.pack("!Q", n))
    return head + b"\0\0\0\0" + payload  # an all-zero mask leaves the payload as it is


def main():
    port, path, subscribers, stuck, messages, size = map(
        lambda a: int(a) if a.isdigit() else a, sys.argv[1:7])
    window = int(sys.argv[7]) if len(sys.argv) > 7 else 8
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    per_message = size + (2 if size < 126 else 4 if size < 65536 else 10)
    total = messages * per_message
    readers = [handshake(port, path) for _ in range(subscribers - stuck)]
    stuck_socks = [handshake(port, path, rcvbuf=4096) for _ in range(stuck)]
    publisher = handshake(port, path)
    publisher.setblocking(True)
    print(json.dumps({"ready": True}), flush=True)
    time.sleep(0.3)
    selector = selectors.DefaultSelector()
    received = {}
    for sock in readers:
        selector.register(sock, selectors.EVENT_READ)
        received[sock] = 0
    buf = bytearray(1 << 20)
    data = frame(os.urandom(size))
    sent = 0
    started = time.monotonic()
    deadline = started + 240
    slowest = 0
    while slowest < total and time.monotonic() < deadline:
        while sent < messages and sent - slowest // per_message < window:
            publisher.sendall(data)
            sent += 1
        for key, _ in selector.select(0.01):
            sock = key.fileobj
            try:
                while True:
                    n = sock.recv_into(buf)
                    if not n:
                        selector.unregister(sock)
                        break
                    received[sock] += n
            except BlockingIOError:
                pass
        slowest = min(received.values())
    complete = sum(1 for n in received.values() if n >= total)
    print(json.dumps({"complete": complete, "readers": len(readers), "sent": sent,
                      "seconds": round(time.monotonic() - started, 1),
                      "slowest_bytes": slowest, "total_bytes": total}), flush=True)
    for sock in readers + stuck_socks + [publisher]:
        sock.close()


if __name__ == "__main__":
    main()
