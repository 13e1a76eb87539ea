// The GEMM of nvfp4.gemm's sm_90 path: d = alpha * a16 @ b16^T on bf16 operands that
// gemm_cuda.cu decoded from NVFP4, run by the MoE grouped GEMM's CUTLASS kernel (TMA
// warp-specialized cooperative wgmma, 128 x 128 x 64; grouped_gemm_cutlass.cuh) as one group.
// bf16 d reuses the MoE forward instantiation (grouped_gemm_sm90.cu); float32 d is this unit's.
// Details: docs/nvfp4.md, section `csrc/nvfp4/gemm_sm90.cu`.
#include "moe/grouped_gemm_cutlass.cuh"
#include "nvfp4/gemm.h"

namespace nk {
namespace {

using F32Gemm = gg_cutlass::GroupedGemm<gg_cutlass::Sm90Traits, gg_cutlass::kFwd, gg_cutlass::kPlain, float>::Gemm;

// The forward of one group: a (R = M, K), w (E = 1, N, K), rows [offsets[0], offsets[1]).
GroupedGemmParams one_group(int64_t M, int64_t N, int64_t K, const void* a16, const void* b16,
                            const float* alpha, const int32_t* offsets) {
  GroupedGemmParams g{};
  g.dtype = GgType::BF16;
  g.R = M, g.N = N, g.K = K, g.E = 1;
  g.offsets = offsets;
  g.a = a16, g.w = b16;
  g.act = GgAct::None;
  g.arch = 90;
  g.alpha = alpha;
  return g;
}

}  // namespace

int64_t nvfp4_gemm_sm90_workspace(bool f32_out) {
  return f32_out ? gg_cutlass::workspace_bytes<F32Gemm>(1) : grouped_gemm_sm90_workspace(1, kGgFwd);
}

void nvfp4_gemm_sm90_run(int64_t M, int64_t N, int64_t K, const void* a16, const void* b16, const float* alpha,
                         const int32_t* offsets, void* d, bool f32_out, void* workspace, void* stream) {
  GroupedGemmParams g = one_group(M, N, K, a16, b16, alpha, offsets);
  g.out = d;
  g.workspace = workspace;
  if (f32_out) {
    gg_cutlass::run<F32Gemm, gg_cutlass::kFwd>(g, a16, b16, d, workspace, static_cast<cudaStream_t>(stream));
  } else {
    grouped_gemm_sm90_run(g, kGgFwd, a16, b16, d, workspace, stream);
  }
}

}  // namespace nk
