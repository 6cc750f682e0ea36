"""The HTTP side of the upgrade: parsing and the contract's answers (pure logic)."""

import pytest

from wsgate import http

GOOD = (b"GET /chat/a?x=1 HTTP/1.1\r\nHost: example.com:8080\r\nUpgrade: WebSocket\r\n"
        b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nX-Multi: a\r\nX-Multi: b\r\n\r\n")


def test_parse_head_splits_path_query_and_headers():
    head = http.parse_head(GOOD)
    assert (head.method, head.path, head.query) == ("GET", "/chat/a", "x=1")
    assert head.host == "example.com:8080"
    assert head.get_all("x-multi") == ["a", "b"]
    assert head.wants_websocket
    http.check_websocket_upgrade(head)  # no exception


@pytest.mark.parametrize("raw", [
    b"GET /a HTTP/1.0\r\nHost: x\r\n\r\n",
    b"GET /a\r\nHost: x\r\n\r\n",
    b"GET a HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /a HTTP/1.1\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    b"GET /a HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
    b"GET /a#frag HTTP/1.1\r\nHost: x\r\n\r\n",
])
def test_malformed_heads_are_400(raw):
    with pytest.raises(http.HttpRefusal) as info:
        http.parse_head(raw)
    assert info.value.status == 400


def _refusal(raw):
    with pytest.raises(http.HttpRefusal) as info:
        http.check_websocket_upgrade(http.parse_head(raw))
    return info.value


def test_answers_follow_the_contract():
    assert _refusal(GOOD.replace(b"GET", b"PUT", 1)).headers == (("Allow", "GET"),)
    plain = _refusal(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert plain.status == 426 and plain.body == "Expected Upgrade: websocket"
    assert ("Upgrade", "websocket") in plain.headers
    version = _refusal(GOOD.replace(b"Version: 13", b"Version: 8"))
    assert version.status == 426 and ("Sec-WebSocket-Version", "13") in version.headers
    assert _refusal(GOOD.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"AAAA")).status == 400
    assert _refusal(GOOD.replace(b"keep-alive, Upgrade", b"keep-alive")).status == 400


def test_render_refusal_is_a_complete_response_with_extra_headers():
    data = http.render_refusal(http.HttpRefusal(503, "max_connections", "busy",
                                                [("Retry-After", "5")]))
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Retry-After: 5" in head and b"Connection: close" in head
    assert body == b"busy\n" and b"Content-Length: 5" in head
