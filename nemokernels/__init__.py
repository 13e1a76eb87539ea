"""nemokernels: CUDA and CUTLASS kernels for Nemotron-3-style hybrid models.

Ops are torch.library custom ops under ``torch.ops.nemokernels``, one family per subpackage:
``ssd`` (Mamba-2 chunked scan, conv1d, decode updates, gated RMSNorm), ``moe`` (LatentMoE
dispatch), ``nvfp4`` (quantization and GEMM), ``speculative`` (MTP verification). The drop-in
names (same signatures as the libraries they replace) are re-exported here.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from ._version import __version__
from . import _C  # noqa: F401  (registers the ops)
from .device_check import NemokernelsWarning  # noqa: F401  (also installs the CUDA device check)
from . import ssd, moe, nvfp4, speculative  # noqa: F401  (each registers its fake kernels)
from .ssd import (RMSNormGated, causal_conv1d_fn, causal_conv1d_update, commit_conv_state, commit_state,
                  commit_state_replay, mamba_chunk_scan_combined, rmsnorm_fn, selective_state_update,
                  selective_state_update_multi)
from .info import build_info
from . import spec  # noqa: F401  (old name of nemokernels.speculative, kept as an alias)

__all__ = ["__version__", "RMSNormGated", "build_info", "causal_conv1d_fn", "causal_conv1d_update",
           "commit_conv_state", "commit_state", "commit_state_replay", "mamba_chunk_scan_combined", "rmsnorm_fn",
           "selective_state_update", "selective_state_update_multi", "ssd", "moe", "nvfp4", "speculative", "models"]
from . import models  # noqa: E402,F401  (nemokernels.models: NemotronH on the kernels)
