// Blackwell (sm_100a) grouped GEMM over experts, bf16 with float32 accumulation: forward (TN:
// a @ w[e]^T) and dgrad (NN: g @ w[e]) as GroupedGemm<Sm100Traits, kind> (grouped_gemm_cutlass.cuh:
// tcgen05 1-SM MMA, 128 x 128 x 64 tiles, cluster 1x1x1, accumulators in tensor memory). relu^2
// and its backward are separate passes, as on Hopper. wgrad: grouped_gemm_wgrad_sm100.cu.
// COMPILE-VERIFIED ONLY: no sm_100 GPU was available (docs/known-issues.md).
#include "moe/grouped_gemm_cutlass.cuh"

namespace nk {

int64_t grouped_gemm_sm100_workspace(int64_t E, int kind) {
  return gg_cutlass::fwd_dgrad_workspace<gg_cutlass::Sm100Traits>(E, kind);
}

void grouped_gemm_sm100_run(const GroupedGemmParams& p, int kind, const void* A, const void* B, void* D,
                            void* workspace, void* stream) {
  gg_cutlass::fwd_dgrad_run<gg_cutlass::Sm100Traits>(p, kind, A, B, D, workspace, stream);
}

}  // namespace nk
