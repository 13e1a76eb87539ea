"""The decode state-update CUDA kernel (csrc/ssd/state_update_cuda.cu: selective_state_update and
the multi-token update) run on the CPU through the emulator in tools/cuda_emu (see its README and
tests/cuda_emu.py, whose build helpers this reuses), compared bit for bit with the CPU
kernel (state_update_cpu.cpp runs the same lane decomposition and summation order) through the
public API on CPU tensors. Outputs and snapshots are NaN-poisoned before the emulated launch.
"""
import functools

import pytest
import torch

import cuda_emu as _emu_base

nemokernels = pytest.importorskip("nemokernels")

KERNEL = _emu_base.CSRC / "ssd" / "state_update_cuda.cu"
DT_ENUM = _emu_base.DT_ENUM


@functools.cache
def emu():
    """The emulated state-update library (cached by content hash, see build_emulated)."""
    return _emu_base.EmuLibrary.build("state", _emu_base.EMU / "driver_state.cpp", [KERNEL], ("ssd",),
                                      header=_emu_base.CSRC / "ssd" / "state_update.h",
                                      structs=("SsuArg", "SsuParams"))


def test_params_layout():
    emu().check_layouts()


def _arg(t, dims):
    a = emu().S["SsuArg"]()
    a.ptr = t.data_ptr()
    a.dtype = DT_ENUM[t.dtype]
    for k, d in enumerate(dims):
        a.s[k] = 0 if d < 0 else t.stride(d)
    return a


def _const_over(t, d):
    return t.shape[d] <= 1 or t.stride(d) == 0


def run_emulated(state, x, dt, A, B, C, D, z, dt_bias, softplus, idx, snaps, multi, parents=None, seed=None,
                 replay_to=None):
    """The op entry's parameter set-up (state_update.cpp, Mamba-2 form with a head dim) and one
    emulated launch. Mutates state (single step) / snaps; returns out (NaN-poisoned first)."""
    b, H, P, N = x.shape[0], state.shape[1], state.shape[2], state.shape[3]
    T = x.shape[1] if multi else 1
    G = B.shape[-2]
    out = torch.full(x.shape, float("nan"), dtype=x.dtype)
    p = emu().S["SsuParams"]()
    p.batch, p.seqlen, p.nheads, p.dim, p.dstate = b, T, H, P, N
    p.heads_per_group, p.state_rows, p.dt_softplus = H // G, state.shape[0], softplus
    p.state_dtype = DT_ENUM[state.dtype]
    p.state = state.data_ptr()
    for k in range(4):
        p.st_s[k] = state.stride(k)
    bthp = (lambda t: _arg(t, (0, 1, 2, 3))) if multi else (lambda t: _arg(t, (0, -1, 1, 2)))
    p.x, p.dt, p.B, p.C = bthp(x), bthp(dt), bthp(B), bthp(C)
    if z is not None:
        p.z = bthp(z)
    p.A = _arg(A, (0, 1, 2))
    if D is not None:
        p.D = _arg(D, (0, 1))
    if dt_bias is not None:
        p.dt_bias = _arg(dt_bias, (0, 1))
    idx_c = None if idx is None else idx.to(torch.int32).contiguous()
    p.state_indices = None if idx_c is None else idx_c.data_ptr()
    par_c = None if parents is None else parents.to(torch.int32).contiguous()
    p.parents = None if par_c is None else par_c.data_ptr()
    seed_t = None if seed is None else torch.tensor([seed], dtype=torch.int64)
    p.sr_seed = None if seed_t is None else seed_t.data_ptr()
    if not multi:
        p.in_place = True
        p.snap = state.data_ptr()
    elif snaps is not None:
        p.snap = snaps.data_ptr()
        for k in range(5):
            p.snap_s[k] = snaps.stride(k)
    p.out = out.data_ptr()
    p.out_dtype = DT_ENUM[out.dtype]
    a = bthp(out)
    for k in range(4):
        p.out_s[k] = a.s[k]
    upto = None if replay_to is None else replay_to.to(torch.int32).contiguous()
    if upto is not None:  # the replay: in place on the state, no snapshots, no outputs
        p.replay_to, p.in_place, p.snap, p.out = upto.data_ptr(), True, None, None
    p.head_decay = (_const_over(dt, x.dim() - 1) and (dt_bias is None or _const_over(dt_bias, 1))
                    and _const_over(A, 1) and _const_over(A, 2))
    emu().call("emu_ssu_cuda", p)
    return out


