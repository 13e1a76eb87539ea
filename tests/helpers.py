"""Numerical helpers for tests: relative norm error against a float64 reference, tolerances
per dtype, output poisoning, and torch.library.opcheck.

Tolerances (relative norm error ||out - ref|| / ||ref||, reference in float64):
  float32  1e-5  fp32 accumulation over a handful to a few thousand terms
  float16  3e-3  one rounding of inputs and outputs to 11-bit mantissas (2^-11 ~ 5e-4 each)
  bfloat16 2e-2  one rounding to 8-bit mantissas (2^-8 ~ 4e-3 each), plus the input rounding
                 propagated through the op
Ops whose math amplifies rounding (long recurrences) scale these with documented factors.

A relative norm means nothing when the reference itself cancels to (near) zero, as a small
product can (M = N = 1, K = 16: a sum of 16 signed terms). Products are therefore checked
element by element against the operands' magnitudes: |out - ref| <= tol * (|A| @ |B|)
(assert_close_to_product), the bound a floating-point dot product satisfies whatever the sum.
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


def assert_close_to_product(out, ref, abs_a, abs_b, tol, abs_c=None, atol=0.0, what="output"):
    """Elementwise |out - ref| <= tol * (abs_a @ abs_b + abs_c) + atol, in float64.

    For out ~ A @ B (+ C): abs_a (..., M, K) and abs_b (K, N) are |A| and |B| as the kernel
    scales them (dequantized, global scales applied), abs_c the magnitude of any added term (a
    bias, broadcast like it). The bound holds for any summation order (float accumulation of
    K terms errs by at most ~K*eps times the sum of the terms' magnitudes), so it stays
    meaningful where the reference cancels to zero and a relative norm would divide by ~0.
    atol covers the output dtype's subnormal spacing. Fails with the worst element: index,
    out, ref, error, bound, and error / bound."""
    scale = abs_a.detach().double().cpu() @ abs_b.detach().double().cpu()
    if abs_c is not None:
        scale = scale + abs_c.detach().double().cpu()
    assert_close_to_magnitude(out, ref, scale, tol, atol, what)


def assert_close_to_magnitude(out, ref, scale, tol, atol=0.0, what="output"):
    """Elementwise |out - ref| <= tol * scale + atol, in float64: `scale` is the magnitude the
    op's rounding errors are proportional to (for a product, |A| @ |B|; see
    assert_close_to_product), so the check stays meaningful where the reference is ~0."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out64.shape == ref64.shape, f"{what}: shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}"
    if out64.numel() == 0:
        return
    bad = ~torch.isfinite(out64)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} non-finite outputs, first at {idx}: {out64[idx].item()}")
    scale = scale.detach().double().cpu().expand_as(out64)
    bound = tol * scale + atol
    err = (out64 - ref64).abs()
    ratio = torch.where(bound > 0, err / bound, torch.where(err > 0, float("inf"), 0.0))
    worst = int(ratio.argmax())
    if ratio.flatten()[worst] > 1:
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), out64.shape))
        n_bad = int((ratio > 1).sum())
        raise AssertionError(
            f"{what}: |out - ref| exceeds tol * magnitude at {n_bad} of {out64.numel()} elements; worst at "
            f"{idx}: out {out64[idx].item():.9g}, ref {ref64[idx].item():.9g}, error {err[idx].item():.3e} > "
            f"bound {bound[idx].item():.3e} (tol {tol:.3e} x magnitude {scale[idx].item():.3e}"
            f"{f' + atol {atol:.1e}' if atol else ''}), ratio {ratio[idx].item():.3g}")


def poison_allocator(device):
    """Fill freed allocator memory with NaN so a kernel that leaves output unwritten is caught."""
    sizes = (32 << 20,) if torch.device(device).type == "cuda" else (1 << 10, 1 << 14, 1 << 18, 1 << 22)
    for n in sizes:
        torch.full((n,), float("nan"), device=device)  # freed at once: the allocator keeps the NaNs


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
