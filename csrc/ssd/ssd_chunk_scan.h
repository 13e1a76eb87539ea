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
  const int32_t* seq_idx;       // (b, L) contiguous, or null (always null with chunk_plan)
  const float* init;            // (init_rows, H, P, N) contiguous, or null
  int64_t init_rows;            // batch; with chunk_plan 1 or nseq (row r starts sequence r)
  // Packed sequences with chunks aligned to each sequence's start (batch 1; null: chunk c is
  // positions c*Q.. of every row). (2, nc + 1) contiguous int32: row 0 the first position of
  // each chunk (then L), row 1 its sequence (then nseq); chunks past the last real one are
  // empty (start L, sequence nseq). Read through the ssd_chunk_* helpers below, which clamp
  // every value (memory-safe whatever the device holds).
  const int32_t* chunk_plan;
  // Intermediates: contiguous float32, written by F1-F3.
  float* dtp;                   // (b, H, nc, Q) dt'
  float* cs;                    // (b, H, nc, Q) dA_cumsum
  // The state entering each chunk (F3), (b, nc, H, P, N). Null on the CUDA forward when nothing
  // reads it in float32 (the sm_90a chunk output reads states_lp; no return_chunk_states, no F5):
  // the state chain then carries its state in one tile per chain in the workspace instead.
  float* states;
  void* states_lp;              // the same rounded to `dtype` for the sm_90a chunk output, or null
  float* final_states;          // (b, H, P, N), or null (not wanted)
  // Outputs of F4 (forward only): contiguous (b, L, H, P) in `dtype`.
  void* y;
  void* y_pre;                  // or null (only kept when z is given and a backward may follow)
  // F5 (forward only): cu_seqlens (nseq + 1,) contiguous int32, batch == 1, seq_idx given
  // (without chunk_plan); with chunk_plan F3 writes the varlen states itself.
  const int32_t* cu_seqlens;    // or null
  int64_t nseq;                 // also set with chunk_plan
  float* varlen_states;         // (nseq, H, P, N), or null
  // CUDA-only scratch of ssd_fwd_cuda_workspace_bytes(p) bytes (null on the CPU path).
  void* workspace;
};

struct SsdBwdParams {
  SsdParams fwd;                // inputs; y/varlen unused; y_pre read (not written) when z is given
  const void* dout;             // (b, L, H, P) in `dtype`, last dim contiguous
  int64_t dout_sb, dout_sl, dout_sh;
  const float* dfinal;          // (b, H, P, N) contiguous float32, or null
  // Scratch (contiguous float32)
  float* dstates;               // (b, nc, H, P, N): dS (the CPU's B1 writes dIn there, its B2 turns it into dS)
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
  float* dinit;                 // like init, or null (not wanted); zeroed by the entry with chunk_plan
  // CUDA-only scratch of ssd_bwd_cuda_workspace_bytes(p) bytes (null on the CPU path).
  void* workspace;
};

