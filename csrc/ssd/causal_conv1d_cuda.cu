// CUDA kernels of the causal depthwise conv1d (math in causal_conv1d.h): forward, backward
// (+ the fixed-order dweight/dbias reduction) and the decode update. The forward and backward
// stage tiles of kConvTileL time steps x kConvTileC channels in shared memory with 16-byte
// loads along whichever dimension has unit stride (channels for channel-last x, time for
// contiguous x), then each thread walks one channel along time with its taps in registers.
// Details: docs/ssd.md, sections `csrc/ssd/causal_conv1d_cuda.cu` and "Causal conv1d at the
// bandwidth limit (issue 18)".
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <type_traits>

#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.cuh"
#include "ssd/causal_conv1d.h"
#include "ssd/launch_limits.h"
#include "ssd/numerics.cuh"

namespace nk {
namespace {

constexpr int TC = kConvTileC;      // channels per tile (one per thread column)
constexpr int TL = kConvTileL;      // time steps per tile
constexpr int NTH = kConvThreads;   // threads per block
constexpr int kSegs = NTH / TC;     // time segments per tile, one thread each per channel
constexpr int kSeg = TL / kSegs;    // time steps a thread walks per tile
static_assert(NTH % TC == 0 && TL % kSegs == 0 && kSeg >= 4, "tile shape");
// Resident backward blocks per SM (the grid is sized for them): __launch_bounds__ caps the
// registers at 65536 / (4 x 128) = 128 per thread; shared memory is ~20 KB (16-bit data) or
// ~38 KB (float32) per block.
constexpr int kBwdBlocksPerSm = 4;

// silu with the fast exponential and division (MUFU.EX2 + MUFU.RCP): the precise form costs
// ~20 instructions per element, which at the copy bandwidth would use most of the SM's issue
// slots. Relative error ~1e-7 (the CPU kernel uses expf and true division). silu' is
// silu_pair(v).df (numerics.cuh), the same fast form.
NK_DEVICE float silu_fast(float v) { return __fdividef(v, 1.0f + __expf(-v)); }

// One element of a tensor of runtime dtype dt (the weight and bias keep their own dtype).
NK_DEVICE float ld_dt(DType dt, const void* base, int64_t off) {
  switch (dt) {
    case DType::F16: return __half2float(static_cast<const __half*>(base)[off]);
    case DType::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[off]);
    default: return static_cast<const float*>(base)[off];
  }
}
NK_DEVICE void st_dt(DType dt, void* base, int64_t off, float v) {
  switch (dt) {
    case DType::F16: static_cast<__half*>(base)[off] = __float2half_rn(v); break;
    case DType::BF16: static_cast<__nv_bfloat16*>(base)[off] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(base)[off] = v;
  }
}

// Taps and bias of channel c (zero past the last channel).
template <int W, typename P>
NK_DEVICE void load_weights(const P& p, int64_t c, float (&w)[W], float& bias) {
  const bool in = c < p.dim;
#pragma unroll
  for (int k = 0; k < W; ++k) w[k] = in ? ld_dt(p.w_dtype, p.weight, c * p.w_sc + k * p.w_sk) : 0.f;
  bias = (in && p.bias != nullptr) ? ld_dt(p.b_dtype, p.bias, c * p.b_s) : 0.f;
}

// How the tile loops reach a (batch, dim, seqlen) tensor: 16-byte vectors along channels
// (channel stride 1), along time (time stride 1), or element by element (any strides).
enum AccMode : int { kVecC = 0, kVecT = 1, kScalar = 2 };
struct TAcc {
  void* ptr;
  int64_t sb, sc, st;
  int mode;
};

// Rows [t_first, t_first + R) x channels [c0, c0 + TC) of `a` (batch b) into tile[R][TC].
// Outside [0, seqlen) x [0, dim) the tile holds zeros, except rows t < 0 that read the initial
// states when `init` is given (its column W-1+t).
template <typename T>
NK_DEVICE float tile_edge(const Conv1dFwdParams& p, const void* init, int64_t b, int64_t c, int64_t t) {
  if (c >= p.dim || t >= p.seqlen || (t < 0 && init == nullptr)) return 0.f;
  return to_f<T>(static_cast<const T*>(init)[b * p.init_sb + c * p.init_sc + (p.width - 1 + t) * p.init_sj]);
}

template <typename T, int R>
NK_DEVICE void load_tile(T (*tile)[TC], const TAcc& a, const Conv1dFwdParams& p, const void* init, int64_t b,
                         int64_t c0, int64_t t_first) {
  constexpr int VC = 16 / sizeof(T);
  const T* base = static_cast<const T*>(a.ptr) + b * a.sb;
  const int64_t L = p.seqlen;
  // The vector paths issue every load of the thread (NIT of them) before the first shared
  // memory store: NIT x 16 bytes in flight per thread instead of one.
  if (a.mode == kVecC) {
    constexpr int VPR = TC / VC;  // vectors per row
    constexpr int NV = R * VPR, NIT = (NV + NTH - 1) / NTH;
    auto inside = [&](int i, int64_t& off) {  // vector i whole inside the tensor; its offset
      const int64_t t = t_first + i / VPR, c = c0 + (i % VPR) * VC;
      off = c + t * a.st;
      return i < NV && t >= 0 && t < L && c < p.dim;
    };
    uint4 v[NIT];
#pragma unroll
    for (int j = 0; j < NIT; ++j) {
      int64_t off;
      if (inside(threadIdx.x + j * NTH, off)) v[j] = *reinterpret_cast<const uint4*>(base + off);
    }
#pragma unroll
    for (int j = 0; j < NIT; ++j) {
      const int i = threadIdx.x + j * NTH;
      int64_t off;
      if (inside(i, off)) *reinterpret_cast<uint4*>(&tile[i / VPR][(i % VPR) * VC]) = v[j];
    }
    for (int i = threadIdx.x; i < NV; i += NTH) {  // vectors outside: zeros or initial states
      int64_t off;
      if (inside(i, off)) continue;
      const int r = i / VPR, cc = (i % VPR) * VC;
#pragma unroll
      for (int e = 0; e < VC; ++e) tile[r][cc + e] = from_f<T>(tile_edge<T>(p, init, b, c0 + cc + e, t_first + r));
    }
  } else if (a.mode == kVecT) {
    // Chunks of VC time steps aligned to absolute time (the rows are 16-byte aligned there);
    // a chunk that sticks out of the tile or the sequence goes element by element.
    const int lead = static_cast<int>(((t_first % VC) + VC) % VC);
    const int nch = (lead + R + VC - 1) / VC;
    for (int i = threadIdx.x; i < nch * TC; i += NTH) {
      const int k = i % nch, cc = i / nch;
      const int r0 = k * VC - lead;  // tile row of the chunk's first step
      const int64_t t = t_first + r0, c = c0 + cc;
      if (r0 >= 0 && r0 + VC <= R && t >= 0 && t + VC <= L && c < p.dim) {
        const uint4 raw = *reinterpret_cast<const uint4*>(base + c * a.sc + t);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int j = 0; j < VC; ++j) tile[r0 + j][cc] = e[j];
      } else {
        for (int j = 0; j < VC; ++j) {
          const int r = r0 + j;
          if (r < 0 || r >= R) continue;
          const int64_t tj = t + j;
          tile[r][cc] = (tj >= 0 && tj < L && c < p.dim) ? base[c * a.sc + tj]
                                                        : from_f<T>(tile_edge<T>(p, init, b, c, tj));
        }
      }
    }
  } else {
    // Any strides: consecutive threads along the dimension of the smaller stride.
    const bool along_c = a.sc <= a.st;
    for (int i = threadIdx.x; i < R * TC; i += NTH) {
      const int r = along_c ? i / TC : i % R, cc = along_c ? i % TC : i / R;
      const int64_t t = t_first + r, c = c0 + cc;
      tile[r][cc] = (t >= 0 && t < L && c < p.dim) ? base[c * a.sc + t * a.st]
                                                    : from_f<T>(tile_edge<T>(p, init, b, c, t));
    }
  }
}

