// CPU kernels of the FP8 experts (grouped_gemm.h), the arithmetic of moe/numerics.cuh as the CUDA
// kernels: the row quantizer, the wgrad's transposed column-scaled quantizer and the wgrad (float32
// sums in row order), and the grouped GEMM: one task per (expert, weight row n) decodes the row
// once and runs the expert's rows against it, float32 sums in K order (products of two e4m3
// values are exact), then the row scale, the expert scale, relu^2, one rounding; rows outside
// every segment are zeros. Deterministic and independent of the thread count.
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "moe/grouped_gemm.h"
#include "moe/segments.cuh"
#include "moe/numerics.cuh"

namespace nk {
namespace {

template <typename T>
void quantize_rows(const QuantizeFp8Params& p) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t K = p.K;
  torch::stable::parallel_for(0, p.R, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      uint8_t* q = p.q + r * K;
      int64_t src = r;
      if (p.slot_of_row != nullptr) {
        const int32_t slot = p.slot_of_row[r];
        src = slot < 0 ? -1 : slot / p.top_k;
      }
      if (src < 0) {  // a padding row
        std::fill(q, q + K, uint8_t(0));
        const int64_t ns = p.block > 0 ? K / p.block : 1;
        std::fill(p.scale + r * ns, p.scale + (r + 1) * ns, 1.0f);
        continue;
      }
      const T* row = x + src * K;
      if (p.block > 0) {  // a dynamic scale per 128-column block
        for (int64_t b = 0; b < K / p.block; ++b) {
          const T* blk = row + b * p.block;
          float amax = 0.0f;
          for (int64_t k = 0; k < p.block; ++k) amax = nvfp4::nan_max(amax, std::fabs(static_cast<float>(blk[k])));
          const float sb = fp8_row_scale(amax);
          for (int64_t k = 0; k < p.block; ++k) q[b * p.block + k] = fp8_encode(static_cast<float>(blk[k]), sb);
          p.scale[r * (K / p.block) + b] = sb;
        }
        continue;
      }
      float s;
      if (p.static_scale != nullptr) {
        s = fp8_static_scale(p.static_scale[r / p.rows_per_scale]);
      } else {
        float amax = 0.0f;
        for (int64_t k = 0; k < K; ++k) amax = nvfp4::nan_max(amax, std::fabs(static_cast<float>(row[k])));
        s = fp8_row_scale(amax);
      }
      for (int64_t k = 0; k < K; ++k) q[k] = fp8_encode(static_cast<float>(row[k]), s);
      p.scale[r] = s;
    }
  });
}

template <typename T>
void gemm(const GroupedGemmFp8Params& p) {
  T* out = static_cast<T*>(p.out);
  T* pre = static_cast<T*>(p.pre);
  const int64_t R = p.R, N = p.N, K = p.K;
  std::vector<int64_t> lo, hi;
  segments_and_zero_outside(p.offsets, p.E, R, N * static_cast<int64_t>(sizeof(T)), out, lo, hi);
  if (pre != nullptr) segments_and_zero_outside(p.offsets, p.E, R, N * static_cast<int64_t>(sizeof(T)), pre, lo, hi);
  // The e4m3 values of A, decoded once (256-entry table).
  float lut[256];
  for (int b = 0; b < 256; ++b) lut[b] = nvfp4::e4m3_decode(static_cast<uint8_t>(b));
  torch::stable::parallel_for(0, p.E * N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(K);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t e = t / N, n = t % N;
      if (hi[e] == lo[e]) continue;
      const uint8_t* wr = p.w + (e * N + n) * K;
      for (int64_t k = 0; k < K; ++k) w[k] = lut[wr[k]];
      const float ws = p.block > 0 ? 0.f : p.w_scale[e * p.w_scale_stride];
      const int64_t KB = p.block > 0 ? K / p.block : 0, NB = p.block > 0 ? (N + p.block - 1) / p.block : 0;
      for (int64_t r = lo[e]; r < hi[e]; ++r) {
        const uint8_t* ar = p.a + r * K;
        float v;
        if (p.block > 0) {  // per-block scales: each block's float32 sum, scaled, into the total
          float acc = 0.f;
          for (int64_t kb = 0; kb < KB; ++kb) {
            float part = 0.f;
            for (int64_t k = kb * p.block; k < (kb + 1) * p.block; ++k) part += lut[ar[k]] * w[k];
            acc = std::fma(part, p.a_scale[r * KB + kb] * p.w_scale[(e * NB + n / p.block) * KB + kb], acc);
          }
          v = acc;
        } else {
          float acc = 0.f;
          for (int64_t k = 0; k < K; ++k) acc += lut[ar[k]] * w[k];
          v = (acc * p.a_scale[r]) * ws;
        }
        if (p.act == GgAct::Relu2) {
          if (pre != nullptr) pre[r * N + n] = static_cast<T>(v);
          v = relu2(v);
        }
        if constexpr (std::is_same_v<T, uint8_t>) out[r * N + n] = fp8_encode(v, *p.out_scale);
        else out[r * N + n] = static_cast<T>(v);
      }
    }
  });
}

