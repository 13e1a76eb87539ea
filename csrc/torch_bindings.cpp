// The one list of nemokernels op schemas (namespace `nemokernels`) and their CPU/CUDA
// kernels. Every op's entry function checks its inputs and picks the CPU or CUDA path by the
// inputs' device, so the same function is registered for both dispatch keys. Fake (meta)
// kernels and autograd formulas live on the Python side (nemokernels/ssd/).
#include <torch/csrc/stable/library.h>

#include <optional>
#include <tuple>

#include "common/check.h"

namespace nk {
// ssd/causal_conv1d.cpp
std::tuple<Tensor, Tensor> causal_conv1d_fwd(Tensor x, Tensor weight, std::optional<Tensor> bias,
                                             std::optional<Tensor> seq_idx,
                                             std::optional<Tensor> initial_states,
                                             bool return_final_states, bool silu);
std::tuple<Tensor, Tensor, Tensor, Tensor> causal_conv1d_bwd(
    Tensor x, Tensor weight, std::optional<Tensor> bias, Tensor dout,
    std::optional<Tensor> seq_idx, std::optional<Tensor> initial_states,
    std::optional<Tensor> dfinal_states, bool return_dinitial_states, bool silu);
Tensor causal_conv1d_update(Tensor x, Tensor conv_state, Tensor weight, std::optional<Tensor> bias,
                            bool silu, std::optional<Tensor> conv_state_indices);
// ssd/ssd_chunk_scan.cpp
std::tuple<Tensor, Tensor, Tensor, Tensor> ssd_chunk_scan_fwd(
    Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int64_t chunk_size, std::optional<Tensor> D,
    std::optional<Tensor> z, std::optional<Tensor> dt_bias, std::optional<Tensor> initial_states,
    std::optional<Tensor> seq_idx, std::optional<Tensor> cu_seqlens, bool dt_softplus, double dt_min,
    double dt_max, bool return_final_states, bool return_varlen_states, bool save_y_pre);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ssd_chunk_scan_bwd(
    Tensor dout, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int64_t chunk_size,
    std::optional<Tensor> D, std::optional<Tensor> z, std::optional<Tensor> y_pre,
    std::optional<Tensor> dt_bias, std::optional<Tensor> initial_states, std::optional<Tensor> seq_idx,
    std::optional<Tensor> dfinal_states, bool dt_softplus, double dt_min, double dt_max,
    bool return_dinitial_states);

// ssd/state_update.cpp
Tensor selective_state_update(Tensor state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C,
                              std::optional<Tensor> D, std::optional<Tensor> z, std::optional<Tensor> dt_bias,
                              bool dt_softplus, std::optional<Tensor> state_batch_indices);
Tensor selective_state_update_multi(Tensor state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C,
                                    std::optional<Tensor> D, std::optional<Tensor> z,
                                    std::optional<Tensor> dt_bias, bool dt_softplus,
                                    std::optional<Tensor> state_batch_indices,
                                    std::optional<Tensor> intermediate_states);

// ssd/rmsnorm_gated.cpp
std::tuple<Tensor, Tensor> rmsnorm_gated_fwd(Tensor x, Tensor weight, std::optional<Tensor> bias,
                                             std::optional<Tensor> z, double eps, int64_t group_size,
                                             bool norm_before_gate);
std::tuple<Tensor, Tensor, Tensor, Tensor> rmsnorm_gated_bwd(
    Tensor dout, Tensor x, Tensor weight, std::optional<Tensor> bias, std::optional<Tensor> z,
    Tensor rstd, int64_t group_size, bool norm_before_gate);

// spec/verify.cpp
std::tuple<Tensor, Tensor> spec_verify_greedy(Tensor draft_token_ids, Tensor target_logits,
                                              std::optional<Tensor> num_draft_tokens);
std::tuple<Tensor, Tensor> spec_rejection_sample(Tensor draft_token_ids, std::optional<Tensor> draft_probs,
                                                 Tensor target_probs, std::optional<Tensor> num_draft_tokens,
                                                 std::optional<Tensor> seed_tensor, int64_t seed);
std::tuple<Tensor, Tensor, Tensor> spec_verify_tree_greedy(Tensor candidate_ids, Tensor parents,
                                                           Tensor target_logits, int64_t max_depth);
std::tuple<Tensor, Tensor, Tensor> spec_verify_tree_rejection(Tensor candidate_ids, Tensor parents,
                                                              Tensor draft_probs, Tensor target_probs,
                                                              int64_t max_depth, std::optional<Tensor> seed_tensor,
                                                              int64_t seed);
Tensor spec_sampling_probs(Tensor logits, std::optional<Tensor> temperature, double temperature_value,
                           std::optional<Tensor> top_k, int64_t top_k_value, std::optional<Tensor> top_p,
                           double top_p_value, std::optional<Tensor> min_p, double min_p_value);

// moe/grouped_gemm.cpp
std::tuple<Tensor, Tensor> grouped_gemm_fwd(Tensor a, Tensor w, Tensor expert_offsets, int64_t activation,
                                             bool save_preact);
Tensor grouped_gemm_dgrad(Tensor dout, Tensor w, Tensor expert_offsets, std::optional<Tensor> preact);
Tensor grouped_gemm_wgrad(Tensor dout, Tensor a, Tensor expert_offsets, std::optional<Tensor> preact);
// moe/router.cpp
std::tuple<Tensor, Tensor> moe_router(Tensor logits, std::optional<Tensor> e_score_correction_bias,
                                      int64_t top_k, int64_t n_group, int64_t topk_group,
                                      bool norm_topk_prob, double routed_scaling_factor);
Tensor moe_router_bwd(Tensor dweights, Tensor logits, Tensor topk_ids, bool norm_topk_prob,
                      double routed_scaling_factor);
// moe/permute.cpp
std::tuple<Tensor, Tensor, Tensor, Tensor> moe_permute_plan(Tensor topk_ids, int64_t num_experts, int64_t pad_to);
Tensor moe_gather(Tensor x, Tensor slot_of_row, Tensor row_of_slot, int64_t top_k);
Tensor moe_gather_bwd(Tensor dxs, Tensor row_of_slot, int64_t top_k);
Tensor moe_combine(Tensor y, Tensor row_of_slot, Tensor slot_of_row, std::optional<Tensor> topk_weights,
                   int64_t top_k);
std::tuple<Tensor, Tensor> moe_combine_bwd(Tensor dout, Tensor y, Tensor row_of_slot, Tensor slot_of_row,
                                           std::optional<Tensor> topk_weights, int64_t top_k,
                                           bool return_dweights);
// nvfp4/gemm.cpp
Tensor nvfp4_gemm(Tensor a_data, Tensor a_scales, Tensor a_global, Tensor b_data, Tensor b_scales,
                  Tensor b_global, ScalarType out_dtype, std::optional<Tensor> bias);
Tensor nvfp4_swizzle_scales(Tensor scales);
// nvfp4/quantize.cpp
std::tuple<Tensor, Tensor, Tensor> nvfp4_quantize(Tensor x, bool block_2d, bool hadamard,
                                                  bool stochastic_rounding, int64_t seed,
                                                  std::optional<Tensor> global_amax,
                                                  std::optional<Tensor> seed_tensor);
Tensor nvfp4_dequantize(Tensor data, Tensor scales, Tensor global_scale, int64_t out_dtype);
}  // namespace nk

