// Host check of the sm_90a SSD chunk output's fragment map (csrc/ssd/ssd_chunk_output_sm90.cuh):
// for every thread of the CTA, the (row, column) CuTe's layouts give each accumulator value of
// the CB and Y products, each value of the S register operand, and each accumulator value of the
// state chain's tile, must be the ones frag_row / frag_col name, which the kernel uses for its mask, its decays and its stores. Built and run by
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

int main() {
  if (check<cute::bfloat16_t>("bf16") != 0 || check<cute::half_t>("f16") != 0) return 1;
  if (check_state<cute::bfloat16_t>("bf16") != 0 || check_state<cute::half_t>("f16") != 0) return 1;
  std::printf("ok\n");
  return 0;
}
