// sm_90a chunk output of the SSD forward (stage F4 of ssd_chunk_scan.h, the H2 of docs/ssd.md's
// Hopper redesign) on wgmma: one CTA per (b, chunk, group, slice of the group's heads), C·Bᵀ
// computed once for every head of the slice (parked in shared memory), the scores handed to the
// next product in registers. Opt-in
// (NEMOKERNELS_SSD_SM90=1) until a GPU run checks and measures it; compiled and reviewed only.
// Details: docs/ssd.md, section `csrc/ssd/ssd_chunk_output_sm90.cu`.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <stdexcept>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "common/cuda_utils.cuh"
#include "ssd/numerics.cuh"
#include "ssd/ssd_cuda_common.cuh"
#include "ssd/ssd_chunk_output_sm90.cuh"
#include "ssd/ssd_chunk_output_sm90.h"
#include "ssd/ssd_chunk_scan.h"

namespace nk {
namespace {

using namespace cute;

using ssd_sm90::Cfg;
using ssd_sm90::cp_async16;
using ssd_sm90::cp_async_commit;
using ssd_sm90::cp_async_wait_all;
using ssd_sm90::frag_col;
using ssd_sm90::frag_row;
using ssd_sm90::kThreads;
constexpr float kLog2e = 1.4426950408889634f;

template <typename E>
struct alignas(1024) Smem {
  using C = Cfg<E>;
  alignas(1024) E Cm[cosize_v<typename C::SmemQN>];
  alignas(1024) E Bm[cosize_v<typename C::SmemQN>];
  alignas(1024) E X[2][cosize_v<typename C::SmemPQ>];
  alignas(1024) E Inc[cosize_v<typename C::SmemPN>];
  alignas(16) E inc_lp[C::P * C::N];       // cp.async staging of the next head's in_c (states_lp)
  alignas(16) float4 cb[16][kThreads];      // CB in accumulator order: values 4 v .. 4 v + 3 of each thread
  alignas(16) float cs[2][C::Q];
  alignas(16) float dtp[2][C::Q];
  int32_t sid[C::Q];
};

// Two values of T in one 32-bit word (the lower address first), and back.
template <typename T>
NK_DEVICE uint32_t pack2(float a, float b) {
  const T lo = ssd::from_f<T>(a), hi = ssd::from_f<T>(b);
  return uint32_t{reinterpret_cast<const uint16_t&>(lo)} | (uint32_t{reinterpret_cast<const uint16_t&>(hi)} << 16);
}
template <typename T>
NK_DEVICE void unpack2(uint32_t w, float& a, float& b) {
  const uint16_t lo = static_cast<uint16_t>(w & 0xFFFFu), hi = static_cast<uint16_t>(w >> 16);
  a = ssd::to_f<T>(reinterpret_cast<const T&>(lo));
  b = ssd::to_f<T>(reinterpret_cast<const T&>(hi));
}

static_assert(sizeof(Smem<cute::bfloat16_t>) <= 227 * 1024, "more shared memory than an sm_90 CTA may have");

// The per-head inputs of head h into buffer buf: x (rows >= valid zero-filled), the chunk's cs and
// dt', and (has_state) in_c, already rounded to T by the state chain (states_lp), into the staging
// tile. All threads; one commit group.
template <typename T, typename E>
NK_DEVICE void issue_head_loads(const SsdParams& p, Smem<E>& S, int buf, int64_t b, int64_t c, int64_t h,
                                int64_t t0, int valid, bool has_state) {
  using Cf = Cfg<E>;
  constexpr int Q = Cf::Q, P = Cf::P, N = Cf::N;
  const int tid = threadIdx.x;
  Tensor sX = make_tensor(make_smem_ptr(S.X[buf]), typename Cf::SmemPQ{});
  const T* xb = static_cast<const T*>(p.x) + b * p.x_sb + h * p.x_sh;
  for (int e = tid; e < Q * (P / 8); e += kThreads) {
    const int j = e / (P / 8), k = (e % (P / 8)) * 8;
    const bool ok = j < valid;
    cp_async16(&sX(k, j), ok ? xb + (t0 + j) * p.x_sl + k : xb, ok);
  }
  const int64_t ci = ((b * p.nheads + h) * p.nchunks + c) * Q;
  if (tid < Q / 4) cp_async16(&S.cs[buf][tid * 4], p.cs + ci + tid * 4, true);
  else if (tid < Q / 2) cp_async16(&S.dtp[buf][(tid - Q / 4) * 4], p.dtp + ci + (tid - Q / 4) * 4, true);
  if (has_state) {
    const T* st = static_cast<const T*>(p.states_lp) + ((b * p.nchunks + c) * p.nheads + h) * int64_t{P * N};
    for (int e = tid; e < P * N / 8; e += kThreads) cp_async16(&S.inc_lp[e * 8], st + e * 8, true);
  }
  cp_async_commit();
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) chunk_output_sm90_kernel(const SsdParams p, const int heads_per_cta) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using E = ssd_sm90::cute_elem_t<T>;
  using Cf = Cfg<E>;
  constexpr int Q = Cf::Q, P = Cf::P, N = Cf::N;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  if ((__cvta_generic_to_shared(smem_raw) & 1023) != 0) __trap();  // the swizzled tiles need it
  Smem<E>& S = *reinterpret_cast<Smem<E>*>(smem_raw);

