// Expert segments of the grouped GEMMs: rows [offsets[e], offsets[e + 1]) clamped into [0, R] as
// every kernel clamps them (bad offsets on CUDA are memory-safe), and the zero fill of the rows
// that belong to no expert (before the first segment, from the last one's end), shared by the
// 16-bit, NVFP4-weight and FP8 kernels on the CPU and on CUDA.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/macros.h"

namespace nk {

NK_HD void segment(const int32_t* off, int64_t e, int64_t R, int64_t& lo, int64_t& hi) {
  const int64_t o0 = off[e], o1 = off[e + 1];
  lo = o0 < 0 ? 0 : (o0 > R ? R : o0);
  hi = o1 < lo ? lo : (o1 > R ? R : o1);
}

// The expert whose segment holds row r, with that segment (clamped), or -1 when r is in none.
// For non-decreasing offsets: the last expert whose segment starts at or before r (binary search);
// for bad offsets some expert or -1, and [lo, hi) stays inside [0, R].
NK_HD int64_t expert_of_row(const int32_t* off, int64_t E, int64_t R, int64_t r, int64_t& lo, int64_t& hi) {
  int64_t a = 0, b = E - 1, e = -1;
  lo = hi = 0;
  while (a <= b) {
    const int64_t mid = (a + b) / 2;
    int64_t l, h;
    segment(off, mid, R, l, h);
    if (l <= r) {
      e = mid, lo = l, hi = h;
      a = mid + 1;
    } else {
      b = mid - 1;
    }
  }
  return (e >= 0 && r >= lo && r < hi) ? e : -1;
}

// The transposed FP8 operands of the wgrad (moe_quantize_fp8_t) put expert e's rows at columns
// [start16(lo, e), + count): lo rounded up to 16 plus 16 e. Every start is a multiple of 16 (the
// TMA base alignment of e4m3 rows) and the segments do not overlap (start16(lo_e, e) + count_e <=
// lo_{e+1} + 15 + 16 e < start16(lo_{e+1}, e + 1)); the width is padded16_width(R, E).
NK_HD int64_t start16(int64_t lo, int64_t e) { return (lo + 15) / 16 * 16 + 16 * e; }
NK_HD int64_t padded16_width(int64_t R, int64_t E) { return (R + 15) / 16 * 16 + 16 * E; }

#if defined(__CUDACC__)
}  // namespace nk
#include "common/cuda_dtype.cuh"
namespace nk {
namespace {  // each unit its own instantiation (their gencode flags may differ)
// Zeroes rows [0, lo(0)) and [hi(E-1), R) of out (and out2 when given), both (R, cols); with no
// experts, every row.
template <typename T>
__global__ void zero_outside_kernel(const int32_t* off, int64_t E, int64_t R, int64_t cols, T* out, T* out2) {
  T zero;
  if constexpr (sizeof(T) == 1) zero = T(0);  // an e4m3 code
  else zero = from_f<T>(0.f);
  if (E <= 0) {
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < R * cols;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      out[i] = zero;
      if (out2 != nullptr) out2[i] = zero;
    }
    return;
  }
  int64_t lo0, hi0, loE, hiE;
  segment(off, 0, R, lo0, hi0);
  segment(off, E - 1, R, loE, hiE);
  hiE = max(hiE, lo0);
  const int64_t n_before = lo0 * cols, total = n_before + (R - hiE) * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t idx = i < n_before ? i : hiE * cols + (i - n_before);
    out[idx] = zero;
    if (out2 != nullptr) out2[idx] = zero;
  }
}
}  // namespace
#else
// CPU: the clamped segments of every expert, and zero bytes in every row outside all of them
// (row_bytes each; 0 bits are 0.0 in every float type).
inline void segments_and_zero_outside(const int32_t* off, int64_t E, int64_t R, int64_t row_bytes, void* out,
                                      std::vector<int64_t>& lo, std::vector<int64_t>& hi) {
  lo.resize(E), hi.resize(E);
  for (int64_t e = 0; e < E; ++e) segment(off, e, R, lo[e], hi[e]);
  std::vector<char> covered(R, 0);
  for (int64_t e = 0; e < E; ++e) std::fill(covered.begin() + lo[e], covered.begin() + hi[e], 1);
  char* o = static_cast<char*>(out);
  for (int64_t r = 0; r < R; ++r)
    if (!covered[r]) std::memset(o + r * row_bytes, 0, static_cast<size_t>(row_bytes));
}
#endif

}  // namespace nk
