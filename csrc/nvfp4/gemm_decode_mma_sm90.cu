// nvfp4.gemm on sm_90a with B decoded inside the mainloop (opt-in,
// NEMOKERNELS_NVFP4_GEMM_DECODE_MMA=1): out = alpha * A_hat B_hat^T (+ bias), A already decoded to
// fp16 by the caller, B's codes and scales streamed by cp.async and decoded by each thread
// straight into wgmma's register A operand (D^T = B A^T). One CTA: 128 weight rows x 128 tokens,
// two warpgroups, a 4-stage pipeline of 64-deep K steps; wgmma of step k runs while step k + 1
// is decoded. Pieces and their host checks: gemm_decode_mma_sm90.cuh; design: docs/nvfp4.md.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>

#include "common/cuda_utils.cuh"
#include "cutlass/arch/barrier.h"
#include "nvfp4/gemm.h"
#include "nvfp4/gemm_decode_mma_sm90.cuh"

namespace nk {
namespace nvfp4_sm90 {
namespace {

// The pipeline's stages, and the epilogue's float tile over the same bytes once they are done.
template <int kTok>
struct Stages {
  alignas(1024) E x[kStages][kTok * kK];                 // kTok * 128 bytes each, Cfg::SmemX (the swizzle: 1024-aligned)
  alignas(16) uint32_t codes[kStages][kRows * kK / 8];  // 8 words (32 bytes) per weight row
  alignas(16) uint32_t scales[kStages][kRows];          // 4 bytes per weight row
};
constexpr int kLd = kRows + 4;             // epilogue tile row stride (floats): conflict-free scatter
constexpr int64_t kWideTokensFrom = 1024;  // M from which the 256-token tiles run
template <int kTok>
constexpr int smem_bytes() {
  return static_cast<int>(sizeof(Stages<kTok>) > kTok * kLd * 4 ? sizeof(Stages<kTok>) : kTok * kLd * 4) + 1024;
}

struct Args {
  int64_t M, N, K;
  const E* x;             // (M, K) fp16, the decoded activations
  const uint8_t* codes;   // (N, K / 2)
  const uint8_t* scales;  // (N, K / 16)
  const float* alpha;     // device float
  const float* bias;      // (N,) or null
  void* out;              // (M, N)
};

template <typename OutT>
NK_DEVICE OutT out_cast(float v) {
  if constexpr (std::is_same_v<OutT, float>) return v;
  else if constexpr (std::is_same_v<OutT, __half>) return __float2half_rn(v);
  else return __float2bfloat16_rn(v);
}

template <typename T>
NK_DEVICE uint32_t pack16(T v) {
  return *reinterpret_cast<const uint16_t*>(&v);
}

template <typename OutT, int kTok>
__global__ void __launch_bounds__(kThreads, 1) decode_mma_kernel(Args q) {
  using SmemX = typename Cfg<kTok>::SmemX;
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint8_t smem_raw[];
  // 1024-byte aligned by an offset on the shared array itself (the address space stays known:
  // LDS/STS rather than generic loads).
  uint8_t* base = smem_raw + ((1024u - static_cast<unsigned>(__cvta_generic_to_shared(smem_raw)) % 1024u) % 1024u);
  Stages<kTok>& S = *reinterpret_cast<Stages<kTok>*>(base);
  const int tid = threadIdx.x, lane = tid % 32;
  const int64_t n0 = int64_t(blockIdx.x) * kRows, m0 = int64_t(blockIdx.y) * kTok;
  const int KT = static_cast<int>(q.K / kK);
  const int64_t code_ld = q.K / 2, scale_ld = q.K / 16;
  static_assert(kThreads == 256 && kRows == 128 && kK == 64, "the load pattern below assumes these");

  // Loads of K step kt into stage kt % kStages; rows past M or N are zero-filled (not read). Each
  // thread's chunks are fixed: x rows tid / 8 + 32 i (16-byte chunk tid % 8 of the row's 128
  // bytes; in the swizzled tile those sit 2048 elements apart), code row tid / 2 (half tid % 2),
  // scale row tid; so a step only adds k0 to addresses computed once here.
  constexpr int kXChunks = kTok / 32;
  const int xr = tid / 8, xc = tid % 8;
  const E* x_src = q.x + (m0 + xr) * q.K + xc * 8;
  const int x_dst = sm90::k_sw128_offset<kTok>(xr, xc * 8);
  const int64_t x_step = 32 * q.K;
  uint32_t x_ok = 0;
  CUTE_UNROLL
  for (int i = 0; i < kXChunks; ++i) x_ok |= (m0 + xr + 32 * i < q.M ? 1u : 0u) << i;
  const bool c_ok = n0 + tid / 2 < q.N, s_ok = tid < kRows && n0 + tid < q.N;
  const uint8_t* c_src = q.codes + (n0 + tid / 2) * code_ld + (tid % 2) * 16;
  const uint8_t* s_src = q.scales + (n0 + tid) * scale_ld;
  const int c_dst = (tid / 2) * 8 + (tid % 2) * 4;
  auto issue = [&](int kt) {
    const int s = kt % kStages;
    const int64_t k0 = int64_t(kt) * kK;
    CUTE_UNROLL
    for (int i = 0; i < kXChunks; ++i) {
      const bool ok = (x_ok >> i) & 1u;
      sm90::cp_async16(&S.x[s][x_dst + 2048 * i], ok ? x_src + i * x_step + k0 : q.x, ok);
    }
    sm90::cp_async16(&S.codes[s][c_dst], c_ok ? c_src + k0 / 2 : q.codes, c_ok);
    if (tid < kRows) sm90::cp_async4(&S.scales[s][tid], s_ok ? s_src + k0 / 16 : q.scales, s_ok);
  };

  typename Cfg<kTok>::Mma mma;
  auto thr = mma.get_thread_slice(tid);
  // Accumulators: value v at (weight row frag_row(tid, v), token frag_col(v, lane)).
  Tensor acc = partition_fragment_C(mma, Shape<Int<kRows>, Int<kTok>>{});
  clear(acc);
  // Two register A operands (value v: row frag_row(tid, v), column frag_col(v, lane) of the
  // stage's 64), one consumed by the wgmma in flight while the other is decoded.
  Tensor fa0 = make_tensor<E>(shape(thr.partition_A(make_identity_tensor(Shape<Int<kRows>, Int<kK>>{}))));
  Tensor fa1 = make_tensor<E>(shape(fa0));
  const int r_lo = sm90::frag_row(tid, 0);

  auto decode = [&](int kt, auto& fa) {
    const int s = kt % kStages;
    Tensor u = recast<uint32_t>(fa);  // u = v / 2: (4 kb + h) row half h, (4 kb + 2 + h) the +8 columns
    CUTE_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int r = r_lo + 8 * h;
      const uint4 c0 = *reinterpret_cast<const uint4*>(&S.codes[s][r * 8]);
      const uint4 c1 = *reinterpret_cast<const uint4*>(&S.codes[s][r * 8 + 4]);
      const uint32_t w[8] = {c0.x, c0.y, c0.z, c0.w, c1.x, c1.y, c1.z, c1.w};
      uint32_t out[4][2];
      decode_row(w, S.scales[s][r], lane % 4, out);
      CUTE_UNROLL
      for (int kb = 0; kb < 4; ++kb) {
        u(4 * kb + h) = out[kb][0];
        u(4 * kb + 2 + h) = out[kb][1];
      }
    }
  };

