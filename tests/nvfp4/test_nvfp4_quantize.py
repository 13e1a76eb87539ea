"""nvfp4.quantize / quantize_t / dequantize against the float64 reference of the format
(nemokernels/nvfp4/reference.py): bit-identical codes and scales for every variant (1x16,
16x16, Hadamard, stochastic rounding, given amax), dtypes, odd and strided shapes; exact round
trips; SR unbiased and reproducible; Hadamard orthogonal and GEMM-invariant; special values;
bad inputs; opcheck and torch.compile."""
from types import SimpleNamespace

import pytest
import torch

from nemokernels.nvfp4 import NVFP4Tensor, dequantize, gemm, quantize, quantize_t
from nemokernels.nvfp4 import reference as ref

from conftest import DEVICES
from helpers import bad_input_test, mutation_table, opcheck, rel_err

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VARIANTS = [
    {},
    {"block_2d": True},
    {"hadamard": True},
    {"stochastic_rounding": True},
    {"block_2d": True, "hadamard": True, "stochastic_rounding": True},
]
# (leading dims, K): one block, odd row counts (partial 16x16 tiles), 3-D, tile edges.
SHAPES = [((1,), 16), ((5,), 48), ((37,), 64), ((3, 7), 32), ((129,), 48), ((17,), 16)]


def vid(v):
    return "-".join(k for k in v) or "rne"


def codes_of(t: NVFP4Tensor) -> torch.Tensor:
    return torch.stack([t.data & 0xF, t.data >> 4], -1).flatten(-2)


def assert_same(q: NVFP4Tensor, r: NVFP4Tensor, what=""):
    assert q.data.dtype == torch.uint8 and q.scales.dtype == torch.float8_e4m3fn
    assert q.global_scale.dtype == torch.float32 and q.global_scale.dim() == 0
    qd, rd = q.data.cpu().reshape(r.data.shape), r.data.cpu()
    assert torch.equal(qd, rd), f"{what}: codes differ at {(qd != rd).nonzero()[:5].tolist()}"
    qs, rs = q.scales.cpu().view(torch.uint8).reshape(r.scales.shape), r.scales.cpu().view(torch.uint8)
    assert torch.equal(qs, rs), f"{what}: scales differ at {(qs != rs).nonzero()[:5].tolist()}"
    assert torch.equal(q.global_scale.cpu(), r.global_scale.cpu()), f"{what}: global scale"


def ref_of(x, **kw):
    kw = dict(kw)
    kw.setdefault("seed", 0)
    return ref.quantize_ref(x.reshape(-1, x.shape[-1]).cpu(), **kw)


