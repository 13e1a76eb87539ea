"""The extension: stable-ABI only, build facts true, every registered op accounted for."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nemokernels
from nemokernels import _C
from nemokernels.info import OPS, build_info


def _undefined_symbols():
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm (binutils) not installed")
    out = subprocess.run([nm, "-D", "--undefined-only", _C.__file__], check=True, capture_output=True, text=True).stdout
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


def test_only_the_stable_c_shim_is_imported_from_libtorch():
    """No libtorch/c10 C++ symbol may be imported: those change between torch releases and
    cause `undefined symbol` after an upgrade. Only the C shim (aoti_torch_*, torch_*) is allowed."""
    syms = _undefined_symbols()
    cxx_torch = [s for s in syms if re.match(r"_ZN?K?(3c10|2at|5torch|6caffe2)", s) or "c10" in s and s.startswith("_Z")]
    assert not cxx_torch, f"_C imports libtorch C++ symbols: {cxx_torch[:10]}"
    shim = [s for s in syms if s.startswith(("aoti_torch_", "torch_"))]
    assert shim, "expected the stable C shim symbols to be imported (is the check looking at the right file?)"


def test_needed_libraries_are_torch_and_system_only():
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not installed")
    out = subprocess.run([readelf, "-d", _C.__file__], check=True, capture_output=True, text=True).stdout
    needed = re.findall(r"Shared library: \[([^\]]+)\]", out)
    assert not any("python" in n for n in needed), needed
    assert not any("cudart" in n for n in needed), f"cudart must be linked statically: {needed}"
    assert "libtorch_cpu.so" in needed
    assert "libtorch_cuda.so" not in needed, "a CUDA build must still load under a CPU-only torch"
    assert not re.search(r"R(UN)?PATH.*torch", out), "no RPATH to the build-time torch: resolve the loaded one"


def test_registered_ops_match_info_list():
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("nemokernels::")}
    assert registered == set(OPS), f"info.OPS out of date: {registered ^ set(OPS)}"
    assert set(_C.cuda_ops()) <= registered


def test_build_info_is_true_here():
    info = build_info("cpu")
    assert info["version"] == nemokernels.__version__ == _C.__version__
    assert info["torch"] == torch.__version__
    assert info["stable_abi_target"] == "2.11"
    assert all(d["path"] == "cpu" for d in info["ops"].values())
    if _C.with_cuda:
        assert info["cuda_archs"] and all(a.startswith("sm_") for a in info["cuda_archs"])
        assert info["nvcc"]
    else:
        assert info["cuda_archs"] == [] and not _C.cuda_ops()


def test_info_cli_runs():
    out = subprocess.run([sys.executable, "-m", "nemokernels", "info"], check=True, capture_output=True, text=True).stdout
    assert f"nemokernels {nemokernels.__version__}" in out
    for op in OPS:
        assert op in out
    js = subprocess.run([sys.executable, "-m", "nemokernels", "info", "--json", "--device", "cpu"],
                        check=True, capture_output=True, text=True).stdout
    assert '"ops"' in js


@pytest.mark.gpu
def test_every_cuda_op_takes_the_cuda_path_on_this_gpu():
    info = build_info("cuda")
    for op in _C.cuda_ops():
        assert info["ops"][op]["path"] == "cuda", (op, info["ops"][op])
