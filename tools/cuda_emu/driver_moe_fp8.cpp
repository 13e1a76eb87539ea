// C ABI of the emulated FP8 experts (csrc/moe/grouped_gemm_fp8_cuda.cu, rewritten by
// transform.py; built without NK_HAS_SM90, so the portable GEMM, the zero fill and the row
// quantizer, the wgrad's transposed quantizer and the portable wgrad run), for
// tests/moe/test_grouped_gemm_fp8.py.
#include "emu_api.h"
#include "grouped_gemm_fp8_cuda.emu.cpp"

#include "params_layout.inc"  // offsetof table of the parameter structs (generated)

EMU_ENTRY(emu_fp8_gemm_cuda, GroupedGemmFp8Params, grouped_gemm_fp8_cuda)
EMU_ENTRY(emu_fp8_quantize_cuda, QuantizeFp8Params, moe_quantize_fp8_cuda)
EMU_ENTRY(emu_fp8_quantize_t_cuda, QuantizeFp8TParams, moe_quantize_fp8_t_cuda)
EMU_ENTRY(emu_fp8_wgrad_cuda, GroupedGemmFp8WgradParams, grouped_gemm_fp8_wgrad_cuda)
EMU_COUNTERS
