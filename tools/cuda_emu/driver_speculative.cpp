// C ABI of the emulated speculative-verification kernels (csrc/speculative/verify_cuda.cu, rewritten
// by transform.py into verify_cuda.emu.cpp in the build directory).
#include "emu_api.h"
#include "verify_cuda.emu.cpp"

#include "spec_params_layout.inc"  // offsetof table of the Spec*Params structs (generated)

EMU_EXPORT int emu_spec_verify_greedy_cuda(const nk::SpecGreedyParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::spec_verify_greedy_cuda(*p, nullptr); }, err, errlen);
}
EMU_EXPORT int emu_spec_verify_tree_greedy_cuda(const nk::SpecTreeGreedyParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::spec_verify_tree_greedy_cuda(*p, nullptr); }, err, errlen);
}
EMU_EXPORT int emu_spec_rejection_sample_cuda(const nk::SpecRejectionParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::spec_rejection_sample_cuda(*p, nullptr); }, err, errlen);
}
EMU_EXPORT int emu_spec_verify_tree_rejection_cuda(const nk::SpecTreeRejectionParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::spec_verify_tree_rejection_cuda(*p, nullptr); }, err, errlen);
}
EMU_EXPORT int emu_spec_sampling_probs_cuda(const nk::SpecSamplingParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::spec_sampling_probs_cuda(*p, nullptr); }, err, errlen);
}
EMU_EXPORT long long emu_spec_cuda_num_splits(long long rows, long long vocab) { return nk::spec_cuda_num_splits(rows, vocab); }
EMU_EXPORT long long emu_spec_chunk_len(long long vocab, long long nsplit) { return nk::spec_chunk_len(vocab, nsplit); }
EMU_EXPORT long long emu_blocks_run() { return emu::blocks_run; }
