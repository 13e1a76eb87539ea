// CUDA kernels of the fused MoE router (math in router.h).
// Details: docs/moe.md, section `csrc/moe/router_cuda.cu`.
#include <cstdint>

#include "common/cuda_utils.cuh"
#include "moe/numerics.cuh"
#include "moe/router.h"

namespace nk {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFull = 0xffffffffu;
constexpr int kMaxRegSlots = 16;  // experts per lane kept in registers: E <= 512 (Super's E 512)

// The token of this warp (one warp per token, kWarpsPerBlock per block), -1 past the end.
NK_DEVICE int64_t token_of_warp(const RouterParams& p) {
  const int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  return t < p.tokens ? t : -1;
}

// Warp max of a 64-bit key from two 32-bit redux.sync (one instruction each on sm_80+): the
// largest high word, then the largest low word among the lanes holding it. Exact: the
// max of (hi, lo) pairs in lexicographic order is the max of the 64-bit keys.
NK_DEVICE uint64_t warp_max_key(uint64_t v) {
  const unsigned hi = static_cast<unsigned>(v >> 32);
  const unsigned mhi = __reduce_max_sync(kFull, hi);
  const unsigned mlo = __reduce_max_sync(kFull, hi == mhi ? static_cast<unsigned>(v) : 0u);
  return (static_cast<uint64_t>(mhi) << 32) | mlo;
}

// Kept groups of a token as a bit mask (bit g: group g) from the choice scores in `ch`
// (shared memory): lane g < n_group sums its group's best two, the warp keeps the topk_group
// best group keys. n_group == 1 keeps the single group.
NK_DEVICE uint32_t kept_groups(const float* ch, int E, int n_group, int topk_group, int lane) {
  if (n_group <= 1) return 1u;
  const int G = E / n_group;
  uint64_t gk = kTakenKey;
  if (lane < n_group) {
    uint64_t k1 = kTakenKey, k2 = kTakenKey;
    for (int e = lane * G; e < (lane + 1) * G; ++e) {
      const uint64_t k = route_key(ch[e], static_cast<uint32_t>(e));
      if (k > k1) { k2 = k1; k1 = k; } else if (k > k2) { k2 = k; }
    }
    float gs = ch[route_key_index(k1)];
    if (G > 1) gs = gs + ch[route_key_index(k2)];
    gk = route_key(gs, static_cast<uint32_t>(lane));
  }
  bool keep = false;
  for (int r = 0; r < topk_group; ++r) {
    const uint64_t w = warp_max_key(gk);
    if (gk == w && w != kTakenKey) { keep = true; gk = kTakenKey; }
  }
  return __ballot_sync(kFull, keep);
}

// Writes the K chosen ids (lane j holds the j-th) and their weights.
NK_DEVICE void write_choice(const RouterParams& p, int64_t t, const float* l, int32_t my_id, int lane) {
  const int K = p.top_k;
  const float my_p = lane < K ? router_sigmoid(l[my_id]) : 0.f;
  float psum = 0.f;
  for (int j = 0; j < K; ++j) psum += __shfl_sync(kFull, my_p, j);
  if (lane < K) {
    p.ids[t * K + lane] = my_id;
    p.weights[t * K + lane] = route_weight(my_p, psum, p.norm, p.scale);
  }
}

// E <= 32 * kSlots: one warp per token, each lane's choice keys in registers. Expert of slot
// s: 128 * (s / 4) + 4 * lane + s % 4 with float4 loads (E a multiple of 128, aligned row),
// else lane + 32 * s. K rounds of: warp max (two redux), the winning lane drops that key and
// rescans its kSlots registers. Keys are a total order, so the ids and their order are the
// CPU kernel's. Shared memory (the choice scores) only for the group scores (n_group > 1).
template <int kSlots>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) router_reg_kernel(RouterParams p) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = token_of_warp(p);
  if (t < 0) return;  // whole warps leave together
  const float* l = p.logits + t * p.logits_st;
  const int E = p.experts, K = p.top_k;
  const bool vec = E % 128 == 0 && (reinterpret_cast<uintptr_t>(l) & 15) == 0;
  int ex[kSlots];
  float c[kSlots];
#pragma unroll
  for (int s = 0; s < kSlots; ++s) ex[s] = vec ? 128 * (s / 4) + 4 * lane + s % 4 : lane + 32 * s;
  if (vec) {
#pragma unroll
    for (int s = 0; s < kSlots; s += 4) {
      if (ex[s] < E) {
        const float4 v = *reinterpret_cast<const float4*>(l + ex[s]);
        c[s] = v.x, c[s + 1] = v.y, c[s + 2] = v.z, c[s + 3] = v.w;
      }
    }
  } else {
#pragma unroll
    for (int s = 0; s < kSlots; ++s)
      if (ex[s] < E) c[s] = l[ex[s]];
  }
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    if (ex[s] < E) {
      const float sc = router_sigmoid(c[s]);
      c[s] = p.bias != nullptr ? sc + p.bias[ex[s]] : sc;
    }
  }
  uint32_t kept = 1u;
  int G = E;
  if (p.n_group > 1) {
    float* ch = smem + warp * E;
#pragma unroll
    for (int s = 0; s < kSlots; ++s)
      if (ex[s] < E) ch[ex[s]] = c[s];
    __syncwarp();
    kept = kept_groups(ch, E, p.n_group, p.topk_group, lane);
    G = E / p.n_group;
  }
  uint64_t key[kSlots];
  uint64_t best = kTakenKey;
