"""Whether this build can run on the GPUs at hand, told once and clearly (issue 22).

A CPU-only build registers, for every op, a CUDA kernel that raises a RuntimeError naming the fix.
A CUDA build judges every visible GPU once per process, when torch initialises CUDA (so before any
op meets a CUDA tensor), and warns (NemokernelsWarning) about each GPU its archs cannot run on.
Not in the ops: a Python shim on every op's CUDA kernel would cost every call, and one removed
after the first call could be freed while another thread is entering it. build_runs_on is the
rule, table-tested in tests/test_cuda_availability.py.
"""
import re
import sys
import threading
import warnings
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from . import _C


class NemokernelsWarning(UserWarning):
    """This nemokernels build does not fit the machine it runs on (no kernels for a GPU's arch)."""


# How to get CUDA kernels (README, "Set up" and "Build knobs").
CUDA_BUILD_FIX = ("reinstall with nvcc visible: CUDA_HOME=/usr/local/cuda NEMOKERNELS_BUILD_CUDA=1 pip install "
                  "--no-build-isolation -e . (with NEMOKERNELS_BUILD_CUDA=1 a missing nvcc is an error, not a "
                  "CPU-only build), or install a nemokernels wheel built with CUDA")

_ARCH = re.compile(r"sm_(\d{2,3})([af]?)")
_PTX = re.compile(r"compute_(\d{2,3})")


def compiled_archs() -> List[str]:
    """The archs _C was compiled for, as CMakeLists.txt recorded them ("sm_90a", ...); [] for a
    CPU-only build."""
    return [a for a in _C.cuda_archs.split(",") if a]


def arch_runs_on(arch: str, capability: Tuple[int, int]) -> Optional[bool]:
    """Whether code compiled for `arch` ("sm_90a", "sm_100f", "sm_86") runs on a device of compute
    capability (major, minor); None for an entry this rule does not know (then it claims nothing).

    sm_XYa (arch-specific) runs only on X.Y; sm_XYf (family) and plain sm_XY run on X.Z for Z >= Y,
    same major only. compute_XY is PTX (NEMOKERNELS_CUDA_ARCHS "XY+PTX"): the driver compiles it
    for any device of capability >= X.Y.
    """
    p = _PTX.fullmatch(arch)
    if p is not None:
        return tuple(capability) >= divmod(int(p.group(1)), 10)
    m = _ARCH.fullmatch(arch)
    if m is None:
        return None
    major, minor = divmod(int(m.group(1)), 10)
    if m.group(2) == "a":
        return (major, minor) == tuple(capability)
    return capability[0] == major and capability[1] >= minor


def build_runs_on(archs: Sequence[str], capability: Tuple[int, int]) -> Optional[bool]:
    """True when some compiled arch runs on the device; False when none does (always, for a
    CPU-only build's empty list); None when none is known to run and some entry is not understood."""
    verdicts = [arch_runs_on(a, capability) for a in archs]
    if True in verdicts:
        return True
    return None if None in verdicts else False


def arch_to_build(capability: Tuple[int, int]) -> str:
    """The NEMOKERNELS_CUDA_ARCHS entry for a device: 9.0 and 10.x take the arch-specific variant
    (their wgmma / tcgen05 kernels need it, setup.py picks the same for a visible GPU), others plain."""
    major, minor = capability
    return f"{major}{minor}" + ("a" if (major, minor) == (9, 0) or major == 10 else "")


def no_cuda_message(op: str) -> str:
    return (f"nemokernels::{op} got CUDA tensors, but this nemokernels build has no CUDA kernels (it was built "
            f"without nvcc, or with NEMOKERNELS_BUILD_CUDA=0; `nemokernels info` shows what a build holds). "
            f"To run on a GPU, {CUDA_BUILD_FIX}.")


def mismatch_message(archs: Sequence[str], devices: Sequence[Tuple[int, Tuple[int, int]]]) -> str:
    """The warning for `devices` ([(index, capability)]) that no arch of `archs` runs on."""
    wanted = [a[len("sm_"):] if a.startswith("sm_") else a[len("compute_"):] + "+PTX" for a in archs
              if not (a.startswith("sm_") and f"compute_{a[len('sm_'):]}" in archs)]
    wanted += sorted({arch_to_build(cap) for _, cap in devices} - set(wanted))
    names = ", ".join(f"cuda:{i} (sm_{cap[0]}{cap[1]})" for i, cap in devices)
    return (f"this nemokernels build has CUDA code for {', '.join(archs)} only, and none of it runs on {names}: "
            f"nemokernels ops on that GPU will fail (no kernel image is available for execution on the device). "
            f"To fix, rebuild for its arch too: NEMOKERNELS_CUDA_ARCHS=\"{';'.join(wanted)}\" pip install "
            f"--no-build-isolation -e . (sm_XYa code runs only on compute capability X.Y; sm_XY and sm_XYf "
            f"on X.Y and newer X.Z).")


def _capability(index: int) -> Tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


_checked = set()  # device indices judged in this process
_lock = threading.Lock()


def check_cuda_devices(indices: Iterable[int]) -> None:
    """Judges each device of `indices` not judged before in this process, and warns once
    (NemokernelsWarning) about those this build has no code for. A CPU-only build warns nothing:
    its ops raise instead (install())."""
    archs = compiled_archs()
    with _lock:
        new = sorted(set(indices) - _checked)
        _checked.update(new)
    if not archs:
        return
    bad = [(i, cap) for i, cap in ((i, _capability(i)) for i in new) if build_runs_on(archs, cap) is False]
    if bad:
        warnings.warn(mismatch_message(archs, bad), NemokernelsWarning, stacklevel=2)


def _at_cuda_init() -> None:
    # Runs inside torch.cuda's lazy initialisation (or `import nemokernels`, when CUDA is up
    # already), which an exception here would break for good: a warning the filters turn into an
    # error (-W error) is printed instead, and so is a failed device query (the check only advises).
    try:
        check_cuda_devices(range(torch.cuda.device_count()))
    except Warning as w:
        print(f"nemokernels: {w}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001
        print(f"nemokernels: could not check the GPUs against this build's archs: {e!r}", file=sys.stderr)


def _no_cuda_kernel(op: str):
    def kernel(*args, **kwargs):
        raise RuntimeError(no_cuda_message(op))

    return kernel


GUARDED = set()  # the ops whose CUDA kernel is _no_cuda_kernel (none in a CUDA build)
_library = None


def install() -> None:
    """Once per process (nemokernels/__init__.py): the raising CUDA kernels for every op without
    one, and, in a CUDA build, the device check at torch's CUDA initialisation."""
    global _library
    if _library is not None:
        return
    _library = torch.library.Library("nemokernels", "IMPL")
    for op in _C.op_families():
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"nemokernels::{op}", "CUDA"):
            _library.impl(op, _no_cuda_kernel(op), "CUDA")
            GUARDED.add(op)
    if compiled_archs() and hasattr(torch.cuda, "_lazy_call"):
        # Runs at once when CUDA is already initialised.
        torch.cuda._lazy_call(_at_cuda_init)


install()
