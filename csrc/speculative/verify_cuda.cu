// CUDA kernels of speculative verification and the fused sampling transform (semantics in
// spec/verify.h; the CPU kernels in verify_cpu.cpp make the same decisions).
// Details: docs/speculative.md, section `csrc/speculative/verify_cuda.cu`.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.cuh"
#include "speculative/numerics.cuh"
#include "speculative/verify.h"
#include "speculative/walk.cuh"

namespace nk {
namespace {

using namespace spec;

constexpr int kRowThreads = 256;       // row-partial kernels
constexpr int kMergeThreads = 128;     // merges and walks: 4 warps
constexpr int kSampleThreads = 512;    // sampling transform, one block per row
constexpr int kSampleBins = 1024;      // top 12 bits of e in [0, 1] (sign 0, exponent <= 127)
constexpr int kSampleCands = 2048;     // candidates of the bounded top-k path (shared memory)
constexpr int kSampleUnroll = 4;       // 16-byte loads in flight per thread (sampling passes)
constexpr int64_t kMinChunk = 2048;    // smallest vocab chunk worth a block
// Largest chunk: one tile per thread for 16-bit logits (256 threads x 4 x 8 elements), two
// for float32; keeps blocks short, so the tail of the last wave is short.
constexpr int64_t kMaxChunk = 8192;
constexpr int kArgmaxUnroll = 4;       // 16-byte loads in flight per thread (argmax)
constexpr int kRejectUnroll = 2;       // float4 pairs (p, q) in flight per thread (rejection)

template <typename T>
constexpr int kVecOf = 16 / sizeof(T);  // elements per 16-byte vector

template <bool kArgmax>
NK_DEVICE bool better(float v1, int64_t i1, float v2, int64_t i2) {
  return kArgmax ? argmax_better(v1, i1, v2, i2) : race_better(v1, i1, v2, i2);
}

template <bool kArgmax>
NK_DEVICE void warp_reduce_best(float& v, int64_t& i) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_down_sync(0xffffffffu, v, off);
    const long long oi = __shfl_down_sync(0xffffffffu, static_cast<long long>(i), off);
    if (better<kArgmax>(ov, oi, v, i)) v = ov, i = oi;
  }
}

// Best (value, index) of the block, valid in thread 0. blockDim.x is a multiple of 32 (<= 1024).
// Ends with a barrier so the scratch can be reused by the next call.
template <bool kArgmax>
__device__ void block_reduce_best(float& v, int64_t& i) {
  __shared__ float sv[32];
  __shared__ long long si[32];
  warp_reduce_best<kArgmax>(v, i);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  if (lane == 0) sv[warp] = v, si[warp] = i;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? sv[lane] : 0.f;
    i = lane < nwarps ? si[lane] : -1;
    warp_reduce_best<kArgmax>(v, i);
  }
  __syncthreads();
}

// Fixed-order block sum (pairwise tree over the threads), returned to every thread.
// `red` holds blockDim.x floats; blockDim.x is a power of two.
__device__ float block_sum(float v, float* red) {
  const int t = threadIdx.x;
  red[t] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (t < s) red[t] += red[t + s];
    __syncthreads();
  }
  const float r = red[0];
  __syncthreads();
  return r;
}

// ---- greedy / tree greedy: partial argmax per (row, chunk) --------------------------------

// Exact scan of one 16-byte vector (elements i0, i0 + 1, ...) into the running best.
template <typename T>
NK_DEVICE void argmax_vec(const uint4& raw, int64_t i0, float& bv, int64_t& bi) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int u = 0; u < kVecOf<T>; ++u) {
    const float x = to_f<T>(e[u]);
    if (argmax_better(x, i0 + u, bv, bi)) bv = x, bi = i0 + u;
  }
}

