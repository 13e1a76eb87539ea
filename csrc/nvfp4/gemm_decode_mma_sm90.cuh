// CuTe side and scalar pieces of the NVFP4 GEMM that decodes B inside the mainloop on sm_90a
// (gemm_decode_mma_sm90.cu): out (M x N) = alpha * A (M x K) B^T, A the activations already
// decoded to fp16, B (N x K) the NVFP4 weights decoded in registers into wgmma's A operand. The
// product is taken as D^T = B A^T: 128 weight rows (two warpgroups of 64) by kTok tokens per CTA
// (128, or 256 when M is large: half the decode work per MMA).
// Host-compilable: tests/nvfp4/nvfp4_sm90_check.cu checks the decoder on every input and the
// fragment map and tile layout against CuTe's.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

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

// E: the 16-bit type of the tokens and of the decoded weights, cute::half_t (nvfp4.gemm, whose
// activations are decoded to fp16) or cute::bfloat16_t (bf16 tokens: the MoE experts).
template <class E, int kTok>  // kTok: tokens (output rows m) per CTA, 64 to 256
struct Cfg {
  // The token tile of one stage, K-major (tokens' 64 K values contiguous), 128-byte swizzle.
  using SmemX = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<kTok>, Int<kK>>{}));
  // D^T (kRows x kTok) += B (registers) A^T (shared memory), K = 16 per instruction.
  using Mma = decltype(make_tiled_mma(
      GMMA::rs_op_selector<E, E, float, Shape<_64, Int<kTok>, _16>, GMMA::Major::K, GMMA::Major::K>(),
      Layout<Shape<_2, _1, _1>>{}));
};

template <class E>
constexpr bool kIsHalf = std::is_same_v<E, cute::half_t>;

// High and low bytes of bf16(E2M1 magnitude 0, .5, 1, 1.5 | 2, 3, 4, 6) as byte-permute pools
// (0x0000 0x3F00 0x3F80 0x3FC0 0x4000 0x4040 0x4080 0x40C0); index 0 gives 0x00 in both.
constexpr uint32_t kE2M1Bf16HiLo = 0x3F3F3F00u, kE2M1Bf16HiHi = 0x40404040u;
constexpr uint32_t kE2M1Bf16LoLo = 0xC0800000u, kE2M1Bf16LoHi = 0xC0804000u;

// Four E2M1 codes x = a | b << 8, byte a holding elements (c, c + 1) and byte b elements
// (c + 8, c + 9) (element 2i in the low nibble of byte i), as two E x2: h0 = (a.lo, a.hi),
// h1 = (b.lo, b.hi), low half first: the order of wgmma's A fragment (a thread's columns
// 2t, 2t + 1 and 2t + 8, 2t + 9 of a k16 block). fp16: one byte permute of the pool (the fp16
// magnitudes' low bytes are 0); bf16: a permute for the high and one for the low bytes. Signs
// move to bits 15 and 31; code 8 gives -0 as e2m1_decode does. Bits above 15 of x are ignored.
template <class E>
NK_HD void e2m1x4_to_x2(uint32_t x, uint32_t& h0, uint32_t& h1) {
  const uint32_t s0 = ((x << 12) & 0x8000u) | ((x << 24) & 0x80000000u);
  const uint32_t s1 = ((x << 4) & 0x8000u) | ((x << 16) & 0x80000000u);
  const uint32_t hi0 = ((x << 4) & 0x70u) | ((x << 8) & 0x7000u), hi1 = ((x >> 4) & 0x70u) | (x & 0x7000u);
  if constexpr (kIsHalf<E>) {
    h0 = nvfp4::byte_perm(nvfp4::kE2M1HalfPoolLo, nvfp4::kE2M1HalfPoolHi, hi0) | s0;
    h1 = nvfp4::byte_perm(nvfp4::kE2M1HalfPoolLo, nvfp4::kE2M1HalfPoolHi, hi1) | s1;
  } else {
    const uint32_t lo0 = (x & 0x7u) | ((x << 4) & 0x700u), lo1 = ((x >> 8) & 0x7u) | ((x >> 4) & 0x700u);
    h0 = nvfp4::byte_perm(kE2M1Bf16HiLo, kE2M1Bf16HiHi, hi0) | nvfp4::byte_perm(kE2M1Bf16LoLo, kE2M1Bf16LoHi, lo0) | s0;
    h1 = nvfp4::byte_perm(kE2M1Bf16HiLo, kE2M1Bf16HiHi, hi1) | nvfp4::byte_perm(kE2M1Bf16LoLo, kE2M1Bf16LoHi, lo1) | s1;
  }
}

