"""gemm(a, b, out_dtype, bias): a @ b.T for two NVFP4Tensors.

This file holds the PyTorch stand-in (decode to float32, matmul); the custom op
(CPU C++, sm_90 in-register dequantizing tensor-core GEMM, sm_100 CUTLASS block-scaled
tcgen05 GEMM) replaces its body without changing the signature.
"""
from typing import Optional

import torch

from .tensor import NVFP4Tensor

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def _decode(t: NVFP4Tensor) -> torch.Tensor:
    lut = torch.tensor(_E2M1, dtype=torch.float32, device=t.data.device)
    codes = torch.stack([t.data & 0xF, t.data >> 4], dim=-1).flatten(-2).long()
    vals = lut[codes]
    s = t.scales.float().repeat_interleave(16, dim=-1)
    return vals * s * t.global_scale.float()


def gemm(a: NVFP4Tensor, b: NVFP4Tensor, out_dtype: torch.dtype = torch.bfloat16,
         bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a (M, K) and b (N, K), both NVFP4Tensor; returns (M, N) in out_dtype (+ bias (N,))."""
    out = _decode(a) @ _decode(b).T
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
