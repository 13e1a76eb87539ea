// CPU kernels of the grouped GEMM over experts: forward (relu^2 epilogue), dgrad, wgrad.
// Same schedule as the CUDA kernels: each expert's row segment is cut into row tiles
// (prefix sums of ceil(count_e / tile) give the tile -> expert map, found by binary search),
// and every (row tile, column tile) is one task that packs BK-wide slices of both operands
// into float buffers and accumulates a BM x BN block in float32 (float64 for float64 inputs).
// wgrad: one task per (expert, N tile, K tile) reducing over the expert's rows in order, so
// results are deterministic and the same for any thread count. The relu^2 backward
// g = dout * 2 * relu(pre) is applied as the operand is packed, rounded to the element type
// as the GPU does when it stages the operand in shared memory.
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common/check.h"
#include "moe/grouped_gemm.h"
#include "moe/numerics.cuh"

namespace nk {
namespace {

constexpr int kBM = kGgRowTileCpu;  // rows of a tile (output rows)
constexpr int kBN = 64;             // columns of a tile (output columns)
constexpr int kBK = 64;             // reduction slice packed at a time

template <typename T>
using AccT = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
inline AccT<T> ldv(const void* base, int64_t off) {
  return static_cast<AccT<T>>(static_cast<const T*>(base)[off]);
}
template <typename T>
inline void stv(void* base, int64_t off, AccT<T> v) {
  static_cast<T*>(base)[off] = static_cast<T>(v);
}
// Rounds through the element type (what staging an operand in T does on the GPU).
template <typename T>
inline AccT<T> round_t(AccT<T> v) {
  return static_cast<AccT<T>>(static_cast<T>(v));
}

template <typename F>
void dispatch(GgType dt, F&& f) {
  switch (dt) {
    case GgType::F32: f(float{}); break;
    case GgType::F16: f(c10::Half{}); break;
    case GgType::BF16: f(c10::BFloat16{}); break;
    case GgType::F64: f(double{}); break;
  }
}

// Clamped segment bounds of expert e (see grouped_gemm.h).
struct Segments {
  std::vector<int64_t> lo, hi, tile_off;  // tile_off: (E + 1,) prefix sums of row tiles
};

Segments segments(const GroupedGemmParams& p, int64_t row_tile) {
  Segments s;
  s.lo.resize(p.E);
  s.hi.resize(p.E);
  s.tile_off.assign(p.E + 1, 0);
  for (int64_t e = 0; e < p.E; ++e) {
    const int64_t lo = std::clamp<int64_t>(p.offsets[e], 0, p.R);
    const int64_t hi = std::clamp<int64_t>(p.offsets[e + 1], lo, p.R);
    s.lo[e] = lo;
    s.hi[e] = hi;
    s.tile_off[e + 1] = s.tile_off[e] + (hi - lo + row_tile - 1) / row_tile;
  }
  return s;
}

// Expert owning row tile t: the last e with tile_off[e] <= t (tile_off[E] > t).
int64_t expert_of_tile(const std::vector<int64_t>& tile_off, int64_t t) {
  return std::upper_bound(tile_off.begin(), tile_off.end(), t) - tile_off.begin() - 1;
}

// acc[m][n] (m < mt, n < nt) = sum_{k < K} A(m, k) * B(n, k), accumulated slice by slice.
template <typename Acc, typename LA, typename LB>
void tile_gemm(Acc (&acc)[kBM][kBN], int mt, int nt, int64_t K, LA&& load_a, LB&& load_b) {
  Acc abuf[kBM][kBK], bbuf[kBN][kBK];
  for (int m = 0; m < kBM; ++m)
    for (int n = 0; n < kBN; ++n) acc[m][n] = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    const int kt = static_cast<int>(std::min<int64_t>(kBK, K - k0));
    for (int m = 0; m < mt; ++m)
      for (int kk = 0; kk < kt; ++kk) abuf[m][kk] = load_a(m, k0 + kk);
    for (int n = 0; n < nt; ++n)
      for (int kk = 0; kk < kt; ++kk) bbuf[n][kk] = load_b(n, k0 + kk);
    for (int m = 0; m < mt; ++m) {
      for (int n = 0; n < nt; ++n) {
        Acc s = 0;
        for (int kk = 0; kk < kt; ++kk) s += abuf[m][kk] * bbuf[n][kk];
        acc[m][n] += s;
      }
    }
  }
}

// Zeroes rows [0, lo) and [hi, R) of a (R, cols) tensor: rows that belong to no expert.
template <typename T>
void zero_outside(void* out, int64_t R, int64_t cols, int64_t lo, int64_t hi) {
  if (out == nullptr) return;
  T* o = static_cast<T*>(out);
  std::fill(o, o + lo * cols, T(0));
  std::fill(o + hi * cols, o + R * cols, T(0));
}

// The dgrad/wgrad operand g[r][n]: dout, or round_T(dout * 2 * relu(pre)).
template <typename T>
inline AccT<T> load_g(const GroupedGemmParams& p, int64_t off) {
  const AccT<T> d = ldv<T>(p.dout, off);
  if (p.pre_in == nullptr) return d;
  const AccT<T> pre = ldv<T>(p.pre_in, off);
  return round_t<T>(relu2_grad(d, pre));
}

}  // namespace

