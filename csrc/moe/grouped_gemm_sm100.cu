// Blackwell (sm_100a) grouped GEMM over experts, bf16 with float32 accumulation: forward (TN:
// a @ w[e]^T) and dgrad (NN: g @ w[e]) as CUTLASS 3.x pointer-array grouped GEMMs on tcgen05
// (1-SM MMA, 128 x 128 x 64 tiles, static 1x1x1 cluster, accumulators in tensor memory).
// Problem shapes, pointers and strides are built on the device from expert_offsets
// (grouped_gemm_cutlass.cuh); relu^2 and its backward are separate elementwise passes in
// grouped_gemm_cuda.cu, as on Hopper. wgrad: grouped_gemm_wgrad_sm100.cu. fp16 takes the
// portable kernel. COMPILE-VERIFIED ONLY: no sm_100 GPU was available (docs/known-issues.md).
#include "moe/grouped_gemm_cutlass.cuh"

#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

namespace nk {
namespace {

using namespace cute;

// Non-template aliases with distinct names (see grouped_gemm_sm90.cu).
using Bf16 = cutlass::bfloat16_t;
using Sm100Tile = Shape<_128, _128, _64>;
using Sm100Cluster = Shape<_1, _1, _1>;
using Sm100Epi = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm100, cutlass::arch::OpClassTensorOp, Sm100Tile, Sm100Cluster,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float,
    void, cutlass::layout::RowMajor*, 8,
    Bf16, cutlass::layout::RowMajor*, 8,
    cutlass::epilogue::PtrArrayTmaWarpSpecialized1Sm,
    cutlass::epilogue::fusion::LinearCombination<Bf16, float, void, float>>::CollectiveOp;
using Sm100Stages =
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Sm100Epi::SharedStorage))>;
using Sm100GroupShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;

using FwdMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm100, cutlass::arch::OpClassTensorOp,
    Bf16, cutlass::layout::RowMajor*, 8, Bf16, cutlass::layout::ColumnMajor*, 8, float, Sm100Tile, Sm100Cluster,
    Sm100Stages, cutlass::gemm::KernelPtrArrayTmaWarpSpecialized1SmSm100>::CollectiveOp;
using FwdGemm = cutlass::gemm::device::GemmUniversalAdapter<
    cutlass::gemm::kernel::GemmUniversal<Sm100GroupShape, FwdMainloop, Sm100Epi>>;

using DgradMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm100, cutlass::arch::OpClassTensorOp,
    Bf16, cutlass::layout::RowMajor*, 8, Bf16, cutlass::layout::RowMajor*, 8, float, Sm100Tile, Sm100Cluster,
    Sm100Stages, cutlass::gemm::KernelPtrArrayTmaWarpSpecialized1SmSm100>::CollectiveOp;
using DgradGemm = cutlass::gemm::device::GemmUniversalAdapter<
    cutlass::gemm::kernel::GemmUniversal<Sm100GroupShape, DgradMainloop, Sm100Epi>>;

}  // namespace

int64_t grouped_gemm_sm100_workspace(int64_t E, int kind) {
  return kind == gg_cutlass::kFwd ? gg_cutlass::workspace_bytes<FwdGemm>(E)
                                  : gg_cutlass::workspace_bytes<DgradGemm>(E);
}

void grouped_gemm_sm100_run(const GroupedGemmParams& p, int kind, const void* A, const void* B, void* D,
                            void* workspace, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (kind == gg_cutlass::kFwd) gg_cutlass::run<FwdGemm, gg_cutlass::kFwd>(p, A, B, D, workspace, s);
  else gg_cutlass::run<DgradGemm, gg_cutlass::kDgrad>(p, A, B, D, workspace, s);
}

}  // namespace nk
