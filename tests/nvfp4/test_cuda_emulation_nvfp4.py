"""The NVFP4 quantize / dequantize CUDA kernels (csrc/nvfp4/quantize_cuda.cu) run on the CPU
through the emulator in tools/cuda_emu (see tools/cuda_emu/README.md): the .cu file is rewritten
by transform.py, compiled with g++ against the mock CUDA headers (with NK_NVFP4_MAX_BLOCKS=3, so
small tensors take several grid-stride iterations and the quantize prologue reduces several amax
partials) and driven through tools/cuda_emu/driver_nvfp4.cpp with the param structs the op entry
(csrc/nvfp4/quantize.cpp) fills. Codes, scales, global scale and dequantized values must equal
the CPU kernel's bit for bit (both run the numerics.cuh helpers), for every variant, dtype and
layout (vector path, strided scalar path, transposed view, partial 16x16 tiles). Outputs and the
unused part of the partials workspace are poisoned first.
"""
import functools
import subprocess

import pytest
import torch

import cuda_emu as base  # build helpers: compiler id, flags, transform, params

CSRC = base.CSRC
DT_ENUM = base.DT_ENUM
MAX_BLOCKS = 3


@functools.cache
def emu(slow_div=False):
    """The emulated quantize library (cached by content hash, see base.build_emulated);
    slow_div: built with NK_NVFP4_FAST_DIV_LIMIT=0, so units map to (row, block) through the
    64-bit division that only tensors of 2^31 units take on a GPU."""
    flags = [f"-DNK_NVFP4_MAX_BLOCKS={MAX_BLOCKS}"] + (["-DNK_NVFP4_FAST_DIV_LIMIT=0"] if slow_div else [])
    return base.EmuLibrary.build("nvfp4_slowdiv" if slow_div else "nvfp4", base.EMU / "driver_nvfp4.cpp",
                                 [CSRC / "nvfp4" / "quantize_cuda.cu"], ("nvfp4",), header=CSRC / "nvfp4" / "quantize.h",
                                 structs=("Nvfp4QuantParams", "Nvfp4DequantParams"), flags=flags)


def nvfp4_api():
    try:
        import nemokernels.nvfp4 as nv
        nv.quantize  # noqa: B018
    except Exception as e:  # pragma: no cover
        pytest.skip(f"nemokernels extension not importable: {e}")
    return nv


