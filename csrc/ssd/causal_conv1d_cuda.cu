// CUDA kernels of the causal depthwise conv1d (math in causal_conv1d.h).
// Details: docs/ssd.md, section `csrc/ssd/causal_conv1d_cuda.cu`.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.cuh"
#include "ssd/causal_conv1d.h"
#include "ssd/launch_limits.h"
#include "ssd/numerics.cuh"

namespace nk {
namespace {

// Block shapes and steps per thread: ssd/launch_limits.h (the grids are computed there).
constexpr int kChlastThreadsX = kConvChlastThreadsX;  // channel groups per block
constexpr int kChlastThreadsY = kConvChlastThreadsY;  // time tiles per block
constexpr int kChlastNT = kConvChlastNT;              // time steps per thread (channel-last)
constexpr int kTmajorThreads = kConvTmajorThreads;
constexpr int kTmajorNT = kConvTmajorNT;              // time steps per thread (time-major)
// Channel-last channels per thread: 16-byte accesses in the forward; 4 channels in the
// backward, whose per-thread state (windows of x and dy, dweight partials) is twice as
// large, so that enough warps stay resident (8-byte accesses for 16-bit types).
constexpr int kFwdVecBytes = 16;
constexpr int kBwdVC = 4;

// The unsigned vector type of N bytes (one memory access).
template <int N> struct VecOf;
template <> struct VecOf<16> { using type = uint4; };
template <> struct VecOf<8> { using type = uint2; };
template <> struct VecOf<4> { using type = uint32_t; };
template <> struct VecOf<2> { using type = uint16_t; };

// VC channel values of a (b, c, t) tensor starting at element offset `off` (channel c0).
// kVec: one VC*sizeof(T)-byte access (channel stride 1, aligned, all VC channels in range).
template <typename T, int VC, bool kVec>
NK_DEVICE void load_ch(const void* base, int64_t off, int64_t sc, int64_t c0, int64_t dim, float (&v)[VC]) {
  using V = typename VecOf<VC * sizeof(T)>::type;
  const T* ptr = static_cast<const T*>(base) + off;
  if constexpr (kVec) {
    V raw = *reinterpret_cast<const V*>(ptr);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VC; ++i) v[i] = to_f<T>(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VC; ++i) v[i] = c0 + i < dim ? to_f<T>(ptr[i * sc]) : 0.f;
  }
}

template <typename T, int VC, bool kVec>
NK_DEVICE void store_ch(void* base, int64_t off, int64_t sc, int64_t c0, int64_t dim, const float (&v)[VC]) {
  using V = typename VecOf<VC * sizeof(T)>::type;
  T* ptr = static_cast<T*>(base) + off;
  if constexpr (kVec) {
    V raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < VC; ++i) e[i] = from_f<T>(v[i]);
    *reinterpret_cast<V*>(ptr) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < VC; ++i)
      if (c0 + i < dim) ptr[i * sc] = from_f<T>(v[i]);
  }
}

// Reads of one (batch, channel group) row at any time u: x (u < 0 reads the initial
// states), the packed-sequence id, and the upstream gradient.
template <typename T, int W, int VC, bool kVec>
struct Row {
  const Conv1dFwdParams& p;
  int64_t b, c0;

  NK_DEVICE int32_t sid(int64_t u) const {
    return (p.seq_idx != nullptr && u >= 0 && u < p.seqlen) ? p.seq_idx[b * p.seq_sb + u * p.seq_st] : -1;
  }
  NK_DEVICE void x(int64_t u, float (&v)[VC]) const {
    if (u >= 0 && u < p.seqlen) {
      load_ch<T, VC, kVec>(p.x, b * p.x_sb + c0 * p.x_sc + u * p.x_st, p.x_sc, c0, p.dim, v);
    } else if (u < 0 && p.init != nullptr) {
      load_ch<T, VC, false>(p.init, b * p.init_sb + c0 * p.init_sc + (W - 1 + u) * p.init_sj, p.init_sc, c0, p.dim, v);
    } else {
#pragma unroll
      for (int i = 0; i < VC; ++i) v[i] = 0.f;
    }
  }
  NK_DEVICE void weights(float (&w)[VC][W], float (&bias)[VC]) const {
#pragma unroll
    for (int i = 0; i < VC; ++i) {
      const bool in = c0 + i < p.dim;
#pragma unroll
      for (int k = 0; k < W; ++k) w[i][k] = in ? p.weight[(c0 + i) * W + k] : 0.f;
      bias[i] = (in && p.bias != nullptr) ? p.bias[c0 + i] : 0.f;
    }
  }
};

