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

NK_DEVICE uint64_t warp_max_u64(uint64_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint64_t w = __shfl_xor_sync(kFull, v, o);
    v = w > v ? w : v;
  }
  return v;
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

__global__ void __launch_bounds__(kWarpsPerBlock * 32) router_kernel(RouterParams p) {
  extern __shared__ float smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t t = int64_t(blockIdx.x) * kWarpsPerBlock + warp;
  if (t >= p.tokens) return;  // whole warps leave together
  const int E = p.experts, K = p.top_k;
  float* ch = smem + warp * E;
  const float* l = p.logits + t * p.logits_st;
  for (int e = lane; e < E; e += 32) {
    const float s = router_sigmoid(l[e]);
    ch[e] = p.bias != nullptr ? s + p.bias[e] : s;
  }
  __syncwarp();
  // Kept groups as a bit mask (bit g: group g); n_group == 1 keeps the single group.
  int G = E;
  uint32_t kept = 1u;
  if (p.n_group > 1) {
    G = E / p.n_group;
    uint64_t gk = kTakenKey;
    if (lane < p.n_group) {
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
    for (int r = 0; r < p.topk_group; ++r) {
      const uint64_t w = warp_max_u64(gk);
      if (gk == w && w != kTakenKey) { keep = true; gk = kTakenKey; }
    }
    kept = __ballot_sync(kFull, keep);
  }
  uint64_t best = lane_best(ch, E, G, kept, lane, ~uint64_t(0));
  int32_t my_id = 0;
  for (int j = 0; j < K; ++j) {
    const uint64_t w = warp_max_u64(best);
    if (lane == j) my_id = static_cast<int32_t>(route_key_index(w));
    if (best == w) best = lane_best(ch, E, G, kept, lane, w);  // one lane: keys are unique
  }
  const float my_p = lane < K ? router_sigmoid(l[my_id]) : 0.f;
  float psum = 0.f;
  for (int j = 0; j < K; ++j) psum += __shfl_sync(kFull, my_p, j);
  if (lane < K) {
    p.ids[t * K + lane] = my_id;
    p.weights[t * K + lane] = route_weight(my_p, psum, p.norm, p.scale);
  }
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
  const size_t smem = size_t(kWarpsPerBlock) * p.experts * sizeof(float);  // <= 32 KB (kRouterMaxExperts)
  const int64_t blocks = (p.tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  router_kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, smem, static_cast<cudaStream_t>(stream)>>>(p);
  NK_CUDA_LAUNCH_CHECK();
}

void moe_router_bwd_cuda(const RouterBwdParams& p, void* stream) {
  const int64_t blocks = (p.tokens + kWarpsPerBlock - 1) / kWarpsPerBlock;
  router_bwd_kernel<<<static_cast<unsigned>(blocks), kWarpsPerBlock * 32, 0, static_cast<cudaStream_t>(stream)>>>(p);
  NK_CUDA_LAUNCH_CHECK();
}

}  // namespace nk
