"""mamba_chunk_scan_combined forward and forward+backward against the PyTorch chunked reference
(eager, compiled) and mamba_ssm's Triton kernels (installed or NK_MAMBA_SSM_SRC)."""
from nemokernels.benchmark import cases_ssd_scan

CASES = cases_ssd_scan


def test_ssd_chunk_scan(run_case, case, impl):
    run_case(case, impl)
