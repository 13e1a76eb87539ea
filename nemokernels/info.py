"""Build and runtime facts: what was compiled, and which path each op takes on a device."""
import platform

import torch

from . import _C
from ._version import __version__

# {op: family}, as each family's csrc/<family>/<family>_ops.cpp filed its ops when _C loaded.
OPS = dict(sorted(_C.op_families().items(), key=lambda kv: (kv[1], kv[0])))


def has_cuda_kernel(op: str) -> bool:
    """Whether nemokernels::<op> has a CUDA kernel registered (only CUDA builds register one)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"nemokernels::{op}", "CUDA")


def cuda_ops() -> list:
    """The ops with a CUDA kernel in this build, asked of torch's dispatcher."""
    return [op for op in OPS if has_cuda_kernel(op)]


def _compiled_archs():
    return [a for a in _C.cuda_archs.split(",") if a]


def _device_arch(device: torch.device):
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def op_path(op: str, device: torch.device) -> str:
    """'cpu', 'cuda', or why the op cannot run there."""
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        return f"unsupported device type {device.type}"
    if not has_cuda_kernel(op):
        return "unavailable: no CUDA kernel in this build"
    arch = _device_arch(device)
    nums = {int("".join(ch for ch in a[3:] if ch.isdigit())) for a in _compiled_archs()}
    if arch not in nums:
        return f"unavailable: built for {_C.cuda_archs}, device is sm_{arch}"
    return "cuda"


def build_info(device=None) -> dict:
    """Version, torch/CUDA versions, compiled archs, per-op CUDA kernels and paths on `device`
    (default: the current CUDA device when there is one, else the CPU)."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        dev_name = f"{props.name} (sm_{_device_arch(device)}, {props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
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
        "cuda_archs": _compiled_archs(),
        "device": dev_name,
        "ops": {op: {"family": fam, "cuda_kernel": op in with_cuda, "path": op_path(op, device)}
                for op, fam in OPS.items()},
    }


def format_info(info: dict) -> str:
    lines = [
        f"nemokernels {info['version']}",
        f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'}); extension built with torch "
        f"{info['built_with_torch']}, stable ABI target {info['stable_abi_target']}",
        f"CUDA kernels: {'compiled with nvcc ' + info['nvcc'] + ' for ' + ', '.join(info['cuda_archs']) if info['nvcc'] else 'not built (CPU-only build)'}",
        f"device: {info['device']}",
        "",
        f"{'op':<32}{'family':<8}{'CUDA kernel':<13}path on this device",
    ]
    for op, d in info["ops"].items():
        lines.append(f"{op:<32}{d['family']:<8}{'yes' if d['cuda_kernel'] else 'no':<13}{d['path']}")
    return "\n".join(lines)
