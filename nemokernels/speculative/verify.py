"""Speculative-decoding verification for MTP drafts (docs/design.md section 4.4; docs/speculative.md).

Every function runs in one or two kernel launches for the whole batch, never synchronises
with the host and is safe under CUDA-graph capture and ``torch.compile(fullgraph=True)``.

Details: docs/speculative.md, section `nemokernels/speculative/verify.py`."""
from typing import Optional, Tuple, Union

import torch

_ops = torch.ops.nemokernels

__all__ = ["verify_greedy", "rejection_sample", "sampling_probs", "verify_tree_greedy", "verify_tree_rejection"]


# Fake (meta) kernels: output shapes depend only on input shapes and max_depth, so every op
# traces under torch.compile and captures in CUDA graphs. Not differentiable: verification
# consumes probabilities, it does not train them.
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


def _long(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == torch.int64 else t.to(torch.int64)


def _float(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == torch.float32 else t.to(torch.float32)


def _seed_args(seed: Optional[int], generator: Optional[torch.Generator], device: torch.device):
    """(seed_tensor, seed) for the ops: a device tensor drawn from a generator, or an int."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {type(seed).__name__}")
        return None, int(seed) & ((1 << 63) - 1)
    if generator is not None:
        return torch.randint(2**62, (1,), generator=generator, device=generator.device).to(device), 0
    return torch.randint(2**62, (1,), device=device), 0


def verify_greedy(draft_token_ids: torch.Tensor, target_logits: torch.Tensor,
                  num_draft_tokens: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Greedy verification straight from the target logits (argmax fused, no softmax).

    draft_token_ids: (B, k) int; target_logits: (B, k+1, V) float32/float16/bfloat16 (last
    dim contiguous is fastest); num_draft_tokens: optional (B,) int, each <= k.
    Accepts drafts while they equal argmax(target_logits[b, j]) (ties: lowest index, as
    torch.argmax; NaN counts as the largest value). Returns (output_token_ids (B, k+1) int64
    padded with -1, num_accepted (B,) int64).
    """
    return _ops.verify_greedy(_long(draft_token_ids), target_logits, _long(num_draft_tokens))


def rejection_sample(draft_token_ids: torch.Tensor, draft_probs: Optional[torch.Tensor],
                     target_probs: torch.Tensor, *, num_draft_tokens: Optional[torch.Tensor] = None,
                     generator: Optional[torch.Generator] = None,
                     seed: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Speculative rejection sampling: the emitted tokens are distributed exactly as samples
    from the target.

    draft_token_ids: (B, k) int; draft_probs: (B, k, V) the draft's distributions, or None when
    the draft was greedy (q one-hot at the drafted token); target_probs: (B, k+1, V). Probabilities
    are float32 (other dtypes are converted). Draft x_j is accepted with probability
    min(1, p_j(x_j) / q_j(x_j)); at the first rejection a token is sampled from
    normalise(max(0, p_j - q_j)) (from p_j if that is all zero); when all drafts are accepted
    the bonus token is sampled from p_n. Residual sampling is one pass of an exponential race
    (Gumbel-max) over the vocab. Returns (output_token_ids (B, k+1) int64 padded with -1,
    num_accepted (B,) int64).
    """
    seed_tensor, seed_val = _seed_args(seed, generator, target_probs.device)
    return _ops.rejection_sample(_long(draft_token_ids), _float(draft_probs), _float(target_probs),
                                 _long(num_draft_tokens), seed_tensor, seed_val)


def _per_request(val, default, dtype, cast):
    """(tensor or None, scalar) for a parameter given as a (B,) tensor, a number or None."""
    if val is None:
        return None, default
    if torch.is_tensor(val):
        return val.to(dtype), default
    return None, cast(val)


def sampling_probs(logits: torch.Tensor, temperature: Union[float, torch.Tensor] = 1.0,
                   top_k: Union[int, torch.Tensor, None] = None, top_p: Union[float, torch.Tensor, None] = None,
                   min_p: Union[float, torch.Tensor, None] = None) -> torch.Tensor:
    """Fused sampling transform: float32 probabilities from logits in one kernel per batch.

    logits: (B, V) or (B, T, V) float32/float16/bfloat16; each parameter is a number or a
    (B,) tensor (one value per request, shared by its T positions). probs = softmax(logits / T)
    restricted to the top_k largest (None/0: off), then to the smallest set of largest
    probabilities whose mass reaches top_p of the remaining mass (None/1: off), then to those
    >= min_p * max prob (None/0: off), renormalised. Ties at a threshold are all kept.
    temperature 0 gives the one-hot argmax (greedy). No sort of the row: with top_k <= 2048
    the GPU gathers the candidates at or above the k-th largest's histogram bin and finds
    every threshold among them; otherwise a radix select (top-k) and a bisection on the
    probability value (top-p) over the row.
    """
    t_t, t_v = _per_request(temperature, 1.0, torch.float32, float)
    k_t, k_v = _per_request(top_k, 0, torch.int64, int)
    p_t, p_v = _per_request(top_p, 1.0, torch.float32, float)
    m_t, m_v = _per_request(min_p, 0.0, torch.float32, float)
    return _ops.sampling_probs(logits, t_t, t_v, k_t, k_v, p_t, p_v, m_t, m_v)


def _max_depth(n_nodes: int, max_depth: Optional[int]) -> int:
    return n_nodes - 1 if max_depth is None else int(max_depth)


def verify_tree_greedy(candidate_ids: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor,
                       max_depth: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy verification of a candidate tree.

    candidate_ids: (B, n) int, node 0 the root (the last committed token; its id is ignored);
    parents: (B, n) int, -1 for the root, parents precede their children; target_logits:
    (B, n, V): node i's logits predict its children. Walks from the root, at each node taking
    the lowest-index child whose token equals the argmax of the node's logits, and stops when
    none does (or at max_depth, default n - 1). Returns (output_token_ids (B, max_depth+1): the
    accepted children's tokens then the argmax at the last accepted node; accepted_node_indices
    (B, max_depth+1): the node whose logits gave each output token, starting with 0;
    num_accepted (B,)), padded with -1.
    """
    return _ops.verify_tree_greedy(_long(candidate_ids), _long(parents), target_logits,
                                   _max_depth(candidate_ids.shape[1], max_depth))


def verify_tree_rejection(candidate_ids: torch.Tensor, parents: torch.Tensor, draft_probs: torch.Tensor,
                          target_probs: torch.Tensor, *, max_depth: Optional[int] = None,
                          generator: Optional[torch.Generator] = None,
                          seed: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampling verification of a candidate tree (multi-draft recursive rejection, SpecInfer).

    draft_probs: (B, n, V), row i = the distribution node i's token was drafted from (given its
    parent; row 0 unused); target_probs: (B, n, V), row i = the target's distribution after node
    i. At each node the children are tried in index order: child token x is accepted with
    probability min(1, p(x) / q(x)); on rejection p <- normalise(max(0, p - q)) and the next
    child is tried; when all are rejected (or at a leaf, or at max_depth) a token is sampled
    from the current p. Emitted sequences follow the target. At most 1024 nodes. Outputs as in
    verify_tree_greedy.
    """
    seed_tensor, seed_val = _seed_args(seed, generator, target_probs.device)
    return _ops.verify_tree_rejection(_long(candidate_ids), _long(parents), _float(draft_probs), _float(target_probs),
                                      _max_depth(candidate_ids.shape[1], max_depth), seed_tensor, seed_val)
