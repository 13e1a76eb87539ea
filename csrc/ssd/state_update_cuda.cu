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
// Resident blocks per SM the register budget is sized for: 8 x 128 threads, at most 64
// registers a thread (docs/ssd.md, issue 18 section: bytes in flight per SM).
constexpr int kMinBlocks = 4;

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

// K values at base + off + i * step (i < K), 0 where n0 + i >= N: one dtype switch per group.
template <typename T, int K>
NK_DEVICE void ld_group(const void* base, int64_t off, int64_t step, int n0, int N, float (&v)[K]) {
  const T* q = static_cast<const T*>(base) + off;
#pragma unroll
  for (int i = 0; i < K; ++i) v[i] = n0 + i < N ? to_f<T>(q[i * step]) : 0.f;
}

template <int K>
NK_DEVICE void ld_group_any(const SsuArg& a, int64_t off, int64_t step, int n0, int N, float (&v)[K]) {
  switch (a.dtype) {
    case DType::F32: ld_group<float, K>(a.ptr, off, step, n0, N, v); break;
    case DType::F16: ld_group<__half, K>(a.ptr, off, step, n0, N, v); break;
    default: ld_group<__nv_bfloat16, K>(a.ptr, off, step, n0, N, v); break;
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

// The small operands of one token for one thread: B and C at its NC x VN state columns, x
// and z (and dt unless it is per head) at its R rows. All issued together, so a token costs
// one memory round trip; the next token's are issued before this token's stores.
template <int R, int NC, int VN, bool kHead>
struct TokenIn {
  float B[NC][VN], C[NC][VN];
  float x[R], z[R], dt[kHead ? 1 : R];
};

// Where a thread sits: batch entry b, head h, group g, its rows pr[r] (rin[r]: pr[r] < P) and
// its first column (lane * VN; vector c starts at (c * ln + lane) * VN).
template <int R>
struct Place {
  int64_t b, h, g, pr[R];
  bool rin[R];
  int lane, ln;
};

template <int R, int NC, int VN, bool kHead>
NK_DEVICE void load_token(const SsuParams& p, const Place<R>& w, int64_t t, TokenIn<R, NC, VN, kHead>& in) {
  const int N = static_cast<int>(p.dstate);
  const int64_t b = w.b, h = w.h;
  const int64_t bo = b * p.B.s[0] + t * p.B.s[1] + w.g * p.B.s[2];
  const int64_t co = b * p.C.s[0] + t * p.C.s[1] + w.g * p.C.s[2];
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    const int n0 = (c * w.ln + w.lane) * VN;
    ld_group_any<VN>(p.B, bo + n0 * p.B.s[3], p.B.s[3], n0, N, in.B[c]);
    ld_group_any<VN>(p.C, co + n0 * p.C.s[3], p.C.s[3], n0, N, in.C[c]);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t i = w.rin[r] ? w.pr[r] : 0;
    in.x[r] = ld_any(p.x.ptr, p.x.dtype, b * p.x.s[0] + t * p.x.s[1] + h * p.x.s[2] + i * p.x.s[3]);
    in.z[r] = p.z.ptr != nullptr ? ld_any(p.z.ptr, p.z.dtype, b * p.z.s[0] + t * p.z.s[1] + h * p.z.s[2] + i * p.z.s[3]) : 0.f;
    if (!kHead || r == 0)
      in.dt[r] = ld_any(p.dt.ptr, p.dt.dtype, b * p.dt.s[0] + t * p.dt.s[1] + h * p.dt.s[2] + i * p.dt.s[3]);
  }
}

template <typename ST, int NC, bool kHead, bool kSingle>
NK_DEVICE void ssu_entry(const SsuParams& p, Place<kVecsPerThread / NC>& w, bool vec_state, bool vec_snap) {
  constexpr int VN = 16 / sizeof(ST);
  constexpr int R = kVecsPerThread / NC;
  const int N = static_cast<int>(p.dstate);
  const int64_t b = w.b, h = w.h;
  const int lane = w.lane, ln = w.ln;
  const bool (&rin)[R] = w.rin;

  // Token 0's inputs go out first: they do not depend on the state row, so their latency
  // overlaps the index load and the state loads.
  TokenIn<R, NC, VN, kHead> in;
  load_token<R, NC, VN, kHead>(p, w, 0, in);

  const int64_t row = p.state_indices != nullptr ? p.state_indices[b] : b;
  if (row < 0 || row >= p.state_rows) {  // uniform over the block
    const int64_t rows_per_block = int64_t(R) * (kThreads / ln);
    const int64_t p0 = w.pr[0] - threadIdx.x / ln;
    const int64_t p1 = p0 + rows_per_block < p.dim ? p0 + rows_per_block : p.dim;
    fill_entry<ST>(p, b, h, p0, p1, row < 0 ? 0.f : __int_as_float(0x7fc00000));
    return;
  }

  // The state: R x NC independent 16-byte loads per thread, all issued before any math.
  const ST* const sbase = static_cast<const ST*>(p.state) + row * p.st_s[0] + h * p.st_s[1];
  uint4 s[R][NC];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int n0 = (c * ln + lane) * VN;
      s[r][c] = make_uint4(0u, 0u, 0u, 0u);
      if (w.rin[r] && n0 < N) s[r][c] = load_state<ST>(sbase + w.pr[r] * p.st_s[2] + n0 * p.st_s[3], vec_state, p.st_s[3], n0, N);
    }

  // Per-row parameters, constant over the tokens.
  float bias[R], dv[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t i = w.rin[r] ? w.pr[r] : 0;
    bias[r] = p.dt_bias.ptr != nullptr ? ld_any(p.dt_bias.ptr, p.dt_bias.dtype, h * p.dt_bias.s[0] + i * p.dt_bias.s[1]) : 0.f;
    dv[r] = p.D.ptr != nullptr ? ld_any(p.D.ptr, p.D.dtype, h * p.D.s[0] + i * p.D.s[1]) : 0.f;
  }
  const float a_head = kHead ? ld_any(p.A.ptr, p.A.dtype, h * p.A.s[0]) : 0.f;

  // Where the state after each token goes: the state row itself (single step) or snapshot t.
  ST* dst = p.in_place ? const_cast<ST*>(sbase)
                       : (p.snap != nullptr ? static_cast<ST*>(p.snap) + b * p.snap_s[0] + h * p.snap_s[2] : nullptr);
  const int64_t dsp = p.in_place ? p.st_s[2] : p.snap_s[3];
  const int64_t dsn = p.in_place ? p.st_s[3] : p.snap_s[4];
  const int64_t dst_t = p.in_place ? 0 : p.snap_s[1];
  const bool vst = p.in_place ? vec_state : vec_snap;

  const int64_t T = kSingle ? 1 : p.seqlen;
#pragma unroll 1
  for (int64_t t = 0; t < T; ++t) {
    float dtp[R], dA_head = 0.f;
    if constexpr (kHead) {
      dtp[0] = ssu_dt(in.dt[0], bias[0], p.dt_softplus);
      dA_head = ssu_decay(dtp[0], a_head);
#pragma unroll
      for (int r = 1; r < R; ++r) dtp[r] = dtp[0];
    } else {
#pragma unroll
      for (int r = 0; r < R; ++r) dtp[r] = ssu_dt(in.dt[r], bias[r], p.dt_softplus);
    }
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      [[maybe_unused]] const int64_t i = rin[r] ? w.pr[r] : 0;
      const float dtx = dtp[r] * in.x[r];
      acc[r] = 0.f;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        ST* e = elems<ST>(s[r][c]);
#pragma unroll
        for (int v = 0; v < VN; ++v) {
          const int n = (c * ln + lane) * VN + v;
          if (rin[r] && n < N) {
            float dA;
            if constexpr (kHead) dA = dA_head;
            else dA = ssu_decay(dtp[r], ld_any(p.A.ptr, p.A.dtype, h * p.A.s[0] + i * p.A.s[1] + n * p.A.s[2]));
            e[v] = from_f<ST>(ssu_state(to_f<ST>(e[v]), dA, in.B[c][v], dtx));
            acc[r] = fmaf(to_f<ST>(e[v]), in.C[c][v], acc[r]);
          }
        }
      }
    }
    // Lanes ln apart never mix: xor offsets < ln stay inside the row's lane group. The R
    // rows' butterflies interleave (independent shuffles in flight).
    for (int off = ln / 2; off >= 1; off >>= 1)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
    float o[R];