  const int tid = threadIdx.x, wg = tid / 128;
  const int64_t H = p.nheads, G = p.ngroups, hs = H / G, nc = p.nchunks;
  const int64_t nslices = (hs + heads_per_cta - 1) / heads_per_cta;
  int64_t bid = blockIdx.x;
  const int64_t slice = bid % nslices; bid /= nslices;
  const int64_t g = bid % G; bid /= G;
  const int64_t c = bid % nc;
  const int64_t b = bid / nc;
  const int64_t h_beg = g * hs + slice * heads_per_cta;
  const int64_t h_end = h_beg + heads_per_cta < (g + 1) * hs ? h_beg + heads_per_cta : (g + 1) * hs;
  const int64_t t0 = ssd_chunk_t0(p, c);
  const int valid = ssd_chunk_len(p, c);
  if (valid <= 0 || h_beg >= h_end) return;  // uniform: an empty chunk of a plan writes nothing
  const bool has_state = !ssd_chunk_first(p, c) || ssd_chunk_init_row(p, b, c) >= 0;
  const int32_t sid_prev = ssd_sid_prev(p, b, c, Q);

  Tensor sC = make_tensor(make_smem_ptr(S.Cm), typename Cf::SmemQN{});
  Tensor sB = make_tensor(make_smem_ptr(S.Bm), typename Cf::SmemQN{});
  Tensor sInc = make_tensor(make_smem_ptr(S.Inc), typename Cf::SmemPN{});

  // ---- C and B of the chunk (rows >= valid zero-filled), sid, and the first head's inputs
  {
    const T* cb = static_cast<const T*>(p.C) + b * p.C_sb + g * p.C_sg;
    const T* bb = static_cast<const T*>(p.B) + b * p.B_sb + g * p.B_sg;
    for (int e = tid; e < Q * (N / 8); e += kThreads) {
      const int i = e / (N / 8), k = (e % (N / 8)) * 8;
      const bool ok = i < valid;
      cp_async16(&sC(i, k), ok ? cb + (t0 + i) * p.C_sl + k : cb, ok);
      cp_async16(&sB(i, k), ok ? bb + (t0 + i) * p.B_sl + k : bb, ok);
    }
    for (int i = tid; i < Q; i += kThreads) S.sid[i] = ssd_sid_at(p, b, t0 + i);
    issue_head_loads<T>(p, S, 0, b, c, h_beg, t0, valid, has_state);
  }

  typename Cf::MmaCB mma_cb;
  typename Cf::MmaYs mma_ys;
  typename Cf::MmaYx mma_yx;
  mma_cb.accumulate_ = GMMA::ScaleOut::One;
  mma_ys.accumulate_ = GMMA::ScaleOut::One;
  mma_yx.accumulate_ = GMMA::ScaleOut::One;
  auto thr_cb = mma_cb.get_thread_slice(tid);
  auto thr_ys = mma_ys.get_thread_slice(tid);
  auto thr_yx = mma_yx.get_thread_slice(tid);

