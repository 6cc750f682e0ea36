"""Active health checks: one upgrade request to each server every ``health_check``.

Each check connects to the server (TLS for wss://, verified as the routes
that use the pool verify it), sends a WebSocket upgrade request for
``health_path`` and reads the answer's status line:

* ``101``: healthy; the check sends a close frame (1000) and hangs up;
* ``2xx``: healthy too: the path is a plain HTTP health endpoint (the
  upgrade headers are ignored by such servers), so one key covers both;
* anything else, a refused or dropped connection, or no answer within the
  pool's ``connect_timeout``: a failed check.

The results go to :meth:`wsgate.upstreams.pools.Upstreams.checked`, which
applies ``rise`` and ``fall``. A check runs on a :class:`LoopingCall` on the
injected clock; this is a periodic probe, not a connection to keep up, so
it is not a ClientService.
"""

from __future__ import annotations

import base64
import os
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from wsgate import frames, http

_log = Logger()


def connect_to(reactor: Any, url: Any, protocol: Any, timeout: float,
               tls_options: Any = None) -> defer.Deferred:
    """Connect *protocol* to the server of *url* (:class:`UpstreamURL`), over TLS with
    *tls_options*: the endpoint's Deferred. Its own timeout is whole seconds and covers
    the TCP connect only: callers time the whole exchange themselves."""
    endpoint = HostnameEndpoint(reactor, url.host, url.port,
                                timeout=max(1, int(timeout + 0.999)))
    if tls_options is not None:
        endpoint = wrapClientTLS(tls_options, endpoint)
    factory = Factory.forProtocol(lambda: protocol)
    factory.noisy = False
    return endpoint.connect(factory)


class _Probe(Protocol):
    def __init__(self, request: bytes, done: defer.Deferred):
        self.request = request
        self.done = done
        self._buffer = b""

    def connectionMade(self) -> None:
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._buffer += data
        line_end = self._buffer.find(b"\r\n")
        if line_end < 0:
            if len(self._buffer) > http.MAX_HEAD_BYTES:
                self._finish(False, "an answer without a status line")
            return
        parts = self._buffer[:line_end].split(b" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            self._finish(False, "a malformed answer")
            return
        if status == 101:
            self.transport.write(frames.control_frame(
                0x8, frames.close_payload(1000, "health check"), masked=True))
            self._finish(True, "101")
        elif 200 <= status < 300:
            self._finish(True, str(status))
        else:
            self._finish(False, f"answered {status}")

    def _finish(self, ok: bool, detail: str) -> None:
        if not self.done.called:
            self.done.callback((ok, detail))
        self.transport.loseConnection()

    def connectionLost(self, reason: Any) -> None:
        if not self.done.called:
            self.done.callback((False, "closed the connection without answering"))


def probe(reactor: Any, url: Any, path: str, timeout: float, tls_options: Any = None):
    """Check the server of *url* (:class:`UpstreamURL`) once: a Deferred firing with
    ``(ok, detail)``; it never fails, and it fires within *timeout* seconds."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = http.render_head(f"GET {path} HTTP/1.1", [
        ("Host", url.host_header), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", key), ("Sec-WebSocket-Version", "13"),
        ("User-Agent", "wsgate-health-check")])
    done: defer.Deferred = defer.Deferred()
    protocol = _Probe(request, done)
    connecting = connect_to(reactor, url, protocol, timeout, tls_options)

    def connect_failed(failure):
        if not done.called:
            done.callback((False, f"connect failed: {failure.getErrorMessage()}"))
    connecting.addErrback(connect_failed)

    def timed_out():
        if not done.called:
            done.callback((False, f"no answer within {timeout:g}s"))
        if protocol.transport is not None:
            protocol.transport.abortConnection()
        elif not connecting.called:
            connecting.cancel()
    timer = reactor.callLater(timeout, timed_out)

    def finished(result):
        if timer.active():
            timer.cancel()
        return result
    done.addBoth(finished)
    return done


class HealthCheck:
    """The checks of one server of one pool (see the module docstring)."""

    def __init__(self, reactor: Any, upstreams: Any, settings: Any, server: Any,
                 tls_options: Any = None):
        self.reactor = reactor
        self.upstreams = upstreams
        self.settings = settings  # compared on reload: a change restarts the checker
        self.server = server
        self.spec = server.spec
        self.tls_options = tls_options
        self._loop = LoopingCall(self._check)
        self._loop.clock = reactor
        self._pending: defer.Deferred | None = None
        self._stopped = False

    def start(self) -> None:
        self._loop.start(self.settings.health_check, now=True)

    def stop(self) -> None:
        self._stopped = True
        if self._loop.running:
            self._loop.stop()
        # a check under way ends within its timeout; its result is ignored

    def _check(self) -> None:
        if self._pending is not None:
            return  # the previous check has not ended (its timeout is shorter than this)
        settings = self.settings
        timeout = min(settings.connect_timeout, settings.health_check)
        d = self._pending = probe(self.reactor, self.spec.url, settings.health_path, timeout,
                                  self.tls_options)
        d.addCallback(self._report)

    def _report(self, result: tuple[bool, str]) -> None:
        self._pending = None
        if not self._stopped:
            self.upstreams.checked(self.server, *result)


def checker_factory(reactor: Any):
    """What :class:`wsgate.upstreams.pools.Upstreams` builds its checkers with."""
    def build(upstreams, settings, server, tls_options):
        return HealthCheck(reactor, upstreams, settings, server, tls_options)
    return build
