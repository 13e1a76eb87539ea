// CUDA backward of the SSD chunk scan (mamba_chunk_scan_combined): B0 (dy, dz, dD with z), B1 + B2
// (dIn and the reverse state chain in one ticketed kernel), B3 (per-chunk gradients: portable
// and sm_90a), the final sums. Details: docs/ssd.md, section `csrc/ssd/ssd_chunk_scan_bwd_cuda.cu`.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "common/cuda_utils.cuh"
#include "ssd/launch_limits.h"
#include "ssd/numerics.cuh"
#include "ssd/ssd_chunk_scan.h"
#include "ssd/ssd_cuda_common.cuh"

// B1's wgmma tile is in this portable file: it exists only when the file's own passes include
// sm_90a (NK_PORTABLE_SM90A, CMakeLists.txt), as the forward's state chain tile.
#if defined(NK_HAS_SM90) && defined(NK_PORTABLE_SM90A)
#define NK_SSD_WGMMA_HERE 1
#include <cutlass/arch/barrier.h>

#include "ssd/ssd_chunk_output_sm90.cuh"
#endif

namespace nk {
namespace {

constexpr int kThreads = 256;        // every kernel below except the element-wise ones
constexpr int kTile = 64;            // rows and columns of a block's output tile
constexpr int kKC = 32;              // k staged in shared memory per step
// Operand tiles in shared memory hold T (the activation dtype): leading dimension
// kTile + 16 bytes (kSmemPad), a multiple of 8 elements for 16-bit types and of 4 for float,
// as WarpTile (wmma) needs. Products land in a float32 tile with leading dimension kLdo.
template <typename T> constexpr int kLdT = kTile + ssd::kSmemPad<T>;
template <typename T> constexpr int kStageElems = kKC * kLdT<T>;   // one staged k-slice
template <typename T> constexpr int kTileElems = kTile * kLdT<T>;  // a resident 64x64 operand
constexpr int kLdo = kTile + 4;
constexpr int kOutFloats = kTile * kLdo;
// Warp w of a block owns rows 16 * (w / 2) and columns 32 * (w % 2) of each 64x64 product.
constexpr int kWarpFN = 2;
static_assert(kThreads / 32 == (kTile / 16) * (kTile / (16 * kWarpFN)), "8 warps cover the 64x64 tile");

using ssd::from_f;
using ssd::to_f;
using ssd::WarpTile;

using Acc = float[4][4];

NK_DEVICE void zero_acc(Acc& a) {
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) a[r][c] = 0.f;
}
// Number of 64-wide tiles covering a feature dimension (P or N).
NK_DEVICE int ceil_div_d(int64_t v) { return static_cast<int>((v + kTile - 1) / kTile); }
// 64 x 64 tiles of a (P, N) state: the B1-B2 chain's blocks per (b, c, h) and dot partials.
NK_HD int64_t state_tiles(const SsdParams& p) {
  return ((p.headdim + kTile - 1) / kTile) * ((p.dstate + kTile - 1) / kTile);
}
NK_DEVICE int tile_ty() { return threadIdx.x / 16; }
NK_DEVICE int tile_tx() { return threadIdx.x % 16; }

// ---- scratch layout (float32, each region 256-byte aligned) ------------------------------
struct Scratch {
  float* fwd_ws;    // ssd_fwd_cuda_workspace_bytes(fwd) bytes for ssd_states_cuda, or null
  void* dy;         // (b, L, H, P) dout silu(z) rounded to T, only with z (read as dout after B0)
  float* dBs;       // (b, L, H/hs, N) dB summed over each split's hs heads, by position
  float* dCs;       // (b, L, H/hs, N) dC likewise (both null when bc_direct)
  float* dot_part;  // (b, H, nc, tiles) <dS_c, in_c> per 64 x 64 state tile
  float* ddtp;      // (b, H, nc, Q) ddt' without the A ddA term
  float* wcol;      // (b, H, nc, Q) sum_i W_ij
  float* u;         // (b, H, nc, Q) U_j
  float* wrow;      // (b, H, nc, Q) sum_j W_ij
  float* v;         // (b, H, nc, Q) V_i
  unsigned* chain;  // B1-B2's ticket counter, then one published-chunk counter per chain (zeroed)
  int64_t hs;       // heads per B3 block (divides H / G)
  bool bc_direct;   // hs == H / G: a split is a group, the B3 kernels store dB, dC themselves
};

int64_t round_up(int64_t v) { return (v + 63) / 64 * 64; }

// Heads per B3 block: the largest divisor of H / G that still leaves kTargetBlocks blocks
// (dB and dC are summed over a block's heads in registers, so a larger hs means a smaller
// scratch: (b, nc, H/hs, Q, N) float32 twice; hs = H / G is mamba_ssm's footprint).
#ifndef NK_SSD_BWD_TARGET_BLOCKS
#define NK_SSD_BWD_TARGET_BLOCKS 1024  // overridable for host-emulation tests of hs > 1
#endif
const int64_t kTargetBlocks = NK_SSD_BWD_TARGET_BLOCKS;
int64_t heads_per_block(const SsdParams& p) {
  const int64_t hpg = p.nheads / p.ngroups, ntile = p.chunk_size / kTile;
  int64_t best = 1;
  for (int64_t d = 2; d <= hpg; ++d)
    if (hpg % d == 0 && p.batch * p.nchunks * (p.nheads / d) * ntile >= kTargetBlocks) best = d;
  return best;
}

// Float offsets of the regions; returns the total in floats.
int64_t scratch_layout(const SsdBwdParams& q, Scratch* s) {
  const SsdParams& p = q.fwd;
  const int64_t b = p.batch, L = p.seqlen, H = p.nheads, P = p.headdim, N = p.dstate;
  const int64_t nc = p.nchunks, Q = p.chunk_size;
  const int64_t tiles = state_tiles(p);
  const int64_t hs = heads_per_block(p);
  const bool bc_direct = hs == H / p.ngroups;
  const int64_t bc_floats = bc_direct ? 0 : b * L * (H / hs) * N;
  // Region 0: the forward's own scratch for ssd_states_cuda (the entry sizes only ours).
  const int64_t sizes[11] = {(ssd_fwd_cuda_workspace_bytes(p) + 3) / 4,
                             p.z != nullptr ? (b * L * H * P * dtype_size(p.dtype) + 3) / 4 : 0,
                             bc_floats, bc_floats,
                             b * H * nc * tiles, b * H * nc * Q, b * H * nc * Q, b * H * nc * Q,
                             b * H * nc * Q, b * H * nc * Q, 1 + b * H * tiles};
  int64_t off[11], total = 0;
  for (int k = 0; k < 11; ++k) {
    off[k] = total;
    total += round_up(sizes[k]);
  }
  if (s != nullptr) {
    float* base = static_cast<float*>(q.workspace);
    s->fwd_ws = sizes[0] > 0 ? base + off[0] : nullptr;
    s->dy = p.z != nullptr ? static_cast<void*>(base + off[1]) : nullptr;
    s->dBs = bc_direct ? nullptr : base + off[2];
    s->dCs = bc_direct ? nullptr : base + off[3];
    s->dot_part = base + off[4];
    s->ddtp = base + off[5];
    s->wcol = base + off[6];
    s->u = base + off[7];
    s->wrow = base + off[8];
    s->v = base + off[9];
    s->chain = reinterpret_cast<unsigned*>(base + off[10]);
    s->hs = hs;
    s->bc_direct = bc_direct;
  }
  return total;
}

// ---- block-level tile GEMM ----------------------------------------------------------------

// S[k][m] = f(k0 + k, m) for k < kKC, m < kTile, rounded once to T. kFastK: consecutive
// threads walk k (the operand is contiguous along k in global memory), else m. f
// bounds-checks and zero-fills (and applies any float32 scale before the rounding).
template <bool kFastK, typename T, class F>
NK_DEVICE void stage(T* S, int k0, const F& f) {
#pragma unroll 1
  for (int e = threadIdx.x; e < kKC * kTile; e += kThreads) {
    const int k = kFastK ? e % kKC : e / kTile;
    const int m = kFastK ? e / kKC : e % kTile;
    S[k * kLdT<T> + m] = from_f<T>(f(k0 + k, m));
  }
}

// This warp's 16x32 share of the block's 64x64 product, += A B over kn (a multiple of 16)
// staged k: A(m, k) = As[k][m], B(k, n) = Bs[k][n]. wmma for f16/bf16, exact float32 FMAs
// for float (WarpTile).
template <typename T>
NK_DEVICE void warp_mma(WarpTile<T, kWarpFN>& wt, const T* As, const T* Bs, int kn) {
  const int w = threadIdx.x / 32;
  wt.template mma<true, false>(As + 16 * (w / 2), kLdT<T>, Bs + 32 * (w % 2), kLdT<T>, kn, 16 * kWarpFN);
}

// This warp's 16x32 share of a 64 x kLdo float32 tile (the layout warp_mma computes).
NK_DEVICE float* warp_share(float* tile) {
  const int w = threadIdx.x / 32;
  return tile + 16 * (w / 2) * kLdo + 32 * (w % 2);
}

// acc (the thread's 4x4 register tile: rows ty + 16r, cols tx + 16c) += the block's product,
// moved through the float32 tile `out`. Starts and ends with every thread past a barrier.
template <typename T>
NK_DEVICE void add_product(Acc& acc, const WarpTile<T, kWarpFN>& wt, float* out) {
  wt.store(warp_share(out), kLdo, 16 * kWarpFN);
  __syncthreads();
  const int ty = tile_ty(), tx = tile_tx();
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[r][c] += out[(ty + 16 * r) * kLdo + tx + 16 * c];
  __syncthreads();  // out is rewritten by the next product
}

// wt += A B, both operands from global: A(m, k) = fa(k, m), B(k, n) = fb(k, n), k < K. Ends
// with every thread past a barrier.
template <bool kFastKA, bool kFastKB, typename T, class FA, class FB>
NK_DEVICE void gemm_gg(WarpTile<T, kWarpFN>& wt, int K, T* As, T* Bs, const FA& fa, const FB& fb) {
  for (int k0 = 0; k0 < K; k0 += kKC) {
    stage<kFastKA>(As, k0, fa);
    stage<kFastKB>(Bs, k0, fb);
    __syncthreads();
    warp_mma(wt, As, Bs, kKC);
    __syncthreads();
  }
}

// acc = A B (acc zeroed first) through `out`, for the products the kernels need element-wise.
template <bool kFastKA, bool kFastKB, typename T, class FA, class FB>
NK_DEVICE void product_gg(Acc& acc, int K, T* As, T* Bs, float* out, const FA& fa, const FB& fb) {
  WarpTile<T, kWarpFN> wt;
  wt.zero();
  gemm_gg<kFastKA, kFastKB>(wt, K, As, Bs, fa, fb);
  zero_acc(acc);
  add_product(acc, wt, out);
}

// wt += A B like gemm_gg, B being float32 data (a state, dS or in_c): for f16/bf16 it is
// staged as hi = T(B) in Bs and lo = T(B - hi) in Blo and both halves run on the tensor cores,
// so B keeps ~16 (bf16) / 22 (f16) significant bits instead of 8 / 11 (the per-position
// U and V terms feed dcs, whose reverse cumsum into dA cancels strongly). Blo: a T buffer of
// at least kStageElems<T> that is free during the call. float32: plain gemm_gg.
template <bool kFastKA, bool kFastKB, typename T, class FA, class FB>
NK_DEVICE void gemm_gg_split(WarpTile<T, kWarpFN>& wt, int K, T* As, T* Bs, T* Blo, const FA& fa, const FB& fb) {
  if constexpr (std::is_same_v<T, float>) {
    gemm_gg<kFastKA, kFastKB>(wt, K, As, Bs, fa, fb);
  } else {
    for (int k0 = 0; k0 < K; k0 += kKC) {
      stage<kFastKA>(As, k0, fa);
#pragma unroll 1
      for (int e = threadIdx.x; e < kKC * kTile; e += kThreads) {
        const int k = kFastKB ? e % kKC : e / kTile;
        const int m = kFastKB ? e / kKC : e % kTile;
        const float v = fb(k0 + k, m);
        const T hi = from_f<T>(v);
        Bs[k * kLdT<T> + m] = hi;
        Blo[k * kLdT<T> + m] = from_f<T>(v - to_f<T>(hi));
      }
      __syncthreads();
      warp_mma(wt, As, Bs, kKC);
      warp_mma(wt, As, Blo, kKC);
      __syncthreads();
    }
  }
}

// out (the 64 x kLdo float32 tile) = A B, for a product read element-wise straight from
// there instead of a register copy (which would stay live across the barrier: the register
// budget). kSplit: B is float32 data (gemm_gg_split, Blo its scratch). Ends past a barrier;
// the caller syncs again before out is rewritten.
template <bool kSplit, bool kFastKA, bool kFastKB, typename T, class FA, class FB>
NK_DEVICE void product_to_out(int K, T* As, T* Bs, T* Blo, float* out, const FA& fa, const FB& fb) {
  WarpTile<T, kWarpFN> wt;
  wt.zero();
  if constexpr (kSplit)
    gemm_gg_split<kFastKA, kFastKB>(wt, K, As, Bs, Blo, fa, fb);
  else
    gemm_gg<kFastKA, kFastKB>(wt, K, As, Bs, fa, fb);
  wt.store(warp_share(out), kLdo, 16 * kWarpFN);
  __syncthreads();
}

// tile (a 64 x kLdo float32 accumulator in shared memory) += A B with A resident in shared
// memory as Ares[k][m] (k < kTile, T), B from global. Each warp loads its own share of the
// tile into its fragments after the first staging barrier (so element-wise writes made before
// the call by any thread are seen), runs the MMAs and stores the share back; the caller
// syncs before reading the tile element-wise. The accumulator stays out of registers between
// products (the register budget), and no barrier is spent on it.
template <bool kFastKB, typename T, class FB>
NK_DEVICE void gemm_sg_acc(float* tile, const T* Ares, T* Bs, const FB& fb) {
  WarpTile<T, kWarpFN> wt;
  for (int k0 = 0; k0 < kTile; k0 += kKC) {
    stage<kFastKB>(Bs, k0, fb);
    __syncthreads();
    if (k0 == 0) wt.load(warp_share(tile), kLdo, 16 * kWarpFN);
    warp_mma(wt, Ares + k0 * kLdT<T>, Bs, kKC);
    __syncthreads();
  }
  wt.store(warp_share(tile), kLdo, 16 * kWarpFN);
}

// Sum over the 16 threads of a tile row (tx = 0..15, same warp half), fixed butterfly.
NK_DEVICE float row_sum16(float v) {
#pragma unroll
  for (int off = 8; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Block-wide sum in a fixed order (warp butterfly, then the warps in order); every thread
// gets the same value. red: kThreads/32 floats of shared memory.
template <int kBlock = kThreads>
NK_DEVICE float block_sum(float v, float* red) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  __syncthreads();  // red may still be read by a previous call
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < kBlock / 32; ++w) t += red[w];
  return t;
}

// ---- per-chunk view of the inputs --------------------------------------------------------

// carry_c = exp(cs_last) [sid_last == sid_prev]. cs_last is read at index Q - 1: padding has
// dt' = 0, so it repeats the last real cs (and an empty chunk of a plan has cs = 0).
NK_DEVICE float chunk_carry(const SsdParams& p, int64_t b, int64_t h, int64_t c) {
  const int64_t Q = p.chunk_size;
  const float cs_last = p.cs[((b * p.nheads + h) * p.nchunks + c) * Q + Q - 1];
  // the chunk's last id (ssd_sid_at continues it into the padding) against the one before it,
  // as the forward's state chain tests it; both 0 without seq_idx (always so with a plan)
  return ssd_sid_at(p, b, c * Q + Q - 1) == ssd_sid_prev(p, b, c, Q) ? expf(cs_last) : 0.f;
}

// Accessors of one (b, chunk c, head h) with chunk-local positions i (0 outside [0, nvalid)
// and outside the feature range).
template <typename T>
struct ChunkView {
  const SsdBwdParams& q;
  int64_t b, c, h, g, l0;
  int nvalid;
  const T* xb;
  const T* Bb;
  const T* Cb;
  const T* doutb;  // dy: dout, or after B0 with z the T scratch of dout silu(z) (run_bwd)

