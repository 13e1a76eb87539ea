"""The CUTLASS grouped GEMM's per-expert set-up on the host (grouped_gemm_setup_check.cu): the
shapes, pointers and strides csrc/moe/grouped_gemm_cutlass.cuh builds for each kind (forward,
swapped forward, dgrad, wgrad), evaluated by CUTLASS's GEMM convention, must give the op's
contract on every segment and write nothing else. The kernels themselves need a GPU; a wrong
base or stride there is silently wrong output, and this finds it with nvcc and CUTLASS alone."""
import subprocess
from pathlib import Path

import pytest

from helpers import nvcc_and_cutlass

ROOT = Path(__file__).resolve().parents[2]


def test_grouped_gemm_setup_describes_each_kind(tmp_path):
    if not (ROOT / "csrc" / "moe" / "grouped_gemm_cutlass.cuh").exists():
        pytest.skip("needs the source tree (csrc/)")
    nvcc, cutlass = nvcc_and_cutlass()
    exe = tmp_path / "grouped_gemm_setup_check"
    build = subprocess.run([str(nvcc), "-std=c++20", "--expt-relaxed-constexpr", "-diag-suppress", "128,2908",
                            "-I", str(ROOT / "csrc"), "-I", str(Path(cutlass) / "include"),
                            "-I", str(Path(cutlass) / "tools" / "util" / "include"),
                            str(Path(__file__).with_name("grouped_gemm_setup_check.cu")), "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
