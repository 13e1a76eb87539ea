// Host check of the sm_90a SSD kernels' fragment map (csrc/ssd/ssd_chunk_output_sm90.cuh): for
// every thread of the CTA, the (row, column) CuTe's layouts give each accumulator value of the
// chunk output's CB and Y products, each value of its S register operand, each accumulator value
// of the state chain's tile and of the backward B3 products (and their register A operands),
// must be the ones frag_row / frag_col name, which the kernels use for their masks, decays and
// stores; and the shared tiles read in two ways (or by written-out offsets) must agree. Built and run by
// tests/ssd/test_ssd_sm90_layout.py with nvcc (no GPU needed). Prints "ok" or the first mismatch.
#include <cstdio>

#include "ssd/ssd_chunk_output_sm90.cuh"

using namespace cute;
using nk::ssd_sm90::Cfg;
using nk::ssd_sm90::frag_col;
using nk::ssd_sm90::frag_row;
using nk::ssd_sm90::kThreads;

template <typename E>
int check(const char* name) {
  using Cf = Cfg<E>;
  constexpr int Q = Cf::Q, P = Cf::P;
  typename Cf::MmaCB mma_cb;
  typename Cf::MmaYx mma_yx;
  typename Cf::MmaYs mma_ys;
  if (size(mma_cb) != kThreads || size(mma_yx) != kThreads || size(mma_ys) != kThreads) {
    std::printf("%s: a tiled MMA does not take %d threads\n", name, kThreads);
    return 1;
  }
  for (int tid = 0; tid < kThreads; ++tid) {
    const int lane = tid % 32;
    auto cb_ij = mma_cb.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<Q>, Int<Q>>{}));
    auto y_ip = mma_yx.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<Q>, Int<P>>{}));
    auto ys_ip = mma_ys.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<Q>, Int<P>>{}));
    auto s_ij = mma_yx.get_thread_slice(tid).partition_A(make_identity_tensor(Shape<Int<Q>, Int<Q>>{}));
    if (size(cb_ij) != 64 || size(y_ip) != 32 || size(ys_ip) != 32 || size(s_ij) != 64 ||
        size<2>(s_ij) != 8 || size<1>(s_ij) != 1) {
      std::printf("%s: fragment sizes differ from the kernel's\n", name);
      return 1;
    }
    for (int v = 0; v < 64; ++v) {
      const int r = frag_row(tid, v), c = frag_col(v, lane);
      if (get<0>(cb_ij(v)) != r || get<1>(cb_ij(v)) != c) {
        std::printf("%s: CB tid %d value %d is (%d, %d), frag map says (%d, %d)\n", name, tid, v,
                    int(get<0>(cb_ij(v))), int(get<1>(cb_ij(v))), r, c);
        return 1;
      }
      auto a = s_ij(v % 8, 0, v / 8);
      if (get<0>(a) != r || get<1>(a) != c) {
        std::printf("%s: S operand tid %d value %d k-block %d is (%d, %d), frag map says (%d, %d)\n", name, tid,
                    v % 8, v / 8, int(get<0>(a)), int(get<1>(a)), r, c);
        return 1;
      }
      if (v < 32) {
        for (auto t : {y_ip(v), ys_ip(v)}) {
          if (get<0>(t) != r || get<1>(t) != c) {
            std::printf("%s: Y tid %d value %d is (%d, %d), frag map says (%d, %d)\n", name, tid, v, int(get<0>(t)),
                        int(get<1>(t)), r, c);
            return 1;
          }
        }
      }
    }
  }
  return 0;
}

// The state chain's single-warpgroup 64 x 64 tile (StateCfg): accumulator value v of thread tid
// (< 128) at (frag_row(tid, v), frag_col(v, lane)).
template <typename E>
int check_state(const char* name) {
  using Sc = nk::ssd_sm90::StateCfg<E>;
  typename Sc::Mma mma;
  if (size(mma) != 128) {
    std::printf("%s: the state tile's MMA does not take 128 threads\n", name);
    return 1;
  }
  for (int tid = 0; tid < 128; ++tid) {
    auto ij = mma.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<Sc::kTile>, Int<Sc::kTile>>{}));
    if (size(ij) != 32) {
      std::printf("%s: state tile fragment size %d, not 32\n", name, int(size(ij)));
      return 1;
    }
    for (int v = 0; v < 32; ++v) {
      const int r = frag_row(tid, v), c = frag_col(v, tid % 32);
      if (get<0>(ij(v)) != r || get<1>(ij(v)) != c) {
        std::printf("%s: state tile tid %d value %d is (%d, %d), frag map says (%d, %d)\n", name, tid, v,
                    int(get<0>(ij(v))), int(get<1>(ij(v))), r, c);
        return 1;
      }
    }
  }
  return 0;
}

