// Fused MoE router of Nemotron-H (transformers' NemotronHTopkRouter) after the logits GEMM:
// parameter structs shared by the op entry (router.cpp), the CPU kernels (router_cpu.cpp)
// and the CUDA kernels (router_cuda.cu). No torch types here.
// Details: docs/moe.md, section `csrc/moe/router.h`.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace nk {

// Bounds of the router kernels: top_k <= 32 (one lane per chosen expert on CUDA), n_group <= 32
// (one lane per group) and E <= 2048 (a block's four warps keep their choice scores in 32 KB of
// shared memory).
constexpr int kRouterMaxTopK = 32;
constexpr int kRouterMaxExperts = 2048;
constexpr int kRouterMaxGroups = 32;

struct RouterParams {
  int64_t tokens;
  int experts, top_k, n_group, topk_group;
  bool norm;
  float scale;
  const float* logits;   // (tokens, experts), row stride logits_st, unit column stride
  int64_t logits_st;
  const float* bias;     // (experts,) contiguous, or null
  int32_t* ids;          // (tokens, top_k) contiguous
  float* weights;        // (tokens, top_k) contiguous
};

struct RouterBwdParams {
  int64_t tokens;
  int experts, top_k;
  bool norm;
  float scale;
  const float* dweights;  // (tokens, top_k), row stride dw_st, unit column stride
  int64_t dw_st;
  const float* logits;    // (tokens, experts), row stride logits_st
  int64_t logits_st;
  const int32_t* ids;     // (tokens, top_k) contiguous
  float* dlogits;         // (tokens, experts) contiguous
};

void moe_router_cpu(const RouterParams& p);
void moe_router_bwd_cpu(const RouterBwdParams& p);

#ifdef NK_WITH_CUDA
void moe_router_cuda(const RouterParams& p, void* stream);
void moe_router_bwd_cuda(const RouterBwdParams& p, void* stream);
#endif

}  // namespace nk