// Tile rows [r_first, r_first + TL) (times [t0, t0 + TL)) to `a`, clipped to the sequence
// and the channels.
template <typename T>
NK_DEVICE void store_tile(const TAcc& a, T (*tile)[TC], int r_first, int64_t b, int64_t c0, int64_t t0, int64_t L,
                          int64_t dim) {
  constexpr int VC = 16 / sizeof(T);
  T* base = static_cast<T*>(a.ptr) + b * a.sb;
  if (a.mode == kVecC) {
    constexpr int VPR = TC / VC;
    for (int i = threadIdx.x; i < TL * VPR; i += NTH) {
      const int r = i / VPR, v = i % VPR;
      const int64_t t = t0 + r, c = c0 + v * VC;
      if (t < L && c < dim)
        *reinterpret_cast<uint4*>(base + c + t * a.st) = *reinterpret_cast<const uint4*>(&tile[r_first + r][v * VC]);
    }
  } else if (a.mode == kVecT) {
    constexpr int NCH = TL / VC;  // t0 is a multiple of TL, so the chunks are aligned
    for (int i = threadIdx.x; i < NCH * TC; i += NTH) {
      const int k = i % NCH, cc = i / NCH;
      const int64_t t = t0 + k * VC, c = c0 + cc;
      if (c >= dim) continue;
      if (t + VC <= L) {
        uint4 raw;
        T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int j = 0; j < VC; ++j) e[j] = tile[r_first + k * VC + j][cc];
        *reinterpret_cast<uint4*>(base + c * a.sc + t) = raw;
      } else {
        for (int j = 0; j < VC && t + j < L; ++j) base[c * a.sc + t + j] = tile[r_first + k * VC + j][cc];
      }
    }
  } else {
    const bool along_c = a.sc <= a.st;
    for (int i = threadIdx.x; i < TL * TC; i += NTH) {
      const int r = along_c ? i / TC : i % TL, cc = along_c ? i % TC : i / TL;
      const int64_t t = t0 + r, c = c0 + cc;
      if (t < L && c < dim) base[c * a.sc + t * a.st] = tile[r_first + r][cc];
    }
  }
}

