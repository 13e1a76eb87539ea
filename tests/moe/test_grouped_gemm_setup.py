"""The CUTLASS grouped GEMM's per-expert set-up on the host (grouped_gemm_setup_check.cu): the
shapes, pointers and strides csrc/moe/grouped_gemm_cutlass.cuh builds for each kind (forward,
swapped forward, dgrad, wgrad), evaluated by CUTLASS's GEMM convention, must give the op's
contract on every segment and write nothing else. The kernels themselves need a GPU; a wrong
base or stride there is silently wrong output, and this finds it with nvcc and CUTLASS alone."""
from pathlib import Path

import pytest

from helpers import run_host_check

ROOT = Path(__file__).resolve().parents[2]


def test_grouped_gemm_setup_describes_each_kind(tmp_path):
    if not (ROOT / "csrc" / "moe" / "grouped_gemm_cutlass.cuh").exists():
        pytest.skip("needs the source tree (csrc/)")
    run_host_check(Path(__file__).with_name("grouped_gemm_setup_check.cu"), tmp_path, "-diag-suppress", "128,2908")
