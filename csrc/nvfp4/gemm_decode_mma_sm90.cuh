// CuTe side and scalar pieces of the NVFP4 GEMM that decodes B inside the mainloop on sm_90a
// (gemm_decode_mma_sm90.cu): out (M x N) = alpha * A (M x K) B^T, A the activations already
// decoded to fp16, B (N x K) the NVFP4 weights decoded in registers into wgmma's A operand. The
// product is taken as D^T = B A^T: 128 weight rows (two warpgroups of 64) by kTok tokens per CTA
// (128, or 256 when M is large: half the decode work per MMA).
// Host-compilable: tests/nvfp4/nvfp4_sm90_check.cu checks the decoder on every input and the
// fragment map and tile layout against CuTe's.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include <cute/tensor.hpp>

#include "common/macros.h"
#include "common/wgmma_sm90.cuh"
#include "nvfp4/gemm_common.cuh"
#include "nvfp4/numerics.cuh"

namespace nk {
namespace nvfp4_sm90 {

using namespace cute;

constexpr int kThreads = 256;  // two warpgroups, 64 weight rows each
constexpr int kRows = 128;     // weight rows (output columns n) per CTA
constexpr int kK = 64;         // K per pipeline stage: four k16 blocks, four NVFP4 scale blocks
constexpr int kStages = 4;

using E = cute::half_t;
template <int kTok>  // tokens (output rows m) per CTA: 128 or 256
struct Cfg {
  // The token tile of one stage, K-major (tokens' 64 K values contiguous), 128-byte swizzle.
  using SmemX = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<kTok>, Int<kK>>{}));
  // D^T (kRows x kTok) += B (registers) A^T (shared memory), K = 16 per instruction.
  using Mma = decltype(make_tiled_mma(
      GMMA::rs_op_selector<E, E, float, Shape<_64, Int<kTok>, _16>, GMMA::Major::K, GMMA::Major::K>(),
      Layout<Shape<_2, _1, _1>>{}));
};

// Four E2M1 codes x = a | b << 8, byte a holding elements (c, c + 1) and byte b elements
// (c + 8, c + 9) (element 2i in the low nibble of byte i), as two fp16x2: h0 = (a.lo, a.hi),
// h1 = (b.lo, b.hi), low half first: the order of wgmma's A fragment (a thread's columns
// 2t, 2t + 1 and 2t + 8, 2t + 9 of a k16 block). Magnitudes by one byte permute of the fp16 pool
// (their low bytes are 0), signs moved to bits 15 and 31; code 8 gives -0 as e2m1_decode does.
NK_HD void e2m1x4_to_half2x2(uint32_t x, uint32_t& h0, uint32_t& h1) {
  h0 = nvfp4::byte_perm(nvfp4::kE2M1HalfPoolLo, nvfp4::kE2M1HalfPoolHi, ((x << 4) & 0x70u) | ((x << 8) & 0x7000u)) |
       ((x << 12) & 0x8000u) | ((x << 24) & 0x80000000u);
  h1 = nvfp4::byte_perm(nvfp4::kE2M1HalfPoolLo, nvfp4::kE2M1HalfPoolHi, ((x >> 4) & 0x70u) | (x & 0x7000u)) |
       ((x << 4) & 0x8000u) | ((x << 16) & 0x80000000u);
}

// Two E4M3 bytes (bits 0..15) as fp16x2, exactly (every E4M3 value is an fp16 value; 0x7f/0xff
// are NaN): one cvt.rn.f16x2.e4m3x2 on the device (sm_89+), e4m3_decode on the host.
NK_HD uint32_t e4m3x2_to_half2(uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint32_t h;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(static_cast<unsigned short>(bytes & 0xffffu)));
  return h;
#else
  const uint32_t lo = __half_as_ushort(__float2half_rn(nvfp4::e4m3_decode(static_cast<uint8_t>(bytes))));
  const uint32_t hi = __half_as_ushort(__float2half_rn(nvfp4::e4m3_decode(static_cast<uint8_t>(bytes >> 8))));
  return lo | (hi << 16);
#endif
}

// x * s per fp16 half, round to nearest (exact for a code times a scale: at most 6 significant
// bits, magnitude in [2^-10, 2688] or 0, an fp16 normal).
NK_HD uint32_t hmul2_bits(uint32_t x, uint32_t s) {
#if defined(__CUDA_ARCH__)
  __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&x), *reinterpret_cast<const __half2*>(&s));
  return *reinterpret_cast<const uint32_t*>(&r);
#else
  auto half = [](uint32_t v) { return __half2float(__ushort_as_half(static_cast<unsigned short>(v))); };
  const uint32_t lo = __half_as_ushort(__float2half_rn(half(x & 0xffffu) * half(s & 0xffffu)));
  const uint32_t hi = __half_as_ushort(__float2half_rn(half(x >> 16) * half(s >> 16)));
  return lo | (hi << 16);
#endif
}

// One weight row's part of the A fragment for one stage: the row's 32 code bytes w[0..7] (64
// elements) and its 4 scale bytes (one per k16 block); t = lane % 4. For k16 block kb the thread
// needs elements 16 kb + 2t, +1 (byte t of word 2 kb) and 16 kb + 8 + 2t, +1 (byte t of word
// 2 kb + 1); out[kb][0], out[kb][1] are their fp16x2 pairs, scaled.
NK_HD void decode_row(const uint32_t (&w)[8], uint32_t scales, int t, uint32_t (&out)[4][2]) {
  const uint32_t sel = static_cast<uint32_t>(t) | (static_cast<uint32_t>(t + 4) << 4);
  const uint32_t sh[2] = {e4m3x2_to_half2(scales), e4m3x2_to_half2(scales >> 16)};  // scales of blocks 0, 1 | 2, 3
  for (int kb = 0; kb < 4; ++kb) {
    uint32_t h0, h1;
    e2m1x4_to_half2x2(nvfp4::byte_perm(w[2 * kb], w[2 * kb + 1], sel), h0, h1);
    // block kb's scale in both halves: bytes (0, 1) or (2, 3) of its fp16x2 word, twice
    const uint32_t s = nvfp4::byte_perm(sh[kb / 2], 0u, (kb % 2) ? 0x3232u : 0x1010u);
    out[kb][0] = hmul2_bits(h0, s);
    out[kb][1] = hmul2_bits(h1, s);
  }
}

}  // namespace nvfp4_sm90
}  // namespace nk
