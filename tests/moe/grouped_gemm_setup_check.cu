// Host check of the CUTLASS grouped GEMM's per-expert set-up (csrc/moe/grouped_gemm_cutlass.cuh,
// setup_group): for every kind, run it on the host and evaluate the GEMMs its shapes, pointers
// and strides describe by CUTLASS's convention (D(i, j) = sum_k A(i, k) B(j, k) over an M x N x K
// problem, each operand addressed by its CuTe stride). The result must equal the op's contract
// (fwd, swapped fwd, dgrad, wgrad) on every row of every segment, leave every other output
// element untouched, and write each element at most once. Small integers keep every sum exact
// in bf16. The FP8 forward's per-group scale pointers (row scales from the group's first row, the
// expert's weight scale) are checked with the kFwd cases, the FP8 wgrad (kWgradT) on its padded
// transposed operands by check_wgrad_t. Prints "ok" or the first mismatch. Driven by tests/moe/test_grouped_gemm_setup.py.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "moe/grouped_gemm_cutlass.cuh"

namespace {
using nk::gg_cutlass::Arrays;
using Bf16 = cutlass::bfloat16_t;

int fails = 0;
void fail(const char* what, int kind, int64_t e, int64_t i, int64_t j, float got, float want) {
  if (fails++ < 5) {
    std::printf("kind %d %s: expert %lld (%lld, %lld): got %g, want %g\n", kind, what, (long long)e, (long long)i,
                (long long)j, got, want);
  }
}

// With values_too false (decreasing offsets: overlapping segments, unspecified values on CUDA)
// only the bounds are checked: every write inside the output.
template <class Gemm, int KIND>
void check(const std::vector<int32_t>& off, int64_t R, int64_t N, int64_t K, bool values_too = true) {
  using AR = Arrays<Gemm>;
  const int64_t E = static_cast<int64_t>(off.size()) - 1;
  std::vector<char> ws(AR::bytes(E) + 256);
  char* base = ws.data() + (256 - reinterpret_cast<uintptr_t>(ws.data()) % 256) % 256;
  AR arr = AR::carve(base, E);
  // Operands of the op: a (R x K), w (E x N x K), g (R x N); outputs fwd (R x N), dgrad (R x K),
  // wgrad (E x N x K). Values in {-2..2}.
  auto fill = [](std::vector<Bf16>& v, int seed) {
    for (size_t i = 0; i < v.size(); ++i) v[i] = Bf16(static_cast<float>(static_cast<int>((i * 7 + seed * 13) % 5) - 2));
  };
  std::vector<Bf16> a(R * K), w(E * N * K), g(R * N);
  fill(a, 1), fill(w, 2), fill(g, 3);
  const bool fwd = KIND == nk::gg_cutlass::kFwd || KIND == nk::gg_cutlass::kFwdSwap;
  const int64_t d_size = fwd ? R * N : (KIND == nk::gg_cutlass::kDgrad ? R * K : E * N * K);
  const float kUntouched = -1000.f;
  std::vector<Bf16> d(d_size, Bf16(kUntouched));
  std::vector<int> writes(d_size, 0);
  const void* A = fwd ? static_cast<const void*>(a.data()) : static_cast<const void*>(g.data());
  const void* B = KIND == nk::gg_cutlass::kWgrad ? static_cast<const void*>(a.data()) : w.data();
  // The FP8 forward's scales (kFwd): row scale r at index r, expert scale 100 + e (or one shared).
  std::vector<float> row_scale(R), group_scale(E);
  for (int64_t r = 0; r < R; ++r) row_scale[r] = static_cast<float>(r);
  for (int64_t e = 0; e < E; ++e) group_scale[e] = 100.f + static_cast<float>(e);
  const int64_t group_stride = off.size() % 2;  // per expert or shared, by case
  nk::gg_cutlass::Fp8Extras sc{};
  if (KIND == nk::gg_cutlass::kFwd) sc = {row_scale.data(), group_scale.data(), group_stride, 0};
  for (int64_t e = 0; e < E; ++e)
    nk::gg_cutlass::setup_group<Gemm, KIND>(arr, off.data(), e, R, N, K, A, B, d.data(), nullptr, sc);
  // The scales each group's epilogue reads: row i of the group's tile is row lo + i.
  for (int64_t e = 0; KIND == nk::gg_cutlass::kFwd && values_too && e < E; ++e) {
    const int64_t lo = std::min<int64_t>(std::max<int64_t>(off[e], 0), R);
    for (int i = 0; i < cute::get<0>(arr.shapes[e]); ++i) {
      const float got = arr.ptr_row_scale[e][i];
      if (got != static_cast<float>(lo + i)) fail("row scale", KIND, e, i, 0, got, static_cast<float>(lo + i));
    }
    const float want_g = 100.f + static_cast<float>(e * group_stride);
    if (*arr.ptr_group_scale[e] != want_g) fail("expert scale", KIND, e, 0, 0, *arr.ptr_group_scale[e], want_g);
  }
  // Evaluate what the arrays describe.
  for (int64_t e = 0; e < E; ++e) {
    const int gm = cute::get<0>(arr.shapes[e]), gn = cute::get<1>(arr.shapes[e]), gk = cute::get<2>(arr.shapes[e]);
    const auto sa = arr.stride_a[e];
    const auto sb = arr.stride_b[e];
    const auto sd = arr.stride_d[e];
    for (int i = 0; i < gm; ++i)
      for (int j = 0; j < gn; ++j) {
        float s = 0;
        for (int k = 0; k < gk; ++k) {
          s += static_cast<float>(arr.ptr_a[e][i * int64_t(cute::get<0>(sa)) + k * int64_t(cute::get<1>(sa))]) *
               static_cast<float>(arr.ptr_b[e][j * int64_t(cute::get<0>(sb)) + k * int64_t(cute::get<1>(sb))]);
        }
        Bf16* p = arr.ptr_d[e] + i * int64_t(cute::get<0>(sd)) + j * int64_t(cute::get<1>(sd));
        const int64_t at = p - d.data();
        if (at < 0 || at >= d_size) {
          fail("write outside the output", KIND, e, i, j, s, 0);
          continue;
        }
        *p = Bf16(s);
        ++writes[at];
      }
  }
  // The contract, segment by segment (offsets clamped into [0, R] as the kernels do).
  std::vector<float> want(d_size, kUntouched);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t lo = std::min<int64_t>(std::max<int64_t>(off[e], 0), R);
    const int64_t hi = std::min<int64_t>(std::max<int64_t>(off[e + 1], lo), R);
    if (KIND == nk::gg_cutlass::kWgrad) {
      if (hi == lo) continue;  // no tiles: the zero pass owns dw[e]
      for (int64_t n = 0; n < N; ++n)
        for (int64_t c = 0; c < K; ++c) {
          float s = 0;
          for (int64_t r = lo; r < hi; ++r) s += float(g[r * N + n]) * float(a[r * K + c]);
          want[(e * N + n) * K + c] = s;
        }
      continue;
    }
    for (int64_t r = lo; r < hi; ++r) {
      if (fwd) {
        for (int64_t n = 0; n < N; ++n) {
          float s = 0;
          for (int64_t k = 0; k < K; ++k) s += float(a[r * K + k]) * float(w[(e * N + n) * K + k]);
          want[r * N + n] = s;
        }
      } else {
        for (int64_t c = 0; c < K; ++c) {
          float s = 0;
          for (int64_t n = 0; n < N; ++n) s += float(g[r * N + n]) * float(w[(e * N + n) * K + c]);
          want[r * K + c] = s;
        }
      }
    }
  }
  for (int64_t i = 0; values_too && i < d_size; ++i) {
    if (float(d[i]) != want[i]) fail("value", KIND, -1, i, 0, float(d[i]), want[i]);
    if (writes[i] > 1) fail("written twice", KIND, -1, i, 0, float(writes[i]), 1);
  }
}

