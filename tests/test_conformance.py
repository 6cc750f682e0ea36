"""RFC 6455 conformance: Autobahn testsuite cases 1.*-10.* on the echo route, through the
proxy, and through the proxy behind a TLS listener.

Both verdicts of each case count (``behavior`` and ``behaviorClose``): a gateway
that answers every frame right but leaves the TCP connection for the client to
drop fails here. The full run (12.* and 13.*, compression) is ``make
conformance``; its summary is in the README.
"""

import pytest

from harness import load_script, require_peer

# The gateway's close handshake timeout: a case that lasts this long waited it
# out instead of closing (9.* are the performance cases: their time is the payload's).
CLOSE_HANDSHAKE_TIMEOUT = 5.0


@pytest.fixture(scope="module")
def conformance():
    module = load_script("conformance")
    require_peer(module.WSTEST, "the Autobahn testsuite (wstest)")
    return module


@pytest.mark.parametrize("target", ["echo", "proxy", "proxy-tls"])
def test_autobahn_cases_1_to_10_have_no_failures(tmp_path, conformance, target):
    index = conformance.run_against_gateway(conformance.QUICK_CASES, str(tmp_path), target)
    summary = conformance.summarize(index, "wsgate")
    print(f"{target}: {conformance.format_summary(summary, conformance.QUICK_CASES)}")
    assert summary.failed == []
    assert summary.behavior["OK"] >= 280 and summary.close["OK"] >= 280  # really covered
    waited = {case: seconds for case, seconds in summary.durations.items()
              if seconds >= CLOSE_HANDSHAKE_TIMEOUT and not case.startswith("9.")}
    assert waited == {}, "cases that waited out a timeout"


@pytest.mark.parametrize("fast_paths", ["no", "yes"])
def test_failing_inside_a_frame_does_not_wait_for_the_close_timeout(
        tmp_path, monkeypatch, conformance, fast_paths):
    # Case 6.4.4: invalid UTF-8 in the middle of a frame's payload; the client
    # answers the gateway's 1007 before finishing the frame. The case waits 1 s
    # itself; waiting out the close handshake timeout made it 6 s.
    monkeypatch.setenv("WSGATE_TEST_FAST_PATHS", fast_paths)
    index = conformance.run_against_gateway(["6.4.4"], str(tmp_path), "echo")
    result = index["wsgate"]["6.4.4"]
    assert (result["behavior"], result["behaviorClose"], result["remoteCloseCode"]) == \
        ("OK", "OK", 1007)
    assert result["duration"] < 3000


def _index(verdicts):
    """An index.json with *verdicts*: ``{case: (behavior, behaviorClose)}``."""
    return {"wsgate": {case: {"behavior": behavior, "behaviorClose": close, "duration": 10}
                       for case, (behavior, close) in verdicts.items()}}


def test_summary_counts_the_close_verdict_too(conformance):
    index = _index({"1.1.1": ("OK", "OK"), "1.1.2": ("OK", "UNCLEAN"),
                    "1.1.3": ("OK", "FAILED BY CLIENT"), "2.1": ("NON-STRICT", "OK"),
                    "2.2": ("INFORMATIONAL", "INFORMATIONAL"), "2.3": ("FAILED", "OK"),
                    "7.1": ("OK", "WRONG CODE"), "7.2": ("OK", "FAILED")})
    summary = conformance.summarize(index, "wsgate")
    assert summary.failed == ["1.1.2", "1.1.3", "2.3", "7.2"]
    assert summary.behavior == {"OK": 5, "NON-STRICT": 1, "INFORMATIONAL": 1, "FAILED": 1}
    assert summary.close == {"OK": 3, "UNCLEAN": 1, "FAILED BY CLIENT": 1, "INFORMATIONAL": 1,
                             "WRONG CODE": 1, "FAILED": 1}
    assert conformance.format_summary(summary, ["1.*", "2.*", "7.*"]) == (
        "8 cases (1.*, 2.*, 7.*): behavior 5 OK, 1 NON-STRICT, 1 INFORMATIONAL, 1 FAILED, "
        "0 UNCLEAN; close 3 OK, 0 NON-STRICT, 1 INFORMATIONAL, 1 FAILED, 1 UNCLEAN, "
        "1 FAILED BY CLIENT, 1 WRONG CODE; failed: 1.1.2, 1.1.3, 2.3, 7.2")


def test_tls_targets_listen_with_a_generated_certificate(tmp_path, conformance):
    config = conformance.gateway_config(tmp_path, "proxy-tls", upstream_port=9)
    assert "max_fragments = 65536" in config
    assert f"tls_cert = {tmp_path / 'conformance.crt'}" in config
    assert "upstream = ws://127.0.0.1:9/conformance" in config
    assert (tmp_path / "conformance.key").exists()
    assert "tls_cert" not in conformance.gateway_config(tmp_path, "echo")
