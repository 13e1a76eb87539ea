// CUDA forward of the Mamba-2 SSD chunk scan (mamba_chunk_scan_combined): stages F1-F5 of
// ssd_chunk_scan.h (math and layouts), F1-F3 fused into one chained kernel (H1), then F4, F5.
// Details: docs/ssd.md, section `csrc/ssd/ssd_chunk_scan_fwd_cuda.cu`.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdlib>
#include <cstring>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/cuda_utils.cuh"
#include "ssd/launch_limits.h"
// The state chain's wgmma tile is in this portable file, so it exists only when this file's own
// passes include sm_90a (NK_PORTABLE_SM90A, CMakeLists.txt); a plain "90" build compiles this
// file for sm_90, which has no wgmma, and keeps the wmma tile there.
#if defined(NK_HAS_SM90) && defined(NK_PORTABLE_SM90A)
#define NK_SSD_WGMMA_HERE 1
#endif
#ifdef NK_HAS_SM90
#include <cutlass/arch/barrier.h>

#include "ssd/ssd_chunk_output_sm90.cuh"
#include "ssd/ssd_chunk_output_sm90.h"
#endif
#include "ssd/numerics.cuh"
#include "ssd/ssd_chunk_scan.h"
#include "ssd/ssd_cuda_common.cuh"

