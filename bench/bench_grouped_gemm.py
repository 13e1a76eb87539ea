"""grouped_gemm (moe) up/down projections and the up projection's backward against a torch.mm
loop over experts, torch._grouped_mm and a dense torch.mm of the same FLOPs."""
from nemokernels.benchmark import cases_moe_grouped_gemm

CASES = cases_moe_grouped_gemm


def test_grouped_gemm(run_case, case, impl):
    run_case(case, impl)
