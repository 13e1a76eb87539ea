// CUDA kernels of the MoE permutation plan, gather and combine (math in permute.h).
// Details: docs/moe.md, section `csrc/moe/permute_cuda.cu`.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.cuh"
#include "moe/permute.h"

namespace nk {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kPlanWarps = 4;      // chunks per block in the count and rank kernels
constexpr int kRowThreads = 128;   // threads per block in gather and combine
constexpr int kRowsPerBlock = kRowThreads / 32;  // gather / combine-backward dy: a warp per row

// ---- plan ---------------------------------------------------------------------------------

// Expert of slot s for this lane, -1 when past the end or out of range (then ignored).
NK_DEVICE int slot_expert(const PermutePlanParams& p, int64_t s) {
  if (s >= p.slots) return -1;
  const int e = p.ids[s];
  return e >= 0 && e < p.experts ? e : -1;
}

__global__ void __launch_bounds__(kPlanWarps * 32) count_kernel(PermutePlanParams p) {
  extern __shared__ int32_t hist[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t c = int64_t(blockIdx.x) * kPlanWarps + warp;
  if (c >= p.num_chunks) return;
  int32_t* cnt = hist + warp * p.experts;
  for (int e = lane; e < p.experts; e += 32) cnt[e] = 0;
  __syncwarp();
  const int64_t s0 = c * kPermChunk;
  int e_next = slot_expert(p, s0 + lane);  // the next step's id is loaded one step ahead
  for (int i = 0; i < kPermChunk && s0 + i < p.slots; i += 32) {
    const int e = e_next;
    if (i + 32 < kPermChunk) e_next = slot_expert(p, s0 + i + 32 + lane);
    const unsigned peers = __match_any_sync(kFull, e);
    if (e >= 0 && lane == __ffs(peers) - 1) cnt[e] += __popc(peers);
    __syncwarp();
  }
  for (int e = lane; e < p.experts; e += 32) p.chunk_counts[c * p.experts + e] = cnt[e];
}

// Block (32, 32): x = expert within a group of 32, y = a contiguous range of chunks.
__global__ void __launch_bounds__(1024) scan_kernel(PermutePlanParams p) {
  __shared__ int32_t part[32][33];
  const int e = blockIdx.x * 32 + threadIdx.x;
  const int64_t per = (p.num_chunks + 31) / 32;
  const int64_t c0 = threadIdx.y * per, c1 = c0 + per < p.num_chunks ? c0 + per : p.num_chunks;
  int32_t sum = 0;
  if (e < p.experts)
    for (int64_t c = c0; c < c1; ++c) sum += p.chunk_counts[c * p.experts + e];
  part[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0) {  // exclusive scan over the 32 ranges, per expert
    int32_t run = 0;
    for (int y = 0; y < 32; ++y) {
      const int32_t v = part[y][threadIdx.x];
      part[y][threadIdx.x] = run;
      run += v;
    }
    if (e < p.experts) p.counts[e] = run;
  }
  __syncthreads();
  if (e < p.experts) {
    int32_t run = part[threadIdx.y][threadIdx.x];
    for (int64_t c = c0; c < c1; ++c) {
      const int32_t v = p.chunk_counts[c * p.experts + e];
      p.chunk_counts[c * p.experts + e] = run;
      run += v;
    }
  }
}

// One warp: lane i scans a contiguous range of experts.
__global__ void offsets_kernel(PermutePlanParams p) {
  const int lane = threadIdx.x;
  const int per = (p.experts + 31) / 32;
  const int e0 = lane * per, e1 = e0 + per < p.experts ? e0 + per : p.experts;
  auto padded = [&](int e) { return (p.counts[e] + p.pad_to - 1) / p.pad_to * p.pad_to; };
  int32_t local = 0;
  for (int e = e0; e < e1; ++e) local += padded(e);
  int32_t incl = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t v = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += v;
  }
  int32_t run = incl - local;
  for (int e = e0; e < e1; ++e) {
    p.offsets[e] = run;
    run += padded(e);
  }
  if (lane == 31) p.offsets[p.experts] = incl;
}

__global__ void __launch_bounds__(kPlanWarps * 32) rank_kernel(PermutePlanParams p) {
  extern __shared__ int32_t next_row[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t c = int64_t(blockIdx.x) * kPlanWarps + warp;
  if (c >= p.num_chunks) return;
  int32_t* next = next_row + warp * p.experts;
  for (int e = lane; e < p.experts; e += 32) next[e] = p.chunk_counts[c * p.experts + e] + p.offsets[e];
  __syncwarp();
  const unsigned below = (1u << lane) - 1u;
  const int64_t s0 = c * kPermChunk;
  int e_next = slot_expert(p, s0 + lane);
  for (int i = 0; i < kPermChunk && s0 + i < p.slots; i += 32) {
    const int64_t s = s0 + i + lane;
    const int e = e_next;
    if (i + 32 < kPermChunk) e_next = slot_expert(p, s + 32);
    const unsigned peers = __match_any_sync(kFull, e);
    if (e >= 0) {
      const int32_t r = next[e] + __popc(peers & below);
      p.row_of_slot[s] = r;
      p.slot_of_row[r] = static_cast<int32_t>(s);
    } else if (s < p.slots) {
      p.row_of_slot[s] = -1;  // out-of-range expert id: the slot is dropped
    }
    __syncwarp();
    if (e >= 0 && lane == __ffs(peers) - 1) next[e] += __popc(peers);
    __syncwarp();
  }
}

// The whole plan in one launch when the slots fit one chunk (decode-size batches: T*k <= 512):
// the block fills slot_of_row with -1, then warp 0 counts, scans the experts and ranks, with the
// same steps as the multi-kernel path (so the same plan). Saves four launches where latency rules.
constexpr int kSmallPlanThreads = 256;

__global__ void __launch_bounds__(kSmallPlanThreads) small_plan_kernel(PermutePlanParams p) {
  extern __shared__ int32_t cnt[];  // (E,): counts, then the next free row per expert
  const int lane = threadIdx.x % 32;
  for (int64_t r = threadIdx.x; r < p.rows; r += kSmallPlanThreads) p.slot_of_row[r] = -1;
  for (int e = threadIdx.x; e < p.experts; e += kSmallPlanThreads) cnt[e] = 0;
  __syncthreads();
  if (threadIdx.x >= 32) return;  // one warp from here on (no block barriers below)
  for (int i = 0; i < p.slots; i += 32) {
    const int e = slot_expert(p, i + lane);
    const unsigned peers = __match_any_sync(kFull, e);
    if (e >= 0 && lane == __ffs(peers) - 1) cnt[e] += __popc(peers);
    __syncwarp();
  }
  // counts and offsets (lane i scans a contiguous range of experts), next row = offset
  const int per = (p.experts + 31) / 32;
  const int e0 = lane * per, e1 = e0 + per < p.experts ? e0 + per : p.experts;
  auto padded = [&](int32_t c) { return (c + p.pad_to - 1) / p.pad_to * p.pad_to; };
  int32_t local = 0;
  for (int e = e0; e < e1; ++e) local += padded(cnt[e]);
  int32_t incl = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int32_t v = __shfl_up_sync(kFull, incl, o);
    if (lane >= o) incl += v;
  }
  int32_t run = incl - local;
  for (int e = e0; e < e1; ++e) {
    const int32_t c = cnt[e];
    p.counts[e] = c;
    p.offsets[e] = run;
    cnt[e] = run;  // this lane's own experts: no other lane reads them before the __syncwarp
    run += padded(c);
  }
  if (lane == 31) p.offsets[p.experts] = incl;
  __syncwarp();
  const unsigned below = (1u << lane) - 1u;
  for (int i = 0; i < p.slots; i += 32) {
    const int64_t s = i + lane;
    const int e = slot_expert(p, s);
    const unsigned peers = __match_any_sync(kFull, e);
    if (e >= 0) {
      const int32_t r = cnt[e] + __popc(peers & below);
      p.row_of_slot[s] = r;
      p.slot_of_row[r] = static_cast<int32_t>(s);
    } else if (s < p.slots) {
      p.row_of_slot[s] = -1;
    }
    __syncwarp();
    if (e >= 0 && lane == __ffs(peers) - 1) cnt[e] += __popc(peers);
    __syncwarp();
  }
}

// ---- gather / combine ---------------------------------------------------------------------

template <typename F>
void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f.template operator()<float>(); break;
    case DType::F16: f.template operator()<__half>(); break;
    case DType::BF16: f.template operator()<__nv_bfloat16>(); break;
  }
}

