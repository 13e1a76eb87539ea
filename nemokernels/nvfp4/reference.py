"""Pure-PyTorch reference of the NVFP4 format (DESIGN.md 4.3), the oracle of the tests.

Written independently of the kernels: E2M1 and E4M3 rounding are nearest-value searches over
the tables of representable values in float64 (ties to the even code), Philox4x32-10 is
vectorised over int64 tensors, and the Hadamard transform is a butterfly on float32 tensors.
The scale arithmetic follows the float32 steps the kernels take (csrc/nvfp4/numerics.cuh):

    s_enc = 2688 / amax (float32 division; 1 when amax == 0; clamped to FLT_MAX)
    s_b   = e4m3((amax_b / 6) * s_enc)        inv_b = min(s_enc / s_b, FLT_MAX), 0 if s_b == 0
    code  = e2m1(x * inv_b)

so that codes and scales are expected to be bit-identical to the kernels'; everything else
(decoding, GEMMs) is float64.
"""
from typing import Optional

import torch

from .tensor import NVFP4Tensor

FLT_MAX = 3.4028234663852886e38
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
TAG_STOCHASTIC = 0x4E564653
TAG_HADAMARD = 0x4E564648
_M32 = 0xFFFFFFFF


def _e4m3_values() -> torch.Tensor:
    """Values of the non-negative finite E4M3 (fn) bytes 0x00..0x7e, float64."""
    out = []
    for b in range(0x7F):
        e, m = b >> 3, b & 7
        out.append(m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(out, dtype=torch.float64)


def _nearest_even(v: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table entry to v >= 0 (ties to the even index), saturating at the
    last entry. table is increasing, float64."""
    v = v.double()
    hi = torch.searchsorted(table, v).clamp(max=len(table) - 1)
    lo = (hi - 1).clamp(min=0)
    dlo, dhi = v - table[lo], table[hi] - v
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))
    idx = torch.where(pick_hi, hi, lo)
    return torch.where(v >= table[-1], torch.full_like(idx, len(table) - 1), idx)


def e4m3_encode(v: torch.Tensor) -> torch.Tensor:
    """E4M3 (fn) bytes of v >= 0, round to nearest even, saturating at 448; uint8."""
    table = _e4m3_values().to(v.device)
    idx = _nearest_even(v, table)
    return torch.where(torch.isnan(v), torch.full_like(idx, 0x7F), idx).to(torch.uint8)


def e4m3_decode(b: torch.Tensor) -> torch.Tensor:
    b = b.view(torch.uint8).long() if b.dtype == torch.float8_e4m3fn else b.long()
    table = torch.cat([_e4m3_values(), torch.tensor([float("nan")], dtype=torch.float64)]).to(b.device)
    v = table[b & 0x7F]
    return torch.where(b >= 0x80, -v, v)


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    table = torch.tensor(E2M1_VALUES, dtype=torch.float64, device=code.device)
    v = table[code.long() & 7]
    return torch.where((code.long() & 8) != 0, -v, v)


# ---------------------------------------------------------------------------- Philox4x32-10


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Vectorised Philox4x32-10 over int64 tensors holding uint32 words; returns 4 tensors.
    Products of two 32-bit words wrap in int64, which keeps their low 64 bits exact."""
    M0, M1, W0, W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
    k0, k1 = k0 & _M32, k1 & _M32
    for r in range(10):
        if r:
            k0, k1 = (k0 + W0) & _M32, (k1 + W1) & _M32
        p0, p1 = c0 * M0, c2 * M1
        hi0, lo0 = (p0 >> 32) & _M32, p0 & _M32
        hi1, lo1 = (p1 >> 32) & _M32, p1 & _M32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _seed_words(seed: int):
    seed &= (1 << 64) - 1
    return seed & _M32, seed >> 32


def hadamard_signs(seed: int) -> torch.Tensor:
    """The 16 signs (+-1, float64) of the random Hadamard transform keyed by seed."""
    z = torch.zeros(1, dtype=torch.int64)
    w = philox4x32_10(z, z, z, z + TAG_HADAMARD, *_seed_words(seed))[0].item() & 0xFFFF
    return torch.tensor([-1.0 if (w >> j) & 1 else 1.0 for j in range(16)], dtype=torch.float64)


def hadamard_matrix(seed: int) -> torch.Tensor:
    """M = H16 diag(signs) / 4 (float64, orthogonal): a block v becomes M v."""
    i = torch.arange(16)
    pc = torch.zeros(16, 16, dtype=torch.int64)
    x = i[:, None] & i[None, :]
    for b in range(4):
        pc += (x >> b) & 1
    H = torch.where(pc % 2 == 0, 1.0, -1.0).double()
    return H * hadamard_signs(seed)[None, :] / 4


def hadamard16_f32(a: torch.Tensor, seed: int) -> torch.Tensor:
    """The kernels' float32 transform of every 16-element block of the last dim (sign flips,
    butterflies h = 1, 2, 4, 8, then * 0.25): bit-identical to numerics.cuh hadamard16."""
    s = hadamard_signs(seed).float().to(a.device)
    v = (a.float().reshape(*a.shape[:-1], -1, 16) * s).clone()
    h = 1
    while h < 16:
        v = v.reshape(*v.shape[:-1], 16 // (2 * h), 2, h)
        x, y = v[..., 0, :], v[..., 1, :]
        v = torch.stack([x + y, x - y], dim=-2).reshape(*v.shape[:-3], 16)
        h *= 2
    return (v * 0.25).reshape(a.shape)


def sr_uniform(seed: int, rows: int, cols: int, device=None) -> torch.Tensor:
    """The stochastic-rounding uniforms (float64 in [0, 1)) of a (rows, cols) quantized matrix:
    element (r, c) takes word (idx & 3) of Philox(counter = (idx >> 2, 0, TAG), seed) with
    idx = r * cols + c, as numerics.cuh nvfp4_sr_bits."""
    idx = torch.arange(rows * cols, dtype=torch.int64, device=device)
    c = idx >> 2
    z = torch.zeros_like(c)
    words = torch.stack(philox4x32_10(c & _M32, c >> 32, z, z + TAG_STOCHASTIC, *_seed_words(seed)), -1)
    bits = words.gather(-1, (idx & 3)[:, None])[:, 0]
    return ((bits >> 8).double() / 2.0 ** 24).reshape(rows, cols)


# ---------------------------------------------------------------------------- quantize


def encode_scale(amax: torch.Tensor) -> torch.Tensor:
    amax = amax.float()
    s = torch.tensor(2688.0, dtype=torch.float32, device=amax.device) / amax
    s = torch.where(s > FLT_MAX, torch.tensor(FLT_MAX, dtype=torch.float32, device=amax.device), s)
    s = torch.where(amax == 0, torch.ones_like(s), s)
    return torch.where(torch.isfinite(amax), s, torch.full_like(s, float("nan")))


def quantize_ref(x: torch.Tensor, *, block_2d=False, hadamard=False, stochastic_rounding=False, seed=0,
                 global_amax: Optional[torch.Tensor] = None) -> NVFP4Tensor:
    """Reference quantization of the rows of a 2-D x (R, K), K % 16 == 0."""
    R, K = x.shape
    a = x.float()
    if hadamard:
        a = hadamard16_f32(a, seed)
    blk = a.abs().reshape(R, K // 16, 16).amax(-1)  # (R, K/16) float32
    amax = global_amax.float().reshape(()).to(a.device) if global_amax is not None else (
        a.abs().max() if a.numel() else torch.zeros((), device=a.device))
    s_enc = encode_scale(amax)
    if block_2d:
        Rp = (R + 15) // 16 * 16
        pad = torch.zeros(Rp - R, K // 16, device=a.device)
        t = torch.cat([blk, pad]).reshape(Rp // 16, 16, K // 16).amax(1)
        blk = t.repeat_interleave(16, 0)[:R]
    sf = (blk / torch.tensor(6.0, dtype=torch.float32)) * s_enc
    sb = e4m3_encode(sf)
    sbv = e4m3_decode(sb).float()
    inv = s_enc / sbv
    inv = torch.where(inv > FLT_MAX, torch.tensor(FLT_MAX, dtype=torch.float32), inv)
    inv = torch.where(sbv == 0, torch.zeros_like(inv), inv)
    y = a.reshape(R, K // 16, 16) * inv[..., None]  # float32, one rounding
    m = y.abs().double().reshape(R, K)
    table = torch.tensor(E2M1_VALUES, dtype=torch.float64, device=a.device)
    if stochastic_rounding:
        u = sr_uniform(seed, R, K, a.device)
        lo = (torch.searchsorted(table, m, right=True) - 1).clamp(0, 7)
        step = torch.where(lo < 4, 0.5, torch.where(lo < 6, 1.0, 2.0)).double()
        p = (m - table[lo]) / step
        mag = torch.where(m >= 6, torch.full_like(lo, 7), lo + (u < p).long())
    else:
        mag = _nearest_even(m, table)
    neg = (y.reshape(R, K) < 0) & (mag != 0)
    codes = (mag | (neg.long() << 3)).to(torch.uint8)
    data = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)
    return NVFP4Tensor(data, sb.view(torch.float8_e4m3fn), (1.0 / s_enc).reshape(()))


def dequantize_ref(t: NVFP4Tensor) -> torch.Tensor:
    """float64 values e2m1(code) * s_b * global_scale, shape (..., K)."""
    codes = torch.stack([t.data & 0xF, t.data >> 4], -1).flatten(-2)
    s = e4m3_decode(t.scales).repeat_interleave(16, -1)
    return e2m1_decode(codes) * s * t.global_scale.double()


# ---- the GEMM oracle (nvfp4.gemm): decode in float64 (or compute_dtype), multiply, scale, add bias
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
