// CUDA kernel of the decode state updates (math and lane decomposition in state_update.h).
// Details: docs/ssd.md, section `csrc/ssd/state_update_cuda.cu`.
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

// VN consecutive state elements at `ptr` (element stride sn): one 16-byte access when kVec is
// set (then sn == 1, ptr 16-byte aligned and all VN in range); else masked scalar accesses.
template <typename ST, int VN>
NK_DEVICE void load_vec(const ST* ptr, bool vec, int64_t sn, int64_t n0, int64_t N, float (&v)[VN]) {
  if (vec) {
    const uint4 raw = *reinterpret_cast<const uint4*>(ptr);
    const ST* e = reinterpret_cast<const ST*>(&raw);
#pragma unroll
    for (int i = 0; i < VN; ++i) v[i] = to_f<ST>(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VN; ++i) v[i] = n0 + i < N ? to_f<ST>(ptr[i * sn]) : 0.f;
  }
}

template <typename ST, int VN>
NK_DEVICE void store_vec(ST* ptr, bool vec, int64_t sn, int64_t n0, int64_t N, const float (&v)[VN]) {
  if (vec) {
    uint4 raw;
    ST* e = reinterpret_cast<ST*>(&raw);
#pragma unroll
    for (int i = 0; i < VN; ++i) e[i] = from_f<ST>(v[i]);
    *reinterpret_cast<uint4*>(ptr) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < VN; ++i)
      if (n0 + i < N) ptr[i * sn] = from_f<ST>(v[i]);
  }
}

// The value itself, hidden from the optimiser: per-row addresses derived from it inside the
// token loop are recomputed each token instead of being hoisted out of the loop and kept
// live for all tokens (which doubled the register count).
NK_DEVICE int64_t opaque(int64_t v) {
  asm volatile("" : "+l"(v));
  return v;
}

template <typename ST>
NK_DEVICE float round_to(float v) {
  if constexpr (std::is_same_v<ST, float>) return v;
  else return to_f<ST>(from_f<ST>(v));
}

// A whole padded / out-of-range entry: `fill` into its outputs (and its snapshots unless the
// state is updated in place). Rows and elements are strided over the block's threads.
template <typename ST>
NK_DEVICE void fill_entry(const SsuParams& p, int64_t b, int64_t h, int64_t p0, int64_t p1, float fill) {
  for (int64_t t = 0; t < p.seqlen; ++t) {
    for (int64_t i = p0 + threadIdx.x; i < p1; i += blockDim.x)
      st_any(p.out, p.out_dtype, b * p.out_s[0] + t * p.out_s[1] + h * p.out_s[2] + i * p.out_s[3], fill);
    if (p.snap != nullptr && !p.in_place) {
      ST* base = static_cast<ST*>(p.snap) + b * p.snap_s[0] + t * p.snap_s[1] + h * p.snap_s[2];
      const int64_t cnt = (p1 - p0) * p.dstate;
      for (int64_t e = threadIdx.x; e < cnt; e += blockDim.x) {
        const int64_t i = p0 + e / p.dstate, n = e % p.dstate;
        base[i * p.snap_s[3] + n * p.snap_s[4]] = from_f<ST>(fill);
      }
    }
  }
}

// Rows per thread: 4 / NC for the single step (64 bytes of state per thread); the
// multi-token kernel keeps its state live across the tokens and uses half as many.
template <int NC, bool kSingle>
constexpr int rows_per_thread() {
  return (kSingle ? 4 : 2) / NC > 0 ? (kSingle ? 4 : 2) / NC : 1;
}

