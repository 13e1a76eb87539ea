// CPU kernels of the SSD chunk scan: the stages F1-F5 and B0-B3 of ssd_chunk_scan.h, with the
// same decomposition and the same work units as the CUDA kernels (a chunk of one head, or
// of one group with its heads in order), float32 accumulation, and fixed-order reductions.
// They are the executable spec of the CUDA path; the float64 oracle is ssd_chunked_ref.
#include <torch/csrc/stable/ops.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/check.h"
#include "common/cpu_access.h"
#include "ssd/numerics.cuh"
#include "ssd/ssd_chunk_scan.h"

namespace nk {
namespace {

// Index helpers over the shapes of SsdParams. Chunk-major intermediates are contiguous.
struct Geo {
  const SsdParams& p;
  int64_t Q, nc, H, P, N, G, hpg;
  explicit Geo(const SsdParams& q)
      : p(q), Q(q.chunk_size), nc(q.nchunks), H(q.nheads), P(q.headdim), N(q.dstate),
        G(q.ngroups), hpg(q.nheads / q.ngroups) {}
  // (b, H, nc, Q) arrays: dtp, cs
  int64_t bhc(int64_t b, int64_t h, int64_t c) const { return ((b * H + h) * nc + c) * Q; }
  // (b, nc, H, P, N) states
  int64_t state(int64_t b, int64_t c, int64_t h) const { return ((b * nc + c) * H + h) * P * N; }
  int64_t x_off(int64_t b, int64_t t, int64_t h) const { return b * p.x_sb + t * p.x_sl + h * p.x_sh; }
  int64_t z_off(int64_t b, int64_t t, int64_t h) const { return b * p.z_sb + t * p.z_sl + h * p.z_sh; }
  int64_t B_off(int64_t b, int64_t t, int64_t g) const { return b * p.B_sb + t * p.B_sl + g * p.B_sg; }
  int64_t C_off(int64_t b, int64_t t, int64_t g) const { return b * p.C_sb + t * p.C_sl + g * p.C_sg; }
  // contiguous (b, L, H, P) outputs
  int64_t y_off(int64_t b, int64_t t, int64_t h) const { return ((b * p.seqlen + t) * H + h) * P; }
  // Sequence id of global position t; padding continues the last position's id; 0 without seq_idx.
  int32_t sid(int64_t b, int64_t t) const {
    if (p.seq_idx == nullptr || p.seqlen == 0) return 0;
    if (t >= p.seqlen) t = p.seqlen - 1;
    return p.seq_idx[b * p.seqlen + t];
  }
  int64_t len(int64_t c) const { return ssd_chunk_len(p, c); }  // real positions in chunk c
  int64_t t0(int64_t c) const { return ssd_chunk_t0(p, c); }      // its first position
  int32_t sid_last(int64_t b, int64_t c) const { return sid(b, t0(c) + Q - 1); }
  int32_t sid_prev(int64_t b, int64_t c) const { return c == 0 ? 0 : sid_last(b, c - 1); }
};

// Loads the activation rows of one chunk as float32: out[i * width + k] for i < len.
template <typename T>
void load_rows(const void* base, int64_t off0, int64_t row_stride, int64_t len, int64_t width,
               float* out) {
  for (int64_t i = 0; i < len; ++i)
    for (int64_t k = 0; k < width; ++k) out[i * width + k] = ld<T>(base, off0 + i * row_stride + k);
}

// ---- F1: dt' and the inclusive cumsum of dt' A inside each chunk.
void chunk_cumsum(const Geo& g) {
  const SsdParams& p = g.p;
  torch::stable::parallel_for(0, p.batch * g.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / g.H, h = bh % g.H;
      const float bias = p.dt_bias ? p.dt_bias[h] : 0.f;
      for (int64_t c = 0; c < g.nc; ++c) {
        float* dtp = p.dtp + g.bhc(b, h, c);
        float* cs = p.cs + g.bhc(b, h, c);
        const int64_t t0 = g.t0(c), len = g.len(c);
        float acc = 0.f;
        for (int64_t i = 0; i < g.Q; ++i) {
          const int64_t t = t0 + i;
          const float d = i < len ? ssd_dt(p.dt[(b * p.seqlen + t) * g.H + h], bias, p.dt_softplus,
                                                p.dt_min, p.dt_max)
                                       : 0.f;
          dtp[i] = d;
          acc += d * p.A[h];
          cs[i] = acc;
        }
      }
    }
  });
}

