// nvfp4.gemm on sm_90a with B decoded inside the mainloop (opt-in,
// NEMOKERNELS_NVFP4_GEMM_DECODE_MMA=1): out = alpha * A_hat B_hat^T (+ bias), A already decoded to
// fp16 by the caller, B's codes and scales streamed by cp.async and decoded by each thread
// straight into wgmma's register A operand (D^T = B A^T). One CTA: 128 weight rows x 128 tokens,
// two warpgroups, a 4-stage pipeline of 64-deep K steps; wgmma of step k runs while step k + 1
// is decoded. Pieces and their host checks: gemm_decode_mma_sm90.cuh; design: docs/nvfp4.md.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "common/cuda_utils.cuh"
#include "cutlass/arch/barrier.h"
#include "moe/segments.cuh"
#include "nvfp4/gemm.h"
#include "nvfp4/gemm_decode_mma_sm90.cuh"

namespace nk {
namespace nvfp4_sm90 {
namespace {

// The pipeline's stages, and the epilogue's float tile over the same bytes once they are done.
template <class E, int kTok>
struct Stages {
  alignas(1024) E x[kStages][kTok * kK];                 // kTok * 128 bytes each, Cfg::SmemX (the swizzle: 1024-aligned)
  alignas(16) uint32_t codes[kStages][kRows * kK / 8];  // 8 words (32 bytes) per weight row
  alignas(16) uint32_t scales[kStages][kRows];          // 4 bytes per weight row
};
constexpr int kLd = kRows + 4;             // epilogue tile row stride (floats): conflict-free scatter
constexpr int64_t kWideTokensFrom = 1024;  // M from which the 256-token tiles run
// [stages | the epilogue tile over the same bytes][decode table, kLutWords words] + alignment.
template <class E, int kTok>
constexpr int lut_offset() {
  using St = Stages<E, kTok>;
  return (static_cast<int>(sizeof(St) > kTok * kLd * 4 ? sizeof(St) : kTok * kLd * 4) + 127) / 128 * 128;
}
template <class E, int kTok>
constexpr int smem_bytes() {
  return lut_offset<E, kTok>() + kLutWords * 4 + 1024;
}

// One call. Dense (offsets null, nvfp4.gemm): tokens [0, M) against one weight matrix. Grouped
// (the MoE experts): expert e = blockIdx.y owns token rows [offsets[e], offsets[e + 1]) (clamped
// into [0, M]) and weight matrix e; its CTAs loop over their rows' token tiles.
struct Args {
  int64_t M, N, K;
  const void* x;            // (M, K) tokens in the kernel's E (fp16: nvfp4.gemm's decoded A)
  const uint8_t* codes;     // (experts, N, K / 2)
  const uint8_t* scales;    // (experts, N, K / 16)
  const float* alpha;       // device floats: alpha[e * alpha_stride]
  int64_t alpha_stride;     // 0: one for every expert
  const int32_t* offsets;   // (experts + 1,) or null (dense)
  const float* bias;        // (N,) or null (dense only)
  bool relu2;               // out = relu(alpha acc)^2
  void* out;                // (M, N) row-major, OutT
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

// Two CTAs per SM for 64-token tiles (<= 128 registers, ~84 KB of shared memory each): one's
// barrier and decode under the other's wgmma at decode sizes.
template <class E, typename OutT, int kTok>
__global__ void __launch_bounds__(kThreads, kTok <= 64 ? 2 : 1) decode_mma_kernel(Args q) {
  using SmemX = typename Cfg<E, kTok>::SmemX;
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ uint8_t smem_raw[];
  // 1024-byte aligned by an offset on the shared array itself (the address space stays known:
  // LDS/STS rather than generic loads).
  uint8_t* base = smem_raw + ((1024u - static_cast<unsigned>(__cvta_generic_to_shared(smem_raw)) % 1024u) % 1024u);
  Stages<E, kTok>& S = *reinterpret_cast<Stages<E, kTok>*>(base);
  const int tid = threadIdx.x, lane = tid % 32;
  const int64_t n0 = int64_t(blockIdx.x) * kRows;
  const int KT = static_cast<int>(q.K / kK);
  const int64_t code_ld = q.K / 2, scale_ld = q.K / 16;
  static_assert(kThreads == 256 && kRows == 128 && kK == 64, "the load pattern below assumes these");
  // This CTA's token rows [m_first, m_end) and weight matrix.
  int64_t m_first = int64_t(blockIdx.y) * kTok, m_end = q.M;
  const uint8_t* codes = q.codes;
  const uint8_t* scales = q.scales;
  float alpha = *q.alpha;
  int64_t m_step = m_end;  // dense: one token tile per CTA
  if (q.offsets != nullptr) {  // grouped: the expert's token tiles z, z + Z, z + 2 Z, ... (Z = gridDim.z)
    const int64_t e = blockIdx.y;
    int64_t lo;
    segment(q.offsets, e, q.M, lo, m_end);  // clamped to [0, M] (moe/segments.cuh)
    m_first = lo + int64_t(blockIdx.z) * kTok;
    m_step = int64_t(gridDim.z) * kTok;
    codes += e * q.N * code_ld;
    scales += e * q.N * scale_ld;
    alpha = q.alpha[e * q.alpha_stride];
  }
  if (m_first >= m_end) return;  // no token tile here (an expert without rows, or a spare split)
  // The decode table (read after the prologue's barrier below): warp w writes entries 32 w ..
  // 32 w + 31, one entry's 32 copies per store (lane l to copy l: bank l, no conflicts).
  uint32_t* lut = reinterpret_cast<uint32_t*>(base + lut_offset<E, kTok>());
  {
    static_assert(kThreads == 256, "one table entry per thread");
    const uint32_t v = lut_entry<E>(static_cast<uint32_t>(tid));
    CUTE_UNROLL
    for (int i = 0; i < 32; ++i) lut[32 * (32 * (tid / 32) + i) + lane] = __shfl_sync(0xffffffffu, v, i);
  }
  const E* x = static_cast<const E*>(q.x);
  OutT* out = static_cast<OutT*>(q.out);
  const int r_lo = sm90::frag_row(tid, 0);
  typename Cfg<E, kTok>::Mma mma;
  auto thr = mma.get_thread_slice(tid);

  // Token tiles of the rows (one for the dense GEMM: its grid has a CTA per tile). The weights
  // stream again for each tile; decode-sized batches have one.
  for (int64_t m0 = m_first; m0 < m_end; m0 += m_step) {

    // Loads of K step kt into stage kt % kStages; rows past M or N are zero-filled (not read). Each
    // thread's chunks are fixed: x rows tid / 8 + 32 i (16-byte chunk tid % 8 of the row's 128
    // bytes; in the swizzled tile those sit 2048 elements apart), code row tid / 2 (half tid % 2),
    // scale row tid; so a step only adds k0 to addresses computed once here.
    constexpr int kXChunks = kTok / 32;
    const int xr = tid / 8, xc = tid % 8;
    const E* x_src = x + (m0 + xr) * q.K + xc * 8;
    const int x_dst = sm90::k_sw128_offset<kTok>(xr, xc * 8);
    const int64_t x_step = 32 * q.K;
    uint32_t x_ok = 0;
    CUTE_UNROLL
    for (int i = 0; i < kXChunks; ++i) x_ok |= (m0 + xr + 32 * i < m_end ? 1u : 0u) << i;
    const bool c_ok = n0 + tid / 2 < q.N, s_ok = tid < kRows && n0 + tid < q.N;
    const uint8_t* c_src = codes + (n0 + tid / 2) * code_ld + (tid % 2) * 16;
    const uint8_t* s_src = scales + (n0 + tid) * scale_ld;
    const int c_dst = (tid / 2) * 8 + (tid % 2) * 4;
    auto issue = [&](int kt) {
      const int s = kt % kStages;
      const int64_t k0 = int64_t(kt) * kK;
      CUTE_UNROLL
      for (int i = 0; i < kXChunks; ++i) {
        const bool ok = (x_ok >> i) & 1u;
        sm90::cp_async16(&S.x[s][x_dst + 2048 * i], ok ? x_src + i * x_step + k0 : x, ok);
      }
      sm90::cp_async16(&S.codes[s][c_dst], c_ok ? c_src + k0 / 2 : codes, c_ok);
      if (tid < kRows) sm90::cp_async4(&S.scales[s][tid], s_ok ? s_src + k0 / 16 : scales, s_ok);
    };

    // Accumulators: value v at (weight row frag_row(tid, v), token frag_col(v, lane)).
    Tensor acc = partition_fragment_C(mma, Shape<Int<kRows>, Int<kTok>>{});
    clear(acc);
    // Two register A operands (value v: row frag_row(tid, v), column frag_col(v, lane) of the
    // stage's 64), one consumed by the wgmma in flight while the other is decoded.
    Tensor fa0 = make_tensor<E>(shape(thr.partition_A(make_identity_tensor(Shape<Int<kRows>, Int<kK>>{}))));
    Tensor fa1 = make_tensor<E>(shape(fa0));

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
        decode_row_lut<E>(w, S.scales[s][r], lane, lut, out);
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

    // alpha * acc into a (token, weight row) float tile, then rows of the output (+ bias, or
    // relu^2), rounded once, 8 columns per thread (N % 8 == 0: a group is all in or all out).
    float* tile = reinterpret_cast<float*>(base);
    CUTE_UNROLL
    for (int v = 0; v < size(acc); ++v) {
      tile[sm90::frag_col(v, lane) * kLd + sm90::frag_row(tid, v)] = __fmul_rn(alpha, acc(v));
    }
    __syncthreads();
    for (int e = tid; e < kTok * kRows / 8; e += kThreads) {
      const int r = e / (kRows / 8), c = (e % (kRows / 8)) * 8;
      const int64_t m = m0 + r, n = n0 + c;
      if (m >= m_end || n >= q.N) continue;
      const float4 t0 = *reinterpret_cast<const float4*>(&tile[r * kLd + c]);
      const float4 t1 = *reinterpret_cast<const float4*>(&tile[r * kLd + c + 4]);
      float y[8] = {t0.x, t0.y, t0.z, t0.w, t1.x, t1.y, t1.z, t1.w};
      if (q.bias != nullptr) {
        CUTE_UNROLL
        for (int i = 0; i < 8; ++i) y[i] = __fadd_rn(y[i], q.bias[n + i]);
      }
      if (q.relu2) {
        CUTE_UNROLL
        for (int i = 0; i < 8; ++i) y[i] = (y[i] > 0.f || y[i] != y[i]) ? __fmul_rn(y[i], y[i]) : 0.f;  // NaN kept
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
    __syncthreads();  // the tile's reads done before the next token tile's copies land there
  }
#else
  (void)q;
#endif
}

template <class E, typename OutT, int kTok>
void launch_tok(const Args& q, unsigned grid_y, cudaStream_t s, unsigned splits = 1) {
  allow_dynamic_smem<decode_mma_kernel<E, OutT, kTok>>(smem_bytes<E, kTok>());
  const dim3 grid(static_cast<unsigned>((q.N + kRows - 1) / kRows), grid_y, splits);
  decode_mma_kernel<E, OutT, kTok><<<grid, kThreads, smem_bytes<E, kTok>(), s>>>(q);
  NK_CUDA_LAUNCH_CHECK();
}
// Dense (fp16 tokens): 256 tokens per CTA halves the decode per MMA where M fills such tiles;
// 128 keeps more CTAs (and less padding) for smaller M.
template <typename OutT>
void launch_dense(const Args& q, cudaStream_t s) {
  if (q.M >= kWideTokensFrom) launch_tok<half_t, OutT, 256>(q, static_cast<unsigned>((q.M + 255) / 256), s);
  else launch_tok<half_t, OutT, 128>(q, static_cast<unsigned>((q.M + 127) / 128), s);
}
// Token-tile splits of the grouped grid (gridDim.z). The offsets stay on the device, so the host
// knows only R: one split while the experts average at most one tile (decode sizes); above, twice
// the average tiles (a hot expert's tiles spread over that many CTAs instead of running one after
// another in one), at most the tiles of R and 16. Splits without a tile exit at once.
inline unsigned grouped_splits(int64_t R, int64_t experts, int tok) {
  const int64_t tiles = (R + tok - 1) / tok;
  if (tiles <= experts) return 1;
  const int64_t avg = (tiles + experts - 1) / experts;
  return static_cast<unsigned>(std::min<int64_t>({tiles, 2 * avg, 16}));
}
// Grouped (a CTA row per expert): 64-token tiles while the experts average at most 64 rows (decode
// sizes: one tile, a quarter of 256's MMA padding), else 128.
template <class E>
void launch_grouped(const Args& q, int64_t experts, cudaStream_t s) {
  using OutT = std::conditional_t<kIsHalf<E>, __half, __nv_bfloat16>;
  if (q.M <= 64 * experts) {
    launch_tok<E, OutT, 64>(q, static_cast<unsigned>(experts), s, grouped_splits(q.M, experts, 64));
  } else {
    launch_tok<E, OutT, 128>(q, static_cast<unsigned>(experts), s, grouped_splits(q.M, experts, 128));
  }
}

}  // namespace
}  // namespace nvfp4_sm90

void nvfp4_gemm_decode_mma_sm90(const Nvfp4GemmParams& p, const void* a16, const float* alpha, void* stream) {
  static_assert(nvfp4_sm90::kK == 64, "nvfp4_gemm_decode_mma_sm90_takes's K rule");
  if (!nvfp4_gemm_decode_mma_sm90_takes(p.M, p.N, p.K)) {
    throw std::runtime_error("nemokernels: nvfp4.gemm: the decode-in-the-mainloop kernel needs K % 64 == 0, "
                             "N % 8 == 0 and M <= 65535 * 128");
  }
  nvfp4_sm90::Args q{p.M, p.N, p.K, a16, p.b_data, p.b_scales, alpha, 0, nullptr, p.bias, false, p.out};
  auto s = static_cast<cudaStream_t>(stream);
  switch (p.out_dtype) {
    case DType::F32: nvfp4_sm90::launch_dense<float>(q, s); break;
    case DType::F16: nvfp4_sm90::launch_dense<__half>(q, s); break;
    case DType::BF16: nvfp4_sm90::launch_dense<__nv_bfloat16>(q, s); break;
  }
}

void nvfp4_grouped_decode_mma_sm90(const Nvfp4GroupedArgs& g, void* stream) {
  if (g.K % nvfp4_sm90::kK != 0 || g.N % 8 != 0 || g.experts > 65535) {
    throw std::runtime_error("nemokernels: the grouped NVFP4-weight GEMM kernel needs K % 64 == 0, N % 8 == 0 "
                             "and at most 65535 experts");
  }
  nvfp4_sm90::Args q{g.R, g.N, g.K, g.a, g.codes, g.scales, g.alpha, g.alpha_stride, g.offsets, nullptr, g.relu2,
                     g.out};
  auto s = static_cast<cudaStream_t>(stream);
  if (g.bf16) nvfp4_sm90::launch_grouped<cute::bfloat16_t>(q, g.experts, s);
  else nvfp4_sm90::launch_grouped<cute::half_t>(q, g.experts, s);
}

}  // namespace nk
