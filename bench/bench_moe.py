"""LatentMoE dispatch: router, permutation + gather, combine, the dispatch path alone and the
whole layer forward / forward+backward at the MoE points of docs/design.md section 7, against PyTorch (eager,
compiled), torch._grouped_mm experts and vLLM's fused_moe when importable."""
from nemokernels.benchmark import cases_moe

CASES = cases_moe


def test_moe(run_case, case, impl):
    run_case(case, impl)