// ---- F2: each chunk's end state from zero, S[p][n] = sum_j w_j x_j[p] B_j[n].
template <typename T>
void chunk_state(const Geo& g) {
  const SsdParams& p = g.p;
  torch::stable::parallel_for(0, p.batch * g.nc * g.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xs(g.Q * g.P), bs(g.Q * g.N);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t h = idx % g.H, c = (idx / g.H) % g.nc, b = idx / (g.H * g.nc);
      const int64_t len = g.len(c), t0 = g.t0(c);
      const float* dtp = p.dtp + g.bhc(b, h, c);
      const float* cs = p.cs + g.bhc(b, h, c);
      const int32_t last = g.sid_last(b, c);
      load_rows<T>(p.x, g.x_off(b, t0, h), p.x_sl, len, g.P, xs.data());
      load_rows<T>(p.B, g.B_off(b, t0, h / g.hpg), p.B_sl, len, g.N, bs.data());
      float* S = p.states + g.state(b, c, h);
      std::fill(S, S + g.P * g.N, 0.f);
      for (int64_t j = 0; j < len; ++j) {
        if (g.sid(b, t0 + j) != last) continue;
        const float w = expf(cs[g.Q - 1] - cs[j]) * dtp[j];
        for (int64_t pp = 0; pp < g.P; ++pp) {
          const float xw = w * xs[j * g.P + pp];
          for (int64_t n = 0; n < g.N; ++n) S[pp * g.N + n] += xw * bs[j * g.N + n];
        }
      }
    }
  });
}

// carry_c = exp(cs_last) when the chunk's last position continues the sequence before it.
float chunk_carry(const Geo& g, int64_t b, int64_t h, int64_t c) {
  if (g.sid_last(b, c) != g.sid_prev(b, c)) return 0.f;
  return expf(g.p.cs[g.bhc(b, h, c) + g.Q - 1]);
}

// ---- F3: state passing, in place (states[c] becomes the state entering chunk c). A chunk that
// starts its sequence enters from its initial-state row (or zero); the end state of a chunk
// that ends its sequence goes to varlen_states (with a plan) and, for the chunk holding
// position L - 1, to final_states.
void state_passing(const Geo& g) {
  const SsdParams& p = g.p;
  const int64_t PN = g.P * g.N;
  torch::stable::parallel_for(0, p.batch * g.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(PN);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / g.H, hh = bh % g.H;
      for (int64_t c = 0; c < g.nc; ++c) {
        if (ssd_chunk_first(p, c)) {
          const int64_t row = ssd_chunk_init_row(p, b, c);
          for (int64_t k = 0; k < PN; ++k) h[k] = row >= 0 ? p.init[(row * g.H + hh) * PN + k] : 0.f;
        }
        float* S = p.states + g.state(b, c, hh);
        const float carry = chunk_carry(g, b, hh, c);
        for (int64_t k = 0; k < PN; ++k) {
          const float local = S[k];
          S[k] = h[k];
          h[k] = carry * h[k] + local;
        }
        const int64_t seq = ssd_chunk_seq(p, c);
        if (ssd_chunk_last(p, c) && p.chunk_plan && p.varlen_states && seq < p.nseq)
          std::copy(h.begin(), h.end(), p.varlen_states + (seq * g.H + hh) * PN);
        if (ssd_chunk_holds_end(p, c) && p.final_states)
          std::copy(h.begin(), h.end(), p.final_states + (b * g.H + hh) * PN);
        int64_t lo, stop;  // empty sequences: their initial state (or zeros)
        ssd_chunk_empty_seqs(p, c, &lo, &stop);
        for (int64_t s = lo; s < stop; ++s) {
          if (s == seq) continue;
          float* out = p.varlen_states + (s * g.H + hh) * PN;
          for (int64_t k = 0; k < PN; ++k) out[k] = p.init && s < p.init_rows ? p.init[(s * g.H + hh) * PN + k] : 0.f;
        }
      }
    }
  });
}

// CB[i][j] = C_i . B_j for the real rows of one chunk and group.
void chunk_cb(const Geo& g, int64_t len, const float* cs_rows, const float* bs_rows, float* cb) {
  for (int64_t i = 0; i < len; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      float acc = 0.f;
      for (int64_t n = 0; n < g.N; ++n) acc += cs_rows[i * g.N + n] * bs_rows[j * g.N + n];
      cb[i * g.Q + j] = acc;
    }
}

