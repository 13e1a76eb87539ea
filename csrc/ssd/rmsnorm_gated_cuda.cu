// CUDA kernels of the gated RMSNorm (math in rmsnorm_gated.h), persistent: grid (ngroups, row
// blocks) sized from the SM count, block (tpu, upb). Block (g, y) owns group g; its upb "row
// lanes" (tpu threads each, a multiple of 32) walk rows y * upb + ty, += gridDim.y * upb. A
// thread owns vectors j = tx + k * tpu (k < NV) of V channels: V = 16 bytes / sizeof(T) when
// every row start is 16-byte aligned, the channel stride is 1 and V divides G, else V = 1. The
// weight of its channels is read once into registers; the backward keeps dweight/dbias in
// registers over its rows and writes one partial row per block, summed by one more launch.
// Cost model and details: docs/ssd.md (issue 18 section; file note `rmsnorm_gated_cuda.cu`).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <utility>

#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.cuh"
#include "ssd/launch_limits.h"
#include "ssd/numerics.cuh"
#include "ssd/rmsnorm_gated.h"

namespace nk {
namespace {

constexpr int kMaxThreads = 512;      // per unit and per block
// Block size aimed at when units are small (upb > 1). 128 lets 5 blocks of the bf16 Nano
// variants (forward 83, backward 96 registers) share an SM: 20 warps, ~30 KB of loads in
// flight, and a block barrier of the backward's 2-warp units waits for 2 units, not 4. Its
// price: twice the backward's partial rows of 256 (one per block; docs/ssd.md, issue 18).
constexpr int kBlockThreads = 128;
// Channels per thread that the cached paths hold in registers: the forward keeps u, the gate
// and the weight per channel (3 floats), the backward xhat, dxhat, ca, cb, weight, dw, db (7).
constexpr int kFwdMaxElems = 16, kBwdMaxElems = 8;
constexpr int kColThreads = 128;      // column kernel (uncached backward's dweight/dbias)
constexpr int kRedCols = 32, kRedSlices = 8;  // final partial-row reduction

// V elements starting at element offset `off`: one 16-byte access when V > 1 (the caller
// guarantees alignment and unit channel stride), one element when V == 1.
template <typename T, int V>
NK_DEVICE void load_v(const void* base, int64_t off, float (&v)[V]) {
  const T* ptr = static_cast<const T*>(base) + off;
  if constexpr (V == 1) {
    v[0] = to_f<T>(*ptr);
  } else {
    static_assert(V * sizeof(T) == 16, "vector accesses are 16 bytes");
    const uint4 raw = *reinterpret_cast<const uint4*>(ptr);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = to_f<T>(e[i]);
  }
}

// The bits of one element, zero-extended.
template <typename T>
NK_DEVICE uint32_t bits_of(T v) {
  if constexpr (sizeof(T) == 4) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  } else {
    uint16_t u;
    memcpy(&u, &v, 2);
    return u;
  }
}

template <typename T, int V>
NK_DEVICE void store_v(void* base, int64_t off, const float (&v)[V]) {
  T* ptr = static_cast<T*>(base) + off;
  if constexpr (V == 1) {
    *ptr = from_f<T>(v[0]);
  } else {
    // Four packed 32-bit words in one st.global.v4: a plain uint4 store came out of NVVM as
    // four 32-bit stores (SASS STG.E, not STG.E.128).
    constexpr int per = 4 / static_cast<int>(sizeof(T));
    uint32_t wd[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      wd[k] = 0;
#pragma unroll
      for (int e = 0; e < per; ++e) wd[k] |= bits_of(from_f<T>(v[k * per + e])) << (16 * e);
    }
#ifdef __CUDA_ARCH__
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(ptr), "r"(wd[0]), "r"(wd[1]), "r"(wd[2]),
                 "r"(wd[3])
                 : "memory");
#else
    *reinterpret_cast<uint4*>(ptr) = make_uint4(wd[0], wd[1], wd[2], wd[3]);
#endif
  }
}

