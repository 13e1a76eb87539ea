"""Gated RMSNorm (rmsnorm_fn, z given, 8 groups) forward and forward+backward against mamba_ssm's
PyTorch reference in float32 math (eager, compiled)."""
from nemokernels.benchmark import cases_ssd_rmsnorm

CASES = cases_ssd_rmsnorm


def test_rmsnorm_gated(run_case, case, impl):
    run_case(case, impl)
