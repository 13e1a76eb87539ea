// NVFP4 quantize / dequantize (DESIGN.md 4.3): parameter structs shared by the op entry
// (quantize.cpp), the CPU kernels (quantize_cpu.cpp) and the CUDA kernels (quantize_cuda.cu).
// No torch types here.
//
// The op quantizes the rows of a 2-D strided view A (rows R, cols C, C % 16 == 0): element
// (r, c) at a[r * a_sr + c * a_sc]. quantize(x) passes x.reshape(-1, K); quantize_t(x) passes
// the view x.T (strides swapped, nothing copied), so the transposed operand is read in one
// pass straight from x.
//
// Per row r and 16-column block cb (the "1x16 block"), with H the optional Hadamard transform
// (numerics.cuh hadamard16, signs from the seed) applied to the 16 values first:
//   amax    = global_amax given ? *global_amax : max |H a| over the tensor
//   s_enc   = nvfp4_encode_scale(amax),   global_scale = 1 / s_enc
//   amax_b  = max |H a| over the block (1x16) or over the 16x16 tile (rows 16 tr .. 16 tr + 15
//             that exist, the same 16 columns) when block_2d
//   s_b     = nvfp4_block_scale(amax_b, s_enc)           scales[r, cb]
//   code    = e2m1(H a * nvfp4_block_inv(s_b, s_enc))    RNE, or stochastic with the Philox bits
//             of flat index r * C + c (nvfp4_sr_bits)
// Outputs: data (R, C/2) uint8 (column 2i in the low nibble of byte i), scales (R, C/16) uint8
// (E4M3 bytes; Python views them as float8_e4m3fn), global_scale () float32.
//
// CUDA: two launches. (1) amax: a fixed grid (at most kAmaxMaxPartials blocks) writes one
// partial max per block (skipped when global_amax is given); (2) quantize: every block first
// reduces the partials (or reads global_amax) into s_enc in its prologue, then quantizes its
// tiles; block 0 writes global_scale. Max is order-independent, so no atomics are needed and
// the result is deterministic. Non-finite input: the CPU path raises; the CUDA path cannot
// without a host sync, so it writes global_scale = NaN (every dequantized value NaN).
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace nk {

constexpr int kAmaxMaxPartials = 1024;

struct Nvfp4QuantParams {
  int64_t rows, cols;          // R, C (C % 16 == 0)
  DType dtype;                 // of a
  const void* a;               // element (r, c) at a + (r * a_sr + c * a_sc) elements
  int64_t a_sr, a_sc;
  bool block_2d, hadamard, stochastic;
  uint64_t seed;
  const int64_t* seed_ptr;     // 1 element on a's device (read there: no host sync), or null: seed
  const float* global_amax;    // 1 element on a's device, or null: computed
  float* partials;             // amax workspace (CUDA; kAmaxMaxPartials floats), or null
  uint8_t* data;               // (R, C/2) contiguous
  uint8_t* scales;             // (R, C/16) contiguous
  float* global_scale;         // 1 element
};

struct Nvfp4DequantParams {
  int64_t rows, cols;          // of the dequantized matrix
  const uint8_t* data;         // (R, C/2), row stride d_sr bytes, bytes contiguous
  int64_t d_sr;
  const uint8_t* scales;       // (R, C/16), row stride s_sr, contiguous within a row
  int64_t s_sr;
  const float* global_scale;   // 1 element
  DType dtype;                 // of out
  void* out;                   // (R, C) contiguous
};

// CPU: returns false when the input holds a non-finite value (the entry raises).
bool nvfp4_quantize_cpu(const Nvfp4QuantParams& p);
void nvfp4_dequantize_cpu(const Nvfp4DequantParams& p);

#ifdef NK_WITH_CUDA
void nvfp4_quantize_cuda(const Nvfp4QuantParams& p, void* stream);
void nvfp4_dequantize_cuda(const Nvfp4DequantParams& p, void* stream);
#endif

}  // namespace nk
