// Scalar numerics of the SSD family, shared by the CPU and CUDA kernels so that a CPU
// test pins the arithmetic the GPU runs: the same operation order and explicit FMAs.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/macros.h"
#include "common/philox.h"

namespace nk {

NK_HD float silu(float v) { return v / (1.0f + expf(-v)); }

// d silu(v) / dv = s * (1 + v * (1 - s)), s = sigmoid(v)
NK_HD float silu_grad(float v) {
  float s = 1.0f / (1.0f + expf(-v));
  return s * (1.0f + v * (1.0f - s));
}

// One output of the causal conv: bias + sum_k w[k] * win[k], FMAs in k order. The caller
// zeroes window entries that belong to another packed sequence (seq_idx) or lie before t=0.
template <int W>
NK_HD float conv_window(const float (&w)[W], const float (&win)[W], float bias) {
  float acc = bias;
#pragma unroll
  for (int k = 0; k < W; ++k) acc = fmaf(w[k], win[k], acc);
  return acc;
}

// softplus as torch computes it (threshold 20: above it, the input itself).
NK_HD float softplus(float v) { return v > 20.0f ? v : log1pf(expf(v)); }
NK_HD float softplus_grad(float v) { return v > 20.0f ? 1.0f : 1.0f / (1.0f + expf(-v)); }

// SSD dt' = clamp(softplus?(dt + bias), lo, hi); the bias is 0 when absent.
NK_HD float ssd_dt(float dt, float bias, bool use_softplus, float lo, float hi) {
  float v = dt + bias;
  if (use_softplus) v = softplus(v);
  return fminf(fmaxf(v, lo), hi);
}

// d dt' / d dt, matching torch's autograd of the same expression: clamp passes the gradient
// where lo <= v <= hi (inclusive), softplus multiplies by sigmoid (1 above the threshold).
NK_HD float ssd_dt_grad(float dt, float bias, bool use_softplus, float lo, float hi) {
  float pre = dt + bias;
  float v = use_softplus ? softplus(pre) : pre;
  if (v < lo || v > hi) return 0.0f;
  return use_softplus ? softplus_grad(pre) : 1.0f;
}

// ---- gated RMSNorm (rmsnorm_gated.h) ----------------------------------------------------
// One exponential per element: the gate's silu(z) and silu'(z) share s = sigmoid(z). On the GPU
// with the fast exp2 and reciprocal (MUFU.EX2 / MUFU.RCP, a few ulp: the IEEE expf and
// division made the memory-bound norm ALU-bound, docs/ssd.md issue 18 section).

struct SiluPair {
  float f, df;  // silu(z) = z s, silu'(z) = s (1 + z (1 - s))
};
NK_HD SiluPair silu_pair(float z) {
#ifdef __CUDA_ARCH__
  const float s = __fdividef(1.0f, 1.0f + __expf(-z));
#else
  const float s = 1.0f / (1.0f + expf(-z));
#endif
  return {z * s, s * (1.0f + z * (1.0f - s))};
}

// rstd of one group from the sum of squares of its n inputs.
NK_HD float rmsnorm_rstd(float sumsq, float n, float eps) { return 1.0f / sqrtf(sumsq / n + eps); }

// y = xhat * w + b (b = 0 without bias).
NK_HD float rmsnorm_affine(float xhat, float w, float b) { return fmaf(xhat, w, b); }

// Norm input of one element: x * silu(z) when the gate comes first, else x.
NK_HD float rmsnorm_input(float x, float z, bool gate_first) { return gate_first ? x * silu_pair(z).f : x; }

// Output gate of one element: silu(z) when the gate comes last, else 1.
NK_HD float rmsnorm_out_gate(float z, bool gate_last) { return gate_last ? silu_pair(z).f : 1.0f; }

// Forward output of one element from its norm input u and output gate.
NK_HD float rmsnorm_output(float u, float rstd, float w, float b, float gate) {
  return rmsnorm_affine(u * rstd, w, b) * gate;
}

// Backward, first pass over a group, one element with upstream gradient g: xhat; dy, the
// gradient reaching y = xhat * w + b (dweight += dy * xhat, dbias += dy); dz when the gate
// comes last (final here: it needs no group mean); and the coefficients of the second pass,
// dx = du * ca and (gate first) dz = du * cb, du = d(norm input) = rmsnorm_du(...).
struct RmsNormBwdElem {
  float xhat, dy, dz, ca, cb;
};
NK_HD RmsNormBwdElem rmsnorm_bwd_elem(float x, float z, float g, float rstd, float w, float b,
                                      bool gate_first, bool gate_last) {
  RmsNormBwdElem e{x * rstd, g, 0.0f, 1.0f, 0.0f};
  if (gate_first) {
    const SiluPair s = silu_pair(z);
    e.xhat = x * s.f * rstd;  // the forward's rmsnorm_input(x, z, true) * rstd
    e.ca = s.f;
    e.cb = x * s.df;
  } else if (gate_last) {
    const SiluPair s = silu_pair(z);
    e.dy = g * s.f;
    e.dz = g * rmsnorm_affine(e.xhat, w, b) * s.df;
  }
  return e;
}

// du = d(norm input) = rstd * (dxhat - xhat * m), dxhat = dy * w, m = mean over the group of
// dxhat * xhat.
NK_HD float rmsnorm_du(float dxhat, float xhat, float m, float rstd) { return rstd * fmaf(-xhat, m, dxhat); }

}  // namespace nk

