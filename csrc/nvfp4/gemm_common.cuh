// Helpers of the NVFP4 GEMM kernels, shared by CPU and CUDA code (NK_HD): the packed-code ->
// fp16x2 decoder the portable tensor-core kernel runs in registers.
//
// Why fp16 operands: e2m1(code) * e4m3(scale) has at most 6 significant bits and lies in
// [2^-10, 2688] (or is 0), so it is exact in fp16 as a *normal* number (fp16 normals start at
// 2^-14), exactly as in bf16; an fp16 tensor-core MMA with float32 accumulation is then exact
// up to the float32 accumulation, like the bf16 one, and the decoder below produces fp16
// values with one byte permute (the E2M1 magnitudes are fp16 numbers whose low byte is 0).
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace nk::nvfp4 {

// The fp16 high bytes of the E2M1 magnitudes 0, .5, 1, 1.5 | 2, 3, 4, 6 (low bytes are 0):
// a byte-permute pool indexed by the 3 magnitude bits of a code.
constexpr uint32_t kE2M1HalfPoolLo = 0x3E3C3800u;
constexpr uint32_t kE2M1HalfPoolHi = 0x46444240u;

// __byte_perm(x, y, s): byte i of the result is byte ((s >> 4i) & 7) of the 8-byte {y:x}
// (x holds bytes 0..3). Same function on the host, for CPU checks of the decoder.
NK_HD uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, s);
#else
  const uint64_t pool = (uint64_t(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= uint32_t((pool >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
#endif
}

// Eight E2M1 codes (one 32-bit word: codes n0..n7 = elements 0..7, n_i in bits 4i..4i+3) ->
// four fp16x2 (low half = first element): h[0] = (n0, n2), h[1] = (n1, n3), h[2] = (n4, n6),
// h[3] = (n5, n7). The pairing is free because the GEMM only needs A and B to put the same
// element in the same MMA k slot; both operands use this decoder.
// Magnitude: a byte permute of the pool with selectors in the nibbles of output bytes 1 and 3
// (bytes 0 and 2 select pool byte 0 = 0x00). Sign: the code's bit 3 moved to bit 15 / 31.
NK_HD void e2m1x8_to_half2x4(uint32_t x, uint32_t (&h)[4]) {
  h[0] = byte_perm(kE2M1HalfPoolLo, kE2M1HalfPoolHi, (x << 4) & 0x7070u) | ((x << 12) & 0x8000u) |
         ((x << 20) & 0x80000000u);
  h[1] = byte_perm(kE2M1HalfPoolLo, kE2M1HalfPoolHi, x & 0x7070u) | ((x << 8) & 0x8000u) |
         ((x << 16) & 0x80000000u);
  h[2] = byte_perm(kE2M1HalfPoolLo, kE2M1HalfPoolHi, (x >> 12) & 0x7070u) | ((x >> 4) & 0x8000u) |
         ((x << 4) & 0x80000000u);
  h[3] = byte_perm(kE2M1HalfPoolLo, kE2M1HalfPoolHi, (x >> 16) & 0x7070u) | ((x >> 8) & 0x8000u) |
         (x & 0x80000000u);
}

// Element index (0..7 within the word) of the low / high half of h[j] above.
NK_HD int e2m1x8_lo_element(int j) { return (j >> 1) * 4 + (j & 1); }
NK_HD int e2m1x8_hi_element(int j) { return (j >> 1) * 4 + (j & 1) + 2; }

}  // namespace nk::nvfp4
