"""Pure-PyTorch references: the oracle every kernel is tested against.

Written for clarity, not speed, with no code shared with the kernels; they run in any dtype
including float64 (tests upcast inputs to float64 and compare by relative norm error).
"""
from typing import Optional

import torch
import torch.nn.functional as F


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    return_final_states: bool = False,
    activation: Optional[str] = None,
):
    """out[b,c,t] = act(bias[c] + sum_k w[c,k] * xx[b,c,t+k]), xx = cat(initial_states, x)."""
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    if initial_states is None:
        initial_states = x.new_zeros((batch, dim, width - 1))
    xx = torch.cat([initial_states.to(x.dtype), x], dim=-1)  # (b, c, L + W - 1)
    y = torch.zeros_like(x) if bias is None else bias.to(x.dtype)[None, :, None].expand_as(x).clone()
    for k in range(width):
        tap = xx[..., k:k + seqlen]
        if seq_idx is not None:
            # Tap k reads position t - (W-1) + k; it must belong to t's sequence.
            shift = width - 1 - k
            src = F.pad(seq_idx, (shift, 0), value=-(2**30))[:, :seqlen]
            tap = tap * (src == seq_idx)[:, None, :].to(x.dtype)
        y = y + weight[:, k].to(x.dtype)[None, :, None] * tap
    out = F.silu(y) if activation in ("silu", "swish") else y
    if return_final_states:
        return out, xx[..., xx.shape[-1] - (width - 1):]
    return out


def causal_conv1d_update_ref(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    conv_state_indices: Optional[torch.Tensor] = None,
):
    """Returns (out, new_conv_state); conv_state itself is not modified."""
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)
    batch, dim, seqlen = x.shape
    width = weight.shape[1]
    state_len = conv_state.shape[-1]
    new_state = conv_state.clone()
    idx = torch.arange(batch, device=x.device) if conv_state_indices is None else conv_state_indices.long()
    out = torch.zeros_like(x)
    for b in range(batch):
        s = int(idx[b])
        if s < 0:
            continue
        xx = torch.cat([conv_state[s].to(x.dtype), x[b]], dim=-1)  # (dim, state_len + seqlen)
        for t in range(seqlen):
            win = xx[:, state_len + t - (width - 1): state_len + t + 1]
            y = (win * weight.to(x.dtype)).sum(-1)
            if bias is not None:
                y = y + bias.to(x.dtype)
            out[b, :, t] = F.silu(y) if activation in ("silu", "swish") else y
        new_state[s] = xx[:, -state_len:].to(conv_state.dtype)
    return (out.squeeze(-1) if squeeze else out), new_state
