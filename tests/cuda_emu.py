"""The CUDA emulator's build helpers, shared by every tests/<family>/test_cuda_emulation_*.py:
a .cu file is rewritten by tools/cuda_emu/transform.py, compiled with g++ against the mock CUDA
headers in tools/cuda_emu/include and loaded with ctypes (tools/cuda_emu/README.md says what the
emulation checks and what it cannot)."""
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]  # tests/ is one level below the root
EMU = ROOT / "tools" / "cuda_emu"
CSRC = ROOT / "csrc"


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


emu_params = _load("_nk_cuda_emu_params", EMU / "params.py")
emu_transform = _load("_nk_cuda_emu_transform", EMU / "transform.py")
CXX = os.environ.get("CXX", "g++")
FLAGS = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-fvisibility=hidden", "-DNK_WITH_CUDA", "-w"]
SLOW = os.environ.get("NK_CUDA_EMU_SLOW") == "1"
slow = pytest.mark.skipif(not SLOW, reason="slow emulation case (set NK_CUDA_EMU_SLOW=1)")
DT_ENUM = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _compiler_id():
    try:
        return subprocess.run([CXX, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def transformed(kernel: Path) -> str:
    """The emulator's C++ rewrite of a .cu file (tools/cuda_emu/transform.py)."""
    return emu_transform.transform(kernel.read_text(), str(kernel))[0]


def build_emulated(name, driver, generated, families, flags=()):
    """Path of lib<name>_emu_<hash>.so built from `driver` (a tools/cuda_emu driver that includes
    the generated sources), reused when its content hash matches. `generated` maps file names to
    generated text (transformed kernels, parameter layout tables) written beside the build; the
    hash covers the compiler, the flags, the emulator, the driver, the headers of csrc/<family>
    for each family and csrc/common, and the generated text. Used by every emulation test file."""
    cid = _compiler_id()
    if cid is None or not sys.platform.startswith("linux"):
        pytest.skip(f"CUDA emulation needs {CXX} on Linux (ucontext fibers)")
    bdir = Path(os.environ.get("NK_CUDA_EMU_BUILD_DIR", Path(tempfile.gettempdir()) / "nk_cuda_emu"))
    bdir.mkdir(parents=True, exist_ok=True)
    flags = [*FLAGS, *flags]
    files = sorted((EMU / "include").glob("*.h")) + [EMU / "emu_api.h", EMU / "params.py", EMU / "transform.py",
                                                     driver]
    for d in [CSRC / f for f in families] + [CSRC / "common"]:
        files += sorted(d.glob("*.h")) + sorted(d.glob("*.cuh"))
    h = hashlib.sha256((cid + " ".join(flags)).encode())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    for fname, text in generated.items():
        h.update(fname.encode())
        h.update(text.encode())
    lib = bdir / f"lib{name}_emu_{h.hexdigest()[:20]}.so"
    if lib.exists():
        return lib
    work = Path(tempfile.mkdtemp(prefix=f"build_{name}_", dir=bdir))
    try:
        for fname, text in generated.items():
            (work / fname).write_text(text)
        inc = [f"-I{EMU / 'include'}", f"-I{EMU}", f"-I{CSRC}", f"-I{work}"]
        tmp = work / "lib.so"
        r = subprocess.run([CXX, *flags, *inc, "-shared", str(driver), "-o", str(tmp)], capture_output=True, text=True)
        assert r.returncode == 0, f"emulator build of {name} failed:\n{(r.stdout + r.stderr)[-8000:]}"
        os.replace(tmp, lib)  # atomic: concurrent builders race harmlessly
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib
