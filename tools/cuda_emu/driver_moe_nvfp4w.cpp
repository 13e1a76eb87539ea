// C ABI of the emulated grouped GEMM with NVFP4 expert weights (csrc/moe/grouped_gemm_nvfp4w_cuda.cu,
// rewritten by transform.py; built without NK_HAS_SM90, so the portable kernel and the zero fill
// run), for tests/moe/test_grouped_gemm_nvfp4w.py.
#include "emu_api.h"
#include "grouped_gemm_nvfp4w_cuda.emu.cpp"

#include "params_layout.inc"  // offsetof table of the parameter structs (generated)

EMU_ENTRY(emu_nvfp4w_cuda, GroupedGemmNvfp4wParams, grouped_gemm_nvfp4w_cuda)
EMU_COUNTERS