// Parameter (weight or bias, in its own dtype) of channel c as float32.
NK_DEVICE float param_at(const void* base, DType dt, int64_t c) {
  switch (dt) {
    case DType::F16: return to_f<__half>(static_cast<const __half*>(base)[c]);
    case DType::BF16: return to_f<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(base)[c]);
    default: return static_cast<const float*>(base)[c];
  }
}

// V parameters of channels c..c+V-1, element by element: once per block for the cached weight;
// per row only for the bias (an option Nemotron's norm does not use) and the uncached path,
// both L1 hits after the first row.
template <int V>
NK_DEVICE void load_param(const void* base, DType dt, int64_t c, float (&v)[V]) {
#pragma unroll
  for (int i = 0; i < V; ++i) v[i] = param_at(base, dt, c + i);
}

// Sum of v over the blockDim.x threads of this unit (same threadIdx.y). Every thread of the
// block must call it (it may synchronise the block). Fixed order: a butterfly within each warp
// (every lane ends with the same bits), then the warps' sums in index order. `red` holds at
// least blockDim.x * blockDim.y / 32 floats.
NK_DEVICE float unit_sum(float v, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int nw = blockDim.x >> 5;
  if (nw == 1) return v;
  float* mine = red + threadIdx.y * nw;
  __syncthreads();  // the previous call's readers are done with `red`
  if ((threadIdx.x & 31) == 0) mine[threadIdx.x >> 5] = v;
  __syncthreads();
  float s = 0.f;
  for (int i = 0; i < nw; ++i) s += mine[i];
  return s;
}

struct Gates {
  bool first, last;
};
NK_DEVICE Gates gates_of(const RmsNormFwdParams& p) {
  return {p.z != nullptr && !p.norm_before_gate, p.z != nullptr && p.norm_before_gate};
}

// ---- forward --------------------------------------------------------------------------------

// Pass 1 of one vector: norm inputs u and output gates of channels c..c+V-1 of row r.
template <typename T, int V>
NK_DEVICE void fwd_load(const RmsNormFwdParams& p, Gates gt, int64_t r, int64_t c, float (&u)[V],
                        float (&gate)[V]) {
  float xv[V], zv[V];
  load_v<T, V>(p.x, r * p.x_sr + c * p.x_sc, xv);
  if (p.z != nullptr) {
    load_v<T, V>(p.z, r * p.z_sr + c * p.z_sc, zv);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) zv[i] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < V; ++i) {
    u[i] = rmsnorm_input(xv[i], zv[i], gt.first);
    gate[i] = rmsnorm_out_gate(zv[i], gt.last);
  }
}

// Pass 2 of one vector; w: the weight of its channels (registers). The bias, an option that
// Nemotron's norm does not use, is read here (an L1 hit after the block's first row).
template <typename T, int V>
NK_DEVICE void fwd_store(const RmsNormFwdParams& p, int64_t r, int64_t c, const float (&u)[V],
                         const float (&gate)[V], float rstd, const float (&w)[V]) {
  float o[V], b[V];
  if (p.bias != nullptr) {
    load_param<V>(p.bias, p.bias_dtype, c, b);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) b[i] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < V; ++i) o[i] = rmsnorm_output(u[i], rstd, w[i], b[i], gate[i]);
  store_v<T, V>(p.out, r * p.dim + c, o);
}

// The weight of a thread's cached vectors (channels c0 + (tx + k * tpu) * V + [0, V)), read
// once per block.
template <int V, int NV>
NK_DEVICE void load_weights(const RmsNormFwdParams& p, int64_t c0, int64_t nvec, float (&w)[NV][V]) {
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t j = threadIdx.x + int64_t(k) * blockDim.x;
    if (j < nvec) load_param<V>(p.weight, p.weight_dtype, c0 + j * V, w[k]);
  }
}

