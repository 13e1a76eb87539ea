// Portable CUDA grouped GEMM over experts (every arch): forward with the relu^2 epilogue, dgrad
// and wgrad, the relu^2 backward fused into the dout operand load. fp16/bf16 on tensor cores
// through wmma (sm_80+; 16x16x16, float32 accumulators), float32 (and fp16/bf16 below sm_80) on
// a SIMT kernel. This is the path for GPUs without an arch-specific kernel and the fallback for
// shapes the arch kernels do not take. This file also picks the path of each call
// (grouped_gemm_cuda_prepare) and runs the passes around the CUTLASS kernels of
// grouped_gemm_*sm90.cu / *sm100.cu (zero fills, relu^2, the relu^2 backward operand; on sm_90
// the forward has relu^2 in the CUTLASS epilogue instead, with the pre-activation beside it when saved).
// Details: docs/moe.md, section `csrc/moe/grouped_gemm_cuda.cu`.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common/arch.h"
#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.cuh"
#include "moe/grouped_gemm.h"
#include "moe/numerics.cuh"
#include "moe/segments.cuh"

namespace nk {
namespace {

enum Mode : int { kFwd = 0, kDgrad = 1, kWgrad = 2 };

constexpr int kThreads = 256;

// ---------------------------------------------------------------- schedule helpers

// tile_off[0] = 0, tile_off[e + 1] = tile_off[e] + ceil(count_e / bm). One block of 1024 threads:
// each thread sums a run of experts, a shared-memory scan combines the runs.
__global__ void __launch_bounds__(1024) tile_offsets_kernel(const int32_t* off, int64_t E, int64_t R, int bm,
                                                            int32_t* tile_off) {
  __shared__ int32_t sums[1024];
  const int tid = threadIdx.x;
  const int64_t per = (E + blockDim.x - 1) / blockDim.x;
  const int64_t e0 = min(E, tid * per), e1 = min(E, e0 + per);
  int32_t local = 0;
  for (int64_t e = e0; e < e1; ++e) {
    int64_t lo, hi;
    segment(off, e, R, lo, hi);
    local += static_cast<int32_t>((hi - lo + bm - 1) / bm);
  }
  sums[tid] = local;
  __syncthreads();
  for (int d = 1; d < static_cast<int>(blockDim.x); d <<= 1) {
    const int32_t v = tid >= d ? sums[tid - d] : 0;
    __syncthreads();
    sums[tid] += v;
    __syncthreads();
  }
  int32_t run = sums[tid] - local;  // exclusive prefix of this thread's run
  if (tid == 0) tile_off[0] = 0;
  for (int64_t e = e0; e < e1; ++e) {
    int64_t lo, hi;
    segment(off, e, R, lo, hi);
    run += static_cast<int32_t>((hi - lo + bm - 1) / bm);
    tile_off[e + 1] = run;
  }
}

// Row tile t -> (expert, first row, end row); false when t is past the last tile.
NK_DEVICE bool resolve_row_tile(const int32_t* off, const int32_t* tile_off, int64_t E, int64_t R, int bm,
                                int64_t t, int64_t& e, int64_t& m0, int64_t& m_hi) {
  if (t >= tile_off[E]) return false;
  int64_t lo_e = 0, hi_e = E;  // last e with tile_off[e] <= t: invariant tile_off[lo_e] <= t < tile_off[hi_e]
  while (hi_e - lo_e > 1) {
    const int64_t mid = (lo_e + hi_e) / 2;
    if (tile_off[mid] <= t) lo_e = mid;
    else hi_e = mid;
  }
  e = lo_e;
  int64_t lo, hi;
  segment(off, e, R, lo, hi);
  m0 = lo + (t - tile_off[e]) * static_cast<int64_t>(bm);
  m_hi = hi;
  return m0 < m_hi;
}

// The dgrad/wgrad operand g = dout, or round_T(dout * 2 * relu(pre)).
template <typename T>
NK_DEVICE T act_bwd(T d, T pre) {
  return from_f<T>(relu2_grad(to_f(d), to_f(pre)));
}

// Everything a block needs to find its operands (one op, one block).
struct Problem {
  int64_t m0, m_hi;        // output rows [m0, m_hi) of this tile
  int64_t n0, n_hi;        // output cols [n0, n_hi)
  int64_t k_lo, k_hi;      // reduction range
  const void* A;  const void* A_pre;  int64_t lda;  // A rows/cols in gmem order (see header)
  const void* B;  int64_t ldb;
  void* C;  void* C_pre;  int64_t ldc;  // C (m, n) at C + m * ldc + n
};

// Sets up block (bx, by, bz) of `mode`; false when the block has nothing to do.
template <int MODE>
NK_DEVICE bool make_problem(const GroupedGemmParams& p, int bm, int bn, int64_t bx, int64_t by, int64_t bz,
                            int dsize, Problem& q) {
  const char* w = static_cast<const char*>(p.w);
  if (MODE == kWgrad) {
    const int64_t e = bz;
    segment(p.offsets, e, p.R, q.k_lo, q.k_hi);
    q.m0 = bx * bm, q.m_hi = p.N;
    q.n0 = by * bn, q.n_hi = p.K;
    q.A = p.dout, q.A_pre = p.pre_in, q.lda = p.N;
    q.B = p.a, q.ldb = p.K;
    q.C = static_cast<char*>(p.out) + e * p.N * p.K * dsize, q.C_pre = nullptr, q.ldc = p.K;
    return true;
  }
  int64_t e;
  if (!resolve_row_tile(p.offsets, p.tile_offsets, p.E, p.R, bm, bx, e, q.m0, q.m_hi)) return false;
  q.n0 = by * bn;
  q.k_lo = 0;
  if (MODE == kFwd) {
    q.n_hi = p.N, q.k_hi = p.K;
    q.A = p.a, q.A_pre = nullptr, q.lda = p.K;
    q.B = w + e * p.N * p.K * dsize, q.ldb = p.K;
    q.C = p.out, q.C_pre = p.pre_out, q.ldc = p.N;
  } else {
    q.n_hi = p.K, q.k_hi = p.N;
    q.A = p.dout, q.A_pre = p.pre_in, q.lda = p.N;
    q.B = w + e * p.N * p.K * dsize, q.ldb = p.K;
    q.C = p.out, q.C_pre = nullptr, q.ldc = p.K;
  }
  return true;
}

// Epilogue of one output element (m, n) already known to be in range.
template <typename T, int MODE>
NK_DEVICE void store_out(const Problem& q, GgAct act, int64_t m, int64_t n, float v) {
  const int64_t idx = m * q.ldc + n;
  if (MODE == kFwd) {
    if (q.C_pre != nullptr) static_cast<T*>(q.C_pre)[idx] = from_f<T>(v);
    if (act == GgAct::Relu2) v = relu2(v);
  }
  static_cast<T*>(q.C)[idx] = from_f<T>(v);
}

// ---------------------------------------------------------------- tensor-core kernel (fp16/bf16)

constexpr int kTcBM = 128, kTcBN = 128, kTcBK = 32, kPad = 8;

template <typename T>
struct alignas(16) Vec8 {
  T v[8];
};

// One operand tile of ROWS x COLS elements (COLS contiguous in global and shared memory),
// 8-element chunks, loaded into registers then stored to shared memory.
template <typename T, int ROWS, int COLS, bool DACT>
struct TileLoader {
  static constexpr int kChunksPerRow = COLS / 8;
  static constexpr int kChunks = ROWS * COLS / 8 / kThreads;
  static_assert(ROWS * COLS % (8 * kThreads) == 0, "tile must split evenly into 8-element chunks");
  Vec8<T> regs[kChunks];