// y at the newest window position (index W-1), taps from another sequence dropped.
template <int W, int VC>
NK_DEVICE void conv_at(const float (&w)[VC][W], const float (&bias)[VC], const float (&xw)[W][VC],
                       const int32_t (&sw)[W], float (&y)[VC]) {
#pragma unroll
  for (int i = 0; i < VC; ++i) {
    float win[W];
#pragma unroll
    for (int k = 0; k < W; ++k) win[k] = sw[k] == sw[W - 1] ? xw[k][i] : 0.f;
    y[i] = conv_window<W>(w[i], win, bias[i]);
  }
}

template <int W, int VC>
NK_DEVICE void shift(float (&xw)[W][VC], int32_t (&sw)[W]) {
#pragma unroll
  for (int k = 0; k < W - 1; ++k) {
    sw[k] = sw[k + 1];
#pragma unroll
    for (int i = 0; i < VC; ++i) xw[k][i] = xw[k + 1][i];
  }
}

// Forward over time steps [t0, t0 + NT) of one (b, channel group) row.
template <typename T, int W, int VC, int NT, bool kVec>
NK_DEVICE void fwd_tile(const Conv1dFwdParams& p, int64_t b, int64_t c0, int64_t t0) {
  Row<T, W, VC, kVec> row{p, b, c0};
  // With vector access, every load of the tile is issued before any math: NT independent
  // loads in flight per thread instead of one.
  using V = typename VecOf<VC * sizeof(T)>::type;
  V raw[NT];
  if constexpr (kVec) {
#pragma unroll
    for (int s = 0; s < NT; ++s)
      if (t0 + s < p.seqlen)
        raw[s] = *reinterpret_cast<const V*>(static_cast<const T*>(p.x) + b * p.x_sb + c0 + (t0 + s) * p.x_st);
  }
  float w[VC][W], bias[VC], xw[W][VC];
  int32_t sw[W];
  row.weights(w, bias);
#pragma unroll
  for (int k = 0; k < W - 1; ++k) {
    row.x(t0 - (W - 1) + k, xw[k]);
    sw[k] = row.sid(t0 - (W - 1) + k);
  }
#pragma unroll
  for (int s = 0; s < NT; ++s) {
    const int64_t t = t0 + s;
    if (t >= p.seqlen) break;
    if constexpr (kVec) {
      const T* e = reinterpret_cast<const T*>(&raw[s]);
#pragma unroll
      for (int i = 0; i < VC; ++i) xw[W - 1][i] = to_f<T>(e[i]);
    } else {
      row.x(t, xw[W - 1]);
    }
    sw[W - 1] = row.sid(t);
    float y[VC];
    conv_at<W, VC>(w, bias, xw, sw, y);
    if (p.silu) {
#pragma unroll
      for (int i = 0; i < VC; ++i) y[i] = silu(y[i]);
    }
    store_ch<T, VC, kVec>(p.out, b * p.out_sb + c0 * p.out_sc + t * p.out_st, p.out_sc, c0, p.dim, y);
    shift<W, VC>(xw, sw);
  }
}

