"""``wsgate connect``: a WebSocket client for the shell, on Autobahn over Twisted.

Standard output carries only the messages received (text as is, binary as
hex or a byte count), one per line, so it can be piped; everything else
(connected, ping time, close code, a refused handshake) goes to standard
error. Standard input is read through the reactor
(:class:`twisted.internet.stdio.StandardIO`): each line is one text message.

Exit status: 0 after a 1000 close, 1 when the server refused the handshake
with an HTTP status, 2 when no WebSocket could be established (DNS, TCP,
TLS, a broken 101), 3 for any other close (including a connection lost
without a close frame).
"""

import os
import signal
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from autobahn.websocket.compress import (
    PerMessageDeflateOffer,
    PerMessageDeflateResponse,
    PerMessageDeflateResponseAccept,
)
from autobahn.websocket.protocol import parseHttpHeader
from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

from wsgate import __version__
from wsgate.http import TOKEN_CHARS

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_CONNECT = 2
EXIT_CLOSED = 3
EXIT_INTERRUPTED = 130

HEX_LIMIT = 64  # binary messages up to this size are printed as hex
_MAX_REFUSAL_BODY = 64 * 1024
_MAX_RESPONSE_HEAD = 64 * 1024

# Headers Autobahn writes itself, and the option that sets each instead.
_RESERVED_HEADERS = {
    "upgrade": None,
    "connection": None,
    "sec-websocket-key": None,
    "sec-websocket-version": None,
    "sec-websocket-protocol": "-s",
    "sec-websocket-extensions": "--compress",
}
# Response headers worth showing when a handshake is refused.
_REFUSAL_HEADERS = ("retry-after", "www-authenticate", "allow", "sec-websocket-version",
                    "upgrade", "location")


# --------------------------------------------------------------------- options


