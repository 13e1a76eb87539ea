// The CUTLASS 3.x pointer-array grouped GEMM shared by the per-arch units (*_sm90.cu: wgmma/TMA,
// *_sm100.cu: tcgen05): one traits struct per arch (Sm90Traits / Sm100Traits) and one template
// GroupedGemm<Traits, KIND, EPI> (EPI: plain D = acc, relu(acc)^2, or relu(acc)^2 with acc stored beside it). Per-expert shapes, pointers and strides are built ON THE DEVICE from
// expert_offsets (host problem shapes are null) in one torch-allocated workspace, all on the
// caller's stream (no host wait, graph-capturable). Per expert e, rows [lo, hi), m = hi - lo:
//   fwd   (TN): D[lo:hi] (m x N)  = A[lo:hi] (m x K, row-major) * w[e]^T (w[e] N x K row-major)
//   dgrad (NN): D[lo:hi] (m x K)  = G[lo:hi] (m x N, row-major) * w[e]   (N x K row-major)
//   wgrad (NT): D[e]     (N x K)  = G[lo:hi]^T (N x m: column-major A) * a[lo:hi] (m x K row-major)
//   fwd swapped (kFwdSwap, few rows per expert): D[lo:hi]^T (N x m, column-major D, ld N)
//               = w[e] (N x K row-major, the M side) * A[lo:hi]^T (tokens: the narrow N side)
//   FP8 wgrad (kWgradT, TN): D[e] (N x K) = gT[:, s:s+m] (N x m, ld W) * aT[:, s:s+m]^T (K x m, ld W),
//               s = start16(lo, e): the transposed operands of moe_quantize_fp8_t
// A group with nothing to do gets M = 0 (no tiles). One heavy instantiation per unit (build memory).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cuda_utils.cuh"
#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/util/packed_stride.hpp"
#include "moe/grouped_gemm.h"
#include "moe/segments.cuh"

#define NK_CHECK_CUTLASS(status, what)                                                            \
  do {                                                                                            \
    if ((status) != cutlass::Status::kSuccess) {                                                  \
      throw std::runtime_error(std::string("nemokernels: grouped_gemm: CUTLASS ") + (what) + ": " + \
                               cutlassGetStatusString(status));                                   \
    }                                                                                             \
  } while (0)

namespace nk {
namespace gg_cutlass {

enum Kind : int { kFwd = 0, kDgrad = 1, kWgrad = 2, kFwdSwap = 3, kWgradT = 4 };

// The epilogue's activation: relu(v)^2 of the float32 accumulator, rounded to bf16 once (the CPU
// and portable kernels' order). Applied by CUTLASS to a fragment (Array) or to one value.
template <class T>
struct ReluSquare {
  static const bool kIsHeavy = false;
  CUTLASS_HOST_DEVICE T operator()(T const& v) const { return (v > T(0) || v != v) ? v * v : T(0); }
};
template <class T, int N>
struct ReluSquare<cutlass::Array<T, N>> {
  static const bool kIsHeavy = false;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& frag) const {
    cutlass::Array<T, N> out;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) out[i] = (frag[i] > T(0) || frag[i] != frag[i]) ? frag[i] * frag[i] : T(0);
    return out;
  }
};

