// CUDA kernels of the FP8 experts (grouped_gemm.h), the arithmetic of moe/numerics.cuh (codes and
// scales bit-identical to the CPU kernels): the row quantizer (a warp per row: amax by shuffles,
// then the codes, 8 per lane as one 8-byte store where the row allows); the wgrad's transposed
// quantizer (column amaxes in row chunks, then 64 x 64 tiles transposed through shared memory);
// the path choices, zero fills and portable SIMT GEMMs (float32 sums in the CPU kernels' order).
// On sm_90 the CUTLASS kernels of grouped_gemm_fp8_sm90.cu / grouped_gemm_fp8_wgrad_sm90.cu run
// bf16 (and the wgrad's float32) outputs instead.
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
      const int32_t slot = p.slot_of_row[r];  // out of range: a padding row, as moe_gather's
      src = (slot < 0 || slot >= p.T * p.top_k) ? -1 : slot / p.top_k;
    }
    uint8_t* q = p.q + r * K;
    if (src < 0) {  // a padding row: zero codes, scale 1
      for (int64_t k = lane; k < K; k += 32) q[k] = 0;
      const int64_t ns = p.block > 0 ? K / p.block : 1;
      for (int64_t b = lane; b < ns; b += 32) p.scale[r * ns + b] = 1.0f;
      continue;
    }
    const T* row = x + src * K;
    if (p.block > 0) {  // a scale per 128-column block: lane l takes 4 values of each block
      const int64_t KB = K / p.block;
      for (int64_t b = 0; b < KB; ++b) {
        const T* blk = row + b * p.block;
        float v[4];
        float amax = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          v[j] = to_f(blk[4 * lane + j]);
          amax = nvfp4::nan_max(amax, fabsf(v[j]));
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) amax = nvfp4::nan_max(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        const float sb = fp8_row_scale(amax);
#pragma unroll
        for (int j = 0; j < 4; ++j) q[b * p.block + 4 * lane + j] = fp8_encode(v[j], sb);
        if (lane == 0) p.scale[r * KB + b] = sb;
      }
      continue;
    }
    float s;
    if (p.static_scale != nullptr) {
      s = fp8_static_scale(p.static_scale[r / p.rows_per_scale]);
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

constexpr int64_t kScaleSlot = 256;  // workspace bytes before the CUTLASS arrays (e4m3 output)

// *out = fp8_static_scale(*in): the e4m3 epilogue's scale, NaN when not positive and finite.
__global__ void sanitise_scale_kernel(const float* in, float* out) { *out = fp8_static_scale(*in); }

// Grid (ceil(N / 128), E): thread n of expert blockIdx.y.
template <typename T>
__global__ void fp8_portable_kernel(GroupedGemmFp8Params p) {
  const int64_t e = blockIdx.y, n = int64_t(blockIdx.x) * kFp8Threads + threadIdx.x;
  int64_t lo, hi;
  segment(p.offsets, e, p.R, lo, hi);
  if (n >= p.N || hi == lo) return;
  T* out = static_cast<T*>(p.out);
  const uint8_t* w = p.w + (e * p.N + n) * p.K;
  const float ws = p.block > 0 ? 0.f : p.w_scale[e * p.w_scale_stride];
  const int64_t KB = p.block > 0 ? p.K / p.block : 1, NB = p.block > 0 ? (p.N + p.block - 1) / p.block : 1;
  const int64_t kb_len = p.block > 0 ? p.block : p.K;
  for (int64_t r0 = lo; r0 < hi; r0 += kFp8Rows) {
    float acc[kFp8Rows] = {};
    for (int64_t kb = 0; kb < KB; ++kb) {  // one pass over K unless per-block scales
      float part[kFp8Rows] = {};
      for (int64_t k = kb * kb_len; k < (kb + 1) * kb_len; ++k) {
        const float wk = nvfp4::e4m3_decode(w[k]);
#pragma unroll
        for (int i = 0; i < kFp8Rows; ++i) {
          if (r0 + i < hi) part[i] = fmaf(nvfp4::e4m3_decode(p.a[(r0 + i) * p.K + k]), wk, part[i]);  // exact product
        }
      }
#pragma unroll
      for (int i = 0; i < kFp8Rows; ++i) {
        if (r0 + i >= hi) break;
        acc[i] = p.block > 0
                     ? fmaf(part[i], p.a_scale[(r0 + i) * KB + kb] * p.w_scale[(e * NB + n / p.block) * KB + kb], acc[i])
                     : part[i];
      }
    }
#pragma unroll
    for (int i = 0; i < kFp8Rows; ++i) {
      if (r0 + i >= hi) break;
      float v = p.block > 0 ? acc[i] : (acc[i] * p.a_scale[r0 + i]) * ws;
      if (p.act == GgAct::Relu2) {
        if constexpr (sizeof(T) > 1) {
          if (p.pre != nullptr) static_cast<T*>(p.pre)[(r0 + i) * p.N + n] = from_f<T>(v);
        }
        v = relu2(v);
      }
      if constexpr (sizeof(T) == 1) out[(r0 + i) * p.N + n] = fp8_encode(v, fp8_static_scale(*p.out_scale));
      else out[(r0 + i) * p.N + n] = from_f<T>(v);
    }
  }
}

template <typename T>
void run_portable(const GroupedGemmFp8Params& p, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((p.N + kFp8Threads - 1) / kFp8Threads), static_cast<unsigned>(p.E));
  fp8_portable_kernel<T><<<grid, kFp8Threads, 0, s>>>(p);
  NK_CUDA_LAUNCH_CHECK();
}