// The row loop of a persistent block: f(r, active) for r = row lane, += row lanes of the grid.
// The trip count depends on the block only (f may synchronise the block through unit_sum).
template <typename F>
NK_DEVICE void for_block_rows(int64_t rows, F&& f) {
  const int64_t step = int64_t(gridDim.y) * blockDim.y;
  for (int64_t r0 = int64_t(blockIdx.y) * blockDim.y; r0 < rows; r0 += step) f(r0 + threadIdx.y, r0 + threadIdx.y < rows);
}

// grid (ngroups, row blocks), block (tpu, upb). NV > 0: a row's vectors (x and z read once, as
// u and the output gate) and the weight stay in registers; NV == 0 (groups longer than the
// registers hold): pass 2 re-reads x, z and the weight (the unit is still in L1/L2).
template <typename T, int V, int NV>
__global__ void __launch_bounds__(kMaxThreads) fwd_kernel(RmsNormFwdParams p) {
  __shared__ float red[kMaxThreads / 32];
  const Gates gt = gates_of(p);
  const int64_t G = p.group_size, ngroups = p.dim / G, nvec = G / V;
  const int64_t g = blockIdx.x, c0 = g * G;
  float w[NV > 0 ? NV : 1][V];
  if constexpr (NV > 0) load_weights<V, NV>(p, c0, nvec, w);
  for_block_rows(p.rows, [&](int64_t r, bool active) {
    float acc = 0.f;
    if constexpr (NV > 0) {
      float u[NV][V], gate[NV][V];
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int64_t j = threadIdx.x + int64_t(k) * blockDim.x;
        if (active && j < nvec) {
          fwd_load<T, V>(p, gt, r, c0 + j * V, u[k], gate[k]);
#pragma unroll
          for (int i = 0; i < V; ++i) acc = fmaf(u[k][i], u[k][i], acc);
        }
      }
      const float rstd = rmsnorm_rstd(unit_sum(acc, red), static_cast<float>(G), p.eps);
      if (!active) return;  // after the row's last block-wide synchronisation
      if (threadIdx.x == 0) p.rstd[r * ngroups + g] = rstd;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int64_t j = threadIdx.x + int64_t(k) * blockDim.x;
        if (j < nvec) fwd_store<T, V>(p, r, c0 + j * V, u[k], gate[k], rstd, w[k]);
      }
    } else {
      for (int64_t j = threadIdx.x; active && j < nvec; j += blockDim.x) {
        float u[V], gate[V];
        fwd_load<T, V>(p, gt, r, c0 + j * V, u, gate);
#pragma unroll
        for (int i = 0; i < V; ++i) acc = fmaf(u[i], u[i], acc);
      }
      const float rstd = rmsnorm_rstd(unit_sum(acc, red), static_cast<float>(G), p.eps);
      if (!active) return;
      if (threadIdx.x == 0) p.rstd[r * ngroups + g] = rstd;
      for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
        float u[V], gate[V], wv[V];
        fwd_load<T, V>(p, gt, r, c0 + j * V, u, gate);
        load_param<V>(p.weight, p.weight_dtype, c0 + j * V, wv);
        fwd_store<T, V>(p, r, c0 + j * V, u, gate, rstd, wv);
      }
    }
  });
}

// ---- backward -------------------------------------------------------------------------------