def make_inputs(b, T, H, P, G, N, sdtype, dtype, *, multi, head_decay, state_layout, idx, seed):
    torch.manual_seed(seed)
    rows = b + 2
    if state_layout == "contig":
        state = torch.randn(rows, H, P, N).to(sdtype)
    elif state_layout == "padded":  # 16-byte aligned rows with a gap: vector path
        state = torch.randn(rows, H, P, N + 16).to(sdtype)[..., :N]
    elif state_layout == "offset":  # strides multiples of 16 bytes, base 1 element off: scalar path
        vn = 16 // torch.empty((), dtype=sdtype).element_size()
        state = torch.randn(rows, H, P, N + vn).to(sdtype)[..., 1:N + 1]
    else:  # sliced: misaligned, scalar path
        state = torch.randn(rows, H, P, N + 3).to(sdtype)[..., 1:N + 1]
    lead = (b, T) if multi else (b,)
    x = torch.randn(*lead, H, P).to(dtype)
    z = torch.randn(*lead, H, P).to(dtype)
    B = torch.randn(*lead, G, N).to(dtype)
    C = torch.randn(*lead, G, N).to(dtype)
    if head_decay:  # Mamba-2: dt (b, [T,] H), A (H,), D / dt_bias (H,) expanded (stride 0)
        dt = (torch.randn(*lead, H) * 0.5 - 1.0).to(dtype).unsqueeze(-1).expand(*lead, H, P)
        A = (-torch.rand(H) * 2 - 0.05).view(H, 1, 1).expand(H, P, N)
        dt_bias = (torch.randn(H) * 0.5).view(H, 1).expand(H, P)
        D = torch.randn(H).view(H, 1).expand(H, P)
    else:
        dt = (torch.randn(*lead, H, P) * 0.5 - 1.0).to(dtype)
        A = -torch.rand(H, P, N) * 2 - 0.05
        dt_bias = torch.randn(H, P) * 0.5
        D = torch.randn(H, P)
    if idx == "perm":
        ind = torch.randperm(rows)[:b].to(torch.int32)
        ind[0] = -1  # a padded slot
    else:
        ind = None
    return dict(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias, idx=ind)


def snaps_ref_size(dtype):
    return torch.empty((), dtype=dtype).element_size()


def _same(a, b, what):
    assert a.shape == b.shape and a.dtype == b.dtype, what
    bits = torch.int16 if a.element_size() == 2 else torch.int32
    assert torch.equal(a.contiguous().view(bits), b.contiguous().view(bits)), \
        f"{what}: emulated CUDA differs from the CPU kernel (max abs diff {(a.float() - b.float()).abs().max().item()})"


# (b, T, H, P, G, N, state dtype, act dtype, head_decay, state layout, indices)
CASES = [
    (2, 1, 4, 5, 2, 16, torch.float32, torch.float32, True, "contig", None),       # NC = 1, ln = 4
    (3, 1, 2, 40, 1, 128, torch.float32, torch.bfloat16, False, "padded", "perm"),  # ln = 32, 2 tiles
    (2, 1, 2, 9, 2, 36, torch.float16, torch.float16, True, "sliced", "perm"),     # partial vectors, scalar path
    (1, 1, 2, 3, 1, 520, torch.bfloat16, torch.float32, False, "contig", None),    # NC = 4 (16-bit state)
    (2, 1, 2, 8, 1, 32, torch.float32, torch.float32, True, "offset", None),       # misaligned base only
    (2, 1, 2, 9, 1, 7, torch.float32, torch.float32, False, "contig", "perm"),     # ln = 2 < 4 rows: lane 0 outputs
]