// ---- chunks (both paths read them only through these) ------------------------------------
// First position and length (<= Q) of chunk c; 0 length for the empty chunks of a plan.
NK_HD int64_t ssd_chunk_t0(const SsdParams& p, int64_t c) {
  if (p.chunk_plan == nullptr) return c * p.chunk_size;
  const int64_t t = p.chunk_plan[c];
  return t < 0 ? 0 : (t > p.seqlen ? p.seqlen : t);
}
NK_HD int ssd_chunk_len(const SsdParams& p, int64_t c) {
  const int64_t t0 = ssd_chunk_t0(p, c);
  int64_t e = p.chunk_plan == nullptr ? t0 + p.chunk_size : int64_t{p.chunk_plan[c + 1]};
  if (e > t0 + p.chunk_size) e = t0 + p.chunk_size;
  if (e > p.seqlen) e = p.seqlen;
  return e > t0 ? static_cast<int>(e - t0) : 0;
}
// Sequence of chunk c under a plan, in [0, nseq] (nseq: an empty chunk past the last); 0 without.
NK_HD int64_t ssd_chunk_seq(const SsdParams& p, int64_t c) {
  if (p.chunk_plan == nullptr) return 0;
  const int64_t s = p.chunk_plan[p.nchunks + 1 + c];
  return s < 0 ? 0 : (s > p.nseq ? p.nseq : s);
}
// Sequence id of global position t of row b (seq_idx; 0 without it); padding (t >= L) continues
// the id of position L - 1. The CUDA kernels' reading (the CPU kernel has its own, same rule).
NK_HD int32_t ssd_sid_at(const SsdParams& p, int64_t b, int64_t t) {
  if (p.seq_idx == nullptr) return 0;
  if (t > p.seqlen - 1) t = p.seqlen - 1;
  return p.seq_idx[b * p.seqlen + t];
}
// sid_prev of chunk c (chunk size Q): the last id of chunk c - 1, 0 before chunk 0 (mamba_ssm).
NK_HD int32_t ssd_sid_prev(const SsdParams& p, int64_t b, int64_t c, int64_t Q) {
  return c > 0 ? ssd_sid_at(p, b, c * Q - 1) : 0;
}
// Chunk c starts its sequence (its entering state is the initial state, not the carry).
NK_HD bool ssd_chunk_first(const SsdParams& p, int64_t c) {
  return c == 0 || (p.chunk_plan != nullptr && ssd_chunk_seq(p, c) != ssd_chunk_seq(p, c - 1));
}
// Chunk c ends its sequence (its end state is not handed to chunk c + 1).
NK_HD bool ssd_chunk_last(const SsdParams& p, int64_t c) {
  return c == p.nchunks - 1 || (p.chunk_plan != nullptr && ssd_chunk_seq(p, c) != ssd_chunk_seq(p, c + 1));
}
// Chunk c's end state is final_states: the chunk holding position L - 1.
NK_HD bool ssd_chunk_holds_end(const SsdParams& p, int64_t c) {
  if (p.chunk_plan == nullptr) return c == p.nchunks - 1;
  const int len = ssd_chunk_len(p, c);
  return len > 0 && ssd_chunk_t0(p, c) + len == p.seqlen;
}
// Row of init / dinit for the sequence chunk c starts (batch row b without a plan), or -1
// when that sequence has none (it starts from zero).
NK_HD int64_t ssd_chunk_init_row(const SsdParams& p, int64_t b, int64_t c) {
  const int64_t r = p.chunk_plan == nullptr ? b : ssd_chunk_seq(p, c);
  return (p.init != nullptr && r < p.init_rows) ? r : -1;
}

// Sequences with no positions (plan only) whose varlen state the block of chunk c writes (the
// initial state or zeros): s in [lo, end) with s != ssd_chunk_seq(p, c). Every empty sequence
// falls in exactly one chunk's range (the gaps between consecutive chunks' sequences, and
// after the last chunk's).
NK_HD void ssd_chunk_empty_seqs(const SsdParams& p, int64_t c, int64_t* lo, int64_t* end) {
  *lo = c == 0 ? 0 : ssd_chunk_seq(p, c - 1) + 1;
  *end = p.chunk_plan == nullptr || p.varlen_states == nullptr ? *lo
         : c == p.nchunks - 1                                 ? p.nseq
                                                              : ssd_chunk_seq(p, c);
}

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
// The forward's F4 runs on the sm_90a wgmma kernel (ssd_chunk_output_sm90.cu) for p: a build with
// sm_90a, a compute capability 9.0 device, NEMOKERNELS_SSD_SM90=1 and a shape it takes; the entry
// then gives it p.states_lp (and drops the float32 states when nothing else reads them).
bool ssd_fwd_cuda_output_sm90(const SsdParams& p);        // ssd_chunk_scan_fwd_cuda.cu
bool ssd_fwd_cuda_output_sm90_on(int device_index, const SsdParams& p);  // the same on a given device
// NEMOKERNELS_SSD_SM90=1 with a compute capability 9.0 current device and an sm_90a build: the
// switch of every sm_90a SSD chunk-scan kernel (chunk output, state chain tile, B1 tile).
bool ssd_cuda_sm90_opted_in();                             // ssd_chunk_scan_fwd_cuda.cu
#endif

}  // namespace nk