// The pre-activation stored beside D by the training forward's epilogue: CUTLASS's register-store
// auxiliary visitor (Sm90AuxStore with 0 stages: predicated stores from the accumulator
// fragments, no shared memory, no TMA descriptor) with one base pointer per group. CUTLASS's own
// takes one pointer and an L stride, which a grouped GEMM with per-expert row offsets cannot use.
// The tile's group is the l of its coordinate; inside the group the tile is (m, n) of an M x N
// row-major matrix with row stride ld, so rows past the group's M are never written.
template <class Element>
struct AuxStoreRowsPtrArray {
  using ElementAux = Element;
  struct SharedStorage {};
  struct Arguments {
    Element* const* ptr_aux = nullptr;  // (groups,) device array of row-major bases
    int64_t ld = 0;                     // row stride in elements
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args, void*) {
    return args;
  }
  // Not called for this GEMM: the collective checks its fusion only with host problem shapes,
  // which the device-built groups do not have. run() checks the base on the host instead.
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const&) {
    return true;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*, cudaStream_t,
                                              cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_HOST_DEVICE AuxStoreRowsPtrArray() {}
  CUTLASS_HOST_DEVICE AuxStoreRowsPtrArray(Params const& params, SharedStorage const&) : params_ptr(&params) {}
  Params const* params_ptr = nullptr;

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }
  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(cutlass::epilogue::fusion::detail::ProducerLoadArgs<Args...> const&) {
    return cutlass::epilogue::fusion::detail::EmptyProducerLoadCallbacks{};
  }

  template <class GTensor, class RTensor, class CTensor, class ShapeMN>
  struct ConsumerStoreCallbacks : cutlass::epilogue::fusion::detail::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(GTensor&& g, RTensor&& r, CTensor&& c, ShapeMN shape_mn)
        : tC_gAux(cute::forward<GTensor>(g)), tC_rAux(cute::forward<RTensor>(r)),
          tC_cAux(cute::forward<CTensor>(c)), shape_mn(shape_mn) {}
    GTensor tC_gAux;  // (CPY,CPY_M,CPY_N,EPI_M,EPI_N) of the group's matrix
    RTensor tC_rAux;  // (CPY,CPY_M,CPY_N) of one epilogue subtile
    CTensor tC_cAux;  // coordinates of tC_gAux, for the row / column predicate
    ShapeMN shape_mn;

    // Keeps the child's value (the float32 accumulator) rounded to Element; passes it on unchanged.
    template <typename ElementAccumulator, typename ElementInput, int FragmentSize>
    CUTLASS_DEVICE auto visit(cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int, int,
                              cutlass::Array<ElementInput, FragmentSize> const& frg_input) {
      using Convert = cutlass::NumericArrayConverter<Element, ElementInput, FragmentSize,
                                                     cutlass::FloatRoundStyle::round_to_nearest>;
      cute::Tensor frg = cute::recast<cutlass::Array<Element, FragmentSize>>(cute::coalesce(tC_rAux));
      frg(epi_v) = Convert{}(frg_input);
      return frg_input;
    }

    // After each epilogue subtile: the subtile's values to global memory, inside the group only.
    CUTLASS_DEVICE void end_loop(int epi_m, int epi_n) {
      using namespace cute;
      constexpr auto MCL = decltype(max_common_layout(tC_gAux(_, _, _, _0{}, _0{}), tC_rAux)){};
      constexpr int V = cute::min(16 / static_cast<int>(sizeof(Element)), size(MCL));
      Tensor g_vec = recast<cutlass::Array<Element, V>>(coalesce(tC_gAux(_, _, _, epi_m, epi_n)));
      Tensor r_vec = recast<cutlass::Array<Element, V>>(coalesce(tC_rAux));
      Tensor c_vec = tensor<1>(zipped_divide(coalesce(tC_cAux(_, _, _, epi_m, epi_n)), MCL.compose(Int<V>{})));
      Tensor p_vec = cute::lazy::transform(c_vec, [&](auto const& c) { return elem_less(c, shape_mn); });
      copy_if(p_vec, r_vec, g_vec);
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(
      cutlass::epilogue::fusion::detail::ConsumerStoreArgs<Args...> const& args) {
    using namespace cute;
    auto [M, N, K, L] = args.problem_shape_mnkl;  // the group's shape (L = 1)
    auto [m, n, k, l] = args.tile_coord_mnkl;     // l: the group
    auto shape_mn = make_shape(M, N);
    Tensor mAux = make_tensor(make_gmem_ptr(params_ptr->ptr_aux[l]), shape_mn, make_stride(params_ptr->ld, _1{}));
    auto tile_mn = take<0, 2>(args.tile_shape_mnk);
    Tensor tC_gAux = cutlass::epilogue::fusion::sm90_partition_for_epilogue<ReferenceSrc>(
        local_tile(mAux, tile_mn, make_coord(m, n)), args.epi_tile, args.tiled_copy, args.thread_idx);
    Tensor tC_rAux = make_tensor<Element>(take<0, 3>(shape(tC_gAux)));
    Tensor tC_cAux = cutlass::epilogue::fusion::sm90_partition_for_epilogue<ReferenceSrc>(
        local_tile(make_identity_tensor(shape_mn), tile_mn, make_coord(m, n)), args.epi_tile, args.tiled_copy,
        args.thread_idx);
    return ConsumerStoreCallbacks<decltype(tC_gAux), decltype(tC_rAux), decltype(tC_cAux), decltype(shape_mn)>(
        cute::move(tC_gAux), cute::move(tC_rAux), cute::move(tC_cAux), shape_mn);
  }
};

