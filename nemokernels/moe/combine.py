"""MoE combine: un-permute the experts' output rows and sum each token's k rows, weighted by the
routing weights (the routing weight is applied here, not in the down GEMM's epilogue).

``moe_combine(y (R, l), plan, topk_weights (T, k) float32 or None) -> (T, l)`` in y's dtype:
out[t] = sum_j w[t, j] * y[row_of_slot[t*k + j]], accumulated in float32 in j order
(deterministic, no atomics). Backward: dy (R, l) = w * dout[token of the row] (zero on padding
rows), dweights (T, k) float32 = dot(dout[t], y[row]).
Schemas: csrc/moe/moe_ops.cpp; kernels: csrc/moe/permute_*.
"""
from typing import Optional

import torch

from .permute import MoEPlan

_ops = torch.ops.nemokernels


@torch.library.register_fake("nemokernels::moe_combine")
def _combine_fake(y, row_of_slot, slot_of_row, topk_weights, top_k):
    return y.new_empty((row_of_slot.shape[0] // top_k, y.shape[1]))


@torch.library.register_fake("nemokernels::moe_combine_bwd")
def _combine_bwd_fake(dout, y, row_of_slot, slot_of_row, topk_weights, top_k, return_dweights):
    t = row_of_slot.shape[0] // top_k
    return y.new_empty(y.shape), y.new_empty((t if return_dweights else 0, top_k), dtype=torch.float32)


def _combine_setup(ctx, inputs, output):
    y, row_of_slot, slot_of_row, topk_weights, top_k = inputs
    ctx.save_for_backward(y, row_of_slot, slot_of_row, topk_weights)
    ctx.top_k = top_k


def _combine_backward(ctx, dout):
    y, row_of_slot, slot_of_row, topk_weights = ctx.saved_tensors
    want_dw = topk_weights is not None and ctx.needs_input_grad[3]
    dy, dw = _ops.moe_combine_bwd(dout, y, row_of_slot, slot_of_row, topk_weights, ctx.top_k, want_dw)
    return dy, None, None, dw if want_dw else None, None


torch.library.register_autograd("nemokernels::moe_combine", _combine_backward, setup_context=_combine_setup)


def moe_combine(y: torch.Tensor, plan: MoEPlan, topk_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(R, l) expert output rows -> (T, l): each token's k rows, weighted and summed."""
    return _ops.moe_combine(y, plan.row_of_slot, plan.slot_of_row, topk_weights, plan.top_k)
