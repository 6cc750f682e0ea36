"""Autobahn-level fast paths for terminated WebSockets (``[wsgate] fast_paths``).

Beside :mod:`wsgate.fastpath` (the Twisted level), and like it gated: the
overrides below reach into Autobahn's protocol internals (``CONFIG_ATTRS``,
``_onMessage``, ``message_data``, ``send_queue``, ``payloadHybi``) and were
measured on Autobahn 24–26; with any other version, or ``fast_paths = no``,
:func:`protocol_class` returns the stock :class:`TerminatedProtocol`.

* Options as class attributes (see :func:`protocol_class`).
* No per-call debug formatting in ``sendData``; no txaio "message" event.
* Text validated with CPython's UTF-8 decoder (:mod:`wsgate.utf8`).
* Broadcast deliveries coalesced per reactor iteration (:mod:`wsgate.coalesce`):
  ``send_prepared`` hands the pre-framed bytes to the subscriber, and
  ``sendData`` writes whatever it holds first, so frames keep their order.
"""

import types

import autobahn

from wsgate.observe import log_message
from wsgate.targets.websocket import TerminatedProtocol
from wsgate.utf8 import Utf8Validator

SUPPORTED_AUTOBAHN = range(24, 27)


def supported():
    """Whether the installed Autobahn is one these overrides were written for."""
    try:
        major = int(autobahn.__version__.split(".")[0])
    except ValueError:
        return False
    return major in SUPPORTED_AUTOBAHN and hasattr(TerminatedProtocol, "CONFIG_ATTRS")


def protocol_class(factory, fast):
    """The protocol class for *factory*'s connections (built once, kept on the factory).

    With ``fast``, a subclass of :class:`FastTerminatedProtocol` that holds
    the factory's Autobahn options (``CONFIG_ATTRS``) as class attributes.
    Autobahn's ``_connectionMade`` otherwise copies its 29 options into
    every connection's ``__dict__`` (memory per idle connection) and
    ``pformat``s all of them for a debug line, logged or not: 0.46 ms per
    handshake here, the largest single cost of one. The options are the
    factory's values either way; a route's own limits are still set on the
    instance.
    """
    classes = factory.__dict__.setdefault("_wsgate_protocol_classes", {})
    cls = classes.get(fast)
    if cls is None:
        if fast and supported():
            options = {attr: getattr(factory, attr) for attr in FastTerminatedProtocol.CONFIG_ATTRS}
            for attr, value in options.items():
                if isinstance(value, types.FunctionType):  # a class attribute would bind
                    options[attr] = staticmethod(value)   # (perMessageCompressionAccept)
            cls = type("ListenerProtocol", (FastTerminatedProtocol,),
                       dict(options, CONFIG_ATTRS=()))
        else:
            cls = TerminatedProtocol
        classes[fast] = cls
    return cls


class FastTerminatedProtocol(TerminatedProtocol):
    """Autobahn-level savings (``fast_paths = yes``), each measured.

    Autobahn's ``sendData`` builds debug log arguments (``hltype``/``hlval``
    formatting) on every call even with debug logging off; this override
    skips them and keeps the behaviour: when nothing is queued for chopped or
    synced sending, a plain ``transport.write`` (``dataReceived`` skips them
    for both classes: see :meth:`TerminatedProtocol.dataReceived`). ``onMessageEnd`` also fires a txaio
    "message" event (a Deferred per message) that nothing here listens to.
    Text messages are validated with CPython's UTF-8 decoder
    (:mod:`wsgate.utf8`, same fail-fast verdicts). Broadcast deliveries are
    coalesced (:mod:`wsgate.coalesce`); ``sendData`` writes them first.
    """

    def _connectionMade(self):
        TerminatedProtocol._connectionMade(self)
        self.utf8validator = Utf8Validator()  # CPython's decoder: see wsgate.utf8

    def onMessageEnd(self):
        if not self.failedByMe:
            data = self.message_data
            self._onMessage(bytes(data) if type(data) is bytearray else b"".join(data),
                            self.message_is_binary)
        self.message_data = None

    def sendData(self, data, sync=False, chopsize=None):
        coalescing = self.coalescing
        if coalescing is not None and coalescing.pending:  # broadcast frames queued this
            coalescing.flush()                                # iteration go first
        if sync or chopsize or self.send_queue:
            return TerminatedProtocol.sendData(self, data, sync, chopsize)
        self.transport.write(data)
        if self.send_buffer.blocked:
            self.send_buffer.wrote(len(data))

    def send_prepared(self, prepared, size, is_binary):
        """A broadcast delivery, coalesced per reactor iteration (see wsgate.coalesce).

        The subscriber counts it when it writes it. With permessage-deflate
        negotiated each subscriber compresses on its own, as Autobahn's
        ``sendPreparedMessage`` does.
        """
        if self._perMessageCompress is not None:
            TerminatedProtocol.send_prepared(self, prepared, size, is_binary)
            return
        if self.policy_sessions and self._refused_by_policy("out", is_binary, size):
            return
        if self.state == self.STATE_OPEN:
            if self.log_messages:
                log_message(self.connection, "sent", size, is_binary)
            self.app.enqueue(prepared.payloadHybi, size)  # a BroadcastSubscriber