void grouped_gemm_fwd_cpu(const GroupedGemmParams& p) {
  dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = AccT<T>;
    const Segments s = segments(p, kBM);
    const int64_t ntiles = (p.N + kBN - 1) / kBN;
    const int64_t lo0 = p.E > 0 ? s.lo[0] : 0, hiE = p.E > 0 ? std::max(s.hi[p.E - 1], lo0) : 0;
    zero_outside<T>(p.out, p.R, p.N, lo0, hiE);
    zero_outside<T>(p.pre_out, p.R, p.N, lo0, hiE);
    torch::stable::parallel_for(0, s.tile_off[p.E] * ntiles, 1, [&](int64_t begin, int64_t end) {
      Acc acc[kBM][kBN];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t t = task / ntiles, n0 = (task % ntiles) * kBN;
        const int64_t e = expert_of_tile(s.tile_off, t);
        const int64_t m0 = s.lo[e] + (t - s.tile_off[e]) * kBM;
        const int mt = static_cast<int>(std::min<int64_t>(kBM, s.hi[e] - m0));
        const int nt = static_cast<int>(std::min<int64_t>(kBN, p.N - n0));
        const int64_t wbase = e * p.N * p.K;
        tile_gemm<Acc>(acc, mt, nt, p.K,
                       [&](int m, int64_t k) { return ldv<T>(p.a, (m0 + m) * p.K + k); },
                       [&](int n, int64_t k) { return ldv<T>(p.w, wbase + (n0 + n) * p.K + k); });
        for (int m = 0; m < mt; ++m) {
          for (int n = 0; n < nt; ++n) {
            const Acc pre = acc[m][n];
            const int64_t off = (m0 + m) * p.N + n0 + n;
            if (p.pre_out) stv<T>(p.pre_out, off, pre);
            stv<T>(p.out, off, p.act == GgAct::Relu2 ? relu2(pre) : pre);
          }
        }
      }
    });
  });
}

void grouped_gemm_dgrad_cpu(const GroupedGemmParams& p) {
  dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = AccT<T>;
    const Segments s = segments(p, kBM);
    const int64_t ktiles = (p.K + kBN - 1) / kBN;
    const int64_t lo0 = p.E > 0 ? s.lo[0] : 0, hiE = p.E > 0 ? std::max(s.hi[p.E - 1], lo0) : 0;
    zero_outside<T>(p.out, p.R, p.K, lo0, hiE);
    torch::stable::parallel_for(0, s.tile_off[p.E] * ktiles, 1, [&](int64_t begin, int64_t end) {
      Acc acc[kBM][kBN];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t t = task / ktiles, c0 = (task % ktiles) * kBN;
        const int64_t e = expert_of_tile(s.tile_off, t);
        const int64_t m0 = s.lo[e] + (t - s.tile_off[e]) * kBM;
        const int mt = static_cast<int>(std::min<int64_t>(kBM, s.hi[e] - m0));
        const int ct = static_cast<int>(std::min<int64_t>(kBN, p.K - c0));
        const int64_t wbase = e * p.N * p.K;
        // Output column c (of K) reduces over n (of N): A(m, n) = g[m][n], B(c, n) = w[e][n][c].
        tile_gemm<Acc>(acc, mt, ct, p.N,
                       [&](int m, int64_t n) { return load_g<T>(p, (m0 + m) * p.N + n); },
                       [&](int c, int64_t n) { return ldv<T>(p.w, wbase + n * p.K + c0 + c); });
        for (int m = 0; m < mt; ++m)
          for (int c = 0; c < ct; ++c) stv<T>(p.out, (m0 + m) * p.K + c0 + c, acc[m][c]);
      }
    });
  });
}

void grouped_gemm_wgrad_cpu(const GroupedGemmParams& p) {
  dispatch(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    using Acc = AccT<T>;
    const Segments s = segments(p, kBM);
    const int64_t ntiles = (p.N + kBM - 1) / kBM, ktiles = (p.K + kBN - 1) / kBN;
    torch::stable::parallel_for(0, p.E * ntiles * ktiles, 1, [&](int64_t begin, int64_t end) {
      Acc acc[kBM][kBN];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t e = task / (ntiles * ktiles);
        const int64_t n0 = (task / ktiles % ntiles) * kBM, c0 = (task % ktiles) * kBN;
        const int nt = static_cast<int>(std::min<int64_t>(kBM, p.N - n0));
        const int ct = static_cast<int>(std::min<int64_t>(kBN, p.K - c0));
        const int64_t r0 = s.lo[e];
        // dw[e][n][c] = sum_r g[r][n] * a[r][c]: A(n, r) = g[r][n], B(c, r) = a[r][c].
        tile_gemm<Acc>(acc, nt, ct, s.hi[e] - r0,
                       [&](int n, int64_t j) { return load_g<T>(p, (r0 + j) * p.N + n0 + n); },
                       [&](int c, int64_t j) { return ldv<T>(p.a, (r0 + j) * p.K + c0 + c); });
        const int64_t obase = e * p.N * p.K;
        for (int n = 0; n < nt; ++n)
          for (int c = 0; c < ct; ++c) stv<T>(p.out, obase + (n0 + n) * p.K + c0 + c, acc[n][c]);
      }
    });
  });
}

}  // namespace nk
