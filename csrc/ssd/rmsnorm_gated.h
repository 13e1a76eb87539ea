// Gated RMSNorm of the Mamba-2 mixer (mamba_ssm's layernorm_gated.rmsnorm_fn), forward and
// backward. Parameter structs shared by the op entry (rmsnorm_gated.cpp), the CPU kernels
// (rmsnorm_gated_cpu.cpp) and the CUDA kernels (rmsnorm_gated_cuda.cu). No torch types here.
// Details: docs/ssd.md, section `csrc/ssd/rmsnorm_gated.h`.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace nk {

// Rows per CPU task of the backward (one partial-sum row per task).
constexpr int64_t kRmsNormCpuRowChunk = 32;

struct RmsNormFwdParams {
  int64_t rows, dim, group_size;   // dim % group_size == 0
  DType dtype;                     // of x, z and out
  float eps;
  bool norm_before_gate;
  const void* x;                   // (rows, dim): element (r, c) at r * x_sr + c * x_sc
  int64_t x_sr, x_sc;
  const void* z;                   // like x, or null
  int64_t z_sr, z_sc;
  const void* weight;              // (dim,) contiguous, weight_dtype (read as float32)
  const void* bias;                // (dim,) contiguous, bias_dtype, or null
  DType weight_dtype, bias_dtype;  // their own dtypes: no float32 copy per call
  void* out;                       // (rows, dim) contiguous
  float* rstd;                     // (rows, ngroups) contiguous float32
};

struct RmsNormBwdParams {
  RmsNormFwdParams fwd;            // inputs as in the forward (out unused; rstd read)
  const void* dout;                // (rows, dim), any strides
  int64_t dout_sr, dout_sc;
  void* dx;                        // (rows, dim) contiguous, x's dtype
  void* dz;                        // (rows, dim) contiguous, x's dtype, or null (no z)
  float* partials;                 // (num_partials, 2, dim) float32
  int64_t num_partials;
  void* dweight;                   // (dim,) weight_dtype (summed in float32, rounded once)
  void* dbias;                     // (dim,) bias_dtype, or null
};

void rmsnorm_gated_fwd_cpu(const RmsNormFwdParams& p);
void rmsnorm_gated_bwd_cpu(const RmsNormBwdParams& q);

#ifdef NK_WITH_CUDA
// Number of partial-sum rows the CUDA backward writes for this problem.
int64_t rmsnorm_gated_bwd_cuda_num_partials(const RmsNormBwdParams& q);
void rmsnorm_gated_fwd_cuda(const RmsNormFwdParams& p, void* stream);
void rmsnorm_gated_bwd_cuda(const RmsNormBwdParams& q, void* stream);
#endif

}  // namespace nk
