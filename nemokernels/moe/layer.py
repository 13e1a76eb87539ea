"""The Nemotron-H LatentMoE layer (transformers' NemotronHMoE) on the nemokernels MoE ops.

Details: docs/moe.md, section `nemokernels/moe/layer.py`."""
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .combine import moe_combine
from .grouped_gemm import grouped_gemm
from .permute import moe_gather, moe_permute_plan
from .router import moe_router, router_logits

# Rows per expert are padded to a multiple of this (moe_permute_plan's pad_to). 1 everywhere: every
# grouped GEMM path tiles each expert's segment on its own (a partial last tile, no tile across
# two experts), so padding adds gather, zero-fill and relu^2 bytes and no speed (docs/decisions.md).
PAD_TO = {"cpu": 1, "cuda": 1}


def _relu2(x):
    return torch.relu(x).square()


def expert_mlp(x: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """down_e(relu(up_e(x))^2) for each expert e's row segment [offsets[e], offsets[e+1]) of x:
    the two grouped GEMMs, relu^2 fused into the first."""
    return grouped_gemm(grouped_gemm(x, up_proj, offsets, "relu2"), down_proj, offsets)


def _local_experts(xs, plan, up_proj, down_proj):
    return expert_mlp(xs, up_proj, down_proj, plan.expert_offsets)


def latent_moe(hidden: torch.Tensor, gate_weight: torch.Tensor, e_score_correction_bias: Optional[torch.Tensor],
               up_proj: torch.Tensor, down_proj: torch.Tensor, *, top_k: int, n_group: int = 1,
               topk_group: int = 1, norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
               fc1_weight: Optional[torch.Tensor] = None, fc1_bias: Optional[torch.Tensor] = None,
               fc2_weight: Optional[torch.Tensor] = None, fc2_bias: Optional[torch.Tensor] = None,
               shared_up_weight: Optional[torch.Tensor] = None, shared_up_bias: Optional[torch.Tensor] = None,
               shared_down_weight: Optional[torch.Tensor] = None, shared_down_bias: Optional[torch.Tensor] = None,
               pad_to: Optional[int] = None, experts: Optional[Callable] = None) -> torch.Tensor:
    """One LatentMoE layer, functional form. hidden (..., d); gate_weight (E, d) float32; up_proj
    (E, F, l) and down_proj (E, l, F) in hidden's dtype (l = d without latent projections);
    fc1 (l, d) / fc2 (d, l) latent projections or None; shared expert weights or None.
    experts(xs, plan, up_proj, down_proj) -> ys runs the routed experts on the gathered rows and
    returns their outputs in the same row order (default: expert_mlp over plan.expert_offsets;
    expert parallelism passes its dispatch, distributed/expert_parallel.py).
    Returns (..., d) in hidden's dtype."""
    shape = hidden.shape
    h = hidden.reshape(-1, shape[-1])
    num_experts = gate_weight.shape[0]
    if pad_to is None:
        pad_to = PAD_TO.get(h.device.type, 1)
    logits = router_logits(h, gate_weight)
    ids, weights = moe_router(logits, e_score_correction_bias, top_k, n_group, topk_group, norm_topk_prob,
                              routed_scaling_factor)
    lat = F.linear(h, fc1_weight, fc1_bias) if fc1_weight is not None else h
    if up_proj.dtype != lat.dtype:  # autocast (bf16 activations, float32 master weights), as F.linear
        up_proj, down_proj = up_proj.to(lat.dtype), down_proj.to(lat.dtype)
    plan = moe_permute_plan(ids, num_experts, pad_to)
    xs = moe_gather(lat, plan)
    ys = (experts or _local_experts)(xs, plan, up_proj, down_proj)
    y = moe_combine(ys, plan, weights)
    out = F.linear(y, fc2_weight, fc2_bias) if fc2_weight is not None else y
    out = out.reshape(shape)
    if shared_up_weight is not None:
        out = out + F.linear(_relu2(F.linear(hidden, shared_up_weight, shared_up_bias)), shared_down_weight,
                             shared_down_bias)
    return out


class MoEGate(nn.Module):
    """The router's parameters, named as the checkpoint (gate.weight, gate.e_score_correction_bias)."""

    def __init__(self, num_experts: int, hidden_size: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32, device=device))
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
        nn.init.normal_(self.weight, std=hidden_size ** -0.5)


class MoEExperts(nn.Module):
    """Expert weights as 3-D tensors, the checkpoint's layout: up_proj (E, F, l), down_proj (E, l, F)."""

    def __init__(self, num_experts: int, in_dim: int, intermediate: int, dtype=None, device=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate, in_dim, **kw))
        self.down_proj = nn.Parameter(torch.empty(num_experts, in_dim, intermediate, **kw))
        nn.init.normal_(self.up_proj, std=in_dim ** -0.5)
        nn.init.normal_(self.down_proj, std=intermediate ** -0.5)