namespace nk {
namespace {

using ssd::aligned16;
using ssd::kSmemPad;
using ssd::load8;
using ssd::load_tile;
using ssd::round_up16;
using ssd::store8;
using ssd::to_f;
using ssd::vec_ok;
using ssd::from_f;
using ssd::WarpTile;

// Which tensors may use 16-byte accesses (pointer and strides checked on the host).
struct Vec {
  bool x, B, C, z, y, st;
};

// Compile-time tile choices.
struct StateTraits {  // H1 / F5
  static constexpr int kThreads = 128;
  static constexpr int kBP = 64;  // P rows per block (4 warps x 16)
  static constexpr int kBN = 64;  // N columns per block (4 wmma column blocks per warp)
  static constexpr int kBJ = 64;  // positions per K-slab
  static constexpr int kLdF = kBN + 4;
};
struct ScanTraits {  // F4
  static constexpr int kThreads = 128;
  static constexpr int kBM = 64;  // rows (positions i) per block (4 warps x 16)
  static constexpr int kBJ = 64;  // columns (positions j) per causal step
  static constexpr int kNSlab = 64;  // N per slab of the incoming-state GEMM
  static constexpr int kMaxFN = 8;   // 16-column blocks of P per warp (P <= 128)
  // Resident blocks the register budget is sized for: 16-bit inputs with N=128, P=64 use
  // ~70 KB of shared memory, so 3 blocks fit an SM (<= 168 registers); float tiles are twice
  // as large, so registers are not the limit there.
  template <typename T> static constexpr int min_blocks() { return sizeof(T) == 2 ? 3 : 1; }
};
static_assert(StateTraits::kBP == 16 * (StateTraits::kThreads / 32), "one 16-row strip per warp");
static_assert(ScanTraits::kBM == 16 * (ScanTraits::kThreads / 32), "one 16-row strip per warp");
static_assert(ScanTraits::kBM == ScanTraits::kBJ, "the diagonal j-block must be the row block");

__host__ __device__ constexpr size_t align128(size_t v) { return (v + 127) / 128 * 128; }


// ------------------------------------------------------------------ H1 / F5 state tile
template <typename T>
struct StateSmem {
  static constexpr int kLdX = StateTraits::kBP + kSmemPad<T>;  // XW[j][p]
  static constexpr int kLdB = StateTraits::kBN + kSmemPad<T>;  // Bs[j][n]
  static constexpr size_t kOffX = 256;                           // after w_s[64]
  static constexpr size_t kOffB = kOffX + align128(size_t(StateTraits::kBJ) * kLdX * sizeof(T));
  static constexpr size_t kEndAB = kOffB + align128(size_t(StateTraits::kBJ) * kLdB * sizeof(T));
  static constexpr size_t kEndF = kOffX + size_t(StateTraits::kBP) * StateTraits::kLdF * sizeof(float);
  // the float result tile aliases the operand tiles once the main loop is over
  static constexpr size_t kBytes = kEndAB > kEndF ? kEndAB : kEndF;
};

// acc[p][n] = sum_{jlo <= j <= jhi} w_j x_j[p0 + p] B_j[n0 + n] over the positions j of chunk
// c (head h, batch row b), w_j = exp(cs_jhi - cs_j) dt'_j, times [sid_j == sid_jhi] when
// use_sid; cs and dtp are the chunk's Q values (shared or global memory). Returns the float result tile in shared memory (ld StateTraits::kLdF), complete
// for rows < min(64, P - p0) and columns < min(64, N - n0) once every thread is back (the
// function ends with __syncthreads). All threads of the block must call it.
template <typename T, int Q>
NK_DEVICE float* chunk_state_tile(const SsdParams& p, const Vec& vec, int64_t b, int64_t c, int64_t h, int jlo,
                                  int jhi, bool use_sid, int p0, int n0, const float* cs, const float* dtp,
                                  unsigned char* smem) {
  using S = StateSmem<T>;
  constexpr int kT = StateTraits::kThreads, kBJ = StateTraits::kBJ;
  float* w_s = reinterpret_cast<float*>(smem);
  T* XW = reinterpret_cast<T*>(smem + S::kOffX);
  T* Bs = reinterpret_cast<T*>(smem + S::kOffB);
  float* Fs = reinterpret_cast<float*>(smem + S::kOffX);

  const int tid = threadIdx.x, warp = tid / 32;
  const int P = static_cast<int>(p.headdim), N = static_cast<int>(p.dstate);
  const int64_t H = p.nheads;
  const int64_t g = h / (H / p.ngroups);
  const int64_t t0 = ssd_chunk_t0(p, c);
  const int valid = ssd_chunk_len(p, c);
  const int pv = P - p0 < StateTraits::kBP ? P - p0 : StateTraits::kBP;
  const int nv = N - n0 < StateTraits::kBN ? N - n0 : StateTraits::kBN;
  const int pv16 = round_up16(pv), nv16 = round_up16(nv);
  const float cs_last = cs[jhi];
  const int32_t sid_last = use_sid ? ssd_sid_at(p, b, t0 + jhi) : 0;

  WarpTile<T, StateTraits::kBN / 16> acc;
  acc.zero();
  for (int j0 = 0; j0 < valid; j0 += kBJ) {
    if (j0 + kBJ - 1 < jlo || j0 > jhi) continue;  // uniform: no position of the range here
    if (tid < kBJ) {
      const int j = j0 + tid;
      float w = 0.f;
      if (j >= jlo && j <= jhi && j < valid && (!use_sid || ssd_sid_at(p, b, t0 + j) == sid_last))
        w = expf(cs_last - cs[j]) * dtp[j];
      w_s[tid] = w;
    }
    __syncthreads();
    const int rows = valid - j0 < kBJ ? valid - j0 : kBJ;
    const T* xsrc = static_cast<const T*>(p.x) + b * p.x_sb + (t0 + j0) * p.x_sl + h * p.x_sh + p0;
    const T* bsrc = static_cast<const T*>(p.B) + b * p.B_sb + (t0 + j0) * p.B_sl + g * p.B_sg + n0;
    load_tile<kT>(XW, S::kLdX, xsrc, p.x_sl, rows, kBJ, pv, pv16, vec.x, w_s);
    load_tile<kT>(Bs, S::kLdB, bsrc, p.B_sl, rows, kBJ, nv, nv16, vec.B);
    __syncthreads();
    // A(p, j) = XW[j][p] (column-major with the warp's 16 rows of P), B(j, n) = Bs[j][n]
    if (warp * 16 < pv16) acc.template mma<true, false>(XW + warp * 16, S::kLdX, Bs, S::kLdB, kBJ, nv16);
    __syncthreads();
  }
  if (warp * 16 < pv16) acc.store(Fs + warp * 16 * StateTraits::kLdF, StateTraits::kLdF, nv16);
  __syncthreads();
  return Fs;
}

#ifdef NK_SSD_WGMMA_HERE
// chunk_state_tile on sm_90a for the state chain (Q = 128, full 64 x 64 tiles, 16-bit T, 16-byte
// aligned x and B): the same XW = round_T(w_j x_j) and B tiles, multiplied by one warpgroup's
// wgmma (m64n64k16 x 8) instead of the wmma slabs, and returned as the same float tile Fs (ld
// StateTraits::kLdF; complete once every thread is back). Only the float32 accumulation order
// differs from chunk_state_tile. All 128 threads call it. Opt-in with the chunk output
// (NEMOKERNELS_SSD_SM90=1): launch_states picks the instantiation.
struct StateWgSmem {
  static constexpr size_t kOffW = 0;                 // w_j, 128 floats
  static constexpr size_t kOffX = 1024;              // XW as (p, j), 16 KB, 1024-byte aligned
  static constexpr size_t kOffB = kOffX + 16384;     // B as (n, j), 16 KB
  static constexpr size_t kBytes = kOffB + 16384;    // the float result tile (17 KB) aliases XW / B
};

template <typename T, int Q>
NK_DEVICE float* chunk_state_tile_wgmma(const SsdParams& p, int64_t b, int64_t c, int64_t h, int p0, int n0,
                                        const float* cs, const float* dtp, unsigned char* smem) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(Q == 128 && sizeof(T) == 2, "the wgmma state tile is built for Q 128 and 16-bit inputs");
  using namespace cute;
  using E = ssd_sm90::cute_elem_t<T>;
  using Sc = ssd_sm90::StateCfg<E>;
  constexpr int kT = StateTraits::kThreads;
  float* w_s = reinterpret_cast<float*>(smem + StateWgSmem::kOffW);
  Tensor sX = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem + StateWgSmem::kOffX)), typename Sc::SmemTJ{});
  Tensor sB = make_tensor(make_smem_ptr(reinterpret_cast<E*>(smem + StateWgSmem::kOffB)), typename Sc::SmemTJ{});
  float* Fs = reinterpret_cast<float*>(smem + StateWgSmem::kOffX);
  const int tid = threadIdx.x;
  const int64_t g = h / (p.nheads / p.ngroups);
  const int64_t t0 = ssd_chunk_t0(p, c);
  const int valid = ssd_chunk_len(p, c);
  const T* xb = static_cast<const T*>(p.x) + b * p.x_sb + h * p.x_sh + p0;
  const T* bb = static_cast<const T*>(p.B) + b * p.B_sb + g * p.B_sg + n0;

  // w_j = exp(cs_last - cs_j) [sid_j == sid_last] dt'_j over the whole chunk (as chunk_state_tile
  // with jlo = 0, jhi = Q - 1, use_sid)
  const float cs_last = cs[Q - 1];
  const int32_t sid_last = ssd_sid_at(p, b, t0 + Q - 1);
  for (int j = tid; j < Q; j += kT)
    w_s[j] = j < valid && ssd_sid_at(p, b, t0 + j) == sid_last ? expf(cs_last - cs[j]) * dtp[j] : 0.f;
  // B rows by cp.async (zero-filled past the chunk)
  for (int e = tid; e < Q * 8; e += kT) {
    const int j = e / 8, k = (e % 8) * 8;
    const bool ok = j < valid;
    ssd_sm90::cp_async16(&sB(k, j), ok ? bb + (t0 + j) * p.B_sl + k : bb, ok);
  }
  ssd_sm90::cp_async_commit();
  __syncthreads();  // w_s
  // XW rows: x scaled by w_j in float32, rounded to T once (load_tile's row_scale)
  for (int e = tid; e < Q * 8; e += kT) {
    const int j = e / 8, k = (e % 8) * 8;
    float v[8];
    const float s = w_s[j];
    if (j < valid) {
      load8<T>(xb + (t0 + j) * p.x_sl + k, true, v);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = s != 0.f ? v[i] * s : 0.f;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = 0.f;
    }
    store8<T>(reinterpret_cast<T*>(&sX(k, j)), true, v);
  }
  ssd_sm90::cp_async_wait_all();
  cutlass::arch::fence_view_async_shared();  // st.shared and cp.async writes -> wgmma
  __syncthreads();

  // the products first, then (every warp's wgmma done reading XW / B) the float tile over them
  float acc[32];
  ssd_sm90::state_tile_mma(&sX(0, 0), &sB(0, 0), acc);
  __syncthreads();
