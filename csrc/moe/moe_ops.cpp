// The moe family's ops: the LatentMoE router, the permutation plan, gather, combine and the
// grouped GEMM over experts. Schemas and kernel registration; the entries (in this folder)
// check inputs and route by device. Fakes and autograd: nemokernels/moe/.
#include <optional>
#include <string>
#include <tuple>

#include "common/family_ops.h"

namespace nk {
// Entries, defined in this folder.
std::tuple<Tensor, Tensor> grouped_gemm_fwd(Tensor a, Tensor w, Tensor expert_offsets, const std::string& activation,
                                             bool save_preact);
Tensor grouped_gemm_dgrad(Tensor dout, Tensor w, Tensor expert_offsets, std::optional<Tensor> preact);
Tensor grouped_gemm_wgrad(Tensor dout, Tensor a, Tensor expert_offsets, std::optional<Tensor> preact);
std::tuple<Tensor, Tensor> grouped_gemm_bwd(Tensor dout, Tensor a, Tensor w, Tensor expert_offsets,
                                            std::optional<Tensor> preact);
Tensor grouped_gemm_nvfp4w(Tensor a, Tensor w_data, Tensor w_scales, Tensor w_global, Tensor expert_offsets,
                           const std::string& activation);
std::tuple<Tensor, Tensor> grouped_gemm_fp8(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor expert_offsets,
                                            const std::string& activation, ScalarType out_dtype, bool save_preact,
                                            std::optional<Tensor> out_scale);
std::tuple<Tensor, Tensor> moe_quantize_fp8(Tensor x, Tensor slot_of_row, int64_t top_k, Tensor static_scale,
                                            int64_t block);
std::tuple<Tensor, Tensor> moe_quantize_fp8_t(Tensor x, Tensor expert_offsets);
Tensor grouped_gemm_fp8_wgrad(Tensor gT, Tensor g_scale, Tensor aT, Tensor a_scale, Tensor expert_offsets,
                              ScalarType out_dtype);
std::tuple<Tensor, Tensor> moe_router(Tensor logits, std::optional<Tensor> e_score_correction_bias,
                                      int64_t top_k, int64_t n_group, int64_t topk_group,
                                      bool norm_topk_prob, double routed_scaling_factor);
Tensor moe_router_bwd(Tensor dweights, Tensor logits, Tensor topk_ids, bool norm_topk_prob,
                      double routed_scaling_factor);
std::tuple<Tensor, Tensor, Tensor, Tensor> moe_permute_plan(Tensor topk_ids, int64_t num_experts, int64_t pad_to);
Tensor moe_gather(Tensor x, Tensor slot_of_row, Tensor row_of_slot, int64_t top_k);
Tensor moe_gather_bwd(Tensor dxs, Tensor row_of_slot, int64_t top_k);
Tensor moe_combine(Tensor y, Tensor row_of_slot, Tensor slot_of_row, std::optional<Tensor> topk_weights,
                   int64_t top_k);
std::tuple<Tensor, Tensor> moe_combine_bwd(Tensor dout, Tensor y, Tensor row_of_slot, Tensor slot_of_row,
                                           std::optional<Tensor> topk_weights, int64_t top_k,
                                           bool return_dweights);

// Schemas (with what the shapes and dtypes mean) and the kernel of each.
const OpDef kOps[] = {
  // ---- moe: grouped GEMM over experts ---------------------------------------------------
  // a (R, K), w (E, N, K), expert_offsets (E + 1,) int32 (rows [off[e], off[e+1]) use w[e]);
  // activation "none" or "relu2". out (R, N) = act(a @ w[e]^T); preact (R, N) is the
  // pre-activation when activation is relu2 and save_preact, else (0, N).
  {"grouped_gemm_fwd(Tensor a, Tensor w, Tensor expert_offsets, str activation, bool save_preact) "
   "-> (Tensor out, Tensor preact)",
   TORCH_BOX(&grouped_gemm_fwd)},
  // da (R, K) = g @ w[e]; g = dout, or dout * 2 * relu(preact) (the relu2 backward) when given.
  {"grouped_gemm_dgrad(Tensor dout, Tensor w, Tensor expert_offsets, Tensor? preact) -> Tensor",
   TORCH_BOX(&grouped_gemm_dgrad)},
  // dw (E, N, K): dw[e] = g[seg_e]^T a[seg_e], zero for empty experts; E = len(offsets) - 1.
  {"grouped_gemm_wgrad(Tensor dout, Tensor a, Tensor expert_offsets, Tensor? preact) -> Tensor",
   TORCH_BOX(&grouped_gemm_wgrad)},
  // (da, dw) = (grouped_gemm_dgrad(...), grouped_gemm_wgrad(...)) with the same g, made once
  // where the kernels would each make it (the CUTLASS path).
  {"grouped_gemm_bwd(Tensor dout, Tensor a, Tensor w, Tensor expert_offsets, Tensor? preact) "
   "-> (Tensor da, Tensor dw)",
   TORCH_BOX(&grouped_gemm_bwd)},
  // NVFP4 expert weights (forward only): w_data (E, N, K/2) uint8, w_scales (E, N, K/16)
  // float8_e4m3fn, w_global (E,) or one float32. out (R, N) in a's dtype = act(g[e] a @ What[e]^T).
  {"grouped_gemm_nvfp4w(Tensor a, Tensor w_data, Tensor w_scales, Tensor w_global, Tensor expert_offsets, "
   "str activation) -> Tensor",
   TORCH_BOX(&grouped_gemm_nvfp4w)},
  // FP8 rows and expert weights (forward only): a (R, K) float8_e4m3fn with a_scale (R,) float32,
  // w (E, N, K) float8_e4m3fn with w_scale (E,) or one float32 (or per-block scales: a_scale
  // (R, K / 128), w_scale (E, ceil(N / 128), K / 128)). out (R, N) in out_dtype =
  // act((a @ w[e]^T) * a_scale[r] * w_scale[e]), float32 sums; preact (R, N) the value before
  // relu^2 when activation is relu2 and save_preact (training), else (0, N). out_dtype
  // float8_e4m3fn with out_scale (one float32): out = e4m3(act(...) / out_scale), the next
  // FP8 GEMM's rows at a static scale, written by this epilogue (no quantize pass).
  {"grouped_gemm_fp8(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor expert_offsets, str activation, "
   "ScalarType out_dtype, bool save_preact, Tensor? out_scale=None) -> (Tensor out, Tensor preact)",
   TORCH_BOX(&grouped_gemm_fp8)},
  // Rows of x (T, K) to e4m3 (R, K) with one float32 scale each (amax / 448, or static_scale:
  // one value, or S values for blocks of R / S rows), gathered as moe_gather when slot_of_row is
  // not empty (else R = T). block 128: a dynamic scale per row and 128-column block, scale (R, K / 128).
  {"moe_quantize_fp8(Tensor x, Tensor slot_of_row, int top_k, Tensor static_scale, int block=0) "
   "-> (Tensor q, Tensor scale)",
   TORCH_BOX(&moe_quantize_fp8)},
  // The FP8 wgrad's operands: x (R, C) -> qT (C, W) e4m3 (W = 16 ceil(R / 16) + 16 E, expert e's
  // rows from column 16 ceil(offsets[e] / 16) + 16 e, the rest zero), scale (C,) per column.
  {"moe_quantize_fp8_t(Tensor x, Tensor expert_offsets) -> (Tensor qT, Tensor scale)",
   TORCH_BOX(&moe_quantize_fp8_t)},
  // dw (E, N, K) = g_scale[n] a_scale[k] (gT @ aT^T over expert e's columns), out_dtype bf16 or float32.
  {"grouped_gemm_fp8_wgrad(Tensor gT, Tensor g_scale, Tensor aT, Tensor a_scale, Tensor expert_offsets, "
   "ScalarType out_dtype) -> Tensor",
   TORCH_BOX(&grouped_gemm_fp8_wgrad)},
  // ---- moe: LatentMoE dispatch (router, permutation plan, gather, combine) ---------------
  // logits (T, E) float32 -> topk_ids (T, k) int32, topk_weights (T, k) float32 (descending
  // choice score, ties to the lower index), in the order nemokernels.moe.moe_router returns
  // them. dlogits is (T, E) float32.
  {"moe_router(Tensor logits, Tensor? e_score_correction_bias, int top_k, int n_group, int topk_group, "
   "bool norm_topk_prob, float routed_scaling_factor) -> (Tensor topk_ids, Tensor topk_weights)",
   TORCH_BOX(&moe_router)},
  {"moe_router_bwd(Tensor dweights, Tensor logits, Tensor topk_ids, bool norm_topk_prob, "
   "float routed_scaling_factor) -> Tensor",
   TORCH_BOX(&moe_router_bwd)},
  // Plan of topk_ids (T, k) int32: expert_counts (E,), expert_offsets (E+1,), row_of_slot (T*k,),
  // slot_of_row (R,) with the static R = T*k + E*(pad_to-1), all int32.
  {"moe_permute_plan(Tensor topk_ids, int num_experts, int pad_to) "
   "-> (Tensor expert_counts, Tensor expert_offsets, Tensor row_of_slot, Tensor slot_of_row)",
   TORCH_BOX(&moe_permute_plan)},
  // Both maps go in: gather reads slot_of_row, its backward row_of_slot (and the combine the
  // other way round), so each op's autograd has what its backward op needs.
  {"moe_gather(Tensor x, Tensor slot_of_row, Tensor row_of_slot, int top_k) -> Tensor",
   TORCH_BOX(&moe_gather)},
  {"moe_gather_bwd(Tensor dxs, Tensor row_of_slot, int top_k) -> Tensor",
   TORCH_BOX(&moe_gather_bwd)},
  {"moe_combine(Tensor y, Tensor row_of_slot, Tensor slot_of_row, Tensor? topk_weights, int top_k) -> Tensor",
   TORCH_BOX(&moe_combine)},
  // dweights is (0, k) unless return_dweights.
  {"moe_combine_bwd(Tensor dout, Tensor y, Tensor row_of_slot, Tensor slot_of_row, Tensor? topk_weights, "
   "int top_k, bool return_dweights) -> (Tensor dy, Tensor dweights)",
   TORCH_BOX(&moe_combine_bwd)},
};

}  // namespace nk

NK_REGISTER_FAMILY("moe", nk::kOps)
