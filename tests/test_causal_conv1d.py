"""causal_conv1d_fn / causal_conv1d_update against the float64 reference (ops/reference.py)."""
import pytest
import torch
import torch.nn.functional as F

import nemokernels
from nemokernels.ops.reference import causal_conv1d_ref, causal_conv1d_update_ref

from conftest import DEVICES
from helpers import TOL, assert_close, nan_like, opcheck, poison_allocator, rel_err

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


def test_update_index_out_of_range_raises_on_cpu():
    x = torch.randn(2, 8)
    w, b = make_params(8, 4, torch.float32, "cpu")
    state = torch.zeros(2, 8, 3)
    with pytest.raises(RuntimeError, match="conv_state_indices"):
        nemokernels.causal_conv1d_update(x, state, w, b, conv_state_indices=torch.tensor([0, 2], dtype=torch.int32))


@pytest.mark.gpu
def test_update_index_out_of_range_gives_nan_on_cuda():
    x = torch.randn(2, 8, device="cuda")
    w, b = make_params(8, 4, torch.float32, "cuda")
    state = torch.zeros(2, 8, 3, device="cuda")
    before = state.clone()
    out = nemokernels.causal_conv1d_update(x, state, w, b, conv_state_indices=torch.tensor([7, 0], dtype=torch.int32, device="cuda"))
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()
    assert torch.equal(state[1], before[1])


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


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    x = torch.randn(2, 8, 10, device=device)
    w, b = make_params(8, 4, torch.float32, device)
    cases = [
        (lambda: nemokernels.causal_conv1d_fn(x.long(), w, b), "x must be one of"),
        (lambda: nemokernels.causal_conv1d_fn(x[0], w, b), "x must have 3 dimensions"),
        (lambda: nemokernels.causal_conv1d_fn(x, torch.randn(8, 5, device=device), b), "width"),
        (lambda: nemokernels.causal_conv1d_fn(x, torch.randn(9, 4, device=device), b), r"weight.shape\[0\] must be 8"),
        (lambda: nemokernels.causal_conv1d_fn(x, w, torch.randn(7, device=device)), r"bias.shape\[0\] must be 8"),
        (lambda: nemokernels.causal_conv1d_fn(x, w, b, seq_idx=torch.zeros(2, 9, dtype=torch.int32, device=device)), r"seq_idx.shape\[1\]"),
        (lambda: nemokernels.causal_conv1d_fn(x, w, b, seq_idx=torch.zeros(2, 10, dtype=torch.int32, device=device),
                                              initial_states=torch.zeros(2, 8, 3, device=device)), "initial_states must be None"),
        (lambda: nemokernels.causal_conv1d_fn(x, w, b, initial_states=torch.zeros(2, 8, 2, device=device)), r"initial_states.shape\[2\] must be 3"),
        (lambda: nemokernels.causal_conv1d_fn(x, w, b, initial_states=torch.zeros(2, 8, 3, device=device, dtype=torch.float16)), "initial_states must have x's dtype"),
        (lambda: nemokernels.causal_conv1d_update(x[..., 0], torch.zeros(2, 8, 2, device=device), w, b), "conv_state.shape"),
        (lambda: nemokernels.causal_conv1d_update(x[..., 0], torch.zeros(2, 8, 3, device=device, dtype=torch.float16), w, b), "conv_state must have x's dtype"),
        (lambda: nemokernels.causal_conv1d_update(x[..., 0], torch.zeros(1, 8, 3, device=device), w, b), "conv_state.shape\\[0\\] must be at least"),
    ]
    for fn, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            fn()
    with pytest.raises(ValueError, match="activation"):
        nemokernels.causal_conv1d_fn(x, w, b, activation="relu")


@pytest.mark.gpu
def test_mixed_devices_raise():
    x = torch.randn(2, 8, 10, device="cuda")
    w, b = make_params(8, 4, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        nemokernels.causal_conv1d_fn(x, w, None)


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
    assert torch.isfinite(gx).all()


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