// Pass 1 of one vector (channels c..c+V-1 of row r): per channel xhat, dxhat, the pass-2
// coefficients ca, cb and dy (for dweight/dbias); writes dz when the gate comes last. Returns
// this vector's part of sum(dxhat * xhat).
// w: the weight of the vector's channels (registers).
template <typename T, int V>
NK_DEVICE float bwd_pass1(const RmsNormBwdParams& q, Gates gt, int64_t r, int64_t c, float rstd, const float (&w)[V],
                          float (&xh)[V], float (&dxh)[V], float (&ca)[V], float (&cb)[V], float (&dy)[V]) {
  const RmsNormFwdParams& p = q.fwd;
  float xv[V], zv[V], gv[V], dz[V];
  load_v<T, V>(p.x, r * p.x_sr + c * p.x_sc, xv);
  if (p.z != nullptr) {
    load_v<T, V>(p.z, r * p.z_sr + c * p.z_sc, zv);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) zv[i] = 0.f;
  }
  load_v<T, V>(q.dout, r * q.dout_sr + c * q.dout_sc, gv);
  float b[V];
  if (gt.last && p.bias != nullptr) {  // the bias enters the gradient only through a last gate
    load_param<V>(p.bias, p.bias_dtype, c, b);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) b[i] = 0.f;
  }
  float dot = 0.f;
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const RmsNormBwdElem e = rmsnorm_bwd_elem(xv[i], zv[i], gv[i], rstd, w[i], b[i], gt.first, gt.last);
    xh[i] = e.xhat;
    dxh[i] = e.dy * w[i];
    ca[i] = e.ca;
    cb[i] = e.cb;
    dy[i] = e.dy;
    dz[i] = e.dz;
    dot = fmaf(dxh[i], e.xhat, dot);
  }
  if (gt.last) store_v<T, V>(q.dz, r * p.dim + c, dz);
  return dot;
}

template <typename T, int V>
NK_DEVICE void bwd_pass2(const RmsNormBwdParams& q, Gates gt, int64_t r, int64_t c, float rstd, float m,
                         const float (&xh)[V], const float (&dxh)[V], const float (&ca)[V], const float (&cb)[V]) {
  float dx[V], dz[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const float du = rmsnorm_du(dxh[i], xh[i], m, rstd);
    dx[i] = du * ca[i];
    dz[i] = du * cb[i];
  }
  store_v<T, V>(q.dx, r * q.fwd.dim + c, dx);
  if (gt.first) store_v<T, V>(q.dz, r * q.fwd.dim + c, dz);
}

// The block's dweight/dbias: its row lanes' register sums added in lane order through shared
// memory (buf: blockDim.x * blockDim.y * V floats, element i of thread t at i * threads + t),
// written as partial row blockIdx.y (this group's channels only).
template <int V, int NV>
NK_DEVICE void write_partials(const RmsNormBwdParams& q, int64_t c0, int64_t nvec, const float (&dw)[NV][V],
                              const float (&db)[NV][V], float* buf) {
  const int64_t D = q.fwd.dim;
  float* prow = q.partials + int64_t(blockIdx.y) * 2 * D;
  const int threads = blockDim.x * blockDim.y, tid = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int64_t j = threadIdx.x + int64_t(k) * blockDim.x;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      __syncthreads();  // the previous round's readers are done with buf
#pragma unroll
      for (int i = 0; i < V; ++i) buf[i * threads + tid] = h == 0 ? dw[k][i] : db[k][i];
      __syncthreads();
      if (threadIdx.y == 0 && j < nvec) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          float s = 0.f;
          for (int l = 0; l < static_cast<int>(blockDim.y); ++l) s += buf[i * threads + l * blockDim.x + threadIdx.x];
          prow[h * D + c0 + j * V + i] = s;
        }
      }
    }
  }
}

