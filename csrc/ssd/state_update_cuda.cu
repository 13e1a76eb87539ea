// CUDA kernel of the decode state updates (math and lane decomposition in state_update.h).
// Details and cost model: docs/ssd.md, sections `csrc/ssd/state_update_cuda.cu` and
// `Decode state updates at the bandwidth limit (issue 18)`.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "common/cuda_dtype.cuh"
#include "common/cuda_utils.cuh"
#include "ssd/launch_limits.h"
#include "ssd/numerics.cuh"
#include "ssd/state_update.h"

namespace nk {
namespace {

constexpr int kThreads = 128;
constexpr int kVecsPerThread = 4;  // 16-byte state vectors a thread owns: R rows x NC vectors
// Resident blocks per SM the register budget is sized for (docs/ssd.md, issue 18 section:
// bytes in flight per SM), the most that ptxas fits without spills: 7 x 128 threads (<= 72
// registers) for the head-decay single step, 6 (<= 80) for its multi-token loop, 5 (<= 96) on
// the general path, whose per-element decay needs more.
template <bool kHead, bool kSingle>
constexpr int min_blocks() { return kHead ? (kSingle ? 7 : 6) : 5; }

// Loads and stores of the runtime-typed small operands (x, dt, z, B, C, A, D, dt_bias, out).
// The dtype is uniform across the grid, so the switch never diverges.
NK_DEVICE float ld_any(const void* base, DType dt, int64_t off) {
  switch (dt) {
    case DType::F32: return static_cast<const float*>(base)[off];
    case DType::F16: return __half2float(static_cast<const __half*>(base)[off]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[off]);
  }
}

NK_DEVICE void st_any(void* base, DType dt, int64_t off, float v) {
  switch (dt) {
    case DType::F32: static_cast<float*>(base)[off] = v; break;
    case DType::F16: static_cast<__half*>(base)[off] = __float2half_rn(v); break;
    default: static_cast<__nv_bfloat16*>(base)[off] = __float2bfloat16_rn(v); break;
  }
}

// One 16-byte state vector kept in its storage type: VN elements of ST in a uint4. The state
// is rounded to ST after every step anyway, so holding it packed loses nothing and costs 4
// registers per vector whatever the dtype.
template <typename ST>
NK_DEVICE ST* elems(uint4& raw) { return reinterpret_cast<ST*>(&raw); }

// VN consecutive state elements at `ptr` (element stride sn): one 16-byte access when `vec`
// (then sn == 1, ptr 16-byte aligned, N % VN == 0); else masked scalar accesses (0 past N).
template <typename ST>
NK_DEVICE uint4 load_state(const ST* ptr, bool vec, int64_t sn, int n0, int N) {
  constexpr int VN = 16 / sizeof(ST);
  if (vec) return *reinterpret_cast<const uint4*>(ptr);
  uint4 raw;
  ST* e = elems<ST>(raw);
#pragma unroll
  for (int i = 0; i < VN; ++i) e[i] = n0 + i < N ? ptr[i * sn] : from_f<ST>(0.f);
  return raw;
}

// The stochastically rounded value of v in a 16-bit state type (exact after from_f).
template <typename ST>
NK_DEVICE float sr_round(float v, uint32_t r) {
  if constexpr (std::is_same_v<ST, __nv_bfloat16>) return sr_bf16(v, r);
  else if constexpr (std::is_same_v<ST, __half>) return sr_f16(v, r);
  else return v;
}

template <typename ST>
NK_DEVICE void store_state(ST* ptr, bool vec, int64_t sn, int n0, int N, uint4 raw) {
  constexpr int VN = 16 / sizeof(ST);
  if (vec) {
    *reinterpret_cast<uint4*>(ptr) = raw;
    return;
  }
  const ST* e = elems<ST>(raw);
#pragma unroll
  for (int i = 0; i < VN; ++i)
    if (n0 + i < N) ptr[i * sn] = e[i];
}

// A whole padded / out-of-range entry: `fill` into its outputs (and its snapshots unless the
// state is updated in place), rows p0..p1-1. No divisions: rows outer, elements over threads.
template <typename ST>
NK_DEVICE void fill_entry(const SsuParams& p, int64_t b, int64_t h, int64_t p0, int64_t p1, float fill) {
  for (int64_t t = 0; t < p.seqlen; ++t) {
    for (int64_t i = p0 + threadIdx.x; i < p1 && p.out != nullptr; i += blockDim.x)
      st_any(p.out, p.out_dtype, b * p.out_s[0] + t * p.out_s[1] + h * p.out_s[2] + i * p.out_s[3], fill);
    if (p.snap != nullptr && !p.in_place) {
      ST* base = static_cast<ST*>(p.snap) + b * p.snap_s[0] + t * p.snap_s[1] + h * p.snap_s[2];
      for (int64_t i = p0; i < p1; ++i)
        for (int64_t n = threadIdx.x; n < p.dstate; n += blockDim.x) base[i * p.snap_s[3] + n * p.snap_s[4]] = from_f<ST>(fill);
    }
  }
}

// Shared-memory layout of a block (floats). The block's small operands are staged once, as
// float32, by all its threads (a few coalesced loads each), so that the per-thread state
// loop holds only the state in registers. np = NC * ln * VN >= N columns (zero past N), rb
// rows. First D[rb] (0 without D) and, general path only, A rows [rb][np] (a_floats in all, a
// multiple of 4). Then per staged token (tok floats each, a
// multiple of 4 so every B / C row is 16-byte aligned): B[np], C[np], x[rb], z[rb], dt'[rb]
// (general path: per row; head path: [0] is dt' and [1] exp(dt' A) of the head).
struct SsuSmem {
  int np, rb, a_floats, tok, tc;  // tc: tokens staged at once
  NK_HD int A(int j) const { return ((rb + 3) / 4 * 4) + j * np; }
  NK_HD int B(int t) const { return a_floats + t * tok; }
  NK_HD int C(int t) const { return B(t) + np; }
  NK_HD int x(int t) const { return B(t) + 2 * np; }
  NK_HD int z(int t) const { return x(t) + rb; }
  NK_HD int d(int t) const { return x(t) + 2 * rb; }
};

constexpr int kSmemBudgetFloats = 8192;  // 32 KB

NK_HD SsuSmem ssu_smem(int np, int rb, bool head, int64_t T) {
  SsuSmem m;
  m.np = np, m.rb = rb;
  m.a_floats = (rb + 3) / 4 * 4 + (head ? 0 : rb * np);
  m.tok = (2 * np + 3 * rb + 3) / 4 * 4;
  const int64_t fit = (kSmemBudgetFloats - m.a_floats) / m.tok;
  m.tc = static_cast<int>(fit < 1 ? 1 : (fit < T ? fit : T));
  return m;
}

// Stages tokens t0 .. t0 + tc - 1 (tc <= m.tc) of entry b, head h, rows p_first .. + rb.
template <bool kHead>
NK_DEVICE void stage_tokens(const SsuParams& p, const SsuSmem& m, float* sm, int64_t b, int64_t h, int64_t g,
                            int64_t p_first, int64_t t0, int tc, float a_head, float bias_head) {
  const int N = static_cast<int>(p.dstate);
  const int64_t P = p.dim;
  for (int k = 0; k < tc; ++k) {
    const int64_t t = t0 + k;
    const int64_t bo = b * p.B.s[0] + t * p.B.s[1] + g * p.B.s[2];
    const int64_t co = b * p.C.s[0] + t * p.C.s[1] + g * p.C.s[2];
    for (int n = threadIdx.x; n < m.np; n += kThreads) {
      sm[m.B(k) + n] = n < N ? ld_any(p.B.ptr, p.B.dtype, bo + n * p.B.s[3]) : 0.f;
      sm[m.C(k) + n] = n < N ? ld_any(p.C.ptr, p.C.dtype, co + n * p.C.s[3]) : 0.f;
    }
    for (int j = threadIdx.x; j < m.rb; j += kThreads) {
      const int64_t i = p_first + j < P ? p_first + j : 0;
      sm[m.x(k) + j] = ld_any(p.x.ptr, p.x.dtype, b * p.x.s[0] + t * p.x.s[1] + h * p.x.s[2] + i * p.x.s[3]);
      sm[m.z(k) + j] = p.z.ptr != nullptr ? ld_any(p.z.ptr, p.z.dtype, b * p.z.s[0] + t * p.z.s[1] + h * p.z.s[2] + i * p.z.s[3]) : 0.f;
      if (!kHead) {
        const float bias = p.dt_bias.ptr != nullptr ? ld_any(p.dt_bias.ptr, p.dt_bias.dtype, h * p.dt_bias.s[0] + i * p.dt_bias.s[1]) : 0.f;
        sm[m.d(k) + j] = ssu_dt(ld_any(p.dt.ptr, p.dt.dtype, b * p.dt.s[0] + t * p.dt.s[1] + h * p.dt.s[2] + i * p.dt.s[3]), bias, p.dt_softplus);
      }
    }
    if (kHead && threadIdx.x == 0) {  // one dt' and one decay per (token, head)
      const float dtp = ssu_dt(ld_any(p.dt.ptr, p.dt.dtype, b * p.dt.s[0] + t * p.dt.s[1] + h * p.dt.s[2]), bias_head, p.dt_softplus);
      sm[m.d(k)] = dtp;
      sm[m.d(k) + 1] = ssu_decay(dtp, a_head);
    }
  }
}

// Tree drafts: before token t, the registers take the state token t continues from when that
// is not token t - 1's: the state row (parent -1) or the thread's own snapshot of the parent
// (written earlier by this thread, same elements: no other thread is involved). The parent is
// uniform over the block. An invalid parent (not in [-1, t)) or a missing snapshot buffer makes
// the node NaN (memory-safe; the CPU entry raises instead).
template <typename ST, int NC, int R = kVecsPerThread / NC>
NK_DEVICE void tree_step(const SsuParams& p, uint4 (&s)[R][NC], int64_t b, int64_t t, const ST* s0, int64_t s_row,
                         int64_t s_vec, const ST* snap0, int64_t d_row, int64_t d_vec, int64_t d_tok, int64_t dsn,
                         bool vec_state, bool vec_snap, const bool (&rin)[R], int lane, int ln, int N) {
  constexpr int VN = 16 / sizeof(ST);
  const int64_t q = p.parents[b * p.seqlen + t];
  if (q == t - 1) return;  // a chain step (t == 0: the state row, already in the registers)
  const bool bad = q < -1 || q >= t || (q >= 0 && snap0 == nullptr);
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int n0 = (c * ln + lane) * VN;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (bad) {
        ST* e = elems<ST>(v);
#pragma unroll
        for (int i = 0; i < VN; ++i) e[i] = from_f<ST>(__int_as_float(0x7fc00000));
      } else if (rin[r] && n0 < N) {
        v = q < 0 ? load_state<ST>(s0 + r * s_row + c * s_vec, vec_state, p.st_s[3], n0, N)
                  : load_state<ST>(snap0 + q * d_tok + r * d_row + c * d_vec, vec_snap, dsn, n0, N);
      }
      s[r][c] = v;
    }
}

// One batch entry of a block: rows w.pr[r] of head w.h (R rows x NC vectors per thread).
// kSr: stochastic rounding of a 16-bit state (its own instantiation, so the Philox state costs
// the round-to-nearest kernels no registers).
template <typename ST, int NC, bool kHead, bool kSingle, bool kSr>
NK_DEVICE void ssu_entry(const SsuParams& p, const SsuSmem& m, float* sm, int64_t b, int64_t h, int64_t g,
                         int64_t p_first, int lnl, bool vec_state, bool vec_snap) {
  constexpr int VN = 16 / sizeof(ST);
  constexpr int R = kVecsPerThread / NC;
  const int N = static_cast<int>(p.dstate);
  const int ln = 1 << lnl, lane = threadIdx.x & (ln - 1), slot = threadIdx.x >> lnl;
  const int rows_per_pass = kThreads >> lnl;
  int64_t pr[R];
  bool rin[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    pr[r] = p_first + r * rows_per_pass + slot;
    rin[r] = pr[r] < p.dim;
  }

  const int64_t row = p.state_indices != nullptr ? p.state_indices[b] : b;
  if (row < 0 || row >= p.state_rows) {  // uniform over the block: no barrier is left waiting
    const int64_t p1 = p_first + m.rb < p.dim ? p_first + m.rb : p.dim;
    fill_entry<ST>(p, b, h, p_first, p1, row < 0 ? 0.f : __int_as_float(0x7fc00000));
    return;
  }

  // The state: R x NC independent 16-byte loads per thread, all issued before anything waits.
  // One 64-bit address per thread; rows and vectors are uniform steps from it.
  ST* const s0 = static_cast<ST*>(p.state) + row * p.st_s[0] + h * p.st_s[1] + pr[0] * p.st_s[2] +
                 int64_t(lane * VN) * p.st_s[3];
  const int64_t s_row = rows_per_pass * p.st_s[2], s_vec = int64_t(ln * VN) * p.st_s[3];
  uint4 s[R][NC];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int n0 = (c * ln + lane) * VN;
      s[r][c] = make_uint4(0u, 0u, 0u, 0u);
      if (rin[r] && n0 < N) s[r][c] = load_state<ST>(s0 + r * s_row + c * s_vec, vec_state, p.st_s[3], n0, N);
    }