// Backward B3's row kernel (RowCfg): the accumulators of dC (Q x N), of each n-half of Z and of each j-half of CB and
// M (Q x 64) at (frag_row, frag_col); A3 as dC's register A operand in the half's accumulator
// order; B's one layout read as (j, n) K-major and as (n, j) MN-major; C's offsets as k_sw128_offset
// writes them; x's j-half at its offset.
template <typename E>
int check_row(const char* name) {
  using Rc = nk::ssd_sm90::RowCfg<E>;
  constexpr int Q = Rc::Q, P = Rc::P, N = Rc::N, H = Rc::kHalf;
  typename Rc::MmaZ mma_z;
  typename Rc::MmaHalf mma_h;
  typename Rc::MmaDC mma_dc;
  if (size(mma_z) != kThreads || size(mma_h) != kThreads || size(mma_dc) != kThreads) {
    std::printf("%s: a row MMA does not take %d threads\n", name, kThreads);
    return 1;
  }
  for (int tid = 0; tid < kThreads; ++tid) {
    const int lane = tid % 32;
    auto z_in = mma_z.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<Q>, Int<N / 2>>{}));
    auto dc_in = mma_dc.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<Q>, Int<N>>{}));
    auto h_ij = mma_h.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<Q>, Int<H>>{}));
    auto a_ij = mma_dc.get_thread_slice(tid).partition_A(make_identity_tensor(Shape<Int<Q>, Int<H>>{}));
    if (size(z_in) != 32 || size(dc_in) != 64 || size(h_ij) != 32 || size(a_ij) != 32 || size<2>(a_ij) != 4 ||
        size<1>(a_ij) != 1) {
      std::printf("%s: row fragment sizes differ from the kernel's\n", name);
      return 1;
    }
    for (int v = 0; v < 64; ++v) {
      const int r = frag_row(tid, v), c = frag_col(v, lane);
      // Z's n-half nh holds dC's values 32 nh .. 32 nh + 31: value v of the half is at column 64 nh + frag_col(v)
      auto zt = z_in(v % 32);
      const int zc = get<1>(zt) + (N / 2) * (v / 32);
      if (get<0>(dc_in(v)) != r || get<1>(dc_in(v)) != c || get<0>(zt) != r || zc != c) {
        std::printf("%s: Z/dC tid %d value %d: dC (%d, %d), Z (%d, %d), frag map says (%d, %d)\n", name, tid, v,
                    int(get<0>(dc_in(v))), int(get<1>(dc_in(v))), int(get<0>(zt)), zc, r, c);
        return 1;
      }
      if (v < 32) {
        auto a = a_ij(v % 8, 0, v / 8);
        if (get<0>(h_ij(v)) != r || get<1>(h_ij(v)) != c || get<0>(a) != r || get<1>(a) != c) {
          std::printf("%s: half tile / A3 operand tid %d value %d differ from the frag map (%d, %d)\n", name, tid, v, r, c);
          return 1;
        }
      }
    }
  }
  // Element offsets as the kernel's stores and loads see them: through a 1024-byte aligned
  // shared-memory pointer, where the 128-byte swizzle acts on the address bits.
  alignas(1024) static E buf[Q * N];
  auto at = [&](auto const& layout, auto... coord) {
    auto t = make_tensor(make_smem_ptr(buf), layout);
    return int(&t(coord...) - &buf[0]);
  };
  typename Rc::SmemJN jn;
  typename Rc::SmemNJ nj;
  if (cosize(jn) != H * N || cosize(nj) != H * N) {
    std::printf("%s: a B half is not %d elements\n", name, H * N);
    return 1;
  }
  for (int j = 0; j < H; ++j)
    for (int n = 0; n < N; ++n)
      if (at(jn, j, n) != at(nj, n, j)) {
        std::printf("%s: B (j %d, n %d) is at %d as K-major, %d as MN-major\n", name, j, n, at(jn, j, n), at(nj, n, j));
        return 1;
      }
  typename Rc::SmemQN qn;
  for (int i = 0; i < Q; ++i)
    for (int n = 0; n < N; ++n)
      if (at(qn, i, n) != nk::ssd_sm90::k_sw128_offset<Q>(i, n)) {
        std::printf("%s: C (i %d, n %d) is at %d, k_sw128_offset says %d\n", name, i, n, at(qn, i, n),
                    nk::ssd_sm90::k_sw128_offset<Q>(i, n));
        return 1;
      }
  typename Rc::SmemQP qp;
  typename Rc::SmemHP hp;
  for (int j = 0; j < Q; ++j)
    for (int k = 0; k < P; ++k) {
      const int want = j < H ? at(hp, j, k) : H * P + at(hp, j - H, k);
      if (at(qp, j, k) != want) {
        std::printf("%s: x (j %d, p %d) is at %d, its half view says %d\n", name, j, k, at(qp, j, k), want);
        return 1;
      }
    }
  return 0;
}