// grid (ngroups, row blocks), block (tpu, upb). NV > 0: a row's xhat, dxhat and gate
// coefficients, the weight, and dweight/dbias over the block's rows stay in registers; one
// partial row per block. NV == 0: re-read, dweight/dbias left to the column kernel.
template <typename T, int V, int NV>
__global__ void __launch_bounds__(kMaxThreads) bwd_kernel(RmsNormBwdParams q) {
  __shared__ float red[kMaxThreads / 32];
  __shared__ float buf[NV > 0 ? kMaxThreads * V : 1];
  const RmsNormFwdParams& p = q.fwd;
  const Gates gt = gates_of(p);
  const int64_t G = p.group_size, ngroups = p.dim / G, nvec = G / V;
  const int64_t g = blockIdx.x, c0 = g * G;
  constexpr int NA = NV > 0 ? NV : 1;
  float w[NA][V], dw[NA][V], db[NA][V];
#pragma unroll
  for (int k = 0; k < NA; ++k)
#pragma unroll
    for (int i = 0; i < V; ++i) dw[k][i] = db[k][i] = 0.f;
  if constexpr (NV > 0) load_weights<V, NV>(p, c0, nvec, w);
  for_block_rows(p.rows, [&](int64_t r, bool active) {
    const float rstd = active ? p.rstd[r * ngroups + g] : 0.f;
    if constexpr (NV > 0) {
      float xh[NV][V], dxh[NV][V], ca[NV][V], cb[NV][V], dot = 0.f;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int64_t j = threadIdx.x + int64_t(k) * blockDim.x;
        if (active && j < nvec) {
          float dy[V];
          dot += bwd_pass1<T, V>(q, gt, r, c0 + j * V, rstd, w[k], xh[k], dxh[k], ca[k], cb[k], dy);
#pragma unroll
          for (int i = 0; i < V; ++i) {
            dw[k][i] = fmaf(dy[i], xh[k][i], dw[k][i]);
            db[k][i] += dy[i];
          }
        }
      }
      const float m = unit_sum(dot, red) / static_cast<float>(G);
      if (!active) return;
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int64_t j = threadIdx.x + int64_t(k) * blockDim.x;
        if (j < nvec) bwd_pass2<T, V>(q, gt, r, c0 + j * V, rstd, m, xh[k], dxh[k], ca[k], cb[k]);
      }
    } else {
      float dot = 0.f;
      for (int64_t j = threadIdx.x; active && j < nvec; j += blockDim.x) {
        float wv[V], xh[V], dxh[V], ca[V], cb[V], dy[V];
        load_param<V>(p.weight, p.weight_dtype, c0 + j * V, wv);
        dot += bwd_pass1<T, V>(q, gt, r, c0 + j * V, rstd, wv, xh, dxh, ca, cb, dy);
      }
      const float m = unit_sum(dot, red) / static_cast<float>(G);
      for (int64_t j = threadIdx.x; active && j < nvec; j += blockDim.x) {
        // Re-reads the inputs; dz of a last gate is rewritten with the same value.
        float wv[V], xh[V], dxh[V], ca[V], cb[V], dy[V];
        load_param<V>(p.weight, p.weight_dtype, c0 + j * V, wv);
        bwd_pass1<T, V>(q, gt, r, c0 + j * V, rstd, wv, xh, dxh, ca, cb, dy);
        bwd_pass2<T, V>(q, gt, r, c0 + j * V, rstd, m, xh, dxh, ca, cb);
      }
    }
  });
  if constexpr (NV > 0) write_partials<V, NV>(q, c0, nvec, dw, db, buf);
}

// Uncached backward's dweight/dbias: a thread per channel walks rows [r0, r0 + rows_per_chunk)
// and writes partial row blockIdx.y.
template <typename T>
__global__ void __launch_bounds__(kColThreads) dwdb_columns_kernel(RmsNormBwdParams q, int64_t rows_per_chunk) {
  const RmsNormFwdParams& p = q.fwd;
  const Gates gt = gates_of(p);
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= p.dim) return;
  const int64_t ngroups = p.dim / p.group_size, g = c / p.group_size;
  const int64_t r0 = int64_t(blockIdx.y) * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < p.rows ? r0 + rows_per_chunk : p.rows;
  const float w = param_at(p.weight, p.weight_dtype, c);
  const float b = (gt.last && p.bias != nullptr) ? param_at(p.bias, p.bias_dtype, c) : 0.f;
  float dw = 0.f, db = 0.f;
  for (int64_t r = r0; r < r1; ++r) {
    float xv[1], zv[1] = {0.f}, gv[1];
    load_v<T, 1>(p.x, r * p.x_sr + c * p.x_sc, xv);
    if (p.z != nullptr) load_v<T, 1>(p.z, r * p.z_sr + c * p.z_sc, zv);
    load_v<T, 1>(q.dout, r * q.dout_sr + c * q.dout_sc, gv);
    const RmsNormBwdElem e = rmsnorm_bwd_elem(xv[0], zv[0], gv[0], p.rstd[r * ngroups + g], w, b, gt.first, gt.last);
    dw = fmaf(e.dy, e.xhat, dw);
    db += e.dy;
  }
  q.partials[int64_t(blockIdx.y) * 2 * p.dim + c] = dw;
  q.partials[int64_t(blockIdx.y) * 2 * p.dim + p.dim + c] = db;
}