// Each thread loads kArgmaxUnroll vectors (v = base + tid + u * blockDim, increasing in u, so
// its elements come in index order) and screens them: the NaN-ignoring max m and the sum s (NaN
// when an element is NaN, or on inf - inf: a false alarm only costs the exact scan). Without a
// NaN the running best (bv, bi) can only become (m, the first index of m in the tile), and only
// when there is none yet or m > bv (equal values come later and lose); the first index comes
// from a reverse compare-select pass. With a NaN the exact per-element scan runs. Cost per
// element: convert, max, add (+ compare, select when the tile improves the best) instead of
// the ~10 instructions of the exact comparison with its int64 index.
template <typename T>
__global__ void __launch_bounds__(kRowThreads) argmax_partials_kernel(SpecArgmaxParams a) {
  const int64_t r = blockIdx.x, s = blockIdx.y;
  const int64_t b = r / a.npos, j = r % a.npos;
  const int64_t o = r * a.nsplit + s;
  if (a.num_draft != nullptr && j > num_drafts_of(a.num_draft, b, a.npos - 1)) {
    if (threadIdx.x == 0) a.part_val[o] = 0.f, a.part_idx[o] = -1;  // never read by the walk
    return;
  }
  const T* row = static_cast<const T*>(a.logits) + b * a.l_sb + j * a.l_st;
  const int64_t lo = s * a.chunk, hi = lo + a.chunk < a.vocab ? lo + a.chunk : a.vocab;
  float bv = 0.f;
  int64_t bi = -1;
  constexpr int kVec = kVecOf<T>;
  int64_t scalar_from = lo;
  if ((reinterpret_cast<uintptr_t>(row + lo) & 15) == 0) {
    const int64_t nvec = (hi - lo) / kVec;
    const uint4* vrow = reinterpret_cast<const uint4*>(row + lo);
    // A thread's valid vectors in a tile are a prefix in u: none once u = 0 is out of range.
    for (int64_t base = 0; base + threadIdx.x < nvec; base += kArgmaxUnroll * blockDim.x) {
      uint4 raw[kArgmaxUnroll];
#pragma unroll
      for (int u = 0; u < kArgmaxUnroll; ++u) {
        const int64_t v = base + threadIdx.x + u * blockDim.x;
        raw[u] = v < nvec ? vrow[v] : make_uint4(0u, 0u, 0u, 0u);
      }
      float m = -INFINITY, sum = 0.f;
#pragma unroll
      for (int u = 0; u < kArgmaxUnroll; ++u) {
        if (base + threadIdx.x + u * blockDim.x < nvec) {
          const T* e = reinterpret_cast<const T*>(&raw[u]);
#pragma unroll
          for (int q = 0; q < kVec; ++q) {
            const float x = to_f<T>(e[q]);
            m = fmaxf(m, x);
            sum += x;
          }
        }
      }
      if (bi >= 0 && bv != bv) continue;  // a NaN best is never beaten (later indices)
      if (sum == sum) {
        // No NaN in the tile: the best changes only to (m, first index of m in the tile).
        if (bi < 0 || m > bv) {
          int64_t first = -1;
#pragma unroll
          for (int u = kArgmaxUnroll - 1; u >= 0; --u) {
            const int64_t v = base + threadIdx.x + u * blockDim.x;
            const T* e = reinterpret_cast<const T*>(&raw[u]);
#pragma unroll
            for (int q = kVec - 1; q >= 0; --q)
              if (v < nvec && to_f<T>(e[q]) == m) first = lo + v * kVec + q;
          }
          bv = m, bi = first;
        }
      } else {  // a NaN (or an inf - inf sum): the exact scan
#pragma unroll
        for (int u = 0; u < kArgmaxUnroll; ++u) {
          const int64_t v = base + threadIdx.x + u * blockDim.x;
          if (v < nvec) argmax_vec<T>(raw[u], lo + v * kVec, bv, bi);
        }
      }
    }
    scalar_from = lo + nvec * kVec;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < hi; i += blockDim.x) {
    const float x = to_f<T>(row[i]);
    if (argmax_better(x, i, bv, bi)) bv = x, bi = i;
  }
  block_reduce_best<true>(bv, bi);
  if (threadIdx.x == 0) a.part_val[o] = bv, a.part_idx[o] = bi;
}

void launch_argmax_partials(const SpecArgmaxParams& a, cudaStream_t st) {
  const dim3 grid(static_cast<unsigned>(a.batch * a.npos), static_cast<unsigned>(a.nsplit));
  switch (a.dtype) {
    case DType::F32: argmax_partials_kernel<float><<<grid, kRowThreads, 0, st>>>(a); break;
    case DType::F16: argmax_partials_kernel<__half><<<grid, kRowThreads, 0, st>>>(a); break;
    case DType::BF16: argmax_partials_kernel<__nv_bfloat16><<<grid, kRowThreads, 0, st>>>(a); break;
  }
  NK_CUDA_LAUNCH_CHECK();
}