// Backward over time steps [t0, t0 + NT): writes dx there (and dinit when t0 == 0), and adds
// this tile's dweight/dbias terms to dw/db. Walks u over [t0, tile end + W - 1): at step u it
// has x and the sequence ids of positions u-(W-1)..u, computes dy[u], and emits dx[u-(W-1)].
template <typename T, int W, int VC, int NT, bool kVec>
NK_DEVICE void bwd_tile(const Conv1dBwdParams& q, int64_t b, int64_t c0, int64_t t0,
                        float (&dw)[VC][W], float (&db)[VC]) {
  const Conv1dFwdParams& p = q.fwd;
  Row<T, W, VC, kVec> row{p, b, c0};
  float w[VC][W], bias[VC], xw[W][VC], dyw[W][VC];
  int32_t sw[W];
  row.weights(w, bias);
#pragma unroll
  for (int k = 0; k < W - 1; ++k) {
    row.x(t0 - (W - 1) + k, xw[k]);
    sw[k] = row.sid(t0 - (W - 1) + k);
  }
  // dy before t0 reaches only dinit (t0 == 0, where it is zero): start the window at zero.
#pragma unroll
  for (int k = 0; k < W; ++k)
#pragma unroll
    for (int i = 0; i < VC; ++i) dyw[k][i] = 0.f;
  const int64_t tend = t0 + NT < p.seqlen ? t0 + NT : p.seqlen;
  const int64_t L = p.seqlen, first_final = L - (W - 1);
#pragma unroll
  for (int s = 0; s < NT + W - 1; ++s) {
    const int64_t u = t0 + s;
    if (u >= tend + W - 1) break;
    row.x(u, xw[W - 1]);
    sw[W - 1] = row.sid(u);
    // dy[u] (zero past the end)
    float dy[VC];
    if (u < L) {
      load_ch<T, VC, kVec>(q.dout, b * q.dout_sb + c0 * q.dout_sc + u * q.dout_st, q.dout_sc, c0, p.dim, dy);
      if (p.silu) {
        float y[VC];
        conv_at<W, VC>(w, bias, xw, sw, y);
#pragma unroll
        for (int i = 0; i < VC; ++i) dy[i] *= silu_grad(y[i]);
      }
    } else {
#pragma unroll
      for (int i = 0; i < VC; ++i) dy[i] = 0.f;
    }
#pragma unroll
    for (int k = 0; k < W - 1; ++k)
#pragma unroll
      for (int i = 0; i < VC; ++i) dyw[k][i] = dyw[k + 1][i];
#pragma unroll
    for (int i = 0; i < VC; ++i) dyw[W - 1][i] = dy[i];
    // weight/bias terms of output u
    if (u < tend) {
#pragma unroll
      for (int i = 0; i < VC; ++i) {
#pragma unroll
        for (int k = 0; k < W; ++k) dw[i][k] = fmaf(dy[i], sw[k] == sw[W - 1] ? xw[k][i] : 0.f, dw[i][k]);
        db[i] += dy[i];
      }
    }
    // dx at t = u-(W-1): sum_k w[k] dy[t+W-1-k], same sequence as t only
    const int64_t t = u - (W - 1);
    const bool emit_dx = t >= t0, emit_dinit = !emit_dx && t0 == 0 && q.dinit != nullptr;
    if (emit_dx || emit_dinit) {
      float g[VC];
#pragma unroll
      for (int i = 0; i < VC; ++i) {
        float acc = 0.f;
#pragma unroll
        for (int k = 0; k < W; ++k) acc = fmaf(w[i][k], sw[W - 1 - k] == sw[0] ? dyw[W - 1 - k][i] : 0.f, acc);
        g[i] = acc;
      }
      if (q.dfinal != nullptr && t >= first_final) {
        float f[VC];
        load_ch<T, VC, false>(q.dfinal, b * q.dfin_sb + c0 * q.dfin_sc + (t - first_final) * q.dfin_sj,
                              q.dfin_sc, c0, p.dim, f);
#pragma unroll
        for (int i = 0; i < VC; ++i) g[i] += f[i];
      }
      if (emit_dx)
        store_ch<T, VC, kVec>(q.dx, b * q.dx_sb + c0 * q.dx_sc + t * q.dx_st, q.dx_sc, c0, p.dim, g);
      else
        store_ch<T, VC, false>(q.dinit, b * q.dinit_sb + c0 * q.dinit_sc + (t + W - 1) * q.dinit_sj,
                               q.dinit_sc, c0, p.dim, g);
    }
    shift<W, VC>(xw, sw);
  }
}

// ---- kernels ------------------------------------------------------------------------------

template <typename T, int W, bool kVec>
__global__ void __launch_bounds__(kChlastThreadsX * kChlastThreadsY)
fwd_chlast_kernel(Conv1dFwdParams p) {
  constexpr int VC = kFwdVecBytes / sizeof(T);
  const int64_t c0 = (int64_t(blockIdx.x) * kChlastThreadsX + threadIdx.x) * VC;
  if (c0 >= p.dim) return;
  // Grid-stride over time tiles: grid.y is capped at 65535 blocks (conv1d_fwd_grid), so any
  // sequence length fits one launch.
  const int64_t step = int64_t(gridDim.y) * kChlastThreadsY * kChlastNT;
  for (int64_t t0 = (int64_t(blockIdx.y) * kChlastThreadsY + threadIdx.y) * kChlastNT; t0 < p.seqlen; t0 += step)
    fwd_tile<T, W, VC, kChlastNT, kVec>(p, blockIdx.z, c0, t0);
}

