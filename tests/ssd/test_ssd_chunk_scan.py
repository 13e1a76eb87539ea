"""mamba_chunk_scan_combined against the float64 recurrence (ssd_scan_ref), forward and
backward, every option, packed sequences, state hand-over, bad input."""
import contextlib
import re
from types import SimpleNamespace

import pytest
import torch

import nemokernels
from nemokernels.ssd.reference import ssd_scan_ref, varlen_from_cu_seqlens

from conftest import DEVICES
from helpers import TOL, assert_close, bad_input_test, opcheck, poison_allocator, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
scan = nemokernels.mamba_chunk_scan_combined


def chunk_for(device, small):
    """A chunk size the device's path takes: small ones on the CPU keep many chunks in short
    tests; the CUDA kernels take 64/128/256."""
    return small if device == "cpu" else 64


def make_inputs(b, L, H, P, G, N, dtype, device, *, D="head", z=True, dt_bias=True, init=False,
                layout="contiguous"):
    """Realistic Mamba-2 ranges: dt' ~ 0.01..1 after softplus, A in [-4.5, -0.5]."""
    def act(*shape):
        if layout == "sliced":  # a view into a wider projection output, as Mamba-2's split gives
            wide = torch.randn(*shape[:-1], shape[-1] * 2 + 3, device=device, dtype=dtype)
            return wide[..., 1:shape[-1] + 1]
        if layout == "transposed":  # last dim not contiguous: the entry copies it
            return torch.randn(*shape[:-2], shape[-1], shape[-2], device=device, dtype=dtype).transpose(-1, -2)
        return torch.randn(*shape, device=device, dtype=dtype)

    t = dict(
        x=act(b, L, H, P),
        dt=(torch.randn(b, L, H, device=device) * 0.5 - 1.0).to(dtype),
        A=-(torch.rand(H, device=device) * 4 + 0.5),
        B=act(b, L, G, N) / N**0.25,
        C=act(b, L, G, N) / N**0.25,
    )
    t["D"] = {None: None, "head": torch.randn(H, device=device), "headdim": torch.randn(H, P, device=device)}[D]
    t["z"] = act(b, L, H, P) if z else None
    t["dt_bias"] = torch.randn(H, device=device) * 0.5 if dt_bias else None
    t["initial_states"] = torch.randn(b, H, P, N, device=device) if init else None
    return t


def ref64(inp, **kw):
    d = {k: (v.detach().double().requires_grad_(v.requires_grad) if torch.is_tensor(v) and v.is_floating_point() else v)
         for k, v in inp.items()}
    return d, ssd_scan_ref(d["x"], d["dt"], d["A"], d["B"], d["C"], D=d["D"], z=d["z"], dt_bias=d["dt_bias"],
                           initial_states=d["initial_states"], **kw)


def call(inp, Q, **kw):
    return scan(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], Q, D=inp["D"], z=inp["z"],
                dt_bias=inp["dt_bias"], initial_states=inp["initial_states"], **kw)


def grads_of(inp):
    return {k: v.grad for k, v in inp.items() if torch.is_tensor(v) and v.requires_grad}


