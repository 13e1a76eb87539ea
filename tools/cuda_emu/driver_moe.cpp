// C ABI of the emulated grouped GEMM kernels (csrc/moe/grouped_gemm_cuda.cu, rewritten by
// transform.py into grouped_gemm_cuda.emu.cpp in the build directory), for
// tests/moe/test_cuda_emulation_grouped_gemm.py. emu_gg_set_cc_major picks the device's compute
// capability (>= 8: wmma tensor-core kernel for fp16/bf16; < 8: the SIMT kernel).
#include "emu_api.h"
#include "grouped_gemm_cuda.emu.cpp"

#include "params_layout.inc"  // offsetof table of GroupedGemmParams (generated)

EMU_ENTRY(emu_gg_fwd_cuda, GroupedGemmParams, grouped_gemm_fwd_cuda)
EMU_ENTRY(emu_gg_dgrad_cuda, GroupedGemmParams, grouped_gemm_dgrad_cuda)
EMU_ENTRY(emu_gg_wgrad_cuda, GroupedGemmParams, grouped_gemm_wgrad_cuda)
EMU_EXPORT void emu_gg_set_cc_major(int major) { emu::compute_capability_major = major; }
EMU_COUNTERS
