// Hopper (sm_90a) grouped GEMM over experts, bf16 with float32 accumulation: forward (TN:
// a @ w[e]^T) and dgrad (NN: g @ w[e]) as GroupedGemm<Sm90Traits, kind> (grouped_gemm_cutlass.cuh:
// TMA warp-specialized cooperative wgmma, 128 x 128 x 64 tiles, cluster 1x1x1). When the
// pre-activation is saved, relu^2 and its backward are elementwise passes in grouped_gemm_cuda.cu;
// without it, grouped_gemm_relu2_sm90.cu fuses relu^2 into the epilogue (docs/decisions.md).
// wgrad: grouped_gemm_wgrad_sm90.cu. fp16 takes the portable kernel.
#include "moe/grouped_gemm_cutlass.cuh"

namespace nk {

int64_t grouped_gemm_sm90_workspace(int64_t E, int kind) {
  return gg_cutlass::fwd_dgrad_workspace<gg_cutlass::Sm90Traits>(E, kind);
}

void grouped_gemm_sm90_run(const GroupedGemmParams& p, int kind, const void* A, const void* B, void* D,
                           void* workspace, void* stream) {
  gg_cutlass::fwd_dgrad_run<gg_cutlass::Sm90Traits>(p, kind, A, B, D, workspace, stream);
}

}  // namespace nk