#pragma unroll
    for (int r = 0; r < R; ++r) o[r] = ssu_out(acc[r], p.D.ptr != nullptr, dv[r], in.x[r], p.z.ptr != nullptr, in.z[r]);
    if (!kSingle && t + 1 < T) load_token<R, NC, VN, kHead>(p, w, t + 1, in);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (!w.rin[r]) continue;
      const int64_t i = w.pr[r];
      if (lane == 0) st_any(p.out, p.out_dtype, b * p.out_s[0] + t * p.out_s[1] + h * p.out_s[2] + i * p.out_s[3], o[r]);
      if (dst != nullptr) {
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          const int n0 = (c * ln + lane) * VN;
          if (n0 < N) store_state<ST>(dst + i * dsp + n0 * dsn, vst, dsn, n0, N, s[r][c]);
        }
      }
    }
    if (dst != nullptr) dst += dst_t;
  }
}

// One block: R * (128 / ln) consecutive rows of one head, for the batch entries
// blockIdx.y, blockIdx.y + gridDim.y, ... (grid.y is at most 65535).
template <typename ST, int NC, bool kHead, bool kSingle>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
ssu_kernel(SsuParams p, int ln, unsigned tiles, bool vec_state, bool vec_snap) {
  constexpr int R = kVecsPerThread / NC;
  Place<R> w;
  const unsigned hh = blockIdx.x / tiles, tile = blockIdx.x - hh * tiles;
  w.h = hh;
  w.g = hh / static_cast<unsigned>(p.heads_per_group);
  w.ln = ln;
  w.lane = threadIdx.x & (ln - 1);
  const int rows_per_pass = kThreads / ln;
  const int64_t p_first = int64_t(tile) * (R * rows_per_pass) + threadIdx.x / ln;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    w.pr[r] = p_first + r * rows_per_pass;
    w.rin[r] = w.pr[r] < p.dim;
  }
  for (int64_t b = blockIdx.y; b < p.batch; b += gridDim.y) {
    w.b = b;
    ssu_entry<ST, NC, kHead, kSingle>(p, w, vec_state, vec_snap);
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
  constexpr int R = kVecsPerThread / NC;
  const int64_t rows_per_block = int64_t(R) * (kThreads / ln);
  const int64_t tiles = (p.dim + rows_per_block - 1) / rows_per_block;
  const char* op = p.in_place ? "selective_state_update" : "selective_state_update_multi";
  const LaunchGrid grid = checked_grid(op, "state update", {tiles * p.nheads, p.batch < kCudaMaxGridYZ ? p.batch : kCudaMaxGridYZ},
                                       "grid.x is nheads * ceil(dim / rows per block): split the heads into smaller calls");
  const bool vs = vec_ok(p.state, VN, p.dstate, p.st_s, 3, p.st_s[3]);
  const bool vn = !p.in_place && vec_ok(p.snap, VN, p.dstate, p.snap_s, 4, p.snap_s[4]);
  ssu_kernel<ST, NC, kHead, kSingle><<<dim3(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y)), kThreads, 0, stream>>>(
      p, ln, static_cast<unsigned>(tiles), vs, vn);
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