// kWgradT (the FP8 wgrad on moe_quantize_fp8_t's operands): gT (N x W) and aT (K x W) hold expert
// e's rows at columns start16(lo, e) + i; D[e] (N x K) = sum over i of gT[n, s + i] aT[k, s + i].
// The layouts are kFwd's (row-major A, column-major B, row-major D), so kFwd's GEMM type serves.
void check_wgrad_t(const std::vector<int32_t>& off, int64_t R, int64_t N, int64_t K) {
  using Gemm = nk::gg_cutlass::GroupedGemm<nk::gg_cutlass::Sm90Traits, nk::gg_cutlass::kFwd>::Gemm;
  using AR = Arrays<Gemm>;
  constexpr int KIND = nk::gg_cutlass::kWgradT;
  const int64_t E = static_cast<int64_t>(off.size()) - 1, W = nk::padded16_width(R, E);
  std::vector<char> ws(AR::bytes(E) + 256);
  char* base = ws.data() + (256 - reinterpret_cast<uintptr_t>(ws.data()) % 256) % 256;
  AR arr = AR::carve(base, E);
  std::vector<Bf16> gT(N * W), aT(K * W);
  for (size_t i = 0; i < gT.size(); ++i) gT[i] = Bf16(static_cast<float>(static_cast<int>((i * 7 + 3) % 5) - 2));
  for (size_t i = 0; i < aT.size(); ++i) aT[i] = Bf16(static_cast<float>(static_cast<int>((i * 11 + 1) % 5) - 2));
  const float kUntouched = -1000.f;
  std::vector<Bf16> d(E * N * K, Bf16(kUntouched));
  nk::gg_cutlass::Fp8Extras sc{};
  sc.width = W;
  for (int64_t e = 0; e < E; ++e)
    nk::gg_cutlass::setup_group<Gemm, KIND>(arr, off.data(), e, R, N, K, gT.data(), aT.data(), d.data(), nullptr, sc);
  for (int64_t e = 0; e < E; ++e) {
    const int gm = cute::get<0>(arr.shapes[e]), gn = cute::get<1>(arr.shapes[e]), gk = cute::get<2>(arr.shapes[e]);
    const auto sa = arr.stride_a[e];
    const auto sb = arr.stride_b[e];
    const auto sd = arr.stride_d[e];
    if ((arr.ptr_a[e] - gT.data()) % 16 != 0 || (arr.ptr_b[e] - aT.data()) % 16 != 0 || int64_t(cute::get<0>(sa)) % 16)
      fail("TMA base or stride not a multiple of 16 elements", KIND, e, 0, 0, 0, 0);
    for (int i = 0; i < gm; ++i)
      for (int j = 0; j < gn; ++j) {
        float s = 0;
        for (int k = 0; k < gk; ++k) {
          const Bf16* pa = arr.ptr_a[e] + i * int64_t(cute::get<0>(sa)) + k * int64_t(cute::get<1>(sa));
          const Bf16* pb = arr.ptr_b[e] + j * int64_t(cute::get<0>(sb)) + k * int64_t(cute::get<1>(sb));
          if (pa < gT.data() || pa >= gT.data() + gT.size() || pb < aT.data() || pb >= aT.data() + aT.size()) {
            fail("read outside an operand", KIND, e, i, j, 0, 0);
            continue;
          }
          s += static_cast<float>(*pa) * static_cast<float>(*pb);
        }
        Bf16* p = arr.ptr_d[e] + i * int64_t(cute::get<0>(sd)) + j * int64_t(cute::get<1>(sd));
        if (p < d.data() || p >= d.data() + d.size()) {
          fail("write outside the output", KIND, e, i, j, s, 0);
          continue;
        }
        *p = Bf16(s);
      }
  }
  for (int64_t e = 0; e < E; ++e) {
    const int64_t lo = std::min<int64_t>(std::max<int64_t>(off[e], 0), R);
    const int64_t hi = std::min<int64_t>(std::max<int64_t>(off[e + 1], lo), R);
    const int64_t s0 = nk::start16(lo, e);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) {
        float want = kUntouched;  // no tiles for an empty expert: the zero pass owns dw[e]
        if (hi > lo) {
          want = 0;
          for (int64_t i = 0; i < hi - lo; ++i) want += float(gT[n * W + s0 + i]) * float(aT[k * W + s0 + i]);
        }
        const float got = float(d[(e * N + n) * K + k]);
        if (got != want) fail("value", KIND, e, n, k, got, want);
      }
  }
}