  NK_DEVICE ChunkView(const SsdBwdParams& q_, int64_t b_, int64_t c_, int64_t h_)
      : q(q_), b(b_), c(c_), h(h_) {
    const SsdParams& p = q.fwd;
    g = h / (p.nheads / p.ngroups);
    l0 = ssd_chunk_t0(p, c);
    nvalid = ssd_chunk_len(p, c);
    xb = static_cast<const T*>(p.x) + b * p.x_sb + h * p.x_sh;
    Bb = static_cast<const T*>(p.B) + b * p.B_sb + g * p.B_sg;
    Cb = static_cast<const T*>(p.C) + b * p.C_sb + g * p.C_sg;
    doutb = static_cast<const T*>(q.dout) + b * q.dout_sb + h * q.dout_sh;
  }
  NK_DEVICE bool in(int i, int k, int64_t K) const { return i >= 0 && i < nvalid && k >= 0 && k < K; }
  NK_DEVICE float x(int i, int pp) const {
    return in(i, pp, q.fwd.headdim) ? to_f<T>(xb[(l0 + i) * q.fwd.x_sl + pp]) : 0.f;
  }
  NK_DEVICE float Bv(int i, int n) const {
    return in(i, n, q.fwd.dstate) ? to_f<T>(Bb[(l0 + i) * q.fwd.B_sl + n]) : 0.f;
  }
  NK_DEVICE float Cv(int i, int n) const {
    return in(i, n, q.fwd.dstate) ? to_f<T>(Cb[(l0 + i) * q.fwd.C_sl + n]) : 0.f;
  }
  NK_DEVICE float dy(int i, int pp) const {
    if (!in(i, pp, q.fwd.headdim)) return 0.f;
    return to_f<T>(doutb[(l0 + i) * q.dout_sl + pp]);
  }
  NK_DEVICE float Dv(int pp) const {
    const SsdParams& p = q.fwd;
    if (p.D == nullptr) return 0.f;
    return p.D_per_p ? p.D[h * p.headdim + pp] : p.D[h];
  }
  // Offset of (b, c, h) in the (b, H, nc, Q) per-position arrays.
  NK_DEVICE int64_t pos_base() const { return ((b * q.fwd.nheads + h) * q.fwd.nchunks + c) * q.fwd.chunk_size; }
  // Offset of (b, c, h) in the (b, nc, H, P, N) state arrays.
  NK_DEVICE int64_t state_base() const {
    return ((b * q.fwd.nchunks + c) * q.fwd.nheads + h) * q.fwd.headdim * q.fwd.dstate;
  }
};

// cs, dt', sid of the whole chunk into shared memory. Padding positions get dt' = 0 and the
// last real cs and sid (whatever the forward wrote there). Ends with a barrier.
template <int Q, typename T>
NK_DEVICE void load_chunk_scalars(const ChunkView<T>& v, float* s_cs, float* s_dtp, int32_t* s_sid) {
  const SsdParams& p = v.q.fwd;
  const int64_t base = v.pos_base();
  const float cs_end = p.cs[base + Q - 1];  // = the last real cs (padding has dt' = 0)
  for (int i = threadIdx.x; i < Q; i += kThreads) {
    const bool real = i < v.nvalid;
    s_cs[i] = real ? p.cs[base + i] : cs_end;
    s_dtp[i] = real ? p.dtp[base + i] : 0.f;
    s_sid[i] = ssd_sid_at(p, v.b, v.l0 + (real ? i : v.nvalid - 1));
  }
  __syncthreads();
}

// exp(cs_i - cs_j) for j <= i in the same sequence, else exactly 0.
NK_DEVICE float seg_decay(int i, int j, const float* s_cs, const int32_t* s_sid) {
  return (j <= i && s_sid[i] == s_sid[j]) ? expf(s_cs[i] - s_cs[j]) : 0.f;
}

// ---- B0 -----------------------------------------------------------------------------------

// One block per (b, chunk c, head h), run with z or D. With z: dy = dout silu(z) goes to the
// scratch rounded to T (what mamba_ssm's _chunk_scan_bwd_dz keeps; half the bytes of float32
// for B1 and B3, which read it where they read dout without z), dz = dout y_pre silu'(z).
// With D: the chunk's dD partial sum_i dy_i[p] x_i[p], dy unrounded (float32 with z, dout
// without). Eight consecutive p per thread and step:
// thread t takes p-group t % P8 at positions t / P8, + rows, ... (rows = kThreads / P8; P <= 128
// on the CUDA path); the partials are summed over the rows in order (deterministic). 16-byte
// loads where the host found the operands aligned; the scratch and dz, y_pre bases are
// contiguous (b, L, H, P).
template <typename T>
__global__ void __launch_bounds__(kThreads) dy_dz_kernel(SsdBwdParams q, T* dy, bool vec_dout, bool vec_z,
                                                         bool vec_out, bool vec_x) {
  __shared__ float red[8 * kThreads];  // [k][thread]: the dD partials of p = 8 (t % P8) + k
  const SsdParams& p = q.fwd;
  const int64_t P = p.headdim, H = p.nheads, L = p.seqlen;
  const int P8 = static_cast<int>(P / 8), rows = kThreads / P8, t = threadIdx.x;
  int64_t bid = blockIdx.x;
  const int64_t h = bid % H;
  bid /= H;
  const int64_t c = bid % p.nchunks, b = bid / p.nchunks;
  const int64_t l0 = ssd_chunk_t0(p, c);
  const int nvalid = ssd_chunk_len(p, c);
  const bool has_z = p.z != nullptr, want_dz = has_z && q.dz != nullptr && p.y_pre != nullptr;
  const bool want_dD = p.D != nullptr && q.dD_part != nullptr;
  const int64_t pp = (t % P8) * 8;
  float acc[8] = {};
  for (int i = t / P8; i < nvalid && t < rows * P8; i += rows) {
    const int64_t l = l0 + i;
    const int64_t o = ((b * L + l) * H + h) * P + pp;  // (b, l, h, pp) in the contiguous arrays
    float d[8], zv[8], out[8];
    ssd::load8<T>(static_cast<const T*>(q.dout) + b * q.dout_sb + l * q.dout_sl + h * q.dout_sh + pp, vec_dout, d);
    if (has_z) {
      ssd::load8<T>(static_cast<const T*>(p.z) + b * p.z_sb + l * p.z_sl + h * p.z_sh + pp, vec_z, zv);
#pragma unroll
      for (int k = 0; k < 8; ++k) out[k] = d[k] * silu(zv[k]);
      ssd::store8<T>(dy + o, true, out);  // scratch: 256-byte aligned, P % 8 == 0
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) out[k] = d[k];
    }
    if (want_dD) {
      float xv[8];
      ssd::load8<T>(static_cast<const T*>(p.x) + b * p.x_sb + l * p.x_sl + h * p.x_sh + pp, vec_x, xv);
#pragma unroll
      for (int k = 0; k < 8; ++k) acc[k] = fmaf(out[k], xv[k], acc[k]);
    }
    if (want_dz) {
      float yp[8];
      ssd::load8<T>(static_cast<const T*>(p.y_pre) + o, vec_out, yp);
#pragma unroll
      for (int k = 0; k < 8; ++k) out[k] = d[k] * yp[k] * silu_grad(zv[k]);
      ssd::store8<T>(static_cast<T*>(q.dz) + o, vec_out, out);
    }
  }
  if (!want_dD) return;  // block-uniform
#pragma unroll
  for (int k = 0; k < 8; ++k) red[k * kThreads + t] = acc[k];
  __syncthreads();
  for (int e = t; e < P; e += kThreads) {  // e = p
    const int g = e / 8, k = e % 8;
    float sum = 0.f;
    for (int r = 0; r < rows; ++r) sum += red[k * kThreads + r * P8 + g];
    q.dD_part[((b * p.nchunks + c) * H + h) * P + e] = sum;
  }
}

// ---- B1 + B2: the reverse state chain ------------------------------------------------------

// One block per (chunk c, b, h, 64 x 64 (P x N) state tile), chunks taken in descending order by
// a ticket (as the forward's state chain takes them ascending): B1's tile
// dIn_c = sum_i round_T(fac_i dy_i) C_i^T, then B2's step of the tile's chain (b, h, tile):
// dS_c arrives from block c + 1 (or is dfinal / zero where c ends its sequence), the block
// adds its <dS_c, in_c> partial, and publishes dS_(c-1) = carry_c dS_c + dIn_c (fmaf, the
// order of the CPU's walk), or, where c starts its sequence, writes it to dinit instead. dIn
// never reaches memory (2026-12-07; B1 wrote it and state_bwd_kernel walked it before). A
// block only waits on a lower ticket, a block already running: no deadlock whatever order
// the hardware starts blocks in. dS passes through L2 (read back with __ldcg).

// The block's chunk and tile from its ticket (chunk slowest, descending; then b, h, P tile, N
// tile), and s_fac[i] = exp(cs_i) [i real, sid_i == sid_prev] for the chunk; ends with a
// barrier. Every thread of the block calls it (any block size).
struct B1Tile {
  int64_t b, c, h, chain, tile;
  int p0, n0;
};
template <int Q>
NK_DEVICE B1Tile b1_tile(const SsdBwdParams& q, const Scratch& w, float* s_fac, unsigned* ticket_s) {
  const SsdParams& p = q.fwd;
  const int nnt = ceil_div_d(p.dstate);
  if (threadIdx.x == 0) *ticket_s = atomicAdd(w.chain, 1u);
  __syncthreads();
  const int64_t tiles = state_tiles(p), chains = p.batch * p.nheads * tiles, ticket = *ticket_s;
  B1Tile t;
  t.c = p.nchunks - 1 - ticket / chains;
  t.chain = ticket % chains;
  t.tile = t.chain % tiles;
  t.n0 = static_cast<int>(t.tile % nnt) * kTile;
  t.p0 = static_cast<int>(t.tile / nnt) * kTile;
  t.h = (t.chain / tiles) % p.nheads;
  t.b = t.chain / tiles / p.nheads;
  const int64_t l0 = ssd_chunk_t0(p, t.c);
  const int nvalid = ssd_chunk_len(p, t.c);
  const int32_t sid_prev = ssd_sid_prev(p, t.b, t.c, Q);
  const int64_t pb = ((t.b * p.nheads + t.h) * p.nchunks + t.c) * Q;
  for (int i = threadIdx.x; i < Q; i += blockDim.x) {
    const bool keep = i < nvalid && ssd_sid_at(p, t.b, l0 + i) == sid_prev;
    s_fac[i] = keep ? expf(p.cs[pb + i]) : 0.f;
  }
  __syncthreads();
  return t;
}

// B2's step for block t on the thread's K tile elements: off(k) is element k's offset
// pp * N + n in a (P, N) state, or -1 outside the state (computed where used: an array of them
// took 32 more registers); din[k] its dIn_c. red: kBlock / 32 floats of shared memory.
template <int kBlock, int K, class Off>
NK_DEVICE void chain_step(const SsdBwdParams& q, const Scratch& w, const B1Tile& t, const Off& off,
                          const float (&din)[K], float* red) {
  const SsdParams& p = q.fwd;
  const int64_t H = p.nheads, nc = p.nchunks, PN = p.headdim * p.dstate, tiles = state_tiles(p);
  const int64_t base = ((t.b * nc + t.c) * H + t.h) * PN;  // (b, c, h) in the state arrays
  unsigned* const done = w.chain + 1 + t.chain;            // chunks of the chain published so far
  // Every block but the last chunk's waits for block c + 1, also where chunk c ends its sequence
  // and reads nothing of c + 1: the counter must only count up in chunk order (as the forward's
  // chain), else such a block's publication could stand in for block c + 1's and block c - 1
  // would read dS before it is written (found by review, 2026-12-07; the emulator runs blocks
  // in ticket order and cannot see it).
  if (t.c < nc - 1) {
    if (threadIdx.x == 0) ssd::wait_at_least(done, static_cast<unsigned>(nc - 1 - t.c));
    __syncthreads();
  }
  float g[K];
  if (ssd_chunk_last(p, t.c)) {  // the end state's gradient restarts: dfinal or zero
    const bool fin = q.dfinal != nullptr && ssd_chunk_holds_end(p, t.c);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      g[k] = (fin && off(k) >= 0) ? q.dfinal[(t.b * H + t.h) * PN + off(k)] : 0.f;
      if (off(k) >= 0) q.dstates[base + off(k)] = g[k];  // dS_c
    }
  } else {  // dS_c, written by block c + 1
#pragma unroll
    for (int k = 0; k < K; ++k) g[k] = off(k) >= 0 ? __ldcg(q.dstates + base + off(k)) : 0.f;
  }
  float dot = 0.f;  // <dS_c, in_c> over the tile: the thread's elements in order, then the block's