// Rows [0, nrows) of request b: warp w reduces rows w, w + warps, ...; its lanes load the
// partials in parallel (coalesced) and combine them with the total order, so the winner is
// reduce_argmax's. Ends with a barrier: the row argmaxes (global) are then visible to thread 0.
NK_DEVICE void merge_rows(const SpecArgmaxParams& a, int64_t b, int64_t nrows) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t j = warp; j < nrows; j += nwarps) {
    const int64_t r = b * a.npos + j;
    float bv = 0.f;
    int64_t bi = -1;
    for (int64_t s = lane; s < a.nsplit; s += 32) {
      const float v = a.part_val[r * a.nsplit + s];
      const int64_t i = a.part_idx[r * a.nsplit + s];
      if (argmax_better(v, i, bv, bi)) bv = v, bi = i;
    }
    warp_reduce_best<true>(bv, bi);
    if (lane == 0) a.row_arg[r] = bi < 0 ? 0 : bi;
  }
  __syncthreads();
}

// One block per request: merge the rows it reads, then thread 0 walks (spec/walk.cuh).
__global__ void __launch_bounds__(kMergeThreads) greedy_walk_kernel(SpecGreedyParams p) {
  const int64_t b = blockIdx.x;
  merge_rows(p.am, b, num_drafts_of(p.am.num_draft, b, p.k) + 1);
  if (threadIdx.x == 0) greedy_walk(p, b);
}

__global__ void __launch_bounds__(kMergeThreads) tree_greedy_walk_kernel(SpecTreeGreedyParams p) {
  const int64_t b = blockIdx.x;
  merge_rows(p.am, b, p.n_nodes);
  if (threadIdx.x == 0) tree_greedy_walk(p, b);
}

// ---- rejection sampling -------------------------------------------------------------------

// First rejected draft of request b, computed by one warp: lane l tests draft base + l (the
// tests are independent), the lowest failing lane is first_rejection's answer. Two dependent
// loads of latency instead of 2n. Every lane of the warp must call it.
NK_DEVICE int64_t warp_first_rejection(const SpecRejectionParams& p, int64_t b, int64_t n, uint64_t seed) {
  const int lane = threadIdx.x & 31;
  for (int64_t base = 0; base < n; base += 32) {
    const int64_t j = base + lane;
    const unsigned rej = __ballot_sync(0xffffffffu, j < n && draft_rejected(p, b, j, seed));
    if (rej != 0u) return base + __ffs(static_cast<int>(rej)) - 1;
  }
  return n;
}

// One entry of one race with the screen in front: det_log and the division run only when the
// entry may beat the thread's best (race_may_win); the winner is the unscreened race's.
NK_DEVICE void screened_race(int64_t i, float w, float u, float& k, int64_t& ki) {
  if (!(w > 0.f) || !race_may_win(u, w, k, ki)) return;
  float key;
  if (race_key(race_expo(u), w, key) && race_better(key, i, k, ki)) k = key, ki = i;
}

