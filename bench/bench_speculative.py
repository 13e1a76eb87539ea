"""MTP verification (greedy, rejection sampling, sampling transform) at batch 1..256, k 1..8,
vocab 131072, against vectorised PyTorch (eager, compiled) and flashinfer when importable."""
from nemokernels.benchmark import cases_speculative

CASES = cases_speculative


def test_spec(run_case, case, impl):
    run_case(case, impl)
