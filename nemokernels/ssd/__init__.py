"""The chunked selective scan family (Mamba-2): the SSD chunk scan forward and backward,
causal conv1d, the decode state updates and the gated RMSNorm. Public wrappers, fake
kernels and autograd per op module; the float64 references in reference.py."""
from .causal_conv1d import causal_conv1d_fn, causal_conv1d_update, commit_conv_state
from .rmsnorm_gated import RMSNormGated, rmsnorm_fn
from .ssd_chunk_scan import mamba_chunk_scan_combined
from .state_update import commit_state, commit_state_replay, selective_state_update, selective_state_update_multi

__all__ = ["RMSNormGated", "causal_conv1d_fn", "causal_conv1d_update", "commit_conv_state", "commit_state",
           "commit_state_replay", "mamba_chunk_scan_combined", "rmsnorm_fn", "selective_state_update",
           "selective_state_update_multi"]