float d_at(const SsdParams& p, int64_t h, int64_t pp) {
  if (p.D == nullptr) return 0.f;
  return p.D_per_p ? p.D[h * p.headdim + pp] : p.D[h];
}

// ---- F4: the chunk output, per (b, chunk, group) with the group's heads in order.
template <typename T>
void chunk_scan(const Geo& g) {
  const SsdParams& p = g.p;
  torch::stable::parallel_for(0, p.batch * g.nc * g.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> cr(g.Q * g.N), br(g.Q * g.N), cb(g.Q * g.Q), xs(g.Q * g.P), y(g.P);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t gg = idx % g.G, c = (idx / g.G) % g.nc, b = idx / (g.G * g.nc);
      const int64_t len = g.len(c), t0 = g.t0(c);
      const int32_t prev = g.sid_prev(b, c);
      load_rows<T>(p.C, g.C_off(b, t0, gg), p.C_sl, len, g.N, cr.data());
      load_rows<T>(p.B, g.B_off(b, t0, gg), p.B_sl, len, g.N, br.data());
      chunk_cb(g, len, cr.data(), br.data(), cb.data());
      for (int64_t h = gg * g.hpg; h < (gg + 1) * g.hpg; ++h) {
        const float* dtp = p.dtp + g.bhc(b, h, c);
        const float* cs = p.cs + g.bhc(b, h, c);
        const float* in = p.states + g.state(b, c, h);
        load_rows<T>(p.x, g.x_off(b, t0, h), p.x_sl, len, g.P, xs.data());
        for (int64_t i = 0; i < len; ++i) {
          const int32_t si = g.sid(b, t0 + i);
          std::fill(y.begin(), y.end(), 0.f);
          for (int64_t j = 0; j <= i; ++j) {
            if (g.sid(b, t0 + j) != si) continue;
            const float coef = cb[i * g.Q + j] * expf(cs[i] - cs[j]) * dtp[j];
            for (int64_t pp = 0; pp < g.P; ++pp) y[pp] += coef * xs[j * g.P + pp];
          }
          const float e = si == prev ? expf(cs[i]) : 0.f;
          for (int64_t pp = 0; pp < g.P; ++pp) {
            float off = 0.f;
            for (int64_t n = 0; n < g.N; ++n) off += cr[i * g.N + n] * in[pp * g.N + n];
            float v = y[pp] + e * off + d_at(p, h, pp) * xs[i * g.P + pp];
            const int64_t o = g.y_off(b, t0 + i, h) + pp;
            if (p.y_pre) st<T>(p.y_pre, o, v);
            if (p.z) v *= silu(ld<T>(p.z, g.z_off(b, t0 + i, h) + pp));
            st<T>(p.y, o, v);
          }
        }
      }
    }
  });
}

// ---- F5: the state after the last position of each packed sequence (batch 1).
template <typename T>
void varlen_states(const Geo& g) {
  const SsdParams& p = g.p;
  const int64_t PN = g.P * g.N;
  torch::stable::parallel_for(0, p.nseq * g.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t s = idx / g.H, h = idx % g.H;
      float* out = p.varlen_states + (s * g.H + h) * PN;
      std::fill(out, out + PN, 0.f);
      int64_t first = p.cu_seqlens[s], last = int64_t{p.cu_seqlens[s + 1]} - 1;
      if (first < 0) first = 0;
      if (last >= p.seqlen) last = p.seqlen - 1;
      if (last < first) continue;  // empty sequence: zeros
      const int64_t c = last / g.Q, ie = last % g.Q, t0 = c * g.Q;
      const int64_t i0 = first > t0 ? first - t0 : 0;
      const float* dtp = p.dtp + g.bhc(0, h, c);
      const float* cs = p.cs + g.bhc(0, h, c);
      for (int64_t j = i0; j <= ie; ++j) {
        const float w = expf(cs[ie] - cs[j]) * dtp[j];
        for (int64_t pp = 0; pp < g.P; ++pp) {
          const float xw = w * ld<T>(p.x, g.x_off(0, t0 + j, h) + pp);
          for (int64_t n = 0; n < g.N; ++n)
            out[pp * g.N + n] += xw * ld<T>(p.B, g.B_off(0, t0 + j, h / g.hpg) + n);
        }
      }
      if (g.sid_prev(0, c) == g.sid(0, last)) {
        const float e = expf(cs[ie]);
        const float* in = p.states + g.state(0, c, h);
        for (int64_t k = 0; k < PN; ++k) out[k] += e * in[k];
      }
    }
  });
}

