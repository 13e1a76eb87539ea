// NVFP4 quantize / dequantize (docs/design.md section 4.3): parameter structs shared by the op entry
// (quantize.cpp), the CPU kernels (quantize_cpu.cpp) and the CUDA kernels (quantize_cuda.cu).
// No torch types here.
//
// The op quantizes the rows of a 2-D strided view A (rows R, cols C, C % 16 == 0): element
// (r, c) at a[r * a_sr + c * a_sc]. quantize(x) passes x.reshape(-1, K); quantize_t(x) passes
// the view x.T (strides swapped, nothing copied), so the transposed operand is read in one
// pass straight from x.
// Details: docs/nvfp4.md, section `csrc/nvfp4/quantize.h`.
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
  const float* global_scale;   // 1 element, or null: 1 (out = e2m1 x e4m3 exactly)
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
