"""Fused MoE router of Nemotron-H (transformers' NemotronHTopkRouter), after the logits GEMM.

``router_logits(hidden, weight)`` is F.linear in float32: the (T, d) x (d, E) GEMM is left to
cuBLAS (a fused GEMM + top-k saves one (T, E) float32 round trip, small next to the experts).
``moe_router(logits, bias, top_k, ...)`` is one kernel: sigmoid scores, bias for the choice only,
group-limited top-k (group score = sum of the top-2 in the group), weights = sigmoid scores of
the chosen experts, normalised (+1e-20) when asked, times routed_scaling_factor.

Details: docs/moe.md, section `nemokernels/moe/router.py`."""
from typing import Optional

import torch
import torch.nn.functional as F

_ops = torch.ops.nemokernels


@torch.library.register_fake("nemokernels::moe_router")
def _router_fake(logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor):
    t = logits.shape[0]
    return logits.new_empty((t, top_k), dtype=torch.int32), logits.new_empty((t, top_k), dtype=torch.float32)


@torch.library.register_fake("nemokernels::moe_router_bwd")
def _router_bwd_fake(dweights, logits, topk_ids, norm_topk_prob, routed_scaling_factor):
    return logits.new_empty(logits.shape, dtype=torch.float32)


def _router_setup(ctx, inputs, output):
    logits, _, _, _, _, norm, scale = inputs
    ctx.save_for_backward(logits, output[0])
    ctx.norm, ctx.scale = norm, scale


def _router_backward(ctx, d_ids, d_weights):
    logits, ids = ctx.saved_tensors
    dlogits = None
    if ctx.needs_input_grad[0] and d_weights is not None:
        dlogits = _ops.moe_router_bwd(d_weights.float(), logits, ids, ctx.norm, ctx.scale)
    return dlogits, None, None, None, None, None, None


torch.library.register_autograd("nemokernels::moe_router", _router_backward, setup_context=_router_setup)


def router_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(T, d) hidden states -> (T, E) float32 logits, F.linear in float32 as transformers does
    (cuBLAS; not fused)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    with torch.autocast(h.device.type, enabled=False):  # float32 even inside a bf16 autocast region
        return F.linear(h.float(), weight.float())


def moe_router(logits: torch.Tensor, e_score_correction_bias: Optional[torch.Tensor] = None, top_k: int = 1,
               n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
               routed_scaling_factor: float = 1.0):
    """(topk_ids (T, k) int32, topk_weights (T, k) float32) from float32 logits (T, E)."""
    if e_score_correction_bias is not None and e_score_correction_bias.dtype != torch.float32:
        e_score_correction_bias = e_score_correction_bias.float()  # e.g. a module cast with .to(bf16)
    return _ops.moe_router(logits, e_score_correction_bias, int(top_k), int(n_group), int(topk_group),
                           bool(norm_topk_prob), float(routed_scaling_factor))
