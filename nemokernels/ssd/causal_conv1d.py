"""causal_conv1d: drop-ins for the causal-conv1d package's `causal_conv1d_fn` and
`causal_conv1d_update` (the Mamba-2 mixer's short depthwise convolution), the update also over
a tree of draft tokens, and `commit_conv_state` for the accepted node of such a draft.

Shapes: x (batch, dim, seqlen), any strides (channel-last x, i.e. x.stride(1) == 1, gives a
channel-last output and takes the fastest CUDA path); weight (dim, width), width 2..4;
bias (dim,); seq_idx (batch, seqlen) int32 (packed sequences: taps never cross a change of
id); initial_states / final states (batch, dim, width - 1). float32 / float16 / bfloat16 inputs,
float32 accumulation. Schemas: csrc/ssd/ssd_ops.cpp; kernels: csrc/ssd/causal_conv1d_*.
"""
from typing import Optional

import torch

from .ssd_chunk_scan import seq_idx_from_cu_seqlens
from .state_update import _commit_rows

_ops = torch.ops.nemokernels


def _bcl_empty(like: torch.Tensor, b: int, c: int, l: int) -> torch.Tensor:
    # Mirrors empty_bcl in csrc/common/tensor_utils.h: channel-last in, channel-last out.
    if like.dim() == 3 and like.stride(1) == 1 and c > 1:
        return like.new_empty((b, l, c)).transpose(1, 2)
    return like.new_empty((b, c, l))


@torch.library.register_fake("nemokernels::causal_conv1d_fwd")
def _fwd_fake(x, weight, bias, seq_idx, initial_states, return_final_states, silu):
    b, c, l = x.shape
    w = weight.shape[1]
    return _bcl_empty(x, b, c, l), x.new_empty((b if return_final_states else 0, c, w - 1))


@torch.library.register_fake("nemokernels::causal_conv1d_bwd")
def _bwd_fake(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, return_dinitial_states, silu):
    b, c, l = x.shape
    w = weight.shape[1]
    dbias = bias.new_empty((c,)) if bias is not None else x.new_empty((0,), dtype=torch.float32)
    return (
        _bcl_empty(x, b, c, l),
        weight.new_empty((c, w)),
        dbias,
        x.new_empty((b if return_dinitial_states else 0, c, w - 1)),
    )


@torch.library.register_fake("nemokernels::causal_conv1d_update")
def _update_fake(x, conv_state, weight, bias, silu, conv_state_indices, parents=None):
    return x.new_empty(x.shape)


def _fwd_setup(ctx, inputs, output):
    x, weight, bias, seq_idx, initial_states, return_final_states, silu = inputs
    ctx.save_for_backward(x, weight, bias, seq_idx, initial_states)
    ctx.silu = silu
    ctx.has_init = initial_states is not None


def _fwd_backward(ctx, dout, dfinal):
    x, weight, bias, seq_idx, initial_states = ctx.saved_tensors
    if dfinal is not None and dfinal.shape[0] != x.shape[0]:
        dfinal = None  # final states were not returned (the output is an empty placeholder)
    dx, dweight, dbias, dinit = _ops.causal_conv1d_bwd(
        x, weight, bias, dout, seq_idx, initial_states, dfinal,
        ctx.has_init and ctx.needs_input_grad[4], ctx.silu)
    return (dx, dweight, dbias if bias is not None else None, None,
            dinit if ctx.has_init and ctx.needs_input_grad[4] else None, None, None)


torch.library.register_autograd("nemokernels::causal_conv1d_fwd", _fwd_backward, setup_context=_fwd_setup)


def _silu_flag(activation: Optional[str]) -> bool:
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d: activation must be None, 'silu' or 'swish', got {activation!r}")
    return activation is not None


