// CPU kernels of the gated RMSNorm (math in rmsnorm_gated.h). Same decomposition as the CUDA
// kernels: one (row, group) unit at a time, two passes over the group (a reduction, then the
// elementwise outputs); group sums accumulated in 32 strided lanes combined by a tree, as a warp
// does; dweight/dbias as partial sums per fixed chunk of rows, summed in chunk order afterwards,
// so the result does not depend on the thread count. Element math is shared with the GPU
// (numerics.cuh).
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <vector>

#include "common/check.h"
#include "common/cpu_access.h"
#include "ssd/numerics.cuh"
#include "ssd/rmsnorm_gated.h"

namespace nk {
namespace {

constexpr int kLanes = 32;

// Adds a * b to lane i % 32.
struct LaneSum {
  float acc[kLanes] = {};
  void fma(int64_t i, float a, float b) { acc[i % kLanes] = fmaf(a, b, acc[i % kLanes]); }
  float total() {
    for (int s = kLanes / 2; s > 0; s >>= 1)
      for (int l = 0; l < s; ++l) acc[l] += acc[l + s];
    return acc[0];
  }
};

// A (dim,) parameter in its own dtype as float32 (empty for a null one).
std::vector<float> param_floats(const void* base, DType dt, int64_t n) {
  std::vector<float> v(base ? n : 0);
  dispatch_dtype(dt, [&]<typename T>() {
    for (size_t c = 0; c < v.size(); ++c) v[c] = ld<T>(base, static_cast<int64_t>(c));
  });
  return v;
}

}  // namespace

void rmsnorm_gated_fwd_cpu(const RmsNormFwdParams& p) {
  const int64_t G = p.group_size, ngroups = p.dim / G;
  const bool gate_first = p.z != nullptr && !p.norm_before_gate;
  const bool gate_last = p.z != nullptr && p.norm_before_gate;
  const std::vector<float> wt = param_floats(p.weight, p.weight_dtype, p.dim);
  const std::vector<float> bs = param_floats(p.bias, p.bias_dtype, p.dim);
  dispatch_dtype(p.dtype, [&]<typename T>() {
    const int64_t grain = std::max<int64_t>(1, 4096 / G);
    torch::stable::parallel_for(0, p.rows * ngroups, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> u(G), gate(G);
      for (int64_t unit = begin; unit < end; ++unit) {
        const int64_t r = unit / ngroups, c0 = (unit % ngroups) * G;
        LaneSum sumsq;
        for (int64_t i = 0; i < G; ++i) {
          const int64_t c = c0 + i;
          const float x = ld<T>(p.x, r * p.x_sr + c * p.x_sc);
          const float z = p.z ? ld<T>(p.z, r * p.z_sr + c * p.z_sc) : 0.f;
          u[i] = rmsnorm_input(x, z, gate_first);
          gate[i] = rmsnorm_out_gate(z, gate_last);
          sumsq.fma(i, u[i], u[i]);
        }
        const float rstd = rmsnorm_rstd(sumsq.total(), static_cast<float>(G), p.eps);
        p.rstd[unit] = rstd;
        for (int64_t i = 0; i < G; ++i) {
          const int64_t c = c0 + i;
          const float b = p.bias ? bs[c] : 0.f;
          st<T>(p.out, r * p.dim + c, rmsnorm_output(u[i], rstd, wt[c], b, gate[i]));
        }
      }
    });
  });
}

void rmsnorm_gated_bwd_cpu(const RmsNormBwdParams& q) {
  const RmsNormFwdParams& p = q.fwd;
  const int64_t G = p.group_size, ngroups = p.dim / G, D = p.dim;
  const int64_t nchunks = (p.rows + kRmsNormCpuRowChunk - 1) / kRmsNormCpuRowChunk;
  NK_CHECK(q.num_partials == nchunks, "internal: rmsnorm_gated backward partials mismatch");
  const bool gate_first = p.z != nullptr && !p.norm_before_gate;
  const bool gate_last = p.z != nullptr && p.norm_before_gate;
  const std::vector<float> wt = param_floats(p.weight, p.weight_dtype, p.dim);
  const std::vector<float> bs = param_floats(p.bias, p.bias_dtype, p.dim);
  dispatch_dtype(p.dtype, [&]<typename T>() {
    torch::stable::parallel_for(0, nchunks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> xh(G), dxh(G), ca(G), cb(G);
      for (int64_t ch = begin; ch < end; ++ch) {
        float* pw = q.partials + ch * 2 * D;
        float* pb = pw + D;
        std::fill(pw, pw + 2 * D, 0.f);
        const int64_t r1 = std::min(p.rows, (ch + 1) * kRmsNormCpuRowChunk);
        for (int64_t r = ch * kRmsNormCpuRowChunk; r < r1; ++r) {
          for (int64_t g = 0; g < ngroups; ++g) {
            const float rstd = p.rstd[r * ngroups + g];
            const int64_t c0 = g * G;
            LaneSum dot;
            for (int64_t i = 0; i < G; ++i) {
              const int64_t c = c0 + i;
              const float x = ld<T>(p.x, r * p.x_sr + c * p.x_sc);
              const float z = p.z ? ld<T>(p.z, r * p.z_sr + c * p.z_sc) : 0.f;
              const float gr = ld<T>(q.dout, r * q.dout_sr + c * q.dout_sc);
              const float w = wt[c], b = p.bias ? bs[c] : 0.f;
              const RmsNormBwdElem e = rmsnorm_bwd_elem(x, z, gr, rstd, w, b, gate_first, gate_last);
              pw[c] = fmaf(e.dy, e.xhat, pw[c]);
              pb[c] += e.dy;
              xh[i] = e.xhat;
              dxh[i] = e.dy * w;
              ca[i] = e.ca;
              cb[i] = e.cb;
              dot.fma(i, dxh[i], e.xhat);
              if (gate_last) st<T>(q.dz, r * D + c, e.dz);
            }
            const float m = dot.total() / static_cast<float>(G);
            for (int64_t i = 0; i < G; ++i) {
              const int64_t c = c0 + i;
              const float du = rmsnorm_du(dxh[i], xh[i], m, rstd);
              st<T>(q.dx, r * D + c, du * ca[i]);
              if (gate_first) st<T>(q.dz, r * D + c, du * cb[i]);
            }
          }
        }
      }
    });
  });
  // Fixed-order reduction over the chunks' partial rows, written in the parameters' dtypes.
  dispatch_dtype(p.weight_dtype, [&]<typename W>() {
    dispatch_dtype(p.bias_dtype, [&]<typename B>() {
      torch::stable::parallel_for(0, D, 256, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          float dw = 0.f, db = 0.f;
          for (int64_t ch = 0; ch < nchunks; ++ch) {
            dw += q.partials[ch * 2 * D + c];
            db += q.partials[ch * 2 * D + D + c];
          }
          st<W>(q.dweight, c, dw);
          if (q.dbias) st<B>(q.dbias, c, db);
        }
      });
    });
  });
}

}  // namespace nk
