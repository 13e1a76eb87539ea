// CuTe side of the sm_90a SSD chunk output (ssd_chunk_output_sm90.cu): the shared-memory
// layouts, the tiled wgmma MMAs and where each accumulator value sits. Host-compilable, so that
// tests/ssd/sm90_layout_check.cu checks the fragment map against CuTe's layouts without a GPU.
#pragma once

#include <cute/tensor.hpp>

#include "common/macros.h"
#include "ssd/ssd_chunk_output_sm90.h"

namespace nk {
namespace ssd_sm90 {

using namespace cute;

constexpr int kThreads = 256;  // two consumer warpgroups, 64 rows i each

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

// Where wgmma's float32 accumulator value v of thread tid sits in a (rows, cols) tile computed by
// two warpgroups along M (PTX ISA, "wgmma .m64nNk16 register fragments"): warp w of warpgroup g
// holds rows 64 g + 16 w + lane / 4 (values v with v & 2 == 0) and 8 rows below (v & 2 == 2);
// value v's column is 8 (v / 4) + 2 (lane % 4) + (v & 1). The same layout is the A operand's of
// the next product: its k-block k is values 8 k .. 8 k + 7. The host test
// tests/ssd/test_ssd_sm90_layout.py (tests/ssd/sm90_layout_check.cu) checks both against CuTe's layouts for every thread.
NK_HD constexpr int frag_row(int tid, int v) { return 64 * (tid / 128) + 16 * (tid % 128 / 32) + tid % 32 / 4 + ((v & 2) ? 8 : 0); }
NK_HD constexpr int frag_col(int v, int lane) { return 8 * (v / 4) + 2 * (lane % 4) + (v & 1); }

// 16-byte cp.async, zero-filled when !pred (src is then not read); its group commit and wait.
CUTE_DEVICE void cp_async16(void* dst, const void* src, bool pred) {
#if defined(__CUDA_ARCH__)
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(pred ? 16 : 0) : "memory");
#else
  (void)dst, (void)src, (void)pred;
#endif
}
CUTE_DEVICE void cp_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
CUTE_DEVICE void cp_async_wait_all() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

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
