"""RFC 6455 conformance: Autobahn testsuite cases 1.*-10.*, echo route and through the proxy.

The full run (12.* and 13.*, compression) is ``make conformance``; its summary
is in the README.
"""

import pytest

from harness import load_script, require_peer


@pytest.mark.parametrize("target", ["echo", "proxy"])
def test_autobahn_cases_1_to_10_have_no_failures(tmp_path, target):
    conformance = load_script("conformance")
    require_peer(conformance.WSTEST, "the Autobahn testsuite (wstest)")
    index = conformance.run_against_gateway(conformance.QUICK_CASES, str(tmp_path), target)
    counts, failed = conformance.summarize(index, "wsgate")
    print(conformance.format_summary(counts, conformance.QUICK_CASES, failed))
    assert failed == []
    assert counts["OK"] >= 200  # the run really covered the cases
