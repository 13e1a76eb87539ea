// Op entry points of the fused MoE router: argument checks (the one place they live), output
// allocation, dispatch to the CPU or CUDA kernels. Registered in moe_ops.cpp.
#include "moe/router.h"

#include <optional>
#include <tuple>

#include "common/check.h"
#include "common/device.h"
#include "common/tensor_utils.h"

namespace nk {
namespace {

constexpr const char* kRouter = "moe_router";

// (tokens, experts) float32 with unit column stride (a copy when the columns are strided).
Tensor unit_cols(const Tensor& t) {
  return t.size(1) <= 1 || t.stride(1) == 1 ? t : torch::stable::contiguous(t);
}

void check_logits(const char* op, const Tensor& logits) {
  check_dim(op, "logits", logits, 2);
  check_dtype(op, "logits", logits, {ScalarType::Float});
  NK_CHECK(logits.size(1) >= 1 && logits.size(1) <= kRouterMaxExperts, op,
           ": logits.shape[1] (the number of experts) must be in [1, ", kRouterMaxExperts, "], got shape ",
           shape_str(logits));
  if (logits.is_cuda()) {
    check_limit(op, "logits.shape[0] (tokens)", logits.size(0), 4 * kInt32Max,
                "the most the CUDA kernels take (one warp per token, 4 per block: grid dimension x = ceil(T / 4))",
                "route the tokens in several calls");
  }
}

}  // namespace

std::tuple<Tensor, Tensor> moe_router(Tensor logits, std::optional<Tensor> e_score_correction_bias,
                                      int64_t top_k, int64_t n_group, int64_t topk_group,
                                      bool norm_topk_prob, double routed_scaling_factor) {
  const char* op = kRouter;
  check_logits(op, logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  check_in_range(op, "top_k", top_k, 1, kRouterMaxTopK);
  NK_CHECK(top_k <= E, op, ": top_k must be at most the number of experts ", E, ", got ", top_k);
  NK_CHECK(n_group >= 1 && E % n_group == 0, op, ": n_group must be >= 1 and divide the number of experts ", E,
           ", got ", n_group);
  NK_CHECK(n_group <= kRouterMaxGroups, op, ": n_group must be at most ", kRouterMaxGroups, ", got ", n_group);
  check_in_range(op, "topk_group", topk_group, 1, n_group, "n_group");
  NK_CHECK(top_k <= topk_group * (E / n_group), op, ": top_k = ", top_k, " exceeds the ", topk_group * (E / n_group),
           " experts of the topk_group = ", topk_group, " kept groups (", E / n_group, " experts each)");
  if (e_score_correction_bias) {
    check_tensor(op, "e_score_correction_bias", *e_score_correction_bias, {E}, {ScalarType::Float}, logits,
                 "logits");
  }
  OptionalDeviceGuard guard(logits);
  Tensor ids = new_empty(logits, {T, top_k}, ScalarType::Int);
  Tensor weights = new_empty(logits, {T, top_k}, ScalarType::Float);
  if (T == 0) return {ids, weights};
  Tensor l = unit_cols(logits);
  std::optional<Tensor> bias;
  if (e_score_correction_bias) bias = torch::stable::contiguous(*e_score_correction_bias);
  RouterParams p{};
  p.tokens = T;
  p.experts = static_cast<int>(E);
  p.top_k = static_cast<int>(top_k);
  p.n_group = static_cast<int>(n_group);
  p.topk_group = static_cast<int>(topk_group);
  p.norm = norm_topk_prob;
  p.scale = static_cast<float>(routed_scaling_factor);
  p.logits = static_cast<const float*>(l.data_ptr());
  p.logits_st = l.stride(0);
  p.bias = bias ? static_cast<const float*>(bias->data_ptr()) : nullptr;
  p.ids = static_cast<int32_t*>(ids.data_ptr());
  p.weights = static_cast<float*>(weights.data_ptr());
  NK_ROUTE_BY_DEVICE(logits, op, moe_router_cpu(p), moe_router_cuda(p, stream));
  return {ids, weights};
}

Tensor moe_router_bwd(Tensor dweights, Tensor logits, Tensor topk_ids, bool norm_topk_prob,
                      double routed_scaling_factor) {
  const char* op = "moe_router (backward)";
  check_logits(op, logits);
  const int64_t T = logits.size(0), E = logits.size(1);
  check_tensor(op, "topk_ids", topk_ids, {T, -1}, {ScalarType::Int}, logits, "logits");
  const int64_t K = topk_ids.size(1);
  NK_CHECK(K >= 1 && K <= kRouterMaxTopK && K <= E, op, ": topk_ids.shape[1] must be in [1, min(", kRouterMaxTopK,
           ", experts)], got shape ", shape_str(topk_ids));
  check_tensor(op, "dweights", dweights, {-1, -1}, {ScalarType::Float}, logits, "logits");
  check_same_shape(op, "dweights", dweights, topk_ids, "topk_ids");
  OptionalDeviceGuard guard(logits);
  Tensor dlogits = new_empty(logits, {T, E}, ScalarType::Float);
  if (T == 0) return dlogits;
  Tensor l = unit_cols(logits), g = unit_cols(dweights), ids = torch::stable::contiguous(topk_ids);
  RouterBwdParams p{};
  p.tokens = T;
  p.experts = static_cast<int>(E);
  p.top_k = static_cast<int>(K);
  p.norm = norm_topk_prob;
  p.scale = static_cast<float>(routed_scaling_factor);
  p.dweights = static_cast<const float*>(g.data_ptr());
  p.dw_st = g.stride(0);
  p.logits = static_cast<const float*>(l.data_ptr());
  p.logits_st = l.stride(0);
  p.ids = static_cast<const int32_t*>(ids.data_ptr());
  p.dlogits = static_cast<float*>(dlogits.data_ptr());
  NK_ROUTE_BY_DEVICE(logits, op, moe_router_bwd_cpu(p), moe_router_bwd_cuda(p, stream));
  return dlogits;
}

}  // namespace nk