  NK_DEVICE void load(const T* base, const T* pre, int64_t ld, int64_t row0, int64_t row_hi, int64_t col0,
                      int64_t col_hi, bool vec_ok) {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int c = threadIdx.x + i * kThreads;
      const int64_t gr = row0 + c / kChunksPerRow, gc = col0 + (c % kChunksPerRow) * 8;
      Vec8<T>& r = regs[i];
      if (gr < row_hi && vec_ok && gc + 8 <= col_hi) {
        *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(base + gr * ld + gc);
        if (DACT) {
          Vec8<T> pv;
          *reinterpret_cast<uint4*>(&pv) = *reinterpret_cast<const uint4*>(pre + gr * ld + gc);
#pragma unroll
          for (int j = 0; j < 8; ++j) r.v[j] = act_bwd<T>(r.v[j], pv.v[j]);
        }
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          T x = from_f<T>(0.f);
          if (gr < row_hi && gc + j < col_hi) {
            x = base[gr * ld + gc + j];
            if (DACT) x = act_bwd<T>(x, pre[gr * ld + gc + j]);
          }
          r.v[j] = x;
        }
      }
    }
  }

  NK_DEVICE void store(T* smem) const {
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int c = threadIdx.x + i * kThreads;
      const int r = c / kChunksPerRow, cc = (c % kChunksPerRow) * 8;
      *reinterpret_cast<uint4*>(smem + r * (COLS + kPad) + cc) = *reinterpret_cast<const uint4*>(&regs[i]);
    }
  }
};