template <typename T, int W>
__global__ void __launch_bounds__(kTmajorThreads) fwd_tmajor_kernel(Conv1dFwdParams p) {
  const int64_t t0 = (int64_t(blockIdx.x) * kTmajorThreads + threadIdx.x) * kTmajorNT;
  if (t0 >= p.seqlen) return;
  for (int64_t c = blockIdx.y; c < p.dim; c += gridDim.y) fwd_tile<T, W, 1, kTmajorNT, false>(p, blockIdx.z, c, t0);
}

template <typename T, int W>
__global__ void final_states_kernel(Conv1dFwdParams p) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // over (b, c, j)
  if (i >= p.batch * p.dim * (W - 1)) return;
  const int64_t j = i % (W - 1), c = (i / (W - 1)) % p.dim, b = i / ((W - 1) * p.dim);
  float v[1];
  Row<T, W, 1, false>{p, b, c}.x(p.seqlen - (W - 1) + j, v);
  static_cast<T*>(p.final_states)[b * p.fin_sb + c * p.fin_sc + j * p.fin_sj] = from_f<T>(v[0]);
}

// Sums the VC*(W+1) values of the `members` threads that share a channel group, in member
// order, and writes them as partial row `prow`. Threads: (group g, member m).
template <int W, int VC>
NK_DEVICE void write_partials(const Conv1dBwdParams& q, float* red, int groups, int members, int g, int m,
                              int64_t c0, int64_t prow, const float (&dw)[VC][W], const float (&db)[VC]) {
  constexpr int R = VC * (W + 1);
  float* mine = red + (m * groups + g) * R;
#pragma unroll
  for (int i = 0; i < VC; ++i) {
#pragma unroll
    for (int k = 0; k < W; ++k) mine[i * (W + 1) + k] = dw[i][k];
    mine[i * (W + 1) + W] = db[i];
  }
  __syncthreads();
  // Spread the summation of the R values of each group over its members.
  for (int r = m; r < R; r += members) {
    const int64_t c = c0 + r / (W + 1);
    float acc = 0.f;
    for (int mm = 0; mm < members; ++mm) acc += red[(mm * groups + g) * R + r];
    if (c < q.fwd.dim) q.partials[(prow * q.fwd.dim + c) * (W + 1) + r % (W + 1)] = acc;
  }
  __syncthreads();
}

template <typename T, int W, bool kVec>
__global__ void __launch_bounds__(kChlastThreadsX * kChlastThreadsY)
bwd_chlast_kernel(Conv1dBwdParams q) {
  constexpr int VC = kBwdVC;
  __shared__ float red[kChlastThreadsX * kChlastThreadsY * VC * (W + 1)];
  const int64_t c0 = (int64_t(blockIdx.x) * kChlastThreadsX + threadIdx.x) * VC;
  const int64_t b = blockIdx.z;
  float dw[VC][W] = {}, db[VC] = {};
  // Grid-stride over time tiles keeps the number of partial rows small.
  const int64_t step = int64_t(gridDim.y) * kChlastThreadsY * kChlastNT;
  for (int64_t t0 = (int64_t(blockIdx.y) * kChlastThreadsY + threadIdx.y) * kChlastNT; t0 < q.fwd.seqlen; t0 += step)
    if (c0 < q.fwd.dim) bwd_tile<T, W, VC, kChlastNT, kVec>(q, b, c0, t0, dw, db);
  write_partials<W, VC>(q, red, kChlastThreadsX, kChlastThreadsY, threadIdx.x, threadIdx.y, c0,
                        b * gridDim.y + blockIdx.y, dw, db);
}

template <typename T, int W>
__global__ void __launch_bounds__(kTmajorThreads) bwd_tmajor_kernel(Conv1dBwdParams q) {
  __shared__ float red[kTmajorThreads * (W + 1)];
  const int64_t b = blockIdx.z;
  const int64_t step = int64_t(gridDim.x) * kTmajorThreads * kTmajorNT;
  for (int64_t c = blockIdx.y; c < q.fwd.dim; c += gridDim.y) {
    float dw[1][W] = {}, db[1] = {};
    for (int64_t t0 = (int64_t(blockIdx.x) * kTmajorThreads + threadIdx.x) * kTmajorNT; t0 < q.fwd.seqlen; t0 += step)
      bwd_tile<T, W, 1, kTmajorNT, false>(q, b, c, t0, dw, db);
    write_partials<W, 1>(q, red, 1, kTmajorThreads, 0, threadIdx.x, c, b * gridDim.x + blockIdx.x, dw, db);
  }
}

