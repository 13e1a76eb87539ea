"""FP8 experts (issue 23 item 1, forward): moe_quantize_fp8 (rows to e4m3 with one float32 scale
each, dynamic amax / 448 or static, gathered on the way) against torch's own float8 cast, and
grouped_gemm with an FP8Tensor (grouped_gemm_fp8) against float64 of the same quantized operands:
out[r] = act(a_scale[r] * w_scale[e] * (a_q[r] @ w_q[e]^T)). CPU kernels, the portable CUDA
kernels under the emulator, and on a GPU the sm_90a CUTLASS kernel against the portable one;
empty experts, rows outside every segment, padding rows, NaN rows, poisoned outputs, bad inputs,
opcheck and the refusal of a gradient."""
import functools

import pytest
import torch

import cuda_emu as _emu_base
from conftest import DEVICES
from helpers import assert_close, assert_close_to_magnitude, poison_allocator
from nemokernels.moe import (FP8Rows, FP8Tensor, fp8_block_weights, fp8_weights, grouped_gemm, grouped_gemm_fp8_training,
                             moe_permute_plan, quantize_rows_fp8)
from test_grouped_gemm import assert_rows_outside_zero, offsets_from_counts

ops = torch.ops.nemokernels
E4M3 = torch.float8_e4m3fn


# ---------------------------------------------------------------- independent references

def quantize_ref(x, static_scale=None):
    """Per-row e4m3 codes and scales by torch: scale = amax / 448 in float32 (1 for a zero row),
    codes = torch's float8 cast (round to nearest even) of x / scale clamped to +-448."""
    xf = x.float().cpu()
    if static_scale is None:
        amax = xf.abs().amax(dim=1) if xf.shape[1] else torch.zeros(xf.shape[0])
        scale = torch.where(amax == 0, torch.ones_like(amax), amax / 448.0)
    else:
        scale = torch.full((xf.shape[0],), float(static_scale))
    q = (xf / scale[:, None]).clamp(-448.0, 448.0).to(E4M3)
    return q, scale


def gemm_ref(aq, a_scale, wq, w_scale, offsets, activation):
    E, N = wq.shape[0], wq.shape[1]
    ws = w_scale.double().cpu().reshape(-1).expand(E)
    out = torch.zeros(aq.shape[0], N, dtype=torch.float64)
    offs = offsets.cpu().tolist()
    for e in range(E):
        lo, hi = offs[e], offs[e + 1]
        y = (aq[lo:hi].cpu().double() @ wq[e].cpu().double().T) * a_scale[lo:hi].cpu().double()[:, None] * ws[e]
        out[lo:hi] = torch.relu(y).square() if activation == "relu2" else y
    return out


def fp8_op(aq, a_scale, wq, w_scale, offsets, activation, dtype):
    """grouped_gemm_fp8's output (no pre-activation kept)."""
    return ops.grouped_gemm_fp8(aq, a_scale, wq, w_scale, offsets, activation, dtype, False)[0]


def rand_fp8(shape, gen):
    """e4m3 bytes over the whole finite range (NaN bytes 0x7f / 0xff avoided)."""
    b = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    b = torch.where((b & 0x7f) == 0x7f, b - 1, b)
    return b.view(E4M3)