  // S as wgmma's register A operand: element (v, 0, k) holds the same (i, j) as cb(v + 8 k).
  Tensor s_frag = make_tensor<E>(shape(thr_yx.partition_A(make_identity_tensor(Shape<Int<Q>, Int<Q>>{}))));
  static_assert(decltype(size(s_frag))::value == 64, "fragment size");
  // Y accumulators (32 floats); value v holds (frag_row(tid, v), frag_col(v, lane)) too.
  Tensor y = partition_fragment_C(mma_yx, Shape<Int<Q>, Int<P>>{});

  Tensor tCa = thr_cb.make_fragment_A(thr_cb.partition_A(sC));
  Tensor tCb = thr_cb.make_fragment_B(thr_cb.partition_B(sB));
  Tensor tYa = thr_ys.make_fragment_A(thr_ys.partition_A(sC));
  Tensor tYb = thr_ys.make_fragment_B(thr_ys.partition_B(sInc));

  // CB = C Bᵀ once for the slice's heads (C, B and the first head's inputs are one cp.async group).
  // Every wgmma below is on a straight path (no branch around it), so ptxas keeps them pipelined.
  cp_async_wait_all();
  cutlass::arch::fence_view_async_shared();  // cp.async writes -> wgmma's async proxy
  __syncthreads();
  {  // CB accumulators (64 floats per thread; value v holds (frag_row(tid, v), frag_col(v, lane))),
     // parked in shared memory in their own order: registers are the kernel's limit, shared
     // memory is not (each head reads them back conflict-free, 16 bytes per thread per step)
    Tensor cb = partition_fragment_C(mma_cb, Shape<Int<Q>, Int<Q>>{});
    static_assert(decltype(size(cb))::value == 64, "fragment size");
    clear(cb);
    warpgroup_fence_operand(cb);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tCa); ++k) gemm(mma_cb, tCa(_, _, k), tCb(_, _, k), cb);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(cb);
    CUTE_UNROLL
    for (int v = 0; v < 64; v += 4) S.cb[v / 4][tid] = make_float4(cb(v), cb(v + 1), cb(v + 2), cb(v + 3));
  }
  // This thread's two rows of CB and Y (rows r and r + 8 of its warp's 16); the mask of CB's
  // values (j <= i, same sid) as bits, fixed for every head.
  const int lane = tid % 32;
  const int i_lo = frag_row(tid, 0), i_hi = frag_row(tid, 2);
  uint64_t keep = 0;
  {
    const int32_t sid_lo = S.sid[i_lo], sid_hi = S.sid[i_hi];
    CUTE_UNROLL
    for (int v = 0; v < 64; ++v) {
      const bool lo = (v & 2) == 0;
      const int j = frag_col(v, lane);
      if (j <= (lo ? i_lo : i_hi) && S.sid[j] == (lo ? sid_lo : sid_hi)) keep |= uint64_t{1} << v;
    }
  }

  for (int64_t h = h_beg; h < h_end; ++h) {
    const int buf = static_cast<int>((h - h_beg) & 1);
    cp_async_wait_all();
    __syncthreads();  // (A) x, cs, dt' and the in_c staging of head h landed for every thread
    // in_c (T) into the swizzled tile, 8 values (16 bytes) per step; zeros when the chunk has no
    // incoming state (its product is then 0, and no branch guards the wgmma)
    for (int e = tid; e < P * N / 8; e += kThreads) {
      const int pp = e / (N / 8), k = (e % (N / 8)) * 8;
      const uint4 v = has_state ? *reinterpret_cast<const uint4*>(&S.inc_lp[pp * N + k]) : make_uint4(0u, 0u, 0u, 0u);
      *reinterpret_cast<uint4*>(&sInc(pp, k)) = v;
    }
    cutlass::arch::fence_view_async_shared();  // generic-proxy writes (and cp.async) -> wgmma
    __syncthreads();  // (B) in_c tile complete; the staging tile and the other x buffer are free
    if (h + 1 < h_end) issue_head_loads<T>(p, S, buf ^ 1, b, c, h + 1, t0, valid, has_state);

    // Y = C in_cᵀ, issued first; the scores below overlap it
    clear(y);
    warpgroup_fence_operand(y);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int k = 0; k < size<2>(tYa); ++k) gemm(mma_ys, tYa(_, _, k), tYb(_, _, k), y);
    warpgroup_commit_batch();

    // S = CB exp(cs_i - cs_j) dt'_j where the mask keeps (i, j), else 0, as E. Warpgroup 0's
    // rows (i < 64) keep no column j >= 64: those values are zeros, not computed.
    const float* cs = S.cs[buf];
    const float* dtp = S.dtp[buf];
    const float cs_lo = cs[i_lo], cs_hi = cs[i_hi];
    CUTE_UNROLL
    for (int v = 0; v < 64; ++v) {
      float sv = 0.f;
      if (v < 32 || wg == 1) {
        const int j = frag_col(v, lane);
        const float4 c4 = S.cb[v / 4][tid];
        const float cbv = (v & 3) == 0 ? c4.x : (v & 3) == 1 ? c4.y : (v & 3) == 2 ? c4.z : c4.w;
        if ((keep >> v) & 1) sv = cbv * exp2f((((v & 2) == 0 ? cs_lo : cs_hi) - cs[j]) * kLog2e) * dtp[j];
      }
      s_frag(v % 8, 0, v / 8) = E(sv);
    }

    warpgroup_wait<0>();
    warpgroup_fence_operand(y);
    {  // rows scaled by exp(cs_i) [has_state, sid_i == sid_prev] (select: masked rows are exactly 0)
      const bool ok_lo = has_state && S.sid[i_lo] == sid_prev, ok_hi = has_state && S.sid[i_hi] == sid_prev;
      const float e_lo = exp2f(cs_lo * kLog2e), e_hi = exp2f(cs_hi * kLog2e);
      CUTE_UNROLL
      for (int v = 0; v < size(y); ++v) {
        const bool lo = (v & 2) == 0;
        y(v) = (lo ? ok_lo : ok_hi) ? y(v) * (lo ? e_lo : e_hi) : 0.f;
      }
    }

    // Y += S X (warpgroup 0 multiplies its zero columns j >= 64 too: a branch would serialize the wgmmas)
    Tensor tXb = thr_yx.make_fragment_B(thr_yx.partition_B(make_tensor(make_smem_ptr(S.X[buf]), typename Cf::SmemPQ{})));
    Tensor s_regs = recast<uint32_t>(s_frag);
    warpgroup_fence_operand(s_regs);
    warpgroup_fence_operand(y);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int k = 0; k < size<2>(s_frag); ++k) gemm(mma_yx, s_frag(_, _, k), tXb(_, _, k), y);
    warpgroup_commit_batch();
    warpgroup_wait<0>();
    warpgroup_fence_operand(y);
    warpgroup_fence_operand(s_regs);

    // Epilogue: + D x, y_pre, y = Y silu(z); pairs of p per store
    Tensor sX = make_tensor(make_smem_ptr(S.X[buf]), typename Cf::SmemPQ{});
    CUTE_UNROLL
    for (int v = 0; v < size(y); v += 2) {
      const int i = (v & 2) == 0 ? i_lo : i_hi, pc = frag_col(v, lane);
      if (i >= valid) continue;
      float o[2] = {y(v), y(v + 1)};
      if (p.D != nullptr) {
        CUTE_UNROLL
        for (int q = 0; q < 2; ++q) {
          const float d = p.D_per_p ? p.D[h * P + pc + q] : p.D[h];
          o[q] = fmaf(d, static_cast<float>(sX(pc + q, i)), o[q]);
        }
      }
      const int64_t t = t0 + i;
      const int64_t yo = ((b * p.seqlen + t) * H + h) * P + pc;  // even: 4-byte aligned pairs
      if (p.y_pre != nullptr) *reinterpret_cast<uint32_t*>(static_cast<T*>(p.y_pre) + yo) = pack2<T>(o[0], o[1]);
      if (p.z != nullptr) {
        const T* zp = static_cast<const T*>(p.z) + b * p.z_sb + t * p.z_sl + h * p.z_sh + pc;
        float z0, z1;
        if ((reinterpret_cast<uintptr_t>(zp) & 3) == 0) {
          unpack2<T>(*reinterpret_cast<const uint32_t*>(zp), z0, z1);
        } else {
          z0 = ssd::to_f<T>(zp[0]);
          z1 = ssd::to_f<T>(zp[1]);
        }
        o[0] *= silu(z0);
        o[1] *= silu(z1);
      }
      *reinterpret_cast<uint32_t*>(static_cast<T*>(p.y) + yo) = pack2<T>(o[0], o[1]);
    }
  }