// The epilogue of a GEMM, rounded once to ElementD:
// - kPlain: D = alpha * acc; alpha is 1 unless GroupedGemmParams::alpha points at a device float
//   (nvfp4.gemm's global scales);
// - kRelu2: D = relu(acc)^2 (the forward without a saved pre-activation: no relu^2 pass);
// - kRelu2Pre: D = relu(acc)^2 and the pre-activation acc stored beside it (the training forward:
//   one epilogue writes both; no relu^2 pass reading the pre-activation back).
enum Epi : int { kPlain = 0, kRelu2 = 1, kRelu2Pre = 2 };
template <int EPI, class ElementD>
struct EpiFusion {
  using Op = cutlass::epilogue::fusion::LinearCombination<ElementD, float, void, float>;
};
template <class ElementD>
struct EpiFusion<kRelu2, ElementD> {
  using Op = cutlass::epilogue::fusion::LinCombEltAct<ReluSquare, ElementD, float, void, float>;
};
template <class ElementD>
struct EpiFusion<kRelu2Pre, ElementD> {  // an EVT tree, passed to the builder as the callbacks
  using Op = cutlass::epilogue::fusion::Sm90EVT<
      cutlass::epilogue::fusion::Sm90Compute<ReluSquare, ElementD, float, cutlass::FloatRoundStyle::round_to_nearest>,
      cutlass::epilogue::fusion::Sm90EVT<AuxStoreRowsPtrArray<ElementD>, cutlass::epilogue::fusion::Sm90AccFetch>>;
};

// Per-arch choices (the pattern of CUTLASS example 75's MMA1SMConfig): bf16 in and out, float
// accumulation, 128 x 128 x 64 tiles, a static 1x1x1 cluster on both archs.
struct Sm90Traits {  // TMA warp-specialized cooperative wgmma
  using Arch = cutlass::arch::Sm90;
  using Tile = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using Cluster = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};
// 64-row tiles for experts with few rows (NEMOKERNELS_GROUPED_GEMM_TILE=64, forward only): one
// consumer warpgroup per 64 x 128 tile, the two warpgroups alternating (one's epilogue under the
// other's mainloop). An expert with 176 rows runs 3 tiles (192 rows) instead of 2 (256).
struct Sm90M64Traits {
  using Arch = cutlass::arch::Sm90;
  using Tile = cute::Shape<cute::_64, cute::_128, cute::_64>;
  using Cluster = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong;
};
// Swapped operands for experts with few rows (NEMOKERNELS_GROUPED_GEMM_SWAP_AB=1, forward only):
// the expert's weight rows are the 128-row M side and its tokens the 32-wide N side, so an
// expert with 3 rows runs 128 x 32 tiles instead of 128 x 128 (a quarter of the MMA work for
// the same weight bytes: at decode sizes the GEMM is a weight read).
struct Sm90SwapTraits {
  using Arch = cutlass::arch::Sm90;
  using Tile = cute::Shape<cute::_128, cute::_32, cute::_64>;
  using Cluster = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};
