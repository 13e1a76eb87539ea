"""pip front end: hands the build of nemokernels._C to CMake (CMakeLists.txt).

Knobs (environment variables, all optional):
  NEMOKERNELS_BUILD_CUDA   1: CUDA kernels, fail without nvcc; 0: CPU-only; unset: CUDA when nvcc is found
  NEMOKERNELS_CUDA_ARCHS   e.g. "90a;100a" ("120+PTX" adds PTX); default: the visible GPU's arch, else "90a"
  NEMOKERNELS_BUILD_DIR    CMake build tree; default build/cmake-<cuda|cpu> in the checkout, kept between
                           builds (so `pip wheel` then `pip install -e` compiles once)
  MAX_JOBS                 parallel compile jobs; default: capped by cores and by free memory
  CUTLASS_DIR              CUTLASS root (include/, tools/util/include/); default: the nvidia-cutlass wheel
  CUDA_HOME                CUDA toolkit root; then /usr/local/cuda, then nvcc on PATH
"""
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "nemokernels" / "_version.py").read_text()).group(1)

# One heavy translation unit (CUTLASS) takes about 5 GB of memory to compile.
GB_PER_JOB = 5.0


def find_nvcc():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return Path(root) / "bin" / "nvcc"
    found = shutil.which("nvcc")
    return Path(found).resolve() if found else None


def want_cuda(nvcc):
    flag = os.environ.get("NEMOKERNELS_BUILD_CUDA", "").strip()
    if flag == "0":
        return False
    if flag == "1":
        if nvcc is None:
            raise RuntimeError(
                "NEMOKERNELS_BUILD_CUDA=1 but no nvcc was found (looked in $CUDA_HOME, /usr/local/cuda, PATH)")
        return True
    if flag:
        raise RuntimeError(f"NEMOKERNELS_BUILD_CUDA must be 0 or 1, got {flag!r}")
    return nvcc is not None


def parse_cuda_archs(env):
    """The arch list of NEMOKERNELS_CUDA_ARCHS (separated by ';', ',' or spaces), checked.

    Blackwell datacenter archs (10x) must carry the 'a' (arch-specific) or 'f' (family) suffix:
    the tcgen05 / block-scaled MMA kernels (*_sm100.cu) need those features, and a bare '100'
    compiles them without (CUTLASS turns them into stubs that trap at run time). A bare 10x is
    refused, not mapped to 10xa, so the build never silently differs from what was asked.
    ('90' is fine: the Hopper-only files are always compiled for 90a, see CMakeLists.txt.)
    """
    archs = [a.strip() for a in re.split(r"[;, ]+", env) if a.strip()]
    for entry in archs:
        a = entry.removesuffix("+PTX")
        if not re.fullmatch(r"\d{2,3}[af]?", a):
            raise RuntimeError(f"NEMOKERNELS_CUDA_ARCHS: bad arch {entry!r} (expected e.g. 90a;100a or 120+PTX)")
        if entry.endswith("+PTX") and not a.isdigit():
            raise RuntimeError(f"NEMOKERNELS_CUDA_ARCHS: {entry!r}: PTX only for a plain arch (e.g. "
                               f"{re.sub('[af]$', '', a) + '+PTX'!r}); arch-specific PTX runs on no other GPU")
        if re.fullmatch(r"10\d", a):
            raise RuntimeError(
                f"NEMOKERNELS_CUDA_ARCHS: {a!r} would compile the Blackwell (tcgen05, block-scaled MMA) kernels "
                f"without the arch-specific features they need; use {a + 'a'!r} (that arch only) or "
                f"{a + 'f'!r} (the sm_{a[:2]}x family)")
    return archs


def device_arch(major, minor):
    """The arch to build for a visible GPU of compute capability (major, minor): arch-specific
    features (wgmma on 9.0, tcgen05 on 10.x) need the 'a' variant."""
    arch = f"{major}{minor}"
    return arch + "a" if arch == "90" or major == 10 else arch


