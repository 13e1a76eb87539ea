// Mamba-2 SSD by the chunked algorithm (mamba_chunk_scan_combined), forward and backward.
// Parameter structs shared by the op entry (ssd_chunk_scan.cpp), the CPU kernels
// (ssd_chunk_scan_cpu.cpp) and the CUDA kernels (ssd_chunk_scan_fwd_cuda.cu,
// ssd_chunk_scan_bwd_cuda.cu). No torch types here.
//
// Shorthand: b batch, L seqlen, H heads, P headdim, G groups (head h reads group
// h / (H/G)), N dstate, Q chunk size, nc = ceil(L/Q) chunks (at least 1). Inside chunk c,
// i and j are positions 0..Q-1 (global position c*Q+i); positions >= L are padding with
// dt' = 0 (they change nothing) and the sequence id of position L-1.
//
// Forward stages (the CPU and CUDA paths run the same ones, in this order):
//  F1 chunk_cumsum   dt'_t = clamp(softplus?(dt_t + dt_bias_h), dt_min, dt_max)   (0 on padding)
//                    cs_i  = sum_{j<=i} dt'_j A_h              (inclusive, inside the chunk)
//                    -> dtp, cs: (b, H, nc, Q) float32
//  F2 chunk_state    S_c = sum_j exp(cs_last - cs_j) [sid_j == sid_last] dt'_j x_j B_j^T
//                    -> states: (b, nc, H, P, N) float32 (each chunk alone, from zero)
//  F3 state_passing  h_0 = initial_states (0 when none); for c = 0..nc-1:
//                    in_c = h; h = carry_c h + S_c, carry_c = exp(cs_last) [sid_last == sid_prev]
//                    -> states overwritten in place with in_c (the state entering chunk c);
//                    final_states = h.   (b, H, P, N) float32
//  F4 chunk_scan     y_i = sum_{j<=i, sid_j == sid_i} (C_i . B_j) exp(cs_i - cs_j) dt'_j x_j
//                        + exp(cs_i) [sid_i == sid_prev] C_i in_c   + D x_i
//                    y_pre = y_i (saved for the backward when z is given); y = y_pre silu(z)
//  F5 varlen_states  (only with cu_seqlens) the state after the last position e of each
//                    packed sequence s..e (batch 1): with c = chunk of e, i0 = first position
//                    of the sequence in chunk c,
//                    sum_{i0<=j<=e} exp(cs_e - cs_j) dt'_j x_j B_j^T
//                    + [sid_prev == sid_e] exp(cs_e) in_c;  zeros for an empty sequence.
// sid_t = seq_idx[t] (0 everywhere without seq_idx); sid_last = sid of chunk c's last
// position (padding continues the last id); sid_prev = sid_last of chunk c-1, 0 for c = 0
// (so initial_states continue the sequence with id 0, as in mamba_ssm).
//
// Backward (recomputes F1-F3 from the inputs, then):
//  B0 dy_i = dout_i silu(z_i) (dout without z);  dz_i = dout_i y_pre_i silu'(z_i)
//  B1 dstates: dIn_c = sum_i exp(cs_i) [sid_i == sid_prev] dy_i C_i^T      (b, nc, H, P, N)
//  B2 state passing backward, c = nc-1..0, g = dfinal_states (0 when none):
//       dS_c = g;  dcs_last_c = carry_c <g, in_c>;  g = dIn_c + carry_c g
//     dinitial_states = g. dS overwrites dIn in place; dcs_last: (b, H, nc).
//  B3 per chunk (grads of F4 and F2 through x, B, C, dt', cs, plus D):
//       W_ij = (C_i . B_j) exp(cs_i - cs_j) dt'_j (dy_i . x_j)    (j <= i, same sid)
//       U_j  = exp(cs_last - cs_j) [sid_j == sid_last] dt'_j (x_j^T dS_c B_j)
//       V_i  = exp(cs_i) [sid_i == sid_prev] (dy_i^T in_c C_i)
//       dx_j   = sum_{i>=j} (C_i.B_j) exp(cs_i-cs_j) dt'_j dy_i + exp(cs_last-cs_j)[..] dt'_j dS_c B_j + D dy_j
//       dB_j   = sum_h [ sum_{i>=j} exp(cs_i-cs_j) dt'_j (dy_i.x_j) C_i + exp(cs_last-cs_j)[..] dt'_j dS_c^T x_j ]
//       dC_i   = sum_h [ sum_{j<=i} exp(cs_i-cs_j) dt'_j (dy_i.x_j) B_j + exp(cs_i)[..] in_c^T dy_i ]
//       ddt'_j = sum_{i>=j} (C_i.B_j) exp(cs_i-cs_j) (dy_i.x_j) + U_j / dt'_j (computed without dividing)
//       dcs_i  = sum_j W_ij - sum_k W_ki + V_i - U_i + [i == Q-1] (sum_j U_j + dcs_last_c)
//       ddA_j  = sum_{i>=j} dcs_i  (reverse cumsum);  ddt'_j += A ddA_j;  dA_h += sum_j dt'_j ddA_j
//       ddt_j  = ddt'_j * [dt_min <= pre_j <= dt_max] * (softplus? sigmoid(dt_j + dt_bias) : 1)
//       ddt_bias_h += ddt_j;   dD += dy x (per head, or per (head, p))
//     The sums over the heads of a group (dB, dC) and over batch/chunks (dA, dD, ddt_bias)
//     run in a fixed order (partials per (b, c) reduced afterwards): deterministic, no atomics.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace nk {

