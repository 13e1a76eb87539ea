"""One training step of a Nemotron-3-shaped model (~1B parameters on CUDA, the demo's small
model on CPU or --quick) on the kernels against transformers' NemotronHForCausalLM with the same
weights."""
from nemokernels.benchmark import cases_models

CASES = cases_models


def test_models(run_case, case, impl):
    run_case(case, impl)
