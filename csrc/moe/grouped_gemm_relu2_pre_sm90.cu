// Hopper (sm_90a) grouped GEMM forward for training with relu^2: one epilogue writes
// out = relu(acc)^2 (one bf16 rounding, as the inference kernel) and the pre-activation
// pre = acc (rounded) that the backward reads, so no relu^2 pass reads pre back. The
// pre-activation goes out through a per-group register-store visitor (AuxStoreRowsPtrArray in
// grouped_gemm_cutlass.cuh). Its own unit: one heavy instantiation.
#include "moe/grouped_gemm_cutlass.cuh"

namespace nk {

int64_t grouped_gemm_relu2_pre_sm90_workspace(int64_t E) {
  return gg_cutlass::fwd_epi_workspace<gg_cutlass::Sm90Traits, gg_cutlass::kRelu2Pre>(E);
}

void grouped_gemm_relu2_pre_sm90_run(const GroupedGemmParams& p, const void* A, const void* B, void* D, void* pre,
                                     void* workspace, void* stream) {
  gg_cutlass::fwd_epi_run<gg_cutlass::Sm90Traits, gg_cutlass::kRelu2Pre>(p, A, B, D, workspace, stream, pre);
}

}  // namespace nk