  // Staged while the state loads are in flight.
  for (int j = threadIdx.x; j < m.rb; j += kThreads)
    sm[j] = p.D.ptr != nullptr && p_first + j < p.dim ? ld_any(p.D.ptr, p.D.dtype, h * p.D.s[0] + (p_first + j) * p.D.s[1]) : 0.f;
  float a_head = 0.f, bias_head = 0.f;
  if (kHead) {
    a_head = ld_any(p.A.ptr, p.A.dtype, h * p.A.s[0]);
    bias_head = p.dt_bias.ptr != nullptr ? ld_any(p.dt_bias.ptr, p.dt_bias.dtype, h * p.dt_bias.s[0]) : 0.f;
  } else {
    for (int e = threadIdx.x; e < m.rb * m.np; e += kThreads) {
      const int j = e / m.np, n = e - j * m.np;  // 32-bit, once per block
      const int64_t i = p_first + j < p.dim ? p_first + j : 0;
      sm[m.A(0) + e] = n < N ? ld_any(p.A.ptr, p.A.dtype, h * p.A.s[0] + i * p.A.s[1] + n * p.A.s[2]) : 0.f;
    }
  }

  // Where the state after each token goes: the state row itself (single step) or snapshot t,
  // addressed like the loads: one pointer per thread, uniform steps per row / vector / token.
  ST* dst = s0;
  int64_t d_row = s_row, d_vec = s_vec, d_tok = 0, dsn = p.st_s[3];
  // A replay (multi-token shapes, in place): no snapshots, the tokens up to `last` (on the
  // path to it, with parents), then one store of the state row.
  const bool replay = !kSingle && p.replay_to != nullptr;
  int64_t last = kSingle ? 0 : p.seqlen - 1;
  if (replay) {
    const int64_t v = p.replay_to[b];
    last = v < -1 ? -1 : (v > p.seqlen - 1 ? p.seqlen - 1 : v);
  }
  if (!kSingle) {
    dst = p.snap == nullptr || replay ? nullptr
                            : static_cast<ST*>(p.snap) + b * p.snap_s[0] + h * p.snap_s[2] + pr[0] * p.snap_s[3] +
                                  int64_t(lane * VN) * p.snap_s[4];
    d_row = rows_per_pass * p.snap_s[3], d_vec = int64_t(ln * VN) * p.snap_s[4], d_tok = p.snap_s[1];
    dsn = p.snap_s[4];
  }
  const bool vst = kSingle ? vec_state : vec_snap;
  ST* const snap0 = dst;  // snapshot 0 of this thread's elements (multi-token)
  // Stochastic rounding (16-bit states only; the entry refuses it for float32): one Philox
  // call per 4 elements and token.
  static_assert(!kSr || !std::is_same_v<ST, float>, "a float32 state is not rounded");
  const uint64_t seed = kSr ? static_cast<uint64_t>(*p.sr_seed) : 0u;