struct Sm100Traits {  // tcgen05 1-SM MMA, accumulators in tensor memory
  using Arch = cutlass::arch::Sm100;
  using Tile = cute::Shape<cute::_128, cute::_128, cute::_64>;
  using Cluster = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecialized1SmSm100;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecialized1Sm;
};

// A / B / D layouts of a kind: fwd TN, dgrad NN, wgrad NT (A column-major), D row-major; the
// swapped forward is TN with a column-major D (D^T of the row-major output).
template <int KIND>
struct KindLayouts {
  using A = cutlass::layout::RowMajor;
  using B = cutlass::layout::RowMajor;
  using D = cutlass::layout::RowMajor;
};
template <>
struct KindLayouts<kFwd> {
  using A = cutlass::layout::RowMajor;
  using B = cutlass::layout::ColumnMajor;
  using D = cutlass::layout::RowMajor;
};
template <>
struct KindLayouts<kWgradT> {  // both operands K-major (FP8 wgmma takes TN only)
  using A = cutlass::layout::RowMajor;
  using B = cutlass::layout::ColumnMajor;
  using D = cutlass::layout::RowMajor;
};
template <>
struct KindLayouts<kWgrad> {
  using A = cutlass::layout::ColumnMajor;
  using B = cutlass::layout::RowMajor;
  using D = cutlass::layout::RowMajor;
};
template <>
struct KindLayouts<kFwdSwap> {
  using A = cutlass::layout::RowMajor;
  using B = cutlass::layout::ColumnMajor;
  using D = cutlass::layout::ColumnMajor;
};

// The CUTLASS device GEMM of one arch and kind. The member names avoid CollectiveEpilogue /
// CollectiveMainloop: GCC (the host pass) mis-resolves such an alias inside a class template
// against CUTLASS's own templates of those names.
// ElementD: bf16 (every MoE GEMM) or float (nvfp4.gemm's sm_90 path when a bias or a non-bf16
// output follows); D rows are 16-byte aligned either way (TMA).
template <class Traits, int KIND, int EPI = kPlain, class ElementD = cutlass::bfloat16_t>
struct GroupedGemm {
  using Bf16 = cutlass::bfloat16_t;
  static constexpr int kAlignD = 16 / static_cast<int>(sizeof(ElementD));
  using EpiOp = typename cutlass::epilogue::collective::CollectiveBuilder<
      typename Traits::Arch, cutlass::arch::OpClassTensorOp, typename Traits::Tile, typename Traits::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, typename KindLayouts<KIND>::D*, kAlignD,
      ElementD, typename KindLayouts<KIND>::D*, kAlignD, typename Traits::EpilogueSchedule,
      typename EpiFusion<EPI, ElementD>::Op>::CollectiveOp;
  using MainOp = typename cutlass::gemm::collective::CollectiveBuilder<
      typename Traits::Arch, cutlass::arch::OpClassTensorOp, Bf16, typename KindLayouts<KIND>::A*, 8, Bf16,
      typename KindLayouts<KIND>::B*, 8, float, typename Traits::Tile, typename Traits::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename EpiOp::SharedStorage))>,
      typename Traits::KernelSchedule>::CollectiveOp;
  using Problem = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using Gemm =
      cutlass::gemm::device::GemmUniversalAdapter<cutlass::gemm::kernel::GemmUniversal<Problem, MainOp, EpiOp>>;
};

