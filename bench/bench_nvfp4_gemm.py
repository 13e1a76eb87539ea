"""nvfp4.gemm (bf16 out) against torch bf16 matmul of the dequantized operands and the PyTorch
decode + matmul reference, at the NVFP4 points of docs/design.md section 7 (TFLOP/s and ratios in the report)."""
from nemokernels.benchmark import cases_nvfp4_gemm

CASES = cases_nvfp4_gemm


def test_nvfp4_gemm(run_case, case, impl):
    run_case(case, impl)
