"""The portable NVFP4 GEMM CUDA kernel (csrc/nvfp4/gemm_cuda.cu) run on the CPU through the
emulator in tools/cuda_emu (see its README and tests/cuda_emu.py, whose build helpers
this reuses). The kernel's PTX (cp.async, mma.sync m16n8k16, fp16x2 multiply) has C++ twins in
the same file under the emulator: mma.sync is computed from the PTX fragment layout (which lane
holds which element), so the kernel's lane/fragment indexing, the code/scale k permutation
shared by A and B, the double-buffered pipeline's barriers (shared memory is poisoned per
block), the M/N/K edge masking and the epilogue are all checked against the float64 product of
the dequantized operands. Also the sm_100 helpers: the scale swizzle and the bias/convert pass.
The sm_90 path's composition (nvfp4_gemm_sm90, built with NK_HAS_SM90: exact bf16 decode, the
alpha/offsets set-up, the CUTLASS GEMM replaced by a mock with its contract, the bias/convert
pass) on a second library. Outputs are NaN-poisoned before every emulated launch."""
import ctypes
import functools

import pytest
import torch

import cuda_emu as _emu_base
from helpers import assert_close
from test_nvfp4_gemm import rand_nvfp4

from nemokernels import nvfp4
from nemokernels.nvfp4 import NVFP4Tensor
from nemokernels.nvfp4.reference import gemm_reference

CSRC = _emu_base.CSRC
DT_ENUM = _emu_base.DT_ENUM


@functools.cache
def emu():
    """The emulated NVFP4 GEMM library (cached by content hash, see build_emulated)."""
    return _emu_base.EmuLibrary.build("nvfp4_gemm", _emu_base.EMU / "driver_nvfp4_gemm.cpp",
                                      [CSRC / "nvfp4" / "gemm_cuda.cu"], ("nvfp4",), header=CSRC / "nvfp4" / "gemm.h",
                                      structs=("Nvfp4GemmParams",))


@functools.cache
def emu_sm90():
    """gemm_cuda.cu built with NK_HAS_SM90 and driver_nvfp4_gemm_arch.cpp (the mock CUTLASS GEMM),
    linked with quantize_cuda.cu (the decode) as a second object."""
    gen = {"gemm_cuda.emu.cpp": _emu_base.transformed(CSRC / "nvfp4" / "gemm_cuda.cu"),
           "quantize_cuda.emu.cpp": _emu_base.transformed(CSRC / "nvfp4" / "quantize_cuda.cu"),
           "params_layout.inc": _emu_base.emu_params.layout_table_cpp((CSRC / "nvfp4" / "gemm.h").read_text(),
                                                                      ("Nvfp4GemmParams",))}
    units = {"gemm": (_emu_base.EMU / "driver_nvfp4_gemm_arch.cpp", ["gemm_cuda.emu.cpp", "params_layout.inc"],
                      ["-DNK_HAS_SM90=1"]),
             "quantize": (None, ["quantize_cuda.emu.cpp"], [])}
    return _emu_base.EmuLibrary(_emu_base.build_emulated("nvfp4_gemm_sm90", None, gen, ("nvfp4",), units=units),
                                CSRC / "nvfp4" / "gemm.h", ("Nvfp4GemmParams",))


def Params(**fields):
    return emu().S["Nvfp4GemmParams"](**fields)


def splits_of(p):
    """The split count the op entry would pick (the emulator reports 132 SMs)."""
    return emu().value("emu_nvfp4_gemm_cuda_splits", p)


