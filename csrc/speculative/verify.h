// Speculative-decoding verification (MTP drafts) and the fused sampling transform: parameter
// structs shared by the op entries (verify.cpp), the CPU kernels (verify_cpu.cpp) and the
// CUDA kernels (verify_cuda.cu). No torch types here.
// Details: docs/speculative.md, section `csrc/speculative/verify.h`.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace nk {

// Row-wise partial argmax of logits (batch, npos, vocab), last dim contiguous.
struct SpecArgmaxParams {
  int64_t batch, npos, vocab;
  DType dtype;
  const void* logits;
  int64_t l_sb, l_st;
  const int64_t* num_draft;  // (batch,) or null: positions j > num_draft[b] are skipped
  int64_t nsplit, chunk;     // chunks per row and their length (a multiple of 8)
  float* part_val;           // (batch * npos, nsplit)
  int64_t* part_idx;         // (batch * npos, nsplit)
  int64_t* row_arg;          // (batch * npos,): the argmax of each row, reduced from the partials
};

struct SpecGreedyParams {
  SpecArgmaxParams am;  // npos = k + 1
  int64_t k;
  const int64_t* draft;  // (batch, k)
  int64_t d_sb, d_st;
  int64_t* out;           // (batch, k + 1) contiguous
  int64_t* num_accepted;  // (batch,)
};

struct SpecTreeGreedyParams {
  SpecArgmaxParams am;  // npos = n_nodes
  int64_t n_nodes, max_depth;
  const int64_t* cand;  // (batch, n_nodes)
  int64_t c_sb, c_sn;
  const int64_t* parents;  // (batch, n_nodes)
  int64_t par_sb, par_sn;
  int64_t* out;           // (batch, max_depth + 1) contiguous
  int64_t* nodes;         // (batch, max_depth + 1) contiguous
  int64_t* num_accepted;  // (batch,)
};

struct SpecRejectionParams {
  int64_t batch, k, vocab;
  const int64_t* draft;  // (batch, k)
  int64_t d_sb, d_st;
  const float* q;  // draft_probs (batch, k, vocab), last dim contiguous; null: greedy draft (one-hot)
  int64_t q_sb, q_st;
  const float* p;  // target_probs (batch, k + 1, vocab), last dim contiguous
  int64_t p_sb, p_st;
  const int64_t* num_draft;  // (batch,) or null
  const int64_t* seed_ptr;   // 1-element device/host tensor, or null: use `seed`
  uint64_t seed;
  int64_t nsplit, chunk;
  float* part_key;     // (batch, nsplit): race over the residual (or the bonus distribution)
  int64_t* part_idx;
  float* part_key2;    // (batch, nsplit): race over p_m, the fallback for an all-zero residual
  int64_t* part_idx2;
  int64_t* out;           // (batch, k + 1)
  int64_t* num_accepted;  // (batch,)
};

// Threads of the one block per request of the tree rejection kernel; the CPU kernel sums in
// the same order (thread t adds entries t, t + T, ... then a fixed pairwise tree) so both
// compute bit-identical normalisers.
constexpr int kTreeThreads = 256;
constexpr int64_t kMaxTreeNodes = 1024;

struct SpecTreeRejectionParams {
  int64_t batch, n_nodes, vocab, max_depth;
  const int64_t* cand;
  int64_t c_sb, c_sn;
  const int64_t* parents;
  int64_t par_sb, par_sn;
  const float* q;  // draft_probs (batch, n_nodes, vocab), last dim contiguous
  int64_t q_sb, q_sn;
  const float* p;  // target_probs (batch, n_nodes, vocab), last dim contiguous
  int64_t p_sb, p_sn;
  const int64_t* seed_ptr;
  uint64_t seed;
  int64_t* out;
  int64_t* nodes;
  int64_t* num_accepted;
};

// Fused sampling transform: probs = renormalised softmax(logits / T) over the kept set.
struct SpecSamplingParams {
  int64_t rows, per_req, vocab;  // rows = batch * per_req; request of row r = r / per_req
  DType dtype;
  const void* logits;  // (batch, per_req, vocab), last dim contiguous
  int64_t l_sb, l_st;
  const float* temperature;  // (batch,) or null: temperature_value
  float temperature_value;
  const int64_t* top_k;  // (batch,) or null: top_k_value; <= 0 or >= vocab: no top-k
  int64_t top_k_value;
  const float* top_p;  // (batch,) or null; >= 1: no top-p
  float top_p_value;
  const float* min_p;  // (batch,) or null; <= 0: no min-p
  float min_p_value;
  float* out;  // (rows, vocab) contiguous float32
};

void spec_verify_greedy_cpu(const SpecGreedyParams& p);
void spec_verify_tree_greedy_cpu(const SpecTreeGreedyParams& p);
void spec_rejection_sample_cpu(const SpecRejectionParams& p);
void spec_verify_tree_rejection_cpu(const SpecTreeRejectionParams& p);
void spec_sampling_probs_cpu(const SpecSamplingParams& p);

#ifdef NK_WITH_CUDA
// Vocab chunks per row the CUDA kernels use for `rows` rows (fills the device's SMs).
int64_t spec_cuda_num_splits(int64_t rows, int64_t vocab);
void spec_verify_greedy_cuda(const SpecGreedyParams& p, void* stream);
void spec_verify_tree_greedy_cuda(const SpecTreeGreedyParams& p, void* stream);
void spec_rejection_sample_cuda(const SpecRejectionParams& p, void* stream);
void spec_verify_tree_rejection_cuda(const SpecTreeRejectionParams& p, void* stream);
void spec_sampling_probs_cuda(const SpecSamplingParams& p, void* stream);
#endif

// Chunk length for `nsplit` chunks of `vocab`: a multiple of 8 (one 16-byte vector of 16-bit
// logits, two of float32 probabilities).
inline int64_t spec_chunk_len(int64_t vocab, int64_t nsplit) {
  int64_t c = (vocab + nsplit - 1) / nsplit;
  return (c + 7) / 8 * 8;
}

}  // namespace nk
