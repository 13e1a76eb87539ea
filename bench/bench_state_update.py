"""selective_state_update (one decode token, in place) and the multi-token update (T = 4)
against the same math in PyTorch (eager, compiled); reports GB/s of state traffic."""
from nemokernels.benchmark import cases_ssd_state_update

CASES = cases_ssd_state_update


def test_state_update(run_case, case, impl):
    run_case(case, impl)
