// C ABI of the emulated SSD backward kernels (csrc/ssd/ssd_chunk_scan_bwd_cuda.cu, rewritten by
// transform.py). Its ssd_states_cuda call resolves to the emulated forward file (driver_fwd.cpp)
// linked into the same library. Build with -DNK_SSD_BWD_TARGET_BLOCKS=1 for the largest head
// split (hs = H / G) on small shapes.
#include "emu_api.h"
#include "ssd_chunk_scan_bwd_cuda.emu.cpp"

EMU_ENTRY(emu_ssd_bwd_cuda, SsdBwdParams, ssd_bwd_cuda)
EMU_EXPORT long long emu_ssd_bwd_cuda_workspace_bytes(const nk::SsdBwdParams* q) { return nk::ssd_bwd_cuda_workspace_bytes(*q); }
#ifdef NK_SSD_BWD_TARGET_BLOCKS
EMU_EXPORT long long emu_ssd_bwd_target_blocks() { return NK_SSD_BWD_TARGET_BLOCKS; }
#else
EMU_EXPORT long long emu_ssd_bwd_target_blocks() { return -1; }
#endif
