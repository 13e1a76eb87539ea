// Blackwell (sm_100a) grouped GEMM over experts, weight gradient, bf16 with float32 accumulation:
// dw[e] (N x K) = g[seg_e]^T (N x m_e, a column-major view of g) @ a[seg_e] (m_e x K), one
// CUTLASS 3.x pointer-array grouped GEMM (tcgen05 1-SM kernel,
// 128 x 128 x 64 tiles) whose reduction length is the expert's row count, with no split-K:
// deterministic. Experts without rows get M = 0 (no tiles); grouped_gemm_cuda.cu zeroes their
// dw. Problem shapes, pointers and strides are built on the device (grouped_gemm_cutlass.cuh).
// Its own translation unit: one heavy CUTLASS instantiation per unit. COMPILE-VERIFIED ONLY:
// no sm_100 GPU was available (docs/known-issues.md).
#include "moe/grouped_gemm_cutlass.cuh"

#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"

namespace nk {
namespace {

using namespace cute;

using Bf16 = cutlass::bfloat16_t;
using WgTile = Shape<_128, _128, _64>;
using WgCluster = Shape<_1, _1, _1>;
using WgEpi = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm100, cutlass::arch::OpClassTensorOp, WgTile, WgCluster,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float,
    void, cutlass::layout::RowMajor*, 8,
    Bf16, cutlass::layout::RowMajor*, 8,
    cutlass::epilogue::PtrArrayTmaWarpSpecialized1Sm,
    cutlass::epilogue::fusion::LinearCombination<Bf16, float, void, float>>::CollectiveOp;
using WgMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm100, cutlass::arch::OpClassTensorOp,
    Bf16, cutlass::layout::ColumnMajor*, 8, Bf16, cutlass::layout::RowMajor*, 8, float, WgTile, WgCluster,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename WgEpi::SharedStorage))>,
    cutlass::gemm::KernelPtrArrayTmaWarpSpecialized1SmSm100>::CollectiveOp;
using WgradGemm = cutlass::gemm::device::GemmUniversalAdapter<
    cutlass::gemm::kernel::GemmUniversal<cutlass::gemm::GroupProblemShape<Shape<int, int, int>>, WgMainloop, WgEpi>>;

}  // namespace

int64_t grouped_gemm_wgrad_sm100_workspace(int64_t E) { return gg_cutlass::workspace_bytes<WgradGemm>(E); }

void grouped_gemm_wgrad_sm100_run(const GroupedGemmParams& p, const void* G, const void* A, void* D,
                                 void* workspace, void* stream) {
  gg_cutlass::run<WgradGemm, gg_cutlass::kWgrad>(p, G, A, D, workspace, static_cast<cudaStream_t>(stream));
}

}  // namespace nk