template <typename T, int MODE, bool DACT>
__global__ void __launch_bounds__(kThreads) grouped_gemm_tc_kernel(GroupedGemmParams p) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr bool kAK = MODE != kWgrad;  // A k-major (else m-major)
  constexpr bool kBK = MODE == kFwd;    // B k-major (else n-major)
  constexpr int A_ROWS = kAK ? kTcBM : kTcBK, A_COLS = kAK ? kTcBK : kTcBM;
  constexpr int B_ROWS = kBK ? kTcBN : kTcBK, B_COLS = kBK ? kTcBK : kTcBN;
  constexpr int A_ELEMS = A_ROWS * (A_COLS + kPad), B_ELEMS = B_ROWS * (B_COLS + kPad);
  constexpr int kStageBytes = 2 * (A_ELEMS + B_ELEMS) * static_cast<int>(sizeof(T));
  constexpr int kEpiBytes = (kThreads / 32) * 16 * 16 * static_cast<int>(sizeof(float));
  constexpr int kSmemBytes = kStageBytes > kEpiBytes ? kStageBytes : kEpiBytes;
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory limit");
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  T* As = reinterpret_cast<T*>(smem);     // [2][A_ELEMS]
  T* Bs = As + 2 * A_ELEMS;               // [2][B_ELEMS]

  Problem q;
  if (!make_problem<MODE>(p, kTcBM, kTcBN, blockIdx.x, blockIdx.y, blockIdx.z, sizeof(T), q)) return;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / 4, wn = warp % 4;  // 2 x 4 warps, 64 x 32 each

  const T* A = static_cast<const T*>(q.A);
  const T* Ap = static_cast<const T*>(q.A_pre);
  const T* B = static_cast<const T*>(q.B);
  const bool a_vec = q.lda % 8 == 0 && aligned16(A) && (!DACT || aligned16(Ap));
  const bool b_vec = q.ldb % 8 == 0 && aligned16(B);

  TileLoader<T, A_ROWS, A_COLS, DACT> la;
  TileLoader<T, B_ROWS, B_COLS, false> lb;
  auto load_slice = [&](int64_t k0) {
    if (kAK) la.load(A, Ap, q.lda, q.m0, q.m_hi, k0, q.k_hi, a_vec);
    else la.load(A, Ap, q.lda, k0, q.k_hi, q.m0, q.m_hi, a_vec);
    if (kBK) lb.load(B, nullptr, q.ldb, q.n0, q.n_hi, k0, q.k_hi, b_vec);
    else lb.load(B, nullptr, q.ldb, k0, q.k_hi, q.n0, q.n_hi, b_vec);
  };

  using ALayout = typename std::conditional<kAK, wmma::row_major, wmma::col_major>::type;
  using BLayout = typename std::conditional<kBK, wmma::col_major, wmma::row_major>::type;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  const int64_t nslices = (q.k_hi - q.k_lo + kTcBK - 1) / kTcBK;
  if (nslices > 0) {
    load_slice(q.k_lo);
    la.store(As);
    lb.store(Bs);
  }
  __syncthreads();
  for (int64_t s = 0; s < nslices; ++s) {
    const int buf = static_cast<int>(s & 1);
    if (s + 1 < nslices) load_slice(q.k_lo + (s + 1) * kTcBK);
    const T* as = As + buf * A_ELEMS;
    const T* bs = Bs + buf * B_ELEMS;
#pragma unroll
    for (int kk = 0; kk < kTcBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> fa[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = wm * 64 + i * 16;
        if (kAK) wmma::load_matrix_sync(fa[i], as + m * (A_COLS + kPad) + kk, A_COLS + kPad);
        else wmma::load_matrix_sync(fa[i], as + kk * (A_COLS + kPad) + m, A_COLS + kPad);
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int n = wn * 32 + j * 16;
        if (kBK) wmma::load_matrix_sync(fb[j], bs + n * (B_COLS + kPad) + kk, B_COLS + kPad);
        else wmma::load_matrix_sync(fb[j], bs + kk * (B_COLS + kPad) + n, B_COLS + kPad);
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    if (s + 1 < nslices) {
      la.store(As + (buf ^ 1) * A_ELEMS);
      lb.store(Bs + (buf ^ 1) * B_ELEMS);
    }
    __syncthreads();
  }

  // Epilogue: each warp stages one 16 x 16 accumulator at a time in its own shared slot
  // (the operand buffers are free after the last barrier), then writes it with bounds checks.
  float* stage = reinterpret_cast<float*>(smem) + warp * 256;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(stage, acc[i][j], 16, wmma::mem_row_major);
      __syncwarp();
      const int64_t mb = q.m0 + wm * 64 + i * 16, nb = q.n0 + wn * 32 + j * 16;
#pragma unroll
      for (int t = lane; t < 256; t += 32) {
        const int64_t m = mb + t / 16, n = nb + t % 16;
        if (m < q.m_hi && n < q.n_hi) store_out<T, MODE>(q, p.act, m, n, stage[t]);
      }
      __syncwarp();
    }
  }
