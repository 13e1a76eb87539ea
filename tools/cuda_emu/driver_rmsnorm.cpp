// C ABI of the emulated gated RMSNorm kernels (csrc/ssd/rmsnorm_gated_cuda.cu, rewritten by
// transform.py into rmsnorm_gated_cuda.emu.cpp in the build directory), for
// tests/ssd/test_cuda_emulation_rmsnorm.py. Built with -DEMU_SM_COUNT=n for a smaller device
// too (fewer resident blocks: the backward's row lanes then walk several rows each).
#include "emu_api.h"
#include "rmsnorm_gated_cuda.emu.cpp"

#include "params_layout.inc"  // offsetof table of RmsNormFwdParams / RmsNormBwdParams (generated)

EMU_ENTRY(emu_rmsnorm_fwd_cuda, RmsNormFwdParams, rmsnorm_gated_fwd_cuda)
EMU_ENTRY(emu_rmsnorm_bwd_cuda, RmsNormBwdParams, rmsnorm_gated_bwd_cuda)
EMU_EXPORT long long emu_rmsnorm_bwd_num_partials(const nk::RmsNormBwdParams* q) {
  return nk::rmsnorm_gated_bwd_cuda_num_partials(*q);
}
EMU_COUNTERS
