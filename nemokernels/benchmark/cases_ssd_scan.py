"""SSD chunk scan cases (mamba_chunk_scan_combined), bf16, chunk 128, at the SHAPES.md points,
as the Mamba-2 mixer calls it (z, D per head, dt_bias, softplus).

Baselines: the PyTorch chunked reference (ops/reference.py, float32 math), torch.compile of it,
and mamba_ssm's Triton `mamba_chunk_scan_combined` when it can be imported: either installed,
or from a source checkout named by NK_MAMBA_SSM_SRC (the repository root; its Triton path
needs no build, only triton and einops), loaded without mamba_ssm/__init__.py (which would
import the compiled selective-scan extension).
"""
import importlib
import os
import sys
import types

import torch

import nemokernels as nk
from nemokernels.ops.reference import ssd_chunked_ref
from nemokernels.ops.ssd_chunk_scan import ssd_chunk_scan_bytes_flops

from .harness import Case, lazy_compile

DTYPE = torch.bfloat16
CHUNK = 128
# (nheads, headdim, ngroups, dstate) per SHAPES.md (Super's values marked (?) there).
CONFIGS = {"nano": (64, 64, 8, 128), "super": (128, 64, 8, 128)}


def load_mamba_ssm_triton():
    """mamba_ssm's Triton mamba_chunk_scan_combined, or None with the reason."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as fn  # noqa: PLC0415
        return fn, "installed"
    except Exception as e:  # noqa: BLE001
        installed_error = f"{type(e).__name__}: {e}"
    src = os.environ.get("NK_MAMBA_SSM_SRC")
    if not src:
        return None, f"not importable ({installed_error}); set NK_MAMBA_SSM_SRC to a source checkout"
    try:
        for name, sub in [("mamba_ssm", "mamba_ssm"), ("mamba_ssm.ops", "mamba_ssm/ops"),
                          ("mamba_ssm.ops.triton", "mamba_ssm/ops/triton")]:
            if name not in sys.modules or not hasattr(sys.modules[name], "__path__"):
                pkg = types.ModuleType(name)
                pkg.__path__ = [os.path.join(src, sub)]  # namespace-like: skips the package __init__
                sys.modules[name] = pkg
        mod = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        return mod.mamba_chunk_scan_combined, f"source {src}"
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


def _ref(x, dt, A, B, C, D, z, dt_bias):
    return ssd_chunked_ref(x, dt, A, B, C, CHUNK, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)


def _ours(x, dt, A, B, C, D, z, dt_bias):
    return nk.mamba_chunk_scan_combined(x, dt, A, B, C, CHUNK, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)


def _peer(fn):
    def run(x, dt, A, B, C, D, z, dt_bias):
        return fn(x, dt, A, B, C, CHUNK, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    return run


def fwd_bwd(forward):
    def run(x, dt, A, B, C, D, z, dt_bias, dout):
        ins = (x, dt, A, B, C, D, z, dt_bias)
        return torch.autograd.grad(forward(*ins), ins, dout)
    return run


def _maker(batch, seqlen, cfg, device, backward):
    H, P, G, N = CONFIGS[cfg]

    def make():
        # x and z as views of one projection output, as the Mamba-2 mixer produces them.
        xz = torch.randn(batch, seqlen, H, 2 * P, device=device, dtype=DTYPE)
        x, z = xz[..., :P], xz[..., P:]
        dt = torch.randn(batch, seqlen, H, device=device, dtype=DTYPE) * 0.5 - 2
        A = -torch.exp(torch.rand(H, device=device) * 2.7)  # [-16, -1] as Mamba-2's A_log init
        B = torch.randn(batch, seqlen, G, N, device=device, dtype=DTYPE) / N**0.25
        C = torch.randn(batch, seqlen, G, N, device=device, dtype=DTYPE) / N**0.25
        D = torch.randn(H, device=device)
        dt_bias = torch.randn(H, device=device) * 0.5
        ins = [x, dt, A, B, C, D, z, dt_bias]
        if not backward:
            return tuple(ins)
        ins = [t.detach().requires_grad_() for t in ins]
        return (*ins, torch.randn(batch, seqlen, H, P, device=device, dtype=DTYPE))
    return make


def cases(quick: bool, device) -> list:
    points = ([("nano", 1, 2048), ("super", 1, 2048)] if quick else
              [(cfg, b, L) for cfg in CONFIGS for b in (1, 4) for L in (2048, 8192, 32768)])
    peer, peer_note = load_mamba_ssm_triton()
    out = []
    for cfg, batch, seqlen in points:
        H, P, G, N = CONFIGS[cfg]
        name = f"{cfg} b{batch} L{seqlen} H{H} P{P} G{G} N{N}"
        act, flops = ssd_chunk_scan_bytes_flops(batch, seqlen, H, P, G, N, CHUNK)
        base = {"torch_chunked_eager": _ref}
        if seqlen <= 8192:  # compiling the chunk loop at 32768 (256 chunks) takes minutes
            base["torch_chunked_compile"] = lazy_compile(_ref)
        if peer is not None:
            base["mamba_ssm_triton"] = _peer(peer)
        out.append(Case(op="mamba_chunk_scan_combined", name=name, make_inputs=_maker(batch, seqlen, cfg, device, False),
                        fn=_ours, bytes=act, flops=flops, baselines=base))
        # Backward: reads x, z, B, C, dt, dout and y_pre, writes dx, dz, dB, dC, ddt (about 2.2x the
        # forward's traffic); its products are about 2.5x the forward's FLOPs.
        out.append(Case(op="mamba_chunk_scan_combined.fwd_bwd", name=name,
                        make_inputs=_maker(batch, seqlen, cfg, device, True),
                        fn=fwd_bwd(_ours), bytes=int(act * 3.2), flops=int(flops * 3.5),
                        baselines={k: fwd_bwd(v) for k, v in base.items()}, backward=True))
    if peer is None:
        print(f"mamba_ssm Triton baseline skipped: {peer_note}")
    return out
