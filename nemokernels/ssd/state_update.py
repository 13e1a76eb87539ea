"""Mamba decode-time state updates: a drop-in for mamba_ssm's `selective_state_update`
(one token, state updated in place, optionally stochastically rounded), a multi-token update
for speculative decoding that keeps the state after every draft position (a chain or a tree),
`commit_state`, which rolls the cache forward to the accepted prefix, and
`commit_state_replay`, which does the same by re-running the accepted tokens.

Details: docs/ssd.md, section `nemokernels/ssd/state_update.py`."""
from typing import Optional, Union

import torch

_ops = torch.ops.nemokernels


@torch.library.register_fake("nemokernels::selective_state_update")
def _single_fake(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, rounding_seed=None):
    return x.new_empty(x.shape)


@torch.library.register_fake("nemokernels::selective_state_update_multi")
def _multi_fake(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, intermediate_states,
                parents=None, rounding_seed=None):
    return x.new_empty(x.shape)


@torch.library.register_fake("nemokernels::selective_state_update_replay")
def _replay_fake(state, x, dt, A, B, C, dt_bias, dt_softplus, state_batch_indices, replay_to, parents=None,
                 rounding_seed=None):
    return None


def _rounding_seed(stochastic_rounding: bool, seed, state: torch.Tensor,
                   op: str = "selective_state_update") -> Optional[torch.Tensor]:
    """The op's rounding_seed: None (round to nearest) unless stochastic_rounding. A tensor seed
    (1 element, int64, on the state's device) is read by the kernel: no host sync, and a CUDA
    graph replays whatever it holds. An int is copied to the device. None: a fresh seed from
    torch's generator on the state's device, so every call draws new bits."""
    if not stochastic_rounding:
        if seed is not None:
            raise ValueError(f"{op}: seed is given but stochastic_rounding is False")
        return None
    if isinstance(seed, torch.Tensor):
        return seed.to(torch.int64)
    if seed is None:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=state.device)
    seed = int(seed) & (2**64 - 1)
    return torch.tensor([seed - 2**64 if seed >= 2**63 else seed], dtype=torch.int64, device=state.device)


