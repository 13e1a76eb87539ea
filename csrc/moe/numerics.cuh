// Scalar numerics of the MoE family, shared by the CPU and CUDA kernels so that a CPU test
// pins the arithmetic the GPU runs (same operation order, same ordering keys).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common/macros.h"
#include "nvfp4/numerics.cuh"

namespace nk {

// Router scoring: sigmoid in float32, 1 / (1 + exp(-x)) as torch.sigmoid computes it.
NK_HD float router_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

NK_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u;
#endif
}

// Total order on (score, index) pairs as one 64-bit key: a larger key is a better choice.
// Scores compare as floats (-inf lowest, every NaN canonicalised to the largest value, as
// torch.topk ranks NaN); equal scores prefer the lower index. Key 0 is below every real key
// and marks an entry already taken.
NK_HD uint64_t route_key(float score, uint32_t index) {
  uint32_t u = float_bits(score);
  if ((u & 0x7fffffffu) > 0x7f800000u) u = 0x7fc00000u;  // NaN -> one positive quiet NaN
  const uint32_t ord = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // monotone in the float value
  return (static_cast<uint64_t>(ord) << 32) | static_cast<uint64_t>(0xffffffffu - index);
}
NK_HD uint32_t route_key_index(uint64_t key) { return 0xffffffffu - static_cast<uint32_t>(key & 0xffffffffu); }
constexpr uint64_t kTakenKey = 0;

// Routing weight of the j-th chosen expert: its sigmoid score p_j, divided by
// (sum_i p_i + 1e-20) when normalising (sum in j order, as transformers' .sum over k),
// then times the scaling factor.
NK_HD float route_weight(float p, float psum, bool norm, float scale) {
  return (norm ? p / (psum + 1e-20f) : p) * scale;
}

// d logit of the j-th chosen expert from the weight gradients g (already in float32):
//   w_j = s * p_j / D (D = sum p + 1e-20) or s * p_j;  dp_j = s * (g_j / D - sum_i g_i p_i / D^2)
//   dlogit_j = dp_j * p_j * (1 - p_j).
// gp = sum_i g_i p_i (j order).
NK_HD float route_logit_grad(float g, float p, float psum, float gp, bool norm, float scale) {
  float dp;
  if (norm) {
    const float d = psum + 1e-20f;
    dp = scale * (g / d - gp / (d * d));
  } else {
    dp = scale * g;
  }
  return dp * p * (1.0f - p);
}

// FP8 rows (moe_quantize_fp8, the A operand of grouped_gemm with FP8 weights). A row's dynamic
// scale from its amax: amax / 448, 1 for a zero row, NaN when amax is NaN or infinite (the row's
// outputs come out NaN, not silently finite).
constexpr float kFp8Max = 448.0f;
NK_HD float fp8_row_scale(float amax) {
  if (!(amax <= 3.402823466e38f)) return std::numeric_limits<float>::quiet_NaN();
  return amax == 0.0f ? 1.0f : amax / kFp8Max;
}
// The e4m3 (fn) byte of x / scale: one IEEE division, round to nearest even, saturating at +-448,
// the sign kept (-0 included); NaN gives a NaN byte.
NK_HD uint8_t fp8_encode(float x, float scale) {
  const float q = x / scale;
  const uint8_t sign = (float_bits(q) >> 31) != 0u ? 0x80 : 0x00;
  return static_cast<uint8_t>(nvfp4::e4m3_encode_rne_sat(fabsf(q)) | sign);
}

}  // namespace nk