// FP8 (e4m3) operands, both K-major (FP8 wgmma takes TN only), float accumulation in CUTLASS's
// accurate FP8 mainloop (promoted every 4 k-blocks; not FastAccum), 128 x 128 x 128 tiles, the
// epilogue an EVT (EpiOp) writing ElementD: the FP8 forward (grouped_gemm_fp8_sm90.cu) and wgrad
// (grouped_gemm_fp8_wgrad_sm90.cu).
struct Sm90Fp8Traits {
  using Arch = cutlass::arch::Sm90;
  using Tile = cute::Shape<cute::_128, cute::_128, cute::_128>;
  using Cluster = cute::Shape<cute::_1, cute::_1, cute::_1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;
};
template <class EpiFusionOp, class ElementD = cutlass::bfloat16_t, class Traits = Sm90Fp8Traits>
struct Fp8GemmOf {
  using E4m3 = cutlass::float_e4m3_t;
  using Row = cutlass::layout::RowMajor;
  using Col = cutlass::layout::ColumnMajor;
  static constexpr int kAlignD = 16 / static_cast<int>(sizeof(ElementD));
  using EpiOp = typename cutlass::epilogue::collective::CollectiveBuilder<
      typename Traits::Arch, cutlass::arch::OpClassTensorOp, typename Traits::Tile, typename Traits::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, Row*, kAlignD, ElementD, Row*, kAlignD,
      typename Traits::EpilogueSchedule, EpiFusionOp>::CollectiveOp;
  using MainOp = typename cutlass::gemm::collective::CollectiveBuilder<
      typename Traits::Arch, cutlass::arch::OpClassTensorOp, E4m3, Row*, 16, E4m3, Col*, 16, float,
      typename Traits::Tile, typename Traits::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename EpiOp::SharedStorage))>,
      typename Traits::KernelSchedule>::CollectiveOp;
  using Problem = cutlass::gemm::GroupProblemShape<cute::Shape<int, int, int>>;
  using Gemm =
      cutlass::gemm::device::GemmUniversalAdapter<cutlass::gemm::kernel::GemmUniversal<Problem, MainOp, EpiOp>>;
};

inline int64_t align256(int64_t n) { return (n + 255) / 256 * 256; }

// Device arrays of one call, carved from the workspace in this order.
template <class Gemm>
struct Arrays {
  using ProblemShape = typename Gemm::GemmKernel::ProblemShape;
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;
  using StrideA = typename Gemm::GemmKernel::InternalStrideA;
  using StrideB = typename Gemm::GemmKernel::InternalStrideB;
  using StrideD = typename Gemm::GemmKernel::InternalStrideD;
  using EA = typename Gemm::GemmKernel::ElementA;
  using EB = typename Gemm::GemmKernel::ElementB;
  using ED = typename Gemm::GemmKernel::ElementD;

  Shape3* shapes;
  const EA** ptr_a;
  const EB** ptr_b;
  ED** ptr_d;
  ED** ptr_aux;  // the pre-activation's base per group (kRelu2Pre), else unused
  const float** ptr_row_scale;    // FP8: the group's first row scale (a_scale + lo), else unused
  const float** ptr_group_scale;  // FP8: the group's weight scale, else unused
  StrideA* stride_a;
  StrideB* stride_b;
  StrideD* stride_d;

  static int64_t bytes(int64_t E) {
    return align256(E * sizeof(Shape3)) + 6 * align256(E * sizeof(void*)) + align256(E * sizeof(StrideA)) +
           align256(E * sizeof(StrideB)) + align256(E * sizeof(StrideD));
  }
  static Arrays carve(char* ws, int64_t E) {
    Arrays r;
    r.shapes = reinterpret_cast<Shape3*>(ws);
    ws += align256(E * sizeof(Shape3));
    r.ptr_a = reinterpret_cast<const EA**>(ws);
    ws += align256(E * sizeof(void*));
    r.ptr_b = reinterpret_cast<const EB**>(ws);
    ws += align256(E * sizeof(void*));
    r.ptr_d = reinterpret_cast<ED**>(ws);
    ws += align256(E * sizeof(void*));
    r.ptr_aux = reinterpret_cast<ED**>(ws);
    ws += align256(E * sizeof(void*));
    r.ptr_row_scale = reinterpret_cast<const float**>(ws);
    ws += align256(E * sizeof(void*));
    r.ptr_group_scale = reinterpret_cast<const float**>(ws);
    ws += align256(E * sizeof(void*));
    r.stride_a = reinterpret_cast<StrideA*>(ws);
    ws += align256(E * sizeof(StrideA));
    r.stride_b = reinterpret_cast<StrideB*>(ws);
    ws += align256(E * sizeof(StrideB));
    r.stride_d = reinterpret_cast<StrideD*>(ws);
    return r;
  }
};

