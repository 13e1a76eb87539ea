// Blackwell (sm_100a) NVFP4 GEMM: CUTLASS block-scaled tcgen05 GEMM, D = alpha * A @ B^T, for
// nv_float4_t<float_e2m1_t> operands with ue4m3 scale factors per 16 elements of K.
// Details: docs/nvfp4.md, section `csrc/nvfp4/gemm_sm100.cu`.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/detail/sm100_blockscaled_layout.hpp"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

#include "nvfp4/gemm.h"

#if defined(CUTLASS_ARCH_MMA_SM100_SUPPORTED) || defined(NK_HAS_SM100)

namespace nk {
namespace {

using namespace cute;

using ElementA = cutlass::nv_float4_t<cutlass::float_e2m1_t>;
using LayoutA = cutlass::layout::RowMajor;
constexpr int kAlignA = 32;  // elements: 16 bytes
using ElementB = cutlass::nv_float4_t<cutlass::float_e2m1_t>;
using LayoutB = cutlass::layout::ColumnMajor;
constexpr int kAlignB = 32;
using ElementC = void;  // no source tensor: D = alpha * acc
using ElementD = float;
using LayoutD = cutlass::layout::RowMajor;
constexpr int kAlignD = 128 / cutlass::sizeof_bits<ElementD>::value;
using ElementAcc = float;
using MmaTileShape = Shape<_128, _128, _256>;
using ClusterShape = Shape<_1, _1, _1>;

using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm100, cutlass::arch::OpClassBlockScaledTensorOp, MmaTileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, ElementAcc, ElementAcc, ElementC, LayoutD, kAlignD,
    ElementD, LayoutD, kAlignD, cutlass::epilogue::collective::EpilogueScheduleAuto>::CollectiveOp;

using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm100, cutlass::arch::OpClassBlockScaledTensorOp, ElementA, LayoutA, kAlignA, ElementB,
    LayoutB, kAlignB, ElementAcc, MmaTileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::collective::KernelScheduleAuto>::CollectiveOp;

using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, void>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
using SfConfig = typename Mainloop::Sm1xxBlkScaledConfig;

typename Gemm::Arguments make_args(const Nvfp4GemmParams& p, const uint8_t* a_sf, const uint8_t* b_sf,
                                   const float* alpha) {
  const int M = static_cast<int>(p.M), N = static_cast<int>(p.N), K = static_cast<int>(p.K);
  auto stride_a = cutlass::make_cute_packed_stride(typename Kernel::StrideA{}, {M, K, 1});
  auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, {N, K, 1});
  auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, {M, N, 1});
  auto layout_sfa = SfConfig::tile_atom_to_shape_SFA(make_shape(M, N, K, 1));
  auto layout_sfb = SfConfig::tile_atom_to_shape_SFB(make_shape(M, N, K, 1));
  using DataA = typename ElementA::DataType;
  using DataB = typename ElementB::DataType;
  using SfA = typename ElementA::ScaleFactorType;
  using SfB = typename ElementB::ScaleFactorType;
  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {reinterpret_cast<const DataA*>(p.a_data), stride_a, reinterpret_cast<const DataB*>(p.b_data), stride_b,
       reinterpret_cast<const SfA*>(a_sf), layout_sfa, reinterpret_cast<const SfB*>(b_sf), layout_sfb},
      {{}, nullptr, stride_d, static_cast<ElementD*>(p.out), stride_d}};
  auto& fusion = args.epilogue.thread;
  fusion.alpha = 1.0f;
  fusion.alpha_ptr = alpha;
  fusion.beta = 0.0f;
  return args;
}

void check_status(cutlass::Status s, const char* what) {
  if (s != cutlass::Status::kSuccess) {
    throw std::runtime_error(std::string("nemokernels: nvfp4.gemm (sm_100 CUTLASS): ") + what + " failed: " +
                             cutlassGetStatusString(s));
  }
}

}  // namespace

bool nvfp4_gemm_sm100_supported(const Nvfp4GemmParams& p) {
  const bool fits_int = p.M < (int64_t(1) << 31) && p.N < (int64_t(1) << 31) && p.K < (int64_t(1) << 31);
  const bool aligned = reinterpret_cast<uintptr_t>(p.a_data) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(p.b_data) % 16 == 0;
  if (!(fits_int && aligned && p.K >= 32 && p.K % 32 == 0 && p.N % 4 == 0 && p.M > 0 && p.N > 0)) return false;
  // Whatever else the kernel requires (shapes, alignment): ask it, and fall back otherwise.
  return Gemm::can_implement(make_args(p, nullptr, nullptr, nullptr)) == cutlass::Status::kSuccess;
}

int64_t nvfp4_gemm_sm100_workspace_size(const Nvfp4GemmParams& p) {
  auto args = make_args(p, nullptr, nullptr, nullptr);
  return static_cast<int64_t>(Gemm::get_workspace_size(args));
}

void nvfp4_gemm_sm100(const Nvfp4GemmParams& p, const uint8_t* a_sf, const uint8_t* b_sf, float* alpha,
                      void* workspace, void* stream) {
  auto args = make_args(p, a_sf, b_sf, alpha);
  Gemm gemm;
  check_status(gemm.can_implement(args), "can_implement");
  auto s = static_cast<cudaStream_t>(stream);
  check_status(gemm.initialize(args, workspace, s), "initialize");
  check_status(gemm.run(s), "run");
}

}  // namespace nk

#endif
