// Hopper (sm_90a) grouped GEMM of the FP8 experts: CUTLASS's pointer-array e4m3 mainloop (TMA,
// cooperative wgmma, 128 x 128 x 128 tiles, float32 accumulation promoted every 4 k-blocks:
// the accurate FP8 mainloop, not FastAccum) and an EVT epilogue
//   D = act((acc * a_scale[row]) * w_scale[e]) -> bf16, one rounding,
// the row scales through Sm90ColBroadcast with one base per group (a_scale + the group's first
// row; rows past the group's M predicated off) and the weight scale through
// Sm90ScalarBroadcastPtrArray (a pointer per group). Groups are built on the device by
// setup_group (grouped_gemm_cutlass.cuh). Its own unit: one heavy instantiation per activation.
#include "moe/grouped_gemm_cutlass.cuh"

namespace nk {
namespace gg_cutlass {
namespace {

struct Sm90Fp8Traits {
  using Arch = cutlass::arch::Sm90;
  using Tile = cute::Shape<cute::_128, cute::_128, cute::_128>;
  using Cluster = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};

// act((acc * row) * group) as an EVT tree; children first in each node's arguments.
template <template <class> class Act, class Tile>
using Fp8Epilogue = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<Act, cutlass::bfloat16_t, float, cutlass::FloatRoundStyle::round_to_nearest>,
    cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float,
                                               cutlass::FloatRoundStyle::round_to_nearest>,
        cutlass::epilogue::fusion::Sm90EVT<
            cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float,
                                                   cutlass::FloatRoundStyle::round_to_nearest>,
            cutlass::epilogue::fusion::Sm90AccFetch,
            // Alignment 1: a group's row scales start at any row (a_scale + lo).
            cutlass::epilogue::fusion::Sm90ColBroadcast<0, Tile, float*, float, cute::Stride<cute::_1, cute::_0, cute::_0>,
                                                        1>>,
        cutlass::epilogue::fusion::Sm90ScalarBroadcastPtrArray<float>>>;

template <template <class> class Act>
struct Fp8GroupedGemm {
  using Traits = Sm90Fp8Traits;
  using E4m3 = cutlass::float_e4m3_t;
  using Row = cutlass::layout::RowMajor;
  using Col = cutlass::layout::ColumnMajor;
  using EpiOp = typename cutlass::epilogue::collective::CollectiveBuilder<
      Traits::Arch, cutlass::arch::OpClassTensorOp, Traits::Tile, Traits::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, Row*, 8, cutlass::bfloat16_t, Row*, 8,
      Traits::EpilogueSchedule, Fp8Epilogue<Act, Traits::Tile>>::CollectiveOp;
  using MainOp = typename cutlass::gemm::collective::CollectiveBuilder<
      Traits::Arch, cutlass::arch::OpClassTensorOp, E4m3, Row*, 16, E4m3, Col*, 16, float, Traits::Tile,
      Traits::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename EpiOp::SharedStorage))>,
      Traits::KernelSchedule>::CollectiveOp;
  using Problem = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using Gemm =
      cutlass::gemm::device::GemmUniversalAdapter<cutlass::gemm::kernel::GemmUniversal<Problem, MainOp, EpiOp>>;
};

template <class Gemm>
typename Gemm::Arguments fp8_args(const Arrays<Gemm>& arr, int64_t E) {
  typename Gemm::Arguments args = grouped_args<Gemm>(arr, E);
  // The EVT arguments, children before their node: {{{acc, row, mul}, group, mul}, act}.
  auto& t = args.epilogue.thread;
  t.op_0.op_0.op_1.ptr_col = arr.ptr_row_scale;
  t.op_0.op_0.op_1.null_default = 1.f;
  t.op_0.op_1.scalar_ptr_arrays[0] = arr.ptr_group_scale;
  return args;
}

template <class Gemm>
int64_t fp8_workspace(int64_t E) {
  Arrays<Gemm> arr{};
  typename Gemm::Arguments args = fp8_args<Gemm>(arr, E);
  return Arrays<Gemm>::bytes(E) + align256(static_cast<int64_t>(Gemm::get_workspace_size(args)));
}

template <class Gemm>
void fp8_run(const GroupedGemmFp8Params& p, cudaStream_t stream) {
  char* ws = static_cast<char*>(p.workspace);
  Arrays<Gemm> arr = Arrays<Gemm>::carve(ws, p.E);
  const GroupScales sc{p.a_scale, p.w_scale, p.w_scale_stride};
  setup_groups_kernel<Gemm, kFwd><<<ceil_div(p.E, 128), 128, 0, stream>>>(arr, p.offsets, p.E, p.R, p.N, p.K, p.a,
                                                                            p.w, p.out, nullptr, sc);
  NK_CUDA_LAUNCH_CHECK();
  launch<Gemm>(fp8_args<Gemm>(arr, p.E), ws + Arrays<Gemm>::bytes(p.E), stream);
}

using Fp8Plain = Fp8GroupedGemm<cutlass::epilogue::thread::Identity>::Gemm;
using Fp8Relu2 = Fp8GroupedGemm<ReluSquare>::Gemm;

}  // namespace
}  // namespace gg_cutlass

int64_t grouped_gemm_fp8_sm90_workspace(int64_t E) {
  return std::max(gg_cutlass::fp8_workspace<gg_cutlass::Fp8Plain>(E), gg_cutlass::fp8_workspace<gg_cutlass::Fp8Relu2>(E));
}

void grouped_gemm_fp8_sm90_run(const GroupedGemmFp8Params& p, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (p.act == GgAct::Relu2) gg_cutlass::fp8_run<gg_cutlass::Fp8Relu2>(p, s);
  else gg_cutlass::fp8_run<gg_cutlass::Fp8Plain>(p, s);
}

}  // namespace nk
