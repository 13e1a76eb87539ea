// NVFP4 scalar numerics shared by the CPU and CUDA kernels (docs/design.md section 4.3).
// E2M1 codes: bit 3 sign, bits 2..0 index into {0, .5, 1, 1.5, 2, 3, 4, 6}. Element 2i of a row
// sits in the low nibble of byte i. Block scales are float8 E4M3 (fn: no infinities, 0x7f/0xff NaN).
// Encoders (round-to-nearest-even, stochastic rounding) live beside these decoders.
#pragma once
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/macros.h"
#include "common/philox.h"

namespace nk::nvfp4 {

constexpr int kBlock = 16;            // elements per block scale
constexpr float kE2M1Max = 6.0f;
constexpr float kE4M3Max = 448.0f;

// Value of a 4-bit E2M1 code.
NK_HD float e2m1_decode(uint8_t code) {
  const uint8_t mag = code & 0x7;
  // 0, .5, 1, 1.5 are subnormal/low; 2, 3, 4, 6 have exponents 1..2 (bias 1).
  const float v = mag < 4 ? 0.5f * float(mag) : float(1 << ((mag >> 1) - 1)) * (1.0f + 0.5f * float(mag & 1));
  return (code & 0x8) ? -v : v;
}

// Value of a float8 E4M3 (fn) byte: 1 sign, 4 exponent (bias 7), 3 mantissa bits.
NK_HD float e4m3_decode(uint8_t b) {
  const int exp = (b >> 3) & 0xf, man = b & 0x7;
  float v;
  if (exp == 0xf && man == 0x7) {
    v = std::numeric_limits<float>::quiet_NaN();
  } else if (exp == 0) {
    v = float(man) * (1.0f / 512.0f);  // subnormal: man * 2^-9
  } else {
    v = (1.0f + float(man) * 0.125f) * float(1u << exp) * (1.0f / 128.0f);  // 2^(exp-7), exact
  }
  return (b & 0x80) ? -v : v;
}

// ------------------------------------------------------------------------------------------
// Encoders. Every step below is an IEEE float32 operation with one correctly rounded result
// (division, multiplication, addition, comparison) and no expression the compiler may contract
// into an FMA, so the CPU (GCC/Clang) and CUDA (nvcc without fast-math) kernels, and the
// PyTorch reference in nemokernels/nvfp4/reference.py, produce bit-identical codes and scales.
//
//   s_enc    = 2688 / amax                       (1 when amax == 0; FLT_MAX when it overflows)
//   s_b      = e4m3_rne_sat((amax_b / 6) * s_enc)
//   inv_b    = min(s_enc / float(s_b), FLT_MAX)  (0 when s_b == 0: the block's codes are 0)
//   code     = e2m1_rne_sat(x * inv_b)           (or stochastic rounding)
// x * inv_b (one division per block, one multiply per element) rather than x * s_enc / s_b (a
// division per element): two roundings either way; this one is cheaper on the GPU and is what
// TransformerEngine does, so codes agree with it for finite, non-extreme inputs.

constexpr float kFloatMax = 3.402823466e38f;

// Bits of a float (memcpy: defined behaviour on the host, a register move on the device).
NK_HD uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}

// Global encode scale from the tensor amax (of the values as quantized, i.e. after the
// Hadamard transform when one is applied). NaN when amax is not finite (non-finite input).
NK_HD float nvfp4_encode_scale(float amax) {
  if (!(amax == amax) || amax > kFloatMax) return std::numeric_limits<float>::quiet_NaN();
  if (amax == 0.0f) return 1.0f;
  const float s = (kE4M3Max * kE2M1Max) / amax;
  return s > kFloatMax ? kFloatMax : s;
}

// Float8 E4M3 (fn) byte of a non-negative float, round to nearest even, saturating at 448
// (NaN -> 0x7f). Values below the smallest subnormal's half round to 0.
NK_HD uint8_t e4m3_encode_rne_sat(float f) {
  if (!(f == f)) return 0x7f;
  if (f >= kE4M3Max) return 0x7e;
  if (f < 0.015625f) {  // below 2^-6: subnormal grid of step 2^-9
    const float q = f * 512.0f;  // exact (power of two), in [0, 8)
    const int fl = static_cast<int>(q);
    const float fr = q - static_cast<float>(fl);  // exact
    const int r = fl + ((fr > 0.5f || (fr == 0.5f && (fl & 1))) ? 1 : 0);
    return static_cast<uint8_t>(r);  // r == 8 is 0x08 = 2^-6, the smallest normal
  }
  uint32_t u = float_bits(f);
  u += 0x7ffffu + ((u >> 20) & 1u);  // round the 23-bit mantissa to 3 bits, ties to even
  const int e = static_cast<int>((u >> 23) & 0xff) - 127;
  const uint32_t man = (u >> 20) & 7u;
  if (e > 8 || (e == 8 && man > 6)) return 0x7e;  // rounded past 448: saturate
  return static_cast<uint8_t>(((e + 7) << 3) | static_cast<int>(man));
}

