"""In-memory tests of wsgate.flow: the send buffer bound and the control-frame rate."""

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from wsgate.flow import ControlFrameRate, SendBuffer


class Listener:
    def __init__(self):
        self.calls = []

    def pauseProducing(self):
        self.calls.append("pause")

    def resumeProducing(self):
        self.calls.append("resume")

    def stopProducing(self):
        self.calls.append("stop")


def test_writes_are_not_counted_while_the_socket_takes_them():
    transport = StringTransport()
    buffer = SendBuffer(transport, limit=100)
    buffer.wrote(10_000)
    assert buffer.backlog == 0 and transport.producerState == "producing"


def test_client_is_not_read_once_more_than_the_limit_waits_behind_a_full_socket():
    transport = StringTransport()
    buffer = SendBuffer(transport, limit=100)
    buffer.pauseProducing()  # Twisted: the write buffer is over its threshold
    buffer.wrote(60)
    assert transport.producerState == "producing"
    buffer.wrote(60)
    assert transport.producerState == "paused" and buffer.over_limit
    buffer.resumeProducing()  # drained: read the client again, count afresh
    assert transport.producerState == "producing" and not buffer.over_limit
    assert buffer.backlog == 0


def test_pauses_reach_the_listener_and_stop_detaches_it():
    listener = Listener()
    buffer = SendBuffer(StringTransport(), limit=100, listener=listener)
    buffer.pauseProducing()
    buffer.resumeProducing()
    buffer.stopProducing()
    buffer.pauseProducing()
    assert listener.calls == ["pause", "resume", "stop"]


def test_control_frames_over_the_rate_in_one_second_are_refused_and_the_next_second_resets():
    clock = Clock()
    rate = ControlFrameRate(3, clock)
    assert [rate.allow() for _ in range(4)] == [True, True, True, False]
    clock.advance(1)
    assert rate.allow()