#else
  __trap();  // launched only on sm_80+ (the launcher picks the SIMT kernel below that)
#endif
}

// ---------------------------------------------------------------- SIMT kernel (fp32, pre-sm_80)

constexpr int kSBM = 64, kSBN = 64, kSBK = 16;

template <typename T, int MODE, bool DACT>
__global__ void __launch_bounds__(kThreads) grouped_gemm_simt_kernel(GroupedGemmParams p) {
  constexpr bool kAK = MODE != kWgrad;
  constexpr bool kBK = MODE == kFwd;
  __shared__ float As[kSBK][kSBM + 4];
  __shared__ float Bs[kSBK][kSBN + 4];
  Problem q;
  if (!make_problem<MODE>(p, kSBM, kSBN, blockIdx.x, blockIdx.y, blockIdx.z, sizeof(T), q)) return;
  const T* A = static_cast<const T*>(q.A);
  const T* Ap = static_cast<const T*>(q.A_pre);
  const T* B = static_cast<const T*>(q.B);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int64_t k0 = q.k_lo; k0 < q.k_hi; k0 += kSBK) {
    // 4 elements of each operand per thread, consecutive threads along the contiguous dim.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int idx = threadIdx.x + i * kThreads;
      const int kk = kAK ? idx % kSBK : idx / kSBM, mm = kAK ? idx / kSBK : idx % kSBM;
      const int64_t gm = q.m0 + mm, gk = k0 + kk;
      float v = 0.f;
      if (gm < q.m_hi && gk < q.k_hi) {
        const int64_t off = kAK ? gm * q.lda + gk : gk * q.lda + gm;
        v = DACT ? to_f(act_bwd<T>(A[off], Ap[off])) : to_f(A[off]);
      }
      As[kk][mm] = v;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int idx = threadIdx.x + i * kThreads;
      const int kk = kBK ? idx % kSBK : idx / kSBN, nn = kBK ? idx / kSBK : idx % kSBN;
      const int64_t gn = q.n0 + nn, gk = k0 + kk;
      float v = 0.f;
      if (gn < q.n_hi && gk < q.k_hi) v = to_f(B[kBK ? gn * q.ldb + gk : gk * q.ldb + gn]);
      Bs[kk][nn] = v;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSBK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = q.m0 + ty + 16 * i, n = q.n0 + tx + 16 * j;
      if (m < q.m_hi && n < q.n_hi) store_out<T, MODE>(q, p.act, m, n, acc[i][j]);
    }
  }
}

// ---------------------------------------------------------------- passes of the arch (CUTLASS) path

