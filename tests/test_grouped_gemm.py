"""grouped_gemm (moe) against a float64 loop over experts: forward (none / relu2), dgrad, wgrad,
autograd, offsets edge cases (empty experts, one expert holding every row, unpadded segments,
rows past offsets[E]), tile edges, strided inputs, opcheck, torch.compile and bad inputs."""
import pytest
import torch

from nemokernels.moe import grouped_gemm

from conftest import DEVICES
from helpers import TOL, assert_close, nan_like, opcheck, poison_allocator, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ops = torch.ops.nemokernels


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
            assert_close(out, ref, dtype, what=f"out counts={counts} N={N} K={K} extra={extra}")
            R0 = int(offsets[-1])
            assert torch.equal(out[R0:].cpu(), torch.zeros_like(out[R0:]).cpu()), "rows past offsets[E] must be 0"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_preact_output(device, dtype):
    a, w, offsets = make([5, 0, 40, 19], 33, 24, dtype, device, extra_rows=3)
    out, pre = ops.grouped_gemm_fwd(a, w, offsets, 1, True)
    assert pre.shape == out.shape
    assert_close(pre, ref_fwd(a, w, offsets), dtype, what="preact")
    assert_close(out, ref_fwd(a, w, offsets, "relu2"), dtype, what="out")
    out2, pre2 = ops.grouped_gemm_fwd(a, w, offsets, 1, False)
    assert pre2.shape == (0, 33) and torch.equal(out, out2)
    _, pre3 = ops.grouped_gemm_fwd(a, w, offsets, 0, True)
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
            da, dw = torch.autograd.grad(out, (a, w), torch.randn_like(out))
            assert da.shape == a.shape and dw.shape == w.shape
            assert torch.isfinite(da).all() and torch.isfinite(dw).all()


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


# ---------------------------------------------------------------- opcheck, compile, errors


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    a, w, offsets = make([3, 0, 6], 7, 5, torch.float32, device, extra_rows=2)
    a.requires_grad_(), w.requires_grad_()
    opcheck(ops.grouped_gemm_fwd, (a, w, offsets, 1, True))
    opcheck(ops.grouped_gemm_fwd, (a, w, offsets, 0, False))
    opcheck(ops.grouped_gemm_fwd, (a, w, offsets, 1, False))
    dout = torch.randn(11, 7, device=device)
    pre = torch.randn(11, 7, device=device)
    opcheck(ops.grouped_gemm_dgrad, (dout, w.detach(), offsets, pre))
    opcheck(ops.grouped_gemm_dgrad, (dout, w.detach(), offsets, None))
    opcheck(ops.grouped_gemm_wgrad, (dout, a.detach(), offsets, pre))
    opcheck(ops.grouped_gemm_wgrad, (dout, a.detach(), offsets, None))


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


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise(device):
    a, w, offsets = make([3, 4], 6, 5, torch.float32, device)
    cases = [
        ((a, w, offsets.long()), "expert_offsets must be one of \\{int32\\}, got int64"),
        ((a, w, offsets[:-1]), "expert_offsets must have E \\+ 1 = 3 entries"),
        ((a, w[:, :, :4], offsets), "w must be \\(E, N, K\\) with K = a.shape\\[1\\] = 5"),
        ((a, w.half(), offsets), "w must have a's dtype float32, got float16"),
        ((a[0], w, offsets), "a must have 2 dimensions"),
        ((a, w[0], offsets), "w must have 3 dimensions"),
        ((a.int(), w, offsets), "a must be one of"),
    ]
    for args, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            grouped_gemm(*args)
    with pytest.raises(ValueError, match="activation"):
        grouped_gemm(a, w, offsets, "gelu")
    with pytest.raises(RuntimeError, match="activation must be 0 \\(none\\) or 1 \\(relu2\\)"):
        ops.grouped_gemm_fwd(a, w, offsets, 2, False)
    with pytest.raises(RuntimeError, match="preact must have dout's shape"):
        ops.grouped_gemm_dgrad(torch.randn(7, 6, device=device), w, offsets, torch.randn(7, 5, device=device))
    with pytest.raises(RuntimeError, match="a must have dout's number of rows 7"):
        ops.grouped_gemm_wgrad(torch.randn(7, 6, device=device), torch.randn(8, 5, device=device), offsets, None)


def test_bad_offsets_values_raise_on_cpu():
    a, w, _ = make([3, 4], 6, 5, torch.float32, "cpu")
    for offs, pattern in [([0, 5, 3], "non-decreasing"), ([0, 3, 8], "must be <= the number of rows 7"),
                          ([-1, 3, 7], "expert_offsets\\[0\\] must be >= 0")]:
        with pytest.raises(RuntimeError, match=pattern):
            grouped_gemm(a, w, torch.tensor(offs, dtype=torch.int32))


def test_float64_rejected_on_cuda_message():
    # float64 is a CPU-only dtype (gradcheck); the CUDA entry names the allowed dtypes.
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    a, w, offsets = make([3, 4], 6, 5, torch.float64, "cuda")
    with pytest.raises(RuntimeError, match="a must be one of \\{float32, float16, bfloat16\\}"):
        grouped_gemm(a, w, offsets)


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
