// C ABI of the emulated causal conv1d kernels (csrc/ssd/causal_conv1d_cuda.cu, rewritten by
// transform.py into causal_conv1d_cuda.emu.cpp in the build directory), for
// tests/ssd/test_cuda_emulation_conv1d.py. Built with -DEMU_SM_COUNT=1 too (small grids:
// forward blocks stride over several tiles, backward blocks walk several (batch, time) items).
#include "emu_api.h"
#include "causal_conv1d_cuda.emu.cpp"

#include "params_layout.inc"  // offsetof table of the Conv1d*Params structs (generated)

EMU_ENTRY(emu_conv1d_fwd_cuda, Conv1dFwdParams, causal_conv1d_fwd_cuda)
EMU_ENTRY(emu_conv1d_bwd_cuda, Conv1dBwdParams, causal_conv1d_bwd_cuda)
EMU_ENTRY(emu_conv1d_update_cuda, Conv1dUpdateParams, causal_conv1d_update_cuda)
EMU_EXPORT long long emu_conv1d_bwd_num_partials(const nk::Conv1dBwdParams* q) {
  return nk::causal_conv1d_bwd_cuda_num_partials(*q);
}
EMU_COUNTERS