STABLE_TORCH_LIBRARY(nemokernels, m) {
  // ---- ssd: causal conv1d --------------------------------------------------------------
  // final_states is (0, dim, width-1) unless return_final_states.
  m.def("causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? seq_idx, "
        "Tensor? initial_states, bool return_final_states, bool silu) -> (Tensor out, Tensor final_states)");
  // dbias is (0,) without bias; dinitial_states is (0, dim, width-1) unless asked for.
  m.def("causal_conv1d_bwd(Tensor x, Tensor weight, Tensor? bias, Tensor dout, Tensor? seq_idx, "
        "Tensor? initial_states, Tensor? dfinal_states, bool return_dinitial_states, bool silu) "
        "-> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dinitial_states)");
  m.def("causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, "
        "bool silu, Tensor? conv_state_indices) -> Tensor");

  // ---- ssd: chunked selective scan (mamba_chunk_scan_combined) ----------------------------
  // y_pre (the output before the z gate, kept for the backward) is (0, L, H, P) unless z is
  // given and save_y_pre; final_states (b, H, P, N) / varlen_states (nseq, H, P, N) are
  // float32 and have a zero leading dim unless asked for.
  m.def("ssd_chunk_scan_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int chunk_size, "
        "Tensor? D, Tensor? z, Tensor? dt_bias, Tensor? initial_states, Tensor? seq_idx, "
        "Tensor? cu_seqlens, bool dt_softplus, float dt_min, float dt_max, bool return_final_states, "
        "bool return_varlen_states, bool save_y_pre) "
        "-> (Tensor y, Tensor y_pre, Tensor final_states, Tensor varlen_states)");
  // Gradients in the dtypes of their inputs; dD/dz/ddt_bias/dinitial_states are empty when
  // the input is absent (or not asked for).
  m.def("ssd_chunk_scan_bwd(Tensor dout, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
        "int chunk_size, Tensor? D, Tensor? z, Tensor? y_pre, Tensor? dt_bias, Tensor? initial_states, "
        "Tensor? seq_idx, Tensor? dfinal_states, bool dt_softplus, float dt_min, float dt_max, "
        "bool return_dinitial_states) -> (Tensor dx, Tensor ddt, Tensor dA, Tensor dB, Tensor dC, "
        "Tensor dD, Tensor dz, Tensor ddt_bias, Tensor dinitial_states)");

  // ---- ssd: decode state updates ---------------------------------------------------------
  // One token, state updated in place; returns out shaped like x.
  m.def("selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
        "Tensor? D, Tensor? z, Tensor? dt_bias, bool dt_softplus, Tensor? state_batch_indices) -> Tensor");
  // T tokens from state (not modified); the state after every token goes to
  // intermediate_states (b, T, ...) when given. Returns out (b, T, ...).
  m.def("selective_state_update_multi(Tensor state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
        "Tensor? D, Tensor? z, Tensor? dt_bias, bool dt_softplus, Tensor? state_batch_indices, "
        "Tensor(a!)? intermediate_states) -> Tensor");

  // ---- ssd: gated RMSNorm -----------------------------------------------------------------
  // x (..., D); group_size divides D; rstd (x.shape[:-1] + (D / group_size,)) float32 is saved
  // for the backward.
  m.def("rmsnorm_gated_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? z, float eps, "
        "int group_size, bool norm_before_gate) -> (Tensor out, Tensor rstd)");
  // dbias is (0,) float32 without bias; dz is (0,) without z.
  m.def("rmsnorm_gated_bwd(Tensor dout, Tensor x, Tensor weight, Tensor? bias, Tensor? z, "
        "Tensor rstd, int group_size, bool norm_before_gate) "
        "-> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dz)");

  // ---- spec: MTP verification and the fused sampling transform ---------------------------
  // Outputs: output_token_ids (B, k+1) int64 padded with -1, num_accepted (B,) int64 (accepted
  // drafts; num_accepted + 1 tokens are emitted). Random numbers: Philox keyed by the int64 in
  // seed_tensor (read on the device, no host sync) or by `seed` when seed_tensor is None.
  m.def("verify_greedy(Tensor draft_token_ids, Tensor target_logits, Tensor? num_draft_tokens) "
        "-> (Tensor output_token_ids, Tensor num_accepted)");
  m.def("rejection_sample(Tensor draft_token_ids, Tensor? draft_probs, Tensor target_probs, "
        "Tensor? num_draft_tokens, Tensor? seed_tensor, int seed) "
        "-> (Tensor output_token_ids, Tensor num_accepted)");
  // Trees: node 0 is the root; outputs (B, max_depth+1) padded with -1.
  m.def("verify_tree_greedy(Tensor candidate_ids, Tensor parents, Tensor target_logits, int max_depth) "
        "-> (Tensor output_token_ids, Tensor accepted_node_indices, Tensor num_accepted)");
  m.def("verify_tree_rejection(Tensor candidate_ids, Tensor parents, Tensor draft_probs, Tensor target_probs, "
        "int max_depth, Tensor? seed_tensor, int seed) "
        "-> (Tensor output_token_ids, Tensor accepted_node_indices, Tensor num_accepted)");
  // Per-request tensors (B,) override the scalar values; probs float32 shaped like logits.
  m.def("sampling_probs(Tensor logits, Tensor? temperature, float temperature_value, Tensor? top_k, "
        "int top_k_value, Tensor? top_p, float top_p_value, Tensor? min_p, float min_p_value) -> Tensor");

  // ---- moe: grouped GEMM over experts ---------------------------------------------------
  // a (R, K), w (E, N, K), expert_offsets (E + 1,) int32 (rows [off[e], off[e+1]) use w[e]);
  // activation 0 = none, 1 = relu2. out (R, N) = act(a @ w[e]^T); preact (R, N) is the
  // pre-activation when activation is relu2 and save_preact, else (0, N).
  m.def("grouped_gemm_fwd(Tensor a, Tensor w, Tensor expert_offsets, int activation, bool save_preact) "
        "-> (Tensor out, Tensor preact)");
  // da (R, K) = g @ w[e]; g = dout, or dout * 2 * relu(preact) (the relu2 backward) when given.
  m.def("grouped_gemm_dgrad(Tensor dout, Tensor w, Tensor expert_offsets, Tensor? preact) -> Tensor");
  // dw (E, N, K): dw[e] = g[seg_e]^T a[seg_e], zero for empty experts; E = len(offsets) - 1.
  m.def("grouped_gemm_wgrad(Tensor dout, Tensor a, Tensor expert_offsets, Tensor? preact) -> Tensor");
  // ---- moe: LatentMoE dispatch (router, permutation plan, gather, combine) ---------------
  // logits (T, E) float32 -> topk_weights (T, k) float32, topk_ids (T, k) int32 (descending
  // choice score, ties to the lower index); weights first, as transformers' router returns them
  // (and opcheck's gradient check sums the outputs in order). dlogits is (T, E) float32.
  m.def("moe_router(Tensor logits, Tensor? e_score_correction_bias, int top_k, int n_group, int topk_group, "
        "bool norm_topk_prob, float routed_scaling_factor) -> (Tensor topk_weights, Tensor topk_ids)");
  m.def("moe_router_bwd(Tensor dweights, Tensor logits, Tensor topk_ids, bool norm_topk_prob, "
        "float routed_scaling_factor) -> Tensor");
  // Plan of topk_ids (T, k) int32: expert_counts (E,), expert_offsets (E+1,), row_of_slot (T*k,),
  // slot_of_row (R,) with the static R = T*k + E*(pad_to-1), all int32.
  m.def("moe_permute_plan(Tensor topk_ids, int num_experts, int pad_to) "
        "-> (Tensor expert_counts, Tensor expert_offsets, Tensor row_of_slot, Tensor slot_of_row)");
  // Both maps go in: gather reads slot_of_row, its backward row_of_slot (and the combine the
  // other way round), so each op's autograd has what its backward op needs.
  m.def("moe_gather(Tensor x, Tensor slot_of_row, Tensor row_of_slot, int top_k) -> Tensor");
  m.def("moe_gather_bwd(Tensor dxs, Tensor row_of_slot, int top_k) -> Tensor");
  m.def("moe_combine(Tensor y, Tensor row_of_slot, Tensor slot_of_row, Tensor? topk_weights, int top_k) -> Tensor");
  // dweights is (0, k) unless return_dweights.
  m.def("moe_combine_bwd(Tensor dout, Tensor y, Tensor row_of_slot, Tensor slot_of_row, Tensor? topk_weights, "
        "int top_k, bool return_dweights) -> (Tensor dy, Tensor dweights)");
  // ---- nvfp4: block-scaled GEMM ------------------------------------------------------------
  // out (M, N) = (a_global * b_global) * dequant(a) @ dequant(b).T + bias; a: data (M, K/2)
  // uint8, scales (M, K/16) float8_e4m3fn, global 0-dim float32 (read on the device); b alike
  // with N rows. out_dtype float32/float16/bfloat16.
  m.def("nvfp4_gemm(Tensor a_data, Tensor a_scales, Tensor a_global, Tensor b_data, Tensor b_scales, "
        "Tensor b_global, ScalarType out_dtype, Tensor? bias) -> Tensor");
  // Row-major (rows, K/16) scales -> flat uint8 in the sm_100 tensor-core (128x4 atom) layout.
  m.def("nvfp4_swizzle_scales(Tensor scales) -> Tensor");
  // ---- nvfp4: quantize / dequantize (DESIGN.md 4.3, csrc/nvfp4/quantize.h) ----------------
  // x (R, K) any strides (quantize_t passes x.T); K % 16 == 0. data (R, K/2) uint8, scales
  // (R, K/16) uint8 (E4M3 bytes), global_scale () float32 = 1/s_enc. seed keys the stochastic
  // rounding and the Hadamard signs (seed_tensor, 1 element int64 read on the device, overrides
  // it); global_amax (1 element float32) replaces the computed amax.
  m.def("nvfp4_quantize(Tensor x, bool block_2d, bool hadamard, bool stochastic_rounding, int seed, "
        "Tensor? global_amax, Tensor? seed_tensor) -> (Tensor data, Tensor scales, Tensor global_scale)");
  // out_dtype: 0 float32, 1 float16, 2 bfloat16. Returns (R, K).
  m.def("nvfp4_dequantize(Tensor data, Tensor scales, Tensor global_scale, int out_dtype) -> Tensor");
}

