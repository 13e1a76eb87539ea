// CPU kernel of the grouped GEMM with NVFP4 expert weights (grouped_gemm.h,
// GroupedGemmNvfp4wParams): one task per (expert, weight row n) decodes the row once (e2m1 x
// e4m3 in float: exact) and runs every row of the expert's segment against it, accumulating in
// float32 in K order; g[e] and relu^2 after the sum, one rounding. Rows outside every segment are
// zeros. Deterministic and independent of the thread count.
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "moe/grouped_gemm.h"
#include "moe/numerics.cuh"
#include "moe/segments.cuh"
#include "nvfp4/numerics.cuh"

namespace nk {
namespace {

template <typename T>
void run(const GroupedGemmNvfp4wParams& p) {
  const T* a = static_cast<const T*>(p.a);
  T* out = static_cast<T*>(p.out);
  const int64_t R = p.R, N = p.N, K = p.K;
  std::vector<int64_t> lo, hi;
  segments_and_zero_outside(p.offsets, p.E, R, N * static_cast<int64_t>(sizeof(T)), out, lo, hi);
  torch::stable::parallel_for(0, p.E * N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(K);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t e = t / N, n = t % N;
      if (hi[e] == lo[e]) continue;
      const uint8_t* codes = p.codes + (e * N + n) * (K / 2);
      const uint8_t* scales = p.scales + (e * N + n) * (K / 16);
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t byte = codes[k / 2];
        w[k] = nvfp4::e2m1_decode((k % 2) ? byte >> 4 : byte & 0xf) * nvfp4::e4m3_decode(scales[k / 16]);
      }
      const float g = p.global_scale[e * p.global_stride];
      for (int64_t r = lo[e]; r < hi[e]; ++r) {
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) acc += static_cast<float>(a[r * K + k]) * w[k];
        float v = g * acc;
        if (p.act == GgAct::Relu2) v = relu2(v);
        out[r * N + n] = static_cast<T>(v);
      }
    }
  });
}

}  // namespace

void grouped_gemm_nvfp4w_cpu(const GroupedGemmNvfp4wParams& p) {
  switch (p.dtype) {
    case GgType::F16: run<c10::Half>(p); break;
    case GgType::BF16: run<c10::BFloat16>(p); break;
    default: run<float>(p); break;
  }
}

}  // namespace nk
