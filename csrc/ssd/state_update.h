// Mamba decode-time state updates: `selective_state_update` (one token, state updated in
// place, mamba_ssm semantics) and `selective_state_update_multi` (T draft tokens for
// speculative decoding, a chain or a tree: the state is read, never written; the state after
// every position is written to a snapshot buffer so a rejected draft can be rolled back). Parameter structs
// shared by the op entry (state_update.cpp), the CPU kernel (state_update_cpu.cpp) and the
// CUDA kernel (state_update_cuda.cu). No torch types here.
// Details: docs/ssd.md, section `csrc/ssd/state_update.h`.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace nk {

// A runtime-typed strided operand (float32 / float16 / bfloat16), up to 5 dims.
struct SsuArg {
  const void* ptr = nullptr;
  DType dtype = DType::F32;
  int64_t s[5] = {0, 0, 0, 0, 0};
};

struct SsuParams {
  int64_t batch, seqlen, nheads, dim, dstate;
  int64_t heads_per_group;  // H / G
  int64_t state_rows;       // state.shape[0]
  bool dt_softplus;
  DType state_dtype;
  void* state;              // (rows, H, P, N), state_dtype
  int64_t st_s[4];
  SsuArg x, dt, z, B, C, A, D, dt_bias;  // z, D, dt_bias: ptr null when absent
  const int32_t* state_indices;  // (batch,) or null
  // Where the state after step t goes. in_place: the state row itself (seqlen == 1), strides
  // snap_s[2..4] are state's (h, p, n) strides. Otherwise (b, T, H, P, N) snapshots, or null
  // (multi-token without a snapshot buffer: outputs only).
  bool in_place;
  void* snap;
  int64_t snap_s[5];
  // Tree drafts (multi-token, snapshots required): (batch, T) contiguous int32; token t
  // continues from the state after token parents[b, t] (-1: from the state row), which must
  // precede it (-1 <= parents[b, t] < t; the CPU entry checks, the CUDA kernel gives an invalid
  // node and its descendants NaN). Null: a chain (token t continues from token t - 1).
  const int32_t* parents;
  // Stochastic rounding of a float16 / bfloat16 state (sr_bf16 / sr_f16 in numerics.cuh, bits
  // from ssu_sr_group): a 1-element seed in the state's memory, read by the kernel (no host
  // sync); null: round to nearest even. The entry refuses it for a float32 state.
  const int64_t* sr_seed;
  // Replay (commit_state_replay; multi-token shapes, in_place, no snapshots, out null): entry b
  // applies its tokens up to replay_to[b] (clamped to [-1, T - 1]; -1 keeps the state) to the
  // state row in place: tokens 0..replay_to[b], or with parents the path from the root to node
  // replay_to[b] (ssu_on_path). Null: not a replay.
  const int32_t* replay_to;
  void* out;                // (b, T, H, P) contiguous in x's dtype
  DType out_dtype;
  int64_t out_s[4];
  // Fast path: dt, dt_bias constant over P and A constant over (P, N) (stride 0): one decay
  // exp(dt' A) per (b, t, h) instead of one per element.
  bool head_decay;
};

// Split of a row of N state elements over lanes (docs/ssd.md, file notes of csrc/ssd/state_update.h).
struct SsuLayout {
  int vn;  // elements per vector (16 bytes of state)
  int ln;  // lanes per row (power of two, <= 32)
  int nc;  // vectors per lane
};

inline SsuLayout ssu_layout(int64_t dstate, DType state_dtype) {
  SsuLayout l;
  l.vn = 16 / dtype_size(state_dtype);
  const int64_t vecs = (dstate + l.vn - 1) / l.vn;
  l.ln = 1;
  while (l.ln < 32 && l.ln < vecs) l.ln *= 2;
  l.nc = static_cast<int>((vecs + l.ln - 1) / l.ln);
  if (l.nc < 1) l.nc = 1;
  return l;
}

// The CUDA kernel holds up to 4 vectors per lane in registers: dstate <= 4 * 32 * vn
// (512 for a float32 state, 1024 for float16 / bfloat16).
inline int64_t ssu_cuda_max_dstate(DType state_dtype) { return 4 * 32 * (16 / dtype_size(state_dtype)); }

void selective_state_update_cpu(const SsuParams& p);

#ifdef NK_WITH_CUDA
void selective_state_update_cuda(const SsuParams& p, void* stream);
#endif

}  // namespace nk