// Sequence ids of the tile rows (times t_first + r), -1 outside the sequence.
template <int R>
NK_DEVICE void load_sids(int32_t* sids, const Conv1dFwdParams& p, int64_t b, int64_t t_first) {
  for (int r = threadIdx.x; r < R; r += NTH) {
    const int64_t t = t_first + r;
    sids[r] = (t >= 0 && t < p.seqlen) ? p.seq_idx[b * p.seq_sb + t * p.seq_st] : -1;
  }
}

// ---- forward ------------------------------------------------------------------------------
// Tile (b, channel block, time block) per block iteration: x rows t0-(W-1) .. t0+TL-1 into
// shared memory, each thread then computes kSeg outputs of one channel and writes them over
// the x rows they came from (its window holds the last W inputs), and the tile is stored.

template <typename T, int W, bool kSeq>
__global__ void __launch_bounds__(NTH) fwd_kernel(Conv1dFwdParams p, TAcc xa, TAcc oa, int64_t cblocks,
                                                   int64_t tblocks, int64_t ntiles) {
  constexpr int R = TL + W - 1;
  __shared__ __align__(16) unsigned char xs_raw[R * TC * sizeof(T)];
  __shared__ int32_t sids[kSeq ? R : 1];
  T (*xs)[TC] = reinterpret_cast<T (*)[TC]>(xs_raw);
  const int c = threadIdx.x % TC, seg = threadIdx.x / TC, a = seg * kSeg;
  for (int64_t tile = blockIdx.x; tile < ntiles; tile += gridDim.x) {
    const int64_t cb = tile % cblocks, rest = tile / cblocks, tb = rest % tblocks, b = rest / tblocks;
    const int64_t c0 = cb * TC, t0 = tb * TL, ch = c0 + c;
    load_tile<T, R>(xs, xa, p, p.init, b, c0, t0 - (W - 1));
    if constexpr (kSeq) load_sids<R>(sids, p, b, t0 - (W - 1));
    float w[W], bias;
    load_weights<W>(p, ch, w, bias);
    __syncthreads();
    // Final states (the last W-1 inputs, reaching into the initial states when seqlen < W-1)
    // come from the last time tile, read before its rows are overwritten.
    if (p.final_states != nullptr && tb == tblocks - 1 && seg == 0 && ch < p.dim) {
#pragma unroll
      for (int j = 0; j < W - 1; ++j)
        static_cast<T*>(p.final_states)[b * p.fin_sb + ch * p.fin_sc + j * p.fin_sj] =
            xs[p.seqlen - (W - 1) + j - (t0 - (W - 1))][c];
    }
    float xw[W];
    int32_t sw[W] = {};
#pragma unroll
    for (int k = 0; k < W - 1; ++k) {
      xw[k] = to_f<T>(xs[a + k][c]);
      if constexpr (kSeq) sw[k] = sids[a + k];
    }
    __syncthreads();  // every window start is read before any output overwrites its row
#pragma unroll 8
    for (int s = 0; s < kSeg; ++s) {
      const int r = a + s + W - 1;
      xw[W - 1] = to_f<T>(xs[r][c]);
      if constexpr (kSeq) sw[W - 1] = sids[r];
      float acc = bias;  // conv_window's order: bias, then the taps in k order
#pragma unroll
      for (int k = 0; k < W; ++k) acc = fmaf(w[k], (!kSeq || sw[k] == sw[W - 1]) ? xw[k] : 0.f, acc);
      xs[r][c] = from_f<T>(p.silu ? silu_fast(acc) : acc);
#pragma unroll
      for (int k = 0; k < W - 1; ++k) {
        xw[k] = xw[k + 1];
        sw[k] = sw[k + 1];
      }
    }
    __syncthreads();
    store_tile<T>(oa, xs, W - 1, b, c0, t0, p.seqlen, p.dim);
    __syncthreads();  // the stores have read the tile before the next one is loaded
  }
}

