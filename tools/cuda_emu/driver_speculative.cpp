// C ABI of the emulated speculative-verification kernels (csrc/speculative/verify_cuda.cu, rewritten
// by transform.py into verify_cuda.emu.cpp in the build directory).
#include "emu_api.h"
#include "verify_cuda.emu.cpp"

#include "params_layout.inc"  // offsetof table of the Spec*Params structs (generated)

EMU_ENTRY(emu_spec_verify_greedy_cuda, SpecGreedyParams, spec_verify_greedy_cuda)
EMU_ENTRY(emu_spec_verify_tree_greedy_cuda, SpecTreeGreedyParams, spec_verify_tree_greedy_cuda)
EMU_ENTRY(emu_spec_rejection_sample_cuda, SpecRejectionParams, spec_rejection_sample_cuda)
EMU_ENTRY(emu_spec_verify_tree_rejection_cuda, SpecTreeRejectionParams, spec_verify_tree_rejection_cuda)
EMU_ENTRY(emu_spec_sampling_probs_cuda, SpecSamplingParams, spec_sampling_probs_cuda)
EMU_EXPORT long long emu_spec_cuda_num_splits(long long rows, long long vocab) { return nk::spec_cuda_num_splits(rows, vocab); }
EMU_EXPORT long long emu_spec_chunk_len(long long vocab, long long nsplit) { return nk::spec_chunk_len(vocab, nsplit); }
EMU_COUNTERS