// Grid (batch, nsplit). Warp 0 finds the sampled position m; every thread then races over
// kRejectUnroll float4 groups of p (and q) per step, loads first (2 x 16 B x kRejectUnroll in
// flight per thread), then one Philox call per group and the screened races.
__global__ void __launch_bounds__(kRowThreads, 4) rejection_partials_kernel(SpecRejectionParams p) {
  const int64_t b = blockIdx.x, s = blockIdx.y;
  const uint64_t seed = seed_of(p.seed_ptr, p.seed);
  __shared__ long long s_m;
  const int64_t n = num_drafts_of(p.num_draft, b, p.k);
  if (threadIdx.x < 32) {
    const int64_t m = warp_first_rejection(p, b, n, seed);
    if (threadIdx.x == 0) s_m = m;
  }
  __syncthreads();
  const int64_t m = s_m;
  const bool residual = m < n;
  const bool fallback = residual && p.q != nullptr;
  const float* prow = p.p + b * p.p_sb + m * p.p_st;
  const float* qrow = (residual && p.q) ? p.q + b * p.q_sb + m * p.q_st : nullptr;
  const int64_t x = residual ? clamp_id(p.draft[b * p.d_sb + m * p.d_st], p.vocab) : -1;
  const int64_t lo = s * p.chunk, hi = lo + p.chunk < p.vocab ? lo + p.chunk : p.vocab;
  float k1 = 0.f, k2 = 0.f;
  int64_t i1 = -1, i2 = -1;
  // q of entry i: the draft distribution, or one-hot at the drafted token (greedy draft).
  auto q_at = [&](int64_t i, float qv) { return !residual ? 0.f : (qrow ? qv : (i == x ? 1.f : 0.f)); };
  auto entry = [&](int64_t i, float pi, float qi, float u) {
    screened_race(i, residual ? pi - qi : pi, u, k1, i1);
    if (fallback) screened_race(i, pi, u, k2, i2);
  };
  int64_t scalar_from = lo;
  const bool aligned = (reinterpret_cast<uintptr_t>(prow + lo) & 15) == 0 &&
                       (qrow == nullptr || (reinterpret_cast<uintptr_t>(qrow + lo) & 15) == 0);
  if (aligned) {  // lo is a multiple of 8, so vector v covers the Philox group lo/4 + v
    const int64_t nvec = (hi - lo) / 4;
    const float4* pv = reinterpret_cast<const float4*>(prow + lo);
    const float4* qv = qrow ? reinterpret_cast<const float4*>(qrow + lo) : nullptr;
    for (int64_t base = 0; base < nvec; base += kRejectUnroll * blockDim.x) {
      float4 pp[kRejectUnroll], qq[kRejectUnroll];
#pragma unroll
      for (int u = 0; u < kRejectUnroll; ++u) {
        const int64_t v = base + threadIdx.x + u * blockDim.x;
        const bool ok = v < nvec;
        pp[u] = ok ? pv[v] : make_float4(0.f, 0.f, 0.f, 0.f);
        qq[u] = ok && qv ? qv[v] : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int u = 0; u < kRejectUnroll; ++u) {
        const int64_t v = base + threadIdx.x + u * blockDim.x;
        if (v >= nvec) continue;
        const int64_t g = lo / 4 + v;
        float uu[4];
        race_uniforms(seed, kTagResidual, b, m, g, uu);
        const float pa[4] = {pp[u].x, pp[u].y, pp[u].z, pp[u].w}, qa[4] = {qq[u].x, qq[u].y, qq[u].z, qq[u].w};
#pragma unroll
        for (int e = 0; e < 4; ++e) entry(g * 4 + e, pa[e], q_at(g * 4 + e, qa[e]), uu[e]);
      }
    }
    scalar_from = lo + nvec * 4;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < hi; i += blockDim.x) {
    float uu[4];
    race_uniforms(seed, kTagResidual, b, m, i / 4, uu);
    entry(i, prow[i], q_at(i, qrow ? qrow[i] : 0.f), uu[i % 4]);
  }
  block_reduce_best<false>(k1, i1);
  block_reduce_best<false>(k2, i2);
  if (threadIdx.x == 0) {
    const int64_t o = b * p.nsplit + s;
    p.part_key[o] = k1, p.part_idx[o] = i1, p.part_key2[o] = k2, p.part_idx2[o] = i2;
  }
}

// One warp per request: m again (warp-parallel), both races' partials loaded by the lanes in
// parallel and combined with the total order (rejection_finalize's winners), lane 0 writes.
__global__ void __launch_bounds__(kMergeThreads) rejection_finalize_kernel(SpecRejectionParams p) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * (kMergeThreads / 32) + (threadIdx.x >> 5);
  if (b >= p.batch) return;  // whole warps leave together
  const int lane = threadIdx.x & 31;
  const uint64_t seed = seed_of(p.seed_ptr, p.seed);
  const int64_t m = warp_first_rejection(p, b, num_drafts_of(p.num_draft, b, p.k), seed);
  float k1 = 0.f, k2 = 0.f;
  int64_t i1 = -1, i2 = -1;
  for (int64_t s = lane; s < p.nsplit; s += 32) {
    const int64_t o = b * p.nsplit + s;
    if (race_better(p.part_key[o], p.part_idx[o], k1, i1)) k1 = p.part_key[o], i1 = p.part_idx[o];
    if (race_better(p.part_key2[o], p.part_idx2[o], k2, i2)) k2 = p.part_key2[o], i2 = p.part_idx2[o];
  }
  warp_reduce_best<false>(k1, i1);
  warp_reduce_best<false>(k2, i2);
  if (lane == 0) rejection_write(p, b, m, race_token(i1, i2));
}

// ---- tree rejection -----------------------------------------------------------------------

struct TreeChain {
  const float* prow;  // target row of the current node
  const float* qb;    // draft_probs of this request (node i at qb + i * q_sn)
  int64_t q_sn;
  const int* rej;
  const float* z;
  // The residual after the first r rejected children: p_{j+1} = max(0, p_j - q_{c_j}) / Z_j
  // (the same operations, in the same order, as the CPU kernel).
  NK_DEVICE float at(int64_t i, int r) const {
    float v = prow[i];
    for (int j = 0; j < r; ++j) {
      const float d = v - qb[rej[j] * q_sn + i];
      v = (d > 0.f ? d : 0.f) / z[j];
    }
    return v;
  }
};