// ---- backward -----------------------------------------------------------------------------
// Block (channel block cb, split s) walks the (batch, time tile) items s, s + splits, ...;
// per item: x rows t0-(W-1) .. t0+TL+W-2 and dout rows t0 .. t0+TL+W-2 into shared memory;
// each thread walks one channel over u in [t0+a, t0+a+kSeg+W-1): dy[u] (through silu'),
// dweight/dbias terms of its own kSeg outputs, dx[u-(W-1)] written over dout's row (read
// earlier). Its dweight/dbias sums end as partial row s (segments summed in order).

template <typename T, int W, bool kSeq>
__global__ void __launch_bounds__(NTH, kBwdBlocksPerSm) bwd_kernel(Conv1dBwdParams q, TAcc xa, TAcc da, TAcc ga,
                                                                     int64_t cblocks, int64_t tblocks, int64_t splits) {
  const Conv1dFwdParams& p = q.fwd;
  constexpr int RX = TL + 2 * (W - 1), RD = TL + W - 1;
  __shared__ __align__(16) unsigned char xs_raw[RX * TC * sizeof(T)];
  __shared__ __align__(16) unsigned char ds_raw[RD * TC * sizeof(T)];
  __shared__ int32_t sids[kSeq ? RX : 1];
  __shared__ float red[NTH * (W + 1)];
  T (*xs)[TC] = reinterpret_cast<T (*)[TC]>(xs_raw);
  T (*ds)[TC] = reinterpret_cast<T (*)[TC]>(ds_raw);
  const int64_t cb = blockIdx.x % cblocks, split = blockIdx.x / cblocks;
  const int c = threadIdx.x % TC, seg = threadIdx.x / TC, a = seg * kSeg;
  const int64_t c0 = cb * TC, ch = c0 + c, L = p.seqlen;
  float w[W], bias;
  load_weights<W>(p, ch, w, bias);
  float dw[W] = {}, db = 0.f;
  const int64_t items = p.batch * tblocks;
  for (int64_t it = split; it < items; it += splits) {
    const int64_t b = it / tblocks, t0 = (it % tblocks) * TL, ta = t0 + a;
    load_tile<T, RX>(xs, xa, p, p.init, b, c0, t0 - (W - 1));
    load_tile<T, RD>(ds, da, p, nullptr, b, c0, t0);
    if constexpr (kSeq) load_sids<RX>(sids, p, b, t0 - (W - 1));
    __syncthreads();
    // The W-1 dout values past this segment: the next segment overwrites them with dx.
    float dtail[W - 1];
#pragma unroll
    for (int j = 0; j < W - 1; ++j) dtail[j] = to_f<T>(ds[a + kSeg + j][c]);
    float xw[W], dyw[W] = {};
    int32_t sw[W] = {};
#pragma unroll
    for (int k = 0; k < W - 1; ++k) {
      xw[k] = to_f<T>(xs[a + k][c]);
      if constexpr (kSeq) sw[k] = sids[a + k];
    }
    __syncthreads();
    // Step i: position u = ta + i (x row a+i+W-1, dout row a+i, dout value g): dy[u], and with
    // kOwn (u is one of this thread's outputs) its dweight/dbias terms; returns dx at
    // t = u-(W-1), sum_k w[k] dy[t+W-1-k] over the same sequence as t.
    auto step = [&](int i, float g, auto own) -> float {
      const int64_t u = ta + i;
      xw[W - 1] = to_f<T>(xs[a + i + W - 1][c]);
      if constexpr (kSeq) sw[W - 1] = sids[a + i + W - 1];
      float dy = 0.f;
      if (u < L) {
        dy = g;
        if (p.silu) {
          float y = bias;
#pragma unroll
          for (int k = 0; k < W; ++k) y = fmaf(w[k], (!kSeq || sw[k] == sw[W - 1]) ? xw[k] : 0.f, y);
          dy *= silu_pair(y).df;
        }
      }
      if constexpr (decltype(own)::value) {  // dy is 0 past the end
#pragma unroll
        for (int k = 0; k < W; ++k) dw[k] = fmaf(dy, (!kSeq || sw[k] == sw[W - 1]) ? xw[k] : 0.f, dw[k]);
        db += dy;
      }
#pragma unroll
      for (int k = 0; k < W - 1; ++k) dyw[k] = dyw[k + 1];
      dyw[W - 1] = dy;
      float gx = 0.f;
#pragma unroll
      for (int k = 0; k < W; ++k) gx = fmaf(w[k], (!kSeq || sw[W - 1 - k] == sw[0]) ? dyw[W - 1 - k] : 0.f, gx);
#pragma unroll
      for (int k = 0; k < W - 1; ++k) {
        xw[k] = xw[k + 1];
        sw[k] = sw[k + 1];
      }
      return gx;
    };
    // dx[t] of the last W-1 positions also takes the final-state gradient.
    auto with_dfinal = [&](int64_t t, float gx) {
      if (q.dfinal != nullptr && t >= L - (W - 1) && t < L && ch < p.dim)
        gx += ld_dt(p.dtype, q.dfinal, b * q.dfin_sb + ch * q.dfin_sc + (t - (L - (W - 1))) * q.dfin_sj);
      return gx;
    };
    using Own = std::true_type;
    using NotOwn = std::false_type;
    // The first W-1 steps emit dx before this segment: the initial-state gradient (t < 0)
    // in the first segment of the first tile, nothing elsewhere (the previous segment's rows).
#pragma unroll
    for (int i = 0; i < W - 1; ++i) {
      const float gx = step(i, to_f<T>(ds[a + i][c]), Own{});
      const int64_t t = ta + i - (W - 1);
      if (t < 0 && q.dinit != nullptr && ch < p.dim)
        st_dt(p.dtype, q.dinit, b * q.dinit_sb + ch * q.dinit_sc + (t + W - 1) * q.dinit_sj, with_dfinal(t, gx));
    }
#pragma unroll 4
    for (int i = W - 1; i < kSeg; ++i)  // dx over dout's row of t, read W-1 steps ago
      ds[a + i - (W - 1)][c] = from_f<T>(with_dfinal(ta + i - (W - 1), step(i, to_f<T>(ds[a + i][c]), Own{})));
#pragma unroll
    for (int j = 0; j < W - 1; ++j)
      ds[a + kSeg + j - (W - 1)][c] = from_f<T>(with_dfinal(ta + kSeg + j - (W - 1), step(kSeg + j, dtail[j], NotOwn{})));
    __syncthreads();
    store_tile<T>(ga, ds, 0, b, c0, t0, L, p.dim);
    __syncthreads();
  }
  // Partial row `split`: the kSegs threads of a channel summed in segment order.
#pragma unroll
  for (int k = 0; k < W; ++k) red[threadIdx.x * (W + 1) + k] = dw[k];
  red[threadIdx.x * (W + 1) + W] = db;
  __syncthreads();
  if (seg == 0 && ch < p.dim) {
#pragma unroll
    for (int k = 0; k <= W; ++k) {
      float acc = 0.f;
      for (int s = 0; s < kSegs; ++s) acc += red[(s * TC + c) * (W + 1) + k];
      q.partials[(split * p.dim + ch) * (W + 1) + k] = acc;
    }
  }
}