  const int64_t T = last + 1;  // tokens run (all but a replay's tail)
#pragma unroll 1
  for (int64_t t0 = 0; t0 < T; t0 += m.tc) {
    const int tc = static_cast<int>(T - t0 < m.tc ? T - t0 : m.tc);
    if (t0 > 0) __syncthreads();  // the previous chunk's values are read no more
    stage_tokens<kHead>(p, m, sm, b, h, g, p_first, t0, tc, a_head, bias_head);
    __syncthreads();
#pragma unroll 1
    for (int k = 0; k < tc; ++k) {
      const int64_t t = t0 + k;
      if (replay && p.parents != nullptr && !ssu_on_path(p.parents + b * p.seqlen, last, t)) continue;
      if (!kSingle && !replay && p.parents != nullptr) tree_step<ST, NC>(p, s, b, t, s0, s_row, s_vec, snap0, d_row, d_vec, d_tok,
                                                             dsn, vec_state, vst, rin, lane, ln, N);
      const float* Bs = sm + m.B(k);
      const float* Cs = sm + m.C(k);
      float acc[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int j = r * rows_per_pass + slot;  // the row within the block
        const float dtp = kHead ? sm[m.d(k)] : sm[m.d(k) + j];
        const float dA_head = kHead ? sm[m.d(k) + 1] : 0.f;
        const float dtx = dtp * sm[m.x(k) + j];
        acc[r] = 0.f;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          const int e0 = (c * ln + lane) * VN;
          ST* e = elems<ST>(s[r][c]);
#pragma unroll
          for (int q = 0; q < VN / 4; ++q) {
            const float4 bq = reinterpret_cast<const float4*>(Bs + e0)[q];
            const float4 cq = reinterpret_cast<const float4*>(Cs + e0)[q];
            const float Bv[4] = {bq.x, bq.y, bq.z, bq.w}, Cv[4] = {cq.x, cq.y, cq.z, cq.w};
            Philox4 rq{};
            if constexpr (kSr) rq = ssu_sr_group(seed, row, h * p.dim + pr[r], (e0 >> 2) + q, t);
#pragma unroll
            for (int u = 0; u < 4; ++u) {
              const int v = 4 * q + u, n = e0 + v;
              if (rin[r] && n < N) {
                const float dA = kHead ? dA_head : ssu_decay(dtp, sm[m.A(j) + n]);
                const float val = ssu_state(to_f<ST>(e[v]), dA, Bv[u], dtx);
                e[v] = from_f<ST>(kSr ? sr_round<ST>(val, rq.v[u]) : val);
                acc[r] = fmaf(to_f<ST>(e[v]), Cv[u], acc[r]);
              }
            }
          }
        }
      }
      // Lanes ln apart never mix: xor offsets < ln stay inside the row's lane group. The R
      // rows' butterflies interleave (independent shuffles in flight). A replay has no outputs
      // (uniform over the block: the shuffles' warps stay whole).
      if (replay) continue;
      for (int off = ln / 2; off >= 1; off >>= 1)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
      // After the butterfly every lane of a row group holds the row's sum (bit-identical: each
      // step adds the same two values), so lane q < R finishes row q's output: the gate's
      // exp and division run once per R rows instead of once per row.
      if (ln >= R) {
        float a = acc[0];
#pragma unroll
        for (int r = 1; r < R; ++r)
          if (lane == r) a = acc[r];
        const int j = lane * rows_per_pass + slot;
        const int64_t i = p_first + j;
        if (lane < R && i < p.dim)
          st_any(p.out, p.out_dtype, b * p.out_s[0] + t * p.out_s[1] + h * p.out_s[2] + i * p.out_s[3],
                 ssu_out(a, p.D.ptr != nullptr, sm[j], sm[m.x(k) + j], p.z.ptr != nullptr, sm[m.z(k) + j]));
      } else {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int j = r * rows_per_pass + slot;
          if (rin[r] && lane == 0)
            st_any(p.out, p.out_dtype, b * p.out_s[0] + t * p.out_s[1] + h * p.out_s[2] + pr[r] * p.out_s[3],
                   ssu_out(acc[r], p.D.ptr != nullptr, sm[j], sm[m.x(k) + j], p.z.ptr != nullptr, sm[m.z(k) + j]));
        }
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (!rin[r]) continue;
        if (dst != nullptr) {
#pragma unroll
          for (int c = 0; c < NC; ++c) {
            const int n0 = (c * ln + lane) * VN;
            if (n0 < N) store_state<ST>(dst + r * d_row + c * d_vec, vst, dsn, n0, N, s[r][c]);
          }
        }
      }
      if (dst != nullptr) dst += d_tok;
    }
  }
  if (replay && last >= 0) {  // the state after the last replayed token, in place
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const int n0 = (c * ln + lane) * VN;
        if (rin[r] && n0 < N) store_state<ST>(s0 + r * s_row + c * s_vec, vec_state, p.st_s[3], n0, N, s[r][c]);
      }
  }
}