def cuda_archs():
    env = os.environ.get("NEMOKERNELS_CUDA_ARCHS", "").strip()
    if env:
        return parse_cuda_archs(env)
    try:
        import torch

        if torch.cuda.is_available():
            return [device_arch(*torch.cuda.get_device_capability())]
    except Exception:  # no torch CUDA runtime: fall through to the default
        pass
    # No GPU to ask: Hopper, the main target, alone (a Blackwell build doubles the compile time).
    print('nemokernels: no GPU visible: building for 90a (H100/H200) only; set NEMOKERNELS_CUDA_ARCHS, e.g. '
          '"90a;100a" (+ B200) or "80;90a;100f;120+PTX" (what the wheel holds), for others', flush=True)
    return ["90a"]


def cutlass_dir():
    env = os.environ.get("CUTLASS_DIR")
    if env:
        return Path(env)
    try:
        import cutlass_library

        return Path(cutlass_library.__file__).parent / "source"
    except ImportError:
        return None


def max_jobs():
    env = os.environ.get("MAX_JOBS")
    if env:
        return max(1, int(env))
    jobs = os.cpu_count() or 1
    try:
        avail_kb = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemAvailable"))
        jobs = min(jobs, max(1, int(avail_kb / 1024 / 1024 / GB_PER_JOB)))
    except (OSError, StopIteration):
        pass
    return jobs


class CMakeExtension(Extension):
    def __init__(self, name):
        # py_limited_api: the module is built against Python's limited API (csrc/module.cpp), so
        # setuptools names it _C.abi3.so and the wheel is tagged cp310-abi3.
        super().__init__(name, sources=[], py_limited_api=True)


def build_dir_for(cuda):
    env = os.environ.get("NEMOKERNELS_BUILD_DIR")
    return Path(env).resolve() if env else ROOT / "build" / f"cmake-{'cuda' if cuda else 'cpu'}"


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch

        nvcc = find_nvcc()
        cuda = want_cuda(nvcc)
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = build_dir_for(cuda)
        build_dir.mkdir(parents=True, exist_ok=True)
        torch_root = Path(torch.__file__).parent
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DNK_TORCH_INCLUDE={torch_root / 'include'}",
            f"-DNK_TORCH_LIB={torch_root / 'lib'}",
            f"-DNK_VERSION={VERSION}",
            f"-DNK_TORCH_VERSION={torch.__version__}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out.parent}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('NEMOKERNELS_BUILD_TYPE', 'Release')}",
            f"-DNK_BUILD_CUDA={'ON' if cuda else 'OFF'}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if cuda:
            archs = cuda_archs()
            args += [f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DNK_CUDA_ARCHS={';'.join(archs)}"]
            cdir = cutlass_dir()
            if cdir is not None:
                args.append(f"-DNK_CUTLASS_DIR={cdir}")
        jobs = max_jobs()
        print(f"nemokernels: CUDA={'yes (' + ';'.join(archs) + ')' if cuda else 'no'}, jobs={jobs}, "
              f"build tree {build_dir}", flush=True)
        t0 = time.time()
        subprocess.check_call(["cmake", str(ROOT), "--log-level=WARNING"] + args, cwd=build_dir)
        # One line per translation unit as it finishes: [done/total elapsed-seconds] what.
        env = dict(os.environ, NINJA_STATUS="nemokernels: [%f/%t %es] ")
        subprocess.check_call(["cmake", "--build", ".", "-j", str(jobs)], cwd=build_dir, env=env)
        print(f"nemokernels: _C built in {time.time() - t0:.0f} s", flush=True)
        # CMake names the module _C.abi3.so, as setuptools expects at `out`. A module of an older
        # build (_C.cpython-3XY-*.so) would be imported before it: remove those.
        for folder in {out.parent, ROOT / "nemokernels"}:  # the build's, and the checkout's (in-place builds)
            for stale in folder.glob("_C*.so"):
                if stale.name != out.name:
                    stale.unlink()
        if not out.exists():
            raise RuntimeError(f"nemokernels: CMake did not produce {out}")


# Guarded so tests can import this file for its arch parsing (pip's build backend and
# `python setup.py ...` both run it as __main__).
if __name__ == "__main__":
    setup(
        version=VERSION,
        ext_modules=[CMakeExtension("nemokernels._C")],
        cmdclass={"build_ext": CMakeBuild},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )
