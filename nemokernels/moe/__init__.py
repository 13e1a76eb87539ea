"""LatentMoE expert dispatch (docs/design.md section 4.2).

Details: docs/moe.md, section `nemokernels/moe/__init__.py`."""
from .fp8 import FP8Rows, FP8Tensor, FP8Training, fp8_block_weights, fp8_weights, grouped_gemm_fp8_training, quantize_rows_fp8
from .grouped_gemm import grouped_gemm
from .router import moe_router, router_logits
from .permute import MoEPlan, moe_gather, moe_permute_plan
from .combine import moe_combine
from .layer import PAD_TO, LatentMoE, latent_moe

__all__ = ["grouped_gemm", "FP8Tensor", "FP8Rows", "FP8Training", "quantize_rows_fp8", "fp8_weights", "fp8_block_weights", "grouped_gemm_fp8_training",
           "moe_router", "router_logits", "MoEPlan", "moe_permute_plan", "moe_gather", "moe_combine", "PAD_TO",
           "LatentMoE", "latent_moe"]