class SharedMLP(nn.Module):
    """The shared expert: down_proj(relu(up_proj(x))^2)."""

    def __init__(self, hidden_size: int, intermediate: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate, bias=bias, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden_size, bias=bias, dtype=dtype, device=device)

    def forward(self, x):
        return self.down_proj(_relu2(self.up_proj(x)))


class LatentMoE(nn.Module):
    """Drop-in for transformers' NemotronHMoE (same parameter names, so its state_dict loads
    strictly): gate.{weight, e_score_correction_bias}, experts.{up_proj, down_proj},
    fc1_latent_proj / fc2_latent_proj (absent without moe_latent_size), shared_experts.{up_proj,
    down_proj}."""

    def __init__(self, hidden_size: int, n_routed_experts: int, num_experts_per_tok: int, moe_intermediate_size: int,
                 moe_shared_expert_intermediate_size: Optional[int] = None, moe_latent_size: Optional[int] = None,
                 n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                 routed_scaling_factor: float = 1.0, mlp_bias: bool = False, dtype=None, device=None,
                 pad_to: Optional[int] = None, num_local_experts: Optional[int] = None):
        """num_local_experts: how many experts `experts.*` holds (default all n_routed_experts;
        fewer when an expert-parallel subclass keeps only its shard)."""
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = n_routed_experts
        self.top_k = num_experts_per_tok
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.pad_to = pad_to
        in_dim = moe_latent_size if moe_latent_size is not None else hidden_size
        self.gate = MoEGate(n_routed_experts, hidden_size, device=device)
        held = n_routed_experts if num_local_experts is None else num_local_experts
        self.experts = MoEExperts(held, in_dim, moe_intermediate_size, dtype=dtype, device=device)
        self.shared_experts = (SharedMLP(hidden_size, moe_shared_expert_intermediate_size, mlp_bias, dtype, device)
                               if moe_shared_expert_intermediate_size else None)
        if moe_latent_size is not None:
            self.fc1_latent_proj = nn.Linear(hidden_size, moe_latent_size, bias=mlp_bias, dtype=dtype, device=device)
            self.fc2_latent_proj = nn.Linear(moe_latent_size, hidden_size, bias=mlp_bias, dtype=dtype, device=device)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None

    @classmethod
    def from_config(cls, config, dtype=None, device=None, pad_to: Optional[int] = None) -> "LatentMoE":
        """From an object with transformers' NemotronHConfig field names."""
        return cls(hidden_size=config.hidden_size, n_routed_experts=config.n_routed_experts,
                   num_experts_per_tok=config.num_experts_per_tok, moe_intermediate_size=config.moe_intermediate_size,
                   moe_shared_expert_intermediate_size=getattr(config, "moe_shared_expert_intermediate_size", None),
                   moe_latent_size=getattr(config, "moe_latent_size", None), n_group=getattr(config, "n_group", 1),
                   topk_group=getattr(config, "topk_group", 1),
                   norm_topk_prob=getattr(config, "norm_topk_prob", True),
                   routed_scaling_factor=getattr(config, "routed_scaling_factor", 1.0),
                   mlp_bias=getattr(config, "mlp_bias", False), dtype=dtype, device=device, pad_to=pad_to)

    def routed_experts(self, xs: torch.Tensor, plan, up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
        """The routed experts on the gathered rows (latent_moe's `experts`): local grouped GEMMs
        here; ExpertParallelLatentMoE sends the rows to the experts' ranks."""
        return _local_experts(xs, plan, up_proj, down_proj)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fc1, fc2, sh = self.fc1_latent_proj, self.fc2_latent_proj, self.shared_experts
        return latent_moe(
            hidden_states, self.gate.weight, self.gate.e_score_correction_bias, self.experts.up_proj,
            self.experts.down_proj, top_k=self.top_k, n_group=self.n_group, topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob, routed_scaling_factor=self.routed_scaling_factor,
            fc1_weight=fc1.weight if fc1 is not None else None, fc1_bias=fc1.bias if fc1 is not None else None,
            fc2_weight=fc2.weight if fc2 is not None else None, fc2_bias=fc2.bias if fc2 is not None else None,
            shared_up_weight=sh.up_proj.weight if sh is not None else None,
            shared_up_bias=sh.up_proj.bias if sh is not None else None,
            shared_down_weight=sh.down_proj.weight if sh is not None else None,
            shared_down_bias=sh.down_proj.bias if sh is not None else None, pad_to=self.pad_to,
            experts=self.routed_experts)
