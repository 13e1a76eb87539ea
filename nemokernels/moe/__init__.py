"""LatentMoE expert dispatch (DESIGN.md section 4.2).

Pipeline for one MoE layer, each step an op with its own backward:

    logits = hidden.float() @ router_weight.T                 (T, E) float32
    topk_ids, topk_weights = moe_router(logits, bias, ...)     (T, k) int32, (T, k) float32
    plan = moe_permute_plan(topk_ids, E, pad_to)               counts, tile-aligned offsets, maps
    xs = moe_gather(h_lat, plan)                               (R, l) expert-contiguous rows
    hs = grouped_gemm(xs, up, plan.expert_offsets, "relu2")    (R, F)   relu(xs @ up[e].T)^2
    ys = grouped_gemm(hs, down, plan.expert_offsets)           (R, l)   hs @ down[e].T
    out = moe_combine(ys, plan, topk_weights)                  (T, l)   sum_j w[t, j] * ys[row(t, j)]
"""
from .grouped_gemm import grouped_gemm
from .router import moe_router, router_logits
from .permute import MoEPlan, moe_gather, moe_permute_plan
from .combine import moe_combine
from .layer import PAD_TO, LatentMoE, latent_moe

__all__ = ["grouped_gemm", "moe_router", "router_logits", "MoEPlan", "moe_permute_plan", "moe_gather",
           "moe_combine", "PAD_TO", "LatentMoE", "latent_moe"]
