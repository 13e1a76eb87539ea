"""Gated RMSNorm cases (the Mamba-2 mixer's norm before out_proj), bf16, z given, gate first
(norm_before_gate=False), 8 groups, at the points of docs/design.md section 7: rows = batch * seqlen in
{2048, 8192, 32768}, D = d_inner = 8192 (Super: 128 heads x 64) and 4096 (Nano: 64 x 64), plus Nano rows
16384 (issue 18's 16384 x 4096 point). Bytes: what must move (x, z, dout in, out, dx, dz out, rstd, the
weight and dweight); the backward's partial rows are our overhead, left out (cost model: docs/ssd.md).
Baselines are mamba_ssm's PyTorch reference (float32 math), eager and compiled, and mamba_ssm's
Triton `rmsnorm_fn` when importable (peers.py)."""
import torch
import torch.nn.functional as F

import nemokernels as nk

from .harness import Case, lazy_compile
from .peers import mamba_ssm_peer

DTYPE = torch.bfloat16
NGROUPS = 8
EPS = 1e-5
DIMS = {"nano": 64 * 64, "super": 128 * 64}


def norm_ref(x, weight, z, group_size):
    """mamba_ssm's rms_norm_ref(upcast=True, norm_before_gate=False): float32 math."""
    dtype = x.dtype
    u = x.float() * F.silu(z.float())
    ug = u.unflatten(-1, (-1, group_size))
    rstd = torch.rsqrt(ug.square().mean(-1, keepdim=True) + EPS)
    return ((ug * rstd).flatten(-2) * weight.float()).to(dtype)


def _ours(group_size):
    def run(x, weight, z):
        return nk.rmsnorm_fn(x, weight, z=z, eps=EPS, group_size=group_size, norm_before_gate=False)
    return run


def _ref(group_size):
    def run(x, weight, z):
        return norm_ref(x, weight, z, group_size)
    return run


def _peer(fn, group_size):
    def run(x, weight, z):
        return fn(x, weight, None, z=z, eps=EPS, group_size=group_size, norm_before_gate=False)
    return run


def fwd_bwd(forward):
    """Forward then backward; autograd.grad returns fresh gradients (no .grad accumulation)."""
    def run(x, weight, z, dout):
        return torch.autograd.grad(forward(x, weight, z), (x, weight, z), dout)
    return run


def _maker(rows, dim, device, backward):
    def make():
        x = torch.randn(rows, dim, device=device, dtype=DTYPE).requires_grad_(backward)
        z = torch.randn(rows, dim, device=device, dtype=DTYPE).requires_grad_(backward)
        w = (1.0 + 0.1 * torch.randn(dim, device=device, dtype=DTYPE)).requires_grad_(backward)
        if not backward:
            return x, w, z
        return x, w, z, torch.randn(rows, dim, device=device, dtype=DTYPE)
    return make


def cases(quick: bool, device) -> list:
    esize = torch.empty((), dtype=DTYPE).element_size()
    points = ([("nano", 2048), ("super", 2048)] if quick else
              [(cfg, rows) for cfg in DIMS for rows in (2048, 8192, 32768)] + [("nano", 16384)])
    if quick and torch.device(device).type != "cuda":  # CPU-sized
        points = [("nano", 512)]
    peer = mamba_ssm_peer("layernorm_gated", "rmsnorm_fn")
    out = []
    for cfg, rows in points:
        dim = DIMS[cfg]
        gs = dim // NGROUPS
        n = rows * dim
        rstd_bytes = rows * NGROUPS * 4
        name = f"{cfg} rows{rows} d{dim} g{gs}"
        # x, z read; out written; the weight read; rstd (float32, per row-group) written.
        out.append(Case(
            op="rmsnorm_fn", name=name, make_inputs=_maker(rows, dim, device, False), fn=_ours(gs),
            bytes=3 * n * esize + dim * esize + rstd_bytes, flops=8 * n,
            baselines={"torch_eager": _ref(gs), "torch_compile": lazy_compile(_ref(gs)),
                       **({"mamba_ssm_triton": _peer(peer, gs)} if peer is not None else {})}))
        # Forward, then x, z, dout (and rstd) read, dx, dz written; dweight written.
        out.append(Case(
            op="rmsnorm_fn.fwd_bwd", name=name, make_inputs=_maker(rows, dim, device, True),
            fn=fwd_bwd(_ours(gs)), bytes=8 * n * esize + 2 * dim * esize + 2 * rstd_bytes, flops=24 * n,
            baselines={"torch_eager": fwd_bwd(_ref(gs)), "torch_compile": fwd_bwd(lazy_compile(_ref(gs))),
                       **({"mamba_ssm_triton": fwd_bwd(_peer(peer, gs))} if peer is not None else {})},
            backward=True))
    return out
