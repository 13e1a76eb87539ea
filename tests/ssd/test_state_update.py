"""selective_state_update / selective_state_update_multi / commit_state against the float64
reference (ssd/reference.py), the SSD scan, and each other."""
import pytest
import torch

import nemokernels as nk
from nemokernels.ssd.reference import (selective_state_update_multi_ref, selective_state_update_ref,
                                       ssd_scan_ref)

from conftest import DEVICES
from helpers import TOL, TREE_PARENTS, assert_close, bad_input_test, opcheck, poison_allocator, tree_path

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (state dtype, input dtype): float32 states with every input dtype, and 16-bit states.
DTYPE_PAIRS = [(F32, F32), (F32, BF16), (F32, F16), (BF16, BF16), (F16, F16)]


def worst(*dts):
    return max(dts, key=lambda d: TOL[d])


def make_inputs(batch, H, P, N, G, state_dtype, dtype, device, *, params="expanded", heads=True, T=None,
                slots=None, D=True, z=True, dt_bias=True, softplus=True):
    """Random decode-step inputs. params='expanded': Mamba-2's per-head dt, A, D, dt_bias
    expanded with stride 0; 'general': a value per (h, p[, n]). heads=False: the Mamba-1 form
    (H = G = 1, no head dim). T: multi-token shapes (b, T, ...). dt + dt_bias is a realistic
    pre-softplus value, or a positive step when softplus=False (else the state would grow)."""
    if not heads:
        H = G = 1
    lead = (batch,) if T is None else (batch, T)
    slots = batch if slots is None else slots
    d = dict(device=device)
    state = torch.randn(slots, H, P, N, dtype=state_dtype, **d)
    x = torch.randn(*lead, H, P, dtype=dtype, **d)
    zz = torch.randn(*lead, H, P, dtype=dtype, **d) if z else None
    B = torch.randn(*lead, G, N, dtype=dtype, **d)
    C = torch.randn(*lead, G, N, dtype=dtype, **d)
    def dt_like(*shape, dtype=torch.float32):
        if softplus:
            return (torch.randn(*shape, **d) * 0.5 - 1.0).to(dtype)
        return (torch.rand(*shape, **d) * 0.3 + 0.01).to(dtype)

    def bias_like(*shape):
        return torch.randn(*shape, **d) * 0.5 if softplus else torch.rand(*shape, **d) * 0.1

    if params == "expanded":
        dt = dt_like(*lead, H, dtype=dtype)[..., None].expand(*lead, H, P)
        A = (-torch.exp(torch.randn(H, **d) * 0.5))[:, None, None].expand(H, P, N)
        DD = torch.randn(H, **d)[:, None].expand(H, P) if D else None
        bias = bias_like(H)[:, None].expand(H, P) if dt_bias else None
    else:
        dt = dt_like(*lead, H, P, dtype=dtype)
        A = -torch.exp(torch.randn(H, P, N, **d) * 0.5)
        DD = torch.randn(H, P, **d) if D else None
        bias = bias_like(H, P) if dt_bias else None
    out = dict(state=state, x=x, dt=dt, A=A, B=B, C=C, D=DD, z=zz, dt_bias=bias)
    if not heads:  # drop the head / group dims
        k = len(lead)
        out.update(state=state[:, 0], x=x.select(k, 0), dt=dt.select(k, 0), A=A[0], B=B.select(k, 0),
                   C=C.select(k, 0), D=None if DD is None else DD[0], z=None if zz is None else zz.select(k, 0),
                   dt_bias=None if bias is None else bias[0])
    return out


def d64(t):
    return None if t is None else t.double()