  // Step kt: wgmma on stage kt with `cur`; then, with step kt - 1's wgmma retired (its stage and
  // `next` free), stage kt + 1 landed for every thread: refill the freed stage, decode kt + 1.
  auto step = [&](int kt, auto& cur, auto& next) {
    Tensor tB = thr.make_fragment_B(thr.partition_B(make_tensor(make_smem_ptr(S.x[kt % kStages]), SmemX{})));
    Tensor cur_regs = recast<uint32_t>(cur);
    warpgroup_fence_operand(cur_regs);
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    CUTE_UNROLL
    for (int k = 0; k < size<2>(cur); ++k) gemm(mma, cur(_, _, k), tB(_, _, k), acc);
    warpgroup_commit_batch();
    warpgroup_wait<1>();
    sm90::cp_async_wait<kStages - 3>();
    cutlass::arch::fence_view_async_shared();  // cp.async writes -> wgmma's reads of the next stage
    __syncthreads();
    if (kt + kStages - 1 < KT) issue(kt + kStages - 1);
    sm90::cp_async_commit();
    if (kt + 1 < KT) decode(kt + 1, next);
    Tensor next_regs = recast<uint32_t>(next);
    warpgroup_fence_operand(next_regs);
  };

  CUTE_UNROLL
  for (int kt = 0; kt < kStages - 1; ++kt) {
    if (kt < KT) issue(kt);
    sm90::cp_async_commit();
  }
  sm90::cp_async_wait<kStages - 2>();
  cutlass::arch::fence_view_async_shared();
  __syncthreads();
  decode(0, fa0);
  for (int kt = 0; kt < KT; kt += 2) {
    step(kt, fa0, fa1);
    if (kt + 1 < KT) step(kt + 1, fa1, fa0);
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);
  sm90::cp_async_wait<0>();
  __syncthreads();  // every stage consumed: the bytes become the epilogue tile

