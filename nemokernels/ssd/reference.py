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


# ------------------------------------------------------------------ Mamba-2 SSD (DESIGN 4.1)
#
# Two references for mamba_ssm's `mamba_chunk_scan_combined`, written independently of each
# other so that they check each other: `ssd_scan_ref` runs the recurrence one position at a
# time; `ssd_chunked_ref` runs the chunked SSD decomposition that the kernels implement.
#
# Sequence boundaries (seq_idx) and initial_states, as in mamba_ssm (read in
# state-spaces/mamba, mamba_ssm/ops/triton/ssd_combined.py `_mamba_chunk_scan_combined_fwd`,
# which passes initial_states and seq_idx unchanged to the kernels of ssd_state_passing.py
# `_state_passing_fwd_kernel` and ssd_chunk_scan.py `_chunk_scan_fwd_kernel`; it asserts
# nothing about the combination):
#   * both kernels start from a "previous sequence id" of 0 (`seq_idx = 0` before the chunk
#     loop in state passing; `seq_idx_prev = tl.load(..., mask=pid_c >= 1, other=0)` in the
#     chunk scan). initial_states therefore act as the state of a sequence with id 0 that ends
#     just before position 0: they flow into row b's first sequence when seq_idx[b, 0] == 0,
#     and are dropped (the state starts from zero) when seq_idx[b, 0] != 0.
#   * the state is reset wherever seq_idx[t] != seq_idx[t-1]; the kernels test this with
#     equality against the last id of the previous chunk, which means "no boundary between
#     them" only when ids never decrease along a row. mamba_ssm's chunk-state kernel also
#     drops the contribution of a chunk whose last id is negative. Both references therefore
#     require seq_idx non-negative and non-decreasing (what packed batches give) and raise
#     otherwise.
#   * return_varlen_states (batch 1, cu_seqlens) returns the state after the last position of
#     each packed sequence (ssd_chunk_state.py `chunk_state_varlen`). mamba_ssm adds the state
#     carried into the sequence's last chunk only when the sequence started before that chunk
#     (`start_idx < pid_c * chunk_size`), so the first sequence does not see initial_states
#     when it ends inside chunk 0 but does when it is longer: a chunk-size dependence. Here the
#     first sequence always starts from initial_states (when seq_idx[0] == 0), as in the
#     recurrence. mamba_ssm reads out of bounds for empty sequences; here they get zeros.
#
# Precision: the math runs in float64 when any floating input is float64, else in float32
# (the kernels keep states and accumulators in float32 for fp16/bf16/fp32 inputs). y comes
# back in x's dtype; final and varlen states in the compute dtype.


def varlen_from_cu_seqlens(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """seq_idx (1, seqlen) int32 for packed sequences: position t gets the index i of the
    sequence with cu_seqlens[i] <= t < cu_seqlens[i+1].

    cu_seqlens: (n_seq + 1,) int, non-decreasing, cu_seqlens[0] == 0 and cu_seqlens[-1] ==
    seqlen. Empty sequences are allowed; their index appears nowhere.
    """
    cu = cu_seqlens.to(torch.int64).cpu()
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or int(cu[-1]) != seqlen:
        raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at seqlen={seqlen}, got {cu.tolist()}")
    if bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}")
    t = torch.arange(seqlen)
    seq_idx = torch.searchsorted(cu[1:], t, right=True)  # number of sequence ends <= t
    return seq_idx.to(torch.int32).unsqueeze(0).to(cu_seqlens.device)


