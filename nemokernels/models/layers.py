"""NemotronH layers on the nemokernels ops: Mamba-2 mixer, GQA attention with a KV cache,
dense relu^2 MLP, LatentMoE, and the pre-norm residual block. Parameter names are those of the
Hugging Face checkpoints (transformers' NemotronH modules), so state dicts load unchanged.

Details: docs/models.md, section `nemokernels/models/layers.py`."""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ssd.causal_conv1d import causal_conv1d_fn, causal_conv1d_update, commit_conv_state
from ..ssd.rmsnorm_gated import RMSNormGated, rmsnorm_fn
from ..ssd.ssd_chunk_scan import mamba_chunk_scan_combined
from ..ssd.state_update import commit_state, commit_state_replay, selective_state_update, selective_state_update_multi

from ..moe import LatentMoE

__all__ = ["RMSNorm", "MambaMixer", "Attention", "MLP", "LatentMoE", "Block", "MambaCache", "AttentionCache",
           "tree_ancestors"]


class RMSNorm(nn.Module):
    """transformers' NemotronHRMSNorm on the fused kernel: the input is cast to the weight's
    dtype, normalised in float32, and returned in the weight's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm_fn(x.to(self.weight.dtype), self.weight, None, z=None, eps=self.eps)


# ---------------------------------------------------------------------------------------------
# caches


class MambaCache:
    """Per-layer decode state: conv_state (B, conv_dim, K - 1) in the activations' dtype (the last
    K - 1 conv inputs), ssm_state (B, H, P, N) float32. ``pending`` holds what a verify pass
    needs to roll back: the conv inputs (B, conv_dim, K - 1 + T) and the per-position SSM
    states (B, T, H, P, N), or with ``replay`` the SSM inputs of the T tokens (the commit
    re-runs the kept ones: commit_state_replay, no snapshots written)."""

    def __init__(self, replay: bool = False):
        self.conv_state: Optional[torch.Tensor] = None
        self.ssm_state: Optional[torch.Tensor] = None
        self.pending = None
        self.replay = replay

    def commit(self, num_kept: torch.Tensor) -> None:
        """Keep the first num_kept[b] (>= 1) positions of the last verify pass."""
        xcat, ssm = self.pending
        self.pending = None
        T = ssm[1].shape[1] if isinstance(ssm, tuple) else ssm.shape[1]
        km1 = xcat.shape[-1] - T
        idx = (torch.arange(km1, device=xcat.device)[None, :] + num_kept.to(xcat.device)[:, None])
        idx = idx[:, None, :].expand(xcat.shape[0], xcat.shape[1], km1)
        self.conv_state = torch.gather(xcat, 2, idx).contiguous()
        if isinstance(ssm, tuple):  # ("replay", x, dt', A, B, C)
            _, x, dte, Ae, B, C = ssm
            commit_state_replay(self.ssm_state, x, dte, Ae, B, C, num_accepted=num_kept.to(x.device))
        else:
            commit_state(self.ssm_state, ssm, num_kept)

    def commit_tree(self, accepted_node: torch.Tensor) -> None:
        """Advance to node accepted_node[b] of the last tree verify pass (its root-to-node path)."""
        _, xt, parents, inter = self.pending
        self.pending = None
        node = accepted_node.to(xt.device)
        commit_conv_state(self.conv_state, xt, node, parents)
        commit_state(self.ssm_state, inter, accepted_node=node)

    def select(self, rows: torch.Tensor) -> None:
        self.conv_state = self.conv_state.index_select(0, rows)
        self.ssm_state = self.ssm_state.index_select(0, rows)


class AttentionCache:
    """Per-layer KV cache: k, v (B, Hkv, S, Dh). ``truncate(S)`` rolls back rejected tokens."""

    def __init__(self):
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.pending_len: Optional[int] = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor):
        if self.k is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def truncate(self, length: int) -> None:
        if self.k is not None and self.k.shape[2] > length:
            self.k = self.k[:, :, :length]
            self.v = self.v[:, :, :length]

    def commit(self, num_kept: int) -> None:
        """Keep the first num_kept positions of the last verify pass (same for every row)."""
        start, self.pending_len = self.pending_len, None
        self.truncate(start + int(num_kept))

    def commit_tree(self, path: torch.Tensor) -> None:
        """Keep, after the cached prefix, the entries of the tree nodes path (B, m) of the last
        verify pass (each row its own nodes, in order)."""
        start, self.pending_len = self.pending_len, None
        idx = (start + path.to(self.k.device).long())[:, None, :, None]
        idx = idx.expand(self.k.shape[0], self.k.shape[1], path.shape[1], self.k.shape[3])
        self.k = torch.cat([self.k[:, :, :start], torch.gather(self.k, 2, idx)], 2)
        self.v = torch.cat([self.v[:, :, :start], torch.gather(self.v, 2, idx)], 2)

    def select(self, rows: torch.Tensor) -> None:
        if self.k is not None:
            self.k = self.k.index_select(0, rows)
            self.v = self.v.index_select(0, rows)


# ---------------------------------------------------------------------------------------------
# mixers


class MambaMixer(nn.Module):
    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads = c.mamba_num_heads
        self.head_dim = c.mamba_head_dim
        self.n_groups = c.n_groups
        self.ssm_state_size = c.ssm_state_size
        self.conv_kernel_size = c.conv_kernel
        self.intermediate_size = c.mamba_num_heads * c.mamba_head_dim
        self.conv_dim = self.intermediate_size + 2 * self.n_groups * self.ssm_state_size
        self.chunk_size = c.chunk_size
        # transformers 5.x clamps dt' from below at time_step_min (docs/decisions.md).
        self.dt_limit = (float(c.time_step_min), float("inf"))
        self.in_proj = nn.Linear(c.hidden_size, self.intermediate_size + self.conv_dim + self.num_heads, bias=c.use_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel_size=c.conv_kernel, groups=self.conv_dim,
                                padding=c.conv_kernel - 1, bias=c.use_conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = RMSNormGated(self.intermediate_size, eps=c.layer_norm_epsilon,
                                 group_size=self.intermediate_size // self.n_groups, norm_before_gate=False)
        self.out_proj = nn.Linear(self.intermediate_size, c.hidden_size, bias=c.use_bias)
        self._config = c
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        c = self._config
        self.A_log.copy_(torch.log(torch.arange(1, self.num_heads + 1, dtype=torch.float32)))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(c.time_step_max) - math.log(c.time_step_min))
                       + math.log(c.time_step_min)).clamp(min=c.time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _split_xbc(self, xbc: torch.Tensor):
        """xbc (..., conv_dim) -> x (..., H, P), B, C (..., G, N)."""
        I, GN = self.intermediate_size, self.n_groups * self.ssm_state_size
        x, B, C = torch.split(xbc, [I, GN, GN], dim=-1)
        lead = xbc.shape[:-1]
        return (x.reshape(*lead, self.num_heads, self.head_dim),
                B.reshape(*lead, self.n_groups, self.ssm_state_size),
                C.reshape(*lead, self.n_groups, self.ssm_state_size))

    def _dt_eff(self, dt: torch.Tensor) -> torch.Tensor:
        """softplus(dt + dt_bias) clamped to dt_limit, float32 (the decode kernels take it
        precomputed so they apply the same clamp as the chunked scan)."""
        return F.softplus(dt.float() + self.dt_bias.float()).clamp(min=self.dt_limit[0], max=self.dt_limit[1])

    def forward(self, hidden: torch.Tensor, cache: Optional[MambaCache] = None, verify: bool = False,
                parents: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, L, _ = hidden.shape
        verify = verify or parents is not None
        proj = self.in_proj(hidden)
        gate, xbc, dt = torch.split(proj, [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        A = -torch.exp(self.A_log.float())
        w = self.conv1d.weight.squeeze(1)
        bias = self.conv1d.bias
        if cache is not None and (verify or (L == 1 and cache.conv_state is not None)):
            y = self._step(xbc, dt, A, w, bias, cache, verify, parents)
        else:
            init_conv = cache.conv_state if cache is not None else None
            init_ssm = cache.ssm_state if cache is not None else None
            xt = xbc.transpose(1, 2)
            if cache is not None:
                if init_conv is not None:
                    init_conv = init_conv.to(xt.dtype)
                xc, conv_final = causal_conv1d_fn(xt, w.to(xt.dtype), None if bias is None else bias.to(xt.dtype),
                                                  initial_states=init_conv, return_final_states=True,
                                                  activation="silu")
                cache.conv_state = conv_final.contiguous()
            else:
                xc = causal_conv1d_fn(xt, w.to(xt.dtype), None if bias is None else bias.to(xt.dtype),
                                      activation="silu")
            x, B, C = self._split_xbc(xc.transpose(1, 2))
            res = mamba_chunk_scan_combined(x, dt, A, B, C, self.chunk_size, D=self.D, dt_bias=self.dt_bias,
                                            initial_states=init_ssm, dt_softplus=True, dt_limit=self.dt_limit,
                                            return_final_states=cache is not None)
            if cache is not None:
                y, cache.ssm_state = res
            else:
                y = res
            y = y.reshape(b, L, self.intermediate_size)
        y = self.norm(y, gate)
        return self.out_proj(y.to(hidden.dtype))

    def forward_packed(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, conv_states: Optional[torch.Tensor] = None,
                       ssm_states: Optional[torch.Tensor] = None):
        """Prefill of S packed sequences (serving): hidden (1, T, D), sequence s at positions
        cu_seqlens[s]..cu_seqlens[s+1]-1, starting from conv_states[s] (S, conv_dim, K - 1) and
        ssm_states[s] (S, H, P, N) float32 (zeros where None). Same math as forward's prefill.
        Returns out (1, T, D), conv_final (S, conv_dim, K - 1) in the activations' dtype and
        ssm_final (S, H, P, N) float32: each sequence's state after its last token."""
        if hidden.dim() != 3 or hidden.shape[0] != 1:
            raise ValueError(f"MambaMixer.forward_packed: hidden must be (1, T, D), got {tuple(hidden.shape)}")
        T = hidden.shape[1]
        cu = cu_seqlens.to(device=hidden.device, dtype=torch.int32)
        proj = self.in_proj(hidden)
        gate, xbc, dt = torch.split(proj, [self.intermediate_size, self.conv_dim, self.num_heads], dim=-1)
        A = -torch.exp(self.A_log.float())
        xt = xbc.transpose(1, 2)
        w = self.conv1d.weight.squeeze(1).to(xt.dtype)
        bias = None if self.conv1d.bias is None else self.conv1d.bias.to(xt.dtype)
        init_conv = None if conv_states is None else conv_states.to(xt.dtype)
        xc, conv_final = causal_conv1d_fn(xt, w, bias, cu_seqlens=cu, initial_states=init_conv,
                                          return_final_states=True, activation="silu")
        x, B, C = self._split_xbc(xc.transpose(1, 2))
        init_ssm = None if ssm_states is None else ssm_states.float()
        y, ssm_final = mamba_chunk_scan_combined(x, dt, A, B, C, self.chunk_size, D=self.D, dt_bias=self.dt_bias,
                                                 initial_states=init_ssm, cu_seqlens=cu, dt_softplus=True,
                                                 dt_limit=self.dt_limit, return_varlen_states=True)
        y = self.norm(y.reshape(1, T, self.intermediate_size), gate)
        return self.out_proj(y.to(hidden.dtype)), conv_final.contiguous(), ssm_final

    @torch.no_grad()
    def _step(self, xbc, dt, A, w, bias, cache: MambaCache, verify: bool, parents: Optional[torch.Tensor] = None):
        b, T, _ = xbc.shape
        H, P, N = self.num_heads, self.head_dim, self.ssm_state_size
        xt = xbc.transpose(1, 2)
        wd = w.to(xt.dtype)
        bd = None if bias is None else bias.to(xt.dtype)
        conv_state = cache.conv_state.to(xt.dtype)
        if parents is not None:  # a draft tree: the conv state is only read (commit_conv_state advances it)
            if cache.replay:
                raise ValueError("MambaMixer: tree verification needs ssm_commit='snapshots' (replay takes chains)")
            xt = xt.contiguous()
            xc = causal_conv1d_update(xt, conv_state, wd, bd, activation="silu", parents=parents)
        elif verify:
            xcat = torch.cat([conv_state, xt], dim=-1)
            xc = causal_conv1d_update(xt.contiguous(), conv_state.clone(), wd, bd, activation="silu")
        else:
            xc = causal_conv1d_update(xt[:, :, 0].contiguous(), conv_state, wd, bd, activation="silu")[:, :, None]
            cache.conv_state = conv_state
        x, B, C = self._split_xbc(xc.transpose(1, 2))               # (b, T, H, P), (b, T, G, N)
        dte = self._dt_eff(dt)[..., None].expand(b, T, H, P)           # (b, T, H, P) float32
        Ae = A[:, None, None].expand(H, P, N)
        De = self.D.float()[:, None].expand(H, P)
        if parents is not None:  # node t continues from its parent's state (-1: the cached one)
            y, inter = selective_state_update_multi(cache.ssm_state, x, dte, Ae, B, C, De, parents=parents)
            cache.pending = ("tree", xt, parents, inter)
        elif verify and cache.replay:  # outputs only; the commit re-runs the kept tokens
            y = torch.ops.nemokernels.selective_state_update_multi(cache.ssm_state, x, dte, Ae, B, C, De, None, None,
                                                                   False, None, None)
            cache.pending = (xcat, ("replay", x, dte, Ae, B, C))
        elif verify:
            y, inter = selective_state_update_multi(cache.ssm_state, x, dte, Ae, B, C, De)
            cache.pending = (xcat, inter)
        else:
            y = selective_state_update(cache.ssm_state, x[:, 0], dte[:, 0], Ae, B[:, 0], C[:, 0], De)
            y = y[:, None]
        return y.reshape(b, T, self.intermediate_size)


