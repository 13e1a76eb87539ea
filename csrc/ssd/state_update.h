// Mamba decode-time state updates: `selective_state_update` (one token, state updated in
// place, mamba_ssm semantics) and `selective_state_update_multi` (T draft tokens for
// speculative decoding: the state is read, never written; the state after every position is
// written to a snapshot buffer so a rejected draft can be rolled back). Parameter structs
// shared by the op entry (state_update.cpp), the CPU kernel (state_update_cpu.cpp) and the
// CUDA kernel (state_update_cuda.cu). No torch types here.
//
// Shapes (b batch, T tokens, H heads, P head dim, N dstate, G groups, head h reads group
// h / (H/G); the Mamba-1 form has no head dim and is run as H = G = 1):
//   state (rows, H, P, N)   x, dt, z, out (b, T, H, P)   A (H, P, N)   B, C (b, T, G, N)
//   D, dt_bias (H, P)       snapshots (b, T, H, P, N)
// Every operand has arbitrary strides, 0 included: Mamba-2 passes dt (b, H), A (H,), D and
// dt_bias (H,) expanded over P (and N) with stride 0.
//
// Math per (b, h, p), for t = 0..T-1, starting from s = state[row(b), h, p, :]:
//   dt' = softplus?(dt + dt_bias)                       (no clamp, as in mamba_ssm's decode)
//   s[n] = s[n] * exp(dt' A[h,p,n]) + B[g,n] * (dt' x[p])
//   s    = round_to_state_dtype(s)                      (so T multi-token steps equal T
//                                                        single steps bit for bit)
//   out[t, p] = (sum_n s[n] C[g,n] + D x[p]) * silu(z[p])
//   single step: state row = s;  multi-token: snapshots[b, t] = s.
// row(b) = state_batch_indices[b] (b without indices). A negative index is a padded slot:
// the state is untouched, out = 0 and (multi) the snapshots of b are 0. An index >= rows
// (only possible on CUDA, where it cannot be checked without a host sync; the CPU entry
// raises) never touches memory out of bounds: out (and snapshots) are NaN, state untouched.
//
// Decomposition (the CPU kernel runs the same one, so the CPU pins the GPU's arithmetic):
// a row's N elements are split over `ln` lanes in vectors of `vn` elements (16 bytes of
// state), `nc` vectors per lane: element n = (c * ln + lane) * vn + v. Each lane keeps its
// elements in registers and sums s[n] C[n] over c (outer) then v (inner) with FMAs; the
// lanes' partial sums are then combined by an xor butterfly (offsets ln/2, ..., 1), and
// lane 0's value is the row's dot product.
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
  void* out;                // (b, T, H, P) contiguous in x's dtype
  DType out_dtype;
  int64_t out_s[4];
  // Fast path: dt, dt_bias constant over P and A constant over (P, N) (stride 0): one decay
  // exp(dt' A) per (b, t, h) instead of one per element.
  bool head_decay;
};

// Split of a row of N state elements over lanes (see the header comment).
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
