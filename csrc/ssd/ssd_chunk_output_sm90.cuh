// CuTe side of the sm_90a SSD kernels (the chunk output in ssd_chunk_output_sm90.cu; the state
// chain tile, B1 and B3 in the portable fwd/bwd files' sm_90a pass): the shared-memory layouts,
// the tiled wgmma MMAs and where each accumulator value sits. Host-compilable, so that
// tests/ssd/sm90_layout_check.cu checks the fragment map and layouts without a GPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include <cute/tensor.hpp>

#include "common/macros.h"
#include "common/wgmma_sm90.cuh"
#include "ssd/ssd_chunk_output_sm90.h"

namespace nk {
namespace ssd_sm90 {

using namespace cute;
using sm90::cp_async16;
using sm90::cp_async_commit;
using sm90::cp_async_wait_all;
using sm90::frag_col;
using sm90::frag_row;
using sm90::k_sw128_offset;

constexpr int kThreads = 256;  // two consumer warpgroups, 64 rows i each

// CuTe's element type for the kernels' 16-bit T (__half or __nv_bfloat16).
template <typename T>
using cute_elem_t = std::conditional_t<std::is_same_v<T, __half>, cute::half_t, cute::bfloat16_t>;

// Shared-memory layouts (GMMA 128-byte swizzle) and the three tiled MMAs; two warpgroups along M.
template <typename E>
struct Cfg {
  static constexpr int Q = kSsdSm90Q, P = kSsdSm90P, N = kSsdSm90N;
  using SmemQN = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<Q>, Int<N>>{}));   // C[i][n], B[j][n]
  using SmemPN = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<P>, Int<N>>{}));   // in_c[p][n]
  using SmemPQ = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<E>{}, Shape<Int<P>, Int<Q>>{}));  // x as (p, j)
  using AtomLayout = Layout<Shape<_2, _1, _1>>;
  // CB = C Bᵀ: (Q x Q), K = N
  using MmaCB = decltype(make_tiled_mma(GMMA::ss_op_selector<E, E, float, Shape<_64, Int<Q>, _16>>(), AtomLayout{}));
  // Y_state = C in_cᵀ: (Q x P), K = N
  using MmaYs = decltype(make_tiled_mma(GMMA::ss_op_selector<E, E, float, Shape<_64, Int<P>, _16>>(), AtomLayout{}));
  // Y += S X: (Q x P), K = Q, S from registers, X MN-major (p contiguous)
  using MmaYx = decltype(make_tiled_mma(
      GMMA::rs_op_selector<E, E, float, Shape<_64, Int<P>, _16>, GMMA::Major::K, GMMA::Major::MN>(), AtomLayout{}));
};

// The state chain's chunk-state tile on sm_90a (state_chain_kernel's wgmma variant in
// ssd_chunk_scan_fwd_cuda.cu): S[p][n] = sum_j XW[j][p] B[j][n] for a 64 x 64 tile over the
// chunk's 128 positions, one warpgroup. XW and B are stored j-major ([j][p], [j][n]), i.e. as
// MN-major operands (p and n contiguous).
template <typename E>
struct StateCfg {
  static constexpr int kJ = 128, kTile = 64;
  using SmemTJ = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<E>{}, Shape<Int<kTile>, Int<kJ>>{}));  // (p or n, j)
  using Mma = decltype(make_tiled_mma(
      GMMA::ss_op_selector<E, E, float, Shape<Int<kTile>, Int<kTile>, _16>, GMMA::Major::MN, GMMA::Major::MN>()));
};

// Backward B3's row kernel on sm_90a (row_sm90_kernel, ssd_chunk_scan_bwd_cuda.cu): rows i over
// two warpgroups as in Cfg, the chunk's columns j in two halves of 64. B is stored once, as two
// j-halves of B[j][n] whose swizzle atoms run along n first: that one layout is the K-major
// (j, n) operand of CB = C Bᵀ and the MN-major (n, j) operand of dC += A3 B (the host test checks
// SmemJN(j, n) == SmemNJ(n, j) for every element).
template <typename E>
struct RowCfg {
  static constexpr int Q = kSsdSm90Q, P = kSsdSm90P, N = kSsdSm90N, kHalf = Q / 2;
  using SmemQN = typename Cfg<E>::SmemQN;  // C[i][n]
  using SmemJN = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<kHalf>, Int<N>>{}, Step<_2, _1>{}));
  using SmemNJ = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<E>{}, Shape<Int<N>, Int<kHalf>>{}));
  using SmemQP = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<Q>, Int<P>>{}));      // dy[i][p], x[j][p]
  using SmemHP = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<kHalf>, Int<P>>{}));  // x, one j-half
  using SmemHNP = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<E>{}, Shape<Int<N / 2>, Int<P>>{}));  // in_c[p][n] as (n, p), one n-half
  using AtomLayout = Layout<Shape<_2, _1, _1>>;
  // one n-half of Z = dY in_cᵀ: (Q x N / 2), K = P, in_c MN-major (halves keep the registers in budget)
  using MmaZ = decltype(make_tiled_mma(
      GMMA::ss_op_selector<E, E, float, Shape<_64, Int<N / 2>, _16>, GMMA::Major::K, GMMA::Major::MN>(), AtomLayout{}));
  // one j-half of CB = C Bᵀ (K = N) and of M = dY Xᵀ (K = P): (Q x kHalf)
  using MmaHalf = decltype(make_tiled_mma(GMMA::ss_op_selector<E, E, float, Shape<_64, Int<kHalf>, _16>>(), AtomLayout{}));
  // dC += A3 B over one j-half: (Q x N), K = kHalf, A3 from registers, B MN-major
  using MmaDC = decltype(make_tiled_mma(
      GMMA::rs_op_selector<E, E, float, Shape<_64, Int<N>, _16>, GMMA::Major::K, GMMA::Major::MN>(), AtomLayout{}));
};

