"""nvfp4.gemm (a @ b.T of two NVFP4Tensors): against the float64 product of the dequantized
operands (nemokernels/nvfp4/reference.py) at tile edges (M, N in 1..129, K in 16..272),
every code, special scales (0, 448, subnormal e4m3, negative), bias, out dtypes, strided and
batched inputs, poisoned outputs, bad input, opcheck, torch.compile, CUDA graphs, and the
sm_100 scale-factor swizzle's index map against the CuTe layout formula."""
from types import SimpleNamespace

import pytest
import torch

from nemokernels import nvfp4
from nemokernels.nvfp4 import NVFP4Tensor
from nemokernels.nvfp4.reference import decode_reference, gemm_reference

from conftest import DEVICES
from helpers import assert_close, assert_close_to_product, bad_input_test, mutation_table, poison_allocator, rel_err

ops = torch.ops.nemokernels
EDGES = [1, 15, 16, 17, 36, 127, 128, 129]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rand_scales(rows, nblk, device, lo=0x08, hi=0x58):
    """Random e4m3 scales as bytes in [lo, hi) (0x08..0x57: 2^-6 .. 2^4 * 1.875, positive)."""
    return torch.randint(lo, hi, (rows, nblk), dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)


def rand_nvfp4(rows, K, device, scales=None, global_scale=None):
    data = torch.randint(0, 256, (rows, K // 2), dtype=torch.uint8, device=device)
    if scales is None:
        scales = rand_scales(rows, K // 16, device)
    if global_scale is None:
        global_scale = torch.rand((), device=device) + 0.25
    return NVFP4Tensor(data, scales, global_scale)


CUTLASS_PATHS = ("cutlass_sm100", "cutlass_sm90")

# Unit roundoff of the one rounding to the output dtype (round to nearest).
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def gemm_tol(out_dtype, K):
    """Error bound per unit of |A_hat| @ |B_hat|.T + |bias| (both operands with their global
    scales), from the kernel's arithmetic: e2m1 * e4m3 products are exact in float32; their
    float32 sum over K terms errs by at most K * 2^-24 in any order (2K * 2^-24 leaves room for
    a truncating tensor-core accumulator); alpha = a_global * b_global, alpha * acc and + bias
    round once each in float32; then one rounding to out_dtype."""
    return (2 * K + 3) * 2.0 ** -24 + UNIT_ROUNDOFF[out_dtype]


def assert_gemm_close(out, ref, a, b, out_dtype, bias=None, what=""):
    """out vs the float64 reference element by element, bounded by the operands' magnitudes
    (a relative norm fails a correct kernel when the reference cancels to ~0 at small M, N, K)."""
    K = a.data.shape[-1] * 2
    fi = torch.finfo(out_dtype)  # the output's subnormal spacing (tiny * eps), or float32's flush-to-zero range
    atol = max(fi.tiny * fi.eps, torch.finfo(torch.float32).tiny)
    assert_close_to_product(out, ref, decode_reference(a).abs(), decode_reference(b).abs().T,
                            gemm_tol(out_dtype, K), abs_c=None if bias is None else bias.abs(), atol=atol,
                            what=f"gemm {what} ({out_dtype})")


def check(a, b, out_dtype=torch.float32, bias=None, what="", poison=True):
    if poison:
        poison_allocator(a.device)
    out = nvfp4.gemm(a, b, out_dtype, bias)
    ref = gemm_reference(a, b, torch.float64, bias)
    assert out.dtype == out_dtype and out.shape == ref.shape
    assert_gemm_close(out, ref, a, b, out_dtype, bias, what)
    return out, ref


# ---------------------------------------------------------------- accuracy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("K", [16, 32, 48, 272])
def test_tile_edges(device, K):
    # every M with every N on the GPU; on the CPU every M and every N, each with 3 partners
    pairs = ([(M, N) for M in EDGES for N in EDGES] if device != "cpu" else
             [(M, EDGES[(i + 3 * j) % len(EDGES)]) for i, M in enumerate(EDGES) for j in range(3)])
    for M, N in pairs:
        check(rand_nvfp4(M, K, device), rand_nvfp4(N, K, device), what=f"M={M} N={N} K={K}",
              poison=(M == N or device != "cpu"))


def test_gemm_metric_catches_wrong_outputs():
    """The elementwise bound accepts a cancelled 1x1 product with a rounding-sized error (the
    relative norm called that an error of 1 or more) and still fails a 1% error, a wrong block
    scale, a dropped K block, a missing global scale and NaN."""
    # M = N = 1, K = 16: a = (1, -1, 1, -1, ...), b = (1, 1, ...) under one scale: the exact product is 0
    s = rand_scales(1, 1, "cpu")
    a1 = NVFP4Tensor(torch.full((1, 8), 0xA2, dtype=torch.uint8), s, torch.tensor(1.0))  # codes 2 (1.0), 10 (-1.0)
    b1 = NVFP4Tensor(torch.full((1, 8), 0x22, dtype=torch.uint8), s, torch.tensor(1.0))
    out1 = nvfp4.gemm(a1, b1, torch.float32)
    assert out1.item() == 0.0
    ref1 = gemm_reference(a1, b1, torch.float64) - 6.7e-16  # a float64 reference's own rounding (seed 1243897818)
    assert rel_err(out1, ref1) == 1.0  # what the relative norm made of it
    assert_gemm_close(out1, ref1, a1, b1, torch.float32, what="cancelled 1x1")
    magnitude = 16 * float(s.float()) ** 2
    assert_gemm_close(out1 + 1e-7 * magnitude, ref1, a1, b1, torch.float32, what="rounding-sized error")
    with pytest.raises(AssertionError, match="exceeds tol"):
        assert_gemm_close(out1 + 1e-3 * magnitude, ref1, a1, b1, torch.float32, what="1e-3 of the magnitude")

    a, b = rand_nvfp4(36, 48, "cpu"), rand_nvfp4(17, 48, "cpu")
    ref = gemm_reference(a, b, torch.float64)
    out = nvfp4.gemm(a, b, torch.float32)
    assert_gemm_close(out, ref, a, b, torch.float32)
    scales = a.scales.view(torch.uint8).clone()
    scales[:, 1] = torch.where(scales[:, 1] == 0x38, 0x40, 0x38).to(torch.uint8)  # one block's scale wrong
    wrong_scale = gemm_reference(NVFP4Tensor(a.data, scales.view(torch.float8_e4m3fn), a.global_scale), b,
                                 torch.float64)
    dropped_block = ref - decode_reference(a)[:, 32:] @ decode_reference(b)[:, 32:].T
    for wrong, name in ((out * 1.01, "1% off"), (wrong_scale, "wrong block scale"),
                        (dropped_block, "dropped K block"), (out / a.global_scale, "no global scale")):
        with pytest.raises(AssertionError, match="exceeds tol .* ratio"):
            assert_gemm_close(wrong.float(), ref, a, b, torch.float32, what=name)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_gemm_close(torch.full_like(out, float("nan")), ref, a, b, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
def test_out_dtypes_and_bias(device, out_dtype, bias_dtype):
    for M, N, K in [(37, 129, 96), (128, 64, 256), (5, 300, 1024)]:
        a, b = rand_nvfp4(M, K, device), rand_nvfp4(N, K, device)
        bias = None if bias_dtype is None else (torch.randn(N, device=device) * 50).to(bias_dtype)
        out, ref = check(a, b, out_dtype, bias, what=f"{out_dtype} bias={bias_dtype} M={M} N={N} K={K}")
        if out_dtype != torch.float32:
            # one rounding of the exact result (float32 accumulation is far finer than 16 bits)
            assert (out.double() - ref).abs().max() <= (ref.abs() * 2.0 ** -7).max() + 1e-30


@pytest.mark.parametrize("device", DEVICES)
def test_float32_error_is_accumulation_only(device):
    """Full float32 accumulation: a property of the CPU and portable kernels only (no document
    promises it for tcgen05's block-scaled MMA or for wgmma; the CUTLASS paths have their own
    bound below)."""
    if nvfp4.gemm_path(device, 64, 96, 2048) in CUTLASS_PATHS:
        pytest.skip("a CUTLASS path: its accuracy is bounded by test_cutlass_path_* instead")
    a, b = rand_nvfp4(64, 2048, device), rand_nvfp4(96, 2048, device)
    out = nvfp4.gemm(a, b, torch.float32)
    err = rel_err(out, gemm_reference(a, b, torch.float64))
    assert err < 2e-6, f"float32 accumulation should give ~1e-7, got {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
def test_every_code_and_special_scales(device):
    K = 512
    codes = torch.arange(256, dtype=torch.uint8, device=device)
    a_data = codes.repeat(40 * K // 2 // 256 + 1)[: 40 * K // 2].reshape(40, K // 2)
    b_data = torch.flip(codes, [0]).repeat(24 * K // 2 // 256 + 1)[: 24 * K // 2].reshape(24, K // 2)
    special = torch.tensor([0x00, 0x7E, 0x01, 0x07, 0x08, 0x38, 0xB8, 0x06, 0x3F, 0xFE],
                           dtype=torch.uint8, device=device)  # 0, 448, 2^-9, 7*2^-9, 2^-6, 1, -1, ...
    if nvfp4.gemm_path(device, 40, 24, K) == "cutlass_sm100":
        special = special[special < 0x80]  # sm_100 reads scales as ue4m3: no negative scales (known-issues.md)
    a_sc = special[torch.randint(0, len(special), (40, K // 16), device=device)].view(torch.float8_e4m3fn)
    b_sc = special[torch.randint(0, len(special), (24, K // 16), device=device)].view(torch.float8_e4m3fn)
    # global scales 2^-12: the sums stay inside float16's range (6 * 448 squared times K overflows it)
    a = NVFP4Tensor(a_data, a_sc, torch.tensor(2.0 ** -12, device=device))
    b = NVFP4Tensor(b_data, b_sc, torch.tensor(2.0 ** -12, device=device))
    for out_dtype in OUT_DTYPES:
        check(a, b, out_dtype, what="codes/scales")
    # all-zero scales: exact zeros, not NaN
    z = NVFP4Tensor(a_data, torch.zeros_like(a_sc), a.global_scale)
    out = nvfp4.gemm(z, b, torch.float32)
    assert torch.equal(out, torch.zeros_like(out))
    # the largest magnitudes: 6 * 448 per element, still finite in float32 and exact
    big = torch.full_like(a_sc.view(torch.uint8), 0x7E).view(torch.float8_e4m3fn)
    ones = torch.full_like(a_data, 0x77)  # code 7 (= 6) in both nibbles
    t = NVFP4Tensor(ones, big, torch.tensor(1.0, device=device))
    out = nvfp4.gemm(t, t, torch.float32)
    assert torch.all(out == (6.0 * 448.0) ** 2 * K)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_batched_and_global_scales(device):
    K = 160
    big = torch.randint(0, 256, (33, K), dtype=torch.uint8, device=device)
    a = NVFP4Tensor(big[:, 3:3 + K // 2], rand_scales(K // 16, 33, device).t(),
                    torch.tensor(3.0, device=device))  # non-contiguous data (offset 3) and scales
    b = rand_nvfp4(50, K, device, global_scale=torch.tensor([0.125], device=device))  # shape (1,) ok
    assert not a.data.is_contiguous() and not a.scales.is_contiguous()
    check(a, b, what="strided")
    # leading dims of a are kept
    a3 = rand_nvfp4(2 * 7, K, device)
    a3 = NVFP4Tensor(a3.data.reshape(2, 7, K // 2), a3.scales.reshape(2, 7, K // 16), a3.global_scale)
    out = nvfp4.gemm(a3, b, torch.float32)
    assert out.shape == (2, 7, 50)
    a2 = NVFP4Tensor(a3.data.reshape(14, K // 2), a3.scales.reshape(14, K // 16), a3.global_scale)
    assert torch.equal(out.reshape(14, 50), nvfp4.gemm(a2, b, torch.float32))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_k_zero(device):
    a, b = rand_nvfp4(0, 64, device), rand_nvfp4(9, 64, device)
    assert nvfp4.gemm(a, b).shape == (0, 9)
    assert nvfp4.gemm(b, a).shape == (9, 0)
    a, b = rand_nvfp4(4, 0, device), rand_nvfp4(6, 0, device)
    bias = torch.randn(6, device=device)
    out = nvfp4.gemm(a, b, torch.float32, bias)
    assert torch.equal(out, bias.expand(4, 6))


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    a, b = rand_nvfp4(130, 512, device), rand_nvfp4(70, 512, device)
    assert torch.equal(nvfp4.gemm(a, b, torch.float32), nvfp4.gemm(a, b, torch.float32))


# ---------------------------------------------------------------- registration, compile, graphs


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    a, b = rand_nvfp4(17, 48, device), rand_nvfp4(36, 48, device)
    bias = torch.randn(36, device=device)
    # test_schema is left out: its mutation check compares inputs with torch ops that have no
    # float8_e4m3fn CPU kernel ("mul_cpu_reduced_float" not implemented); the schemas declare no
    # mutation, and test_schema runs on nvfp4_quantize (float8 outputs only) in test_nvfp4_quantize.
    utils = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic")
    for dt, bi in ((torch.bfloat16, bias), (torch.float32, None)):
        torch.library.opcheck(ops.nvfp4_gemm, (a.data, a.scales, a.global_scale, b.data, b.scales,
                                               b.global_scale, dt, bi), test_utils=utils)
    torch.library.opcheck(ops.nvfp4_swizzle_scales, (a.scales,), test_utils=utils)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    a, b = rand_nvfp4(20, 64, device), rand_nvfp4(24, 64, device)
    bias = torch.randn(24, device=device)

    @torch.compile(fullgraph=True)
    def f(ad, asc, ag, bd, bsc, bg, bias):
        return nvfp4.gemm(NVFP4Tensor(ad, asc, ag), NVFP4Tensor(bd, bsc, bg), torch.bfloat16, bias) * 2

    out = f(a.data, a.scales, a.global_scale, b.data, b.scales, b.global_scale, bias)
    assert torch.equal(out, nvfp4.gemm(a, b, torch.bfloat16, bias) * 2)


@pytest.mark.gpu
def test_cuda_graph_replay_reads_new_inputs():
    a, b = rand_nvfp4(100, 256, "cuda"), rand_nvfp4(72, 256, "cuda")
    nvfp4.gemm(a, b, torch.float32)  # warm up
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = nvfp4.gemm(a, b, torch.float32)
    a2, b2 = rand_nvfp4(100, 256, "cuda"), rand_nvfp4(72, 256, "cuda")
    for t, t2 in ((a, a2), (b, b2)):
        t.data.copy_(t2.data)
        t.scales.copy_(t2.scales)
        t.global_scale.copy_(t2.global_scale)  # alpha is read on the device at replay
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, nvfp4.gemm(a2, b2, torch.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(128, 1024, 4096), (300, 200, 48), (256, 512, 1040)])
def test_cuda_matches_cpu_kernel(M, N, K):
    a, b = rand_nvfp4(M, K, "cuda"), rand_nvfp4(N, K, "cuda")
    bias = torch.randn(N, device="cuda")
    for dt in OUT_DTYPES:
        out = nvfp4.gemm(a, b, dt, bias)
        ref = gemm_reference(a, b, torch.float64, bias)
        assert_close(out, ref, dt, what=f"cuda {dt}")


# ---------------------------------------------------------------- scale-factor swizzle


def cute_sf_offsets(rows, sf_cols):
    """Offsets of the CuTe layout Sm1xxBlkScaledConfig builds (brute force, element by element):
    atom Shape<(32,4),(16,4)> : Stride<(16,4),(0,1)> over (row, k element), tiled to
    (rows, K) with Step<_2,_1,_3> (the K tiles vary fastest)."""
    K = sf_cols * 16
    k_tiles = (K + 63) // 64
    off = torch.empty(rows, sf_cols, dtype=torch.int64)
    for r in range(rows):
        for c in range(sf_cols):
            k = c * 16
            r0, r1, rt = r % 32, (r // 32) % 4, r // 128
            k0, k1, kt = k % 16, (k // 16) % 4, k // 64
            in_atom = r0 * 16 + r1 * 4 + k0 * 0 + k1 * 1
            off[r, c] = (rt * k_tiles + kt) * 512 + in_atom
    return off


@pytest.mark.parametrize("device", DEVICES)
def test_swizzle_scales_matches_cute_layout(device):
    for rows, sf_cols in [(1, 1), (36, 3), (128, 4), (129, 17), (300, 8)]:
        s = torch.randint(1, 256, (rows, sf_cols), dtype=torch.uint8, device=device)
        out = nvfp4.swizzle_scales(s.view(torch.float8_e4m3fn)).cpu()
        size = ((rows + 127) // 128) * 128 * ((sf_cols + 3) // 4) * 4
        assert out.shape == (size,)
        off = cute_sf_offsets(rows, sf_cols)
        assert len(set(off.flatten().tolist())) == rows * sf_cols and int(off.max()) < size
        assert torch.equal(out[off.flatten()], s.cpu().flatten())
        pad = torch.ones(size, dtype=torch.bool)
        pad[off.flatten()] = False
        assert (out[pad] == 0).all(), "padding must be zero (zero scales)"


# ---------------------------------------------------------------- bad input, table-driven
# Rows (id, mutation of a valid call's arguments, regex, where) as in helpers.mutation_table.
# nvfp4_gemm reads no values on the host (the global scales stay on the device), so it has no
# CPU-only value checks; NaN / Inf scales simply propagate. Messages name the op (nvfp4.gemm, its
# public name), the argument, expected vs got. The public function's refusals and the checks the
# op reaches from it are rows (id, where, call, regex[, exc]) over _public_args.


def _gemm_args(device):
    a, b = rand_nvfp4(8, 64, device), rand_nvfp4(4, 64, device)
    return dict(ad=a.data, asc=a.scales, ag=a.global_scale, bd=b.data, bsc=b.scales, bg=b.global_scale,
                dt=torch.bfloat16, bias=torch.randn(4, device=device))


def _gemm_call(a):
    return ops.nvfp4_gemm(a["ad"], a["asc"], a["ag"], a["bd"], a["bsc"], a["bg"], a["dt"], a["bias"])


G = r"nvfp4\.gemm"
GEMM_CASES = [
    ("a_rank", lambda a: a.update(ad=a["ad"][None]),
     G + r": a.data and b.data must be 2-D \(rows, K/2\), got \(1, 8, 32\) and \(4, 32\)", "any"),
    ("b_rank", lambda a: a.update(bd=a["bd"].flatten()),
     G + r": a.data and b.data must be 2-D \(rows, K/2\), got \(8, 32\) and \(128,\)", "any"),
    ("k_disagree", lambda a: a.update(bd=rand_nvfp4(4, 96, a["bd"].device).data),
     G + r": a and b must have the same K \(a is \(8, 64\), b is \(4, 96\)\)", "any"),
    ("k_not_multiple_of_16", lambda a: a.update(ad=a["ad"][:, :4], bd=a["bd"][:, :4]),
     G + r": K must be a multiple of 16 \(one e4m3 scale per 16 elements\), got K = 8", "any"),
    ("a_data_dtype", lambda a: a.update(ad=a["ad"].view(torch.int8)), G + r": a.data must be one of \{uint8\}, got int8",
     "any"),
    ("b_data_dtype", lambda a: a.update(bd=a["bd"].int()), G + r": b.data must be one of \{uint8\}, got int32", "any"),
    ("a_scales_dtype", lambda a: a.update(asc=a["asc"].view(torch.uint8)),
     G + r": a.scales must be one of \{float8_e4m3fn\}, got uint8", "any"),
    ("b_scales_rank", lambda a: a.update(bsc=a["bsc"].flatten()),
     G + r": b.scales must have 2 dimensions, got shape \(16,\)", "any"),
    ("a_scales_rows", lambda a: a.update(asc=a["asc"][:7]),
     G + r": a.scales must have shape \(8, 4\) \(one scale per 16 elements of K = 64\), got \(7, 4\)", "any"),
    ("b_scales_cols", lambda a: a.update(bsc=a["bsc"][:, :3]),
     G + r": b.scales must have shape \(4, 4\) \(one scale per 16 elements of K = 64\), got \(4, 3\)", "any"),
    ("a_global_numel", lambda a: a.update(ag=torch.ones(2, device=a["ad"].device)),
     G + r": a.global_scale must be a float32 scalar \(0-dim tensor\), got shape \(2,\)", "any"),
    ("b_global_dtype", lambda a: a.update(bg=a["bg"].half()),
     G + r": b.global_scale must be one of \{float32\}, got float16", "any"),
    ("out_dtype_int", lambda a: a.update(dt=torch.int32),
     G + r": out_dtype must be one of \{float32, float16, bfloat16\}, got int32", "any"),
    ("out_dtype_f64", lambda a: a.update(dt=torch.float64),
     G + r": out_dtype must be one of \{float32, float16, bfloat16\}, got float64", "any"),
    ("bias_size", lambda a: a.update(bias=a["bias"][:3]), G + r": bias.shape\[0\] must be 4, got shape \(3,\)", "any"),
    ("bias_rank", lambda a: a.update(bias=a["bias"][None]), G + r": bias must have 1 dimensions, got shape \(1, 4\)",
     "any"),
    ("bias_dtype", lambda a: a.update(bias=a["bias"].long()),
     G + r": bias must be one of \{float32, float16, bfloat16\}, got int64", "any"),
    ("b_data_device", lambda a: a.update(bd=a["bd"].cpu(), bsc=a["bsc"].cpu()),
     G + r": b.global_scale is on cuda:\d+ but b.data is on cpu; all tensors must be on one device", "cuda"),
    ("a_scales_device", lambda a: a.update(asc=a["asc"].cpu()),
     G + r": a.scales is on cpu but a.data is on cuda:\d+; all tensors must be on one device", "cuda"),
    ("bias_device", lambda a: a.update(bias=a["bias"].cpu()),
     G + r": bias is on cpu but a.data is on cuda:\d+; all tensors must be on one device", "cuda"),
]


@pytest.mark.gpu
def test_gemm_portable_path_refuses_m_past_its_grid():
    """The portable kernel puts 128-row tiles on grid dimension y (<= 65535): M > 8388480 is
    refused with the limit and the way out (the CUTLASS path has no such limit). A broadcast
    view keeps the test free of memory: the check runs before any copy."""
    M, N, K = 65535 * 128 + 1, 4, 48  # K % 32 != 0: the portable path on every device
    assert nvfp4.gemm_path("cuda", M, N, K) == "portable_cuda"
    a, b = rand_nvfp4(1, K, "cuda"), rand_nvfp4(N, K, "cuda")
    with pytest.raises(RuntimeError, match=G + r": M \(a.data.shape\[0\]\) = 8388481 exceeds 8388480, the most the "
                                            r"portable CUDA kernel takes .*; split a into row blocks"):
        ops.nvfp4_gemm(a.data.expand(M, K // 2), a.scales.expand(M, K // 16), a.global_scale, b.data, b.scales,
                       b.global_scale, torch.float32, None)


def _swizzle_call(a):
    return ops.nvfp4_swizzle_scales(a["s"])


def _swizzle_args(device):
    return dict(s=rand_scales(36, 3, device))


SW = "nvfp4_swizzle_scales"
SWIZZLE_CASES = [  # one tensor argument: its rank and dtype are all that can be wrong (empty is valid)
    ("rank0", lambda a: a.update(s=a["s"][0, 0]), SW + r": scales must have 2 dimensions, got shape \(\)", "any"),
    ("rank1", lambda a: a.update(s=a["s"][0]), SW + r": scales must have 2 dimensions, got shape \(3,\)", "any"),
    ("rank3", lambda a: a.update(s=a["s"][None]), SW + r": scales must have 2 dimensions, got shape \(1, 36, 3\)", "any"),
    ("dtype_float32", lambda a: a.update(s=a["s"].float()),
     SW + r": scales must be one of \{float8_e4m3fn\}, got float32", "any"),
    ("dtype_float16", lambda a: a.update(s=a["s"].half()),
     SW + r": scales must be one of \{float8_e4m3fn\}, got float16", "any"),
    ("dtype_int8", lambda a: a.update(s=a["s"].view(torch.int8)),
     SW + r": scales must be one of \{float8_e4m3fn\}, got int8", "any"),
    ("dtype_int32", lambda a: a.update(s=a["s"].view(torch.uint8).int()),
     SW + r": scales must be one of \{float8_e4m3fn\}, got int32", "any"),
    ("dtype_e5m2", lambda a: a.update(s=a["s"].view(torch.float8_e5m2)),
     SW + r": scales must be one of \{float8_e4m3fn\}, got float8_e5m2", "any"),
    ("dtype_bool", lambda a: a.update(s=a["s"].view(torch.uint8).bool()),
     SW + r": scales must be one of \{float8_e4m3fn\}, got bool", "any"),
    ("dtype_bytes", lambda a: a.update(s=a["s"].view(torch.uint8)),
     SW + r": scales must be one of \{float8_e4m3fn\}, got uint8", "any"),
]


def _public_args(device):
    return SimpleNamespace(a=rand_nvfp4(8, 64, device), b=rand_nvfp4(4, 64, device))


def _raw(t, ad=None, asc=None, ag=None, bd=None, bsc=None, bg=None, dt=torch.float32, bias=None):
    """The op on the public arguments with some replaced (both global scales default to a's)."""
    pick = lambda v, d: d if v is None else v  # noqa: E731
    return ops.nvfp4_gemm(pick(ad, t.a.data), pick(asc, t.a.scales), pick(ag, t.a.global_scale), pick(bd, t.b.data),
                          pick(bsc, t.b.scales), pick(bg, t.a.global_scale), dt, bias)


def _k96(t):
    return rand_nvfp4(4, 96, t.a.data.device)


PUBLIC_CASES = [
    ("k_disagree", "any", lambda t: _raw(t, bd=_k96(t).data, bsc=_k96(t).scales), "same K"),
    ("k_not_multiple_of_16", "any", lambda t: _raw(t, ad=t.a.data[:, :4], bd=t.b.data[:, :4]), "multiple of 16"),
    ("a_data_dtype", "any", lambda t: _raw(t, ad=t.a.data.to(torch.int8)), "a.data.*uint8"),
    ("b_scales_dtype", "any", lambda t: _raw(t, bsc=t.b.scales.view(torch.uint8)), "b.scales.*float8_e4m3fn"),
    ("a_scales_cols", "any", lambda t: _raw(t, asc=t.a.scales[:, :3]), r"a.scales must have shape \(8, 4\)"),
    ("b_global_numel", "any", lambda t: _raw(t, bg=torch.ones(2, device=t.a.data.device)),
     "b.global_scale must be a float32 scalar"),
    ("a_global_dtype", "any", lambda t: _raw(t, ag=t.a.global_scale.double()), "a.global_scale.*float32"),
    ("out_dtype", "any", lambda t: _raw(t, dt=torch.int32), "out_dtype"),
    ("bias", "any", lambda t: _raw(t, bias=torch.ones(5, device=t.a.data.device)), "bias"),
    ("a_rank", "any", lambda t: _raw(t, ad=t.a.data[None]), "2-D"),
    ("public_out_dtype", "any", lambda t: nvfp4.gemm(t.a, t.b, torch.int8), "out_dtype", ValueError),
    ("public_not_nvfp4", "any", lambda t: nvfp4.gemm(t.a.data, t.b), "NVFP4Tensor", TypeError),
    ("a_global_device", "cuda", lambda t: _raw(t, ag=t.a.global_scale.cpu(), bg=t.b.global_scale), "device"),
    ("b_device", "cuda",
     lambda t: _raw(t, bd=t.b.data.cpu(), bsc=t.b.scales.cpu(), bg=t.b.global_scale.cpu()), "device"),
]


test_bad_input = bad_input_test(
    gemm=mutation_table(_gemm_args, _gemm_call, GEMM_CASES),
    swizzle=mutation_table(_swizzle_args, _swizzle_call, SWIZZLE_CASES), public=(_public_args, PUBLIC_CASES))


# ---------------------------------------------------------------- which path a call takes


def test_gemm_path_on_the_cpu():
    assert nvfp4.gemm_path("cpu", 128, 128, 256) == "cpu"
    from nemokernels import _C
    if not _C.with_cuda:
        # a CPU-only build has no CUDA path, whatever the device index
        assert _C.nvfp4_gemm_path(0, 128, 128, 256) == "unavailable"
        return
    # a CUDA build names the path of a device that exists and refuses, clearly, one that does
    # not (here a CUDA build on a machine without a GPU or driver, as on CI)
    count = torch.cuda.device_count()
    if count:
        assert _C.nvfp4_gemm_path(0, 128, 128, 256) in ("portable_cuda", *CUTLASS_PATHS)
    with pytest.raises(RuntimeError, match="nvfp4_gemm_path: no CUDA device"):
        _C.nvfp4_gemm_path(count, 128, 128, 256)


def _sm100_built_for_this_gpu():
    """Independent of the op: the build's arch list (nemokernels info) against the device."""
    from nemokernels.device_check import compiled_archs
    major, minor = torch.cuda.get_device_capability()
    archs = set(compiled_archs())
    cc = major * 10 + minor
    if major != 10:  # the sm_100 kernels are Blackwell datacenter (10.x) code only
        return False
    return f"sm_{cc}a" in archs or f"sm_{cc}f" in archs or (cc in (100, 103) and "sm_100f" in archs)


def _sm90_built_for_this_gpu():
    """Independent of the op: an sm_90 device and a build with sm_90a code."""
    from nemokernels.device_check import compiled_archs
    return torch.cuda.get_device_capability() == (9, 0) and "sm_90a" in set(compiled_archs())


@pytest.mark.gpu
def test_gemm_path_follows_the_build_and_the_shape(monkeypatch):
    """The sm_100 CUTLASS path exactly where the build has the sm_100 kernels for this GPU's
    compute capability (a B300 with a 100a-only build takes the portable kernel: arch-specific
    code is not forward compatible), and only for shapes it takes (K % 32 == 0, N % 4 == 0); the
    sm_90 path on an H100/H200 with an sm_90a build for N % 8 == 0, unless
    NEMOKERNELS_NVFP4_GEMM_PORTABLE=1."""
    sm100, sm90 = _sm100_built_for_this_gpu(), _sm90_built_for_this_gpu()
    fast = "cutlass_sm100" if sm100 else "cutlass_sm90" if sm90 else "portable_cuda"
    assert nvfp4.gemm_path("cuda", 256, 512, 1024) == fast
    assert nvfp4.gemm_path("cuda", 256, 512, 48) == ("cutlass_sm90" if sm90 else "portable_cuda")
    for M, N, K in [(256, 130, 1024), (0, 512, 1024), (17, 0, 64)]:
        assert nvfp4.gemm_path("cuda", M, N, K) == "portable_cuda", (M, N, K)
    monkeypatch.setenv("NEMOKERNELS_NVFP4_GEMM_PORTABLE", "1")
    assert nvfp4.gemm_path("cuda", 256, 512, 1024) == ("cutlass_sm100" if sm100 else "portable_cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(64, 96, 2048), (5, 30, 48), (37, 129, 96), (129, 260, 288)])
def test_gemm_path_names_the_kernel_that_runs(M, N, K):
    """The profiler shows the portable kernel exactly when gemm_path says portable_cuda, so a
    test gated on gemm_path tests the kernel it names."""
    path = nvfp4.gemm_path("cuda", M, N, K)
    a, b = rand_nvfp4(M, K, "cuda"), rand_nvfp4(N, K, "cuda")
    nvfp4.gemm(a, b, torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        nvfp4.gemm(a, b, torch.float32)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert names, "the profiler saw no kernel"
    portable = any("nvfp4_gemm_kernel" in n for n in names)
    assert portable == (path == "portable_cuda"), (path, names)


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(1, 8, 16), (257, 392, 1024), (4096, 2688, 1024)])
def test_sm90_path_and_the_portable_kernel(monkeypatch, M, N, K):
    """On an H100/H200 with an sm_90a build: the sm_90 path (exact bf16 decode, wgmma, alpha in
    the epilogue, bias/convert pass) and the portable kernel (NEMOKERNELS_NVFP4_GEMM_PORTABLE=1)
    on the same operands, every output dtype with and without bias, each within the
    float32-accumulation bound of the float64 reference, over a poisoned allocator."""
    if nvfp4.gemm_path("cuda", M, N, K) != "cutlass_sm90":
        pytest.skip(f"({M}, {N}, {K}) takes the {nvfp4.gemm_path('cuda', M, N, K)} path on this GPU and build")
    a = rand_nvfp4(M, K, "cuda", global_scale=torch.tensor(3.0, device="cuda"))
    b = rand_nvfp4(N, K, "cuda")
    bias = torch.randn(N, device="cuda") * 10
    for dt in OUT_DTYPES:
        for bi in (None, bias):
            check(a, b, dt, bi, what=f"sm90 M={M} N={N} K={K} bias={bi is not None}")
            monkeypatch.setenv("NEMOKERNELS_NVFP4_GEMM_PORTABLE", "1")
            assert nvfp4.gemm_path("cuda", M, N, K) == "portable_cuda"
            check(a, b, dt, bi, what=f"portable M={M} N={N} K={K} bias={bi is not None}")
            monkeypatch.delenv("NEMOKERNELS_NVFP4_GEMM_PORTABLE")


# ---------------------------------------------------------------- the CUTLASS paths' accuracy
# No NVIDIA document states how tcgen05.mma.kind::mxf4nvf4 accumulates inside one MMA: the PTX ISA
# gives the accumulator type (f32) but does not promise that the partial sums of the products are
# rounded as IEEE float32 additions (FP8 MMAs on Hopper were measured to keep ~14 significant bits
# there: DeepSeek-V3 technical report, section 3.3.2). So these tests ask only what holds for any
# accumulation that keeps at least 12 significant bits relative to the largest partial sum of an
# MMA block (64 elements of K), plus float32 accumulation across blocks and one rounding to the
# output dtype: elementwise, |out - ref| <= (2^-12 + ceil(K/64) * 2^-23) * alpha * (|A| @ |B|^T)
# + u_out * |ref| (+ the float32 bias add). The operands' magnitudes, not the result's, bound the
# error, so cancellation in ref cannot make the bound fragile, and a kernel that accumulated
# in bf16 or dropped a block would still fail it. (The portable kernel's float32 accumulation is
# tested to 2e-6 above; that test assumes full float32 accumulation and so belongs to the portable path.)

_U_OUT = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def assert_within_mma_bound(out, a, b, bias=None, what=""):
    ref = gemm_reference(a, b, torch.float64, bias).cpu()
    A, B = decode_reference(a, torch.float64).cpu().abs(), decode_reference(b, torch.float64).cpu().abs()
    K = A.shape[-1]
    mag = A @ B.T
    u_acc = 2.0 ** -12 + -(-K // 64) * 2.0 ** -23
    bound = u_acc * mag + _U_OUT[out.dtype] * (ref.abs() + u_acc * mag)
    if bias is not None:
        bound = bound + 2.0 ** -24 * (ref.abs() + bias.double().cpu().abs())
    err = (out.double().cpu() - ref).abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{what}: error exceeds the magnitude bound by {worst:.3e} (max err {err.max().item():.3e})"


# NEMOKERNELS_NVFP4_GEMM_DECODE_MMA=1 on sm_90: B decoded inside the mainloop where K % 64 == 0
# (gemm_decode_mma_sm90.cu; the other shapes keep the bf16 decode + CUTLASS GEMM). The CUTLASS-path
# tests below run with it off and on.
DECODE_MMA = pytest.mark.parametrize("decode_mma", ["0", "1"])


@pytest.mark.gpu
@DECODE_MMA
@pytest.mark.parametrize("M,N,K", [(1, 8, 32), (36, 128, 64), (129, 264, 288), (256, 1024, 4096), (300, 136, 1040),
                                   (200, 392, 1024), (1030, 392, 1024), (130, 264, 192)])
def test_cutlass_path_within_the_documented_mma_bound(monkeypatch, decode_mma, M, N, K):
    monkeypatch.setenv("NEMOKERNELS_NVFP4_GEMM_DECODE_MMA", decode_mma)
    if nvfp4.gemm_path("cuda", M, N, K) not in CUTLASS_PATHS:
        pytest.skip(f"({M}, {N}, {K}) takes the {nvfp4.gemm_path('cuda', M, N, K)} path on this GPU and build")
    a, b = rand_nvfp4(M, K, "cuda"), rand_nvfp4(N, K, "cuda")
    for dt in OUT_DTYPES:
        assert_within_mma_bound(nvfp4.gemm(a, b, dt), a, b, what=f"cutlass {dt} M={M} N={N} K={K}")
    bias = torch.randn(N, device="cuda") * 10
    assert_within_mma_bound(nvfp4.gemm(a, b, torch.bfloat16, bias), a, b, bias, what="cutlass bias")


@pytest.mark.gpu
@DECODE_MMA
def test_cutlass_path_cancellation_and_special_scales(monkeypatch, decode_mma):
    """Rows that cancel exactly (b's second half the negation of its first) and the largest
    scales: still inside the magnitude bound (how the hardware rounds is not documented, so
    out[:, :N/2] == -out[:, N/2:] is not asked), and all-zero scales give exact zeros."""
    M, N, K = 64, 128, 512
    monkeypatch.setenv("NEMOKERNELS_NVFP4_GEMM_DECODE_MMA", decode_mma)
    if nvfp4.gemm_path("cuda", M, N, K) not in CUTLASS_PATHS:
        pytest.skip("the portable path on this GPU and build")
    a = rand_nvfp4(M, K, "cuda", scales=torch.full((M, K // 16), 0x7E, dtype=torch.uint8, device="cuda")
                   .view(torch.float8_e4m3fn), global_scale=torch.tensor(2.0 ** -10, device="cuda"))
    half = rand_nvfp4(N // 2, K, "cuda")
    neg = half.data ^ 0x88  # flips the sign bit of both codes in each byte
    b = NVFP4Tensor(torch.cat([half.data, neg]), torch.cat([half.scales, half.scales]), half.global_scale)
    out = nvfp4.gemm(a, b, torch.float32)
    assert_within_mma_bound(out, a, b, what="cancellation")
    z = NVFP4Tensor(a.data, torch.zeros_like(a.scales), a.global_scale)
    assert torch.equal(nvfp4.gemm(z, b, torch.float32), torch.zeros(M, N, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("M,N,K", [(130, 264, 1024), (3, 2688, 1024), (260, 136, 96), (1030, 392, 192)])
def test_sm90_decode_mma_runs_where_the_switch_says(monkeypatch, M, N, K):
    """With NEMOKERNELS_NVFP4_GEMM_DECODE_MMA=1 on sm_90, K % 64 == 0 runs decode_mma_kernel (256-token
    tiles from M 1024, 128 below; an odd number of K steps in the last case) and
    no CUTLASS GEMM (else the tests above would compare a path with itself); K % 64 != 0 keeps
    the CUTLASS GEMM. Results bit for bit equal across two calls (no atomics, fixed order), and
    against float64 within the MMA bound, with a bias, over a poisoned allocator."""
    if nvfp4.gemm_path("cuda", M, N, K) != "cutlass_sm90":
        pytest.skip("needs the sm_90 path (an H100/H200 with an sm_90a build)")
    monkeypatch.setenv("NEMOKERNELS_NVFP4_GEMM_DECODE_MMA", "1")
    a, b = rand_nvfp4(M, K, "cuda"), rand_nvfp4(N, K, "cuda", global_scale=torch.tensor(0.75, device="cuda"))
    bias = torch.randn(N, device="cuda")
    poison_allocator("cuda")
    out = nvfp4.gemm(a, b, torch.bfloat16, bias)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        again = nvfp4.gemm(a, b, torch.bfloat16, bias)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    fused = any("decode_mma_kernel" in n for n in names)
    assert fused == (K % 64 == 0), names
    assert torch.equal(out, again)
    assert_within_mma_bound(out, a, b, bias, what=f"decode_mma M={M} N={N} K={K}")