// V elements of T starting at p (16-byte access when V * sizeof(T) == 16 and kVec).
template <typename T, int V, bool kVec>
NK_DEVICE void load_v(const T* ptr, int64_t n_left, float (&v)[V]) {
  if constexpr (kVec) {
    const uint4 raw = *reinterpret_cast<const uint4*>(ptr);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = to_f<T>(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = i < n_left ? to_f<T>(ptr[i]) : 0.f;
  }
}

template <typename T, int V, bool kVec>
NK_DEVICE void store_v(T* ptr, int64_t n_left, const float (&v)[V]) {
  if constexpr (kVec) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < V; ++i) e[i] = from_f<T>(v[i]);
    *reinterpret_cast<uint4*>(ptr) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i)
      if (i < n_left) ptr[i] = from_f<T>(v[i]);
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kRowThreads) gather_kernel(GatherParams p) {
  constexpr int V = 16 / sizeof(T);
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;  // one warp per row
  if (r >= p.rows) return;
  const int lane = threadIdx.x % 32;
  const int32_t s = p.slot_of_row[r];
  const bool pad = s < 0 || s >= p.tokens * p.top_k;
  const T* src = static_cast<const T*>(p.x) + (pad ? 0 : int64_t(s / p.top_k) * p.x_st);
  T* dst = static_cast<T*>(p.out) + r * p.width;
  for (int64_t i = int64_t(lane) * V; i < p.width; i += 32 * V) {
    float v[V];
    if (pad) {
#pragma unroll
      for (int q = 0; q < V; ++q) v[q] = 0.f;
    } else {
      load_v<T, V, kVec>(src + i, p.width - i, v);
    }
    store_v<T, V, kVec>(dst + i, p.width - i, v);
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kRowThreads) gather_bwd_kernel(GatherBwdParams p) {
  constexpr int V = 16 / sizeof(T);
  const int64_t t = blockIdx.x;
  const T* dxs = static_cast<const T*>(p.dxs);
  for (int64_t i = int64_t(threadIdx.x) * V; i < p.width; i += int64_t(kRowThreads) * V) {
    float acc[V] = {};
    for (int j = 0; j < p.top_k; ++j) {
      const int32_t r = p.row_of_slot[t * p.top_k + j];
      if (r < 0 || r >= p.rows) continue;
      float v[V];
      load_v<T, V, kVec>(dxs + r * p.dxs_st + i, p.width - i, v);
#pragma unroll
      for (int q = 0; q < V; ++q) acc[q] += v[q];
    }
    store_v<T, V, kVec>(static_cast<T*>(p.dx) + t * p.width + i, p.width - i, acc);
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kRowThreads) combine_kernel(CombineParams p) {
  constexpr int V = 16 / sizeof(T);
  const int64_t t = blockIdx.x;
  const T* y = static_cast<const T*>(p.y);
  for (int64_t i = int64_t(threadIdx.x) * V; i < p.width; i += int64_t(kRowThreads) * V) {
    float acc[V] = {};
    for (int j = 0; j < p.top_k; ++j) {
      const int64_t s = t * p.top_k + j;
      const int32_t r = p.row_of_slot[s];
      if (r < 0 || r >= p.rows) continue;
      const float w = p.weights != nullptr ? p.weights[s] : 1.f;
      float v[V];
      load_v<T, V, kVec>(y + r * p.y_st + i, p.width - i, v);
#pragma unroll
      for (int q = 0; q < V; ++q) acc[q] = fmaf(w, v[q], acc[q]);
    }
    store_v<T, V, kVec>(static_cast<T*>(p.out) + t * p.width + i, p.width - i, acc);
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kRowThreads) combine_bwd_dy_kernel(CombineBwdParams q) {
  constexpr int V = 16 / sizeof(T);
  const CombineParams& p = q.fwd;
  const int64_t r = int64_t(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;  // one warp per row
  if (r >= p.rows) return;
  const int lane = threadIdx.x % 32;
  const int32_t s = p.slot_of_row[r];
  const bool pad = s < 0 || s >= p.tokens * p.top_k;
  const float w = !pad && p.weights != nullptr ? p.weights[s] : 1.f;
  const T* go = static_cast<const T*>(q.dout) + (pad ? 0 : int64_t(s / p.top_k) * q.dout_st);
  T* dy = static_cast<T*>(q.dy) + r * p.width;
  for (int64_t i = int64_t(lane) * V; i < p.width; i += 32 * V) {
    float v[V];
    if (pad) {
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = 0.f;
    } else {
      load_v<T, V, kVec>(go + i, p.width - i, v);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = w * v[k];
    }
    store_v<T, V, kVec>(dy + i, p.width - i, v);
  }
}

// One warp per (token, j): dweights[t, j] = dot(dout[t], y[row]).
template <typename T, bool kVec>
__global__ void __launch_bounds__(kRowThreads) combine_bwd_dw_kernel(CombineBwdParams q) {
  constexpr int V = 16 / sizeof(T);
  const CombineParams& p = q.fwd;
  const int lane = threadIdx.x % 32;
  const int64_t s = int64_t(blockIdx.x) * (kRowThreads / 32) + threadIdx.x / 32;
  if (s >= p.tokens * p.top_k) return;
  const int64_t t = s / p.top_k;
  const int32_t r = p.row_of_slot[s];
  float acc = 0.f;
  if (r >= 0 && r < p.rows) {
    const T* go = static_cast<const T*>(q.dout) + t * q.dout_st;
    const T* y = static_cast<const T*>(p.y) + r * p.y_st;
    for (int64_t i = int64_t(lane) * V; i < p.width; i += 32 * V) {
      float a[V], b[V];
      load_v<T, V, kVec>(go + i, p.width - i, a);
      load_v<T, V, kVec>(y + i, p.width - i, b);
#pragma unroll
      for (int k = 0; k < V; ++k) acc = fmaf(a[k], b[k], acc);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(kFull, acc, o);
  if (lane == 0) q.dweights[s] = acc;
}

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock); }

// 16-byte accesses are legal when every row start is 16-byte aligned.
bool vec_ok(int elem_bytes, int64_t width, std::initializer_list<std::pair<const void*, int64_t>> rows) {
  if ((width * elem_bytes) % 16) return false;
  for (auto& [ptr, stride] : rows)
    if (!aligned16(ptr) || (stride * elem_bytes) % 16) return false;
  return true;
}


}  // namespace

void moe_permute_plan_cuda(const PermutePlanParams& p, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.num_chunks == 1) {
    small_plan_kernel<<<1, kSmallPlanThreads, size_t(p.experts) * sizeof(int32_t), stream>>>(p);
    NK_CUDA_LAUNCH_CHECK();
    return;
  }
  const size_t smem = size_t(kPlanWarps) * p.experts * sizeof(int32_t);  // <= 32 KB (E <= 2048)
  const unsigned chunk_blocks = static_cast<unsigned>((p.num_chunks + kPlanWarps - 1) / kPlanWarps);
  count_kernel<<<chunk_blocks, kPlanWarps * 32, smem, stream>>>(p);
  NK_CUDA_LAUNCH_CHECK();
  scan_kernel<<<(p.experts + 31) / 32, dim3(32, 32), 0, stream>>>(p);
  NK_CUDA_LAUNCH_CHECK();
  offsets_kernel<<<1, 32, 0, stream>>>(p);
  NK_CUDA_LAUNCH_CHECK();
  NK_CUDA_CHECK(cudaMemsetAsync(p.slot_of_row, 0xff, size_t(p.rows) * sizeof(int32_t), stream));
  rank_kernel<<<chunk_blocks, kPlanWarps * 32, smem, stream>>>(p);
  NK_CUDA_LAUNCH_CHECK();
}

void moe_gather_cuda(const GatherParams& p, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch(p.dtype, [&]<typename T>() {
    if (vec_ok(sizeof(T), p.width, {{p.x, p.x_st}, {p.out, p.width}}))
      gather_kernel<T, true><<<row_blocks(p.rows), kRowThreads, 0, stream>>>(p);
    else
      gather_kernel<T, false><<<row_blocks(p.rows), kRowThreads, 0, stream>>>(p);
    NK_CUDA_LAUNCH_CHECK();
  });
}

void moe_gather_bwd_cuda(const GatherBwdParams& p, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch(p.dtype, [&]<typename T>() {
    if (vec_ok(sizeof(T), p.width, {{p.dxs, p.dxs_st}, {p.dx, p.width}}))
      gather_bwd_kernel<T, true><<<static_cast<unsigned>(p.tokens), kRowThreads, 0, stream>>>(p);
    else
      gather_bwd_kernel<T, false><<<static_cast<unsigned>(p.tokens), kRowThreads, 0, stream>>>(p);
    NK_CUDA_LAUNCH_CHECK();
  });
}

void moe_combine_cuda(const CombineParams& p, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch(p.dtype, [&]<typename T>() {
    if (vec_ok(sizeof(T), p.width, {{p.y, p.y_st}, {p.out, p.width}}))
      combine_kernel<T, true><<<static_cast<unsigned>(p.tokens), kRowThreads, 0, stream>>>(p);
    else
      combine_kernel<T, false><<<static_cast<unsigned>(p.tokens), kRowThreads, 0, stream>>>(p);
    NK_CUDA_LAUNCH_CHECK();
  });
}

void moe_combine_bwd_cuda(const CombineBwdParams& q, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const CombineParams& p = q.fwd;
  dispatch(p.dtype, [&]<typename T>() {
    const bool vec = vec_ok(sizeof(T), p.width, {{p.y, p.y_st}, {q.dout, q.dout_st}, {q.dy, p.width}});
    if (vec)
      combine_bwd_dy_kernel<T, true><<<row_blocks(p.rows), kRowThreads, 0, stream>>>(q);
    else
      combine_bwd_dy_kernel<T, false><<<row_blocks(p.rows), kRowThreads, 0, stream>>>(q);
    NK_CUDA_LAUNCH_CHECK();
    if (q.dweights != nullptr) {
      const unsigned blocks = static_cast<unsigned>((p.tokens * p.top_k + kRowThreads / 32 - 1) / (kRowThreads / 32));
      if (vec)
        combine_bwd_dw_kernel<T, true><<<blocks, kRowThreads, 0, stream>>>(q);
      else
        combine_bwd_dw_kernel<T, false><<<blocks, kRowThreads, 0, stream>>>(q);
      NK_CUDA_LAUNCH_CHECK();
    }
  });
}

}  // namespace nk
