// MoE token permutation: the routing plan (which permuted row each (token, choice) pair goes
// to), the gather of tokens into expert-contiguous rows, and the combine back (un-permute plus
// routing-weighted sum), with their backwards. Parameter structs shared by the op entries
// (permute.cpp), the CPU kernels (permute_cpu.cpp) and the CUDA kernels (permute_cuda.cu).
// Details: docs/moe.md, section `csrc/moe/permute.h`.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace nk {

// Slots per counting chunk: one CUDA warp walks a chunk, 32 slots a step, so the chunk bounds the
// serial latency of the count and rank passes (16 steps); more chunks only lengthen the scan.
constexpr int kPermChunk = 512;
// Experts the plan handles: a CUDA block's four per-warp histograms live in 32 KB of shared memory.
constexpr int kPermMaxExperts = 2048;

struct PermutePlanParams {
  int64_t slots;          // N = T * k
  int experts;
  int pad_to;
  int64_t rows;           // R = N + E * (pad_to - 1)
  const int32_t* ids;     // (N,) contiguous
  int64_t num_chunks;     // ceil(N / kPermChunk)
  int32_t* chunk_counts;  // (num_chunks, E) scratch: counts, then base rows
  int32_t* counts;        // (E,)
  int32_t* offsets;       // (E + 1,)
  int32_t* row_of_slot;   // (N,)
  int32_t* slot_of_row;   // (R,)
};

struct GatherParams {
  int64_t tokens, rows, width;
  int top_k;
  DType dtype;
  const void* x;            // (tokens, width), row stride x_st, unit column stride
  int64_t x_st;
  const int32_t* slot_of_row;  // (rows,)
  void* out;                // (rows, width) contiguous
};

struct GatherBwdParams {
  int64_t tokens, rows, width;
  int top_k;
  DType dtype;
  const void* dxs;          // (rows, width), row stride dxs_st, unit column stride
  int64_t dxs_st;
  const int32_t* row_of_slot;  // (tokens * top_k,)
  void* dx;                 // (tokens, width) contiguous
};

struct CombineParams {
  int64_t tokens, rows, width;
  int top_k;
  DType dtype;
  const void* y;            // (rows, width), row stride y_st, unit column stride
  int64_t y_st;
  const int32_t* row_of_slot;  // (tokens * top_k,)
  const int32_t* slot_of_row;  // (rows,)  (backward only)
  const float* weights;     // (tokens, top_k) contiguous, or null (all ones)
  void* out;                // forward: (tokens, width) contiguous
};

struct CombineBwdParams {
  CombineParams fwd;        // y, maps, weights as in the forward
  const void* dout;         // (tokens, width), row stride dout_st, unit column stride
  int64_t dout_st;
  void* dy;                 // (rows, width) contiguous, y's dtype
  float* dweights;          // (tokens, top_k) contiguous, or null
};

void moe_permute_plan_cpu(const PermutePlanParams& p);
void moe_gather_cpu(const GatherParams& p);
void moe_gather_bwd_cpu(const GatherBwdParams& p);
void moe_combine_cpu(const CombineParams& p);
void moe_combine_bwd_cpu(const CombineBwdParams& p);

#ifdef NK_WITH_CUDA
void moe_permute_plan_cuda(const PermutePlanParams& p, void* stream);
void moe_gather_cuda(const GatherParams& p, void* stream);
void moe_gather_bwd_cuda(const GatherBwdParams& p, void* stream);
void moe_combine_cuda(const CombineParams& p, void* stream);
void moe_combine_bwd_cuda(const CombineBwdParams& p, void* stream);
#endif

}  // namespace nk