def causal_conv1d_fn(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
    final_states_out: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """Causal depthwise conv1d, optionally followed by SiLU.

    out[b, c, t] = act(bias[c] + sum_k weight[c, k] * x[b, c, t - (width-1) + k]), where
    positions before 0 read ``initial_states`` (zeros when None) and, with ``seq_idx``, taps
    from another sequence of the packed row read zero.

    Returns ``out`` (batch, dim, seqlen) in x's dtype, and with ``return_final_states`` also
    the last ``width - 1`` input columns (batch, dim, width - 1), written into
    ``final_states_out`` when given. Differentiable in x, weight, bias and initial_states.

    ``seq_idx`` may hold any int32 values (they are only compared for equality, on every
    device). With ``seq_idx``, ``initial_states`` and ``return_final_states`` are refused (a
    packed row starts from zero state and its final state mixes sequences). Limits: none on
    the CPU or on CUDA (the CUDA grid is a flat index over 64x64 tiles), any batch and length.

    Packed sequences with a state each (serving prefill; ours): ``cu_seqlens`` (S + 1,) int with
    x (1, dim, L): sequence s is positions cu_seqlens[s]..cu_seqlens[s+1]-1 and its taps before
    its start read ``initial_states[s]`` (S, dim, width - 1) (zeros when None);
    ``return_final_states`` gives (S, dim, width - 1), the last width - 1 inputs of each
    sequence (reaching into its initial state when it is shorter). Differentiable in every row
    of initial_states. The packed conv runs in the kernel; the initial-state taps and the final
    states are fixed-shape PyTorch gathers around it (no host sync), so with initial_states the
    SiLU is applied after them (16-bit outputs then round twice more than the fused path).
    cu_seqlens must start at 0, not decrease and end at L (checked on the CPU; on CUDA bounds
    are clamped, memory-safe).
    """
    silu = _silu_flag(activation)
    if cu_seqlens is not None:
        return _packed_with_states(x, weight, bias, seq_idx, initial_states, return_final_states, final_states_out,
                                   silu, cu_seqlens)
    if seq_idx is not None and seq_idx.dtype != torch.int32:
        seq_idx = seq_idx.to(torch.int32)
    out, final_states = _ops.causal_conv1d_fwd(x, weight, bias, seq_idx, initial_states,
                                               return_final_states, silu)
    if not return_final_states:
        return out
    if final_states_out is not None:
        final_states_out.copy_(final_states)
        final_states = final_states_out
    return out, final_states


def _packed_with_states(x, weight, bias, seq_idx, initial_states, return_final_states, final_states_out, silu,
                        cu_seqlens):
    """causal_conv1d_fn with cu_seqlens: the kernel's packed conv (zero state at every sequence
    start), plus each sequence's initial-state taps, plus per-sequence final states."""
    op = "causal_conv1d_fn"
    if x.dim() != 3 or x.shape[0] != 1:
        raise ValueError(f"{op}: cu_seqlens needs x of batch 1 (packed sequences), got {tuple(x.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{op}: cu_seqlens must be (num_sequences + 1,), got {tuple(cu_seqlens.shape)}")
    dim, L = x.shape[1], x.shape[2]
    W, S = weight.shape[-1], cu_seqlens.numel() - 1
    if initial_states is not None and tuple(initial_states.shape) != (S, dim, W - 1):
        raise ValueError(f"{op}: with cu_seqlens, initial_states must be (num_sequences, dim, width - 1) = "
                         f"({S}, {dim}, {W - 1}), got {tuple(initial_states.shape)}")
    cu = cu_seqlens.to(device=x.device, dtype=torch.long)
    if x.device.type == "cpu":
        torch._assert_async((cu[0] == 0) & (cu[-1] == L) & (cu[1:] >= cu[:-1]).all(),
                            f"{op}: cu_seqlens must start at 0, not decrease and end at seqlen = {L}")
    cu = cu.clamp(0, L)
    if seq_idx is None:
        seq_idx = seq_idx_from_cu_seqlens(cu.to(torch.int32), L)
    seq_idx = seq_idx.to(torch.int32)
    fused = initial_states is None and silu
    out, _ = _ops.causal_conv1d_fwd(x, weight, bias, seq_idx, None, False, fused)
    j = torch.arange(W - 1, device=x.device)
    start, length = cu[:-1], cu[1:] - cu[:-1]
    if initial_states is not None and L > 0 and S > 0:
        # Output start + j of a sequence misses the taps k < W - 1 - j, which read init[:, :, j + k].
        init = initial_states.to(out.dtype)
        w = weight.to(out.dtype)
        corr = torch.stack([sum(w[:, k] * init[:, :, jj + k] for k in range(W - 1 - jj)) for jj in range(W - 1)], -1)
        valid = (j[None, :] < length[:, None])                                    # (S, W - 1)
        pos = (start[:, None] + j[None, :]).clamp(max=L - 1)
        src = (corr * valid[:, None, :]).permute(1, 0, 2).reshape(dim, -1)
        out = out[0].index_add(1, pos.reshape(-1), src)[None]
    if initial_states is not None and silu:
        out = torch.nn.functional.silu(out)
    if not return_final_states:
        return out
    # Input end - (W - 1) + m of each sequence: x when inside it, else its initial state.
    pos = cu[1:, None] - (W - 1) + j[None, :]                                     # (S, W - 1)
    from_x = pos >= start[:, None]
    fin = x[0][:, pos.clamp(0, max(L - 1, 0)).reshape(-1)].reshape(dim, S, W - 1).permute(1, 0, 2) if L > 0 \
        else x.new_zeros((S, dim, W - 1))
    if initial_states is not None:
        col = (pos - start[:, None] + (W - 1)).clamp(0, W - 2)
        prior = initial_states.to(x.dtype).gather(2, col[:, None, :].expand(S, dim, W - 1))
    else:
        prior = torch.zeros_like(fin)
    fin = torch.where(from_x[:, None, :], fin, prior)
    if final_states_out is not None:
        final_states_out.copy_(fin)
        fin = final_states_out
    return out, fin


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    conv_state_indices: Optional[torch.Tensor] = None,
    parents: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One decode step (or a few tokens) of the causal conv, updating ``conv_state`` in place.

    x: (batch, dim) or (batch, dim, seqlen); conv_state: (state_batch, dim, state_len) with
    state_len >= width - 1, in x's dtype; conv_state_indices: (batch,) int32 row of
    conv_state for each batch entry (negative: padded slot, state untouched, output zero).
    Returns the output, shaped like x. The state afterwards holds the last state_len inputs.
    A decode step: not differentiable (torch warns if a backward reaches it).

    Refused on every device (host-side checks of pointers and strides, no sync): a
    ``conv_state`` that is an expanded view (stride 0) or whose elements overlap, and a
    ``conv_state`` that shares memory with x, weight, bias or conv_state_indices.
    CPU-only checks (they read the index values, which on CUDA would need a host sync): an
    index >= conv_state.shape[0] raises, and so does a row held by two entries (padded
    entries, i.e. negative indices, may repeat). On CUDA the kernel stays memory-safe for any
    values instead: an out-of-range index gives NaN outputs for that entry and touches no
    state; entries sharing a row stay in bounds but race on it (the row's result is
    unspecified), so keep non-negative indices distinct. CUDA limit: batch <= 65535.

    Tree drafts: ``parents`` (batch, seqlen) int (the ``parents`` of `verify_tree_greedy`, as
    for `selective_state_update_multi`): token t's window is its input after those of its
    width - 1 nearest ancestors, continuing into ``conv_state`` above a node whose parent is -1;
    a parent precedes its children. ``conv_state`` is then only read (a tree has no single last
    input): after verification, `commit_conv_state` moves it to the accepted node. A parent out
    of range raises on the CPU; on CUDA (no host sync) every window that meets one is NaN.
    """
    silu = _silu_flag(activation)
    if conv_state_indices is not None and conv_state_indices.dtype != torch.int32:
        conv_state_indices = conv_state_indices.to(torch.int32)
    if parents is not None and parents.dtype != torch.int32:
        parents = parents.to(torch.int32)
    return _ops.causal_conv1d_update(x, conv_state, weight, bias, silu, conv_state_indices, parents)


def commit_conv_state(
    conv_state: torch.Tensor,
    x: torch.Tensor,
    accepted_node: torch.Tensor,
    parents: Optional[torch.Tensor] = None,
    conv_state_indices: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Advances ``conv_state`` in place to the last accepted node of a draft step.

    x (batch, dim, T): the inputs of that step's `causal_conv1d_update(..., parents=parents)`
    (which left ``conv_state`` as it was); parents (batch, T), or None for a chain (token t
    follows t - 1); accepted_node (batch,): the last accepted node of each entry (-1: none, the
    row is kept). Row r = conv_state_indices[b] (or b) becomes the last state_len inputs of
    cat(conv_state[r], x[b, :, root-to-node path]), i.e. what in-place updates along the
    accepted path would have left. Pure PyTorch, no host sync, fixed shapes (CUDA-graph and
    torch.compile safe). Rows as in `commit_state` (negative: padded, skipped). On the CPU a
    node outside [-1, T) or a parent outside [-1, t) raises; on CUDA both are clamped into range
    (memory-safe, the result for such an entry is unspecified). Returns ``conv_state``.
    """
    op = "commit_conv_state"
    if x.dim() != 3:
        raise ValueError(f"{op}: x must be (batch, dim, T), got {tuple(x.shape)}")
    batch, dim, T = x.shape
    if conv_state.dim() != 3 or conv_state.shape[1] != dim:
        raise ValueError(f"{op}: conv_state must be (rows, dim = {dim}, state_len), got {tuple(conv_state.shape)}")
    if accepted_node.shape != (batch,):
        raise ValueError(f"{op}: accepted_node must have shape ({batch},), got {tuple(accepted_node.shape)}")
    if parents is not None and parents.shape != (batch, T):
        raise ValueError(f"{op}: parents must have shape ({batch}, {T}), got {tuple(parents.shape)}")
    L = conv_state.shape[2]
    dev = conv_state.device
    steps = torch.arange(T, device=dev)
    par = (steps - 1).expand(batch, T) if parents is None else parents.to(device=dev, dtype=torch.long)
    node = accepted_node.to(device=dev, dtype=torch.long)
    if dev.type == "cpu":
        torch._assert_async(((node >= -1) & (node < T)).all(), f"{op}: accepted_node must be in [-1, T = {T})")
        torch._assert_async(((par >= -1) & (par < steps)).all(),
                            f"{op}: parents[b, t] must be in [-1, t) (parents precede their children)")
    node = node.clamp(-1, T - 1)
    par = torch.minimum(par.clamp(min=-1), steps - 1)
    if T == 0 or L == 0:
        node = torch.full_like(node, -1)

    def new_rows(src, target):
        # positions in cat(old row, x): node t >= 0 at L + t, -m (the m-th input before the
        # tree) at L - m; the path walks up the parents, then back through the old row.
        cat = torch.cat([conv_state[target], x[src].to(conv_state.dtype)], dim=2)
        cur, p_src, pos = node[src], par[src], []
        for _ in range(L):
            pos.append(cur + L)
            up = p_src.gather(1, cur.clamp(min=0)[:, None])[:, 0] if T > 0 else cur
            cur = torch.where(cur >= 0, up, cur - 1)
        idx = torch.stack(pos[::-1], dim=1) if L > 0 else cur.new_zeros(batch, 0)
        return torch.ones_like(cur, dtype=torch.bool), cat.gather(2, idx[:, None, :].expand(batch, dim, L))

    return _commit_rows(op, "conv_state", conv_state, batch, conv_state_indices, new_rows)
