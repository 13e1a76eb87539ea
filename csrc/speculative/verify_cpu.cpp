// CPU kernels of the verification ops and the sampling transform. Same decomposition as the
// CUDA kernels (verify_cuda.cu): per-(row, vocab chunk) partials, then a per-request walk
// (spec/walk.cuh, shared with the GPU), the same Philox counters and race keys, and for the
// tree rejection the GPU's summation order. Greedy, rejection and tree verification therefore
// emit the same tokens as the GPU for the same inputs and seed.
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/check.h"
#include "speculative/numerics.cuh"
#include "speculative/verify.h"
#include "speculative/walk.cuh"

namespace nk {
namespace {

using namespace spec;

template <typename F>
void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f(float{}); break;
    case DType::F16: f(c10::Half{}); break;
    case DType::BF16: f(c10::BFloat16{}); break;
  }
}

// Partial argmax of every (row, chunk); rows past a request's draft count are skipped.
void argmax_partials(const SpecArgmaxParams& a) {
  dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* base = static_cast<const T*>(a.logits);
    torch::stable::parallel_for(0, a.batch * a.npos * a.nsplit, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r = t / a.nsplit, s = t % a.nsplit, b = r / a.npos, j = r % a.npos;
        float bv = 0.f;
        int64_t bi = -1;
        if (a.num_draft == nullptr || j <= num_drafts_of(a.num_draft, b, a.npos - 1)) {
          const T* row = base + b * a.l_sb + j * a.l_st;
          const int64_t lo = s * a.chunk, hi = std::min(a.vocab, lo + a.chunk);
          for (int64_t i = lo; i < hi; ++i) {
            const float v = static_cast<float>(row[i]);
            if (argmax_better(v, i, bv, bi)) bv = v, bi = i;
          }
        }
        a.part_val[t] = bv;
        a.part_idx[t] = bi;
      }
    });
  });
  for (int64_t r = 0; r < a.batch * a.npos; ++r) a.row_arg[r] = reduce_argmax(a, r);
}

// Sum of f(i) over i < vocab in the CUDA block's order: thread t of kTreeThreads adds
// t, t + T, ... in turn, then a pairwise tree over the threads.
template <typename F>
float block_order_sum(int64_t vocab, F&& f) {
  float acc[kTreeThreads] = {};
  for (int64_t i = 0; i < vocab; ++i) acc[i % kTreeThreads] += f(i);
  for (int s = kTreeThreads / 2; s > 0; s >>= 1)
    for (int t = 0; t < s; ++t) acc[t] += acc[t + s];
  return acc[0];
}

}  // namespace

void spec_verify_greedy_cpu(const SpecGreedyParams& p) {
  argmax_partials(p.am);
  for (int64_t b = 0; b < p.am.batch; ++b) greedy_walk(p, b);
}

void spec_verify_tree_greedy_cpu(const SpecTreeGreedyParams& p) {
  argmax_partials(p.am);
  for (int64_t b = 0; b < p.am.batch; ++b) tree_greedy_walk(p, b);
}

void spec_rejection_sample_cpu(const SpecRejectionParams& p) {
  const uint64_t seed = seed_of(p.seed_ptr, p.seed);
  torch::stable::parallel_for(0, p.batch * p.nsplit, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / p.nsplit, s = t % p.nsplit;
      const int64_t n = num_drafts_of(p.num_draft, b, p.k);
      const int64_t m = first_rejection(p, b, n, seed);
      const bool residual = m < n;
      const bool fallback = residual && p.q != nullptr;
      const float* prow = p.p + b * p.p_sb + m * p.p_st;
      const float* qrow = (residual && p.q) ? p.q + b * p.q_sb + m * p.q_st : nullptr;
      const int64_t x = residual ? clamp_id(p.draft[b * p.d_sb + m * p.d_st], p.vocab) : -1;
      float k1 = 0.f, k2 = 0.f;
      int64_t i1 = -1, i2 = -1;
      const int64_t lo = s * p.chunk, hi = std::min(p.vocab, lo + p.chunk);
      for (int64_t g = lo / 4; g * 4 < hi; ++g) {
        float e[4];
        race_exponentials(seed, kTagResidual, b, m, g, e);
        for (int u = 0; u < 4 && g * 4 + u < hi; ++u) {
          const int64_t i = g * 4 + u;
          const float qi = !residual ? 0.f : (qrow ? qrow[i] : (i == x ? 1.f : 0.f));
          rejection_race_entry(i, prow[i], qi, residual, fallback, e[u], k1, i1, k2, i2);
        }
      }
      p.part_key[t] = k1, p.part_idx[t] = i1, p.part_key2[t] = k2, p.part_idx2[t] = i2;
    }
  });
  for (int64_t b = 0; b < p.batch; ++b) rejection_finalize(p, b);
}