// Same entry for both keys: the entry routes by device.
#define NK_IMPL_ALL(m)                                                          \
  m.impl("causal_conv1d_fwd", TORCH_BOX(&nk::causal_conv1d_fwd));               \
  m.impl("causal_conv1d_bwd", TORCH_BOX(&nk::causal_conv1d_bwd));               \
  m.impl("causal_conv1d_update", TORCH_BOX(&nk::causal_conv1d_update));        \
  m.impl("ssd_chunk_scan_fwd", TORCH_BOX(&nk::ssd_chunk_scan_fwd));            \
  m.impl("ssd_chunk_scan_bwd", TORCH_BOX(&nk::ssd_chunk_scan_bwd));            \
  m.impl("selective_state_update", TORCH_BOX(&nk::selective_state_update));    \
  m.impl("selective_state_update_multi", TORCH_BOX(&nk::selective_state_update_multi)); \
  m.impl("rmsnorm_gated_fwd", TORCH_BOX(&nk::rmsnorm_gated_fwd));              \
  m.impl("rmsnorm_gated_bwd", TORCH_BOX(&nk::rmsnorm_gated_bwd));             \
  m.impl("verify_greedy", TORCH_BOX(&nk::spec_verify_greedy));                  \
  m.impl("rejection_sample", TORCH_BOX(&nk::spec_rejection_sample));            \
  m.impl("verify_tree_greedy", TORCH_BOX(&nk::spec_verify_tree_greedy));        \
  m.impl("verify_tree_rejection", TORCH_BOX(&nk::spec_verify_tree_rejection));  \
  m.impl("sampling_probs", TORCH_BOX(&nk::spec_sampling_probs));              \
  m.impl("grouped_gemm_fwd", TORCH_BOX(&nk::grouped_gemm_fwd));                 \
  m.impl("grouped_gemm_dgrad", TORCH_BOX(&nk::grouped_gemm_dgrad));             \
  m.impl("grouped_gemm_wgrad", TORCH_BOX(&nk::grouped_gemm_wgrad));         \
  m.impl("moe_router", TORCH_BOX(&nk::moe_router));                            \
  m.impl("moe_router_bwd", TORCH_BOX(&nk::moe_router_bwd));                    \
  m.impl("moe_permute_plan", TORCH_BOX(&nk::moe_permute_plan));                \
  m.impl("moe_gather", TORCH_BOX(&nk::moe_gather));                            \
  m.impl("moe_gather_bwd", TORCH_BOX(&nk::moe_gather_bwd));                    \
  m.impl("moe_combine", TORCH_BOX(&nk::moe_combine));                          \
  m.impl("moe_combine_bwd", TORCH_BOX(&nk::moe_combine_bwd));                    \
  m.impl("nvfp4_gemm", TORCH_BOX(&nk::nvfp4_gemm));                            \
  m.impl("nvfp4_swizzle_scales", TORCH_BOX(&nk::nvfp4_swizzle_scales));          \
  m.impl("nvfp4_quantize", TORCH_BOX(&nk::nvfp4_quantize));                     \
  m.impl("nvfp4_dequantize", TORCH_BOX(&nk::nvfp4_dequantize));

STABLE_TORCH_LIBRARY_IMPL(nemokernels, CPU, m) { NK_IMPL_ALL(m) }
STABLE_TORCH_LIBRARY_IMPL(nemokernels, CUDA, m) { NK_IMPL_ALL(m) }