@pytest.mark.parametrize("b,T,H,P,G,N,sd,dt_,hdec,lay,idx", CASES)
def test_single_step_bit_exact(b, T, H, P, G, N, sd, dt_, hdec, lay, idx):
    t = make_inputs(b, T, H, P, G, N, sd, dt_, multi=False, head_decay=hdec, state_layout=lay, idx=idx, seed=N + P)
    ref_state = t["state"].clone()
    emu_state = t["state"].clone()
    out_ref = nemokernels.selective_state_update(ref_state, t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"],
                                                 z=t["z"], dt_bias=t["dt_bias"], dt_softplus=True,
                                                 state_batch_indices=t["idx"])
    out_emu = run_emulated(emu_state, t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True,
                           t["idx"], None, multi=False)
    _same(out_emu, out_ref, "out")
    _same(emu_state, ref_state, "state")
    assert not torch.equal(emu_state, t["state"])  # the step did something


MULTI = [
    (2, 3, 4, 6, 2, 16, torch.float32, torch.float32, True, "contig", "perm"),
    (1, 4, 2, 33, 1, 64, torch.bfloat16, torch.bfloat16, False, "padded", None),   # 16-bit state, multi rows
    (2, 2, 2, 7, 2, 200, torch.float32, torch.float16, False, "sliced", None),     # NC = 2, scalar path
    (2, 2, 2, 5, 1, 32, torch.bfloat16, torch.float32, True, "offset", "perm"),    # misaligned base only
    (1, 3, 1, 5, 1, 1024, torch.bfloat16, torch.bfloat16, False, "contig", None),  # NC = 4: one token staged at a time
    (2, 2, 2, 6, 2, 8, torch.bfloat16, torch.float32, True, "padded", None),       # ln = 1: one vector per row
]


@pytest.mark.parametrize("b,T,H,P,G,N,sd,dt_,hdec,lay,idx", MULTI)
@pytest.mark.parametrize("snap_layout", ["contig", "strided", "offset"])
def test_multi_token_bit_exact(b, T, H, P, G, N, sd, dt_, hdec, lay, idx, snap_layout):
    t = make_inputs(b, T, H, P, G, N, sd, dt_, multi=True, head_decay=hdec, state_layout=lay, idx=idx, seed=T + N)
    state0 = t["state"].clone()
    if snap_layout == "contig":
        snaps_emu = torch.full((b, T, H, P, N), float("nan")).to(sd)
    elif snap_layout == "strided":  # a slice of a wider buffer, rows misaligned: scalar snapshot stores
        snaps_emu = torch.full((b, T, H, P, N + 1), float("nan")).to(sd)[..., 1:]
    else:  # strides multiples of 16 bytes, base one element off: scalar snapshot stores
        vn = 16 // snaps_ref_size(sd)
        snaps_emu = torch.full((b, T, H, P, N + vn), float("nan")).to(sd)[..., 1:N + 1]
    out_ref, snaps_ref = nemokernels.selective_state_update_multi(
        t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
        dt_softplus=True, state_batch_indices=t["idx"])
    out_emu = run_emulated(t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True,
                           t["idx"], snaps_emu, multi=True)
    _same(out_emu, out_ref, "out")
    _same(snaps_emu.contiguous(), snaps_ref, "intermediate_states")
    assert torch.equal(t["state"], state0)  # read only

    # without a snapshot buffer: outputs only
    out2 = run_emulated(t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True,
                        t["idx"], None, multi=True)
    _same(out2, out_ref, "out (no snapshots)")


