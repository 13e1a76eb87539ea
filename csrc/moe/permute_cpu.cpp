// CPU kernels of the MoE permutation, gather and combine (math and plan algorithm in
// permute.h): the same chunked count / scan / rank passes as the CUDA kernels, so the plan is
// identical bit for bit; gather and combine accumulate in float32 in j order as on the GPU.
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/check.h"
#include "common/cpu_access.h"
#include "moe/permute.h"

namespace nk {
namespace {

// The maps come from moe_permute_plan, but a caller may pass its own: on the CPU a bad entry
// is an error (the GPU, which cannot raise, drops the slot or zeroes the row).
void check_map(const char* op, const char* arg, const int32_t* m, int64_t n, int64_t limit) {
  for (int64_t i = 0; i < n; ++i)
    NK_CHECK(m[i] >= -1 && m[i] < limit, op, ": ", arg, "[", i, "] = ", m[i], " is out of range [-1, ", limit, ")");
}

}  // namespace

void moe_permute_plan_cpu(const PermutePlanParams& p) {
  const int E = p.experts;
  for (int64_t s = 0; s < p.slots; ++s)
    NK_CHECK(p.ids[s] >= 0 && p.ids[s] < E, "moe_permute_plan: topk_ids.flatten()[", s, "] = ", p.ids[s],
             " is out of range for num_experts = ", E);
  std::fill(p.slot_of_row, p.slot_of_row + p.rows, -1);
  // Pass 1: counts per (chunk, expert).
  torch::stable::parallel_for(0, p.num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int32_t* cnt = p.chunk_counts + c * E;
      std::fill(cnt, cnt + E, 0);
      const int64_t s1 = std::min<int64_t>(p.slots, (c + 1) * kPermChunk);
      for (int64_t s = c * kPermChunk; s < s1; ++s) ++cnt[p.ids[s]];
    }
  });
  // Pass 2: exclusive scan over chunks per expert, then over (padded) experts.
  for (int e = 0; e < E; ++e) {
    int32_t run = 0;
    for (int64_t c = 0; c < p.num_chunks; ++c) {
      const int32_t n = p.chunk_counts[c * E + e];
      p.chunk_counts[c * E + e] = run;
      run += n;
    }
    p.counts[e] = run;
  }
  int32_t off = 0;
  for (int e = 0; e < E; ++e) {
    p.offsets[e] = off;
    off += (p.counts[e] + p.pad_to - 1) / p.pad_to * p.pad_to;
  }
  p.offsets[E] = off;
  // Pass 3: rows in slot order within each chunk, from the chunk's base per expert.
  torch::stable::parallel_for(0, p.num_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      int32_t* next = p.chunk_counts + c * E;
      for (int e = 0; e < E; ++e) next[e] += p.offsets[e];
      const int64_t s1 = std::min<int64_t>(p.slots, (c + 1) * kPermChunk);
      for (int64_t s = c * kPermChunk; s < s1; ++s) {
        const int32_t r = next[p.ids[s]]++;
        p.row_of_slot[s] = r;
        p.slot_of_row[r] = static_cast<int32_t>(s);
      }
    }
  });
}

void moe_gather_cpu(const GatherParams& p) {
  check_map("moe_gather", "slot_of_row", p.slot_of_row, p.rows, p.tokens * p.top_k);
  dispatch_dtype(p.dtype, [&]<typename T>() {
    torch::stable::parallel_for(0, p.rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* dst = static_cast<T*>(p.out) + r * p.width;
        const int32_t s = p.slot_of_row[r];
        if (s < 0) {
          std::fill(dst, dst + p.width, T(0.f));
        } else {
          const T* src = static_cast<const T*>(p.x) + (s / p.top_k) * p.x_st;
          std::memcpy(dst, src, p.width * sizeof(T));
        }
      }
    });
  });
}

void moe_gather_bwd_cpu(const GatherBwdParams& p) {
  check_map("moe_gather (backward)", "row_of_slot", p.row_of_slot, p.tokens * p.top_k, p.rows);
  dispatch_dtype(p.dtype, [&]<typename T>() {
    torch::stable::parallel_for(0, p.tokens, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(p.width);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int j = 0; j < p.top_k; ++j) {
          const int32_t r = p.row_of_slot[t * p.top_k + j];
          if (r < 0) continue;
          for (int64_t i = 0; i < p.width; ++i) acc[i] += ld<T>(p.dxs, r * p.dxs_st + i);
        }
        for (int64_t i = 0; i < p.width; ++i) st<T>(p.dx, t * p.width + i, acc[i]);
      }
    });
  });
}

void moe_combine_cpu(const CombineParams& p) {
  check_map("moe_combine", "row_of_slot", p.row_of_slot, p.tokens * p.top_k, p.rows);
  dispatch_dtype(p.dtype, [&]<typename T>() {
    torch::stable::parallel_for(0, p.tokens, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(p.width);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int j = 0; j < p.top_k; ++j) {
          const int64_t s = t * p.top_k + j;
          const int32_t r = p.row_of_slot[s];
          if (r < 0) continue;
          const float w = p.weights ? p.weights[s] : 1.f;
          for (int64_t i = 0; i < p.width; ++i) acc[i] = std::fmaf(w, ld<T>(p.y, r * p.y_st + i), acc[i]);
        }
        for (int64_t i = 0; i < p.width; ++i) st<T>(p.out, t * p.width + i, acc[i]);
      }
    });
  });
}

void moe_combine_bwd_cpu(const CombineBwdParams& q) {
  const CombineParams& p = q.fwd;
  check_map("moe_combine (backward)", "row_of_slot", p.row_of_slot, p.tokens * p.top_k, p.rows);
  check_map("moe_combine (backward)", "slot_of_row", p.slot_of_row, p.rows, p.tokens * p.top_k);
  dispatch_dtype(p.dtype, [&]<typename T>() {
    torch::stable::parallel_for(0, p.rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int32_t s = p.slot_of_row[r];
        const float w = s >= 0 && p.weights ? p.weights[s] : 1.f;
        for (int64_t i = 0; i < p.width; ++i)
          st<T>(q.dy, r * p.width + i, s < 0 ? 0.f : w * ld<T>(q.dout, (s / p.top_k) * q.dout_st + i));
      }
    });
    if (q.dweights == nullptr) return;
    torch::stable::parallel_for(0, p.tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        for (int j = 0; j < p.top_k; ++j) {
          const int64_t s = t * p.top_k + j;
          const int32_t r = p.row_of_slot[s];
          float acc = 0.f;
          for (int64_t i = 0; r >= 0 && i < p.width; ++i)
            acc = std::fmaf(ld<T>(q.dout, t * q.dout_st + i), ld<T>(p.y, r * p.y_st + i), acc);
          q.dweights[s] = acc;
        }
      }
    });
  });
}

}  // namespace nk
