"""Twisted-level fast paths for wsgate's own connections (``[wsgate] fast_paths``).

Two changes, measured on the echo and proxy paths (see README "Performance"):

* **Immediate write**: ``transport.write`` sends at once when nothing is
  queued, instead of buffering and asking epoll for writability (two
  ``epoll_ctl`` calls and one more reactor dispatch per message). Only what the
  socket does not take is buffered the usual way, so ordering and producer
  flow control are unchanged. Used on every wsgate connection (echo, proxy,
  broadcast). Broadcast deliveries are first collected per connection for
  the reactor iteration (:mod:`wsgate.coalesce`), so a burst still leaves in
  one send; measured alone, an immediate write per delivery made bursty
  fan-out slower than Twisted's buffered write.
* **No per-event log context**: the epoll reactor wraps every read/write event
  in ``log.callWithLogger`` (a context push and pop per event). Events of
  selectables marked by wsgate are dispatched directly; exceptions are still
  logged. Every other selectable keeps Twisted's own path.

Both depend on Twisted internals (``FileDescriptor._tempDataBuffer``, the epoll
reactor's ``_poller``); they were written for Twisted 24–26 and stay off for
any other version or reactor, or with ``fast_paths = no``.
"""

import errno
import types

import twisted
from twisted.internet.abstract import FileDescriptor
from twisted.python import log

SUPPORTED_TWISTED = range(24, 27)
_FLAG = "_wsgate_fast"


def twisted_supported():
    try:
        major = int(twisted.__version__.split(".")[0])
    except ValueError:
        return False
    # what the immediate write reads: class defaults, and attributes __init__ sets
    assigned = FileDescriptor.__init__.__code__.co_names
    return (major in SUPPORTED_TWISTED
            and all(hasattr(FileDescriptor, name)
                    for name in ("dataBuffer", "offset", "_writeDisconnected", "disconnecting"))
            and all(name in assigned for name in ("_tempDataBuffer", "_tempDataLen")))


def install_reactor_shortcut(reactor):
    """Dispatch events of wsgate's selectables without a log context. Returns whether on."""
    if not twisted_supported() or not all(
            hasattr(reactor, name) for name in ("_poller", "_selectables", "_doReadOrWrite")):
        return False
    if getattr(reactor, "_wsgate_shortcut", False):
        return True

    def doPoll(self, timeout):
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        _drdw = self._doReadOrWrite
        selectables = self._selectables
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if selectable.__dict__.get(_FLAG):
                try:
                    _drdw(selectable, fd, event)
                except BaseException:
                    log.err(None, "wsgate: error in a connection's event handler")
            else:
                log.callWithLogger(selectable, _drdw, selectable, fd, event)

    reactor.doPoll = reactor.doIteration = types.MethodType(doPoll, reactor)
    reactor._wsgate_shortcut = True
    return True


def socket_transport(transport):
    """The TCP transport under *transport* (through TLS and PROXY-protocol wrappers)."""
    seen = 0
    while transport is not None and not isinstance(transport, FileDescriptor) and seen < 8:
        transport = getattr(transport, "transport", None)
        seen += 1
    return transport if isinstance(transport, FileDescriptor) else None


def set_no_delay(transport):
    """TCP_NODELAY on the socket under *transport*: the gateway writes small frames
    (pings, pongs, closes, short messages) that must not wait for Nagle's algorithm
    and the peer's delayed ACK (45 s instead of 1.5 s for a fragmented case)."""
    sock = socket_transport(transport)
    if sock is not None and hasattr(sock, "setTcpNoDelay"):
        try:
            sock.setTcpNoDelay(True)
        except OSError:
            pass  # already closed, or not TCP


def release(transport):
    """After *transport*'s connection was lost: drop what it still buffered and the
    immediate write (a closure holding the transport: a reference cycle). Objects
    in cycles keep their buffers until the cyclic collector runs; a client that
    never read could leave hundreds of MB behind."""
    sock = socket_transport(transport)
    if sock is None:
        return
    sock.__dict__.pop("write", None)
    if sock.__dict__.get("disconnected"):
        sock.dataBuffer, sock.offset = b"", 0
        sock._tempDataBuffer, sock._tempDataLen = [], 0


def mark(transport):
    """Let the reactor shortcut dispatch *transport*'s socket events directly."""
    sock = socket_transport(transport)
    if sock is not None:
        sock.__dict__[_FLAG] = True


def immediate_write(transport):
    """Make the socket under *transport* send at once when nothing is queued."""
    sock_transport = socket_transport(transport)
    if sock_transport is None or "write" in sock_transport.__dict__ or \
            not hasattr(sock_transport, "socket"):
        return
    buffered_write = sock_transport.write
    sock = sock_transport.socket
    t = sock_transport

    def write(data):
        if (not t._tempDataLen and t.offset == len(t.dataBuffer) and t.connected
                and not t.disconnecting and not t._writeDisconnected):
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # Twisted's doWrite will meet the error and close
            if sent == len(data):
                return
            data = data[sent:]
        buffered_write(data)

    sock_transport.write = write
