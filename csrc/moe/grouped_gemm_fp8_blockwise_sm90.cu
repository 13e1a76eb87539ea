// Hopper (sm_90a) grouped GEMM of FP8 experts with per-block scales (DeepSeek-style: a scale per
// token row and 128-column block, one per 128 x 128 weight block): CUTLASS's pointer-array
// blockwise FP8 mainloop (KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise, example 68;
// each 128-deep k tile's product scaled into the float32 accumulator in the mainloop) and a
// plain or relu^2 epilogue -> bf16. CUTLASS reads the scales M-major per group (row i of group e,
// block kb at kb * m_e + i) and N-major per expert; two small kernels re-lay the op's row-major
// a_scale (R, K / 128) and w_scale (E, N / 128, K / 128) into the workspace first.
#include "cutlass/detail/blockwise_scale_layout.hpp"
#include "moe/grouped_gemm_cutlass.cuh"

namespace nk {
namespace gg_cutlass {
namespace {

constexpr int kBlock = 128;
using ScaleConfig = cutlass::detail::Sm90BlockwiseScaleConfig<1, kBlock, kBlock>;
using LayoutSFA = decltype(ScaleConfig::deduce_layoutSFA());
using LayoutSFB = decltype(ScaleConfig::deduce_layoutSFB());

template <int EPI>
struct BlockwiseGemm {
  using Traits = Sm90Fp8Traits;
  using E4m3 = cutlass::float_e4m3_t;
  using Row = cutlass::layout::RowMajor;
  using Col = cutlass::layout::ColumnMajor;
  using EpiOp = typename cutlass::epilogue::collective::CollectiveBuilder<
      Traits::Arch, cutlass::arch::OpClassTensorOp, Traits::Tile, Traits::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, Row*, 8, cutlass::bfloat16_t, Row*, 8,
      Traits::EpilogueSchedule, typename EpiFusion<EPI, cutlass::bfloat16_t>::Op>::CollectiveOp;
  using MainOp = typename cutlass::gemm::collective::CollectiveBuilder<
      Traits::Arch, cutlass::arch::OpClassTensorOp, E4m3, cute::tuple<Row*, LayoutSFA*>, 16, E4m3,
      cute::tuple<Col*, LayoutSFB*>, 16, float, Traits::Tile, Traits::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename EpiOp::SharedStorage))>,
      cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperativeFP8Blockwise>::CollectiveOp;
  using Problem = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using Gemm =
      cutlass::gemm::device::GemmUniversalAdapter<cutlass::gemm::kernel::GemmUniversal<Problem, MainOp, EpiOp>>;
};

// The scale arrays of one call, after the group arrays in the workspace.
struct ScaleArrays {
  const float** ptr_sfa;
  const float** ptr_sfb;
  LayoutSFA* layout_sfa;
  LayoutSFB* layout_sfb;
  float* sfa;  // (R * KB): group e's block at lo_e * KB, M-major inside
  float* sfb;  // (E * KB * NB): expert e's block N-major

  static int64_t bytes(int64_t R, int64_t N, int64_t K, int64_t E) {
    const int64_t KB = K / kBlock, NB = (N + kBlock - 1) / kBlock;
    return 2 * align256(E * sizeof(void*)) + align256(E * sizeof(LayoutSFA)) + align256(E * sizeof(LayoutSFB)) +
           align256(R * KB * sizeof(float)) + align256(E * KB * NB * sizeof(float));
  }
  static ScaleArrays carve(char* ws, int64_t R, int64_t N, int64_t K, int64_t E) {
    const int64_t KB = K / kBlock, NB = (N + kBlock - 1) / kBlock;
    ScaleArrays s;
    s.ptr_sfa = reinterpret_cast<const float**>(ws);
    ws += align256(E * sizeof(void*));
    s.ptr_sfb = reinterpret_cast<const float**>(ws);
    ws += align256(E * sizeof(void*));
    s.layout_sfa = reinterpret_cast<LayoutSFA*>(ws);
    ws += align256(E * sizeof(LayoutSFA));
    s.layout_sfb = reinterpret_cast<LayoutSFB*>(ws);
    ws += align256(E * sizeof(LayoutSFB));
    s.sfa = reinterpret_cast<float*>(ws);
    ws += align256(R * KB * sizeof(float));
    s.sfb = reinterpret_cast<float*>(ws);
    return s;
  }
};

// One thread per expert: the group arrays (setup_group's forward) and the scale pointers / layouts.
template <class Gemm>
__global__ void blockwise_setup_kernel(Arrays<Gemm> arr, ScaleArrays sc, GroupedGemmFp8Params p) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= p.E) return;
  setup_group<Gemm, kFwd>(arr, p.offsets, e, p.R, p.N, p.K, p.a, p.w, p.out, nullptr);
  int64_t lo, hi;
  segment(p.offsets, e, p.R, lo, hi);
  const int64_t KB = p.K / kBlock, NB = (p.N + kBlock - 1) / kBlock;
  sc.ptr_sfa[e] = sc.sfa + lo * KB;
  sc.ptr_sfb[e] = sc.sfb + e * KB * NB;
  const auto shape = cute::make_shape(static_cast<int>(hi - lo), static_cast<int>(p.N), static_cast<int>(p.K), 1);
  sc.layout_sfa[e] = ScaleConfig::tile_atom_to_shape_SFA(shape);
  sc.layout_sfb[e] = ScaleConfig::tile_atom_to_shape_SFB(shape);
}