def test_out_of_range_index_gives_nan():
    """An index >= rows (unchecked on CUDA): NaN outputs and snapshots, state untouched."""
    t = make_inputs(2, 2, 2, 4, 1, 16, torch.float32, torch.float32, multi=True, head_decay=True,
                    state_layout="contig", idx=None, seed=3)
    idx = torch.tensor([1, 99], dtype=torch.int32)
    state0 = t["state"].clone()
    snaps = torch.zeros(2, 2, 2, 4, 16)
    out = run_emulated(t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True,
                       idx, snaps, multi=True)
    assert torch.isnan(out[1]).all() and torch.isnan(snaps[1]).all()
    assert torch.equal(t["state"], state0)
    # The valid entry is exactly what the CPU kernel gives it (entry 1 padded there: the CPU
    # refuses an out-of-range index).
    out_ref, snaps_ref = nemokernels.selective_state_update_multi(
        t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
        dt_softplus=True, state_batch_indices=torch.tensor([1, -1], dtype=torch.int32))
    _same(out[:1], out_ref[:1], "out of the valid entry")
    _same(snaps[:1], snaps_ref[:1], "snapshots of the valid entry")


def test_duplicate_and_out_of_range_rows_stay_in_bounds():
    """The in-place step with index values the CUDA entry cannot check (no host sync): two
    entries naming one row, one past the end, one padded. Nothing outside the state is written
    (NaN guard rows around it stay NaN), rows no entry names are untouched, the out-of-range
    entry gives NaN and the padded one zeros."""
    H, P, N = 2, 4, 16
    t = make_inputs(4, 1, H, P, 1, N, torch.float32, torch.float32, multi=False, head_decay=True,
                    state_layout="contig", idx=None, seed=5)
    buf = torch.full((7, H, P, N), float("nan"))
    state = buf[1:6]  # 5 rows between guard rows 0 and 6
    state.copy_(t["state"][:5])
    before = state.clone()
    idx = torch.tensor([3, 3, 2**30, -1], dtype=torch.int32)
    out = run_emulated(state, t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True, idx,
                       None, multi=False)
    assert torch.isnan(buf[0]).all() and torch.isnan(buf[6]).all(), "memory around the state was written"
    for r in (0, 1, 2, 4):
        assert torch.equal(state[r], before[r]), f"row {r} (named by no entry) changed"
    assert torch.isnan(out[2]).all() and torch.equal(out[3], torch.zeros_like(out[3]))
    # The entries naming row 3 race on it on a GPU (unspecified result), but stay finite.
    assert torch.isfinite(state[3]).all() and torch.isfinite(out[:2]).all()


# Tree drafts (parents): per entry of b = 2, T = 5 / 3. Node 1 continues from token 0, node 2
# from the root's snapshot 0 again, node 3 from the state row, node 4 from node 2.
TREES = {5: [[-1, 0, 0, -1, 2], [-1, 0, 1, 1, 3]], 3: [[-1, -1, 0], [-1, 0, 0]]}


