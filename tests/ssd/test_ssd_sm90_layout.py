"""The sm_90a SSD chunk output's fragment map against CuTe's own layouts, on the host: the
kernel (csrc/ssd/ssd_chunk_output_sm90.cu) masks, decays and stores each wgmma accumulator value
by the (row, column) frag_row / frag_col give it, and hands CB's values to the next product as
its register A operand in the same order. A wrong map there is silently wrong output on a GPU;
this check needs only nvcc and the CUTLASS headers (sm90_layout_check.cu)."""
import importlib.util
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _setup_module():
    spec = importlib.util.spec_from_file_location("nk_setup_for_layout", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sm90_chunk_output_fragment_map_matches_cute(tmp_path):
    if not (ROOT / "csrc" / "ssd" / "ssd_chunk_output_sm90.cuh").exists():
        pytest.skip("needs the source tree (csrc/)")
    setup = _setup_module()
    nvcc = setup.find_nvcc()
    try:
        cutlass = setup.cutlass_dir()
    except Exception:  # noqa: BLE001 - any failure to find it means: not installed here
        cutlass = None
    if nvcc is None or cutlass is None or not (Path(cutlass) / "include" / "cute").exists():
        pytest.skip("needs nvcc and the CUTLASS headers (requirements-build.txt)")
    exe = tmp_path / "sm90_layout_check"
    build = subprocess.run([str(nvcc), "-std=c++20", "--expt-relaxed-constexpr", "-I", str(ROOT / "csrc"),
                            "-I", str(Path(cutlass) / "include"), str(Path(__file__).with_name("sm90_layout_check.cu")),
                            "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
