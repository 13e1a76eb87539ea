// C ABI of the emulated SSD forward kernels (csrc/ssd/ssd_chunk_scan_fwd_cuda.cu, rewritten by
// transform.py into ssd_chunk_scan_fwd_cuda.emu.cpp in the build directory).
#include "emu_api.h"
#include "ssd_chunk_scan_fwd_cuda.emu.cpp"

#include "params_layout.inc"  // offsetof table of SsdParams / SsdBwdParams (generated)

EMU_EXPORT int emu_ssd_fwd_cuda(const nk::SsdParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::ssd_fwd_cuda(*p, nullptr); }, err, errlen);
}
EMU_EXPORT int emu_ssd_states_cuda(const nk::SsdParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::ssd_states_cuda(*p, nullptr); }, err, errlen);
}
EMU_EXPORT long long emu_ssd_fwd_cuda_workspace_bytes(const nk::SsdParams* p) { return nk::ssd_fwd_cuda_workspace_bytes(*p); }
EMU_EXPORT long long emu_blocks_run() { return emu::blocks_run; }
EMU_EXPORT long long emu_launches() { return emu::launches; }
