// Device building blocks of the SSD chunk-scan CUDA kernels (math in ssd_chunk_scan.h).
// Included by ssd_chunk_scan_fwd_cuda.cu and ssd_chunk_scan_bwd_cuda.cu only; the API below
// is stable (add to it, do not change what exists). No torch headers.
// Details: docs/ssd.md, section `csrc/ssd/ssd_cuda_common.cuh`.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <type_traits>

#include "common/cuda_dtype.cuh"
#include "common/macros.h"

namespace nk {
namespace ssd {

// Host: a 16-byte aligned, non-null base.
inline bool aligned16(const void* ptr) { return ptr != nullptr && (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }
// Host: rows of esz-byte elements reachable by 16-byte accesses: aligned16(ptr) and every
// stride (in elements; pass the unit-stride dim's length too where it is not a multiple of 8)
// a multiple of 16 bytes.
inline bool vec_ok(const void* ptr, int esz, std::initializer_list<int64_t> strides) {
  if (!aligned16(ptr)) return false;
  for (int64_t s : strides)
    if ((s * esz) % 16 != 0) return false;
  return true;
}

template <DType D> struct Elem;
template <> struct Elem<DType::F32> { using type = float; };
template <> struct Elem<DType::F16> { using type = __half; };
template <> struct Elem<DType::BF16> { using type = __nv_bfloat16; };

using ::nk::from_f;
using ::nk::to_f;
// Row pad of shared-memory tiles, in elements: 16 bytes.
template <typename T> constexpr int kSmemPad = 16 / static_cast<int>(sizeof(T));

NK_HD int round_up16(int v) { return (v + 15) / 16 * 16; }

// 8 consecutive elements starting at p. vec: p is 16-byte aligned (one 16-byte load for
// 16-bit types, two for float).
template <typename S>
NK_DEVICE void load8(const S* p, bool vec, float (&v)[8]) {
  if (vec) {
    if constexpr (sizeof(S) == 2) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p);
      const S* e = reinterpret_cast<const S*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = to_f<S>(e[i]);
    } else {
      const float4 a = *reinterpret_cast<const float4*>(p);
      const float4 b = *reinterpret_cast<const float4*>(p + 4);
      v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
      v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = to_f<S>(p[i]);
  }
}

template <typename T>
NK_DEVICE void store8(T* p, bool vec, const float (&v)[8]) {
  if (vec) {
    if constexpr (sizeof(T) == 2) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < 8; ++i) e[i] = from_f<T>(v[i]);
      *reinterpret_cast<uint4*>(p) = raw;
    } else {
      *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
      *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) p[i] = from_f<T>(v[i]);
  }
}

