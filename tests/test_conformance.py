"""RFC 6455 conformance: the Autobahn testsuite cases 1.*-10.* against the echo route.

The full run (12.* and 13.*, compression) is ``make conformance``; its summary
is in the README.
"""

from harness import load_script, require_peer


def test_autobahn_cases_1_to_10_have_no_failures_on_the_echo_route(tmp_path):
    conformance = load_script("conformance")
    require_peer(conformance.WSTEST, "the Autobahn testsuite (wstest)")
    index = conformance.run_against_gateway(conformance.QUICK_CASES, str(tmp_path))
    counts, failed = conformance.summarize(index, "wsgate")
    print(conformance.format_summary(counts, conformance.QUICK_CASES, failed))
    assert failed == []
    assert counts["OK"] >= 200  # the run really covered the cases