// The arch path's elementwise passes: 8 elements per step through 16-byte accesses (the arch
// path takes only 16-byte aligned bases and N % 8 == 0, so n % 8 == 0 there; the scalar tail
// keeps any n correct). Same arithmetic per element as the scalar form.

// out[i] = relu(pre[i])^2 (pre may alias out).
template <typename T>
__global__ void relu2_kernel(const T* pre, T* out, int64_t n) {
  const int64_t t0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  auto relu2_of = [](T x) { return from_f<T>(relu2(to_f(x))); };
  for (int64_t i = t0; i < n / 8; i += stride) {
    Vec8<T> v;
    *reinterpret_cast<uint4*>(&v) = reinterpret_cast<const uint4*>(pre)[i];
#pragma unroll
    for (int j = 0; j < 8; ++j) v.v[j] = relu2_of(v.v[j]);
    reinterpret_cast<uint4*>(out)[i] = *reinterpret_cast<const uint4*>(&v);
  }
  for (int64_t i = n / 8 * 8 + t0; i < n; i += stride) out[i] = relu2_of(pre[i]);
}

// g[i] = round_T(dout[i] * 2 * relu(pre[i])), the operand of dgrad and wgrad.
template <typename T>
__global__ void act_bwd_kernel(const T* dout, const T* pre, T* g, int64_t n) {
  const int64_t t0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = t0; i < n / 8; i += stride) {
    Vec8<T> d, pv;
    *reinterpret_cast<uint4*>(&d) = reinterpret_cast<const uint4*>(dout)[i];
    *reinterpret_cast<uint4*>(&pv) = reinterpret_cast<const uint4*>(pre)[i];
#pragma unroll
    for (int j = 0; j < 8; ++j) d.v[j] = act_bwd<T>(d.v[j], pv.v[j]);
    reinterpret_cast<uint4*>(g)[i] = *reinterpret_cast<const uint4*>(&d);
  }
  for (int64_t i = n / 8 * 8 + t0; i < n; i += stride) g[i] = act_bwd<T>(dout[i], pre[i]);
}

// dw[e] = 0 for experts without rows (the grouped GEMM gives them no tiles). Grid (x, E).
template <typename T>
__global__ void zero_empty_experts_kernel(const int32_t* off, int64_t R, int64_t NK, T* dw) {
  const int64_t e = blockIdx.y;
  int64_t lo, hi;
  segment(off, e, R, lo, hi);
  if (hi > lo) return;
  const T zero = from_f<T>(0.f);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < NK;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dw[e * NK + i] = zero;
  }
}

// Blocks of a grid-stride kernel over n elements: ceil(n / kThreads) clamped to [1, cap], computed
// in int64 (n may exceed what an int holds once divided).
int grid_stride_blocks(int64_t n, int64_t cap) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 1 ? 1 : (b > cap ? cap : b));
}

int elementwise_blocks(int64_t n) { return grid_stride_blocks(n, 4096); }

int64_t align256(int64_t n) { return (n + 255) / 256 * 256; }

// ---------------------------------------------------------------- launchers

bool device_has_sm80() { return current_device_cc() >= 80; }

template <typename T, int MODE, bool DACT>
void launch_gemm(const GroupedGemmParams& p, cudaStream_t s, bool tc) {
  const int bm = tc ? kTcBM : kSBM, bn = tc ? kTcBN : kSBN;
  dim3 grid;
  if (MODE == kWgrad) {
    grid = dim3(ceil_div(p.N, bm), ceil_div(p.K, bn), static_cast<unsigned>(p.E));
  } else {
    tile_offsets_kernel<<<1, 1024, 0, s>>>(p.offsets, p.E, p.R, bm, p.tile_offsets);
    NK_CUDA_LAUNCH_CHECK();
    const int64_t cols = MODE == kFwd ? p.N : p.K;
    zero_outside_kernel<T><<<grid_stride_blocks(p.R * cols, 1024), kThreads, 0, s>>>(
        p.offsets, p.E, p.R, cols, static_cast<T*>(p.out), static_cast<T*>(MODE == kFwd ? p.pre_out : nullptr));
    NK_CUDA_LAUNCH_CHECK();
    // R < 2^31 and cols <= 65535 * 64 (the entry's limits), E <= 65535: both fit their grid dims.
    grid = dim3(static_cast<unsigned>(ceil_div(p.R, bm) + p.E), ceil_div(cols, bn), 1);
  }
  if constexpr (!std::is_same_v<T, float>) {
    if (tc) {
      grouped_gemm_tc_kernel<T, MODE, DACT><<<grid, kThreads, 0, s>>>(p);
      NK_CUDA_LAUNCH_CHECK();
      return;
    }
  }
  grouped_gemm_simt_kernel<T, MODE, DACT><<<grid, kThreads, 0, s>>>(p);
  NK_CUDA_LAUNCH_CHECK();
}

