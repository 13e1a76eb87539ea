"""causal_conv1d_fn / causal_conv1d_update against the float64 reference (ssd/reference.py)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import nemokernels
from nemokernels.ssd.reference import causal_conv1d_ref, causal_conv1d_update_ref

from conftest import DEVICES
from helpers import (TOL, TREE_PARENTS, assert_close, bad_input_test, nan_like, opcheck, poison_allocator,
                     rel_err, tree_path)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_x(batch, dim, seqlen, dtype, device, layout):
    """x (batch, dim, seqlen) in one of three memory layouts."""
    if layout == "channel_last":
        return torch.randn(batch, seqlen, dim, device=device, dtype=dtype).transpose(1, 2)
    if layout == "strided":  # neither dim contiguous: a slice of a larger buffer
        return torch.randn(batch, dim * 2, seqlen + 3, device=device, dtype=dtype)[:, ::2, 1:seqlen + 1]
    return torch.randn(batch, dim, seqlen, device=device, dtype=dtype)


def make_params(dim, width, dtype, device, bias=True):
    w = torch.randn(dim, width, device=device, dtype=dtype) / width**0.5
    b = torch.randn(dim, device=device, dtype=dtype) if bias else None
    return w, b


def ref64(x, w, b, **kw):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return causal_conv1d_ref(d(x), d(w), d(b), **{k: (d(v) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()})


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("layout", ["contiguous", "channel_last", "strided"])
def test_forward_matches_reference(device, dtype, width, layout):
    for batch, dim, seqlen in [(2, 64, 129), (1, 5, 1), (3, 130, 17), (1, 256, 300)]:
        for silu, bias in [(True, True), (False, False)]:
            x = make_x(batch, dim, seqlen, dtype, device, layout)
            w, b = make_params(dim, width, dtype, device, bias)
            poison_allocator(device)
            out = nemokernels.causal_conv1d_fn(x, w, b, activation="silu" if silu else None)
            assert out.shape == x.shape and out.dtype == dtype
            ref = ref64(x, w, b, activation="silu" if silu else None)
            assert_close(out, ref, dtype, what=f"out {batch, dim, seqlen} silu={silu}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channel_last_output_stays_channel_last(device, dtype):
    x = make_x(2, 64, 33, dtype, device, "channel_last")
    w, b = make_params(64, 4, dtype, device)
    out = nemokernels.causal_conv1d_fn(x, w, b, activation="silu")
    assert out.stride(1) == 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seqlen", [1, 2, 3, 40])
def test_initial_and_final_states(device, dtype, seqlen):
    batch, dim, width = 2, 24, 4
    x = make_x(batch, dim, seqlen, dtype, device, "channel_last")
    w, b = make_params(dim, width, dtype, device)
    init = torch.randn(batch, dim, width - 1, device=device, dtype=dtype)
    final_out = nan_like(init)
    out, fin = nemokernels.causal_conv1d_fn(x, w, b, initial_states=init, return_final_states=True,
                                            final_states_out=final_out, activation="silu")
    assert fin is final_out
    ref, ref_fin = ref64(x, w, b, initial_states=init, return_final_states=True, activation="silu")
    assert_close(out, ref, dtype)
    # Final states are copies of inputs: exact.
    assert torch.equal(fin.double().cpu(), ref_fin.cpu()), "final states must be the last width-1 inputs"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_states_chain_split_sequence(device, dtype):
    """Running [0, s) then [s, L) with the carried state equals running [0, L)."""
    batch, dim, width, L = 2, 40, 4, 77
    x = make_x(batch, dim, L, dtype, device, "channel_last")
    w, b = make_params(dim, width, dtype, device)
    full = nemokernels.causal_conv1d_fn(x, w, b, activation="silu")
    for s in (1, 2, 3, 31, 64):
        o1, st = nemokernels.causal_conv1d_fn(x[..., :s], w, b, return_final_states=True, activation="silu")
        o2 = nemokernels.causal_conv1d_fn(x[..., s:], w, b, initial_states=st, activation="silu")
        assert torch.equal(torch.cat([o1, o2], -1), full), f"split at {s} differs"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
def test_seq_idx_equals_separate_sequences(device, dtype, layout):
    dim, width = 48, 4
    lens = [5, 1, 2, 37, 64, 3]
    L = sum(lens)
    x = make_x(1, dim, L, dtype, device, layout)
    seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(lens)])[None].to(device)
    w, b = make_params(dim, width, dtype, device)
    out = nemokernels.causal_conv1d_fn(x, w, b, seq_idx=seq_idx, activation="silu")
    pieces, s = [], 0
    for n in lens:
        pieces.append(nemokernels.causal_conv1d_fn(x[..., s:s + n].contiguous(), w, b, activation="silu"))
        s += n
    assert_close(out, torch.cat(pieces, -1), dtype, factor=0.5)
    assert_close(out, ref64(x, w, b, seq_idx=seq_idx, activation="silu"), dtype)


# ---------------------------------------------------------------- backward


def _grads_check(device, dtype, layout, width, batch, dim, seqlen, silu, with_init, with_final, seq_lens=None):
    x = make_x(batch, dim, seqlen, dtype, device, layout).requires_grad_()
    w, b = make_params(dim, width, dtype, device)
    w.requires_grad_(), b.requires_grad_()
    init = torch.randn(batch, dim, width - 1, device=device, dtype=dtype, requires_grad=True) if with_init else None
    seq_idx = None
    if seq_lens is not None:
        seq_idx = torch.cat([torch.full((n,), i, dtype=torch.int32) for i, n in enumerate(seq_lens)])
        seq_idx = seq_idx[None].expand(batch, -1).contiguous().to(device)
    act = "silu" if silu else None
    # Non-contiguous upstream gradients (a transposed view and a slice).
    g_out = torch.randn(batch, seqlen, dim, device=device, dtype=dtype).transpose(1, 2)
    g_fin = torch.randn(batch, dim, 2 * (width - 1), device=device, dtype=dtype)[..., ::2] if with_final else None

    res = nemokernels.causal_conv1d_fn(x, w, b, seq_idx=seq_idx, initial_states=init,
                                       return_final_states=with_final, activation=act)
    outs, grads = (res, (g_out,)) if not with_final else (res, (g_out, g_fin))
    torch.autograd.backward(outs, grads)

    x64, w64, b64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    i64 = init.detach().double().requires_grad_() if with_init else None
    r = causal_conv1d_ref(x64, w64, b64, seq_idx=seq_idx, initial_states=i64,
                          return_final_states=with_final, activation=act)
    torch.autograd.backward(r, tuple(g.double() for g in grads))
    f = 2.0 if dtype != torch.float32 else 10.0
    for name, got, want in [("dx", x.grad, x64.grad), ("dweight", w.grad, w64.grad), ("dbias", b.grad, b64.grad)] + (
            [("dinitial_states", init.grad, i64.grad)] if with_init else []):
        assert got is not None and torch.isfinite(got).all(), f"{name} missing or not finite"
        assert_close(got, want, dtype, factor=f, what=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channel_last", "strided"])
@pytest.mark.parametrize("width", [2, 4])
def test_backward_matches_reference(device, dtype, layout, width):
    for batch, dim, seqlen in [(2, 64, 129), (1, 7, 1), (3, 136, 70)]:
        _grads_check(device, dtype, layout, width, batch, dim, seqlen, silu=True, with_init=False, with_final=False)
    _grads_check(device, dtype, layout, width, 2, 32, 50, silu=False, with_init=False, with_final=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seqlen", [1, 2, 3, 65])
def test_backward_states(device, dtype, seqlen):
    _grads_check(device, dtype, "channel_last", 4, 2, 24, seqlen, silu=True, with_init=True, with_final=True)
    _grads_check(device, dtype, "contiguous", 3, 2, 24, seqlen, silu=True, with_init=True, with_final=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channel_last"])
def test_backward_seq_idx(device, layout):
    _grads_check(device, torch.float32, layout, 4, 2, 40, 72, silu=True, with_init=False, with_final=False,
                 seq_lens=[3, 1, 40, 28])


@pytest.mark.parametrize("device", DEVICES)
def test_backward_long_sequence_bf16_finite(device, sanitizer):
    """Many time tiles per block (grid-stride in the CUDA backward) and bf16 gradients."""
    L = 1024 if sanitizer else 5000
    _grads_check(device, torch.bfloat16, "channel_last", 4, 1, 256, L, silu=True, with_init=False, with_final=False)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_deterministic(device):
    x = make_x(2, 128, 1000, torch.float32, device, "channel_last").requires_grad_()
    w, b = make_params(128, 4, torch.float32, device)
    w.requires_grad_()
    g = torch.randn_like(x)
    grads = []
    for _ in range(2):
        w.grad = None
        nemokernels.causal_conv1d_fn(x, w, b, activation="silu").backward(g)
        grads.append(w.grad.clone())
    assert torch.equal(grads[0], grads[1]), "dweight must be bitwise reproducible"


# ---------------------------------------------------------------- packed sequences with a state each


def _separate(x, w, b, init, cu, act):
    """Each packed sequence run on its own from its initial state: (outputs, finals)."""
    outs, fins = [], []
    for s in range(cu.numel() - 1):
        a, e = int(cu[s]), int(cu[s + 1])
        o, f = nemokernels.causal_conv1d_fn(x[:, :, a:e], w, b, initial_states=None if init is None else init[s:s + 1],
                                            return_final_states=True, activation=act)
        outs.append(o)
        fins.append(f)
    return torch.cat(outs, 2), torch.cat(fins, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [2, 3, 4])
def test_packed_sequences_with_a_state_each(device, dtype, width):
    """cu_seqlens + initial_states (S, dim, width - 1): outputs, final states and gradients (x,
    weight, bias, every row of initial_states) equal running each sequence alone from its own
    state, at any packing: empty and one-token sequences, sequences shorter than the window."""
    dim = 40
    cu = torch.tensor([0, 5, 5, 6, 8, 8 + 2 * width, 37], device=device)
    L, S = int(cu[-1]), cu.numel() - 1
    x = make_x(1, dim, L, dtype, device, "channel_last").requires_grad_()
    w, b = make_params(dim, width, dtype, device)
    w.requires_grad_(), b.requires_grad_()
    init = torch.randn(S, dim, width - 1, device=device, dtype=dtype, requires_grad=True)
    for with_init in (True, False):
        i = init if with_init else None
        out, fin = nemokernels.causal_conv1d_fn(x, w, b, initial_states=i, return_final_states=True, activation="silu",
                                                cu_seqlens=cu)
        ref_out, ref_fin = _separate(x, w, b, i, cu, "silu")
        assert out.shape == (1, dim, L) and fin.shape == (S, dim, width - 1)
        assert_close(out, ref_out, dtype, factor=2, what="out")
        assert torch.equal(fin, ref_fin), "final states are copies of inputs"
        g_out, g_fin = torch.randn_like(out), torch.randn_like(fin)
        leaves = [x, w, b] + ([init] if with_init else [])
        got = torch.autograd.grad((out * g_out).sum() + (fin * g_fin).sum(), leaves)
        want = torch.autograd.grad((ref_out * g_out).sum() + (ref_fin * g_fin).sum(), leaves)
        for name, gg, ww in zip(("x", "weight", "bias", "initial_states"), got, want):
            assert_close(gg, ww, dtype, factor=4, what=f"d{name}")
    # without an activation, and against the float64 reference of one sequence
    out = nemokernels.causal_conv1d_fn(x, w, b, initial_states=init, cu_seqlens=cu)
    a, e = int(cu[4]), int(cu[5])
    ref = ref64(x[:, :, a:e], w, b, initial_states=init[4:5])
    assert_close(out[:, :, a:e], ref, dtype, factor=2)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_sequences_with_states_torch_compile_fullgraph(device):
    backend = "inductor" if device == "cuda" else "aot_eager"
    x, (w, b) = torch.randn(1, 16, 20, device=device), make_params(16, 4, torch.float32, device)
    init, cu = torch.randn(3, 16, 3, device=device), torch.tensor([0, 5, 12, 20], device=device)

    def f(x, init, cu):
        return nemokernels.causal_conv1d_fn(x, w, b, initial_states=init, return_final_states=True,
                                            activation="silu", cu_seqlens=cu)

    eager, compiled = f(x, init, cu), torch.compile(f, fullgraph=True, backend=backend)(x, init, cu)
    assert all(torch.allclose(u, v, rtol=1e-5, atol=1e-6) for u, v in zip(eager, compiled))


def test_packed_sequences_with_states_bad_inputs():
    x, (w, b) = torch.randn(1, 8, 10), make_params(8, 4, torch.float32, "cpu")
    cu = torch.tensor([0, 4, 10])
    with pytest.raises(ValueError, match=r"causal_conv1d_fn: cu_seqlens needs x of batch 1 \(packed sequences\), got \(2, 8, 10\)"):
        nemokernels.causal_conv1d_fn(torch.randn(2, 8, 10), w, b, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"initial_states must be \(num_sequences, dim, width - 1\) = \(2, 8, 3\), got \(1, 8, 3\)"):
        nemokernels.causal_conv1d_fn(x, w, b, initial_states=torch.randn(1, 8, 3), cu_seqlens=cu)
    with pytest.raises(RuntimeError, match="cu_seqlens must start at 0, not decrease and end at seqlen = 10"):
        nemokernels.causal_conv1d_fn(x, w, b, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(RuntimeError, match="cu_seqlens must start at 0"):
        nemokernels.causal_conv1d_fn(x, w, b, cu_seqlens=torch.tensor([0, 6, 4, 10]))


# ---------------------------------------------------------------- update (decode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [2, 3, 4])
def test_update_steps_equal_full_conv(device, dtype, width):
    """Feeding tokens one (or three) at a time through the update equals the full conv."""
    batch, dim, L = 3, 40, 9
    x = make_x(batch, dim, L, dtype, device, "contiguous")
    w, b = make_params(dim, width, dtype, device)
    full = nemokernels.causal_conv1d_fn(x, w, b, activation="silu")
    state = torch.zeros(batch, dim, width - 1, device=device, dtype=dtype)
    outs = [nemokernels.causal_conv1d_update(x[..., t], state, w, b, activation="silu") for t in range(6)]
    outs.append(nemokernels.causal_conv1d_update(x[..., 6:9], state, w, b, activation="silu"))
    got = torch.cat([o.unsqueeze(-1) for o in outs[:6]] + [outs[6]], -1)
    assert_close(got, full, dtype, factor=0.5)
    assert torch.equal(state, x[..., L - (width - 1):]), "state must hold the last width-1 inputs"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_indices_padding_and_long_state(device, dtype):
    """conv_state_indices picks rows; -1 is a padded slot; state_len may exceed width-1."""
    batch, dim, width, state_len, nslots, seqlen = 4, 33, 4, 6, 7, 2
    x = torch.randn(batch, dim, seqlen, device=device, dtype=dtype)
    w, b = make_params(dim, width, dtype, device)
    state = torch.randn(nslots, dim, state_len, device=device, dtype=dtype)
    idx = torch.tensor([5, -1, 0, 2], dtype=torch.int32, device=device)
    ref_out, ref_state = causal_conv1d_update_ref(x.double(), state.double(), w.double(), b.double(), "silu", idx)
    poison_allocator(device)
    out = nemokernels.causal_conv1d_update(x, state, w, b, activation="silu", conv_state_indices=idx)
    assert_close(out, ref_out, dtype)
    assert torch.equal(out[1], torch.zeros_like(out[1])), "padded slot must output zeros"
    assert torch.equal(state.double(), ref_state), "state rows: updated where indexed, untouched elsewhere"


@pytest.mark.gpu
def test_update_index_out_of_range_gives_nan_on_cuda():
    x = torch.randn(2, 8, device="cuda")
    w, b = make_params(8, 4, torch.float32, "cuda")
    state = torch.zeros(2, 8, 3, device="cuda")
    before = state.clone()
    out = nemokernels.causal_conv1d_update(x, state, w, b, conv_state_indices=torch.tensor([7, 0], dtype=torch.int32, device="cuda"))
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
    assert torch.equal(state[1], before[1])


# ---------------------------------------------------------------- update over a draft tree

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [2, 3, 4])
def test_update_tree_equals_chain_along_every_path(device, dtype, width):
    """Tree drafts: node t's output is bit for bit the chain update's on the tokens of its
    root-to-t path (and within tolerance of the float64 reference), conv_state is only read,
    and commit_conv_state(accepted_node=t) leaves the state that chain leaves."""
    batch, dim, T, state_len = 3, 24, len(TREE_PARENTS[0]), width + 1
    x = torch.randn(batch, dim, T, device=device, dtype=dtype)
    w, b = make_params(dim, width, dtype, device)
    state = torch.randn(5, dim, state_len, device=device, dtype=dtype)
    idx = torch.tensor([3, 0, -1], dtype=torch.int32, device=device)
    parents = torch.tensor(TREE_PARENTS, device=device)
    before = state.clone()
    poison_allocator(device)
    out = nemokernels.causal_conv1d_update(x, state, w, b, activation="silu", conv_state_indices=idx, parents=parents)
    assert torch.equal(state, before), "a tree update must not modify conv_state"
    assert torch.equal(out[2], torch.zeros_like(out[2])), "padded slot must output zeros"
    ref = torch.zeros(batch, dim, T, dtype=torch.float64, device=device)
    for e in range(2):
        for t in range(T):
            path = tree_path(TREE_PARENTS[e], t)
            chain_state = before.clone()
            chain = nemokernels.causal_conv1d_update(x[:, :, path], chain_state, w, b, activation="silu",
                                                     conv_state_indices=idx)
            assert torch.equal(out[e, :, t], chain[e, :, -1]), f"entry {e} node {t}: differs from the chain {path}"
            r_out, _ = causal_conv1d_update_ref(x[:, :, path].double(), before.double(), w.double(), b.double(),
                                                "silu", idx)
            ref[e, :, t] = r_out[e, :, -1]
            committed = before.clone()
            node = torch.tensor([t, t, t], device=device)
            nemokernels.commit_conv_state(committed, x, node, parents, conv_state_indices=idx)
            row = int(idx[e])
            assert torch.equal(committed[row], chain_state[row]), f"entry {e} node {t}: committed state differs"
    assert_close(out[:2], ref[:2], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_commit_conv_state_chain_and_no_acceptance(device):
    """Without parents the draft is a chain: committing node k equals in-place updates with the
    first k + 1 tokens; node -1 keeps the state; a state longer than the draft keeps old inputs."""
    batch, dim, T, state_len = 2, 8, 3, 5
    x = torch.randn(batch, dim, T, device=device)
    state = torch.randn(batch, dim, state_len, device=device)
    w, b = make_params(dim, 4, torch.float32, device)
    for k in (-1, 0, 1, 2):
        got = state.clone()
        nemokernels.commit_conv_state(got, x, torch.tensor([k, T - 1], device=device))
        want = state.clone()
        if k >= 0:
            nemokernels.causal_conv1d_update(x[:, :, :k + 1], want, w, b)
        assert torch.equal(got[0], want[0]), f"node {k}"
        assert torch.equal(got[1, :, :state_len - T], state[1, :, T:]) and torch.equal(got[1, :, state_len - T:], x[1])


@pytest.mark.gpu
def test_update_tree_invalid_parent_gives_nan_on_cuda():
    """CUDA cannot refuse parent values without a host sync: every window that meets an invalid
    parent is NaN, the others are exact; conv_state is untouched."""
    x = torch.randn(2, 8, 5, device="cuda")
    w, b = make_params(8, 3, torch.float32, "cuda")
    state = torch.randn(2, 8, 2, device="cuda")
    before = state.clone()
    good = torch.tensor([[-1, 0, 1, 1, 3], [-1, 0, 0, 2, 3]], device="cuda")
    bad = good.clone()
    bad[0, 3] = 4   # node 3's window meets it, and node 4's (width 3: two ancestors)
    bad[1, 2] = 99  # nodes 2 and 3
    out_g = nemokernels.causal_conv1d_update(x, state, w, b, parents=good)
    out_b = nemokernels.causal_conv1d_update(x, state, w, b, parents=bad)
    torch.cuda.synchronize()
    nan_nodes = {(0, 3), (0, 4), (1, 2), (1, 3)}
    for e in range(2):
        for t in range(5):
            if (e, t) in nan_nodes:
                assert out_b[e, :, t].isnan().all(), f"node ({e}, {t}) must be NaN"
            else:
                assert torch.equal(out_b[e, :, t], out_g[e, :, t])
    assert torch.equal(state, before)


# ---------------------------------------------------------------- empty inputs


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    w, b = make_params(8, 4, torch.float32, device)
    out = nemokernels.causal_conv1d_fn(torch.randn(0, 8, 5, device=device), w, b)
    assert out.shape == (0, 8, 5)
    init = torch.randn(2, 8, 3, device=device)
    out, fin = nemokernels.causal_conv1d_fn(torch.randn(2, 8, 0, device=device), w, b, initial_states=init,
                                            return_final_states=True)
    assert out.shape == (2, 8, 0) and torch.equal(fin, init), "with no new input the state carries over"
    x = torch.randn(2, 8, 0, device=device, requires_grad=True)
    i = init.clone().requires_grad_()
    o, f = nemokernels.causal_conv1d_fn(x, w, b, initial_states=i, return_final_states=True)
    g = torch.randn_like(f)
    f.backward(g)
    assert torch.equal(i.grad, g)


# ---------------------------------------------------------------- bad input
#
# One table per op, rows (id, where, call, message[, exc]) as in helpers.bad_input_params: the
# call changes one argument of a good call of the raw op (or of a public function).

ops = torch.ops.nemokernels


def good_args(device):
    d = dict(device=device)
    return SimpleNamespace(
        x=torch.randn(2, 8, 10, **d), w=torch.randn(8, 4, **d), b=torch.randn(8, **d),
        seq=torch.zeros(2, 10, dtype=torch.int32, **d), init=torch.randn(2, 8, 3, **d),
        dout=torch.randn(2, 8, 10, **d), dfin=torch.randn(2, 8, 3, **d),
        xu=torch.randn(3, 8, **d), state=torch.randn(4, 8, 3, **d),
        idx=torch.tensor([2, -1, 0], dtype=torch.int32, **d),
        xt=torch.randn(3, 8, 4, **d), par=torch.tensor([[-1, 0, 0, 1]] * 3, dtype=torch.int32, **d),
        node=torch.tensor([3, 0, -1], **d))


def fwd(t, **kw):
    a = dict(x=t.x, weight=t.w, bias=t.b, seq_idx=None, initial_states=None, return_final_states=False, silu=True)
    a.update(kw)
    return ops.causal_conv1d_fwd(*a.values())


def bwd(t, **kw):
    a = dict(x=t.x, weight=t.w, bias=t.b, dout=t.dout, seq_idx=None, initial_states=t.init, dfinal_states=t.dfin,
             return_dinitial_states=True, silu=True)
    a.update(kw)
    return ops.causal_conv1d_bwd(*a.values())


def upd(t, **kw):
    a = dict(x=t.xu, conv_state=t.state, weight=t.w, bias=t.b, silu=True, conv_state_indices=t.idx)
    a.update(kw)
    return ops.causal_conv1d_update(*a.values())


def upd_tree(t, **kw):  # 3 entries of 4 draft tokens
    return upd(t, **{"x": t.xt, "parents": t.par, **kw})


def commit_conv(t, **kw):
    a = dict(conv_state=t.state, x=t.xt, accepted_node=t.node, parents=t.par, conv_state_indices=t.idx)
    a.update(kw)
    return nemokernels.commit_conv_state(**a)


def shared_state_and_x(t):
    """conv_state and x carved from one buffer, overlapping."""
    buf = torch.randn(200, device=t.x.device)
    return buf[:96].view(4, 8, 3), buf[:24].view(3, 8)


F_ = r"causal_conv1d_fn: "
B_ = r"causal_conv1d_fn \(backward\): "
U_ = r"causal_conv1d_update: "
DEVMIX = r" is on cpu but {} is on cuda:\d+; all tensors must be on one device"
FLOATS = r"must be one of \{float32, float16, bfloat16\}, got "

FWD_CASES = [
    ("x_dtype", "any", lambda t: fwd(t, x=t.x.long()), F_ + "x " + FLOATS + "int64"),
    ("x_rank", "any", lambda t: fwd(t, x=t.x[0]), F_ + r"x must have 3 dimensions, got shape \(8, 10\)"),
    ("weight_rank", "any", lambda t: fwd(t, weight=t.w[0]), F_ + r"weight must have 2 dimensions, got shape \(4,\)"),
    ("weight_dtype", "any", lambda t: fwd(t, weight=t.w.int()), F_ + "weight " + FLOATS + "int32"),
    ("weight_dim", "any", lambda t: fwd(t, weight=t.w.new_zeros(9, 4)),
     F_ + r"weight.shape\[0\] must be 8, got shape \(9, 4\)"),
    ("width_5", "any", lambda t: fwd(t, weight=t.w.new_zeros(8, 5)),
     F_ + r"weight.shape\[1\] \(the conv width\) must be 2, 3 or 4, got 5"),
    ("width_empty", "any", lambda t: fwd(t, weight=t.w.new_zeros(8, 0)),
     F_ + r"weight.shape\[1\] \(the conv width\) must be 2, 3 or 4, got 0"),
    ("bias_size", "any", lambda t: fwd(t, bias=t.b[:7]), F_ + r"bias.shape\[0\] must be 8, got shape \(7,\)"),
    ("bias_rank", "any", lambda t: fwd(t, bias=t.b[:, None]), F_ + r"bias must have 1 dimensions, got shape \(8, 1\)"),
    ("seq_idx_dtype", "any", lambda t: fwd(t, seq_idx=t.seq.long()),
     F_ + r"seq_idx must be one of \{int32\}, got int64"),
    ("seq_idx_batch", "any", lambda t: fwd(t, seq_idx=t.seq[:1]),
     F_ + r"seq_idx.shape\[0\] must be 2, got shape \(1, 10\)"),
    ("seq_idx_len", "any", lambda t: fwd(t, seq_idx=t.seq[:, :9]),
     F_ + r"seq_idx.shape\[1\] must be 10, got shape \(2, 9\)"),
    ("seq_idx_with_init", "any", lambda t: fwd(t, seq_idx=t.seq, initial_states=t.init),
     F_ + "initial_states must be None when seq_idx is given"),
    ("seq_idx_with_final", "any", lambda t: fwd(t, seq_idx=t.seq, return_final_states=True),
     F_ + "return_final_states is not supported with seq_idx"),
    ("init_len", "any", lambda t: fwd(t, initial_states=t.init[..., :2]),
     F_ + r"initial_states.shape\[2\] must be 3, got shape \(2, 8, 2\)"),
    ("init_batch", "any", lambda t: fwd(t, initial_states=t.init[:1]),
     F_ + r"initial_states.shape\[0\] must be 2, got shape \(1, 8, 3\)"),
    ("init_dtype", "any", lambda t: fwd(t, initial_states=t.init.half()),
     F_ + "initial_states must have x's dtype float32, got float16"),
    ("weight_device", "cuda", lambda t: fwd(t, weight=t.w.cpu()), F_ + "weight" + DEVMIX.format("x")),
    ("seq_idx_device", "cuda", lambda t: fwd(t, seq_idx=t.seq.cpu()), F_ + "seq_idx" + DEVMIX.format("x")),
    ("init_device", "cuda", lambda t: fwd(t, initial_states=t.init.cpu()), F_ + "initial_states" + DEVMIX.format("x")),
]

BWD_CASES = [
    ("x_dtype", "any", lambda t: bwd(t, x=t.x.long()), B_ + "x " + FLOATS + "int64"),
    ("x_rank", "any", lambda t: bwd(t, x=t.x[0]), B_ + r"x must have 3 dimensions, got shape \(8, 10\)"),
    ("weight_dim", "any", lambda t: bwd(t, weight=t.w[:7]), B_ + r"weight.shape\[0\] must be 8, got shape \(7, 4\)"),
    ("width_5", "any", lambda t: bwd(t, weight=t.w.new_zeros(8, 5)),
     B_ + r"weight.shape\[1\] \(the conv width\) must be 2, 3 or 4, got 5"),
    ("bias_size", "any", lambda t: bwd(t, bias=t.b[:7]), B_ + r"bias.shape\[0\] must be 8, got shape \(7,\)"),
    ("dout_rank", "any", lambda t: bwd(t, dout=t.dout[0]), B_ + r"dout must have 3 dimensions, got shape \(8, 10\)"),
    ("dout_shape", "any", lambda t: bwd(t, dout=t.dout[..., :9]),
     B_ + r"dout must have x's shape \(2, 8, 10\), got \(2, 8, 9\)"),
    ("dout_dtype", "any", lambda t: bwd(t, dout=t.dout.half()), B_ + "dout must have x's dtype float32, got float16"),
    ("dfinal_shape", "any", lambda t: bwd(t, dfinal_states=t.dfin[..., :2]),
     B_ + r"dfinal_states must have shape \(2, 8, 3\), got \(2, 8, 2\)"),
    ("dfinal_dtype", "any", lambda t: bwd(t, dfinal_states=t.dfin.bfloat16()),
     B_ + "dfinal_states must have x's dtype float32, got bfloat16"),
    ("dfinal_with_seq_idx", "any",
     lambda t: bwd(t, seq_idx=t.seq, initial_states=None, return_dinitial_states=False),
     B_ + "dfinal_states must be None when seq_idx is given"),
    ("dinit_with_seq_idx", "any",
     lambda t: bwd(t, seq_idx=t.seq, initial_states=None, dfinal_states=None),
     B_ + "return_dinitial_states must be False when seq_idx is given"),
    ("seq_idx_len", "any", lambda t: bwd(t, seq_idx=t.seq[:, :9], initial_states=None, dfinal_states=None,
                                         return_dinitial_states=False),
     B_ + r"seq_idx.shape\[1\] must be 10, got shape \(2, 9\)"),
    ("init_len", "any", lambda t: bwd(t, initial_states=t.init[..., :2]),
     B_ + r"initial_states.shape\[2\] must be 3, got shape \(2, 8, 2\)"),
    ("dout_device", "cuda", lambda t: bwd(t, dout=t.dout.cpu()), B_ + "dout" + DEVMIX.format("x")),
    ("dfinal_device", "cuda", lambda t: bwd(t, dfinal_states=t.dfin.cpu()), B_ + "dfinal_states" + DEVMIX.format("x")),
]

UPDATE_CASES = [
    ("x_rank_1", "any", lambda t: upd(t, x=t.xu[0]),
     U_ + r"x must be \(batch, dim\) or \(batch, dim, seqlen\), got shape \(8,\)"),
    ("x_rank_4", "any", lambda t: upd(t, x=t.xu[:, :, None, None]),
     U_ + r"x must be \(batch, dim\) or \(batch, dim, seqlen\), got shape \(3, 8, 1, 1\)"),
    ("x_dtype", "any", lambda t: upd(t, x=t.xu.long()), U_ + "x " + FLOATS + "int64"),
    ("weight_dim", "any", lambda t: upd(t, weight=t.w[:7]), U_ + r"weight.shape\[0\] must be 8, got shape \(7, 4\)"),
    ("state_rank", "any", lambda t: upd(t, conv_state=t.state[0]),
     U_ + r"conv_state must have 3 dimensions, got shape \(8, 3\)"),
    ("state_dtype", "any", lambda t: upd(t, conv_state=t.state.half()),
     U_ + "conv_state must have x's dtype float32, got float16"),
    ("state_dim", "any", lambda t: upd(t, conv_state=t.state.new_zeros(4, 9, 3)),
     U_ + r"conv_state.shape\[1\] must be 8, got shape \(4, 9, 3\)"),
    ("state_len", "any", lambda t: upd(t, conv_state=t.state[..., :2].contiguous()),
     U_ + r"conv_state.shape\[2\] must be at least 3 \(width - 1\), got shape \(4, 8, 2\)"),
    ("state_rows", "any", lambda t: upd(t, conv_state=t.state[:2], conv_state_indices=None),
     U_ + r"conv_state.shape\[0\] must be at least 3 "
          r"\(batch, when conv_state_indices is None\), got shape \(2, 8, 3\)"),
    ("indices_dtype", "any", lambda t: upd(t, conv_state_indices=t.idx.long()),
     U_ + r"conv_state_indices must be one of \{int32\}, got int64"),
    ("indices_rank", "any", lambda t: upd(t, conv_state_indices=t.idx[:, None]),
     U_ + r"conv_state_indices must have 1 dimensions, got shape \(3, 1\)"),
    ("indices_size", "any", lambda t: upd(t, conv_state_indices=t.idx[:2]),
     U_ + r"conv_state_indices.shape\[0\] must be 3, got shape \(2,\)"),
    ("indices_out_of_range", "cpu", lambda t: upd(t, conv_state_indices=t.idx.new_tensor([2, 4, 0])),
     U_ + r"conv_state_indices\[1\] = 4 is out of range for conv_state with 4 rows \(expected -1 for a padded "
          r"slot or 0..3\)"),
    ("indices_duplicate", "cpu", lambda t: upd(t, conv_state_indices=t.idx.new_tensor([2, -1, 2])),
     U_ + r"conv_state_indices holds row 2 twice \(entries 0 and 2\); each conv_state row is updated in place"),
    ("state_expanded", "any", lambda t: upd(t, conv_state=t.state[:1].expand(4, 8, 3)),
     U_ + r"conv_state is written, so it must not be an expanded view \(stride 0 in dimension 0 of size 4\)"),
    ("state_self_overlap", "any", lambda t: upd(t, conv_state=t.state.as_strided((4, 8, 3), (8, 1, 1))),
     U_ + r"conv_state is written, so its elements must not overlap in memory; .* got shape \(4, 8, 3\)"),
    ("state_shares_x", "any", lambda t: upd(t, **dict(zip(("conv_state", "x"), shared_state_and_x(t)))),
     U_ + r"conv_state must not share memory with x \(conv_state is written while x is read\)"),
    ("state_shares_weight", "any",
     lambda t: upd(t, conv_state=(s := torch.randn(4, 8, 4, device=t.x.device)), weight=s[1]),
     U_ + r"conv_state must not share memory with weight"),
    ("state_device", "cuda", lambda t: upd(t, conv_state=t.state.cpu()), U_ + "conv_state" + DEVMIX.format("x")),
    ("indices_device", "cuda", lambda t: upd(t, conv_state_indices=t.idx.cpu()),
     U_ + "conv_state_indices" + DEVMIX.format("x")),
    ("parents_2d_x", "any", lambda t: upd(t, parents=t.par[:, :1]),
     U_ + r"parents \(tree drafts\) needs x as \(batch, dim, seqlen\), got shape \(3, 8\)"),
    ("parents_shape", "any", lambda t: upd_tree(t, parents=t.par[:, :3]),
     U_ + r"parents.shape\[1\] must be 4, got shape \(3, 3\)"),
    ("parents_dtype", "any", lambda t: upd_tree(t, parents=t.par.long()),
     U_ + r"parents must be one of \{int32\}, got int64"),
    ("parents_not_earlier", "cpu", lambda t: upd_tree(t, parents=t.par.new_tensor([[-1, 0, 0, 1]] * 2 + [[-1, 2, 0, 1]])),
     U_ + r"parents\[2, 1\] = 2 must be in \[-1, 1\): -1 continues from conv_state, otherwise an earlier token"),
    ("parents_below_minus_one", "cpu", lambda t: upd_tree(t, parents=t.par.new_tensor([[-1, 0, -3, 1]] * 3)),
     U_ + r"parents\[0, 2\] = -3 must be in \[-1, 2\)"),
    ("parents_device", "cuda", lambda t: upd_tree(t, parents=t.par.cpu()), U_ + "parents" + DEVMIX.format("x")),
]

C_ = "commit_conv_state: "
COMMIT_CASES = [
    ("x_rank", "any", lambda t: commit_conv(t, x=t.xu), C_ + r"x must be \(batch, dim, T\), got \(3, 8\)", ValueError),
    ("state_dim", "any", lambda t: commit_conv(t, conv_state=t.state[:, :7]),
     C_ + r"conv_state must be \(rows, dim = 8, state_len\), got \(4, 7, 3\)", ValueError),
    ("node_shape", "any", lambda t: commit_conv(t, accepted_node=t.node[:2]),
     C_ + r"accepted_node must have shape \(3,\), got \(2,\)", ValueError),
    ("parents_shape", "any", lambda t: commit_conv(t, parents=t.par[:, :3]),
     C_ + r"parents must have shape \(3, 4\), got \(3, 3\)", ValueError),
    ("indices_shape", "any", lambda t: commit_conv(t, conv_state_indices=t.idx[:2]),
     C_ + r"conv_state_indices must have shape \(3,\), got \(2,\)", ValueError),
    ("rows_without_indices", "any", lambda t: commit_conv(t, conv_state=t.state[:2], conv_state_indices=None),
     C_ + r"conv_state.shape\[0\] must be at least batch = 3 when conv_state_indices is None", ValueError),
    ("node_out_of_range", "cpu", lambda t: commit_conv(t, accepted_node=t.node.new_tensor([4, 0, 0])),
     C_ + r"accepted_node must be in \[-1, T = 4\)"),
    ("parents_not_earlier", "cpu", lambda t: commit_conv(t, parents=t.par.new_tensor([[-1, 0, 2, 1]] * 3)),
     C_ + r"parents\[b, t\] must be in \[-1, t\)"),
    ("indices_duplicate", "cpu", lambda t: commit_conv(t, conv_state_indices=t.idx.new_tensor([1, 1, -1])),
     C_ + r"conv_state_indices holds a row twice"),
    ("indices_out_of_range", "cpu", lambda t: commit_conv(t, conv_state_indices=t.idx.new_tensor([1, 4, -1])),
     C_ + r"conv_state_indices must be < conv_state.shape\[0\] = 4"),
]


PUBLIC_CASES = [  # the public functions reach the same checks (int64 indices are converted first)
    ("fn_activation", "any", lambda t: nemokernels.causal_conv1d_fn(t.x, t.w, t.b, activation="relu"),
     "causal_conv1d: activation must be None, 'silu' or 'swish', got 'relu'", ValueError),
    ("update_activation", "any", lambda t: nemokernels.causal_conv1d_update(t.xu, t.state, t.w, t.b, activation="gelu"),
     "activation must be", ValueError),
    ("fn_weight_dim", "any", lambda t: nemokernels.causal_conv1d_fn(t.x, t.w[:7], t.b),
     F_ + r"weight.shape\[0\] must be 8"),
    ("update_indices_duplicate", "cpu",
     lambda t: nemokernels.causal_conv1d_update(t.xu, t.state, t.w, t.b, conv_state_indices=torch.tensor([0, 0, -1])),
     U_ + "conv_state_indices holds row 0 twice"),
    ("update_indices_out_of_range", "cpu",
     lambda t: nemokernels.causal_conv1d_update(t.xu, t.state, t.w, t.b, conv_state_indices=torch.tensor([0, 4, -1])),
     U_ + r"conv_state_indices\[1\] = 4 is out of range"),
    ("update_parents_int64_not_earlier", "cpu",
     lambda t: nemokernels.causal_conv1d_update(t.xt, t.state, t.w, t.b, parents=torch.tensor([[-1, 0, 3, 1]] * 3)),
     U_ + r"parents\[0, 2\] = 3 must be in \[-1, 2\)"),
]


test_bad_input = bad_input_test(
    fwd=(good_args, FWD_CASES), bwd=(good_args, BWD_CASES), update=(good_args, UPDATE_CASES),
    public=(good_args, PUBLIC_CASES), commit_conv_state=(good_args, COMMIT_CASES))


# ---------------------------------------------------------------- in-place safety of the update


@pytest.mark.parametrize("device", DEVICES)
def test_update_refusals_leave_the_state_untouched(device):
    """Every refused update (expanded, self-overlapping or shared state; on the CPU duplicate
    or out-of-range rows) raises before anything is written."""
    t = good_args(device)
    before = t.state.clone()
    bad = [dict(conv_state_indices=t.idx.new_tensor([1, 1, -1])), dict(conv_state_indices=t.idx.new_tensor([1, 9, 0]))]
    if device == "cpu":
        for kw in bad:
            with pytest.raises(RuntimeError, match=U_ + "conv_state_indices"):
                upd(t, **kw)
    with pytest.raises(RuntimeError, match="must not share memory with x"):
        upd(t, x=t.state[:3, :, 0])
    assert torch.equal(t.state, before)
    expanded = t.state[:1].expand(4, 8, 3)
    with pytest.raises(RuntimeError, match="expanded view"):
        upd(t, conv_state=expanded)
    assert torch.equal(t.state, before)


@pytest.mark.parametrize("device", DEVICES)
def test_update_padded_indices_may_repeat_and_views_of_one_buffer_are_fine(device):
    """Negative (padded) indices repeat freely; a state and an x that are interleaved views of
    one buffer sharing no element are not an overlap."""
    dim, width = 8, 4
    buf = torch.randn(5, dim, width, device=device)
    state, x = buf[..., :3], buf[:4, :, 3]  # x (4, dim) lives in the column next to the state
    w, b = make_params(dim, width, torch.float32, device)
    idx = torch.tensor([-1, 3, -1, 0], dtype=torch.int32, device=device)
    ref_out, ref_state = causal_conv1d_update_ref(x.double(), state.double(), w.double(), b.double(), "silu", idx)
    out = nemokernels.causal_conv1d_update(x, state, w, b, activation="silu", conv_state_indices=idx)
    assert_close(out, ref_out, torch.float32)
    assert torch.equal(state.double(), ref_state)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], torch.zeros_like(out[2]))


@pytest.mark.parametrize("device", DEVICES)
def test_update_strided_indices(device):
    """conv_state_indices given as a strided view are read by their strides (they were read as
    if contiguous)."""
    dim, width = 16, 4
    x = torch.randn(3, dim, device=device)
    w, b = make_params(dim, width, torch.float32, device)
    state = torch.randn(5, dim, 3, device=device)
    wide = torch.tensor([4, 99, -1, 99, 1, 99], dtype=torch.int32, device=device)
    ref_out, ref_state = causal_conv1d_update_ref(x.double(), state.double(), w.double(), b.double(), "silu",
                                                  wide[::2])
    out = nemokernels.causal_conv1d_update(x, state, w, b, activation="silu", conv_state_indices=wide[::2])
    assert_close(out, ref_out, torch.float32)
    assert torch.equal(state.double(), ref_state)


@pytest.mark.gpu
@pytest.mark.racecheck
def test_update_duplicate_and_out_of_range_indices_stay_in_bounds_on_cuda():
    """CUDA cannot refuse index values without a host sync: duplicate rows race (unspecified
    values) and out-of-range rows give NaN, but nothing outside conv_state is touched, rows no
    valid entry names are untouched, and the other entries are exact."""
    dim, width = 64, 4
    buf = torch.full((8, dim, 3), float("nan"), device="cuda")
    state = buf[1:7]  # guard rows 0 and 7 around the 6 rows of the state
    state.copy_(torch.randn(6, dim, 3, device="cuda"))
    before = state.clone()
    w, b = make_params(dim, width, torch.float32, "cuda")
    x = torch.randn(5, dim, device="cuda")
    idx = torch.tensor([2, 4, 2, 2**30, -1], dtype=torch.int32, device="cuda")
    out = nemokernels.causal_conv1d_update(x, state, w, b, activation="silu", conv_state_indices=idx)
    torch.cuda.synchronize()
    assert torch.isnan(buf[0]).all() and torch.isnan(buf[7]).all(), "memory around conv_state was written"
    for r in (0, 1, 3, 5):
        assert torch.equal(state[r], before[r]), f"row {r} (named by no valid entry) changed"
    ref_out, ref_state = causal_conv1d_update_ref(x[1:2].double(), before[4:5].double(), w.double(), b.double(), "silu")
    assert_close(out[1:2], ref_out, torch.float32)
    assert torch.equal(state[4:5].double(), ref_state)
    assert torch.isnan(out[3]).all() and torch.equal(out[4], torch.zeros_like(out[4]))
    assert torch.isfinite(state[2]).all()


# ---------------------------------------------------------------- launch limits


@pytest.mark.parametrize("device", DEVICES)
def test_sequence_past_one_cuda_grid_of_time_tiles(device):
    """65535 x 64 + 100 time steps: past grid.y of the channel-last CUDA forward before its
    time tiles were grid-strided (CUDA refused the launch above ~4.19M tokens). The CPU path has
    no such limit. Forward and backward against float64 F.conv1d."""
    L, dim, width = 65535 * 64 + 100, 4, 4
    x = torch.randn(1, L, dim, device=device).transpose(1, 2).requires_grad_()  # channel-last
    w, b = make_params(dim, width, torch.float32, device)
    w.requires_grad_()
    out = nemokernels.causal_conv1d_fn(x, w, b, activation="silu")
    g = torch.randn(1, dim, L, device=device)
    dx, dw = torch.autograd.grad(out, (x, w), g)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = F.silu(F.conv1d(x64, w64.unsqueeze(1), b.double(), padding=width - 1, groups=dim)[..., :L])
    rdx, rdw = torch.autograd.grad(ref, (x64, w64), g.double())
    assert_close(out, ref, torch.float32, what="out")
    assert_close(out[..., -1000:], ref[..., -1000:], torch.float32, what="the last time tiles")
    assert_close(dx, rdx, torch.float32, factor=10, what="dx")
    assert_close(dw, rdw, torch.float32, factor=100, what="dweight (4.2M-term sums)")


# ---------------------------------------------------------------- GPU agrees with CPU kernel


@pytest.mark.gpu
@pytest.mark.racecheck
@pytest.mark.parametrize("layout", ["contiguous", "channel_last", "strided"])
def test_cuda_matches_cpu_kernel(layout):
    x = make_x(2, 136, 150, torch.float32, "cuda", layout).requires_grad_()
    w, b = make_params(136, 4, torch.float32, "cuda")
    g = torch.randn(2, 136, 150, device="cuda")
    out = nemokernels.causal_conv1d_fn(x, w, b, activation="silu")
    (dx,) = torch.autograd.grad(out, x, g)
    xc = x.detach().cpu().requires_grad_()
    outc = nemokernels.causal_conv1d_fn(xc, w.cpu(), b.cpu(), activation="silu")
    (dxc,) = torch.autograd.grad(outc, xc, g.cpu())
    assert rel_err(out, outc) < 1e-6 and rel_err(dx, dxc) < 1e-6


# ---------------------------------------------------------------- opcheck, compile, graphs


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    ops = torch.ops.nemokernels
    for layout in ("contiguous", "channel_last"):
        x = make_x(2, 16, 11, torch.float32, device, layout).requires_grad_()
        w, b = make_params(16, 4, torch.float32, device)
        w.requires_grad_(), b.requires_grad_()
        init = torch.randn(2, 16, 3, device=device, requires_grad=True)
        seq = torch.tensor([[0] * 5 + [1] * 6] * 2, dtype=torch.int32, device=device)
        opcheck(ops.causal_conv1d_fwd, (x, w, b, None, init, True, True))
        opcheck(ops.causal_conv1d_fwd, (x, w, None, seq, None, False, False))
        dout = torch.randn(2, 16, 11, device=device)
        opcheck(ops.causal_conv1d_bwd, (x.detach(), w.detach(), b.detach(), dout, None, init.detach(),
                                        torch.randn(2, 16, 3, device=device), True, True))
    state = torch.randn(3, 16, 3, device=device)
    opcheck(ops.causal_conv1d_update, (torch.randn(2, 16, device=device), state, w.detach(), b.detach(), True,
                                       torch.tensor([2, 0], dtype=torch.int32, device=device)))
    tree = torch.tensor([[-1, 0, 0, 1], [-1, -1, 1, 2]], dtype=torch.int32, device=device)
    opcheck(ops.causal_conv1d_update, (torch.randn(2, 16, 4, device=device), state, w.detach(), b.detach(), True,
                                       torch.tensor([2, 0], dtype=torch.int32, device=device), tree))


@pytest.mark.parametrize("device", DEVICES)
def test_tree_update_and_commit_torch_compile_fullgraph(device):
    """A tree update of the conv and the commit of the accepted node, in one compiled graph."""
    backend = "inductor" if device == "cuda" else "aot_eager"
    x = torch.randn(3, 16, len(TREE_PARENTS[0]), device=device)
    w, b = make_params(16, 4, torch.float32, device)
    idx = torch.tensor([3, -1, 1], dtype=torch.int32, device=device)
    parents = torch.tensor(TREE_PARENTS, device=device)
    node = torch.tensor([4, 2, 6], device=device)

    def f(x, state, idx, parents, node):
        y = nemokernels.causal_conv1d_update(x, state, w, b, activation="silu", conv_state_indices=idx, parents=parents)
        nemokernels.commit_conv_state(state, x, node, parents, conv_state_indices=idx)
        return y

    s1 = torch.randn(5, 16, 3, device=device)
    s2 = s1.clone()
    y1 = f(x, s1, idx, parents, node)
    y2 = torch.compile(f, fullgraph=True, backend=backend)(x, s2, idx, parents, node)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    backend = "inductor" if device == "cuda" else "aot_eager"
    x = make_x(2, 32, 20, torch.float32, device, "channel_last").requires_grad_()
    w, b = make_params(32, 4, torch.float32, device)

    def f(x, w, b, state):
        y = nemokernels.causal_conv1d_fn(x, w, b, activation="silu")
        z = nemokernels.causal_conv1d_update(y[..., -1].detach(), state, w, b, activation="silu")
        return y.sum() + z.sum()

    s1 = torch.randn(2, 32, 3, device=device)
    s2 = s1.clone()
    eager = f(x, w, b, s1)
    compiled = torch.compile(f, fullgraph=True, backend=backend)(x, w, b, s2)
    assert torch.allclose(eager, compiled, rtol=1e-5, atol=1e-5)
    assert torch.equal(s1, s2), "the in-place state update must survive compilation"
    (gx,) = torch.autograd.grad(compiled, x)
    (gx_eager,) = torch.autograd.grad(eager, x)
    assert torch.allclose(gx, gx_eager, rtol=1e-5, atol=1e-6), "the compiled backward must match eager"


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_inputs():
    """Capture, change the inputs in place, replay: the result follows the new inputs."""
    dim, width = 64, 4
    x = make_x(2, dim, 50, torch.bfloat16, "cuda", "channel_last")
    w, b = make_params(dim, width, torch.bfloat16, "cuda")
    xt = torch.randn(4, dim, device="cuda", dtype=torch.bfloat16)
    state = torch.randn(4, dim, 3, device="cuda", dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside capture
        nemokernels.causal_conv1d_fn(x, w, b, activation="silu")
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    state_copy = state.clone()
    with torch.cuda.graph(g):
        y = nemokernels.causal_conv1d_fn(x, w, b, activation="silu")
        z = nemokernels.causal_conv1d_update(xt, state, w, b, activation="silu")
    x.copy_(torch.randn_like(x))
    xt.copy_(torch.randn_like(xt))
    state.copy_(state_copy)
    g.replay()
    ref_state = state_copy.clone()
    assert torch.equal(y, nemokernels.causal_conv1d_fn(x, w, b, activation="silu"))
    assert torch.equal(z, nemokernels.causal_conv1d_update(xt, ref_state, w, b, activation="silu"))
    assert torch.equal(state, ref_state)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_large_shape_gpu(dtype, sanitizer):
    """A Nemotron-3 Nano sized call (conv dim 6144) in both layouts, against F.conv1d."""
    L = 256 if sanitizer else 4096
    dim = 6144
    for layout in ("channel_last", "contiguous"):
        x = make_x(1, dim, L, dtype, "cuda", layout)
        w, b = make_params(dim, 4, dtype, "cuda")
        out = nemokernels.causal_conv1d_fn(x, w, b, activation="silu")
        ref = F.silu(F.conv1d(x.float(), w.float().unsqueeze(1), b.float(), padding=3, groups=dim)[..., :L])
        assert rel_err(out, ref) < TOL[dtype]
