"""A third-party route target (examples/wsgate-target-example, ``target = roomcount``),
pip-installed and used from a config over real sockets: the target interface is public."""

import json
import os
import subprocess
import sys

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from zope.interface.verify import verifyObject

from harness import ROOT, run, run_twistd_expecting_failure, start_gateway, write_config

EXAMPLE = os.path.join(ROOT, "examples", "wsgate-target-example")

ROUTES = """
[route:rooms]
path = /rooms/{room}
target = roomcount
max_online = 2
max_message_size = 64KiB
"""


@pytest.fixture(scope="module")
def installed():
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", EXAMPLE],
                   check=True, capture_output=True)


@pytest.fixture(scope="module")
def gateway(installed, tmp_path_factory):
    gw = start_gateway(tmp_path_factory.mktemp("target-plugin"), ROUTES)
    yield gw
    assert gw.stop() == 0


def test_the_example_provides_the_target_interfaces(installed):
    from wsgate.interfaces import ITargetFactory, IWebSocketApp
    from wsgate_target_example import RoomCountApp, roomcount
    from wsgate.targets import factories

    verifyObject(ITargetFactory, roomcount)
    verifyObject(IWebSocketApp, RoomCountApp({}, "r", 0, 1024))
    assert factories()["roomcount"] is roomcount


def test_a_plugin_target_serves_its_route_with_the_gateways_limits(gateway):
    async def scenario():
        async with connect(gateway.url("/rooms/blue")) as alice:
            welcome = json.loads(await alice.recv())
            async with connect(gateway.url("/rooms/blue")) as bob:
                assert json.loads(await bob.recv())["online"] == 2
                await alice.send("hello")
                reply = json.loads(await alice.recv())
                async with connect(gateway.url("/rooms/blue")) as carol:  # max_online = 2
                    with pytest.raises(ConnectionClosed) as full:
                        await carol.recv()
            async with connect(gateway.url("/rooms/green")) as dave:  # another room
                green = json.loads(await dave.recv())
            await alice.send("x" * (65 * 1024))  # over the route's max_message_size
            with pytest.raises(ConnectionClosed) as big:
                await alice.recv()
        return welcome, reply, full.value, green, big.value
    welcome, reply, full, green, big = run(scenario())
    assert welcome == {"type": "welcome", "room": "blue", "online": 1}
    assert reply == {"type": "reply", "seq": 1, "online": 2, "text": "hello"}
    assert full.rcvd.code == 1013 and full.rcvd.reason == "room full"
    assert green["online"] == 1
    assert big.rcvd.code == 1009


def test_a_plugin_targets_unknown_key_is_a_config_error(installed, tmp_path):
    path = write_config(tmp_path, """
        [listen:main]
        endpoint = tcp:0:interface=127.0.0.1
        [route:rooms]
        path = /rooms/{room}
        target = roomcount
        colour = blue
        """)
    code, stderr, _ = run_twistd_expecting_failure(path)
    assert code == 1 and "[route:rooms] colour: unknown key" in stderr


def test_an_unknown_target_lists_the_known_ones(tmp_path):
    path = write_config(tmp_path, """
        [listen:main]
        endpoint = tcp:0:interface=127.0.0.1
        [route:r]
        path = /r
        target = nosuch
        """)
    code, stderr, _ = run_twistd_expecting_failure(path)
    assert code == 1 and "[route:r] target: unknown target 'nosuch' (known: " in stderr
    assert "echo" in stderr and "upstream" in stderr