def run_emulated(a: NVFP4Tensor, b: NVFP4Tensor, out_dtype, bias=None, splits=None, expect_splits=None,
                 sm90=False):
    """The op entry's set-up (gemm.cpp: contiguous operands, float32 bias, split-K workspace of
    the entry's split count unless `splits` forces one) and one emulated launch; with `sm90`,
    the sm_90 path instead (its scratch garbage-filled: 0xFF bytes are NaN in bf16 and float32)."""
    ad, asc, bd, bsc = (t.contiguous() for t in (a.data, a.scales.view(torch.uint8), b.data, b.scales.view(torch.uint8)))
    ag, bg = a.global_scale.float().reshape(()).contiguous(), b.global_scale.float().reshape(()).contiguous()
    b32 = None if bias is None else bias.float().contiguous()
    M, N, K = ad.shape[0], bd.shape[0], ad.shape[1] * 2
    out = torch.full((M, N), float("nan"), dtype=out_dtype)
    p = Params(M=M, N=N, K=K, a_data=ad.data_ptr(), a_scales=asc.data_ptr(), b_data=bd.data_ptr(),
               b_scales=bsc.data_ptr(), a_global=ag.data_ptr(), b_global=bg.data_ptr(),
               bias=None if b32 is None else b32.data_ptr(), out=out.data_ptr(), out_dtype=DT_ENUM[out_dtype])
    if sm90:
        q = emu_sm90().S["Nvfp4GemmParams"](**{f: getattr(p, f) for f, _ in p._fields_})
        scratch = torch.full((emu_sm90().value("emu_nvfp4_gemm_sm90_scratch_bytes", q),), 0xFF, dtype=torch.uint8)
        emu_sm90().call("emu_nvfp4_gemm_sm90", q, ctypes.c_void_p(scratch.data_ptr()))
        return out
    if splits is None:
        splits = splits_of(p)
    if expect_splits is not None:
        assert splits == expect_splits
    ws = torch.full((splits * M * N if splits > 1 else 1,), float("nan"))
    emu().call("emu_nvfp4_gemm_cuda", p, ctypes.c_int(splits), ctypes.c_void_p(ws.data_ptr() if splits > 1 else None))
    return out


def test_params_layout():
    emu().check_layouts()


@pytest.mark.parametrize("M,N,K", [(1, 1, 16), (17, 15, 48), (36, 129, 272), (129, 17, 32), (128, 128, 64),
                                   (130, 136, 208)])
def test_gemm_matches_reference(M, N, K):
    a, b = rand_nvfp4(M, K, "cpu"), rand_nvfp4(N, K, "cpu")
    out = run_emulated(a, b, torch.float32)
    ref = gemm_reference(a, b, torch.float64)
    assert_close(out, ref, torch.float32, what=f"emulated gemm M={M} N={N} K={K}")


@pytest.mark.parametrize("M,N,K,splits,expect", [(17, 36, 1040, None, 4), (130, 9, 512, None, 2),
                                                  (40, 129, 272, 3, None), (5, 8, 48, 2, None)])
def test_split_k(M, N, K, splits, expect):
    """Few output tiles and a long K: the entry's split count (or a forced one, including a split
    with no K tile), partial sums reduced in split order, bias and alpha in the reduction."""
    a, b = rand_nvfp4(M, K, "cpu"), rand_nvfp4(N, K, "cpu")
    bias = torch.randn(N)
    for dt in (torch.float32, torch.bfloat16):
        out = run_emulated(a, b, dt, bias, splits=splits, expect_splits=expect)
        assert_close(out, gemm_reference(a, b, torch.float64, bias), dt, what=f"split-K M={M} N={N} K={K}")


def test_no_split_when_tiles_fill_the_gpu():
    p = Params(M=4096, N=4096, K=4096)
    assert splits_of(p) == 1
    p = Params(M=128, N=128, K=256)  # 4 K tiles: not worth splitting
    assert splits_of(p) == 1
    p = Params(M=128, N=1024, K=4096)  # 8 tiles on 132 SMs, 64 K tiles: 16 splits
    assert splits_of(p) == 16