# ---------------------------------------------------------------- bit-identical to the reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
def test_matches_reference(device, dtype, variant):
    seed = int(torch.randint(0, 2**40, ()))
    for lead, K in SHAPES:
        x = (torch.randn(*lead, K) * torch.rand(*lead, 1) * 4).to(device, dtype)
        kw = dict(variant, seed=seed)
        q = quantize(x, **kw)
        assert q.data.shape == (*lead, K // 2) and q.scales.shape == (*lead, K // 16)
        assert q.shape == x.shape
        assert_same(q, ref_of(x, **kw), f"{lead} {K}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
def test_strided_inputs(device, variant):
    """Non-contiguous views are read in place and give the codes of their contiguous copy."""
    base = torch.randn(40, 96, device=device, dtype=torch.bfloat16)
    views = [base[:, ::2], base[3:35, 16:80], base.t()[:, :32], base.reshape(20, 2, 96)[:, 1]]
    for v in views:
        assert not v.is_contiguous()
        assert_same(quantize(v, seed=11, **variant), ref_of(v.contiguous(), seed=11, **variant), str(v.shape))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
def test_quantize_t(device, variant):
    """quantize_t(x) is the quantization of x.T (SR bits follow the output index)."""
    for M, K in [(16, 16), (48, 32), (64, 80), (128, 16), (32, 20), (16, 1)]:  # any K for quantize_t
        x = torch.randn(M, K, device=device)
        q = quantize_t(x, seed=5, **variant)
        assert q.data.shape == (K, M // 2)
        assert_same(q, ref_of(x.t().contiguous(), seed=5, **variant), f"{M}x{K}")
    # leading dims flatten into M
    x = torch.randn(2, 8, 32, device=device)
    assert_same(quantize_t(x, seed=1, **variant), ref_of(x.reshape(16, 32).t().contiguous(), seed=1, **variant))


@pytest.mark.parametrize("device", DEVICES)
def test_block_2d_transpose_is_exact(device):
    """16x16 tiles: quantize_t(W) is exactly the transpose of quantize(W) (codes and scales),
    so the forward and the dgrad use one quantized weight."""
    w = torch.randn(48, 80, device=device, dtype=torch.bfloat16)
    a, b = quantize(w, block_2d=True), quantize_t(w, block_2d=True)
    assert torch.equal(codes_of(a).t().cpu(), codes_of(b).cpu())
    sa = a.scales.float().repeat_interleave(16, 1)  # (48, 80)
    sb = b.scales.float().repeat_interleave(16, 1)  # (80, 48)
    assert torch.equal(sa.t().cpu(), sb.cpu())
    assert torch.equal(dequantize(a, torch.float32).t().cpu(), dequantize(b, torch.float32).cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_block_2d_scales_constant_per_tile(device):
    for R in (16, 37, 64):
        x = torch.randn(R, 64, device=device) * torch.linspace(0.1, 10, R, device=device)[:, None]
        s = quantize(x, block_2d=True).scales.float().cpu()
        for tr in range(0, R, 16):
            tile = s[tr:tr + 16]
            assert (tile == tile[0:1]).all(), f"tile starting at row {tr} has several scales"
        # the 1x16 scales differ between rows of a tile (rows have different magnitudes)
        assert not (quantize(x).scales.float().cpu()[:16] == s[:16]).all()


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_round_trip(device, dtype):
    """Values e2m1 * s_b with a block holding 6 * 448 (so s_enc = 1) quantize exactly."""
    R, K = 32, 64
    nb = K // 16
    codes = torch.randint(0, 16, (R, K))
    codes[:, ::16] = 7  # every block holds +-6: its scale is its own s_b
    e4m3 = ref._e4m3_values()
    sidx = torch.randint(8, 0x7F, (R, nb))  # normal E4M3 scales 2^-6 .. 448
    sidx[0, 0] = 0x7E  # 448: amax = 6 * 448 = 2688, s_enc = 1
    x64 = ref.e2m1_decode(codes) * e4m3[sidx].repeat_interleave(16, 1)
    x = x64.to(device, dtype)
    assert torch.equal(x.double().cpu(), x64)
    q = quantize(x)
    assert q.global_scale.item() == 1.0
    assert torch.equal(dequantize(q, dtype).cpu(), x.cpu())
    assert torch.equal(q.scales.view(torch.uint8).long().cpu(), sidx)


@pytest.mark.parametrize("device", DEVICES)
def test_rne_ties_exact(device):
    """Every E2M1 rounding tie (.25 .75 1.25 1.75 2.5 3.5 5), its float32 neighbours, the grid
    points, 6 and values past it reach the encoder unscaled (global_amax 2688 -> s_enc 1; each
    block holds 6 -> s_b 1, inv 1) and round exactly as the reference's nearest-value search:
    the branch-free encoder (numerics.cuh e2m1_mag_rne) in the CPU and CUDA kernels."""
    pts = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 5.9999995, 6.0]
    vals = []
    for t in pts:
        t32 = torch.tensor(t, dtype=torch.float32)
        vals += [t32, torch.nextafter(t32, torch.tensor(-1.0)), torch.nextafter(t32, torch.tensor(9.0))]
    v = torch.stack(vals).abs()
    v = torch.cat([v, -v, torch.tensor([1e-30, 2.0**-149, 0.2499999])])
    n = (v.numel() + 14) // 15 * 15
    body = torch.cat([v, torch.full((n - v.numel(),), 0.3)]).reshape(-1, 15)
    x = torch.cat([torch.full((body.shape[0], 1), 6.0), body], 1).to(device)  # (rows, 16): 6 first
    for kw in ({}, {"block_2d": True}):
        q = quantize(x, global_amax=2688.0, **kw)
        assert (q.scales.float() == 1.0).all()
        assert_same(q, ref_of(x, global_amax=torch.tensor([2688.0]), **kw), f"ties {kw}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_reference(device, dtype):
    x = torch.randn(3, 19, 48, device=device)
    for kw in [{}, {"block_2d": True}]:
        q = quantize(x, **kw)
        out = dequantize(q, dtype)
        assert out.shape == x.shape and out.dtype == dtype
        want = ref.dequantize_ref(ref_of(x, **kw)).float().to(dtype).reshape(x.shape)
        assert torch.equal(out.cpu(), want), "dequantize is (code * s_b) * global_scale in float32, then dtype"
        assert rel_err(out.float(), x) < 0.12


@pytest.mark.parametrize("device", DEVICES)
def test_quantization_error(device):
    """Relative error of the round trip for Gaussian data: about 0.1 (E2M1 with block scales)."""
    x = torch.randn(64, 256, device=device)
    for kw in [{}, {"block_2d": True}, {"stochastic_rounding": True, "seed": 3}]:
        e = rel_err(dequantize(quantize(x, **kw), torch.float32), x)
        assert 0.02 < e < 0.2, (kw, e)


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_unbiased(device):
    """The mean over seeds converges to x (error of the mean << rounding error of RNE)."""
    x = torch.randn(32, 64, device=device)
    n = 100
    acc = torch.zeros_like(x, dtype=torch.float64)
    for s in range(n):
        acc += dequantize(quantize(x, stochastic_rounding=True, seed=1000 + s), torch.float32).double()
    mean = acc / n
    e_rne = (dequantize(quantize(x), torch.float32).double() - x.double()).norm()
    e_mean = (mean - x.double()).norm()
    # SR error per element has rms <= step/2 (1/sqrt(6) step on average); the mean of n draws
    # shrinks it by sqrt(n): expected ratio ~ 1.4/sqrt(n) = 0.14, bound 0.3 (> 10 sigma).
    assert e_mean < 0.3 * e_rne, (e_mean.item(), e_rne.item())
    # no systematic bias overall: the signed mean error is tiny compared to its spread
    bias = (mean - x.double()).mean().abs()
    assert bias < 5 * (mean - x.double()).std() / (x.numel() ** 0.5) + 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_stochastic_rounding_seeds(device):
    x = torch.randn(16, 128, device=device, dtype=torch.bfloat16)
    a = quantize(x, stochastic_rounding=True, seed=42)
    b = quantize(x, stochastic_rounding=True, seed=42)
    c = quantize(x, stochastic_rounding=True, seed=43)
    assert torch.equal(a.data, b.data)
    assert not torch.equal(a.data, c.data)
    assert torch.equal(a.scales.view(torch.uint8), c.scales.view(torch.uint8))  # scales are deterministic
    # seed None draws a fresh one each call
    d, e = quantize(x, stochastic_rounding=True), quantize(x, stochastic_rounding=True)
    assert not torch.equal(d.data, e.data)
    # a seed tensor (read on the device) is the same seed as the int; negative ints wrap to uint64
    for s in (42, -5, 2**63 + 9):
        st = torch.tensor([s if s < 2**63 else s - 2**64], device=device)
        for kw in ({"stochastic_rounding": True}, {"hadamard": True}):
            assert torch.equal(quantize(x, seed=st, **kw).data, quantize(x, seed=s, **kw).data)


def test_philox_reference_matches_kernel_generator():
    import nemokernels._C as C
    for ctr, key in [([0, 0, 0, 0], [0, 0]), ([1, 2, 3, 4], [5, 6]), ([2**32 - 1] * 4, [2**32 - 1, 7])]:
        t = [torch.tensor([c]) for c in ctr]
        assert [int(w) for w in ref.philox4x32_10(*t, *key)] == C.philox4x32_10(ctr, key)


def test_hadamard_orthogonal_and_gemm_invariant():
    for seed in (0, 1, 123456789):
        M = ref.hadamard_matrix(seed)
        assert torch.allclose(M @ M.T, torch.eye(16, dtype=torch.float64), atol=1e-15)
        # the float32 butterfly of the kernels is M v
        v = torch.randn(5, 32)
        got = ref.hadamard16_f32(v, seed).double()
        want = (v.double().reshape(5, 2, 16) @ M.T).reshape(5, 32)
        assert (got - want).abs().max() < 1e-5
    assert not torch.equal(ref.hadamard_signs(0), ref.hadamard_signs(1))
    # (a M^T)(b M^T)^T = a b^T blockwise along K
    a, b = torch.randn(7, 48, dtype=torch.float64), torch.randn(5, 48, dtype=torch.float64)
    M = ref.hadamard_matrix(9)
    ah = (a.reshape(7, 3, 16) @ M.T).reshape(7, 48)
    bh = (b.reshape(5, 3, 16) @ M.T).reshape(5, 48)
    assert torch.allclose(ah @ bh.T, a @ b.T, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_hadamard_gemm_within_quantization_error(device):
    """gemm(q(a, H), q(b, H)) with one seed ~ a @ b.T within the NVFP4 error, and the
    dequantized values are the transformed ones."""
    a = torch.randn(32, 128, device=device)
    b = torch.randn(48, 128, device=device)
    exact = a.double() @ b.double().T
    plain = rel_err(gemm(quantize(a), quantize(b), torch.float32), exact)
    had = rel_err(gemm(quantize(a, hadamard=True, seed=77), quantize(b, hadamard=True, seed=77), torch.float32), exact)
    # a GEMM of two NVFP4 operands: ~0.14 relative error for Gaussian data, with or without H
    assert had < 0.2 and had < 1.4 * plain, (had, plain)
    mism = rel_err(gemm(quantize(a, hadamard=True, seed=77), quantize(b, hadamard=True, seed=78), torch.float32), exact)
    assert mism > 0.5, "different signs on the two operands must not cancel"
    M = ref.hadamard_matrix(77).to(device)
    ah = (a.double().reshape(32, 8, 16) @ M.T).reshape(32, 128)
    assert rel_err(dequantize(quantize(a, hadamard=True, seed=77), torch.float32), ah) < 0.15


@pytest.mark.parametrize("device", DEVICES)
def test_global_amax(device):
    x = torch.randn(32, 64, device=device)
    amax = x.abs().max()
    for g in (2 * amax, 0.5 * amax, torch.tensor([3.0], device=device)):
        ga = g.reshape(1).float()
        q = quantize(x, global_amax=ga)
        assert_same(q, ref_of(x, global_amax=ga.cpu()))
        assert q.global_scale.item() == pytest.approx(ga.item() / 2688, rel=1e-6)
    # a float is accepted too; an amax below the data saturates (|code| = 6) instead of failing
    q = quantize(x, global_amax=float(amax) / 4)
    assert (codes_of(q) & 7).max().item() == 7
    # the given amax of a Hadamard-quantized tensor is that of the transformed values
    hx = ref.hadamard16_f32(x.cpu(), 4)
    q1 = quantize(x, hadamard=True, seed=4)
    q2 = quantize(x, hadamard=True, seed=4, global_amax=hx.abs().max().reshape(1).to(device))
    assert_same(q1, ref_of(x, hadamard=True, seed=4))
    assert torch.equal(q1.data, q2.data) and torch.equal(q1.global_scale, q2.global_scale)


@pytest.mark.parametrize("device", DEVICES)
def test_special_values(device):
    z = quantize(torch.zeros(16, 32, device=device))
    assert (z.data == 0).all() and (z.scales.float() == 0).all() and z.global_scale.item() == 1.0
    for c in (1.0, -3.7, 1e-3):
        x = torch.full((4, 32), c, device=device)
        q = quantize(x)
        assert_same(q, ref_of(x))
        assert rel_err(dequantize(q, torch.float32), x) < 1e-3
    for scale in (1e30, 1e-30, 1e-38, 3e38 / 16):
        x = torch.randn(8, 64, device=device) * scale
        x[0, 0] = scale  # amax known to be at least `scale`
        q = quantize(x)
        assert_same(q, ref_of(x), f"scale {scale}")
        if 1e-37 < scale < 1e37:
            assert rel_err(dequantize(q, torch.float32), x) < 0.15
    # one huge block and one tiny block: the tiny block's scale underflows to 0 -> codes 0
    x = torch.randn(2, 32, device=device)
    x[0] *= 1e6
    x[1] *= 1e-6
    q = quantize(x)
    assert_same(q, ref_of(x))
    assert (q.scales.float()[1] == 0).all() and (codes_of(q)[1] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_empty(device):
    q = quantize(torch.randn(0, 32, device=device))
    assert q.data.shape == (0, 16) and q.scales.shape == (0, 2) and q.global_scale.item() == 1.0
    q = quantize(torch.randn(3, 0, device=device))
    assert q.data.shape == (3, 0)
    assert dequantize(q).shape == (3, 0)
    assert dequantize(quantize(torch.randn(2, 0, 16, device=device))).shape == (2, 0, 16)


@pytest.mark.gpu
def test_cuda_nonfinite_gives_nan_scale():
    x = torch.randn(64, 64, device="cuda")
    x[3, 3] = float("nan")
    assert torch.isnan(quantize(x).global_scale).item()


# ---------------------------------------------------------------- GPU-only: CPU == CUDA, big shapes, graphs


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS, ids=vid)
def test_cuda_matches_cpu_large(variant, sanitizer):
    """Bit-identical CPU and CUDA results on shapes that need many amax partials and grid-stride
    iterations, row-major and transposed (smaller under compute-sanitizer)."""
    shapes = [(64, 1024), (40, 2048)] if sanitizer else [(4096, 1024), (1000, 4096), (16, 65536)]
    for shape in shapes:
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 3
        a, b = quantize(x, seed=9, **variant), quantize(x.cpu(), seed=9, **variant)
        assert_same(a, b, str(shape))
        if shape[0] % 16 == 0:
            assert_same(quantize_t(x, seed=9, **variant), quantize_t(x.cpu(), seed=9, **variant), f"t {shape}")
        assert torch.equal(dequantize(a).cpu(), dequantize(b))


@pytest.mark.gpu
def test_cuda_graph_replay():
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    quantize(x, seed=1, stochastic_rounding=True)  # warm up
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g):
        q = quantize(x, seed=1, stochastic_rounding=True)
        d = dequantize(q)
    torch.cuda.current_stream().wait_stream(s)
    x.copy_(torch.randn_like(x) * 5)
    g.replay()
    torch.cuda.synchronize()
    want = quantize(x, seed=1, stochastic_rounding=True)
    assert_same(q, want)
    assert torch.equal(d, dequantize(want))


@pytest.mark.gpu
def test_cuda_graph_seed_tensor_replay():
    """A tensor seed is read on the device: updating it in place changes the SR bits of the
    next replay."""
    x = torch.randn(64, 128, device="cuda")
    seed = torch.tensor([5], device="cuda")
    quantize(x, stochastic_rounding=True, seed=seed)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g):
        q = quantize(x, stochastic_rounding=True, hadamard=True, seed=seed)
    torch.cuda.current_stream().wait_stream(s)
    for v in (11, 12):
        seed.fill_(v)
        g.replay()
        torch.cuda.synchronize()
        assert_same(q, quantize(x, stochastic_rounding=True, hadamard=True, seed=v), f"seed {v}")


# ---------------------------------------------------------------- registration


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(20, 32, device=device)
    seed_t = torch.tensor([77], device=device)
    for args in [(x, False, False, False, 0, None, None), (x, True, True, True, 123, None, None),
                 (x.t()[:, :16], False, True, False, 5, None, None),
                 (x, False, False, True, 1, torch.tensor([4.0], device=device), seed_t)]:
        opcheck(torch.ops.nemokernels.nvfp4_quantize.default, args)
    q = quantize(x)
    # test_schema left out: its mutation check has no float8_e4m3fn CPU kernel to compare the
    # scales input with (as for nvfp4_gemm in test_nvfp4_gemm.py).
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        torch.library.opcheck(torch.ops.nemokernels.nvfp4_dequantize.default, (q.data, q.scales, q.global_scale, dtype),
                              test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def f(x, seed):
        q = quantize(x, block_2d=True, hadamard=True, stochastic_rounding=True, seed=seed)
        qt = quantize_t(x, seed=3)
        return q.data, q.scales, q.global_scale, dequantize(q, torch.float32), qt.data

    x = torch.randn(32, 64, device=device, dtype=torch.bfloat16)
    seed = torch.tensor([17], device=device)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, seed)
    want = f(x, seed)
    for g, w in zip(got, want):
        assert torch.equal(g.view(torch.uint8) if g.dtype == torch.float8_e4m3fn else g,
                           w.view(torch.uint8) if w.dtype == torch.float8_e4m3fn else w)


# ---------------------------------------------------------------- bad input, table-driven
# Rows (id, mutation of a valid call's arguments, regex, where[, exc]) as in helpers.mutation_table;
# "cpu" rows are value checks (non-finite x and global_amax are read on the CPU; on CUDA that
# would need a host sync, so the kernels stay memory-safe and give global_scale = NaN instead, see
# test_cuda_memory_safe_for_bad_values). The messages name the op (nvfp4.quantize /
# nvfp4.dequantize, the public names; quantize_t runs nvfp4.quantize on x.T and its message names
# the token dim of quantize_t), the argument, expected vs got. The public functions' refusals are
# rows (id, where, call, regex[, exc]) over _public_args.

ops = torch.ops.nemokernels


def _set(a, key, idx, value):
    a[key] = a[key].clone()
    a[key][idx] = value


def _q_args(device):
    return dict(x=torch.randn(4, 32, device=device), b2d=False, had=False, sr=True, seed=7,
                amax=torch.tensor([3.0], device=device), seed_t=torch.tensor([11], device=device))


def _q_call(a):
    return ops.nvfp4_quantize(a["x"], a["b2d"], a["had"], a["sr"], a["seed"], a["amax"], a["seed_t"])


Q = r"nvfp4\.quantize"
QUANT_CASES = [
    ("x_rank1", lambda a: a.update(x=a["x"][0]),
     Q + r": x must be a 2-D \(rows, K\) view \(the Python wrapper flattens the leading dims\), got shape \(32,\)",
     "any"),
    ("x_rank3", lambda a: a.update(x=a["x"][None]), Q + r": x must be a 2-D \(rows, K\) view .*got shape \(1, 4, 32\)",
     "any"),
    ("x_dtype_f64", lambda a: a.update(x=a["x"].double()),
     Q + r": x must be one of \{float32, float16, bfloat16\}, got float64", "any"),
    ("x_dtype_int", lambda a: a.update(x=a["x"].int()),
     Q + r": x must be one of \{float32, float16, bfloat16\}, got int32", "any"),
    ("k_not_multiple_of_16", lambda a: a.update(x=a["x"][:, :24]),
     Q + r": the quantized dim \(K, the last dim; the token dim for quantize_t\) must be a multiple of 16 \(one E4M3 "
     r"scale per 16 elements\), got shape \(4, 24\)", "any"),
    ("amax_numel", lambda a: a.update(amax=torch.ones(2, device=a["x"].device)),
     Q + r": global_amax must hold exactly one element, got shape \(2,\)", "any"),
    ("amax_dtype", lambda a: a.update(amax=a["amax"].double()),
     Q + r": global_amax must be one of \{float32\}, got float64", "any"),
    ("seed_numel", lambda a: a.update(seed_t=torch.tensor([1, 2], device=a["x"].device)),
     Q + r": seed_tensor must hold exactly one element, got shape \(2,\)", "any"),
    ("seed_dtype", lambda a: a.update(seed_t=a["seed_t"].int()),
     Q + r": seed_tensor must be one of \{int64\}, got int32", "any"),
    ("amax_negative", lambda a: a.update(amax=-a["amax"]), Q + r": global_amax must be finite and >= 0, got -3", "cpu"),
    ("amax_nan", lambda a: a.update(amax=a["amax"] * float("nan")),
     Q + r": global_amax must be finite and >= 0, got nan", "cpu"),
    ("amax_inf", lambda a: a.update(amax=a["amax"] * float("inf")),
     Q + r": global_amax must be finite and >= 0, got inf", "cpu"),
    ("x_nan", lambda a: _set(a, "x", (1, 3), float("nan")),
     Q + r": x holds NaN or Inf; NVFP4 has no encoding for non-finite values \(on CUDA this is not checked: the "
     r"global scale comes out NaN instead\)", "cpu"),
    ("x_neg_inf_hadamard", lambda a: (_set(a, "x", (3, 31), -float("inf")), a.update(had=True, amax=None)),
     Q + r": x holds NaN or Inf", "cpu"),
    ("amax_device", lambda a: a.update(amax=a["amax"].cpu()),
     Q + r": global_amax is on cpu but x is on cuda:\d+; all tensors must be on one device", "cuda"),
    ("seed_device", lambda a: a.update(seed_t=a["seed_t"].cpu()),
     Q + r": seed_tensor is on cpu but x is on cuda:\d+; all tensors must be on one device", "cuda"),
]


def _qt_args(device):
    return dict(x=torch.randn(32, 24, device=device), kw=dict(stochastic_rounding=True, seed=3))


def _qt_call(a):
    return quantize_t(a["x"], **a["kw"])


QT_CASES = [  # quantize_t: the public function (there is no separate op: it runs nvfp4_quantize on x.T)
    ("tokens_not_multiple_of_16", lambda a: a.update(x=a["x"][:24]),
     Q + r": the quantized dim \(K, the last dim; the token dim for quantize_t\) must be a multiple of 16 .*got shape "
     r"\(24, 24\)", "any", RuntimeError),
    ("x_dtype", lambda a: a.update(x=a["x"].long()), Q + r": x must be one of \{float32, float16, bfloat16\}, got int64",
     "any", RuntimeError),
    ("x_0d", lambda a: a.update(x=a["x"][0, 0]), r"nvfp4\.quantize_t: x must have at least one dim", "any", ValueError),
    ("x_not_tensor", lambda a: a.update(x=a["x"].tolist()), r"nvfp4\.quantize_t: x must be a torch\.Tensor, got list",
     "any", TypeError),
    ("amax_numel", lambda a: a["kw"].update(global_amax=torch.ones(3, device=a["x"].device)),
     Q + r": global_amax must hold exactly one element, got shape \(3,\)", "any", RuntimeError),
    ("seed_numel", lambda a: a["kw"].update(seed=torch.tensor([1, 2], device=a["x"].device)),
     Q + r": seed_tensor must hold exactly one element", "any", RuntimeError),
    ("amax_negative", lambda a: a["kw"].update(global_amax=-1.0), Q + r": global_amax must be finite and >= 0, got -1",
     "cpu", RuntimeError),
    ("x_inf", lambda a: _set(a, "x", (17, 0), float("inf")), Q + r": x holds NaN or Inf", "cpu", RuntimeError),
    ("amax_device", lambda a: a["kw"].update(global_amax=torch.tensor([1.0])),
     Q + r": global_amax is on cpu but x is on cuda:\d+", "cuda", RuntimeError),
]


def _dq_args(device):
    q = quantize(torch.randn(4, 32, device=device))
    return dict(data=q.data, scales=q.scales, gs=q.global_scale, dtype=torch.bfloat16)


def _dq_call(a):
    return ops.nvfp4_dequantize(a["data"], a["scales"], a["gs"], a["dtype"])


DQ = r"nvfp4\.dequantize"
DEQUANT_CASES = [
    ("data_rank", lambda a: a.update(data=a["data"].flatten()), DQ + r": data must have 2 dimensions, got shape \(64,\)",
     "any"),
    ("data_dtype", lambda a: a.update(data=a["data"].view(torch.int8)),
     DQ + r": data must be one of \{uint8\}, got int8", "any"),
    ("scales_rank", lambda a: a.update(scales=a["scales"][None]), DQ + r": scales must have 2 dimensions", "any"),
    ("scales_dtype", lambda a: a.update(scales=a["scales"].float()),
     DQ + r": scales must be one of \{float8_e4m3fn\}, got float32", "any"),
    ("scales_bytes", lambda a: a.update(scales=a["scales"].view(torch.uint8)),
     DQ + r": scales must be one of \{float8_e4m3fn\}, got uint8", "any"),
    ("scales_rows", lambda a: a.update(scales=a["scales"][:3]),
     DQ + r": scales must have shape \(4, 2\) for data of shape \(4, 16\), got \(3, 2\)", "any"),
    ("scales_cols", lambda a: a.update(scales=a["scales"][:, :1]),
     DQ + r": scales must have shape \(4, 2\) for data of shape \(4, 16\), got \(4, 1\)", "any"),
    ("k_not_multiple_of_16", lambda a: a.update(data=a["data"][:, :3], scales=a["scales"][:, :0]),
     DQ + r": data.shape\[-1\] \* 2 \(K\) must be a multiple of 16, got data shape \(4, 3\)", "any"),
    ("global_numel", lambda a: a.update(gs=torch.ones(2, device=a["gs"].device)),
     DQ + r": global_scale must hold exactly one element, got shape \(2,\)", "any"),
    ("global_dtype", lambda a: a.update(gs=a["gs"].double()), DQ + r": global_scale must be one of \{float32\}, got float64",
     "any"),
    ("out_dtype_int", lambda a: a.update(dtype=torch.int32),
     DQ + r": out_dtype must be one of \{float32, float16, bfloat16\}, got int32", "any"),
    ("out_dtype_double", lambda a: a.update(dtype=torch.float64), DQ + r": out_dtype must be .*got float64", "any"),
    ("scales_device", lambda a: a.update(scales=a["scales"].cpu()),
     DQ + r": scales is on cpu but data is on cuda:\d+; all tensors must be on one device", "cuda"),
    ("global_device", lambda a: a.update(gs=a["gs"].cpu()),
     DQ + r": global_scale is on cpu but data is on cuda:\d+; all tensors must be on one device", "cuda"),
]


def _public_args(device):
    return SimpleNamespace(x=torch.randn(4, 32, device=device), q=quantize(torch.randn(4, 32, device=device)))


def _with(x, idx, value):
    x = x.clone()
    x[idx] = value
    return x


PUBLIC_CASES = [
    ("k_not_multiple_of_16", "any", lambda t: quantize(t.x[:, :24]), "multiple of 16"),
    ("tokens_not_multiple_of_16", "any", lambda t: quantize_t(torch.randn(24, 32, device=t.x.device)),
     "multiple of 16"),  # 24 tokens
    ("x_dtype_int", "any", lambda t: quantize(torch.randint(0, 5, (4, 32), device=t.x.device)), "x must be one of"),
    ("x_dtype_f64", "any", lambda t: quantize(t.x.double()), "x must be one of"),
    ("x_0d", "any", lambda t: quantize(torch.tensor(1.0, device=t.x.device)), "at least one dim", ValueError),
    *[(f"x_{name}{amax}", "cpu",
       lambda t, bad=bad, amax=amax: quantize(_with(t.x, (2, 7), bad),
                                              global_amax=torch.tensor([1.0]) if amax else None),
       "NaN or Inf")
      for name, bad in (("nan", float("nan")), ("inf", float("inf")), ("neg_inf", -float("inf")))
      for amax in ("", "_with_amax")],
    ("amax_numel", "any", lambda t: quantize(t.x, global_amax=torch.ones(2, device=t.x.device)),
     "global_amax must hold exactly one element"),
    ("seed_numel", "any",
     lambda t: quantize(t.x, stochastic_rounding=True, seed=torch.tensor([1, 2], device=t.x.device)),
     "seed_tensor must hold exactly one element"),
    ("amax_nan", "cpu", lambda t: quantize(t.x, global_amax=torch.tensor([float("nan")])),
     "global_amax must be finite"),
    ("dequantize_dtype", "any", lambda t: dequantize(t.q, torch.int32),
     "nvfp4.dequantize: out_dtype must be one of \\{float32, float16, bfloat16\\}, got int32"),
    ("dequantize_scales_shape", "any",
     lambda t: dequantize(NVFP4Tensor(t.q.data, t.q.scales[:, :1], t.q.global_scale)), "scales must have shape"),
    ("amax_device", "cuda", lambda t: quantize(t.x, global_amax=torch.tensor([1.0])), "global_amax is on cpu"),
    ("dequantize_scales_device", "cuda",
     lambda t: dequantize(NVFP4Tensor(t.q.data, t.q.scales.cpu(), t.q.global_scale)), "scales is on"),
]


test_bad_input = bad_input_test(
    quantize=mutation_table(_q_args, _q_call, QUANT_CASES), quantize_t=mutation_table(_qt_args, _qt_call, QT_CASES),
    dequantize=mutation_table(_dq_args, _dq_call, DEQUANT_CASES), public=(_public_args, PUBLIC_CASES))


@pytest.mark.gpu
def test_cuda_memory_safe_for_bad_values():
    """The value checks the CPU makes are skipped on CUDA (a host sync): non-finite x or a NaN /
    Inf global_amax give global_scale = NaN (every dequantized value NaN), a negative global_amax
    a negative global scale; never a fault, and the outputs have their shapes."""
    x = torch.randn(64, 64, device="cuda")
    for amax in (float("nan"), float("inf"), -2.0):  # s_enc = 2688 / amax: NaN, NaN (amax > float max), < 0
        d, s, g = ops.nvfp4_quantize(x, False, False, False, 0, torch.tensor([amax], device="cuda"), None)
        torch.cuda.synchronize()
        assert d.shape == (64, 32) and s.shape == (64, 4)
        assert torch.isnan(g).item() if amax != -2.0 else not g.item() > 0
    xi = x.clone()
    xi[5, 9] = -float("inf")
    for kw in ({}, {"hadamard": True}, {"block_2d": True}):
        q = quantize_t(xi, **kw)
        torch.cuda.synchronize()
        assert torch.isnan(q.global_scale).item() and torch.isnan(dequantize(q, torch.float32)).all()