__global__ void __launch_bounds__(kTreeThreads, 1) tree_rejection_kernel(SpecTreeRejectionParams p) {
  __shared__ int s_rej[kMaxTreeNodes];
  __shared__ float s_z[kMaxTreeNodes];
  __shared__ float s_red[kTreeThreads];
  __shared__ long long s_child;
  __shared__ int s_accept;
  const int tid = threadIdx.x;
  const int64_t b = blockIdx.x;
  const uint64_t seed = seed_of(p.seed_ptr, p.seed);
  const int64_t w = p.max_depth + 1;
  int64_t* out = p.out + b * w;
  int64_t* nodes = p.nodes + b * w;
  for (int64_t j = tid; j < w; j += blockDim.x) out[j] = -1, nodes[j] = -1;
  __syncthreads();
  int64_t cur = 0, depth = 0;  // uniform over the block: every decision comes from shared memory
  while (true) {
    if (tid == 0) nodes[depth] = cur;
    const TreeChain chain{p.p + b * p.p_sb + cur * p.p_sn, p.q + b * p.q_sb, p.q_sn, s_rej, s_z};
    int r = 0;
    int64_t scan = cur + 1, accepted = -1;
    while (depth < p.max_depth) {
      if (tid == 0) {
        int64_t c = scan;
        while (c < p.n_nodes && p.parents[b * p.par_sb + c * p.par_sn] != cur) ++c;
        s_child = c < p.n_nodes ? c : -1;
        s_accept = 0;
        if (c < p.n_nodes) {
          const int64_t xx = clamp_id(p.cand[b * p.c_sb + c * p.c_sn], p.vocab);
          const float qx = p.q[b * p.q_sb + c * p.q_sn + xx];
          s_accept = accept_draft(accept_uniform(seed, kTagTreeAccept, b, c), chain.at(xx, r), qx) ? 1 : 0;
        }
      }
      __syncthreads();
      const int64_t c = s_child;
      const int acc = s_accept;
      __syncthreads();
      if (c < 0) break;
      if (acc) {
        accepted = c;
        break;
      }
      const float* qrow = p.q + b * p.q_sb + c * p.q_sn;
      float part = 0.f;
      for (int64_t i = tid; i < p.vocab; i += blockDim.x) {
        const float d = chain.at(i, r) - qrow[i];
        part += d > 0.f ? d : 0.f;
      }
      const float z = block_sum(part, s_red);
      if (!(z > 0.f)) break;  // all-zero residual: sample from the current one
      if (tid == 0) s_rej[r] = static_cast<int>(c), s_z[r] = z;
      __syncthreads();
      ++r;
      scan = c + 1;
    }
    if (accepted >= 0) {
      if (tid == 0) out[depth] = clamp_id(p.cand[b * p.c_sb + accepted * p.c_sn], p.vocab);  // as tested
      cur = accepted;
      ++depth;
      continue;
    }
    float k1 = 0.f, k2 = 0.f;
    int64_t i1 = -1, i2 = -1;
    for (int64_t g = tid; g * 4 < p.vocab; g += blockDim.x) {
      float e[4];
      race_exponentials(seed, kTagTreeResidual, b, cur, g, e);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int64_t i = g * 4 + u;
        if (i < p.vocab) tree_race_entry(i, chain.at(i, r), chain.prow[i], r > 0, e[u], k1, i1, k2, i2);
      }
    }
    block_reduce_best<false>(k1, i1);
    block_reduce_best<false>(k2, i2);
    if (tid == 0) {
      out[depth] = i1 >= 0 ? i1 : (i2 >= 0 ? i2 : 0);
      p.num_accepted[b] = depth;
    }
    break;
  }
}

// ---- sampling transform -------------------------------------------------------------------

// Streams the 16-byte vectors of an aligned row, kSampleUnroll in flight per thread (all loads
// of a tile before any use), calling on_vec(v, raw) for each; returns where the scalar tail
// starts.
template <typename T, typename F>
NK_DEVICE int64_t stream_vectors(const T* l, int64_t V, F&& on_vec) {
  const int64_t nvec = V / kVecOf<T>;
  const uint4* vl = reinterpret_cast<const uint4*>(l);
  for (int64_t base = 0; base < nvec; base += kSampleUnroll * blockDim.x) {
    uint4 raw[kSampleUnroll];
#pragma unroll
    for (int u = 0; u < kSampleUnroll; ++u) {
      const int64_t v = base + threadIdx.x + u * blockDim.x;
      raw[u] = v < nvec ? vl[v] : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kSampleUnroll; ++u) {
      const int64_t v = base + threadIdx.x + u * blockDim.x;
      if (v < nvec) on_vec(v, raw[u]);
    }
  }
  return nvec * kVecOf<T>;
}