// Backward B3's column kernel (ColCfg): dx's accumulator (Q x P) and A1 as its register A
// operand; R's k-block pairing across the n-halves; dy's i-half read as (i, p) K-major and (p, i) MN-major, dS's n-half as (n, p) MN-major
// and (p, n) K-major, at the same bytes; x's offsets as k_sw128_offset writes them.
template <typename E>
int check_col(const char* name) {
  using Rc = nk::ssd_sm90::RowCfg<E>;
  using Cc = nk::ssd_sm90::ColCfg<E>;
  constexpr int Q = Cc::Q, P = Cc::P, N = Cc::N, H = Cc::kHalf;
  typename Cc::MmaDX mma_dx;
  if (size(mma_dx) != kThreads) {
    std::printf("%s: the dx MMA does not take %d threads\n", name, kThreads);
    return 1;
  }
  for (int tid = 0; tid < kThreads; ++tid) {
    const int lane = tid % 32;
    auto dx_jp = mma_dx.get_thread_slice(tid).partition_C(make_identity_tensor(Shape<Int<Q>, Int<P>>{}));
    auto a_ji = mma_dx.get_thread_slice(tid).partition_A(make_identity_tensor(Shape<Int<Q>, Int<H>>{}));
    if (size(dx_jp) != 32 || size(a_ji) != 32 || size<2>(a_ji) != 4 || size<1>(a_ji) != 1) {
      std::printf("%s: column fragment sizes differ from the kernel's\n", name);
      return 1;
    }
    for (int v = 0; v < 32; ++v) {
      const int r = frag_row(tid, v), c = frag_col(v, lane);
      auto a = a_ji(v % 8, 0, v / 8);
      if (get<0>(dx_jp(v)) != r || get<1>(dx_jp(v)) != c || get<0>(a) != r || get<1>(a) != c) {
        std::printf("%s: dx / A1 operand tid %d value %d differ from the frag map (%d, %d)\n", name, tid, v, r, c);
        return 1;
      }
    }
  }
  // R = B dSᵀ pairs A's k-block 4 + k (n over the whole N) with the second n-half's k-block k:
  // A's k-block kb must hold columns 16 kb .. 16 kb + 15, the half's k-block k columns 16 k ..
  typename Rc::MmaHalf mma_h;
  for (int tid = 0; tid < kThreads; ++tid) {
    auto a_in = mma_h.get_thread_slice(tid).partition_A(make_identity_tensor(Shape<Int<Q>, Int<N>>{}));
    auto b_pn = mma_h.get_thread_slice(tid).partition_B(make_identity_tensor(Shape<Int<P>, Int<N / 2>>{}));
    if (size<2>(a_in) != 8 || size<2>(b_pn) != 4) {
      std::printf("%s: R's k-blocks are not 8 (A) and 4 per n-half (B)\n", name);
      return 1;
    }
    for (int kb = 0; kb < 8; ++kb)
      for (int e = 0; e < size<0>(a_in); ++e)
        if (get<1>(a_in(e, 0, kb)) / 16 != kb) {
          std::printf("%s: R's A k-block %d holds column %d\n", name, kb, int(get<1>(a_in(e, 0, kb))));
          return 1;
        }
    for (int kb = 0; kb < 4; ++kb)
      for (int e = 0; e < size<0>(b_pn); ++e)
        for (int nn = 0; nn < size<1>(b_pn); ++nn)
          if (get<1>(b_pn(e, nn, kb)) / 16 != kb) {
            std::printf("%s: R's B k-block %d holds column %d\n", name, kb, int(get<1>(b_pn(e, nn, kb))));
            return 1;
          }
  }
  alignas(1024) static E buf[Q * N];
  auto at = [&](auto const& layout, auto... coord) {
    auto t = make_tensor(make_smem_ptr(buf), layout);
    return int(&t(coord...) - &buf[0]);
  };
  typename Rc::SmemHP hp;
  typename Cc::SmemPH ph;
  typename Rc::SmemHNP hnp;
  typename Cc::SmemPHN phn;
  typename Rc::SmemQP qp;
  for (int i = 0; i < H; ++i)
    for (int k = 0; k < P; ++k) {
      if (at(hp, i, k) != at(ph, k, i)) {
        std::printf("%s: dy (i %d, p %d) is at %d as K-major, %d as MN-major\n", name, i, k, at(hp, i, k), at(ph, k, i));
        return 1;
      }
      if (at(hnp, i, k) != at(phn, k, i)) {
        std::printf("%s: dS (n %d, p %d) is at %d as MN-major, %d as K-major\n", name, i, k, at(hnp, i, k), at(phn, k, i));
        return 1;
      }
    }
  for (int j = 0; j < Q; ++j)
    for (int k = 0; k < P; ++k)
      if (at(qp, j, k) != nk::ssd_sm90::k_sw128_offset<Q>(j, k)) {
        std::printf("%s: x (j %d, p %d) is at %d, k_sw128_offset says %d\n", name, j, k, at(qp, j, k),
                    nk::ssd_sm90::k_sw128_offset<Q>(j, k));
        return 1;
      }
  return 0;
}

int main() {
  if (check<cute::bfloat16_t>("bf16") != 0 || check<cute::half_t>("f16") != 0) return 1;
  if (check_state<cute::bfloat16_t>("bf16") != 0 || check_state<cute::half_t>("f16") != 0) return 1;
  if (check_row<cute::bfloat16_t>("bf16") != 0 || check_row<cute::half_t>("f16") != 0) return 1;
  if (check_col<cute::bfloat16_t>("bf16") != 0 || check_col<cute::half_t>("f16") != 0) return 1;
  std::printf("ok\n");
  return 0;
}