#pragma unroll
  for (int k = 0; k < K; ++k)
    if (off(k) >= 0) dot = fmaf(g[k], p.states[base + off(k)], dot);
  dot = block_sum<kBlock>(dot, red);
  if (threadIdx.x == 0) w.dot_part[((t.b * H + t.h) * nc + t.c) * tiles + t.tile] = dot;
  const float carry = chunk_carry(p, t.b, t.h, t.c);
#pragma unroll
  for (int k = 0; k < K; ++k) g[k] = fmaf(carry, g[k], din[k]);
  if (ssd_chunk_first(p, t.c)) {  // g is the initial state's gradient (chunk c - 1 restarts)
    const int64_t row = ssd_chunk_init_row(p, t.b, t.c);
    if (q.dinit != nullptr && row >= 0) {
#pragma unroll
      for (int k = 0; k < K; ++k)
        if (off(k) >= 0) q.dinit[(row * H + t.h) * PN + off(k)] = g[k];
    }
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (off(k) >= 0) q.dstates[base - H * PN + off(k)] = g[k];  // dS_(c-1)
  }
  if (t.c > 0) {  // publish: every thread's stores, then the counter (also where nothing was stored)
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) atomicAdd(done, 1u);
  }
}

template <typename T, int Q>
__global__ void __launch_bounds__(kThreads) dstate_chain_kernel(SsdBwdParams q, Scratch w) {
  __shared__ __align__(32) T As[kStageElems<T>];
  __shared__ __align__(32) T Bs[kStageElems<T>];
  __shared__ __align__(32) float out_t[kOutFloats];
  __shared__ float s_fac[Q];
  __shared__ float red[kThreads / 32];
  __shared__ unsigned ticket_s;
  const SsdParams& p = q.fwd;
  const B1Tile t = b1_tile<Q>(q, w, s_fac, &ticket_s);
  ChunkView<T> v(q, t.b, t.c, t.h);
  const int p0 = t.p0, n0 = t.n0;
  Acc acc;
  // dIn[p][n] = sum_i (fac_i dy[i][p]) C[i][n]: A(m = p, k = i), B(k = i, n); fac_i dy is
  // scaled in float32 and rounded to T once at staging.
  product_gg<false, false>(
      acc, v.nvalid, As, Bs, out_t, [&](int k, int m) { return k < Q ? s_fac[k] * v.dy(k, p0 + m) : 0.f; },
      [&](int k, int n) { return v.Cv(k, n0 + n); });
  float din[16];
#pragma unroll
  for (int k = 0; k < 16; ++k) din[k] = acc[k / 4][k % 4];
  const int pb = p0 + tile_ty(), nb = n0 + tile_tx(), P = static_cast<int>(p.headdim), N = static_cast<int>(p.dstate);
  auto off = [=](int k) {  // element (r, cc) = (k / 4, k % 4): (pb + 16 r, nb + 16 cc)
    const int pp = pb + 16 * (k / 4), n = nb + 16 * (k % 4);
    return pp < P && n < N ? pp * N + n : -1;
  };
  chain_step<kThreads>(q, w, t, off, din, red);
}

#ifdef NK_SSD_WGMMA_HERE
// The chain on sm_90a (Q 128, full 64 x 64 tiles, 16-bit T), 128 threads: the tile
// dstate_chain_kernel computes, dIn[p][n] = sum_i round_T(fac_i dy_i[p]) C_i[n], with all 128
// positions staged at once (16-byte loads where aligned) and the product on one warpgroup's
// wgmma (ssd_sm90::state_tile_mma; only the float32 summation order differs), then the same
// chain step. Opt-in with the forward's sm_90a kernels (NEMOKERNELS_SSD_SM90=1).
template <typename T>
__global__ void __launch_bounds__(128) dstate_chain_wgmma_kernel(SsdBwdParams q, Scratch w, bool vec_dout,
                                                                 bool vec_C) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int Q = 128;
  using namespace cute;
  using E = ssd_sm90::cute_elem_t<T>;
  using Sc = ssd_sm90::StateCfg<E>;
  __shared__ __align__(1024) unsigned char smem[1024 + 2 * 16384];
  __shared__ float red[128 / 32];
  __shared__ unsigned ticket_s;
  float* s_fac = reinterpret_cast<float*>(smem);
  E* a_tile = reinterpret_cast<E*>(smem + 1024);
  E* b_tile = reinterpret_cast<E*>(smem + 1024 + 16384);
  Tensor sA = make_tensor(make_smem_ptr(a_tile), typename Sc::SmemTJ{});  // (p, i)
  Tensor sB = make_tensor(make_smem_ptr(b_tile), typename Sc::SmemTJ{});  // (n, i)
  const SsdParams& p = q.fwd;
  const int tid = threadIdx.x;
  const B1Tile t = b1_tile<Q>(q, w, s_fac, &ticket_s);
  ChunkView<T> v(q, t.b, t.c, t.h);
  const int p0 = t.p0, n0 = t.n0;
  for (int e = tid; e < Q * 8; e += 128) {
    const int i = e / 8, k = (e % 8) * 8;
    float a[8], c8[8];
    if (i < v.nvalid) {
      ssd::load8<T>(v.doutb + (v.l0 + i) * q.dout_sl + p0 + k, vec_dout, a);
      const float f = s_fac[i];
#pragma unroll
      for (int u = 0; u < 8; ++u) a[u] = f * a[u];  // as the portable tile: scaled in float32, rounded once
      ssd::load8<T>(v.Cb + (v.l0 + i) * p.C_sl + n0 + k, vec_C, c8);
    } else {
#pragma unroll
      for (int u = 0; u < 8; ++u) a[u] = 0.f, c8[u] = 0.f;
    }
    ssd::store8<T>(reinterpret_cast<T*>(&sA(k, i)), true, a);
    ssd::store8<T>(reinterpret_cast<T*>(&sB(k, i)), true, c8);
  }
  cutlass::arch::fence_view_async_shared();  // st.shared -> wgmma
  __syncthreads();
  float acc[32];
  ssd_sm90::state_tile_mma(a_tile, b_tile, acc);
  const int N = static_cast<int>(p.dstate);
  auto off = [=](int k) { return (p0 + ssd_sm90::frag_row(tid, k)) * N + n0 + ssd_sm90::frag_col(k, tid % 32); };
  chain_step<128>(q, w, t, off, acc, red);
#else
  (void)q, (void)w, (void)vec_dout, (void)vec_C;
  __trap();  // launched only on sm_90 from a build with this file's sm_90a pass
#endif
}
#endif  // NK_SSD_WGMMA_HERE

// ---- B2's reduction --------------------------------------------------------------------------

// dcs_last = carry_c <dS_c, in_c>: the chain's per-tile partials summed in tile order.
__global__ void dcs_last_kernel(SsdBwdParams q, const float* dot_part) {
  const SsdParams& p = q.fwd;
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // over (b, h, c)
  if (t >= p.batch * p.nheads * p.nchunks) return;
  const int64_t c = t % p.nchunks, bh = t / p.nchunks, h = bh % p.nheads, b = bh / p.nheads;
  const int64_t tiles = state_tiles(p);
  float acc = 0.f;
  for (int64_t k = 0; k < tiles; ++k) acc += dot_part[t * tiles + k];
  q.dcs_last[t] = chunk_carry(p, b, h, c) * acc;
}

// ---- B3: accumulators in shared memory ----------------------------------------------------

// The B3 kernels keep their long-lived float32 sums (dx of a head, dB / dC over the block's
// heads) in 64 x kLdo shared tiles placed after the kernel's fixed struct, one per 64-wide
// column tile of P or N: products are added there by gemm_sg_acc (each warp its own share,
// through its wmma fragments) and element-wise terms by the threads' (ty, tx) layout. Holding
// them in registers took 96 floats a thread (P 128, N 256) and pushed col_kernel to 255
// registers (docs/ssd.md, Progress).
template <class Smem>
NK_DEVICE float* acc_tiles(unsigned char* smem_raw) {
  return reinterpret_cast<float*>(smem_raw + sizeof(Smem));
}
template <class Smem>
int smem_with_tiles(int ntiles) {
  return static_cast<int>(sizeof(Smem) + sizeof(float) * size_t(ntiles) * kOutFloats);
}
NK_DEVICE void zero_tiles(float* t, int ntiles) {
  for (int e = threadIdx.x; e < ntiles * kOutFloats; e += kThreads) t[e] = 0.f;
}
// Offset of the thread's element (row ty + 16r, column tx + 16c) in a 64 x kLdo tile.
NK_DEVICE int acc_at(int r, int c) { return (tile_ty() + 16 * r) * kLdo + tile_tx() + 16 * c; }

// Where a B3 block's dB or dC (summed over its split's heads) goes, element o of the (b, L,
// H/hs, N) layout: with one split per group (w.bc_direct) that is the (b, L, G, N) output
// itself, rounded to T once as sum_bc_kernel would (which is then not launched); else the
// float32 scratch that sum_bc_kernel sums over the group's splits.
template <typename T>
struct SplitSum {
  float* scratch;
  T* out;
  NK_DEVICE SplitSum(float* scratch_, void* out_, bool direct)
      : scratch(direct ? nullptr : scratch_), out(direct ? static_cast<T*>(out_) : nullptr) {}
  NK_DEVICE void put(int64_t o, float v) const {
    if (out != nullptr) out[o] = from_f<T>(v);
    else scratch[o] = v;
  }
  NK_DEVICE void put2(int64_t o, float v0, float v1) const {  // o even
    if (out != nullptr) {
      const T a = from_f<T>(v0), c = from_f<T>(v1);
      if constexpr (sizeof(T) == 2)
        *reinterpret_cast<uint32_t*>(out + o) =
            uint32_t{reinterpret_cast<const uint16_t&>(a)} | (uint32_t{reinterpret_cast<const uint16_t&>(c)} << 16);
      else
        out[o] = a, out[o + 1] = c;
    } else {
      *reinterpret_cast<float2*>(scratch + o) = make_float2(v0, v1);
    }
  }
};

// ---- B3: column (j) kernel ----------------------------------------------------------------

template <typename T, int Q>
struct ColSmem {
  alignas(32) T As[kStageElems<T>];
  alignas(32) T Bs[kStageElems<T>];
  alignas(32) T A1[kTileElems<T>];  // [i][j] CB_ij m_ij (rounded to T)
  alignas(32) T A2[kTileElems<T>];  // [i][j] DX_ij m_ij dt'_j (rounded to T)
  alignas(32) float out[kOutFloats];  // products on their way to registers; then the column sums' partials
  float cs[Q], dtp[Q];
  int32_t sid[Q];
  float rx[kTile];
  // followed by npt + nnt accumulator tiles (acc_tiles)
};
static_assert(16 * kTile <= kOutFloats, "the column sums' 16 x 64 partials fit in out");