// ---------------------------------------------------------------- the wgrad's operands and the wgrad

constexpr int kTTile = 64;      // rows x columns of a transpose tile
constexpr int kTThreads = 256;

// partial[chunk][c] = amax of column c over the chunk's rows that lie in [first, last) (the rows
// of every segment). Grid (ceil(C / 256), chunks), a thread per column: coalesced row reads.
template <typename T>
__global__ void column_amax_kernel(QuantizeFp8TParams p) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(kTThreads) + threadIdx.x;
  if (c >= p.C) return;
  int64_t first, h0, le, last;
  segment(p.offsets, 0, p.R, first, h0);
  segment(p.offsets, p.E - 1, p.R, le, last);
  last = max(last, first);
  const int64_t r0 = max(static_cast<int64_t>(blockIdx.y) * kFp8TRowChunk, first);
  const int64_t r1 = min(static_cast<int64_t>(blockIdx.y + 1) * kFp8TRowChunk, last);
  const T* x = static_cast<const T*>(p.x);
  float amax = 0.0f;
  for (int64_t r = r0; r < r1; ++r) amax = nvfp4::nan_max(amax, fabsf(to_f(x[r * p.C + c])));
  p.partial[blockIdx.y * p.C + c] = amax;
}

// scale[c] from the chunks' partial amaxes.
__global__ void column_scale_kernel(QuantizeFp8TParams p, int64_t chunks) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(kTThreads) + threadIdx.x;
  if (c >= p.C) return;
  float amax = 0.0f;
  for (int64_t i = 0; i < chunks; ++i) amax = nvfp4::nan_max(amax, p.partial[i * p.C + c]);
  p.scale[c] = fp8_row_scale(amax);
}

// One 64 x 64 tile of x: codes through shared memory, written transposed at each row's column
// r + start16(lo_e, e) - lo_e. Grid (ceil(R / 64), ceil(C / 64)); qT is zero beforehand.
template <typename T>
__global__ void __launch_bounds__(kTThreads) transpose_quantize_kernel(QuantizeFp8TParams p) {
  __shared__ uint8_t tile[kTTile][kTTile + 4];  // [column][row]
  __shared__ int64_t shift[kTTile];             // output column - row, or -1: a row of no segment
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTTile, c0 = static_cast<int64_t>(blockIdx.y) * kTTile;
  const int tid = threadIdx.x;
  if (tid < kTTile) {  // the row's expert
    int64_t lo_e, hi_e;
    const int64_t e = expert_of_row(p.offsets, p.E, p.R, r0 + tid, lo_e, hi_e);
    shift[tid] = e >= 0 ? start16(lo_e, e) - lo_e : -1;
  }
  const T* x = static_cast<const T*>(p.x);
  for (int i = tid; i < kTTile * kTTile; i += kTThreads) {  // coalesced along the columns
    const int rr = i / kTTile, cc = i % kTTile;
    const int64_t r = r0 + rr, c = c0 + cc;
    if (r < p.R && c < p.C) tile[cc][rr] = fp8_encode(to_f(x[r * p.C + c]), p.scale[c]);
  }
  __syncthreads();
  for (int i = tid; i < kTTile * kTTile; i += kTThreads) {  // coalesced along the output rows
    const int cc = i / kTTile, rr = i % kTTile;
    const int64_t r = r0 + rr, c = c0 + cc;
    if (r < p.R && c < p.C && shift[rr] >= 0) p.qT[c * p.W + r + shift[rr]] = tile[cc][rr];
  }
}