// dweight / dbias: the partial rows summed in row order, written in the weight's / bias's dtype.
template <int W>
__global__ void reduce_partials_kernel(Conv1dBwdParams q) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= q.fwd.dim) return;
  float acc[W + 1] = {};
  for (int64_t r = 0; r < q.num_partials; ++r)
#pragma unroll
    for (int k = 0; k <= W; ++k) acc[k] += q.partials[(r * q.fwd.dim + c) * (W + 1) + k];
#pragma unroll
  for (int k = 0; k < W; ++k) st_dt(q.fwd.w_dtype, q.dweight, c * W + k, acc[k]);
  if (q.dbias != nullptr) st_dt(q.fwd.b_dtype, q.dbias, c, acc[W]);
}

// ---- decode update ------------------------------------------------------------------------

template <typename T, int W>
__global__ void __launch_bounds__(kConvUpdateThreads) update_kernel(Conv1dUpdateParams p) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x, b = blockIdx.y;
  if (c >= p.dim) return;
  T* out = static_cast<T*>(p.out) + b * p.out_sb + c * p.out_sc;
  const T* x = static_cast<const T*>(p.x) + b * p.x_sb + c * p.x_sc;
  // Taps, bias and the first input are independent of the slot: loaded before its index.
  float w[W], bias;
  load_weights<W>(p, c, w, bias);
  const float x0 = to_f<T>(x[0]);
  const int64_t sb = p.state_indices != nullptr ? p.state_indices[b] : b;
  if (sb < 0 || sb >= p.state_batch) {
    // Padded slot: zero output, state untouched. Out-of-range slot: NaN output (the host
    // cannot raise without a sync; NaN makes the bad index visible instead of silent).
    for (int64_t t = 0; t < p.seqlen; ++t) out[t * p.out_st] = from_f<T>(sb < 0 ? 0.f : __int_as_float(0x7fc00000));
    return;
  }
  T* state = static_cast<T*>(p.conv_state) + sb * p.st_sb + c * p.st_sc;
  float xw[W];
  if (p.parents != nullptr) {  // a draft tree: each node's window along its path; state only read
    const int32_t* par = p.parents + b * p.seqlen;  // uniform over the block: broadcast loads
    for (int64_t t = 0; t < p.seqlen; ++t) {
      int64_t cur = t;
      bool bad = false;
#pragma unroll
      for (int k = W - 1; k >= 0; --k) {
        xw[k] = 0.f;
        if (!bad) xw[k] = to_f<T>(cur >= 0 ? x[cur * p.x_st] : state[(p.state_len + cur) * p.st_sj]);
        if (k > 0 && !bad) {
          cur = conv_tree_next(par, cur);
          bad = cur == kConvTreeBad;
        }
      }
      const float y = conv_window<W>(w, xw, bias);
      out[t * p.out_st] = from_f<T>(bad ? __int_as_float(0x7fc00000) : p.silu ? silu_fast(y) : y);
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < W - 1; ++k) xw[k] = to_f<T>(state[(p.state_len - (W - 1) + k) * p.st_sj]);
  for (int64_t t = 0; t < p.seqlen; ++t) {
    xw[W - 1] = t == 0 ? x0 : to_f<T>(x[t * p.x_st]);
    const float y = conv_window<W>(w, xw, bias);
    out[t * p.out_st] = from_f<T>(p.silu ? silu_fast(y) : y);
#pragma unroll
    for (int k = 0; k < W - 1; ++k) xw[k] = xw[k + 1];
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

// The access mode of a (batch, dim, seqlen) tensor: 16-byte vectors along the unit-stride
// dimension when every vector the tiles touch is whole and aligned, else element by element.
TAcc make_acc(const void* ptr, int64_t sb, int64_t sc, int64_t st, int64_t dim, int elem_bytes) {
  const int64_t vc = 16 / elem_bytes;
  const bool base_ok = aligned16(ptr) && sb % vc == 0;
  int mode = kScalar;
  if (base_ok && sc == 1 && dim % vc == 0 && st % vc == 0) mode = kVecC;
  else if (base_ok && st == 1 && sc % vc == 0) mode = kVecT;
  return {const_cast<void*>(ptr), sb, sc, st, mode};
}

}  // namespace

void causal_conv1d_fwd_cuda(const Conv1dFwdParams& p, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.seqlen == 0 && p.final_states == nullptr) return;
  const int64_t cblocks = ceil_div64(p.dim, TC), tblocks = std::max<int64_t>(1, ceil_div64(p.seqlen, TL));
  const int64_t ntiles = conv1d_tiles(p.batch, p.dim, p.seqlen);
  const dim3 grid(static_cast<unsigned>(conv1d_fwd_grid(p.batch, p.dim, p.seqlen, sm_count()).x));
  const int es = dtype_size(p.dtype);
  const TAcc xa = make_acc(p.x, p.x_sb, p.x_sc, p.x_st, p.dim, es);
  const TAcc oa = make_acc(p.out, p.out_sb, p.out_sc, p.out_st, p.dim, es);
  dispatch(p.dtype, p.width, [&]<typename T, int W>() {
    if (p.seq_idx != nullptr)
      fwd_kernel<T, W, true><<<grid, NTH, 0, stream>>>(p, xa, oa, cblocks, tblocks, ntiles);
    else
      fwd_kernel<T, W, false><<<grid, NTH, 0, stream>>>(p, xa, oa, cblocks, tblocks, ntiles);
    NK_CUDA_LAUNCH_CHECK();
  });
}