#else
  (void)p, (void)heads_per_cta;
  __trap();  // built for another arch: the host never launches it there
#endif
}

}  // namespace

bool ssd_chunk_output_sm90_supports(const SsdParams& p) {
  if (p.dtype != DType::BF16 && p.dtype != DType::F16) return false;
  if (p.chunk_size != kSsdSm90Q || p.headdim != kSsdSm90P || p.dstate != kSsdSm90N) return false;
  if (p.ngroups <= 0 || p.nheads % p.ngroups != 0) return false;
  // 16-byte cp.async of x, B, C rows (16-bit elements) and of cs, dt' (and of states_lp, which
  // the entry allocates for this kernel: ssd_chunk_output_sm90 checks it)
  if (!ssd::vec_ok(p.x, 2, {p.x_sb, p.x_sl, p.x_sh}) || !ssd::vec_ok(p.B, 2, {p.B_sb, p.B_sl, p.B_sg}) ||
      !ssd::vec_ok(p.C, 2, {p.C_sb, p.C_sl, p.C_sg}))
    return false;
  if (!ssd::aligned16(p.cs) || !ssd::aligned16(p.dtp)) return false;
  // y / y_pre (contiguous, P even) are stored as 4-byte pairs; z pairs are checked per load
  auto al4 = [](const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 3) == 0; };
  return al4(p.y) && al4(p.y_pre);
}

