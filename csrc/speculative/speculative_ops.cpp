// The speculative family's ops: MTP verification (greedy, rejection sampling, trees) and the
// fused sampling transform. Schemas and kernel registration; the entries (verify.cpp) check
// inputs and route by device. Fakes: nemokernels/speculative/verify.py.
#include <optional>
#include <tuple>

#include "common/family_ops.h"

namespace nk {
// Entries, defined in this folder.
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

// Schemas (with what the shapes and dtypes mean) and the kernel of each.
const OpDef kOps[] = {
  // ---- spec: MTP verification and the fused sampling transform ---------------------------
  // Outputs: output_token_ids (B, k+1) int64 padded with -1, num_accepted (B,) int64 (accepted
  // drafts; num_accepted + 1 tokens are emitted). Random numbers: Philox keyed by the int64 in
  // seed_tensor (read on the device, no host sync) or by `seed` when seed_tensor is None.
  {"verify_greedy(Tensor draft_token_ids, Tensor target_logits, Tensor? num_draft_tokens) "
   "-> (Tensor output_token_ids, Tensor num_accepted)",
   TORCH_BOX(&spec_verify_greedy)},
  {"rejection_sample(Tensor draft_token_ids, Tensor? draft_probs, Tensor target_probs, "
   "Tensor? num_draft_tokens, Tensor? seed_tensor, int seed) "
   "-> (Tensor output_token_ids, Tensor num_accepted)",
   TORCH_BOX(&spec_rejection_sample)},
  // Trees: node 0 is the root; outputs (B, max_depth+1) padded with -1.
  {"verify_tree_greedy(Tensor candidate_ids, Tensor parents, Tensor target_logits, int max_depth) "
   "-> (Tensor output_token_ids, Tensor accepted_node_indices, Tensor num_accepted)",
   TORCH_BOX(&spec_verify_tree_greedy)},
  {"verify_tree_rejection(Tensor candidate_ids, Tensor parents, Tensor draft_probs, Tensor target_probs, "
   "int max_depth, Tensor? seed_tensor, int seed) "
   "-> (Tensor output_token_ids, Tensor accepted_node_indices, Tensor num_accepted)",
   TORCH_BOX(&spec_verify_tree_rejection)},
  // Per-request tensors (B,) override the scalar values; probs float32 shaped like logits.
  {"sampling_probs(Tensor logits, Tensor? temperature, float temperature_value, Tensor? top_k, "
   "int top_k_value, Tensor? top_p, float top_p_value, Tensor? min_p, float min_p_value) -> Tensor",
   TORCH_BOX(&spec_sampling_probs)},
};

}  // namespace nk

NK_REGISTER_FAMILY("speculative", nk::kOps)
