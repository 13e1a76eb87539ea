// The per-request serial steps of the verification kernels, shared verbatim by the CPU and
// CUDA kernels (one thread per request on the GPU): reducing the per-chunk partials in a
// fixed order, the acceptance walk over the drafts, and writing the padded outputs.
#pragma once

#include <cstdint>

#include "speculative/numerics.cuh"
#include "speculative/verify.h"

namespace nk {
namespace spec {

NK_HD int64_t num_drafts_of(const int64_t* num_draft, int64_t b, int64_t k) {
  if (num_draft == nullptr) return k;
  const int64_t n = num_draft[b];
  return n < 0 ? 0 : (n > k ? k : n);  // clamped: memory-safe for any value on the GPU
}

// Argmax of row r from its partials (split order; the order is total, so any order agrees).
NK_HD int64_t reduce_argmax(const SpecArgmaxParams& a, int64_t r) {
  float bv = 0.f;
  int64_t bi = -1;
  for (int64_t s = 0; s < a.nsplit; ++s) {
    const float v = a.part_val[r * a.nsplit + s];
    const int64_t i = a.part_idx[r * a.nsplit + s];
    if (argmax_better(v, i, bv, bi)) bv = v, bi = i;
  }
  return bi < 0 ? 0 : bi;
}

// The walks read each row's argmax from a.row_arg, filled from the partials first (the CPU
// by reduce_argmax, the GPU by one warp per row: same winner, the order is total).
NK_HD void greedy_walk(const SpecGreedyParams& p, int64_t b) {
  const int64_t n = num_drafts_of(p.am.num_draft, b, p.k);
  int64_t* out = p.out + b * (p.k + 1);
  for (int64_t j = 0; j <= p.k; ++j) out[j] = -1;
  int64_t m = n;
  for (int64_t j = 0; j <= n; ++j) {
    const int64_t a = p.am.row_arg[b * p.am.npos + j];
    out[j] = a;
    if (j == n || p.draft[b * p.d_sb + j * p.d_st] != a) {
      m = j;
      break;
    }
  }
  p.num_accepted[b] = m;
}

NK_HD void tree_greedy_walk(const SpecTreeGreedyParams& p, int64_t b) {
  const int64_t w = p.max_depth + 1;
  int64_t* out = p.out + b * w;
  int64_t* nodes = p.nodes + b * w;
  for (int64_t j = 0; j < w; ++j) out[j] = -1, nodes[j] = -1;
  int64_t cur = 0, depth = 0;
  while (true) {
    const int64_t a = p.am.row_arg[b * p.am.npos + cur];
    nodes[depth] = cur;
    out[depth] = a;
    if (depth == p.max_depth) break;
    int64_t next = -1;
    for (int64_t c = cur + 1; c < p.n_nodes; ++c) {
      if (p.parents[b * p.par_sb + c * p.par_sn] == cur && p.cand[b * p.c_sb + c * p.c_sn] == a) {
        next = c;
        break;
      }
    }
    if (next < 0) break;
    cur = next;
    ++depth;
  }
  p.num_accepted[b] = depth;
}

NK_HD uint64_t seed_of(const int64_t* seed_ptr, uint64_t seed) {
  return seed_ptr ? static_cast<uint64_t>(*seed_ptr) : seed;
}

// Whether draft j of request b is rejected (its acceptance test fails).
NK_HD bool draft_rejected(const SpecRejectionParams& p, int64_t b, int64_t j, uint64_t seed) {
  const int64_t x = clamp_id(p.draft[b * p.d_sb + j * p.d_st], p.vocab);
  const float px = p.p[b * p.p_sb + j * p.p_st + x];
  const float qx = p.q ? p.q[b * p.q_sb + j * p.q_st + x] : 1.0f;
  return !accept_draft(accept_uniform(seed, kTagAccept, b, j), px, qx);
}

// Index of the first rejected draft of request b (n when all n are accepted).
NK_HD int64_t first_rejection(const SpecRejectionParams& p, int64_t b, int64_t n, uint64_t seed) {
  for (int64_t j = 0; j < n; ++j)
    if (draft_rejected(p, b, j, seed)) return j;
  return n;
}

// One vocab entry's contribution to the races of request b at position m: the residual
// max(0, p_m - q_m) (or p_n for the bonus token, m == n), and with `fallback` p_m itself, used
// when the residual is all zero. A greedy draft needs no fallback: its residual p_m without
// the drafted token can only be all zero when p_m is one-hot at it, which is always accepted.
NK_HD void rejection_race_entry(int64_t i, float pi, float qi, bool residual, bool fallback, float expo,
                                float& k1, int64_t& i1, float& k2, int64_t& i2) {
  float key;
  if (race_key(expo, residual ? pi - qi : pi, key) && race_better(key, i, k1, i1)) k1 = key, i1 = i;
  if (fallback && race_key(expo, pi, key) && race_better(key, i, k2, i2)) k2 = key, i2 = i;
}

// Tree variant: race over the chain residual w, and over p itself as the fallback when some
// child was rejected (without rejections w is p).
NK_HD void tree_race_entry(int64_t i, float w, float pi, bool fallback, float expo, float& k1, int64_t& i1,
                           float& k2, int64_t& i2) {
  float key;
  if (race_key(expo, w, key) && race_better(key, i, k1, i1)) k1 = key, i1 = i;
  if (fallback && race_key(expo, pi, key) && race_better(key, i, k2, i2)) k2 = key, i2 = i;
}

// The outputs of request b: the m accepted drafts (clamped, as tested: in-vocabulary even for
// ids the GPU could not check), then `tok`, then -1.
NK_HD void rejection_write(const SpecRejectionParams& p, int64_t b, int64_t m, int64_t tok) {
  int64_t* out = p.out + b * (p.k + 1);
  for (int64_t j = 0; j <= p.k; ++j) out[j] = j < m ? clamp_id(p.draft[b * p.d_sb + j * p.d_st], p.vocab) : -1;
  out[m] = tok;
  p.num_accepted[b] = m;
}

// The token from the two race winners: an all-zero residual falls back to p_m; an all-zero
// distribution (invalid input, only reachable on the GPU where values are not checked) gives 0.
NK_HD int64_t race_token(int64_t i1, int64_t i2) { return i1 >= 0 ? i1 : (i2 >= 0 ? i2 : 0); }

NK_HD void rejection_finalize(const SpecRejectionParams& p, int64_t b) {
  const uint64_t seed = seed_of(p.seed_ptr, p.seed);
  const int64_t n = num_drafts_of(p.num_draft, b, p.k);
  const int64_t m = first_rejection(p, b, n, seed);
  float k1 = 0.f, k2 = 0.f;
  int64_t i1 = -1, i2 = -1;
  for (int64_t s = 0; s < p.nsplit; ++s) {
    const int64_t o = b * p.nsplit + s;
    if (race_better(p.part_key[o], p.part_idx[o], k1, i1)) k1 = p.part_key[o], i1 = p.part_idx[o];
    if (race_better(p.part_key2[o], p.part_idx2[o], k2, i2)) k2 = p.part_key2[o], i2 = p.part_idx2[o];
  }
  rejection_write(p, b, m, race_token(i1, i2));
}

}  // namespace spec
}  // namespace nk