int64_t ssd_chunk_output_sm90_heads_per_cta(const SsdParams& p, int num_sms) {
  const int64_t hs = p.nheads / p.ngroups;
  const int64_t ctas_per_slice = p.batch * p.nchunks * p.ngroups;
  int64_t hpc = hs;
  // Split the group's heads (recomputing CB per slice) until the grid fills about two waves.
  while (hpc > 1 && ctas_per_slice * ((hs + hpc - 1) / hpc) < 2 * int64_t{num_sms}) hpc = (hpc + 1) / 2;
  return hpc;
}

size_t ssd_chunk_output_sm90_smem_bytes(DType dtype) {
  // one Smem layout per 16-bit type, same size. The kernel needs the dynamic shared memory base
  // 1024-byte aligned (it has no static shared memory, so the base is the window's start) and
  // traps if it is not.
  (void)dtype;
  return sizeof(Smem<cute::bfloat16_t>);
}

void ssd_chunk_output_sm90(const SsdParams& p, void* stream) {
  if (p.states_lp == nullptr || !ssd::aligned16(p.states_lp))
    throw std::runtime_error("nemokernels: internal: the sm_90 chunk output needs 16-byte aligned states_lp");
  int dev = 0, sms = 0;
  NK_CUDA_CHECK(cudaGetDevice(&dev));
  NK_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t hpc = ssd_chunk_output_sm90_heads_per_cta(p, sms);
  const int64_t hs = p.nheads / p.ngroups;
  const int64_t grid = p.batch * p.nchunks * p.ngroups * ((hs + hpc - 1) / hpc);
  if (grid > 2147483647LL) throw std::runtime_error("nemokernels: mamba_chunk_scan_combined: problem too large for the sm_90 chunk output grid");
  const size_t bytes = ssd_chunk_output_sm90_smem_bytes(p.dtype);
  auto st = static_cast<cudaStream_t>(stream);
  if (p.dtype == DType::BF16) {
    allow_dynamic_smem<chunk_output_sm90_kernel<__nv_bfloat16>>(static_cast<int>(bytes));
    chunk_output_sm90_kernel<__nv_bfloat16><<<static_cast<unsigned>(grid), kThreads, bytes, st>>>(p, static_cast<int>(hpc));
  } else {
    allow_dynamic_smem<chunk_output_sm90_kernel<__half>>(static_cast<int>(bytes));
    chunk_output_sm90_kernel<__half><<<static_cast<unsigned>(grid), kThreads, bytes, st>>>(p, static_cast<int>(hpc));
  }
  NK_CUDA_LAUNCH_CHECK();
}

}  // namespace nk
