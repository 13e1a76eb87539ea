// C ABI of the emulated MoE router kernels (csrc/moe/router_cuda.cu, rewritten by transform.py
// into router_cuda.emu.cpp in the build directory), for tests/moe/test_cuda_emulation_moe.py.
#include "emu_api.h"
#include "router_cuda.emu.cpp"

#include "params_layout.inc"  // offsetof table of the Router*Params structs (generated)

EMU_ENTRY(emu_moe_router_cuda, RouterParams, moe_router_cuda)
EMU_ENTRY(emu_moe_router_bwd_cuda, RouterBwdParams, moe_router_bwd_cuda)