def tree_ancestors(parents: torch.Tensor) -> torch.Tensor:
    """(B, T, T) bool: [b, t, u] when node u is on the root-to-t path of the draft tree parents
    (B, T) (u == t included; parents precede their children, -1 at a root)."""
    B, T = parents.shape
    anc = torch.eye(T, dtype=torch.bool, device=parents.device).expand(B, T, T).clone()
    for t in range(1, T):
        p = parents[:, t].long()
        has = p >= 0
        row = anc[torch.arange(B, device=parents.device), p.clamp(min=0)] & has[:, None]
        anc[:, t] |= row
    return anc


class Attention(nn.Module):
    """Grouped-query attention, no positional embedding (Nemotron-H), SDPA, optional KV cache."""

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        c = config
        self.layer_idx = layer_idx
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.num_heads * self.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.num_kv_heads * self.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, hidden: torch.Tensor, cache: Optional[AttentionCache] = None, verify: bool = False,
                parents: Optional[torch.Tensor] = None):
        b, L, _ = hidden.shape
        verify = verify or parents is not None
        q = self.q_proj(hidden).view(b, L, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(b, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(b, L, self.num_kv_heads, self.head_dim).transpose(1, 2)
        past = 0
        if cache is not None:
            past = cache.length
            if verify:
                cache.pending_len = past
            k, v = cache.append(k, v)
        if parents is not None:  # a draft tree: node t sees the cache and its own root-to-t path
            mask = torch.cat([torch.ones(b, L, past, dtype=torch.bool, device=q.device), tree_ancestors(parents)], 2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], enable_gqa=True)
        elif past == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif L == 1:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:  # queries at positions past..past+L-1 over keys 0..past+L-1
            S = k.shape[2]
            mask = torch.arange(S, device=q.device)[None, :] <= (past + torch.arange(L, device=q.device))[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, L, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """Dense non-gated MLP: down(relu(up(x))^2)."""

    def __init__(self, config, intermediate_size: Optional[int] = None, layer_idx: int = 0):
        super().__init__()
        f = intermediate_size or config.intermediate_size
        self.up_proj = nn.Linear(config.hidden_size, f, bias=config.mlp_bias)
        self.down_proj = nn.Linear(f, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)).square())


