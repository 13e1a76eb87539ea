"""grouped_gemm with NVFP4 expert weights (an NVFP4Tensor w of (E, N, K): W4A16 on the GPU, forward
only) against float64: out[r] = act(g[e] * a[r] @ What[e]^T), What = e2m1 x e4m3 of the codes,
g per expert or shared. CPU kernel, the portable CUDA kernel under the emulator, and on a GPU the
sm_90a wgmma kernel that decodes the weights in its mainloop (csrc/nvfp4/gemm_decode_mma_sm90.cu)
against the portable one; empty experts, rows past offsets[E], poisoned outputs, bad inputs,
opcheck, and the refusal of a gradient."""
import ctypes
import functools

import pytest
import torch

import cuda_emu as _emu_base
from conftest import DEVICES
from helpers import assert_close, poison_allocator
from nemokernels.moe import grouped_gemm
from nemokernels.nvfp4 import NVFP4Tensor
from nemokernels.nvfp4.reference import decode_reference
from test_grouped_gemm import assert_rows_outside_zero, offsets_from_counts

ops = torch.ops.nemokernels


def rand_experts(E, N, K, device, per_expert=True, seed=0):
    """Random codes (every code, -0 included), scales 2^-3 .. ~2^2 (E4M3 bytes 0x20..0x47), and a
    global scale per expert (or one)."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (E, N, K // 2), dtype=torch.uint8, generator=g)
    scales = torch.randint(0x20, 0x48, (E, N, K // 16), dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)
    glob = ((torch.rand(E, generator=g) + 0.5) / K ** 0.5) if per_expert else torch.tensor(0.3)
    return NVFP4Tensor(data.to(device), scales.to(device), glob.float().to(device))


def reference(a, w, offsets, activation):
    E = w.data.shape[0]
    what = decode_reference(NVFP4Tensor(w.data.cpu(), w.scales.cpu(), torch.tensor(1.0)), torch.float64)
    g = w.global_scale.cpu().double().reshape(-1).expand(E)
    out = torch.zeros(a.shape[0], w.data.shape[1], dtype=torch.float64)
    offs = offsets.cpu().tolist()
    for e in range(E):
        lo, hi = offs[e], offs[e + 1]
        y = g[e] * (a[lo:hi].cpu().double() @ what[e].T)
        out[lo:hi] = torch.relu(y).square() if activation == "relu2" else y
    return out


def case(counts, N, K, dtype, device, extra_rows=3, per_expert=True, seed=0, lead_rows=0):
    """lead_rows: rows before offsets[0] (which belong to no expert, as rows past offsets[E])."""
    offsets = offsets_from_counts(counts, device) + lead_rows
    R = int(offsets[-1]) + extra_rows
    a = torch.randn(R, K, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(device)
    return a, rand_experts(len(counts), N, K, device, per_expert, seed), offsets


def check(out, a, w, offsets, activation, dtype, what):
    ref = reference(a, w, offsets, activation)
    assert out.shape == ref.shape and out.dtype == dtype, what
    assert_close(out.cpu(), ref, dtype, factor=2.0 if activation == "relu2" else 1.0, what=what)
    assert_rows_outside_zero(out, offsets, what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("activation", ["none", "relu2"])
@pytest.mark.parametrize("per_expert", [True, False])
def test_matches_float64(device, dtype, activation, per_expert):
    for counts, N, K, lead in (([5, 0, 40, 1, 19], 24, 64, 0), ([3, 7], 20, 48, 2), ([130, 2, 0], 136, 128, 1)):
        a, w, offsets = case(counts, N, K, dtype, device, per_expert=per_expert, lead_rows=lead)
        poison_allocator(device)
        with torch.no_grad():
            out = grouped_gemm(a, w, offsets, activation)
        check(out, a, w, offsets, activation, dtype, f"{device} {dtype} {activation} N={N} K={K}")


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_and_empty(device):
    a, w, offsets = case([9, 0, 33], 24, 64, torch.bfloat16, device)
    with torch.no_grad():
        assert torch.equal(grouped_gemm(a, w, offsets, "relu2"), grouped_gemm(a, w, offsets, "relu2"))
        none = offsets_from_counts([0, 0, 0], device)
        assert torch.equal(grouped_gemm(a, w, none, "none"), torch.zeros(a.shape[0], 24, dtype=a.dtype, device=device))
        empty = grouped_gemm(a[:0], w, none, "none")
        assert empty.shape == (0, 24)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_and_no_gradient(device):
    a, w, offsets = case([4, 0, 6], 16, 32, torch.float32, device)
    # test_schema is left out as for nvfp4_gemm: its mutation check runs torch ops that have no
    # float8_e4m3fn CPU kernel; the schema declares no mutation.
    torch.library.opcheck(ops.grouped_gemm_nvfp4w, (a, w.data, w.scales, w.global_scale, offsets, "relu2"),
                          test_utils=("test_faketensor", "test_autograd_registration", "test_aot_dispatch_dynamic"))
    with pytest.raises(NotImplementedError, match="no gradient"):
        grouped_gemm(a.requires_grad_(), w, offsets)


BAD = [
    ("K not a multiple of 16", lambda a, w, o: (a[:, :24], w.data[:, :, :12], w.scales[:, :, :1], w.global_scale, o),
     "multiple of 16"),
    ("codes not uint8", lambda a, w, o: (a, w.data.to(torch.int16), w.scales, w.global_scale, o), "w.data"),
    ("codes K mismatch", lambda a, w, o: (a, w.data[:, :, :8], w.scales, w.global_scale, o), "w.data"),
    ("scales not e4m3", lambda a, w, o: (a, w.data, w.scales.view(torch.uint8), w.global_scale, o), "w.scales"),
    ("scales shape", lambda a, w, o: (a, w.data, w.scales[:, :8], w.global_scale, o), "w.scales"),
    ("global count", lambda a, w, o: (a, w.data, w.scales, torch.ones(2, device=a.device), o), "global_scale"),
    ("global dtype", lambda a, w, o: (a, w.data, w.scales, w.global_scale.double(), o), "global_scale"),
    ("offsets length", lambda a, w, o: (a, w.data, w.scales, w.global_scale, o[:-1]), "expert_offsets"),
    ("a float64", lambda a, w, o: (a.double(), w.data, w.scales, w.global_scale, o), "a"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,args,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise(device, name, args, match):
    a, w, offsets = case([4, 2, 6], 16, 32, torch.float32, device)
    with pytest.raises(RuntimeError, match=match):
        ops.grouped_gemm_nvfp4w(*args(a, w, offsets), "none")
    with pytest.raises(RuntimeError, match="activation"):
        ops.grouped_gemm_nvfp4w(a, w.data, w.scales, w.global_scale, offsets, "gelu")


# ---------------------------------------------------------------- the portable CUDA kernel, emulated

@functools.cache
def emu():
    return _emu_base.EmuLibrary.build("moe_nvfp4w", _emu_base.EMU / "driver_moe_nvfp4w.cpp",
                                      [_emu_base.CSRC / "moe" / "grouped_gemm_nvfp4w_cuda.cu"], ("moe", "nvfp4"),
                                      header=_emu_base.CSRC / "moe" / "grouped_gemm.h",
                                      structs=("GroupedGemmNvfp4wParams",))


def test_emulated_params_layout():
    emu().check_layouts()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("activation", ["none", "relu2"])
def test_emulated_portable_kernel(dtype, activation):
    """The zero fill and the SIMT kernel (4 token rows per pass: segments of 5, 1 and 7 rows test
    the partial pass) over NaN-poisoned outputs, against float64."""
    a, w, offsets = case([5, 0, 1, 7], 24, 48, dtype, "cpu", per_expert=(activation == "none"), lead_rows=2)
    out = torch.full((a.shape[0], 24), float("nan"), dtype=dtype)
    lib = emu()
    p = lib.S["GroupedGemmNvfp4wParams"]()
    p.dtype = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}[dtype]
    p.R, p.N, p.K, p.E = a.shape[0], 24, 48, 4
    p.offsets, p.a = offsets.data_ptr(), a.data_ptr()
    p.codes, p.scales, p.global_scale = w.data.data_ptr(), w.scales.data_ptr(), w.global_scale.data_ptr()
    p.global_stride = 1 if w.global_scale.numel() > 1 else 0
    p.act, p.out, p.arch = (1 if activation == "relu2" else 0), out.data_ptr(), 0
    lib.call("emu_nvfp4w_cuda", p)
    check(out, a, w, offsets, activation, dtype, f"emulated {dtype} {activation}")


# ---------------------------------------------------------------- the sm_90a kernel on a GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["none", "relu2"])
@pytest.mark.parametrize("counts,N,K", [([3, 0, 1, 70, 7, 0, 2, 40], 264, 1024),  # 64-token tiles, one or two
                                        ([300, 1, 0, 129], 136, 192),             # 128-token tiles, odd K steps
                                        ([2] * 64, 2688, 1024),                   # decode-sized: 64 experts
                                        ([1000, 3, 0, 40], 136, 128)])            # a hot expert: split token tiles
def test_sm90_kernel_and_the_portable_one(monkeypatch, dtype, activation, counts, N, K):
    """On an H100/H200 (sm_90a build) 16-bit tokens with K % 64 == 0 take the wgmma kernel that
    decodes the weights in its mainloop (the profiler shows it), the portable kernel
    (NEMOKERNELS_GROUPED_GEMM_PORTABLE=1) agrees within float32-accumulation noise, both match
    float64, the kernel is bit for bit repeatable, rows past offsets[E] are zeros."""
    a, w, offsets = case(counts, N, K, dtype, "cuda", extra_rows=5, lead_rows=3)
    poison_allocator("cuda")
    with torch.no_grad():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out = grouped_gemm(a, w, offsets, activation)
            torch.cuda.synchronize()
        again = grouped_gemm(a, w, offsets, activation)
        monkeypatch.setenv("NEMOKERNELS_GROUPED_GEMM_PORTABLE", "1")
        portable = grouped_gemm(a, w, offsets, activation)
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert any("decode_mma_kernel" in n for n in names), names
    assert torch.equal(out, again)
    check(out, a, w, offsets, activation, dtype, f"sm90 {dtype} {activation}")
    check(portable, a, w, offsets, activation, dtype, f"portable {dtype} {activation}")
