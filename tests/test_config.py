"""Config loading: typed values, defaults, and one-line errors naming file/section/key."""

import os
import textwrap

import pytest

from wsgate import units
from wsgate.config import ConfigError, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LISTENER = "[listen:main]\nendpoint = tcp:0:interface=127.0.0.1\n"


def write(tmp_path, text):
    path = tmp_path / "gw.ini"
    path.write_text(textwrap.dedent(text))
    return str(path)


def error_for(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    return str(info.value)


def test_default_config_loads_with_documented_routes():
    config = load(os.path.join(ROOT, "etc", "wsgate.ini"))
    assert [listener.endpoint for listener in config.listeners] == [
        "tcp:8080:interface=127.0.0.1"]
    routes = {route.name: route for route in config.routes}
    assert routes["echo"].path.text == "/echo" and routes["echo"].target.type == "echo"
    chat = routes["chat"].target
    assert (chat.type, chat.channel, chat.client_publish, chat.include_sender) == (
        "broadcast", "room:{room}", True, False)
    listener = config.listeners[0]
    assert (listener.handshake_timeout, listener.ping_interval, listener.ping_timeout) == (
        10, 30, 10)
    assert listener.max_message_size == listener.max_frame_size == 1024 * 1024


def test_values_are_typed(tmp_path):
    config = load(write(tmp_path, LISTENER + textwrap.dedent("""\
        ping_interval = 500ms
        idle_timeout = 2m
        max_message_size = 64KiB
        compression = permessage-deflate
        [route:r]
        host = *.Example.com
        path = /r/{x}
        broadcast = c:{x}
        include_sender = on
        max_message_size = 100
        """)))
    listener, route = config.listeners[0], config.routes[0]
    assert listener.ping_interval == 0.5 and listener.idle_timeout == 120
    assert listener.max_message_size == listener.max_frame_size == 65536
    assert listener.compression is True
    assert route.target.include_sender is True and route.max_message_size == 100
    assert route.target.channel_for({"x": "42"}) == "c:42"


@pytest.mark.parametrize("text,expected", [
    ("[wsgate]\nlog_format = xml\n" + LISTENER, "[wsgate] log_format: expected one of text, json"),
    ("[wsgate]\nmax_connections = 0\n" + LISTENER, "[wsgate] max_connections:"),
    ("[wsgate]\nbogus = 1\n" + LISTENER, "[wsgate] bogus: unknown key"),
    ("[nonsense]\n" + LISTENER, "[nonsense]: unknown section"),
    ("[wsgate]\n", "at least one listener is required"),
    ("[listen:main]\nendpoint = carrier-pigeon:9\n", "[listen:main] endpoint: expected a Twisted"),
    ("[listen:main]\nendpoint = haproxy:ssl:443\n", "[listen:main] endpoint: haproxy:ssl:"),
    (LISTENER + "handshake_timeout = soon\n", "[listen:main] handshake_timeout: expected a duration"),
    (LISTENER + "max_message_size = 1 lot\n", "[listen:main] max_message_size: expected a size"),
    (LISTENER + "compression = gzip\n", "[listen:main] compression: expected one of"),
    (LISTENER + "tls_cert = missing.pem\n", "[listen:main] tls_cert: cannot read"),
    (LISTENER + "tls_key = k.pem\n", "[listen:main] tls_cert: is required"),
    (LISTENER + "[route:r]\npath = /r\n", "[route:r]: expected one target"),
    (LISTENER + "[route:r]\npath = /r\necho = yes\nbroadcast = c\n",
     "[route:r] broadcast: a route has one target"),
    (LISTENER + "[route:r]\necho = yes\n", "[route:r] path: is required"),
    (LISTENER + "[route:r]\npath = r\necho = yes\n", "[route:r] path: expected a path"),
    (LISTENER + "[route:r]\npath = /r\necho = maybe\n", "[route:r] echo: expected yes or no"),
    (LISTENER + "[route:r]\npath = /r/{a}\nbroadcast = c:{b}\n",
     "[route:r] broadcast: {b} is not a placeholder"),
    (LISTENER + "[route:r]\npath = /r\necho = yes\ninclude_sender = yes\n",
     "[route:r] include_sender: unknown key"),
    (LISTENER + "[route:r]\npath = /r\necho = yes\nlisteners = other\n",
     "[route:r] listeners: unknown listener 'other'"),
    (LISTENER + "[route:r]\npath = /r\necho = yes\n[route:r]\npath = /s\necho = yes\n",
     "[route:r]: section appears twice"),
    ("just text\n", "expected a [section] first"),
])
def test_bad_configs_name_section_and_key(tmp_path, text, expected):
    message = error_for(tmp_path, text)
    assert message.startswith(str(tmp_path / "gw.ini") + ": ")
    assert expected in message
    assert "\n" not in message


def test_tls_cert_on_an_ssl_endpoint_is_refused(tmp_path):
    from certs import TestCA

    cert, key = TestCA().write_leaf(tmp_path, "leaf", "localhost")
    message = error_for(tmp_path, f"""\
        [listen:main]
        endpoint = ssl:0:privateKey={key}:certKey={cert}
        tls_cert = {cert}
        """)
    assert "[listen:main] tls_cert: a ssl: endpoint already does TLS" in message


def test_mismatched_key_is_refused(tmp_path):
    from certs import TestCA

    ca = TestCA()
    cert, _ = ca.write_leaf(tmp_path, "one", "localhost")
    _, other_key = ca.write_leaf(tmp_path, "two", "localhost")
    message = error_for(tmp_path, LISTENER + f"tls_cert = {cert}\ntls_key = {other_key}\n")
    assert "[listen:main] tls_key: the private key" in message


@pytest.mark.parametrize("text,value", [("500ms", 0.5), ("10s", 10), ("2m", 120), ("1h", 3600),
                                        ("7", 7), ("0", 0)])
def test_durations(text, value):
    assert units.parse_duration(text) == value


@pytest.mark.parametrize("text,value", [("64KiB", 65536), ("1MiB", 1 << 20), ("1GiB", 1 << 30),
                                        ("123", 123)])
def test_sizes(text, value):
    assert units.parse_size(text) == value


@pytest.mark.parametrize("bad", ["ten", "1.5MiB", "-1", "1 TB"])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        units.parse_size(bad)


@pytest.mark.parametrize("key, value", [
    ("ping_interval", "1e20"), ("ping_interval", "inf"), ("handshake_timeout", "nan"),
    ("idle_timeout", "99999999999999999999h"), ("ping_timeout", "721h"),
    ("max_message_size", "99999999999GiB"), ("max_fragments", "0"), ("backlog", "70000"),
])
def test_values_beyond_their_bounds_are_refused_with_file_section_and_key(tmp_path, key, value):
    """Issue 16, item 8: durations such as 1e20 or inf were accepted."""
    message = error_for(tmp_path, LISTENER + f"{key} = {value}\n")
    assert f"gw.ini: [listen:main] {key}: expected" in message


def test_rates_beyond_their_bounds_are_refused(tmp_path):
    for rate in ("1e20/s", "inf/s", "nan/s"):
        message = error_for(tmp_path, LISTENER + textwrap.dedent(f"""\
            [policy:fast]
            type = ratelimit
            rate = {rate}
            """))
        assert "[policy:fast] rate: expected a rate" in message


def test_backlog_in_the_endpoint_string_is_refused(tmp_path):
    message = error_for(tmp_path, "[listen:main]\nendpoint = tcp:0:backlog=5\n")
    assert "[listen:main] backlog: set the backlog with this key" in message


def test_hostile_input_limits_have_their_defaults_and_can_be_set(tmp_path):
    listener = load(write(tmp_path, LISTENER)).listeners[0]
    assert (listener.max_fragments, listener.backlog) == (1024, 1024)
    config = load(write(tmp_path, LISTENER + "max_fragments = 65536\nbacklog = 50\n"
                        "[route:e]\npath = /e\necho = yes\nmax_send_buffer = 64KiB\n"))
    assert (config.listeners[0].max_fragments, config.listeners[0].backlog) == (65536, 50)
    assert config.routes[0].target.max_send_buffer == 65536


def test_duplicate_routes_are_an_error_naming_both_sections(tmp_path):
    """Issue 18, item 7: the second of two identical routes could never be chosen."""
    message = error_for(tmp_path, LISTENER + textwrap.dedent("""\
        [route:first]
        path = /chat/{room}
        echo = yes
        [route:second]
        path = /chat/{name}
        broadcast = c:{name}
        """))
    assert "[route:second] path: the same host and path as [route:first]" in message


def test_routes_that_differ_in_host_or_listener_are_not_duplicates(tmp_path):
    config = load(write(tmp_path, LISTENER + textwrap.dedent("""\
        [listen:other]
        endpoint = tcp:0:interface=127.0.0.1
        [route:a]
        path = /x
        echo = yes
        listeners = main
        [route:b]
        path = /x
        echo = yes
        listeners = other
        [route:c]
        host = example.com
        path = /x
        echo = yes
        listeners = main
        """)))
    assert [route.name for route in config.routes] == ["a", "b", "c"]


def test_relative_files_of_an_ssl_endpoint_are_relative_to_the_config_file(tmp_path):
    """Issue 18, item 8: they were relative to the process's working directory."""
    from certs import TestCA

    folder = tmp_path / "conf dir:with colon"
    folder.mkdir()
    TestCA().write_leaf(folder, "leaf", "localhost")
    path = folder / "gw.ini"
    path.write_text("[listen:main]\n"
                    "endpoint = ssl:0:interface=127.0.0.1:privateKey=leaf.key:certKey=leaf.crt\n")
    assert os.getcwd() != str(folder)
    endpoint = load(str(path)).listeners[0].endpoint  # Twisted loaded the files
    escaped = str(folder).replace(":", "\\:")  # endpoint syntax: a colon in a value is \:
    assert f"privateKey={escaped}/leaf.key" in endpoint
    assert f"certKey={escaped}/leaf.crt" in endpoint
