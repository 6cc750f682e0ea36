"""What a gateway process and the multi-worker parent share to start, run and stop.

Start-up errors are one line on standard error and exit status 1 (:func:`fail`);
listening ports are bound synchronously so that a port in use is such an error
(:func:`bind`, :class:`ListeningService`), and each bound address is announced
as a ``wsgate.listening`` event (:func:`announce_listening`). Also here: the
open-file limit, the ``log_format`` observer, the signal handlers that turn
SIGTERM/SIGINT and SIGHUP into a drain and a reload, and the final stop.

Both ``wsgate.service`` (one process) and ``wsgate.pool`` (the parent of
``workers = N``) import this module; it imports neither of them, nor
``wsgate.tap``, and does not install the global reactor when imported.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, NoReturn, cast

from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IProtocolFactory,
    IReactorCore,
    IReactorFromThreads,
    IStreamServerEndpoint,
)
from twisted.logger import ILogObserver
from twisted.python.failure import Failure

from wsgate import observe

if TYPE_CHECKING:
    from wsgate.config import Config


def fail(message: str) -> NoReturn:
    """Print ``wsgate: MESSAGE`` on standard error and exit 1; never returns.

    For start-up errors only (a bad config, a port that cannot be bound): no
    traceback and no usage text. twistd redirects ``sys.stderr`` into the log
    once logging starts, so the line goes to the real standard error.
    """
    stream = sys.__stderr__ or sys.stderr
    stream.write(f"wsgate: {message}\n")
    stream.flush()
    raise SystemExit(1)


# -------------------------------------------------------------------- listening


class BindError(Exception):
    """An endpoint could not be bound; the text is the one-line explanation."""


_BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "unix", "haproxy")  # endpoints with a listen queue


def with_backlog(endpoint_text: str, backlog: int | None) -> str:
    """*endpoint_text* with its listen queue set to *backlog* (None: Twisted's default).

    The config refuses ``backlog=`` in the endpoint text itself, so appending
    the keyword is unambiguous; ``haproxy:`` passes it to the endpoint it wraps.
    Endpoint types without a listen queue (``systemd:``) are returned unchanged.
    """
    if backlog is None or endpoint_text.split(":", 1)[0] not in _BACKLOG_TYPES:
        return endpoint_text
    return f"{endpoint_text}:backlog={backlog}"


def server_endpoint(reactor: IReactorCore, endpoint_text: str,
                    backlog: int | None = None) -> IStreamServerEndpoint:
    """The ``IStreamServerEndpoint`` of a config's endpoint string, with *backlog*."""
    return endpoints.serverFromString(reactor, with_backlog(endpoint_text, backlog))


def bind(endpoint: IStreamServerEndpoint, factory: IProtocolFactory,
         description: str) -> IListeningPort:
    """Listen on *endpoint* with *factory* now; return the ``IListeningPort``.

    *description* names the endpoint in the error (``tcp:8080 ([listen:main])``).
    Raises :class:`BindError` when listening fails, and also when the endpoint's
    Deferred has not fired by the time ``listen`` returns: every endpoint the
    config accepts (TCP, SSL, UNIX, systemd, HAProxy, adopted sockets) binds at
    once, and a caller must know the outcome before start-up goes on.
    """
    outcome: list[object] = []
    endpoint.listen(factory).addBoth(outcome.append)
    if not outcome:
        raise BindError(f"cannot listen on {description}: the endpoint did not bind at once")
    result = outcome[0]
    if isinstance(result, Failure):
        error = result.value
        if isinstance(error, CannotListenError):
            detail = getattr(error.socketError, "strerror", None) or str(error.socketError)
        else:
            detail = str(error) or error.__class__.__name__
        raise BindError(f"cannot listen on {description}: {detail}")
    return cast(IListeningPort, result)


def announce_listening(port: IListeningPort, text: str, listener: str, tls: bool,
                       **fields: object) -> None:
    """Emit ``wsgate.listening`` for the bound *port*.

    The event's fields are ``listener``, then *fields*, then ``address``
    (``ip:port`` or the UNIX path), ``host``, ``port`` (the real one, useful
    with port 0) and ``tls``; *text* is the readable line and may use them.
    """
    address = port.getHost()
    observe.emit("wsgate.listening", text, listener=listener, **fields,
                 address=observe.format_address(address), host=getattr(address, "host", None),
                 port=getattr(address, "port", None), tls=tls)


class ListeningService(service.Service):
    """One listening port, bound in ``privilegedStartService`` (before twistd sheds
    privileges) and synchronously; a failure ends start-up through :func:`fail`.

    Not Twisted's ``StreamServerEndpointService``: it only logs a failed
    ``listen`` (the process runs on without the port), or re-raises it with a
    traceback when its private ``_raiseSynchronously`` is set, and it keeps the
    port inside a private Deferred. Here the port is needed at once: for the
    ``wsgate.listening`` event (with the port the OS chose), for the worker
    pool (which keeps the socket and hands it to its workers) and for a drain
    (:meth:`stopListening` stops accepting while the service keeps running).
    Endpoints are still Twisted's: ``serverFromString``, and
    ``AdoptedStreamServerEndpoint`` for a worker's inherited sockets.

    *announce(port)* is called once the port is bound (to emit the event, or to
    take the socket over); :meth:`bind` may be called before the service
    starts (a reload binds its new listeners first, all or nothing).
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory,
                 description: str, announce: Callable[[IListeningPort], None]) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.description = description
        self.announce = announce
        self.port: IListeningPort | None = None

    def bind(self) -> IListeningPort:
        """Listen now and announce the port; raise :class:`BindError`."""
        self.port = bind(self.endpoint, self.factory, self.description)
        self.announce(self.port)
        return self.port

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        if self.port is None:
            try:
                self.bind()
            except BindError as e:
                fail(str(e))

    def stopListening(self) -> Deferred[None] | None:
        """Stop accepting (idempotent); a Deferred that fires once the port is closed."""
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None

    def stopService(self) -> Deferred[None] | None:
        service.Service.stopService(self)
        return self.stopListening()


# -------------------------------------------------------------------- the process


def raise_open_file_limit() -> None:
    """Raise the soft open-file limit to the hard one (one socket per connection).

    The soft default is often 1024, as nginx's ``worker_rlimit_nofile`` knows;
    a refusal from the OS leaves the limit as it was.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def log_observer(config: Config, node_id: str) -> ILogObserver | None:
    """The ``ILogObserver`` that ``log_format = json`` asks for (NDJSON tagged with
    *node_id*), or None for ``text`` (the caller's default text format)."""
    if config.core.log_format == "json":
        return observe.json_observer(node_id)
    return None


def install_log_format(parent: object, config: Config) -> None:
    """Make twistd log in the config's ``log_format``; call when the root service is
    attached to *parent* (the twistd application).

    twistd starts its log observer after ``makeService``, from the application's
    ``ILogObserver`` component: setting it here is what makes ``json`` take effect.
    A *parent* without components (a plain service) is left alone.
    """
    observer = log_observer(config, config.core.node_id)
    set_component = getattr(parent, "setComponent", None)
    if observer is not None and set_component is not None:
        set_component(ILogObserver, observer)


def handle_signals(reactor: IReactorFromThreads, stop: Callable[[], object],
                   reload: Callable[[], object]) -> None:
    """Route SIGTERM and SIGINT to *stop()* and SIGHUP to *reload()*, each run in the
    reactor thread (``callFromThread``); call once the reactor runs.

    Twisted installs no SIGHUP handler (the default action ends the process),
    and its own SIGTERM/SIGINT handlers stop the reactor at once and re-raise
    the signal at exit: these replace them, so a gateway drains and exits 0.
    """
    def handler(signum: int, frame: FrameType | None) -> None:
        reactor.callFromThread(reload if signum == signal.SIGHUP else stop)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, handler)


def stop(reactor: IReactorCore, *pending: IDelayedCall | None) -> None:
    """End the process: cancel the *pending* delayed calls (None or already run are
    fine), then stop *reactor* if it runs; the process then exits 0 (twistd, or
    :func:`wsgate.worker.main` when its ``reactor.run()`` returns)."""
    for call in pending:
        if call is not None and call.active():
            call.cancel()
    if reactor.running:
        reactor.stop()
