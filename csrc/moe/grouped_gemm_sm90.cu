// Hopper (sm_90a) grouped GEMM over experts, bf16 with float32 accumulation: forward (TN:
// a @ w[e]^T) and dgrad (NN: g @ w[e]) as CUTLASS 3.x pointer-array grouped GEMMs with the TMA
// warp-specialized cooperative wgmma kernel (128 x 128 x 64 tiles, cluster 1x1x1). Problem
// shapes, pointers and strides are built on the device from expert_offsets
// (grouped_gemm_cutlass.cuh). The relu^2 epilogue and the relu^2 backward run as separate
// elementwise passes in grouped_gemm_cuda.cu (docs/decisions.md: an EVT epilogue would add an
// instantiation to this translation unit). wgrad lives in grouped_gemm_wgrad_sm90.cu (one
// heavy unit each keeps the build's peak memory down). fp16 takes the portable kernel.
#include "moe/grouped_gemm_cutlass.cuh"

#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

namespace nk {
namespace {

using namespace cute;

// Non-template aliases with distinct names: GCC (the host pass) mis-resolves an alias named
// CollectiveEpilogue inside a class template against CUTLASS's own template of that name.
using Bf16 = cutlass::bfloat16_t;
using Sm90Tile = Shape<_128, _128, _64>;
using Sm90Cluster = Shape<_1, _1, _1>;
using Sm90Epi = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Sm90Tile, Sm90Cluster,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float,
    void, cutlass::layout::RowMajor*, 8,
    Bf16, cutlass::layout::RowMajor*, 8,
    cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative,
    cutlass::epilogue::fusion::LinearCombination<Bf16, float, void, float>>::CollectiveOp;
using Sm90Stages = cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Sm90Epi::SharedStorage))>;
using Sm90GroupShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;

using FwdMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    Bf16, cutlass::layout::RowMajor*, 8, Bf16, cutlass::layout::ColumnMajor*, 8, float, Sm90Tile, Sm90Cluster,
    Sm90Stages, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
using FwdGemm = cutlass::gemm::device::GemmUniversalAdapter<
    cutlass::gemm::kernel::GemmUniversal<Sm90GroupShape, FwdMainloop, Sm90Epi>>;

using DgradMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp,
    Bf16, cutlass::layout::RowMajor*, 8, Bf16, cutlass::layout::RowMajor*, 8, float, Sm90Tile, Sm90Cluster,
    Sm90Stages, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>::CollectiveOp;
using DgradGemm = cutlass::gemm::device::GemmUniversalAdapter<
    cutlass::gemm::kernel::GemmUniversal<Sm90GroupShape, DgradMainloop, Sm90Epi>>;

}  // namespace

int64_t grouped_gemm_sm90_workspace(int64_t E, int kind) {
  return kind == gg_cutlass::kFwd ? gg_cutlass::workspace_bytes<FwdGemm>(E)
                                  : gg_cutlass::workspace_bytes<DgradGemm>(E);
}

void grouped_gemm_sm90_run(const GroupedGemmParams& p, int kind, const void* A, const void* B, void* D,
                           void* workspace, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (kind == gg_cutlass::kFwd) gg_cutlass::run<FwdGemm, gg_cutlass::kFwd>(p, A, B, D, workspace, s);
  else gg_cutlass::run<DgradGemm, gg_cutlass::kDgrad>(p, A, B, D, workspace, s);
}

}  // namespace nk
