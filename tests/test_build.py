"""The extension: stable-ABI only, build facts true, every registered op accounted for."""
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nemokernels
from nemokernels import _C
from nemokernels.info import OPS, build_info, cuda_ops

ROOT = Path(__file__).resolve().parents[1]


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


FAMILIES = ("ssd", "moe", "nvfp4", "speculative")


def test_registered_ops_match_info_list():
    registered = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("nemokernels::")}
    assert registered == set(OPS), f"info.OPS out of date: {registered ^ set(OPS)}"
    assert len(_C.op_families()) == len(OPS) == len(registered)
    # A CUDA build has a CUDA kernel for every op, a CPU-only build for none (never a subset by
    # accident: an op whose CUDA kernel went missing would otherwise pass unnoticed).
    assert set(cuda_ops()) == (registered if _C.with_cuda else set())
    for op in registered:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"nemokernels::{op}", "CPU"), op


def test_each_family_defines_its_ops_in_its_own_folder():
    """The op list is derived from the families' own files: every op belongs to one of the four
    families, and its schema is in csrc/<family>/<family>_ops.cpp and nowhere else."""
    assert set(OPS.values()) == set(FAMILIES)
    schema_files = {f: (ROOT / "csrc" / f / f"{f}_ops.cpp").read_text() for f in FAMILIES}
    defined_in = {}
    for path in (ROOT / "csrc").rglob("*.cpp"):
        for op in re.findall(r'"(\w+)\(', path.read_text()):
            if op in OPS:
                defined_in.setdefault(op, set()).add(path.relative_to(ROOT / "csrc").as_posix())
    for op, fam in OPS.items():
        assert f'"{op}(' in schema_files[fam], (op, fam)
        assert defined_in[op] == {f"{fam}/{fam}_ops.cpp"}, (op, defined_in[op])
    assert not (ROOT / "csrc" / "torch_bindings.cpp").exists()


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
        assert info["cuda_archs"] == [] and not cuda_ops()


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
    """Every op, not every op that cuda_ops() lists: a CPU-only build (cuda_ops() empty) on a GPU
    machine must fail here, not pass vacuously."""
    assert _C.with_cuda, "a CPU-only build on a GPU machine: rebuild with nvcc (NEMOKERNELS_BUILD_CUDA=1)"
    info = build_info("cuda")
    assert set(cuda_ops()) == set(OPS)
    for op in OPS:
        assert info["ops"][op]["path"] == "cuda", (op, info["ops"][op])


# ---------------------------------------------------------------- setup.py's arch list