template <typename T, int Q>
__global__ void __launch_bounds__(kThreads, 2) col_kernel(SsdBwdParams q, Scratch w) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  ColSmem<T, Q>& sm = *reinterpret_cast<ColSmem<T, Q>*>(smem_raw);
  const SsdParams& p = q.fwd;
  constexpr int kNT = Q / kTile;
  const int64_t nsplit = p.nheads / w.hs;
  int64_t bid = blockIdx.x;
  const int jt = bid % kNT;
  bid /= kNT;
  bid /= nsplit;  // the head split: recomputed where it is used (register budget)
  const int64_t c = bid % p.nchunks, b = bid / p.nchunks;
  const int j0 = jt * kTile;
  const int nvalid = ssd_chunk_len(p, c);
  if (j0 >= nvalid) return;  // all padding: nothing to write (uniform over the block)
  const int P = static_cast<int>(p.headdim), N = static_cast<int>(p.dstate);
  const int npt = ceil_div_d(P), nnt = ceil_div_d(N);
  const int ty = tile_ty(), tx = tile_tx();
  T* dx = static_cast<T*>(q.dx);
  float* accx = acc_tiles<ColSmem<T, Q>>(smem_raw);  // npt tiles: dx_j of the current head
  float* accb = accx + npt * kOutFloats;  // nnt tiles: dB_j over the block's heads, dt'_j folded in
  zero_tiles(accb, nnt);  // seen after the first head's load_chunk_scalars barrier

  for (int hh = 0; hh < static_cast<int>(w.hs); ++hh) {
    const int64_t h = int64_t(blockIdx.x / kNT % nsplit) * w.hs + hh;  // sp * hs + hh, recomputed (register budget)
    ChunkView<T> v(q, b, c, h);
    __syncthreads();  // the previous head's epilogue still reads the chunk scalars, rx and accx
    load_chunk_scalars<Q>(v, sm.cs, sm.dtp, sm.sid);
    const float cs_last = sm.cs[Q - 1];
    const int32_t sid_last = sm.sid[Q - 1];
    const float* dS = q.dstates + v.state_base();

    // State terms: R = B_j dS^T (j x P) for dx, written over accx (this head's first term),
    // and (x_j dS) decay_j dt'_j (j x N) added to dB.
    for (int pt = 0; pt < npt; ++pt) {
      WarpTile<T, kWarpFN> wt;
      wt.zero();
      gemm_gg_split<true, true>(wt, N, sm.As, sm.Bs, sm.A1, [&](int k, int m) { return v.Bv(j0 + m, k); },
                                [&](int k, int n) {
                                  const int pp = pt * kTile + n;
                                  return (pp < P && k < N) ? dS[pp * N + k] : 0.f;
                                });
      wt.store(warp_share(accx + pt * kOutFloats), kLdo, 16 * kWarpFN);
    }
    for (int nt = 0; nt < nnt; ++nt) {
      product_to_out<true, true, false>(P, sm.As, sm.Bs, sm.A1, sm.out, [&](int k, int m) { return v.x(j0 + m, k); },
                                        [&](int k, int n) {
                                          const int nn = nt * kTile + n;
                                          return (k < P && nn < N) ? dS[k * N + nn] : 0.f;
                                        });
      float* tb = accb + nt * kOutFloats;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int j = j0 + ty + 16 * r;
        const float wj = sm.sid[j] == sid_last ? expf(cs_last - sm.cs[j]) * sm.dtp[j] : 0.f;
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) tb[acc_at(r, cc)] = fmaf(wj, sm.out[acc_at(r, cc)], tb[acc_at(r, cc)]);
      }
    }
    __syncthreads();  // R in accx, stored by the warps, is read element-wise below
    // Rx_j = x_j . R_j (for ddt' and U), then R scaled by decay_j.
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int jl = ty + 16 * r;
      float part = 0.f;
      for (int pt = 0; pt < npt; ++pt) {
#pragma unroll
        for (int cc = 0; cc < 4; ++cc)
          part = fmaf(v.x(j0 + jl, pt * kTile + tx + 16 * cc), accx[pt * kOutFloats + acc_at(r, cc)], part);
      }
      part = row_sum16(part);
      if (tx == 0) sm.rx[jl] = part;
      const int j = j0 + jl;
      const float decay = sm.sid[j] == sid_last ? expf(cs_last - sm.cs[j]) : 0.f;
      for (int pt = 0; pt < npt; ++pt) {
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) accx[pt * kOutFloats + acc_at(r, cc)] *= decay;
      }
    }

    // Intra-chunk terms, i tiles from the diagonal down.
    float colsum = 0.f;  // sum_i CB_ij m_ij DX_ij for column j0 + threadIdx.x (threads < 64)
    for (int it = jt; it < kNT; ++it) {
      const int i0 = it * kTile;
      if (i0 >= nvalid) break;  // rows of padding only: every term is zero
      // dxs = DX in float32 (kept for the W column sums); A2 = DX m dt' rounded to T once.
      Acc dxs;
      product_gg<true, true>(
          dxs, P, sm.As, sm.Bs, sm.out, [&](int k, int m) { return v.dy(i0 + m, k); },
          [&](int k, int n) { return v.x(j0 + n, k); });
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
          const int il = ty + 16 * r, jl = tx + 16 * cc;
          const float sdx = dxs[r][cc] * seg_decay(i0 + il, j0 + jl, sm.cs, sm.sid);  // DX m
          sm.A2[il * kLdT<T> + jl] = from_f<T>(sdx * sm.dtp[j0 + jl]);
        }
      // CB read from out element by element (dxs holds the registers of a second tile).
      product_to_out<false, true, true>(
          N, sm.As, sm.Bs, sm.Bs, sm.out, [&](int k, int m) { return v.Cv(i0 + m, k); },
          [&](int k, int n) { return v.Bv(j0 + n, k); });
      float cpart[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
          const int il = ty + 16 * r, jl = tx + 16 * cc;
          const float cbm = sm.out[acc_at(r, cc)] * seg_decay(i0 + il, j0 + jl, sm.cs, sm.sid);  // CB m
          sm.A1[il * kLdT<T> + jl] = from_f<T>(cbm);
          cpart[cc] = fmaf(cbm, dxs[r][cc], cpart[cc]);  // CB m DX (own element)
        }
      __syncthreads();  // every thread has read CB from out
      float* colred = sm.out;
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) colred[ty * kTile + tx + 16 * cc] = cpart[cc];
      __syncthreads();
      if (threadIdx.x < kTile) {
        float t = 0.f;
        for (int y = 0; y < 16; ++y) t += colred[y * kTile + threadIdx.x];
        colsum += t;
      }
      // dx_j += sum_i A1[i][j] dy_i;  dB_j += sum_i A2[i][j] C_i
      for (int pt = 0; pt < npt; ++pt)
        gemm_sg_acc<false>(accx + pt * kOutFloats, sm.A1, sm.Bs,
                           [&](int k, int n) { return v.dy(i0 + k, pt * kTile + n); });
      for (int nt = 0; nt < nnt; ++nt)
        gemm_sg_acc<false>(accb + nt * kOutFloats, sm.A2, sm.Bs,
                           [&](int k, int n) { return v.Cv(i0 + k, nt * kTile + n); });
    }
    __syncthreads();  // sm.rx and the warps' last stores to accx

    // Epilogue of head h: dx (final) and the per-position scalars.
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int j = j0 + ty + 16 * r;
      if (j >= nvalid) continue;
      const float dtj = sm.dtp[j];
      const int64_t row = (b * p.seqlen + v.l0 + j) * p.nheads + h;
      for (int pt = 0; pt < npt; ++pt) {
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
          const int pp = pt * kTile + tx + 16 * cc;
          if (pp < P) dx[row * P + pp] = from_f<T>(fmaf(dtj, accx[pt * kOutFloats + acc_at(r, cc)], v.Dv(pp) * v.dy(j, pp)));
        }
      }
    }
    if (threadIdx.x < kTile) {
      const int j = j0 + threadIdx.x;
      if (j < nvalid) {
        const float decay = sm.sid[j] == sid_last ? expf(cs_last - sm.cs[j]) : 0.f;
        const float rxd = decay * sm.rx[threadIdx.x];
        const int64_t o = v.pos_base() + j;
        w.ddtp[o] = colsum + rxd;
        w.wcol[o] = sm.dtp[j] * colsum;
        w.u[o] = sm.dtp[j] * rxd;
      }
    }
  }

  // dB of this block's heads into the (b, L, H/hs, N) scratch (recomputed: nothing kept live for it).
  __syncthreads();  // the warps' last stores to accb
  const int64_t stride_j = nsplit * N;
  const SplitSum<T> dBs(w.dBs, q.dB, w.bc_direct);
  const int64_t base_j = ((b * p.seqlen + ssd_chunk_t0(p, c)) * nsplit + int64_t(blockIdx.x / kNT % nsplit)) * N;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int j = j0 + ty + 16 * r;
    if (j >= nvalid) continue;
    for (int nt = 0; nt < nnt; ++nt) {
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
        const int n = nt * kTile + tx + 16 * cc;
        if (n < N) dBs.put(base_j + int64_t(j) * stride_j + n, accb[nt * kOutFloats + acc_at(r, cc)]);
      }
    }
  }
}

// ---- B3: row (i) kernel -------------------------------------------------------------------

template <typename T, int Q>
struct RowSmem {
  alignas(32) T As[kStageElems<T>];
  alignas(32) T Bs[kStageElems<T>];
  alignas(32) T A3t[kTileElems<T>];  // [j][i] m_ij dt'_j DX_ij (rounded to T)
  alignas(32) float out[kOutFloats];
  float cs[Q], dtp[Q];
  int32_t sid[Q];
  float v[kTile], wrow[kTile];
  // followed by nnt accumulator tiles (acc_tiles)
};

template <typename T, int Q>
__global__ void __launch_bounds__(kThreads, 2) row_kernel(SsdBwdParams q, Scratch w) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  RowSmem<T, Q>& sm = *reinterpret_cast<RowSmem<T, Q>*>(smem_raw);
  const SsdParams& p = q.fwd;
  constexpr int kNT = Q / kTile;
  const int64_t nsplit = p.nheads / w.hs;
  int64_t bid = blockIdx.x;
  const int it = bid % kNT;
  bid /= kNT;
  const int64_t sp = bid % nsplit;
  bid /= nsplit;
  const int64_t c = bid % p.nchunks, b = bid / p.nchunks;
  const int i0 = it * kTile;
  const int nvalid = ssd_chunk_len(p, c);
  if (i0 >= nvalid) return;
  const int P = static_cast<int>(p.headdim), N = static_cast<int>(p.dstate);
  const int nnt = ceil_div_d(N);
  const int ty = tile_ty(), tx = tile_tx();
  const int32_t sid_prev = ssd_sid_prev(p, b, c, Q);
  float* accc = acc_tiles<RowSmem<T, Q>>(smem_raw);  // nnt tiles: dC_i over the block's heads
  zero_tiles(accc, nnt);  // seen after the first head's load_chunk_scalars barrier

  for (int hh = 0; hh < static_cast<int>(w.hs); ++hh) {
    const int64_t h = sp * w.hs + hh;
    ChunkView<T> v(q, b, c, h);
    __syncthreads();  // the previous head's epilogue still reads v/wrow
    load_chunk_scalars<Q>(v, sm.cs, sm.dtp, sm.sid);
    const float* in = p.states + v.state_base();

    // State term Z = dy_i in (i x N), one n tile at a time: V_i = fac_i C_i . Z_i and
    // dC_i += fac_i Z_i.
    float vpart[4] = {0.f, 0.f, 0.f, 0.f};
    for (int nt = 0; nt < nnt; ++nt) {
      product_to_out<true, true, false>(
          P, sm.As, sm.Bs, sm.A3t, sm.out, [&](int k, int m) { return v.dy(i0 + m, k); },
          [&](int k, int n) {
            const int nn = nt * kTile + n;
            return (k < P && nn < N) ? in[k * N + nn] : 0.f;
          });
      float* tc = accc + nt * kOutFloats;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int i = i0 + ty + 16 * r;
        const float fac = sm.sid[i] == sid_prev ? expf(sm.cs[i]) : 0.f;
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
          const float t = sm.out[acc_at(r, cc)];
          vpart[r] = fmaf(v.Cv(i, nt * kTile + tx + 16 * cc), t, vpart[r]);
          tc[acc_at(r, cc)] = fmaf(fac, t, tc[acc_at(r, cc)]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int il = ty + 16 * r, i = i0 + il;
      const float part = row_sum16(vpart[r]);
      const float fac = sm.sid[i] == sid_prev ? expf(sm.cs[i]) : 0.f;
      if (tx == 0) sm.v[il] = fac * part;
    }

    float wpart[4] = {0.f, 0.f, 0.f, 0.f};  // this thread's share of sum_j W_ij, rows ty + 16r
    for (int jt = 0; jt <= it; ++jt) {
      const int j0 = jt * kTile;
      // a3 = m dt' DX in float32 (kept for the W row sums); A3t = its one rounding to T.
      Acc a3;
      product_gg<true, true>(
          a3, P, sm.As, sm.Bs, sm.out, [&](int k, int m) { return v.dy(i0 + m, k); },
          [&](int k, int n) { return v.x(j0 + n, k); });
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
          const int il = ty + 16 * r, jl = tx + 16 * cc;
          a3[r][cc] *= seg_decay(i0 + il, j0 + jl, sm.cs, sm.sid) * sm.dtp[j0 + jl];
          sm.A3t[jl * kLdT<T> + il] = from_f<T>(a3[r][cc]);
        }
      // CB read from out element by element (a3 holds the registers of a second tile); out
      // is next written after gemm_sg_acc's barriers.
      product_to_out<false, true, true>(
          N, sm.As, sm.Bs, sm.Bs, sm.out, [&](int k, int m) { return v.Cv(i0 + m, k); },
          [&](int k, int n) { return v.Bv(j0 + n, k); });
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) wpart[r] = fmaf(sm.out[acc_at(r, cc)], a3[r][cc], wpart[r]);  // own element
      // dC_i += sum_j A3[i][j] B_j  (A3t is the A operand stored k-major: [j][i])
      for (int nt = 0; nt < nnt; ++nt)
        gemm_sg_acc<false>(accc + nt * kOutFloats, sm.A3t, sm.Bs,
                           [&](int k, int n) { return v.Bv(j0 + k, nt * kTile + n); });
    }
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float t = row_sum16(wpart[r]);
      if (tx == 0) sm.wrow[ty + 16 * r] = t;
    }
    __syncthreads();
    if (threadIdx.x < kTile) {
      const int i = i0 + threadIdx.x;
      if (i < nvalid) {
        const int64_t o = v.pos_base() + i;
        w.wrow[o] = sm.wrow[threadIdx.x];
        w.v[o] = sm.v[threadIdx.x];
      }
    }
  }

  __syncthreads();  // the warps' last stores to accc
  const int64_t stride_i = nsplit * N;  // (b, L, H/hs, N)
  const SplitSum<T> dCs(w.dCs, q.dC, w.bc_direct);
  const int64_t base_i = ((b * p.seqlen + ssd_chunk_t0(p, c)) * nsplit + sp) * N;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int i = i0 + ty + 16 * r;
    if (i >= nvalid) continue;
    for (int nt = 0; nt < nnt; ++nt) {
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) {
        const int n = nt * kTile + tx + 16 * cc;
        if (n < N) dCs.put(base_i + int64_t(i) * stride_i + n, accc[nt * kOutFloats + acc_at(r, cc)]);
      }
    }
  }
}

#ifdef NK_SSD_WGMMA_HERE
// ---- B3 on sm_90a: row and column kernels ---------------------------------------------------

// What row_kernel and col_kernel compute, for Q 128, P 64, N 128 and 16-bit T: one CTA per (b,
// chunk, split of hs heads) with both 64-position halves of the chunk on two warpgroups' wgmma
// (docs/ssd.md, "B3 on sm_90a"). The split and the (b, L, H/hs, N) dB / dC scratch are the
// portable kernels', so everything after them is unchanged. The next head's x (other buffer),
// dy (T) and float32 state (staging) and cs, dt' load by cp.async during this head. Opt-in with the
// forward's sm_90a kernels (NEMOKERNELS_SSD_SM90=1); compiled and host-checked, never run yet.