// Calls f(i, x) for every logit x = l[i] of a row (16-byte loads when aligned). Any order per
// thread (callers only count, gather or reduce with a total order).
template <typename T, typename F>
NK_DEVICE void for_row(const T* l, int64_t V, F&& f) {
  constexpr int kVec = kVecOf<T>;
  int64_t from = 0;
  if ((reinterpret_cast<uintptr_t>(l) & 15) == 0) {
    from = stream_vectors<T>(l, V, [&](int64_t v, const uint4& raw) {
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int q = 0; q < kVec; ++q) f(v * kVec + q, to_f<T>(e[q]));
    });
  }
  for (int64_t i = from + threadIdx.x; i < V; i += blockDim.x) f(i, to_f<T>(l[i]));
}

// out[i] = f(l[i]) over a row: 16-byte loads and 16-byte stores (kVec / 4 float4 per vector)
// when both rows are aligned, scalar otherwise.
template <typename T, typename F>
NK_DEVICE void map_row(const T* l, float* out, int64_t V, F&& f) {
  constexpr int kVec = kVecOf<T>;
  int64_t from = 0;
  if ((reinterpret_cast<uintptr_t>(l) & 15) == 0 && (reinterpret_cast<uintptr_t>(out) & 15) == 0) {
    float4* vo = reinterpret_cast<float4*>(out);
    from = stream_vectors<T>(l, V, [&](int64_t v, const uint4& raw) {
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int q = 0; q < kVec; q += 4)
        vo[(v * kVec + q) / 4] = make_float4(f(to_f<T>(e[q])), f(to_f<T>(e[q + 1])), f(to_f<T>(e[q + 2])),
                                             f(to_f<T>(e[q + 3])));
    });
  }
  for (int64_t i = from + threadIdx.x; i < V; i += blockDim.x) out[i] = f(to_f<T>(l[i]));
}

// Candidate order of the bounded top-k path: larger value first, ties by lower index.
NK_DEVICE bool cand_before(float v1, int i1, float v2, int i2) { return v1 > v2 || (v1 == v2 && i1 < i2); }

// Bitonic sort of s_v/s_i[0, n) (n a power of two) into cand_before order.
NK_DEVICE void bitonic_sort(float* s_v, int* s_i, int n) {
  for (int size = 2; size <= n; size <<= 1) {
    for (int stride = size / 2; stride > 0; stride >>= 1) {
      for (int t = threadIdx.x; t < n / 2; t += blockDim.x) {
        const int lo = 2 * t - (t & (stride - 1)), hi = lo + stride;
        const bool first_half = (lo & size) == 0;  // this run sorts in cand_before order
        const bool swap = first_half ? cand_before(s_v[hi], s_i[hi], s_v[lo], s_i[lo])
                                     : cand_before(s_v[lo], s_i[lo], s_v[hi], s_i[hi]);
        if (swap) {
          const float v = s_v[lo];
          const int i = s_i[lo];
          s_v[lo] = s_v[hi], s_i[lo] = s_i[hi];
          s_v[hi] = v, s_i[hi] = i;
        }
      }
      __syncthreads();
    }
  }
}

// Thresholds from the sorted candidates s_v[0, c) (every e >= the k-th largest is among them):
// the top-k cut (ties kept), top-p over the kept mass (the largest candidate value whose mass
// at or above it reaches top_p of it: what the bisection finds), min-p, and the normaliser.
// Sums run in the sorted order (deterministic). One thread.
NK_DEVICE void bounded_thresholds(const float* s_v, int c, int64_t top_k, float top_p, float min_p, float& thr,
                                  float& z) {
  thr = s_v[top_k - 1];
  int nk = static_cast<int>(top_k);
  while (nk < c && s_v[nk] == thr) ++nk;
  if (top_p < 1.f) {
    float mass = 0.f;
    for (int j = 0; j < nk; ++j) mass += s_v[j];
    const float target = top_p * mass;
    float cum = 0.f;
    for (int j = 0; j < nk; ++j) {  // the first j reaching the target: ties of s_v[j] are kept by value
      cum += s_v[j];
      if (cum >= target) {
        thr = s_v[j];
        break;
      }
    }
  }
  if (min_p > 0.f) thr = fmaxf(thr, min_p);
  z = 0.f;
  for (int j = 0; j < nk && s_v[j] >= thr; ++j) z += s_v[j];
}

