// The one list of nemokernels op schemas (namespace `nemokernels`) and their CPU/CUDA
// kernels. Every op's entry function checks its inputs and picks the CPU or CUDA path by the
// inputs' device, so the same function is registered for both dispatch keys. Fake (meta)
// kernels and autograd formulas live on the Python side (nemokernels/ops/).
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
  m.impl("sampling_probs", TORCH_BOX(&nk::spec_sampling_probs));                \
  m.impl("nvfp4_quantize", TORCH_BOX(&nk::nvfp4_quantize));                     \
  m.impl("nvfp4_dequantize", TORCH_BOX(&nk::nvfp4_dequantize));

STABLE_TORCH_LIBRARY_IMPL(nemokernels, CPU, m) { NK_IMPL_ALL(m) }
STABLE_TORCH_LIBRARY_IMPL(nemokernels, CUDA, m) { NK_IMPL_ALL(m) }