// Grid (N * ceil(K / 128), E): thread k of weight row n of expert e (portable; slow, exact order).
template <typename T>
__global__ void fp8_wgrad_portable_kernel(GroupedGemmFp8WgradParams p) {
  const int64_t kblocks = (p.K + kFp8Threads - 1) / kFp8Threads;
  const int64_t n = blockIdx.x / kblocks, k = (blockIdx.x % kblocks) * kFp8Threads + threadIdx.x, e = blockIdx.y;
  if (k >= p.K) return;
  int64_t lo, hi;
  segment(p.offsets, e, p.R, lo, hi);
  const int64_t s = start16(lo, e);
  float acc = 0.f;
  for (int64_t i = 0; i < hi - lo; ++i) {
    acc = fmaf(nvfp4::e4m3_decode(p.gT[n * p.W + s + i]), nvfp4::e4m3_decode(p.aT[k * p.W + s + i]), acc);
  }
  const float v = hi == lo ? 0.f : (acc * p.g_scale[n]) * p.a_scale[k];
  static_cast<T*>(p.dw)[(e * p.N + n) * p.K + k] = from_f<T>(v);
}

// dw[e] = 0 for the experts without rows (the CUTLASS wgrad runs no tile for them). Grid (E, blocks).
template <typename T>
__global__ void fp8_wgrad_zero_empty_kernel(GroupedGemmFp8WgradParams p) {
  int64_t lo, hi;
  segment(p.offsets, blockIdx.x, p.R, lo, hi);
  if (hi > lo) return;
  T* d = static_cast<T*>(p.dw) + static_cast<int64_t>(blockIdx.x) * p.N * p.K;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * kTThreads + threadIdx.x; i < p.N * p.K;
       i += static_cast<int64_t>(gridDim.y) * kTThreads) {
    d[i] = from_f<T>(0.f);
  }
}

}  // namespace

void moe_quantize_fp8_t_cuda(const QuantizeFp8TParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  NK_CUDA_CHECK(cudaMemsetAsync(p.qT, 0, static_cast<size_t>(p.C * p.W), s));
  const int64_t chunks = std::max<int64_t>((p.R + kFp8TRowChunk - 1) / kFp8TRowChunk, 1);
  const unsigned col_blocks = static_cast<unsigned>((p.C + kTThreads - 1) / kTThreads);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    if (p.E > 0 && p.R > 0) {
      column_amax_kernel<T><<<dim3(col_blocks, static_cast<unsigned>(chunks)), kTThreads, 0, s>>>(p);
      NK_CUDA_LAUNCH_CHECK();
    }
    column_scale_kernel<<<col_blocks, kTThreads, 0, s>>>(p, p.E > 0 && p.R > 0 ? chunks : 0);
    NK_CUDA_LAUNCH_CHECK();
    if (p.E > 0 && p.R > 0) {
      const dim3 grid(static_cast<unsigned>((p.R + kTTile - 1) / kTTile), static_cast<unsigned>((p.C + kTTile - 1) / kTTile));
      transpose_quantize_kernel<T><<<grid, kTThreads, 0, s>>>(p);
      NK_CUDA_LAUNCH_CHECK();
    }
  };
  switch (p.dtype) {
    case GgType::F16: run(__half{}); break;
    case GgType::BF16: run(__nv_bfloat16{}); break;
    default: run(float{}); break;
  }
}

int64_t grouped_gemm_fp8_wgrad_cuda_prepare(GroupedGemmFp8WgradParams& p) {
  p.arch = 0;
#ifdef NK_HAS_SM90
  if (grouped_gemm_portable_forced()) return 0;
  if (p.K % 8 != 0 || p.N % 8 != 0 || p.W % 16 != 0) return 0;
  if (!aligned16(p.gT) || !aligned16(p.aT) || !aligned16(p.dw) || !aligned16(p.a_scale)) return 0;
  if (current_device_cc() != 90) return 0;
  p.arch = 90;
  return grouped_gemm_fp8_wgrad_sm90_workspace(p.E);
#else
  return 0;
#endif
}

