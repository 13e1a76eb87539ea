"""Pure-PyTorch references of the MoE ops (float64-capable), the oracles of the tests and the
baseline of the benchmarks. Written for clarity, not speed; they share no code with the kernels.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def router_select_ref(logits: torch.Tensor, bias: Optional[torch.Tensor], top_k: int, n_group: int = 1,
                      topk_group: int = 1):
    """Chosen experts (T, k) int64, in descending order of choice score, ties to the lower index
    (stable sorts), and the choice scores (T, E) after the group mask."""
    scores = torch.sigmoid(logits)
    choice = scores + bias if bias is not None else scores.clone()
    t, e = logits.shape
    if n_group > 1:
        gsize = e // n_group
        grouped = choice.view(t, n_group, gsize)
        gscore = grouped.topk(min(2, gsize), dim=-1).values.sum(-1)
        keep = torch.sort(gscore, dim=-1, descending=True, stable=True).indices[:, :topk_group]
        mask = torch.zeros(t, n_group, dtype=torch.bool, device=logits.device).scatter_(1, keep, True)
        choice = choice.masked_fill(~mask.repeat_interleave(gsize, dim=1), float("-inf"))
    ids = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :top_k]
    return ids, choice


def router_weights_ref(logits: torch.Tensor, ids: torch.Tensor, norm_topk_prob: bool = True,
                       routed_scaling_factor: float = 1.0) -> torch.Tensor:
    """Routing weights of the chosen `ids` (differentiable in logits), as transformers'
    NemotronHTopkRouter: sigmoid scores, normalised (+1e-20) when asked, times the factor."""
    w = torch.sigmoid(logits).gather(1, ids.long())
    if norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * routed_scaling_factor


def permute_plan_ref(topk_ids: torch.Tensor, num_experts: int, pad_to: int = 1):
    """(counts, offsets, row_of_slot, slot_of_row) as int64, by a stable sort of the flat ids."""
    flat = topk_ids.reshape(-1).long().cpu()
    n = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + pad_to - 1) // pad_to * pad_to
    offsets = torch.zeros(num_experts + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(padded, 0)
    order = torch.sort(flat, stable=True).indices          # slots grouped by expert, slot order inside
    starts = torch.zeros(num_experts, dtype=torch.long)
    starts[1:] = torch.cumsum(counts, 0)[:-1]
    ranks = torch.arange(n) - starts[flat[order]]
    row_of_slot = torch.empty(n, dtype=torch.long)
    row_of_slot[order] = offsets[flat[order]] + ranks
    rows = n + num_experts * (pad_to - 1)
    slot_of_row = torch.full((rows,), -1, dtype=torch.long)
    slot_of_row[row_of_slot] = torch.arange(n)
    return counts, offsets, row_of_slot, slot_of_row


def gather_ref(x: torch.Tensor, slot_of_row: torch.Tensor, top_k: int) -> torch.Tensor:
    """xs[r] = x[slot_of_row[r] // k], zero rows for padding (-1). Differentiable in x."""
    s = slot_of_row.long().to(x.device)
    valid = s >= 0
    rows = x[torch.where(valid, s // top_k, 0)]
    return rows * valid.unsqueeze(1).to(x.dtype)


def combine_ref(y: torch.Tensor, row_of_slot: torch.Tensor, topk_weights: Optional[torch.Tensor],
                top_k: int) -> torch.Tensor:
    """out[t] = sum_j w[t, j] * y[row_of_slot[t*k + j]]. Differentiable in y and the weights."""
    t = row_of_slot.numel() // top_k
    rows = y[row_of_slot.long().to(y.device)].view(t, top_k, y.shape[1])
    if topk_weights is None:
        return rows.sum(1)
    return (rows * topk_weights.to(y.dtype).unsqueeze(-1)).sum(1)


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x).square()


def experts_ref(h: torch.Tensor, up: torch.Tensor, down: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor) -> torch.Tensor:
    """transformers' NemotronHExperts: a loop over experts, relu^2 MLPs, weighted index_add."""
    out = torch.zeros(h.shape, dtype=topk_weights.dtype, device=h.device)
    for e in range(up.shape[0]):
        tok, pos = torch.where(topk_ids == e)
        if tok.numel() == 0:
            continue
        y = F.linear(relu2(F.linear(h[tok], up[e])), down[e])
        out = out.index_add(0, tok, (y * topk_weights[tok, pos, None]).to(out.dtype))
    return out.to(h.dtype)


def latent_moe_ref(hidden, gate_weight, e_score_correction_bias, up, down, fc1=None, fc2=None,
                   shared_up=None, shared_down=None, *, top_k, n_group=1, topk_group=1, norm_topk_prob=True,
                   routed_scaling_factor=1.0, select_logits=None):
    """The whole NemotronHMoE forward in plain PyTorch. fc1 / fc2 / shared_up / shared_down are
    nn.Linear-like callables (or None: identity / no shared expert). `select_logits` (T, E), when
    given, choose the experts instead of the logits computed here, in their own dtype (a float64
    reference can then route exactly as a float32 layer did, and still differentiate the weights
    in float64)."""
    shape = hidden.shape
    h = hidden.reshape(-1, shape[-1])
    logits = F.linear(h.to(gate_weight.dtype), gate_weight)
    if select_logits is None:
        ids, _ = router_select_ref(logits.detach(), e_score_correction_bias, top_k, n_group, topk_group)
    else:
        sel = select_logits.detach()
        bias = None if e_score_correction_bias is None else e_score_correction_bias.to(sel.dtype)
        ids, _ = router_select_ref(sel, bias, top_k, n_group, topk_group)
    w = router_weights_ref(logits, ids, norm_topk_prob, routed_scaling_factor)
    lat = fc1(h) if fc1 is not None else h
    y = experts_ref(lat, up, down, ids, w)
    out = fc2(y) if fc2 is not None else y
    out = out.reshape(shape)
    if shared_up is not None:
        out = out + shared_down(relu2(shared_up(hidden)))
    return out
