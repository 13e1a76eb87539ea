"""Pure-PyTorch LatentMoE with the interface and parameter names of ``nemokernels.moe.LatentMoE``
(and of transformers' NemotronHMoE), used by the model package until the kernel-backed module
is merged. Same math as transformers (DESIGN.md 4.2):

    logits = h.float() @ gate.weight.T (float32); scores = sigmoid(logits)
    choice = scores + gate.e_score_correction_bias; group-limited top-k (group score = sum of
    the top-2 choices in the group; keep topk_group groups); weights = scores of the chosen
    experts, normalised when norm_topk_prob, times routed_scaling_factor
    h_lat = fc1_latent_proj(h); y = sum_k w_k * down_e(relu(up_e(h_lat))^2) (float32 sum)
    out = fc2_latent_proj(y) + shared_experts(h)

Expert weights: experts.up_proj (E, F, l), experts.down_proj (E, l, F), l = moe_latent_size or d.
Dense over experts (each expert runs on its own tokens via index_select / index_add), no
host sync on the token counts: fine for the tiny models of the tests and demo.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ReferenceLatentMoE", "route"]


def route(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int,
          topk_group: int, norm_topk_prob: bool, scaling: float):
    """(router_logits (T, E) f32, topk_weights (T, k) f32, topk_ids (T, k) int64) as transformers."""
    logits = F.linear(hidden.float(), weight.float())
    scores = logits.sigmoid()
    choice = scores + bias.float()
    T, E = choice.shape
    if n_group > 1:
        group_scores = choice.view(T, n_group, E // n_group).topk(2, dim=-1)[0].sum(-1)
        group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        score_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
        choice = choice.masked_fill(score_mask == 0, float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    w = scores.gather(1, ids)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return logits, w * scaling, ids


class _Router(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))


class _Experts(nn.Module):
    def __init__(self, config):
        super().__init__()
        lat = config.moe_latent_size if config.moe_latent_size is not None else config.hidden_size
        E, Fi = config.n_routed_experts, config.moe_intermediate_size
        self.up_proj = nn.Parameter(torch.empty(E, Fi, lat))
        self.down_proj = nn.Parameter(torch.empty(E, lat, Fi))


class _MLP(nn.Module):
    def __init__(self, d, f, bias):
        super().__init__()
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)).square())


class ReferenceLatentMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.gate = _Router(config)
        self.experts = _Experts(config)
        self.shared_experts = _MLP(config.hidden_size, config.moe_shared_expert_intermediate_size, config.mlp_bias)
        if config.moe_latent_size is not None:
            self.fc1_latent_proj = nn.Linear(config.hidden_size, config.moe_latent_size, bias=config.mlp_bias)
            self.fc2_latent_proj = nn.Linear(config.moe_latent_size, config.hidden_size, bias=config.mlp_bias)
        else:
            self.fc1_latent_proj = nn.Identity()
            self.fc2_latent_proj = nn.Identity()
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = self.config.initializer_range
        self.gate.weight.normal_(0.0, std)
        self.gate.e_score_correction_bias.zero_()
        self.experts.up_proj.normal_(0.0, std)
        self.experts.down_proj.normal_(0.0, std)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        h = hidden.reshape(-1, shape[-1])
        c = self.config
        _, w, ids = route(h, self.gate.weight, self.gate.e_score_correction_bias, self.top_k, c.n_group,
                          c.topk_group, c.norm_topk_prob, c.routed_scaling_factor)
        lat = self.fc1_latent_proj(h)
        acc = torch.zeros(lat.shape, dtype=w.dtype, device=lat.device)
        for e in range(self.n_experts):
            hit = ids == e                                   # (T, k)
            wt = (w * hit).sum(-1)                           # (T,) routing weight of e, 0 if unused
            rows = hit.any(-1).nonzero().squeeze(-1) if not torch.compiler.is_compiling() else None
            if rows is None:
                y = F.linear(torch.relu(F.linear(lat, self.experts.up_proj[e])).square(), self.experts.down_proj[e])
                acc = acc + y.to(acc.dtype) * wt[:, None]
                continue
            if rows.numel() == 0:
                continue
            x = lat.index_select(0, rows)
            y = F.linear(torch.relu(F.linear(x, self.experts.up_proj[e])).square(), self.experts.down_proj[e])
            acc = acc.index_add(0, rows, y.to(acc.dtype) * wt.index_select(0, rows)[:, None])
        out = self.fc2_latent_proj(acc.to(lat.dtype))
        return out.view(shape) + self.shared_experts(hidden)