@pytest.mark.parametrize("b,T,H,P,G,N,sd,dt_,hdec,lay,idx", [
    (2, 5, 4, 6, 2, 16, torch.float32, torch.float32, True, "contig", "perm"),
    (2, 5, 2, 33, 1, 64, torch.bfloat16, torch.bfloat16, False, "padded", None),   # 16-bit state, multi rows
    (2, 3, 2, 7, 2, 200, torch.float32, torch.float16, False, "sliced", None),     # NC = 2, scalar path
    (2, 5, 1, 5, 1, 1024, torch.bfloat16, torch.bfloat16, False, "contig", None),  # NC = 4: tokens staged one at a time
])
@pytest.mark.parametrize("snap_layout", ["contig", "strided"])
def test_tree_bit_exact(b, T, H, P, G, N, sd, dt_, hdec, lay, idx, snap_layout):
    """The CUDA kernel's tree path (a node reloads its parent's snapshot or the state row)
    against the CPU kernel's, bit for bit."""
    t = make_inputs(b, T, H, P, G, N, sd, dt_, multi=True, head_decay=hdec, state_layout=lay, idx=idx, seed=T * N)
    parents = torch.tensor(TREES[T], dtype=torch.int32)
    state0 = t["state"].clone()
    if snap_layout == "contig":
        snaps_emu = torch.full((b, T, H, P, N), float("nan")).to(sd)
    else:
        snaps_emu = torch.full((b, T, H, P, N + 1), float("nan")).to(sd)[..., 1:]
    out_ref, snaps_ref = nemokernels.selective_state_update_multi(
        t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
        dt_softplus=True, state_batch_indices=t["idx"], parents=parents)
    out_chain, _ = nemokernels.selective_state_update_multi(
        t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
        dt_softplus=True, state_batch_indices=t["idx"])
    assert not torch.equal(out_ref, out_chain), "the tree must differ from the chain"
    out_emu = run_emulated(t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True,
                           t["idx"], snaps_emu, multi=True, parents=parents)
    _same(out_emu, out_ref, "out")
    _same(snaps_emu.contiguous(), snaps_ref, "intermediate_states")
    assert torch.equal(t["state"], state0)  # read only


def test_invalid_parent_gives_nan():
    """A parent the CUDA entry cannot check (no host sync) that is not in [-1, t): that node and
    its descendants are NaN, nothing is read out of bounds, the other nodes are exact."""
    t = make_inputs(2, 5, 2, 4, 1, 16, torch.float32, torch.float32, multi=True, head_decay=True,
                    state_layout="contig", idx=None, seed=11)
    good = torch.tensor([[-1, 0, 1, 1, 3], [-1, 0, 0, 2, 0]], dtype=torch.int32)
    bad = good.clone()
    bad[0, 3] = 4  # not earlier: nodes 3, 4
    bad[1, 2] = 2**30  # far out of range: nodes 2, 3
    snaps_g, snaps_b = torch.zeros(2, 5, 2, 4, 16), torch.zeros(2, 5, 2, 4, 16)
    args = (t["state"], t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["dt_bias"], True, None)
    out_g = run_emulated(*args, snaps_g, multi=True, parents=good)
    out_b = run_emulated(*args, snaps_b, multi=True, parents=bad)
    nan_nodes = {(0, 3), (0, 4), (1, 2), (1, 3)}
    for bb in range(2):
        for tt in range(5):
            if (bb, tt) in nan_nodes:
                assert out_b[bb, tt].isnan().all() and snaps_b[bb, tt].isnan().all(), f"node ({bb}, {tt})"
            else:
                _same(out_b[bb, tt], out_g[bb, tt], f"out of node ({bb}, {tt})")
                _same(snaps_b[bb, tt], snaps_g[bb, tt], f"snapshot of node ({bb}, {tt})")