// ---- decode state update (state_update.h) ------------------------------------------------
namespace nk {

// dt' of selective_state_update: softplus?(dt + dt_bias). Unlike the chunked scan there is
// no clamp (mamba_ssm's decode step has none), so a NaN dt propagates.
NK_HD float ssu_dt(float dt, float bias, bool use_softplus) {
  float v = dt + bias;
  return use_softplus ? softplus(v) : v;
}

NK_HD float ssu_decay(float dtp, float a) { return expf(dtp * a); }

// One state element: s * exp(dt' A) + B * (dt' x).
NK_HD float ssu_state(float s, float dA, float b, float dtx) { return fmaf(s, dA, b * dtx); }

// The output of a row from its dot product sum_n s[n] C[n]: (acc + D x) * silu(z).
NK_HD float ssu_out(float acc, bool has_d, float d, float x, bool has_z, float z) {
  float y = has_d ? fmaf(d, x, acc) : acc;
  return has_z ? y * silu(z) : y;
}

// Whether token t lies on the path from the root to node `last` of a draft tree whose
// parents precede their children. A parent that does not precede its child ends the walk
// (t is then off the path): memory-safe for any values.
NK_HD bool ssu_on_path(const int32_t* parents, int64_t last, int64_t t) {
  int64_t cur = last;
  while (cur > t) {
    const int64_t q = parents[cur];
    if (q >= cur) return false;
    cur = q;
  }
  return cur == t;
}

// ---- stochastic rounding of a 16-bit state (issue 20) ------------------------------------
// A float32 value v lies between two neighbours lo <= |v| < hi of the 16-bit format; the
// result is hi with probability (|v| - lo) / (hi - lo), from 32 random bits r, so E[result] = v
// and tiny updates survive in expectation instead of being rounded away at every step.
// Both functions return a float exactly representable in the target format (the conversion
// after them is exact). NaN and infinities pass through.

NK_HD uint32_t ssu_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
}
NK_HD float ssu_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// bfloat16 keeps the top 16 bits of the float32 pattern: adding r's low 16 bits to the
// dropped half carries into the kept part with probability (dropped bits) / 2^16, which is
// exactly (|v| - lo) / (hi - lo) (the pattern is linear in |v| between neighbours, also
// across a binade and into subnormals). Above bf16's largest finite value it may round to inf,
// as round-to-nearest does from halfway.
NK_HD float sr_bf16(float v, uint32_t r) {
  const uint32_t u = ssu_bits(v);
  if ((u & 0x7f800000u) == 0x7f800000u) return v;  // inf, NaN
  return ssu_float((u + (r & 0xffffu)) & 0xffff0000u);
}

// float16: in its normal range (2^-14 <= |v| <= 65504) the same carry trick on the 13 bits
// float32 has beyond float16's 10; below 2^-14 the step is 2^-24 and the probability comes
// from the 24-bit uniform of r (exact when |v| * 2^24 has at most 24 significant bits below
// its integer part, i.e. |v| >= 2^-48). Above 65504, round to nearest (the conversion's).
NK_HD float sr_f16(float v, uint32_t r) {
  const float a = fabsf(v);
  if (!(a <= 65504.0f)) return v;  // NaN, inf, out of range: the conversion rounds
  if (a >= 6.103515625e-05f) return ssu_float((ssu_bits(v) + (r & 0x1fffu)) & 0xffffe000u);
  const float f = a * 16777216.0f;  // in steps of 2^-24 (exact)
  const float fl = floorf(f);
  const float u = static_cast<float>(r >> 8) * (1.0f / 16777216.0f);
  return copysignf((fl + (u < f - fl ? 1.0f : 0.0f)) * 5.9604644775390625e-08f, v);
}

// Random bits of the state rounding: Philox4x32-10 keyed by the seed, one call per four
// consecutive state elements of one row, the counter the element's logical coordinates: state
// row (slot), i = h * P + p, n / 4, token t (multi-token position or tree node; 0 for the
// single step). So bits do not depend on the batch order or the launch configuration.
constexpr uint32_t kTagStateRound = 0x53535552u;  // "SSUR"
NK_HD Philox4 ssu_sr_group(uint64_t seed, int64_t row, int64_t i, int64_t n4, int64_t t) {
  return philox4x32_10(static_cast<uint32_t>(i), static_cast<uint32_t>(n4) | (static_cast<uint32_t>(t) << 16),
                       static_cast<uint32_t>(row), kTagStateRound, seed);
}

}  // namespace nk
