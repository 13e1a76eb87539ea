// C ABI of the emulated grouped GEMM kernels (csrc/moe/grouped_gemm_cuda.cu, rewritten by
// transform.py into grouped_gemm_cuda.emu.cpp in the build directory), for
// tests/moe/test_cuda_emulation_grouped_gemm.py. The test mirrors nk::GroupedGemmParams in ctypes and checks
// every offset against emu_gg_offset / emu_gg_sizeof. emu_gg_set_cc_major picks the device's
// compute capability (>= 8: wmma tensor-core kernel for fp16/bf16; < 8: the SIMT kernel).
#include "emu_api.h"
#include "grouped_gemm_cuda.emu.cpp"

#include <cstddef>
#include <cstring>

EMU_EXPORT int emu_gg_fwd_cuda(const nk::GroupedGemmParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::grouped_gemm_fwd_cuda(*p, nullptr); }, err, errlen);
}
EMU_EXPORT int emu_gg_dgrad_cuda(const nk::GroupedGemmParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::grouped_gemm_dgrad_cuda(*p, nullptr); }, err, errlen);
}
EMU_EXPORT int emu_gg_wgrad_cuda(const nk::GroupedGemmParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::grouped_gemm_wgrad_cuda(*p, nullptr); }, err, errlen);
}
EMU_EXPORT void emu_gg_set_cc_major(int major) { emu::compute_capability_major = major; }
EMU_EXPORT long long emu_gg_sizeof() { return (long long)sizeof(nk::GroupedGemmParams); }
EMU_EXPORT long long emu_gg_offset(const char* f) {
#define EMU_F(name) if (!std::strcmp(f, #name)) return (long long)offsetof(nk::GroupedGemmParams, name);
  EMU_F(dtype) EMU_F(R) EMU_F(N) EMU_F(K) EMU_F(E) EMU_F(offsets) EMU_F(a) EMU_F(w) EMU_F(dout) EMU_F(pre_in)
  EMU_F(out) EMU_F(pre_out) EMU_F(act) EMU_F(tile_offsets) EMU_F(arch) EMU_F(workspace)
#undef EMU_F
  return -1;
}
EMU_EXPORT long long emu_gg_blocks_run() { return emu::blocks_run; }