// One block: rb = R * (128 / ln) consecutive rows of one head of batch entry
// blockIdx.y + 65535 * blockIdx.z. No loop over entries: a loop let the compiler hoist every
// per-row address out of it and keep them all live (spilled at 64 registers).
template <typename ST, int NC, bool kHead, bool kSingle, bool kSr>
__global__ void __launch_bounds__(kThreads, min_blocks<kHead, kSingle>())
ssu_kernel(SsuParams p, int lnl, unsigned tiles, SsuSmem m, bool vec_state, bool vec_snap) {
  extern __shared__ float4 smem_raw[];
  float* const sm = reinterpret_cast<float*>(smem_raw);
  const unsigned h = blockIdx.x / tiles, tile = blockIdx.x - h * tiles;
  const unsigned g = h / static_cast<unsigned>(p.heads_per_group);
  const int64_t b = blockIdx.y + int64_t(kCudaMaxGridYZ) * blockIdx.z;
  if (b >= p.batch) return;  // the last z slice is partial
  ssu_entry<ST, NC, kHead, kSingle, kSr>(p, m, sm, b, h, g, int64_t(tile) * m.rb, lnl, vec_state, vec_snap);
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// 16-byte accesses: unit stride along N, whole vectors per row, every row start aligned.
bool vec_ok(const void* ptr, int vn, int64_t N, const int64_t* strides, int nstrides, int64_t sn) {
  if (ptr == nullptr || sn != 1 || N % vn != 0 || !aligned16(ptr)) return false;
  for (int k = 0; k < nstrides; ++k)
    if (strides[k] % vn != 0) return false;
  return true;
}

template <typename ST, int NC, bool kHead, bool kSingle, bool kSr>
void launch(const SsuParams& p, int ln, cudaStream_t stream) {
  constexpr int VN = 16 / sizeof(ST);
  constexpr int R = kVecsPerThread / NC;
  const int rb = R * (kThreads / ln);
  int lnl = 0;
  while ((1 << lnl) < ln) ++lnl;  // ln is a power of two
  const SsuSmem m = ssu_smem(NC * ln * VN, rb, kHead, kSingle ? 1 : p.seqlen);
  const int64_t tiles = (p.dim + rb - 1) / rb;
  const char* op = p.replay_to != nullptr ? "selective_state_update_replay"
                   : p.in_place           ? "selective_state_update"
                                          : "selective_state_update_multi";
  const LaunchGrid grid =
      checked_grid(op, "state update",
                   {tiles * p.nheads, p.batch < kCudaMaxGridYZ ? p.batch : kCudaMaxGridYZ, ceil_div64(p.batch, kCudaMaxGridYZ)},
                   "grid.x is nheads * ceil(dim / rows per block): split the heads into smaller calls", "",
                   "grid.z is ceil(batch / 65535): split the batch into calls of fewer entries");
  const bool vs = vec_ok(p.state, VN, p.dstate, p.st_s, 3, p.st_s[3]);
  const bool vn = !p.in_place && vec_ok(p.snap, VN, p.dstate, p.snap_s, 4, p.snap_s[4]);
  const size_t smem = size_t(m.a_floats + m.tc * m.tok) * sizeof(float);
  ssu_kernel<ST, NC, kHead, kSingle, kSr><<<dim3(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y), static_cast<unsigned>(grid.z)), kThreads, smem,
                                       stream>>>(p, lnl, static_cast<unsigned>(tiles), m, vs, vn);
  NK_CUDA_LAUNCH_CHECK();
}