// ---- B1: gradient of the state entering each chunk from the chunk's outputs.
template <typename T>
void chunk_dstates(const Geo& g, const SsdBwdParams& q) {
  const SsdParams& p = g.p;
  torch::stable::parallel_for(0, p.batch * g.nc * g.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> dy(g.P);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t h = idx % g.H, c = (idx / g.H) % g.nc, b = idx / (g.H * g.nc);
      const int64_t len = g.len(c), t0 = g.t0(c);
      const float* cs = p.cs + g.bhc(b, h, c);
      const int32_t prev = g.sid_prev(b, c);
      float* dIn = q.dstates + g.state(b, c, h);
      std::fill(dIn, dIn + g.P * g.N, 0.f);
      for (int64_t i = 0; i < len; ++i) {
        if (g.sid(b, t0 + i) != prev) continue;
        const float e = expf(cs[i]);
        for (int64_t pp = 0; pp < g.P; ++pp) {
          float d = ld<T>(q.dout, b * q.dout_sb + (t0 + i) * q.dout_sl + h * q.dout_sh + pp);
          if (p.z) d *= silu(ld<T>(p.z, g.z_off(b, t0 + i, h) + pp));
          dy[pp] = e * d;
        }
        const int64_t coff = g.C_off(b, t0 + i, h / g.hpg);
        for (int64_t pp = 0; pp < g.P; ++pp)
          for (int64_t n = 0; n < g.N; ++n) dIn[pp * g.N + n] += dy[pp] * ld<T>(p.C, coff + n);
      }
    }
  });
}

// ---- B2: state passing backward, in place (dstates[c]: dIn_c -> dS_c). The gradient of a
// chunk's end state restarts at the end of each sequence (dfinal_states at the chunk holding
// L - 1, zero elsewhere: varlen states are not differentiable); at the chunk that starts a
// sequence it is the initial state's gradient.
void state_passing_bwd(const Geo& g, const SsdBwdParams& q) {
  const SsdParams& p = g.p;
  const int64_t PN = g.P * g.N;
  torch::stable::parallel_for(0, p.batch * g.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> gr(PN);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / g.H, h = bh % g.H;
      for (int64_t c = g.nc - 1; c >= 0; --c) {
        if (ssd_chunk_last(p, c)) {
          const bool fin = q.dfinal && ssd_chunk_holds_end(p, c);
          for (int64_t k = 0; k < PN; ++k) gr[k] = fin ? q.dfinal[(b * g.H + h) * PN + k] : 0.f;
        }
        float* d = q.dstates + g.state(b, c, h);
        const float* in = p.states + g.state(b, c, h);
        const float carry = chunk_carry(g, b, h, c);
        float dot = 0.f;
        for (int64_t k = 0; k < PN; ++k) dot += gr[k] * in[k];
        q.dcs_last[(b * g.H + h) * g.nc + c] = carry * dot;
        for (int64_t k = 0; k < PN; ++k) {
          const float din = d[k];
          d[k] = gr[k];
          gr[k] = din + carry * gr[k];
        }
        const int64_t row = ssd_chunk_init_row(p, b, c);
        if (q.dinit && ssd_chunk_first(p, c) && row >= 0)
          std::copy(gr.begin(), gr.end(), q.dinit + (row * g.H + h) * PN);
      }
    }
  });
}

