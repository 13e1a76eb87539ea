"""The NVFP4 decode-in-the-mainloop GEMM's pieces on the host (nvfp4_sm90_check.cu): its fp16x2
decoder against e2m1 x e4m3 for every code input and scale byte, where decode_row_lut puts each
element, the wgmma fragment map against CuTe's layouts for every thread, and the token tile's
offsets. The kernel (csrc/nvfp4/gemm_decode_mma_sm90.cu) needs a GPU; a wrong map or decode
there is silently wrong output, and this finds it with nvcc and CUTLASS alone. Also: the kernel
compiles for sm_90a without spills."""
import subprocess
from pathlib import Path

import pytest

from helpers import nvcc_and_cutlass, run_host_check

ROOT = Path(__file__).resolve().parents[2]


def test_decoder_and_fragment_map_match_definitions(tmp_path):
    if not (ROOT / "csrc" / "nvfp4" / "gemm_decode_mma_sm90.cuh").exists():
        pytest.skip("needs the source tree (csrc/)")
    run_host_check(Path(__file__).with_name("nvfp4_sm90_check.cu"), tmp_path, "-O2")


def test_decode_mma_kernel_has_no_spills(tmp_path):
    if not (ROOT / "csrc" / "nvfp4" / "gemm_decode_mma_sm90.cu").exists():
        pytest.skip("needs the source tree (csrc/)")
    nvcc, cutlass = nvcc_and_cutlass()
    run = subprocess.run([str(nvcc), "-c", str(ROOT / "csrc" / "nvfp4" / "gemm_decode_mma_sm90.cu"),
                          "-o", str(tmp_path / "k.o"), "-DNK_HAS_SM90=1", "-DNK_WITH_CUDA=1", "-DNDEBUG",
                          "-I", str(ROOT / "csrc"), "-I", str(Path(cutlass) / "include"), "-O3", "-std=c++20",
                          "--expt-relaxed-constexpr", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = run.stdout + run.stderr
    spills = [line for line in report.splitlines() if "spill stores" in line]
    assert len(spills) >= 3, report[-3000:]  # one line per output dtype's kernel
    assert all(" 0 bytes spill stores" in line for line in spills), spills
    assert "C7520" not in report and "C7510" not in report, "wgmma serialized"