namespace {
Conv1dBwdGrid bwd_grid(const Conv1dBwdParams& q) {
  const auto& p = q.fwd;
  return conv1d_bwd_grid(p.batch, p.dim, p.seqlen, int64_t{kBwdBlocksPerSm} * sm_count());
}
}  // namespace

int64_t causal_conv1d_bwd_cuda_num_partials(const Conv1dBwdParams& q) { return bwd_grid(q).time_splits; }

void causal_conv1d_bwd_cuda(const Conv1dBwdParams& q, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const auto& p = q.fwd;
  const Conv1dBwdGrid g = bwd_grid(q);
  const dim3 grid(static_cast<unsigned>(g.grid.x));
  const dim3 rgrid(static_cast<unsigned>(conv1d_bwd_reduce_grid(p.dim).x));
  if (q.num_partials != g.time_splits)
    throw std::runtime_error("nemokernels: internal: causal_conv1d backward partial rows mismatch");
  const int64_t cblocks = ceil_div64(p.dim, TC), tblocks = std::max<int64_t>(1, ceil_div64(p.seqlen, TL));
  const int es = dtype_size(p.dtype);
  const TAcc xa = make_acc(p.x, p.x_sb, p.x_sc, p.x_st, p.dim, es);
  const TAcc da = make_acc(q.dout, q.dout_sb, q.dout_sc, q.dout_st, p.dim, es);
  const TAcc ga = make_acc(q.dx, q.dx_sb, q.dx_sc, q.dx_st, p.dim, es);
  dispatch(p.dtype, p.width, [&]<typename T, int W>() {
    if (p.seq_idx != nullptr)
      bwd_kernel<T, W, true><<<grid, NTH, 0, stream>>>(q, xa, da, ga, cblocks, tblocks, g.time_splits);
    else
      bwd_kernel<T, W, false><<<grid, NTH, 0, stream>>>(q, xa, da, ga, cblocks, tblocks, g.time_splits);
    NK_CUDA_LAUNCH_CHECK();
    reduce_partials_kernel<W><<<rgrid, kConvReduceThreads, 0, stream>>>(q);
    NK_CUDA_LAUNCH_CHECK();
  });
}

void causal_conv1d_update_cuda(const Conv1dUpdateParams& p, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const dim3 grid(static_cast<unsigned>(conv1d_update_grid(p.batch, p.dim).x),
                  static_cast<unsigned>(conv1d_update_grid(p.batch, p.dim).y));
  dispatch(p.dtype, p.width, [&]<typename T, int W>() {
    update_kernel<T, W><<<grid, kConvUpdateThreads, 0, stream>>>(p);
    NK_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace nk