// What the FP8 kinds add: the forward's scales, row[r] per A row (the group's base is row + lo)
// and group[e * stride] per expert (null for the 16-bit GEMMs); kWgradT's operand width W
// (moe_quantize_fp8_t's padded16_width).
struct Fp8Extras {
  const float* row = nullptr;
  const float* group = nullptr;
  int64_t group_stride = 0;
  int64_t width = 0;
};

// One thread per expert: shape, pointers and strides of its GEMM. A / B / D are the operand
// bases of the kind (see the file comment); Aux, when not null, is a forward's second (R x N)
// output at D's offsets; sc, for the FP8 forward, the scales. Offsets are clamped like the
// portable kernels'.
// One expert's entries (host and device: tests/moe/grouped_gemm_setup_check.cu runs it on the
// host and evaluates the GEMMs these shapes, pointers and strides describe).
template <class Gemm, int KIND>
CUTLASS_HOST_DEVICE void setup_group(const Arrays<Gemm>& arr, const int32_t* off, int64_t e, int64_t R, int64_t N,
                                     int64_t K, const void* A, const void* B, void* D, void* Aux,
                                     Fp8Extras sc = {}) {
  using AR = Arrays<Gemm>;
  int64_t lo, hi;
  segment(off, e, R, lo, hi);
  const int m = static_cast<int>(hi - lo);
  const auto* a = static_cast<const typename AR::EA*>(A);
  const auto* b = static_cast<const typename AR::EB*>(B);
  auto* d = static_cast<typename AR::ED*>(D);
  int gm, gn, gk;
  if (KIND == kFwd) {
    gm = m, gn = static_cast<int>(N), gk = static_cast<int>(K);
    arr.ptr_a[e] = a + lo * K;
    arr.ptr_b[e] = b + e * N * K;
    arr.ptr_d[e] = d + lo * N;
    if (Aux != nullptr) arr.ptr_aux[e] = static_cast<typename AR::ED*>(Aux) + lo * N;
    if (sc.row != nullptr) arr.ptr_row_scale[e] = sc.row + lo;
    if (sc.group != nullptr) arr.ptr_group_scale[e] = sc.group + e * sc.group_stride;
  } else if (KIND == kFwdSwap) {
    gm = m > 0 ? static_cast<int>(N) : 0, gn = m, gk = static_cast<int>(K);  // empty: no tiles
    arr.ptr_a[e] = reinterpret_cast<const typename AR::EA*>(b) + e * N * K;
    arr.ptr_b[e] = reinterpret_cast<const typename AR::EB*>(a) + lo * K;
    arr.ptr_d[e] = d + lo * N;
  } else if (KIND == kDgrad) {
    gm = m, gn = static_cast<int>(K), gk = static_cast<int>(N);
    arr.ptr_a[e] = a + lo * N;
    arr.ptr_b[e] = b + e * N * K;
    arr.ptr_d[e] = d + lo * K;
  } else if (KIND == kWgradT) {  // A = gT (N x W), B = aT (K x W), the expert's columns from start16
    gm = m > 0 ? static_cast<int>(N) : 0, gn = static_cast<int>(K), gk = m;  // empty: no tiles
    const int64_t s = start16(lo, e);
    arr.ptr_a[e] = a + s;
    arr.ptr_b[e] = b + s;
    arr.ptr_d[e] = d + e * N * K;
  } else {
    gm = m > 0 ? static_cast<int>(N) : 0, gn = static_cast<int>(K), gk = m;  // empty: no tiles
    arr.ptr_a[e] = a + lo * N;
    arr.ptr_b[e] = b + lo * K;
    arr.ptr_d[e] = d + e * N * K;
  }
  arr.shapes[e] = cute::make_shape(gm, gn, gk);
  if (KIND == kWgradT) {  // row-major operands of width W
    const int w = static_cast<int>(sc.width);
    arr.stride_a[e] = cutlass::make_cute_packed_stride(typename AR::StrideA{}, cute::make_shape(static_cast<int>(N), w, 1));
    arr.stride_b[e] = cutlass::make_cute_packed_stride(typename AR::StrideB{}, cute::make_shape(static_cast<int>(K), w, 1));
    arr.stride_d[e] = cutlass::make_cute_packed_stride(typename AR::StrideD{},
                                                       cute::make_shape(static_cast<int>(N), static_cast<int>(K), 1));
    return;
  }
  // Strides from the full extents (an empty wgrad or swapped group has gm = 0; its strides stay
  // those of the full operands).
  const int sm = KIND == kWgrad || KIND == kFwdSwap ? static_cast<int>(N) : gm;
  arr.stride_a[e] = cutlass::make_cute_packed_stride(typename AR::StrideA{}, cute::make_shape(sm, gk, 1));
  arr.stride_b[e] = cutlass::make_cute_packed_stride(typename AR::StrideB{}, cute::make_shape(gn, gk, 1));
  arr.stride_d[e] = cutlass::make_cute_packed_stride(typename AR::StrideD{}, cute::make_shape(sm, gn, 1));
}