template <typename ST, bool kSr>
void dispatch_nc(const SsuParams& p, const SsuLayout& l, cudaStream_t stream) {
  auto go = [&]<int NC>() {
    const bool single = p.in_place && p.replay_to == nullptr;  // the one-token op (seqlen == 1)
    if (p.head_decay) {
      if (single) launch<ST, NC, true, true, kSr>(p, l.ln, stream);
      else launch<ST, NC, true, false, kSr>(p, l.ln, stream);
    } else {
      if (single) launch<ST, NC, false, true, kSr>(p, l.ln, stream);
      else launch<ST, NC, false, false, kSr>(p, l.ln, stream);
    }
  };
  if (l.nc <= 1) go.template operator()<1>();
  else if (l.nc <= 2) go.template operator()<2>();
  else if (l.nc <= 4) go.template operator()<4>();
  else throw std::runtime_error("nemokernels: selective_state_update: dstate too large for the CUDA kernel");
}

// Stochastic rounding only exists for the 16-bit states (the entry refuses a float32 one).
template <typename ST>
void dispatch_sr(const SsuParams& p, const SsuLayout& l, cudaStream_t stream) {
  if (p.sr_seed != nullptr) dispatch_nc<ST, true>(p, l, stream);
  else dispatch_nc<ST, false>(p, l, stream);
}

}  // namespace

void selective_state_update_cuda(const SsuParams& p, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const SsuLayout l = ssu_layout(p.dstate, p.state_dtype);
  switch (p.state_dtype) {
    case DType::F32: dispatch_nc<float, false>(p, l, stream); break;
    case DType::F16: dispatch_sr<__half>(p, l, stream); break;
    case DType::BF16: dispatch_sr<__nv_bfloat16>(p, l, stream); break;
  }
}

}  // namespace nk