  // alpha * acc into a (token, weight row) float tile, then rows of the output (+ bias), rounded
  // once, 8 columns per thread (N % 8 == 0: a group is all in or all out).
  float* tile = reinterpret_cast<float*>(base);
  const float alpha = *q.alpha;
  CUTE_UNROLL
  for (int v = 0; v < size(acc); ++v) {
    tile[sm90::frag_col(v, lane) * kLd + sm90::frag_row(tid, v)] = __fmul_rn(alpha, acc(v));
  }
  __syncthreads();
  OutT* out = static_cast<OutT*>(q.out);
  for (int e = tid; e < kTok * kRows / 8; e += kThreads) {
    const int r = e / (kRows / 8), c = (e % (kRows / 8)) * 8;
    const int64_t m = m0 + r, n = n0 + c;
    if (m >= q.M || n >= q.N) continue;
    const float4 t0 = *reinterpret_cast<const float4*>(&tile[r * kLd + c]);
    const float4 t1 = *reinterpret_cast<const float4*>(&tile[r * kLd + c + 4]);
    float y[8] = {t0.x, t0.y, t0.z, t0.w, t1.x, t1.y, t1.z, t1.w};
    if (q.bias != nullptr) {
      CUTE_UNROLL
      for (int i = 0; i < 8; ++i) y[i] = __fadd_rn(y[i], q.bias[n + i]);
    }
    OutT* dst = out + m * q.N + n;
    if constexpr (sizeof(OutT) == 2) {
      uint32_t w[4];
      CUTE_UNROLL
      for (int i = 0; i < 4; ++i) {
        const uint32_t lo = pack16(out_cast<OutT>(y[2 * i])), hi = pack16(out_cast<OutT>(y[2 * i + 1]));
        w[i] = lo | (hi << 16);
      }
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
      reinterpret_cast<float4*>(dst)[0] = make_float4(y[0], y[1], y[2], y[3]);
      reinterpret_cast<float4*>(dst)[1] = make_float4(y[4], y[5], y[6], y[7]);
    }
  }
#else
  (void)q;
#endif
}

template <typename OutT, int kTok>
void launch_tok(const Args& q, cudaStream_t s) {
  allow_dynamic_smem<decode_mma_kernel<OutT, kTok>>(smem_bytes<kTok>());
  const dim3 grid(static_cast<unsigned>((q.N + kRows - 1) / kRows), static_cast<unsigned>((q.M + kTok - 1) / kTok));
  decode_mma_kernel<OutT, kTok><<<grid, kThreads, smem_bytes<kTok>(), s>>>(q);
  NK_CUDA_LAUNCH_CHECK();
}
// 256 tokens per CTA halves the decode per MMA where M fills such tiles; 128 keeps more CTAs
// (and less padding) for smaller M.
template <typename OutT>
void launch(const Args& q, cudaStream_t s) {
  if (q.M >= kWideTokensFrom) launch_tok<OutT, 256>(q, s);
  else launch_tok<OutT, 128>(q, s);
}

}  // namespace
}  // namespace nvfp4_sm90

void nvfp4_gemm_decode_mma_sm90(const Nvfp4GemmParams& p, const void* a16, const float* alpha, void* stream) {
  static_assert(nvfp4_sm90::kK == 64, "nvfp4_gemm_decode_mma_sm90_takes's K rule");
  if (!nvfp4_gemm_decode_mma_sm90_takes(p.M, p.N, p.K)) {
    throw std::runtime_error("nemokernels: nvfp4.gemm: the decode-in-the-mainloop kernel needs K % 64 == 0, "
                             "N % 8 == 0 and M <= 65535 * 128");
  }
  nvfp4_sm90::Args q{p.M, p.N, p.K, static_cast<const nvfp4_sm90::E*>(a16), p.b_data, p.b_scales, alpha, p.bias, p.out};
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.out_dtype) {
    case DType::F32: nvfp4_sm90::launch<float>(q, s); break;
    case DType::F16: nvfp4_sm90::launch<__half>(q, s); break;
    case DType::BF16: nvfp4_sm90::launch<__nv_bfloat16>(q, s); break;
  }
}

}  // namespace nk