template <class Gemm, int KIND>
__global__ void setup_groups_kernel(Arrays<Gemm> arr, const int32_t* off, int64_t E, int64_t R, int64_t N,
                                    int64_t K, const void* A, const void* B, void* D, void* Aux,
                                    Fp8Extras sc = {}) {
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e < E) setup_group<Gemm, KIND>(arr, off, e, R, N, K, A, B, D, Aux, sc);
}

inline int sm_count(int device) {
  static int cached[64] = {};
  if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  if (cached[device] == 0) cached[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  return cached[device];
}

inline cutlass::KernelHardwareInfo hw_info() {
  int device = 0;
  NK_CUDA_CHECK(cudaGetDevice(&device));
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = sm_count(device);
  return hw;
}

// The grouped GEMM's arguments over the device-built arrays (no C: beta = 0, ElementC void); the
// caller sets the epilogue's own (thread) arguments.
template <class Gemm>
typename Gemm::Arguments grouped_args(const Arrays<Gemm>& arr, int64_t E) {
  return typename Gemm::Arguments{cutlass::gemm::GemmUniversalMode::kGrouped,
                                  {static_cast<int>(E), arr.shapes, nullptr},
                                  {arr.ptr_a, arr.stride_a, arr.ptr_b, arr.stride_b},
                                  {{}, nullptr, arr.stride_d, arr.ptr_d, arr.stride_d},
                                  hw_info()};
}

// can_implement, initialize (CUTLASS's workspace at ws) and run on stream.
template <class Gemm>
void launch(typename Gemm::Arguments const& args, char* ws, cudaStream_t stream) {
  Gemm gemm;
  cutlass::Status st = gemm.can_implement(args);
  NK_CHECK_CUTLASS(st, "can_implement");
  st = gemm.initialize(args, ws, stream);
  NK_CHECK_CUTLASS(st, "initialize");
  st = gemm.run(stream);
  NK_CHECK_CUTLASS(st, "run");
  NK_CUDA_LAUNCH_CHECK();
}

template <class Gemm, int EPI = kPlain>
typename Gemm::Arguments make_args(const Arrays<Gemm>& arr, int64_t E, int64_t N = 0, const float* alpha = nullptr) {
  typename Gemm::Arguments args = grouped_args<Gemm>(arr, E);
  if constexpr (EPI == kRelu2Pre) {
    // The EVT tree's arguments, children first: {{acc fetch, aux store}, relu^2}.
    args.epilogue.thread = {{{}, {arr.ptr_aux, N}}, {}};
    (void)alpha;
  } else {
    args.epilogue.thread.alpha = 1.f;
    args.epilogue.thread.alpha_ptr = alpha;  // one device float for every group (stride 0), or null: 1
    args.epilogue.thread.beta = 0.f;
  }
  return args;
}

// Workspace bytes of one call: the per-group arrays plus CUTLASS's own workspace.
template <class Gemm, int EPI = kPlain>
int64_t workspace_bytes(int64_t E) {
  Arrays<Gemm> arr{};
  typename Gemm::Arguments args = make_args<Gemm, EPI>(arr, E);
  return Arrays<Gemm>::bytes(E) + align256(static_cast<int64_t>(Gemm::get_workspace_size(args)));
}

// Builds the groups on the device and runs the grouped GEMM on `stream` (Aux: kRelu2Pre's second
// output, else null).
template <class Gemm, int KIND, int EPI = kPlain>
void run(const GroupedGemmParams& p, const void* A, const void* B, void* D, void* workspace, cudaStream_t stream,
         void* Aux = nullptr) {
  if constexpr (EPI == kRelu2Pre) {  // the stores go through ptr_aux, which Aux fills; no alpha
    if (Aux == nullptr || p.alpha != nullptr) {
      throw std::runtime_error("nemokernels: grouped_gemm: the pre-storing epilogue needs a pre-activation "
                               "output and takes no alpha");
    }
  }
  char* ws = static_cast<char*>(workspace);
  Arrays<Gemm> arr = Arrays<Gemm>::carve(ws, p.E);
  setup_groups_kernel<Gemm, KIND><<<ceil_div(p.E, 128), 128, 0, stream>>>(arr, p.offsets, p.E, p.R, p.N, p.K, A,
                                                                             B, D, Aux);
  NK_CUDA_LAUNCH_CHECK();
  launch<Gemm>(make_args<Gemm, EPI>(arr, p.E, p.N, p.alpha), ws + Arrays<Gemm>::bytes(p.E), stream);
}

// The entry points of the per-arch units: fwd / dgrad (kind picks) and wgrad, each its own unit.
template <class Traits>
int64_t fwd_dgrad_workspace(int64_t E, int kind) {
  return kind == kFwd ? workspace_bytes<typename GroupedGemm<Traits, kFwd>::Gemm>(E)
                      : workspace_bytes<typename GroupedGemm<Traits, kDgrad>::Gemm>(E);
}
template <class Traits>
void fwd_dgrad_run(const GroupedGemmParams& p, int kind, const void* A, const void* B, void* D, void* workspace,
                   void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  if (kind == kFwd) run<typename GroupedGemm<Traits, kFwd>::Gemm, kFwd>(p, A, B, D, workspace, s);
  else run<typename GroupedGemm<Traits, kDgrad>::Gemm, kDgrad>(p, A, B, D, workspace, s);
}
// A forward with an epilogue of EPI; KIND kFwd or kFwdSwap (same operands, swapped roles).
template <class Traits, int EPI, int KIND = kFwd>
int64_t fwd_epi_workspace(int64_t E) {
  return workspace_bytes<typename GroupedGemm<Traits, KIND, EPI>::Gemm, EPI>(E);
}
// Aux: the pre-activation (R x N) for kRelu2Pre, else null.
template <class Traits, int EPI, int KIND = kFwd>
void fwd_epi_run(const GroupedGemmParams& p, const void* A, const void* B, void* D, void* workspace, void* stream,
                 void* Aux = nullptr) {
  run<typename GroupedGemm<Traits, KIND, EPI>::Gemm, KIND, EPI>(p, A, B, D, workspace,
                                                                static_cast<cudaStream_t>(stream), Aux);
}
template <class Traits>
int64_t wgrad_workspace(int64_t E) {
  return workspace_bytes<typename GroupedGemm<Traits, kWgrad>::Gemm>(E);
}
template <class Traits>
void wgrad_run(const GroupedGemmParams& p, const void* G, const void* A, void* D, void* workspace, void* stream) {
  run<typename GroupedGemm<Traits, kWgrad>::Gemm, kWgrad>(p, G, A, D, workspace, static_cast<cudaStream_t>(stream));
}

}  // namespace gg_cutlass
}  // namespace nk