void grouped_gemm_fp8_wgrad_cuda(const GroupedGemmFp8WgradParams& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  auto run = [&](auto tag) {
    using T = decltype(tag);
#ifdef NK_HAS_SM90
    if (p.arch == 90) {
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((p.N * p.K + kTThreads - 1) / kTThreads, 64));
      fp8_wgrad_zero_empty_kernel<T><<<dim3(static_cast<unsigned>(p.E), blocks), kTThreads, 0, s>>>(p);
      NK_CUDA_LAUNCH_CHECK();
      grouped_gemm_fp8_wgrad_sm90_run(p, stream);
      return;
    }
#endif
    const dim3 grid(static_cast<unsigned>(p.N * ((p.K + kFp8Threads - 1) / kFp8Threads)), static_cast<unsigned>(p.E));
    fp8_wgrad_portable_kernel<T><<<grid, kFp8Threads, 0, s>>>(p);
    NK_CUDA_LAUNCH_CHECK();
  };
  if (p.dtype == GgType::BF16) run(__nv_bfloat16{});
  else run(float{});
}

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
  if (grouped_gemm_portable_forced()) return 0;
  if (p.block > 0) {  // per-block scales: the CUTLASS blockwise kernel, bf16 out
    if (p.dtype != GgType::BF16 || p.block != 128 || p.K % 128 != 0 || p.N % 8 != 0 || p.R <= 0) return 0;
    if (!aligned16(p.a) || !aligned16(p.w) || !aligned16(p.out) || current_device_cc() != 90) return 0;
    p.arch = 90;
    return grouped_gemm_fp8_blockwise_sm90_workspace(p.R, p.N, p.K, p.E);
  }
  const bool e4m3_out = p.dtype == GgType::E4M3 && p.act == GgAct::Relu2 && p.N % 16 == 0;
  if (p.dtype != GgType::BF16 && !e4m3_out) return 0;
  if (p.K % 16 != 0 || p.N % 8 != 0 || p.R <= 0 || p.E > 65535) return 0;
  if (!aligned16(p.a) || !aligned16(p.w) || !aligned16(p.out) || (p.pre != nullptr && !aligned16(p.pre))) return 0;
  if (current_device_cc() != 90) return 0;
  p.arch = 90;
  // e4m3 output: the first 256 bytes hold the sanitised out_scale (fp8_static_scale) the epilogue reads
  return grouped_gemm_fp8_sm90_workspace(p.E) + (p.dtype == GgType::E4M3 ? kScaleSlot : 0);
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
        p.offsets, p.E, p.R, p.N, static_cast<T*>(p.out), static_cast<T*>(p.pre));
    NK_CUDA_LAUNCH_CHECK();
  };
  switch (p.dtype) {
    case GgType::E4M3: zero(uint8_t{}); break;
    case GgType::F16: zero(__half{}); break;
    case GgType::BF16: zero(__nv_bfloat16{}); break;
    default: zero(float{}); break;
  }
#ifdef NK_HAS_SM90
  if (p.arch == 90) {
    if (p.block > 0) {
      grouped_gemm_fp8_blockwise_sm90_run(p, stream);
    } else if (p.dtype == GgType::E4M3) {  // a bad scale makes NaN codes, as the portable kernel's
      GroupedGemmFp8Params q = p;
      float* safe = static_cast<float*>(p.workspace);
      sanitise_scale_kernel<<<1, 1, 0, s>>>(p.out_scale, safe);
      NK_CUDA_LAUNCH_CHECK();
      q.out_scale = safe;
      q.workspace = static_cast<char*>(p.workspace) + kScaleSlot;
      grouped_gemm_fp8_sm90_run(q, stream);
    } else {
      grouped_gemm_fp8_sm90_run(p, stream);
    }
    return;
  }
#endif
  switch (p.dtype) {
    case GgType::E4M3: run_portable<uint8_t>(p, s); break;
    case GgType::F16: run_portable<__half>(p, s); break;
    case GgType::BF16: run_portable<__nv_bfloat16>(p, s); break;
    default: run_portable<float>(p, s); break;
  }
}

}  // namespace nk
