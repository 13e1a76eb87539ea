"""The CUDA emulator's build helpers, shared by every tests/<family>/test_cuda_emulation_*.py:
a .cu file is rewritten by tools/cuda_emu/transform.py, compiled with g++ against the mock CUDA
headers in tools/cuda_emu/include and loaded with ctypes (tools/cuda_emu/README.md says what the
emulation checks and what it cannot)."""
import ctypes
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


def build_emulated(name, driver, generated, families, flags=(), units=None):
    """Path of lib<name>_emu_<hash>.so built from `driver` (a tools/cuda_emu driver that includes
    the generated sources), reused when its content hash matches. `generated` maps file names to
    generated text (transformed kernels, parameter layout tables) written beside the build; the
    hash covers the compiler, the flags, the emulator (every file of tools/cuda_emu: drivers may
    include each other), the driver, the headers of csrc/<family> for each family and
    csrc/common, and the generated text. Used by every emulation test file.

    `units` ({unit: (source, generated files it includes, extra flags)}, biggest first; source
    None compiles the first generated file itself) splits the library into objects, each cached
    by its own hash and compiled NK_CUDA_EMU_JOBS (2) at a time: a change to one kernel file
    recompiles only its unit. Without it, `driver` is the one unit."""
    cid = _compiler_id()
    if cid is None or not sys.platform.startswith("linux"):
        pytest.skip(f"CUDA emulation needs {CXX} on Linux (ucontext fibers)")
    bdir = Path(os.environ.get("NK_CUDA_EMU_BUILD_DIR", Path(tempfile.gettempdir()) / "nk_cuda_emu"))
    bdir.mkdir(parents=True, exist_ok=True)
    flags = [*FLAGS, *flags]
    units = units or {"main": (driver, list(generated), [])}
    files = sorted((EMU / "include").glob("*.h")) + sorted(p for p in EMU.iterdir() if p.is_file())
    for d in [CSRC / f for f in families] + [CSRC / "common"]:
        files += sorted(d.glob("*.h")) + sorted(d.glob("*.cuh"))
    common = hashlib.sha256((cid + " ".join(flags)).encode())
    for f in files:
        common.update(f.name.encode())
        common.update(f.read_bytes())
    objs, todo = {}, []
    for unit, (src, deps, extra) in units.items():
        h = common.copy()
        h.update(" ".join(extra).encode())
        if src is not None:
            h.update(src.read_bytes())
        for d in deps:
            h.update(d.encode())
            h.update(generated[d].encode())
        objs[unit] = bdir / f"{name}_{unit}_{h.hexdigest()[:20]}.o"
        if not objs[unit].exists():
            todo.append((unit, src, deps, extra))
    lib = bdir / f"lib{name}_emu_{hashlib.sha256(''.join(o.name for o in objs.values()).encode()).hexdigest()[:20]}.so"
    if lib.exists():
        return lib
    work = Path(tempfile.mkdtemp(prefix=f"build_{name}_", dir=bdir))
    try:
        for fname, text in generated.items():
            (work / fname).write_text(text)
        inc = [f"-I{EMU / 'include'}", f"-I{EMU}", f"-I{CSRC}", f"-I{work}"]
        jobs, running = max(1, int(os.environ.get("NK_CUDA_EMU_JOBS", "2"))), []

        def finish(unit, proc, tmp_obj):
            out, _ = proc.communicate()
            assert proc.returncode == 0, f"emulator build of {name} ({unit}) failed:\n{out[-8000:]}"
            os.replace(tmp_obj, objs[unit])  # atomic: concurrent builders race harmlessly

        for unit, src, deps, extra in todo:
            if len(running) >= jobs:
                finish(*running.pop(0))
            tmp_obj = work / f"{unit}.o"
            cmd = [CXX, *flags, *extra, *inc, "-c", str(src if src is not None else work / deps[0]), "-o", str(tmp_obj)]
            running.append((unit, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
                            tmp_obj))
        while running:
            finish(*running.pop(0))
        tmp = work / "lib.so"
        r = subprocess.run([CXX, "-shared", "-pthread", *(str(o) for o in objs.values()), "-o", str(tmp)],
                           capture_output=True, text=True)
        assert r.returncode == 0, f"emulator link of {name} failed:\n{r.stderr[-4000:]}"
        os.replace(tmp, lib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return lib


class EmuLibrary:
    """An emulator library loaded with ctypes. Its kernel entries have the C signature
    `int fn(const Params*, ..., char* err, int errlen)` (EMU_ENTRY in emu_api.h): `call` raises
    the error text. Given a header and struct names, `S` holds the ctypes mirrors of the
    parameter structs parsed from the header (params.py) and `check_layouts` proves them equal
    to the library's generated offsetof table (params_layout.inc)."""

    def __init__(self, path, header=None, structs=()):
        self.lib = ctypes.CDLL(str(path))
        self.S, self.fields = emu_params.ctypes_structs(header.read_text(), structs) if structs else ({}, {})

    @classmethod
    def build(cls, name, driver, kernels, families, *, header=None, structs=(), flags=()):
        """build_emulated(name, driver, ...) with each kernel in `kernels` rewritten into
        <stem>.emu.cpp and, for `structs`, the offsetof table params_layout.inc, then loaded."""
        generated = {f"{Path(k).stem}.emu.cpp": transformed(Path(k)) for k in kernels}
        if structs:
            generated["params_layout.inc"] = emu_params.layout_table_cpp(header.read_text(), structs)
        return cls(build_emulated(name, driver, generated, families, flags), header, structs)

    def call(self, fn, *args):
        """Runs entry `fn` with args (a ctypes Structure goes by pointer; other arguments as
        ctypes objects) and the error buffer; raises RuntimeError with the emulator's message."""
        f = getattr(self.lib, fn)
        f.restype = ctypes.c_int
        err = ctypes.create_string_buffer(4096)
        if f(*[ctypes.byref(a) if isinstance(a, ctypes.Structure) else a for a in args], err, len(err)) != 0:
            raise RuntimeError(f"{fn}: {err.value.decode(errors='replace')}")

    def value(self, fn, *args):
        """A `long long fn(args...)` query of the library (structs by pointer)."""
        f = getattr(self.lib, fn)
        f.restype = ctypes.c_longlong
        return f(*[ctypes.byref(a) if isinstance(a, ctypes.Structure) else a for a in args])

    def launches(self):
        """Kernel launches so far (EMU_COUNTERS)."""
        return self.value("emu_launches")

    def check_layouts(self):
        """Every parsed struct has the size and member offsets the compiled library reports."""
        self.lib.emu_params_offset.restype = self.lib.emu_params_sizeof.restype = ctypes.c_longlong
        self.lib.emu_params_offset.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
        self.lib.emu_params_sizeof.argtypes = [ctypes.c_char_p]
        for name, st in self.S.items():
            assert self.lib.emu_params_sizeof(name.encode()) == ctypes.sizeof(st), name
            for field, _ in self.fields[name]:
                assert self.lib.emu_params_offset(name.encode(), field.encode()) == getattr(st, field).offset, \
                    f"{name}.{field}"