// One float32 gradient of a parameter, rounded once to its dtype.
NK_DEVICE void store_param(void* base, DType dt, int64_t c, float v) {
  switch (dt) {
    case DType::F16: static_cast<__half*>(base)[c] = from_f<__half>(v); break;
    case DType::BF16: static_cast<__nv_bfloat16*>(base)[c] = from_f<__nv_bfloat16>(v); break;
    default: static_cast<float*>(base)[c] = v;
  }
}

// dweight/dbias = sums of the partial rows over (2 * dim) columns: block (32 columns, 8
// slices); slice s adds rows s, s + 8, ... in order, then slice sums are added in order.
__global__ void __launch_bounds__(kRedCols * kRedSlices) reduce_partials_kernel(RmsNormBwdParams q) {
  __shared__ float red[kRedSlices][kRedCols];
  const int64_t D = q.fwd.dim;
  const int64_t col = int64_t(blockIdx.x) * kRedCols + threadIdx.x;
  float acc = 0.f;
  if (col < 2 * D)
    for (int64_t pr = threadIdx.y; pr < q.num_partials; pr += kRedSlices) acc += q.partials[pr * 2 * D + col];
  red[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && col < 2 * D) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kRedSlices; ++i) s += red[i][threadIdx.x];
    if (col < D) store_param(q.dweight, q.fwd.weight_dtype, col, s);
    else if (q.dbias != nullptr) store_param(q.dbias, q.fwd.bias_dtype, col - D, s);
  }
}

// ---- launch helpers -------------------------------------------------------------------------

template <typename F>
void dispatch(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f.template operator()<float>(); break;
    case DType::F16: f.template operator()<__half>(); break;
    case DType::BF16: f.template operator()<__nv_bfloat16>(); break;
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid limits (launch_limits.h): grid.x counts units or groups or channel blocks; y is capped.
constexpr const char* kGroupsAdvice = "use a larger group_size (fewer groups per row) or split the channels";
constexpr const char* kDimAdvice = "split the channels (D) into smaller calls";

// 16-byte accesses are legal when V divides the group and every tensor's rows start on a
// 16-byte boundary with unit channel stride (the parameters are read element by element).
// Entries with a null pointer are skipped.
bool vec_ok(int V, int esize, int64_t G,
            std::initializer_list<std::pair<const void*, std::pair<int64_t, int64_t>>> ts) {
  if (G % V != 0) return false;
  for (const auto& [ptr, st] : ts) {
    if (ptr == nullptr) continue;
    if (reinterpret_cast<uintptr_t>(ptr) % (V * esize) != 0 || st.second != 1 || st.first % V != 0) return false;
  }
  return true;
}

// How a unit maps onto threads.
struct UnitPlan {
  int V;         // channels per access
  int NV;        // cached vectors per thread (1, 2 or 4); 0: uncached
  int tpu, upb;  // threads per unit (a multiple of 32), units (row lanes) per block
};

// The fewest threads per unit (one warp where the group fits: its sums need no block barrier)
// with at most max_elems cached channels per thread; uncached when kMaxThreads threads cannot
// hold the group.
UnitPlan unit_plan(int64_t G, int V, int max_elems) {
  const int64_t nvec = G / V;
  UnitPlan u{V, 0, kMaxThreads, 1};
  for (int nv : {1, 2, 4}) {
    const int64_t t = cdiv(cdiv(nvec, nv), 32) * 32;
    if (nv * V <= max_elems && t <= kMaxThreads && (u.NV == 0 || t < u.tpu)) {
      u.NV = nv;
      u.tpu = static_cast<int>(t);
    }
  }
  u.upb = std::max(1, kBlockThreads / u.tpu);
  return u;
}

// Calls f.template operator()<V, NV>() for the plan's vector width and cached-vector count;
// only the counts a plan under max_elems can pick are instantiated.
template <typename T, int max_elems, typename F>
void with_plan(const UnitPlan& u, F&& f) {
  auto by_v = [&]<int V>() {
    switch (u.NV) {
      case 0: return f.template operator()<V, 0>();
      case 1: return f.template operator()<V, 1>();
      case 2: if constexpr (2 * V <= max_elems) return f.template operator()<V, 2>(); break;
      case 4: if constexpr (4 * V <= max_elems) return f.template operator()<V, 4>(); break;
    }
    throw std::runtime_error("nemokernels: internal: rmsnorm_fn launch plan");
  };
  constexpr int VV = 16 / sizeof(T);
  if (u.V == VV) by_v.template operator()<VV>();
  else by_v.template operator()<1>();
}

// Resident blocks per SM of kernel K at `threads` threads per block (its registers and shared
// memory bound it), asked of the runtime once per kernel and block size.
template <auto K>
int blocks_per_sm(int threads) {
  static std::atomic<int> cache[kMaxThreads / 32 + 1];
  std::atomic<int>& slot = cache[threads / 32];
  int n = slot.load(std::memory_order_relaxed);
  if (n == 0) {
    NK_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, K, threads, 0));
    n = std::max(n, 1);
    slot.store(n, std::memory_order_relaxed);
  }
  return n;
}