def _ssd_check(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, return_varlen_states):
    """Shape checks shared by the two SSD references (validation only, no math)."""
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got {tuple(x.shape)}")
    batch, seqlen, nheads, headdim = x.shape
    if B.dim() != 4:
        raise ValueError(f"B must be (batch, seqlen, ngroups, dstate), got {tuple(B.shape)}")
    ngroups, dstate = B.shape[2], B.shape[3]
    if nheads % ngroups != 0:
        raise ValueError(f"nheads={nheads} must be a multiple of ngroups={ngroups}")
    expect = {
        "dt": (dt, (batch, seqlen, nheads)), "A": (A, (nheads,)),
        "B": (B, (batch, seqlen, ngroups, dstate)), "C": (C, (batch, seqlen, ngroups, dstate)),
        "z": (z, tuple(x.shape)), "dt_bias": (dt_bias, (nheads,)),
        "initial_states": (initial_states, (batch, nheads, headdim, dstate)),
        "seq_idx": (seq_idx, (batch, seqlen)),
    }
    for name, (t, shape) in expect.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if D is not None and tuple(D.shape) not in ((nheads,), (nheads, headdim)):
        raise ValueError(f"D must be ({nheads},) or ({nheads}, {headdim}), got {tuple(D.shape)}")
    if seq_idx is not None and seqlen > 0:
        if bool((seq_idx < 0).any()) or bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
            raise ValueError("seq_idx must be non-negative and non-decreasing along each row")
    if return_varlen_states:
        if cu_seqlens is None:
            raise ValueError("return_varlen_states needs cu_seqlens")
        if batch != 1:
            raise ValueError(f"return_varlen_states needs batch 1 (packed sequences), got {batch}")
        if seq_idx is None:
            raise ValueError("return_varlen_states needs seq_idx (varlen_from_cu_seqlens) so that "
                             "the state resets between the packed sequences")
        cu = cu_seqlens.to(torch.int64).cpu()
        if cu.dim() != 1 or int(cu[0]) != 0 or int(cu[-1]) != seqlen or bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must be non-decreasing from 0 to seqlen={seqlen}, got {cu.tolist()}")
        starts = torch.zeros(seqlen, dtype=torch.bool)
        starts[cu[1:-1][cu[1:-1] < seqlen]] = True
        changes = torch.zeros(seqlen, dtype=torch.bool)
        changes[1:] = (seq_idx[0, 1:] != seq_idx[0, :-1]).cpu()
        if not torch.equal(starts[1:], changes[1:]):
            raise ValueError("seq_idx must change exactly where cu_seqlens starts a new sequence")


def _ssd_compute_dtype(*ts):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in ts) else torch.float32


def ssd_scan_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    dt_limit=(0.0, float("inf")),
    return_final_states: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    return_varlen_states: bool = False,
):
    """Mamba-2 SSD as the plain recurrence over time, one position at a time.

    x (b, L, H, P); dt (b, L, H); A (H,); B, C (b, L, G, N), H % G == 0, head h reads group
    h // (H // G); D (H,) or (H, P); z (b, L, H, P); dt_bias (H,); initial_states
    (b, H, P, N); seq_idx (b, L) int; cu_seqlens (n_seq + 1,) int (batch 1 only).

        dt'_t = clamp(softplus?(dt_t + dt_bias), *dt_limit)    (the clamp always applies, so
                                                                 the default keeps dt' >= 0)
        h_t   = exp(dt'_t A) h_{t-1} + dt'_t x_t B_t^T         h: (b, H, P, N)
        y_t   = C_t h_t (sum over N) + D x_t;   y_t *= silu(z_t) when z is given

    h_{-1} = initial_states (zeros when None). With seq_idx, h_{t-1} is replaced by zeros
    wherever seq_idx[t] != seq_idx[t-1], with seq_idx[-1] taken as 0 (mamba_ssm: see the note
    above this function); seq_idx must be non-negative and non-decreasing.

    Returns y (b, L, H, P) in x's dtype, then final states h_{L-1} (b, H, P, N) when
    return_final_states, then varlen states (n_seq, H, P, N) when return_varlen_states: the
    state after the last position of each sequence of cu_seqlens (zeros for an empty one).
    """
    _ssd_check(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, return_varlen_states)
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    cdt = _ssd_compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states)

    # dt' (b, L, H)
    dtp = dt.to(cdt)
    if dt_bias is not None:
        dtp = dtp + dt_bias.to(cdt)
    if dt_softplus:
        dtp = F.softplus(dtp)
    dtp = dtp.clamp(min=dt_limit[0], max=dt_limit[1])

    xc = x.to(cdt)
    Ah = A.to(cdt)
    Bh = B.to(cdt).repeat_interleave(nheads // ngroups, dim=2)  # (b, L, H, N)
    Ch = C.to(cdt).repeat_interleave(nheads // ngroups, dim=2)  # (b, L, H, N)

    if initial_states is None:
        h = xc.new_zeros((batch, nheads, headdim, dstate))
    else:
        h = initial_states.to(cdt)
    prev_id = None if seq_idx is None else torch.zeros(batch, dtype=seq_idx.dtype, device=seq_idx.device)
    n_seq = cu_seqlens.numel() - 1 if return_varlen_states else 0
    seq_of_end = {}  # last position of each non-empty sequence -> its index
    if return_varlen_states:
        cu = cu_seqlens.to(torch.int64).cpu().tolist()
        seq_of_end = {cu[i + 1] - 1: i for i in range(n_seq) if cu[i + 1] > cu[i]}
    varlen = [h.new_zeros((nheads, headdim, dstate))] * n_seq

    ys = []
    for t in range(seqlen):
        if seq_idx is not None:
            same = (seq_idx[:, t] == prev_id).to(cdt)  # (b,) 0 where a new sequence starts
            h = h * same[:, None, None, None]
            prev_id = seq_idx[:, t]
        decay = torch.exp(dtp[:, t] * Ah)  # (b, H)
        h = decay[:, :, None, None] * h + (dtp[:, t, :, None, None] * xc[:, t, :, :, None]) * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))  # (b, H, P)
        if t in seq_of_end:
            varlen[seq_of_end[t]] = h[0]
    y = torch.stack(ys, dim=1) if seqlen > 0 else xc.new_zeros(x.shape)  # (b, L, H, P)

    if D is not None:
        Dc = D.to(cdt)
        y = y + (Dc[:, None] if Dc.dim() == 1 else Dc) * xc
    if z is not None:
        y = y * F.silu(z.to(cdt))

    out = [y.to(x.dtype)]
    if return_final_states:
        out.append(h)
    if return_varlen_states:
        out.append(torch.stack(varlen) if n_seq > 0 else h.new_zeros((0, nheads, headdim, dstate)))
    return out[0] if len(out) == 1 else tuple(out)


