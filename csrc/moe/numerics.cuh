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

// relu(v)^2 of the experts' up projection, NaN kept (torch.relu(NaN)^2 is NaN: a non-finite
// activation must not come out as a silent zero).
template <class T>
NK_HD T relu2(T v) {
  return (v > T(0) || v != v) ? v * v : T(0);
}
// Its backward operand dout * 2 * relu(pre), NaN kept as torch keeps it.
template <class T>
NK_HD T relu2_grad(T dout, T pre) {
  return (pre > T(0) || pre != pre) ? dout * T(2) * pre : T(0);
}

// FP8 rows (moe_quantize_fp8, the A operand of grouped_gemm with FP8 weights). A row's dynamic
// scale from its amax: amax / 448, 1 for a zero row, NaN when amax is NaN or infinite (the row's
// outputs come out NaN, not silently finite).
constexpr float kFp8Max = 448.0f;
// The scale is at least the smallest normal float: a row of tiny float32 values keeps nonzero
// codes' denominators (no 0 / 0) and no denormal scale meets a flush-to-zero.
constexpr float kFp8MinScale = 1.17549435e-38f;
NK_HD float fp8_row_scale(float amax) {
  if (!(amax <= 3.402823466e38f)) return std::numeric_limits<float>::quiet_NaN();
  if (amax == 0.0f) return 1.0f;
  const float s = amax / kFp8Max;
  return s < kFp8MinScale ? kFp8MinScale : s;
}
// A static scale as the kernels take it: positive and finite, else NaN (the rows' outputs are NaN;
// the CPU entry raises on such a scale before any kernel runs).
NK_HD float fp8_static_scale(float s) {
  return (s > 0.0f && s <= 3.402823466e38f) ? s : std::numeric_limits<float>::quiet_NaN();
}
// The e4m3 (fn) byte of x / scale: one IEEE division, round to nearest even, saturating at +-448,
// the sign kept (-0 included); NaN gives 0x7f.
NK_HD uint8_t fp8_encode(float x, float scale) {
  const float q = x / scale;
  if (q != q) return 0x7f;  // one NaN byte on every device (the sign of a NaN is not portable)
  const uint8_t sign = (float_bits(q) >> 31) != 0u ? 0x80 : 0x00;
  return static_cast<uint8_t>(nvfp4::e4m3_encode_rne_sat(fabsf(q)) | sign);
}

}  // namespace nk