template <typename T>
__global__ void __launch_bounds__(kSampleThreads, 1) sampling_kernel(SpecSamplingParams p) {
  __shared__ float s_red[kSampleThreads];
  __shared__ int s_hist[256];
  __shared__ int s_bins[kSampleBins];
  __shared__ float s_cv[kSampleCands];
  __shared__ int s_ci[kSampleCands];
  __shared__ float s_mx, s_thr, s_z;
  __shared__ long long s_am;
  __shared__ unsigned s_prefix;
  __shared__ long long s_kk;
  __shared__ int s_b1, s_c, s_cnt;
  const int tid = threadIdx.x;
  const int64_t r = blockIdx.x, req = r / p.per_req, t = r % p.per_req;
  const int64_t V = p.vocab;
  const T* l = static_cast<const T*>(p.logits) + req * p.l_sb + t * p.l_st;
  float* out = p.out + r * V;
  const float temp = p.temperature ? p.temperature[req] : p.temperature_value;
  const int64_t top_k = p.top_k ? p.top_k[req] : p.top_k_value;
  const float top_p = p.top_p ? p.top_p[req] : p.top_p_value;
  const float min_p = p.min_p ? p.min_p[req] : p.min_p_value;

  float mx = 0.f;
  int64_t am = -1;
  for_row<T>(l, V, [&](int64_t i, float v) {
    if (argmax_better(v, i, mx, am)) mx = v, am = i;
  });
  block_reduce_best<true>(mx, am);
  if (tid == 0) s_mx = mx, s_am = am;
  __syncthreads();
  mx = s_mx;
  am = s_am;
  if (!(temp > 0.f)) {
    for (int64_t i = tid; i < V; i += blockDim.x) out[i] = i == am ? 1.f : 0.f;
    return;
  }
  auto expo = [&](float x) { return expf((x - mx) / temp); };
  // Bounded path (top-k set, k <= kSampleCands, finite max): e = expo(x) lies in [0, 1], so
  // float_bits(e) >> 20 < kSampleBins. Pass 2 counts e per bin (top 12 bits), the bin of the
  // k-th largest and the count c of entries at or above it follow; if c fits, pass 3 gathers
  // those entries, the block sorts them and finds every threshold in shared memory, and pass
  // 4 writes the row. Four reads of the logits (three from L2), one write: no re-reads of the
  // output, no bisection. Otherwise (k large, or a bin holding too many ties) the general path
  // below runs.
  if (top_k > 0 && top_k < V && top_k <= kSampleCands && mx - mx == 0.f) {
    for (int j = tid; j < kSampleBins; j += blockDim.x) s_bins[j] = 0;
    __syncthreads();
    for_row<T>(l, V, [&](int64_t, float x) { atomicAdd(&s_bins[float_bits(expo(x)) >> 20], 1); });
    __syncthreads();
    if (tid == 0) {
      int cum = 0, bin = kSampleBins - 1;
      while (cum + s_bins[bin] < top_k) cum += s_bins[bin--];  // top_k < V: stops at a bin >= 0
      s_b1 = bin, s_c = cum + s_bins[bin], s_cnt = 0;
    }
    __syncthreads();
    const int b1 = s_b1, c = s_c;
    if (c <= kSampleCands) {
      for_row<T>(l, V, [&](int64_t i, float x) {
        const float e = expo(x);
        if (static_cast<int>(float_bits(e) >> 20) >= b1) {
          const int slot = atomicAdd(&s_cnt, 1);
          s_cv[slot] = e, s_ci[slot] = static_cast<int>(i);
        }
      });
      int n = 1;
      while (n < c) n <<= 1;
      for (int j = c + tid; j < n; j += blockDim.x) s_cv[j] = -1.f, s_ci[j] = 0x7fffffff;  // sort last
      __syncthreads();
      bitonic_sort(s_cv, s_ci, n);
      if (tid == 0) {
        float thr, z;
        bounded_thresholds(s_cv, c, top_k, top_p, min_p, thr, z);
        s_thr = thr, s_z = z;
      }
      __syncthreads();
      const float thr = s_thr, z = s_z;
      map_row<T>(l, out, V, [&](float x) {
        const float e = expo(x);
        return e >= thr ? e / z : 0.f;
      });
      return;
    }
  }
  // General path: each thread touches the entries tid, tid + T, ... in every pass below: it
  // re-reads only what it wrote itself, so no barrier is needed between the passes over `out`.
  for (int64_t i = tid; i < V; i += blockDim.x) out[i] = expo(to_f<T>(l[i]));
  float thr = 0.f;
  if (top_k > 0 && top_k < V) {
    if (tid == 0) s_prefix = 0u, s_kk = top_k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int j = tid; j < 256; j += blockDim.x) s_hist[j] = 0;
      __syncthreads();
      const uint32_t prefix = s_prefix;
      const uint32_t mask = shift == 24 ? 0u : (0xFFFFFFFFu << (shift + 8));
      for (int64_t i = tid; i < V; i += blockDim.x) {
        const uint32_t bits = float_bits(out[i]);
        if ((bits & mask) == prefix) atomicAdd(&s_hist[(bits >> shift) & 0xFFu], 1);
      }
      __syncthreads();
      if (tid == 0) {
        long long cum = 0, kk = s_kk;
        for (int bin = 255; bin >= 0; --bin) {
          if (cum + s_hist[bin] >= kk) {
            s_kk = kk - cum;
            s_prefix = prefix | (static_cast<uint32_t>(bin) << shift);
            break;
          }
          cum += s_hist[bin];
        }
      }
      __syncthreads();
    }
    thr = bits_float(s_prefix);
  }
  auto mass_above = [&](float th) {
    float part = 0.f;
    for (int64_t i = tid; i < V; i += blockDim.x) part += out[i] >= th ? out[i] : 0.f;
    return block_sum(part, s_red);
  };
  if (top_p < 1.f) {
    const float target = top_p * mass_above(thr);
    uint32_t lo = float_bits(thr), hi = float_bits(1.0f);
    while (lo < hi) {  // uniform: every thread sees the same block sums
      const uint32_t mid = lo + (hi - lo + 1) / 2;
      if (mass_above(bits_float(mid)) >= target) lo = mid;
      else hi = mid - 1;
    }
    thr = bits_float(lo);
  }
  if (min_p > 0.f) thr = fmaxf(thr, min_p);
  const float z = mass_above(thr);
  for (int64_t i = tid; i < V; i += blockDim.x) out[i] = out[i] >= thr ? out[i] / z : 0.f;
}