struct SsdParams {
  int64_t batch, seqlen, nheads, headdim, ngroups, dstate, chunk_size, nchunks;
  DType dtype;                  // of x, z, B, C, y, y_pre (the activations)
  // Activations: last dim contiguous (unit stride), the other strides arbitrary.
  const void* x;                // (b, L, H, P)
  int64_t x_sb, x_sl, x_sh;
  const void* B;                // (b, L, G, N)
  int64_t B_sb, B_sl, B_sg;
  const void* C;                // (b, L, G, N)
  int64_t C_sb, C_sl, C_sg;
  const void* z;                // (b, L, H, P), or null
  int64_t z_sb, z_sl, z_sh;
  // Small parameters: contiguous float32 copies made by the entry.
  const float* dt;              // (b, L, H), raw (before bias/softplus/clamp)
  const float* A;               // (H,)
  const float* D;               // (H,) or (H, P), or null
  bool D_per_p;                 // D is (H, P)
  const float* dt_bias;         // (H,), or null
  bool dt_softplus;
  float dt_min, dt_max;         // the clamp (dt_limit); dt_max may be +inf
  const int32_t* seq_idx;       // (b, L) contiguous, or null
  const float* init;            // (b, H, P, N) contiguous, or null
  // Intermediates: contiguous float32, written by F1-F3.
  float* dtp;                   // (b, H, nc, Q) dt'
  float* cs;                    // (b, H, nc, Q) dA_cumsum
  float* states;                // (b, nc, H, P, N) F2: chunk states; after F3: state entering each chunk
  float* final_states;          // (b, H, P, N), or null (not wanted)
  // Outputs of F4 (forward only): contiguous (b, L, H, P) in `dtype`.
  void* y;
  void* y_pre;                  // or null (only kept when z is given and a backward may follow)
  // F5 (forward only): cu_seqlens (nseq + 1,) contiguous int32, batch == 1, seq_idx given.
  const int32_t* cu_seqlens;    // or null
  int64_t nseq;
  float* varlen_states;         // (nseq, H, P, N)
  // CUDA-only scratch of ssd_fwd_cuda_workspace_bytes(p) bytes (null on the CPU path).
  void* workspace;
};

struct SsdBwdParams {
  SsdParams fwd;                // inputs; y/varlen unused; y_pre read (not written) when z is given
  const void* dout;             // (b, L, H, P) in `dtype`, last dim contiguous
  int64_t dout_sb, dout_sl, dout_sh;
  const float* dfinal;          // (b, H, P, N) contiguous float32, or null
  // Scratch (contiguous float32)
  float* dstates;               // (b, nc, H, P, N): B1 writes dIn, B2 turns it into dS
  float* dcs_last;              // (b, H, nc)
  // Per-(b, chunk) partial sums, reduced in a fixed order by the caller's kernels:
  float* dA_part;               // (b, nc, H)
  float* dbias_part;            // (b, nc, H)
  float* dD_part;               // (b, nc, H, P) (summed over p afterwards when D is (H,))
  // Outputs
  void* dx;                     // (b, L, H, P) contiguous, `dtype`
  void* dz;                     // (b, L, H, P) contiguous, `dtype`, or null (no z)
  void* dB;                     // (b, L, G, N) contiguous, `dtype`
  void* dC;                     // (b, L, G, N) contiguous, `dtype`
  float* ddt;                   // (b, L, H) contiguous float32
  float* dA;                    // (H,)
  float* dD;                    // (H,) or (H, P), or null (no D)
  float* ddt_bias;              // (H,), or null (no dt_bias)
  float* dinit;                 // (b, H, P, N), or null (not wanted)
  // CUDA-only scratch of ssd_bwd_cuda_workspace_bytes(p) bytes (null on the CPU path).
  void* workspace;
};

// CUDA kernels' limits (the CPU path takes any chunk size, headdim and dstate); the entry
// checks them and names the limit in its error.
constexpr bool ssd_cuda_supports(int64_t chunk_size, int64_t headdim, int64_t dstate) {
  return (chunk_size == 64 || chunk_size == 128 || chunk_size == 256) && headdim % 8 == 0 &&
         headdim >= 8 && headdim <= 128 && dstate % 8 == 0 && dstate >= 8 && dstate <= 256;
}

// F1-F3 only (dtp, cs, states, final_states): the backward's recomputation.
void ssd_states_cpu(const SsdParams& p);
// F1-F5.
void ssd_fwd_cpu(const SsdParams& p);
// Recomputes F1-F3 into p.fwd's intermediates, then B0-B3 and the partial reductions.
void ssd_bwd_cpu(const SsdBwdParams& p);

#ifdef NK_WITH_CUDA
// Bytes of p.workspace the CUDA kernels need (0 allowed); the entry allocates them.
int64_t ssd_fwd_cuda_workspace_bytes(const SsdParams& p);     // ssd_chunk_scan_fwd_cuda.cu
int64_t ssd_bwd_cuda_workspace_bytes(const SsdBwdParams& p);  // ssd_chunk_scan_bwd_cuda.cu
void ssd_states_cuda(const SsdParams& p, void* stream);   // ssd_chunk_scan_fwd_cuda.cu
void ssd_fwd_cuda(const SsdParams& p, void* stream);      // ssd_chunk_scan_fwd_cuda.cu
void ssd_bwd_cuda(const SsdBwdParams& p, void* stream);   // ssd_chunk_scan_bwd_cuda.cu
#endif

}  // namespace nk
