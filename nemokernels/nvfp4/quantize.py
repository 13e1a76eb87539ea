"""NVFP4 quantize / dequantize (docs/design.md section 4.3): custom ops nemokernels::nvfp4_quantize and
nvfp4_dequantize (schemas: csrc/nvfp4/nvfp4_ops.cpp, kernels: csrc/nvfp4/quantize_*), their fake
kernels, and the public functions.

Details: docs/nvfp4.md, section `nemokernels/nvfp4/quantize.py`."""
import math
from typing import Optional, Union

import torch

from .tensor import NVFP4Tensor

_ops = torch.ops.nemokernels


@torch.library.register_fake("nemokernels::nvfp4_quantize")
def _quantize_fake(x, block_2d, hadamard, stochastic_rounding, seed, global_amax, seed_tensor):
    r, k = x.shape
    return (x.new_empty((r, k // 2), dtype=torch.uint8), x.new_empty((r, k // 16), dtype=torch.float8_e4m3fn),
            x.new_empty((), dtype=torch.float32))


@torch.library.register_fake("nemokernels::nvfp4_dequantize")
def _dequantize_fake(data, scales, global_scale, out_dtype):
    return data.new_empty((data.shape[0], data.shape[1] * 2), dtype=out_dtype)


def _seed_args(seed, needed: bool, x: torch.Tensor):
    """(int seed, seed tensor or None) for the op. A tensor seed (1 element, int64, on x's
    device) is read by the kernel on the device: no host sync, and a CUDA graph replays it with
    whatever it holds then. None: a fresh seed drawn from torch's generator on x's device when
    the variant uses random bits (stochastic rounding, Hadamard signs)."""
    if isinstance(seed, torch.Tensor):
        return 0, seed.to(torch.int64)
    if seed is None:
        if not needed:
            return 0, None
        return 0, torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
    seed = int(seed) & (2**64 - 1)
    return (seed - 2**64 if seed >= 2**63 else seed), None


def _amax_arg(global_amax, x: torch.Tensor) -> Optional[torch.Tensor]:
    if global_amax is None:
        return None
    if not isinstance(global_amax, torch.Tensor):
        return torch.tensor([float(global_amax)], dtype=torch.float32, device=x.device)
    return global_amax.to(torch.float32)


def _check_x(x: torch.Tensor, op: str):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"nvfp4.{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"nvfp4.{op}: x must have at least one dim (K last), got a 0-dim tensor")


def _quantize2d(x2: torch.Tensor, block_2d, hadamard, stochastic_rounding, seed, global_amax):
    seed_int, seed_t = _seed_args(seed, hadamard or stochastic_rounding, x2)
    return _ops.nvfp4_quantize(x2, bool(block_2d), bool(hadamard), bool(stochastic_rounding), seed_int,
                               _amax_arg(global_amax, x2), seed_t)


def quantize(x: torch.Tensor, *, block_2d: bool = False, hadamard: bool = False,
             stochastic_rounding: bool = False, seed: Optional[Union[int, torch.Tensor]] = None,
             global_amax: Optional[Union[torch.Tensor, float]] = None) -> NVFP4Tensor:
    """Quantize x (..., K) to NVFP4 along the last dim (K % 16 == 0).

    - ``block_2d``: one scale per 16x16 tile (16 rows of the flattened leading dims x 16
      columns), every row of a tile carrying the tile's scale; a partial last tile (rows % 16)
      takes the amax of the rows it has.
    - ``hadamard``: each 16-element block v becomes (1/4) H16 diag(signs) v before quantizing,
      signs drawn from ``seed``. The transform is orthogonal: quantize both GEMM operands with
      the same seed to keep a @ b.T. ``dequantize`` returns the transformed values.
    - ``stochastic_rounding``: E2M1 codes rounded up with probability equal to the fractional
      position between neighbours (unbiased), bits from Philox4x32-10 keyed by ``seed`` with
      the element's flat index as counter (same bits on CPU and GPU).
    - ``seed``: int, or a 1-element int64 tensor on x's device (read by the kernel: no host
      sync, no recompilation under torch.compile, fresh values across CUDA-graph replays when
      updated in place); None draws one from torch's generator on x's device. Pass the same
      seed to both GEMM operands for matching Hadamard signs.
    - ``global_amax``: a 1-element float32 tensor (or float) used instead of max |x| (of the
      transformed values when ``hadamard``); values beyond it saturate. Read on the device.

    Non-finite x raises on the CPU; on CUDA (no host sync) it yields global_scale = NaN.
    """
    _check_x(x, "quantize")
    lead, K = x.shape[:-1], x.shape[-1]
    data, scales, gs = _quantize2d(x.reshape(math.prod(lead), K), block_2d, hadamard, stochastic_rounding, seed, global_amax)
    return NVFP4Tensor(data.reshape(*lead, K // 2), scales.reshape(*lead, K // 16), gs)


def quantize_t(x: torch.Tensor, *, block_2d: bool = False, hadamard: bool = False,
               stochastic_rounding: bool = False, seed: Optional[Union[int, torch.Tensor]] = None,
               global_amax: Optional[Union[torch.Tensor, float]] = None) -> NVFP4Tensor:
    """Quantization of x.T from x (M, K) (leading dims flattened into M), M % 16 == 0: the
    transposed operand the backward GEMMs need, in one pass over x (the kernel reads the
    strided view x.T; nothing is copied). Same options as :func:`quantize`; blocks run along
    M. With ``block_2d`` the result is exactly the transpose of ``quantize(x, block_2d=True)``
    (same tiles, same scales, same codes)."""
    _check_x(x, "quantize_t")
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    data, scales, gs = _quantize2d(x2.t(), block_2d, hadamard, stochastic_rounding, seed, global_amax)
    return NVFP4Tensor(data, scales, gs)


def dequantize(t: NVFP4Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Values of an NVFP4Tensor, shape (..., K), in dtype (float32, float16 or bfloat16):
    (e2m1(code) * s_b) * global_scale computed in float32, then rounded to dtype."""
    if t.data.dim() < 1:
        raise ValueError("nvfp4.dequantize: t.data must have at least one dim")
    lead, K2 = t.data.shape[:-1], t.data.shape[-1]
    scales = t.scales
    rows = math.prod(lead)
    out = _ops.nvfp4_dequantize(t.data.reshape(rows, K2), scales.reshape(rows, scales.shape[-1]),
                                t.global_scale, dtype)
    return out.reshape(*lead, K2 * 2)
