#!/usr/bin/env python3
"""A Python ``websockets`` (asyncio) echo server, default settings except pings.

usage: websockets_echo.py [--ping SECONDS]

Pings are off unless ``--ping`` is given (websockets pings every 20 s by
default; the echo scenarios compare servers without keepalives).
"""

import argparse
import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import announce, raise_nofile  # noqa: E402

from websockets.asyncio.server import serve  # noqa: E402


async def echo(ws):
    async for message in ws:
        await ws.send(message)


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ping", type=float, default=0)
    args = parser.parse_args()
    raise_nofile()
    async with serve(echo, "127.0.0.1", 0, ping_interval=args.ping or None,
                     ping_timeout=10 if args.ping else None, max_size=64 * 1024 * 1024,
                     backlog=4096) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        announce(port)
        await asyncio.Future()


if __name__ == "__main__":
    asyncio.run(main())