// Row blocks per group: one wave of resident blocks over all groups (the row loop spreads the
// rows; a second, partial wave would idle SMs), and no more than the rows need.
int64_t row_blocks(int64_t rows, int64_t ngroups, const UnitPlan& u, int per_sm) {
  const int64_t resident = int64_t(sm_count()) * per_sm;
  return std::clamp<int64_t>(resident / ngroups, 1, std::min<int64_t>(cdiv(rows, u.upb), kCudaMaxGridYZ));
}

struct Plan {
  UnitPlan unit;
  dim3 grid, block;
  // Backward: column kernel (uncached only) and the partial rows the reduction sums.
  dim3 col_grid;
  int64_t rows_per_chunk = 0;
  int64_t num_partials = 0;
};

// The unit plan and persistent grid of a row kernel; per_sm(unit) gives the kernel's resident
// blocks per SM under that plan.
template <typename T, int max_elems, typename PerSm>
Plan row_plan(const char* op, const char* kernel, int64_t rows, int64_t dim, int64_t G, bool vec, PerSm&& per_sm) {
  Plan pl;
  pl.unit = unit_plan(G, vec ? 16 / static_cast<int>(sizeof(T)) : 1, max_elems);
  const int64_t ngroups = dim / G;
  const int64_t rblocks = row_blocks(rows, ngroups, pl.unit, per_sm(pl.unit));
  checked_grid(op, kernel, {ngroups, rblocks}, kGroupsAdvice);
  pl.grid = dim3(static_cast<unsigned>(ngroups), static_cast<unsigned>(rblocks));
  pl.block = dim3(pl.unit.tpu, pl.unit.upb);
  return pl;
}

template <typename T>
Plan fwd_plan(const RmsNormFwdParams& p) {
  const bool vec = vec_ok(16 / sizeof(T), sizeof(T), p.group_size,
                          {{p.x, {p.x_sr, p.x_sc}}, {p.z, {p.z_sr, p.z_sc}}, {p.out, {p.dim, 1}}});
  return row_plan<T, kFwdMaxElems>("rmsnorm_fn", "forward", p.rows, p.dim, p.group_size, vec, [](const UnitPlan& u) {
    int n = 1;
    with_plan<T, kFwdMaxElems>(u, [&]<int V, int NV>() { n = blocks_per_sm<fwd_kernel<T, V, NV>>(u.tpu * u.upb); });
    return n;
  });
}

