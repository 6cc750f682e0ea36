"""The upgrade pipeline (:class:`wsgate.gateway.HandshakeProtocol`) driven in memory: a
``StringTransport`` and the gateway's ``Clock``, no sockets, so a failure points at the
line (the real-socket twins are in test_wire, test_policies, test_operations)."""

import struct

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from rawws import OP_TEXT, frame
from test_terminated_memory import frames_written
from wsgate import config, gateway as gateway_module
from wsgate.interfaces import IPolicy
from wsgate.policies import Allow
from wsgate.pubsub.memory import MemoryBroker
from wsgate.routing import build_router

HANDSHAKE_TIMEOUT = 5

CONFIG = f"""
[wsgate]
node_id = memory
max_connections = 1

[listen:main]
endpoint = tcp:0:interface=127.0.0.1
handshake_timeout = {HANDSHAKE_TIMEOUT}
ping_interval = 0

[policy:keys]
type = apikey
keys = k-alice=alice

[policy:held]
type = test_handshake_memory:held_policy

[route:echo]
path = /echo
echo = yes

[route:keyed]
path = /keyed
echo = yes
policies = keys

[route:held]
path = /held
echo = yes
policies = held

[route:site]
path = /site/*
static = site
"""

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


@implementer(IPolicy)
class HeldPolicy:
    """A policy whose verdicts the test gives: each check waits on a Deferred in ``waiting``."""

    mode = "enforce"

    def __init__(self, name):
        self.name = name
        self.waiting = []

    def check(self, request):
        d = defer.Deferred()
        self.waiting.append(d)
        return d


def held_policy(name, settings, context):
    return HeldPolicy(name)


def request(path="/echo", method="GET", version="13", key=KEY, upgrade=True, extra=b""):
    lines = [f"{method} {path} HTTP/1.1", "Host: gw.example"]
    if upgrade:
        lines += ["Upgrade: websocket", "Connection: Upgrade"]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    return ("\r\n".join(lines) + "\r\n").encode("latin-1") + extra + b"\r\n"


