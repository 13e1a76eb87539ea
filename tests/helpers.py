"""Numerical helpers for tests: relative norm error against a float64 reference, tolerances
per dtype, output poisoning, and torch.library.opcheck.

Tolerances (relative norm error ||out - ref|| / ||ref||, reference in float64):
  float32  1e-5  fp32 accumulation over a handful to a few thousand terms
  float16  3e-3  one rounding of inputs and outputs to 11-bit mantissas (2^-11 ~ 5e-4 each)
  bfloat16 2e-2  one rounding to 8-bit mantissas (2^-8 ~ 4e-3 each), plus the input rounding
                 propagated through the op
Ops whose math amplifies rounding (long recurrences) scale these with documented factors.
"""
import importlib.util

import pytest
import torch

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2, torch.float64: 1e-12}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; inf when out has NaN/Inf."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out64.shape == ref64.shape, f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}"
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    return num / denom if denom > 0 else num


def assert_close(out, ref, dtype, factor=1.0, what="output"):
    tol = TOL[dtype] * factor
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def poison_allocator(device):
    """Fill freed allocator memory with NaN so a kernel that leaves output unwritten is caught."""
    if torch.device(device).type == "cuda":
        junk = torch.full((32 << 20,), float("nan"), device=device)
        del junk
    else:
        for n in (1 << 10, 1 << 14, 1 << 18, 1 << 22):
            junk = torch.full((n,), float("nan"))
            del junk


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def to64(*ts):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in ts]


def opcheck(op, args, kwargs=None):
    """torch.library.opcheck on every test utility (schema, fake, autograd registration, aot)."""
    torch.library.opcheck(op, args, kwargs or {})


# Checkpoint I/O needs safetensors (a dependency; absent on the bare GPU machine, where tests run
# without network installs).
needs_safetensors = pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                                       reason="needs safetensors (checkpoint I/O)")
