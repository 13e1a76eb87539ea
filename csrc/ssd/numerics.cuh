// Scalar numerics of the SSD family, shared by the CPU and CUDA kernels so that a CPU
// test pins the arithmetic the GPU runs: the same operation order and explicit FMAs.
#pragma once

#include <cmath>

#include "common/macros.h"

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

}  // namespace nk