@pytest.fixture
def gateway(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text("<p>hello</p>")
    path = tmp_path / "wsgate.ini"
    path.write_text(CONFIG)
    cfg = config.load(str(path))
    gateway = gateway_module.Gateway(cfg, build_router(cfg), MemoryBroker(), Clock())
    gateway.refusals = []  # (status, reason) of every websocket.connection.rejected
    rejected = gateway.rejected

    def recording_rejected(refusal, *args, **kwargs):
        gateway.refusals.append((refusal.status, refusal.reason))
        rejected(refusal, *args, **kwargs)
    gateway.rejected = recording_rejected
    return gateway


@pytest.fixture
def problems():
    """Critical log entries and logged failures while the test runs, as text."""
    found = []

    def observe(event):
        if event.get("log_level") == LogLevel.critical or "log_failure" in event:
            failure = event.get("log_failure")
            found.append(formatEvent(event) + (f" ({failure.type.__name__})" if failure else ""))
    globalLogPublisher.addObserver(observe)
    yield found
    globalLogPublisher.removeObserver(observe)


def connect(gateway, *chunks):
    """A HandshakeProtocol on a StringTransport, fed *chunks* as a transport would (to the
    protocol it was handed to, once handed over): ``(protocol, transport)``."""
    protocol = gateway_module.GatewayFactory(gateway, "main").buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    for chunk in chunks:
        getattr(transport, "protocol", protocol).dataReceived(chunk)
    return protocol, transport


def response(transport):
    """``(status, {lower-case header: value}, body)`` of what was written."""
    head, _, body = transport.value().partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


def refused(gateway, *chunks):
    """Feed *chunks*; the refusal must be whole and the connection closed after it."""
    protocol, transport = connect(gateway, *chunks)
    status, headers, body = response(transport)
    assert transport.disconnecting, "a refusal closes the connection"
    assert int(headers["content-length"]) == len(body)
    assert gateway.clock.getDelayedCalls() == [], "the handshake timer was left running"
    return status, headers


# ------------------------------------------------------------------ refusals


def test_no_route_is_404(gateway):
    status, _ = refused(gateway, request("/nowhere"))
    assert status == 404 and gateway.refusals == [(404, "no_route")]


def test_no_upgrade_is_426_with_upgrade_websocket(gateway):
    status, headers = refused(gateway, request(upgrade=False))
    assert (status, headers["upgrade"]) == (426, "websocket")
    assert gateway.refusals == [(426, "bad_handshake")]


def test_another_method_is_405(gateway):
    status, headers = refused(gateway, request(method="POST"))
    assert (status, headers["allow"]) == (405, "GET")


def test_another_websocket_version_is_426_naming_13(gateway):
    status, headers = refused(gateway, request(version="8"))
    assert (status, headers["sec-websocket-version"]) == (426, "13")


@pytest.mark.parametrize("head", [
    b"BLAH\r\n\r\n",
    b"GET /echo HTTP/1.0\r\nHost: x\r\n\r\n",
    b"GET /echo HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    b"GET /echo HTTP/1.1\r\n\r\n",  # no Host
    request(key="short"),
    request(key=None),
])
def test_a_malformed_request_is_400(gateway, head):
    status, _ = refused(gateway, head)
    assert status == 400 and gateway.refusals == [(400, "bad_handshake")]


def test_beyond_max_connections_is_503_with_retry_after(gateway):
    protocol, transport = connect(gateway, request())
    assert response(transport)[0] == 101
    status, headers = refused(gateway, request())
    assert status == 503 and "retry-after" in headers
    assert gateway.refusals == [(503, "max_connections")]


def test_a_draining_gateway_is_503(gateway):
    gateway.draining = True
    status, headers = refused(gateway, request())
    assert status == 503 and "retry-after" in headers
    assert gateway.refusals == [(503, "draining")]


def test_a_drained_route_is_503_and_the_others_are_not(gateway):
    gateway.drained_routes.add("keyed")
    assert refused(gateway, request("/keyed"))[0] == 503
    protocol, transport = connect(gateway, request())
    assert response(transport)[0] == 101


def test_a_head_that_never_ends_is_aborted_at_the_handshake_timeout(gateway):
    protocol, transport = connect(gateway, request()[:40])
    gateway.clock.advance(HANDSHAKE_TIMEOUT - 0.1)
    assert not transport.disconnecting
    protocol.dataReceived(b"X-Slow: 1\r\n")  # trickling in does not extend it
    gateway.clock.advance(0.1)
    assert transport.disconnected and transport.value() == b""  # aborted, no answer
    protocol.connectionLost(Failure(ConnectionDone()))
    assert gateway.clock.getDelayedCalls() == []


# ------------------------------------------------------------------ policies


def test_a_policy_denying_is_401_with_its_challenge(gateway):
    status, headers = refused(gateway, request("/keyed"))
    assert status == 401 and headers["www-authenticate"].startswith("Bearer")
    assert gateway.refusals == [(401, "keys")]


def test_a_policy_allowing_hands_over_with_its_identity(gateway):
    protocol, transport = connect(gateway, request("/keyed", extra=b"X-API-Key: k-alice\r\n"))
    assert response(transport)[0] == 101
    connection, = gateway.connections.values()
    assert connection.identity == "alice"


def test_a_policy_that_answers_later_holds_the_answer_and_early_bytes(gateway):
    early = frame(OP_TEXT, b"early")
    protocol, transport = connect(gateway, request("/held"), early)
    assert transport.value() == b""  # deciding
    held, = gateway.config.policies["held"].waiting
    held.callback(Allow(identity="later"))
    status, _, rest = response(transport)
    assert status == 101
    transport.clear()
    transport.write(rest)
    assert frames_written(transport) == [(OP_TEXT, b"early")]  # kept while deciding
    connection, = gateway.connections.values()
    assert connection.identity == "later"


def test_the_client_leaving_while_a_policy_decides_cancels_it(gateway):
    protocol, transport = connect(gateway, request("/held"))
    held, = gateway.config.policies["held"].waiting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert held.called  # cancelled: the policy stops waiting
    held.addErrback(lambda failure: failure.trap(defer.CancelledError))
    assert transport.value() == b"" and gateway.refusals == []
    assert gateway.connections == {}
    assert gateway.clock.getDelayedCalls() == []


def test_the_client_leaving_while_a_policy_decides_logs_nothing_critical(gateway, problems):
    protocol, _ = connect(gateway, request("/held"))
    held, = gateway.config.policies["held"].waiting
    protocol.connectionLost(Failure(ConnectionDone()))
    assert problems == []


# ------------------------------------------------------------------ hand-over


def test_an_upgrade_hands_over_to_echo_and_replays_the_bytes_after_the_head(gateway):
    early = frame(OP_TEXT, b"right behind the head")
    protocol, transport = connect(gateway, request() + early)
    status, headers, rest = response(transport)
    assert status == 101
    assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    transport.clear()
    transport.write(rest)  # the echo's answer came with the 101
    assert frames_written(transport) == [(OP_TEXT, b"right behind the head")]
    assert gateway.clock.getDelayedCalls() == []  # the handshake timer is gone


def test_bytes_in_separate_reads_after_the_head_are_replayed_too(gateway):
    head = request()
    early = frame(OP_TEXT, b"split")
    protocol, transport = connect(gateway, head[:30], head[30:] + early[:3], early[3:])
    status, _, rest = response(transport)
    assert status == 101
    transport.clear()
    transport.write(rest)
    assert frames_written(transport) == [(OP_TEXT, b"split")]


def test_the_echo_closes_cleanly_after_the_hand_over(gateway):
    protocol, transport = connect(gateway, request())
    transport.clear()
    echo = transport.protocol
    echo.dataReceived(frame(0x8, struct.pack("!H", 1000)))
    assert frames_written(transport) == [(0x8, struct.pack("!H", 1000))]
    assert transport.disconnecting  # the server side closes TCP
    echo.connectionLost(Failure(ConnectionDone()))
    assert gateway.connections == {}
    assert gateway.clock.getDelayedCalls() == []


# ------------------------------------------------------------------ static routes


def test_a_static_route_answers_get_with_the_file(gateway):
    protocol, transport = connect(gateway, b"GET /site/ HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = response(transport)
    assert (status, body) == (200, b"<p>hello</p>")
    assert headers["content-type"].startswith("text/html")
    assert transport.disconnecting


def test_a_static_route_answers_post_with_405(gateway):
    status, headers = refused(gateway, b"POST /site/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, headers["allow"]) == (405, "GET, HEAD")


def test_a_static_route_without_the_file_is_404(gateway):
    status, _ = refused(gateway, b"GET /site/missing.txt HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 404