#pragma unroll
  for (int v = 0; v < 32; ++v) Fs[ssd_sm90::frag_row(tid, v) * StateTraits::kLdF + ssd_sm90::frag_col(v, tid % 32)] = acc[v];
  __syncthreads();
  return Fs;
#else
  (void)p, (void)b, (void)c, (void)h, (void)p0, (void)n0, (void)cs, (void)dtp, (void)smem;
  __trap();  // launched only on sm_90 from a 90a build
  return nullptr;
#endif
}
#endif  // NK_SSD_WGMMA_HERE

// ------------------------------------------------------------------ H1 state_chain (F1-F3)
// p.workspace: a ticket counter, then one progress counter per chain (b, h, P tile, N tile),
// zeroed before each launch; without p.states (and nc > 1), at byte chain_ring_offset(p), one
// 64 x 64 float32 tile per chain that carries the chain's state from block to block: block c
// reads in_c there and writes in_(c+1) over it, each thread its own elements, and only after
// block c - 1 published and before block c + 1 may read (the counter orders every access).
NK_HD int64_t chain_count(const SsdParams& p) {
  return p.batch * p.nheads * ((p.headdim + StateTraits::kBP - 1) / StateTraits::kBP) *
         ((p.dstate + StateTraits::kBN - 1) / StateTraits::kBN);
}
constexpr int64_t kRingTile = int64_t{StateTraits::kBP} * StateTraits::kBN;  // floats per chain
NK_HD int64_t chain_ring_offset(const SsdParams& p) { return ((1 + chain_count(p)) * 4 + 255) / 256 * 256; }
int64_t chain_counter_bytes(const SsdParams& p) { return (1 + chain_count(p)) * int64_t{sizeof(unsigned)}; }
int64_t chain_workspace_bytes(const SsdParams& p) {
  if (p.states != nullptr || p.nchunks <= 1) return chain_counter_bytes(p);  // no ring (one chunk: no hand-over)
  return chain_ring_offset(p) + chain_count(p) * kRingTile * 4;
}