#if defined(NK_HAS_SM90) || defined(NK_HAS_SM100)
// NEMOKERNELS_GROUPED_GEMM_TILE=64: the Hopper forward on 64-row tiles (pingpong), opt-in until
// measured (docs/moe.md, issue 19). Read on the host at prepare and at run.
inline bool m64_tiles(const GroupedGemmParams& p, int mode) {
  if (p.arch != 90 || mode != kFwd) return false;
  const char* t = std::getenv("NEMOKERNELS_GROUPED_GEMM_TILE");
  return t != nullptr && std::strcmp(t, "64") == 0;
}

// NEMOKERNELS_GROUPED_GEMM_SWAP_AB=1: the Hopper forward with swapped operands (128 weight rows x
// 32 tokens per tile) when the experts average at most kSwapRowsPerExpert rows and no
// pre-activation is saved; opt-in until measured (docs/moe.md, issue 19).
constexpr int64_t kSwapRowsPerExpert = 32;
inline bool swap_ab(const GroupedGemmParams& p, int mode) {
  if (p.arch != 90 || mode != kFwd || p.pre_out != nullptr || p.R > kSwapRowsPerExpert * p.E) return false;
  const char* t = std::getenv("NEMOKERNELS_GROUPED_GEMM_SWAP_AB");
  return t != nullptr && t[0] == '1';
}

// The Hopper forward's own instantiations; kArchDefault: the fwd / dgrad / wgrad units, with the
// relu^2 pass after the forward when the activation is relu^2 (sm_100; 64-row tiles with a
// saved pre-activation).
enum Sm90Fwd : int { kArchDefault = 0, kRelu2Epi, kRelu2PreEpi, kM64Relu2Epi, kM64Plain, kSwapRelu2Epi, kSwapPlain };
inline Sm90Fwd sm90_fwd(const GroupedGemmParams& p, int mode) {
  if (p.arch != 90 || mode != kFwd) return kArchDefault;
  const bool m64 = m64_tiles(p, mode), relu2 = p.act == GgAct::Relu2;
  if (swap_ab(p, mode)) return relu2 ? kSwapRelu2Epi : kSwapPlain;
  if (!relu2) return m64 ? kM64Plain : kArchDefault;
  if (p.pre_out == nullptr) return m64 ? kM64Relu2Epi : kRelu2Epi;
  return m64 ? kM64Plain : kRelu2PreEpi;  // pre and out from one epilogue (128-row tiles only)
}

int64_t arch_workspace(int arch, int64_t E, int mode) {
#ifdef NK_HAS_SM90
  if (arch == 90) return mode == kWgrad ? grouped_gemm_wgrad_sm90_workspace(E) : grouped_gemm_sm90_workspace(E, mode);
#endif
#ifdef NK_HAS_SM100
  if (arch == 100) return mode == kWgrad ? grouped_gemm_wgrad_sm100_workspace(E) : grouped_gemm_sm100_workspace(E, mode);
#endif
  return 0;
}

void arch_gemm(const GroupedGemmParams& p, int mode, const void* A, const void* B, void* D, void* ws, void* stream) {
#ifdef NK_HAS_SM90
  if (p.arch == 90) {
    if (mode == kWgrad) grouped_gemm_wgrad_sm90_run(p, A, B, D, ws, stream);
    else grouped_gemm_sm90_run(p, mode, A, B, D, ws, stream);
    return;
  }
#endif
#ifdef NK_HAS_SM100
  if (p.arch == 100) {
    if (mode == kWgrad) grouped_gemm_wgrad_sm100_run(p, A, B, D, ws, stream);
    else grouped_gemm_sm100_run(p, mode, A, B, D, ws, stream);
    return;
  }
#endif
}