template <typename ST, int NC, bool kHeadDecay, bool kSingle>
__global__ void __launch_bounds__(kThreads)
ssu_kernel(SsuParams p, int ln, int64_t tiles, bool vec_state, bool vec_snap) {
  constexpr int VN = 16 / sizeof(ST);
  constexpr int R = rows_per_thread<NC, kSingle>();
  // B and C of the current token as float32, double-buffered by token parity (one barrier
  // per token): [buffer][B | C][np], np = NC * ln * VN >= N, zero past N.
  extern __shared__ float4 smem_raw[];
  float* const sm = reinterpret_cast<float*>(smem_raw);
  const int np = NC * ln * VN;
  const int64_t N = p.dstate, P = p.dim;
  const int rows_per_pass = kThreads / ln;
  const int64_t rows_per_block = int64_t(R) * rows_per_pass;
  const int64_t tile = blockIdx.x % tiles, bh = blockIdx.x / tiles;
  const int64_t h = bh % p.nheads, b = bh / p.nheads, g = h / p.heads_per_group;
  const int lane = threadIdx.x % ln, slot = threadIdx.x / ln;
  const int64_t p_first = tile * rows_per_block;

  const int64_t row = p.state_indices != nullptr ? p.state_indices[b] : b;
  if (row < 0 || row >= p.state_rows) {  // uniform over the block: no barrier is left waiting
    const int64_t p_end = p_first + rows_per_block < P ? p_first + rows_per_block : P;
    fill_entry<ST>(p, b, h, p_first, p_end, row < 0 ? 0.f : __int_as_float(0x7fc00000));
    return;
  }

  int64_t pr[R];
  bool rin[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    pr[r] = p_first + int64_t(r) * rows_per_pass + slot;
    rin[r] = pr[r] < P;
  }

  // The state: every load issued before any math.
  ST* const sbase = static_cast<ST*>(p.state) + row * p.st_s[0] + h * p.st_s[1];
  float s[R][NC][VN];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int64_t n0 = (int64_t(c) * ln + lane) * VN;
      if (rin[r] && n0 < N) {
        load_vec<ST, VN>(sbase + pr[r] * p.st_s[2] + n0 * p.st_s[3], vec_state, p.st_s[3], n0, N, s[r][c]);
      } else {
#pragma unroll
        for (int v = 0; v < VN; ++v) s[r][c][v] = 0.f;
      }
    }

  // Per-row parameters, constant over the tokens.
  float bias[R], dv[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t i = rin[r] ? pr[r] : 0;
    bias[r] = p.dt_bias.ptr != nullptr ? ld_any(p.dt_bias.ptr, p.dt_bias.dtype, h * p.dt_bias.s[0] + i * p.dt_bias.s[1]) : 0.f;
    dv[r] = p.D.ptr != nullptr ? ld_any(p.D.ptr, p.D.dtype, h * p.D.s[0] + i * p.D.s[1]) : 0.f;
  }
  const bool vst = p.in_place ? vec_state : vec_snap;

  const int64_t T = kSingle ? 1 : p.seqlen;
#pragma unroll 1
  for (int64_t t = 0; t < T; ++t) {
    float* const smB = sm + (t & 1) * 2 * np;
    float* const smC = smB + np;
    {
      const int64_t bo = b * p.B.s[0] + t * p.B.s[1] + g * p.B.s[2];
      const int64_t co = b * p.C.s[0] + t * p.C.s[1] + g * p.C.s[2];
      for (int e = threadIdx.x; e < np; e += kThreads) {
        const bool in = e < N;
        smB[e] = in ? ld_any(p.B.ptr, p.B.dtype, bo + e * p.B.s[3]) : 0.f;
        smC[e] = in ? ld_any(p.C.ptr, p.C.dtype, co + e * p.C.s[3]) : 0.f;
      }
    }
    float dtp_head = 0.f, dA_head = 0.f;
    if constexpr (kHeadDecay) {
      const float dtv = ld_any(p.dt.ptr, p.dt.dtype, b * p.dt.s[0] + t * p.dt.s[1] + h * p.dt.s[2]);
      dtp_head = ssu_dt(dtv, bias[0], p.dt_softplus);
      dA_head = ssu_decay(dtp_head, ld_any(p.A.ptr, p.A.dtype, h * p.A.s[0]));
    }
    __syncthreads();
    ST* const dst = p.in_place ? sbase
                               : static_cast<ST*>(p.snap) + b * p.snap_s[0] + t * p.snap_s[1] + h * p.snap_s[2];
    const int64_t dsp = p.in_place ? p.st_s[2] : p.snap_s[3];
    const int64_t dsn = p.in_place ? p.st_s[3] : p.snap_s[4];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t i = opaque(rin[r] ? pr[r] : 0);
      const float xv = rin[r] ? ld_any(p.x.ptr, p.x.dtype, b * p.x.s[0] + t * p.x.s[1] + h * p.x.s[2] + i * p.x.s[3]) : 0.f;
      float dtp;
      if constexpr (kHeadDecay) {
        dtp = dtp_head;
      } else {
        const float dtv = rin[r] ? ld_any(p.dt.ptr, p.dt.dtype, b * p.dt.s[0] + t * p.dt.s[1] + h * p.dt.s[2] + i * p.dt.s[3]) : 0.f;
        dtp = ssu_dt(dtv, bias[r], p.dt_softplus);
      }
      const float dtx = dtp * xv;
      float acc = 0.f;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const int e0 = (c * ln + lane) * VN;
        float Bv[VN], Cv[VN];
#pragma unroll
        for (int k = 0; k < VN / 4; ++k) {
          const float4 bq = reinterpret_cast<const float4*>(smB + e0)[k];
          const float4 cq = reinterpret_cast<const float4*>(smC + e0)[k];
          Bv[4 * k] = bq.x, Bv[4 * k + 1] = bq.y, Bv[4 * k + 2] = bq.z, Bv[4 * k + 3] = bq.w;
          Cv[4 * k] = cq.x, Cv[4 * k + 1] = cq.y, Cv[4 * k + 2] = cq.z, Cv[4 * k + 3] = cq.w;
        }
#pragma unroll
        for (int v = 0; v < VN; ++v) {
          const int64_t n = e0 + v;
          if (rin[r] && n < N) {
            float dA;
            if constexpr (kHeadDecay) dA = dA_head;
            else dA = ssu_decay(dtp, ld_any(p.A.ptr, p.A.dtype, h * p.A.s[0] + i * p.A.s[1] + n * p.A.s[2]));
            s[r][c][v] = round_to<ST>(ssu_state(s[r][c][v], dA, Bv[v], dtx));
            acc = fmaf(s[r][c][v], Cv[v], acc);
          }
        }
      }
      // Lanes ln apart never mix: xor offsets < ln stay inside the row's lane group.
      for (int off = ln / 2; off >= 1; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
      if (rin[r] && lane == 0) {
        const float zv = p.z.ptr != nullptr ? ld_any(p.z.ptr, p.z.dtype, b * p.z.s[0] + t * p.z.s[1] + h * p.z.s[2] + i * p.z.s[3]) : 0.f;
        st_any(p.out, p.out_dtype, b * p.out_s[0] + t * p.out_s[1] + h * p.out_s[2] + i * p.out_s[3],
               ssu_out(acc, p.D.ptr != nullptr, dv[r], xv, p.z.ptr != nullptr, zv));
      }
      if (p.snap != nullptr) {
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          const int64_t n0 = (int64_t(c) * ln + lane) * VN;
          if (rin[r] && n0 < N) store_vec<ST, VN>(dst + i * dsp + n0 * dsn, vst, dsn, n0, N, s[r][c]);
        }
      }
    }
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// 16-byte accesses: unit stride along N, whole vectors per row, every row start aligned.
bool vec_ok(const void* ptr, int vn, int64_t N, const int64_t* strides, int nstrides, int64_t sn) {
  if (ptr == nullptr || sn != 1 || N % vn != 0 || !aligned16(ptr)) return false;
  for (int k = 0; k < nstrides; ++k)
    if (strides[k] % vn != 0) return false;
  return true;
}