// Block decode scale (E4M3 byte) from the block amax and the global encode scale.
NK_HD uint8_t nvfp4_block_scale(float amax_b, float s_enc) {
  const float sf = (amax_b / kE2M1Max) * s_enc;
  return e4m3_encode_rne_sat(sf);
}

// Multiplier taking a block's values to the E2M1 grid; 0 when the block scale is 0.
NK_HD float nvfp4_block_inv(uint8_t s_b, float s_enc) {
  const float sb = e4m3_decode(s_b);
  if (!(sb > 0.0f)) return sb == 0.0f ? 0.0f : sb;  // 0 -> 0; NaN stays NaN
  const float inv = s_enc / sb;
  return inv > kFloatMax ? kFloatMax : inv;
}

// The add both encoders share: c = min(m, 6), e = exponent bits of max(c, 1) (2^E), and
// M = 2^(E + 22) + 2^E, whose ulp 2^(E - 1) is the grid step of c's binade (M is 2^(E + 22)
// plus two steps: a multiple of the step, so the grid is the same). s = c + M rounds c to the
// grid, ties to even, and its bits are bits(2^(E + 22)) + 2 + round(c / step); the low three
// bits of bits(s) + 2 E + 254 are the index (every other term is a multiple of 8), so
// raw() & 7 is the E2M1 index and the bits above it are junk for the caller to mask.
struct E2m1Near {
  float c, M, s;
  uint32_t e;
  NK_HD uint32_t raw() const { return float_bits(s) + (e >> 22); }
  NK_HD uint32_t index() const { return raw() & 7u; }
};

NK_HD E2m1Near e2m1_near(float m) {
  E2m1Near n;
  n.c = m < 6.0f ? m : 6.0f;                                    // NaN -> 6 (code 7)
  n.e = float_bits(n.c > 1.0f ? n.c : 1.0f) & 0x7f800000u;     // (E + 127) << 23
  float pe;
  memcpy(&pe, &n.e, sizeof(pe));
  n.M = pe * 4194305.0f;  // 2^E (2^22 + 1), exact
  // One IEEE add: round to the binade's step, ties to even. The compilers may fuse the line
  // above into it (an FMA); M is exact, so the fused and the separate forms round alike.
  n.s = n.c + n.M;
  return n;
}

// E2M1 magnitude index (0..7) of m = |v| (m >= 0 or NaN), round to nearest even, saturating
// at 6. Ties: .25 -> 0, .75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4 (even index
// wins); NaN -> 7. Branch-free (docs/nvfp4.md, issue 18): c = min(m, 6) (NaN -> 6) is added to
// M ~ 2^(e + 22), e = max(floor(log2 c), 0), whose float32 ulp 2^(e - 1) is the E2M1 step of
// c's binade (0.5 below 2, 1 in [2, 4), 2 in [4, 8)), so the IEEE add rounds c to the grid with
// ties to even, and the bits of c + M give round(c / step) + 2e (E2m1Near). Checked
// equal to the threshold chain (e2m1_mag_rne_ref) for every float32 bit pattern >= 0 and every
// NaN (docs/nvfp4.md; test_cuda_emulation_nvfp4.py::test_encoders_equal_their_definitions);
// tests/nvfp4/test_nvfp4_quantize.py::test_rne_ties_exact hits each tie through the kernels.
NK_HD uint8_t e2m1_mag_rne(float m) { return static_cast<uint8_t>(e2m1_near(m).index()); }

// The definition e2m1_mag_rne implements: the thresholds between neighbouring grid points.
NK_HD uint8_t e2m1_mag_rne_ref(float m) {
  if (m <= 0.25f) return 0;
  if (m < 0.75f) return 1;
  if (m <= 1.25f) return 2;
  if (m < 1.75f) return 3;
  if (m <= 2.5f) return 4;
  if (m < 3.5f) return 5;
  if (m <= 5.0f) return 6;
  return 7;  // includes NaN (non-finite input is rejected on the CPU; see quantize.h)
}

// E2M1 grid point at or below m (index and value), and the step to the next grid point.
NK_HD uint8_t e2m1_mag_floor(float m) {
  if (m < 0.5f) return 0;
  if (m < 1.0f) return 1;
  if (m < 1.5f) return 2;
  if (m < 2.0f) return 3;
  if (m < 3.0f) return 4;
  if (m < 4.0f) return 5;
  if (m < 6.0f) return 6;
  return 7;
}

