"""Make the test helpers importable (``from harness import ...``), and read the log of
every gateway a test starts: an unexpected ``critical`` entry or traceback fails the test.

A test that provokes one on purpose says so: ``@pytest.mark.expect_log(r"regex")`` or
``gateway.expect_log(r"regex")``.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402
from pool_helpers import gateways, nodes  # noqa: E402,F401  (the pool tests' fixtures)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "expect_log(pattern, ...): gateway log lines this test expects "
        "(critical entries or tracebacks matching a pattern do not fail it)")


@pytest.fixture(autouse=True)
def gateway_logs_are_clean(request):
    """After each test, no gateway may have logged an unexpected critical entry or traceback."""
    yield
    marker = request.node.get_closest_marker("expect_log")
    expected = marker.args if marker else ()
    problems = []
    for gateway in list(harness.STARTED):
        problems += gateway.log_problems(expected)
        if gateway.proc.poll() is not None:
            harness.STARTED.remove(gateway)
    if problems:
        pytest.fail("a gateway logged what no test expected:\n" + "\n".join(problems),
                    pytrace=False)
