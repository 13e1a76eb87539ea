// C ABI of the emulated FP8 experts (csrc/moe/grouped_gemm_fp8_cuda.cu, rewritten by
// transform.py; built without NK_HAS_SM90, so the portable GEMM, the zero fill and the row
// quantizer run), for tests/moe/test_grouped_gemm_fp8.py.
#include "emu_api.h"
#include "grouped_gemm_fp8_cuda.emu.cpp"

#include "params_layout.inc"  // offsetof table of the parameter structs (generated)

EMU_ENTRY(emu_fp8_gemm_cuda, GroupedGemmFp8Params, grouped_gemm_fp8_cuda)
EMU_ENTRY(emu_fp8_quantize_cuda, QuantizeFp8Params, moe_quantize_fp8_cuda)
EMU_COUNTERS
