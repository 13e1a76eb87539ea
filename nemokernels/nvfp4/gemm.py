"""gemm(a, b, out_dtype, bias): a @ b.T for two NVFP4Tensors (docs/design.md section 4.3).

a: NVFP4Tensor of shape (..., K), b: NVFP4Tensor of shape (N, K) (a weight), K % 16 == 0.
Returns (..., N) in out_dtype (bfloat16, float16 or float32):
    out = (a.global_scale * b.global_scale) * (A_hat @ B_hat.T) + bias,
A_hat = e2m1(code) * e4m3(block scale), accumulated in float32, rounded once to out_dtype.
The global scales are read on the device (no host sync): CUDA-graph and torch.compile safe.

Details: docs/nvfp4.md, section `nemokernels/nvfp4/gemm.py`."""
from typing import Optional

import torch

from .. import _C
from .tensor import NVFP4Tensor

_ops = torch.ops.nemokernels
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@torch.library.register_fake("nemokernels::nvfp4_gemm")
def _gemm_fake(a_data, a_scales, a_global, b_data, b_scales, b_global, out_dtype, bias):
    torch._check(a_data.dim() == 2 and b_data.dim() == 2, lambda: "nvfp4.gemm: data must be 2-D")
    torch._check(a_data.shape[1] == b_data.shape[1], lambda: "nvfp4.gemm: a and b must have the same K")
    return a_data.new_empty((a_data.shape[0], b_data.shape[0]), dtype=out_dtype)


@torch.library.register_fake("nemokernels::nvfp4_swizzle_scales")
def _swizzle_fake(scales):
    rows, cols = scales.shape
    return scales.new_empty((((rows + 127) // 128) * 128 * ((cols + 3) // 4) * 4,), dtype=torch.uint8)


def gemm(a: NVFP4Tensor, b: NVFP4Tensor, out_dtype: torch.dtype = torch.bfloat16,
         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a (..., K) and b (N, K), both NVFP4Tensor; returns (..., N) in out_dtype (+ bias (N,))."""
    if not isinstance(a, NVFP4Tensor) or not isinstance(b, NVFP4Tensor):
        raise TypeError(f"nvfp4.gemm: a and b must be NVFP4Tensor, got {type(a).__name__} and {type(b).__name__}")
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"nvfp4.gemm: out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    if a.data.dim() == 2:
        return _ops.nvfp4_gemm(a.data, a.scales, a.global_scale, b.data, b.scales, b.global_scale,
                               out_dtype, bias)
    if a.data.dim() < 1 or a.scales.dim() != a.data.dim():
        raise ValueError(f"nvfp4.gemm: a.data {tuple(a.data.shape)} and a.scales {tuple(a.scales.shape)} "
                         "must have the same number of dims (>= 1)")
    lead = a.data.shape[:-1]
    out = _ops.nvfp4_gemm(a.data.reshape(-1, a.data.shape[-1]), a.scales.reshape(-1, a.scales.shape[-1]),
                          a.global_scale, b.data, b.scales, b.global_scale, out_dtype, bias)
    return out.reshape(*lead, out.shape[-1])


def gemm_path(device, M: int, N: int, K: int) -> str:
    """The kernel ``gemm`` runs for an (M, N, K) problem on ``device``: "cpu", "cutlass_sm100"
    (the CUTLASS block-scaled tcgen05 GEMM), "cutlass_sm90" (A and B decoded to bf16, then the
    CUTLASS wgmma GEMM; NEMOKERNELS_NVFP4_GEMM_PORTABLE=1 turns it off), "portable_cuda" (the
    in-register dequantizing kernel), or "unavailable" (a CUDA device with a CPU-only build). The answer comes from the
    op's own routing function (csrc/nvfp4/gemm.h nvfp4_gemm_cuda_path), so a test that gates on
    it tests the path it names."""
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    if device.type != "cuda":
        return "unavailable"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _C.nvfp4_gemm_path(index, int(M), int(N), int(K))


def swizzle_scales(scales: torch.Tensor) -> torch.Tensor:
    """(rows, K/16) e4m3 scales -> flat uint8 in the sm_100 block-scaled layout (128x4 atoms)."""
    return _ops.nvfp4_swizzle_scales(scales)