// Backward B3's column kernel on sm_90a (col_sm90_kernel): rows j over two warpgroups, the
// chunk's rows i in two halves. The roles of B and C swap against RowCfg (B the A operand [j][n],
// C stored by i-halves read as (i, n) K-major and (n, i) MN-major), and two more tiles are read
// both ways: a half of dy (i, p) K-major for Mᵀ = x dyᵀ and (p, i) MN-major for dx += A1 dy; a
// half of dS (n, p) MN-major for x dS and (p, n) K-major for B dSᵀ (host-checked: same bytes).
template <typename E>
struct ColCfg {
  using Rc = RowCfg<E>;
  static constexpr int Q = Rc::Q, P = Rc::P, N = Rc::N, kHalf = Rc::kHalf;
  using SmemPH = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<E>{}, Shape<Int<P>, Int<kHalf>>{}));  // dy half (p, i)
  using SmemPHN = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<E>{}, Shape<Int<P>, Int<N / 2>>{}));  // dS half (p, n)
  using AtomLayout = Layout<Shape<_2, _1, _1>>;
  // R = B dSᵀ: (Q x P), K = N by n-halves; CBᵀ = B Cᵀ and Mᵀ = x dyᵀ by i-halves: Rc::MmaHalf
  // x dS: (Q x N / 2) per n-half, K = P: Rc::MmaZ; dB += A2 C: Rc::MmaDC
  // dx += A1 dy over one i-half: (Q x P), K = kHalf, A1 from registers, dy MN-major
  using MmaDX = decltype(make_tiled_mma(
      GMMA::rs_op_selector<E, E, float, Shape<_64, Int<P>, _16>, GMMA::Major::K, GMMA::Major::MN>(), AtomLayout{}));
  static_assert(P == 64 && N / 2 == 64, "the half views assume P 64, N 128");
};

// acc = A Bᵀ summed over the 128 positions j, A and B two (64, 128) StateCfg::SmemTJ tiles in
// shared memory (a[.][j], b[.][j]), by the calling warpgroup (all 128 threads, after a barrier
// and fence.proxy.async that make the tiles visible to wgmma); out[v] is the value at
// (frag_row(tid, v), frag_col(v, lane)). The tiles may be overwritten once every thread is past
// a barrier after the call. Used by the state chain (forward) and B1 (backward) on sm_90a.
template <typename E>
CUTE_DEVICE void state_tile_mma(E* a, E* b, float (&out)[32]) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Sc = StateCfg<E>;
  Tensor sA = make_tensor(make_smem_ptr(a), typename Sc::SmemTJ{});
  Tensor sB = make_tensor(make_smem_ptr(b), typename Sc::SmemTJ{});
  typename Sc::Mma mma;
  mma.accumulate_ = GMMA::ScaleOut::One;
  const int tid = threadIdx.x % 128;
  auto thr = mma.get_thread_slice(tid);
  Tensor tA = thr.make_fragment_A(thr.partition_A(sA));
  Tensor tB = thr.make_fragment_B(thr.partition_B(sB));
  Tensor acc = partition_fragment_C(mma, Shape<Int<Sc::kTile>, Int<Sc::kTile>>{});
  clear(acc);
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
  CUTE_UNROLL
  for (int k = 0; k < size<2>(tA); ++k) gemm(mma, tA(_, _, k), tB(_, _, k), acc);
  warpgroup_commit_batch();
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);
  static_assert(decltype(size(acc))::value == 32, "fragment size");
  CUTE_UNROLL
  for (int v = 0; v < 32; ++v) out[v] = acc(v);
#else
  (void)a, (void)b, (void)out;
#endif
}

}  // namespace ssd_sm90
}  // namespace nk