// One block per (chunk c, b, h, 64x64 state tile), in ticket order (chunk slowest): F1 for its
// chunk and head, its F2 tile S_c, then the F3 step of its chain once block c-1 of the chain
// has published in_c: in_(c+1) = carry_c in_c + S_c (fmaf, the CPU's order). A block only
// waits on a lower ticket, i.e. a block already running: no deadlock whatever the hardware's
// block order. The chain's tiles pass through L2 (in_c is read back with __ldcg).
// kWgmma: the chunk-state tile on sm_90a wgmma (chunk_state_tile_wgmma), else the portable one.
template <typename T, int Q, bool kWgmma = false>
__global__ void __launch_bounds__(StateTraits::kThreads) state_chain_kernel(const SsdParams p, const Vec vec) {
  constexpr int kT = StateTraits::kThreads, kBP = StateTraits::kBP, kBN = StateTraits::kBN;
#ifdef NK_SSD_WGMMA_HERE
  constexpr size_t kSmem = kWgmma ? StateWgSmem::kBytes : StateSmem<T>::kBytes;
#else
  static_assert(!kWgmma, "the wgmma state tile needs this file built for sm_90a");
  constexpr size_t kSmem = StateSmem<T>::kBytes;
#endif
  constexpr size_t kAlign = kWgmma ? 1024 : 128;  // the wgmma tiles' 128-byte swizzle needs 1024
  __shared__ __align__(kAlign) unsigned char smem[kSmem];
  __shared__ float cs_s[Q], dtp_s[Q];
  __shared__ unsigned ticket_s;
  unsigned* const ticket_counter = static_cast<unsigned*>(p.workspace);
  unsigned* const chain_done = ticket_counter + 1;
  const int tid = threadIdx.x;
  if (tid == 0) ticket_s = atomicAdd(ticket_counter, 1u);
  __syncthreads();

  const int64_t npt = (p.headdim + kBP - 1) / kBP, nnt = (p.dstate + kBN - 1) / kBN;
  const int64_t H = p.nheads, nc = p.nchunks, chains = chain_count(p);
  const int64_t ticket = ticket_s, c = ticket / chains, chain = ticket % chains;
  int64_t rest = chain;
  const int nt = static_cast<int>(rest % nnt); rest /= nnt;
  const int pt = static_cast<int>(rest % npt); rest /= npt;
  const int64_t h = rest % H, b = rest / H;
  const int p0 = pt * kBP, n0 = nt * kBN;
  const int64_t t0 = ssd_chunk_t0(p, c);
  const int len = ssd_chunk_len(p, c);

  // ---- F1: dt' and its cumsum for (b, c, h), one thread scanning in position order (as the CPU)
  const float bias = p.dt_bias != nullptr ? p.dt_bias[h] : 0.f;
  for (int i = tid; i < Q; i += kT) {
    const int64_t t = t0 + i;
    dtp_s[i] = i < len ? ssd_dt(p.dt[(b * p.seqlen + t) * H + h], bias, p.dt_softplus, p.dt_min, p.dt_max)
                            : 0.f;  // padding: dt' = 0
  }
  __syncthreads();
  if (tid == 0) {
    const float a = p.A[h];
    float acc = 0.f;
#pragma unroll 16
    for (int i = 0; i < Q; ++i) {
      acc = fmaf(dtp_s[i], a, acc);
      cs_s[i] = acc;
    }
  }
  __syncthreads();
  if (pt == 0 && nt == 0) {  // one block of the (b, c, h) writes them for F4, F5 and the backward
    const int64_t ci = ((b * H + h) * nc + c) * Q;
    for (int i = tid; i < Q; i += kT) {
      p.dtp[ci + i] = dtp_s[i];
      p.cs[ci + i] = cs_s[i];
    }
  }

  // ---- F2: the chunk's own state tile S_c (float, shared memory)
  const float* Fs;
#ifdef NK_SSD_WGMMA_HERE
  if constexpr (kWgmma) Fs = chunk_state_tile_wgmma<T, Q>(p, b, c, h, p0, n0, cs_s, dtp_s, smem);
  else
#endif
    Fs = chunk_state_tile<T, Q>(p, vec, b, c, h, 0, Q - 1, true, p0, n0, cs_s, dtp_s, smem);

  // ---- F3 step: wait for in_c, then publish in_(c+1), or, where the chunk ends its sequence,
  // its varlen state (with a plan) and the final state (the chunk holding L - 1). A chunk
  // that starts its sequence enters from its initial-state row (or zero) instead of in_c,
  // and still waits, so that the chain's counter only ever counts up in chunk order.
  const int P = static_cast<int>(p.headdim), N = static_cast<int>(p.dstate);
  const int pv = P - p0 < kBP ? P - p0 : kBP;
  const int nv = N - n0 < kBN ? N - n0 : kBN;
  const int64_t PN = static_cast<int64_t>(P) * N, tile = static_cast<int64_t>(p0) * N + n0;
  const float carry = ssd_sid_at(p, b, t0 + Q - 1) == ssd_sid_prev(p, b, c, Q) ? expf(cs_s[Q - 1]) : 0.f;
  if (c > 0) {
    if (tid == 0) ssd::wait_at_least(chain_done + chain, static_cast<unsigned>(c));
    __syncthreads();
  }
  const bool first = ssd_chunk_first(p, c), last = ssd_chunk_last(p, c);
  const int64_t seq = ssd_chunk_seq(p, c), init_row = ssd_chunk_init_row(p, b, c);
  // in_c and in_(c+1): in the states (row stride N), or both in the chain's ring tile (row
  // stride kBN; read, then overwritten, by the same thread)
  const bool ring = p.states == nullptr;
  float* const ring_tile =
      ring ? reinterpret_cast<float*>(static_cast<unsigned char*>(p.workspace) + chain_ring_offset(p)) + chain * kRingTile
           : nullptr;
  float* const in_c = ring ? ring_tile : p.states + ((b * nc + c) * H + h) * PN + tile;
  float* const next_in = last ? nullptr : ring ? ring_tile : in_c + H * PN;
  const int64_t ld = ring ? kBN : N;
  T* const lp = p.states_lp != nullptr ? static_cast<T*>(p.states_lp) + ((b * nc + c) * H + h) * PN + tile : nullptr;
  float* const var = last && p.chunk_plan != nullptr && p.varlen_states != nullptr && seq < p.nseq
                         ? p.varlen_states + (seq * H + h) * PN + tile : nullptr;
  float* const fin = p.final_states != nullptr && ssd_chunk_holds_end(p, c)
                         ? p.final_states + (b * H + h) * PN + tile : nullptr;
  const float* const init = init_row >= 0 ? p.init + (init_row * H + h) * PN + tile : nullptr;
  for (int e = tid; e < kBP * kBN; e += kT) {
    const int r = e / kBN, k = e % kBN;
    if (r >= pv || k >= nv) continue;
    const int64_t o = static_cast<int64_t>(r) * N + k, oc = static_cast<int64_t>(r) * ld + k;
    float prev;
    if (first) {
      prev = init != nullptr ? init[o] : 0.f;
      if (!ring) in_c[oc] = prev;
    } else {
      prev = __ldcg(in_c + oc);  // written by another block: bypass L1
    }
    if (lp != nullptr) lp[o] = ssd::from_f<T>(prev);
    const float next = fmaf(carry, prev, Fs[r * StateTraits::kLdF + k]);
    if (next_in != nullptr) next_in[oc] = next;
    if (var != nullptr) var[o] = next;
    if (fin != nullptr) fin[o] = next;
  }
  int64_t lo, stop;  // sequences with no positions: their initial state (or zeros)
  ssd_chunk_empty_seqs(p, c, &lo, &stop);
  for (int64_t s = lo; s < stop; ++s) {
    if (s == seq) continue;
    float* out = p.varlen_states + (s * H + h) * PN + tile;
    const float* src = p.init != nullptr && s < p.init_rows ? p.init + (s * H + h) * PN + tile : nullptr;
    for (int e = tid; e < kBP * kBN; e += kT) {
      const int r = e / kBN, k = e % kBN;
      if (r < pv && k < nv) out[static_cast<int64_t>(r) * N + k] = src != nullptr ? src[static_cast<int64_t>(r) * N + k] : 0.f;
    }
  }
  if (c + 1 < nc) {  // publish: every thread's stores, then the counter
    __threadfence();
    __syncthreads();
    if (tid == 0) atomicAdd(chain_done + chain, 1u);
  }
}