// Shared memory of both kernels, one layout: `qn` is the chunk's operand read as the A operand
// (rows, n) (C for the rows, B for the columns; RowCfg::SmemQN), `halves` the other one by
// 64-row halves (B for the rows, C for the columns; RowCfg::SmemJN = SmemNJ), `st_hi` / `st_lo`
// the head's float32 state split in T (in_c for the rows, dS for the columns) by n-halves
// (RowCfg::SmemHNP = ColCfg::SmemPHN).
template <typename E>
struct alignas(1024) B3Sm90Smem {
  using Rc = ssd_sm90::RowCfg<E>;
  static constexpr int Q = Rc::Q, P = Rc::P, N = Rc::N;
  alignas(1024) E qn[Q * N];
  alignas(1024) E halves[Q * N];
  alignas(1024) E X[2][Q * P];          // x[j][p] (Rc::SmemQP), one buffer per head parity
  alignas(1024) E Dy[Q * P];            // dy[i][p] rounded to T (Rc::SmemQP)
  alignas(1024) E st_hi[2][N / 2 * P];  // T(state)
  alignas(1024) E st_lo[2][N / 2 * P];  // T(state - hi)
  alignas(16) E dy_stage[Q * P];        // the next head's dy (T)
  alignas(16) float st_stage[P * N];    // the next head's state
  alignas(16) float cs[2][Q];
  alignas(16) float dtp[2][Q];
  int32_t sid[Q];
};
static_assert(sizeof(B3Sm90Smem<cute::bfloat16_t>) <= 227 * 1024, "more shared memory than an sm_90 CTA may have");

// Head h's x (rows >= valid zero-filled) into buffer buf, its dy (q.dout: run_bwd's) and
// state (`states`: in_c or dS, (b, nc, H, P, N)) into the staging tiles, cs and dt' into buffer
// buf. All threads; one commit group.
template <typename T, typename E>
NK_DEVICE void b3_sm90_issue_head(const SsdBwdParams& q, const float* states, B3Sm90Smem<E>& S,
                                  int buf, int64_t b, int64_t c, int64_t h, int64_t t0, int valid) {
  using Rc = ssd_sm90::RowCfg<E>;
  constexpr int Q = Rc::Q, P = Rc::P, N = Rc::N;
  const SsdParams& p = q.fwd;
  const int tid = threadIdx.x;
  auto sX = cute::make_tensor(cute::make_smem_ptr(S.X[buf]), typename Rc::SmemQP{});
  const T* xb = static_cast<const T*>(p.x) + b * p.x_sb + h * p.x_sh;
  for (int e = tid; e < Q * (P / 8); e += kThreads) {
    const int j = e / (P / 8), k = (e % (P / 8)) * 8;
    const bool ok = j < valid;
    ssd_sm90::cp_async16(&sX(j, k), ok ? xb + (t0 + j) * p.x_sl + k : xb, ok);
  }
  const T* db = static_cast<const T*>(q.dout) + b * q.dout_sb + h * q.dout_sh;
  T* st = reinterpret_cast<T*>(S.dy_stage);
  for (int e = tid; e < Q * (P / 8); e += kThreads) {
    const int i = e / (P / 8), k = (e % (P / 8)) * 8;
    const bool ok = i < valid;
    ssd_sm90::cp_async16(st + i * P + k, ok ? db + (t0 + i) * q.dout_sl + k : db, ok);
  }
  const float* sb = states + ((b * p.nchunks + c) * p.nheads + h) * int64_t{P * N};
  for (int e = tid; e < P * N / 4; e += kThreads) ssd_sm90::cp_async16(&S.st_stage[e * 4], sb + e * 4, true);
  const int64_t ci = ((b * p.nheads + h) * p.nchunks + c) * Q;
  if (tid < Q / 4) ssd_sm90::cp_async16(&S.cs[buf][tid * 4], p.cs + ci + tid * 4, true);
  else if (tid < Q / 2) ssd_sm90::cp_async16(&S.dtp[buf][(tid - Q / 4) * 4], p.dtp + ci + (tid - Q / 4) * 4, true);
  ssd_sm90::cp_async_commit();
}

// The chunk's operands (rows >= valid zero-filled): qn_src rows into `qn`, half_src rows into
// `halves`; its sids; then head h0's inputs (b3_sm90_issue_head). One commit group in all.
template <typename T, typename E>
NK_DEVICE void b3_sm90_load_chunk(const SsdBwdParams& q, const float* states, B3Sm90Smem<E>& S,
                                  const T* qn_src, int64_t qn_sl, const T* half_src, int64_t half_sl, int64_t b,
                                  int64_t c, int64_t h0, int64_t t0, int valid) {
  using Rc = ssd_sm90::RowCfg<E>;
  constexpr int Q = Rc::Q, N = Rc::N, kH = Rc::kHalf;
  const int tid = threadIdx.x;
  auto sQ = cute::make_tensor(cute::make_smem_ptr(S.qn), typename Rc::SmemQN{});
  for (int e = tid; e < Q * (N / 8); e += kThreads) {
    const int i = e / (N / 8), k = (e % (N / 8)) * 8;
    const bool ok = i < valid;
    auto sH = cute::make_tensor(cute::make_smem_ptr(S.halves + (i / kH) * (kH * N)), typename Rc::SmemJN{});
    ssd_sm90::cp_async16(&sQ(i, k), ok ? qn_src + (t0 + i) * qn_sl + k : qn_src, ok);
    ssd_sm90::cp_async16(&sH(i % kH, k), ok ? half_src + (t0 + i) * half_sl + k : half_src, ok);
  }
  for (int i = tid; i < Q; i += kThreads) S.sid[i] = ssd_sid_at(q.fwd, b, t0 + i);
  b3_sm90_issue_head<T>(q, states, S, 0, b, c, h0, t0, valid);
}

// A head's staged dy -> T into Dy (i, p); its state -> hi + lo by n-halves as (n, p): 16 bytes
// of T per step. Ends with the writes fenced for wgmma and a barrier.
template <typename T, typename E>
NK_DEVICE void b3_sm90_convert_head(B3Sm90Smem<E>& S) {
  using Rc = ssd_sm90::RowCfg<E>;
  constexpr int Q = Rc::Q, P = Rc::P, N = Rc::N;
  const int tid = threadIdx.x;
  auto sDy = cute::make_tensor(cute::make_smem_ptr(S.Dy), typename Rc::SmemQP{});
  for (int e = tid; e < Q * (P / 8); e += kThreads) {
    const int i = e / (P / 8), k = (e % (P / 8)) * 8;
    *reinterpret_cast<uint4*>(&sDy(i, k)) = *reinterpret_cast<const uint4*>(&S.dy_stage[i * P + k]);
  }
  for (int e = tid; e < P * (N / 8); e += kThreads) {
    const int pp = e / (N / 8), n = (e % (N / 8)) * 8, nh = n / (N / 2);
    auto sHi = cute::make_tensor(cute::make_smem_ptr(S.st_hi[nh]), typename Rc::SmemHNP{});
    auto sLo = cute::make_tensor(cute::make_smem_ptr(S.st_lo[nh]), typename Rc::SmemHNP{});
    float hi[8], lo[8];
    ssd::load8<float>(&S.st_stage[pp * N + n], true, hi);
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const float v = hi[u];
      hi[u] = to_f<T>(from_f<T>(v));
      lo[u] = v - hi[u];
    }
    ssd::store8<T>(reinterpret_cast<T*>(&sHi(n % (N / 2), pp)), true, hi);
    ssd::store8<T>(reinterpret_cast<T*>(&sLo(n % (N / 2), pp)), true, lo);
  }
  cutlass::arch::fence_view_async_shared();  // generic-proxy writes and cp.async -> wgmma
  __syncthreads();
}

// The same pointer, opaque to the optimizer: descriptors built from it where a product is issued
// are not hoisted out of the head loop (kept live across it, they spilled: 255 registers).
template <class Ptr>
NK_DEVICE Ptr* opaque(Ptr* ptr) {
  asm volatile("" : "+l"(ptr));
  return ptr;
}

// The shared-window address of ptr, opaque to the optimizer as above (element reads from it are
// computed per head, not hoisted), and two consecutive T read there as floats (ld.shared).
template <class Ptr>
NK_DEVICE uint32_t opaque_smem(Ptr* ptr) {
  uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
  asm volatile("" : "+r"(a));
  return a;
}
template <typename T>
NK_DEVICE void lds_pair(uint32_t addr, float& a, float& b) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
  const uint16_t lo = static_cast<uint16_t>(v & 0xFFFFu), hi = static_cast<uint16_t>(v >> 16);
  a = to_f<T>(reinterpret_cast<const T&>(lo));
  b = to_f<T>(reinterpret_cast<const T&>(hi));
}

// Sum over the 4 lanes of a quad (the threads holding one accumulator row), fixed order.
NK_DEVICE float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// This CTA's (b, chunk, split of hs heads) and the chunk's start and length.
struct B3Sm90Cta {
  int64_t b, c, sp, nsplit, t0, h_beg, h_end, g;
  int valid;
};
NK_DEVICE B3Sm90Cta b3_sm90_cta(const SsdParams& p, const Scratch& w) {
  B3Sm90Cta t;
  t.nsplit = p.nheads / w.hs;
  int64_t bid = blockIdx.x;
  t.sp = bid % t.nsplit;
  bid /= t.nsplit;
  t.c = bid % p.nchunks;
  t.b = bid / p.nchunks;
  t.t0 = ssd_chunk_t0(p, t.c);
  t.valid = ssd_chunk_len(p, t.c);
  t.h_beg = t.sp * w.hs;
  t.h_end = t.h_beg + w.hs;
  t.g = t.h_beg / (p.nheads / p.ngroups);
  return t;
}

// The kernels' shared memory. The swizzled tiles need a 1024-byte aligned base: the dynamic
// window starts there as long as the kernel declares no static __shared__ (keep it so; this
// traps otherwise).
template <typename E>
NK_DEVICE B3Sm90Smem<E>& b3_sm90_smem() {
  extern __shared__ __align__(1024) unsigned char smem_b3_sm90[];
  if ((__cvta_generic_to_shared(smem_b3_sm90) & 1023) != 0) __trap();
  return *reinterpret_cast<B3Sm90Smem<E>*>(smem_b3_sm90);
}

// Head h's start (buffer buf): its loads landed and converted for wgmma (barriers (A), (B)),
// then the next head's loads issued into the other buffers.
template <typename T, typename E>
NK_DEVICE void b3_sm90_begin_head(const SsdBwdParams& q, const float* states, B3Sm90Smem<E>& S,
                                  const B3Sm90Cta& t, int64_t h, int buf) {
  ssd_sm90::cp_async_wait_all();
  __syncthreads();  // (A) head h's staging, x, cs, dt' landed; every wgmma of head h - 1 is done
  b3_sm90_convert_head<T>(S);  // ends with (B): the staging tiles are free
  if (h + 1 < t.h_end) b3_sm90_issue_head<T>(q, states, S, buf ^ 1, t.b, t.c, h + 1, t.t0, t.valid);
}

// A sum over the split's heads (dB or dC: 64 accumulator values a thread over (Q, N)) into its
// (b, L, H/hs, N) place (SplitSum: the output or the scratch), rows < valid, pairs of n per store.
template <typename T, class Acc>
NK_DEVICE void b3_sm90_store_sum(const SplitSum<T>& dst, const SsdParams& p, const B3Sm90Cta& t, const Acc& acc) {
  constexpr int N = kSsdSm90N;
  const int tid = threadIdx.x, lane = tid % 32;
  const int r_lo = ssd_sm90::frag_row(tid, 0), r_hi = ssd_sm90::frag_row(tid, 2);
  const int64_t base = ((t.b * p.seqlen + t.t0) * t.nsplit + t.sp) * N;
#pragma unroll
  for (int v = 0; v < 64; v += 2) {
    const int r = (v & 2) == 0 ? r_lo : r_hi;
    if (r < t.valid) dst.put2(base + int64_t(r) * t.nsplit * N + ssd_sm90::frag_col(v, lane), acc(v), acc(v + 1));
  }
}