template <typename ST, int NC, bool kHead, bool kSingle>
void launch(const SsuParams& p, int ln, cudaStream_t stream) {
  constexpr int VN = 16 / sizeof(ST);
  constexpr int R = rows_per_thread<NC, kSingle>();
  const int64_t rows_per_block = int64_t(R) * (kThreads / ln);
  const int64_t tiles = (p.dim + rows_per_block - 1) / rows_per_block;
  const int64_t blocks = p.batch * p.nheads * tiles;
  checked_grid(p.in_place ? "selective_state_update" : "selective_state_update_multi", "state update",
               {blocks}, "grid.x is batch * nheads * ceil(dim / rows per block): split the batch into smaller calls");
  const bool vs = vec_ok(p.state, VN, p.dstate, p.st_s, 3, p.st_s[3]);
  const bool vn = !p.in_place && vec_ok(p.snap, VN, p.dstate, p.snap_s, 4, p.snap_s[4]);
  const size_t smem = 2 * 2 * size_t(NC) * ln * VN * sizeof(float);
  ssu_kernel<ST, NC, kHead, kSingle><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(p, ln, tiles, vs, vn);
  NK_CUDA_LAUNCH_CHECK();
}

template <typename ST>
void dispatch_nc(const SsuParams& p, const SsuLayout& l, cudaStream_t stream) {
  auto go = [&]<int NC>() {
    const bool single = p.in_place;  // the one-token op (seqlen == 1)
    if (p.head_decay) {
      if (single) launch<ST, NC, true, true>(p, l.ln, stream);
      else launch<ST, NC, true, false>(p, l.ln, stream);
    } else {
      if (single) launch<ST, NC, false, true>(p, l.ln, stream);
      else launch<ST, NC, false, false>(p, l.ln, stream);
    }
  };
  if (l.nc <= 1) go.template operator()<1>();
  else if (l.nc <= 2) go.template operator()<2>();
  else if (l.nc <= 4) go.template operator()<4>();
  else throw std::runtime_error("nemokernels: selective_state_update: dstate too large for the CUDA kernel");
}

}  // namespace

void selective_state_update_cuda(const SsuParams& p, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const SsuLayout l = ssu_layout(p.dstate, p.state_dtype);
  switch (p.state_dtype) {
    case DType::F32: dispatch_nc<float>(p, l, stream); break;
    case DType::F16: dispatch_nc<__half>(p, l, stream); break;
    case DType::BF16: dispatch_nc<__nv_bfloat16>(p, l, stream); break;
  }
}

}  // namespace nk
