"""mamba_chunk_scan_combined: drop-in for mamba_ssm's Mamba-2 SSD (chunked selective scan),
forward and backward.

Details: docs/ssd.md, section `nemokernels/ssd/ssd_chunk_scan.py`."""
import math
from typing import Optional, Tuple

import torch

_ops = torch.ops.nemokernels


@torch.library.register_fake("nemokernels::ssd_chunk_scan_fwd")
def _fwd_fake(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens,
              dt_softplus, dt_min, dt_max, return_final_states, return_varlen_states, save_y_pre,
              return_chunk_states=False, chunk_plan=None):
    b, L, H, P = x.shape
    N = B.shape[-1]
    keep_pre = z is not None and save_y_pre
    nseq = cu_seqlens.shape[0] - 1 if return_varlen_states else 0
    if chunk_plan is not None:
        nc = chunk_plan.shape[1] - 1
    else:
        nc = max(1, -(-L // chunk_size))
    f32 = torch.float32
    return (x.new_empty((b, L, H, P)), x.new_empty((b if keep_pre else 0, L, H, P)),
            x.new_empty((b if return_final_states else 0, H, P, N), dtype=f32),
            x.new_empty((nseq, H, P, N), dtype=f32),
            x.new_empty((b if return_chunk_states else 0, nc if L > 0 else 0, H, P, N), dtype=f32))


@torch.library.register_fake("nemokernels::ssd_chunk_scan_bwd")
def _bwd_fake(dout, x, dt, A, B, C, chunk_size, D, z, y_pre, dt_bias, initial_states, seq_idx,
              dfinal_states, dt_softplus, dt_min, dt_max, return_dinitial_states, cu_seqlens=None, chunk_plan=None):
    b, L, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    dD = D.new_empty(D.shape) if D is not None else x.new_empty((0,), dtype=torch.float32)
    dbias = dt_bias.new_empty((H,)) if dt_bias is not None else x.new_empty((0,), dtype=torch.float32)
    if return_dinitial_states:
        dinit = initial_states.new_empty(initial_states.shape)
    else:
        dinit = (initial_states if initial_states is not None else x).new_empty(
            (0, H, P, N), dtype=initial_states.dtype if initial_states is not None else torch.float32)
    return (x.new_empty((b, L, H, P)), dt.new_empty((b, L, H)), A.new_empty((H,)),
            x.new_empty((b, L, G, N)), x.new_empty((b, L, G, N)), dD,
            x.new_empty((b if z is not None else 0, L, H, P)), dbias, dinit)


_IN = ("x", "dt", "A", "B", "C", "chunk_size", "D", "z", "dt_bias", "initial_states", "seq_idx",
       "cu_seqlens", "dt_softplus", "dt_min", "dt_max", "return_final_states", "return_varlen_states",
       "save_y_pre", "return_chunk_states", "chunk_plan")


def _fwd_setup(ctx, inputs, output):
    a = dict(zip(_IN, inputs))
    y, y_pre, final_states, varlen_states, entering_states = output
    ctx.mark_non_differentiable(y_pre, varlen_states, entering_states)
    plan = a.get("chunk_plan")
    ctx.save_for_backward(a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"], a["z"], y_pre, a["dt_bias"],
                          a["initial_states"], a["seq_idx"], a["cu_seqlens"] if plan is not None else None, plan)
    ctx.chunk_size = a["chunk_size"]
    ctx.dt = (a["dt_softplus"], a["dt_min"], a["dt_max"])
    ctx.has_final = a["return_final_states"]
    ctx.has_init = a["initial_states"] is not None
    ctx.has_z = a["z"] is not None
    ctx.saved_pre = a["save_y_pre"]


def _fwd_backward(ctx, dy, dy_pre, dfinal, dvarlen, dentering):
    x, dt, A, B, C, D, z, y_pre, dt_bias, init, seq_idx, cu, plan = ctx.saved_tensors
    if ctx.has_z and not ctx.saved_pre:
        raise RuntimeError("mamba_chunk_scan_combined: the forward ran with save_y_pre=False, so the "
                           "backward through z is unavailable (call through the public function)")
    if not ctx.has_final:
        dfinal = None  # the final-states output was an empty placeholder
    want_dinit = ctx.has_init and ctx.needs_input_grad[9]
    softplus, dt_min, dt_max = ctx.dt
    dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinit = _ops.ssd_chunk_scan_bwd(
        dy, x, dt, A, B, C, ctx.chunk_size, D, z, y_pre if ctx.has_z else None, dt_bias, init, seq_idx,
        dfinal, softplus, dt_min, dt_max, want_dinit, cu, plan)
    return (dx, ddt, dA, dB, dC, None, dD if D is not None else None, dz if ctx.has_z else None,
            ddt_bias if dt_bias is not None else None, dinit if want_dinit else None,
            None, None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("nemokernels::ssd_chunk_scan_fwd", _fwd_backward, setup_context=_fwd_setup)


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, seqlen: int) -> torch.Tensor:
    """seq_idx (1, seqlen) int32 from cu_seqlens, on cu_seqlens' device, with no host sync:
    position t gets the index i of the sequence with cu_seqlens[i] <= t < cu_seqlens[i+1]."""
    t = torch.arange(seqlen, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), t, right=True).to(torch.int32).unsqueeze(0)


def chunk_plan(cu_seqlens: torch.Tensor, seqlen: int, chunk_size: int) -> torch.Tensor:
    """Chunks of packed sequences aligned to each sequence's start, on cu_seqlens' device with no
    host sync: (2, nc + 1) int32, row 0 the first position of each chunk (then seqlen), row 1
    its sequence (then num_sequences). Sequence s of length l gets ceil(l / chunk_size) chunks
    starting at cu_seqlens[s], cu_seqlens[s] + chunk_size, ...; nc is the most any packing of
    seqlen tokens into num_sequences sequences needs, min(seqlen, (seqlen + S (Q - 1)) // Q)
    (at least 1), and the chunks past the last real one are empty (start seqlen, sequence S)."""
    Q, L = int(chunk_size), int(seqlen)
    cu = cu_seqlens.to(torch.int64)
    S = cu.numel() - 1
    nc = max(1, min(L, (L + S * (Q - 1)) // Q)) if S > 0 else 1
    dev = cu.device
    if S <= 0:
        return torch.stack([torch.full((nc + 1,), L, device=dev), torch.zeros(nc + 1, device=dev,
                                                                             dtype=torch.int64)]).to(torch.int32)
    lens = (cu[1:] - cu[:-1]).clamp(min=0)
    per_seq = (lens + Q - 1) // Q
    ends = torch.cumsum(per_seq, 0)
    k = torch.arange(nc, device=dev)
    seq = torch.searchsorted(ends, k, right=True)
    sc = seq.clamp(max=S - 1)
    start = cu[sc] + (k - (ends - per_seq)[sc]) * Q
    start = torch.where(seq < S, start, torch.full_like(start, L))
    tail = torch.tensor([[L], [S]], device=dev)
    return torch.cat([torch.stack([start, seq]), tail], dim=1).to(torch.int32)


def mamba_chunk_scan_combined(
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
    cu_seqlens: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    dt_limit: Tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
    return_chunk_states: bool = False,
):
    """Mamba-2 SSD, chunked: same signature, semantics and returns as mamba_ssm's function.

    Per head h (group g = h // (nheads // ngroups)):
        dt'_t = clamp(softplus?(dt_t + dt_bias), *dt_limit)
        h_t   = exp(dt'_t A) h_{t-1} + dt'_t x_t B_t^T        (state (headdim, dstate), float32)
        y_t   = C_t h_t + D x_t;   y_t *= silu(z_t) when z is given
    h_{-1} = initial_states (zeros when None). With seq_idx the state restarts from zero where
    the id changes (initial_states continue the sequence with id 0). chunk_size: any positive
    int on the CPU; 64, 128 or 256 on CUDA (headdim % 8 == 0 <= 128, dstate % 8 == 0 <= 256).

    Returns y (like x), then final_states (batch, nheads, headdim, dstate) float32 when
    return_final_states, then when return_varlen_states (needs cu_seqlens; seq_idx is derived
    from it when not given) the state after the last position of each sequence
    (num_sequences, nheads, headdim, dstate) float32, zeros for an empty sequence.
    Differentiable in x, dt, A, B, C, D, z, dt_bias, initial_states (and through
    final_states); varlen states are not differentiable.

    Packed sequences (ours, for serving; batch 1 with ``cu_seqlens`` (S + 1,)): sequence s is
    positions cu_seqlens[s]..cu_seqlens[s+1]-1, and chunks are aligned to each sequence's start
    (vLLM's ``cu_chunk_seqlens``; no chunk straddles two sequences), so each sequence's
    outputs and states equal, bit for bit, a separate call on that sequence alone, whatever the
    packing. ``initial_states`` is then (S, nheads, headdim, dstate), sequence s starting from
    row s, or (1, ...) for the first sequence only (mamba_ssm's meaning); gradients reach every
    row. final_states is the state of the sequence holding the last position (zeros for
    seqlen 0); an empty sequence's varlen state is its initial state. seq_idx, if given, must
    agree with cu_seqlens (checked on the CPU) and is otherwise unused. With batch > 1,
    cu_seqlens is ignored as in mamba_ssm (and return_varlen_states is refused).

    ``return_chunk_states`` (ours, for prefix caching) appends ``(chunk_states, chunk_ends)``:
    chunk_states (batch, nchunks, nheads, headdim, dstate) float32, the state after token
    chunk_ends[c], so an engine can keep the states of whole cache blocks without recomputing
    them. Without cu_seqlens: chunk_ends[c] = min((c + 1) * chunk_size, seqlen) - 1 (nchunks =
    ceil(seqlen / chunk_size), the last one the final state); with seq_idx each is the state of
    the sequence that token belongs to, at a global chunk boundary. With cu_seqlens: the state
    of sequence s after each multiple of chunk_size inside it and after its last token (the
    aligned chunks' ends), in the order of ``chunk_plan``; chunk_ends (int64) is -1 for the
    empty chunks past the last real one. They are the states the forward computes anyway
    (F3's), handed out instead of freed: no extra work. Not differentiable.

    Checks that read index values run on the CPU only (on CUDA they would need a host sync):
    seq_idx must be non-negative and non-decreasing along each row, and with cu_seqlens,
    cu_seqlens must start at 0, be non-decreasing, end at seqlen and agree with seq_idx (seq_idx
    changes exactly where a non-empty sequence starts). On CUDA any values are memory-safe
    instead: seq_idx values are only compared for equality, and every cu_seqlens bound is
    clamped to [0, seqlen) (an empty or inverted range gives a zero state), so inconsistent
    values give unspecified results, never out-of-bounds accesses.
    CUDA limits (checked before any launch, with the limit in the message): every kernel's
    grid (about batch * chunks * heads blocks) within CUDA's 2^31 - 1; split the batch or
    the sequence (final_states -> initial_states) to stay under it.
    """
    if not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2:
        raise ValueError(f"mamba_chunk_scan_combined: dt_limit must be a (min, max) pair, got {dt_limit!r}")
    if cu_seqlens is not None and cu_seqlens.dtype != torch.int32:
        cu_seqlens = cu_seqlens.to(torch.int32)
    if return_varlen_states and cu_seqlens is None:
        raise ValueError("mamba_chunk_scan_combined: return_varlen_states needs cu_seqlens")
    if return_varlen_states and x.dim() == 4 and x.shape[0] != 1:
        raise ValueError("mamba_chunk_scan_combined: return_varlen_states needs batch 1 (packed "
                         f"sequences), got batch {x.shape[0]}")
    packed = cu_seqlens is not None and x.dim() == 4 and x.shape[0] == 1
    plan = None
    if packed:
        L, Q = x.shape[1], int(chunk_size)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError("mamba_chunk_scan_combined: cu_seqlens must be (num_sequences + 1,), got "
                             f"{tuple(cu_seqlens.shape)}")
        if seq_idx is not None and seq_idx.device.type == "cpu" and L > 1:
            derived = seq_idx_from_cu_seqlens(cu_seqlens.to(seq_idx.device), L)
            if seq_idx.shape != derived.shape or not torch.equal(seq_idx[0, 1:] != seq_idx[0, :-1],
                                                                 derived[0, 1:] != derived[0, :-1]):
                raise ValueError("mamba_chunk_scan_combined: seq_idx disagrees with cu_seqlens (its id must "
                                 "change exactly where a non-empty sequence starts)")
        seq_idx = None  # the plan separates the sequences
        plan = chunk_plan(cu_seqlens, L, Q)
    if seq_idx is None and cu_seqlens is not None and return_varlen_states and not packed:
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, x.shape[1])
    if seq_idx is not None and seq_idx.dtype != torch.int32:
        seq_idx = seq_idx.to(torch.int32)
    save_y_pre = z is not None and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, D, z, dt_bias, initial_states))
    want_varlen = return_varlen_states or (packed and return_chunk_states)
    y, _, final_states, varlen_states, entering = _ops.ssd_chunk_scan_fwd(
        x, dt, A, B, C, int(chunk_size), D, z, dt_bias, initial_states, seq_idx,
        cu_seqlens if (want_varlen or packed) else None, bool(dt_softplus), float(dt_limit[0]),
        float(dt_limit[1]), bool(return_final_states or (return_chunk_states and not packed)), bool(want_varlen),
        save_y_pre, bool(return_chunk_states), plan)
    out = [y]
    if return_final_states:
        out.append(final_states)
    if return_varlen_states:
        out.append(varlen_states)
    if return_chunk_states:
        out += list(_chunk_states(entering, final_states, varlen_states, plan, x.shape[1], int(chunk_size)))
    return out[0] if len(out) == 1 else tuple(out)


