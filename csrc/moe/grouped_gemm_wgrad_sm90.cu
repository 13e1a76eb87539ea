// Hopper (sm_90a) grouped GEMM over experts, weight gradient, bf16 with float32 accumulation:
// dw[e] (N x K) = g[seg_e]^T (column-major view of g) @ a[seg_e], GroupedGemm<Sm90Traits, kWgrad>
// (grouped_gemm_cutlass.cuh). The reduction length is the expert's row count, no split-K:
// deterministic. Experts without rows get M = 0 (no tiles); grouped_gemm_cuda.cu zeroes their dw.
// Its own translation unit: one heavy CUTLASS instantiation per unit.
#include "moe/grouped_gemm_cutlass.cuh"

namespace nk {

int64_t grouped_gemm_wgrad_sm90_workspace(int64_t E) {
  return gg_cutlass::wgrad_workspace<gg_cutlass::Sm90Traits>(E);
}

void grouped_gemm_wgrad_sm90_run(const GroupedGemmParams& p, const void* G, const void* A, void* D,
                                 void* workspace, void* stream) {
  gg_cutlass::wgrad_run<gg_cutlass::Sm90Traits>(p, G, A, D, workspace, stream);
}

}  // namespace nk
