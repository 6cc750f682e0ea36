"""The benchmark's generated gateway config stays valid (a config key change once broke
every wsgate scenario of bench/run.py while the test suite stayed green)."""

import ast
import os

from wsgate.config import load

BENCHLIB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "bench", "benchlib.py")


def _benchlib_string(name):
    tree = ast.parse(open(BENCHLIB, encoding="utf-8").read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == [name]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"bench/benchlib.py has no {name}")


def _wsgate_base():
    return _benchlib_string("WSGATE_BASE")


def test_the_benchmarks_gateway_config_loads(tmp_path):
    path = tmp_path / "bench.ini"
    path.write_text(_wsgate_base().format(ping_interval="0", wsgate_extra="")
                    + "[route:echo]\npath = /echo\necho = yes\n")
    config = load(str(path))
    assert config.listeners[0].backlog == 4096


def test_the_benchmarks_pool_config_loads(tmp_path):
    # bench/run.py's pool scenario: [upstream:bench] of three servers, a route to @bench
    servers = ", ".join(f"ws://127.0.0.1:{port}/echo" for port in (40001, 40002, 40003))
    path = tmp_path / "bench-pool.ini"
    path.write_text(_wsgate_base().format(ping_interval="0", wsgate_extra="")
                    + _benchlib_string("POOL_ROUTES").format(servers=servers,
                                                             balance="least_conn"))
    config = load(str(path))
    assert config.listeners[0].backlog == 4096
    pool = config.pools["bench"]
    assert pool.balance == "least_conn"
    assert [server.url.port for server in pool.servers] == [40001, 40002, 40003]


def _channel_policy(config, route_name):
    route = next(route for route in config.routes if route.name == route_name)
    return route.target.policy


def test_the_benchmarks_fanout_configs_load(tmp_path):
    # bench/run.py's fan-out scenario (issue 21): wsgate, wsgate-redis and
    # wsgate-redis-history, the last with every publish recorded
    fanout = _benchlib_string("FANOUT_ROUTE")
    broker = _benchlib_string("REDIS_BROKER").format(port=6390)
    key = _benchlib_string("REDIS_BROKER_KEY")
    for name, wsgate_extra, routes, history in (
            ("memory", "", fanout.format(history=""), 0),
            ("redis", key, fanout.format(history="") + broker, 0),
            ("redis-history", key, fanout.format(history="history = 100\n") + broker, 100)):
        path = tmp_path / f"bench-fanout-{name}.ini"
        path.write_text(_wsgate_base().format(ping_interval="0", wsgate_extra=wsgate_extra)
                        + routes)
        config = load(str(path))
        assert _channel_policy(config, "fanout").history == history, name
        if key in wsgate_extra:
            assert config.core.broker == "shared"
            assert config.brokers["shared"].type == "redis"
            assert config.brokers["shared"].url.endswith(":6390/0")
        else:
            assert config.core.broker is None


def test_the_benchmarks_recovery_configs_load(tmp_path):
    # bench/run.py's recovery scenario: /recover with history >= the missed messages,
    # on the in-process broker and on Redis
    recover = _benchlib_string("RECOVER_ROUTE").format(history=1000)
    broker = _benchlib_string("REDIS_BROKER").format(port=6390)
    for name, wsgate_extra, routes in (
            ("memory", "", recover),
            ("redis", _benchlib_string("REDIS_BROKER_KEY"), recover + broker)):
        path = tmp_path / f"bench-recovery-{name}.ini"
        path.write_text(_wsgate_base().format(ping_interval="0", wsgate_extra=wsgate_extra)
                        + routes)
        config = load(str(path))
        route = next(route for route in config.routes if route.name == "recover")
        assert route.target.channel == "recover"
        assert _channel_policy(config, "recover").history == 1000, name
        assert config.core.broker == ("shared" if wsgate_extra else None)