template <int W>
__global__ void reduce_partials_kernel(Conv1dBwdParams q) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= q.fwd.dim) return;
  float acc[W + 1] = {};
  for (int64_t r = 0; r < q.num_partials; ++r)
#pragma unroll
    for (int k = 0; k <= W; ++k) acc[k] += q.partials[(r * q.fwd.dim + c) * (W + 1) + k];
#pragma unroll
  for (int k = 0; k < W; ++k) q.dweight[c * W + k] = acc[k];
  if (q.dbias != nullptr) q.dbias[c] = acc[W];
}

template <typename T, int W>
__global__ void update_kernel(Conv1dUpdateParams p) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, b = blockIdx.y;
  if (c >= p.dim) return;
  T* out = static_cast<T*>(p.out) + b * p.out_sb + c * p.out_sc;
  const int64_t sb = p.state_indices != nullptr ? p.state_indices[b] : b;
  if (sb < 0 || sb >= p.state_batch) {
    // Padded slot: zero output, state untouched. Out-of-range slot: NaN output (the host
    // cannot raise without a sync; NaN makes the bad index visible instead of silent).
    for (int64_t t = 0; t < p.seqlen; ++t) out[t * p.out_st] = from_f<T>(sb < 0 ? 0.f : __int_as_float(0x7fc00000));
    return;
  }
  T* state = static_cast<T*>(p.conv_state) + sb * p.st_sb + c * p.st_sc;
  const T* x = static_cast<const T*>(p.x) + b * p.x_sb + c * p.x_sc;
  float w[1][W], bias[1], xw[W][1];
  int32_t sw[W] = {};
#pragma unroll
  for (int k = 0; k < W; ++k) w[0][k] = p.weight[c * W + k];
  bias[0] = p.bias != nullptr ? p.bias[c] : 0.f;
#pragma unroll
  for (int k = 0; k < W - 1; ++k) xw[k][0] = to_f<T>(state[(p.state_len - (W - 1) + k) * p.st_sj]);
  for (int64_t t = 0; t < p.seqlen; ++t) {
    xw[W - 1][0] = to_f<T>(x[t * p.x_st]);
    float y[1];
    conv_at<W, 1>(w, bias, xw, sw, y);
    out[t * p.out_st] = from_f<T>(p.silu ? silu(y[0]) : y[0]);
    shift<W, 1>(xw, sw);
  }
  // The state keeps the last state_len inputs of cat(state, x); increasing j reads ahead of
  // the writes, so the in-place shift is safe.
  for (int64_t j = 0; j < p.state_len; ++j) {
    const int64_t src = j + p.seqlen;
    state[j * p.st_sj] = src < p.state_len ? state[src * p.st_sj] : x[(src - p.state_len) * p.x_st];
  }
}

// ---- launch helpers -----------------------------------------------------------------------

template <typename F>
void dispatch(DType dt, int width, F&& f) {
  auto by_width = [&](auto tag) {
    using T = decltype(tag);
    switch (width) {
      case 2: f.template operator()<T, 2>(); break;
      case 3: f.template operator()<T, 3>(); break;
      case 4: f.template operator()<T, 4>(); break;
      default: throw std::runtime_error("nemokernels: causal_conv1d: width must be 2, 3 or 4");
    }
  };
  switch (dt) {
    case DType::F32: by_width(float{}); break;
    case DType::F16: by_width(__half{}); break;
    case DType::BF16: by_width(__nv_bfloat16{}); break;
  }
}

bool aligned(const void* ptr, int bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

// Channel-last path: x and its output both have channel stride 1.
bool use_chlast(int64_t x_sc, int64_t out_sc, int64_t dim) { return x_sc == 1 && out_sc == 1 && dim > 1; }

// vc-element vector accesses are legal when every row start is aligned to the vector and
// the channels divide into whole vectors.
bool vec_ok(int vc, int elem_bytes, int64_t dim,
            std::initializer_list<std::pair<const void*, std::pair<int64_t, int64_t>>> ts) {
  if (dim % vc) return false;
  for (auto& [ptr, st] : ts)
    if (!aligned(ptr, vc * elem_bytes) || st.first % vc || st.second % vc) return false;
  return true;
}

dim3 to_dim3(const LaunchGrid& g) {
  return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z));
}

