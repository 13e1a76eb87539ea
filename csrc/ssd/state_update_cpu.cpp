// CPU kernel of the decode state updates (math and decomposition in state_update.h). One
// task per (batch, head); each state row is loaded once into float32, advanced through the
// T steps, and its dot product with C is formed lane by lane and combined by the same xor
// butterfly as the CUDA kernel's warp shuffles, so both paths add in the same order.
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/check.h"
#include "ssd/numerics.cuh"
#include "ssd/state_update.h"

namespace nk {
namespace {

inline float ld(const void* base, DType dt, int64_t off) {
  switch (dt) {
    case DType::F32: return static_cast<const float*>(base)[off];
    case DType::F16: return static_cast<float>(static_cast<const c10::Half*>(base)[off]);
    case DType::BF16: return static_cast<float>(static_cast<const c10::BFloat16*>(base)[off]);
  }
  return 0.f;
}

inline void st(void* base, DType dt, int64_t off, float v) {
  switch (dt) {
    case DType::F32: static_cast<float*>(base)[off] = v; break;
    case DType::F16: static_cast<c10::Half*>(base)[off] = c10::Half(v); break;
    case DType::BF16: static_cast<c10::BFloat16*>(base)[off] = c10::BFloat16(v); break;
  }
}

// The value the state dtype stores for v (round to nearest even).
inline float round_to(DType dt, float v) {
  switch (dt) {
    case DType::F32: return v;
    case DType::F16: return static_cast<float>(c10::Half(v));
    case DType::BF16: return static_cast<float>(c10::BFloat16(v));
  }
  return v;
}

// The value the 16-bit state dtype stores for v under stochastic rounding with bits r.
inline float round_sr(DType dt, float v, uint32_t r) {
  return dt == DType::BF16 ? sr_bf16(v, r) : dt == DType::F16 ? sr_f16(v, r) : v;
}

}  // namespace

void selective_state_update_cpu(const SsuParams& p) {
  const SsuLayout lay = ssu_layout(p.dstate, p.state_dtype);
  const int64_t N = p.dstate, T = p.seqlen;
  const float kNaN = std::numeric_limits<float>::quiet_NaN();
  torch::stable::parallel_for(0, p.batch * p.nheads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(N), Bf(T * N), Cf(T * N), part(lay.ln), tmp(lay.ln);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.nheads, h = bh % p.nheads, g = h / p.heads_per_group;
      const int64_t row = p.state_indices ? p.state_indices[b] : b;
      const bool pad = row < 0, bad = row >= p.state_rows;
      // A replay applies the tokens up to `last` in place; otherwise every token runs.
      const bool replay = p.replay_to != nullptr;
      const int64_t last = replay ? std::clamp<int64_t>(p.replay_to[b], -1, T - 1) : T - 1;
      if (pad || bad) {
        // Padded slot: zeros; out-of-range slot: NaN. The state is never touched.
        const float fill = pad ? 0.f : kNaN;
        for (int64_t t = 0; t < T && p.out != nullptr; ++t)
          for (int64_t i = 0; i < p.dim; ++i) {
            st(p.out, p.out_dtype, b * p.out_s[0] + t * p.out_s[1] + h * p.out_s[2] + i * p.out_s[3], fill);
            if (p.snap && !p.in_place)
              for (int64_t n = 0; n < N; ++n)
                st(p.snap, p.state_dtype,
                   b * p.snap_s[0] + t * p.snap_s[1] + h * p.snap_s[2] + i * p.snap_s[3] + n * p.snap_s[4], fill);
          }
        continue;
      }
      for (int64_t t = 0; t < T; ++t)
        for (int64_t n = 0; n < N; ++n) {
          Bf[t * N + n] = ld(p.B.ptr, p.B.dtype, b * p.B.s[0] + t * p.B.s[1] + g * p.B.s[2] + n * p.B.s[3]);
          Cf[t * N + n] = ld(p.C.ptr, p.C.dtype, b * p.C.s[0] + t * p.C.s[1] + g * p.C.s[2] + n * p.C.s[3]);
        }
      const int64_t soff = row * p.st_s[0] + h * p.st_s[1];
      for (int64_t i = 0; i < p.dim; ++i) {
        for (int64_t n = 0; n < N; ++n) s[n] = ld(p.state, p.state_dtype, soff + i * p.st_s[2] + n * p.st_s[3]);
        const float bias = p.dt_bias.ptr ? ld(p.dt_bias.ptr, p.dt_bias.dtype, h * p.dt_bias.s[0] + i * p.dt_bias.s[1]) : 0.f;
        const float d = p.D.ptr ? ld(p.D.ptr, p.D.dtype, h * p.D.s[0] + i * p.D.s[1]) : 0.f;
        for (int64_t t = 0; t <= last; ++t) {
          if (replay && p.parents != nullptr && !ssu_on_path(p.parents + b * T, last, t)) continue;
          if (!replay && p.parents != nullptr && t > 0) {  // a tree: start from the parent's state
            const int64_t q = p.parents[b * T + t];
            if (q < 0) {
              for (int64_t n = 0; n < N; ++n) s[n] = ld(p.state, p.state_dtype, soff + i * p.st_s[2] + n * p.st_s[3]);
            } else if (q != t - 1) {
              for (int64_t n = 0; n < N; ++n)
                s[n] = ld(p.snap, p.state_dtype,
                          b * p.snap_s[0] + q * p.snap_s[1] + h * p.snap_s[2] + i * p.snap_s[3] + n * p.snap_s[4]);
            }
          }
          const float xv = ld(p.x.ptr, p.x.dtype, b * p.x.s[0] + t * p.x.s[1] + h * p.x.s[2] + i * p.x.s[3]);
          const float dtv = ld(p.dt.ptr, p.dt.dtype, b * p.dt.s[0] + t * p.dt.s[1] + h * p.dt.s[2] + i * p.dt.s[3]);
          const float dtp = ssu_dt(dtv, bias, p.dt_softplus);
          const float dtx = dtp * xv;
          const float dA_head = p.head_decay ? ssu_decay(dtp, ld(p.A.ptr, p.A.dtype, h * p.A.s[0])) : 0.f;
          const float* Bt = &Bf[t * N];
          const float* Ct = &Cf[t * N];
          for (int l = 0; l < lay.ln; ++l) {
            float acc = 0.f;
            Philox4 rq{};  // stochastic rounding bits of the current 4 elements (vn is a multiple of 4)
            for (int c = 0; c < lay.nc; ++c)
              for (int v = 0; v < lay.vn; ++v) {
                const int64_t n = (int64_t(c) * lay.ln + l) * lay.vn + v;
                if (n >= N) continue;
                const float dA = p.head_decay
                                     ? dA_head
                                     : ssu_decay(dtp, ld(p.A.ptr, p.A.dtype, h * p.A.s[0] + i * p.A.s[1] + n * p.A.s[2]));
                const float val = ssu_state(s[n], dA, Bt[n], dtx);
                if (p.sr_seed != nullptr && (n & 3) == 0)  // one Philox call per 4 elements, as on CUDA
                  rq = ssu_sr_group(*p.sr_seed, row, h * p.dim + i, n >> 2, t);
                s[n] = p.sr_seed == nullptr ? round_to(p.state_dtype, val) : round_sr(p.state_dtype, val, rq.v[n & 3]);
                acc = fmaf(s[n], Ct[n], acc);
              }
            part[l] = acc;
          }
          for (int off = lay.ln / 2; off >= 1; off /= 2) {
            for (int l = 0; l < lay.ln; ++l) tmp[l] = part[l] + part[l ^ off];
            part.swap(tmp);
          }
          const float zv = p.z.ptr ? ld(p.z.ptr, p.z.dtype, b * p.z.s[0] + t * p.z.s[1] + h * p.z.s[2] + i * p.z.s[3]) : 0.f;
          if (p.out != nullptr)
            st(p.out, p.out_dtype, b * p.out_s[0] + t * p.out_s[1] + h * p.out_s[2] + i * p.out_s[3],
               ssu_out(part[0], p.D.ptr != nullptr, d, xv, p.z.ptr != nullptr, zv));
          if (p.snap && !p.in_place)
            for (int64_t n = 0; n < N; ++n)
              st(p.snap, p.state_dtype,
                 b * p.snap_s[0] + t * p.snap_s[1] + h * p.snap_s[2] + i * p.snap_s[3] + n * p.snap_s[4], s[n]);
        }
        if (p.in_place && last >= 0)
          for (int64_t n = 0; n < N; ++n) st(p.state, p.state_dtype, soff + i * p.st_s[2] + n * p.st_s[3], s[n]);
      }
    }
  });
}

}  // namespace nk