// ---- B3: the chunk backward per (b, chunk, group), heads of the group in order.
template <typename T>
void chunk_bwd(const Geo& g, const SsdBwdParams& q) {
  const SsdParams& p = g.p;
  const int64_t Q = g.Q, P = g.P, N = g.N;
  torch::stable::parallel_for(0, p.batch * g.nc * g.G, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> cr(Q * N), br(Q * N), cb(Q * Q), xs(Q * P), dy(Q * P), dx(Q * P);
    std::vector<float> dB(Q * N), dC(Q * N), ddtp(Q), dcs(Q), tmp(P > N ? P : N), tmpn(N);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t gg = idx % g.G, c = (idx / g.G) % g.nc, b = idx / (g.G * g.nc);
      const int64_t len = g.len(c), t0 = g.t0(c);
      const int32_t prev = g.sid_prev(b, c), last = g.sid_last(b, c);
      load_rows<T>(p.C, g.C_off(b, t0, gg), p.C_sl, len, N, cr.data());
      load_rows<T>(p.B, g.B_off(b, t0, gg), p.B_sl, len, N, br.data());
      chunk_cb(g, len, cr.data(), br.data(), cb.data());
      std::fill(dB.begin(), dB.end(), 0.f);
      std::fill(dC.begin(), dC.end(), 0.f);
      for (int64_t h = gg * g.hpg; h < (gg + 1) * g.hpg; ++h) {
        const float* dtp = p.dtp + g.bhc(b, h, c);
        const float* cs = p.cs + g.bhc(b, h, c);
        const float* in = p.states + g.state(b, c, h);
        const float* dS = q.dstates + g.state(b, c, h);
        const int64_t part = (b * g.nc + c) * g.H + h;
        load_rows<T>(p.x, g.x_off(b, t0, h), p.x_sl, len, P, xs.data());
        // B0: dy = dout silu(z); dz = dout y_pre silu'(z); dD partial.
        for (int64_t pp = 0; pp < P; ++pp) q.dD_part[part * P + pp] = 0.f;
        for (int64_t i = 0; i < len; ++i) {
          for (int64_t pp = 0; pp < P; ++pp) {
            float d = ld<T>(q.dout, b * q.dout_sb + (t0 + i) * q.dout_sl + h * q.dout_sh + pp);
            if (p.z) {
              const float zv = ld<T>(p.z, g.z_off(b, t0 + i, h) + pp);
              const int64_t o = g.y_off(b, t0 + i, h) + pp;
              st<T>(q.dz, o, d * ld<T>(p.y_pre, o) * silu_grad(zv));
              d *= silu(zv);
            }
            dy[i * P + pp] = d;
            q.dD_part[part * P + pp] += d * xs[i * P + pp];
          }
        }
        std::fill(dx.begin(), dx.end(), 0.f);
        std::fill(ddtp.begin(), ddtp.end(), 0.f);
        std::fill(dcs.begin(), dcs.end(), 0.f);
        // Intra-chunk terms: W_ij = CB_ij exp(cs_i - cs_j) dt'_j (dy_i . x_j).
        for (int64_t i = 0; i < len; ++i) {
          const int32_t si = g.sid(b, t0 + i);
          for (int64_t j = 0; j <= i; ++j) {
            if (g.sid(b, t0 + j) != si) continue;
            float dyx = 0.f;
            for (int64_t pp = 0; pp < P; ++pp) dyx += dy[i * P + pp] * xs[j * P + pp];
            const float decay = expf(cs[i] - cs[j]);
            const float w = cb[i * Q + j] * decay * dtp[j] * dyx;
            dcs[i] += w;
            dcs[j] -= w;
            ddtp[j] += cb[i * Q + j] * decay * dyx;
            const float cx = cb[i * Q + j] * decay * dtp[j];
            for (int64_t pp = 0; pp < P; ++pp) dx[j * P + pp] += cx * dy[i * P + pp];
            const float cbc = decay * dtp[j] * dyx;
            for (int64_t n = 0; n < N; ++n) {
              dB[j * N + n] += cbc * cr[i * N + n];
              dC[i * N + n] += cbc * br[j * N + n];
            }
          }
        }
        // Chunk-state terms (through dS): U_j = exp(cs_last - cs_j) dt'_j x_j^T dS B_j.
        float usum = 0.f;
        for (int64_t j = 0; j < len; ++j) {
          if (g.sid(b, t0 + j) != last) continue;
          const float wj = expf(cs[Q - 1] - cs[j]);
          float xbds = 0.f;
          for (int64_t pp = 0; pp < P; ++pp) {
            float v = 0.f;
            for (int64_t n = 0; n < N; ++n) v += dS[pp * N + n] * br[j * N + n];
            tmp[pp] = v;  // (dS B_j)[p]
            xbds += xs[j * P + pp] * v;
          }
          const float u = wj * dtp[j] * xbds;
          usum += u;
          dcs[j] -= u;
          ddtp[j] += wj * xbds;
          for (int64_t pp = 0; pp < P; ++pp) dx[j * P + pp] += wj * dtp[j] * tmp[pp];
          for (int64_t n = 0; n < N; ++n) {
            float v = 0.f;
            for (int64_t pp = 0; pp < P; ++pp) v += dS[pp * N + n] * xs[j * P + pp];
            dB[j * N + n] += wj * dtp[j] * v;
          }
        }
        // Incoming-state terms: V_i = exp(cs_i) dy_i^T in C_i.
        for (int64_t i = 0; i < len; ++i) {
          if (g.sid(b, t0 + i) != prev) continue;
          const float e = expf(cs[i]);
          float v = 0.f;
          for (int64_t n = 0; n < N; ++n) {
            float a = 0.f;
            for (int64_t pp = 0; pp < P; ++pp) a += in[pp * N + n] * dy[i * P + pp];
            dC[i * N + n] += e * a;
            v += cr[i * N + n] * a;
          }
          dcs[i] += e * v;
        }
        dcs[Q - 1] += usum + q.dcs_last[(b * g.H + h) * g.nc + c];
        // Reverse cumsum of dcs -> d(dt'_j A); dt' and A gradients; the dt transform.
        float acc = 0.f, dA = 0.f, dbias = 0.f;
        const float bias = p.dt_bias ? p.dt_bias[h] : 0.f;
        for (int64_t j = Q - 1; j >= 0; --j) {
          acc += dcs[j];
          if (j >= len) continue;  // padding: dt' = 0, nothing to write
          dA += dtp[j] * acc;
          const float dd = ddtp[j] + p.A[h] * acc;
          const int64_t t = t0 + j;
          const float raw = p.dt[(b * p.seqlen + t) * g.H + h];
          const float ddt = dd * ssd_dt_grad(raw, bias, p.dt_softplus, p.dt_min, p.dt_max);
          q.ddt[(b * p.seqlen + t) * g.H + h] = ddt;
          dbias += ddt;
        }
        q.dA_part[part] = dA;
        q.dbias_part[part] = dbias;
        for (int64_t i = 0; i < len; ++i)
          for (int64_t pp = 0; pp < P; ++pp) {
            const float v = dx[i * P + pp] + d_at(p, h, pp) * dy[i * P + pp];
            st<T>(q.dx, g.y_off(b, t0 + i, h) + pp, v);
          }
      }
      for (int64_t i = 0; i < len; ++i)
        for (int64_t n = 0; n < N; ++n) {
          const int64_t o = ((b * p.seqlen + t0 + i) * g.G + gg) * N + n;
          st<T>(q.dB, o, dB[i * N + n]);
          st<T>(q.dC, o, dC[i * N + n]);
        }
    }
  });
}