void spec_verify_tree_rejection_cpu(const SpecTreeRejectionParams& p) {
  const uint64_t seed = seed_of(p.seed_ptr, p.seed);
  torch::stable::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> rej(p.n_nodes);
    std::vector<float> zs(p.n_nodes);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t w = p.max_depth + 1;
      int64_t* out = p.out + b * w;
      int64_t* nodes = p.nodes + b * w;
      for (int64_t j = 0; j < w; ++j) out[j] = -1, nodes[j] = -1;
      int64_t cur = 0, depth = 0;
      while (true) {
        nodes[depth] = cur;
        const float* prow = p.p + b * p.p_sb + cur * p.p_sn;
        int r = 0;
        // The residual after the first r rejected children (see tree_residual in the .cu).
        auto resid = [&](int64_t i, int upto) {
          float v = prow[i];
          for (int j = 0; j < upto; ++j) {
            const float d = v - p.q[b * p.q_sb + rej[j] * p.q_sn + i];
            v = (d > 0.f ? d : 0.f) / zs[j];
          }
          return v;
        };
        int64_t accepted = -1;
        if (depth < p.max_depth) {
          for (int64_t c = cur + 1; c < p.n_nodes; ++c) {
            if (p.parents[b * p.par_sb + c * p.par_sn] != cur) continue;
            const int64_t x = clamp_id(p.cand[b * p.c_sb + c * p.c_sn], p.vocab);
            const float* qrow = p.q + b * p.q_sb + c * p.q_sn;
            if (accept_draft(accept_uniform(seed, kTagTreeAccept, b, c), resid(x, r), qrow[x])) {
              accepted = c;
              break;
            }
            const float z = block_order_sum(p.vocab, [&](int64_t i) {
              const float d = resid(i, r) - qrow[i];
              return d > 0.f ? d : 0.f;
            });
            if (!(z > 0.f)) break;  // all-zero residual: sample from the current one
            rej[r] = c;
            zs[r] = z;
            ++r;
          }
        }
        if (accepted >= 0) {
          out[depth] = clamp_id(p.cand[b * p.c_sb + accepted * p.c_sn], p.vocab);  // as tested
          cur = accepted;
          ++depth;
          continue;
        }
        float k1 = 0.f, k2 = 0.f;
        int64_t i1 = -1, i2 = -1;
        for (int64_t g = 0; g * 4 < p.vocab; ++g) {
          float e[4];
          race_exponentials(seed, kTagTreeResidual, b, cur, g, e);
          for (int u = 0; u < 4 && g * 4 + u < p.vocab; ++u) {
            const int64_t i = g * 4 + u;
            tree_race_entry(i, resid(i, r), prow[i], r > 0, e[u], k1, i1, k2, i2);
          }
        }
        out[depth] = i1 >= 0 ? i1 : (i2 >= 0 ? i2 : 0);
        break;
      }
      p.num_accepted[b] = depth;
    }
  });
}

// ---- sampling transform ------------------------------------------------------------------

namespace {

struct RowCfg {
  float temp;
  int64_t top_k;
  float top_p, min_p;
};

template <typename T>
void sampling_row(const SpecSamplingParams& p, const T* l, float* out, const RowCfg& c) {
  const int64_t V = p.vocab;
  float mx = 0.f;
  int64_t am = -1;
  for (int64_t i = 0; i < V; ++i) {
    const float v = static_cast<float>(l[i]);
    if (argmax_better(v, i, mx, am)) mx = v, am = i;
  }
  if (!(c.temp > 0.f)) {  // greedy: one-hot at the argmax
    for (int64_t i = 0; i < V; ++i) out[i] = i == am ? 1.f : 0.f;
    return;
  }
  // e_i = exp((l_i - max) / T) in (0, 1]; written to out, then filtered in place.
  for (int64_t i = 0; i < V; ++i) out[i] = expf((static_cast<float>(l[i]) - mx) / c.temp);
  float thr = 0.f;
  if (c.top_k > 0 && c.top_k < V) {
    // Radix select of the k-th largest e over its bit pattern, 8 bits per pass.
    uint32_t prefix = 0;
    int64_t kk = c.top_k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      const uint32_t mask = shift == 24 ? 0u : (0xFFFFFFFFu << (shift + 8));
      int64_t hist[256] = {};
      for (int64_t i = 0; i < V; ++i) {
        const uint32_t bits = float_bits(out[i]);
        if ((bits & mask) == prefix) ++hist[(bits >> shift) & 0xFFu];
      }
      int64_t cum = 0;
      for (int bin = 255; bin >= 0; --bin) {
        if (cum + hist[bin] >= kk) {
          kk -= cum;
          prefix |= static_cast<uint32_t>(bin) << shift;
          break;
        }
        cum += hist[bin];
      }
    }
    thr = bits_float(prefix);
  }
  if (c.top_p < 1.f) {
    // Largest t (searched over float bit patterns) with sum_{e >= max(t, thr)} e >= top_p * mass.
    auto mass_above = [&](float t) {
      return block_order_sum(V, [&](int64_t i) { return out[i] >= t ? out[i] : 0.f; });
    };
    const float target = c.top_p * mass_above(thr);
    uint32_t lo = float_bits(thr), hi = float_bits(1.0f);
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo + 1) / 2;
      if (mass_above(bits_float(mid)) >= target) lo = mid;
      else hi = mid - 1;
    }
    thr = bits_float(lo);
  }
  if (c.min_p > 0.f) thr = std::max(thr, c.min_p);
  const float z = block_order_sum(V, [&](int64_t i) { return out[i] >= thr ? out[i] : 0.f; });
  for (int64_t i = 0; i < V; ++i) out[i] = out[i] >= thr ? out[i] / z : 0.f;
}

}  // namespace

void spec_sampling_probs_cpu(const SpecSamplingParams& p) {
  dispatch_dtype(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    torch::stable::parallel_for(0, p.rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t b = r / p.per_req, t = r % p.per_req;
        RowCfg c{p.temperature ? p.temperature[b] : p.temperature_value,
                 p.top_k ? p.top_k[b] : p.top_k_value, p.top_p ? p.top_p[b] : p.top_p_value,
                 p.min_p ? p.min_p[b] : p.min_p_value};
        sampling_row<T>(p, static_cast<const T*>(p.logits) + b * p.l_sb + t * p.l_st, p.out + r * p.vocab, c);
      }
    });
  });
}

}  // namespace nk
