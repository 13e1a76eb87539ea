// CPU kernels of the fused MoE router (math in router.h). One task per token block; per token
// the same steps as the CUDA warp: sigmoid scores, choice keys, group scores and the group
// mask, then the top_k keys in descending order. Keys are a total order (numerics.cuh), so the
// chosen ids and their order are exactly the CUDA kernel's.
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "common/check.h"
#include "moe/numerics.cuh"
#include "moe/router.h"

namespace nk {

void moe_router_cpu(const RouterParams& p) {
  const int E = p.experts, K = p.top_k, G = E / p.n_group;
  torch::stable::parallel_for(0, p.tokens, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> score(E), choice(E);
    std::vector<uint64_t> keys(E), gkeys(p.n_group);
    for (int64_t t = begin; t < end; ++t) {
      const float* l = p.logits + t * p.logits_st;
      for (int e = 0; e < E; ++e) {
        score[e] = router_sigmoid(l[e]);
        choice[e] = p.bias ? score[e] + p.bias[e] : score[e];
      }
      if (p.n_group > 1) {
        for (int g = 0; g < p.n_group; ++g) {
          uint64_t k1 = kTakenKey, k2 = kTakenKey;  // best two keys of the group
          for (int e = g * G; e < (g + 1) * G; ++e) {
            const uint64_t k = route_key(choice[e], e);
            if (k > k1) { k2 = k1; k1 = k; } else if (k > k2) { k2 = k; }
          }
          float gs = choice[route_key_index(k1)];
          if (G > 1) gs = gs + choice[route_key_index(k2)];
          gkeys[g] = route_key(gs, g);
        }
        std::vector<uint64_t> sorted(gkeys);
        std::nth_element(sorted.begin(), sorted.begin() + (p.topk_group - 1), sorted.end(), std::greater<>());
        const uint64_t cut = sorted[p.topk_group - 1];  // the worst kept group's key
        for (int g = 0; g < p.n_group; ++g)
          if (gkeys[g] < cut)
            for (int e = g * G; e < (g + 1) * G; ++e) choice[e] = -INFINITY;
      }
      for (int e = 0; e < E; ++e) keys[e] = route_key(choice[e], e);
      std::partial_sort(keys.begin(), keys.begin() + K, keys.end(), std::greater<>());
      int32_t* ids = p.ids + t * K;
      float* w = p.weights + t * K;
      float psum = 0.f;
      for (int j = 0; j < K; ++j) {
        ids[j] = static_cast<int32_t>(route_key_index(keys[j]));
        psum += score[ids[j]];
      }
      for (int j = 0; j < K; ++j) w[j] = route_weight(score[ids[j]], psum, p.norm, p.scale);
    }
  });
}

void moe_router_bwd_cpu(const RouterBwdParams& p) {
  const int E = p.experts, K = p.top_k;
  torch::stable::parallel_for(0, p.tokens, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> ps(K);
    for (int64_t t = begin; t < end; ++t) {
      const float* l = p.logits + t * p.logits_st;
      const float* g = p.dweights + t * p.dw_st;
      const int32_t* ids = p.ids + t * K;
      float* dl = p.dlogits + t * E;
      float psum = 0.f, gp = 0.f;
      for (int j = 0; j < K; ++j) {
        NK_CHECK(ids[j] >= 0 && ids[j] < E, "moe_router (backward): topk_ids[", t, ", ", j, "] = ", ids[j],
                 " is out of range for ", E, " experts");
        // A repeated expert would get two gradients written to one dlogits entry (the last wins).
        for (int i = 0; i < j; ++i)
          NK_CHECK(ids[i] != ids[j], "moe_router (backward): topk_ids[", t, ", ", j, "] = ", ids[j],
                   " repeats topk_ids[", t, ", ", i, "]; each token's chosen experts must be distinct "
                   "(as moe_router returns them)");
        ps[j] = router_sigmoid(l[ids[j]]);
        psum += ps[j];
        gp = fmaf(g[j], ps[j], gp);
      }
      std::fill(dl, dl + E, 0.f);
      for (int j = 0; j < K; ++j) dl[ids[j]] = route_logit_grad(g[j], ps[j], psum, gp, p.norm, p.scale);
    }
  });
}

}  // namespace nk