unsigned warp_blocks(int64_t batch) {
  constexpr int kWarps = kMergeThreads / 32;
  return static_cast<unsigned>((batch + kWarps - 1) / kWarps);
}

}  // namespace

// Chunks per row: at least ceil(vocab / kMaxChunk) (short blocks), and up to
// ceil(vocab / kMinChunk) when the rows alone do not give 4 blocks per SM (batch 1).
int64_t spec_cuda_num_splits(int64_t rows, int64_t vocab) {
  const int64_t target_blocks = 4LL * sm_count();
  int64_t nsplit = (target_blocks + rows - 1) / (rows > 0 ? rows : 1);
  const int64_t max_split = (vocab + kMinChunk - 1) / kMinChunk;
  const int64_t min_split = (vocab + kMaxChunk - 1) / kMaxChunk;
  if (nsplit > max_split) nsplit = max_split;
  if (nsplit < min_split) nsplit = min_split;
  return nsplit < 1 ? 1 : nsplit;
}

void spec_verify_greedy_cuda(const SpecGreedyParams& p, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  launch_argmax_partials(p.am, st);
  greedy_walk_kernel<<<static_cast<unsigned>(p.am.batch), kMergeThreads, 0, st>>>(p);
  NK_CUDA_LAUNCH_CHECK();
}

void spec_verify_tree_greedy_cuda(const SpecTreeGreedyParams& p, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  launch_argmax_partials(p.am, st);
  tree_greedy_walk_kernel<<<static_cast<unsigned>(p.am.batch), kMergeThreads, 0, st>>>(p);
  NK_CUDA_LAUNCH_CHECK();
}

void spec_rejection_sample_cuda(const SpecRejectionParams& p, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(p.batch), static_cast<unsigned>(p.nsplit));
  rejection_partials_kernel<<<grid, kRowThreads, 0, st>>>(p);
  NK_CUDA_LAUNCH_CHECK();
  rejection_finalize_kernel<<<warp_blocks(p.batch), kMergeThreads, 0, st>>>(p);
  NK_CUDA_LAUNCH_CHECK();
}

void spec_verify_tree_rejection_cuda(const SpecTreeRejectionParams& p, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  tree_rejection_kernel<<<static_cast<unsigned>(p.batch), kTreeThreads, 0, st>>>(p);
  NK_CUDA_LAUNCH_CHECK();
}

void spec_sampling_probs_cuda(const SpecSamplingParams& p, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(p.rows);
  switch (p.dtype) {
    case DType::F32: sampling_kernel<float><<<grid, kSampleThreads, 0, st>>>(p); break;
    case DType::F16: sampling_kernel<__half><<<grid, kSampleThreads, 0, st>>>(p); break;
    case DType::BF16: sampling_kernel<__nv_bfloat16><<<grid, kSampleThreads, 0, st>>>(p); break;
  }
  NK_CUDA_LAUNCH_CHECK();
}

}  // namespace nk
