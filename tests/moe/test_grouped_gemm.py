"""grouped_gemm (moe) against a float64 loop over experts: forward (none / relu2), dgrad, wgrad,
autograd, offsets edge cases (empty experts, one expert holding every row, unpadded segments,
rows past offsets[E]), tile edges, strided inputs, opcheck, torch.compile and bad inputs."""
from types import SimpleNamespace

import pytest
import torch

from nemokernels.nvfp4 import NVFP4Tensor

from nemokernels.moe import grouped_gemm

from conftest import DEVICES
from helpers import (assert_close, assert_close_to_magnitude, bad_input_test, mutation_table, opcheck,
                     poison_allocator, rel_err)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ops = torch.ops.nemokernels


def assert_rows_outside_zero(out, offsets, what):
    """Rows before offsets[0] and from offsets[E] on belong to no expert: exact zeros."""
    out, R0, R1 = out.cpu().float(), int(offsets[0]), int(offsets[-1])
    assert torch.equal(out[R1:], torch.zeros_like(out[R1:])), f"{what}: rows past offsets[E] must be 0"
    assert torch.equal(out[:R0], torch.zeros_like(out[:R0])), f"{what}: rows before offsets[0] must be 0"


def offsets_from_counts(counts, device):
    o = [0]
    for c in counts:
        o.append(o[-1] + c)
    return torch.tensor(o, dtype=torch.int32, device=device)


def ref_fwd(a, w, offsets, activation="none"):
    """float64 loop over experts; rows outside every segment are zeros."""
    a64, w64 = a.double(), w.double()
    offs = offsets.tolist()
    out = a64.new_zeros(a.shape[0], w.shape[1])
    rows = []
    for e in range(w.shape[0]):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            y = a64[lo:hi] @ w64[e].T
            rows.append((lo, hi, torch.relu(y).square() if activation == "relu2" else y))
    for lo, hi, y in rows:
        out = torch.cat([out[:lo], y, out[hi:]])
    return out


UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def assert_forward_close(out, ref, a, w, offsets, dtype, activation, what):
    """out vs the float64 reference element by element, bounded by the operands' magnitudes:
    S = |a| @ |w_e|^T per segment (0 outside every segment, where out must be exactly 0). The
    product's float32 sum over K errs by at most K 2^-24 S in any order, the output rounds once
    (u S); relu2 squares the pre-activation p (|p| <= S): 2 |p| dp + u p^2 <= (2 K 2^-24 + u) S^2,
    plus one more rounding where the pre-activation is stored in dtype first (CUTLASS path).
    The floor is the dtype's subnormal spacing: a relative norm failed a correct kernel on a
    single fp16 output of relu2 whose square fell below fp16's normal range (seed 2)."""
    K = a.shape[1]
    S = torch.zeros(out.shape, dtype=torch.float64)
    offs = offsets.tolist()
    for e in range(w.shape[0]):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            S[lo:hi] = a[lo:hi].detach().double().cpu().abs() @ w[e].detach().double().cpu().abs().T
    u = UNIT_ROUNDOFF[dtype]
    tol = 2 * ((2 * K + 3) * 2.0 ** -24 + 2 * u)
    if activation == "relu2":
        S = S * S
    fi = torch.finfo(dtype)
    assert_close_to_magnitude(out, ref, S, tol, atol=fi.tiny * fi.eps, what=what)


def make(counts, N, K, dtype, device, extra_rows=0, scale=True):
    offsets = offsets_from_counts(counts, device)
    R = int(offsets[-1]) + extra_rows
    a = torch.randn(R, K, device=device, dtype=dtype)
    w = (torch.randn(len(counts), N, K, device=device, dtype=dtype) / (K ** 0.5 if scale else 1)).to(dtype)
    return a, w, offsets


# (counts per expert, N, K): tile edges of the CPU (64) and CUDA (128 rows, 128 cols, 32 k) tiles,
# empty experts, one expert with every row, unpadded segments.
SHAPES = [
    ([3, 0, 17, 1], 15, 16),
    ([36, 127, 0, 129], 17, 36),
    ([128, 1, 15, 16], 128, 129),
    ([0, 0, 200, 0], 129, 17),
    ([1], 1, 1),
    ([64, 65, 63], 36, 127),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["none", "relu2"])
def test_forward_matches_reference(device, dtype, activation):
    for counts, N, K in SHAPES:
        for extra in (0, 5):
            a, w, offsets = make(counts, N, K, dtype, device, extra_rows=extra)
            poison_allocator(device)
            out = grouped_gemm(a, w, offsets, activation)
            assert out.shape == (a.shape[0], N) and out.dtype == dtype
            ref = ref_fwd(a, w, offsets, activation)
            assert_forward_close(out, ref, a, w, offsets, dtype, activation,
                                 what=f"out counts={counts} N={N} K={K} extra={extra}")
            R0 = int(offsets[-1])
            assert torch.equal(out[R0:].cpu(), torch.zeros_like(out[R0:]).cpu()), "rows past offsets[E] must be 0"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_preact_output(device, dtype):
    a, w, offsets = make([5, 0, 40, 19], 33, 24, dtype, device, extra_rows=3)
    out, pre = ops.grouped_gemm_fwd(a, w, offsets, "relu2", True)
    assert pre.shape == out.shape
    assert_close(pre, ref_fwd(a, w, offsets), dtype, what="preact")
    assert_close(out, ref_fwd(a, w, offsets, "relu2"), dtype, what="out")
    out2, pre2 = ops.grouped_gemm_fwd(a, w, offsets, "relu2", False)
    assert pre2.shape == (0, 33) and torch.equal(out, out2)
    _, pre3 = ops.grouped_gemm_fwd(a, w, offsets, "none", True)
    assert pre3.shape == (0, 33), "preact is only written for relu2"


