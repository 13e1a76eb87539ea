"""The sm_90a SSD chunk output's fragment map against CuTe's own layouts, on the host: the
kernel (csrc/ssd/ssd_chunk_output_sm90.cu) masks, decays and stores each wgmma accumulator value
by the (row, column) frag_row / frag_col give it, and hands CB's values to the next product as
its register A operand in the same order. A wrong map there is silently wrong output on a GPU;
this check needs only nvcc and the CUTLASS headers (sm90_layout_check.cu)."""
import subprocess
from pathlib import Path

import pytest

from helpers import nvcc_and_cutlass, run_host_check

ROOT = Path(__file__).resolve().parents[2]


def test_sm90_chunk_output_fragment_map_matches_cute(tmp_path):
    if not (ROOT / "csrc" / "ssd" / "ssd_chunk_output_sm90.cuh").exists():
        pytest.skip("needs the source tree (csrc/)")
    run_host_check(Path(__file__).with_name("sm90_layout_check.cu"), tmp_path)


# Spill stores ptxas may report per sm_90a kernel (bytes, -Xptxas -v, both 16-bit types). The
# wgmma kernels sit at 231-255 registers with one CTA per SM: a spill there is local-memory
# traffic inside the products, so a change that adds one fails here, on a CPU. col_sm90_kernel's
# 44-52 bytes are loop-invariant scalars reloaded once per head (docs/ssd.md, "B3 on sm_90a").
SPILL_BUDGET = {"chunk_output_sm90_kernel": 0, "dstate_chain_wgmma_kernel": 0, "row_sm90_kernel": 0,
                "col_sm90_kernel": 64}


def test_sm90_kernels_stay_within_their_spill_budget(tmp_path):
    if not (ROOT / "csrc" / "ssd" / "ssd_chunk_scan_bwd_cuda.cu").exists():
        pytest.skip("needs the source tree (csrc/)")
    nvcc, cutlass = nvcc_and_cutlass()
    found = {}
    for src in ("ssd_chunk_scan_bwd_cuda.cu", "ssd_chunk_output_sm90.cu"):
        run = subprocess.run([str(nvcc), "-c", str(ROOT / "csrc" / "ssd" / src), "-o", str(tmp_path / "k.o"),
                              "-DNK_HAS_SM90=1", "-DNK_PORTABLE_SM90A=1", "-DNK_WITH_CUDA=1", "-DNDEBUG",
                              "-I", str(ROOT / "csrc"), "-I", str(Path(cutlass) / "include"), "-O3", "-std=c++20",
                              "--expt-relaxed-constexpr", "--expt-extended-lambda",
                              "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v"],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        entry = None
        for line in (run.stdout + run.stderr).splitlines():
            if "Compiling entry function" in line:
                entry = next((k for k in SPILL_BUDGET if k in line), None)
            elif entry is not None and "spill stores" in line:
                spill = int(line.split("bytes spill stores")[0].split(",")[-1].strip())
                found.setdefault(entry, []).append(spill)
                entry = None
    assert set(found) == set(SPILL_BUDGET), f"kernels not found in ptxas's report: {set(SPILL_BUDGET) - set(found)}"
    over = {k: v for k, v in found.items() if max(v) > SPILL_BUDGET[k]}
    assert not over, f"spill stores (bytes) over budget {SPILL_BUDGET}: {over}"