def test_out_dtypes_bias_codes_and_special_scales():
    M, N, K = 40, 24, 128
    codes = torch.arange(256, dtype=torch.uint8)
    a_data = codes.repeat(M * K // 2 // 256 + 1)[: M * K // 2].reshape(M, K // 2)
    b_data = torch.flip(codes, [0]).repeat(N * K // 2 // 256 + 1)[: N * K // 2].reshape(N, K // 2)
    special = torch.tensor([0x00, 0x7E, 0x01, 0x07, 0x08, 0x38, 0xB8, 0x06, 0x3F, 0xFE], dtype=torch.uint8)
    a = NVFP4Tensor(a_data, special[torch.randint(0, 10, (M, K // 16))].view(torch.float8_e4m3fn),
                    torch.tensor(2.0 ** -12))
    b = NVFP4Tensor(b_data, special[torch.randint(0, 10, (N, K // 16))].view(torch.float8_e4m3fn),
                    torch.tensor(2.0 ** -12))
    bias = torch.randn(N)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for bi in (None, bias):
            out = run_emulated(a, b, dt, bi)
            assert_close(out, gemm_reference(a, b, torch.float64, bi), dt, what=f"emulated {dt} bias={bi is not None}")
    # same random operands through the public CPU op: both within float32 accumulation of each other
    a, b = rand_nvfp4(33, 96, "cpu"), rand_nvfp4(70, 96, "cpu")
    assert_close(run_emulated(a, b, torch.float32, bias[:24].repeat(3)[:70]),
                 nvfp4.gemm(a, b, torch.float32, bias[:24].repeat(3)[:70]).double(), torch.float32)


def test_k_zero_writes_bias():
    a, b = rand_nvfp4(5, 0, "cpu"), rand_nvfp4(9, 0, "cpu")
    bias = torch.randn(9)
    out = run_emulated(a, b, torch.float32, bias)
    assert torch.equal(out, bias.expand(5, 9))


def test_swizzle_and_bias_convert_helpers():
    for rows, cols in [(1, 1), (129, 17), (300, 8)]:
        s = torch.randint(0, 256, (rows, cols), dtype=torch.uint8)
        size = ((rows + 127) // 128) * 128 * ((cols + 3) // 4) * 4
        dst = torch.full((size,), 0xAB, dtype=torch.uint8)
        emu().call("emu_nvfp4_swizzle_scales_cuda", ctypes.c_void_p(s.data_ptr()), ctypes.c_void_p(dst.data_ptr()),
                   ctypes.c_longlong(rows), ctypes.c_longlong(cols))
        assert torch.equal(dst, nvfp4.swizzle_scales(s.view(torch.float8_e4m3fn)))  # the CPU twin
    acc, bias = torch.randn(7, 13), torch.randn(13)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for bi in (None, bias):
            out = torch.full((7, 13), float("nan"), dtype=dt)
            emu().call("emu_nvfp4_bias_convert_cuda", ctypes.c_void_p(acc.data_ptr()),
                       ctypes.c_void_p(None if bi is None else bi.data_ptr()), ctypes.c_void_p(out.data_ptr()),
                       ctypes.c_int(DT_ENUM[dt]), ctypes.c_longlong(7), ctypes.c_longlong(13))
            assert torch.equal(out, (acc + (0 if bi is None else bi)).to(dt))


# ---------------------------------------------------------------- the sm_90 path's composition


def test_sm90_params_layout():
    emu_sm90().check_layouts()


def _sm90_mock_calls():
    return emu_sm90().value("emu_nvfp4_sm90_mock_calls"), emu_sm90().value("emu_nvfp4_sm90_mock_f32_calls")


@pytest.mark.parametrize("M,N,K", [(1, 8, 16), (37, 136, 96), (130, 64, 272)])
def test_sm90_path_matches_reference(M, N, K):
    """Every output dtype with and without bias, global scales other than 1 on both sides: the
    decode, alpha, the D the GEMM writes (the output for bf16 without bias or float32 without
    bias, else the float32 accumulator) and the bias/convert pass, against float64."""
    a = rand_nvfp4(M, K, "cpu", global_scale=torch.tensor(3.0))
    b = rand_nvfp4(N, K, "cpu", global_scale=torch.tensor(2.0 ** -5))
    bias = torch.randn(N) * 4
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for bi in (None, bias):
            calls, f32_calls = _sm90_mock_calls()
            out = run_emulated(a, b, dt, bi, sm90=True)
            assert_close(out, gemm_reference(a, b, torch.float64, bi), dt, what=f"sm90 {dt} bias={bi is not None}")
            f32_d = not (bi is None and dt == torch.bfloat16)
            assert _sm90_mock_calls() == (calls + 1, f32_calls + f32_d), (dt, bi is not None)


@pytest.mark.parametrize("M,N,K", [(1, 8, 64), (37, 136, 128), (130, 64, 192)])
def test_sm90_decode_mma_path_matches_reference(monkeypatch, M, N, K):
    """NEMOKERNELS_NVFP4_GEMM_DECODE_MMA=1 (B decoded inside the mainloop): A decoded to fp16 in
    scratch, alpha, and the kernel's contract (mock) give every output dtype, with and without
    bias, against float64; K not a multiple of 64 keeps the bf16 decode + CUTLASS GEMM."""
    monkeypatch.setenv("NEMOKERNELS_NVFP4_GEMM_DECODE_MMA", "1")
    a = rand_nvfp4(M, K, "cpu", global_scale=torch.tensor(3.0))
    b = rand_nvfp4(N, K, "cpu", global_scale=torch.tensor(2.0 ** -5))
    bias = torch.randn(N) * 4
    lib = emu_sm90()
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for bi in (None, bias):
            calls, gemm_calls = lib.value("emu_nvfp4_decode_mma_mock_calls"), _sm90_mock_calls()
            out = run_emulated(a, b, dt, bi, sm90=True)
            assert_close(out, gemm_reference(a, b, torch.float64, bi), dt, what=f"decode_mma {dt} bias={bi is not None}")
            assert lib.value("emu_nvfp4_decode_mma_mock_calls") == calls + 1 and _sm90_mock_calls() == gemm_calls
    a = rand_nvfp4(M, 96, "cpu", global_scale=torch.tensor(3.0))
    b = rand_nvfp4(N, 96, "cpu", global_scale=torch.tensor(2.0 ** -5))
    calls, gemm_calls = lib.value("emu_nvfp4_decode_mma_mock_calls"), _sm90_mock_calls()
    run_emulated(a, b, torch.bfloat16, sm90=True)
    assert lib.value("emu_nvfp4_decode_mma_mock_calls") == calls and _sm90_mock_calls()[0] == gemm_calls[0] + 1


def test_sm90_path_exact_where_float32_sums_are():
    """Every code against scales 0, +-1, +-1.875, 0.5, K = 32: the decoded values are multiples of
    2^-4 below 12, so every float32 partial sum (multiples of 2^-8 below 2^12) is exact and the
    output is the float64 result rounded once to the output dtype, bit for bit (a decode that
    rounded, or alpha applied after a rounding, is not)."""
    M, N, K = 40, 24, 32
    codes = torch.arange(256, dtype=torch.uint8)
    a_data = codes.repeat(M * K // 2 // 256 + 1)[: M * K // 2].reshape(M, K // 2)
    b_data = torch.flip(codes, [0]).repeat(N * K // 2 // 256 + 1)[: N * K // 2].reshape(N, K // 2)
    special = torch.tensor([0x00, 0x38, 0xB8, 0x3F, 0xBF, 0x30], dtype=torch.uint8)
    a = NVFP4Tensor(a_data, special[torch.randint(0, 6, (M, K // 16))].view(torch.float8_e4m3fn),
                    torch.tensor(2.0 ** -3))
    b = NVFP4Tensor(b_data, special[torch.randint(0, 6, (N, K // 16))].view(torch.float8_e4m3fn),
                    torch.tensor(2.0 ** -4))
    ref = gemm_reference(a, b, torch.float64)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        out = run_emulated(a, b, dt, sm90=True)
        assert torch.equal(out, ref.to(dt)), dt