def requires_grad(inp):
    """Every input make_inputs gave records its gradient (in place; returns inp)."""
    for v in inp.values():
        if v is not None:
            v.requires_grad_(True)
    return inp


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_recurrence(device, dtype):
    Q = chunk_for(device, 16)
    for (b, L, H, P, G, N) in [(2, 3 * Q + 5, 4, 8, 2, 16), (1, 1, 2, 16, 1, 8), (1, Q, 6, 8, 3, 8),
                               (3, Q - 1, 2, 24, 2, 32)]:
        for opts in [dict(D="head", z=True, dt_bias=True, init=True), dict(D=None, z=False, dt_bias=False),
                     dict(D="headdim", z=True, dt_bias=False, init=False)]:
            inp = make_inputs(b, L, H, P, G, N, dtype, device, **opts)
            poison_allocator(device)
            y, fin = call(inp, Q, dt_softplus=True, return_final_states=True)
            assert y.shape == (b, L, H, P) and y.dtype == dtype and fin.dtype == torch.float32
            _, (yr, fr) = ref64(inp, dt_softplus=True, return_final_states=True)
            what = f"{(b, L, H, P, G, N)} {opts}"
            assert_close(y, yr, dtype, factor=2, what="y " + what)
            assert_close(fin, fr, dtype, factor=2, what="final " + what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Q", [1, 5, 8, 64, 128, 256])
def test_chunk_size_does_not_change_the_result(device, Q):
    if device == "cuda" and Q not in (64, 128, 256):
        pytest.skip("the CUDA path takes chunk sizes 64/128/256")
    L = 300 if device == "cuda" else 70
    inp = make_inputs(1, L, 4, 8, 2, 8, torch.float32, device, init=True)
    y, fin = call(inp, Q, dt_softplus=True, return_final_states=True)
    _, (yr, fr) = ref64(inp, dt_softplus=True, return_final_states=True)
    assert_close(y, yr, torch.float32, factor=5, what=f"y Q={Q}")
    assert_close(fin, fr, torch.float32, factor=5, what=f"final Q={Q}")


@pytest.mark.parametrize("device", DEVICES)
def test_dt_transform_options(device):
    """softplus on/off (and its threshold at 20), the clamp on both sides, dt_bias."""
    Q = chunk_for(device, 8)
    inp = make_inputs(2, 40, 4, 8, 2, 8, torch.float32, device)
    inp["dt"] = torch.randn(2, 40, 4, device=device) * 12  # crosses the softplus threshold and the clamp
    for softplus in (False, True):
        for limit in [(0.0, float("inf")), (0.05, 0.3), (0.2, 25.0)]:
            y = call(inp, Q, dt_softplus=softplus, dt_limit=limit)
            _, yr = ref64(inp, dt_softplus=softplus, dt_limit=limit)
            assert_close(y, yr, torch.float32, factor=5, what=f"softplus={softplus} limit={limit}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["sliced", "transposed"])
def test_strided_inputs(device, layout):
    Q = chunk_for(device, 16)
    inp = make_inputs(2, 50, 4, 16, 2, 16, torch.bfloat16, device, layout=layout)
    assert not inp["x"].is_contiguous()
    y = call(inp, Q, dt_softplus=True)
    _, yr = ref64(inp, dt_softplus=True)
    assert_close(y, yr, torch.bfloat16, what=layout)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    inp = make_inputs(2, 0, 4, 8, 2, 8, torch.float32, device, init=True)
    y, fin = call(inp, chunk_for(device, 8), return_final_states=True)
    assert y.shape == (2, 0, 4, 8)
    torch.testing.assert_close(fin, inp["initial_states"])
    inp = make_inputs(0, 10, 4, 8, 2, 8, torch.float32, device)
    assert call(inp, chunk_for(device, 8)).shape == (0, 10, 4, 8)


# ---------------------------------------------------------------- backward


def check_backward(device, dtype, b, L, H, P, G, N, Q, opts, factor, seq_idx=None, **kw):
    inp = requires_grad(make_inputs(b, L, H, P, G, N, dtype, device, **opts))
    poison_allocator(device)
    y, fin = call(inp, Q, seq_idx=seq_idx, return_final_states=True, **kw)
    gy = torch.randn_like(y)[..., :].transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous dout
    gf = torch.randn_like(fin)
    ((y.float() * gy.float()).sum() + (fin * gf).sum()).backward()
    d, (yr, fr) = ref64(inp, seq_idx=seq_idx, return_final_states=True, **kw)
    ((yr * gy.double()).sum() + (fr * gf.double()).sum()).backward()
    got, want = grads_of(inp), grads_of(d)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == inp[k].dtype and got[k].shape == inp[k].shape, k
        assert_close(got[k], want[k], dtype, factor=factor, what=f"grad {k} {opts}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_autograd_of_recurrence(device, dtype):
    Q = chunk_for(device, 16)
    factor = 10 if dtype == torch.float32 else 2
    for shape in [(2, 2 * Q + 7, 4, 8, 2, 16), (1, 5, 3, 8, 1, 8)]:
        for opts in [dict(D="head", z=True, dt_bias=True, init=True),
                     dict(D="headdim", z=False, dt_bias=False, init=False)]:
            check_backward(device, dtype, *shape, Q, opts, factor, dt_softplus=True, dt_limit=(0.0, 2.0))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_packed_sequences(device):
    Q = chunk_for(device, 8)
    L = 3 * Q + 3
    cu = torch.tensor([0, 1, Q - 1, Q + 4, 2 * Q, L], dtype=torch.int32, device=device)
    sid = varlen_from_cu_seqlens(cu, L)
    check_backward(device, torch.float32, 1, L, 4, 8, 2, 8, Q, dict(D="head", z=True, dt_bias=True, init=True),
                   10, seq_idx=sid, dt_softplus=True)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_through_final_states_only(device):
    Q = chunk_for(device, 8)
    inp = requires_grad(make_inputs(1, 2 * Q + 1, 2, 8, 1, 8, torch.float32, device, init=True))
    _, fin = call(inp, Q, dt_softplus=True, return_final_states=True)
    fin.sum().backward()
    d, (_, fr) = ref64(inp, dt_softplus=True, return_final_states=True)
    fr.sum().backward()
    got = grads_of(inp)
    for k, g in grads_of(d).items():
        if g is None:  # the final state does not depend on it (z, D): zero gradient
            assert got[k] is None or torch.equal(got[k], torch.zeros_like(got[k])), k
        else:
            assert_close(got[k], g, torch.float32, factor=10, what=k)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_deep_stack_gradients_are_finite(device, dtype):
    """mamba 352/445/672: NaN gradients in bf16 at the first step and in deeper stacks. The
    input gradient through 6 residual layers is finite and matches the float64 recurrence
    through the same stack (bf16: every layer's output is rounded, so the bound is looser)."""
    Q = chunk_for(device, 16)
    b, L, H, P, G, N = 2, 3 * Q + 1, 4, 16, 2, 16
    h = torch.randn(b, L, H, P, device=device, dtype=dtype, requires_grad=True)
    out, layers = h, []
    for _ in range(6):
        inp = make_inputs(b, L, H, P, G, N, dtype, device, D="head", z=True)
        layers.append(inp)
        inp["x"] = out
        out = call(inp, Q, dt_softplus=True) + out
    out.float().square().mean().backward()
    assert torch.isfinite(h.grad).all()
    h64 = h.detach().double().requires_grad_()
    out64 = h64
    for inp in layers:
        d = {k: (v.detach().double() if torch.is_tensor(v) else v) for k, v in inp.items()}
        out64 = ssd_scan_ref(out64, d["dt"], d["A"], d["B"], d["C"], D=d["D"], z=d["z"], dt_bias=d["dt_bias"],
                             dt_softplus=True) + out64
    out64.square().mean().backward()
    assert_close(h.grad, h64.grad, dtype, factor=1 if dtype == torch.float32 else 2, what="dh through 6 layers")


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    Q = chunk_for(device, 16)
    inp = requires_grad(make_inputs(2, 3 * Q + 2, 8, 16, 2, 16, torch.bfloat16, device, init=True))
    dout = torch.randn(2, 3 * Q + 2, 8, 16, device=device, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        ins = [inp[k] for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")]
        runs.append(torch.autograd.grad(call(inp, Q, dt_softplus=True), ins, dout))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- packed sequences and states


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_equals_separate_sequences(device, dtype):
    """varlen with seq_idx/cu_seqlens: each sequence as if run alone; varlen states are the
    separate runs' final states (zeros for an empty sequence)."""
    Q = chunk_for(device, 8)
    lens = [1, Q, 0, 2 * Q + 3, Q - 1, 3]
    L = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    inp = make_inputs(1, L, 4, 8, 2, 16, dtype, device)
    poison_allocator(device)
    y, var = call(inp, Q, cu_seqlens=cu, dt_softplus=True, return_varlen_states=True)  # seq_idx derived
    assert var.shape == (len(lens), 4, 8, 16)
    for i, n in enumerate(lens):
        s = int(cu[i])
        if n == 0:
            assert torch.equal(var[i], torch.zeros_like(var[i]))
            continue
        part = {k: (v[:, s:s + n] if torch.is_tensor(v) and v.dim() >= 3 else v) for k, v in inp.items()}
        ys, fs = call(part, Q, dt_softplus=True, return_final_states=True)
        assert_close(y[:, s:s + n], ys.float(), dtype, what=f"y of sequence {i}")
        assert_close(var[i], fs[0], dtype, what=f"varlen state {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_states_match_reference(device):
    Q = chunk_for(device, 8)
    cu = torch.tensor([0, 5, 5, Q + 2, 3 * Q, 3 * Q + 1], dtype=torch.int32, device=device)
    L = int(cu[-1])
    sid = varlen_from_cu_seqlens(cu, L)
    inp = make_inputs(1, L, 2, 8, 1, 8, torch.float32, device, init=True)
    y, fin, var = call(inp, Q, seq_idx=sid, cu_seqlens=cu, dt_softplus=True, return_final_states=True,
                       return_varlen_states=True)
    _, (yr, fr, vr) = ref64(inp, seq_idx=sid, cu_seqlens=cu, dt_softplus=True, return_final_states=True,
                            return_varlen_states=True)
    for out, ref, what in [(y, yr, "y"), (fin, fr, "final"), (var, vr, "varlen")]:
        assert_close(out, ref, torch.float32, factor=5, what=what)


@pytest.mark.parametrize("device", DEVICES)
def test_states_out_of_a_split_equal_states_in(device):
    """vLLM 34587: a state handed over mid-chunk, at a chunk boundary, after one token."""
    Q = chunk_for(device, 8)
    L = 3 * Q + 5
    inp = make_inputs(2, L, 4, 8, 2, 8, torch.float32, device, init=True)
    y_full, f_full = call(inp, Q, dt_softplus=True, return_final_states=True)
    for cut in [1, Q // 2 + 1, Q, 2 * Q - 1, L - 1]:
        a = {k: (v[:, :cut] if torch.is_tensor(v) and v.dim() >= 3 and k != "initial_states" else v)
             for k, v in inp.items()}
        b = {k: (v[:, cut:] if torch.is_tensor(v) and v.dim() >= 3 and k != "initial_states" else v)
             for k, v in inp.items()}
        ya, fa = call(a, Q, dt_softplus=True, return_final_states=True)
        b["initial_states"] = fa
        yb, fb = call(b, Q, dt_softplus=True, return_final_states=True)
        assert_close(torch.cat([ya, yb], 1), y_full, torch.float32, factor=5, what=f"y cut={cut}")
        assert_close(fb, f_full, torch.float32, factor=5, what=f"final cut={cut}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True])
def test_chunk_states_match_the_recurrence(device, packed):
    """return_chunk_states: the state after token chunk_ends[c] equals the float64 recurrence
    run up to that token (with initial states, or packed sequences whose state restarts), for
    seqlen a multiple of the chunk, not one, and shorter than one; the other outputs are those of
    a call without it; the states are not differentiable."""
    Q = chunk_for(device, 8)
    for L in (3 * Q, 2 * Q + 3, Q - 3):
        inp = make_inputs(1 if packed else 2, L, 4, 8, 2, 8, torch.float32, device, init=not packed)
        kw = dict(dt_softplus=True)
        if packed:
            kw["seq_idx"] = torch.tensor([[0] * (L // 3) + [1] * (L // 3 + 1) + [2] * (L - 2 * (L // 3) - 1)],
                                         dtype=torch.int32, device=device)
        inp["x"].requires_grad_(True)
        y0, f0 = call(inp, Q, return_final_states=True, **kw)
        y, f, states, ends = call(inp, Q, return_final_states=True, return_chunk_states=True, **kw)
        assert y.requires_grad and not states.requires_grad
        nc = -(-L // Q)
        assert states.shape == (inp["x"].shape[0], nc, 4, 8, 8) and states.dtype == torch.float32
        assert ends.tolist() == [min((c + 1) * Q, L) - 1 for c in range(nc)]
        assert torch.equal(y, y0) and torch.equal(f, f0) and torch.equal(states[:, -1], f)
        for c, e in enumerate(ends.tolist()):
            sub = {k: (v[:, :e + 1] if torch.is_tensor(v) and v.dim() >= 3 and k != "initial_states" else v)
                   for k, v in inp.items()}
            skw = dict(kw, seq_idx=kw["seq_idx"][:, :e + 1]) if packed else kw
            _, (_, want) = ref64(sub, return_final_states=True, **skw)
            assert_close(states[:, c], want, torch.float32, factor=5, what=f"state after token {e} (L={L})")
    y, states, ends = call(make_inputs(2, 0, 4, 8, 2, 8, torch.float32, device), Q, return_chunk_states=True)
    assert states.shape == (2, 0, 4, 8, 8) and ends.numel() == 0


# ---------------------------------------------------------------- packed sequences, a state each


def packed_case(device, dtype, lens, Q, *, H=4, P=8, G=2, N=16, init_rows="all", seed=0):
    """Inputs of packed sequences of the given lengths (batch 1) with per-sequence initial states
    (init_rows "all": one per sequence, 1: the first only, 0: none) and their cu_seqlens."""
    torch.manual_seed(seed)
    L = sum(lens)
    inp = make_inputs(1, L, H, P, G, N, dtype, device)
    rows = {"all": len(lens), 1: 1, 0: 0}[init_rows]
    inp["initial_states"] = torch.randn(rows, H, P, N, device=device) if rows else None
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return inp, cu


def piece(inp, cu, i):
    """Sequence i of a packed case as its own batch-1 input, starting from its initial state."""
    s, e = int(cu[i]), int(cu[i + 1])
    out = {k: (v[:, s:e] if torch.is_tensor(v) and v.dim() >= 3 and k != "initial_states" else v)
           for k, v in inp.items()}
    init = inp["initial_states"]
    out["initial_states"] = init[i:i + 1] if init is not None and i < init.shape[0] else None
    return out


PACKINGS = [
    [1, 8, 0, 19, 7, 3],          # one-token, one chunk exactly, empty, splits inside chunks
    [0, 0, 5],                    # empty first sequences
    [23],                         # a single sequence
    [4, 4, 4, 4, 0],              # several per chunk of the unaligned layout, empty last
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", range(len(PACKINGS)))
def test_packed_initial_states_equal_separate_calls(device, dtype, k):
    """Sequence s continues initial_states[s]: its y, varlen state (and the final state of the
    sequence holding the last position) equal, bit for bit, a call on that sequence alone (the
    chunks are aligned to each start, so the arithmetic is the same), and match the float64
    recurrence. An empty sequence's varlen state is its initial state."""
    Q = chunk_for(device, 8)
    lens = [n * Q // 8 for n in PACKINGS[k]] if device != "cpu" else PACKINGS[k]
    inp, cu = packed_case(device, dtype, lens, Q, seed=k)
    poison_allocator(device)
    y, fin, var = call(inp, Q, cu_seqlens=cu, dt_softplus=True, return_final_states=True,
                       return_varlen_states=True)
    assert var.shape == (len(lens), 4, 8, 16) and fin.shape == (1, 4, 8, 16)
    last = max(i for i, n in enumerate(lens) if n > 0)
    for i, n in enumerate(lens):
        s = int(cu[i])
        if n == 0:
            assert torch.equal(var[i], inp["initial_states"][i]), f"empty sequence {i} keeps its state"
            continue
        part = piece(inp, cu, i)
        ys, fs = call(part, Q, dt_softplus=True, return_final_states=True)
        assert torch.equal(y[:, s:s + n], ys), f"y of sequence {i} differs from its own call"
        assert torch.equal(var[i], fs[0]), f"varlen state {i} differs from its own call"
        if i == last:
            assert torch.equal(fin, fs)
        _, (yr, fr) = ref64(part, dt_softplus=True, return_final_states=True)
        assert_close(ys, yr, dtype, what=f"y of sequence {i}")
        assert_close(fs, fr, torch.float32 if dtype == torch.float32 else dtype, what=f"state of sequence {i}")


@pytest.mark.parametrize("device", DEVICES)
def test_packed_initial_states_gradients(device):
    """Gradients of a packed call (y and the final state) equal the autograd of the float64
    recurrence run on each sequence alone, in every input and every row of initial_states
    (an empty sequence's row gets zero)."""
    Q = chunk_for(device, 8)
    lens = [1, 2 * Q + 3, 0, Q, 5]
    inp, cu = packed_case(device, torch.float32, lens, Q, seed=3)
    requires_grad(inp)
    y, fin = call(inp, Q, cu_seqlens=cu, dt_softplus=True, return_final_states=True)
    dy = torch.randn_like(y)
    dfin = torch.randn_like(fin)
    ((y * dy).sum() + (fin * dfin).sum()).backward()
    got = grads_of(inp)
    d = {k: (v.detach().double().requires_grad_(True) if torch.is_tensor(v) and v.is_floating_point() else v)
         for k, v in inp.items()}
    loss = 0
    last = max(i for i, n in enumerate(lens) if n > 0)
    for i, n in enumerate(lens):
        if n == 0:
            continue
        p = piece(d, cu, i)
        s = int(cu[i])
        yr, fr = ssd_scan_ref(p["x"], p["dt"], p["A"], p["B"], p["C"], D=p["D"], z=p["z"], dt_bias=p["dt_bias"],
                              initial_states=p["initial_states"], dt_softplus=True, return_final_states=True)
        loss = loss + (yr * dy[:, s:s + n].double()).sum()
        if i == last:
            loss = loss + (fr * dfin.double()).sum()
    names = list(got)
    want = torch.autograd.grad(loss, [d[k] for k in names])
    for k, w in zip(names, want):
        assert_close(got[k], w, torch.float32, factor=10, what=f"grad {k}")
    assert torch.equal(got["initial_states"][2], torch.zeros_like(got["initial_states"][2]))


@pytest.mark.parametrize("device", DEVICES)
def test_packed_single_initial_state_is_the_first_sequences(device):
    """initial_states (1, ...) with several sequences: mamba_ssm's meaning (it continues the first
    sequence, the others start from zero), as the float64 recurrence with seq_idx has it."""
    Q = chunk_for(device, 8)
    inp, cu = packed_case(device, torch.float32, [Q + 3, 6, 2 * Q], Q, init_rows=1, seed=4)
    sid = varlen_from_cu_seqlens(cu.cpu(), int(cu[-1])).to(device)
    y, var = call(inp, Q, cu_seqlens=cu, dt_softplus=True, return_varlen_states=True)
    _, (yr, vr) = ref64(inp, seq_idx=sid, cu_seqlens=cu, dt_softplus=True, return_varlen_states=True)
    assert_close(y, yr, torch.float32, factor=5, what="y")
    assert_close(var, vr, torch.float32, factor=5, what="varlen states")


@pytest.mark.parametrize("device", DEVICES)
def test_packed_chunk_states_for_prefix_caching(device):
    """return_chunk_states with cu_seqlens: the state of each sequence after every multiple of
    chunk_size inside it and after its last token, in plan order, each equal to the float64
    recurrence run on that prefix of the sequence from its initial state; -1 marks the unused
    tail."""
    Q = chunk_for(device, 8)
    lens = [Q // 2 + 1, 0, 2 * Q, 1, Q + 3]
    inp, cu = packed_case(device, torch.float32, lens, Q, seed=5)
    y0 = call(inp, Q, cu_seqlens=cu, dt_softplus=True)
    y, states, ends = call(inp, Q, cu_seqlens=cu, dt_softplus=True, return_chunk_states=True)
    assert torch.equal(y, y0) and ends.dtype == torch.int64
    want_ends = [int(cu[i]) + min(k + Q, n) - 1 for i, n in enumerate(lens) for k in range(0, n, Q)]
    nc = ends.numel()
    assert ends.tolist() == want_ends + [-1] * (nc - len(want_ends)) and states.shape == (1, nc, 4, 8, 16)
    owner = [i for i, n in enumerate(lens) for _ in range(0, n, Q)]
    for c, (e, i) in enumerate(zip(want_ends, owner)):
        p = piece(inp, cu, i)
        cut = e + 1 - int(cu[i])
        sub = {k: (v[:, :cut] if torch.is_tensor(v) and v.dim() >= 3 and k != "initial_states" else v)
               for k, v in p.items()}
        _, (_, fr) = ref64(sub, dt_softplus=True, return_final_states=True)
        assert_close(states[:, c], fr, torch.float32, factor=5, what=f"state after token {e}")
    assert torch.equal(states[0, len(want_ends):], torch.zeros_like(states[0, len(want_ends):]))


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_plan_layout(device):
    """chunk_plan: sequence s's chunks start at cu[s], cu[s] + Q, ... in order, empty sequences
    get none, and the tail is (seqlen, num_sequences) up to the bound that any packing fits."""
    from nemokernels.ssd.ssd_chunk_scan import chunk_plan
    cu = torch.tensor([0, 3, 3, 20, 28, 29], dtype=torch.int32, device=device)
    plan = chunk_plan(cu, 29, 8)
    starts, seqs = plan[0].tolist(), plan[1].tolist()
    real = [(0, 0), (3, 2), (11, 2), (19, 2), (20, 3), (28, 4)]
    nc = min(29, (29 + 5 * 7) // 8)
    assert plan.dtype == torch.int32 and plan.shape == (2, nc + 1)
    assert list(zip(starts, seqs))[:len(real)] == real
    assert all(s == 29 and q == 5 for s, q in zip(starts[len(real):], seqs[len(real):]))
    worst = torch.tensor([0] + [1 + 8 * k for k in range(1, 5)], dtype=torch.int32)  # lengths 9, 8, 8, 8
    lens = (worst[1:] - worst[:-1]).tolist()
    need = sum(-(-n // 8) for n in lens)
    assert chunk_plan(worst, int(worst[-1]), 8).shape[1] - 1 >= need


# ---------------------------------------------------------------- registration, compile, graphs


def op_args(device, with_grad):
    inp = make_inputs(1, 21, 4, 8, 2, 8, torch.float32, device, init=True)
    if with_grad:
        for k in ("x", "dt", "B", "C", "z", "initial_states"):
            inp[k].requires_grad_(True)
    return inp


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    Q = chunk_for(device, 8)
    for with_grad in (False, True):
        i = op_args(device, with_grad)
        opcheck(torch.ops.nemokernels.ssd_chunk_scan_fwd,
                (i["x"], i["dt"], i["A"], i["B"], i["C"], Q, i["D"], i["z"], i["dt_bias"], i["initial_states"],
                 None, None, True, 0.0, float("inf"), True, False, with_grad))
        opcheck(torch.ops.nemokernels.ssd_chunk_scan_fwd,
                (i["x"], i["dt"], i["A"], i["B"], i["C"], Q, i["D"], i["z"], i["dt_bias"], i["initial_states"],
                 None, None, True, 0.0, float("inf"), True, False, with_grad, True))
    i = op_args(device, False)
    y, y_pre, _, _, _ = torch.ops.nemokernels.ssd_chunk_scan_fwd(
        i["x"], i["dt"], i["A"], i["B"], i["C"], Q, i["D"], i["z"], i["dt_bias"], i["initial_states"],
        None, None, True, 0.0, float("inf"), False, False, True)
    opcheck(torch.ops.nemokernels.ssd_chunk_scan_bwd,
            (torch.randn_like(y), i["x"], i["dt"], i["A"], i["B"], i["C"], Q, i["D"], i["z"], y_pre, i["dt_bias"],
             i["initial_states"], None, torch.randn_like(i["initial_states"]), True, 0.0, float("inf"), True))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_packed_initial_states(device):
    """The ops with a chunk plan, a state per sequence and varlen states (autograd included)."""
    from nemokernels.ssd.ssd_chunk_scan import chunk_plan
    Q = chunk_for(device, 8)
    inp, cu = packed_case(device, torch.float32, [3, 0, 12, 6], Q, seed=7)
    plan = chunk_plan(cu, 21, Q)
    for with_grad in (False, True):
        for k in ("x", "dt", "B", "C", "z", "initial_states"):
            inp[k].requires_grad_(with_grad)
        opcheck(torch.ops.nemokernels.ssd_chunk_scan_fwd,
                (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], Q, inp["D"], inp["z"], inp["dt_bias"],
                 inp["initial_states"], None, cu, True, 0.0, float("inf"), True, True, with_grad, True, plan))
    d = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in inp.items()}
    y, y_pre, _, _, _ = torch.ops.nemokernels.ssd_chunk_scan_fwd(
        d["x"], d["dt"], d["A"], d["B"], d["C"], Q, d["D"], d["z"], d["dt_bias"], d["initial_states"],
        None, cu, True, 0.0, float("inf"), False, False, True, False, plan)
    opcheck(torch.ops.nemokernels.ssd_chunk_scan_bwd,
            (torch.randn_like(y), d["x"], d["dt"], d["A"], d["B"], d["C"], Q, d["D"], d["z"], y_pre, d["dt_bias"],
             d["initial_states"], None, torch.randn(1, 4, 8, 16, device=device), True, 0.0, float("inf"), True,
             cu, plan))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_packed_initial_states(device):
    """The public function with cu_seqlens and per-sequence states under torch.compile: the plan
    is built with device ops (no graph break), results and gradients equal eager mode's."""
    Q = chunk_for(device, 8)
    inp, cu = packed_case(device, torch.float32, [5, 0, 11, 9], Q, seed=8)
    requires_grad(inp)

    def f(x, dt, B, C, z, h0, cu):
        y, var = scan(x, dt, inp["A"], B, C, Q, D=inp["D"], z=z, dt_bias=inp["dt_bias"], initial_states=h0,
                      cu_seqlens=cu, dt_softplus=True, return_varlen_states=True)
        return y.sum(), var

    args = [inp[k] for k in ("x", "dt", "B", "C", "z", "initial_states")]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    out, var = compiled(*args, cu)
    g = torch.autograd.grad(out, args)
    ref, ref_var = f(*args, cu)
    gr = torch.autograd.grad(ref, args)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(var, ref_var)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    Q = chunk_for(device, 8)
    i = op_args(device, True)

    @torch.compile(fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    def f(x, dt, B, C, z, h0):
        y, fin = scan(x, dt, i["A"], B, C, Q, D=i["D"], z=z, dt_bias=i["dt_bias"], initial_states=h0,
                      dt_softplus=True, dt_limit=(0.0, 10.0), return_final_states=True)
        return y.sum() + fin.sum()

    args = [i[k] for k in ("x", "dt", "B", "C", "z", "initial_states")]
    out = f(*args)
    g = torch.autograd.grad(out, args)
    ref = scan(i["x"], i["dt"], i["A"], i["B"], i["C"], Q, D=i["D"], z=i["z"], dt_bias=i["dt_bias"],
               initial_states=i["initial_states"], dt_softplus=True, dt_limit=(0.0, 10.0), return_final_states=True)
    ref_out = ref[0].sum() + ref[1].sum()
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(g, torch.autograd.grad(ref_out, args)):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.racecheck
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_cuda_kernel_small(dtype):
    """One small call through every CUDA kernel (forward with varlen states, backward with all
    gradients), for compute-sanitizer memcheck and racecheck."""
    for Q in (64, 128, 256):
        L = Q + 3
        cu = torch.tensor([0, 2, Q + 1, L], dtype=torch.int32, device="cuda")
        inp = requires_grad(make_inputs(1, L, 4, 16, 2, 24, dtype, "cuda", D="headdim", init=True))
        y, fin, var = call(inp, Q, cu_seqlens=cu, dt_softplus=True, return_final_states=True,
                           return_varlen_states=True)
        gy = torch.randn_like(y)
        ((y.float() * gy.float()).sum() + fin.sum()).backward()
        d, (yr, fr, vr) = ref64(inp, seq_idx=varlen_from_cu_seqlens(cu, L), cu_seqlens=cu, dt_softplus=True,
                                return_final_states=True, return_varlen_states=True)
        assert_close(y, yr, dtype, factor=2, what=f"y Q={Q}")
        assert_close(fin, fr, dtype, factor=2, what=f"final Q={Q}")
        assert_close(var, vr, dtype, factor=2, what=f"varlen Q={Q}")
        ((yr * gy.double()).sum() + fr.sum()).backward()
        got, want = grads_of(inp), grads_of(d)
        assert set(got) == set(want)
        for k in want:
            assert_close(got[k], want[k], dtype, factor=10 if dtype == torch.float32 else 2, what=f"grad {k} Q={Q}")


@pytest.mark.gpu
@pytest.mark.parametrize("Q", [128, 256])
def test_production_shape_outputs_and_gradients(Q):
    """Nemotron-H's head shape (P 64, N 128, bf16, 4 heads per group) over 5 chunks: y, the
    final states (the end of H1's chain of in_c tiles, two per head) and every gradient against
    the float64 recurrence, with initial states and a seq_idx reset inside a chunk."""
    b, L, H, P, G, N = 2, 4 * Q + 37, 8, 64, 2, 128
    inp = requires_grad(make_inputs(b, L, H, P, G, N, torch.bfloat16, "cuda", init=True))
    seq_idx = torch.zeros(b, L, dtype=torch.int32, device="cuda")
    seq_idx[1, Q + 5:] = 1
    y, fin = call(inp, Q, seq_idx=seq_idx, dt_softplus=True, return_final_states=True)
    gy, gf = torch.randn_like(y), torch.randn_like(fin)
    ((y.float() * gy.float()).sum() + (fin * gf).sum()).backward()
    d, (yr, fr) = ref64(inp, seq_idx=seq_idx, dt_softplus=True, return_final_states=True)
    assert_close(y, yr, torch.bfloat16, factor=2, what=f"y Q={Q}")
    assert_close(fin, fr, torch.bfloat16, factor=2, what=f"final states Q={Q}")
    ((yr * gy.double()).sum() + (fr * gf.double()).sum()).backward()
    got, want = grads_of(inp), grads_of(d)
    assert set(got) == set(want) and "initial_states" in got
    for k in want:
        assert_close(got[k], want[k], torch.bfloat16, factor=2, what=f"grad {k} Q={Q}")


# ---------------------------------------------------------------- sm_90a chunk output (opt-in)


def sm90_or_skip(monkeypatch, H, G):
    """NEMOKERNELS_SSD_SM90=1, and a skip unless the forward then takes the wgmma chunk output
    (csrc/ssd/ssd_chunk_output_sm90.cu: a 90a build on a compute capability 9.0 device)."""
    from nemokernels import _C
    monkeypatch.setenv("NEMOKERNELS_SSD_SM90", "1")
    if _C.ssd_chunk_scan_path(torch.cuda.current_device(), True, H, 64, G, 128, 128) != "wgmma_sm90":
        pytest.skip("the sm_90a chunk output runs on compute capability 9.0 with a 90a build")


def where_y_differs(y, ref, Q=128):
    """For a failing (b, L, H, P) comparison on the never-run sm_90a path: the relative error by
    row block of the chunk (16 rows: one warp's strip; 64: one warpgroup), by 8-column group of
    P, by head and by chunk, and the non-finite count, so that one GPU run says which part of
    the kernel (fragment map, warpgroup, head loop, state term) is off."""
    d = (y.detach().double() - ref.detach().double()).cpu()
    r = ref.detach().double().cpu()
    b, L, H, P = d.shape
    pad = (-L) % Q
    dp = torch.nn.functional.pad(d, (0, 0, 0, 0, 0, pad)).view(b, -1, Q, H, P)
    rp = torch.nn.functional.pad(r, (0, 0, 0, 0, 0, pad)).view(b, -1, Q, H, P)

    def by(dims_keep, view=lambda t: t):
        e, n = view(dp), view(rp)
        dims = [k for k in range(e.dim()) if k not in dims_keep]
        num = e.pow(2).sum(dims).sqrt()
        den = n.pow(2).sum(dims).sqrt().clamp_min(1e-30)
        return " ".join(f"{v:.1e}" for v in (num / den).flatten().tolist())

    rows16 = lambda t: t.view(b, t.shape[1], Q // 16, 16, H, P)
    cols8 = lambda t: t.reshape(b, t.shape[1], Q, H, P // 8, 8)
    return (f"non-finite: {int((~torch.isfinite(y.detach().cpu())).sum())}; rel err by 16-row block of "
            f"the chunk: {by([2], rows16)}; by 8-column group of P: {by([4], cols8)}; by head: {by([3])}; "
            f"by chunk: {by([1])}")


def assert_close_sm90(y, ref, dtype, factor=1.0, what="y"):
    err = rel_err(y, ref)
    tol = TOL[dtype] * factor
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}; {where_y_differs(y, ref)}"


@contextlib.contextmanager
def portable_kernels(monkeypatch):
    """NEMOKERNELS_SSD_SM90 unset inside (it is read at each forward and each backward call)."""
    monkeypatch.delenv("NEMOKERNELS_SSD_SM90")
    try:
        yield
    finally:
        monkeypatch.setenv("NEMOKERNELS_SSD_SM90", "1")


def assert_grads_close_sm90(got, want, dtype, L, what):
    """Every gradient within tolerance of the portable backward's; the (b, L, ., .) ones (dx, dz,
    dB, dC) report where they differ (where_y_differs), so one GPU run localises a fault."""
    assert set(got) == set(want)
    for k in want:
        g, w = got[k], want[k].double()
        if g.dim() == 4 and g.shape[1] == L and g.shape[-1] % 8 == 0:
            assert_close_sm90(g, w, dtype, factor=2, what=f"{what} grad {k}")
        else:
            assert_close(g, w, dtype, factor=2, what=f"{what} grad {k}")


def portable_call(monkeypatch, *args, **kw):
    """The same call on the portable chunk output (a backward of its result runs on whatever
    the variable says then)."""
    with portable_kernels(monkeypatch):
        return call(*args, **kw)


@pytest.mark.gpu
@pytest.mark.racecheck
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", ["head", "headdim"])
def test_sm90_chunk_output_small(monkeypatch, dtype, D):
    """The sm_90a kernels (the state chain's and B1's wgmma tiles, the wgmma chunk output) at
    Nemotron-H's head shape (P 64, N 128, chunk 128) on a small grid
    (a CTA per head: the slices split each group's 8 heads): y, the final states and every
    gradient (the backward reads the y_pre it wrote) against the float64 recurrence, and y
    against the portable chunk output; a partial last chunk, z, D, initial states, and a
    seq_idx reset inside a chunk (row 1). For compute-sanitizer memcheck and racecheck too."""
    b, L, H, P, G, N, Q = 2, 3 * 128 + 37, 16, 64, 2, 128, 128
    sm90_or_skip(monkeypatch, H, G)
    inp = requires_grad(make_inputs(b, L, H, P, G, N, dtype, "cuda", D=D, init=True))
    seq_idx = torch.zeros(b, L, dtype=torch.int32, device="cuda")
    seq_idx[1, Q + 5:] = 1
    poison_allocator("cuda")
    y, fin = call(inp, Q, seq_idx=seq_idx, dt_softplus=True, return_final_states=True)
    y_port = portable_call(monkeypatch, inp, Q, seq_idx=seq_idx, dt_softplus=True)
    assert_close_sm90(y, y_port, dtype, what="y against the portable chunk output")
    gy, gf = torch.randn_like(y), torch.randn_like(fin)
    ((y.float() * gy.float()).sum() + (fin * gf).sum()).backward()
    d, (yr, fr) = ref64(inp, seq_idx=seq_idx, dt_softplus=True, return_final_states=True)
    assert_close(y, yr, dtype, factor=2, what="y")
    assert_close(fin, fr, dtype, factor=2, what="final states")
    ((yr * gy.double()).sum() + (fr * gf.double()).sum()).backward()
    got, want = grads_of(inp), grads_of(d)
    for k in want:
        assert_close(got[k], want[k], dtype, factor=2, what=f"grad {k}")


@pytest.mark.gpu
def test_sm90_chunk_output_whole_groups_and_no_state(monkeypatch):
    """A grid large enough that each CTA covers a group's 8 heads (CB shared, x and in_c double
    buffered across heads), without z, D or initial states (chunk 0 has no incoming state): y
    equals the portable chunk output to bf16 rounding and matches the float64 recurrence."""
    b, L, H, P, G, N, Q = 4, 40 * 128, 16, 64, 2, 128, 128
    sm90_or_skip(monkeypatch, H, G)
    inp = make_inputs(b, L, H, P, G, N, torch.bfloat16, "cuda", D=None, z=False, dt_bias=False)
    y = call(inp, Q, dt_softplus=True)
    y_port = portable_call(monkeypatch, inp, Q, dt_softplus=True)
    assert_close_sm90(y, y_port, torch.bfloat16, what="y against the portable chunk output")
    _, yr = ref64({k: (v[:1, :1024] if torch.is_tensor(v) and v.dim() >= 3 else v) for k, v in inp.items()},
                  dt_softplus=True)
    assert_close(y[:1, :1024], yr, torch.bfloat16, factor=2, what="y (first 1024 positions of row 0)")


@pytest.mark.gpu
@pytest.mark.racecheck
def test_sm90_state_tiles_wide_heads(monkeypatch):
    """headdim 128 and dstate 256 under NEMOKERNELS_SSD_SM90=1: the chunk output stays portable
    (its wgmma kernel takes P 64, N 128 only), while the state chain's and B1's wgmma tiles run
    with 2 x 4 tiles per head (p0, n0 > 0). y, the final states and every gradient against the
    portable path and the float64 recurrence."""
    b, L, H, P, G, N, Q = 1, 2 * 128 + 45, 4, 128, 1, 256, 128
    sm90_or_skip(monkeypatch, H, G)
    inp = requires_grad(make_inputs(b, L, H, P, G, N, torch.bfloat16, "cuda", init=True))
    y, fin = call(inp, Q, dt_softplus=True, return_final_states=True)
    gy, gf = torch.randn_like(y), torch.randn_like(fin)
    ((y.float() * gy.float()).sum() + (fin * gf).sum()).backward()
    got = {k: g.clone() for k, g in grads_of(inp).items()}
    for t in inp.values():
        if torch.is_tensor(t) and t.grad is not None:
            t.grad = None
    y_port, fin_port = portable_call(monkeypatch, inp, Q, dt_softplus=True, return_final_states=True)
    assert_close_sm90(y, y_port, torch.bfloat16, what="y against the portable path")
    assert_close(fin, fin_port.double(), torch.float32, factor=10, what="final states against the portable path")
    d, (yr, fr) = ref64(inp, dt_softplus=True, return_final_states=True)
    assert_close(y, yr, torch.bfloat16, factor=2, what="y")
    assert_close(fin, fr, torch.bfloat16, factor=2, what="final states")
    ((yr * gy.double()).sum() + (fr * gf.double()).sum()).backward()
    want = grads_of(d)
    assert set(got) == set(want)
    for k in want:
        assert_close(got[k], want[k], torch.bfloat16, factor=2, what=f"grad {k}")


def kernels_of(fn):
    """Names of the CUDA kernels fn() launches (torch.profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert names, "the profiler saw no kernel"
    return names


@pytest.mark.gpu
@pytest.mark.parametrize("z", [True, False])
def test_sm90_kernels_run_where_the_switch_says(monkeypatch, z):
    """With NEMOKERNELS_SSD_SM90=1 a forward + backward at the wgmma shape runs the wgmma
    kernels and none of the portable ones they replace; without it, the reverse. The sm90 tests
    compare against the portable path, so this is what keeps them from comparing a path with
    itself."""
    H, G = 16, 2
    sm90_or_skip(monkeypatch, H, G)
    inp = requires_grad(make_inputs(2, 300, H, 64, G, 128, torch.bfloat16, "cuda", z=z, init=True))

    def run():
        y = call(inp, 128, dt_softplus=True)
        y.float().sum().backward()

    run()  # warm-up: first-call work out of the profile
    sm90 = ("chunk_output_sm90_kernel", "dstate_chain_wgmma_kernel", "col_sm90_kernel", "row_sm90_kernel")
    portable = ("chunk_scan_kernel", "dstate_chain_kernel", "col_kernel", "row_kernel")
    on = kernels_of(run)
    with portable_kernels(monkeypatch):
        off = kernels_of(run)

    def seen(names, k):  # k as a whole name part: "col_kernel" is not "col_sm90_kernel"
        return any(re.search(rf"\b{k}\b", n) for n in names)
    for k in sm90:
        assert seen(on, k) and not seen(off, k), (k, "switch on" if not seen(on, k) else "switch off")
    for k in portable:
        assert seen(off, k) and not seen(on, k), (k, "switch off" if not seen(off, k) else "switch on")


@pytest.mark.gpu
@pytest.mark.parametrize("z", [True, False])
def test_sm90_backward_b3_heads_per_cta(monkeypatch, z):
    """B3 on wgmma (col_sm90_kernel, row_sm90_kernel) with several heads per CTA (hs 4 here:
    the next head's x, dy and state loaded during this one, dB and dC summed over the heads in
    the accumulators), with z (dy from the float32 scratch) and without (dy = dout in bf16):
    every gradient against the portable backward of the same call (dx is the column kernel's
    per head, dB its sum, dC the row kernel's; dA, ddt and dinitial_states take their row and
    column sums). A seq_idx reset inside a chunk, a partial last chunk and initial states."""
    b, L, H, P, G, N, Q = 4, 40 * 128 - 50, 16, 64, 2, 128, 128
    sm90_or_skip(monkeypatch, H, G)
    inp = requires_grad(make_inputs(b, L, H, P, G, N, torch.bfloat16, "cuda", z=z, init=True))
    seq_idx = torch.zeros(b, L, dtype=torch.int32, device="cuda")
    seq_idx[2, 7 * Q + 40:] = 1
    y = call(inp, Q, seq_idx=seq_idx, dt_softplus=True)
    gy = torch.randn_like(y)
    (y.float() * gy.float()).sum().backward()
    got = {k: g.clone() for k, g in grads_of(inp).items()}
    for t in inp.values():
        if torch.is_tensor(t) and t.grad is not None:
            t.grad = None
    with portable_kernels(monkeypatch):
        y_port = call(inp, Q, seq_idx=seq_idx, dt_softplus=True)
        (y_port.float() * gy.float()).sum().backward()
    assert_grads_close_sm90(got, grads_of(inp), torch.bfloat16, L, "against the portable backward:")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sm90_backward_packed_states(monkeypatch, dtype):
    """The sm_90a backward on packed sequences with a state each (chunk plan: chunks start at
    each sequence's start, t0 not a multiple of the chunk, an empty sequence, one-token and
    partial chunks) and two heads per CTA: every gradient, initial_states' rows included,
    against the portable backward of the same call."""
    H, G, Q = 16, 2, 128
    sm90_or_skip(monkeypatch, H, G)
    lens = [1, 128, 0, 3000, 77, 5000]  # 67 aligned chunks: hs 2 (heads_per_block, any plan bound)
    inp, cu = packed_case("cuda", dtype, lens, Q, H=H, P=64, G=G, N=128, seed=5)
    requires_grad(inp)

    def grads():  # on whichever kernels the switch names now
        for t in inp.values():
            if torch.is_tensor(t) and t.grad is not None:
                t.grad = None
        y, fin = call(inp, Q, cu_seqlens=cu, dt_softplus=True, return_final_states=True)
        torch.manual_seed(7)
        gy, gf = torch.randn_like(y), torch.randn_like(fin)
        ((y.float() * gy.float()).sum() + (fin * gf).sum()).backward()
        return {k: g.clone() for k, g in grads_of(inp).items()}

    got = grads()
    with portable_kernels(monkeypatch):
        want = grads()
    assert_grads_close_sm90(got, want, dtype, sum(lens), "packed, against the portable backward:")


@pytest.mark.gpu
def test_sm90_chunk_output_packed_states(monkeypatch):
    """Packed sequences with a state each (chunk plan): each sequence's y equals its own call on
    the wgmma path, bit for bit (the chunks are aligned to each start), and y and the varlen
    states match the portable path's."""
    H, G, Q = 16, 2, 128
    sm90_or_skip(monkeypatch, H, G)
    lens = [1, 128, 0, 300, 77]
    inp, cu = packed_case("cuda", torch.bfloat16, lens, Q, H=H, P=64, G=G, N=128)
    y, var = call(inp, Q, cu_seqlens=cu, dt_softplus=True, return_varlen_states=True)
    y_port, var_port = portable_call(monkeypatch, inp, Q, cu_seqlens=cu, dt_softplus=True, return_varlen_states=True)
    assert_close_sm90(y, y_port, torch.bfloat16, what="packed y against the portable chunk output")
    # the states: H1's wgmma tile against its wmma tile (float32 sums in another order)
    assert_close(var, var_port.double(), torch.float32, factor=10, what="packed varlen states")
    for i, n in enumerate(lens):
        if n:
            s = int(cu[i])
            assert torch.equal(y[:, s:s + n], call(piece(inp, cu, i), Q, dt_softplus=True)), f"sequence {i}"


@pytest.mark.gpu
def test_cuda_graph_replay_sees_new_inputs():
    inp = make_inputs(1, 200, 4, 64, 1, 64, torch.bfloat16, "cuda", init=True)
    static = {k: (v.clone() if v is not None else None) for k, v in inp.items()}
    call(static, 64, dt_softplus=True)  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(static, 64, dt_softplus=True)
    fresh = make_inputs(1, 200, 4, 64, 1, 64, torch.bfloat16, "cuda", init=True)
    for k, v in fresh.items():
        if v is not None:
            static[k].copy_(v)
    graph.replay()
    torch.testing.assert_close(out, call(fresh, 64, dt_softplus=True))


# ---------------------------------------------------------------- bad input
#
# One table per op, rows (id, where, call, message[, exc]) as in helpers.bad_input_params: the
# call changes one argument of a good call of the raw op (or of the public function). On CUDA
# bad index values are memory-safe instead, see test_bad_index_values_stay_in_bounds_on_cuda.

ops = torch.ops.nemokernels
INF = float("inf")


def good_args(device):
    Q = chunk_for(device, 8)
    i = make_inputs(1, 20, 4, 8, 2, 8, torch.float32, device, init=True)
    cu = torch.tensor([0, 5, 5, 12, 20], dtype=torch.int32, device=device)
    from nemokernels.ssd.ssd_chunk_scan import chunk_plan
    return SimpleNamespace(Q=Q, cu=cu, sid=varlen_from_cu_seqlens(cu, 20), dout=torch.randn_like(i["x"]),
                           plan=chunk_plan(cu, 20, Q),
                           y_pre=torch.randn_like(i["x"]), dfin=torch.randn_like(i["initial_states"]),
                           **{k: v for k, v in i.items()})


def fwd(t, **kw):
    a = dict(x=t.x, dt=t.dt, A=t.A, B=t.B, C=t.C, chunk_size=t.Q, D=t.D, z=t.z, dt_bias=t.dt_bias,
             initial_states=t.initial_states, seq_idx=None, cu_seqlens=None, dt_softplus=True, dt_min=0.0,
             dt_max=INF, return_final_states=True, return_varlen_states=False, save_y_pre=False,
             return_chunk_states=False, chunk_plan=None)
    a.update(kw)
    return ops.ssd_chunk_scan_fwd(*a.values())


def varlen(t, **kw):
    a = dict(seq_idx=t.sid, cu_seqlens=t.cu, return_varlen_states=True)
    a.update(kw)
    return fwd(t, **a)


def bwd(t, **kw):
    a = dict(dout=t.dout, x=t.x, dt=t.dt, A=t.A, B=t.B, C=t.C, chunk_size=t.Q, D=t.D, z=t.z, y_pre=t.y_pre,
             dt_bias=t.dt_bias, initial_states=t.initial_states, seq_idx=None, dfinal_states=t.dfin,
             dt_softplus=True, dt_min=0.0, dt_max=INF, return_dinitial_states=True, cu_seqlens=None, chunk_plan=None)
    a.update(kw)
    return ops.ssd_chunk_scan_bwd(*a.values())


def planned(t, **kw):
    """The forward (or, with op=bwd, the backward) with packed sequences and a chunk plan."""
    op = kw.pop("op", fwd)
    a = dict(cu_seqlens=t.cu, chunk_plan=t.plan)
    a.update(kw)
    return op(t, **a)


def batch_two(t):
    """The good arguments expanded to batch 2 (read-only inputs may be expanded views)."""
    e = lambda v: v.expand(2, *v.shape[1:])  # noqa: E731
    return dict(x=e(t.x), dt=e(t.dt), B=e(t.B), C=e(t.C), z=e(t.z), initial_states=e(t.initial_states),
                seq_idx=e(t.sid))


def _randn(t, *shape):
    return torch.randn(*shape, device=t.x.device)


X_ = r"mamba_chunk_scan_combined: "
Y_ = r"mamba_chunk_scan_combined \(backward\): "
FLOATS = r"must be one of \{float32, float16, bfloat16\}, got "
DEVMIX = r" is on cpu but x is on cuda:\d+; all tensors must be on one device"
CUDA_Q = (r"the CUDA kernels need chunk_size in \{64, 128, 256\}, headdim a multiple of 8 up to 128 and dstate a "
          r"multiple of 8 up to 256; got chunk_size 32, headdim 8, dstate 8 \(the CPU path takes any\)")

FWD_CASES = [
    ("x_rank", "any", lambda t: fwd(t, x=t.x[0]),
     X_ + r"x must be \(batch, seqlen, nheads, headdim\), got shape \(20, 4, 8\)"),
    ("x_dtype", "any", lambda t: fwd(t, x=t.x.double()), X_ + "x " + FLOATS + "float64"),
    ("B_rank", "any", lambda t: fwd(t, B=t.B[0]),
     X_ + r"B must be \(batch, seqlen, ngroups, dstate\), got shape \(20, 2, 8\)"),
    ("ngroups", "any", lambda t: fwd(t, B=_randn(t, 1, 20, 3, 8), C=_randn(t, 1, 20, 3, 8)),
     X_ + r"nheads \(4\) must be a multiple of ngroups \(3\), from x \(1, 20, 4, 8\) and B \(1, 20, 3, 8\)"),
    ("dt_shape", "any", lambda t: fwd(t, dt=_randn(t, 1, 20, 5)),
     X_ + r"dt must have shape \(1, 20, 4\), got \(1, 20, 5\)"),
    ("dt_dtype", "any", lambda t: fwd(t, dt=t.dt.int()), X_ + "dt " + FLOATS + "int32"),
    ("A_shape", "any", lambda t: fwd(t, A=_randn(t, 4, 8)), X_ + r"A must have shape \(4,\), got \(4, 8\)"),
    ("B_dtype", "any", lambda t: fwd(t, B=t.B.bfloat16()), X_ + "B must have x's dtype float32, got bfloat16"),
    ("C_seqlen", "any", lambda t: fwd(t, C=t.C[:, :19]),
     X_ + r"C must have shape \(1, 20, 2, 8\), got \(1, 19, 2, 8\)"),
    ("D_shape", "any", lambda t: fwd(t, D=_randn(t, 8)), X_ + r"D must have shape \(4,\) or \(4, 8\), got \(8,\)"),
    ("z_shape", "any", lambda t: fwd(t, z=_randn(t, 1, 20, 4, 9)),
     X_ + r"z must have x's shape \(1, 20, 4, 8\), got \(1, 20, 4, 9\)"),
    ("z_dtype", "any", lambda t: fwd(t, z=t.z.half()), X_ + "z must have x's dtype float32, got float16"),
    ("dt_bias_shape", "any", lambda t: fwd(t, dt_bias=_randn(t, 5)),
     X_ + r"dt_bias must have shape \(4,\), got \(5,\)"),
    ("init_shape", "any", lambda t: fwd(t, initial_states=_randn(t, 1, 4, 8, 9)),
     X_ + r"initial_states must have shape \(1, 4, 8, 8\), got \(1, 4, 8, 9\)"),
    ("chunk_zero", "any", lambda t: fwd(t, chunk_size=0), X_ + "chunk_size must be positive, got 0"),
    ("dt_limit_order", "any", lambda t: fwd(t, dt_min=0.5, dt_max=0.1),
     X_ + r"dt_limit must be \(min, max\) with min <= max, got \(0\.50*, 0\.10*\)"),
    ("dt_limit_nan", "any", lambda t: fwd(t, dt_min=float("nan")),
     X_ + r"dt_limit must be \(min, max\) with min <= max, got \(-?nan, inf\)"),
    ("seq_idx_dtype", "any", lambda t: fwd(t, seq_idx=t.sid.long()),
     X_ + r"seq_idx must be one of \{int32\}, got int64"),
    ("seq_idx_shape", "any", lambda t: fwd(t, seq_idx=t.sid[:, :19]),
     X_ + r"seq_idx must have shape \(1, 20\), got \(1, 19\)"),
    ("seq_idx_decreasing", "cpu", lambda t: fwd(t, seq_idx=t.sid.new_tensor([[0] * 10 + [1] * 5 + [0] * 5])),
     X_ + r"seq_idx must be non-negative and non-decreasing along each row; row 0 has 0 at position 15"),
    ("seq_idx_negative", "cpu", lambda t: fwd(t, seq_idx=t.sid - 1),
     X_ + r"seq_idx must be non-negative and non-decreasing along each row; row 0 has -1 at position 0"),
    ("varlen_without_cu_seqlens", "any", lambda t: varlen(t, cu_seqlens=None),
     X_ + "return_varlen_states needs cu_seqlens, got None"),
    ("varlen_without_seq_idx", "any", lambda t: varlen(t, seq_idx=None),
     X_ + r"return_varlen_states needs seq_idx \(the packed sequences. ids\) or chunk_plan, got neither"),
    ("varlen_batch_2", "any", lambda t: varlen(t, **batch_two(t)),
     X_ + r"return_varlen_states needs batch 1 \(packed sequences\), got batch 2"),
    ("cu_seqlens_dtype", "any", lambda t: varlen(t, cu_seqlens=t.cu.long()),
     X_ + r"cu_seqlens must be one of \{int32\}, got int64"),
    ("cu_seqlens_empty", "any", lambda t: varlen(t, cu_seqlens=t.cu[:0]),
     X_ + r"cu_seqlens.shape\[0\] must be at least 1 \(num_sequences \+ 1\), got shape \(0,\)"),
    ("cu_seqlens_rank", "any", lambda t: varlen(t, cu_seqlens=t.cu[None]),
     X_ + r"cu_seqlens must have 1 dimensions, got shape \(1, 5\)"),
    ("cu_seqlens_start", "cpu", lambda t: varlen(t, cu_seqlens=t.cu.new_tensor([2, 5, 5, 12, 20])),
     X_ + r"cu_seqlens\[0\] must be 0, got 2"),
    ("cu_seqlens_decreasing", "cpu", lambda t: varlen(t, cu_seqlens=t.cu.new_tensor([0, 5, 3, 12, 20])),
     X_ + r"cu_seqlens must be non-decreasing, got cu_seqlens\[2\] = 3 < cu_seqlens\[1\] = 5"),
    ("cu_seqlens_end", "cpu", lambda t: varlen(t, cu_seqlens=t.cu.new_tensor([0, 5, 5, 12, 18])),
     X_ + r"cu_seqlens\[-1\] must be seqlen = 20 \(x.shape\[1\]\), got 18"),
    ("cu_seqlens_past_end", "cpu", lambda t: varlen(t, cu_seqlens=t.cu.new_tensor([0, 5, 5, 12, 25])),
     X_ + r"cu_seqlens\[-1\] must be seqlen = 20 \(x.shape\[1\]\), got 25"),
    ("seq_idx_misses_a_start", "cpu", lambda t: varlen(t, cu_seqlens=t.cu.new_tensor([0, 5, 5, 10, 20])),
     X_ + r"seq_idx disagrees with cu_seqlens: sequence 3 starts at position 10 \(cu_seqlens\[3\]\), so "
          r"seq_idx\[0, 10\] must differ from seq_idx\[0, 9\], got 2 for both"),
    ("seq_idx_changes_inside", "cpu", lambda t: varlen(t, cu_seqlens=t.cu.new_tensor([0, 5, 5, 14, 20])),
     X_ + r"seq_idx disagrees with cu_seqlens: sequence 2 spans positions 5..13 \(cu_seqlens\[2\], cu_seqlens\[3\]\), "
          r"so seq_idx must be 2 there, got 3 at position 12"),
    ("plan_init_rows", "any", lambda t: planned(t, initial_states=_randn(t, 2, 4, 8, 8)),
     X_ + r"with cu_seqlens, initial_states must be \(num_sequences, nheads, headdim, dstate\) = \(4, 4, 8, 8\) "
          r"or \(1, 4, 8, 8\) \(the first sequence only\), got \(2, 4, 8, 8\)"),
    ("plan_with_seq_idx", "any", lambda t: planned(t, seq_idx=t.sid),
     X_ + r"chunk_plan replaces seq_idx \(each chunk holds one sequence\); got both"),
    ("plan_without_cu_seqlens", "any", lambda t: planned(t, cu_seqlens=None), X_ + "chunk_plan needs cu_seqlens, got None"),
    ("plan_batch_2", "any", lambda t: planned(t, **{k: v for k, v in batch_two(t).items() if k != "seq_idx"}),
     X_ + r"chunk_plan needs batch 1 \(packed sequences\), got batch 2"),
    ("plan_dtype", "any", lambda t: planned(t, chunk_plan=t.plan.long()), X_ + r"chunk_plan must be one of \{int32\}, got int64"),
    ("plan_rank", "any", lambda t: planned(t, chunk_plan=t.plan[0]), X_ + r"chunk_plan must have 2 dimensions, got shape"),
    ("plan_mismatch", "cpu", lambda t: planned(t, chunk_plan=t.plan.roll(1, 1)),
     X_ + r"chunk_plan does not match cu_seqlens at chunk 0 \(expected start 0, sequence 0\)"),
    ("plan_tail", "cpu", lambda t: planned(t, chunk_plan=torch.cat([t.plan[:, :-1], t.plan[:, -1:] - 1], 1)),
     X_ + r"chunk_plan must end with \(20, 4\), got \(19, 3\)"),
    ("chunk_32", "cuda", lambda t: fwd(t, chunk_size=32), X_ + CUDA_Q),
    ("B_device", "cuda", lambda t: fwd(t, B=t.B.cpu()), X_ + "B" + DEVMIX),
    ("cu_seqlens_device", "cuda", lambda t: varlen(t, cu_seqlens=t.cu.cpu()), X_ + "cu_seqlens" + DEVMIX),
]

BWD_CASES = [
    ("dout_shape", "any", lambda t: bwd(t, dout=_randn(t, 1, 20, 4, 7)),
     Y_ + r"dout must have x's shape \(1, 20, 4, 8\), got \(1, 20, 4, 7\)"),
    ("dout_dtype", "any", lambda t: bwd(t, dout=t.dout.bfloat16()),
     Y_ + "dout must have x's dtype float32, got bfloat16"),
    ("y_pre_missing", "any", lambda t: bwd(t, y_pre=None),
     Y_ + r"y_pre \(the ungated output saved by the forward\) must be given with z, got None"),
    ("y_pre_shape", "any", lambda t: bwd(t, y_pre=t.y_pre[:, :19]),
     Y_ + r"y_pre must have x's shape \(1, 20, 4, 8\), got \(1, 19, 4, 8\)"),
    ("y_pre_dtype", "any", lambda t: bwd(t, y_pre=t.y_pre.half()),
     Y_ + "y_pre must have x's dtype float32, got float16"),
    ("dfinal_shape", "any", lambda t: bwd(t, dfinal_states=t.dfin[..., :7]),
     Y_ + r"dfinal_states must have shape \(1, 4, 8, 8\), got \(1, 4, 8, 7\)"),
    ("dfinal_dtype", "any", lambda t: bwd(t, dfinal_states=t.dfin.long()), Y_ + "dfinal_states " + FLOATS + "int64"),
    ("dinit_without_init", "any", lambda t: bwd(t, initial_states=None),
     Y_ + "return_dinitial_states needs initial_states, got None"),
    ("x_dtype", "any", lambda t: bwd(t, x=t.x.double()), Y_ + "x " + FLOATS + "float64"),
    ("dt_shape", "any", lambda t: bwd(t, dt=t.dt[:, :19]), Y_ + r"dt must have shape \(1, 20, 4\), got \(1, 19, 4\)"),
    ("ngroups", "any", lambda t: bwd(t, B=_randn(t, 1, 20, 3, 8), C=_randn(t, 1, 20, 3, 8)),
     Y_ + r"nheads \(4\) must be a multiple of ngroups \(3\)"),
    ("chunk_negative", "any", lambda t: bwd(t, chunk_size=-1), Y_ + "chunk_size must be positive, got -1"),
    ("dt_limit_nan", "any", lambda t: bwd(t, dt_max=float("nan")),
     Y_ + r"dt_limit must be \(min, max\) with min <= max, got \(0\.0*, -?nan\)"),
    ("seq_idx_decreasing", "cpu", lambda t: bwd(t, seq_idx=t.sid.flip(1).contiguous()),
     Y_ + r"seq_idx must be non-negative and non-decreasing along each row; row 0 has 2 at position 8"),
    ("plan_init_rows", "any", lambda t: planned(t, op=bwd, initial_states=_randn(t, 3, 4, 8, 8)),
     Y_ + r"with cu_seqlens, initial_states must be \(num_sequences, nheads, headdim, dstate\) = \(4, 4, 8, 8\)"),
    ("plan_mismatch", "cpu", lambda t: planned(t, op=bwd, chunk_plan=t.plan.flip(1).contiguous()),
     Y_ + r"chunk_plan does not match cu_seqlens at chunk 0"),
    ("chunk_32", "cuda", lambda t: bwd(t, chunk_size=32), Y_ + CUDA_Q),
    ("dout_device", "cuda", lambda t: bwd(t, dout=t.dout.cpu()), Y_ + "dout" + DEVMIX),
    ("y_pre_device", "cuda", lambda t: bwd(t, y_pre=t.y_pre.cpu()), Y_ + "y_pre" + DEVMIX),
]


def public(t, **kw):
    """The public function on the good arguments."""
    good = {k: getattr(t, k) for k in ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")}
    return call(dict(good, **kw.pop("inputs", {})), t.Q, **kw)


PUBLIC_CASES = [
    ("dt_limit", "any", lambda t: public(t, dt_limit=0.5),
     r"mamba_chunk_scan_combined: dt_limit must be a \(min, max\) pair, got 0.5", ValueError),
    ("varlen_without_cu_seqlens", "any", lambda t: public(t, return_varlen_states=True),
     "mamba_chunk_scan_combined: return_varlen_states needs cu_seqlens", ValueError),
    ("varlen_batch_two", "any",
     lambda t: public(t, inputs={k: v for k, v in batch_two(t).items() if k != "seq_idx"}, cu_seqlens=t.cu,
                      return_varlen_states=True),
     r"mamba_chunk_scan_combined: return_varlen_states needs batch 1 \(packed sequences\), got batch 2", ValueError),
    ("packed_init_rows", "any",
     lambda t: public(t, inputs=dict(initial_states=_randn(t, 3, 4, 8, 8)), cu_seqlens=t.cu),
     X_ + r"with cu_seqlens, initial_states must be \(num_sequences, nheads, headdim, dstate\) = \(4, 4, 8, 8\)"),
    ("packed_seq_idx_disagrees", "cpu",
     lambda t: public(t, seq_idx=t.sid.new_tensor([[0] * 10 + [1] * 10]), cu_seqlens=t.cu),
     r"mamba_chunk_scan_combined: seq_idx disagrees with cu_seqlens \(its id must change exactly where a "
     r"non-empty sequence starts\)", ValueError),
    # the wrapper derives seq_idx from cu_seqlens; the op still checks cu_seqlens
    ("cu_seqlens_end", "cpu",
     lambda t: public(t, cu_seqlens=torch.tensor([0, 5, 19]), return_varlen_states=True),
     X_ + r"cu_seqlens\[-1\] must be seqlen = 20"),
]


test_bad_input = bad_input_test(
    fwd=(good_args, FWD_CASES), bwd=(good_args, BWD_CASES), public=(good_args, PUBLIC_CASES))


@pytest.mark.gpu
@pytest.mark.racecheck
def test_bad_index_values_stay_in_bounds_on_cuda(sanitizer):
    """seq_idx and cu_seqlens are checked on the CPU only (reading them on CUDA needs a host
    sync). On CUDA any values are memory-safe: cu_seqlens bounds are clamped to [0, L) (an
    empty or inverted range gives a zero state) and seq_idx is only compared. Run under
    compute-sanitizer memcheck by scripts/gpu_check.sh (racecheck marker)."""
    Q = 64
    L = Q + 5 if sanitizer else 3 * Q + 5
    inp = make_inputs(1, L, 4, 16, 2, 16, torch.float32, "cuda", init=True)
    cu = torch.tensor([0, 10, Q + 3, L], dtype=torch.int32, device="cuda")
    sid = varlen_from_cu_seqlens(cu, L)
    y_ref = call(inp, Q, seq_idx=sid, dt_softplus=True)
    big = 2**31 - 1
    bads = ([0, -7, Q, L], [0, 10, big, L], [5, 3, 1, L + 100], [-big, big, 0, L], [0, L, L, 3 * L])
    for bad in bads:  # the raw op's mamba_ssm layout (seq_idx, F5); the public function plans chunks
        cu_bad = torch.tensor(bad, dtype=torch.int32, device="cuda")
        y, _, _, var, _ = ops.ssd_chunk_scan_fwd(
            inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], Q, inp["D"], inp["z"], inp["dt_bias"],
            inp["initial_states"], sid, cu_bad, True, 0.0, INF, False, True, False)
        torch.cuda.synchronize()
        assert torch.equal(y, y_ref), f"y must not depend on cu_seqlens {bad}"
        assert torch.isfinite(var).all(), f"varlen states for cu_seqlens {bad}"
        for i in range(len(bad) - 1):
            if min(bad[i + 1] - 1, L - 1) < max(bad[i], 0):
                assert torch.equal(var[i], torch.zeros_like(var[i])), f"empty range {i} of {bad} must give zeros"
    for bad_sid in (sid.flip(1).contiguous(), torch.randint(-2**31, 2**31 - 1, (1, L), device="cuda",
                                                            dtype=torch.int32)):
        for v in inp.values():
            if v is not None:
                v.requires_grad_(True)
        y, fin = call(inp, Q, seq_idx=bad_sid, dt_softplus=True, return_final_states=True)
        (y.sum() + fin.sum()).backward()
        torch.cuda.synchronize()
        assert torch.isfinite(y).all() and torch.isfinite(fin).all()
        assert all(torch.isfinite(g).all() for g in grads_of(inp).values())
    # Packed sequences with a chunk plan: plans built from bad cu_seqlens, and random plans,
    # through the forward and the backward with a state per sequence: memory-safe (the kernels
    # clamp every plan value), results unspecified.
    from nemokernels.ssd.ssd_chunk_scan import chunk_plan
    h0 = torch.randn(3, 4, 16, 16, device="cuda", requires_grad=True)
    plans = [chunk_plan(torch.tensor(bad, dtype=torch.int32, device="cuda"), L, Q) for bad in bads]
    nc = plans[0].shape[1] - 1
    plans += [torch.randint(-big, big, (2, nc + 1), device="cuda", dtype=torch.int32),
              torch.randint(-3, L + 3, (2, nc + 1), device="cuda", dtype=torch.int32)]
    for bad, plan in zip(bads + ("random", "random small"), plans):
        cu_bad = torch.tensor(bad if isinstance(bad, list) else [0, 10, Q + 3, L], dtype=torch.int32, device="cuda")
        d = {k: (v.detach().requires_grad_(True) if v is not None else None) for k, v in inp.items()}
        y, _, fin, var, _ = ops.ssd_chunk_scan_fwd(
            d["x"], d["dt"], d["A"], d["B"], d["C"], Q, d["D"], d["z"], d["dt_bias"], h0, None, cu_bad, True, 0.0,
            INF, True, True, True, False, plan)
        (y.sum() + fin.sum()).backward()
        torch.cuda.synchronize()  # values unspecified (rows may go unwritten); memcheck sees every access