def ssd_chunked_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    initial_states: Optional[torch.Tensor] = None,
    seq_idx: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    dt_limit=(0.0, float("inf")),
    return_final_states: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    return_varlen_states: bool = False,
):
    """Mamba-2 SSD by the chunked algorithm (the decomposition the kernels run).

    Same arguments, semantics and returns as `ssd_scan_ref`, plus chunk_size (any positive
    int; the sequence is padded to a whole number of chunks with dt' = 0, which leaves the
    state unchanged). Shorthand below: b batch, L seqlen, H heads, P headdim, G groups,
    N dstate, Q = chunk_size, c = L_pad / Q chunks, i/j positions inside a chunk.

      1. dt' and dA_cumsum = cumsum_j (dt'_j A) inside each chunk
      2. CB = C B^T per group and chunk; Y_diag = (CB * causal/seq mask * decay * dt') X
      3. per-chunk end states: the inputs of each chunk decayed to its last position
      4. state passing: a sequential loop over chunks carrying the state between them
      5. Y_off = C h_prev * exp(dA_cumsum), the incoming state's contribution
      6. y = Y_diag + Y_off + D x, gated by silu(z)
    """
    _ssd_check(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, return_varlen_states)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    hpg = nheads // ngroups  # heads per group
    Q = chunk_size
    nchunks = max(1, -(-seqlen // Q))
    pad = nchunks * Q - seqlen
    cdt = _ssd_compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states)

    # ---- 1. dt' and the chunk cumsum of dt' A
    dtp = dt.to(cdt)
    if dt_bias is not None:
        dtp = dtp + dt_bias.to(cdt)
    if dt_softplus:
        dtp = F.softplus(dtp)
    dtp = dtp.clamp(min=dt_limit[0], max=dt_limit[1])
    # Pad after the dt transform so that padded positions have dt' = 0 exactly.
    dtp = F.pad(dtp, (0, 0, 0, pad))                                    # (b, L_pad, H)
    dtc = dtp.reshape(batch, nchunks, Q, nheads).permute(0, 3, 1, 2)    # dt'        (b, H, c, Q)
    dA = dtc * A.to(cdt)[None, :, None, None]                           # dt' A      (b, H, c, Q)
    dA_cumsum = torch.cumsum(dA, dim=-1)                                # inclusive  (b, H, c, Q)

    xc = F.pad(x.to(cdt), (0, 0, 0, 0, 0, pad)).reshape(batch, nchunks, Q, nheads, headdim)     # (b, c, Q, H, P)
    Bc = F.pad(B.to(cdt), (0, 0, 0, 0, 0, pad)).reshape(batch, nchunks, Q, ngroups, dstate)     # (b, c, Q, G, N)
    Cc = F.pad(C.to(cdt), (0, 0, 0, 0, 0, pad)).reshape(batch, nchunks, Q, ngroups, dstate)     # (b, c, Q, G, N)

    # Sequence ids per chunk position; padding continues the last sequence.
    if seq_idx is not None:
        sid = seq_idx.to(torch.int64)
        if pad:
            sid = torch.cat([sid, sid[:, -1:].expand(batch, pad)], dim=1)
        sid = sid.reshape(batch, nchunks, Q)                            # (b, c, Q)
        sid_last = sid[:, :, -1]                                        # id at each chunk's end (b, c)
        # id just before each chunk: the previous chunk's last id, 0 before chunk 0 (mamba_ssm)
        sid_prev = torch.cat([torch.zeros_like(sid_last[:, :1]), sid_last[:, :-1]], dim=1)  # (b, c)

    # ---- 2. intra-chunk (diagonal block) output
    CB = torch.einsum("bcign,bcjgn->bcgij", Cc, Bc)                     # C_i . B_j  (b, c, G, Q, Q)
    CB = CB.repeat_interleave(hpg, dim=2)                               # per head   (b, c, H, Q, Q)
    seg = dA_cumsum[..., :, None] - dA_cumsum[..., None, :]             # sum_{j<k<=i} dt'_k A (b, H, c, Q, Q)
    keep = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()   # j <= i
    keep = keep.expand(batch, nchunks, Q, Q)
    if seq_idx is not None:
        keep = keep & (sid[:, :, :, None] == sid[:, :, None, :])        # same sequence (b, c, Q, Q)
    keep = keep[:, None]                                                # (b, 1, c, Q, Q)
    decay = torch.exp(torch.where(keep, seg, torch.full_like(seg, float("-inf"))))  # (b, H, c, Q, Q)
    scores = CB.permute(0, 2, 1, 3, 4) * decay * dtc[:, :, :, None, :]  # CB_ij decay_ij dt'_j (b, H, c, Q, Q)
    Y_diag = torch.einsum("bhcij,bcjhp->bcihp", scores, xc)            # (b, c, Q, H, P)

    # ---- 3. chunk end states (each chunk alone, starting from zero)
    decay_states = torch.exp(dA_cumsum[..., -1:] - dA_cumsum)           # exp(sum_{j<k<=Q-1} dt'_k A) (b, H, c, Q)
    if seq_idx is not None:
        # only inputs of the sequence still running at the chunk's end survive to it
        decay_states = decay_states * (sid == sid_last[:, :, None])[:, None].to(cdt)
    Bh = Bc.repeat_interleave(hpg, dim=3)                               # (b, c, Q, H, N)
    states = torch.einsum("bhcj,bcjhn,bcjhp->bchpn", decay_states * dtc, Bh, xc)  # (b, c, H, P, N)

    # ---- 4. inter-chunk state passing (sequential over chunks)
    # prev_states[:, k] is the state entering chunk k: initial_states for k = 0, then
    # h_end(k) = exp(sum of dt' A over chunk k) * h_in(k) + states[:, k], with the carried part
    # zeroed when a new sequence starts inside chunk k (its last id differs from the id
    # before it).
    if initial_states is None:
        h = xc.new_zeros((batch, nheads, headdim, dstate))
    else:
        h = initial_states.to(cdt)
    chunk_decay = torch.exp(dA_cumsum[:, :, :, -1])                     # (b, H, c)
    prev = []
    for k in range(nchunks):
        prev.append(h)
        carry = chunk_decay[:, :, k]                                    # (b, H)
        if seq_idx is not None:
            carry = carry * (sid_last[:, k] == sid_prev[:, k]).to(cdt)[:, None]
        h = carry[:, :, None, None] * h + states[:, k]
    final_states = h                                                    # (b, H, P, N)
    prev_states = torch.stack(prev, dim=1)                              # (b, c, H, P, N)

    # ---- 5. contribution of the incoming state: y_i += exp(dA_cumsum_i) C_i h_in
    Ch = Cc.repeat_interleave(hpg, dim=3)                               # (b, c, Q, H, N)
    state_decay = torch.exp(dA_cumsum)                                  # (b, H, c, Q)
    if seq_idx is not None:
        # positions of a sequence that started inside this chunk do not see the incoming state
        state_decay = state_decay * (sid == sid_prev[:, :, None])[:, None].to(cdt)
    Y_off = torch.einsum("bcihn,bchpn,bhci->bcihp", Ch, prev_states, state_decay)  # (b, c, Q, H, P)

    # ---- 6. combine, unpad, skip connection, gate
    y = (Y_diag + Y_off).reshape(batch, nchunks * Q, nheads, headdim)[:, :seqlen]  # (b, L, H, P)
    xs = x.to(cdt)
    if D is not None:
        Dc = D.to(cdt)
        y = y + (Dc[:, None] if Dc.dim() == 1 else Dc) * xs
    if z is not None:
        y = y * F.silu(z.to(cdt))

    out = [y.to(x.dtype)]
    if return_final_states:
        out.append(final_states)
    if return_varlen_states:
        # State after the last position e of each sequence [s, e] (batch 1): the inputs of
        # the sequence inside e's chunk k decayed to e, plus the state entering chunk k decayed
        # to e when the position before chunk k belongs to the same sequence (or, for k = 0,
        # when the sequence is the one with id 0 that initial_states continue).
        cu = cu_seqlens.to(torch.int64).cpu().tolist()
        varlen = []
        for i in range(len(cu) - 1):
            s, e = cu[i], cu[i + 1] - 1
            if e < s:  # empty sequence
                varlen.append(xc.new_zeros((nheads, headdim, dstate)))
                continue
            k, ie = divmod(e, Q)
            i0 = max(s - k * Q, 0)                                      # first position of the sequence in chunk k
            # decay from each position j of the sequence in chunk k to e, times dt'_j   (H, j)
            w = torch.exp(dA_cumsum[0, :, k, ie, None] - dA_cumsum[0, :, k, i0:ie + 1]) * dtc[0, :, k, i0:ie + 1]
            st = torch.einsum("hj,jhn,jhp->hpn", w, Bh[0, k, i0:ie + 1], xc[0, k, i0:ie + 1])  # (H, P, N)
            if int(sid_prev[0, k]) == int(sid[0, k, ie]):
                st = st + torch.exp(dA_cumsum[0, :, k, ie])[:, None, None] * prev_states[0, k]
            varlen.append(st)
        out.append(torch.stack(varlen) if varlen else xc.new_zeros((0, nheads, headdim, dstate)))
    return out[0] if len(out) == 1 else tuple(out)


# ------------------------------------------------------------------ decode state updates
#
# mamba_ssm's `selective_state_update` (one decode step, in place there; here the new state is
# returned and the input left alone) and the multi-token update built as a loop of it.


def selective_state_update_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    state_batch_indices: Optional[torch.Tensor] = None,
):
    """One decode step. Returns (out, new_state); ``state`` is not modified.

    state (slots, H, P, N) or (slots, P, N); x, dt, z (b, H, P) or (b, P); A (H, P, N) or
    (P, N); B, C (b, G, N) or (b, N); D, dt_bias (H, P) or (P,). Per entry b with row
    r = state_batch_indices[b] (or b), negative r = padded slot (out 0, state untouched):

        dt' = softplus?(dt + dt_bias)                      (no clamp)
        h   = state[r] * exp(dt' A) + dt' x B              (B of head h's group)
        out = (sum_n h C + D x) * silu(z)

    The math runs in float64 when any input is float64, else float32; out has x's dtype and
    new_state state's dtype (the updated rows rounded to it).
    """
    if state.dim() == 3:  # Mamba-1 form: one head, one group
        out, new = selective_state_update_ref(
            state.unsqueeze(1), x.unsqueeze(1), dt.unsqueeze(1), A.unsqueeze(0), B.unsqueeze(1), C.unsqueeze(1),
            None if D is None else D.unsqueeze(0), None if z is None else z.unsqueeze(1),
            None if dt_bias is None else dt_bias.unsqueeze(0), dt_softplus, state_batch_indices)
        return out.squeeze(1), new.squeeze(1)
    batch, nheads, dim = x.shape
    ngroups = B.shape[1]
    if nheads % ngroups != 0:
        raise ValueError(f"nheads={nheads} must be a multiple of ngroups={ngroups}")
    cdt = _ssd_compute_dtype(state, x, dt, A, B, C, D, z, dt_bias)
    rows = torch.arange(batch) if state_batch_indices is None else state_batch_indices.long().cpu()
    valid = rows >= 0
    r = rows.clamp(min=0).to(state.device)
    dtp = dt.to(cdt)
    if dt_bias is not None:
        dtp = dtp + dt_bias.to(cdt)
    if dt_softplus:
        dtp = F.softplus(dtp)
    Bh = B.to(cdt).repeat_interleave(nheads // ngroups, dim=1)  # (b, H, N)
    Ch = C.to(cdt).repeat_interleave(nheads // ngroups, dim=1)
    h = state[r].to(cdt)  # (b, H, P, N)
    h = h * torch.exp(dtp[..., None] * A.to(cdt)) + (dtp * x.to(cdt))[..., None] * Bh[:, :, None, :]
    out = torch.einsum("bhpn,bhn->bhp", h, Ch)
    if D is not None:
        out = out + D.to(cdt) * x.to(cdt)
    if z is not None:
        out = out * F.silu(z.to(cdt))
    out = out * valid.to(device=out.device, dtype=cdt)[:, None, None]
    new_state = state.clone()
    vr = torch.nonzero(valid).flatten()
    new_state[r[vr.to(r.device)]] = h[vr.to(h.device)].to(state.dtype)
    return out.to(x.dtype), new_state


def selective_state_update_multi_ref(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    state_batch_indices: Optional[torch.Tensor] = None,
):
    """T decode steps (x, dt, z (b, T, ...); B, C (b, T, ...)) as a loop of
    `selective_state_update_ref`. Returns (out (b, T, ...), intermediate_states
    (b, T) + state.shape[1:]): the state of each entry's row after every position, zeros for a
    padded entry. ``state`` is not modified."""
    batch, T = x.shape[0], x.shape[1]
    rows = torch.arange(batch) if state_batch_indices is None else state_batch_indices.long().cpu()
    valid = rows >= 0
    r = rows.clamp(min=0)
    cur = state.clone()
    outs, snaps = [], []
    for t in range(T):
        o, cur = selective_state_update_ref(cur, x[:, t], dt[:, t], A, B[:, t], C[:, t], D,
                                            None if z is None else z[:, t], dt_bias, dt_softplus,
                                            state_batch_indices)
        outs.append(o)
        snap = cur[r.to(cur.device)] * valid.to(device=cur.device, dtype=cur.dtype).view((batch,) + (1,) * (cur.dim() - 1))
        snaps.append(snap)
    out = torch.stack(outs, 1) if T else x.new_zeros(x.shape)
    inter = torch.stack(snaps, 1) if T else state.new_zeros((batch, 0) + tuple(state.shape[1:]))
    return out, inter


# ------------------------------------------------------------------ gated RMSNorm (DESIGN 4.1)


def rmsnorm_gated_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    group_size: Optional[int] = None,
    norm_before_gate: bool = False,
) -> torch.Tensor:
    """mamba_ssm's rms_norm_ref in x's dtype (float64 in tests): per group of group_size
    channels, out = u / sqrt(mean(u^2) + eps) * weight + bias with u = x * silu(z) when the gate
    comes first (z given, not norm_before_gate), else u = x and the result times silu(z) when
    norm_before_gate and z is given."""
    dtype = x.dtype
    dim = x.shape[-1]
    group_size = dim if group_size is None else group_size
    w = weight.to(dtype)
    if z is not None:
        z = z.to(dtype)
        if not norm_before_gate:
            x = x * F.silu(z)
    xg = x.reshape(*x.shape[:-1], dim // group_size, group_size)
    rstd = 1.0 / torch.sqrt(xg.square().mean(dim=-1, keepdim=True) + eps)
    out = (xg * rstd).reshape(x.shape) * w
    if bias is not None:
        out = out + bias.to(dtype)
    if z is not None and norm_before_gate:
        out = out * F.silu(z)
    return out
