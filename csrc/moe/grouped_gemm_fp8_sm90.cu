// Hopper (sm_90a) grouped GEMM of the FP8 experts: CUTLASS's pointer-array e4m3 mainloop (TMA,
// cooperative wgmma, 128 x 128 x 128 tiles, float32 accumulation promoted every 4 k-blocks:
// the accurate FP8 mainloop, not FastAccum) and an EVT epilogue
//   D = act((acc * a_scale[row]) * w_scale[e]) -> bf16, one rounding,
// the row scales through Sm90ColBroadcast with one base per group (a_scale + the group's first
// row; rows past the group's M predicated off) and the weight scale through
// Sm90ScalarBroadcastPtrArray (a pointer per group); the training forward also stores the scaled
// accumulator (pre-activation) through AuxStoreRowsPtrArray. Groups are built on the device by
// setup_group (grouped_gemm_cutlass.cuh). Four instantiations: plain, relu^2, relu^2 + pre, and
// relu^2 to e4m3 codes of a static scale (the down projection's input, no quantize pass).
#include "moe/grouped_gemm_cutlass.cuh"

namespace nk {
namespace gg_cutlass {
namespace {

// (acc * row) * group, the scaled accumulator, as an EVT subtree; children first in each node's
// arguments.
template <class Tile>
using Fp8Scaled = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float, cutlass::FloatRoundStyle::round_to_nearest>,
    cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float,
                                               cutlass::FloatRoundStyle::round_to_nearest>,
        cutlass::epilogue::fusion::Sm90AccFetch,
        // Alignment 1: a group's row scales start at any row (a_scale + lo).
        cutlass::epilogue::fusion::Sm90ColBroadcast<0, Tile, float*, float, cute::Stride<cute::_1, cute::_0, cute::_0>, 1>>,
    cutlass::epilogue::fusion::Sm90ScalarBroadcastPtrArray<float>>;
template <template <class> class Act, bool kPre, class Tile>
struct Fp8EpilogueOf {  // act(scaled) -> bf16
  using Op = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<Act, cutlass::bfloat16_t, float, cutlass::FloatRoundStyle::round_to_nearest>,
      Fp8Scaled<Tile>>;
};
template <template <class> class Act, class Tile>
struct Fp8EpilogueOf<Act, true, Tile> {  // act(scaled) -> bf16, and scaled stored beside it (training)
  using Op = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<Act, cutlass::bfloat16_t, float, cutlass::FloatRoundStyle::round_to_nearest>,
      cutlass::epilogue::fusion::Sm90EVT<AuxStoreRowsPtrArray<cutlass::bfloat16_t>, Fp8Scaled<Tile>>>;
};

// relu(scaled)^2 / out_scale -> e4m3 (saturating, round to nearest even): the next FP8 GEMM's rows
// at a static scale, straight from this epilogue.
template <class Tile>
using Fp8E4m3Out = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<cutlass::divides, cutlass::float_e4m3_t, float,
                                           cutlass::FloatRoundStyle::round_to_nearest>,
    cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<ReluSquare, float, float, cutlass::FloatRoundStyle::round_to_nearest>,
        Fp8Scaled<Tile>>,
    cutlass::epilogue::fusion::Sm90ScalarBroadcast<float>>;

template <template <class> class Act, bool kPre = false>
struct Fp8GroupedGemm {
  static constexpr bool kStoresPre = kPre, kE4m3Out = false;
  using Gemm = typename Fp8GemmOf<typename Fp8EpilogueOf<Act, kPre, Sm90Fp8Traits::Tile>::Op>::Gemm;
};
struct Fp8Relu2E4m3 {
  static constexpr bool kStoresPre = false, kE4m3Out = true;
  using Gemm = typename Fp8GemmOf<Fp8E4m3Out<Sm90Fp8Traits::Tile>, cutlass::float_e4m3_t>::Gemm;
};

template <class Gemm, bool kPre, bool kE4m3Out = false>
typename Gemm::Arguments fp8_args(const Arrays<Gemm>& arr, int64_t E, int64_t N, const float* out_scale = nullptr) {
  typename Gemm::Arguments args = grouped_args<Gemm>(arr, E);
  // The EVT arguments, children before their node: {{{acc, row, mul}, group, mul}, act}; with the
  // stored pre-activation {{{{acc, row, mul}, group, mul}, aux}, act}; with e4m3 output
  // {{{{acc, row, mul}, group, mul}, relu^2}, out_scale, div}.
  auto& scaled = [&]() -> auto& {
    if constexpr (kE4m3Out) {
      args.epilogue.thread.op_1.scalar_ptrs[0] = out_scale;
      return args.epilogue.thread.op_0.op_0;
    } else if constexpr (kPre) {
      args.epilogue.thread.op_0.op_1 = {arr.ptr_aux, N};
      return args.epilogue.thread.op_0.op_0;
    } else {
      return args.epilogue.thread.op_0;
    }
  }();
  scaled.op_0.op_1.ptr_col = arr.ptr_row_scale;
  scaled.op_0.op_1.null_default = 1.f;
  scaled.op_1.scalar_ptr_arrays[0] = arr.ptr_group_scale;
  return args;
}

template <class G>
int64_t fp8_workspace(int64_t E) {
  using Gemm = typename G::Gemm;
  Arrays<Gemm> arr{};
  typename Gemm::Arguments args = fp8_args<Gemm, G::kStoresPre, G::kE4m3Out>(arr, E, 0);
  return Arrays<Gemm>::bytes(E) + align256(static_cast<int64_t>(Gemm::get_workspace_size(args)));
}

template <class G>
void fp8_run(const GroupedGemmFp8Params& p, cudaStream_t stream) {
  using Gemm = typename G::Gemm;
  char* ws = static_cast<char*>(p.workspace);
  Arrays<Gemm> arr = Arrays<Gemm>::carve(ws, p.E);
  const Fp8Extras sc{p.a_scale, p.w_scale, p.w_scale_stride, 0};
  setup_groups_kernel<Gemm, kFwd><<<ceil_div(p.E, 128), 128, 0, stream>>>(arr, p.offsets, p.E, p.R, p.N, p.K, p.a,
                                                                            p.w, p.out, p.pre, sc);
  NK_CUDA_LAUNCH_CHECK();
  launch<Gemm>(fp8_args<Gemm, G::kStoresPre, G::kE4m3Out>(arr, p.E, p.N, p.out_scale), ws + Arrays<Gemm>::bytes(p.E),
               stream);
}

using Fp8Plain = Fp8GroupedGemm<cutlass::epilogue::thread::Identity>;
using Fp8Relu2 = Fp8GroupedGemm<ReluSquare>;
using Fp8Relu2Pre = Fp8GroupedGemm<ReluSquare, true>;

}  // namespace
}  // namespace gg_cutlass

int64_t grouped_gemm_fp8_sm90_workspace(int64_t E) {
  using namespace gg_cutlass;
  return std::max({fp8_workspace<Fp8Plain>(E), fp8_workspace<Fp8Relu2>(E), fp8_workspace<Fp8Relu2Pre>(E),
                   fp8_workspace<Fp8Relu2E4m3>(E)});
}

void grouped_gemm_fp8_sm90_run(const GroupedGemmFp8Params& p, void* stream) {
  using namespace gg_cutlass;
  auto s = static_cast<cudaStream_t>(stream);
  if (p.dtype == GgType::E4M3) fp8_run<Fp8Relu2E4m3>(p, s);  // relu^2 only (the path choice)
  else if (p.act == GgAct::Relu2 && p.pre != nullptr) fp8_run<Fp8Relu2Pre>(p, s);
  else if (p.act == GgAct::Relu2) fp8_run<Fp8Relu2>(p, s);
  else fp8_run<Fp8Plain>(p, s);
}

}  // namespace nk