// a_scale (R, KB) row-major -> sfa: row r of expert e, block kb at lo_e * KB + kb * m_e + (r - lo_e).
// Rows of no expert are not read by the GEMM and not written here.
__global__ void relayout_sfa_kernel(GroupedGemmFp8Params p, float* sfa) {
  const int64_t KB = p.K / kBlock;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= p.R * KB) return;
  const int64_t r = i / KB, kb = i % KB;
  int64_t lo, hi;
  if (expert_of_row(p.offsets, p.E, p.R, r, lo, hi) < 0) return;
  sfa[lo * KB + kb * (hi - lo) + (r - lo)] = p.a_scale[i];
}

// w_scale (E, NB, KB) -> sfb (E, KB, NB).
__global__ void relayout_sfb_kernel(GroupedGemmFp8Params p, float* sfb) {
  const int64_t KB = p.K / kBlock, NB = (p.N + kBlock - 1) / kBlock;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= p.E * NB * KB) return;
  const int64_t e = i / (NB * KB), nb = (i / KB) % NB, kb = i % KB;
  sfb[(e * KB + kb) * NB + nb] = p.w_scale[i];
}

template <class Gemm>
typename Gemm::Arguments blockwise_args(const Arrays<Gemm>& arr, const ScaleArrays& sc, int64_t E) {
  typename Gemm::Arguments args{cutlass::gemm::GemmUniversalMode::kGrouped,
                                {static_cast<int>(E), arr.shapes, nullptr},
                                {arr.ptr_a, arr.stride_a, arr.ptr_b, arr.stride_b, sc.ptr_sfa, sc.layout_sfa,
                                 sc.ptr_sfb, sc.layout_sfb},
                                {{}, nullptr, arr.stride_d, arr.ptr_d, arr.stride_d},
                                hw_info()};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;
  return args;
}

template <class Gemm>
int64_t blockwise_workspace(int64_t R, int64_t N, int64_t K, int64_t E) {
  Arrays<Gemm> arr{};
  ScaleArrays sc{};
  typename Gemm::Arguments args = blockwise_args<Gemm>(arr, sc, E);
  return Arrays<Gemm>::bytes(E) + ScaleArrays::bytes(R, N, K, E) +
         align256(static_cast<int64_t>(Gemm::get_workspace_size(args)));
}

template <class Gemm>
void blockwise_run(const GroupedGemmFp8Params& p, cudaStream_t stream) {
  char* ws = static_cast<char*>(p.workspace);
  Arrays<Gemm> arr = Arrays<Gemm>::carve(ws, p.E);
  ws += Arrays<Gemm>::bytes(p.E);
  ScaleArrays sc = ScaleArrays::carve(ws, p.R, p.N, p.K, p.E);
  ws += ScaleArrays::bytes(p.R, p.N, p.K, p.E);
  const int64_t KB = p.K / kBlock, NB = (p.N + kBlock - 1) / kBlock;
  relayout_sfa_kernel<<<ceil_div(p.R * KB, 256), 256, 0, stream>>>(p, sc.sfa);
  NK_CUDA_LAUNCH_CHECK();
  relayout_sfb_kernel<<<ceil_div(p.E * NB * KB, 256), 256, 0, stream>>>(p, sc.sfb);
  NK_CUDA_LAUNCH_CHECK();
  blockwise_setup_kernel<Gemm><<<ceil_div(p.E, 128), 128, 0, stream>>>(arr, sc, p);
  NK_CUDA_LAUNCH_CHECK();
  launch<Gemm>(blockwise_args<Gemm>(arr, sc, p.E), ws, stream);
}

using BlockwisePlain = BlockwiseGemm<kPlain>::Gemm;
using BlockwiseRelu2 = BlockwiseGemm<kRelu2>::Gemm;

}  // namespace
}  // namespace gg_cutlass

int64_t grouped_gemm_fp8_blockwise_sm90_workspace(int64_t R, int64_t N, int64_t K, int64_t E) {
  using namespace gg_cutlass;
  return std::max(blockwise_workspace<BlockwisePlain>(R, N, K, E), blockwise_workspace<BlockwiseRelu2>(R, N, K, E));
}

void grouped_gemm_fp8_blockwise_sm90_run(const GroupedGemmFp8Params& p, void* stream) {
  using namespace gg_cutlass;
  auto s = static_cast<cudaStream_t>(stream);
  if (p.act == GgAct::Relu2) blockwise_run<BlockwiseRelu2>(p, s);
  else blockwise_run<BlockwisePlain>(p, s);
}

}  // namespace nk