// ------------------------------------------------------------------ F4 chunk_scan
struct ScanSmem {
  int ldC, ldX, ldS, ldSt, ldF, ldFcb;
  size_t off_C, off_B, off_X, off_F, off_S, bytes;
};

// Shared-memory plan of chunk_scan_kernel (the host sizes the launch with the same function).
template <typename T, int Q>
NK_HD ScanSmem scan_smem(int Np, int Pp) {
  constexpr int pad = kSmemPad<T>;
  constexpr int kBM = ScanTraits::kBM, kBJ = ScanTraits::kBJ;
  ScanSmem s;
  s.ldC = Np + pad;  // C rows i and B rows j: [row][n]
  s.ldX = Pp + pad;  // x rows j: [j][p]
  s.ldS = kBJ + pad;  // scores [i][j] in T
  s.ldSt = ScanTraits::kNSlab + pad;  // state slab [p][n]
  s.ldF = Pp + 4;  // float Y staging [i][p]
  s.ldFcb = kBJ + 4;  // float CB staging [i][j]
  const size_t b_elems = size_t(kBJ) * s.ldC > size_t(Pp) * s.ldSt ? size_t(kBJ) * s.ldC : size_t(Pp) * s.ldSt;
  const size_t f_elems = size_t(kBM) * (s.ldF > s.ldFcb ? s.ldF : s.ldFcb);
  size_t o = align128(size_t(Q) * 3 * 4);  // cs, dt', sid of the chunk
  s.off_C = o;
  o += align128(size_t(kBM) * s.ldC * sizeof(T));
  s.off_B = o;
  o += align128(b_elems * sizeof(T));
  s.off_X = o;
  o += align128(size_t(kBJ) * s.ldX * sizeof(T));
  s.off_F = o;
  o += align128(f_elems * sizeof(float));
  s.off_S = o;
  o += align128(size_t(kBM) * s.ldS * sizeof(T));
  s.bytes = o;
  return s;
}

