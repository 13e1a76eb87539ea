// Emulated __half (tools/cuda_emu): IEEE binary16 bits, float conversions round to nearest even.
#pragma once
#include "cuda_runtime.h"

struct __half {
  uint16_t bits;
};
inline float __half2float(__half h) {
  const uint32_t s = uint32_t(h.bits & 0x8000u) << 16;
  uint32_t e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu, u;
  if (e == 0x1f) {
    u = s | 0x7f800000u | (m << 13);
  } else if (e == 0) {
    if (m == 0) {
      u = s;
    } else {  // subnormal: normalise
      int sh = 0;
      while ((m & 0x400u) == 0) { m <<= 1; ++sh; }
      u = s | (uint32_t(127 - 15 + 1 - sh) << 23) | ((m & 0x3ffu) << 13);
    }
  } else {
    u = s | ((e + 127 - 15) << 23) | (m << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __half __float2half_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t s = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return {static_cast<uint16_t>(s | 0x7e00u)};  // NaN
  if (a >= 0x477ff000u) return {static_cast<uint16_t>(s | 0x7c00u)};  // >= 65520 rounds to inf
  if (a < 0x38800000u) {  // below the smallest normal half (2^-14): subnormal or zero
    if (a < 0x33000000u) return {s};  // < 2^-25 (half of the smallest subnormal): 0
    const uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    const int shift = 126 - static_cast<int>(e);  // 14 + (127 - 1 - e) + ... : m >> shift = subnormal mantissa
    const uint32_t q = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    const uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    return {static_cast<uint16_t>(s | r)};
  }
  const uint32_t q = (a - 0x38000000u) >> 13;  // rebias 127 -> 15, keep 10 mantissa bits
  const uint32_t rem = a & 0x1fffu;
  const uint32_t r = q + ((rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ? 1u : 0u);
  return {static_cast<uint16_t>(s | r)};
}
inline __half __float2half(float f) { return __float2half_rn(f); }
