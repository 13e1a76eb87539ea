// Emulated nvcuda::wmma (tools/cuda_emu), 16x16x16 shapes with __half / __nv_bfloat16
// operands and float accumulators (plus float operands for completeness).
// Details: tools/cuda_emu/README.md, section `tools/cuda_emu/include/mma.h`.
#pragma once

#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
inline float tof(float v) { return v; }
inline float tof(__half v) { return __half2float(v); }
inline float tof(__nv_bfloat16 v) { return __bfloat162float(v); }
inline int lane() { return static_cast<int>(emu::linear_tid() & 31); }
inline void check(const void* p, unsigned ldm, int elem_bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    throw std::runtime_error(std::string("emu: wmma::") + what + ": pointer not 32-byte aligned");
  if ((ldm * static_cast<unsigned>(elem_bytes)) % 16 != 0)
    throw std::runtime_error(std::string("emu: wmma::") + what + ": ldm " + std::to_string(ldm) +
                             " is not a multiple of 16 bytes");
}
}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "emu: only the m16n16k16 wmma shape is emulated");
  float m[16][16];
  static constexpr int num_elements = 256;
};

template <class Use, int M, int N, int K, class T, class L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
  for (auto& r : f.m)
    for (auto& x : r) x = v;
}

template <class Use, class T, class L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout");
  detail::check(p, ldm, sizeof(T), "load_matrix_sync");
  constexpr bool row = std::is_same_v<L, row_major>;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.m[r][c] = detail::tof(row ? p[r * ldm + c] : p[c * ldm + r]);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm, layout_t l) {
  detail::check(p, ldm, 4, "load_matrix_sync");
  const int ln = detail::lane();
  for (int e = ln; e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    f.m[r][c] = l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
  }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t l) {
  detail::check(p, ldm, 4, "store_matrix_sync");
  const int ln = detail::lane();
  for (int e = ln; e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.m[r][c];
  }
}

// d = a b + c: float32 products and sums (the tensor cores' internal order is not modelled).
template <class T, class LA, class LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  const int ln = detail::lane();
  for (int e = ln; e < 256; e += 32) {
    const int r = e / 16, q = e % 16;
    float acc = c.m[r][q];
    for (int k = 0; k < 16; ++k) acc = fmaf(a.m[r][k], b.m[k][q], acc);
    d.m[r][q] = acc;
  }
}

}  // namespace wmma
}  // namespace nvcuda