def ref_single(inp, softplus, idx=None):
    out, new = selective_state_update_ref(*(d64(inp[k]) for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")),
                                          softplus, idx)
    return out, new


def run_single(inp, softplus, idx=None):
    return nk.selective_state_update(inp["state"], inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"],
                                     inp["z"], inp["dt_bias"], softplus, idx)


def run_multi(inp, softplus, idx=None, inter=None):
    return nk.selective_state_update_multi(inp["state"], inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"],
                                           inp["D"], inp["z"], inp["dt_bias"], softplus, idx, inter)


def check_single(inp, softplus, idx=None, state_dtype=F32, dtype=F32):
    ref_out, ref_state = ref_single(inp, softplus, idx)
    before = inp["state"].clone()
    poison_allocator(inp["x"].device)
    out = run_single(inp, softplus, idx)
    assert out.shape == inp["x"].shape and out.dtype == inp["x"].dtype
    # out sums N rounded state terms against random-signed C: cancellation roughly doubles the
    # relative error of the 16-bit cases (observed up to 0.6x the dtype tolerance), hence 2x.
    assert_close(out, ref_out, worst(state_dtype, dtype), factor=2, what="out")
    assert_close(inp["state"], ref_state, worst(state_dtype, dtype), what="state")
    if idx is not None:  # rows nobody indexes: bit for bit untouched
        used = set(int(i) for i in idx.cpu() if i >= 0)
        for r in range(before.shape[0]):
            if r not in used:
                assert torch.equal(inp["state"][r], before[r]), f"state row {r} was touched"
        for b, i in enumerate(idx.cpu().tolist()):
            if i < 0:
                assert torch.equal(out[b], torch.zeros_like(out[b])), "padded entry must output zeros"


# Shapes (batch, H, P, N, G): lanes per row from 2 to 32, 1-4 vectors per lane, P not a
# multiple of a block's rows, N not a multiple of the 16-byte vector.
SHAPES = [(3, 4, 5, 16, 2), (2, 6, 70, 128, 3), (1, 2, 3, 200, 1), (2, 2, 4, 512, 2), (2, 4, 8, 7, 4)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype,dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("params", ["expanded", "general"])
def test_single_matches_reference(device, state_dtype, dtype, params):
    for i, (batch, H, P, N, G) in enumerate(SHAPES):
        # Options on for the first shapes, then each off in turn.
        opts = [dict(), dict(D=False), dict(z=False), dict(dt_bias=False), dict(D=False, z=False, dt_bias=False)][i]
        for softplus in (True, False):
            inp = make_inputs(batch, H, P, N, G, state_dtype, dtype, device, params=params, softplus=softplus, **opts)
            check_single(inp, softplus, state_dtype=state_dtype, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype,dtype", [(F32, F32), (BF16, BF16), (F32, BF16)])
def test_mamba1_shapes_without_head_dim(device, state_dtype, dtype):
    for params in ("expanded", "general"):
        inp = make_inputs(3, 1, 24, 16, 1, state_dtype, dtype, device, params=params, heads=False)
        assert inp["state"].dim() == 3 and inp["x"].dim() == 2 and inp["B"].dim() == 2
        check_single(inp, True, state_dtype=state_dtype, dtype=dtype)
        minp = make_inputs(2, 1, 24, 16, 1, state_dtype, dtype, device, params=params, heads=False, T=3)
        out, inter = run_multi(minp, True)
        ref_out, ref_inter = selective_state_update_multi_ref(*(d64(minp[k]) for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")), True)
        assert out.shape == minp["x"].shape and inter.shape == (2, 3, 24, 16)
        assert_close(out, ref_out, worst(state_dtype, dtype), factor=2)
        assert_close(inter, ref_inter, worst(state_dtype, dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("G", [1, 2, 8])
def test_ngroups(device, G):
    inp = make_inputs(2, 8, 16, 32, G, F32, F32, device)
    check_single(inp, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype,dtype", [(F32, BF16), (BF16, BF16)])
def test_state_batch_indices_permutation_and_pads(device, state_dtype, dtype):
    slots = 9
    for idx in ([4, 0, 8, 2], [-1, 3, -1, 7], [-1, -1, -1, -1]):
        inp = make_inputs(4, 4, 16, 64, 2, state_dtype, dtype, device, slots=slots)
        check_single(inp, True, torch.tensor(idx, dtype=torch.int32, device=device), state_dtype, dtype)
    # int64 indices are converted by the Python wrapper
    inp = make_inputs(2, 2, 4, 16, 1, F32, F32, device, slots=3)
    check_single(inp, True, torch.tensor([2, 0], device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    """A state that is a slice of a wider buffer and one whose N stride is not 1, and inputs
    that are slices: every operand goes by its strides."""
    batch, H, P, N, G = 3, 4, 8, 32, 2
    for layout in ("padded", "transposed"):
        inp = make_inputs(batch, H, P, N, G, F32, BF16, device, params="general")
        if layout == "padded":
            buf = torch.randn(batch + 2, H, P, N + 3, device=device)
            state = buf[1:batch + 1, :, :, 1:N + 1]
            outside = buf.clone()
        else:
            state = torch.randn(batch, H, N, P, device=device).transpose(-1, -2)
        state.copy_(inp["state"])
        inp["state"] = state
        inp["x"] = torch.randn(batch, H, 2 * P, device=device, dtype=BF16)[..., ::2]
        inp["B"] = torch.randn(batch, N, G, device=device, dtype=BF16).transpose(1, 2)
        inp["A"] = inp["A"].transpose(0, 1).contiguous().transpose(0, 1)
        inp["D"] = torch.randn(P, H, device=device).t()
        check_single(inp, True, state_dtype=F32, dtype=BF16)
        if layout == "padded":  # what lies around the state view stays intact
            for sl in ((0,), (batch + 1,), (slice(None), slice(None), slice(None), 0),
                       (slice(None), slice(None), slice(None), slice(N + 1, None))):
                assert torch.equal(buf[sl], outside[sl]), f"buffer outside the state view changed at {sl}"


@pytest.mark.parametrize("device", DEVICES)
def test_fast_path_equals_general_path(device):
    """The stride-0 head-decay fast path and the general path give the same bits."""
    inp = make_inputs(2, 4, 16, 128, 2, F32, BF16, device)
    gen = {k: (v.contiguous() if torch.is_tensor(v) else v) for k, v in inp.items()}
    gen["state"] = inp["state"].clone()
    out_fast = run_single(inp, True)
    out_gen = run_single(gen, True)
    assert torch.equal(out_fast, out_gen) and torch.equal(inp["state"], gen["state"])


# ---------------------------------------------------------------- multi-token


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype,dtype", DTYPE_PAIRS)
def test_multi_equals_single_steps(device, state_dtype, dtype):
    """T multi-token positions give bit for bit the outputs and states of T single steps, and
    the state itself is not modified."""
    T, slots = 4, 5
    for params in ("expanded", "general"):
        inp = make_inputs(3, 4, 10, 48, 2, state_dtype, dtype, device, params=params, T=T, slots=slots)
        idx = torch.tensor([3, -1, 0], dtype=torch.int32, device=device)
        before = inp["state"].clone()
        inter = torch.full((3, T, 4, 10, 48), float("nan"), dtype=state_dtype, device=device)
        poison_allocator(device)
        out, got = run_multi(inp, True, idx, inter)
        assert got is inter and torch.equal(inp["state"], before), "multi must not modify state"
        st = before.clone()
        for t in range(T):
            step = {k: (v[:, t] if k in ("x", "dt", "z", "B", "C") else v) for k, v in inp.items()}
            step["state"] = st
            o = run_single(step, True, idx)
            assert torch.equal(out[:, t], o), f"out differs at position {t}"
            for b, r in enumerate(idx.tolist()):
                if r >= 0:
                    assert torch.equal(inter[b, t], st[r]), f"snapshot {t} of entry {b} differs"
        assert torch.equal(inter[1], torch.zeros_like(inter[1])) and torch.equal(out[1], torch.zeros_like(out[1]))
        ref_out, ref_inter = selective_state_update_multi_ref(
            *(d64(inp[k]) for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")), True, idx)
        assert_close(out, ref_out, worst(state_dtype, dtype), factor=2)
        assert_close(inter, ref_inter, worst(state_dtype, dtype), factor=2)


@pytest.mark.parametrize("device", DEVICES)
def test_multi_without_snapshot_buffer_argument(device):
    inp = make_inputs(2, 2, 8, 16, 1, F32, F32, device, T=3)
    out, inter = nk.selective_state_update_multi(inp["state"], inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"],
                                                 inp["D"], inp["z"], inp["dt_bias"], True)
    assert inter.shape == (2, 3, 2, 8, 16) and inter.dtype == inp["state"].dtype
    # The snapshots the wrapper allocates are those an explicit buffer receives.
    buf = torch.full_like(inter, float("nan"))
    out3, inter3 = run_multi(inp, True, None, buf)
    assert inter3 is buf and torch.equal(out3, out) and torch.equal(inter, buf)
    # The raw op without a buffer computes the outputs only.
    out2 = torch.ops.nemokernels.selective_state_update_multi(
        inp["state"], inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"], inp["dt_bias"], True,
        None, None)
    assert torch.equal(out, out2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype", [F32, BF16])
def test_commit_state_every_accepted_length(device, state_dtype):
    T, slots, batch = 4, 7, 4
    inp = make_inputs(batch, 4, 8, 32, 2, state_dtype, BF16, device, T=T, slots=slots)
    idx = torch.tensor([5, -1, 0, 2], dtype=torch.int32, device=device)
    out, inter = run_multi(inp, True, idx)
    # state after k single steps, per k
    after = [inp["state"].clone()]
    for t in range(T):
        step = {k: (v[:, t] if k in ("x", "dt", "z", "B", "C") else v) for k, v in inp.items()}
        step["state"] = after[-1].clone()
        run_single(step, True, idx)
        after.append(step["state"])
    cases = [[k] * batch for k in range(T + 1)] + [[2, 3, 0, 4], [4, 0, 1, 0], [7, 2, -1, 1]]
    for acc in cases:
        state = inp["state"].clone()
        nk.commit_state(state, inter, torch.tensor(acc, device=device), idx)
        want = inp["state"].clone()
        for b, r in enumerate(idx.tolist()):
            if r >= 0:
                want[r] = after[min(max(acc[b], 0), T)][r]
        assert torch.equal(state, want), f"commit_state wrong for num_accepted={acc}"
    # without indices: entry b is row b
    inp2 = make_inputs(2, 2, 4, 16, 1, state_dtype, BF16, device, T=T, softplus=False)
    _, inter2 = run_multi(inp2, False)
    state = inp2["state"].clone()
    nk.commit_state(state, inter2, torch.tensor([0, 3], device=device))
    assert torch.equal(state[0], inp2["state"][0]) and torch.equal(state[1], inter2[1, 2])


# ---------------------------------------------------------------- tree drafts

TOKEN_KEYS = ("x", "dt", "z", "B", "C")


def on_path(inp, path):
    """The inputs of the chain that runs the tokens of `path` in order."""
    return {k: (v[:, path] if k in TOKEN_KEYS and v is not None else v) for k, v in inp.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype,dtype", DTYPE_PAIRS)
def test_tree_equals_chain_along_every_path(device, state_dtype, dtype):
    """Tree drafts: node t's output and snapshot are bit for bit those of the chain update run
    on the tokens of the root-to-t path, for every node of every entry, and within the
    tolerance of the float64 reference on that path; the state is not modified."""
    T, slots = len(TREE_PARENTS[0]), 5
    parents = torch.tensor(TREE_PARENTS, device=device)
    for params in ("expanded", "general"):
        inp = make_inputs(3, 4, 10, 48, 2, state_dtype, dtype, device, params=params, T=T, slots=slots)
        idx = torch.tensor([3, 0, -1], dtype=torch.int32, device=device)
        before = inp["state"].clone()
        inter = torch.full((3, T, 4, 10, 48), float("nan"), dtype=state_dtype, device=device)
        poison_allocator(device)
        out, _ = nk.selective_state_update_multi(*(inp[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z",
                                                                     "dt_bias")), True, idx, inter, parents=parents)
        assert torch.equal(inp["state"], before), "a tree step must not modify state"
        ref_out, ref_inter = torch.zeros_like(out, dtype=torch.float64), torch.zeros_like(inter, dtype=torch.float64)
        for b in range(2):  # entry 2 is padded
            for t in range(T):
                path = tree_path(TREE_PARENTS[b], t)
                sub = on_path(inp, path)
                o, s = run_multi(sub, True, idx)
                assert torch.equal(out[b, t], o[b, -1]), f"entry {b} node {t}: out differs from the chain {path}"
                assert torch.equal(inter[b, t], s[b, -1]), f"entry {b} node {t}: snapshot differs from the chain {path}"
                r_out, r_inter = selective_state_update_multi_ref(
                    *(d64(sub[k]) for k in ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")), True, idx)
                ref_out[b, t], ref_inter[b, t] = r_out[b, -1], r_inter[b, -1]
        assert torch.equal(out[2], torch.zeros_like(out[2])) and torch.equal(inter[2], torch.zeros_like(inter[2]))
        assert_close(out, ref_out, worst(state_dtype, dtype), factor=2)
        assert_close(inter, ref_inter, worst(state_dtype, dtype), factor=2)


@pytest.mark.parametrize("device", DEVICES)
def test_chain_parents_equal_no_parents(device):
    """parents = [-1, 0, 1, ...] is the chain: bit for bit the update without parents."""
    inp = make_inputs(2, 2, 8, 32, 1, BF16, BF16, device, T=5)
    inter_a, inter_b = (torch.full((2, 5, 2, 8, 32), float("nan"), dtype=BF16, device=device) for _ in range(2))
    out_a, _ = run_multi(inp, True, None, inter_a)
    chain = torch.arange(-1, 4, device=device).expand(2, 5)
    out_b, _ = nk.selective_state_update_multi(*(inp[k] for k in ("state", "x", "dt", "A", "B", "C", "D", "z",
                                                                   "dt_bias")), True, None, inter_b, parents=chain)
    assert torch.equal(out_a, out_b) and torch.equal(inter_a, inter_b)


@pytest.mark.gpu
def test_invalid_parent_gives_nan_on_cuda():
    """CUDA cannot refuse parent values without a host sync: a node whose parent is not in
    [-1, t) gets NaN outputs and snapshots, and so do its descendants; other nodes are exact."""
    T = 6
    inp = make_inputs(2, 2, 8, 16, 1, F32, F32, "cuda", T=T)
    good = torch.tensor([[-1, 0, 1, 1, 3, 0], [-1, 0, 0, 2, 3, 4]], device="cuda")
    bad = good.clone()
    bad[0, 3] = 5  # not an earlier token: node 3 and its child 4 are NaN
    bad[1, 2] = -7  # out of range: nodes 2..5 descend from it
    keys = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    out_g, inter_g = nk.selective_state_update_multi(*(inp[k] for k in keys), True, parents=good)
    out_b, inter_b = nk.selective_state_update_multi(*(inp[k] for k in keys), True, parents=bad)
    torch.cuda.synchronize()
    nan_nodes = {(0, 3), (0, 4), (1, 2), (1, 3), (1, 4), (1, 5)}
    for b in range(2):
        for t in range(T):
            if (b, t) in nan_nodes:
                assert out_b[b, t].isnan().all() and inter_b[b, t].isnan().all(), f"node ({b}, {t}) must be NaN"
            else:
                assert torch.equal(out_b[b, t], out_g[b, t]) and torch.equal(inter_b[b, t], inter_g[b, t])


@pytest.mark.parametrize("device", DEVICES)
def test_commit_accepted_node_after_tree_verification(device):
    """A tree step, verify_tree_greedy on its logits, and commit_state(accepted_node=...): each
    state row becomes the state after the accepted path, i.e. the single steps along it."""
    trees = [[-1, 0, 0, 1, 2, 1, 3], [-1, 0, 1, 2, 3, 4, 5], [-1, 0, 1, 0, 3, 1, 5]]  # one root each
    T, V = len(trees[0]), 3
    torch.manual_seed(7)
    inp = make_inputs(3, 4, 8, 16, 2, F32, BF16, device, T=T, slots=4)
    idx = torch.tensor([2, 0, 3], dtype=torch.int32, device=device)
    parents = torch.tensor(trees, device=device)
    keys = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    _, inter = nk.selective_state_update_multi(*(inp[k] for k in keys), True, idx, parents=parents)
    seen = set()
    for trial in range(12):  # random drafts and logits: accepted paths of several depths
        cand = torch.randint(0, V, (3, T), device=device)
        logits = torch.randn(3, T, V, device=device)
        _, nodes, num = nk.speculative.verify_tree_greedy(cand, parents, logits)
        last = nodes.gather(1, num.long().clamp(min=0)[:, None])[:, 0]
        state = inp["state"].clone()
        nk.commit_state(state, inter, state_batch_indices=idx, accepted_node=last)
        want = inp["state"].clone()
        for b, r in enumerate(idx.tolist()):
            path = tree_path(trees[b], int(last[b]))
            seen.add(len(path))
            st = inp["state"].clone()
            for t in path:
                step = {k: (v[:, t] if k in TOKEN_KEYS else v) for k, v in inp.items()}
                step["state"] = st
                run_single(step, True, idx)
            want[r] = st[r]
            # the same commit through num_accepted
            alt = inp["state"].clone()
            nk.commit_state(alt, inter, last.long() + 1, idx)
            assert torch.equal(alt, state)
        assert torch.equal(state, want), f"commit after the tree step differs (accepted nodes {last.tolist()})"
    assert len(seen) >= 2, "the trials should accept paths of several lengths"
    # a negative node keeps the old state
    state = inp["state"].clone()
    nk.commit_state(state, inter, state_batch_indices=idx, accepted_node=torch.full((3,), -1, device=device))
    assert torch.equal(state, inp["state"])


@pytest.mark.parametrize("device", DEVICES)
def test_mamba_mixer_tree_step_equals_decoding_the_accepted_path(device):
    """A Mamba-2 mixer's decode over a draft tree with no host sync: the conv and the SSM over
    the tree, greedy tree verification, then commit_conv_state and commit_state for the last
    accepted node. Outputs along the accepted path and both caches afterwards equal decoding that
    path one token at a time (single-token conv and SSM updates), bit for bit."""
    torch.manual_seed(3)
    trees = [[-1, 0, 0, 1, 2, 1, 3], [-1, 0, 1, 2, 3, 4, 5], [-1, 0, 1, 0, 3, 1, 5]]
    batch, T, H, P, N, G, W, V = 3, 7, 2, 4, 8, 1, 4, 3
    conv_dim = H * P + 2 * G * N
    d = dict(device=device)
    xbc = torch.randn(batch, conv_dim, T, **d)
    w, bconv = torch.randn(conv_dim, W, **d) / 2, torch.randn(conv_dim, **d)
    conv0, ssm0 = torch.randn(batch, conv_dim, W - 1, **d), torch.randn(batch, H, P, N, **d)
    dt = (torch.randn(batch, T, H, **d) * 0.5 - 1)[..., None].expand(batch, T, H, P)
    A = (-torch.rand(H, **d) - 0.5)[:, None, None].expand(H, P, N)
    D, dt_bias = torch.randn(H, **d)[:, None].expand(H, P), torch.randn(H, **d)[:, None].expand(H, P)

    def split(xc):  # (b, conv_dim, T') -> x (b, T', H, P), B, C (b, T', G, N)
        xc = xc.transpose(1, 2)
        b_, t_ = xc.shape[:2]
        x, B, C = xc.split([H * P, G * N, G * N], dim=-1)
        return x.reshape(b_, t_, H, P), B.reshape(b_, t_, G, N), C.reshape(b_, t_, G, N)

    parents = torch.tensor(trees, **d)
    conv, ssm = conv0.clone(), ssm0.clone()
    x, B, C = split(nk.causal_conv1d_update(xbc, conv, w, bconv, activation="silu", parents=parents))
    y, inter = nk.selective_state_update_multi(ssm, x, dt, A, B, C, D, None, dt_bias, True, parents=parents)
    seen = set()
    for trial in range(8):
        cand = torch.randint(0, V, (batch, T), **d)
        _, nodes, num = nk.speculative.verify_tree_greedy(cand, parents, torch.randn(batch, T, V, **d))
        last = nodes.gather(1, num.long()[:, None])[:, 0]
        conv_c, ssm_c = conv.clone(), ssm.clone()
        nk.commit_conv_state(conv_c, xbc, last, parents)
        nk.commit_state(ssm_c, inter, accepted_node=last)
        for e in range(batch):
            path = tree_path(trees[e], int(last[e]))
            seen.add(len(path))
            cs, ss = conv0.clone(), ssm0.clone()
            for t in path:
                xt, Bt, Ct = split(nk.causal_conv1d_update(xbc[:, :, t], cs, w, bconv, activation="silu")[:, :, None])
                yt = nk.selective_state_update(ss, xt[:, 0], dt[:, t], A, Bt[:, 0], Ct[:, 0], D, None, dt_bias, True)
                assert torch.equal(y[e, t], yt[e]), f"entry {e}: output of node {t} differs"
            assert torch.equal(conv_c[e], cs[e]) and torch.equal(ssm_c[e], ss[e]), f"entry {e}: caches differ"
    assert len(seen) >= 2


# ---------------------------------------------------------------- commit by replay


def replay(inp, idx=None, **kw):
    return nk.commit_state_replay(inp["state"], inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], inp["dt_bias"],
                                  True, idx, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype,dtype", [(F32, BF16), (BF16, BF16), (F16, F32)])
def test_replay_equals_snapshot_commit(device, state_dtype, dtype):
    """commit_state_replay leaves bit for bit the state commit_state copies from the snapshots:
    chains at every accepted length (clamped, padded rows, permuted rows), trees at every node,
    and stochastically rounded 16-bit states with the same seed."""
    T, slots, keys = 4, 6, ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    inp = make_inputs(4, 4, 8, 32, 2, state_dtype, dtype, device, T=T, slots=slots)
    idx = torch.tensor([5, -1, 0, 2], dtype=torch.int32, device=device)
    _, inter = run_multi(inp, True, idx)
    for acc in [[k] * 4 for k in range(T + 1)] + [[2, 3, 0, 4], [7, 2, -1, 1]]:
        acc = torch.tensor(acc, device=device)
        want, got = inp["state"].clone(), inp["state"].clone()
        nk.commit_state(want, inter, acc, idx)
        replay({**inp, "state": got}, idx, num_accepted=acc)
        assert torch.equal(got, want), f"replay differs from the snapshot commit for num_accepted={acc.tolist()}"
    tree_inp = make_inputs(3, 4, 8, 32, 2, state_dtype, dtype, device, T=len(TREE_PARENTS[0]), slots=4)
    parents = torch.tensor(TREE_PARENTS, device=device)
    tidx = torch.tensor([3, 0, 1], dtype=torch.int32, device=device)
    _, tinter = nk.selective_state_update_multi(*(tree_inp[k] for k in keys), True, tidx, parents=parents)
    for node in range(-1, len(TREE_PARENTS[0])):
        nodes = torch.tensor([node, (node + 2) % 7, 6 - max(node, 0)], device=device)
        want, got = tree_inp["state"].clone(), tree_inp["state"].clone()
        nk.commit_state(want, tinter, state_batch_indices=tidx, accepted_node=nodes)
        replay({**tree_inp, "state": got}, tidx, accepted_node=nodes, parents=parents)
        assert torch.equal(got, want), f"tree replay differs at nodes {nodes.tolist()}"
    if state_dtype != F32:
        _, sinter = nk.selective_state_update_multi(*(tree_inp[k] for k in keys), True, tidx, parents=parents,
                                                    stochastic_rounding=True, seed=9)
        nodes = torch.tensor([4, 6, 5], device=device)
        want, got = tree_inp["state"].clone(), tree_inp["state"].clone()
        nk.commit_state(want, sinter, state_batch_indices=tidx, accepted_node=nodes)
        replay({**tree_inp, "state": got}, tidx, accepted_node=nodes, parents=parents, stochastic_rounding=True,
               seed=9)
        assert torch.equal(got, want), "stochastically rounded replay differs"


@pytest.mark.parametrize("device", DEVICES)
def test_replay_touches_only_the_accepted_rows(device):
    """Rows no entry names, padded entries and entries with nothing accepted keep their bits;
    the raw op returns nothing and writes nothing else."""
    inp = make_inputs(3, 2, 4, 16, 1, F32, F32, device, T=3, slots=5)
    idx = torch.tensor([4, -1, 1], dtype=torch.int32, device=device)
    before = inp["state"].clone()
    replay(inp, idx, num_accepted=torch.tensor([0, 3, 2], device=device))
    for r in (0, 2, 3, 4):
        assert torch.equal(inp["state"][r], before[r]), f"row {r} changed"
    assert not torch.equal(inp["state"][1], before[1])


# ---------------------------------------------------------------- stochastic rounding of 16-bit states


def _spacing(v, dtype):
    """The gap between the 16-bit neighbours around float32 values v (away from 0)."""
    mant = 7 if dtype == BF16 else 10
    e = torch.frexp(v.float()).exponent - 1  # floor(log2 |v|)
    if dtype == F16:
        e = e.clamp(min=-14)
    return torch.ldexp(torch.ones_like(v, dtype=torch.float32), e - mant)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state_dtype,scale", [(BF16, 1.0), (F16, 1.0), (F16, 1e-6)])
def test_stochastic_rounding_is_unbiased(device, state_dtype, scale):
    """Every stochastically rounded state is one of the two 16-bit neighbours of the unrounded
    float32 state (the same step run on a float32 copy), and over many seeds its mean is that
    value: per element within a few standard errors, where round to nearest is off by up to half
    a step. scale 1e-6: float16's subnormal range."""
    inp = make_inputs(2, 4, 8, 16, 2, state_dtype, F32, device)
    for k in ("state", "x", "B"):
        inp[k] = (inp[k].float() * scale**0.5 if k != "state" else inp[k].float() * scale).to(inp[k].dtype)
    exact_state = inp["state"].float()
    run_single({**inp, "state": exact_state}, True)
    gap = _spacing(exact_state, state_dtype)
    seeds, total = 256, torch.zeros_like(exact_state, dtype=torch.float64)
    for k in range(seeds):
        st = inp["state"].clone()
        nk.selective_state_update(st, *(inp[k2] for k2 in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")), True,
                                  stochastic_rounding=True, seed=1000 + k)
        err = (st.float() - exact_state) / gap
        assert (err.abs() < 1).all(), "a stochastically rounded value is not a neighbour of the exact one"
        total += err.double()
    bias = (total / seeds).abs()
    rtn = inp["state"].clone()
    run_single({**inp, "state": rtn}, True)
    rtn_bias = ((rtn.float() - exact_state) / gap).abs()
    # SR: |mean| ~ |N(0, <= 0.5 / 16)| per element, mean over elements ~ 0.02; nearest ~ 0.25.
    assert bias.mean() < 0.05 and bias.max() < 0.25, (bias.mean(), bias.max())
    assert rtn_bias.double().mean() > 0.15  # the test can tell the two apart


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_keeps_slow_decays(device):
    """A bfloat16 state decaying by 0.999 per step with no input: round to nearest rounds every
    step back to 1.0 (the decay is below half a step), stochastic rounding follows 0.999^t in
    expectation."""
    steps, H, P, N = 200, 2, 16, 32
    state = torch.ones(1, H, P, N, dtype=BF16, device=device)
    x = torch.zeros(1, H, P, device=device)
    dt = torch.full((1, H, P), 1e-3, device=device)
    A = -torch.ones(H, P, N, device=device)
    B = C = torch.zeros(1, 1, N, device=device)
    rtn, sr = state.clone(), state.clone()
    seed = torch.tensor([7], device=device)
    for _ in range(steps):
        nk.selective_state_update(rtn, x, dt, A, B, C)
        nk.selective_state_update(sr, x, dt, A, B, C, stochastic_rounding=True, seed=seed)
        seed += 1
    want = torch.exp(torch.tensor(-1e-3 * steps, dtype=torch.float64)).item()
    assert torch.equal(rtn, state), "round to nearest was expected to stall at 1.0"
    assert abs(sr.double().mean().item() - want) < 0.01 * want, (sr.double().mean().item(), want)


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_bits_follow_seed_and_row(device):
    """One seed gives bit-identical states, another seed differs; the bits follow the state row,
    not the batch position; a 1-token multi update draws the single step's bits; a float32
    state is refused."""
    inp = make_inputs(3, 4, 8, 32, 2, BF16, F32, device, slots=3)
    keys = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")

    def single(state, idx=None, seed=5, perm=None):
        args = [inp[k] if perm is None or k not in ("x", "dt", "B", "C", "z") else inp[k][perm] for k in keys]
        return nk.selective_state_update(state, *args, True, idx, stochastic_rounding=True, seed=seed)

    a, b, c = (inp["state"].clone() for _ in range(3))
    single(a), single(b), single(c, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    perm = torch.tensor([2, 0, 1], device=device)
    d = inp["state"].clone()
    single(d, idx=perm.to(torch.int32), perm=perm)
    assert torch.equal(d, a), "entry order changed the rounding bits"
    one = {k: (v[:, None] if k in ("x", "dt", "B", "C", "z") else v) for k, v in inp.items()}
    _, snap = nk.selective_state_update_multi(inp["state"], *(one[k] for k in keys), True, stochastic_rounding=True,
                                              seed=5)
    assert torch.equal(snap[:, 0], a)
    with pytest.raises(RuntimeError, match="stochastic rounding \\(rounding_seed\\) applies to a float16 / bfloat16"):
        nk.selective_state_update(inp["state"].float(), *(inp[k] for k in keys), True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="seed is given but stochastic_rounding is False"):
        nk.selective_state_update(inp["state"].clone(), *(inp[k] for k in keys), True, seed=3)


# ---------------------------------------------------------------- the decode step is the scan


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("multi", [False, True])
def test_decode_steps_equal_ssd_scan(device, multi):
    """T decode steps from h0 equal the SSD recurrence (ssd_scan_ref) on the same T tokens
    with initial_states = h0: outputs and final state."""
    b, L, H, P, N, G = 2, 6, 4, 8, 32, 2
    dev = dict(device=device)
    x = torch.randn(b, L, H, P, **dev)
    dt = torch.randn(b, L, H, **dev) * 0.5 - 1.0
    A = -torch.exp(torch.randn(H, **dev) * 0.5)
    B = torch.randn(b, L, G, N, **dev)
    C = torch.randn(b, L, G, N, **dev)
    D = torch.randn(H, **dev)
    z = torch.randn(b, L, H, P, **dev)
    dt_bias = torch.randn(H, **dev) * 0.5
    h0 = torch.randn(b, H, P, N, **dev)
    y_ref, h_ref = ssd_scan_ref(x.double(), dt.double(), A.double(), B.double(), C.double(), D=D.double(),
                                z=z.double(), dt_bias=dt_bias.double(), initial_states=h0.double(),
                                dt_softplus=True, return_final_states=True)
    Ae, De, be = A[:, None, None].expand(H, P, N), D[:, None].expand(H, P), dt_bias[:, None].expand(H, P)
    state = h0.clone()
    if multi:
        y, inter = nk.selective_state_update_multi(state, x, dt[..., None].expand(b, L, H, P), Ae, B, C, De, z, be,
                                                   dt_softplus=True)
        h = inter[:, -1]
        assert torch.equal(state, h0)
    else:
        ys = [nk.selective_state_update(state, x[:, t], dt[:, t, :, None].expand(b, H, P), Ae, B[:, t], C[:, t], De,
                                        z[:, t], be, dt_softplus=True) for t in range(L)]
        y, h = torch.stack(ys, 1), state
    assert_close(y, y_ref, F32, factor=5, what="y")
    assert_close(h, h_ref, F32, factor=5, what="final state")


# ---------------------------------------------------------------- errors, empty inputs


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    inp = make_inputs(0, 4, 8, 16, 2, F32, F32, device, slots=2)
    assert run_single(inp, True).shape == (0, 4, 8)
    inp = make_inputs(2, 4, 8, 16, 2, F32, F32, device, T=0)
    out, inter = run_multi(inp, True)
    assert out.shape == (2, 0, 4, 8) and inter.shape == (2, 0, 4, 8, 16)
    state = inp["state"].clone()
    nk.commit_state(state, inter, torch.zeros(2, dtype=torch.long, device=device))
    assert torch.equal(state, inp["state"])


def test_multi_indices_may_repeat_on_cpu():
    """The multi-token update only reads the state: rows may repeat (the refusals are in test_bad_input)."""
    minp = make_inputs(2, 2, 4, 16, 1, F32, F32, "cpu", slots=3, T=2)
    run_multi(minp, True, torch.tensor([1, 1], dtype=torch.int32))


@pytest.mark.gpu
def test_index_out_of_range_gives_nan_on_cuda():
    inp = make_inputs(2, 2, 4, 16, 1, F32, F32, "cuda", slots=3)
    before = inp["state"].clone()
    out = run_single(inp, True, torch.tensor([7, 0], dtype=torch.int32, device="cuda"))
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
    assert torch.equal(inp["state"][1:], before[1:])
    minp = make_inputs(2, 2, 4, 16, 1, F32, F32, "cuda", slots=3, T=2)
    out, inter = run_multi(minp, True, torch.tensor([0, 9], dtype=torch.int32, device="cuda"))
    assert torch.isnan(out[1]).all() and torch.isnan(inter[1]).all() and torch.isfinite(inter[0]).all()


# One table per op, rows (id, where, call, message[, exc]) as in helpers.bad_input_params: the
# call changes one argument of a good call of the raw op (or of a public function). Every refused
# call must leave the state untouched (test_bad_input checks it).

ops = torch.ops.nemokernels
KEYS = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")


def good_single(device):
    t = make_inputs(2, 4, 8, 16, 2, F32, F32, device, slots=3)
    t["idx"] = torch.tensor([2, 0], dtype=torch.int32, device=device)
    t["before"] = t["state"].clone()
    return t


def good_multi(device):
    t = make_inputs(2, 4, 8, 16, 2, F32, F32, device, T=3, slots=3)
    t["idx"] = torch.tensor([2, 0], dtype=torch.int32, device=device)
    t["inter"] = torch.empty(2, 3, 4, 8, 16, device=device)
    t["par"] = torch.tensor([[-1, 0, 0], [-1, -1, 1]], dtype=torch.int32, device=device)
    t["before"] = t["state"].clone()
    return t


def good_commit(device):
    state = torch.randn(3, 4, 8, 16, device=device)
    return dict(state=state, before=state.clone(), inter=torch.randn(2, 3, 4, 8, 16, device=device),
                acc=torch.tensor([2, 1], device=device), idx=torch.tensor([2, 0], dtype=torch.int32, device=device))


def commit(t, **kw):
    a = dict(state=t["state"], intermediate_states=t["inter"], num_accepted=t["acc"], state_batch_indices=t["idx"])
    a.update(kw)
    return nk.commit_state(**a)


def single(t, **kw):
    a = {k: t[k] for k in KEYS}
    a.update(dt_softplus=True, state_batch_indices=t["idx"])
    a.update(kw)
    return ops.selective_state_update(*a.values())


def multi(t, **kw):
    a = {k: t[k] for k in KEYS}
    a.update(dt_softplus=True, state_batch_indices=t["idx"], intermediate_states=t["inter"])
    a.update(kw)
    return ops.selective_state_update_multi(*a.values())


S_ = r"selective_state_update: "
M_ = r"selective_state_update_multi: "
FLOATS = r"must be one of \{float32, float16, bfloat16\}, got "
DEVMIX = r" is on cpu but state is on cuda:\d+; all tensors must be on one device"


def _randn(t, *shape):
    return torch.randn(*shape, device=t["x"].device)


SINGLE_CASES = [
    ("state_rank", "any", lambda t: single(t, state=_randn(t, 2, 8)),
     S_ + r"state must be \(slots, nheads, dim, dstate\) or \(slots, dim, dstate\), got shape \(2, 8\)"),
    ("state_dtype", "any", lambda t: single(t, state=t["state"].long()), S_ + "state " + FLOATS + "int64"),
    ("x_rank", "any", lambda t: single(t, x=t["x"][..., 0]),
     S_ + r"x must have 3 dimensions \(batch, nheads, dim\) to match state \(3, 4, 8, 16\), got shape \(2, 4\)"),
    ("x_shape", "any", lambda t: single(t, x=_randn(t, 2, 4, 9)),
     S_ + r"x must have shape \(2, 4, 8\) \(from state and x.shape\[0\]\), got \(2, 4, 9\)"),
    ("x_dtype", "any", lambda t: single(t, x=t["x"].long()), S_ + "x " + FLOATS + "int64"),
    ("dt_shape", "any", lambda t: single(t, dt=_randn(t, 2, 4)),
     S_ + r"dt must have shape \(2, 4, 8\) \(like x\), got \(2, 4\)"),
    ("dt_dtype", "any", lambda t: single(t, dt=t["dt"].int()), S_ + "dt " + FLOATS + "int32"),
    ("A_shape", "any", lambda t: single(t, A=_randn(t, 4, 8)),
     S_ + r"A must have shape \(4, 8, 16\) \(nheads, dim, dstate\), any strides .*, got \(4, 8\)"),
    ("B_rank", "any", lambda t: single(t, B=_randn(t, 2, 16)),
     S_ + r"B must have 3 dimensions \(batch, ngroups, dstate\), got shape \(2, 16\)"),
    ("ngroups", "any", lambda t: single(t, B=_randn(t, 2, 3, 16), C=_randn(t, 2, 3, 16)),
     S_ + r"nheads \(4\) must be a multiple of ngroups \(B.shape\[1\] = 3\)"),
    ("B_batch", "any", lambda t: single(t, B=_randn(t, 3, 2, 16)),
     S_ + r"B must have shape \(2, 2, 16\) \(batch\[, tokens\]\[, ngroups\], dstate\), got \(3, 2, 16\)"),
    ("C_dstate", "any", lambda t: single(t, C=_randn(t, 2, 2, 15)),
     S_ + r"C must have shape \(2, 2, 16\) \(like B\), got \(2, 2, 15\)"),
    ("D_shape", "any", lambda t: single(t, D=_randn(t, 4)),
     S_ + r"D must have shape \(4, 8\) \(nheads, dim\), any strides, got \(4,\)"),
    ("z_shape", "any", lambda t: single(t, z=_randn(t, 2, 4, 7)),
     S_ + r"z must have shape \(2, 4, 8\) \(like x\), got \(2, 4, 7\)"),
    ("dt_bias_shape", "any", lambda t: single(t, dt_bias=_randn(t, 3, 8)),
     S_ + r"dt_bias must have shape \(4, 8\) \(nheads, dim\), any strides, got \(3, 8\)"),
    ("indices_dtype", "any", lambda t: single(t, state_batch_indices=t["idx"].long()),
     S_ + r"state_batch_indices must be one of \{int32\}, got int64"),
    ("indices_size", "any", lambda t: single(t, state_batch_indices=t["idx"].new_tensor([0, 1, 2])),
     S_ + r"state_batch_indices.shape\[0\] must be 2, got shape \(3,\)"),
    ("indices_out_of_range", "cpu", lambda t: single(t, state_batch_indices=t["idx"].new_tensor([0, 3])),
     S_ + r"state_batch_indices\[1\] = 3 is out of range for state with 3 rows \(expected -1 for a padded slot "
          r"or 0..2\)"),
    ("indices_duplicate", "cpu", lambda t: single(t, state_batch_indices=t["idx"].new_tensor([1, 1])),
     S_ + r"state_batch_indices holds row 1 twice \(entries 0 and 1\); each state row is updated in place"),
    ("state_rows", "any", lambda t: single(t, state=t["state"][:1], state_batch_indices=None),
     S_ + r"state.shape\[0\] must be at least 2 "
          r"\(batch, when state_batch_indices is None\), got shape \(1, 4, 8, 16\)"),
    ("state_expanded", "any", lambda t: single(t, state=t["state"][:1].expand(3, 4, 8, 16)),
     S_ + r"state is written, so it must not be an expanded view \(stride 0 in dimension 0 of size 3\)"),
    ("state_self_overlap", "any",
     lambda t: single(t, state=t["state"].as_strided((3, 4, 8, 16), (16, 16, 16, 1))),
     S_ + r"state is written, so its elements must not overlap in memory"),
    ("state_shares_x", "any", lambda t: single(t, x=t["state"][:2, :, :, 0]),
     S_ + r"state must not share memory with x \(state is written while x is read\)"),
    ("state_shares_B", "any", lambda t: single(t, B=t["state"][:2, :2, 0, :]),
     S_ + r"state must not share memory with B"),
    ("state_shares_indices", "any",
     lambda t: single(t, state_batch_indices=t["state"].view(-1)[:2].view(torch.int32)[:2]),
     S_ + r"state must not share memory with state_batch_indices"),
    ("rounding_seed_dtype", "any",
     lambda t: single(t, state=t["state"].bfloat16(), rounding_seed=torch.zeros(1, dtype=torch.int32, device=t["x"].device)),
     S_ + r"rounding_seed must"),
    ("rounding_seed_size", "any",
     lambda t: single(t, state=t["state"].bfloat16(), rounding_seed=torch.zeros(2, dtype=torch.long, device=t["x"].device)),
     S_ + r"rounding_seed must"),
    ("rounding_seed_float32_state", "any",
     lambda t: single(t, rounding_seed=torch.zeros(1, dtype=torch.long, device=t["x"].device)),
     S_ + r"stochastic rounding \(rounding_seed\) applies to a float16 / bfloat16 state"),
    ("rounding_seed_device", "cuda",
     lambda t: single(t, state=t["state"].bfloat16(), rounding_seed=torch.zeros(1, dtype=torch.long)),
     S_ + "rounding_seed" + DEVMIX),
    ("x_device", "cuda", lambda t: single(t, x=t["x"].cpu()), S_ + "x" + DEVMIX),
    ("indices_device", "cuda", lambda t: single(t, state_batch_indices=t["idx"].cpu()),
     S_ + "state_batch_indices" + DEVMIX),
]

MULTI_CASES = [
    ("x_rank", "any", lambda t: multi(t, x=t["x"][:, 0]),
     M_ + r"x must have 4 dimensions \(batch, tokens, nheads, dim\) to match state \(3, 4, 8, 16\), "
          r"got shape \(2, 4, 8\)"),
    ("dt_tokens", "any", lambda t: multi(t, dt=_randn(t, 2, 2, 4, 8)),
     M_ + r"dt must have shape \(2, 3, 4, 8\) \(like x\), got \(2, 2, 4, 8\)"),
    ("B_tokens", "any", lambda t: multi(t, B=_randn(t, 2, 2, 2, 16)),
     M_ + r"B must have shape \(2, 3, 2, 16\) \(batch\[, tokens\]\[, ngroups\], dstate\), got \(2, 2, 2, 16\)"),
    ("z_dtype", "any", lambda t: multi(t, z=t["z"].long()), M_ + "z " + FLOATS + "int64"),
    ("A_shape", "any", lambda t: multi(t, A=_randn(t, 4, 8, 15)),
     M_ + r"A must have shape \(4, 8, 16\) .*, got \(4, 8, 15\)"),
    ("state_rank", "any", lambda t: multi(t, state=_randn(t, 3, 4, 8, 16, 1)),
     M_ + r"state must be \(slots, nheads, dim, dstate\) or \(slots, dim, dstate\), got shape \(3, 4, 8, 16, 1\)"),
    ("snapshots_shape", "any", lambda t: multi(t, intermediate_states=t["inter"][:, :2]),
     M_ + r"intermediate_states must have shape \(2, 3, 4, 8, 16\) \(batch, tokens, \[nheads,\] dim, dstate\), "
          r"got \(2, 2, 4, 8, 16\)"),
    ("snapshots_dtype", "any", lambda t: multi(t, intermediate_states=t["inter"].bfloat16()),
     M_ + "intermediate_states must have state's dtype float32, got bfloat16"),
    ("snapshots_expanded", "any", lambda t: multi(t, intermediate_states=t["inter"][:, :1].expand(2, 3, 4, 8, 16)),
     M_ + r"intermediate_states is written, so it must not be an expanded view \(stride 0 in dimension 1 of size 3\)"),
    ("snapshots_alias_state", "any",
     lambda t: multi(t, state=(st := _randn(t, 6, 4, 8, 16)), intermediate_states=st.view(2, 3, 4, 8, 16)),
     M_ + r"intermediate_states must not share memory with state \(intermediate_states is written while state "
          r"is read\)"),
    ("snapshots_alias_x", "any", lambda t: multi(t, x=t["inter"][..., 0]),
     M_ + r"intermediate_states must not share memory with x"),
    ("indices_out_of_range", "cpu", lambda t: multi(t, state_batch_indices=t["idx"].new_tensor([5, 0])),
     M_ + r"state_batch_indices\[0\] = 5 is out of range for state with 3 rows"),
    ("indices_size", "any", lambda t: multi(t, state_batch_indices=t["idx"][:1]),
     M_ + r"state_batch_indices.shape\[0\] must be 2, got shape \(1,\)"),
    ("snapshots_device", "cuda", lambda t: multi(t, intermediate_states=t["inter"].cpu()),
     M_ + "intermediate_states" + DEVMIX),
    ("B_device", "cuda", lambda t: multi(t, B=t["B"].cpu()), M_ + "B" + DEVMIX),
    ("parents_without_snapshots", "any", lambda t: multi(t, intermediate_states=None, parents=t["par"]),
     M_ + r"parents \(tree drafts\) needs intermediate_states"),
    ("parents_shape", "any", lambda t: multi(t, parents=t["par"][:, :2]),
     M_ + r"parents.shape\[1\] must be 3, got shape \(2, 2\)"),
    ("parents_dtype", "any", lambda t: multi(t, parents=t["par"].long()), M_ + r"parents must be one of \{int32\}, got int64"),
    ("parents_not_earlier", "cpu", lambda t: multi(t, parents=t["par"].new_tensor([[-1, 1, 0], [-1, 0, 0]])),
     M_ + r"parents\[0, 1\] = 1 must be in \[-1, 1\): -1 continues from the state row, otherwise an earlier token"),
    ("parents_below_minus_one", "cpu", lambda t: multi(t, parents=t["par"].new_tensor([[-1, 0, 1], [-1, 0, -2]])),
     M_ + r"parents\[1, 2\] = -2 must be in \[-1, 2\)"),
    ("parents_alias_snapshots", "any", lambda t: multi(t, parents=t["inter"].view(-1)[:6].view(torch.int32).view(2, 3)),
     M_ + r"intermediate_states must not share memory with parents"),
    ("parents_device", "cuda", lambda t: multi(t, parents=t["par"].cpu()), M_ + "parents" + DEVMIX),
]


R_ = r"selective_state_update_replay: "


def good_replay(device):
    t = good_multi(device)
    t["upto"] = torch.tensor([1, 2], dtype=torch.int32, device=device)
    return t


def rep(t, **kw):
    a = {k: t[k] for k in ("state", "x", "dt", "A", "B", "C", "dt_bias")}
    a.update(dt_softplus=True, state_batch_indices=t["idx"], replay_to=t["upto"])
    a.update(kw)
    return ops.selective_state_update_replay(*a.values())


REPLAY_CASES = [
    ("replay_to_dtype", "any", lambda t: rep(t, replay_to=t["upto"].long()),
     R_ + r"replay_to must be one of \{int32\}, got int64"),
    ("replay_to_shape", "any", lambda t: rep(t, replay_to=t["upto"][:1]),
     R_ + r"replay_to.shape\[0\] must be 2, got shape \(1,\)"),
    ("x_rank", "any", lambda t: rep(t, x=t["x"][:, 0]), R_ + r"x must have 4 dimensions"),
    ("state_shares_x", "any", lambda t: rep(t, x=t["state"][:2, None, :, :, 0].expand(2, 3, 4, 8)),
     R_ + r"state must not share memory with x"),
    ("state_shares_replay_to", "any",
     lambda t: rep(t, replay_to=t["state"].view(-1)[:2].view(torch.int32)[:2]),
     R_ + r"state must not share memory with replay_to"),
    ("indices_duplicate", "cpu", lambda t: rep(t, state_batch_indices=t["idx"].new_tensor([1, 1])),
     R_ + r"state_batch_indices holds row 1 twice"),
    ("parents_not_earlier", "cpu", lambda t: rep(t, parents=t["par"].new_tensor([[-1, 0, 2], [-1, 0, 0]])),
     R_ + r"parents\[0, 2\] = 2 must be in \[-1, 2\)"),
    ("rounding_seed_float32_state", "any",
     lambda t: rep(t, parents=None, rounding_seed=torch.zeros(1, dtype=torch.long, device=t["x"].device)),
     R_ + r"stochastic rounding \(rounding_seed\) applies to a float16 / bfloat16 state"),
    ("replay_to_device", "cuda", lambda t: rep(t, replay_to=t["upto"].cpu()), R_ + "replay_to" + DEVMIX),
]

PUBLIC_REPLAY_CASES = [
    ("both_counts", "any", lambda t: replay(t, num_accepted=t["upto"], accepted_node=t["upto"]),
     r"commit_state_replay: give exactly one of num_accepted \(a chain\) and accepted_node \(a tree\)", ValueError),
    ("no_count", "any", lambda t: replay(t), r"commit_state_replay: give exactly one", ValueError),
    ("count_shape", "any", lambda t: replay(t, num_accepted=t["upto"][:1]),
     r"commit_state_replay: num_accepted must have shape \(2,\), got \(1,\)", ValueError),
]

PUBLIC_CASES = [  # the public functions reach the same checks (int64 indices are converted, then checked)
    ("multi_x_rank", "any", lambda t: run_multi(t, True), M_ + "x must have 4 dimensions"),
    ("single_indices_out_of_range", "cpu", lambda t: run_single(t, True, torch.tensor([0, 3], dtype=torch.int32)),
     S_ + r"state_batch_indices\[1\] = 3 is out of range for state with 3 rows"),
    ("single_indices_duplicate", "cpu", lambda t: run_single(t, True, torch.tensor([1, 1], dtype=torch.int32)),
     S_ + "state_batch_indices holds row 1 twice"),
    ("single_indices_duplicate_int64", "cpu", lambda t: run_single(t, True, torch.tensor([2, 2])),
     S_ + "state_batch_indices holds row 2 twice"),
]
PUBLIC_MULTI_CASES = [
    ("indices_out_of_range", "cpu", lambda t: run_multi(t, True, torch.tensor([5, 0], dtype=torch.int32)),
     M_ + r"state_batch_indices\[0\] = 5 is out of range"),
    ("parents_int64_not_earlier", "cpu",
     lambda t: nk.selective_state_update_multi(*(t[k] for k in KEYS), True, parents=torch.tensor([[-1, 0, 2], [-1, 0, 0]])),
     M_ + r"parents\[0, 2\] = 2 must be in \[-1, 2\)"),
]

COMMIT_CASES = [
    ("num_accepted_shape", "any", lambda t: commit(t, num_accepted=t["acc"][:1]),
     r"commit_state: num_accepted must have shape \(2,\), got \(1,\)", ValueError),
    ("num_accepted_batch", "any",
     lambda t: commit(t, intermediate_states=t["inter"].new_zeros(2, 3, 4, 8, 16), num_accepted=t["acc"].new_zeros(3),
                      state_batch_indices=None),
     r"commit_state: num_accepted must have shape \(2,\), got \(3,\)", ValueError),
    ("snapshots_shape", "any", lambda t: commit(t, intermediate_states=t["inter"][..., :8]),
     r"commit_state: intermediate_states must be \(batch, T\) \+ state.shape\[1:\] = \(2, 3\) \+ \(4, 8, 16\), "
     r"got \(2, 3, 4, 8, 8\)", ValueError),
    ("snapshots_dstate", "any", lambda t: commit(t, intermediate_states=t["inter"][..., :15], state_batch_indices=None),
     "commit_state: intermediate_states must be", ValueError),
    ("indices_shape", "any", lambda t: commit(t, state_batch_indices=t["idx"][:1]),
     r"commit_state: state_batch_indices must have shape \(2,\), got \(1,\)", ValueError),
    ("rows_without_indices", "any", lambda t: commit(t, state=t["state"][:1], state_batch_indices=None),
     r"commit_state: state.shape\[0\] must be at least batch = 2 when state_batch_indices is None, "
     r"got \(1, 4, 8, 16\)", ValueError),
    ("indices_out_of_range", "cpu", lambda t: commit(t, state_batch_indices=t["idx"].new_tensor([0, 3])),
     r"commit_state: state_batch_indices must be < state.shape\[0\] = 3 \(negative = padded slot\), got a larger row"),
    ("indices_duplicate", "cpu", lambda t: commit(t, state_batch_indices=t["idx"].new_tensor([1, 1])),
     r"commit_state: state_batch_indices holds a row twice"),
    ("both_counts", "any", lambda t: commit(t, accepted_node=t["acc"]),
     r"commit_state: give exactly one of num_accepted \(a chain\) and accepted_node \(a tree\)", ValueError),
    ("no_count", "any", lambda t: commit(t, num_accepted=None),
     r"commit_state: give exactly one of num_accepted", ValueError),
    ("accepted_node_shape", "any", lambda t: commit(t, num_accepted=None, accepted_node=t["acc"][:, None]),
     r"commit_state: accepted_node must have shape \(2,\), got \(2, 1\)", ValueError),
]


def _state_untouched(t):
    assert torch.equal(t["state"], t["before"]), "a refused call must not touch the state"


test_bad_input = bad_input_test(
    after=_state_untouched,
    single=(good_single, SINGLE_CASES), multi=(good_multi, MULTI_CASES), public=(good_single, PUBLIC_CASES),
    public_multi=(good_multi, PUBLIC_MULTI_CASES), commit_state=(good_commit, COMMIT_CASES),
    replay=(good_replay, REPLAY_CASES), public_replay=(good_replay, PUBLIC_REPLAY_CASES))


@pytest.mark.gpu
@pytest.mark.racecheck
def test_commit_state_bad_rows_on_cuda():
    """CUDA cannot refuse index values without a host sync: a row past the end is skipped like a
    padded one (no device assert, nothing written out of bounds), the others are committed."""
    state = torch.randn(3, 4, 8, 16, device="cuda")
    before = state.clone()
    inter = torch.randn(3, 2, 4, 8, 16, device="cuda")
    idx = torch.tensor([2, 2**30, -1], dtype=torch.int32, device="cuda")
    nk.commit_state(state, inter, torch.tensor([2, 1, 1], device="cuda"), idx)
    torch.cuda.synchronize()
    assert torch.equal(state[2], inter[0, 1]) and torch.equal(state[:2], before[:2])
    idx = torch.tensor([2**30, -5, 7], dtype=torch.int32, device="cuda")  # nothing valid: nothing changes
    nk.commit_state(state, inter, torch.tensor([1, 1, 1], device="cuda"), idx)
    torch.cuda.synchronize()
    assert torch.equal(state[:2], before[:2]) and torch.equal(state[2], inter[0, 1])


# ---------------------------------------------------------------- in-place safety


@pytest.mark.parametrize("device", DEVICES)
def test_snapshots_and_state_may_be_disjoint_views_of_one_buffer(device):
    """A cache holding each slot's state and its T snapshots side by side: state = buf[:, 0],
    snapshots = buf[:, 1:] share a buffer but no element, so they are not an overlap; the result
    equals the run with separate tensors, and the state is not written."""
    T = 3
    inp = make_inputs(2, 4, 8, 16, 2, F32, BF16, device, T=T)
    buf = torch.randn(2, T + 1, 4, 8, 16, device=device)
    buf[:, 0] = inp["state"]
    want_out, want_inter = run_multi(inp, True)
    out, inter = run_multi(dict(inp, state=buf[:, 0]), True, None, buf[:, 1:])
    assert torch.equal(out, want_out) and torch.equal(inter, want_inter)
    assert torch.equal(buf[:, 0], inp["state"]), "the state slot must not be written"


@pytest.mark.parametrize("device", DEVICES)
def test_strided_indices(device):
    """state_batch_indices given as a strided view are read by their strides."""
    inp = make_inputs(3, 2, 4, 16, 1, F32, F32, device, slots=5)
    wide = torch.tensor([4, 99, -1, 99, 1, 99], dtype=torch.int32, device=device)
    check_single(inp, True, wide[::2])


@pytest.mark.gpu
@pytest.mark.racecheck
def test_duplicate_indices_stay_in_bounds_on_cuda():
    """CUDA cannot refuse duplicate rows without a host sync: entries naming one row race on
    it (unspecified values), but nothing outside the state is written, rows no entry names are
    untouched, and the other entries are exact."""
    H, P, N = 4, 8, 16
    buf = torch.full((7, H, P, N), float("nan"), device="cuda")
    state = buf[1:6]  # guard rows 0 and 6
    inp = make_inputs(3, H, P, N, 2, F32, F32, "cuda", slots=5)
    state.copy_(inp["state"])
    inp["state"] = state
    before = state.clone()
    idx = torch.tensor([1, 1, 3], dtype=torch.int32, device="cuda")
    out = run_single(inp, True, idx)
    torch.cuda.synchronize()
    assert torch.isnan(buf[0]).all() and torch.isnan(buf[6]).all(), "memory around the state was written"
    for r in (0, 2, 4):
        assert torch.equal(state[r], before[r]), f"row {r} (named by no entry) changed"
    one = {k: (v[2:] if k in ("x", "dt", "z", "B", "C") else v) for k, v in inp.items()}
    one["state"] = before[3:4].clone()
    ref_out, ref_state = ref_single(one, True)
    assert_close(out[2:], ref_out, F32, factor=2)
    assert_close(state[3:4], ref_state, F32)
    assert torch.isfinite(state[1]).all() and torch.isfinite(out[:2]).all()


# ---------------------------------------------------------------- opcheck, compile, graphs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("params", ["expanded", "general"])
def test_opcheck(device, params):
    ops = torch.ops.nemokernels
    keys = ("state", "x", "dt", "A", "B", "C", "D", "z", "dt_bias")
    idx = torch.tensor([2, -1], dtype=torch.int32, device=device)
    inp = make_inputs(2, 4, 8, 16, 2, F32, BF16, device, params=params, slots=3)
    opcheck(ops.selective_state_update, tuple(inp[k] for k in keys) + (True, idx))
    minp = make_inputs(2, 4, 8, 16, 2, F32, BF16, device, params=params, T=3, slots=3)
    margs = tuple(minp[k] for k in keys)
    if params == "expanded":
        opcheck(ops.selective_state_update_multi, margs + (True, idx, torch.empty(2, 3, 4, 8, 16, device=device)))
    else:
        opcheck(ops.selective_state_update_multi, margs + (False, None, None))
    bstate = inp["state"].bfloat16()
    seed = torch.tensor([11], device=device)
    opcheck(ops.selective_state_update, (bstate,) + tuple(inp[k] for k in keys[1:]) + (True, idx, seed))
    tree = torch.tensor([[-1, 0, 0], [-1, -1, 1]], dtype=torch.int32, device=device)
    opcheck(ops.selective_state_update_multi, (minp["state"].bfloat16(),) + margs[1:] +
            (True, idx, torch.empty(2, 3, 4, 8, 16, device=device, dtype=BF16), tree, seed))
    upto = torch.tensor([2, 0], dtype=torch.int32, device=device)
    opcheck(ops.selective_state_update_replay, (minp["state"].clone(),) + margs[1:6] + (minp["dt_bias"], True, idx, upto))
    opcheck(ops.selective_state_update_replay, (minp["state"].bfloat16(),) + margs[1:6] +
            (minp["dt_bias"], True, idx, upto, tree, seed))
    opcheck(ops.selective_state_update_multi, margs + (True, idx, torch.empty(2, 3, 4, 8, 16, device=device), tree))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """A decode step, a speculative multi-token step and the commit, in one compiled graph."""
    backend = "inductor" if device == "cuda" else "aot_eager"
    T = 3
    one = make_inputs(3, 4, 8, 16, 2, F32, BF16, device, slots=5)
    multi = make_inputs(3, 4, 8, 16, 2, F32, BF16, device, T=T, slots=5)
    idx = torch.tensor([4, -1, 1], dtype=torch.int32, device=device)
    acc = torch.tensor([2, 1, 0], device=device)

    def f(state, one, multi, idx, acc):
        y = nk.selective_state_update(state, one["x"], one["dt"], one["A"], one["B"], one["C"], one["D"], one["z"],
                                      one["dt_bias"], True, idx)
        out, inter = nk.selective_state_update_multi(state, multi["x"], multi["dt"], multi["A"], multi["B"],
                                                     multi["C"], multi["D"], multi["z"], multi["dt_bias"], True, idx)
        nk.commit_state(state, inter, acc, idx)
        return y, out

    s1 = one["state"].clone()
    s2 = one["state"].clone()
    y1, o1 = f(s1, one, multi, idx, acc)
    y2, o2 = torch.compile(f, fullgraph=True, backend=backend)(s2, one, multi, idx, acc)
    assert torch.equal(y1, y2) and torch.equal(o1, o2)
    assert torch.equal(s1, s2), "the in-place updates must survive compilation"


@pytest.mark.parametrize("device", DEVICES)
def test_tree_step_torch_compile_fullgraph(device):
    """A tree step and the commit of the accepted node, in one compiled graph."""
    backend = "inductor" if device == "cuda" else "aot_eager"
    inp = make_inputs(3, 4, 8, 16, 2, F32, BF16, device, T=len(TREE_PARENTS[0]), slots=4)
    idx = torch.tensor([3, -1, 1], dtype=torch.int32, device=device)
    parents = torch.tensor(TREE_PARENTS, device=device)
    node = torch.tensor([4, 2, 6], device=device)

    def f(state, t, idx, parents, node):
        out, inter = nk.selective_state_update_multi(state, t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"],
                                                     t["dt_bias"], True, idx, parents=parents)
        nk.commit_state(state, inter, state_batch_indices=idx, accepted_node=node)
        return out

    s1, s2 = inp["state"].clone(), inp["state"].clone()
    o1 = f(s1, inp, idx, parents, node)
    o2 = torch.compile(f, fullgraph=True, backend=backend)(s2, inp, idx, parents, node)
    assert torch.equal(o1, o2) and torch.equal(s1, s2)
    assert not torch.equal(s1, inp["state"])


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_torch_compile_fullgraph(device):
    """A decode step with stochastic rounding from a device seed that the graph advances."""
    backend = "inductor" if device == "cuda" else "aot_eager"
    inp = make_inputs(3, 4, 8, 16, 2, BF16, BF16, device, slots=4)
    keys = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")

    def f(state, seed, t):
        y = nk.selective_state_update(state, *(t[k] for k in keys), True, stochastic_rounding=True, seed=seed)
        seed.add_(1)
        return y

    s1, s2 = inp["state"].clone(), inp["state"].clone()
    k1, k2 = torch.tensor([3], device=device), torch.tensor([3], device=device)
    y1, y2 = f(s1, k1, inp), torch.compile(f, fullgraph=True, backend=backend)(s2, k2, inp)
    assert torch.equal(y1, y2) and torch.equal(s1, s2) and int(k2) == 4


@pytest.mark.parametrize("device", DEVICES)
def test_replay_verify_step_torch_compile_fullgraph(device):
    """Verify without snapshots, then commit by replay, in one compiled graph."""
    backend = "inductor" if device == "cuda" else "aot_eager"
    inp = make_inputs(3, 4, 8, 16, 2, F32, BF16, device, T=3, slots=4)
    idx = torch.tensor([3, -1, 1], dtype=torch.int32, device=device)
    acc = torch.tensor([2, 1, 3], device=device)
    keys = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")

    def f(state, t, idx, acc):
        out = torch.ops.nemokernels.selective_state_update_multi(state, *(t[k] for k in keys), True, idx, None)
        nk.commit_state_replay(state, t["x"], t["dt"], t["A"], t["B"], t["C"], t["dt_bias"], True, idx,
                               num_accepted=acc)
        return out

    s1, s2 = inp["state"].clone(), inp["state"].clone()
    o1 = f(s1, inp, idx, acc)
    o2 = torch.compile(f, fullgraph=True, backend=backend)(s2, inp, idx, acc)
    assert torch.equal(o1, o2) and torch.equal(s1, s2) and not torch.equal(s1, inp["state"])


def _ulp(dtype):
    """Largest gap between neighbouring values of `dtype`, relative to the value."""
    return {BF16: 2.0**-7, F16: 2.0**-10}.get(dtype, 2.0**-22)


def decode_runs_agree(out_a, out_b, states_a, states_b, C, z):
    """Two runs of the same decode recurrence whose float32 arithmetic differs by ulps (CUDA's
    expf against the CPU's, FMA contraction) agree as far as the arithmetic guarantees.
    out (b, T, H, P) and states (b, T, H, P, N), the state after each token, from each run;
    C (b, T, G, N) and z (b, T, H, P) as given to both.

    A stored state is a rounding of dA * s + dt x B with 0 < dA <= 1: if the previous states
    differ by d, the new ones differ by at most dA * d + one ulp of the stored type at the new
    value. So after token t (from 1) states differ by at most t ulps of the largest magnitude
    seen so far (elementwise), plus float32 noise (1e-6 of the RMS). The output is computed
    from the stored state, (sum_n s[n] C[n] + D x) silu(z), so before its rounding it differs
    by |silu(z)| sum_n |s_a[n] - s_b[n]| |C[n]| (the measured state differences) plus float32
    noise (1e-6 of sum_n |s[n] C[n]|, 1e-5 of the output's RMS for D x); rounding adds one
    ulp of the output type. A norm bound cannot say this: one flipped 16-bit rounding among
    thousands of elements measured 1.9e-5 on an H200.
    """
    s_a, s_b = states_a.detach().cpu().double(), states_b.detach().cpu().double()
    mag = torch.maximum(s_a.abs(), s_b.abs())
    t = torch.arange(1, s_a.shape[1] + 1, dtype=torch.float64).view(1, -1, 1, 1, 1)
    if (s_a - s_b).abs().gt(t * _ulp(states_a.dtype) * mag.cummax(dim=1).values
                            + 1e-6 * s_b.pow(2).mean().sqrt()).any():
        return False
    H = s_a.shape[2]
    Ch = C.detach().cpu().double().repeat_interleave(H // C.shape[2], dim=2).abs()[:, :, :, None, :]
    gate = torch.nn.functional.silu(z.detach().cpu().double()).abs()
    y_a, y_b = out_a.detach().cpu().double(), out_b.detach().cpu().double()
    dy = (gate * (((s_a - s_b).abs() + 1e-6 * mag) * Ch).sum(-1)
          + _ulp(out_a.dtype) * torch.maximum(y_a.abs(), y_b.abs()) + 1e-5 * y_b.pow(2).mean().sqrt())
    return not (y_a - y_b).abs().gt(dy).any()


@pytest.mark.parametrize("state_dtype", [F32, BF16, F16])
def test_decode_agreement_bound(state_dtype):
    """decode_runs_agree accepts two runs that differ by an ulp of A (as CUDA's expf differs
    from the CPU's), over many seeds, and rejects an output off by 1% or one state off."""
    dtype = F32 if state_dtype == F32 else state_dtype
    for seed in range(20):
        torch.manual_seed(seed)
        inp = make_inputs(3, 8, 64, 128, 2, state_dtype, dtype, "cpu", params="general", T=4)
        nudged = dict(inp, A=inp["A"] * (1 + 2.0**-23))
        out, inter = run_multi(inp, True)
        out2, inter2 = run_multi(nudged, True)
        assert decode_runs_agree(out, out2, inter, inter2, inp["C"], inp["z"])
    assert not decode_runs_agree(out * 1.01, out2, inter, inter2, inp["C"], inp["z"])
    bad = inter.clone()
    bad[1, 2, 3, 4, 5] += 0.05 * inter.abs().max()
    assert not decode_runs_agree(out, out2, bad, inter2, inp["C"], inp["z"])


@pytest.mark.gpu
@pytest.mark.racecheck
def test_cuda_matches_cpu_kernel():
    for state_dtype, dtype in [(F32, BF16), (BF16, BF16)]:
        for params in ("expanded", "general"):
            inp = make_inputs(3, 8, 64, 128, 2, state_dtype, dtype, "cuda", params=params, T=4)
            cpu = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in inp.items()}
            out, inter = run_multi(inp, True)
            outc, interc = run_multi(cpu, True)
            # Same decomposition and order, but CUDA's expf and the CPU's may differ by an ulp:
            # agreement to what that guarantees (decode_runs_agree says why).
            assert decode_runs_agree(out, outc, inter, interc, cpu["C"], cpu["z"])
            one = {k: (v[:, 0] if k in ("x", "dt", "z", "B", "C") else v) for k, v in inp.items()}
            onec = {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in one.items()}
            onec["state"] = one["state"].cpu()  # a copy: the CUDA state is updated in place too
            o, oc = run_single(one, True), run_single(onec, True)
            assert decode_runs_agree(o[:, None], oc[:, None], one["state"][:, None], onec["state"][:, None],
                                     onec["C"][:, None], onec["z"][:, None])


@pytest.mark.gpu
def test_dstate_limit_on_cuda():
    inp = make_inputs(1, 2, 4, 1024, 1, F32, F32, "cuda")
    with pytest.raises(RuntimeError, match="dstate = 1024 is too large for the CUDA kernel"):
        run_single(inp, True)
    check_single(make_inputs(1, 2, 4, 1024, 1, BF16, BF16, "cuda"), True, state_dtype=BF16, dtype=BF16)


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_inputs():
    """Capture decode step + multi-token + commit, change the inputs in place, replay."""
    one = make_inputs(4, 8, 64, 128, 2, F32, BF16, "cuda", slots=6)
    multi = make_inputs(4, 8, 64, 128, 2, F32, BF16, "cuda", T=4, slots=6)
    idx = torch.tensor([5, -1, 0, 2], dtype=torch.int32, device="cuda")
    acc = torch.tensor([2, 0, 4, 1], device="cuda")
    state = one["state"]

    def step():
        y = run_single(one, True, idx)
        out, inter = run_multi(dict(multi, state=state), True, idx)
        nk.commit_state(state, inter, acc, idx)
        return y, out

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y, out = step()
    for d in (one, multi):
        for k in ("x", "z", "B", "C"):
            d[k].copy_(torch.randn_like(d[k]))
    start = torch.randn_like(state)
    state.copy_(start)
    acc.copy_(torch.tensor([4, 3, 0, 2]))
    g.replay()
    got = state.clone()
    state.copy_(start)
    y2, out2 = step()
    assert torch.equal(y, y2) and torch.equal(out, out2) and torch.equal(got, state)


@pytest.mark.gpu
@pytest.mark.parametrize("state_dtype", [F32, BF16])
def test_nano_shape_gpu(state_dtype, sanitizer):
    """Nemotron-3 Nano decode (64 heads x 64 x dstate 128, 8 groups) at batch 64."""
    inp = make_inputs(4 if sanitizer else 64, 64, 64, 128, 8, state_dtype, BF16, "cuda")
    check_single(inp, True, state_dtype=state_dtype, dtype=BF16)