def make_mixer(kind: str, config, layer_idx: int) -> nn.Module:
    if kind == "mamba":
        return MambaMixer(config, layer_idx)
    if kind == "attention":
        return Attention(config, layer_idx)
    if kind == "mlp":
        return MLP(config, layer_idx=layer_idx)
    if kind == "moe":
        return LatentMoE.from_config(config)
    raise ValueError(f"unknown layer kind {kind!r}")


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)) (transformers' NemotronHBlock)."""

    def __init__(self, config, kind: str, layer_idx: int):
        super().__init__()
        self.kind = kind
        self.layer_idx = layer_idx
        self.norm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mixer = make_mixer(kind, config, layer_idx)

    def new_cache(self):
        if self.kind == "mamba":
            return MambaCache()
        if self.kind == "attention":
            return AttentionCache()
        return None

    def forward(self, x: torch.Tensor, cache=None, verify: bool = False, parents=None) -> torch.Tensor:
        h = self.norm(x)
        if self.kind in ("mamba", "attention"):
            h = self.mixer(h, cache=cache, verify=verify, parents=parents)
        else:
            h = self.mixer(h)
        return x + h


class MTPBlock(Block):
    """A block of an MTP step (``mtp.layers.{i}``): the step's first block also holds ``enorm``,
    ``hnorm`` and ``eh_proj`` (2d -> d), its last ``final_layernorm``."""

    def __init__(self, config, kind: str, layer_idx: int, first: bool, last: bool):
        super().__init__(config, kind, layer_idx)
        self.first, self.last = first, last
        if first:
            self.enorm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
            self.hnorm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
            self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        if last:
            self.final_layernorm = RMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)