// dst[r * ld + k] (shared memory, T) = src[r * row_stride + k] for r < rows_valid and
// k < cols_valid, 0 elsewhere in the rows_tile x cols_tile tile. cols_valid and cols_tile
// are multiples of 8; dst and ld keep every 8-chunk 16-byte aligned (ld a multiple of
// kSmemPad<T>). src is only dereferenced inside the valid rows/cols. row_scale (shared
// memory, optional): row r is multiplied by row_scale[r] in float32 before the rounding to T;
// a zero scale writes exact zeros (a masked row stays 0 whatever it holds).
// All kThreads threads of the block call it; the caller syncs before reading dst.
template <int kThreads, typename T, typename S>
NK_DEVICE void load_tile(T* dst, int ld, const S* src, int64_t row_stride, int rows_valid, int rows_tile,
                         int cols_valid, int cols_tile, bool vec, const float* row_scale = nullptr) {
  const int chunks = cols_tile / 8;
  for (int e = threadIdx.x; e < rows_tile * chunks; e += kThreads) {
    const int r = e / chunks;
    const int k = (e - r * chunks) * 8;
    float v[8];
    if (r < rows_valid && k < cols_valid) {
      load8<S>(src + r * row_stride + k, vec, v);
      if (row_scale != nullptr) {
        const float s = row_scale[r];
#pragma unroll
        for (int i = 0; i < 8; ++i) v[i] = s != 0.f ? v[i] * s : 0.f;
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = 0.f;
    }
    store8<T>(dst + r * ld + k, true, v);
  }
}

// One warp's 16 x (16*FN) float32 accumulator tile, C += A B over K (a multiple of 16), A and
// B in shared memory:
//   A(m, k) = kAColMajor ? a[k * lda + m] : a[m * lda + k]      (a: the warp's row 0, k 0)
//   B(k, n) = kBColMajor ? b[n * ldb + k] : b[k * ldb + n]      (b: k 0, column 0)
// Column blocks fn with fn * 16 >= ncols are skipped (neither read nor written), so operand
// tiles need only be round_up16(valid columns) wide. store/load move the accumulator to/from
// a float32 row-major shared tile (the warp's row 0, column 0); which lane holds which
// element is unspecified, so __syncwarp() before other lanes read what store wrote.
// Pointers and leading dims: 32-byte aligned fragment starts (ld a multiple of 8 elements
// for 16-bit types, of 4 for float, and 16-row/16-column offsets).
template <typename T, int FN>
struct WarpTile {
  using Acc = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  Acc acc[FN];

  NK_DEVICE void zero() {
#pragma unroll
    for (int f = 0; f < FN; ++f) nvcuda::wmma::fill_fragment(acc[f], 0.f);
  }

  template <bool kAColMajor, bool kBColMajor>
  NK_DEVICE void mma(const T* a, int lda, const T* b, int ldb, int K, int ncols) {
    namespace w = nvcuda::wmma;
    using ALay = std::conditional_t<kAColMajor, w::col_major, w::row_major>;
    using BLay = std::conditional_t<kBColMajor, w::col_major, w::row_major>;
    for (int k0 = 0; k0 < K; k0 += 16) {
      w::fragment<w::matrix_a, 16, 16, 16, T, ALay> fa;
      w::load_matrix_sync(fa, kAColMajor ? a + k0 * lda : a + k0, lda);
#pragma unroll
      for (int f = 0; f < FN; ++f) {
        if (f * 16 < ncols) {
          w::fragment<w::matrix_b, 16, 16, 16, T, BLay> fb;
          w::load_matrix_sync(fb, kBColMajor ? b + f * 16 * ldb + k0 : b + k0 * ldb + f * 16, ldb);
          w::mma_sync(acc[f], fa, fb, acc[f]);
        }
      }
    }
  }

  NK_DEVICE void store(float* out, int ldo, int ncols) const {
#pragma unroll
    for (int f = 0; f < FN; ++f)
      if (f * 16 < ncols) nvcuda::wmma::store_matrix_sync(out + f * 16, acc[f], ldo, nvcuda::wmma::mem_row_major);
  }

  NK_DEVICE void load(const float* in, int ldi, int ncols) {
#pragma unroll
    for (int f = 0; f < FN; ++f)
      if (f * 16 < ncols) nvcuda::wmma::load_matrix_sync(acc[f], in + f * 16, ldi, nvcuda::wmma::mem_row_major);
  }
};

// float: exact float32 FMAs, k in increasing order. Lane (ty = lane / 4, tx = lane % 4) owns
// rows ty and ty + 8 and, in column block f, columns f * 16 + tx * 4 + {0..3}.
template <int FN>
struct WarpTile<float, FN> {
  float acc[2][FN][4];

  NK_DEVICE void zero() {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int f = 0; f < FN; ++f)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[r][f][e] = 0.f;
  }

  template <bool kAColMajor, bool kBColMajor>
  NK_DEVICE void mma(const float* a, int lda, const float* b, int ldb, int K, int ncols) {
    const int lane = threadIdx.x & 31;
    const int ty = lane >> 2, tx = lane & 3;
#pragma unroll 2
    for (int k = 0; k < K; ++k) {
      const float a0 = kAColMajor ? a[k * lda + ty] : a[ty * lda + k];
      const float a1 = kAColMajor ? a[k * lda + ty + 8] : a[(ty + 8) * lda + k];
#pragma unroll
      for (int f = 0; f < FN; ++f) {
        if (f * 16 < ncols) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int n = f * 16 + tx * 4 + e;
            const float bv = kBColMajor ? b[n * ldb + k] : b[k * ldb + n];
            acc[0][f][e] = fmaf(a0, bv, acc[0][f][e]);
            acc[1][f][e] = fmaf(a1, bv, acc[1][f][e]);
          }
        }
      }
    }
  }

  NK_DEVICE void store(float* out, int ldo, int ncols) const {
    const int lane = threadIdx.x & 31;
    const int ty = lane >> 2, tx = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int f = 0; f < FN; ++f)
        if (f * 16 < ncols)
#pragma unroll
          for (int e = 0; e < 4; ++e) out[(ty + 8 * r) * ldo + f * 16 + tx * 4 + e] = acc[r][f][e];
  }

  NK_DEVICE void load(const float* in, int ldi, int ncols) {
    const int lane = threadIdx.x & 31;
    const int ty = lane >> 2, tx = lane & 3;
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
      for (int f = 0; f < FN; ++f)
        if (f * 16 < ncols)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[r][f][e] = in[(ty + 8 * r) * ldi + f * 16 + tx * 4 + e];
  }
};

// Called by one thread: spins until *counter >= target (another block raises it after a
// __threadfence), then fences, so that block's earlier stores are visible (read them with
// __ldcg; the caller's __syncthreads passes this on to its block). Under tools/cuda_emu blocks
// run in order, so the counter must already be there: waiting on a later block is an error.
NK_DEVICE void wait_at_least(const unsigned* counter, unsigned target) {
#ifdef NK_CUDA_EMULATOR
  if (*counter < target) throw std::runtime_error("emu: a block waits for a block that runs after it");
#else
  while (*reinterpret_cast<const volatile unsigned*>(counter) < target) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    __nanosleep(32);
#endif
  }
#endif
  __threadfence();
}

}  // namespace ssd
}  // namespace nk
