// Scalar numerics of the speculative-verification family, shared by the CPU and CUDA kernels
// so that both make bit-identical decisions: the argmax order (torch.argmax's), the
// acceptance test, the exponential-race keys of residual sampling and the Philox counters.
//
// Residual sampling (and the bonus token) use the exponential race, a one-pass Gumbel-max:
// with E_i = -log(u_i) ~ Exp(1) independent, argmin_i E_i / w_i is distributed as
// w / sum(w), so no normalisation pass is needed. u_i comes from Philox at a counter indexed
// by the vocab position, and log is computed by det_log below with only correctly rounded
// IEEE operations (explicit fmaf, no libm transcendental), so the CPU and the GPU compute the
// same keys bit for bit and pick the same token.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/macros.h"
#include "common/philox.h"

namespace nk {
namespace spec {

// Purpose tags: the fourth Philox counter word, so the streams never overlap.
enum : uint32_t {
  kTagAccept = 0x61636370u,      // acceptance uniform of (row, position)
  kTagResidual = 0x72657369u,    // race uniforms of (row, position), 4 vocab entries per draw
  kTagTreeAccept = 0x74616363u,  // acceptance uniform of (row, child node)
  kTagTreeResidual = 0x74726573u // race uniforms of (row, node), 4 vocab entries per draw
};

NK_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return b;
#endif
}
NK_HD float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, 4);
  return x;
#endif
}

// log(x) for a positive normal float, to about 1e-7 relative, from exact bit operations,
// one IEEE division and explicit fmaf: the same bits on host and device.
NK_HD float det_log(float x) {
  const uint32_t b = float_bits(x);
  int e = static_cast<int>((b >> 23) & 0xFFu) - 127;
  float m = bits_float((b & 0x7FFFFFu) | 0x3F800000u);  // [1, 2)
  if (m > 1.41421356f) {
    m = m * 0.5f;  // exact
    e += 1;
  }
  const float s = (m - 1.0f) / (m + 1.0f);  // log m = 2 atanh(s), |s| <= 0.172
  const float s2 = s * s;
  float poly = fmaf(s2, 1.0f / 11.0f, 1.0f / 9.0f);
  poly = fmaf(s2, poly, 1.0f / 7.0f);
  poly = fmaf(s2, poly, 1.0f / 5.0f);
  poly = fmaf(s2, poly, 1.0f / 3.0f);
  poly = fmaf(s2, poly, 1.0f);
  const float two_s = s + s;
  const float lm = two_s * poly;
  return fmaf(static_cast<float>(e), 0.693147180559945309f, lm);
}

// Acceptance uniform in [0, 1) of (row, slot), slot = draft position or child node.
NK_HD float accept_uniform(uint64_t seed, uint32_t tag, int64_t row, int64_t slot) {
  Philox4 r = philox4x32_10(0u, static_cast<uint32_t>(slot), static_cast<uint32_t>(row), tag, seed);
  return philox_uniform(r.v[0]);
}

// Accept draft token x with probability min(1, p(x) / q(x)): u * q < p, and always when
// p >= q (so p == q accepts even when u * q rounds up to q). q == 0 < p accepts; p == 0 rejects.
NK_HD bool accept_draft(float u, float p, float q) { return p >= q || u * q < p; }

// Race uniforms u in (0, 1] of four consecutive vocab entries 4*g .. 4*g+3 of (row, slot).
NK_HD void race_uniforms(uint64_t seed, uint32_t tag, int64_t row, int64_t slot, int64_t g, float (&u)[4]) {
  Philox4 r = philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(slot), static_cast<uint32_t>(row),
                            tag ^ static_cast<uint32_t>(static_cast<uint64_t>(g) >> 32), seed);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < 4; ++j) u[j] = philox_uniform_pos(r.v[j]);
}

// The exponential E = -log(u) of a race uniform.
NK_HD float race_expo(float u) { return -det_log(u); }

// Exponential-race keys of four consecutive vocab entries 4*g .. 4*g+3 of (row, slot).
NK_HD void race_exponentials(uint64_t seed, uint32_t tag, int64_t row, int64_t slot, int64_t g, float (&e)[4]) {
  float u[4];
  race_uniforms(seed, tag, row, slot, g, u);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int j = 0; j < 4; ++j) e[j] = race_expo(u[j]);
}

// The race key of one entry: smaller wins; weights <= 0 (or NaN) never enter.
NK_HD bool race_key(float expo, float w, float& key) {
  if (!(w > 0.0f)) return false;
  key = expo / w;
  return true;
}

// Screen of an entry with weight w > 0 and uniform u against a thread's best (k, ki): false
// only when its key fl(race_expo(u) / w) is surely above k, so it cannot win (equal keys go
// to the lower index, which the running best has). Proof: -log u >= 1 - u; race_expo is
// within 1e-6 relative of -log u; with 1 - u > 1.0001 * fl(k * w) the key exceeds k by more
// than its roundings (1 - u is 0 or >= 2^-24, so a denormal k * w changes nothing). Lets the
// GPU skip det_log and the division for all but a few entries; the winner is unchanged.
NK_HD bool race_may_win(float u, float w, float k, int64_t ki) {
  if (ki < 0) return true;
  return !(1.0f - u > (k * w) * 1.0001f);
}

// ---- total orders for the reductions (associative, so any reduction order gives the same
// winner). Index -1 means "no candidate".

// torch.argmax order: NaN is the largest value; ties go to the lowest index.
NK_HD bool argmax_better(float v1, int64_t i1, float v2, int64_t i2) {
  if (i2 < 0) return i1 >= 0;
  if (i1 < 0) return false;
  const bool n1 = v1 != v1, n2 = v2 != v2;
  if (n1 != n2) return n1;
  if (!n1 && v1 != v2) return v1 > v2;
  return i1 < i2;
}

// Race order: the smaller key wins; ties go to the lowest index.
NK_HD bool race_better(float k1, int64_t i1, float k2, int64_t i2) {
  if (i2 < 0) return i1 >= 0;
  if (i1 < 0) return false;
  if (k1 != k2) return k1 < k2;
  return i1 < i2;
}

NK_HD int64_t clamp_id(int64_t id, int64_t vocab) { return id < 0 ? 0 : (id >= vocab ? vocab - 1 : id); }

}  // namespace spec
}  // namespace nk
