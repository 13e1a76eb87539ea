// NVFP4 scalar numerics shared by the CPU and CUDA kernels (DESIGN.md section 4.3).
// E2M1 codes: bit 3 sign, bits 2..0 index into {0, .5, 1, 1.5, 2, 3, 4, 6}. Element 2i of a row
// sits in the low nibble of byte i. Block scales are float8 E4M3 (fn: no infinities, 0x7f/0xff NaN).
// Encoders (round-to-nearest-even, stochastic rounding) live beside these decoders.
#pragma once
#include <cstdint>
#include <limits>

#include "common/macros.h"

namespace nk::nvfp4 {

constexpr int kBlock = 16;            // elements per block scale
constexpr float kE2M1Max = 6.0f;
constexpr float kE4M3Max = 448.0f;

// Value of a 4-bit E2M1 code.
NK_HD float e2m1_decode(uint8_t code) {
  const uint8_t mag = code & 0x7;
  // 0, .5, 1, 1.5 are subnormal/low; 2, 3, 4, 6 have exponents 1..2 (bias 1).
  const float v = mag < 4 ? 0.5f * float(mag) : float(1 << ((mag >> 1) - 1)) * (1.0f + 0.5f * float(mag & 1));
  return (code & 0x8) ? -v : v;
}

// Value of a float8 E4M3 (fn) byte: 1 sign, 4 exponent (bias 7), 3 mantissa bits.
NK_HD float e4m3_decode(uint8_t b) {
  const int exp = (b >> 3) & 0xf, man = b & 0x7;
  float v;
  if (exp == 0xf && man == 0x7) {
    v = std::numeric_limits<float>::quiet_NaN();
  } else if (exp == 0) {
    v = float(man) * (1.0f / 512.0f);  // subnormal: man * 2^-9
  } else {
    v = (1.0f + float(man) * 0.125f) * float(1u << exp) * (1.0f / 128.0f);  // 2^(exp-7), exact
  }
  return (b & 0x80) ? -v : v;
}

}  // namespace nk::nvfp4
