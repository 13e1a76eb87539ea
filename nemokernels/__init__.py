"""nemokernels: CUDA and CUTLASS kernels for Nemotron-3-style hybrid models.

Ops are torch.library custom ops under ``torch.ops.nemokernels``; this module exposes the
drop-in Python names (same signatures as the libraries they replace).
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from ._version import __version__
from . import _C  # noqa: F401  (registers the ops)
from .ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from .ops.ssd_chunk_scan import mamba_chunk_scan_combined
from .ops.state_update import commit_state, selective_state_update, selective_state_update_multi
from .ops.rmsnorm_gated import RMSNormGated, rmsnorm_fn
from .info import build_info
from . import spec  # noqa: F401  (verification API: nemokernels.spec.*)
from . import moe  # noqa: F401  (LatentMoE dispatch: nemokernels.moe.*)
from . import nvfp4  # noqa: F401  (NVFP4 API: nemokernels.nvfp4.*; registers the fake kernels)

__all__ = ["__version__", "RMSNormGated", "build_info", "causal_conv1d_fn", "causal_conv1d_update",
           "commit_state", "mamba_chunk_scan_combined", "rmsnorm_fn", "selective_state_update",
           "selective_state_update_multi", "spec", "moe", "nvfp4", "models"]
from . import models  # noqa: E402,F401  (nemokernels.models: NemotronH on the kernels)