template <int KIND, class Traits = nk::gg_cutlass::Sm90Traits>
void check_kind() {
  using Gemm = typename nk::gg_cutlass::GroupedGemm<Traits, KIND>::Gemm;
  // An empty expert, a one-row expert, padding rows past offsets[E]; offsets outside [0, R]
  // (clamped); decreasing offsets (CUDA does not check them: only memory safety is promised).
  check<Gemm, KIND>({0, 5, 5, 24, 25}, 29, 24, 16);
  check<Gemm, KIND>({-3, 4, 9, 40}, 30, 16, 8);
  check<Gemm, KIND>({-3, 4, 2, 40}, 30, 16, 8, false);
}
}  // namespace

int main() {
  check_kind<nk::gg_cutlass::kFwd>();
  check_kind<nk::gg_cutlass::kDgrad>();
  check_kind<nk::gg_cutlass::kWgrad>();
  check_kind<nk::gg_cutlass::kFwdSwap, nk::gg_cutlass::Sm90SwapTraits>();
  check_wgrad_t({0, 5, 5, 24, 25}, 29, 24, 16);
  check_wgrad_t({3, 20, 20, 37, 80}, 83, 8, 24);
  if (fails) {
    std::printf("%d mismatches\n", fails);
    return 1;
  }
  std::printf("ok\n");
  return 0;
}
