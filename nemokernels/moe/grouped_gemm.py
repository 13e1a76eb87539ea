"""Grouped GEMM over experts: the interface the rest of the MoE pipeline calls.

``grouped_gemm(a, w, expert_offsets, activation="none")``; w may be an NVFP4Tensor (NVFP4 expert
weights) or an FP8Tensor (FP8 rows and weights), both forward only.

Details: docs/moe.md, section `nemokernels/moe/grouped_gemm.py`."""
from typing import Optional

import torch

from ..nvfp4.tensor import NVFP4Tensor
from .fp8 import FP8Rows, FP8Tensor, FP8Training, grouped_gemm_fp8_training, quantize_rows_fp8, static_input_scale

_ops = torch.ops.nemokernels

@torch.library.register_fake("nemokernels::grouped_gemm_fwd")
def _fwd_fake(a, w, expert_offsets, activation, save_preact):
    R, N = a.shape[0], w.shape[1]
    keep = bool(save_preact) and activation == "relu2"
    return a.new_empty((R, N)), a.new_empty((R if keep else 0, N))


@torch.library.register_fake("nemokernels::grouped_gemm_dgrad")
def _dgrad_fake(dout, w, expert_offsets, preact):
    return dout.new_empty((dout.shape[0], w.shape[2]))


@torch.library.register_fake("nemokernels::grouped_gemm_wgrad")
def _wgrad_fake(dout, a, expert_offsets, preact):
    return dout.new_empty((expert_offsets.shape[0] - 1, dout.shape[1], a.shape[1]))


@torch.library.register_fake("nemokernels::grouped_gemm_bwd")
def _bwd_fake(dout, a, w, expert_offsets, preact):
    return dout.new_empty((dout.shape[0], w.shape[2])), dout.new_empty(w.shape)


@torch.library.register_fake("nemokernels::grouped_gemm_nvfp4w")
def _nvfp4w_fake(a, w_data, w_scales, w_global, expert_offsets, activation):
    return a.new_empty((a.shape[0], w_data.shape[1]))


@torch.library.register_fake("nemokernels::grouped_gemm_fp8")
def _fp8_fake(a, a_scale, w, w_scale, expert_offsets, activation, out_dtype, save_preact, out_scale=None):
    R, N = a.shape[0], w.shape[1]
    keep = bool(save_preact) and activation == "relu2"
    return a.new_empty((R, N), dtype=out_dtype), a.new_empty((R if keep else 0, N), dtype=out_dtype)


def _fwd_setup(ctx, inputs, output):
    a, w, expert_offsets, activation, save_preact = inputs
    _, pre = output
    ctx.mark_non_differentiable(pre)
    ctx.relu2 = activation == "relu2"
    ctx.save_for_backward(a, w, expert_offsets, pre if ctx.relu2 else None)


def _fwd_backward(ctx, dout, _dpre):
    a, w, offsets, pre = ctx.saved_tensors
    if ctx.relu2 and pre.shape[0] != a.shape[0]:
        # Called without save_preact (e.g. through the raw op): recompute the pre-activation.
        _, pre = _ops.grouped_gemm_fwd(a, w, offsets, "relu2", True)
    if not ctx.relu2:
        pre = None
    if ctx.needs_input_grad[0] and ctx.needs_input_grad[1]:
        da, dw = _ops.grouped_gemm_bwd(dout, a, w, offsets, pre)  # relu^2's g made once for both
        return da, dw, None, None, None
    da = _ops.grouped_gemm_dgrad(dout, w, offsets, pre) if ctx.needs_input_grad[0] else None
    dw = _ops.grouped_gemm_wgrad(dout, a, offsets, pre) if ctx.needs_input_grad[1] else None
    return da, dw, None, None, None


torch.library.register_autograd("nemokernels::grouped_gemm_fwd", _fwd_backward, setup_context=_fwd_setup)


