"""Speculative decoding: verification of MTP drafts (greedy, rejection sampling, trees) and the
fused sampling transform. The conventions every verifier shares are in verify.py and
docs/speculative.md."""
from .verify import rejection_sample, sampling_probs, verify_greedy, verify_tree_greedy, verify_tree_rejection

__all__ = ["verify_greedy", "rejection_sample", "sampling_probs", "verify_tree_greedy", "verify_tree_rejection"]
