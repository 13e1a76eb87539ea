// CPU kernels of the causal depthwise conv1d: forward, backward, decode update.
// Same decomposition as the CUDA kernels: a sliding window of W values per (batch, channel)
// row, and in the backward per-(batch, time chunk) partial sums of dweight/dbias reduced in
// a fixed order afterwards, so the result is deterministic and matches the GPU's order.
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <vector>

#include "common/check.h"
#include "common/cpu_access.h"
#include "ssd/causal_conv1d.h"
#include "ssd/numerics.cuh"

namespace nk {
namespace {

// Calls f.template operator()<T, W>() for the runtime dtype and width.
template <typename F>
void dispatch(DType dt, int width, F&& f) {
  auto by_width = [&](auto tag) {
    using T = decltype(tag);
    switch (width) {
      case 2: f.template operator()<T, 2>(); break;
      case 3: f.template operator()<T, 3>(); break;
      case 4: f.template operator()<T, 4>(); break;
      default: NK_CHECK(false, "causal_conv1d: width must be 2, 3 or 4, got ", width);
    }
  };
  switch (dt) {
    case DType::F32: by_width(float{}); break;
    case DType::F16: by_width(c10::Half{}); break;
    case DType::BF16: by_width(c10::BFloat16{}); break;
  }
}

// Input value at time t (t may be negative: initial-state columns) of row (b, c), masked to
// the sequence `sid` when seq_idx is given.
template <typename T>
inline float x_at(const Conv1dFwdParams& p, int64_t b, int64_t c, int64_t t, int32_t sid) {
  if (t < 0) {
    if (p.init == nullptr || p.seq_idx != nullptr) return 0.f;
    int64_t j = p.width - 1 + t;
    return ld<T>(p.init, b * p.init_sb + c * p.init_sc + j * p.init_sj);
  }
  if (p.seq_idx != nullptr && p.seq_idx[b * p.seq_sb + t * p.seq_st] != sid) return 0.f;
  return ld<T>(p.x, b * p.x_sb + c * p.x_sc + t * p.x_st);
}

template <typename T, int W>
inline float pre_activation(const Conv1dFwdParams& p, int64_t b, int64_t c, int64_t t,
                            const float (&w)[W], float bias) {
  int32_t sid = p.seq_idx ? p.seq_idx[b * p.seq_sb + t * p.seq_st] : 0;
  float win[W];
  for (int k = 0; k < W; ++k) win[k] = x_at<T>(p, b, c, t - (W - 1) + k, sid);
  return conv_window<W>(w, win, bias);
}

// One element of a tensor of runtime dtype dt, as float32 / stored rounded to dt.
inline float ld_dt(DType dt, const void* base, int64_t off) {
  float v = 0.f;
  dispatch_dtype(dt, [&]<typename T>() { v = ld<T>(base, off); });
  return v;
}
inline void st_dt(DType dt, void* base, int64_t off, float v) {
  dispatch_dtype(dt, [&]<typename T>() { st<T>(base, off, v); });
}

// The taps and bias of channel c (weight and bias in their own dtype and strides).
template <int W, typename P>
inline void load_weights(const P& p, int64_t c, float (&w)[W], float& bias) {
  for (int k = 0; k < W; ++k) w[k] = ld_dt(p.w_dtype, p.weight, c * p.w_sc + k * p.w_sk);
  bias = p.bias ? ld_dt(p.b_dtype, p.bias, c * p.b_s) : 0.f;
}

}  // namespace

void causal_conv1d_fwd_cpu(const Conv1dFwdParams& p) {
  dispatch(p.dtype, p.width, [&]<typename T, int W>() {
    torch::stable::parallel_for(0, p.batch * p.dim, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / p.dim, c = bc % p.dim;
        float w[W], bias;
        load_weights<W>(p, c, w, bias);
        for (int64_t t = 0; t < p.seqlen; ++t) {
          float y = pre_activation<T, W>(p, b, c, t, w, bias);
          st<T>(p.out, b * p.out_sb + c * p.out_sc + t * p.out_st, p.silu ? silu(y) : y);
        }
        if (p.final_states) {
          for (int j = 0; j < W - 1; ++j) {
            int64_t t = p.seqlen - (W - 1) + j;  // may reach into the initial states
            st<T>(p.final_states, b * p.fin_sb + c * p.fin_sc + j * p.fin_sj, x_at<T>(p, b, c, t, 0));
          }
        }
      }
    });
  });
}

