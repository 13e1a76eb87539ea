// Causal depthwise conv1d (the Mamba-2 mixer's short conv), forward, backward and the
// decode-step update. Parameter structs shared by the op entry (causal_conv1d.cpp), the CPU
// kernels (causal_conv1d_cpu.cpp) and the CUDA kernels (causal_conv1d_cuda.cu). No torch
// types here, so the CUDA translation unit compiles without torch headers.
// Details: docs/ssd.md, section `csrc/ssd/causal_conv1d.h`.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace nk {

// Time steps per partial-sum row of the CPU backward (the CUDA backward has one row per time
// split of its grid, csrc/ssd/launch_limits.h).
constexpr int kConvBwdChunk = 64;

struct Conv1dFwdParams {
  int64_t batch, dim, seqlen;
  int width;
  DType dtype;           // of x, out, initial and final states
  bool silu;
  const void* x;         // (batch, dim, seqlen), any strides
  int64_t x_sb, x_sc, x_st;
  // weight (dim, width) and bias (dim,) in their own float dtype and strides, read where they
  // lie (no per-call float32 copy).
  const void* weight;
  DType w_dtype;
  int64_t w_sc, w_sk;
  const void* bias;      // or null
  DType b_dtype;
  int64_t b_s;
  const int32_t* seq_idx;  // (batch, seqlen), or null
  int64_t seq_sb, seq_st;
  const void* init;      // (batch, dim, width-1), or null
  int64_t init_sb, init_sc, init_sj;
  void* out;             // (batch, dim, seqlen)
  int64_t out_sb, out_sc, out_st;
  void* final_states;    // (batch, dim, width-1), or null
  int64_t fin_sb, fin_sc, fin_sj;
};

struct Conv1dBwdParams {
  Conv1dFwdParams fwd;   // inputs as in the forward (out/final_states unused)
  const void* dout;      // (batch, dim, seqlen), any strides
  int64_t dout_sb, dout_sc, dout_st;
  const void* dfinal;    // (batch, dim, width-1), or null
  int64_t dfin_sb, dfin_sc, dfin_sj;
  void* dx;              // (batch, dim, seqlen)
  int64_t dx_sb, dx_sc, dx_st;
  void* dinit;           // (batch, dim, width-1) in x's dtype, or null
  int64_t dinit_sb, dinit_sc, dinit_sj;
  // Deterministic weight/bias gradients: partial sums per (batch, time chunk) land in
  // `partials` (num_partials, dim, width+1) float32, then are summed in a fixed order.
  float* partials;
  int64_t num_partials;
  void* dweight;         // (dim, width) contiguous, in the weight's dtype
  void* dbias;           // (dim,) in the bias's dtype, or null
};

struct Conv1dUpdateParams {
  int64_t batch, dim, seqlen, state_len;
  int width;
  DType dtype;
  bool silu;
  const void* x;         // (batch, dim, seqlen)
  int64_t x_sb, x_sc, x_st;
  void* conv_state;      // (state_batch, dim, state_len), updated in place
  int64_t st_sb, st_sc, st_sj;
  int64_t state_batch;
  const int32_t* state_indices;  // (batch,), or null; negative = padded slot (skipped)
  const void* weight;    // as in Conv1dFwdParams
  DType w_dtype;
  int64_t w_sc, w_sk;
  const void* bias;
  DType b_dtype;
  int64_t b_s;
  void* out;             // (batch, dim, seqlen)
  int64_t out_sb, out_sc, out_st;
  // Tree drafts: (batch, seqlen) contiguous int32, or null (a chain). Token t's window is its
  // own input after those of its width - 1 nearest ancestors (conv_tree_next); conv_state is
  // then only read (the caller commits the accepted path, nemokernels.commit_conv_state).
  const int32_t* parents;
};

// One step up a draft tree of the conv update. Positions: a node t >= 0 is x[t]; -m (m >= 1)
// is conv_state[state_len - m], the m-th input before the tree. From a node the walk goes to
// its parent (-1: the last state input), above the tree one input further back. Returns
// kConvTreeBad when node `cur` names a parent that does not precede it (the CPU entry
// refuses such trees; the CUDA kernel writes NaN for a window that meets one).
constexpr int64_t kConvTreeBad = INT64_MIN;
NK_HD int64_t conv_tree_next(const int32_t* parents_row, int64_t cur) {
  if (cur < 0) return cur - 1;
  const int64_t q = parents_row[cur];
  return q >= -1 && q < cur ? q : kConvTreeBad;
}

void causal_conv1d_fwd_cpu(const Conv1dFwdParams& p);
void causal_conv1d_bwd_cpu(const Conv1dBwdParams& p);
void causal_conv1d_update_cpu(const Conv1dUpdateParams& p);

#ifdef NK_WITH_CUDA
// Number of (batch, time chunk) partial-sum rows the CUDA backward writes.
int64_t causal_conv1d_bwd_cuda_num_partials(const Conv1dBwdParams& p);
void causal_conv1d_fwd_cuda(const Conv1dFwdParams& p, void* stream);
void causal_conv1d_bwd_cuda(const Conv1dBwdParams& p, void* stream);
void causal_conv1d_update_cuda(const Conv1dUpdateParams& p, void* stream);
#endif

}  // namespace nk