// The CUTLASS path (bf16): zero fills, the relu^2 backward operand, the grouped GEMM, the
// relu^2 forward pass. Workspace: [g (R x N) when the relu^2 backward is fused][CUTLASS's].
template <int MODE>
void run_arch(const GroupedGemmParams& p, cudaStream_t s) {
  using T = __nv_bfloat16;
  char* ws = static_cast<char*>(p.workspace);
  const int64_t RN = p.R * p.N;
  const void* G = p.dout;
  if (MODE != kFwd && p.pre_in != nullptr) {
    T* g = reinterpret_cast<T*>(ws);
    act_bwd_kernel<T><<<elementwise_blocks(RN / 8 + 1), kThreads, 0, s>>>(static_cast<const T*>(p.dout),
                                                                   static_cast<const T*>(p.pre_in), g, RN);
    NK_CUDA_LAUNCH_CHECK();
    ws += align256(RN * static_cast<int64_t>(sizeof(T)));
    G = g;
  }
  if (MODE == kWgrad) {
    const int64_t NK = p.N * p.K;
    zero_empty_experts_kernel<T><<<dim3(grid_stride_blocks((NK + 3) / 4, 64), static_cast<unsigned>(p.E)), kThreads,
                                   0, s>>>(p.offsets, p.R, NK, static_cast<T*>(p.out));
    NK_CUDA_LAUNCH_CHECK();
    arch_gemm(p, MODE, G, p.a, p.out, ws, s);
    return;
  }
  const int64_t cols = MODE == kFwd ? p.N : p.K;
  zero_outside_kernel<T><<<grid_stride_blocks(p.R * cols, 1024), kThreads, 0, s>>>(
      p.offsets, p.E, p.R, cols, static_cast<T*>(p.out), static_cast<T*>(MODE == kFwd ? p.pre_out : nullptr));
  NK_CUDA_LAUNCH_CHECK();
  if (MODE == kDgrad) {
    arch_gemm(p, MODE, G, p.w, p.out, ws, s);
    return;
  }
  void* D = p.pre_out != nullptr ? p.pre_out : p.out;
  switch (sm90_fwd(p, MODE)) {
#ifdef NK_HAS_SM90
    // relu^2 in the epilogue (and the pre-activation beside it when saved): no pass
    case kRelu2Epi: grouped_gemm_relu2_sm90_run(p, p.a, p.w, p.out, ws, s); return;
    case kRelu2PreEpi: grouped_gemm_relu2_pre_sm90_run(p, p.a, p.w, p.out, p.pre_out, ws, s); return;
    case kM64Relu2Epi: grouped_gemm_m64_relu2_sm90_run(p, p.a, p.w, p.out, ws, s); return;
    case kM64Plain: grouped_gemm_m64_plain_sm90_run(p, p.a, p.w, D, ws, s); break;
    case kSwapRelu2Epi: grouped_gemm_swap_relu2_sm90_run(p, p.a, p.w, p.out, ws, s); return;
    case kSwapPlain: grouped_gemm_swap_plain_sm90_run(p, p.a, p.w, p.out, ws, s); return;
#endif
    default: arch_gemm(p, MODE, p.a, p.w, D, ws, s); break;
  }
  if (p.act == GgAct::Relu2) {
    relu2_kernel<T><<<elementwise_blocks(RN / 8 + 1), kThreads, 0, s>>>(static_cast<const T*>(D), static_cast<T*>(p.out), RN);
    NK_CUDA_LAUNCH_CHECK();
  }
}
#endif

template <int MODE>
void dispatch(const GroupedGemmParams& p, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
#if defined(NK_HAS_SM90) || defined(NK_HAS_SM100)
  if (p.arch != 0) {
    run_arch<MODE>(p, s);
    return;
  }
#endif
  const bool dact = MODE != kFwd && p.pre_in != nullptr;
  auto run = [&](auto tag, bool tc) {
    using T = decltype(tag);
    if (dact) launch_gemm<T, MODE, true>(p, s, tc);
    else launch_gemm<T, MODE, false>(p, s, tc);
  };
  const bool tc = device_has_sm80();
  switch (p.dtype) {
    case GgType::F16: run(__half{}, tc); break;
    case GgType::BF16: run(__nv_bfloat16{}, tc); break;
    default: run(float{}, false); break;  // F32 (F64 never reaches CUDA: the entry rejects it)
  }
}


