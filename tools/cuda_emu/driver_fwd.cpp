// C ABI of the emulated SSD forward kernels (csrc/ssd/ssd_chunk_scan_fwd_cuda.cu, rewritten by
// transform.py into ssd_chunk_scan_fwd_cuda.emu.cpp in the build directory).
#include "emu_api.h"
#include "ssd_chunk_scan_fwd_cuda.emu.cpp"

#include "params_layout.inc"  // offsetof table of SsdParams / SsdBwdParams (generated)

EMU_ENTRY(emu_ssd_fwd_cuda, SsdParams, ssd_fwd_cuda)
EMU_ENTRY(emu_ssd_states_cuda, SsdParams, ssd_states_cuda)
EMU_EXPORT long long emu_ssd_fwd_cuda_workspace_bytes(const nk::SsdParams* p) { return nk::ssd_fwd_cuda_workspace_bytes(*p); }
EMU_COUNTERS
