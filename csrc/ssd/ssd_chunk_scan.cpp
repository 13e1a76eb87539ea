// Op entry points of the SSD chunk scan (mamba_chunk_scan_combined): argument checks (the one
// place they live), allocation of outputs, intermediates and CUDA workspace, and dispatch to
// the CPU or CUDA kernels. Registered in ssd_ops.cpp.
#include "ssd/ssd_chunk_scan.h"

#include <torch/csrc/stable/ops.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "common/check.h"
#include "common/device.h"
#include "common/tensor_utils.h"

namespace nk {
namespace {

constexpr const char* kOp = "mamba_chunk_scan_combined";

// Last dim contiguous (what the kernels need); a copy only when it is not.
Tensor unit_last(const Tensor& t) {
  return t.stride(t.dim() - 1) == 1 || t.size(t.dim() - 1) <= 1 ? t : torch::stable::contiguous(t);
}

struct Dims {
  int64_t b, L, H, P, G, N, Q, nc;
};

// Checks shared by forward and backward; returns the dimensions.
Dims check_args(const char* op, const Tensor& x, const Tensor& dt, const Tensor& A, const Tensor& B,
                const Tensor& C, int64_t chunk_size, const std::optional<Tensor>& D,
                const std::optional<Tensor>& z, const std::optional<Tensor>& dt_bias,
                const std::optional<Tensor>& init, const std::optional<Tensor>& seq_idx,
                double dt_min, double dt_max, int64_t plan_nseq = -1) {
  NK_CHECK(x.dim() == 4, op, ": x must be (batch, seqlen, nheads, headdim), got shape ", shape_str(x));
  check_float(op, "x", x);
  Dims d{};
  d.b = x.size(0), d.L = x.size(1), d.H = x.size(2), d.P = x.size(3);
  NK_CHECK(plan_nseq < 0 || d.b == 1, op, ": chunk_plan needs batch 1 (packed sequences), got batch ", d.b);
  NK_CHECK(B.dim() == 4, op, ": B must be (batch, seqlen, ngroups, dstate), got shape ", shape_str(B));
  d.G = B.size(2), d.N = B.size(3);
  NK_CHECK(d.G >= 1 && d.H % d.G == 0, op, ": nheads (", d.H, ") must be a multiple of ngroups (", d.G,
           "), from x ", shape_str(x), " and B ", shape_str(B));
  NK_CHECK(chunk_size >= 1, op, ": chunk_size must be positive, got ", chunk_size);
  d.Q = chunk_size;
  d.nc = d.L == 0 ? 0 : (d.L + d.Q - 1) / d.Q;
  check_shape(op, "dt", dt, {d.b, d.L, d.H});
  check_shape(op, "A", A, {d.H});
  check_shape(op, "B", B, {d.b, d.L, d.G, d.N});
  check_shape(op, "C", C, {d.b, d.L, d.G, d.N});
  check_float(op, "dt", dt, x, "x");
  check_float(op, "A", A, x, "x");
  check_dtype_and_device(op, "B", B, x, "x");
  check_dtype_and_device(op, "C", C, x, "x");
  if (z) check_like(op, "z", *z, x, "x");
  if (D) {
    NK_CHECK((D->dim() == 1 && D->size(0) == d.H) || (D->dim() == 2 && D->size(0) == d.H && D->size(1) == d.P),
             op, ": D must have shape (", d.H, ",) or (", d.H, ", ", d.P, "), got ", shape_str(*D));
    check_float(op, "D", *D, x, "x");
  }
  if (dt_bias) {
    check_shape(op, "dt_bias", *dt_bias, {d.H});
    check_float(op, "dt_bias", *dt_bias, x, "x");
  }
  if (init) {
    if (plan_nseq >= 0) {  // packed sequences: one row per sequence, or one for the first (mamba_ssm)
      NK_CHECK(init->dim() == 4 && (init->size(0) == plan_nseq || init->size(0) == 1) && init->size(1) == d.H &&
                   init->size(2) == d.P && init->size(3) == d.N,
               op, ": with cu_seqlens, initial_states must be (num_sequences, nheads, headdim, dstate) = (",
               plan_nseq, ", ", d.H, ", ", d.P, ", ", d.N, ") or (1, ", d.H, ", ", d.P, ", ", d.N,
               ") (the first sequence only), got ", shape_str(*init));
    } else {
      check_shape(op, "initial_states", *init, {d.b, d.H, d.P, d.N});
    }
    check_float(op, "initial_states", *init, x, "x");
  }
  if (seq_idx) {
    check_shape(op, "seq_idx", *seq_idx, {d.b, d.L});
    check_dtype(op, "seq_idx", *seq_idx, {ScalarType::Int});
    check_same_device(op, "seq_idx", *seq_idx, x, "x");
    if (!seq_idx->is_cuda() && d.L > 0) {
      // Only checkable without a host sync on the CPU; on CUDA the ids are used as given
      // (any values are memory-safe: they are only compared for equality).
      Tensor s = torch::stable::contiguous(*seq_idx);
      const int32_t* v = static_cast<const int32_t*>(s.data_ptr());
      for (int64_t bb = 0; bb < d.b; ++bb)
        for (int64_t t = 0; t < d.L; ++t) {
          const int32_t cur = v[bb * d.L + t];
          NK_CHECK(cur >= 0 && (t == 0 || cur >= v[bb * d.L + t - 1]), op,
                   ": seq_idx must be non-negative and non-decreasing along each row; row ", bb,
                   " has ", cur, " at position ", t);
        }
    }
  }
  NK_CHECK(!(dt_min > dt_max) && !std::isnan(dt_min) && !std::isnan(dt_max), op,
           ": dt_limit must be (min, max) with min <= max, got (", dt_min, ", ", dt_max, ")");
  if (x.is_cuda()) {
    NK_CHECK(ssd_cuda_supports(d.Q, d.P, d.N), op,
             ": the CUDA kernels need chunk_size in {64, 128, 256}, headdim a multiple of 8 up to 128 "
             "and dstate a multiple of 8 up to 256; got chunk_size ", d.Q, ", headdim ", d.P,
             ", dstate ", d.N, " (the CPU path takes any)");
  }
  return d;
}

// cu_seqlens against the sequence length and seq_idx (CPU only: the values are read on the
// host; on CUDA that would need a device sync, and the kernels clamp every bound instead).
// cu and sid are contiguous int32; seq_idx is already known non-decreasing.
void check_cu_seqlens(const char* op, const Tensor& cu, const Tensor& sid, int64_t L) {
  const int32_t* c = static_cast<const int32_t*>(cu.data_ptr());
  const int32_t* s = static_cast<const int32_t*>(sid.data_ptr());
  const int64_t n = cu.size(0);
  NK_CHECK(c[0] == 0, op, ": cu_seqlens[0] must be 0, got ", c[0]);
  for (int64_t i = 1; i < n; ++i)
    NK_CHECK(c[i] >= c[i - 1], op, ": cu_seqlens must be non-decreasing, got cu_seqlens[", i, "] = ", c[i],
             " < cu_seqlens[", i - 1, "] = ", c[i - 1]);
  NK_CHECK(c[n - 1] == L, op, ": cu_seqlens[-1] must be seqlen = ", L, " (x.shape[1]), got ", c[n - 1]);
  // seq_idx must change exactly where a non-empty sequence starts.
  for (int64_t i = 0; i + 1 < n; ++i) {
    const int64_t start = c[i], end = c[i + 1];
    if (start == end) continue;
    NK_CHECK(start == 0 || s[start] != s[start - 1], op, ": seq_idx disagrees with cu_seqlens: sequence ", i,
             " starts at position ", start, " (cu_seqlens[", i, "]), so seq_idx[0, ", start,
             "] must differ from seq_idx[0, ", start - 1, "], got ", s[start], " for both");
    for (int64_t t = start + 1; t < end; ++t)
      NK_CHECK(s[t] == s[start], op, ": seq_idx disagrees with cu_seqlens: sequence ", i, " spans positions ",
               start, "..", end - 1, " (cu_seqlens[", i, "], cu_seqlens[", i + 1, "]), so seq_idx must be ",
               s[start], " there, got ", s[t], " at position ", t);
  }
}

// The chunk plan of packed sequences (chunks aligned to each sequence's start): shape and
// dtype everywhere, and on the CPU its values against cu_seqlens (sequence s's chunks start at
// cu[s], cu[s] + Q, ... below cu[s + 1]; then empty chunks at L). Returns the chunk count.
// On CUDA the values are used as given: the kernels clamp every one (ssd_chunk_* helpers).
int64_t check_chunk_plan(const char* op, const Tensor& plan, const std::optional<Tensor>& cu_seqlens,
                         const std::optional<Tensor>& seq_idx, const Tensor& x, int64_t Q) {
  NK_CHECK(cu_seqlens.has_value(), op, ": chunk_plan needs cu_seqlens, got None");
  NK_CHECK(!seq_idx.has_value(), op, ": chunk_plan replaces seq_idx (each chunk holds one sequence); got both");
  NK_CHECK(x.size(0) == 1, op, ": chunk_plan needs batch 1 (packed sequences), got batch ", x.size(0));
  check_tensor(op, "cu_seqlens", *cu_seqlens, {-1}, {ScalarType::Int}, x, "x");
  check_size_at_least(op, "cu_seqlens", *cu_seqlens, 0, 1, "num_sequences + 1");
  check_tensor(op, "chunk_plan", plan, {2, -1}, {ScalarType::Int}, x, "x");
  check_size_at_least(op, "chunk_plan", plan, 1, 2, "num_chunks + 1");
  const int64_t nc = plan.size(1) - 1, L = x.size(1), S = cu_seqlens->size(0) - 1;
  if (!x.is_cuda()) {
    Tensor cc = torch::stable::contiguous(*cu_seqlens), pc = torch::stable::contiguous(plan);
    const int32_t* cu = static_cast<const int32_t*>(cc.data_ptr());
    const int32_t* st = static_cast<const int32_t*>(pc.data_ptr());
    const int32_t* sq = st + nc + 1;
    NK_CHECK(cu[0] == 0, op, ": cu_seqlens[0] must be 0, got ", cu[0]);
    NK_CHECK(cu[S] == L, op, ": cu_seqlens[-1] must be seqlen = ", L, " (x.shape[1]), got ", cu[S]);
    int64_t k = 0;
    auto expect = [&](int64_t start, int64_t seq) {
      NK_CHECK(k < nc && st[k] == start && sq[k] == seq, op, ": chunk_plan does not match cu_seqlens at chunk ",
               k, " (expected start ", start, ", sequence ", seq, "); build it with "
               "nemokernels.ssd.ssd_chunk_scan.chunk_plan");
      ++k;
    };
    for (int64_t s = 0; s < S; ++s) {
      NK_CHECK(cu[s + 1] >= cu[s], op, ": cu_seqlens must be non-decreasing, got cu_seqlens[", s + 1, "] = ",
               cu[s + 1], " < cu_seqlens[", s, "] = ", cu[s]);
      for (int64_t t = cu[s]; t < cu[s + 1]; t += Q) expect(t, s);
    }
    while (k < nc) expect(L, S);
    NK_CHECK(st[nc] == L && sq[nc] == S, op, ": chunk_plan must end with (", L, ", ", S, "), got (", st[nc],
             ", ", sq[nc], ")");
  }
  return nc;
}

std::optional<Tensor> float_opt(const std::optional<Tensor>& t) {
  return t ? std::optional<Tensor>(contiguous_float(*t)) : std::nullopt;
}

const float* fptr(const std::optional<Tensor>& t) {
  return t ? static_cast<const float*>(t->data_ptr()) : nullptr;
}

// Tensors the params point into; kept alive for the call.
struct Prepared {
  Tensor x, B, C, dt32, A32;
  std::optional<Tensor> z, D32, bias32, init32, seq, plan, cu;
  Tensor dtp, cs, states;
};

Prepared prepare(SsdParams& p, const Dims& d, const Tensor& x, const Tensor& dt, const Tensor& A,
                 const Tensor& B, const Tensor& C, const std::optional<Tensor>& D,
                 const std::optional<Tensor>& z, const std::optional<Tensor>& dt_bias,
                 const std::optional<Tensor>& init, const std::optional<Tensor>& seq_idx,
                 bool dt_softplus, double dt_min, double dt_max, const std::optional<Tensor>& plan,
                 const std::optional<Tensor>& cu_seqlens) {
  Prepared r{unit_last(x), unit_last(B), unit_last(C), contiguous_float(dt), contiguous_float(A)};
  r.z = z ? std::optional<Tensor>(unit_last(*z)) : std::nullopt;
  r.D32 = float_opt(D), r.bias32 = float_opt(dt_bias), r.init32 = float_opt(init);
  r.seq = seq_idx ? std::optional<Tensor>(torch::stable::contiguous(*seq_idx)) : std::nullopt;
  p.batch = d.b, p.seqlen = d.L, p.nheads = d.H, p.headdim = d.P, p.ngroups = d.G, p.dstate = d.N;
  p.chunk_size = d.Q, p.nchunks = d.nc;
  p.dtype = to_dtype(x.scalar_type());
  p.x = r.x.data_ptr(), p.x_sb = r.x.stride(0), p.x_sl = r.x.stride(1), p.x_sh = r.x.stride(2);
  p.B = r.B.data_ptr(), p.B_sb = r.B.stride(0), p.B_sl = r.B.stride(1), p.B_sg = r.B.stride(2);
  p.C = r.C.data_ptr(), p.C_sb = r.C.stride(0), p.C_sl = r.C.stride(1), p.C_sg = r.C.stride(2);
  if (r.z) p.z = r.z->data_ptr(), p.z_sb = r.z->stride(0), p.z_sl = r.z->stride(1), p.z_sh = r.z->stride(2);
  p.dt = static_cast<const float*>(r.dt32.data_ptr());
  p.A = static_cast<const float*>(r.A32.data_ptr());
  p.D = fptr(r.D32);
  p.D_per_p = D && D->dim() == 2;
  p.dt_bias = fptr(r.bias32);
  p.dt_softplus = dt_softplus;
  p.dt_min = static_cast<float>(dt_min), p.dt_max = static_cast<float>(dt_max);
  p.seq_idx = r.seq ? static_cast<const int32_t*>(r.seq->data_ptr()) : nullptr;
  p.init = fptr(r.init32);
  p.init_rows = init ? init->size(0) : 0;
  r.dtp = new_empty(x, {d.b, d.H, d.nc, d.Q}, ScalarType::Float);
  r.cs = new_empty(x, {d.b, d.H, d.nc, d.Q}, ScalarType::Float);
  r.states = new_empty(x, {d.b, d.nc, d.H, d.P, d.N}, ScalarType::Float);
  if (plan) {  // packed sequences, chunks aligned to their starts (check_chunk_plan ran)
    r.plan = torch::stable::contiguous(*plan);
    r.cu = torch::stable::contiguous(*cu_seqlens);
    p.chunk_plan = static_cast<const int32_t*>(r.plan->data_ptr());
    p.cu_seqlens = static_cast<const int32_t*>(r.cu->data_ptr());
    p.nseq = cu_seqlens->size(0) - 1;
  }
  p.dtp = static_cast<float*>(r.dtp.data_ptr());
  p.cs = static_cast<float*>(r.cs.data_ptr());
  p.states = static_cast<float*>(r.states.data_ptr());
  return r;
}

Tensor workspace_tensor(const Tensor& like, int64_t bytes) {
  return new_empty(like, {(bytes + 3) / 4}, ScalarType::Float);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> ssd_chunk_scan_fwd(
    Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int64_t chunk_size, std::optional<Tensor> D,
    std::optional<Tensor> z, std::optional<Tensor> dt_bias, std::optional<Tensor> initial_states,
    std::optional<Tensor> seq_idx, std::optional<Tensor> cu_seqlens, bool dt_softplus, double dt_min,
    double dt_max, bool return_final_states, bool return_varlen_states, bool save_y_pre,
    bool return_chunk_states, std::optional<Tensor> chunk_plan) {
  const int64_t plan_nseq = chunk_plan && cu_seqlens ? cu_seqlens->size(0) - 1 : -1;
  Dims d = check_args(kOp, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_min, dt_max,
                      plan_nseq);
  if (chunk_plan) d.nc = check_chunk_plan(kOp, *chunk_plan, cu_seqlens, seq_idx, x, d.Q);
  int64_t nseq = 0;
  if (return_varlen_states) {
    NK_CHECK(cu_seqlens.has_value(), kOp, ": return_varlen_states needs cu_seqlens, got None");
    NK_CHECK(chunk_plan || seq_idx.has_value(), kOp,
             ": return_varlen_states needs seq_idx (the packed sequences' ids) or chunk_plan, got neither");
    NK_CHECK(d.b == 1, kOp, ": return_varlen_states needs batch 1 (packed sequences), got batch ", d.b);
    check_tensor(kOp, "cu_seqlens", *cu_seqlens, {-1}, {ScalarType::Int}, x, "x");
    check_size_at_least(kOp, "cu_seqlens", *cu_seqlens, 0, 1, "num_sequences + 1");
    nseq = cu_seqlens->size(0) - 1;
    if (!x.is_cuda() && !chunk_plan)
      check_cu_seqlens(kOp, torch::stable::contiguous(*cu_seqlens), torch::stable::contiguous(*seq_idx), d.L);
  }
  OptionalDeviceGuard guard(x);
  SsdParams p{};
  Prepared r = prepare(p, d, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_softplus, dt_min, dt_max,
                       chunk_plan, cu_seqlens);
  Tensor y = new_empty(x, {d.b, d.L, d.H, d.P}, x.scalar_type());
  const bool keep_pre = z.has_value() && save_y_pre;
  Tensor y_pre = new_empty(x, {keep_pre ? d.b : 0, d.L, d.H, d.P}, x.scalar_type());
  Tensor fin = new_empty(x, {return_final_states ? d.b : 0, d.H, d.P, d.N}, ScalarType::Float);
  Tensor var = new_empty(x, {nseq, d.H, d.P, d.N}, ScalarType::Float);
  std::optional<Tensor> cu;
  p.y = y.data_ptr();
  p.y_pre = keep_pre ? y_pre.data_ptr() : nullptr;
  p.final_states = return_final_states ? static_cast<float*>(fin.data_ptr()) : nullptr;
  if (return_varlen_states) {
    cu = torch::stable::contiguous(*cu_seqlens);
    p.cu_seqlens = static_cast<const int32_t*>(cu->data_ptr());
    p.nseq = nseq;
    p.varlen_states = static_cast<float*>(var.data_ptr());
  }
  if (d.b * d.H == 0 || d.L == 0) {
    // No positions: the final (and every varlen) state is the initial state (or zero). With
    // a plan no sequence holds position L - 1: final_states are zeros, and each (empty)
    // sequence keeps its own initial state.
    if (return_final_states) {
      if (r.init32 && !chunk_plan) torch::stable::copy_(fin, *r.init32);
      else torch::stable::zero_(fin);
    }
    torch::stable::zero_(var);
    if (chunk_plan && r.init32 && nseq > 0 && d.H > 0) {
      const int64_t rows = r.init32->size(0);
      Tensor head = torch::stable::narrow(var, 0, 0, rows);
      torch::stable::copy_(head, *r.init32);
    }
    // (No elements either way: no positions, or no batch entries / heads.)
    return {y, y_pre, fin, var,
            new_empty(x, {return_chunk_states ? d.b : 0, d.L > 0 ? d.nc : 0, d.H, d.P, d.N}, ScalarType::Float)};
  }
  std::optional<Tensor> ws, states_lp;
#ifdef NK_WITH_CUDA
  if (x.is_cuda()) {
    if (ssd_fwd_cuda_output_sm90(p)) {
      // The sm_90a chunk output reads the entering states in the activation dtype, written by the
      // state chain; the float32 ones only exist where something else reads them (the returned
      // chunk states, F5's varlen states): else the chain passes its tiles through the workspace.
      const bool f5 = return_varlen_states && !chunk_plan;
      if (!return_chunk_states && !f5) {  // freed before the activation-dtype copy is allocated
        r.states = new_empty(x, {0}, ScalarType::Float);
        p.states = nullptr;
      }
      states_lp = new_empty(x, {d.b, d.nc, d.H, d.P, d.N}, x.scalar_type());
      p.states_lp = states_lp->data_ptr();
    }
    ws = workspace_tensor(x, ssd_fwd_cuda_workspace_bytes(p));
    p.workspace = ws->data_ptr();
  }
#endif
  NK_ROUTE_BY_DEVICE(x, kOp, ssd_fwd_cpu(p), ssd_fwd_cuda(p, stream));
  // The state entering each chunk (F3's output, which F4 read): a buffer of this call, handed
  // out instead of freed when asked for (prefix caching).
  Tensor entering = return_chunk_states ? r.states : new_empty(x, {0, d.nc, d.H, d.P, d.N}, ScalarType::Float);
  return {y, y_pre, fin, var, entering};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> ssd_chunk_scan_bwd(
    Tensor dout, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, int64_t chunk_size,
    std::optional<Tensor> D, std::optional<Tensor> z, std::optional<Tensor> y_pre,
    std::optional<Tensor> dt_bias, std::optional<Tensor> initial_states, std::optional<Tensor> seq_idx,
    std::optional<Tensor> dfinal_states, bool dt_softplus, double dt_min, double dt_max,
    bool return_dinitial_states, std::optional<Tensor> cu_seqlens, std::optional<Tensor> chunk_plan) {
  const char* op = "mamba_chunk_scan_combined (backward)";
  const int64_t plan_nseq = chunk_plan && cu_seqlens ? cu_seqlens->size(0) - 1 : -1;
  Dims d = check_args(op, x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, dt_min, dt_max,
                      plan_nseq);
  if (chunk_plan) d.nc = check_chunk_plan(op, *chunk_plan, cu_seqlens, seq_idx, x, d.Q);
  check_like(op, "dout", dout, x, "x");
  if (z) {
    NK_CHECK(y_pre.has_value(), op, ": y_pre (the ungated output saved by the forward) must be given with z, "
             "got None");
    check_like(op, "y_pre", *y_pre, x, "x");
  }
  if (dfinal_states) {
    check_shape(op, "dfinal_states", *dfinal_states, {d.b, d.H, d.P, d.N});
    check_float(op, "dfinal_states", *dfinal_states, x, "x");
  }
  NK_CHECK(!return_dinitial_states || initial_states.has_value(), op,
           ": return_dinitial_states needs initial_states, got None");
  OptionalDeviceGuard guard(x);
  SsdBwdParams q{};
  Prepared r = prepare(q.fwd, d, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, dt_softplus,
                       dt_min, dt_max, chunk_plan, cu_seqlens);
  Tensor dout_u = unit_last(dout);
  std::optional<Tensor> ypre_c, dfin32;
  if (z) {
    ypre_c = torch::stable::contiguous(*y_pre);
    q.fwd.y_pre = ypre_c->data_ptr();  // read only in the backward
  }
  if (dfinal_states) dfin32 = contiguous_float(*dfinal_states);
  q.dout = dout_u.data_ptr();
  q.dout_sb = dout_u.stride(0), q.dout_sl = dout_u.stride(1), q.dout_sh = dout_u.stride(2);
  q.dfinal = fptr(dfin32);

  const ScalarType act = x.scalar_type();
  Tensor dx = new_empty(x, {d.b, d.L, d.H, d.P}, act);
  Tensor dz = new_empty(x, {z ? d.b : 0, d.L, d.H, d.P}, act);
  Tensor dB = new_empty(x, {d.b, d.L, d.G, d.N}, act);
  Tensor dC = new_empty(x, {d.b, d.L, d.G, d.N}, act);
  Tensor ddt = new_empty(x, {d.b, d.L, d.H}, ScalarType::Float);
  Tensor dA = new_empty(x, {d.H}, ScalarType::Float);
  Tensor dD = D ? new_empty(x, D->dim() == 2 ? std::vector<int64_t>{d.H, d.P} : std::vector<int64_t>{d.H},
                            ScalarType::Float)
                : new_empty(x, {0}, ScalarType::Float);
  Tensor dbias = new_empty(x, {dt_bias ? d.H : 0}, ScalarType::Float);
  const int64_t init_rows = initial_states ? initial_states->size(0) : d.b;
  Tensor dinit = new_empty(x, {return_dinitial_states ? init_rows : 0, d.H, d.P, d.N}, ScalarType::Float);
  // With a plan only the rows of sequences that have positions are written by the kernels.
  if (chunk_plan && return_dinitial_states) torch::stable::zero_(dinit);
  q.dx = dx.data_ptr();
  q.dz = z ? dz.data_ptr() : nullptr;
  q.dB = dB.data_ptr(), q.dC = dC.data_ptr();
  q.ddt = static_cast<float*>(ddt.data_ptr());
  q.dA = static_cast<float*>(dA.data_ptr());
  q.dD = D ? static_cast<float*>(dD.data_ptr()) : nullptr;
  q.ddt_bias = dt_bias ? static_cast<float*>(dbias.data_ptr()) : nullptr;
  q.dinit = return_dinitial_states ? static_cast<float*>(dinit.data_ptr()) : nullptr;

  auto cast_back = [](const Tensor& g, const std::optional<Tensor>& like) {
    return (!like || like->scalar_type() == ScalarType::Float) ? g : torch::stable::to(g, like->scalar_type());
  };
  auto finish = [&]() {
    return std::make_tuple(dx, cast_back(ddt, dt), cast_back(dA, A), dB, dC, cast_back(dD, D), dz,
                           cast_back(dbias, dt_bias), cast_back(dinit, initial_states));
  };
  if (d.b * d.H == 0 || d.L == 0) {
    // No positions: every parameter gradient is zero; the state gradient passes through.
    torch::stable::zero_(dA);
    torch::stable::zero_(dD);
    torch::stable::zero_(dbias);
    if (return_dinitial_states) {
      if (dfin32 && !chunk_plan) torch::stable::copy_(dinit, *dfin32);
      else torch::stable::zero_(dinit);  // with a plan final_states do not depend on them here
    }
    if (d.L == 0 || d.b == 0) return finish();
    // b * H == 0 with positions: nothing else to fill.
    return finish();
  }
  Tensor dstates = new_empty(x, {d.b, d.nc, d.H, d.P, d.N}, ScalarType::Float);
  Tensor dcs_last = new_empty(x, {d.b, d.H, d.nc}, ScalarType::Float);
  Tensor dA_part = new_empty(x, {d.b, d.nc, d.H}, ScalarType::Float);
  Tensor dbias_part = new_empty(x, {d.b, d.nc, d.H}, ScalarType::Float);
  Tensor dD_part = new_empty(x, {d.b, d.nc, d.H, d.P}, ScalarType::Float);
  q.dstates = static_cast<float*>(dstates.data_ptr());
  q.dcs_last = static_cast<float*>(dcs_last.data_ptr());
  q.dA_part = static_cast<float*>(dA_part.data_ptr());
  q.dbias_part = static_cast<float*>(dbias_part.data_ptr());
  q.dD_part = static_cast<float*>(dD_part.data_ptr());
  std::optional<Tensor> ws;
#ifdef NK_WITH_CUDA
  if (x.is_cuda()) {
    ws = workspace_tensor(x, ssd_bwd_cuda_workspace_bytes(q));
    q.workspace = ws->data_ptr();
  }
#endif
  NK_ROUTE_BY_DEVICE(x, op, ssd_bwd_cpu(q), ssd_bwd_cuda(q, stream));
  return finish();
}

}  // namespace nk