@dataclass(frozen=True)
class Target:
    """Where to connect: a parsed ``ws://`` or ``wss://`` URL."""

    url: str
    secure: bool
    host: str
    port: int
    resource: str

    @property
    def authority(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_target(url):
    """``ws://host[:port]/path?query`` → :class:`Target`; raise ``ValueError``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"invalid URL {url!r}: {e}") from None
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"expected a ws:// or wss:// URL, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"expected a host name in {url!r}")
    if parts.fragment:
        raise ValueError(f"a WebSocket URL has no #fragment: {url!r}")
    secure = parts.scheme == "wss"
    resource = parts.path or "/"
    if parts.query:
        resource += "?" + parts.query
    return Target(url, secure, parts.hostname, port or (443 if secure else 80), resource)


def parse_header(text):
    """``'Name: value'`` → ``(name, value)``; raise ``ValueError``."""
    name, colon, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not colon or not name or not set(name) <= TOKEN_CHARS:
        raise ValueError(f"-H expects 'Name: value', got {text!r}")
    if "\r" in value or "\n" in value:
        raise ValueError(f"-H {name}: the value may not contain a line break")
    option = _RESERVED_HEADERS.get(name.lower(), False)
    if option is not False:
        hint = f" (use {option})" if option else ""
        raise ValueError(f"-H {name}: this header is part of the handshake{hint}")
    return name, value


@dataclass(frozen=True)
class ConnectOptions:
    """Everything ``wsgate connect`` was asked to do."""

    target: Target
    headers: tuple = ()  # (name, value) pairs, in order
    subprotocols: tuple = ()
    origin: str = None
    ca: str = None
    insecure: bool = False
    compress: bool = False
    messages: tuple = ()
    wait: float = 1.0
    ping: bool = False
    binary: bool = False
    timeout: float = 10.0
    verbose: bool = False

    @property
    def scripted(self):
        """-x or --ping: send, wait, close; standard input is not read."""
        return bool(self.messages) or self.ping

    def request_headers(self):
        """Split -H into what Autobahn takes separately: (Host, User-Agent, Origin, others).

        Repeated names are joined with ``", "`` (Autobahn sends a dict).
        """
        host = useragent = origin = None
        others = {}
        for name, value in self.headers:
            lower = name.lower()
            if lower == "host":
                host = value
            elif lower == "user-agent":
                useragent = value
            elif lower == "origin":
                origin = value
            else:
                key = next((k for k in others if k.lower() == lower), name)
                others[key] = f"{others[key]}, {value}" if key in others else value
        return host, useragent or f"wsgate/{__version__}", self.origin or origin, others


# --------------------------------------------------------------------- output


class Console:
    """Messages to standard output (through the reactor once stdio is attached), notes to stderr."""

    def __init__(self, stdout=None, stderr=None):
        self._stdout = stdout or sys.stdout.buffer
        self._stderr = stderr or sys.stderr
        self.transport = None  # the StandardIO transport, when attached

    def message(self, data):
        if self.transport is not None:
            self.transport.write(data + b"\n")
        else:
            self._stdout.write(data + b"\n")
            self._stdout.flush()

    def note(self, text):
        self._stderr.write(text + "\n")
        self._stderr.flush()


def describe_binary(payload):
    """``<binary 3 bytes: 00ff10>``, or only the size over :data:`HEX_LIMIT` bytes."""
    size = len(payload)
    noun = "byte" if size == 1 else "bytes"
    if size <= HEX_LIMIT:
        return f"<binary {size} {noun}: {payload.hex()}>".replace(": >", ">")
    return f"<binary {size} {noun}>"


def describe_close(code, reason):
    if code is None:
        return "closed: no status code (1005)"
    return f"closed: {code} {reason}" if reason else f"closed: {code}"


@dataclass
class Refusal:
    """An HTTP answer other than 101 to the upgrade request."""

    status: int
    phrase: str
    headers: dict
    body: bytes = b""
    complete: bool = False

    def lines(self):
        text = self.body.decode("utf-8", "replace").strip()
        first, _, rest = text.partition("\n")
        summary = f"handshake refused: {self.status} {first.strip() or self.phrase}".rstrip()
        lines = [summary]
        if rest.strip():
            lines.extend(line.rstrip() for line in rest.strip().splitlines())
        for name in _REFUSAL_HEADERS:
            if name in self.headers:
                lines.append(f"  {_title(name)}: {self.headers[name]}")
        return lines


def _title(name):
    return "-".join(part.capitalize() for part in name.split("-")).replace("Websocket", "WebSocket")


def describe_failure(failure):
    """A connection failure as a short phrase (TLS errors unpacked)."""
    value = failure.value
    try:
        from OpenSSL.SSL import Error as SSLError
        from service_identity import VerificationError
    except ImportError:  # pragma: no cover - both ship with twisted[tls]
        SSLError = VerificationError = ()
    if VerificationError and isinstance(value, VerificationError):
        return "TLS: the server's certificate is not valid for this host name"
    if SSLError and isinstance(value, SSLError):
        reasons = [entry[2] for entry in (value.args[0] if value.args else [])
                   if isinstance(entry, tuple) and len(entry) == 3 and entry[2]]
        return "TLS: " + (", ".join(reasons) or "handshake failed")
    from twisted.internet import error

    if isinstance(value, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(value, error.DNSLookupError):
        return "DNS lookup failed"
    if isinstance(value, (error.TimeoutError, error.TCPTimedOutError, defer.CancelledError)):
        return "timed out"
    return failure.getErrorMessage() or value.__class__.__name__


# --------------------------------------------------------------------- session


class Session:
    """One client connection's life, from connecting to the exit status.

    The Autobahn protocol and the stdin reader only forward events here;
    :attr:`done` fires with the exit status once standard output is flushed.
    """

    def __init__(self, options, reactor, console):
        self.options = options
        self.reactor = reactor
        self.console = console
        self.done = defer.Deferred()
        self.protocol = None
        self.open = False
        self.stdio = None
        self._stdio_closed = None
        self._close_call = None
        self._ping = None  # (payload, sent at)
        self._interrupts = 0
        self._backpressure = False  # the connection is standard output's producer
        self._finished = False

    # ---------------------------------------------------------- connection events

    def connect_failed(self, failure):
        self.console.note(f"wsgate: cannot connect to {self.options.target.url}: "
                          f"{describe_failure(failure)}")
        self.finish(EXIT_CONNECT)

    def opened(self, protocol, subprotocol, extensions):
        self.protocol = protocol
        self.open = True
        details = []
        if subprotocol:
            details.append(f"subprotocol {subprotocol}")
        details.extend(str(extension.EXTENSION_NAME) for extension in extensions)
        suffix = f" ({', '.join(details)})" if details else ""
        self.console.note(f"connected to {self.options.target.url}{suffix}")
        self._attach_stdio()
        if self.options.ping:
            payload = os.urandom(8)
            self._ping = (payload, time.perf_counter())
            protocol.sendPing(payload)
        if self.options.scripted:
            for message in self.options.messages:
                self.send(message)
            self._close_later()

    def message(self, payload, is_binary):
        self.console.message(describe_binary(payload).encode() if is_binary else payload)

    def pong(self, payload):
        if self._ping is not None and payload == self._ping[0]:
            rtt = (time.perf_counter() - self._ping[1]) * 1000
            self._ping = None
            self.console.note(f"ping: {rtt:.2f} ms")

    def closed(self, protocol, was_clean, code, reason, lost_reason):
        """The connection is over: print why and pick the exit status."""
        if self._finished:  # interrupted: already said so
            return None
        if self._ping is not None and self.open:
            self.console.note("ping: no pong before the close")
        refusal = protocol.refusal if protocol is not None else None
        if refusal is not None:
            for line in refusal.lines():
                self.console.note(line)
            return self.finish(EXIT_REFUSED)
        if not self.open:
            why = protocol.wasNotCleanReason if protocol.droppedByMe else None
            if why is None and lost_reason is not None:
                why = describe_failure(lost_reason)
            self.console.note(f"wsgate: cannot connect to {self.options.target.url}: "
                              f"{why or 'the connection closed during the handshake'}")
            return self.finish(EXIT_CONNECT)
        if protocol.close_frame is not None:
            code, reason = protocol.close_frame
        elif not was_clean:
            detail = describe_failure(lost_reason) if lost_reason is not None else ""
            self.console.note("closed: 1006 connection lost without a close frame"
                              + (f" ({detail})" if detail else ""))
            return self.finish(EXIT_CLOSED)
        self.console.note(describe_close(code, reason))
        return self.finish(EXIT_OK if code == 1000 else EXIT_CLOSED)

    # ---------------------------------------------------------- our side

    def send(self, text):
        if self.protocol is None or self.protocol.state != self.protocol.STATE_OPEN:
            return
        data = text.encode("utf-8", "replace")
        self.protocol.sendMessage(data, isBinary=self.options.binary)

    def close(self):
        """Start the closing handshake with 1000 (once)."""
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        if self.protocol is not None and self.protocol.state == self.protocol.STATE_OPEN:
            self.protocol.sendClose(1000)
            # The server's close frame must be read even if standard output is slow.
            self._stop_backpressure()
            self.protocol.transport.resumeProducing()

    def _close_later(self):
        self._close_call = self.reactor.callLater(self.options.wait, self.close)

    def input_line(self, text):
        self.send(text)

    def input_ended(self):
        """End of standard input: wait --wait seconds for replies, then close."""
        if not self.options.scripted:
            self._close_later()

    def output_gone(self):
        """Standard output closed (``| head -1``): nothing more can be shown."""
        self.close()

    def interrupt(self):
        """Ctrl-C: the first closes politely, the second gives up."""
        self._interrupts += 1
        if self._interrupts == 1 and self.open:
            self.close()
        else:
            self.console.note("wsgate: interrupted")
            self.finish(EXIT_INTERRUPTED)
            if self.protocol is not None:
                self.protocol.dropConnection(abort=True)

    # ---------------------------------------------------------- stdio and the end

    def _attach_stdio(self):
        from twisted.internet.stdio import StandardIO

        reader = StdinLines(self)
        self._stdio_closed = reader.lost
        try:
            self.stdio = StandardIO(reader, reactor=self.reactor)
        except OSError:  # no usable stdin/stdout (closed descriptors): print directly
            self.stdio, self._stdio_closed = None, None
            self.input_ended()
            return
        self.console.transport = self.stdio
        # A slow standard output pauses reading from the server instead of
        # buffering messages without bound.
        self.stdio.registerProducer(self.protocol.transport, True)
        self._backpressure = True
        if self.options.scripted:
            self.stdio.pauseProducing()

    def _stop_backpressure(self):
        if self._backpressure:
            self._backpressure = False
            self.stdio.unregisterProducer()

    def finish(self, code):
        if self._finished:
            return
        self._finished = True
        if self._close_call is not None and self._close_call.active():
            self._close_call.cancel()
        if self.stdio is None:
            self.done.callback(code)
            return
        # Let the reactor flush what is queued for standard output first
        # (as long as it takes: a reader that never reads blocks us, like cat).
        self._stop_backpressure()
        self.stdio.loseConnection()
        self._stdio_closed.addBoth(lambda _: self.done.callback(code))


@implementer(IHalfCloseableProtocol)
class StdinLines(LineOnlyReceiver):
    """Standard input, one text message per line (line endings removed)."""

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024 * 1024

    def __init__(self, session):
        self.session = session
        self.lost = defer.Deferred()

    def lineReceived(self, line):
        self.session.input_line(_line_text(line))

    def lineLengthExceeded(self, line):
        self.session.console.note(f"wsgate: input line over {self.MAX_LENGTH} bytes, dropped")

    def readConnectionLost(self):
        rest, self._buffer = self._buffer, b""
        if rest:
            self.session.input_line(_line_text(rest))
        self.session.input_ended()

    def writeConnectionLost(self):
        self.session.output_gone()

    def connectionLost(self, reason=None):
        if not self.lost.called:
            self.lost.callback(None)


def _line_text(line):
    return line.rstrip(b"\r").decode("utf-8", "replace")


# --------------------------------------------------------------------- Autobahn


class ClientProtocol(WebSocketClientProtocol):
    """Autobahn's client, reporting to a :class:`Session`.

    Additions to the stock behaviour: an HTTP answer other than 101 is kept
    (status, headers and body) instead of only failing the handshake; the
    answer to the server's close frame carries the server's status code
    (RFC 6455 §5.5.1; Autobahn answers 1000 unless ``echoCloseCodeReason``);
    and close code 1014, which Autobahn's list of valid codes lacks, is
    accepted as the peer's code and echoed like the others.
    """

    refusal = None
    close_frame = None  # (code, reason) of the peer's close frame
    _accepted = (None, ())  # the 101's subprotocol and extensions
    _lost_reason = None

    @property
    def session(self):
        return self.factory.session

    def connectionMade(self):
        self.session.protocol = self
        super().connectionMade()

    def onConnect(self, response):
        self._accepted = (response.protocol, list(response.extensions))

    def onOpen(self):
        self.session.opened(self, *self._accepted)

    def onMessage(self, payload, isBinary):
        self.session.message(payload, isBinary)

    def onPong(self, payload):
        self.session.pong(payload)

    def onClose(self, wasClean, code, reason):
        self.session.closed(self, wasClean, code, reason, self._lost_reason)

    def onCloseFrame(self, code, reasonRaw):
        # The peer's close frame decides the exit status, even if the TCP
        # connection is not closed neatly afterwards.
        self.close_frame = (code, (reasonRaw or b"").decode("utf-8", "replace"))
        if code == 1014:  # "bad gateway": valid on the wire, missing from Autobahn's list
            if self.state == self.STATE_OPEN and _is_utf8(reasonRaw):
                # Our echo first: Autobahn then takes the frame as the answer to it.
                self.sendCloseFrame(code=code, reasonUtf8=reasonRaw, isReply=True)
            result = super().onCloseFrame(1000, reasonRaw)
            self.remoteCloseCode = code
            return result
        return super().onCloseFrame(code, reasonRaw)

    def connectionLost(self, reason):
        self._lost_reason = reason
        if self.refusal is not None and not self.refusal.complete:
            self.refusal.body = self.data[:_MAX_REFUSAL_BODY]
            self.refusal.complete = True
        super().connectionLost(reason)

    def _actuallyStartHandshake(self, request_options):
        super()._actuallyStartHandshake(request_options)
        if self.session.options.verbose:
            for line in self.http_request_data.decode("utf-8", "replace").splitlines():
                if line:
                    self.session.console.note(f"> {line}")

    def processHandshake(self):
        if self.refusal is None:
            end = self.data.find(b"\r\n\r\n")
            if end < 0:
                if len(self.data) > _MAX_RESPONSE_HEAD:
                    self.failHandshake("the response head is too large")
                return None
            head = self.data[:end + 4]
            if self.session.options.verbose:
                for line in head.decode("latin-1").splitlines():
                    if line:
                        self.session.console.note(f"< {line}")
            status_line, headers, _ = parseHttpHeader(head)
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit() \
                    or parts[1] == "101":
                return super().processHandshake()
            self.refusal = Refusal(int(parts[1]), parts[2] if len(parts) > 2 else "", headers)
            self.data = self.data[end + 4:]
        self._collect_refusal_body()
        return None

    def _collect_refusal_body(self):
        """Read the refusal's body (Content-Length, chunked, or until close), then drop."""
        refusal = self.refusal
        if refusal.complete:
            return
        length = refusal.headers.get("content-length", "").strip()
        chunked = "chunked" in refusal.headers.get("transfer-encoding", "").lower()
        body = None
        if length.isdigit():
            if len(self.data) >= int(length):
                body = self.data[:int(length)]
        elif chunked:
            body = _dechunk(self.data)
        if body is None and len(self.data) > _MAX_REFUSAL_BODY:
            body = self.data
        if body is not None:
            refusal.body = body[:_MAX_REFUSAL_BODY]
            refusal.complete = True
            self.data = b""
            self.wasNotCleanReason = f"the server answered {refusal.status}"
            self.dropConnection(abort=True)


def _is_utf8(data):
    try:
        (data or b"").decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _dechunk(data):
    """The body of a complete chunked message, or None while more is needed."""
    body, pos = b"", 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return None
        try:
            size = int(data[pos:end].split(b";")[0], 16)
        except ValueError:
            return data  # not really chunked: show it raw
        if size == 0:
            return body
        if len(data) < end + 2 + size + 2:
            return None
        body += data[end + 2:end + 2 + size]
        pos = end + 2 + size + 2


class ClientFactory(WebSocketClientFactory):
    protocol = ClientProtocol

    def __init__(self, session, **kwargs):
        super().__init__(**kwargs)
        self.session = session


def build_factory(session, reactor):
    """The Autobahn client factory for the session's options."""
    options = session.options
    target = options.target
    host, useragent, origin, headers = options.request_headers()
    try:
        factory = ClientFactory(
            session, url=target.url, origin=origin, protocols=list(options.subprotocols) or None,
            useragent=useragent, headers=headers, reactor=reactor)
    except Exception as e:  # Autobahn validates subprotocols and the URL
        raise ValueError(str(e)) from None
    # Autobahn writes "Host: {host}:{port}"; bracket IPv6, honour -H 'Host: ...'.
    if host is not None:
        name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        if name and port.isdigit():
            factory.host, factory.port = name, int(port)
        else:
            factory.host = host
    elif ":" in target.host:
        factory.host = f"[{target.host}]"
    protocol_options = dict(
        openHandshakeTimeout=options.timeout,
        closeHandshakeTimeout=options.timeout,
        serverConnectionDropTimeout=1,
        autoPingInterval=0,
        failByDrop=False,
        echoCloseCodeReason=True,  # RFC 6455 §5.5.1: answer a close with its status code
        maxMessagePayloadSize=0,
        maxFramePayloadSize=0,
    )
    if options.compress:
        protocol_options.update(
            perMessageCompressionOffers=[PerMessageDeflateOffer(accept_max_window_bits=True)],
            perMessageCompressionAccept=_accept_deflate)
    factory.setProtocolOptions(**protocol_options)
    return factory


def _accept_deflate(response):
    if isinstance(response, PerMessageDeflateResponse):
        return PerMessageDeflateResponseAccept(response)
    return None


def client_endpoint(reactor, options):
    """TCP, wrapped in TLS for wss:// (the chain and the name verified unless --insecure)."""
    from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS

    target = options.target
    endpoint = HostnameEndpoint(reactor, target.host, target.port, timeout=options.timeout)
    if not target.secure:
        return endpoint
    from wsgate import tls

    try:
        creator = tls.upstream_tls_options(target.host, options.ca, not options.insecure)
    except tls.TLSConfigError as e:
        raise ValueError(f"--ca: {e.message}") from None
    return wrapClientTLS(creator, endpoint)


def connect(reactor, options, console=None):
    """Run one session; return a Deferred that fires with the exit status."""
    console = console or Console()
    if options.insecure:
        console.note("wsgate: warning: --insecure: the server's certificate is not verified")
    if (options.ca or options.insecure) and not options.target.secure:
        console.note("wsgate: warning: --ca and --insecure only apply to wss:// URLs")
    session = Session(options, reactor, console)
    try:
        factory = build_factory(session, reactor)
        endpoint = client_endpoint(reactor, options)
    except ValueError as e:
        console.note(f"wsgate: {e}")
        return defer.succeed(EXIT_CONNECT)
    endpoint.connect(factory).addErrback(session.connect_failed)
    reactor.callWhenRunning(_install_sigint, reactor, session)
    return session.done


def _install_sigint(reactor, session):
    signal.signal(signal.SIGINT,
                  lambda *_: reactor.callFromThread(session.interrupt))