// Rows i. Per head: Z = dy in_cᵀ (in_c hi + lo) by n-halves gives V_i and dC_i += fac_i Z_i; then
// for each half of the columns j, CB = C Bᵀ and M = dy xᵀ, the masked A3 = M decay dt'_j in
// registers gives the W row sums against CB and, rounded to T, is the register A operand of
// dC += A3 B. dC stays in the accumulators over the split's heads.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) row_sm90_kernel(SsdBwdParams q, Scratch w) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using E = ssd_sm90::cute_elem_t<T>;
  using Rc = ssd_sm90::RowCfg<E>;
  using ssd_sm90::frag_col;
  using ssd_sm90::frag_row;
  constexpr int Q = Rc::Q, P = Rc::P, N = Rc::N, kH = Rc::kHalf;
  B3Sm90Smem<E>& S = b3_sm90_smem<E>();
  const SsdParams& p = q.fwd;
  const int tid = threadIdx.x, lane = tid % 32;
  const int64_t H = p.nheads, nc = p.nchunks;
  const B3Sm90Cta t = b3_sm90_cta(p, w);
  const int64_t b = t.b, c = t.c, t0 = t.t0, g = t.g;
  const int valid = t.valid;
  if (valid <= 0) return;  // uniform: an empty chunk of a plan writes nothing (as row_kernel)
  const int32_t sid_prev = ssd_sid_prev(p, b, c, Q);
  b3_sm90_load_chunk<T>(q, p.states, S, static_cast<const T*>(p.C) + b * p.C_sb + g * p.C_sg, p.C_sl,
                        static_cast<const T*>(p.B) + b * p.B_sb + g * p.B_sg, p.B_sl, b, c, t.h_beg, t0, valid);

  typename Rc::MmaZ mma_z;
  typename Rc::MmaHalf mma_h;
  typename Rc::MmaDC mma_dc;
  mma_z.accumulate_ = GMMA::ScaleOut::One;
  mma_h.accumulate_ = GMMA::ScaleOut::One;
  mma_dc.accumulate_ = GMMA::ScaleOut::One;
  auto thr_z = mma_z.get_thread_slice(tid);
  auto thr_h = mma_h.get_thread_slice(tid);
  auto thr_dc = mma_dc.get_thread_slice(tid);

  // dC over the split's heads (value v at (frag_row(tid, v), frag_col(v, lane)), as every
  // accumulator below)
  Tensor dC = partition_fragment_C(mma_dc, Shape<Int<Q>, Int<N>>{});
  static_assert(decltype(size(dC))::value == 64, "fragment size");
  clear(dC);
  const int i_lo = frag_row(tid, 0), i_hi = frag_row(tid, 2);

  for (int64_t h = t.h_beg; h < t.h_end; ++h) {
    const int buf = static_cast<int>((h - t.h_beg) & 1);
    b3_sm90_begin_head<T>(q, p.states, S, t, h, buf);
    const float* cs = S.cs[buf];
    const float* dtp = S.dtp[buf];
    const float cs_lo = cs[i_lo], cs_hi = cs[i_hi];
    const int32_t sid_lo = S.sid[i_lo], sid_hi = S.sid[i_hi];
    const int64_t pos = ((b * H + h) * nc + c) * Q;  // (b, H, nc, Q) per-position outputs

    {  // Z = dy in_cᵀ (hi, then lo) by n-halves; V_i = fac_i C_i . Z_i, dC_i += fac_i Z_i
      const float fac_lo = sid_lo == sid_prev ? expf(cs_lo) : 0.f, fac_hi = sid_hi == sid_prev ? expf(cs_hi) : 0.f;
      float v_lo = 0.f, v_hi = 0.f;
      const uint32_t cm = opaque_smem(S.qn);  // C's element addresses, per head (hoisted, they spilled)
      CUTE_UNROLL
      for (int nh = 0; nh < 2; ++nh) {  // unrolled: half nh is dC's values 32 nh .. 32 nh + 31
        Tensor tZa = thr_z.make_fragment_A(thr_z.partition_A(make_tensor(make_smem_ptr(opaque(S.Dy)), typename Rc::SmemQP{})));
        Tensor tZhi = thr_z.make_fragment_B(thr_z.partition_B(make_tensor(make_smem_ptr(opaque(S.st_hi[nh])), typename Rc::SmemHNP{})));
        Tensor tZlo = thr_z.make_fragment_B(thr_z.partition_B(make_tensor(make_smem_ptr(opaque(S.st_lo[nh])), typename Rc::SmemHNP{})));
        Tensor z = partition_fragment_C(mma_z, Shape<Int<Q>, Int<N / 2>>{});
        static_assert(decltype(size(z))::value == 32, "fragment size");
        clear(z);
        warpgroup_fence_operand(z);
        warpgroup_arrive();
        CUTE_UNROLL
        for (int k = 0; k < size<2>(tZa); ++k) gemm(mma_z, tZa(_, _, k), tZhi(_, _, k), z);
        CUTE_UNROLL
        for (int k = 0; k < size<2>(tZa); ++k) gemm(mma_z, tZa(_, _, k), tZlo(_, _, k), z);
        warpgroup_commit_batch();
        warpgroup_wait<0>();
        warpgroup_fence_operand(z);
        warpgroup_fence_operand(dC);
        CUTE_UNROLL
        for (int v = 0; v < 32; v += 2) {  // values v, v + 1: adjacent n of one row
          const bool lo = (v & 2) == 0;
          float c0, c1;
          lds_pair<T>(cm + 2u * ssd_sm90::k_sw128_offset<Q>(lo ? i_lo : i_hi, nh * (N / 2) + frag_col(v, lane)), c0, c1);
          float& vs = lo ? v_lo : v_hi;
          vs = fmaf(c0, z(v), vs);
          vs = fmaf(c1, z(v + 1), vs);
          dC(32 * nh + v) = fmaf(lo ? fac_lo : fac_hi, z(v), dC(32 * nh + v));
          dC(32 * nh + v + 1) = fmaf(lo ? fac_lo : fac_hi, z(v + 1), dC(32 * nh + v + 1));
        }
        warpgroup_fence_operand(dC);
      }
      v_lo = quad_sum(v_lo);
      v_hi = quad_sum(v_hi);
      if (lane % 4 == 0) {
        if (i_lo < valid) w.v[pos + i_lo] = fac_lo * v_lo;
        if (i_hi < valid) w.v[pos + i_hi] = fac_hi * v_hi;
      }
    }

    // The chunk's columns j in two halves: CB and M, A3 = M decay dt'_j (j <= i, same sid), the W
    // row sums, dC += A3 B. Warpgroup 0's rows (i < 64) keep no j of the second half: its A3 there
    // is zeros, multiplied anyway (a branch around a wgmma would serialize them).
    float w_lo = 0.f, w_hi = 0.f;
#pragma unroll 1
    for (int jh = 0; jh < 2; ++jh) {
      Tensor tCBa = thr_h.make_fragment_A(thr_h.partition_A(make_tensor(make_smem_ptr(opaque(S.qn)), typename Rc::SmemQN{})));
      Tensor tMa = thr_h.make_fragment_A(thr_h.partition_A(make_tensor(make_smem_ptr(opaque(S.Dy)), typename Rc::SmemQP{})));
      Tensor tCBb = thr_h.make_fragment_B(
          thr_h.partition_B(make_tensor(make_smem_ptr(opaque(S.halves + jh * (kH * N))), typename Rc::SmemJN{})));
      Tensor tMb = thr_h.make_fragment_B(
          thr_h.partition_B(make_tensor(make_smem_ptr(opaque(S.X[buf] + jh * (kH * P))), typename Rc::SmemHP{})));
      Tensor cb = partition_fragment_C(mma_h, Shape<Int<Q>, Int<kH>>{});
      Tensor m = partition_fragment_C(mma_h, Shape<Int<Q>, Int<kH>>{});
      clear(cb);
      clear(m);
      warpgroup_fence_operand(cb);
      warpgroup_fence_operand(m);
      warpgroup_arrive();
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tCBa); ++k) gemm(mma_h, tCBa(_, _, k), tCBb(_, _, k), cb);
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tMa); ++k) gemm(mma_h, tMa(_, _, k), tMb(_, _, k), m);
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(cb);
      warpgroup_fence_operand(m);
      // A3 as dC's register A operand: element (v % 8, 0, v / 8) is value v of the half
      Tensor a3 = make_tensor<E>(shape(thr_dc.partition_A(make_identity_tensor(Shape<Int<Q>, Int<kH>>{}))));
      static_assert(decltype(size(a3))::value == 32, "fragment size");
      CUTE_UNROLL
      for (int v = 0; v < 32; ++v) {
        const bool lo = (v & 2) == 0;
        const int i = lo ? i_lo : i_hi, j = jh * kH + frag_col(v, lane);
        float a = 0.f;
        if (j <= i && S.sid[j] == (lo ? sid_lo : sid_hi)) a = m(v) * (expf((lo ? cs_lo : cs_hi) - cs[j]) * dtp[j]);
        if (lo) w_lo = fmaf(cb(v), a, w_lo);
        else w_hi = fmaf(cb(v), a, w_hi);
        a3(v % 8, 0, v / 8) = E(a);
      }
      Tensor tDCb = thr_dc.make_fragment_B(
          thr_dc.partition_B(make_tensor(make_smem_ptr(opaque(S.halves + jh * (kH * N))), typename Rc::SmemNJ{})));
      Tensor a3_regs = recast<uint32_t>(a3);
      warpgroup_fence_operand(a3_regs);
      warpgroup_fence_operand(dC);
      warpgroup_arrive();
      CUTE_UNROLL
      for (int k = 0; k < size<2>(a3); ++k) gemm(mma_dc, a3(_, _, k), tDCb(_, _, k), dC);
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(dC);
      warpgroup_fence_operand(a3_regs);
    }
    w_lo = quad_sum(w_lo);
    w_hi = quad_sum(w_hi);
    if (lane % 4 == 0) {
      if (i_lo < valid) w.wrow[pos + i_lo] = w_lo;
      if (i_hi < valid) w.wrow[pos + i_hi] = w_hi;
    }
  }

  b3_sm90_store_sum(SplitSum<T>(w.dCs, q.dC, w.bc_direct), p, t, dC);  // dC of the split's heads
#else
  (void)q, (void)w;
  __trap();  // launched only on sm_90 from a build with this file's sm_90a pass
#endif
}

// Columns j. Per head: dx = R = B dSᵀ (dS hi + lo), Rx_j = x_j . R_j, then dx *= decay_j; dB_j +=
// w_j (x_j dS) by n-halves (w_j = decay_j dt'_j); then for each half of the rows i, CBᵀ = B Cᵀ
// and Mᵀ = x dyᵀ masked (i >= j, same sid) and decayed give the column sums of CB m DX in
// float32, A1 = CBᵀ m and A2 = Mᵀ m dt'_j rounded to T as the register A operands of
// dx += A1 dy and dB += A2 C. dx is finished per head (dt'_j dx + D dy), dB stays in the
// accumulators over the split's heads. decay_j = exp(cs_last - cs_j) when sid_j == sid_last.
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) col_sm90_kernel(SsdBwdParams q, Scratch w) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using E = ssd_sm90::cute_elem_t<T>;
  using Rc = ssd_sm90::RowCfg<E>;
  using Cc = ssd_sm90::ColCfg<E>;
  using ssd_sm90::frag_col;
  using ssd_sm90::frag_row;
  constexpr int Q = Rc::Q, P = Rc::P, N = Rc::N, kH = Rc::kHalf;
  B3Sm90Smem<E>& S = b3_sm90_smem<E>();
  const SsdParams& p = q.fwd;
  const int tid = threadIdx.x, lane = tid % 32;
  const int64_t H = p.nheads, nc = p.nchunks;
  const B3Sm90Cta t = b3_sm90_cta(p, w);
  const int64_t b = t.b, c = t.c, t0 = t.t0, g = t.g;
  const int valid = t.valid;
  if (valid <= 0) return;  // uniform: an empty chunk of a plan writes nothing (as col_kernel)
  b3_sm90_load_chunk<T>(q, q.dstates, S, static_cast<const T*>(p.B) + b * p.B_sb + g * p.B_sg, p.B_sl,
                        static_cast<const T*>(p.C) + b * p.C_sb + g * p.C_sg, p.C_sl, b, c, t.h_beg, t0, valid);

  typename Rc::MmaHalf mma_h;    // R (j x p), CBᵀ and Mᵀ halves (j x i)
  typename Rc::MmaZ mma_xs;      // x dS, one n-half (j x n)
  typename Cc::MmaDX mma_dx;     // dx += A1 dy
  typename Rc::MmaDC mma_db;     // dB += A2 C
  mma_h.accumulate_ = GMMA::ScaleOut::One;
  mma_xs.accumulate_ = GMMA::ScaleOut::One;
  mma_dx.accumulate_ = GMMA::ScaleOut::One;
  mma_db.accumulate_ = GMMA::ScaleOut::One;
  auto thr_h = mma_h.get_thread_slice(tid);
  auto thr_xs = mma_xs.get_thread_slice(tid);
  auto thr_dx = mma_dx.get_thread_slice(tid);
  auto thr_db = mma_db.get_thread_slice(tid);

  Tensor dB = partition_fragment_C(mma_db, Shape<Int<Q>, Int<N>>{});  // over the split's heads
  static_assert(decltype(size(dB))::value == 64, "fragment size");
  clear(dB);
  const int j_lo = frag_row(tid, 0), j_hi = frag_row(tid, 2);

  for (int64_t h = t.h_beg; h < t.h_end; ++h) {
    const int buf = static_cast<int>((h - t.h_beg) & 1);
    b3_sm90_begin_head<T>(q, q.dstates, S, t, h, buf);
    const float* cs = S.cs[buf];
    const float* dtp = S.dtp[buf];
    const float cs_last = cs[Q - 1];  // padding repeats the last real cs (dt' = 0 there)
    const int32_t sid_end = S.sid[Q - 1];
    const float cs_lo = cs[j_lo], cs_hi = cs[j_hi], dt_lo = dtp[j_lo], dt_hi = dtp[j_hi];
    const int32_t sid_lo = S.sid[j_lo], sid_hi = S.sid[j_hi];
    const float dec_lo = sid_lo == sid_end ? expf(cs_last - cs_lo) : 0.f;
    const float dec_hi = sid_hi == sid_end ? expf(cs_last - cs_hi) : 0.f;
    const int64_t pos = ((b * H + h) * nc + c) * Q;

    // dx = R = B dSᵀ (hi, then lo; K = n by halves); Rx_j = x_j . R_j; dx *= decay_j
    Tensor dx = partition_fragment_C(mma_h, Shape<Int<Q>, Int<P>>{});
    static_assert(decltype(size(dx))::value == 32, "fragment size");
    float rx_lo = 0.f, rx_hi = 0.f;
    {
      Tensor tRa = thr_h.make_fragment_A(thr_h.partition_A(make_tensor(make_smem_ptr(opaque(S.qn)), typename Rc::SmemQN{})));
      Tensor tRhi0 = thr_h.make_fragment_B(thr_h.partition_B(make_tensor(make_smem_ptr(opaque(S.st_hi[0])), typename Cc::SmemPHN{})));
      Tensor tRlo0 = thr_h.make_fragment_B(thr_h.partition_B(make_tensor(make_smem_ptr(opaque(S.st_lo[0])), typename Cc::SmemPHN{})));
      Tensor tRhi1 = thr_h.make_fragment_B(thr_h.partition_B(make_tensor(make_smem_ptr(opaque(S.st_hi[1])), typename Cc::SmemPHN{})));
      Tensor tRlo1 = thr_h.make_fragment_B(thr_h.partition_B(make_tensor(make_smem_ptr(opaque(S.st_lo[1])), typename Cc::SmemPHN{})));
      constexpr int kK = decltype(size<2>(tRhi0))::value;  // k-blocks per n-half
      static_assert(kK * 2 == decltype(size<2>(tRa))::value, "A's k-blocks cover both n-halves");
      clear(dx);
      warpgroup_fence_operand(dx);
      warpgroup_arrive();
      CUTE_UNROLL
      for (int k = 0; k < kK; ++k) gemm(mma_h, tRa(_, _, k), tRhi0(_, _, k), dx);
      CUTE_UNROLL
      for (int k = 0; k < kK; ++k) gemm(mma_h, tRa(_, _, k), tRlo0(_, _, k), dx);
      CUTE_UNROLL
      for (int k = 0; k < kK; ++k) gemm(mma_h, tRa(_, _, kK + k), tRhi1(_, _, k), dx);
      CUTE_UNROLL
      for (int k = 0; k < kK; ++k) gemm(mma_h, tRa(_, _, kK + k), tRlo1(_, _, k), dx);
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(dx);
      const uint32_t xm = opaque_smem(S.X[buf]);
      CUTE_UNROLL
      for (int v = 0; v < 32; v += 2) {  // values v, v + 1: adjacent p of one row
        const bool lo = (v & 2) == 0;
        float x0, x1;
        lds_pair<T>(xm + 2u * ssd_sm90::k_sw128_offset<Q>(lo ? j_lo : j_hi, frag_col(v, lane)), x0, x1);
        float& rs = lo ? rx_lo : rx_hi;
        rs = fmaf(x0, dx(v), rs);
        rs = fmaf(x1, dx(v + 1), rs);
        dx(v) *= lo ? dec_lo : dec_hi;
        dx(v + 1) *= lo ? dec_lo : dec_hi;
      }
      rx_lo = quad_sum(rx_lo);
      rx_hi = quad_sum(rx_hi);
    }

    // dB_j += w_j (x_j dS) by n-halves, w_j = decay_j dt'_j
    CUTE_UNROLL
    for (int nh = 0; nh < 2; ++nh) {  // unrolled: half nh is dB's values 32 nh .. 32 nh + 31
      Tensor tXa = thr_xs.make_fragment_A(thr_xs.partition_A(make_tensor(make_smem_ptr(opaque(S.X[buf])), typename Rc::SmemQP{})));
      Tensor tShi = thr_xs.make_fragment_B(thr_xs.partition_B(make_tensor(make_smem_ptr(opaque(S.st_hi[nh])), typename Rc::SmemHNP{})));
      Tensor tSlo = thr_xs.make_fragment_B(thr_xs.partition_B(make_tensor(make_smem_ptr(opaque(S.st_lo[nh])), typename Rc::SmemHNP{})));
      Tensor xs = partition_fragment_C(mma_xs, Shape<Int<Q>, Int<N / 2>>{});
      static_assert(decltype(size(xs))::value == 32, "fragment size");
      clear(xs);
      warpgroup_fence_operand(xs);
      warpgroup_arrive();
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tXa); ++k) gemm(mma_xs, tXa(_, _, k), tShi(_, _, k), xs);
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tXa); ++k) gemm(mma_xs, tXa(_, _, k), tSlo(_, _, k), xs);
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(xs);
      warpgroup_fence_operand(dB);
      const float wj_lo = dec_lo * dt_lo, wj_hi = dec_hi * dt_hi;
      CUTE_UNROLL
      for (int v = 0; v < 32; ++v) dB(32 * nh + v) = fmaf((v & 2) == 0 ? wj_lo : wj_hi, xs(v), dB(32 * nh + v));
      warpgroup_fence_operand(dB);
    }

    // The chunk's rows i in two halves. Warpgroup 1's rows (j >= 64) keep no i of the first half:
    // its A1, A2 there are zeros, multiplied anyway (a branch around a wgmma would serialize them).
    float col_lo = 0.f, col_hi = 0.f;  // sum_i CB_ij m_ij DX_ij
