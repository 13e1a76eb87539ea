"""causal_conv1d forward, forward+backward and decode update against F.conv1d (eager, compiled)."""
from nemokernels.benchmark import cases_ssd_conv1d

CASES = cases_ssd_conv1d


def test_causal_conv1d(run_case, case, impl):
    run_case(case, impl)