template <typename T, int Q>
__global__ void __launch_bounds__(ScanTraits::kThreads, ScanTraits::min_blocks<T>()) chunk_scan_kernel(const SsdParams p, const Vec vec) {
  constexpr int kT = ScanTraits::kThreads, kBM = ScanTraits::kBM, kBJ = ScanTraits::kBJ;
  constexpr int kNit = Q / kBM;
  extern __shared__ __align__(128) unsigned char smem[];

  int64_t bid = blockIdx.x;
  const int it = static_cast<int>(bid % kNit); bid /= kNit;
  const int64_t h = bid % p.nheads; bid /= p.nheads;
  const int64_t c = bid % p.nchunks;
  const int64_t b = bid / p.nchunks;
  const int64_t t0 = ssd_chunk_t0(p, c);
  const int valid = ssd_chunk_len(p, c);
  const int i0 = it * kBM;
  if (i0 >= valid) return;  // row block wholly in the padding (uniform, before any barrier)

  const int P = static_cast<int>(p.headdim), N = static_cast<int>(p.dstate);
  const int Pp = round_up16(P), Np = round_up16(N);
  const int64_t H = p.nheads, nc = p.nchunks;
  const int64_t g = h / (H / p.ngroups);
  const ScanSmem L = scan_smem<T, Q>(Np, Pp);
  float* cs_s = reinterpret_cast<float*>(smem);
  float* dtp_s = cs_s + Q;
  int32_t* sid_s = reinterpret_cast<int32_t*>(dtp_s + Q);
  T* Cs = reinterpret_cast<T*>(smem + L.off_C);
  T* Bs = reinterpret_cast<T*>(smem + L.off_B);
  T* St = Bs;  // the state slabs use the B tile's space before the causal loop
  T* Xs = reinterpret_cast<T*>(smem + L.off_X);
  float* Fs = reinterpret_cast<float*>(smem + L.off_F);
  T* Ss = reinterpret_cast<T*>(smem + L.off_S);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wr = warp * 16;  // this warp's first row in the block

  const int64_t ci = ((b * H + h) * nc + c) * Q;
  for (int i = tid; i < Q; i += kT) {
    cs_s[i] = p.cs[ci + i];
    dtp_s[i] = p.dtp[ci + i];
    sid_s[i] = ssd_sid_at(p, b, t0 + i);
  }
  const int32_t sid_prev = ssd_sid_prev(p, b, c, Q);
  const T* csrc = static_cast<const T*>(p.C) + b * p.C_sb + (t0 + i0) * p.C_sl + g * p.C_sg;
  load_tile<kT>(Cs, L.ldC, csrc, p.C_sl, valid - i0, kBM, N, Np, vec.C);
  __syncthreads();

  WarpTile<T, ScanTraits::kMaxFN> acc;  // this warp's 16 rows x Pp of Y
  acc.zero();

  // ---- incoming state: Y = diag(exp(cs_i) [sid_i == sid_prev]) C in_c^T
  if (!ssd_chunk_first(p, c) || ssd_chunk_init_row(p, b, c) >= 0) {  // else in_c is zero
    const float* st = p.states + ((b * nc + c) * H + h) * static_cast<int64_t>(P) * N;
    for (int n0 = 0; n0 < Np; n0 += ScanTraits::kNSlab) {
      const int nsl = Np - n0 < ScanTraits::kNSlab ? Np - n0 : ScanTraits::kNSlab;
      const int nval = N - n0 < nsl ? N - n0 : nsl;
      load_tile<kT>(St, L.ldSt, st + n0, N, P, Pp, nval, nsl, vec.st);  // St[p][n], float -> T
      __syncthreads();
      // A(i, n) = Cs[i][n0 + n], B(n, p) = St[p][n] (column-major)
      acc.template mma<false, true>(Cs + wr * L.ldC + n0, L.ldC, St, L.ldSt, nsl, Pp);
      __syncthreads();
    }
    float* Fw = Fs + wr * L.ldF;  // this warp's rows only: warp-level sync suffices
    acc.store(Fw, L.ldF, Pp);
    __syncwarp();
    for (int e = lane; e < 16 * Pp; e += 32) {
      const int r = e / Pp, k = e % Pp, i = i0 + wr + r;
      const float v = Fw[r * L.ldF + k];
      Fw[r * L.ldF + k] = sid_s[i] == sid_prev ? v * expf(cs_s[i]) : 0.f;
    }
    __syncwarp();
    acc.load(Fw, L.ldF, Pp);
  }

  // ---- causal part, 64 columns j at a time up to the diagonal block
  for (int jb = 0; jb <= it; ++jb) {
    const int j0 = jb * kBJ;
    const int jv = valid - j0 < kBJ ? valid - j0 : kBJ;  // > 0 since j0 <= i0 < valid
    const T* bsrc = static_cast<const T*>(p.B) + b * p.B_sb + (t0 + j0) * p.B_sl + g * p.B_sg;
    const T* xsrc = static_cast<const T*>(p.x) + b * p.x_sb + (t0 + j0) * p.x_sl + h * p.x_sh;
    load_tile<kT>(Bs, L.ldC, bsrc, p.B_sl, jv, kBJ, N, Np, vec.B);
    load_tile<kT>(Xs, L.ldX, xsrc, p.x_sl, jv, kBJ, P, Pp, vec.x);
    __syncthreads();

    // On the diagonal block this warp's rows wr..wr+15 see only columns j < wr + 16: the
    // 16-column blocks past them are all masked, so neither computed nor multiplied.
    const int jcols = jb == it ? wr + 16 : kBJ;
    // CB (this warp's 16 rows x jcols columns): A(i, n) = Cs[i][n], B(n, j) = Bs[j][n]
    WarpTile<T, kBJ / 16> cb;
    cb.zero();
    cb.template mma<false, true>(Cs + wr * L.ldC, L.ldC, Bs, L.ldC, Np, jcols);
    float* Fcb = Fs + wr * L.ldFcb;
    cb.store(Fcb, L.ldFcb, jcols);
    __syncwarp();
    T* Sw = Ss + wr * L.ldS;
    for (int e = lane; e < 16 * jcols; e += 32) {
      const int r = e / jcols, j = e % jcols, i = i0 + wr + r, jj = j0 + j;
      const bool keep = jj <= i && sid_s[jj] == sid_s[i];
      const float v = keep ? Fcb[r * L.ldFcb + j] * expf(cs_s[i] - cs_s[jj]) * dtp_s[jj] : 0.f;
      Sw[r * L.ldS + j] = from_f<T>(v);
    }
    __syncwarp();
    // Y += S X_j over the jcols live columns: A(i, j) = Sw[i][j], B(j, p) = Xs[j][p]
    acc.template mma<false, false>(Sw, L.ldS, Xs, L.ldX, jcols, Pp);
    __syncthreads();  // before the next step overwrites Bs / Xs (and before the epilogue)
  }

  // ---- epilogue: + D x, y_pre, gate, store. Xs still holds rows j0 = i0 (the diagonal).
  acc.store(Fs + wr * L.ldF, L.ldF, Pp);
  __syncthreads();
  const int rows = valid - i0 < kBM ? valid - i0 : kBM;
  const int chunks = P / 8;
  for (int e = tid; e < rows * chunks; e += kT) {
    const int r = e / chunks, k = (e % chunks) * 8;
    const int64_t t = t0 + i0 + r;
    float yv[8];
#pragma unroll
    for (int q = 0; q < 8; ++q) yv[q] = Fs[r * L.ldF + k + q];
    if (p.D != nullptr) {
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const float d = p.D_per_p ? p.D[h * P + k + q] : p.D[h];
        yv[q] = fmaf(d, to_f<T>(Xs[r * L.ldX + k + q]), yv[q]);
      }
    }
    const int64_t yo = ((b * p.seqlen + t) * H + h) * P + k;
    if (p.y_pre != nullptr) store8<T>(static_cast<T*>(p.y_pre) + yo, vec.y, yv);
    if (p.z != nullptr) {
      float zv[8];
      load8<T>(static_cast<const T*>(p.z) + b * p.z_sb + t * p.z_sl + h * p.z_sh + k, vec.z, zv);
#pragma unroll
      for (int q = 0; q < 8; ++q) yv[q] *= silu(zv[q]);
    }
    store8<T>(static_cast<T*>(p.y) + yo, vec.y, yv);
  }
}