// Backward grid (conv1d_bwd_grid): enough blocks for ~8 per SM of the current device, with
// time tiles folded so that the partial rows (batch x time blocks) stay few.
struct BwdGrid {
  dim3 grid, block;
  bool chlast;
  int64_t time_blocks;
};

BwdGrid bwd_grid(const Conv1dBwdParams& q) {
  const auto& p = q.fwd;
  const bool chlast = use_chlast(p.x_sc, q.dx_sc, p.dim) && q.dout_sc == 1;
  const Conv1dBwdGrid g = conv1d_bwd_grid(p.batch, p.dim, p.seqlen, chlast, kBwdVC, 8LL * sm_count());
  const dim3 block = chlast ? dim3(kChlastThreadsX, kChlastThreadsY) : dim3(kTmajorThreads);
  return {to_dim3(g.grid), block, chlast, g.time_blocks};
}

}  // namespace

void causal_conv1d_fwd_cuda(const Conv1dFwdParams& p, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch(p.dtype, p.width, [&]<typename T, int W>() {
    // Every grid is computed (and checked against CUDA's limits) before the first launch.
    constexpr int VC = kFwdVecBytes / sizeof(T);
    const bool chlast = use_chlast(p.x_sc, p.out_sc, p.dim);
    const dim3 grid = p.seqlen > 0 ? to_dim3(conv1d_fwd_grid(p.batch, p.dim, p.seqlen, chlast, VC)) : dim3(1);
    const dim3 fgrid = p.final_states != nullptr ? to_dim3(conv1d_final_states_grid(p.batch, p.dim, W)) : dim3(1);
    if (p.seqlen > 0) {
      if (chlast) {
        dim3 block(kChlastThreadsX, kChlastThreadsY);
        if (vec_ok(VC, sizeof(T), p.dim, {{p.x, {p.x_sb, p.x_st}}, {p.out, {p.out_sb, p.out_st}}}))
          fwd_chlast_kernel<T, W, true><<<grid, block, 0, stream>>>(p);
        else
          fwd_chlast_kernel<T, W, false><<<grid, block, 0, stream>>>(p);
      } else {
        fwd_tmajor_kernel<T, W><<<grid, kTmajorThreads, 0, stream>>>(p);
      }
      NK_CUDA_LAUNCH_CHECK();
    }
    if (p.final_states != nullptr) {
      final_states_kernel<T, W><<<fgrid, kConvSmallThreads, 0, stream>>>(p);
      NK_CUDA_LAUNCH_CHECK();
    }
  });
}

int64_t causal_conv1d_bwd_cuda_num_partials(const Conv1dBwdParams& q) {
  return q.fwd.batch * bwd_grid(q).time_blocks;
}

void causal_conv1d_bwd_cuda(const Conv1dBwdParams& q, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const auto& p = q.fwd;
  const BwdGrid g = bwd_grid(q);
  const dim3 rgrid = to_dim3(conv1d_bwd_reduce_grid(p.dim));
  if (q.num_partials != p.batch * g.time_blocks)
    throw std::runtime_error("nemokernels: internal: causal_conv1d backward partial rows mismatch");
  dispatch(p.dtype, p.width, [&]<typename T, int W>() {
    constexpr int VC = kBwdVC;
    if (g.chlast) {
      if (vec_ok(VC, sizeof(T), p.dim, {{p.x, {p.x_sb, p.x_st}}, {q.dout, {q.dout_sb, q.dout_st}}, {q.dx, {q.dx_sb, q.dx_st}}}))
        bwd_chlast_kernel<T, W, true><<<g.grid, g.block, 0, stream>>>(q);
      else
        bwd_chlast_kernel<T, W, false><<<g.grid, g.block, 0, stream>>>(q);
    } else {
      bwd_tmajor_kernel<T, W><<<g.grid, g.block, 0, stream>>>(q);
    }
    NK_CUDA_LAUNCH_CHECK();
    reduce_partials_kernel<W><<<rgrid, kConvReduceThreads, 0, stream>>>(q);
    NK_CUDA_LAUNCH_CHECK();
  });
}

void causal_conv1d_update_cuda(const Conv1dUpdateParams& p, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const dim3 grid = to_dim3(conv1d_update_grid(p.batch, p.dim));
  dispatch(p.dtype, p.width, [&]<typename T, int W>() {
    update_kernel<T, W><<<grid, kConvUpdateThreads, 0, stream>>>(p);
    NK_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace nk
