// C ABI of the emulated MoE permutation / gather / combine kernels (csrc/moe/permute_cuda.cu,
// rewritten by transform.py into permute_cuda.emu.cpp), for tests/moe/test_cuda_emulation_moe.py.
#include "emu_api.h"
#include "permute_cuda.emu.cpp"

#include "params_layout.inc"  // offsetof table of the permute.h parameter structs (generated)

EMU_ENTRY(emu_moe_permute_plan_cuda, PermutePlanParams, moe_permute_plan_cuda)
EMU_ENTRY(emu_moe_gather_cuda, GatherParams, moe_gather_cuda)
EMU_ENTRY(emu_moe_gather_bwd_cuda, GatherBwdParams, moe_gather_bwd_cuda)
EMU_ENTRY(emu_moe_combine_cuda, CombineParams, moe_combine_cuda)
EMU_ENTRY(emu_moe_combine_bwd_cuda, CombineBwdParams, moe_combine_bwd_cuda)
