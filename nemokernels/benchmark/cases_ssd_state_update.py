"""Decode state-update cases: `selective_state_update` (one token, state in place) and the
multi-token update of speculative decoding (T = 4), at Nemotron-3 Nano (64 heads) and Super
(128 heads) Mamba-2 shapes: head dim 64, dstate 128, 8 groups; bf16 activations, float32
state, per-head dt / A / D / dt_bias expanded with stride 0 as Mamba-2 passes them.
Bytes are dominated by the state: read + write (single), read + T snapshot writes (multi);
cost model in docs/ssd.md (issue 18). Single-step points with a bf16 state end in "state bf16";
"state bf16 sr" adds stochastic rounding (a device seed, one Philox call per 4 elements).
"commit" points: a T4 verify step then the commit of 2 accepted tokens, by replay
(commit_state_replay: 3 state volumes) against snapshots + commit_state (T + 2 = 6 volumes).
Tree points ("tree8"): 8 draft nodes in a binary tree of depth 3 (TREE_PARENTS); 6 of the 8
nodes reload their parent's state (a snapshot this block wrote a few tokens earlier, taken to
hit L2), so the DRAM bytes are those of the T = 8 chain.
Baselines: the same math in plain PyTorch (float32, as mamba_ssm's reference), eager and
compiled, and mamba_ssm's Triton `selective_state_update` (single token) when importable
(peers.py)."""
import torch
import torch.nn.functional as F

import nemokernels as nk

from .harness import Case, lazy_compile
from .peers import mamba_ssm_peer

CONFIGS = {"nano": 64, "super": 128}  # heads
HEADDIM, DSTATE, NGROUPS, T_MULTI = 64, 128, 8, 4
DTYPE, STATE_DTYPE = torch.bfloat16, torch.float32
TREE_PARENTS = [-1, 0, 0, 1, 1, 2, 2, 3]


def _step_torch(state, x, dt, A, B, C, D, z, dt_bias):
    """One decode step in float32 PyTorch; returns (out, new_state)."""
    heads = state.shape[1]
    dtp = F.softplus(dt.float() + dt_bias)                          # (b, H, P)
    dA = torch.exp(dtp[..., None] * A)                              # (b, H, P, N)
    Bh = B.float().repeat_interleave(heads // B.shape[1], dim=1)    # (b, H, N)
    Ch = C.float().repeat_interleave(heads // C.shape[1], dim=1)
    new = state.float() * dA + (dtp * x.float())[..., None] * Bh[:, :, None, :]
    out = torch.einsum("bhpn,bhn->bhp", new, Ch) + D * x.float()
    return (out * F.silu(z.float())).to(x.dtype), new


def update_torch(state, x, dt, A, B, C, D, z, dt_bias):
    out, new = _step_torch(state, x, dt, A, B, C, D, z, dt_bias)
    state.copy_(new)
    return out


def multi_torch(state, x, dt, A, B, C, D, z, dt_bias, inter):
    cur, outs = state, []
    for t in range(x.shape[1]):
        o, cur = _step_torch(cur, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, z[:, t], dt_bias)
        inter[:, t] = cur
        outs.append(o)
    return torch.stack(outs, 1), inter


def tree_torch(state, x, dt, A, B, C, D, z, dt_bias, inter, parents):
    outs = []
    for t, q in enumerate(TREE_PARENTS):
        cur = state if q < 0 else inter[:, q]
        o, new = _step_torch(cur, x[:, t], dt[:, t], A, B[:, t], C[:, t], D, z[:, t], dt_bias)
        inter[:, t] = new
        outs.append(o)
    return torch.stack(outs, 1), inter


def tree_ours(state, x, dt, A, B, C, D, z, dt_bias, inter, parents):
    return nk.selective_state_update_multi(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True,
                                           intermediate_states=inter, parents=parents)


def verify_commit_snapshots(state, x, dt, A, B, C, D, z, dt_bias, inter, acc):
    """A speculative verify step and its commit through snapshots (T + 2 state volumes)."""
    out, inter = nk.selective_state_update_multi(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True,
                                                 intermediate_states=inter)
    nk.commit_state(state, inter, acc)
    return out


def verify_commit_replay(state, x, dt, A, B, C, D, z, dt_bias, inter, acc):
    """The same step committed by replay: outputs only, then the accepted tokens re-run in place
    (3 state volumes)."""
    out = torch.ops.nemokernels.selective_state_update_multi(state, x, dt, A, B, C, D, z, dt_bias, True, None, None)
    nk.commit_state_replay(state, x, dt, A, B, C, dt_bias, True, num_accepted=acc)
    return out


def update_ours(state, x, dt, A, B, C, D, z, dt_bias):
    return nk.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True)


def _update_ours_sr(seed):
    def run(state, x, dt, A, B, C, D, z, dt_bias):
        return nk.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True,
                                         stochastic_rounding=True, seed=seed)
    return run


def multi_ours(state, x, dt, A, B, C, D, z, dt_bias, inter):
    return nk.selective_state_update_multi(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus=True,
                                           intermediate_states=inter)


def _peer_update(fn):
    def run(state, x, dt, A, B, C, D, z, dt_bias):
        return fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=True)
    return run