// ------------------------------------------------------------------ F5 varlen_states
template <typename T, int Q>
__global__ void __launch_bounds__(StateTraits::kThreads) varlen_states_kernel(const SsdParams p, const Vec vec) {
  __shared__ __align__(128) unsigned char smem[StateSmem<T>::kBytes];
  const int64_t npt = (p.headdim + StateTraits::kBP - 1) / StateTraits::kBP;
  const int64_t nnt = (p.dstate + StateTraits::kBN - 1) / StateTraits::kBN;
  int64_t bid = blockIdx.x;
  const int nt = static_cast<int>(bid % nnt); bid /= nnt;
  const int pt = static_cast<int>(bid % npt); bid /= npt;
  const int64_t h = bid % p.nheads;
  const int64_t s = bid / p.nheads;
  const int p0 = pt * StateTraits::kBP, n0 = nt * StateTraits::kBN;
  const int P = static_cast<int>(p.headdim), N = static_cast<int>(p.dstate);
  const int pv = P - p0 < StateTraits::kBP ? P - p0 : StateTraits::kBP;
  const int nv = N - n0 < StateTraits::kBN ? N - n0 : StateTraits::kBN;
  float* out = p.varlen_states + (s * p.nheads + h) * P * N + static_cast<int64_t>(p0) * N + n0;

  // cu_seqlens is not validated on the device (that would need a host sync): out-of-range
  // bounds are clamped to [0, L) as the CPU kernel does, so nothing outside x/B is read.
  int64_t start = p.cu_seqlens[s], last = int64_t{p.cu_seqlens[s + 1]} - 1;
  if (start < 0) start = 0;
  if (last > p.seqlen - 1) last = p.seqlen - 1;
  if (last < start) {  // empty sequence: zeros
    for (int e = threadIdx.x; e < StateTraits::kBP * StateTraits::kBN; e += StateTraits::kThreads) {
      const int r = e / StateTraits::kBN, k = e % StateTraits::kBN;
      if (r < pv && k < nv) out[static_cast<int64_t>(r) * N + k] = 0.f;
    }
    return;
  }
  const int64_t c = last / Q;
  const int ie = static_cast<int>(last - c * Q);
  const int i0 = start > c * Q ? static_cast<int>(start - c * Q) : 0;

  const float* cs = p.cs + (h * p.nchunks + c) * Q;
  const float* Fs = chunk_state_tile<T, Q>(p, vec, 0, c, h, i0, ie, false, p0, n0, cs, p.dtp + (h * p.nchunks + c) * Q,
                                           smem);

  // + [sid_prev == sid_e] exp(cs_e) in_c
  const bool carry = ssd_sid_prev(p, 0, c, Q) == ssd_sid_at(p, 0, last);
  const float decay = expf(cs[ie]);
  const float* in = p.states + (c * p.nheads + h) * P * N + static_cast<int64_t>(p0) * N + n0;
  for (int e = threadIdx.x; e < StateTraits::kBP * StateTraits::kBN; e += StateTraits::kThreads) {
    const int r = e / StateTraits::kBN, k = e % StateTraits::kBN;
    if (r < pv && k < nv) {
      const float v = Fs[r * StateTraits::kLdF + k];
      out[static_cast<int64_t>(r) * N + k] = carry ? fmaf(decay, in[static_cast<int64_t>(r) * N + k], v) : v;
    }
  }
}

// ------------------------------------------------------------------ host side
#ifdef NK_HAS_SM90
// NEMOKERNELS_SSD_SM90=1 and device dev has compute capability 9.0 (the sm_90a kernels run there).
bool ssd_sm90_opted_in(int dev) {
  const char* opt = std::getenv("NEMOKERNELS_SSD_SM90");
  if (opt == nullptr || std::strcmp(opt, "1") != 0) return false;
  return device_cc(dev) == 90;
}
#endif

Vec make_vec(const SsdParams& p) {
  const int es = dtype_size(p.dtype);
  const int64_t rowP = p.headdim, rowN = p.dstate;  // the unit-stride rows are P or N long
  Vec v;
  v.x = vec_ok(p.x, es, {p.x_sb, p.x_sl, p.x_sh, rowP});
  v.B = vec_ok(p.B, es, {p.B_sb, p.B_sl, p.B_sg, rowN});
  v.C = vec_ok(p.C, es, {p.C_sb, p.C_sl, p.C_sg, rowN});
  v.z = p.z != nullptr && vec_ok(p.z, es, {p.z_sb, p.z_sl, p.z_sh, rowP});
  // y and y_pre are contiguous (b, L, H, P): every row of P starts 16-byte aligned when the base is
  v.y = aligned16(p.y) && (p.y_pre == nullptr || aligned16(p.y_pre)) && (rowP * es) % 16 == 0;
  v.st = aligned16(p.states) && (rowN * 4) % 16 == 0;
  return v;
}

// Every kernel's grid, checked against CUDA's limits (launch_limits.h) before the first launch.
static_assert(StateTraits::kBP == kSsdTile && StateTraits::kBN == kSsdTile && ScanTraits::kBM == kSsdTile,
              "launch_limits.h computes the grids from these tile sizes");

SsdFwdGrids fwd_grids(const SsdParams& p) {
  const bool varlen = p.cu_seqlens != nullptr && p.varlen_states != nullptr && p.nseq > 0 && p.chunk_plan == nullptr;
  return ssd_fwd_grids(p.batch, p.nchunks, p.nheads, p.headdim, p.dstate, p.chunk_size, varlen ? p.nseq : 0);
}

dim3 to_dim3(const LaunchGrid& g) {
  return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z));
}

#ifdef NK_SSD_WGMMA_HERE
// The state chain takes the wgmma tile with NEMOKERNELS_SSD_SM90=1 on a compute capability 9.0
// device for full 64 x 64 tiles (headdim and dstate multiples of 64) and 16-byte x / B rows.
bool state_chain_wgmma(const SsdParams& p, const Vec& vec) {
  if (!vec.x || !vec.B || p.headdim % StateTraits::kBP != 0 || p.dstate % StateTraits::kBN != 0) return false;
  if (p.chunk_size != 128 || (p.dtype != DType::BF16 && p.dtype != DType::F16)) return false;
  return ssd_cuda_sm90_opted_in();
}
#endif

template <typename T, int Q>
void launch_states(const SsdParams& p, const Vec& vec, cudaStream_t st) {
  const SsdFwdGrids g = fwd_grids(p);
  if (p.workspace == nullptr) throw std::runtime_error("nemokernels: internal: mamba_chunk_scan_combined needs its workspace");
  NK_CUDA_CHECK(cudaMemsetAsync(p.workspace, 0, static_cast<size_t>(chain_counter_bytes(p)), st));
#ifdef NK_SSD_WGMMA_HERE
  if constexpr (sizeof(T) == 2 && Q == 128) {
    if (state_chain_wgmma(p, vec)) {  // H1 with the wgmma state tile (opt-in, as the chunk output)
      state_chain_kernel<T, Q, true><<<to_dim3(g.chain), StateTraits::kThreads, 0, st>>>(p, vec);
      NK_CUDA_LAUNCH_CHECK();
      return;
    }
  }
#endif
  state_chain_kernel<T, Q><<<to_dim3(g.chain), StateTraits::kThreads, 0, st>>>(p, vec);  // H1 = F1-F3
  NK_CUDA_LAUNCH_CHECK();
}