constexpr int64_t kCutlassIntMax = 2147483647;

}  // namespace

int64_t grouped_gemm_cuda_prepare(GroupedGemmParams& p, GgOp op) {
  p.arch = 0;
  p.workspace = nullptr;
#if defined(NK_HAS_SM90) || defined(NK_HAS_SM100)
  if (grouped_gemm_portable_forced()) return 0;
  // TMA needs 16-byte aligned bases and row strides: bf16 with N, K multiples of 8.
  if (p.dtype != GgType::BF16 || p.N % 8 != 0 || p.K % 8 != 0) return 0;
  for (const void* ptr : {p.a, p.w, p.dout, p.pre_in, static_cast<const void*>(p.out),
                          static_cast<const void*>(p.pre_out)}) {
    if (!aligned16(ptr)) return 0;
  }
  // The CUTLASS problem shapes are int (M = an expert's rows <= R, N, K): larger problems take the
  // portable kernels. (The entry's limits, R < 2^31 and output columns <= 65535 * 64, keep every
  // shape below 2^31 today; the guard keeps the int casts in grouped_gemm_cutlass.cuh safe if
  // those limits are ever lifted.)
  const bool fits_int = p.R <= kCutlassIntMax && p.N <= kCutlassIntMax && p.K <= kCutlassIntMax &&
                        p.E <= kCutlassIntMax;
  if (!fits_int) return 0;
  const int cc = current_device_cc();
  int arch = 0;
#ifdef NK_HAS_SM90
  if (cc == 90) arch = 90;
#endif
  // The sm_100 kernels run on the compute capabilities they were compiled for (common/arch.h).
  if (sm100_kernels_run_on(cc)) arch = 100;
  if (arch == 0) return 0;
  const bool fused_bwd = op != kGgFwd && p.pre_in != nullptr;
  const int64_t g_bytes = fused_bwd ? align256(p.R * p.N * 2) : 0;
  p.arch = arch;
  switch (sm90_fwd(p, op)) {
#ifdef NK_HAS_SM90
    case kRelu2Epi: return grouped_gemm_relu2_sm90_workspace(p.E);
    case kRelu2PreEpi: return grouped_gemm_relu2_pre_sm90_workspace(p.E);
    case kM64Relu2Epi: return grouped_gemm_m64_relu2_sm90_workspace(p.E);
    case kM64Plain: return grouped_gemm_m64_plain_sm90_workspace(p.E);
    case kSwapRelu2Epi: return grouped_gemm_swap_relu2_sm90_workspace(p.E);
    case kSwapPlain: return grouped_gemm_swap_plain_sm90_workspace(p.E);
#endif
    default: return g_bytes + arch_workspace(arch, p.E, op);
  }
#else
  (void)op;
  return 0;
#endif
}

bool grouped_gemm_cuda_shared_operand(const GroupedGemmParams& p) {
  GroupedGemmParams d = p, w = p;  // prepare sets arch and workspace: copies, nothing allocated
  grouped_gemm_cuda_prepare(d, kGgDgrad);
  grouped_gemm_cuda_prepare(w, kGgWgrad);
  return p.pre_in != nullptr && d.arch != 0 && w.arch != 0;
}

void grouped_gemm_relu2_operand_cuda(const GroupedGemmParams& p, void* g, void* stream) {
  using T = __nv_bfloat16;  // the arch kernels' only dtype (grouped_gemm_cuda_shared_operand)
  const int64_t RN = p.R * p.N;
  if (RN == 0) return;
  act_bwd_kernel<T><<<elementwise_blocks(RN / 8 + 1), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const T*>(p.dout), static_cast<const T*>(p.pre_in), static_cast<T*>(g), RN);
  NK_CUDA_LAUNCH_CHECK();
}

void grouped_gemm_fwd_cuda(const GroupedGemmParams& p, void* stream) { dispatch<kFwd>(p, stream); }
void grouped_gemm_dgrad_cuda(const GroupedGemmParams& p, void* stream) { dispatch<kDgrad>(p, stream); }
void grouped_gemm_wgrad_cuda(const GroupedGemmParams& p, void* stream) { dispatch<kWgrad>(p, stream); }

}  // namespace nk