template <typename T>
void quantize_t(const QuantizeFp8TParams& p) {
  const T* x = static_cast<const T*>(p.x);
  const int64_t R = p.R, C = p.C, W = p.W;
  std::vector<int64_t> lo(p.E), hi(p.E);
  for (int64_t e = 0; e < p.E; ++e) segment(p.offsets, e, R, lo[e], hi[e]);
  // Column amaxes over the rows inside the segments (in row order; max is order-free).
  std::vector<float> amax(C, 0.0f);
  for (int64_t e = 0; e < p.E; ++e)
    for (int64_t r = lo[e]; r < hi[e]; ++r)
      for (int64_t c = 0; c < C; ++c) amax[c] = nvfp4::nan_max(amax[c], std::fabs(static_cast<float>(x[r * C + c])));
  for (int64_t c = 0; c < C; ++c) p.scale[c] = fp8_row_scale(amax[c]);
  std::memset(p.qT, 0, static_cast<size_t>(C * W));
  torch::stable::parallel_for(0, C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      uint8_t* q = p.qT + c * W;
      const float s = p.scale[c];
      for (int64_t e = 0; e < p.E; ++e) {
        const int64_t at = start16(lo[e], e) - lo[e];
        for (int64_t r = lo[e]; r < hi[e]; ++r) q[at + r] = fp8_encode(static_cast<float>(x[r * C + c]), s);
      }
    }
  });
}

template <typename T>
void wgrad(const GroupedGemmFp8WgradParams& p) {
  T* dw = static_cast<T*>(p.dw);
  const int64_t N = p.N, K = p.K, W = p.W;
  float lut[256];
  for (int b = 0; b < 256; ++b) lut[b] = nvfp4::e4m3_decode(static_cast<uint8_t>(b));
  torch::stable::parallel_for(0, p.E * N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> g;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t e = t / N, n = t % N;
      int64_t lo, hi;
      segment(p.offsets, e, p.R, lo, hi);
      T* row = dw + (e * N + n) * K;
      if (hi == lo) {
        std::fill(row, row + K, static_cast<T>(0.f));
        continue;
      }
      const int64_t s = start16(lo, e), m = hi - lo;
      g.resize(m);
      for (int64_t i = 0; i < m; ++i) g[i] = lut[p.gT[n * W + s + i]];
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t* a = p.aT + k * W + s;
        float acc = 0.f;
        for (int64_t i = 0; i < m; ++i) acc += g[i] * lut[a[i]];
        row[k] = static_cast<T>((acc * p.g_scale[n]) * p.a_scale[k]);
      }
    }
  });
}

}  // namespace

void moe_quantize_fp8_t_cpu(const QuantizeFp8TParams& p) {
  switch (p.dtype) {
    case GgType::F16: quantize_t<c10::Half>(p); break;
    case GgType::BF16: quantize_t<c10::BFloat16>(p); break;
    default: quantize_t<float>(p); break;
  }
}

void grouped_gemm_fp8_wgrad_cpu(const GroupedGemmFp8WgradParams& p) {
  if (p.dtype == GgType::BF16) wgrad<c10::BFloat16>(p);
  else wgrad<float>(p);
}

void moe_quantize_fp8_cpu(const QuantizeFp8Params& p) {
  switch (p.dtype) {
    case GgType::F16: quantize_rows<c10::Half>(p); break;
    case GgType::BF16: quantize_rows<c10::BFloat16>(p); break;
    default: quantize_rows<float>(p); break;
  }
}

void grouped_gemm_fp8_cpu(const GroupedGemmFp8Params& p) {
  switch (p.dtype) {
    case GgType::E4M3: gemm<uint8_t>(p); break;
    case GgType::F16: gemm<c10::Half>(p); break;
    case GgType::BF16: gemm<c10::BFloat16>(p); break;
    default: gemm<float>(p); break;
  }
}

}  // namespace nk