void causal_conv1d_bwd_cpu(const Conv1dBwdParams& q) {
  const Conv1dFwdParams& p = q.fwd;
  const int64_t nchunks = (p.seqlen + kConvBwdChunk - 1) / kConvBwdChunk;
  NK_CHECK(q.num_partials == p.batch * nchunks, "internal: causal_conv1d_bwd partials mismatch");
  dispatch(p.dtype, p.width, [&]<typename T, int W>() {
    torch::stable::parallel_for(0, p.batch * p.dim, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> dy(p.seqlen + W - 1);
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / p.dim, c = bc % p.dim;
        float w[W], bias;
        load_weights<W>(p, c, w, bias);
        // dy over [0, L); positions past the end contribute nothing.
        for (int64_t t = 0; t < p.seqlen; ++t) {
          float g = ld<T>(q.dout, b * q.dout_sb + c * q.dout_sc + t * q.dout_st);
          if (p.silu) g *= silu_grad(pre_activation<T, W>(p, b, c, t, w, bias));
          dy[t] = g;
        }
        for (int k = 0; k < W - 1; ++k) dy[p.seqlen + k] = 0.f;
        // dx[t] = sum_k w[k] dy[t + W-1-k], same sequence only; t < 0 gives dinit.
        auto dx_at = [&](int64_t t, int32_t sid) {
          float acc = 0.f;
          for (int k = 0; k < W; ++k) {
            int64_t u = t + (W - 1) - k;
            bool keep = u >= 0 && u < p.seqlen &&
                        (p.seq_idx == nullptr || p.seq_idx[b * p.seq_sb + u * p.seq_st] == sid);
            acc = fmaf(w[k], keep ? dy[u] : 0.f, acc);
          }
          return acc;
        };
        for (int64_t t = 0; t < p.seqlen; ++t) {
          int32_t sid = p.seq_idx ? p.seq_idx[b * p.seq_sb + t * p.seq_st] : 0;
          float g = dx_at(t, sid);
          if (q.dfinal && t >= p.seqlen - (W - 1)) {
            int64_t j = t - (p.seqlen - (W - 1));
            g += ld<T>(q.dfinal, b * q.dfin_sb + c * q.dfin_sc + j * q.dfin_sj);
          }
          st<T>(q.dx, b * q.dx_sb + c * q.dx_sc + t * q.dx_st, g);
        }
        if (q.dinit) {
          for (int j = 0; j < W - 1; ++j) {
            int64_t t = j - (W - 1);  // the initial-state column's time
            float g = dx_at(t, 0);
            int64_t tf = t - (p.seqlen - (W - 1));  // its index among the final-state columns
            if (q.dfinal && tf >= 0)
              g += ld<T>(q.dfinal, b * q.dfin_sb + c * q.dfin_sc + tf * q.dfin_sj);
            st<T>(q.dinit, b * q.dinit_sb + c * q.dinit_sc + j * q.dinit_sj, g);
          }
        }
        // Partial dweight/dbias per time chunk, in time order within the chunk.
        for (int64_t ch = 0; ch < nchunks; ++ch) {
          float dw[W] = {}, db = 0.f;
          const int64_t t0 = ch * kConvBwdChunk, t1 = std::min(p.seqlen, t0 + kConvBwdChunk);
          for (int64_t t = t0; t < t1; ++t) {
            int32_t sid = p.seq_idx ? p.seq_idx[b * p.seq_sb + t * p.seq_st] : 0;
            for (int k = 0; k < W; ++k) dw[k] = fmaf(dy[t], x_at<T>(p, b, c, t - (W - 1) + k, sid), dw[k]);
            db += dy[t];
          }
          float* row = q.partials + ((b * nchunks + ch) * p.dim + c) * (W + 1);
          for (int k = 0; k < W; ++k) row[k] = dw[k];
          row[W] = db;
        }
      }
    });
    // Fixed-order reduction over the partial rows.
    torch::stable::parallel_for(0, p.dim, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        float dw[W] = {}, db = 0.f;
        for (int64_t r = 0; r < q.num_partials; ++r) {
          const float* row = q.partials + (r * p.dim + c) * (W + 1);
          for (int k = 0; k < W; ++k) dw[k] += row[k];
          db += row[W];
        }
        for (int k = 0; k < W; ++k) st_dt(p.w_dtype, q.dweight, c * W + k, dw[k]);
        if (q.dbias) st_dt(p.b_dtype, q.dbias, c, db);
      }
    });
  });
}

void causal_conv1d_update_cpu(const Conv1dUpdateParams& p) {
  // On the CPU a bad slot index is an error (the GPU, which cannot stop, writes NaN outputs).
  for (int64_t b = 0; p.state_indices && b < p.batch; ++b)
    NK_CHECK(p.state_indices[b] < p.state_batch, "causal_conv1d_update: conv_state_indices[", b,
             "] = ", p.state_indices[b], " is out of range for conv_state with ", p.state_batch, " rows");
  dispatch(p.dtype, p.width, [&]<typename T, int W>() {
    torch::stable::parallel_for(0, p.batch * p.dim, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(p.state_len + p.seqlen);
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / p.dim, c = bc % p.dim;
        const int64_t sb = p.state_indices ? p.state_indices[b] : b;
        if (sb < 0) {  // padded slot: state untouched, output zero
          for (int64_t t = 0; t < p.seqlen; ++t) st<T>(p.out, b * p.out_sb + c * p.out_sc + t * p.out_st, 0.f);
          continue;
        }
        const int64_t soff = sb * p.st_sb + c * p.st_sc;
        for (int64_t j = 0; j < p.state_len; ++j) buf[j] = ld<T>(p.conv_state, soff + j * p.st_sj);
        for (int64_t t = 0; t < p.seqlen; ++t)
          buf[p.state_len + t] = ld<T>(p.x, b * p.x_sb + c * p.x_sc + t * p.x_st);
        float w[W], bias;
        load_weights<W>(p, c, w, bias);
        const int32_t* par = p.parents ? p.parents + b * p.seqlen : nullptr;
        for (int64_t t = 0; t < p.seqlen; ++t) {
          float win[W];
          if (par == nullptr) {
            for (int k = 0; k < W; ++k) win[k] = buf[p.state_len + t - (W - 1) + k];
          } else {  // the path to t, backwards (the entry checked the tree: no kConvTreeBad)
            int64_t cur = t;
            for (int k = W - 1; k >= 0; --k) {
              win[k] = buf[p.state_len + cur];
              if (k > 0) cur = conv_tree_next(par, cur);
            }
          }
          float y = conv_window<W>(w, win, bias);
          st<T>(p.out, b * p.out_sb + c * p.out_sc + t * p.out_st, p.silu ? silu(y) : y);
        }
        // The state keeps the last state_len inputs (a tree leaves it alone).
        if (par == nullptr)
          for (int64_t j = 0; j < p.state_len; ++j)
            st<T>(p.conv_state, soff + j * p.st_sj, buf[p.seqlen + j]);
      }
    });
  });
}

}  // namespace nk
