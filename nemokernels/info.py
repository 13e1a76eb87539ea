"""Build and runtime facts: what was compiled, and which path each op takes on a device."""
import platform

import torch

from . import _C
from ._version import __version__
from . import device_check
from .device_check import CUDA_BUILD_FIX, GUARDED, build_runs_on, compiled_archs

# {op: family}, as each family's csrc/<family>/<family>_ops.cpp filed its ops when _C loaded.
OPS = dict(sorted(_C.op_families().items(), key=lambda kv: (kv[1], kv[0])))


def has_cuda_kernel(op: str) -> bool:
    """Whether nemokernels::<op> has a CUDA kernel registered (only CUDA builds register one; a
    CPU-only build's CUDA kernels are device_check's, which only raise)."""
    return op not in GUARDED and torch._C._dispatch_has_kernel_for_dispatch_key(f"nemokernels::{op}", "CUDA")


def cuda_ops() -> list:
    """The ops with a CUDA kernel in this build, asked of torch's dispatcher."""
    return [op for op in OPS if has_cuda_kernel(op)]


def _capability(device: torch.device):
    return device_check._capability(torch.cuda.current_device() if device.index is None else device.index)


def op_path(op: str, device: torch.device) -> str:
    """'cpu', 'cuda', or why the op cannot run there."""
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        return f"unsupported device type {device.type}"
    if not has_cuda_kernel(op):
        return "unavailable: no CUDA kernel in this build"
    cap = _capability(device)
    if build_runs_on(compiled_archs(), cap) is False:
        return f"unavailable: built for {_C.cuda_archs}, device is sm_{cap[0]}{cap[1]}"
    return "cuda"


def build_info(device=None) -> dict:
    """Version, torch/CUDA versions, compiled archs, per-op CUDA kernels and paths on `device`
    (default: the current CUDA device when there is one, else the CPU)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev_name = f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
    else:
        dev_name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    with_cuda = set(cuda_ops())
    return {
        "version": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "built_with_torch": _C.built_with_torch,
        "stable_abi_target": "%d.%d" % (_C.torch_target_version >> 56, (_C.torch_target_version >> 48) & 0xFF),
        "nvcc": _C.cuda_version,
        "cuda_archs": compiled_archs(),
        "device": dev_name,
        "ops": {op: {"family": fam, "cuda_kernel": op in with_cuda, "path": op_path(op, device)}
                for op, fam in OPS.items()},
    }


def format_info(info: dict) -> str:
    lines = [
        f"nemokernels {info['version']}",
        f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'}); extension built with torch "
        f"{info['built_with_torch']}, stable ABI target {info['stable_abi_target']}",
        f"CUDA kernels: {'compiled with nvcc ' + info['nvcc'] + ' for ' + ', '.join(info['cuda_archs']) if info['nvcc'] else 'none (CPU-only build; to run on a GPU, ' + CUDA_BUILD_FIX + ')'}",
        f"device: {info['device']}",
        "",
        f"{'op':<32}{'family':<8}{'CUDA kernel':<13}path on this device",
    ]
    for op, d in info["ops"].items():
        lines.append(f"{op:<32}{d['family']:<8}{'yes' if d['cuda_kernel'] else 'no':<13}{d['path']}")
    return "\n".join(lines)
