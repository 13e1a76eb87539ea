"""NVFP4 (docs/design.md section 4.3): the tensor type, quantize/dequantize, the block-scaled GEMM,
and NVFP4Linear with the pre-training recipe."""
from .tensor import NVFP4Tensor
from .gemm import gemm, gemm_path, swizzle_scales
from .quantize import dequantize, quantize, quantize_t
from .linear import NVFP4Linear, NVFP4Recipe, convert_to_nvfp4

__all__ = ["NVFP4Tensor", "gemm", "gemm_path", "swizzle_scales",
           "dequantize", "quantize", "quantize_t", "NVFP4Linear", "NVFP4Recipe", "convert_to_nvfp4"]
