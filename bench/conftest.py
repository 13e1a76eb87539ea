"""pytest-benchmark runs of the `nemokernels bench` cases: `python -m pytest bench/ --benchmark-only`.

Only collected when bench/ is named (pyproject's testpaths is tests/). Modules here are named
bench_*.py and each sets CASES to a nemokernels.benchmark case module; every (case,
implementation) pair becomes one benchmark, grouped by case so implementations compare.
"""
import itertools

import pytest
import torch

from nemokernels.benchmark.harness import choose_rotate


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true",
                     help="all the points of docs/design.md section 7 (default: the `nemokernels bench --quick` subset)")


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    quick = not metafunc.config.getoption("--bench-full")
    pairs = [(c, impl) for c in metafunc.module.CASES.cases(quick, _device()) for impl in ["nemokernels", *c.baselines]]
    metafunc.parametrize("case,impl", pairs, ids=[f"{c.op}[{c.name}]-{impl}" for c, impl in pairs])


@pytest.fixture
def run_case(benchmark):
    """run_case(case, impl): benchmark one implementation on rotating random inputs."""
    device = _device()

    def run(case, impl):
        fn = case.fn if impl == "nemokernels" else case.baselines[impl]
        sets = itertools.cycle([case.make_inputs() for _ in range(choose_rotate(case.bytes, device))])

        def call():
            fn(*next(sets))
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # time the kernels, not the launch

        try:
            call()  # first call outside the timing: torch.compile compiles here
        except Exception as e:  # noqa: BLE001
            if impl == "nemokernels":
                raise
            pytest.skip(f"{impl} unavailable: {type(e).__name__}: {e}")
        benchmark.group = f"{case.op} {case.name}"
        benchmark.extra_info.update(bytes=case.bytes, flops=case.flops, device=str(device))
        benchmark(call)

    return run