// Fixed-order sums of the per-(b, chunk) partials.
void reduce_partials(const Geo& g, const SsdBwdParams& q) {
  const SsdParams& p = g.p;
  const int64_t rows = p.batch * g.nc, P = g.P;
  for (int64_t h = 0; h < g.H; ++h) {
    float a = 0.f, bias = 0.f;
    for (int64_t r = 0; r < rows; ++r) {
      a += q.dA_part[r * g.H + h];
      bias += q.dbias_part[r * g.H + h];
    }
    q.dA[h] = a;
    if (q.ddt_bias) q.ddt_bias[h] = bias;
    if (q.dD) {
      float tot = 0.f;
      for (int64_t pp = 0; pp < P; ++pp) {
        float s = 0.f;
        for (int64_t r = 0; r < rows; ++r) s += q.dD_part[(r * g.H + h) * P + pp];
        if (p.D_per_p) q.dD[h * P + pp] = s;
        tot += s;
      }
      if (!p.D_per_p) q.dD[h] = tot;
    }
  }
}

}  // namespace

void ssd_states_cpu(const SsdParams& p) {
  Geo g(p);
  chunk_cumsum(g);
  dispatch_dtype(p.dtype, [&]<typename T>() { chunk_state<T>(g); });
  state_passing(g);
}

void ssd_fwd_cpu(const SsdParams& p) {
  ssd_states_cpu(p);
  Geo g(p);
  dispatch_dtype(p.dtype, [&]<typename T>() {
    chunk_scan<T>(g);
    if (p.varlen_states && p.nseq > 0 && !p.chunk_plan) varlen_states<T>(g);  // with a plan: F3's
  });
}

void ssd_bwd_cpu(const SsdBwdParams& q) {
  ssd_states_cpu(q.fwd);
  Geo g(q.fwd);
  dispatch_dtype(q.fwd.dtype, [&]<typename T>() {
    chunk_dstates<T>(g, q);
    state_passing_bwd(g, q);
    chunk_bwd<T>(g, q);
  });
  reduce_partials(g, q);
}

}  // namespace nk