// E2M1 magnitude with stochastic rounding: between neighbours lo <= m < hi, round up with
// probability (m - lo) / (hi - lo), drawn from u in [0, 1) (24-bit Philox uniform). m - lo is
// exact and hi - lo is a power of two, so the probability is exact: E[value] = m up to 2^-24
// of a step. Saturates at 6 (m >= 6 and NaN -> 7).
// Branch-free (issue 18): the grid point r nearest to c = min(m, 6) comes from the same add as
// e2m1_mag_rne; the floor is r, or the point below when r > c; step and 1 / step are powers of
// two built from c's exponent bits. The floor index i and p = (c - lo) / step equal, bit for
// bit, those of the threshold chain (e2m1_mag_floor, e2m1_decode; e2m1_mag_sr_ref) for every
// float32 m >= 0 and every NaN, so the result i + (u < p) is the same for every u
// (exhaustive g++ check, docs/nvfp4.md; tests/nvfp4/test_cuda_emulation_nvfp4.py::
// test_encoders_equal_their_definitions over 8 binades).
NK_HD uint8_t e2m1_mag_sr(float m, float u) {
  const E2m1Near n = e2m1_near(m);
  const uint32_t step_b = n.e - (1u << 23);             // 2^(E - 1)
  const uint32_t inv_b = (255u << 23) - n.e;           // 2^(1 - E)
  float step, inv_step;
  memcpy(&step, &step_b, sizeof(step));
  memcpy(&inv_step, &inv_b, sizeof(inv_step));
  const float r = n.s - n.M;  // the grid point nearest to c (exact)
  const bool above = r > n.c;
  const float lo = above ? r - step : r;
  const float p = (n.c - lo) * inv_step;
  return static_cast<uint8_t>(n.index() - (above ? 1u : 0u) + (u < p ? 1u : 0u));  // stays in 0..7
}

// The definition e2m1_mag_sr implements.
NK_HD uint8_t e2m1_mag_sr_ref(float m, float u) {
  if (!(m < 6.0f)) return 7;
  const uint8_t i = e2m1_mag_floor(m);
  const float lo = e2m1_decode(i);
  const float inv_step = i < 4 ? 2.0f : (i < 6 ? 1.0f : 0.5f);
  const float p = (m - lo) * inv_step;
  return static_cast<uint8_t>(i + (u < p ? 1 : 0));
}

// Signed 4-bit code of v (already multiplied by the block's inv); zero is always code 0.
NK_HD uint8_t e2m1_code(float v, uint8_t mag) {
  return static_cast<uint8_t>(mag | ((v < 0.0f && mag != 0) ? 0x8 : 0x0));
}

// ------------------------------------------------------------------------------------------
// Random bits. Philox4x32-10 keyed by the 64-bit seed; the fourth counter word is a purpose
// tag so the rounding bits and the Hadamard signs of one seed are independent.
constexpr uint32_t kTagStochastic = 0x4e564653u;  // "NVFS"
constexpr uint32_t kTagHadamard = 0x4e564648u;    // "NVFH"

// 32 random bits for the element with flat index idx = row * cols + col of the quantized
// (output) matrix: one Philox call serves four consecutive elements.
NK_HD uint32_t nvfp4_sr_bits(uint64_t seed, uint64_t idx) {
  const uint64_t c = idx >> 2;
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(c), static_cast<uint32_t>(c >> 32), 0u,
                                  kTagStochastic, seed);
  return r.v[idx & 3];
}

// The 16 Hadamard signs of a seed: bit j set -> d_j = -1.
NK_HD uint32_t nvfp4_hadamard_signs(uint64_t seed) {
  return philox4x32_10(0u, 0u, 0u, kTagHadamard, seed).v[0] & 0xffffu;
}

// In place on one 16-element block: v <- (1/4) H16 D v, D = diag(+-1 from `signs`), H16 the
// Sylvester Hadamard matrix (H[i][j] = (-1)^popcount(i & j)). (1/4) H16 D is orthogonal, so
// applying it to both GEMM operands along the reduction dim leaves a @ b^T unchanged. Fixed
// butterfly order, sign flips and the final exact scaling by 1/4: the same float32 result on
// the host, the device and in the PyTorch reference.
NK_HD void hadamard16(float (&v)[kBlock], uint32_t signs) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < kBlock; ++j) v[j] = ((signs >> j) & 1u) ? -v[j] : v[j];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int h = 1; h < kBlock; h <<= 1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int i = 0; i < kBlock; ++i) {
      if ((i & h) == 0) {
        const float a = v[i], b = v[i + h];
        v[i] = a + b;
        v[i + h] = a - b;
      }
    }
  }
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < kBlock; ++j) v[j] = v[j] * 0.25f;
}

// Max of |v| over a block; NaN-propagating (fmaxf would drop NaN and hide non-finite input).
// On the device one max.NaN instruction (sm_80+; a NaN result is the canonical NaN there, and
// every consumer only asks whether it is NaN).
NK_HD float nan_max(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (b > a || !(b == b)) ? b : a;
#endif
}

}  // namespace nk::nvfp4