def grouped_gemm(a, w, expert_offsets: torch.Tensor, activation: str = "none", *,
                 out_dtype: Optional[torch.dtype] = None, out_scale: Optional[torch.Tensor] = None):
    """out[r] = act(a[r] @ w[e(r)].T) for the expert e(r) whose segment holds row r; rows past
    expert_offsets[E] are zeros. a (R, K), w (E, N, K) in a's dtype, an NVFP4Tensor of (E, N, K)
    or an FP8Tensor of (E, N, K) (both forward only), or FP8Training(master weights) (FP8
    training: grouped_gemm_fp8_training), expert_offsets (E + 1,) int32, activation
    "none" or "relu2". With an FP8Tensor, a is quantized per row (FP8Tensor.input_scale or the
    row's amax / 448) unless it is already an FP8Rows; out_dtype (FP8 only) defaults to a's dtype,
    bf16 for FP8Rows; out_dtype float8_e4m3fn with out_scale (one float32) returns FP8Rows at that
    static scale, the next FP8 GEMM's input written by this epilogue. Shapes and the backward
    ops: docs/moe.md."""
    if isinstance(a, FP8Rows) and not isinstance(w, FP8Tensor):
        raise TypeError(f"grouped_gemm: FP8Rows (rows already in e4m3) need FP8Tensor weights, got {type(w).__name__}")
    if isinstance(w, FP8Training):  # FP8 training: master weights, FP8 forward and backward
        if out_dtype is not None and out_dtype != a.dtype:
            raise ValueError(f"grouped_gemm: FP8 training outputs a's dtype {a.dtype}, not out_dtype {out_dtype}")
        return grouped_gemm_fp8_training(a, w.master, expert_offsets, activation, w.fp8)
    if isinstance(w, FP8Tensor):
        if torch.is_grad_enabled() and isinstance(a, torch.Tensor) and a.requires_grad:
            raise NotImplementedError("grouped_gemm: no gradient through FP8 expert weights (forward only); "
                                      "call it under torch.no_grad() or with an a that needs no gradient")
        if w.blockwise and w.input_scale is not None:
            raise ValueError("grouped_gemm: per-block FP8 weights take dynamic activation scales (input_scale None)")
        if isinstance(a, FP8Rows):
            rows, dtype = a, out_dtype or torch.bfloat16
        else:
            rows, dtype = quantize_rows_fp8(a, w.input_scale, block=128 if w.blockwise else 0), out_dtype or a.dtype
        data = w.data if w.data.dim() == 3 else w.data.unsqueeze(0)
        wscale = w.scale if not (w.blockwise and w.scale.dim() == 2) else w.scale.unsqueeze(0)
        if (rows.scale.dim() == 2) != w.blockwise:
            raise ValueError("grouped_gemm: per-block FP8 weights need rows with per-block scales (and per-row "
                             "rows per-expert weights)")
        if dtype == torch.float8_e4m3fn:
            if out_scale is None:
                raise ValueError("grouped_gemm: out_dtype float8_e4m3fn needs out_scale (the codes' static scale)")
            s = static_input_scale(out_scale).to(rows.data.device)
            codes = _ops.grouped_gemm_fp8(rows.data, rows.scale, data, wscale, expert_offsets, activation, dtype, False,
                                          s)[0]
            return FP8Rows(codes, s.expand(codes.shape[0]).contiguous())
        if out_scale is not None:
            raise ValueError("grouped_gemm: out_scale goes with out_dtype float8_e4m3fn only")
        return _ops.grouped_gemm_fp8(rows.data, rows.scale, data, wscale, expert_offsets, activation, dtype, False)[0]
    if (out_dtype is not None and out_dtype != a.dtype) or out_scale is not None:
        raise ValueError(f"grouped_gemm: out_dtype {out_dtype} / out_scale are for FP8 weights only; the output "
                         f"here is in a's dtype {a.dtype}")
    if isinstance(w, NVFP4Tensor):
        # NVFP4 expert weights: data (E, N, K/2) uint8, scales (E, N, K/16) float8_e4m3fn,
        # global_scale (E,) or 0-dim float32; out = act(global[e] * a @ What[e]^T), float32 sums.
        if torch.is_grad_enabled() and (a.requires_grad or w.global_scale.requires_grad):
            raise NotImplementedError("grouped_gemm: no gradient through NVFP4 expert weights (forward only); "
                                      "call it under torch.no_grad() or with an a that needs no gradient")
        return _ops.grouped_gemm_nvfp4w(a, w.data, w.scales, w.global_scale, expert_offsets, activation)
    save_preact = activation == "relu2" and torch.is_grad_enabled() and (a.requires_grad or w.requires_grad)
    out, _ = _ops.grouped_gemm_fwd(a, w, expert_offsets, activation, save_preact)
    return out