#pragma unroll 1
    for (int ih = 0; ih < 2; ++ih) {
      Tensor tCBa = thr_h.make_fragment_A(thr_h.partition_A(make_tensor(make_smem_ptr(opaque(S.qn)), typename Rc::SmemQN{})));
      Tensor tCBb = thr_h.make_fragment_B(
          thr_h.partition_B(make_tensor(make_smem_ptr(opaque(S.halves + ih * (kH * N))), typename Rc::SmemJN{})));
      Tensor tMa = thr_h.make_fragment_A(thr_h.partition_A(make_tensor(make_smem_ptr(opaque(S.X[buf])), typename Rc::SmemQP{})));
      Tensor tMb = thr_h.make_fragment_B(
          thr_h.partition_B(make_tensor(make_smem_ptr(opaque(S.Dy + ih * (kH * P))), typename Rc::SmemHP{})));
      Tensor cb = partition_fragment_C(mma_h, Shape<Int<Q>, Int<kH>>{});
      Tensor m = partition_fragment_C(mma_h, Shape<Int<Q>, Int<kH>>{});
      clear(cb);
      clear(m);
      warpgroup_fence_operand(cb);
      warpgroup_fence_operand(m);
      warpgroup_arrive();
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tCBa); ++k) gemm(mma_h, tCBa(_, _, k), tCBb(_, _, k), cb);
      CUTE_UNROLL
      for (int k = 0; k < size<2>(tMa); ++k) gemm(mma_h, tMa(_, _, k), tMb(_, _, k), m);
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(cb);
      warpgroup_fence_operand(m);
      // A1, A2 as the register A operands: element (v % 8, 0, v / 8) is value v of the half
      Tensor a1 = make_tensor<E>(shape(thr_dx.partition_A(make_identity_tensor(Shape<Int<Q>, Int<kH>>{}))));
      Tensor a2 = make_tensor<E>(shape(thr_db.partition_A(make_identity_tensor(Shape<Int<Q>, Int<kH>>{}))));
      static_assert(decltype(size(a1))::value == 32 && decltype(size(a2))::value == 32, "fragment size");
      CUTE_UNROLL
      for (int v = 0; v < 32; ++v) {
        const bool lo = (v & 2) == 0;
        const int j = lo ? j_lo : j_hi, i = ih * kH + frag_col(v, lane);
        float dec = 0.f;
        if (i >= j && S.sid[i] == (lo ? sid_lo : sid_hi)) dec = expf(cs[i] - (lo ? cs_lo : cs_hi));
        const float cbm = cb(v) * dec;
        if (lo) col_lo = fmaf(cbm, m(v), col_lo);
        else col_hi = fmaf(cbm, m(v), col_hi);
        a1(v % 8, 0, v / 8) = E(cbm);
        a2(v % 8, 0, v / 8) = E(m(v) * dec * (lo ? dt_lo : dt_hi));
      }
      Tensor tDXb = thr_dx.make_fragment_B(
          thr_dx.partition_B(make_tensor(make_smem_ptr(opaque(S.Dy + ih * (kH * P))), typename Cc::SmemPH{})));
      Tensor tDBb = thr_db.make_fragment_B(
          thr_db.partition_B(make_tensor(make_smem_ptr(opaque(S.halves + ih * (kH * N))), typename Rc::SmemNJ{})));
      Tensor a1_regs = recast<uint32_t>(a1);
      Tensor a2_regs = recast<uint32_t>(a2);
      warpgroup_fence_operand(a1_regs);
      warpgroup_fence_operand(a2_regs);
      warpgroup_fence_operand(dx);
      warpgroup_fence_operand(dB);
      warpgroup_arrive();
      CUTE_UNROLL
      for (int k = 0; k < size<2>(a1); ++k) gemm(mma_dx, a1(_, _, k), tDXb(_, _, k), dx);
      CUTE_UNROLL
      for (int k = 0; k < size<2>(a2); ++k) gemm(mma_db, a2(_, _, k), tDBb(_, _, k), dB);
      warpgroup_commit_batch();
      warpgroup_wait<0>();
      warpgroup_fence_operand(dx);
      warpgroup_fence_operand(dB);
      warpgroup_fence_operand(a1_regs);
      warpgroup_fence_operand(a2_regs);
    }
    col_lo = quad_sum(col_lo);
    col_hi = quad_sum(col_hi);

    // Epilogue of head h: dx_j = dt'_j dx_j + D dy_j (dy read as the portable kernel reads it,
    // q.dout), pairs of p per store; the per-position scalars by one lane per row.
    T* dxo = static_cast<T*>(q.dx);
    CUTE_UNROLL
    for (int v = 0; v < 32; v += 2) {
      const bool lo = (v & 2) == 0;
      const int j = lo ? j_lo : j_hi, pc = frag_col(v, lane);
      if (j >= valid) continue;
      const int64_t t = t0 + j;
      const float dtj = lo ? dt_lo : dt_hi;
      float o[2] = {dtj * dx(v), dtj * dx(v + 1)};
      if (p.D != nullptr) {  // as col_kernel: fmaf(dt'_j, dx, D dy)
        const T* dp = static_cast<const T*>(q.dout) + b * q.dout_sb + t * q.dout_sl + h * q.dout_sh + pc;
        const float dy2[2] = {to_f<T>(dp[0]), to_f<T>(dp[1])};
        CUTE_UNROLL
        for (int u = 0; u < 2; ++u) o[u] = fmaf(dtj, dx(v + u), (p.D_per_p ? p.D[h * P + pc + u] : p.D[h]) * dy2[u]);
      }
      const int64_t xo = ((b * p.seqlen + t) * H + h) * P + pc;  // even: 4-byte aligned pairs
      const T lo16 = from_f<T>(o[0]), hi16 = from_f<T>(o[1]);
      *reinterpret_cast<uint32_t*>(dxo + xo) =
          uint32_t{reinterpret_cast<const uint16_t&>(lo16)} | (uint32_t{reinterpret_cast<const uint16_t&>(hi16)} << 16);
    }
    if (lane % 4 == 0) {
      CUTE_UNROLL
      for (int r = 0; r < 2; ++r) {
        const int j = r == 0 ? j_lo : j_hi;
        if (j >= valid) continue;
        const float col = r == 0 ? col_lo : col_hi, rxd = (r == 0 ? dec_lo * rx_lo : dec_hi * rx_hi);
        const float dtj = r == 0 ? dt_lo : dt_hi;
        w.ddtp[pos + j] = col + rxd;
        w.wcol[pos + j] = dtj * col;
        w.u[pos + j] = dtj * rxd;
      }
    }
  }

  b3_sm90_store_sum(SplitSum<T>(w.dBs, q.dB, w.bc_direct), p, t, dB);  // dB of the split's heads
#else
  (void)q, (void)w;
  __trap();  // launched only on sm_90 from a build with this file's sm_90a pass
#endif
}

// Dtype, shapes and alignment the sm_90a B3 kernels take: 16-byte cp.async of x, B, C, of dy
// (dout, or with z B0's scratch), of the float32 states, dS, cs, dt'; dx stored as 4-byte pairs.
bool b3_sm90_supports(const SsdBwdParams& q) {
  const SsdParams& p = q.fwd;
  if (p.dtype != DType::BF16 && p.dtype != DType::F16) return false;
  if (p.chunk_size != kSsdSm90Q || p.headdim != kSsdSm90P || p.dstate != kSsdSm90N) return false;
  if (!ssd::vec_ok(p.x, 2, {p.x_sb, p.x_sl, p.x_sh}) || !ssd::vec_ok(p.B, 2, {p.B_sb, p.B_sl, p.B_sg}) ||
      !ssd::vec_ok(p.C, 2, {p.C_sb, p.C_sl, p.C_sg}))
    return false;
  if (!ssd::vec_ok(q.dout, 2, {q.dout_sb, q.dout_sl, q.dout_sh})) return false;  // dout or B0's dy
  if ((reinterpret_cast<uintptr_t>(q.dx) & 3) != 0) return false;
  // dB / dC pairs: 8-byte stores into the scratch, or 4-byte stores into the outputs (bc_direct)
  if (!ssd::aligned16(q.workspace) || ((reinterpret_cast<uintptr_t>(q.dB) | reinterpret_cast<uintptr_t>(q.dC)) & 3) != 0)
    return false;
  return ssd::aligned16(p.states) && ssd::aligned16(q.dstates) && ssd::aligned16(p.cs) && ssd::aligned16(p.dtp);
}
#endif  // NK_SSD_WGMMA_HERE

// ---- B3: per-chunk scalars ----------------------------------------------------------------

template <typename T, int Q>
__global__ void __launch_bounds__(kThreads) chunk_fin_kernel(SsdBwdParams q, Scratch w) {
  static_assert(Q <= kThreads, "one thread per position");
  __shared__ float scan[Q];
  __shared__ float red[kThreads / 32];
  const SsdParams& p = q.fwd;
  int64_t bid = blockIdx.x;
  const int64_t h = bid % p.nheads;
  bid /= p.nheads;
  const int64_t c = bid % p.nchunks, b = bid / p.nchunks;
  ChunkView<T> v(q, b, c, h);
  const int i = threadIdx.x;
  const bool real = i < v.nvalid;  // false for i >= Q too (nvalid <= Q)
  const int64_t o = v.pos_base() + i;
  const float u = real ? w.u[o] : 0.f;
  float dcs = real ? (w.wrow[o] - w.wcol[o]) + (w.v[o] - u) : 0.f;
  const float sum_u = block_sum(u, red);
  if (i == Q - 1) dcs += sum_u + q.dcs_last[(b * p.nheads + h) * p.nchunks + c];
  // ddA_i = sum_{k >= i} dcs_k: Hillis-Steele reverse inclusive scan (fixed order).
  if (i < Q) scan[i] = dcs;
  __syncthreads();
  for (int off = 1; off < Q; off *= 2) {
    float t = 0.f;
    if (i < Q) t = scan[i] + (i + off < Q ? scan[i + off] : 0.f);
    __syncthreads();
    if (i < Q) scan[i] = t;
    __syncthreads();
  }
  const float dda = i < Q ? scan[i] : 0.f;
  const float A = p.A[h];
  const float dtp = real ? p.dtp[o] : 0.f;
  float ddt = 0.f;
  if (real) {
    const float ddtp = fmaf(A, dda, w.ddtp[o]);
    const int64_t l = v.l0 + i;
    const float bias = p.dt_bias != nullptr ? p.dt_bias[h] : 0.f;
    ddt = ddtp * ssd_dt_grad(p.dt[(b * p.seqlen + l) * p.nheads + h], bias, p.dt_softplus, p.dt_min, p.dt_max);
    q.ddt[(b * p.seqlen + l) * p.nheads + h] = ddt;
  }
  const float da = block_sum(dtp * dda, red);
  const float db = block_sum(ddt, red);
  const int64_t part = (b * p.nchunks + c) * p.nheads + h;
  if (i == 0) {
    q.dA_part[part] = da;
    if (q.dbias_part != nullptr) q.dbias_part[part] = db;
  }
}

// ---- final sums -----------------------------------------------------------------------------

