// C ABI of the emulated MoE router kernels (csrc/moe/router_cuda.cu, rewritten by transform.py
// into router_cuda.emu.cpp in the build directory), for tests/moe/test_cuda_emulation_moe.py.
#include "emu_api.h"
#include "router_cuda.emu.cpp"

#include "moe_router_layout.inc"  // offsetof table of the Router*Params structs (generated)

EMU_EXPORT int emu_moe_router_cuda(const nk::RouterParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::moe_router_cuda(*p, nullptr); }, err, errlen);
}
EMU_EXPORT int emu_moe_router_bwd_cuda(const nk::RouterBwdParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::moe_router_bwd_cuda(*p, nullptr); }, err, errlen);
}