def _setup_module():
    """setup.py as a module (its setup() call runs only as __main__)."""
    spec = importlib.util.spec_from_file_location("nk_setup_under_test", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("env,archs", [("90a;100a", ["90a", "100a"]), ("90a, 100a", ["90a", "100a"]),
                                       (" 100a ", ["100a"]), ("100f", ["100f"]), ("103a;90", ["103a", "90"]),
                                       ("80 86 89", ["80", "86", "89"]), ("120", ["120"]), ("120a", ["120a"]),
                                       ("80;90a;100a;120+PTX", ["80", "90a", "100a", "120+PTX"])])
def test_setup_parses_cuda_archs(env, archs):
    assert _setup_module().parse_cuda_archs(env) == archs


@pytest.mark.parametrize("env,bad", [("100", "100"), ("90a;100", "100"), ("103", "103"), ("101", "101")])
def test_setup_refuses_blackwell_archs_without_the_arch_suffix(env, bad):
    """A bare 10x would compile the tcgen05 / block-scaled MMA files without the features they
    need (CUTLASS stubs that trap at run time): refused with the fix in the message."""
    with pytest.raises(RuntimeError, match=rf"NEMOKERNELS_CUDA_ARCHS: '{bad}' would compile the Blackwell \(tcgen05, "
                                           rf"block-scaled MMA\) kernels without the arch-specific features they need; "
                                           rf"use '{bad}a' \(that arch only\) or '{bad}f'"):
        _setup_module().parse_cuda_archs(env)


@pytest.mark.parametrize("env,bad", [("90a+PTX", "90a+PTX"), ("120;100f+PTX", "100f+PTX")])
def test_setup_refuses_ptx_of_arch_specific_targets(env, bad):
    """compute_90a / compute_100f PTX runs on no other GPU: only plain archs take +PTX."""
    with pytest.raises(RuntimeError, match=rf"NEMOKERNELS_CUDA_ARCHS: '{re.escape(bad)}': PTX only for a plain arch"):
        _setup_module().parse_cuda_archs(env)


def test_extension_is_one_abi3_module():
    """_C is built on Python's limited API: one file, _C.abi3.so, for every CPython >= 3.10 (an
    interpreter-specific _C.cpython-3XY-*.so beside it would be imported first)."""
    import nemokernels._C as C
    assert Path(C.__file__).name == "_C.abi3.so", C.__file__
    assert [p.name for p in Path(C.__file__).parent.glob("_C*.so")] == ["_C.abi3.so"]


def test_cmake_configures_the_release_archs(tmp_path):
    """CMakeLists.txt for the wheel's archs (configure only, no compile): +PTX adds the PTX
    target, the sm100 files get the family target, and the capabilities they run on travel as a
    bit mask (100f: 100 and 103; a comma list would be split by nvcc's -D parsing); the portable
    files' wgmma paths are on only with a 90a pass of their own (a plain 90 build keeps wmma)."""
    nvcc = _setup_module().find_nvcc()
    cmake = shutil.which("cmake")
    version = re.search(r"(\d+)\.(\d+)", subprocess.run([cmake, "--version"], capture_output=True,
                                                        text=True).stdout) if cmake else None
    if nvcc is None or shutil.which("ninja") is None or version is None or tuple(map(int, version.groups())) < (3, 26):
        pytest.skip("needs nvcc, ninja and cmake >= 3.26 (requirements-build.txt)")
    torch_root = Path(torch.__file__).parent
    r = subprocess.run([cmake, str(ROOT), "-GNinja", "--log-level=WARNING", f"-DPython_EXECUTABLE={sys.executable}",
                        f"-DNK_TORCH_INCLUDE={torch_root / 'include'}", f"-DNK_TORCH_LIB={torch_root / 'lib'}",
                        "-DNK_BUILD_CUDA=ON", f"-DCMAKE_CUDA_COMPILER={nvcc}", "-DNK_CUDA_ARCHS=80;90a;100f;120+PTX"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ninja = (tmp_path / "build.ninja").read_text()
    assert set(re.findall(r"NK_SM100_CC_MASK=(\d+)", ninja)) == {str((1 << 0) | (1 << 3))}
    assert "-gencode=arch=compute_120,code=[sm_120,compute_120]" in ninja
    assert "-gencode=arch=compute_100f,code=sm_100f" in ninja and "-gencode=arch=compute_80,code=sm_80" in ninja
    assert "NK_SM100_CCS" not in ninja
    # the portable files' wgmma paths (SSD state chain, B1) exist only with their own sm_90a pass
    assert "NK_PORTABLE_SM90A=1" in ninja
    r = subprocess.run([cmake, str(ROOT), "-DNK_CUDA_ARCHS=80;90"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ninja = (tmp_path / "build.ninja").read_text()
    assert "NK_HAS_SM90=1" in ninja and "NK_PORTABLE_SM90A" not in ninja
    r = subprocess.run([cmake, str(ROOT), "-DNK_CUDA_ARCHS=90;90a"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "NK_PORTABLE_SM90A" not in (tmp_path / "build.ninja").read_text()  # sm_90 beside sm_90a: off
    r = subprocess.run([cmake, str(ROOT), "-DNK_CUDA_ARCHS=90a+PTX"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and "PTX only for a plain arch" in r.stdout + r.stderr


@pytest.mark.parametrize("env", ["sm_90a", "9", "1000a", "90b", "100a;x", "120+ptx", "+PTX"])
def test_setup_refuses_malformed_archs(env):
    with pytest.raises(RuntimeError, match="NEMOKERNELS_CUDA_ARCHS: bad arch"):
        _setup_module().parse_cuda_archs(env)


def test_setup_env_and_default_arch(monkeypatch):
    mod = _setup_module()
    monkeypatch.setenv("NEMOKERNELS_CUDA_ARCHS", "100")
    with pytest.raises(RuntimeError, match="use '100a'"):
        mod.cuda_archs()
    monkeypatch.setenv("NEMOKERNELS_CUDA_ARCHS", "90a;100a")
    assert mod.cuda_archs() == ["90a", "100a"]
    # no arch asked for, no GPU to ask: Hopper alone (the quick first build), said on the console
    monkeypatch.delenv("NEMOKERNELS_CUDA_ARCHS")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mod.cuda_archs() == ["90a"]
    # a visible GPU's arch: the 'a' variant wherever arch-specific kernels exist
    assert [mod.device_arch(*cc) for cc in ((9, 0), (10, 0), (10, 3), (8, 9), (12, 0))] == \
        ["90a", "100a", "103a", "89", "120"]
