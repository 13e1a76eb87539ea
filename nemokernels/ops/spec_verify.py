"""Fake (meta) kernels of the speculative-verification ops (schemas: csrc/torch_bindings.cpp,
kernels: csrc/spec/). Output shapes depend only on input shapes and the `max_depth` argument,
so every op traces under torch.compile and captures in CUDA graphs. Not differentiable:
verification consumes probabilities, it does not train them."""
import torch


@torch.library.register_fake("nemokernels::verify_greedy")
def _verify_greedy_fake(draft_token_ids, target_logits, num_draft_tokens):
    b, k = draft_token_ids.shape
    return draft_token_ids.new_empty((b, k + 1)), draft_token_ids.new_empty((b,))


@torch.library.register_fake("nemokernels::rejection_sample")
def _rejection_sample_fake(draft_token_ids, draft_probs, target_probs, num_draft_tokens, seed_tensor, seed):
    b, k = draft_token_ids.shape
    return draft_token_ids.new_empty((b, k + 1)), draft_token_ids.new_empty((b,))


def _tree_outputs(candidate_ids, max_depth):
    b = candidate_ids.shape[0]
    return (candidate_ids.new_empty((b, max_depth + 1)), candidate_ids.new_empty((b, max_depth + 1)),
            candidate_ids.new_empty((b,)))


@torch.library.register_fake("nemokernels::verify_tree_greedy")
def _verify_tree_greedy_fake(candidate_ids, parents, target_logits, max_depth):
    return _tree_outputs(candidate_ids, max_depth)


@torch.library.register_fake("nemokernels::verify_tree_rejection")
def _verify_tree_rejection_fake(candidate_ids, parents, draft_probs, target_probs, max_depth, seed_tensor, seed):
    return _tree_outputs(candidate_ids, max_depth)


@torch.library.register_fake("nemokernels::sampling_probs")
def _sampling_probs_fake(logits, temperature, temperature_value, top_k, top_k_value, top_p, top_p_value,
                         min_p, min_p_value):
    return logits.new_empty(logits.shape, dtype=torch.float32)