def _maker(batch, heads, device, T=None, state_dtype=STATE_DTYPE, tree=False, accepted=None):
    lead = (batch,) if T is None else (batch, T)

    def make():
        d = dict(device=device)
        state = (torch.randn(batch, heads, HEADDIM, DSTATE, **d) * 0.1).to(state_dtype)
        x = torch.randn(*lead, heads, HEADDIM, dtype=DTYPE, **d)
        z = torch.randn(*lead, heads, HEADDIM, dtype=DTYPE, **d)
        dt = torch.randn(*lead, heads, dtype=DTYPE, **d)[..., None].expand(*lead, heads, HEADDIM)
        A = (-torch.rand(heads, **d) - 0.5)[:, None, None].expand(heads, HEADDIM, DSTATE)
        B = torch.randn(*lead, NGROUPS, DSTATE, dtype=DTYPE, **d)
        C = torch.randn(*lead, NGROUPS, DSTATE, dtype=DTYPE, **d)
        D = torch.randn(heads, **d)[:, None].expand(heads, HEADDIM)
        dt_bias = torch.randn(heads, **d)[:, None].expand(heads, HEADDIM)
        args = (state, x, dt, A, B, C, D, z, dt_bias)
        if T is not None:
            args += (torch.empty((batch, T, heads, HEADDIM, DSTATE), dtype=state_dtype, **d),)
        if tree:
            args += (torch.tensor(TREE_PARENTS, dtype=torch.int32, **d).expand(batch, T).contiguous(),)
        if accepted is not None:
            args += (torch.full((batch,), accepted, dtype=torch.long, **d),)
        return args
    return make


def _sizes(batch: int, heads: int, tokens: int = 1):
    """(state elements, activation elements of `tokens` tokens: x, z, out, dt, B, C)."""
    token = batch * heads * HEADDIM * 3 + batch * heads + 2 * batch * NGROUPS * DSTATE
    return batch * heads * HEADDIM * DSTATE, tokens * token


def cases(quick: bool, device) -> list:
    ssz, esz = torch.empty((), dtype=STATE_DTYPE).element_size(), torch.empty((), dtype=DTYPE).element_size()
    f32, bf16 = STATE_DTYPE, torch.bfloat16
    single = ([("nano", 1, f32), ("nano", 64, f32), ("nano", 256, bf16), ("nano", 256, "sr"), ("super", 256, f32)]
              if quick else [(c, b, f32) for c in CONFIGS for b in (1, 8, 64, 256)]
              + [(c, 256, t) for c in CONFIGS for t in (bf16, "sr")])
    multi = [("nano", 8), ("super", 64)] if quick else [(c, b) for c in CONFIGS for b in (1, 8, 64, 256)]
    tree = [("nano", 64)] if quick else [(c, b) for c in CONFIGS for b in (8, 64)]
    commit = [("nano", 64)] if quick else [(c, b) for c in CONFIGS for b in (8, 64, 256)]
    if quick and torch.device(device).type != "cuda":  # CPU-sized
        single, multi, tree, commit = [("nano", 1, f32), ("nano", 8, f32)], [("nano", 4)], [("nano", 2)], []
    peer = mamba_ssm_peer("selective_state_update", "selective_state_update")
    out = []
    for cfg, batch, kind in single:
        heads = CONFIGS[cfg]
        st = batch * heads * HEADDIM * DSTATE
        sdt = bf16 if kind == "sr" else kind
        sz = torch.empty((), dtype=sdt).element_size()
        tag = "" if sdt == f32 else " state bf16" + (" sr" if kind == "sr" else "")
        fn = update_ours if kind != "sr" else _update_ours_sr(torch.tensor([1], device=device))
        io = batch * heads * HEADDIM * 3 + batch * heads + 2 * batch * NGROUPS * DSTATE  # x, z, out, dt, B, C
        out.append(Case(
            op="selective_state_update", name=f"{cfg} b{batch} h{heads} p{HEADDIM} n{DSTATE}{tag}",
            make_inputs=_maker(batch, heads, device, state_dtype=sdt), fn=fn,
            bytes=2 * st * sz + io * esz, flops=5 * st,
            baselines={"torch_eager": update_torch, "torch_compile": lazy_compile(update_torch),
                       **({"mamba_ssm_triton": _peer_update(peer)} if peer is not None else {})}))
    for cfg, batch in multi:
        heads = CONFIGS[cfg]
        st, io = _sizes(batch, heads, T_MULTI)
        out.append(Case(
            op="selective_state_update_multi", name=f"{cfg} b{batch} T{T_MULTI} h{heads} p{HEADDIM} n{DSTATE}",
            make_inputs=_maker(batch, heads, device, T_MULTI), fn=multi_ours,
            bytes=(1 + T_MULTI) * st * ssz + io * esz, flops=5 * T_MULTI * st,
            baselines={"torch_eager": multi_torch, "torch_compile": lazy_compile(multi_torch)}))
    for cfg, batch in tree:
        heads, T = CONFIGS[cfg], len(TREE_PARENTS)
        st, io = _sizes(batch, heads, T)
        out.append(Case(
            op="selective_state_update_multi", name=f"{cfg} b{batch} tree{T} h{heads} p{HEADDIM} n{DSTATE}",
            make_inputs=_maker(batch, heads, device, T, tree=True), fn=tree_ours,
            bytes=(1 + T) * st * ssz + io * esz + batch * T * 4, flops=5 * T * st,
            baselines={"torch_eager": tree_torch, "torch_compile": lazy_compile(tree_torch)}))
    for cfg, batch in commit:
        # A verify step of T4 drafts with 2 accepted, committed by replay; the baseline commits
        # through snapshots. Bytes: the replay's (state read by the verify, then read + written).
        heads = CONFIGS[cfg]
        st, io = _sizes(batch, heads, T_MULTI)
        out.append(Case(
            op="selective_state_update_multi.commit", name=f"{cfg} b{batch} T{T_MULTI} h{heads} replay",
            make_inputs=_maker(batch, heads, device, T_MULTI, accepted=2), fn=verify_commit_replay,
            bytes=3 * st * ssz + 2 * io * esz, flops=5 * (T_MULTI + 2) * st,
            baselines={"snapshots": verify_commit_snapshots}))
    return out