template <typename T>
__global__ void sum_bc_kernel(SsdBwdParams q, Scratch w) {
  // Eight n per step (dstate % 8 == 0 on the CUDA path): 32-byte loads of the float32 scratch
  // (256-byte aligned regions) and 16-byte stores of dB, dC (contiguous); 2026-12-06, one
  // element per thread before (124 us at Nano b1 L8192 on 2026-12-04).
  const SsdParams& p = q.fwd;
  const int64_t N = p.dstate, N8 = N / 8, G = p.ngroups, L = p.seqlen, H = p.nheads;
  const int64_t hpg = H / G, total = p.batch * L * G * N8;
  // The group's head splits are consecutive (hs divides H / G): sum them in order.
  const int64_t nsplit = H / w.hs, spg = hpg / w.hs;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = (e % N8) * 8, g = (e / N8) % G, bl = e / (N8 * G);  // bl = b * L + l
    float sb[8] = {}, sc[8] = {};
    for (int64_t k = 0; k < spg; ++k) {
      const int64_t idx = (bl * nsplit + g * spg + k) * N + n;
      float vb[8], vc[8];
      ssd::load8<float>(w.dBs + idx, true, vb);
      ssd::load8<float>(w.dCs + idx, true, vc);
#pragma unroll
      for (int t = 0; t < 8; ++t) sb[t] += vb[t], sc[t] += vc[t];
    }
    ssd::store8<T>(static_cast<T*>(q.dB) + e * 8, true, sb);
    ssd::store8<T>(static_cast<T*>(q.dC) + e * 8, true, sc);
  }
}

// One warp per output (dA[h], ddt_bias[h], dD[h] or dD[h, p]): lane l sums terms l, l + 32, ...
// in order, then the warp's butterfly: a fixed order (deterministic), and every output's terms
// read by 32 lanes at once (2026-12-06; one thread per output walked all b * nc [* P] terms
// before: 0.30 ms at Nano b1 L8192 on 2026-12-04).
NK_HD int64_t reduce_jobs(const SsdBwdParams& q) {
  const SsdParams& p = q.fwd;
  const int64_t nD = q.dD != nullptr && p.D != nullptr ? (p.D_per_p ? p.nheads * p.headdim : p.nheads) : 0;
  return 2 * p.nheads + nD;
}

__global__ void reduce_kernel(SsdBwdParams q) {
  const SsdParams& p = q.fwd;
  const int64_t H = p.nheads, P = p.headdim, rows = p.batch * p.nchunks, jobs = reduce_jobs(q);
  const int lane = threadIdx.x % 32;
  // warp-strided over the jobs (grid_for caps the grid): the bound is warp-uniform, so every
  // lane of a warp reaches the butterfly together
  for (int64_t job = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32; job < jobs;
       job += int64_t(gridDim.x) * blockDim.x / 32) {
    float acc = 0.f;
    float* out = nullptr;
    if (job < H) {  // dA
      for (int64_t r = lane; r < rows; r += 32) acc += q.dA_part[r * H + job];
      out = q.dA != nullptr ? q.dA + job : nullptr;
    } else if (job < 2 * H) {  // ddt_bias
      const int64_t t = job - H;
      if (q.ddt_bias != nullptr)
        for (int64_t r = lane; r < rows; r += 32) acc += q.dbias_part[r * H + t];
      out = q.ddt_bias != nullptr ? q.ddt_bias + t : nullptr;
    } else if (p.D_per_p) {  // dD (H, P)
      const int64_t t = job - 2 * H;
      for (int64_t r = lane; r < rows; r += 32) acc += q.dD_part[r * H * P + t];
      out = q.dD + t;
    } else {  // dD (H,): the terms (r, p) of head t
      const int64_t t = job - 2 * H;
      for (int64_t m = lane; m < rows * P; m += 32) acc += q.dD_part[((m / P) * H + t) * P + m % P];
      out = q.dD + t;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0 && out != nullptr) *out = acc;
  }
}

// ---- launch ---------------------------------------------------------------------------------

// Element-wise kernels: grid-strided, so their grids are capped (no limit to check).
int grid_for(int64_t total, int threads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((total + threads - 1) / threads, 65536 * 8)));
}

// The grid-sized kernels' grids (launch_limits.h), checked against CUDA's limits.
static_assert(kTile == kSsdTile, "launch_limits.h computes the grids from it");

SsdBwdGrids bwd_grids(const SsdParams& p) {
  return ssd_bwd_grids(p.batch, p.nchunks, p.nheads, p.headdim, p.dstate, p.chunk_size, heads_per_block(p));
}

unsigned gx(const LaunchGrid& g) { return static_cast<unsigned>(g.x); }

// Dynamic shared memory of col_kernel (the larger of the two B3 kernels): its fixed struct plus
// ceil(P/64) + ceil(N/64) float32 accumulator tiles.
template <typename T, int Q>
int col_smem_bytes(const SsdParams& p) {
  return smem_with_tiles<ColSmem<T, Q>>(static_cast<int>((p.headdim + kTile - 1) / kTile + (p.dstate + kTile - 1) / kTile));
}
template <typename T>
int col_smem_bytes_q(const SsdParams& p) {
  return p.chunk_size == 64 ? col_smem_bytes<T, 64>(p) : p.chunk_size == 128 ? col_smem_bytes<T, 128>(p) : col_smem_bytes<T, 256>(p);
}
// Checked before the first launch, as the forward checks F4's (the same remedy applies).
void check_b3_smem(const SsdParams& p) {
  const int need = p.dtype == DType::F32 ? col_smem_bytes_q<float>(p) : col_smem_bytes_q<__half>(p);
  int dev = 0, max_smem = 0;
  NK_CUDA_CHECK(cudaGetDevice(&dev));
  NK_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (need > max_smem)
    throw std::runtime_error("nemokernels: mamba_chunk_scan_combined (backward): the CUDA backward needs " +
                             std::to_string(need) + " bytes of shared memory per block, the device allows " +
                             std::to_string(max_smem) + "; use float16 / bfloat16 activations or a smaller "
                             "headdim or dstate (the CPU path has no such limit)");
}

template <typename T, int Q>
void run_bwd(const SsdBwdParams& q_in, cudaStream_t stream) {
  const SsdParams& p = q_in.fwd;
  Scratch w{};
  scratch_layout(q_in, &w);
  const int64_t b = p.batch, H = p.nheads, nc = p.nchunks;
  const SsdBwdGrids g = bwd_grids(p);

  // Every kernel after B0 reads dy where it reads dout: with z, q's dout is B0's T scratch.
  SsdBwdParams q = q_in;
  if (p.z != nullptr || (p.D != nullptr && q_in.dD_part != nullptr)) {  // B0: dy, dz and dD's partials
    const bool vec_dout = ssd::vec_ok(q_in.dout, sizeof(T), {q_in.dout_sb, q_in.dout_sl, q_in.dout_sh});
    const bool vec_z = p.z != nullptr && ssd::vec_ok(p.z, sizeof(T), {p.z_sb, p.z_sl, p.z_sh});
    const bool vec_out = ssd::aligned16(p.y_pre) && ssd::aligned16(q_in.dz);
    const bool vec_x = ssd::vec_ok(p.x, sizeof(T), {p.x_sb, p.x_sl, p.x_sh});
    dy_dz_kernel<T><<<gx(g.chunk_fin), kThreads, 0, stream>>>(q_in, static_cast<T*>(w.dy), vec_dout, vec_z,
                                                             vec_out, vec_x);
    NK_CUDA_LAUNCH_CHECK();
  }
  if (p.z != nullptr) {
    T* dy = static_cast<T*>(w.dy);
    q.dout = dy;
    q.dout_sh = p.headdim;
    q.dout_sl = H * p.headdim;
    q.dout_sb = p.seqlen * H * p.headdim;
  }
  // B1 + B2: the reverse state chain (its ticket and chain counters start at zero)
  const int64_t chains = b * H * state_tiles(p);
  NK_CUDA_CHECK(cudaMemsetAsync(w.chain, 0, static_cast<size_t>(1 + chains) * sizeof(unsigned), stream));
  bool b1_wgmma = false;
#ifdef NK_SSD_WGMMA_HERE
  // NEMOKERNELS_SSD_SM90=1 on a compute capability 9.0 device: B1 and B3 on wgmma where they fit
  [[maybe_unused]] const bool sm90 = sizeof(T) == 2 && Q == 128 && ssd_cuda_sm90_opted_in();
  if constexpr (sizeof(T) == 2 && Q == 128) {
    // the chain's dIn tile on wgmma with the forward's sm_90a kernels, full tiles
    if (p.headdim % kTile == 0 && p.dstate % kTile == 0 && sm90) {
      const bool vec_dout = ssd::vec_ok(q.dout, sizeof(T), {q.dout_sb, q.dout_sl, q.dout_sh});
      const bool vec_C = ssd::vec_ok(p.C, sizeof(T), {p.C_sb, p.C_sl, p.C_sg});
      dstate_chain_wgmma_kernel<T><<<gx(g.dstate_chain), 128, 0, stream>>>(q, w, vec_dout, vec_C);
      b1_wgmma = true;
    }
  }
#endif
  if (!b1_wgmma) dstate_chain_kernel<T, Q><<<gx(g.dstate_chain), kThreads, 0, stream>>>(q, w);
  NK_CUDA_LAUNCH_CHECK();
  dcs_last_kernel<<<grid_for(b * H * nc, 256), 256, 0, stream>>>(q, w.dot_part);
  NK_CUDA_LAUNCH_CHECK();

  bool b3_wgmma = false;
#ifdef NK_SSD_WGMMA_HERE
  if constexpr (sizeof(T) == 2 && Q == 128) {
    // B3 on wgmma (NEMOKERNELS_SSD_SM90=1): a CTA per (b, chunk, split of hs heads) for each
    if (sm90 && b3_sm90_supports(q)) {
      const int bytes = static_cast<int>(sizeof(B3Sm90Smem<ssd_sm90::cute_elem_t<T>>));
      const unsigned grid = static_cast<unsigned>(b * nc * (H / w.hs));  // <= the portable grids (checked)
      allow_dynamic_smem<col_sm90_kernel<T>>(bytes);
      col_sm90_kernel<T><<<grid, kThreads, bytes, stream>>>(q, w);
      NK_CUDA_LAUNCH_CHECK();
      allow_dynamic_smem<row_sm90_kernel<T>>(bytes);
      row_sm90_kernel<T><<<grid, kThreads, bytes, stream>>>(q, w);
      NK_CUDA_LAUNCH_CHECK();
      b3_wgmma = true;
    }
  }
#endif
  if (!b3_wgmma) {
    const int nnt = static_cast<int>((p.dstate + kTile - 1) / kTile);
    const int col_smem = col_smem_bytes<T, Q>(p);
    allow_dynamic_smem<col_kernel<T, Q>>(col_smem);
    col_kernel<T, Q><<<gx(g.col), kThreads, col_smem, stream>>>(q, w);
    NK_CUDA_LAUNCH_CHECK();
    const int row_smem = smem_with_tiles<RowSmem<T, Q>>(nnt);
    allow_dynamic_smem<row_kernel<T, Q>>(row_smem);
    row_kernel<T, Q><<<gx(g.row), kThreads, row_smem, stream>>>(q, w);
    NK_CUDA_LAUNCH_CHECK();
  }
  chunk_fin_kernel<T, Q><<<gx(g.chunk_fin), kThreads, 0, stream>>>(q, w);
  NK_CUDA_LAUNCH_CHECK();

  if (!w.bc_direct) {  // else the B3 kernels stored dB and dC
    sum_bc_kernel<T><<<grid_for(b * p.seqlen * p.ngroups * p.dstate / 8, 256), 256, 0, stream>>>(q, w);
    NK_CUDA_LAUNCH_CHECK();
  }
  reduce_kernel<<<grid_for(reduce_jobs(q) * 32, 256), 256, 0, stream>>>(q);
  NK_CUDA_LAUNCH_CHECK();
}

template <typename T>
void run_bwd_q(const SsdBwdParams& q, cudaStream_t stream) {
  switch (q.fwd.chunk_size) {
    case 64: return run_bwd<T, 64>(q, stream);
    case 128: return run_bwd<T, 128>(q, stream);
    case 256: return run_bwd<T, 256>(q, stream);
    default: throw std::runtime_error("nemokernels: ssd_bwd_cuda: chunk_size must be 64, 128 or 256");
  }
}

}  // namespace

int64_t ssd_bwd_cuda_workspace_bytes(const SsdBwdParams& q) {
  // Called by the entry before the workspace is allocated: a problem over the grid limits
  // fails here, not after the allocation.
  const SsdParams& p = q.fwd;
  if (p.batch > 0 && p.seqlen > 0 && p.nheads > 0) bwd_grids(p);
  return scratch_layout(q, nullptr) * 4;
}

void ssd_bwd_cuda(const SsdBwdParams& q, void* stream) {
  const SsdParams& p = q.fwd;
  if (p.batch == 0 || p.seqlen == 0 || p.nheads == 0) return;  // the entry never calls this
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  // F1-F3 (dtp, cs, states = in_c), with the forward's scratch carved from ours: the entry
  // sizes the backward's workspace only, and fwd.workspace is null there.
  Scratch w{};
  scratch_layout(q, &w);
  SsdParams fp = p;
  fp.workspace = w.fwd_ws;
  bwd_grids(p);  // every grid and the shared memory checked before the first launch
  check_b3_smem(p);
  ssd_states_cuda(fp, stream);
  switch (p.dtype) {
    case DType::F32: return run_bwd_q<float>(q, s);
    case DType::F16: return run_bwd_q<__half>(q, s);
    case DType::BF16: return run_bwd_q<__nv_bfloat16>(q, s);
  }
}

}  // namespace nk

// Speed ideas not done yet (correctness first; the layout above already allows them):
//  - The element-wise scalings applied to the state terms (wj on x dS, fac_i on dy in) could
//    be folded into the staged operands' row scales, so that those products too go straight
//    into the shared accumulators (gemm_sg_acc) without the trip through `out`.
//  - CB and DX tiles are computed twice (column and row kernels); one kernel per (i, j) tile
//    pair with float32 partials of the row quantities would compute them once.
//  - Double-buffered (cp.async) staging and 16-byte loads (ssd_cuda_common.cuh's load8 /
//    load_tile) where strides allow; today staging is element-wise through the accessors.