template <typename T>
Plan bwd_plan(const RmsNormBwdParams& q) {
  const RmsNormFwdParams& p = q.fwd;
  const bool vec = vec_ok(16 / sizeof(T), sizeof(T), p.group_size,
                          {{p.x, {p.x_sr, p.x_sc}}, {p.z, {p.z_sr, p.z_sc}}, {q.dout, {q.dout_sr, q.dout_sc}},
                           {q.dx, {p.dim, 1}}, {q.dz, {p.dim, 1}}});
  Plan b = row_plan<T, kBwdMaxElems>("rmsnorm_fn (backward)", "backward", p.rows, p.dim, p.group_size, vec,
                                     [](const UnitPlan& u) {
    int n = 1;
    with_plan<T, kBwdMaxElems>(u, [&]<int V, int NV>() { n = blocks_per_sm<bwd_kernel<T, V, NV>>(u.tpu * u.upb); });
    return n;
  });
  if (b.unit.NV > 0) {
    b.num_partials = b.grid.y;
  } else {
    const int64_t cblocks = cdiv(p.dim, kColThreads);
    const int64_t target_cols = int64_t(sm_count()) * (2048 / kColThreads);
    int64_t chunks = std::clamp<int64_t>(cdiv(target_cols, cblocks), 1, std::min<int64_t>(p.rows, kCudaMaxGridYZ));
    b.rows_per_chunk = cdiv(p.rows, chunks);
    chunks = cdiv(p.rows, b.rows_per_chunk);
    checked_grid("rmsnorm_fn (backward)", "dweight column", {cblocks, chunks}, kDimAdvice);
    b.col_grid = dim3(static_cast<unsigned>(cblocks), static_cast<unsigned>(chunks));
    b.num_partials = chunks;
  }
  return b;
}

}  // namespace

void rmsnorm_gated_fwd_cuda(const RmsNormFwdParams& p, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch(p.dtype, [&]<typename T>() {
    const Plan f = fwd_plan<T>(p);
    with_plan<T, kFwdMaxElems>(f.unit, [&]<int V, int NV>() { fwd_kernel<T, V, NV><<<f.grid, f.block, 0, stream>>>(p); });
    NK_CUDA_LAUNCH_CHECK();
  });
}

int64_t rmsnorm_gated_bwd_cuda_num_partials(const RmsNormBwdParams& q) {
  int64_t n = 0;
  dispatch(q.fwd.dtype, [&]<typename T>() { n = bwd_plan<T>(q).num_partials; });
  return n;
}

void rmsnorm_gated_bwd_cuda(const RmsNormBwdParams& q, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch(q.fwd.dtype, [&]<typename T>() {
    const Plan b = bwd_plan<T>(q);
    const int64_t rblocks = checked_grid("rmsnorm_fn (backward)", "dweight reduction", {cdiv(2 * q.fwd.dim, kRedCols)},
                                         kDimAdvice).x;
    if (b.num_partials != q.num_partials)
      throw std::runtime_error("nemokernels: internal: rmsnorm_fn backward partial rows mismatch");
    with_plan<T, kBwdMaxElems>(b.unit, [&]<int V, int NV>() { bwd_kernel<T, V, NV><<<b.grid, b.block, 0, stream>>>(q); });
    NK_CUDA_LAUNCH_CHECK();
    if (b.unit.NV == 0) {
      dwdb_columns_kernel<T><<<b.col_grid, kColThreads, 0, stream>>>(q, b.rows_per_chunk);
      NK_CUDA_LAUNCH_CHECK();
    }
    reduce_partials_kernel<<<static_cast<unsigned>(rblocks), dim3(kRedCols, kRedSlices), 0, stream>>>(q);
    NK_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace nk
