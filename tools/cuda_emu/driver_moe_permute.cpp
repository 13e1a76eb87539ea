// C ABI of the emulated MoE permutation / gather / combine kernels (csrc/moe/permute_cuda.cu,
// rewritten by transform.py into permute_cuda.emu.cpp), for tests/moe/test_cuda_emulation_moe.py.
#include "emu_api.h"
#include "permute_cuda.emu.cpp"

#include "moe_permute_layout.inc"  // offsetof table of the permute.h parameter structs (generated)

EMU_EXPORT int emu_moe_permute_plan_cuda(const nk::PermutePlanParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::moe_permute_plan_cuda(*p, nullptr); }, err, errlen);
}
EMU_EXPORT int emu_moe_gather_cuda(const nk::GatherParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::moe_gather_cuda(*p, nullptr); }, err, errlen);
}
EMU_EXPORT int emu_moe_gather_bwd_cuda(const nk::GatherBwdParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::moe_gather_bwd_cuda(*p, nullptr); }, err, errlen);
}
EMU_EXPORT int emu_moe_combine_cuda(const nk::CombineParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::moe_combine_cuda(*p, nullptr); }, err, errlen);
}
EMU_EXPORT int emu_moe_combine_bwd_cuda(const nk::CombineBwdParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::moe_combine_bwd_cuda(*p, nullptr); }, err, errlen);
}