def _chunk_states(entering, final_states, varlen_states, plan, L, Q):
    """(chunk_states, chunk_ends) from the forward's entering states: the state after chunk c
    is the one entering chunk c + 1, except where c ends its sequence (the final state without
    a plan, the sequence's varlen state with one)."""
    if plan is None:
        # After chunk c = entering chunk c + 1; after the last chunk = the final state.
        states = torch.cat([entering[:, 1:], final_states.detach()[:, None]], dim=1) if L > 0 else entering
        ends = (torch.arange(1, states.shape[1] + 1, device=entering.device) * Q).clamp(max=L) - 1
        return states, ends
    if L == 0:
        return entering, torch.empty(0, dtype=torch.int64, device=entering.device)
    starts, seq = plan[0].long(), plan[1].long()
    nc, S = plan.shape[1] - 1, varlen_states.shape[0]
    last = seq[1:] != seq[:-1]  # chunk c ends its sequence
    real = seq[:-1] < S
    own = varlen_states[seq[:-1].clamp(max=max(S - 1, 0))] if S > 0 else torch.zeros_like(entering[0])
    nxt = torch.cat([entering[0, 1:], torch.zeros_like(entering[0, :1])], dim=0)
    shape = (nc,) + (1,) * (entering.dim() - 2)
    states = torch.where(last.view(shape), own, nxt)
    states = torch.where(real.view(shape), states, torch.zeros_like(states))
    ends = torch.where(real, starts[1:] - 1, torch.full_like(starts[1:], -1))
    return states.unsqueeze(0), ends


def ssd_chunk_scan_bytes_flops(batch: int, seqlen: int, nheads: int, headdim: int, ngroups: int,
                               dstate: int, chunk_size: int, elem_bytes: int = 2, has_z: bool = True):
    """Minimum HBM bytes and FLOPs of one forward (the roofline of the benchmarks): read x, z,
    B, C, dt once, write y once; FLOPs of the chunked algorithm's products."""
    b, L, H, P, G, N, Q = batch, seqlen, nheads, headdim, ngroups, dstate, chunk_size
    act = b * L * H * P * elem_bytes * (3 if has_z else 2) + 2 * b * L * G * N * elem_bytes + b * L * H * 4
    nc = math.ceil(L / Q)
    flops = 2 * b * nc * G * Q * Q * N            # CB = C B^T per group
    flops += 2 * b * nc * H * Q * Q * P           # scores @ X (full square, as tensor cores do)
    flops += 2 * b * nc * H * Q * P * N * 2       # chunk states and C @ state_in
    return act, flops