template <typename T, int Q>
void launch_fwd(const SsdParams& p, const Vec& vec, cudaStream_t st) {
  // Every limit (grids, F4's shared memory) checked before the first launch.
  const SsdFwdGrids g = fwd_grids(p);
  const ScanSmem L = scan_smem<T, Q>(round_up16(static_cast<int>(p.dstate)), round_up16(static_cast<int>(p.headdim)));
  int dev = 0, max_smem = 0;
  NK_CUDA_CHECK(cudaGetDevice(&dev));
  NK_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (L.bytes > static_cast<size_t>(max_smem))
    throw std::runtime_error("nemokernels: mamba_chunk_scan_combined: the CUDA chunk scan needs " +
                             std::to_string(L.bytes) + " bytes of shared memory per block, the device allows " +
                             std::to_string(max_smem) + "; use float16 / bfloat16 activations or a smaller "
                             "headdim or dstate (the CPU path has no such limit)");
  const bool f5 = p.cu_seqlens != nullptr && p.varlen_states != nullptr && p.nseq > 0 && p.chunk_plan == nullptr;
  const bool sm90_output = p.states_lp != nullptr && ssd_fwd_cuda_output_sm90(p);
  if (p.states == nullptr && (!sm90_output || f5))
    throw std::runtime_error("nemokernels: internal: mamba_chunk_scan_combined's portable chunk scan and F5 need the "
                             "float32 states");
  launch_states<T, Q>(p, vec, st);
  if (sm90_output) {  // F4 on wgmma (opt-in until a GPU run checks it), reading states_lp
#ifdef NK_HAS_SM90
    ssd_chunk_output_sm90(p, st);
#endif
  } else {  // F4
    allow_dynamic_smem<chunk_scan_kernel<T, Q>>(static_cast<int>(L.bytes));
    chunk_scan_kernel<T, Q><<<to_dim3(g.scan), ScanTraits::kThreads, L.bytes, st>>>(p, vec);
    NK_CUDA_LAUNCH_CHECK();
  }
  if (f5) {  // F5
    varlen_states_kernel<T, Q><<<to_dim3(g.varlen), StateTraits::kThreads, 0, st>>>(p, vec);
    NK_CUDA_LAUNCH_CHECK();
  }
}

template <typename T>
void run_q(const SsdParams& p, const Vec& vec, cudaStream_t st, bool full) {
  switch (p.chunk_size) {
    case 64: full ? launch_fwd<T, 64>(p, vec, st) : launch_states<T, 64>(p, vec, st); break;
    case 128: full ? launch_fwd<T, 128>(p, vec, st) : launch_states<T, 128>(p, vec, st); break;
    case 256: full ? launch_fwd<T, 256>(p, vec, st) : launch_states<T, 256>(p, vec, st); break;
    default:
      throw std::runtime_error("nemokernels: mamba_chunk_scan_combined: CUDA chunk_size must be 64, 128 or 256, got " +
                               std::to_string(p.chunk_size));
  }
}

void run(const SsdParams& p, void* stream, bool full) {
  // L == 0 and other empty shapes are handled by the entry (no launch); be safe anyway.
  if (p.batch <= 0 || p.seqlen <= 0 || p.nheads <= 0 || p.headdim <= 0 || p.dstate <= 0) return;
  if (!ssd_cuda_supports(p.chunk_size, p.headdim, p.dstate) || p.ngroups <= 0 || p.nheads % p.ngroups != 0)
    throw std::runtime_error("nemokernels: internal: mamba_chunk_scan_combined CUDA path called outside its limits");
  const Vec vec = make_vec(p);
  auto st = static_cast<cudaStream_t>(stream);
  switch (p.dtype) {
    case DType::F32: run_q<float>(p, vec, st, full); break;
    case DType::F16: run_q<__half>(p, vec, st, full); break;
    case DType::BF16: run_q<__nv_bfloat16>(p, vec, st, full); break;
  }
}

}  // namespace

bool ssd_cuda_sm90_opted_in() {
#ifdef NK_HAS_SM90
  int dev = 0;
  NK_CUDA_CHECK(cudaGetDevice(&dev));
  return ssd_sm90_opted_in(dev);
#else
  return false;
#endif
}

bool ssd_fwd_cuda_output_sm90(const SsdParams& p) {
  int dev = 0;
  NK_CUDA_CHECK(cudaGetDevice(&dev));
  return ssd_fwd_cuda_output_sm90_on(dev, p);
}

bool ssd_fwd_cuda_output_sm90_on(int dev, const SsdParams& p) {
#ifdef NK_HAS_SM90
  return ssd_chunk_output_sm90_supports(p) && ssd_sm90_opted_in(dev);
#else
  (void)dev, (void)p;
  return false;
#endif
}

int64_t ssd_fwd_cuda_workspace_bytes(const SsdParams& p) {
  // Called by the entry before anything is allocated: a problem over the grid limits fails here.
  if (p.batch <= 0 || p.seqlen <= 0 || p.nheads <= 0 || p.headdim <= 0 || p.dstate <= 0) return 0;
  fwd_grids(p);
  return chain_workspace_bytes(p);  // H1's ticket and chain counters
}

void ssd_states_cuda(const SsdParams& p, void* stream) { run(p, stream, false); }

void ssd_fwd_cuda(const SsdParams& p, void* stream) { run(p, stream, true); }

}  // namespace nk
