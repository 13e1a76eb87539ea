"""NVFP4 quantize variants / dequantize (GB/s) and NVFP4Linear forward+backward against the bf16
nn.Linear (cases in nemokernels/benchmark/cases_nvfp4_quantize.py)."""
from nemokernels.benchmark import cases_nvfp4_quantize

CASES = cases_nvfp4_quantize


def test_nvfp4(run_case, case, impl):
    run_case(case, impl)