// Two E4M3 bytes (bits 0..15) as E x2, exactly (every E4M3 value is an fp16 and a bf16 value;
// 0x7f/0xff are NaN): cvt.rn.f16x2.e4m3x2 on the device (sm_89+), then for bf16 through float
// (exact both ways); e4m3_decode on the host.
template <class E>
NK_HD uint32_t e4m3x2_to_x2(uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  uint32_t h;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h) : "h"(static_cast<unsigned short>(bytes & 0xffffu)));
  if constexpr (kIsHalf<E>) {
    return h;
  } else {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&h));
    const __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
    return *reinterpret_cast<const uint32_t*>(&b);
  }
#else
  auto bits = [](float v) -> uint32_t {
    if constexpr (kIsHalf<E>) return __half_as_ushort(__float2half_rn(v));
    else return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  };
  return bits(nvfp4::e4m3_decode(static_cast<uint8_t>(bytes))) |
         (bits(nvfp4::e4m3_decode(static_cast<uint8_t>(bytes >> 8))) << 16);
#endif
}

// x * s per 16-bit half, round to nearest (exact for a code times a scale: at most 6 significant
// bits, magnitude in [2^-10, 2688] or 0, a normal number in both types).
template <class E>
NK_HD uint32_t mul2_bits(uint32_t x, uint32_t s) {
#if defined(__CUDA_ARCH__)
  if constexpr (kIsHalf<E>) {
    __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&x), *reinterpret_cast<const __half2*>(&s));
    return *reinterpret_cast<const uint32_t*>(&r);
  } else {
    __nv_bfloat162 r =
        __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&x), *reinterpret_cast<const __nv_bfloat162*>(&s));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
#else
  auto val = [](uint32_t v) -> float {
    const unsigned short b = static_cast<unsigned short>(v);
    if constexpr (kIsHalf<E>) return __half2float(__ushort_as_half(b));
    else return __bfloat162float(__ushort_as_bfloat16(b));
  };
  auto bits = [](float v) -> uint32_t {
    if constexpr (kIsHalf<E>) return __half_as_ushort(__float2half_rn(v));
    else return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  };
  return bits(val(x & 0xffffu) * val(s & 0xffffu)) | (bits(val(x >> 16) * val(s >> 16)) << 16);
#endif
}

// Decoding through a table in shared memory: entry b of the 256 is the E x2 pair of code byte b
// (low nibble in the low half), built by e2m1x4_to_x2 and replicated 32 times so that lane l
// reads copy l (word 32 b + l, bank l: no conflicts whatever the codes). A pair costs a byte
// extract, an address, one LDS and the scale multiply, against one to three permutes and the
// sign merges of e2m1x4_to_x2.
constexpr int kLutWords = 256 * 32;
template <class E>
NK_HD uint32_t lut_entry(uint32_t byte) {
  uint32_t h0, h1;
  e2m1x4_to_x2<E>(byte & 0xffu, h0, h1);
  return h0;
}
// One weight row's part of the A fragment for one stage: the row's 32 code bytes w[0..7] (64
// elements) and its 4 scale bytes (one per k16 block); t = lane % 4. For k16 block kb the thread
// needs elements 16 kb + 2t, +1 (byte t of word 2 kb) and 16 kb + 8 + 2t, +1 (byte t of word
// 2 kb + 1); out[kb][0], out[kb][1] are their E x2 pairs, scaled.
template <class E>
NK_HD void decode_row_lut(const uint32_t (&w)[8], uint32_t scales, int lane, const uint32_t* lut,
                          uint32_t (&out)[4][2]) {
  const uint32_t sel = static_cast<uint32_t>(lane % 4) | 0x4440u;  // byte t, then zeros
  const uint32_t* mine = lut + lane;
  const uint32_t sh[2] = {e4m3x2_to_x2<E>(scales), e4m3x2_to_x2<E>(scales >> 16)};  // blocks 0, 1 | 2, 3
  for (int kb = 0; kb < 4; ++kb) {
    // block kb's scale in both halves: bytes (0, 1) or (2, 3) of its x2 word, twice
    const uint32_t s = nvfp4::byte_perm(sh[kb / 2], 0u, (kb % 2) ? 0x3232u : 0x1010u);
    out[kb][0] = mul2_bits<E>(mine[32 * nvfp4::byte_perm(w[2 * kb], 0u, sel)], s);
    out[kb][1] = mul2_bits<E>(mine[32 * nvfp4::byte_perm(w[2 * kb + 1], 0u, sel)], s);
  }
}

}  // namespace nvfp4_sm90
}  // namespace nk