def quantize_emulated(a2d, *, block_2d=False, hadamard=False, stochastic_rounding=False, seed=0, global_amax=None,
                      seed_in_memory=False, slow_div=False):
    """The op entry's set-up (quantize.cpp) for a 2-D strided view and one emulated call."""
    E = emu(slow_div)
    R, C = a2d.shape
    data = torch.full((R, C // 2), 0x5A, dtype=torch.uint8)
    scales = torch.full((R, C // 16), 0xA5, dtype=torch.uint8)
    gs = torch.full((1,), float("nan"))
    partials = torch.full((1024,), float("nan"))  # entries past the grid must never be read
    p = E.S["Nvfp4QuantParams"]()
    p.rows, p.cols, p.dtype = R, C, DT_ENUM[a2d.dtype]
    p.a = a2d.data_ptr()
    p.a_sr, p.a_sc = a2d.stride(0), a2d.stride(1)
    p.block_2d, p.hadamard, p.stochastic = block_2d, hadamard, stochastic_rounding
    seed_t = torch.tensor([seed if seed < 2**63 else seed - 2**64], dtype=torch.int64)
    if seed_in_memory:  # the kernel reads the seed from memory (a tensor seed); p.seed is junk
        p.seed, p.seed_ptr = 0xDEADBEEF, seed_t.data_ptr()
    else:
        p.seed = seed & (2**64 - 1)
    ga = None if global_amax is None else torch.tensor([float(global_amax)], dtype=torch.float32)
    p.global_amax = None if ga is None else ga.data_ptr()
    p.partials = None if ga is not None else partials.data_ptr()
    p.data, p.scales, p.global_scale = data.data_ptr(), scales.data_ptr(), gs.data_ptr()
    E.call("emu_nvfp4_quantize_cuda", p)
    return data, scales, gs[0]


def dequantize_emulated(data, scales, gs, dtype, slow_div=False):
    E = emu(slow_div)
    R, C = data.shape[0], data.shape[1] * 2
    out = torch.full((R, C), float("nan"), dtype=dtype)
    g = gs.reshape(1).float().contiguous()
    p = E.S["Nvfp4DequantParams"]()
    p.rows, p.cols = R, C
    p.data, p.d_sr = data.data_ptr(), data.stride(0)
    p.scales, p.s_sr = scales.data_ptr(), scales.stride(0)
    p.global_scale = g.data_ptr()
    p.dtype = DT_ENUM[dtype]
    p.out = out.data_ptr()
    E.call("emu_nvfp4_dequantize_cuda", p)
    return out


def test_params_layout():
    emu().check_layouts()


ENCODER_CHECK = r"""
#include <cstdio>
#include "nvfp4/numerics.cuh"
using namespace nk::nvfp4;
static float of_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static long bad = 0;
static void check(float m) {
  if (e2m1_mag_rne(m) != e2m1_mag_rne_ref(m)) { if (bad++ < 5) printf("rne %a\n", m); }
  // SR: u = k 2^-24 at the ends and around the step of the definition's threshold p
  uint32_t k0 = 0;
  if (m < 6.0f) {
    const uint8_t i = e2m1_mag_floor(m);
    const float p = (m - e2m1_decode(i)) * (i < 4 ? 2.0f : (i < 6 ? 1.0f : 0.5f));
    k0 = static_cast<uint32_t>(p * 16777216.0f);
  }
  const uint32_t ks[] = {0u, k0 ? k0 - 1 : 0u, k0, k0 + 1, 16777215u};
  for (uint32_t k : ks) {
    const float u = static_cast<float>(k > 16777215u ? 16777215u : k) * (1.0f / 16777216.0f);
    if (e2m1_mag_sr(m, u) != e2m1_mag_sr_ref(m, u)) { if (bad++ < 5) printf("sr %a %a\n", m, u); }
  }
}
int main() {
  for (uint32_t b = 0x3d800000u; b < 0x41800000u; ++b) check(of_bits(b));  // every float in [2^-4, 16)
  for (uint32_t b = 0; b < 0x3d800000u; b += 4099u) check(of_bits(b));     // 0, subnormals, small
  for (uint32_t b = 0x41800000u; b <= 0x7fffffffu; b += 4099u) check(of_bits(b));  // large, inf, NaN
  check(of_bits(0x7f800000u));
  check(of_bits(0xffc00000u));
  printf("mismatches %ld\n", bad);
  return bad != 0;
}
"""


def test_encoders_equal_their_definitions(tmp_path):
    """The branch-free E2M1 encoders (numerics.cuh e2m1_mag_rne, e2m1_mag_sr, used by the CPU and
    CUDA kernels) against the threshold chains that define them (e2m1_mag_rne_ref,
    e2m1_mag_sr_ref): every float32 in [2^-4, 16) (all ties and grid points), a sweep of the rest
    with inf and NaN, and for SR the uniforms at both ends and around each threshold."""
    if base._compiler_id() is None:
        pytest.skip(f"needs {base.CXX}")
    src = tmp_path / "encoders.cpp"
    src.write_text(ENCODER_CHECK)
    exe = tmp_path / "encoders"
    subprocess.run([base.CXX, "-std=c++20", "-O2", f"-I{CSRC}", str(src), "-o", str(exe)], check=True,
                   capture_output=True, text=True)
    r = subprocess.run([str(exe)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


VARIANTS = [
    {},
    {"block_2d": True},
    {"hadamard": True},
    {"stochastic_rounding": True},
    {"block_2d": True, "hadamard": True, "stochastic_rounding": True},
]


def _layouts(dtype):
    """(name, 2-D view): contiguous (vector loads), padded rows (vector), sliced columns (base
    off alignment: scalar), column stride 2 (scalar), transposed (quantize_t's view), partial
    16x16 tiles, more tiles than MAX_BLOCKS * 256 threads cover in one pass, and an odd number
    of column blocks (the tile path's paired 16-byte store needs an even one)."""
    out = [
        ("contig", torch.randn(37, 64).to(dtype)),
        ("padded", torch.randn(20, 96 + 16).to(dtype)[:, :96]),
        ("sliced", torch.randn(18, 64 + 3).to(dtype)[:, 1:65]),
        ("stride2", torch.randn(16, 64).to(dtype)[:, ::2]),
        ("transposed", torch.randn(48, 32).to(dtype).t()),
        ("transposed_partial", torch.randn(32, 20).to(dtype).t()),  # 20 rows: a partial row tile
        ("many_tiles", torch.randn(80, 192).to(dtype)),  # 960 units > 3 blocks x 256 threads
        ("odd_blocks", torch.randn(33, 80).to(dtype)),  # 5 column blocks: no paired 16-byte store
    ]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v) or "rne")
def test_quantize_bit_identical_to_cpu(dtype, variant):
    nv = nvfp4_api()
    for name, a in _layouts(dtype):
        a = a * 3
        kw = dict(variant, seed=1234567 + len(name))
        data, scales, gs = quantize_emulated(a, **kw)
        want = nv.quantize_t(a.t(), **kw) if name.startswith("transposed") else nv.quantize(a, **kw)
        assert torch.equal(data, want.data), f"{name}: codes differ at {(data != want.data).nonzero()[:4].tolist()}"
        assert torch.equal(scales, want.scales.view(torch.uint8)), f"{name}: scales"
        assert torch.equal(gs, want.global_scale), f"{name}: global scale {gs} != {want.global_scale}"


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v) or "rne")
def test_quantize_64bit_unit_map(variant):
    """The 64-bit unit -> (row, block) path (tensors of 2^31 units and more) gives the same codes."""
    nv = nvfp4_api()
    for name, a in _layouts(torch.bfloat16):
        if name not in ("contig", "transposed_partial", "many_tiles", "odd_blocks"):
            continue
        kw = dict(variant, seed=99)
        data, scales, gs = quantize_emulated(a, slow_div=True, **kw)
        want = nv.quantize_t(a.t(), **kw) if name.startswith("transposed") else nv.quantize(a, **kw)
        assert torch.equal(data, want.data) and torch.equal(scales, want.scales.view(torch.uint8)), name
        assert torch.equal(gs, want.global_scale), name


def test_seed_from_memory():
    nv = nvfp4_api()
    a = torch.randn(48, 64)
    for kw in ({"stochastic_rounding": True}, {"hadamard": True, "block_2d": True}):
        data, scales, gs = quantize_emulated(a, seed=2**63 + 5, seed_in_memory=True, **kw)
        want = nv.quantize(a, seed=2**63 + 5, **kw)
        assert torch.equal(data, want.data) and torch.equal(scales, want.scales.view(torch.uint8))


def test_given_amax_and_special_values():
    nv = nvfp4_api()
    a = torch.randn(40, 48)
    for amax in (a.abs().max().item() * 2, 0.5):
        data, scales, gs = quantize_emulated(a, global_amax=amax)
        want = nv.quantize(a, global_amax=amax)
        assert torch.equal(data, want.data) and torch.equal(scales, want.scales.view(torch.uint8))
        assert torch.equal(gs, want.global_scale)
    z = torch.zeros(16, 32)
    data, scales, gs = quantize_emulated(z)
    assert (data == 0).all() and (scales == 0).all() and gs.item() == 1.0
    t = torch.randn(32, 32)
    t[0] *= 1e6
    t[1] *= 1e-6
    data, scales, gs = quantize_emulated(t, block_2d=False)
    want = nv.quantize(t)
    assert torch.equal(data, want.data) and torch.equal(scales, want.scales.view(torch.uint8))
    # non-finite input: no error on the GPU path, the global scale comes out NaN
    t[5, 5] = float("inf")
    assert torch.isnan(quantize_emulated(t)[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dequantize_bit_identical_to_cpu(dtype):
    nv = nvfp4_api()
    for R, C in [(37, 64), (5, 16), (70, 208)]:  # 70 x 13 blocks: several grid-stride passes
        q = nv.quantize(torch.randn(R, C), block_2d=R % 2 == 0)
        out = dequantize_emulated(q.data, q.scales.view(torch.uint8), q.global_scale, dtype)
        assert torch.equal(out, nv.dequantize(q, dtype))
    # every code byte (both signs of every magnitude, -0 included) under random scales, bit for bit
    codes = torch.arange(256, dtype=torch.uint8).reshape(16, 16).repeat(1, 2)
    sc = torch.randint(0, 0x7F, (16, 4), dtype=torch.uint8)
    q = nv.NVFP4Tensor(codes, sc.view(torch.float8_e4m3fn), torch.tensor(0.37))
    out = dequantize_emulated(codes, sc, q.global_scale, dtype)
    bits = {torch.float32: torch.int32}.get(dtype, torch.int16)
    assert torch.equal(out.view(bits), nv.dequantize(q, dtype).view(bits))
    # strided data rows (a row slice of a wider buffer): the kernel takes a row stride
    q = nv.quantize(torch.randn(16, 64))
    wide = torch.zeros(16, 48, dtype=torch.uint8)
    wide[:, :32] = q.data
    s_wide = torch.zeros(16, 8, dtype=torch.uint8)
    s_wide[:, :4] = q.scales.view(torch.uint8)
    out = dequantize_emulated(wide[:, :32], s_wide[:, :4], q.global_scale, torch.float32)
    assert torch.equal(out, nv.dequantize(q, torch.float32))
    # a row stride that is not a multiple of 8 bytes: the byte-load path (no 8-byte code loads)
    odd = torch.zeros(16, 37, dtype=torch.uint8)
    odd[:, :32] = q.data
    out = dequantize_emulated(odd[:, :32], q.scales.view(torch.uint8), q.global_scale, torch.bfloat16)
    assert torch.equal(out, nv.dequantize(q, torch.bfloat16))
    # the 64-bit unit -> (row, block) path
    out = dequantize_emulated(odd[:, :32], q.scales.view(torch.uint8), q.global_scale, torch.bfloat16, slow_div=True)
    assert torch.equal(out, nv.dequantize(q, torch.bfloat16))
