// Hopper (sm_90a) grouped GEMM forward on 64-row tiles (Sm90M64Traits: pingpong, 64 x 128 x 64):
// out = relu(a @ w[e]^T)^2 in the epilogue (no pre-activation saved).
// Opt-in with NEMOKERNELS_GROUPED_GEMM_TILE=64 until a GPU run has measured it against the
// 128-row cooperative kernel (docs/moe.md, issue 19). Its own unit: one heavy instantiation.
#include "moe/grouped_gemm_cutlass.cuh"

namespace nk {

int64_t grouped_gemm_m64_relu2_sm90_workspace(int64_t E) {
  return gg_cutlass::fwd_epi_workspace<gg_cutlass::Sm90M64Traits, gg_cutlass::kRelu2>(E);
}

void grouped_gemm_m64_relu2_sm90_run(const GroupedGemmParams& p, const void* A, const void* B, void* D,
                                   void* workspace, void* stream) {
  gg_cutlass::fwd_epi_run<gg_cutlass::Sm90M64Traits, gg_cutlass::kRelu2>(p, A, B, D, workspace, stream);
}

}  // namespace nk
