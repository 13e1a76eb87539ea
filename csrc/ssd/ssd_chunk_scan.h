// Mamba-2 SSD by the chunked algorithm (mamba_chunk_scan_combined), forward and backward.
// Parameter structs shared by the op entry (ssd_chunk_scan.cpp), the CPU kernels
// (ssd_chunk_scan_cpu.cpp) and the CUDA kernels (ssd_chunk_scan_fwd_cuda.cu,
// ssd_chunk_scan_bwd_cuda.cu). No torch types here.
//
// Shorthand: b batch, L seqlen, H heads, P headdim, G groups (head h reads group
// h / (H/G)), N dstate, Q chunk size, nc = ceil(L/Q) chunks (at least 1). Inside chunk c,
// i and j are positions 0..Q-1 (global position c*Q+i); positions >= L are padding with
// dt' = 0 (they change nothing) and the sequence id of position L-1.
// Details: docs/ssd.md, section `csrc/ssd/ssd_chunk_scan.h`.
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