#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    key[s] = ex[s] < E ? route_key((kept >> (ex[s] / G)) & 1u ? c[s] : -INFINITY, static_cast<uint32_t>(ex[s]))
                       : kTakenKey;
    best = key[s] > best ? key[s] : best;
  }
  int32_t my_id = 0;
  for (int j = 0; j < K; ++j) {
    const uint64_t w = warp_max_key(best);
    if (lane == j) my_id = static_cast<int32_t>(route_key_index(w));
    if (best == w) {  // one lane: keys are unique
      best = kTakenKey;
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (key[s] == w) key[s] = kTakenKey;
        best = key[s] > best ? key[s] : best;
      }
    }
  }
  write_choice(p, t, l, my_id, lane);
}

// Best key among this lane's experts that is strictly below `below`; kTakenKey if none.
NK_DEVICE uint64_t lane_best(const float* ch, int E, int G, uint32_t kept, int lane, uint64_t below) {
  uint64_t best = kTakenKey;
  for (int e = lane; e < E; e += 32) {
    const float c = (kept >> (e / G)) & 1u ? ch[e] : -INFINITY;
    const uint64_t k = route_key(c, static_cast<uint32_t>(e));
    if (k < below && k > best) best = k;
  }
  return best;
}

// E > 512: the choice scores in shared memory, each round rescans the lane's experts.
__global__ void __launch_bounds__(kWarpsPerBlock * 32) router_kernel(RouterParams p) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = token_of_warp(p);
  if (t < 0) return;  // whole warps leave together
  const int E = p.experts, K = p.top_k;
  float* ch = smem + warp * E;
  const float* l = p.logits + t * p.logits_st;
  for (int e = lane; e < E; e += 32) {
    const float s = router_sigmoid(l[e]);
    ch[e] = p.bias != nullptr ? s + p.bias[e] : s;
  }
  __syncwarp();
  const uint32_t kept = kept_groups(ch, E, p.n_group, p.topk_group, lane);
  const int G = p.n_group > 1 ? E / p.n_group : E;
  uint64_t best = lane_best(ch, E, G, kept, lane, ~uint64_t(0));
  int32_t my_id = 0;
  for (int j = 0; j < K; ++j) {
    const uint64_t w = warp_max_key(best);
    if (lane == j) my_id = static_cast<int32_t>(route_key_index(w));
    if (best == w) best = lane_best(ch, E, G, kept, lane, w);  // one lane: keys are unique
  }
  write_choice(p, t, l, my_id, lane);
}

__global__ void __launch_bounds__(kWarpsPerBlock * 32) router_bwd_kernel(RouterBwdParams p) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= p.tokens) return;
  const int E = p.experts, K = p.top_k;
  const float* l = p.logits + t * p.logits_st;
  float* dl = p.dlogits + t * E;
  int32_t id = -1;
  float pj = 0.f, g = 0.f;
  if (lane < K) {
    id = p.ids[t * K + lane];
    // An out-of-range id (the host cannot check without a sync) contributes nothing; a repeated
    // id (also a CPU-only check) makes two lanes write one in-range entry: unspecified, memory-safe.
    if (id >= 0 && id < E) pj = router_sigmoid(l[id]);
    g = p.dweights[t * p.dw_st + lane];
  }
  float psum = 0.f, gp = 0.f;
  for (int j = 0; j < K; ++j) {
    const float pi = __shfl_sync(kFull, pj, j), gi = __shfl_sync(kFull, g, j);
    psum += pi;
    gp = fmaf(gi, pi, gp);
  }
  for (int e = lane; e < E; e += 32) dl[e] = 0.f;
  __syncwarp();
  if (lane < K && id >= 0 && id < E) dl[id] = route_logit_grad(g, pj, psum, gp, p.norm, p.scale);
}

}  // namespace

void moe_router_cuda(const RouterParams& p, void* stream) {
  auto st = static_cast<cudaStream_t>(stream);
  const unsigned blocks = static_cast<unsigned>((p.tokens + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const int slots = (p.experts + 31) / 32;
  // Shared memory: the choice scores of each warp, needed by the register path only for groups.
  const size_t smem = slots > kMaxRegSlots || p.n_group > 1 ? size_t(kWarpsPerBlock) * p.experts * sizeof(float)
                                                            : 0;  // <= 32 KB (kRouterMaxExperts)
  if (slots <= 1) router_reg_kernel<1><<<blocks, kWarpsPerBlock * 32, smem, st>>>(p);
  else if (slots <= 2) router_reg_kernel<2><<<blocks, kWarpsPerBlock * 32, smem, st>>>(p);
  else if (slots <= 4) router_reg_kernel<4><<<blocks, kWarpsPerBlock * 32, smem, st>>>(p);
  else if (slots <= 8) router_reg_kernel<8><<<blocks, kWarpsPerBlock * 32, smem, st>>>(p);
  else if (slots <= kMaxRegSlots) router_reg_kernel<kMaxRegSlots><<<blocks, kWarpsPerBlock * 32, smem, st>>>(p);
  else router_kernel<<<blocks, kWarpsPerBlock * 32, smem, st>>>(p);
  NK_CUDA_LAUNCH_CHECK();
}

void moe_router_bwd_cuda(const RouterBwdParams& p, void* stream) {
  const int64_t blocks = (p.tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  router_bwd_kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, static_cast<cudaStream_t>(stream)>>>(p);
  NK_CUDA_LAUNCH_CHECK();
}

}  // namespace nk
