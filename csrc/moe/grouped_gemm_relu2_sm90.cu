// Hopper (sm_90a) grouped GEMM forward with relu^2 fused into the epilogue: out = relu(a @ w[e]^T)^2
// from the float32 accumulator, one bf16 rounding, no pre-activation written. Taken when no
// gradient needs the pre-activation (pre_out null); otherwise grouped_gemm_relu2_pre_sm90.cu
// writes both. Its own unit: one heavy instantiation.
#include "moe/grouped_gemm_cutlass.cuh"

namespace nk {

int64_t grouped_gemm_relu2_sm90_workspace(int64_t E) {
  return gg_cutlass::fwd_epi_workspace<gg_cutlass::Sm90Traits, gg_cutlass::kRelu2>(E);
}

void grouped_gemm_relu2_sm90_run(const GroupedGemmParams& p, const void* A, const void* B, void* D, void* workspace,
                                 void* stream) {
  gg_cutlass::fwd_epi_run<gg_cutlass::Sm90Traits, gg_cutlass::kRelu2>(p, A, B, D, workspace, stream);
}

}  // namespace nk