@pytest.mark.parametrize("b,T,H,P,G,N,sd,dt_,hdec,lay,idx", [
    (3, 1, 2, 40, 1, 128, torch.bfloat16, torch.bfloat16, False, "padded", "perm"),
    (2, 1, 2, 9, 2, 36, torch.float16, torch.float16, True, "sliced", "perm"),      # partial vectors
    (1, 3, 1, 5, 1, 1024, torch.bfloat16, torch.bfloat16, False, "contig", None),  # multi, NC = 4
    (2, 5, 2, 33, 1, 64, torch.float16, torch.float32, True, "padded", None),      # multi + tree
])
def test_stochastic_rounding_bit_exact(b, T, H, P, G, N, sd, dt_, hdec, lay, idx):
    """Stochastic rounding of a 16-bit state (Philox bits per 4 elements, sr_bf16 / sr_f16)
    against the CPU kernel, bit for bit: the single step in place, or the snapshots."""
    multi = T > 1
    t = make_inputs(b, T, H, P, G, N, sd, dt_, multi=multi, head_decay=hdec, state_layout=lay, idx=idx, seed=N + T)
    if sd == torch.float16:  # reach float16's subnormal range too
        t["state"].mul_(1e-6)
    parents = torch.tensor(TREES[T][:b], dtype=torch.int32) if T in TREES else None
    keys = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    if not multi:
        ref_state, emu_state = t["state"].clone(), t["state"].clone()
        out_ref = nemokernels.selective_state_update(ref_state, *(t[k] for k in keys), True, t["idx"],
                                                     stochastic_rounding=True, seed=123)
        out_emu = run_emulated(emu_state, *(t[k] for k in keys), True, t["idx"], None, multi=False, seed=123)
        _same(out_emu, out_ref, "out")
        _same(emu_state, ref_state, "state")
        rtn = t["state"].clone()
        nemokernels.selective_state_update(rtn, *(t[k] for k in keys), True, t["idx"])
        assert not torch.equal(rtn, ref_state), "stochastic rounding changed nothing"
    else:
        snaps_emu = torch.full((b, T, H, P, N), float("nan")).to(sd)
        out_ref, snaps_ref = nemokernels.selective_state_update_multi(
            t["state"], *(t[k] for k in keys), True, t["idx"], parents=parents, stochastic_rounding=True, seed=-5)
        out_emu = run_emulated(t["state"], *(t[k] for k in keys), True, t["idx"], snaps_emu, multi=True,
                               parents=parents, seed=-5)
        _same(out_emu, out_ref, "out")
        _same(snaps_emu, snaps_ref, "intermediate_states")


@pytest.mark.parametrize("b,T,H,P,G,N,sd,dt_,hdec,lay,idx", [
    (3, 4, 4, 6, 2, 16, torch.float32, torch.float32, True, "contig", "perm"),
    (2, 5, 2, 33, 1, 64, torch.bfloat16, torch.bfloat16, False, "padded", None),    # 16-bit state, multi rows
    (2, 3, 2, 7, 2, 200, torch.float32, torch.float16, False, "sliced", "perm"),    # NC = 2, scalar path
    (1, 3, 1, 5, 1, 1024, torch.bfloat16, torch.bfloat16, True, "contig", None),   # NC = 4, one token staged
])
@pytest.mark.parametrize("mode", ["chain", "tree", "sr"])
def test_replay_bit_exact(b, T, H, P, G, N, sd, dt_, hdec, lay, idx, mode):
    """The replay commit (in place, tokens up to replay_to[b] or the path to that node) against
    the CPU kernel, bit for bit, at every accepted count."""
    if mode == "sr" and sd == torch.float32:
        pytest.skip("stochastic rounding is for 16-bit states")
    t = make_inputs(b, T, H, P, G, N, sd, dt_, multi=True, head_decay=hdec, state_layout=lay, idx=idx, seed=3 * T + N)
    trees = TREES.get(T, [[-1, 0, 0, 1], [-1, -1, 1, 0], [-1, 0, 1, 1]])
    parents = torch.tensor(trees[:b], dtype=torch.int32) if mode == "tree" else None
    seed = 77 if mode == "sr" else None
    keys = ("x", "dt", "A", "B", "C")
    for last in range(-1, T + 1):
        upto = torch.tensor([(last + e) % (T + 1) - 1 for e in range(b)], dtype=torch.int32)
        ref, emu_state = t["state"].clone(), t["state"].clone()
        kw = dict(accepted_node=upto, parents=parents) if mode == "tree" else dict(num_accepted=upto + 1)
        nemokernels.commit_state_replay(ref, *(t[k] for k in keys), t["dt_bias"], True, t["idx"],
                                        stochastic_rounding=seed is not None, seed=seed, **kw)
        run_emulated(emu_state, *(t[k] for k in keys), None, None, t["dt_bias"], True, t["idx"], None, multi=True,
                     parents=parents, seed=seed, replay_to=upto)
        _same(emu_state, ref, f"state after replaying to {upto.tolist()}")
