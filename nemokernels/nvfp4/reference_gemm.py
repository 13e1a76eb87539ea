"""Pure-PyTorch reference of nvfp4.gemm (the oracle for tests): decode both operands to
float64 (or `compute_dtype`), multiply, scale, add bias."""
from typing import Optional

import torch

from .tensor import NVFP4Tensor

_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def decode_reference(t: NVFP4Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """x_hat = e2m1(code) * float(scale) * global_scale, shape (..., K), in `dtype`."""
    lut = torch.tensor(_E2M1, dtype=dtype, device=t.data.device)
    codes = torch.stack([t.data & 0xF, t.data >> 4], dim=-1).flatten(-2).long()
    s = t.scales.to(dtype).repeat_interleave(16, dim=-1)
    return lut[codes] * s * t.global_scale.to(dtype)


def gemm_reference(a: NVFP4Tensor, b: NVFP4Tensor, out_dtype: torch.dtype = torch.bfloat16,
                   bias: Optional[torch.Tensor] = None,
                   compute_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """a @ b.T of the dequantized operands (+ bias), computed in `compute_dtype`."""
    out = decode_reference(a, compute_dtype) @ decode_reference(b, compute_dtype).T
    if bias is not None:
        out = out + bias.to(compute_dtype)
    return out.to(out_dtype)