def _indices(state_batch_indices: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if state_batch_indices is not None and state_batch_indices.dtype != torch.int32:
        state_batch_indices = state_batch_indices.to(torch.int32)
    return state_batch_indices


def selective_state_update(
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
    *,
    stochastic_rounding: bool = False,
    seed: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """One Mamba decode step; updates ``state`` in place and returns ``out`` shaped like x.

    Per batch entry b, head h, row p (s = state[row, h, p, :], row = state_batch_indices[b]
    or b)::

        dt' = softplus(dt + dt_bias) if dt_softplus else dt + dt_bias      (no clamp)
        s   = s * exp(dt' * A[h, p, :]) + B[b, h // (H // G), :] * dt' * x[b, h, p]
        out = (sum(s * C[b, group, :]) + D[h, p] * x[b, h, p]) * silu(z[b, h, p])

    ``state_batch_indices`` (b,) int32 (int64 is converted): the state row of each entry;
    a negative index is a padded slot (state untouched, out = 0). Non-negative indices must
    be distinct. Without indices, entry b uses row b. Not differentiable (a decode-time op).

    Refused on every device (host-side checks of pointers and strides, no sync): a ``state``
    that is an expanded view (stride 0) or whose elements overlap, and a ``state`` that
    shares memory with any other argument. CPU-only checks (they read the index values, which
    on CUDA would need a host sync): an index >= state.shape[0] raises, and so does a row held
    by two entries (padded entries may repeat). On CUDA the kernel stays memory-safe instead:
    an out-of-range index gives NaN outputs and leaves the state untouched; entries sharing a
    row stay in bounds but race on it (that row's result is unspecified). CUDA limit: dstate
    <= 512 for a float32 state, 1024 for float16 / bfloat16.

    ``stochastic_rounding`` (a float16 / bfloat16 state only): the new state is rounded up or
    down at random with probability by distance (unbiased) instead of to nearest, so a 16-bit
    state pool does not drift over long generations (decays and updates below half a unit in
    the last place are not lost). ``seed``: int, a 1-element int64 tensor on the state's device
    (read by the kernel; advance it between steps, e.g. ``seed += 1`` on the device, or every
    step repeats the same bits), or None (a fresh seed per call from torch's generator). Bits
    are a function of (seed, state row, head, row, dstate index, token), not of the batch order.
    """
    return _ops.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                       _indices(state_batch_indices),
                                       _rounding_seed(stochastic_rounding, seed, state))


def selective_state_update_multi(
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
    intermediate_states: Optional[torch.Tensor] = None,
    parents: Optional[torch.Tensor] = None,
    *,
    stochastic_rounding: bool = False,
    seed: Optional[Union[int, torch.Tensor]] = None,
):
    """T decode steps for speculative decoding, a chain or a tree, without modifying ``state``.

    x, dt, z: (b, T, H, P); B, C: (b, T, G, N); the rest as in `selective_state_update`.
    Runs the T positions from ``state[row(b)]`` and returns ``(out, intermediate_states)``:
    out (b, T, H, P) in x's dtype, and the state after every position, (b, T, H, P, N) in
    state's dtype, written into ``intermediate_states`` when given (else newly allocated).
    ``intermediate_states[:, t]`` equals the state that t + 1 calls of
    `selective_state_update` would leave, bit for bit. Padded entries (negative index) get
    zero outputs and zero snapshots. Pass the snapshots and the number of accepted tokens
    to `commit_state` to advance the cache.

    ``stochastic_rounding`` / ``seed`` as in `selective_state_update`, for the snapshots
    (token t draws the bits of position t; a single step draws those of position 0).

    Tree drafts: ``parents`` (b, T) int (the ``parents`` of `verify_tree_greedy` /
    `verify_tree_rejection`): token t continues from the state after token ``parents[b, t]``,
    -1 from ``state[row(b)]``, and a parent precedes its children (-1 <= parents[b, t] < t).
    ``intermediate_states[:, t]`` is then the state after the root-to-t path, bit for bit the
    chain update along that path, and ``commit_state(..., accepted_node=...)`` advances the cache
    to the last accepted node. A parent out of range raises on the CPU; on CUDA (no host sync)
    that node and its descendants get NaN outputs and snapshots.

    ``state`` is only read, so indices may repeat. ``intermediate_states`` is written: it is
    refused (on every device) when it is an expanded view, when its elements overlap, or when
    it shares memory with ``state`` or any input (views of one buffer that share no element,
    e.g. ``buf[:, 0]`` as the state and ``buf[:, 1:]`` as the snapshots, are fine). An index
    >= state.shape[0] raises on the CPU only; on CUDA that entry's outputs and snapshots are
    NaN.
    """
    if intermediate_states is None:
        intermediate_states = state.new_empty((x.shape[0], x.shape[1]) + tuple(state.shape[1:]))
    out = _ops.selective_state_update_multi(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus,
                                            _indices(state_batch_indices), intermediate_states, _indices(parents),
                                            _rounding_seed(stochastic_rounding, seed, state,
                                                           "selective_state_update_multi"))
    return out, intermediate_states


def commit_state(
    state: torch.Tensor,
    intermediate_states: torch.Tensor,
    num_accepted: Optional[torch.Tensor] = None,
    state_batch_indices: Optional[torch.Tensor] = None,
    *,
    accepted_node: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Advances ``state`` in place to the accepted prefix of a multi-token update.

    For each batch entry b with row r = state_batch_indices[b] (or b) and
    k = num_accepted[b] (clamped to [0, T]): state[r] = intermediate_states[b, k - 1] when
    k > 0; k == 0 keeps the old state; padded entries (r < 0) are skipped. For tree drafts
    pass ``accepted_node`` (b,) instead, the last accepted node of each entry (e.g.
    ``accepted_node_indices[b, num_accepted[b]]`` of `verify_tree_greedy`): state[r] =
    intermediate_states[b, accepted_node[b]], and a negative node keeps the old state (it is
    num_accepted = accepted_node + 1). Give exactly one of the two. Pure PyTorch, no
    host sync and no data-dependent shapes, so it is safe under CUDA graphs and
    torch.compile(fullgraph=True). Non-negative rows must be distinct and < state.shape[0]:
    checked on the CPU (RuntimeError); on CUDA (no host sync) a row past the end is skipped like
    a padded one, so nothing is written out of bounds, and rows named twice get one of the
    entries' states. Returns ``state``.
    """
    batch, T = intermediate_states.shape[0], intermediate_states.shape[1]
    if (num_accepted is None) == (accepted_node is None):
        raise ValueError("commit_state: give exactly one of num_accepted (a chain) and accepted_node (a tree)")
    if accepted_node is not None:
        if accepted_node.shape != (batch,):
            raise ValueError(f"commit_state: accepted_node must have shape ({batch},), got {tuple(accepted_node.shape)}")
        num_accepted = accepted_node.to(torch.long).clamp(min=-1) + 1
    if num_accepted.shape != (batch,):
        raise ValueError(f"commit_state: num_accepted must have shape ({batch},), got {tuple(num_accepted.shape)}")
    if tuple(intermediate_states.shape[2:]) != tuple(state.shape[1:]):
        raise ValueError(f"commit_state: intermediate_states must be (batch, T) + state.shape[1:] = "
                         f"({batch}, {T}) + {tuple(state.shape[1:])}, got {tuple(intermediate_states.shape)}")
    if T == 0:
        _check_rows("commit_state", "state", state, batch, state_batch_indices)
        return state
    acc = num_accepted.to(device=state.device, dtype=torch.long)

    def new_rows(src, target):
        k = acc[src]
        return k > 0, intermediate_states[src, (k - 1).clamp(0, T - 1)].to(state.dtype)

    return _commit_rows("commit_state", "state", state, batch, state_batch_indices, new_rows)


def commit_state_replay(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    dt_bias: Optional[torch.Tensor] = None,
    dt_softplus: bool = False,
    state_batch_indices: Optional[torch.Tensor] = None,
    *,
    num_accepted: Optional[torch.Tensor] = None,
    accepted_node: Optional[torch.Tensor] = None,
    parents: Optional[torch.Tensor] = None,
    stochastic_rounding: bool = False,
    seed: Optional[Union[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """Advances ``state`` in place to the accepted prefix of a draft by replaying its tokens.

    The replay alternative to `selective_state_update_multi(..., intermediate_states)` +
    `commit_state` (the ReplaySSM idea): verify with `selective_state_update_multi` without a
    snapshot buffer (``intermediate_states=None`` on the raw op, outputs only), keep the draft's
    x, dt, B, C (b, T, ...), and after verification rebuild the accepted state from the old one.
    Entry b applies tokens 0..num_accepted[b] - 1 (clamped to [0, T]), or, for a tree with
    ``parents``, the path from the root to ``accepted_node[b]`` (-1: none); give exactly one of
    the two. The result is bit for bit the snapshot `commit_state` would copy (same kernel, same
    arithmetic; with stochastic rounding, the same seed gives the same bits), while the state
    moves 2x (read + write) instead of (T + 2)x. D and z only shape outputs, so they are not
    taken. Rows as in `selective_state_update` (in place: distinct, checked on the CPU; negative
    = padded, skipped); parents as in `selective_state_update_multi` (on CUDA an invalid parent
    ends the walk: memory-safe, that entry's result unspecified). No host sync, fixed shapes.
    Returns ``state``.
    """
    batch = x.shape[0]
    if (num_accepted is None) == (accepted_node is None):
        raise ValueError("commit_state_replay: give exactly one of num_accepted (a chain) and accepted_node (a tree)")
    count = num_accepted if num_accepted is not None else accepted_node
    name = "num_accepted" if num_accepted is not None else "accepted_node"
    if count.shape != (batch,):
        raise ValueError(f"commit_state_replay: {name} must have shape ({batch},), got {tuple(count.shape)}")
    last = count.to(device=state.device, dtype=torch.long)
    if num_accepted is not None:
        last = last - 1
    replay_to = last.clamp(-1, max(x.shape[1] - 1, -1)).to(torch.int32)
    _ops.selective_state_update_replay(state, x, dt, A, B, C, dt_bias, dt_softplus, _indices(state_batch_indices),
                                       replay_to, _indices(parents),
                                       _rounding_seed(stochastic_rounding, seed, state, "commit_state_replay"))
    return state


def _check_rows(op, name, state, batch, indices):
    n = state.shape[0]
    if indices is None and n < batch:
        raise ValueError(f"{op}: {name}.shape[0] must be at least batch = {batch} when {_idx_name(name)} "
                         f"is None, got {tuple(state.shape)}")
    if indices is not None and indices.shape != (batch,):
        raise ValueError(f"{op}: {_idx_name(name)} must have shape ({batch},), got {tuple(indices.shape)}")


def _idx_name(name):
    return "state_batch_indices" if name == "state" else f"{name}_indices"


def _commit_rows(op, name, state, batch, indices, new_rows):
    """Writes state[row(b)] for every batch entry b (row(b) = indices[b], or b) in place, with
    no host sync and fixed shapes: ``new_rows(src, target)`` gets, per entry, the entry whose
    value it writes and that entry's row, and returns (take (batch,) bool, values (batch, ...));
    where take is False the row keeps its value. Negative rows are padded entries (skipped);
    non-negative rows must be distinct and < state.shape[0], checked on the CPU, while on CUDA a
    row past the end is skipped. Shared by commit_state and commit_conv_state."""
    _check_rows(op, name, state, batch, indices)
    n = state.shape[0]
    if batch == 0:
        return state
    dev = state.device
    ar = torch.arange(batch, device=dev)
    rows = ar if indices is None else indices.to(device=dev, dtype=torch.long)
    if dev.type == "cpu" and indices is not None:
        # Value checks: on the CPU only (on CUDA they would need a host sync, or a device assert
        # that ends the process); compile-safe (no Python branch on the values).
        idx = _idx_name(name)
        torch._assert_async((rows < n).all(), f"{op}: {idx} must be < {name}.shape[0] = {n} "
                                              "(negative = padded slot), got a larger row")
        uniq = torch.where(rows >= 0, rows, -1 - ar).sort().values
        torch._assert_async((uniq[1:] != uniq[:-1]).all(), f"{op}: {idx} holds a row twice; "
                                                           f"each {name} row is committed by at most one batch entry")
    # Every entry writes one row (index_copy_ needs a fixed count). A padded entry (a negative
    # row, or one past the end) repeats the write of the first non-padded entry: the same row
    # and the same value, so the duplicate is harmless. When all entries are padded, row 0 is
    # rewritten with its own value (nothing at all when the state has no rows).
    if n == 0:
        return state
    is_pad = (rows < 0) | (rows >= n)
    first = torch.argmax((~is_pad).to(torch.int32))
    src = torch.where(is_pad, first, ar)
    src_pad = is_pad[src]
    target = torch.where(src_pad, 0, rows[src])
    take, picked = new_rows(src, target)
    take_new = (take & ~src_pad).view((batch,) + (1,) * (state.dim() - 1))
    value = torch.where(take_new, picked, state[target])
    state.index_copy_(0, target, value)
    return state