def gemm_case(counts, N, K, device, lead_rows=0, extra_rows=3, per_expert=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    offsets = offsets_from_counts(counts, device) + lead_rows
    R = int(offsets[-1]) + extra_rows
    aq = rand_fp8((R, K), g)
    a_scale = (torch.rand(R, generator=g) + 0.5) / 64
    wq = rand_fp8((len(counts), N, K), g)
    w_scale = (torch.rand(len(counts), generator=g) + 0.5) / (8 * K ** 0.5) if per_expert else torch.tensor(0.01)
    return aq.to(device), a_scale.to(device), wq.to(device), w_scale.float().to(device), offsets


def check_gemm(out, aq, a_scale, wq, w_scale, offsets, activation, dtype, what):
    ref = gemm_ref(aq, a_scale, wq, w_scale, offsets, activation)
    assert out.shape == ref.shape and out.dtype == dtype, what
    assert_close(out.cpu(), ref, dtype, factor=2.0 if activation == "relu2" else 1.0, what=what)
    assert_rows_outside_zero(out, offsets, what)


# ---------------------------------------------------------------- the row quantizer

def assert_codes_equal(q, ref, what):
    qb, rb = q.cpu().view(torch.uint8), ref.view(torch.uint8)
    nan_q, nan_r = (qb & 0x7f) == 0x7f, (rb & 0x7f) == 0x7f
    assert torch.equal(nan_q, nan_r), f"{what}: NaN codes differ"
    bad = (qb != rb) & ~nan_q
    assert not bad.any(), f"{what}: {int(bad.sum())} codes differ, first at {bad.nonzero()[0].tolist()}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("static", [False, True])
def test_quantize_rows_matches_torch(device, dtype, static):
    g = torch.Generator().manual_seed(3)
    for T, K in ((7, 64), (5, 40), (3, 1000)):  # K % 8 == 0 (vector path) and not
        x = (torch.randn(T, K, generator=g) * torch.logspace(-6, 3, T)[:, None]).to(dtype)
        x[1] = 0  # a zero row: scale 1, codes 0
        x[2, :3] = torch.tensor([3e-9, -2.5e-7, 1e4])  # subnormal codes and (static) saturation
        s = torch.tensor(0.05) if static else None
        rows = quantize_rows_fp8(x.to(device), s)
        ref_q, ref_s = quantize_ref(x, s)
        assert rows.data.dtype == E4M3 and rows.scale.dtype == torch.float32
        assert torch.equal(rows.scale.cpu(), ref_s), f"{device} {dtype} scales"
        assert_codes_equal(rows.data, ref_q, f"{device} {dtype} T={T} K={K}")


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_gathers_like_moe_gather(device):
    """With a plan, row r is x[slot_of_row[r] // top_k] (padding rows: zero codes, scale 1): the
    same rows as moe_gather then quantize."""
    g = torch.Generator().manual_seed(5)
    T, K, E, k = 9, 48, 4, 2
    x = torch.randn(T, K, generator=g).to(torch.bfloat16).to(device)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).int().to(device)
    plan = moe_permute_plan(ids, E, pad_to=4)  # padding rows
    rows = quantize_rows_fp8(x, None, plan)
    slot = plan.slot_of_row.cpu().long()
    src = torch.where(slot >= 0, slot // k, 0)
    ref_q, ref_s = quantize_ref(x.cpu()[src])
    pad = slot < 0
    assert pad.any()
    ref_q[pad] = torch.zeros(K, dtype=E4M3)
    ref_s[pad] = 1.0
    assert torch.equal(rows.scale.cpu(), ref_s)
    assert_codes_equal(rows.data, ref_q, f"{device} gathered")


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_non_finite_rows_are_nan(device):
    x = torch.randn(4, 32)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    rows = quantize_rows_fp8(x.to(device))
    s = rows.scale.cpu()
    assert torch.isnan(s[1]) and torch.isnan(s[2]) and torch.isfinite(s[[0, 3]]).all()
    w = FP8Tensor(rand_fp8((1, 8, 32), torch.Generator().manual_seed(0)).to(device), torch.tensor(0.1, device=device))
    for act in ("none", "relu2"):  # relu^2 keeps NaN (as torch.relu(x).square())
        with torch.no_grad():
            out = grouped_gemm(rows, w, offsets_from_counts([4], device), act, out_dtype=torch.float32).cpu()
        assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all() and torch.isfinite(out[[0, 3]]).all(), act
    assert torch.equal(rows.data.cpu().view(torch.uint8)[1, 5], torch.tensor(0x7f, dtype=torch.uint8)), "one NaN byte"
    # A zero or non-finite static scale: the CPU entry refuses it, CUDA kernels make the rows NaN.
    bad = torch.tensor(0.0, device=device)
    if device == "cpu":
        with pytest.raises(RuntimeError, match="positive and finite"):
            quantize_rows_fp8(x, bad)
    else:
        assert torch.isnan(quantize_rows_fp8(x.to(device), bad).scale).all()
    with pytest.raises(TypeError, match="FP8Tensor"):
        grouped_gemm(rows, torch.randn(1, 8, 32, device=device), offsets_from_counts([4], device))


# ---------------------------------------------------------------- the grouped GEMM

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("activation", ["none", "relu2"])
@pytest.mark.parametrize("per_expert", [True, False])
def test_gemm_matches_float64(device, dtype, activation, per_expert):
    for counts, N, K, lead in (([5, 0, 40, 1, 19], 24, 64, 0), ([3, 7], 20, 48, 2), ([130, 2, 0], 136, 128, 1)):
        aq, a_s, wq, w_s, offsets = gemm_case(counts, N, K, device, lead_rows=lead, per_expert=per_expert)
        poison_allocator(device)
        out = fp8_op(aq, a_s, wq, w_s, offsets, activation, dtype)
        check_gemm(out, aq, a_s, wq, w_s, offsets, activation, dtype, f"{device} {dtype} {activation} N={N} K={K}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("static", [False, True])
def test_public_api_quantizes_then_multiplies(device, static):
    """grouped_gemm(a, FP8Tensor) = quantize a's rows (dynamic, or w.input_scale; a per-expert input
    scale is reduced to its max), then the FP8 GEMM; the output keeps a's dtype."""
    g = torch.Generator().manual_seed(11)
    counts, N, K = [6, 0, 9], 32, 64
    offsets = offsets_from_counts(counts, device)
    a = torch.randn(15, K, generator=g).to(torch.bfloat16).to(device)
    wq = rand_fp8((3, N, K), g).to(device)
    w = FP8Tensor(wq, torch.tensor([0.02, 0.03, 0.01], device=device),
                  torch.tensor([0.01, 0.02, 0.015], device=device) if static else None)
    with torch.no_grad():
        out = grouped_gemm(a, w, offsets, "relu2")
    aq, a_s = quantize_ref(a, 0.02 if static else None)
    assert out.dtype == torch.bfloat16
    check_gemm(out, aq, a_s, wq.cpu(), w.scale.cpu(), offsets, "relu2", torch.bfloat16, f"{device} public")
    # One weight matrix (N, K) is one expert (the dense FP8 layers of a checkpoint).
    with torch.no_grad():
        dense = grouped_gemm(a, FP8Tensor(wq[0], w.scale[0], w.input_scale), offsets_from_counts([15], device))
    check_gemm(dense, aq, a_s, wq[:1].cpu(), w.scale[:1].cpu(), offsets_from_counts([15], "cpu"), "none",
               torch.bfloat16, f"{device} dense")


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_empty_and_no_gradient(device):
    aq, a_s, wq, w_s, offsets = gemm_case([9, 0, 33], 24, 64, device)
    a1 = fp8_op(aq, a_s, wq, w_s, offsets, "relu2", torch.bfloat16)
    assert torch.equal(a1, fp8_op(aq, a_s, wq, w_s, offsets, "relu2", torch.bfloat16))
    none = offsets_from_counts([0, 0, 0], device)
    z = fp8_op(aq, a_s, wq, w_s, none, "none", torch.bfloat16)
    assert torch.equal(z.cpu().float(), torch.zeros(aq.shape[0], 24))
    assert fp8_op(aq[:0], a_s[:0], wq, w_s, none, "none", torch.bfloat16).shape == (0, 24)
    a = torch.randn(4, 64, device=device, requires_grad=True)
    with pytest.raises(NotImplementedError, match="no gradient"):
        grouped_gemm(a, FP8Tensor(wq, w_s), offsets_from_counts([1, 1, 2], device))
    with pytest.raises(ValueError, match="out_dtype"):
        grouped_gemm(a.detach(), torch.randn(3, 8, 64, device=device), offsets_from_counts([1, 1, 2], device),
                     out_dtype=torch.bfloat16)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    aq, a_s, wq, w_s, offsets = gemm_case([4, 0, 6], 16, 32, device)
    # test_schema is left out as for the NVFP4 ops: its mutation check runs torch ops that have no
    # float8_e4m3fn CPU kernel; the schemas declare no mutation.
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    torch.library.opcheck(ops.grouped_gemm_fp8, (aq, a_s, wq, w_s, offsets, "relu2", torch.bfloat16, True),
                          test_utils=utils)
    x = torch.randn(6, 32, device=device)
    empty_i = torch.empty(0, dtype=torch.int32, device=device)
    torch.library.opcheck(ops.moe_quantize_fp8, (x, empty_i, 1, torch.empty(0, device=device)), test_utils=utils)
    slot = torch.tensor([0, 3, -1, 5, 2], dtype=torch.int32, device=device)
    torch.library.opcheck(ops.moe_quantize_fp8, (x, slot, 2, torch.tensor(0.1, device=device)), test_utils=utils)
    torch.library.opcheck(ops.moe_quantize_fp8, (x.repeat(1, 4), empty_i, 1, torch.empty(0, device=device), 128),
                          test_utils=utils)
    torch.library.opcheck(ops.grouped_gemm_fp8, (aq, a_s, wq, w_s, offsets, "relu2", E4M3, False,
                                                 torch.tensor(0.5, device=device)), test_utils=utils)
    seg = offsets_from_counts([2, 0, 3], device)
    gT, g_s = ops.moe_quantize_fp8_t(x[:5], seg)
    aT, at_s = ops.moe_quantize_fp8_t(torch.randn(5, 24, device=device), seg)
    torch.library.opcheck(ops.moe_quantize_fp8_t, (x[:5], seg), test_utils=utils)
    torch.library.opcheck(ops.grouped_gemm_fp8_wgrad, (gT, g_s, aT, at_s, seg, torch.float32), test_utils=utils)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_t_bad_inputs_raise(device):
    x = torch.randn(6, 16, device=device)
    seg = offsets_from_counts([2, 4], device)
    with pytest.raises(RuntimeError, match="x"):
        ops.moe_quantize_fp8_t(x.double(), seg)
    with pytest.raises(RuntimeError, match="x"):
        ops.moe_quantize_fp8_t(x[0], seg)
    with pytest.raises(RuntimeError, match="expert_offsets"):
        ops.moe_quantize_fp8_t(x, seg.long())
    if device == "cpu":  # offsets values are checked on the CPU (no host sync on CUDA)
        with pytest.raises(RuntimeError, match="expert_offsets"):
            ops.moe_quantize_fp8_t(x, torch.tensor([0, 4, 2], dtype=torch.int32))


GEMM_BAD = [
    ("a not fp8", lambda a, s, w, ws, o: (a.float(), s, w, ws, o), "a"),
    ("a_scale length", lambda a, s, w, ws, o: (a, s[:-1], w, ws, o), "a_scale"),
    ("a_scale dtype", lambda a, s, w, ws, o: (a, s.double(), w, ws, o), "a_scale"),
    ("w not fp8", lambda a, s, w, ws, o: (a, s, w.view(torch.uint8), ws, o), "w"),
    ("w K mismatch", lambda a, s, w, ws, o: (a, s, w[:, :, :16], ws, o), "w"),
    ("w_scale count", lambda a, s, w, ws, o: (a, s, w, torch.ones(2, device=a.device), o), "w_scale"),
    ("offsets length", lambda a, s, w, ws, o: (a, s, w, ws, o[:-1]), "expert_offsets"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,args,match", GEMM_BAD, ids=[b[0] for b in GEMM_BAD])
def test_gemm_bad_inputs_raise(device, name, args, match):
    aq, a_s, wq, w_s, offsets = gemm_case([4, 2, 6], 16, 32, device)
    with pytest.raises(RuntimeError, match=match):
        fp8_op(*args(aq, a_s, wq, w_s, offsets), "none", torch.bfloat16)
    with pytest.raises(RuntimeError, match="activation"):
        fp8_op(aq, a_s, wq, w_s, offsets, "gelu", torch.bfloat16)
    with pytest.raises(RuntimeError, match="out_dtype"):
        fp8_op(aq, a_s, wq, w_s, offsets, "none", torch.int32)


def test_quantize_bad_inputs_raise():
    x = torch.randn(4, 16)
    e = torch.empty(0)
    ei = torch.empty(0, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="x"):
        ops.moe_quantize_fp8(x.double(), ei, 1, e)
    with pytest.raises(RuntimeError, match="divide"):
        ops.moe_quantize_fp8(x, ei, 1, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(RuntimeError, match="slot_of_row"):  # a gathered row's expert is not its block
        ops.moe_quantize_fp8(x, torch.tensor([0, 1, 2, 3], dtype=torch.int32), 1, torch.tensor([0.1, 0.2]))
    with pytest.raises(RuntimeError, match="static_scale"):
        ops.moe_quantize_fp8(x, ei, 1, torch.full((2, 2), 0.1))
    with pytest.raises(RuntimeError, match="positive and finite"):
        ops.moe_quantize_fp8(x, ei, 1, torch.tensor(0.0))
    with pytest.raises(RuntimeError, match="slot_of_row"):
        ops.moe_quantize_fp8(x, torch.tensor([0, 8], dtype=torch.int32), 2, e)  # 8 >= T * top_k
    with pytest.raises(RuntimeError, match="top_k"):
        ops.moe_quantize_fp8(x, torch.tensor([0], dtype=torch.int32), 0, e)


@pytest.mark.parametrize("device", DEVICES)
def test_e4m3_output_at_a_static_scale(device):
    """out_dtype float8_e4m3fn with out_scale: codes = e4m3(relu2(v) / s), v the scaled float32 sum
    (one rounding). Dequantized, within an e4m3 half-step (2^-4 relative, saturating at 448 s) plus
    float32 accumulation of float64; rows outside every segment are 0 codes; bad combinations raise."""
    aq, a_s, wq, w_s, offsets = gemm_case([5, 0, 40, 1, 19], 32, 64, device, lead_rows=2)
    ref64 = gemm_ref(aq, a_s, wq, w_s, offsets, "relu2")
    scale = float(ref64.max()) / 448 / 2  # the largest values saturate, most do not
    s = torch.tensor(scale, device=device)
    codes, _ = ops.grouped_gemm_fp8(aq, a_s, wq, w_s, offsets, "relu2", E4M3, False, s)
    assert codes.dtype == E4M3 and codes.shape == (aq.shape[0], 32)
    ref = ref64 / float(s)
    got = codes.cpu().double()
    clipped = ref.clamp(max=448.0)
    assert ((got - clipped).abs() <= clipped.abs() * 2.0 ** -4 + 2.0 ** -10 + 1e-5 * ref.abs()).all()
    assert (ref > 448).any() and (got[ref > 448] == 448).all(), "saturates"
    assert (got[:2] == 0).all() and (got[int(offsets[-1]):] == 0).all()
    # a NaN row gives NaN codes (0x7f) after relu^2
    a_nan = a_s.clone()
    a_nan[3] = float("nan")
    codes_nan = ops.grouped_gemm_fp8(aq, a_nan, wq, w_s, offsets, "relu2", E4M3, False, s)[0].cpu().view(torch.uint8)
    assert (codes_nan[3] == 0x7f).all() and torch.equal(codes_nan[4], codes.cpu().view(torch.uint8)[4])
    # the public API: FP8Rows at that scale, fed to the next FP8 GEMM
    w = FP8Tensor(wq, w_s)
    rows = grouped_gemm(FP8Rows(aq, a_s), w, offsets, "relu2", out_dtype=E4M3, out_scale=s)
    assert isinstance(rows, FP8Rows) and torch.equal(rows.data.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(rows.scale.cpu(), torch.full((aq.shape[0],), float(s)))
    with pytest.raises(RuntimeError, match="out_scale"):
        ops.grouped_gemm_fp8(aq, a_s, wq, w_s, offsets, "relu2", E4M3, False)
    with pytest.raises(RuntimeError, match="out_scale"):
        ops.grouped_gemm_fp8(aq, a_s, wq, w_s, offsets, "relu2", torch.bfloat16, False, s)
    with pytest.raises(RuntimeError, match="pre-activation"):
        ops.grouped_gemm_fp8(aq, a_s, wq, w_s, offsets, "relu2", E4M3, True, s)
    with pytest.raises(ValueError, match="out_scale"):
        grouped_gemm(FP8Rows(aq, a_s), w, offsets, "relu2", out_dtype=E4M3)


@pytest.mark.parametrize("device", DEVICES)
def test_expert_mlp_fuses_the_down_input_quantization(device):
    """FP8 up and down with a static down input_scale: expert_mlp has the up GEMM write e4m3 rows
    (no bf16 intermediate). Its result equals the two GEMMs called that way, and stays near the
    unfused path (bf16 intermediate, then quantized: one more rounding)."""
    from nemokernels.moe.layer import expert_mlp

    g = torch.Generator().manual_seed(13)
    offsets = offsets_from_counts([7, 0, 12], device)
    x = torch.randn(19, 64, generator=g).bfloat16().to(device)
    up = fp8_weights(torch.randn(3, 48, 64, generator=g).to(device) / 8, transpose=False)
    down = fp8_weights(torch.randn(3, 64, 48, generator=g).to(device) / 7, transpose=False)
    down.input_scale = torch.tensor(0.01, device=device)
    with torch.no_grad():
        fused = expert_mlp(x, up, down, offsets)
        h = grouped_gemm(x, up, offsets, "relu2", out_dtype=E4M3, out_scale=down.input_scale)
        assert torch.equal(fused, grouped_gemm(h, down, offsets, out_dtype=torch.bfloat16))
        unfused = grouped_gemm(grouped_gemm(x, up, offsets, "relu2"), down, offsets)
    assert fused.dtype == torch.bfloat16
    assert torch.linalg.norm((fused - unfused).float()) <= 0.05 * torch.linalg.norm(unfused.float())


# ---------------------------------------------------------------- per-block (128 x 128) scales

def block_quantize_ref(x):
    """A dynamic scale per row and 128-column block: scale = amax / 448 (1 for zeros), codes by
    torch's float8 cast of the clamped quotient."""
    xf = x.float().cpu()
    R, K = xf.shape
    blocks = xf.view(R, K // 128, 128)
    amax = blocks.abs().amax(dim=2)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / 448.0)
    q = (blocks / scale[:, :, None]).clamp(-448, 448).to(E4M3).view(R, K)
    return q, scale


def block_gemm_ref(aq, a_scale, w, offsets, activation):
    """float64 of the per-block operands: a_hat[r, k] = aq * a_scale[r, k // 128], w dequantized."""
    a = aq.cpu().double() * a_scale.cpu().double().repeat_interleave(128, dim=1)
    wd = w.dequantize().double().cpu()
    out = torch.zeros(aq.shape[0], w.data.shape[1], dtype=torch.float64)
    offs = offsets.cpu().tolist()
    for e in range(w.data.shape[0]):
        y = a[offs[e]:offs[e + 1]] @ wd[e].T
        out[offs[e]:offs[e + 1]] = torch.relu(y).square() if activation == "relu2" else y
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_block_quantize_rows_matches_torch(device, dtype):
    g = torch.Generator().manual_seed(51)
    x = (torch.randn(9, 384, generator=g) * torch.logspace(-3, 3, 384)).to(dtype)
    x[2, 128:256] = 0  # a zero block: scale 1
    rows = quantize_rows_fp8(x.to(device), block=128)
    ref_q, ref_s = block_quantize_ref(x)
    assert rows.scale.shape == (9, 3)
    assert torch.equal(rows.scale.cpu(), ref_s)
    assert_codes_equal(rows.data, ref_q, f"{device} {dtype} per-block")
    with pytest.raises(RuntimeError, match="K % 128"):
        quantize_rows_fp8(x[:, :200].to(device), block=128)
    with pytest.raises(RuntimeError, match="dynamic"):
        quantize_rows_fp8(x.to(device), torch.tensor(0.1), block=128)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["none", "relu2"])
def test_block_scaled_gemm_matches_float64(device, activation):
    """Per-block weights (a scale per 128 x 128 block, N not a multiple of 128) and per-block rows:
    against float64 of the same quantized operands; the public API quantizes the rows per block."""
    g = torch.Generator().manual_seed(52)
    counts, N, K = [5, 0, 40, 1, 19], 300, 384
    offsets = offsets_from_counts(counts, device) + 2
    R = int(offsets[-1]) + 3
    # block scales spread over 2^-6 .. 2^6 (a transposed or misplaced scale is far off, not 5% off)
    x = (torch.randn(R, K, generator=g) * 2.0 ** torch.randint(-6, 7, (R, 3), generator=g).repeat_interleave(128, 1))
    x = x.bfloat16()
    wb = 2.0 ** torch.randint(-6, 7, (5, 3, 3), generator=g).float()
    w = fp8_block_weights((torch.randn(5, N, K, generator=g) * wb.repeat_interleave(128, 1)[:, :N].repeat_interleave(
        128, 2)).to(device))
    assert w.blockwise and w.scale.shape == (5, 3, 3)
    poison_allocator(device)
    with torch.no_grad():
        out = grouped_gemm(x.to(device), w, offsets, activation)
    aq, a_s = block_quantize_ref(x)
    ref = block_gemm_ref(aq, a_s, w, offsets, activation)
    assert out.dtype == torch.bfloat16
    assert_close(out.cpu(), ref, torch.bfloat16, factor=2.0 if activation == "relu2" else 1.0, what=f"{device} block")
    assert torch.equal(out[:2].cpu().float(), torch.zeros(2, N)) and torch.equal(out[-3:].cpu().float(), torch.zeros(3, N))
    with pytest.raises(RuntimeError, match="a_scale"):
        rows = quantize_rows_fp8(x.to(device), block=128)
        ops.grouped_gemm_fp8(rows.data, rows.scale[:, :1], w.data, w.scale, offsets, activation, torch.bfloat16, False)
    with pytest.raises(ValueError, match="per-block"):
        grouped_gemm(quantize_rows_fp8(x.to(device)), w, offsets, activation)


def test_fp8_block_weights_round_trip():
    g = torch.Generator().manual_seed(55)
    w = torch.randn(2, 200, 256, generator=g)
    w[0, :128, :128] = 0  # a zero block: scale 1
    w[1, 128:, 128:] *= 1e-3  # the partial last N block with its own small scale
    f = fp8_block_weights(w)
    assert float(f.scale[0, 0, 0]) == 1.0 and float(f.scale[1, 1, 1]) < 1e-4
    back = f.dequantize()
    full = f.scale.repeat_interleave(128, 1)[:, :200].repeat_interleave(128, 2)
    # e4m3: half a step, 2^-4 relative in the normal range, 2^-10 of the block scale below it
    assert ((back - w).abs() <= w.abs() * 2.0 ** -4 + full * 2.0 ** -10).all()
    bad = w.clone()
    bad[1, 5, 5] = float("inf")
    assert torch.isnan(fp8_block_weights(bad).scale[1, 0, 0])


@pytest.mark.parametrize("device", DEVICES)
def test_layer_with_block_scaled_and_mixed_fp8_experts(device):
    """latent_moe with per-block FP8 experts (the gather quantizes per block), and expert_mlp with a
    per-block up projection next to a per-tensor down projection that has a static input scale
    (no e4m3 epilogue there: per-block GEMMs write 16-bit rows): both near the bf16 result."""
    from nemokernels.moe import latent_moe
    from nemokernels.moe.layer import expert_mlp

    g = torch.Generator().manual_seed(56)
    T, d, F, E, k = 7, 128, 256, 4, 2
    x = torch.randn(T, d, generator=g).bfloat16().to(device)
    gate = torch.randn(E, d, generator=g).to(device)
    up16 = (torch.randn(E, F, d, generator=g) / d ** 0.5).to(device)
    down16 = (torch.randn(E, d, F, generator=g) / F ** 0.5).to(device)
    with torch.no_grad():
        ref = latent_moe(x, gate, None, up16.bfloat16(), down16.bfloat16(), top_k=k).float()
        out = latent_moe(x, gate, None, fp8_block_weights(up16), fp8_block_weights(down16), top_k=k).float()
        assert torch.linalg.norm(out - ref) <= 0.1 * torch.linalg.norm(ref)
        offsets = offsets_from_counts([3, 0, 4], device)
        down = fp8_weights(down16[:3], transpose=False)
        down.input_scale = torch.tensor(0.02, device=device)
        mixed = expert_mlp(x, fp8_block_weights(up16[:3]), down, offsets).float()
        want = expert_mlp(x, up16[:3].bfloat16(), down16[:3].bfloat16(), offsets).float()
        assert torch.linalg.norm(mixed - want) <= 0.1 * torch.linalg.norm(want)


# ---------------------------------------------------------------- FP8 training: operands, wgrad, autograd

def start16(lo, e):
    return (lo + 15) // 16 * 16 + 16 * e


def quantize_t_ref(x, offsets):
    """moe_quantize_fp8_t by torch: per column c, scale = amax over the rows of every segment / 448
    (1 for zeros); codes of expert e's rows at columns start16(lo_e, e) + i; zeros elsewhere."""
    xf, offs = x.float().cpu(), offsets.cpu().tolist()
    R, C, E = xf.shape[0], xf.shape[1], len(offs) - 1
    inside = torch.zeros(R, dtype=torch.bool)
    for e in range(E):
        inside[offs[e]:offs[e + 1]] = True
    amax = xf[inside].abs().amax(dim=0) if inside.any() else torch.zeros(C)
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / 448.0)
    W = (R + 15) // 16 * 16 + 16 * E
    qT = torch.zeros(C, W, dtype=torch.uint8)
    for e in range(E):
        lo, hi = offs[e], offs[e + 1]
        if hi > lo:
            codes = (xf[lo:hi] / scale).clamp(-448, 448).to(E4M3).view(torch.uint8)
            qT[:, start16(lo, e): start16(lo, e) + hi - lo] = codes.T
    return qT.view(E4M3), scale


def wgrad_ref(gT, g_scale, aT, a_scale, offsets):
    offs = offsets.cpu().tolist()
    E, N, K = len(offs) - 1, gT.shape[0], aT.shape[0]
    dw = torch.zeros(E, N, K, dtype=torch.float64)
    g, a = gT.cpu().double() * g_scale.cpu().double()[:, None], aT.cpu().double() * a_scale.cpu().double()[:, None]
    for e in range(E):
        s, m = start16(offs[e], e), offs[e + 1] - offs[e]
        dw[e] = g[:, s:s + m] @ a[:, s:s + m].T
    return dw


def test_transposed_layout_segments_are_aligned_disjoint_and_inside():
    """start16 / padded16_width, as a property of the formula (the kernels and the references all
    use it): for random monotone offsets every segment starts on a multiple of 16, none overlaps
    the next, and all fit in the width."""
    g = torch.Generator().manual_seed(24)
    for _ in range(500):
        E = int(torch.randint(1, 40, (1,), generator=g))
        counts = torch.randint(0, 50, (E,), generator=g) * torch.randint(0, 2, (E,), generator=g)
        offs = [int(torch.randint(0, 20, (1,), generator=g))]
        for c in counts.tolist():
            offs.append(offs[-1] + c)
        R = offs[-1] + int(torch.randint(0, 20, (1,), generator=g))
        W = (R + 15) // 16 * 16 + 16 * E
        end = 0
        for e in range(E):
            s, m = start16(offs[e], e), offs[e + 1] - offs[e]
            assert s % 16 == 0 and s >= end and s + m <= W, (offs, e)
            end = s + m


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantize_t_matches_torch(device, dtype):
    g = torch.Generator().manual_seed(21)
    for counts, lead, extra, C in (([5, 0, 17, 1], 3, 2, 24), ([40, 33], 0, 0, 70), ([0, 0], 1, 1, 8)):
        offsets = offsets_from_counts(counts, device) + lead
        R = int(offsets[-1]) + extra
        x = (torch.randn(R, C, generator=g) * torch.logspace(-3, 2, C)).to(dtype)
        x[:lead] = 1e6  # rows of no segment take no part in the scales
        x[R - extra:] = -1e6
        poison_allocator(device)
        qT, scale = ops.moe_quantize_fp8_t(x.to(device), offsets)
        ref_q, ref_s = quantize_t_ref(x, offsets)
        assert qT.shape == ref_q.shape and qT.dtype == E4M3
        assert torch.equal(scale.cpu(), ref_s), f"{device} {dtype} {counts}: scales"
        assert torch.equal(qT.cpu().view(torch.uint8), ref_q.view(torch.uint8)), f"{device} {dtype} {counts}: codes"


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_rows_block_static_scales(device):
    """static_scale with S values: row r takes static_scale[r // (R / S)] (fp8_weights' per-expert
    scales over (E * N, K) rows)."""
    x = torch.randn(12, 32)
    s = torch.tensor([0.01, 0.02, 0.004])
    rows = ops.moe_quantize_fp8(x.to(device), torch.empty(0, dtype=torch.int32, device=device), 1, s.to(device))
    ref = torch.cat([quantize_ref(x[4 * i: 4 * i + 4], float(s[i]))[0].view(torch.uint8) for i in range(3)])
    assert torch.equal(rows[0].cpu().view(torch.uint8), ref)
    assert torch.equal(rows[1].cpu(), s.repeat_interleave(4))
    with pytest.raises(RuntimeError, match="divide"):
        ops.moe_quantize_fp8(x, torch.empty(0, dtype=torch.int32), 1, torch.ones(5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_wgrad_matches_float64(device, out_dtype):
    g = torch.Generator().manual_seed(22)
    counts, N, K = [7, 0, 33, 1, 18], 24, 40
    offsets = offsets_from_counts(counts, device) + 2
    R = int(offsets[-1]) + 3
    gT, g_s = ops.moe_quantize_fp8_t(torch.randn(R, N, generator=g).to(device), offsets)
    aT, a_s = ops.moe_quantize_fp8_t(torch.randn(R, K, generator=g).to(device), offsets)
    poison_allocator(device)
    dw = ops.grouped_gemm_fp8_wgrad(gT, g_s, aT, a_s, offsets, out_dtype)
    ref = wgrad_ref(gT, g_s, aT, a_s, offsets)
    assert dw.shape == (5, N, K) and dw.dtype == out_dtype
    assert_close(dw.cpu(), ref, out_dtype, what=f"{device} wgrad")
    assert torch.equal(dw[1].cpu().float(), torch.zeros(N, K)), "an expert without rows has dw = 0"
    with pytest.raises(RuntimeError, match="padded16_width"):
        ops.grouped_gemm_fp8_wgrad(gT[:, :-1], g_s, aT[:, :-1], a_s, offsets, out_dtype)
    with pytest.raises(RuntimeError, match="aT"):
        ops.grouped_gemm_fp8_wgrad(gT, g_s, aT[:, :-16], a_s, offsets, out_dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_keeps_the_pre_activation(device):
    aq, a_s, wq, w_s, offsets = gemm_case([5, 0, 9], 24, 64, device, lead_rows=1)
    out, pre = ops.grouped_gemm_fp8(aq, a_s, wq, w_s, offsets, "relu2", torch.bfloat16, True)
    assert torch.equal(out, fp8_op(aq, a_s, wq, w_s, offsets, "relu2", torch.bfloat16))
    assert torch.equal(pre, fp8_op(aq, a_s, wq, w_s, offsets, "none", torch.bfloat16)), "pre = the unactivated output"
    assert ops.grouped_gemm_fp8(aq, a_s, wq, w_s, offsets, "none", torch.bfloat16, True)[1].shape == (0, 24)


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_weights(device):
    w = torch.randn(3, 16, 32, dtype=torch.bfloat16) * torch.tensor([1.0, 1e-3, 0.0])[:, None, None].bfloat16()
    f = fp8_weights(w.to(device))
    amax = w.float().abs().amax(dim=(1, 2))
    assert torch.equal(f.scale.cpu(), torch.where(amax == 0, torch.ones(3), amax / 448))
    for e in range(3):
        assert torch.equal(f.data[e].cpu().view(torch.uint8),
                           quantize_ref(w[e], float(f.scale[e]))[0].view(torch.uint8))
    assert torch.equal(f.data_t.cpu().view(torch.uint8), f.data.cpu().view(torch.uint8).transpose(1, 2))
    tiny = fp8_weights(torch.full((1, 16, 16), 1e-42).to(device), transpose=False)
    assert tiny.data_t is None and float(tiny.scale) == torch.finfo(torch.float32).tiny, "at least the smallest normal"
    assert torch.isfinite(tiny.data.float()).all()
    bad = w.clone()
    bad[1, 2, 3] = float("inf")
    if device == "cpu":
        with pytest.raises(ValueError, match="expert 1 has non-finite"):
            fp8_weights(bad)
    else:
        f = fp8_weights(bad.to(device))
        assert torch.isnan(f.scale[1]) and torch.isfinite(f.scale[[0, 2]]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", ["none", "relu2"])
def test_training_forward_and_backward(device, activation):
    """grouped_gemm_fp8_training against float64 of the same quantized operands: the forward
    (rows per-row scaled, weights per expert), dgrad (g's rows per-row scaled, w's codes), wgrad
    (g and a column-scaled over the segments' rows); and near the exact bf16 gradients (FP8
    rounding: a few percent)."""
    g = torch.Generator().manual_seed(23)
    counts, N, K = [6, 0, 21, 3], 32, 48
    offsets = offsets_from_counts(counts, device) + 1
    R = int(offsets[-1]) + 2
    a = torch.randn(R, K, generator=g).bfloat16().to(device).requires_grad_()
    w = (torch.randn(4, N, K, generator=g) / K ** 0.5).to(device).requires_grad_()  # float32 master weights
    dout = torch.randn(R, N, generator=g).bfloat16().to(device)
    out = grouped_gemm_fp8_training(a, w, offsets, activation)
    da, dw = torch.autograd.grad(out, (a, w), dout)
    # float64 of the quantized operands
    fw = fp8_weights(w)
    aq, a_s = quantize_ref(a.detach())
    fwd = gemm_ref(aq, a_s, fw.data.cpu(), fw.scale.cpu(), offsets, activation)
    assert_close(out.cpu(), fwd, torch.bfloat16, factor=2.0, what="forward")
    pre = gemm_ref(aq, a_s, fw.data.cpu(), fw.scale.cpu(), offsets, "none").bfloat16()
    gg = (dout.float().cpu() * 2 * torch.relu(pre.float())).bfloat16() if activation == "relu2" else dout.cpu()
    inside = torch.zeros(R, 1)
    inside[int(offsets[0]):int(offsets[-1])] = 1
    gq, g_s = quantize_ref(gg)
    da_ref = gemm_ref(gq, g_s, fw.data_t.cpu(), fw.scale.cpu(), offsets, "none")
    assert_close(da.cpu(), da_ref, torch.bfloat16, what="dgrad")
    gT, gts = quantize_t_ref(gg, offsets)
    aT, ats = quantize_t_ref(a.detach(), offsets)
    assert_close(dw.cpu(), wgrad_ref(gT, gts, aT, ats, offsets), torch.float32, what="wgrad")
    assert dw.dtype == torch.float32 and da.dtype == torch.bfloat16
    # near the unquantized gradients
    a64, w64 = a.detach().double().cpu().requires_grad_(), w.detach().double().cpu().requires_grad_()
    offs = offsets.cpu().tolist()
    ys = []
    for e in range(4):
        y = a64[offs[e]:offs[e + 1]] @ w64[e].T
        ys.append(torch.relu(y).square() if activation == "relu2" else y)
    full = torch.zeros(R, N, dtype=torch.float64)
    full[offs[0]:offs[-1]] = torch.cat(ys)
    ea, ew = torch.autograd.grad(full, (a64, w64), dout.double().cpu())
    for got, want, name in ((da, ea, "da"), (dw, ew, "dw")):
        err = torch.linalg.norm(got.double().cpu() - want) / torch.linalg.norm(want)
        assert err < 0.08, f"{name}: FP8 gradient {err:.3f} from the exact one"
    # Without a gradient to compute: the forward alone, the same output.
    with torch.no_grad():
        assert torch.equal(grouped_gemm_fp8_training(a, w, offsets, activation), out.detach())
    # Only one of the gradients asked for.
    a_only = grouped_gemm_fp8_training(a, w.detach(), offsets, activation)
    assert torch.equal(torch.autograd.grad(a_only, a, dout)[0], da)
    w_only = grouped_gemm_fp8_training(a.detach(), w, offsets, activation)
    assert torch.equal(torch.autograd.grad(w_only, w, dout)[0], dw)
    with pytest.raises(ValueError, match="E, N, K"):
        grouped_gemm_fp8_training(a, w[0], offsets[:2], activation)


# ---------------------------------------------------------------- the portable CUDA kernels, emulated

@functools.cache
def emu():
    return _emu_base.EmuLibrary.build("moe_fp8", _emu_base.EMU / "driver_moe_fp8.cpp",
                                      [_emu_base.CSRC / "moe" / "grouped_gemm_fp8_cuda.cu"], ("moe", "nvfp4"),
                                      header=_emu_base.CSRC / "moe" / "grouped_gemm.h",
                                      structs=("GroupedGemmFp8Params", "QuantizeFp8Params", "QuantizeFp8TParams",
                                               "GroupedGemmFp8WgradParams"))


def test_emulated_params_layout():
    emu().check_layouts()


DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("activation", ["none", "relu2"])
def test_emulated_portable_gemm(dtype, activation):
    """The zero fill and the SIMT kernel (4 token rows per pass: segments of 5, 1 and 7 rows test
    the partial pass) over NaN-poisoned outputs, against float64."""
    aq, a_s, wq, w_s, offsets = gemm_case([5, 0, 1, 7], 24, 48, "cpu", lead_rows=2, per_expert=(activation == "none"))
    out = torch.full((aq.shape[0], 24), float("nan"), dtype=dtype)
    lib = emu()
    p = lib.S["GroupedGemmFp8Params"]()
    p.dtype, p.R, p.N, p.K, p.E = DT[dtype], aq.shape[0], 24, 48, 4
    p.offsets, p.a, p.a_scale, p.w = offsets.data_ptr(), aq.data_ptr(), a_s.data_ptr(), wq.data_ptr()
    p.w_scale, p.w_scale_stride = w_s.data_ptr(), 1 if w_s.numel() > 1 else 0
    pre = torch.full((aq.shape[0], 24), float("nan"), dtype=dtype)
    p.act, p.out, p.arch = (1 if activation == "relu2" else 0), out.data_ptr(), 0
    p.pre = pre.data_ptr() if activation == "relu2" else 0
    lib.call("emu_fp8_gemm_cuda", p)
    check_gemm(out, aq, a_s, wq, w_s, offsets, activation, dtype, f"emulated {dtype} {activation}")
    cpu, cpu_pre = ops.grouped_gemm_fp8(aq, a_s, wq, w_s, offsets, activation, dtype, True)
    # the portable kernel and the CPU kernel sum in the same order: bit-identical
    assert torch.equal(out.view(torch.uint8), cpu.view(torch.uint8))
    if activation == "relu2":
        assert torch.equal(pre.view(torch.uint8), cpu_pre.view(torch.uint8)), "pre-activation"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("K", [64, 40])  # vector path (16-byte loads, 8-byte code stores) and element path
@pytest.mark.parametrize("gather,static", [(False, False), (True, False), (True, True)])
def test_emulated_quantize(dtype, K, gather, static):
    """Codes and scales bit-identical to the CPU kernel (which matches torch above), over poisoned
    outputs; gathered rows with padding, and more rows than one block's warps."""
    g = torch.Generator().manual_seed(9)
    T, k = 13, 2
    x = (torch.randn(T, K, generator=g) * 3).to(dtype)
    x[4] = 0
    slot = torch.randperm(T * k, generator=g)[:20].int()
    slot[3] = slot[11] = -1
    static_t = torch.tensor(0.02)
    ref_q, ref_s = ops.moe_quantize_fp8(x, slot if gather else torch.empty(0, dtype=torch.int32), k,
                                        static_t if static else torch.empty(0))
    R = slot.shape[0] if gather else T
    q = torch.full((R, K), 0x7f, dtype=torch.uint8)
    s = torch.full((R,), float("nan"))
    lib = emu()
    p = lib.S["QuantizeFp8Params"]()
    p.dtype, p.T, p.R, p.K = DT[dtype], T, R, K
    p.x, p.slot_of_row, p.top_k = x.data_ptr(), (slot.data_ptr() if gather else 0), k if gather else 1
    p.static_scale, p.rows_per_scale = (static_t.data_ptr() if static else 0), R
    p.q, p.scale = q.data_ptr(), s.data_ptr()
    lib.call("emu_fp8_quantize_cuda", p)
    assert torch.equal(q, ref_q.view(torch.uint8)), "codes"
    assert torch.equal(s, ref_s), "scales"


def test_emulated_portable_block_scaled():
    """The per-block row quantizer and the per-block portable GEMM bit-identical to the CPU kernels."""
    g = torch.Generator().manual_seed(53)
    offsets = offsets_from_counts([5, 0, 7, 2], "cpu") + 1
    R, N, K = int(offsets[-1]) + 2, 136, 256
    x = torch.randn(R, K, generator=g).bfloat16()
    ref_q, ref_s = ops.moe_quantize_fp8(x, torch.empty(0, dtype=torch.int32), 1, torch.empty(0), 128)
    q = torch.full((R, K), 0x7f, dtype=torch.uint8)
    sc = torch.full((R, 2), float("nan"))
    lib = emu()
    qp = lib.S["QuantizeFp8Params"]()
    qp.dtype, qp.T, qp.R, qp.K, qp.x, qp.top_k, qp.block = 2, R, R, K, x.data_ptr(), 1, 128
    qp.q, qp.scale = q.data_ptr(), sc.data_ptr()
    lib.call("emu_fp8_quantize_cuda", qp)
    assert torch.equal(q, ref_q.view(torch.uint8)) and torch.equal(sc, ref_s)
    w = fp8_block_weights(torch.randn(4, N, K, generator=g))
    ref = ops.grouped_gemm_fp8(ref_q, ref_s, w.data, w.scale, offsets, "relu2", torch.bfloat16, False)[0]
    out = torch.full((R, N), float("nan"), dtype=torch.bfloat16)
    p = lib.S["GroupedGemmFp8Params"]()
    p.dtype, p.R, p.N, p.K, p.E, p.block = 2, R, N, K, 4, 128
    p.offsets, p.a, p.a_scale, p.w, p.w_scale = offsets.data_ptr(), ref_q.data_ptr(), ref_s.data_ptr(), \
        w.data.data_ptr(), w.scale.data_ptr()
    p.act, p.out, p.arch = 1, out.data_ptr(), 0
    lib.call("emu_fp8_gemm_cuda", p)
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8)), "bit-identical to the CPU kernel"


def test_emulated_portable_gemm_e4m3_output():
    aq, a_s, wq, w_s, offsets = gemm_case([5, 0, 1, 7], 32, 48, "cpu", lead_rows=2)
    s = torch.tensor(0.002)
    ref, _ = ops.grouped_gemm_fp8(aq, a_s, wq, w_s, offsets, "relu2", E4M3, False, s)
    out = torch.full((aq.shape[0], 32), 0x7f, dtype=torch.uint8)
    lib = emu()
    p = lib.S["GroupedGemmFp8Params"]()
    p.dtype, p.R, p.N, p.K, p.E = 4, aq.shape[0], 32, 48, 4
    p.offsets, p.a, p.a_scale, p.w = offsets.data_ptr(), aq.data_ptr(), a_s.data_ptr(), wq.data_ptr()
    p.w_scale, p.w_scale_stride = w_s.data_ptr(), 1
    p.act, p.out, p.pre, p.out_scale, p.arch = 1, out.data_ptr(), 0, s.data_ptr(), 0
    lib.call("emu_fp8_gemm_cuda", p)
    assert torch.equal(out, ref.view(torch.uint8)), "bit-identical to the CPU kernel"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_emulated_quantize_t(dtype):
    """The column amax (three row chunks, the largest value in the last), the scales and the 64 x 64
    transpose tiles (rows of several experts in one tile, rows of no expert, a partial last tile)
    bit-identical to the CPU kernel, over a poisoned output."""
    g = torch.Generator().manual_seed(31)
    offsets = offsets_from_counts([30, 0, 1300, 1, 1150], "cpu") + 5  # rows in three 1024-row amax chunks
    R, C = int(offsets[-1]) + 9, 70
    x = (torch.randn(R, C, generator=g) * 4).to(dtype)
    x[2200, 3] = 1e3  # a column's amax in the last chunk
    ref_q, ref_s = ops.moe_quantize_fp8_t(x, offsets)
    W = ref_q.shape[1]
    qT = torch.full((C, W), 0x7f, dtype=torch.uint8)
    scale = torch.full((C,), float("nan"))
    partial = torch.full(((R + 1023) // 1024, C), float("nan"))
    lib = emu()
    p = lib.S["QuantizeFp8TParams"]()
    p.dtype, p.R, p.C, p.E, p.W = DT[dtype], R, C, 5, W
    p.offsets, p.x, p.qT, p.scale, p.partial = offsets.data_ptr(), x.data_ptr(), qT.data_ptr(), scale.data_ptr(), \
        partial.data_ptr()
    lib.call("emu_fp8_quantize_t_cuda", p)
    assert torch.equal(scale, ref_s), "scales"
    assert torch.equal(qT, ref_q.view(torch.uint8)), "codes"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_emulated_portable_wgrad(dtype):
    g = torch.Generator().manual_seed(32)
    offsets = offsets_from_counts([7, 0, 19, 2], "cpu") + 3
    R, N, K = int(offsets[-1]) + 1, 12, 136
    gT, g_s = ops.moe_quantize_fp8_t(torch.randn(R, N, generator=g), offsets)
    aT, a_s = ops.moe_quantize_fp8_t(torch.randn(R, K, generator=g), offsets)
    ref = ops.grouped_gemm_fp8_wgrad(gT, g_s, aT, a_s, offsets, dtype)
    dw = torch.full((4, N, K), float("nan"), dtype=dtype)
    lib = emu()
    p = lib.S["GroupedGemmFp8WgradParams"]()
    p.dtype, p.R, p.N, p.K, p.E, p.W = DT[dtype], gT.shape[1] - 64, N, K, 4, gT.shape[1]
    p.offsets, p.gT, p.g_scale, p.aT, p.a_scale = offsets.data_ptr(), gT.data_ptr(), g_s.data_ptr(), aT.data_ptr(), \
        a_s.data_ptr()
    p.dw, p.arch = dw.data_ptr(), 0
    lib.call("emu_fp8_wgrad_cuda", p)
    assert torch.equal(dw.view(torch.uint8), ref.view(torch.uint8)), "bit-identical to the CPU kernel"


# ---------------------------------------------------------------- the sm_90a kernel on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["none", "relu2"])
@pytest.mark.parametrize("counts,N,K", [([3, 0, 1, 70, 7, 0, 2, 300], 264, 1024),  # partial tiles, empty experts
                                        ([300, 1, 0, 129], 136, 144),             # K not a multiple of 128
                                        ([2] * 64, 2688, 1024)])                  # decode-sized: 64 experts
def test_sm90_kernel_and_the_portable_one(monkeypatch, activation, counts, N, K):
    """On an H100/H200 (sm_90a build) bf16 outputs take the CUTLASS FP8 kernel (the profiler shows
    its FP8 mainloop), which matches float64 of the quantized operands and the portable kernel
    within float32-accumulation noise, is bit for bit repeatable, and leaves rows outside every
    segment zero."""
    aq, a_s, wq, w_s, offsets = gemm_case(counts, N, K, "cuda", lead_rows=3, extra_rows=5)
    poison_allocator("cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = fp8_op(aq, a_s, wq, w_s, offsets, activation, torch.bfloat16)
        torch.cuda.synchronize()
    again = fp8_op(aq, a_s, wq, w_s, offsets, activation, torch.bfloat16)
    monkeypatch.setenv("NEMOKERNELS_GROUPED_GEMM_PORTABLE", "1")
    portable = fp8_op(aq, a_s, wq, w_s, offsets, activation, torch.bfloat16)
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("MainloopSm90ArrayTmaGmmaWarpSpecializedFP8" in n for n in names), names
    assert torch.equal(out, again)
    check_gemm(out, aq, a_s, wq, w_s, offsets, activation, torch.bfloat16, f"sm90 {activation}")
    check_gemm(portable, aq, a_s, wq, w_s, offsets, activation, torch.bfloat16, f"portable {activation}")


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("counts,N,K", [([3, 0, 1, 70, 7, 0, 2, 300], 264, 1024),  # segments not 16-aligned
                                        ([2] * 64, 1024, 2688)])                  # decode-sized: 64 experts
def test_sm90_wgrad_and_the_portable_one(monkeypatch, out_dtype, counts, N, K):
    """The CUTLASS FP8 wgrad (kWgradT on the padded transposed operands; the profiler shows the FP8
    mainloop) matches float64 and the portable kernel, zeroes empty experts, is bit-repeatable."""
    g = torch.Generator().manual_seed(41)
    offsets = offsets_from_counts(counts, "cuda") + 5
    R = int(offsets[-1]) + 3
    gT, g_s = ops.moe_quantize_fp8_t(torch.randn(R, N, generator=g).cuda(), offsets)
    aT, a_s = ops.moe_quantize_fp8_t(torch.randn(R, K, generator=g).cuda(), offsets)
    poison_allocator("cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        dw = ops.grouped_gemm_fp8_wgrad(gT, g_s, aT, a_s, offsets, out_dtype)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("MainloopSm90ArrayTmaGmmaWarpSpecializedFP8" in n for n in names), names
    assert torch.equal(dw, ops.grouped_gemm_fp8_wgrad(gT, g_s, aT, a_s, offsets, out_dtype))
    ref = wgrad_ref(gT, g_s, aT, a_s, offsets)
    # Hopper's FP8 wgmma keeps ~14 mantissa bits inside a 128-deep promotion interval: bound the
    # error by the magnitudes it sums (|g| |a|^T), not by float32 rounding.
    mag = wgrad_ref(gT.float().abs().to(E4M3), g_s.abs(), aT.float().abs().to(E4M3), a_s.abs(), offsets)
    tol = 2.0 ** -11 + (2.0 ** -8 if out_dtype == torch.bfloat16 else 0.0)
    assert_close_to_magnitude(dw.cpu(), ref, mag, tol, what="sm90 wgrad")
    monkeypatch.setenv("NEMOKERNELS_GROUPED_GEMM_PORTABLE", "1")
    assert_close(ops.grouped_gemm_fp8_wgrad(gT, g_s, aT, a_s, offsets, out_dtype).cpu(), ref, out_dtype,
                 what="portable wgrad")


@pytest.mark.gpu
def test_sm90_training_matches_the_cpu():
    """grouped_gemm_fp8_training on CUDA (sm_90a: the forward with pre, dgrad on w's transposed
    codes, the wgrad) against the CPU kernels on the same inputs: quantized operands bit-identical,
    outputs and gradients within float32-accumulation noise."""
    g = torch.Generator().manual_seed(42)
    counts, N, K = [40, 0, 130, 7], 256, 512
    offsets = offsets_from_counts(counts, "cpu")
    R = int(offsets[-1])
    a = torch.randn(R, K, generator=g).bfloat16()
    w = torch.randn(4, N, K, generator=g) / K ** 0.5
    dout = torch.randn(R, N, generator=g).bfloat16()
    res = {}
    for dev in ("cpu", "cuda"):
        ad, wd = a.to(dev).requires_grad_(), w.to(dev).requires_grad_()
        out = grouped_gemm_fp8_training(ad, wd, offsets.to(dev), "relu2")
        res[dev] = (out, *torch.autograd.grad(out, (ad, wd), dout.to(dev)))
    for name, c, d in zip(("out", "da", "dw"), res["cpu"], res["cuda"]):
        # bf16-level: the FP8 wgmma accumulates with ~14 mantissa bits between promotions
        assert_close(d.cpu(), c.double(), torch.bfloat16, factor=2.0, what=f"cuda {name}")


@pytest.mark.gpu
def test_sm90_e4m3_output_and_the_portable_one(monkeypatch):
    """The CUTLASS epilogue that writes e4m3 codes of a static scale (relu^2 / s, saturating) agrees
    with the portable kernel to within one code step (float32 sums in another order) and with
    float64, is bit-repeatable, and zeroes rows outside every segment."""
    aq, a_s, wq, w_s, offsets = gemm_case([3, 0, 1, 70, 7, 0, 2, 300], 256, 1024, "cuda", lead_rows=3, extra_rows=5)
    ref64 = gemm_ref(aq, a_s, wq, w_s, offsets, "relu2")
    s = torch.tensor(float(ref64.max()) / 448 / 2, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        codes = ops.grouped_gemm_fp8(aq, a_s, wq, w_s, offsets, "relu2", E4M3, False, s)[0]
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("MainloopSm90ArrayTmaGmmaWarpSpecializedFP8" in n for n in names), names
    assert torch.equal(codes.view(torch.uint8), ops.grouped_gemm_fp8(aq, a_s, wq, w_s, offsets, "relu2", E4M3, False,
                                                                      s)[0].view(torch.uint8))
    monkeypatch.setenv("NEMOKERNELS_GROUPED_GEMM_PORTABLE", "1")
    portable = ops.grouped_gemm_fp8(aq, a_s, wq, w_s, offsets, "relu2", E4M3, False, s)[0]
    got, port = codes.cpu().double(), portable.cpu().double()
    clipped = (ref64 / float(s)).clamp(max=448.0)
    for x in (got, port):
        assert ((x - clipped).abs() <= clipped * 2.0 ** -3 + 2.0 ** -9).all()
    assert (got[:3] == 0).all() and (got[int(offsets[-1]):] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["none", "relu2"])
def test_sm90_block_scaled_kernel_and_the_portable_one(monkeypatch, activation):
    """The CUTLASS blockwise FP8 kernel (per-block rows and weights; scales re-laid M-major per group
    and N-major per expert in its workspace) matches float64 and the portable kernel, is
    bit-repeatable and zeroes rows outside every segment; segments not multiples of 128 rows."""
    g = torch.Generator().manual_seed(54)
    counts, N, K = [3, 0, 1, 170, 7, 0, 2, 300], 264, 1024
    offsets = offsets_from_counts(counts, "cuda") + 3
    R = int(offsets[-1]) + 5
    x = torch.randn(R, K, generator=g).bfloat16().cuda()
    w = fp8_block_weights(torch.randn(8, N, K, generator=g).cuda() / K ** 0.5)
    rows = quantize_rows_fp8(x, block=128)
    poison_allocator("cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = grouped_gemm(rows, w, offsets, activation, out_dtype=torch.bfloat16)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("Blockwise" in n for n in names), names
    assert torch.equal(out, grouped_gemm(rows, w, offsets, activation, out_dtype=torch.bfloat16))
    ref = block_gemm_ref(rows.data, rows.scale, w, offsets, activation)
    assert_close(out.cpu(), ref, torch.bfloat16, factor=2.0, what="sm90 blockwise")
    monkeypatch.setenv("NEMOKERNELS_GROUPED_GEMM_PORTABLE", "1")
    assert_close(grouped_gemm(rows, w, offsets, activation, out_dtype=torch.bfloat16).cpu(), ref, torch.bfloat16,
                 factor=2.0, what="portable blockwise")
    assert (out[:3] == 0).all() and (out[-5:] == 0).all()
