// CUDA grouped GEMM with NVFP4 expert weights (grouped_gemm.h, GroupedGemmNvfp4wParams): the path
// choice (grouped_gemm_nvfp4w_cuda_path), the zero fill of rows outside every segment, and the
// portable SIMT kernel for every other case: a thread per weight row n of an expert decodes its
// row 16 values at a time (e2m1 x e4m3, exact in float) and accumulates 4 token rows at once in
// float32, in K order; g[e] and relu^2 after the sum, one rounding. On sm_90 the wgmma kernel of
// csrc/nvfp4/gemm_decode_mma_sm90.cu runs 16-bit tokens instead.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.cuh"
#include "moe/grouped_gemm.h"
#include "moe/numerics.cuh"
#include "moe/segments.cuh"
#include "nvfp4/gemm.h"
#include "nvfp4/numerics.cuh"

namespace nk {
namespace {

constexpr int kNvThreads = 128;  // weight rows per block
constexpr int kNvRows = 4;       // token rows per pass

// Grid (ceil(N / 128), E): thread n of expert blockIdx.y.
template <typename T>
__global__ void nvfp4w_portable_kernel(GroupedGemmNvfp4wParams p) {
  const int64_t e = blockIdx.y, n = int64_t(blockIdx.x) * kNvThreads + threadIdx.x;
  int64_t lo, hi;
  segment(p.offsets, e, p.R, lo, hi);
  if (n >= p.N || hi == lo) return;
  const T* a = static_cast<const T*>(p.a);
  T* out = static_cast<T*>(p.out);
  const uint8_t* codes = p.codes + (e * p.N + n) * (p.K / 2);
  const uint8_t* scales = p.scales + (e * p.N + n) * (p.K / 16);
  const float g = p.global_scale[e * p.global_stride];
  for (int64_t r0 = lo; r0 < hi; r0 += kNvRows) {
    float acc[kNvRows] = {};
    for (int64_t kb = 0; kb < p.K / 16; ++kb) {
      const float s = nvfp4::e4m3_decode(scales[kb]);
      for (int j = 0; j < 16; ++j) {
        const int64_t k = kb * 16 + j;
        const uint8_t byte = codes[k / 2];
        const float w = nvfp4::e2m1_decode((k % 2) ? byte >> 4 : byte & 0xf) * s;
#pragma unroll
        for (int i = 0; i < kNvRows; ++i) {
          if (r0 + i < hi) acc[i] = fmaf(to_f(a[(r0 + i) * p.K + k]), w, acc[i]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kNvRows; ++i) {
      if (r0 + i >= hi) break;
      float v = g * acc[i];
      if (p.act == GgAct::Relu2) v = relu2(v);
      out[(r0 + i) * p.N + n] = from_f<T>(v);
    }
  }
}

template <typename T>
void run_portable(const GroupedGemmNvfp4wParams& p, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((p.N + kNvThreads - 1) / kNvThreads), static_cast<unsigned>(p.E));
  nvfp4w_portable_kernel<T><<<grid, kNvThreads, 0, s>>>(p);
  NK_CUDA_LAUNCH_CHECK();
}

}  // namespace

int grouped_gemm_nvfp4w_cuda_path(const GroupedGemmNvfp4wParams& p) {
#ifdef NK_HAS_SM90
  if (grouped_gemm_portable_forced()) return 0;
  if (p.dtype != GgType::BF16 && p.dtype != GgType::F16) return 0;
  if (p.K % 64 != 0 || p.N % 8 != 0 || p.E > 65535 || p.R <= 0) return 0;
  if (!aligned16(p.a) || !aligned16(p.codes) || !aligned16(p.scales) || !aligned16(p.out)) return 0;
  return current_device_cc() == 90 ? 90 : 0;
#else
  (void)p;
  return 0;
#endif
}

void grouped_gemm_nvfp4w_cuda(const GroupedGemmNvfp4wParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (p.R == 0 || p.N == 0) return;
  auto zero = [&](auto tag) {
    using T = decltype(tag);
    zero_outside_kernel<T><<<static_cast<unsigned>(std::min<int64_t>((p.R * p.N + 255) / 256, 4096)), 256, 0, s>>>(
        p.offsets, p.E, p.R, p.N, static_cast<T*>(p.out), nullptr);
    NK_CUDA_LAUNCH_CHECK();
  };
  switch (p.dtype) {
    case GgType::F16: zero(__half{}); break;
    case GgType::BF16: zero(__nv_bfloat16{}); break;
    default: zero(float{}); break;
  }
#ifdef NK_HAS_SM90
  if (p.arch == 90) {
    Nvfp4GroupedArgs g{p.R, p.N, p.K, p.E, p.dtype == GgType::BF16, p.a, p.codes, p.scales, p.global_scale,
                       p.global_stride, p.offsets, p.act == GgAct::Relu2, p.out};
    nvfp4_grouped_decode_mma_sm90(g, stream);
    return;
  }
#endif
  switch (p.dtype) {
    case GgType::F16: run_portable<__half>(p, s); break;
    case GgType::BF16: run_portable<__nv_bfloat16>(p, s); break;
    default: run_portable<float>(p, s); break;
  }
}

}  // namespace nk
