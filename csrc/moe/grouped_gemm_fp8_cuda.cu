// CUDA kernels of the FP8 experts (grouped_gemm.h): the row quantizer (a warp per row: amax by
// shuffles, then the codes, 8 per lane and step as one 8-byte store where the row allows; the
// arithmetic of moe/numerics.cuh, bit-identical to the CPU kernel), the path choice of the grouped
// GEMM, the zero fill of rows outside every segment and the portable SIMT GEMM (a thread per
// weight row, 4 token rows per pass, float32 sums in K order as the CPU kernel). On sm_90 the
// CUTLASS kernel of grouped_gemm_fp8_sm90.cu runs bf16 outputs instead.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.cuh"
#include "moe/grouped_gemm.h"
#include "moe/segments.cuh"
#include "moe/numerics.cuh"

namespace nk {
namespace {

constexpr int kQRowsPerBlock = 8;  // warps per block, a row each
constexpr int kFp8Threads = 128;   // weight rows per block of the portable GEMM
constexpr int kFp8Rows = 4;        // token rows per pass

// Eight values of a row from p (16-byte aligned): one 16-byte load, two for float.
template <typename T>
NK_DEVICE void load8(const T* ptr, float (&v)[8]) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = *reinterpret_cast<const float4*>(ptr), b = *reinterpret_cast<const float4*>(ptr + 4);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(ptr);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_f<T>(e[i]);
  }
}

// Grid-stride over rows; lane l of the row's warp takes 8 values at k = 8 (l + 32 i) when the row
// allows 16-byte loads (kVec), else values k = l + 32 i.
template <typename T, bool kVec>
__global__ void quantize_fp8_kernel(QuantizeFp8Params p) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kQRowsPerBlock;
  const T* x = static_cast<const T*>(p.x);
  const int64_t K = p.K;
  for (int64_t r = blockIdx.x * static_cast<int64_t>(kQRowsPerBlock) + (threadIdx.x >> 5); r < p.R; r += warps) {
    int64_t src = r;
    if (p.slot_of_row != nullptr) {
      const int32_t slot = p.slot_of_row[r];
      src = slot < 0 ? -1 : slot / p.top_k;
    }
    uint8_t* q = p.q + r * K;
    if (src < 0) {  // a padding row: zero codes, scale 1
      for (int64_t k = lane; k < K; k += 32) q[k] = 0;
      if (lane == 0) p.scale[r] = 1.0f;
      continue;
    }
    const T* row = x + src * K;
    float s;
    if (p.static_scale != nullptr) {
      s = *p.static_scale;
    } else {
      float amax = 0.0f;
      if constexpr (kVec) {
        for (int64_t k = 8 * lane; k < K; k += 256) {
          float v[8];
          load8(row + k, v);
#pragma unroll
          for (int j = 0; j < 8; ++j) amax = nvfp4::nan_max(amax, fabsf(v[j]));
        }
      } else {
        for (int64_t k = lane; k < K; k += 32) amax = nvfp4::nan_max(amax, fabsf(to_f(row[k])));
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) amax = nvfp4::nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      s = fp8_row_scale(amax);
    }
    if constexpr (kVec) {
      for (int64_t k = 8 * lane; k < K; k += 256) {  // the second read of the row hits L1/L2
        float v[8];
        load8(row + k, v);
        uint2 codes;
        codes.x = codes.y = 0u;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          codes.x |= static_cast<uint32_t>(fp8_encode(v[j], s)) << (8 * j);
          codes.y |= static_cast<uint32_t>(fp8_encode(v[j + 4], s)) << (8 * j);
        }
        *reinterpret_cast<uint2*>(q + k) = codes;
      }
    } else {
      for (int64_t k = lane; k < K; k += 32) q[k] = fp8_encode(to_f(row[k]), s);
    }
    if (lane == 0) p.scale[r] = s;
  }
}

template <typename T>
void run_quantize(const QuantizeFp8Params& p, cudaStream_t s) {
  const bool vec = p.K % 8 == 0 && aligned16(p.x) && aligned16(p.q);
  const int64_t blocks = std::min<int64_t>((p.R + kQRowsPerBlock - 1) / kQRowsPerBlock, 65535);
  if (vec) {
    quantize_fp8_kernel<T, true><<<static_cast<unsigned>(blocks), 32 * kQRowsPerBlock, 0, s>>>(p);
  } else {
    quantize_fp8_kernel<T, false><<<static_cast<unsigned>(blocks), 32 * kQRowsPerBlock, 0, s>>>(p);
  }
  NK_CUDA_LAUNCH_CHECK();
}

// Grid (ceil(N / 128), E): thread n of expert blockIdx.y.
template <typename T>
__global__ void fp8_portable_kernel(GroupedGemmFp8Params p) {
  const int64_t e = blockIdx.y, n = int64_t(blockIdx.x) * kFp8Threads + threadIdx.x;
  int64_t lo, hi;
  segment(p.offsets, e, p.R, lo, hi);
  if (n >= p.N || hi == lo) return;
  T* out = static_cast<T*>(p.out);
  const uint8_t* w = p.w + (e * p.N + n) * p.K;
  const float ws = p.w_scale[e * p.w_scale_stride];
  for (int64_t r0 = lo; r0 < hi; r0 += kFp8Rows) {
    float acc[kFp8Rows] = {};
    for (int64_t k = 0; k < p.K; ++k) {
      const float wk = nvfp4::e4m3_decode(w[k]);
#pragma unroll
      for (int i = 0; i < kFp8Rows; ++i) {
        if (r0 + i < hi) acc[i] = fmaf(nvfp4::e4m3_decode(p.a[(r0 + i) * p.K + k]), wk, acc[i]);  // exact product
      }
    }
#pragma unroll
    for (int i = 0; i < kFp8Rows; ++i) {
      if (r0 + i >= hi) break;
      float v = (acc[i] * p.a_scale[r0 + i]) * ws;
      if (p.act == GgAct::Relu2) v = v > 0.f ? v * v : 0.f;
      out[(r0 + i) * p.N + n] = from_f<T>(v);
    }
  }
}

template <typename T>
void run_portable(const GroupedGemmFp8Params& p, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((p.N + kFp8Threads - 1) / kFp8Threads), static_cast<unsigned>(p.E));
  fp8_portable_kernel<T><<<grid, kFp8Threads, 0, s>>>(p);
  NK_CUDA_LAUNCH_CHECK();
}

}  // namespace

void moe_quantize_fp8_cuda(const QuantizeFp8Params& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (p.R == 0) return;
  switch (p.dtype) {
    case GgType::F16: run_quantize<__half>(p, s); break;
    case GgType::BF16: run_quantize<__nv_bfloat16>(p, s); break;
    default: run_quantize<float>(p, s); break;
  }
}

int64_t grouped_gemm_fp8_cuda_prepare(GroupedGemmFp8Params& p) {
  p.arch = 0;
#ifdef NK_HAS_SM90
  if (grouped_gemm_portable_forced() || p.dtype != GgType::BF16) return 0;
  if (p.K % 16 != 0 || p.N % 8 != 0 || p.R <= 0 || p.E > 65535) return 0;
  if (!aligned16(p.a) || !aligned16(p.w) || !aligned16(p.out)) return 0;
  if (current_device_cc() != 90) return 0;
  p.arch = 90;
  return grouped_gemm_fp8_sm90_workspace(p.E);
#else
  return 0;
#endif
}

void grouped_gemm_fp8_cuda(const GroupedGemmFp8Params& p, void* stream) {
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
    grouped_gemm_fp8_sm90_run(p, stream);
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