def _grads(counts, N, K, dtype, device, activation, extra=0):
    a, w, offsets = make(counts, N, K, dtype, device, extra_rows=extra)
    a.requires_grad_(), w.requires_grad_()
    out = grouped_gemm(a, w, offsets, activation)
    # a non-contiguous upstream gradient (transposed buffer)
    g = torch.randn(N, a.shape[0], device=device, dtype=dtype).T
    da, dw = torch.autograd.grad(out, (a, w), g)
    a64, w64 = a.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = ref_fwd(a64, w64, offsets, activation)
    da_ref, dw_ref = torch.autograd.grad(ref, (a64, w64), g.double())
    return (da, dw), (da_ref, dw_ref), offsets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["none", "relu2"])
def test_backward_matches_reference(device, dtype, activation):
    for counts, N, K in SHAPES[:4]:
        (da, dw), (da_ref, dw_ref), offsets = _grads(counts, N, K, dtype, device, activation, extra=3)
        assert da.dtype == dtype and dw.dtype == dtype
        # relu2: the fused g = dout * 2 * relu(pre) is rounded to the dtype once more.
        f = 2.0 if activation == "relu2" else 1.0
        assert_close(da, da_ref, dtype, factor=f, what=f"da counts={counts}")
        assert_close(dw, dw_ref, dtype, factor=f, what=f"dw counts={counts}")
        R0 = int(offsets[-1])
        assert torch.equal(da[R0:].cpu(), torch.zeros_like(da[R0:]).cpu())
        for e, c in enumerate(counts):
            if c == 0:
                assert torch.equal(dw[e].cpu(), torch.zeros_like(dw[e]).cpu()), "empty expert: dw must be 0"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_ops_poisoned_and_strided(device, dtype):
    """dgrad / wgrad called directly with strided dout and preact, outputs allocated over NaNs."""
    a, w, offsets = make([7, 0, 30], 20, 12, dtype, device, extra_rows=4)
    R = a.shape[0]
    dout = torch.randn(20, R, device=device, dtype=dtype).T
    pre = torch.randn(R, 40, device=device, dtype=dtype)[:, ::2]
    poison_allocator(device)
    da = ops.grouped_gemm_dgrad(dout, w, offsets, pre)
    poison_allocator(device)
    dw = ops.grouped_gemm_wgrad(dout, a, offsets, pre)
    g = (dout.double() * 2 * torch.relu(pre.double())).to(dtype).double()
    offs = offsets.tolist()
    da_ref = torch.zeros(R, 12, dtype=torch.float64)
    dw_ref = torch.zeros(3, 20, 12, dtype=torch.float64)
    for e in range(3):
        lo, hi = offs[e], offs[e + 1]
        da_ref[lo:hi] = g[lo:hi].cpu() @ w[e].double().cpu()
        dw_ref[e] = g[lo:hi].cpu().T @ a[lo:hi].double().cpu()
    assert_close(da, da_ref, dtype, what="da")
    assert_close(dw, dw_ref, dtype, what="dw")


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    dtype = torch.float32
    counts = [9, 0, 21]
    offsets = offsets_from_counts(counts, device)
    a = torch.randn(40, 30, device=device, dtype=dtype)[:30, ::2]          # (30, 15), strides (30, 2)
    w = torch.randn(3, 15, 24, device=device, dtype=dtype).transpose(1, 2)  # (3, 24, 15), transposed
    out = grouped_gemm(a, w, offsets, "relu2")
    assert_close(out, ref_fwd(a, w, offsets, "relu2"), dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_one_giant_expert_and_all_empty(device):
    dtype = torch.bfloat16
    a, w, offsets = make([0, 300, 0, 0], 40, 24, dtype, device)
    out = grouped_gemm(a, w, offsets, "relu2")
    assert_close(out, ref_fwd(a, w, offsets, "relu2"), dtype)
    # every expert empty: all rows belong to none
    offsets0 = torch.zeros(5, dtype=torch.int32, device=device)
    a.requires_grad_(), w.requires_grad_()
    out = grouped_gemm(a, w, offsets0, "relu2")
    assert torch.equal(out.detach().cpu(), torch.zeros(300, 40, dtype=dtype))
    da, dw = torch.autograd.grad(out, (a, w), torch.randn_like(out))
    assert torch.equal(da.cpu(), torch.zeros_like(da).cpu()) and torch.equal(dw.cpu(), torch.zeros_like(dw).cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_relu2_keeps_nan(device, dtype):
    """relu^2 of a NaN is NaN, as torch.relu(x).square(): a non-finite token row must not come out
    as zeros, on the 16-bit weights and on NVFP4 weights, nor its gradient as zeros."""
    from nemokernels.nvfp4 import quantize as nvfp4_quantize

    a, w, offsets = make([3, 5], 16, 32, dtype, device)
    a[1, 4] = float("nan")
    a[6, 0] = float("nan")
    with torch.no_grad():
        outs = [grouped_gemm(a, w, offsets, "relu2")]
        q = [nvfp4_quantize(w[e].float().cpu()) for e in range(2)]
        w4 = NVFP4Tensor(torch.stack([t.data for t in q]).to(device), torch.stack([t.scales for t in q]).to(device),
                         torch.stack([t.global_scale.reshape(()) for t in q]).to(device))
        outs.append(grouped_gemm(a, w4, offsets, "relu2"))
    for out in outs:
        bad = ~torch.isfinite(out.float().cpu())
        assert bad[1].all() and bad[6].all() and not bad[[0, 2, 3, 4, 5, 7]].any()
    # and its backward: a NaN pre-activation gives a NaN gradient (torch's relu(x).square() does)
    a.requires_grad_()
    da = torch.autograd.grad(grouped_gemm(a, w, offsets, "relu2"), a, torch.ones(8, 16, dtype=dtype, device=device))[0]
    assert torch.isnan(da[1].float()).all() and torch.isfinite(da[[0, 2, 3, 4, 5, 7]].float()).all()


@pytest.mark.parametrize("device", DEVICES)
def test_zero_sizes(device):
    for R, N, K, E in [(0, 8, 8, 3), (10, 0, 8, 2), (10, 8, 0, 2), (10, 8, 8, 0)]:
        a = torch.randn(R, K, device=device, requires_grad=True)
        w = torch.randn(E, N, K, device=device, requires_grad=True)
        offsets = torch.zeros(E + 1, dtype=torch.int32, device=device)
        if E > 0:
            offsets[-1] = R
            offsets[1:-1] = R // 2
        out = grouped_gemm(a, w, offsets, "relu2")
        assert out.shape == (R, N)
        assert torch.equal(out.detach().cpu(), torch.zeros(R, N))
        if out.numel():
            # the output does not depend on a or w here (no reduction terms or no experts): both
            # gradients are exactly zero, not merely finite
            da, dw = torch.autograd.grad(out, (a, w), torch.randn_like(out))
            assert da.shape == a.shape and dw.shape == w.shape
            assert torch.equal(da.cpu(), torch.zeros(a.shape)) and torch.equal(dw.cpu(), torch.zeros(w.shape))


def test_gradcheck_float64():
    counts = [2, 0, 5, 1]
    offsets = offsets_from_counts(counts, "cpu")
    a = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 6, dtype=torch.float64, requires_grad=True)
    for act in ("none", "relu2"):
        assert torch.autograd.gradcheck(lambda a, w: grouped_gemm(a, w, offsets, act), (a, w))


@pytest.mark.parametrize("device", DEVICES)
def test_wgrad_deterministic(device):
    a, w, offsets = make([0, 333, 4], 24, 40, torch.bfloat16, device)
    dout = torch.randn(a.shape[0], 24, device=device, dtype=torch.bfloat16)
    r1 = ops.grouped_gemm_wgrad(dout, a, offsets, None)
    r2 = ops.grouped_gemm_wgrad(dout, a, offsets, None)
    assert torch.equal(r1, r2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bwd_op_is_dgrad_and_wgrad(device, dtype):
    """grouped_gemm_bwd (both gradients, relu^2's operand made once where the kernels would each
    make it) gives dgrad's and wgrad's results bit for bit, with and without a pre-activation; on
    CUDA bf16 with N, K multiples of 8 this is the shared-operand path, over a poisoned allocator."""
    a, w, offsets = make([37, 0, 130, 1, 64], 40, 24, dtype, device, extra_rows=5)
    dout = torch.randn(a.shape[0], 40, device=device, dtype=dtype)
    pre = torch.randn(a.shape[0], 40, device=device, dtype=dtype)
    for preact in (pre, None):
        poison_allocator(device)
        da, dw = ops.grouped_gemm_bwd(dout, a, w, offsets, preact)
        assert torch.equal(da, ops.grouped_gemm_dgrad(dout, w, offsets, preact))
        assert torch.equal(dw, ops.grouped_gemm_wgrad(dout, a, offsets, preact))
    with pytest.raises(RuntimeError, match="preact"):
        ops.grouped_gemm_bwd(dout, a, w, offsets, pre[:, :8])


# ---------------------------------------------------------------- opcheck, compile, errors


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    a, w, offsets = make([3, 0, 6], 7, 5, torch.float32, device, extra_rows=2)
    a.requires_grad_(), w.requires_grad_()
    opcheck(ops.grouped_gemm_fwd, (a, w, offsets, "relu2", True))
    opcheck(ops.grouped_gemm_fwd, (a, w, offsets, "none", False))
    opcheck(ops.grouped_gemm_fwd, (a, w, offsets, "relu2", False))
    dout = torch.randn(11, 7, device=device)
    pre = torch.randn(11, 7, device=device)
    opcheck(ops.grouped_gemm_dgrad, (dout, w.detach(), offsets, pre))
    opcheck(ops.grouped_gemm_dgrad, (dout, w.detach(), offsets, None))
    opcheck(ops.grouped_gemm_wgrad, (dout, a.detach(), offsets, pre))
    opcheck(ops.grouped_gemm_wgrad, (dout, a.detach(), offsets, None))
    opcheck(ops.grouped_gemm_bwd, (dout, a.detach(), w.detach(), offsets, pre))
    opcheck(ops.grouped_gemm_bwd, (dout, a.detach(), w.detach(), offsets, None))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    backend = "inductor" if device == "cuda" else "aot_eager"
    a, w1, offsets = make([4, 0, 9], 12, 8, torch.float32, device, extra_rows=1)
    w2 = torch.randn(3, 8, 12, device=device) / 12 ** 0.5
    a.requires_grad_(), w1.requires_grad_(), w2.requires_grad_()

    def f(a, w1, w2, offsets):
        h = grouped_gemm(a, w1, offsets, "relu2")
        return grouped_gemm(h, w2, offsets).square().sum()

    eager = f(a, w1, w2, offsets)
    compiled = torch.compile(f, fullgraph=True, backend=backend)(a, w1, w2, offsets)
    assert torch.allclose(eager, compiled, rtol=1e-5, atol=1e-5)
    ge = torch.autograd.grad(eager, (a, w1, w2))
    gc = torch.autograd.grad(compiled, (a, w1, w2))
    for x, y in zip(ge, gc):
        assert rel_err(y, x) < 1e-5


# ---------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["none", "relu2"])
def test_cuda_matches_cpu_at_moe_like_sizes(dtype, activation):
    """Padded (128) and unpadded segments, K/N multiples of 8 (vector loads) and not."""
    for counts, N, K in [([128, 0, 256, 384, 128], 264, 136), ([1, 300, 0, 77, 5], 200, 96),
                         ([129, 3, 0, 511], 130, 66), ([1000], 72, 40)]:
        a, w, offsets = make(counts, N, K, dtype, "cuda", extra_rows=7)
        a.requires_grad_(), w.requires_grad_()
        out = grouped_gemm(a, w, offsets, activation)
        assert_close(out, ref_fwd(a.detach().cpu(), w.detach().cpu(), offsets.cpu(), activation), dtype)
        g = torch.randn_like(out)
        da, dw = torch.autograd.grad(out, (a, w), g)
        a64, w64 = a.detach().cpu().double().requires_grad_(), w.detach().cpu().double().requires_grad_()
        ref = ref_fwd(a64, w64, offsets.cpu(), activation)
        da_ref, dw_ref = torch.autograd.grad(ref, (a64, w64), g.cpu().double())
        f = 2.0 if activation == "relu2" else 1.0
        assert_close(da, da_ref, dtype, factor=f, what="da")
        assert_close(dw, dw_ref, dtype, factor=f, what="dw")


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_offsets():
    """Capture, change inputs and offsets in place, replay: the result follows the new offsets."""
    dtype = torch.bfloat16
    a, w, offsets = make([100, 0, 60, 40], 64, 48, dtype, "cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        grouped_gemm(a, w, offsets, "relu2")
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = grouped_gemm(a, w, offsets, "relu2")
    a.copy_(torch.randn_like(a))
    offsets.copy_(offsets_from_counts([10, 150, 0, 20], "cuda"))
    g.replay()
    assert torch.equal(out, grouped_gemm(a, w, offsets, "relu2"))
    assert torch.equal(out[180:], torch.zeros_like(out[180:]))


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["none", "relu2"])
def test_cuda_arch_path_matches_portable_path(monkeypatch, activation):
    """bf16 with N, K multiples of 8 takes the CUTLASS kernels on sm_90 / sm_100; the portable
    kernels (forced by NEMOKERNELS_GROUPED_GEMM_PORTABLE=1) must agree with them and with float64."""
    dtype = torch.bfloat16
    counts, N, K = [128, 0, 256, 1, 300, 0, 77], 264, 136
    a, w, offsets = make(counts, N, K, dtype, "cuda", extra_rows=9)
    g = torch.randn(a.shape[0], N, device="cuda", dtype=dtype)
    results = []
    for portable in ("0", "1"):
        monkeypatch.setenv("NEMOKERNELS_GROUPED_GEMM_PORTABLE", portable)
        a_ = a.detach().clone().requires_grad_()
        w_ = w.detach().clone().requires_grad_()
        out = grouped_gemm(a_, w_, offsets, activation)
        da, dw = torch.autograd.grad(out, (a_, w_), g)
        results.append((out, da, dw))
    a64, w64 = a.detach().cpu().double().requires_grad_(), w.detach().cpu().double().requires_grad_()
    ref = ref_fwd(a64, w64, offsets.cpu(), activation)
    da_ref, dw_ref = torch.autograd.grad(ref, (a64, w64), g.cpu().double())
    f = 2.0 if activation == "relu2" else 1.0
    for out, da, dw in results:
        assert_close(out, ref, dtype)
        assert_close(da, da_ref, dtype, factor=f, what="da")
        assert_close(dw, dw_ref, dtype, factor=f, what="dw")


@pytest.mark.gpu
def test_cuda_arch_relu2_fused_epilogue():
    """Without a gradient no pre-activation is saved, and on sm_90 relu^2 runs in the CUTLASS
    epilogue (grouped_gemm_relu2_sm90.cu) instead of a separate pass: out against float64 and the
    portable kernels, rows past offsets[E] zero, on a poisoned allocator."""
    dtype = torch.bfloat16
    counts, N, K = [128, 0, 256, 1, 300, 0, 77], 264, 136
    a, w, offsets = make(counts, N, K, dtype, "cuda", extra_rows=9)
    ref = ref_fwd(a.cpu().double(), w.cpu().double(), offsets.cpu(), "relu2")
    R0 = int(offsets[-1])
    outs = []
    for portable in ("0", "1"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("NEMOKERNELS_GROUPED_GEMM_PORTABLE", portable)
            poison_allocator("cuda")
            with torch.no_grad():
                out = grouped_gemm(a, w, offsets, "relu2")
        assert_forward_close(out, ref, a, w, offsets, dtype, "relu2", what=f"relu2 out portable={portable}")
        assert torch.equal(out[R0:].cpu(), torch.zeros_like(out[R0:]).cpu()), "rows past offsets[E] must be 0"
        outs.append(out)
    assert_close(outs[0], outs[1].double(), dtype, what="fused epilogue vs portable kernels")


@pytest.mark.gpu
def test_cuda_arch_relu2_training_forward():
    """With a gradient the pre-activation is saved; on sm_90 one CUTLASS epilogue writes out and
    pre (grouped_gemm_relu2_pre_sm90.cu, pre through a per-group register-store visitor). out must
    equal the inference forward's bit for bit, pre the plain forward's bit for bit (same tiles,
    same accumulation), both against float64, rows past offsets[E] zero, on a poisoned allocator."""
    dtype = torch.bfloat16
    counts, N, K = [128, 0, 256, 1, 300, 0, 77, 129], 264, 136
    a, w, offsets = make(counts, N, K, dtype, "cuda", extra_rows=9)
    R0 = int(offsets[-1])
    poison_allocator("cuda")
    out, pre = ops.grouped_gemm_fwd(a, w, offsets, "relu2", True)
    with torch.no_grad():
        out_inf = grouped_gemm(a, w, offsets, "relu2")
        plain = grouped_gemm(a, w, offsets, "none")
    assert_forward_close(pre, ref_fwd(a.cpu().double(), w.cpu().double(), offsets.cpu()), a, w, offsets, dtype,
                         "none", what="preact")
    assert_forward_close(out, ref_fwd(a.cpu().double(), w.cpu().double(), offsets.cpu(), "relu2"), a, w, offsets,
                         dtype, "relu2", what="out")
    for t, name in ((out, "out"), (pre, "preact")):
        assert torch.equal(t[R0:].cpu(), torch.zeros_like(t[R0:]).cpu()), f"{name}: rows past offsets[E] must be 0"
    assert torch.equal(out, out_inf), "the training forward's out must equal the inference forward's"
    assert torch.equal(pre, plain), "the saved pre-activation must equal the plain forward"


def check_training_forward_and_grads(a, w, offsets, activation, ref, a64, w64, what):
    """The forward with a gradient (a, w requiring grad) against the float64 reference ref of
    (a64, w64), then da and dw against autograd of that reference, for one random upstream grad."""
    dtype, N = a.dtype, w.shape[1]
    a_, w_ = a.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = grouped_gemm(a_, w_, offsets, activation)
    assert_forward_close(out.detach(), ref.detach(), a, w, offsets, dtype, activation, what=what)
    g = torch.randn(a.shape[0], N, device=a.device, dtype=dtype)
    da, dw = torch.autograd.grad(out, (a_, w_), g)
    da_ref, dw_ref = torch.autograd.grad(ref, (a64, w64), g.cpu().double())
    f = 2.0 if activation == "relu2" else 1.0
    assert_close(da, da_ref, dtype, factor=f, what="da")
    assert_close(dw, dw_ref, dtype, factor=f, what="dw")


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["none", "relu2"])
def test_cuda_arch_m64_tiles_opt_in(monkeypatch, activation):
    """NEMOKERNELS_GROUPED_GEMM_TILE=64 (sm_90: the forward on 64-row pingpong tiles): the
    forward with and without a saved pre-activation, and the gradients through it, against
    float64; rows past offsets[E] zero."""
    dtype = torch.bfloat16
    counts, N, K = [128, 0, 256, 1, 300, 0, 77, 63, 65], 264, 136
    a, w, offsets = make(counts, N, K, dtype, "cuda", extra_rows=9)
    monkeypatch.setenv("NEMOKERNELS_GROUPED_GEMM_TILE", "64")
    a64, w64 = a.detach().cpu().double().requires_grad_(), w.detach().cpu().double().requires_grad_()
    ref = ref_fwd(a64, w64, offsets.cpu(), activation)
    poison_allocator("cuda")
    with torch.no_grad():
        out = grouped_gemm(a, w, offsets, activation)
    assert_forward_close(out, ref.detach(), a, w, offsets, dtype, activation, what="m64 inference")
    R0 = int(offsets[-1])
    assert torch.equal(out[R0:].cpu(), torch.zeros_like(out[R0:]).cpu()), "rows past offsets[E] must be 0"
    check_training_forward_and_grads(a, w, offsets, activation, ref, a64, w64, what="m64 training")


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["none", "relu2"])
def test_cuda_arch_swap_ab_opt_in(monkeypatch, activation):
    """NEMOKERNELS_GROUPED_GEMM_SWAP_AB=1 (sm_90: the forward with the experts' weight rows as the
    M side and their few tokens as a 32-wide N side, D^T stored column-major) at decode sizes:
    inference forward against float64 and bit for bit against itself across calls, rows past
    offsets[E] zero, on a poisoned allocator; the training forward and the gradients (which keep
    the 128-row kernels) against float64."""
    dtype = torch.bfloat16
    counts, N, K = [3, 0, 1, 33, 7, 0, 2, 40], 264, 136  # 86 rows, 8 experts: 10.75 per expert
    a, w, offsets = make(counts, N, K, dtype, "cuda", extra_rows=5)
    monkeypatch.setenv("NEMOKERNELS_GROUPED_GEMM_SWAP_AB", "1")
    a64, w64 = a.detach().cpu().double().requires_grad_(), w.detach().cpu().double().requires_grad_()
    ref = ref_fwd(a64, w64, offsets.cpu(), activation)
    poison_allocator("cuda")
    with torch.no_grad():
        out = grouped_gemm(a, w, offsets, activation)
        again = grouped_gemm(a, w, offsets, activation)
    assert_forward_close(out, ref.detach(), a, w, offsets, dtype, activation, what="swapped inference")
    assert torch.equal(out, again)
    R0 = int(offsets[-1])
    assert torch.equal(out[R0:].cpu(), torch.zeros_like(out[R0:]).cpu()), "rows past offsets[E] must be 0"
    check_training_forward_and_grads(a, w, offsets, activation, ref, a64, w64, what="training")


# ---------------------------------------------------------------- bad input, table-driven
# Rows (id, mutation of a valid call's arguments, regex, where) as in helpers.mutation_table;
# "cpu" rows check offsets values (reading them on CUDA would need a host sync, so the CUDA
# kernels clamp every segment into [0, R] instead, see test_cuda_memory_safe_for_bad_offsets).
# The public function's refusals are rows (id, where, call, regex[, exc]) over _public_args.


def _gg_args(device):
    a, w, offsets = make([3, 4], 6, 5, torch.float32, device)  # R = 7, N = 6, K = 5, E = 2
    return dict(a=a, w=w, offsets=offsets, act="relu2", save=True, dout=torch.randn(7, 6, device=device),
                pre=torch.randn(7, 6, device=device))


def _offs(a, values):
    a["offsets"] = torch.tensor(values, dtype=torch.int32, device=a["offsets"].device)


def _expand_rows(t, rows):
    return t[:1].expand(rows, *t.shape[1:])


FWD = "grouped_gemm"
FWD_CASES = [
    ("a_dtype", lambda a: a.update(a=a["a"].int()), FWD + r": a must be one of \{float32, float16, bfloat16(, float64)?\}, "
     "got int32", "any"),
    ("a_rank", lambda a: a.update(a=a["a"][None]), FWD + r": a must have 2 dimensions, got shape \(1, 7, 5\)", "any"),
    ("w_rank", lambda a: a.update(w=a["w"][0]), FWD + r": w must have 3 dimensions, got shape \(6, 5\)", "any"),
    ("w_dtype", lambda a: a.update(w=a["w"].bfloat16()), FWD + r": w must have a's dtype float32, got bfloat16", "any"),
    ("w_k", lambda a: a.update(w=a["w"][..., :4]),
     FWD + r": w must be \(E, N, K\) with K = a.shape\[1\] = 5, got w shape \(2, 6, 4\)", "any"),
    ("activation", lambda a: a.update(act="relu"), FWD + r': activation must be "none" or "relu2", got "relu"', "any"),
    ("offsets_dtype", lambda a: a.update(offsets=a["offsets"].long()),
     FWD + r": expert_offsets must be one of \{int32\}, got int64", "any"),
    ("offsets_rank", lambda a: a.update(offsets=a["offsets"][None]),
     FWD + r": expert_offsets must have 1 dimensions, got shape \(1, 3\)", "any"),
    ("offsets_experts", lambda a: a.update(offsets=a["offsets"][:2]),
     FWD + r": expert_offsets must have E \+ 1 = 3 entries \(w has E = 2 experts\), got shape \(2,\)", "any"),
    ("offsets_empty", lambda a: a.update(offsets=a["offsets"][:0]),
     FWD + r": expert_offsets.shape\[0\] must be at least 1 \(E \+ 1 entries\), got shape \(0,\)", "any"),
    ("rows_past_int32", lambda a: a.update(a=_expand_rows(a["a"], 2**31)),
     FWD + r": the number of rows R = 2147483648 exceeds 2147483647, the range of the int32 expert_offsets; "
     r"split the rows into several calls", "any"),
    ("offsets_decreasing", lambda a: _offs(a, [0, 5, 3]),
     FWD + r": expert_offsets must be non-decreasing, got offsets\[1\] = 5 > offsets\[2\] = 3", "cpu"),
    ("offsets_negative", lambda a: _offs(a, [-1, 3, 7]), FWD + r": expert_offsets\[0\] must be >= 0, got -1", "cpu"),
    ("offsets_past_rows", lambda a: _offs(a, [0, 3, 8]),
     FWD + r": expert_offsets\[E\] must be <= the number of rows 7, got 8", "cpu"),
    ("a_float64_on_cuda", lambda a: a.update(a=a["a"].double(), w=a["w"].double()),
     FWD + r": a must be one of \{float32, float16, bfloat16\}, got float64", "cuda"),
    ("w_device", lambda a: a.update(w=a["w"].cpu()),
     FWD + r": w is on cpu but a is on cuda:\d+; all tensors must be on one device", "cuda"),
    ("offsets_device", lambda a: a.update(offsets=a["offsets"].cpu()),
     FWD + r": expert_offsets is on cpu but a is on cuda:\d+; all tensors must be on one device", "cuda"),
    ("n_past_grid", lambda a: a.update(w=a["w"][:, :1].expand(2, 65535 * 64 + 1, 5)),
     FWD + r": N \(w.shape\[1\], the output columns\) = 4194241 exceeds 4194240, the most the CUDA kernels take "
     r"\(grid dimension y = ceil\(cols / 64\) <= 65535\)", "cuda"),
    ("experts_past_grid", lambda a: a.update(w=a["w"][:1].expand(65536, 6, 5),
                                             offsets=torch.zeros(65537, dtype=torch.int32, device="cuda")),
     FWD + r": at most 65535 experts on CUDA \(a grid dimension\), got 65536", "cuda"),
]


def _fwd_call(a):
    return ops.grouped_gemm_fwd(a["a"], a["w"], a["offsets"], a["act"], a["save"])


DGRAD = r"grouped_gemm \(dgrad\)"
DGRAD_CASES = [
    ("dout_dtype", lambda a: a.update(dout=a["dout"].long()), DGRAD + r": dout must be one of .*, got int64", "any"),
    ("dout_rank", lambda a: a.update(dout=a["dout"].flatten()),
     DGRAD + r": dout must have 2 dimensions, got shape \(42,\)", "any"),
    ("w_rank", lambda a: a.update(w=a["w"].flatten(1)), DGRAD + r": w must have 3 dimensions, got shape \(2, 30\)",
     "any"),
    ("w_dtype", lambda a: a.update(w=a["w"].half()), DGRAD + r": w must have dout's dtype float32, got float16", "any"),
    ("w_n", lambda a: a.update(w=a["w"][:, :5]),
     DGRAD + r": w must be \(E, N, K\) with N = dout.shape\[1\] = 6, got w shape \(2, 5, 5\)", "any"),
    ("offsets_dtype", lambda a: a.update(offsets=a["offsets"].short()),
     DGRAD + r": expert_offsets must be one of \{int32\}", "any"),
    ("offsets_experts", lambda a: a.update(offsets=torch.tensor([0, 2, 4, 7], dtype=torch.int32,
                                                                device=a["offsets"].device)),
     DGRAD + r": expert_offsets must have E \+ 1 = 3 entries \(w has E = 2 experts\), got shape \(4,\)", "any"),
    ("preact_shape", lambda a: a.update(pre=a["pre"][:, :5]),
     DGRAD + r": preact must have dout's shape \(7, 6\), got \(7, 5\)", "any"),
    ("preact_dtype", lambda a: a.update(pre=a["pre"].bfloat16()),
     DGRAD + r": preact must have dout's dtype float32, got bfloat16", "any"),
    ("preact_rank", lambda a: a.update(pre=a["pre"].flatten()), DGRAD + r": preact must have 2 dimensions", "any"),
    ("offsets_decreasing", lambda a: _offs(a, [0, 7, 2]), DGRAD + r": expert_offsets must be non-decreasing", "cpu"),
    ("offsets_past_rows", lambda a: _offs(a, [0, 3, 9]),
     DGRAD + r": expert_offsets\[E\] must be <= the number of rows 7, got 9", "cpu"),
    ("preact_device", lambda a: a.update(pre=a["pre"].cpu()),
     DGRAD + r": preact is on cpu but dout is on cuda:\d+; all tensors must be on one device", "cuda"),
    ("k_past_grid", lambda a: a.update(w=a["w"][..., :1].expand(2, 6, 65535 * 64 + 1)),
     DGRAD + r": K \(w.shape\[2\], the output columns\) = 4194241 exceeds 4194240", "cuda"),
]


def _dgrad_call(a):
    return ops.grouped_gemm_dgrad(a["dout"], a["w"], a["offsets"], a["pre"])


WGRAD = r"grouped_gemm \(wgrad\)"
WGRAD_CASES = [
    ("dout_dtype", lambda a: a.update(dout=a["dout"].bool()), WGRAD + r": dout must be one of .*, got bool", "any"),
    ("dout_rank", lambda a: a.update(dout=a["dout"][None]), WGRAD + r": dout must have 2 dimensions", "any"),
    ("a_rank", lambda a: a.update(a=a["a"].flatten()), WGRAD + r": a must have 2 dimensions, got shape \(35,\)", "any"),
    ("a_dtype", lambda a: a.update(a=a["a"].half()), WGRAD + r": a must have dout's dtype float32, got float16", "any"),
    ("a_rows", lambda a: a.update(a=a["a"][:6]),
     WGRAD + r": a must have dout's number of rows 7, got a shape \(6, 5\) and dout shape \(7, 6\)", "any"),
    ("offsets_dtype", lambda a: a.update(offsets=a["offsets"].float()),
     WGRAD + r": expert_offsets must be one of \{int32\}, got float32", "any"),
    ("offsets_rank", lambda a: a.update(offsets=a["offsets"].reshape(3, 1)),
     WGRAD + r": expert_offsets must have 1 dimensions", "any"),
    ("offsets_empty", lambda a: a.update(offsets=a["offsets"][:0]),
     WGRAD + r": expert_offsets.shape\[0\] must be at least 1 \(E \+ 1 entries\)", "any"),
    ("preact_shape", lambda a: a.update(pre=a["pre"][:6]), WGRAD + r": preact must have dout's shape \(7, 6\)", "any"),
    ("preact_dtype", lambda a: a.update(pre=a["pre"].double()),
     WGRAD + r": preact must have dout's dtype float32, got float64", "any"),
    ("offsets_decreasing", lambda a: _offs(a, [0, 4, 1]), WGRAD + r": expert_offsets must be non-decreasing", "cpu"),
    ("offsets_negative", lambda a: _offs(a, [-3, 4, 7]), WGRAD + r": expert_offsets\[0\] must be >= 0, got -3", "cpu"),
    ("a_device", lambda a: a.update(a=a["a"].cpu()),
     WGRAD + r": a is on cpu but dout is on cuda:\d+; all tensors must be on one device", "cuda"),
    ("k_past_grid", lambda a: a.update(a=a["a"][:, :1].expand(7, 65535 * 64 + 1)),
     WGRAD + r": K \(a.shape\[1\], the output columns\) = 4194241 exceeds 4194240", "cuda"),
]


def _wgrad_call(a):
    return ops.grouped_gemm_wgrad(a["dout"], a["a"], a["offsets"], a["pre"])


def _public_args(device):
    a, w, offsets = make([3, 4], 6, 5, torch.float32, device)  # R = 7, N = 6, K = 5, E = 2
    return SimpleNamespace(a=a, w=w, offsets=offsets)


def _offsets(t, values):
    return torch.tensor(values, dtype=torch.int32, device=t.a.device)


PUBLIC_CASES = [
    ("offsets_dtype", "any", lambda t: grouped_gemm(t.a, t.w, t.offsets.long()),
     "expert_offsets must be one of \\{int32\\}, got int64"),
    ("offsets_experts", "any", lambda t: grouped_gemm(t.a, t.w, t.offsets[:-1]),
     "expert_offsets must have E \\+ 1 = 3 entries"),
    ("w_k", "any", lambda t: grouped_gemm(t.a, t.w[:, :, :4], t.offsets),
     "w must be \\(E, N, K\\) with K = a.shape\\[1\\] = 5"),
    ("w_dtype", "any", lambda t: grouped_gemm(t.a, t.w.half(), t.offsets),
     "w must have a's dtype float32, got float16"),
    ("a_rank", "any", lambda t: grouped_gemm(t.a[0], t.w, t.offsets), "a must have 2 dimensions"),
    ("w_rank", "any", lambda t: grouped_gemm(t.a, t.w[0], t.offsets), "w must have 3 dimensions"),
    ("a_dtype", "any", lambda t: grouped_gemm(t.a.int(), t.w, t.offsets), "a must be one of"),
    ("activation_name", "any", lambda t: grouped_gemm(t.a, t.w, t.offsets, "gelu"),
     'grouped_gemm: activation must be "none" or "relu2", got "gelu"'),
    ("activation_case", "any", lambda t: ops.grouped_gemm_fwd(t.a, t.w, t.offsets, "RELU2", False),
     'activation must be "none" or "relu2", got "RELU2"'),
    ("dgrad_preact_shape", "any",
     lambda t: ops.grouped_gemm_dgrad(torch.randn(7, 6, device=t.a.device), t.w, t.offsets,
                                      torch.randn(7, 5, device=t.a.device)),
     "preact must have dout's shape"),
    ("wgrad_a_rows", "any",
     lambda t: ops.grouped_gemm_wgrad(torch.randn(7, 6, device=t.a.device), torch.randn(8, 5, device=t.a.device),
                                      t.offsets, None),
     "a must have dout's number of rows 7"),
    ("offsets_decreasing", "cpu", lambda t: grouped_gemm(t.a, t.w, _offsets(t, [0, 5, 3])), "non-decreasing"),
    ("offsets_past_rows", "cpu", lambda t: grouped_gemm(t.a, t.w, _offsets(t, [0, 3, 8])),
     "must be <= the number of rows 7"),
    ("offsets_negative", "cpu", lambda t: grouped_gemm(t.a, t.w, _offsets(t, [-1, 3, 7])),
     "expert_offsets\\[0\\] must be >= 0"),
    # float64 is a CPU-only dtype (gradcheck); the CUDA entry names the allowed dtypes.
    ("float64_on_cuda", "cuda", lambda t: grouped_gemm(t.a.double(), t.w.double(), t.offsets),
     "a must be one of \\{float32, float16, bfloat16\\}"),
]


test_bad_input = bad_input_test(
    fwd=mutation_table(_gg_args, _fwd_call, FWD_CASES), dgrad=mutation_table(_gg_args, _dgrad_call, DGRAD_CASES),
    wgrad=mutation_table(_gg_args, _wgrad_call, WGRAD_CASES), public=(_public_args, PUBLIC_CASES))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_memory_safe_for_bad_offsets(dtype):
    """On CUDA the offsets values are not checked (a host sync): every segment is clamped into
    [0, R] (lo = clamp(off[e]), hi = clamp(off[e+1], lo, R)). Negative, past-the-end and
    decreasing offsets give no fault and exactly the result of the clamped offsets when the
    clamped segments do not overlap; overlapping ones (unspecified values) stay finite.
    bf16 with N, K multiples of 8 also runs the CUTLASS path on sm_90 / sm_100."""
    R, N, K = 40, 24, 16
    a = torch.randn(R, K, device="cuda", dtype=dtype)
    w = torch.randn(3, N, K, device="cuda", dtype=dtype) / 4
    dout = torch.randn(R, N, device="cuda", dtype=dtype)

    def run(offs):
        o = torch.tensor(offs, dtype=torch.int32, device="cuda")
        out, pre = ops.grouped_gemm_fwd(a, w, o, "relu2", True)
        res = (out, pre, ops.grouped_gemm_dgrad(dout, w, o, None), ops.grouped_gemm_wgrad(dout, a, o, None))
        torch.cuda.synchronize()
        return res

    for bad, clamped in (([-9, 12, 20, 1 << 30], [0, 12, 20, 40]), ([-9, 12, 50, 20], [0, 12, 40, 40]),
                         ([0, 7, 3, 2], [0, 7, 7, 7])):
        for g_, w_ in zip(run(bad), run(clamped)):
            assert torch.equal(g_, w_), bad
    for g_ in run([5, 30, 10, 1 << 30]):  # segments [5, 30) and [10, 40) overlap
        assert torch.isfinite(g_).all()
