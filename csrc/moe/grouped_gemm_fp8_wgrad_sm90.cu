// Hopper (sm_90a) wgrad of the FP8 experts (kWgradT of grouped_gemm_cutlass.cuh): per expert,
// dw[e] (N x K) = gT[:, s:s+m] aT[:, s:s+m]^T on the transposed, column-scaled e4m3 operands of
// moe_quantize_fp8_t (K-major both: FP8 wgmma takes TN only; s = start16(lo, e), a multiple of 16
// for TMA), CUTLASS's accurate FP8 mainloop (128 x 128 x 128 tiles) and an EVT epilogue
//   dw = (acc * g_scale[n]) * a_scale[k] -> bf16 or float32, one rounding
// (Sm90ColBroadcast / Sm90RowBroadcast of one vector each, shared by every group). Experts
// without rows run no tile; grouped_gemm_fp8_cuda.cu zeroes their dw first.
#include "moe/grouped_gemm_cutlass.cuh"

namespace nk {
namespace gg_cutlass {
namespace {

template <class ElementD, class Tile>
using Fp8WgradEpilogue = cutlass::epilogue::fusion::Sm90EVT<
    cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, ElementD, float, cutlass::FloatRoundStyle::round_to_nearest>,
    cutlass::epilogue::fusion::Sm90EVT<
        cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, float, float,
                                               cutlass::FloatRoundStyle::round_to_nearest>,
        cutlass::epilogue::fusion::Sm90AccFetch,
        cutlass::epilogue::fusion::Sm90ColBroadcast<0, Tile, float, float, cute::Stride<cute::_1, cute::_0, cute::_0>, 1>>,
    cutlass::epilogue::fusion::Sm90RowBroadcast<0, Tile, float, float, cute::Stride<cute::_0, cute::_1, cute::_0>, 1>>;

template <class Gemm>
typename Gemm::Arguments wgrad_args(const Arrays<Gemm>& arr, int64_t E, const float* g_scale, const float* a_scale) {
  typename Gemm::Arguments args = grouped_args<Gemm>(arr, E);
  // The EVT arguments, children before their node: {{acc, col, mul}, row, mul}.
  auto& t = args.epilogue.thread;
  t.op_0.op_1.ptr_col = g_scale;
  t.op_0.op_1.null_default = 1.f;
  t.op_1.ptr_row = a_scale;
  t.op_1.null_default = 1.f;
  return args;
}

template <class Gemm>
int64_t wgrad_fp8_workspace(int64_t E) {
  Arrays<Gemm> arr{};
  typename Gemm::Arguments args = wgrad_args<Gemm>(arr, E, nullptr, nullptr);
  return Arrays<Gemm>::bytes(E) + align256(static_cast<int64_t>(Gemm::get_workspace_size(args)));
}

template <class Gemm>
void wgrad_fp8_run(const GroupedGemmFp8WgradParams& p, cudaStream_t stream) {
  char* ws = static_cast<char*>(p.workspace);
  Arrays<Gemm> arr = Arrays<Gemm>::carve(ws, p.E);
  Fp8Extras sc{};
  sc.width = p.W;
  setup_groups_kernel<Gemm, kWgradT><<<ceil_div(p.E, 128), 128, 0, stream>>>(arr, p.offsets, p.E, p.R, p.N, p.K, p.gT,
                                                                               p.aT, p.dw, nullptr, sc);
  NK_CUDA_LAUNCH_CHECK();
  launch<Gemm>(wgrad_args<Gemm>(arr, p.E, p.g_scale, p.a_scale), ws + Arrays<Gemm>::bytes(p.E), stream);
}

using WgradBf16 = Fp8GemmOf<Fp8WgradEpilogue<cutlass::bfloat16_t, Sm90Fp8Traits::Tile>, cutlass::bfloat16_t>::Gemm;
using WgradF32 = Fp8GemmOf<Fp8WgradEpilogue<float, Sm90Fp8Traits::Tile>, float>::Gemm;

}  // namespace
}  // namespace gg_cutlass

int64_t grouped_gemm_fp8_wgrad_sm90_workspace(int64_t E) {
  using namespace gg_cutlass;
  return std::max(wgrad_fp8_workspace<WgradBf16>(E), wgrad_fp8_workspace<WgradF32>(E));
}

void grouped_gemm_fp8_wgrad_sm90_run(const GroupedGemmFp8WgradParams& p, void* stream) {
  using namespace gg_cutlass;
  auto s = static_cast<cudaStream_t>(stream);
  if (p.dtype == GgType::BF16) wgrad_fp8_run<WgradBf16>(p, s);
  else wgrad_fp8_run<WgradF32>(p, s);
}

}  // namespace nk
