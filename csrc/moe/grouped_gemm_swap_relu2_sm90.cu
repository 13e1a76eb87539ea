// Hopper (sm_90a) grouped GEMM forward with swapped operands (Sm90SwapTraits, kFwdSwap: each
// expert's weight rows on the 128-row M side, its tokens on a 32-wide N side, D^T stored
// column-major): out = relu(a @ w[e]^T)^2 in the epilogue (no pre-activation saved).
// For experts with few rows (decode-sized batches), opt-in with NEMOKERNELS_GROUPED_GEMM_SWAP_AB=1
// until a GPU run has measured it (docs/moe.md, issue 19). Its own unit: one heavy instantiation.
#include "moe/grouped_gemm_cutlass.cuh"

namespace nk {

int64_t grouped_gemm_swap_relu2_sm90_workspace(int64_t E) {
  return gg_cutlass::fwd_epi_workspace<gg_cutlass::Sm90SwapTraits, gg_cutlass::kRelu2, gg_cutlass::kFwdSwap>(E);
}

void grouped_gemm_swap_relu2_sm90_run(const GroupedGemmParams& p, const void* A, const void* B, void* D,
                                     void* workspace, void* stream) {
  gg_cutlass::fwd_epi_run<gg_cutlass::Sm90SwapTraits, gg_cutlass::kRelu2, gg_cutlass::kFwdSwap>(p, A, B, D, workspace,
                                                                                          stream);
}

}  // namespace nk
