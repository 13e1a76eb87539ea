// Op entry points of causal_conv1d: argument checks (the one place they live), output
// allocation, and dispatch to the CPU or CUDA kernels. Registered in ssd_ops.cpp.
#include "ssd/causal_conv1d.h"

#include <optional>
#include <tuple>

#include "common/check.h"
#include "common/device.h"
#include "common/tensor_utils.h"

namespace nk {
namespace {

constexpr const char* kFwd = "causal_conv1d_fn";
constexpr const char* kUpd = "causal_conv1d_update";

// weight (dim, width) and bias (dim,) against x (batch, dim, ...); returns the width.
int64_t check_weight_bias(const char* op, const Tensor& x, const Tensor& weight,
                          const std::optional<Tensor>& bias) {
  const int64_t dim = x.size(1);
  check_tensor(op, "weight", weight, {dim, -1}, kFloatTypes, x, "x");
  const int64_t width = weight.size(1);
  NK_CHECK(width >= 2 && width <= 4, op, ": weight.shape[1] (the conv width) must be 2, 3 or 4, got ",
           width);
  if (bias) check_tensor(op, "bias", *bias, {dim}, kFloatTypes, x, "x");
  return width;
}

// Checks shared by forward and backward; returns (batch, dim, seqlen, width).
std::tuple<int64_t, int64_t, int64_t, int> check_conv_args(
    const char* op, const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
    const std::optional<Tensor>& seq_idx, const std::optional<Tensor>& init) {
  check_dim(op, "x", x, 3);
  check_float(op, "x", x);
  const int64_t batch = x.size(0), dim = x.size(1), seqlen = x.size(2);
  const int64_t width = check_weight_bias(op, x, weight, bias);
  if (seq_idx) {
    check_tensor(op, "seq_idx", *seq_idx, {batch, seqlen}, {ScalarType::Int}, x, "x");
    NK_CHECK(!init, op, ": initial_states must be None when seq_idx is given "
             "(as in causal-conv1d: packed sequences start from zero state)");
  }
  if (init) {
    check_tensor(op, "initial_states", *init, {batch, dim, width - 1}, {}, x, "x");
    check_same_dtype(op, "initial_states", *init, x, "x");
  }
  return {batch, dim, seqlen, static_cast<int>(width)};
}

// weight (dim, width) / bias (dim,) as they lie: their dtype and strides go to the kernels,
// which convert on load (no per-call float32 copies, no extra launches).
template <typename P>
void set_weight_bias(P& p, const Tensor& weight, const std::optional<Tensor>& bias) {
  p.weight = weight.data_ptr();
  p.w_dtype = to_dtype(weight.scalar_type());
  p.w_sc = weight.stride(0), p.w_sk = weight.stride(1);
  if (bias) {
    p.bias = bias->data_ptr();
    p.b_dtype = to_dtype(bias->scalar_type());
    p.b_s = bias->stride(0);
  }
}

Conv1dFwdParams make_fwd_params(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                                const std::optional<Tensor>& seq_idx,
                                const std::optional<Tensor>& init, bool silu) {
  Conv1dFwdParams p{};
  p.batch = x.size(0);
  p.dim = x.size(1);
  p.seqlen = x.size(2);
  p.width = static_cast<int>(weight.size(1));
  p.dtype = to_dtype(x.scalar_type());
  p.silu = silu;
  p.x = x.data_ptr();
  p.x_sb = x.stride(0), p.x_sc = x.stride(1), p.x_st = x.stride(2);
  set_weight_bias(p, weight, bias);
  if (seq_idx) {
    p.seq_idx = static_cast<const int32_t*>(seq_idx->data_ptr());
    p.seq_sb = seq_idx->stride(0), p.seq_st = seq_idx->stride(1);
  }
  if (init) {
    p.init = init->data_ptr();
    p.init_sb = init->stride(0), p.init_sc = init->stride(1), p.init_sj = init->stride(2);
  }
  return p;
}

}  // namespace

std::tuple<Tensor, Tensor> causal_conv1d_fwd(Tensor x, Tensor weight, std::optional<Tensor> bias,
                                             std::optional<Tensor> seq_idx,
                                             std::optional<Tensor> initial_states,
                                             bool return_final_states, bool silu) {
  auto [batch, dim, seqlen, width] = check_conv_args(kFwd, x, weight, bias, seq_idx, initial_states);
  NK_CHECK(!(seq_idx && return_final_states), kFwd,
           ": return_final_states is not supported with seq_idx (the final state of a packed "
           "row mixes sequences)");
  OptionalDeviceGuard guard(x);
  Conv1dFwdParams p = make_fwd_params(x, weight, bias, seq_idx, initial_states, silu);
  Tensor out = empty_bcl(x, batch, dim, seqlen, x.scalar_type());
  p.out = out.data_ptr();
  p.out_sb = out.stride(0), p.out_sc = out.stride(1), p.out_st = out.stride(2);
  Tensor fin = new_empty(x, {return_final_states ? batch : 0, dim, width - 1}, x.scalar_type());
  if (return_final_states) {
    p.final_states = fin.data_ptr();
    p.fin_sb = fin.stride(0), p.fin_sc = fin.stride(1), p.fin_sj = fin.stride(2);
  }
  if (batch * dim == 0) return {out, fin};
  NK_ROUTE_BY_DEVICE(x, kFwd, causal_conv1d_fwd_cpu(p), causal_conv1d_fwd_cuda(p, stream));
  return {out, fin};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> causal_conv1d_bwd(
    Tensor x, Tensor weight, std::optional<Tensor> bias, Tensor dout,
    std::optional<Tensor> seq_idx, std::optional<Tensor> initial_states,
    std::optional<Tensor> dfinal_states, bool return_dinitial_states, bool silu) {
  const char* op = "causal_conv1d_fn (backward)";
  auto [batch, dim, seqlen, width] = check_conv_args(op, x, weight, bias, seq_idx, initial_states);
  check_dim(op, "dout", dout, 3);
  check_like(op, "dout", dout, x, "x");
  if (dfinal_states) {
    NK_CHECK(!seq_idx, op, ": dfinal_states must be None when seq_idx is given (the forward returns no "
             "final states with seq_idx)");
    check_shape(op, "dfinal_states", *dfinal_states, {batch, dim, width - 1});
    check_dtype_and_device(op, "dfinal_states", *dfinal_states, x, "x");
  }
  NK_CHECK(!(seq_idx && return_dinitial_states), op, ": return_dinitial_states must be False when seq_idx "
           "is given (packed sequences start from zero state, there is no initial state to differentiate)");
  OptionalDeviceGuard guard(x);
  Conv1dBwdParams q{};
  q.fwd = make_fwd_params(x, weight, bias, seq_idx, initial_states, silu);
  q.dout = dout.data_ptr();
  q.dout_sb = dout.stride(0), q.dout_sc = dout.stride(1), q.dout_st = dout.stride(2);
  if (dfinal_states) {
    q.dfinal = dfinal_states->data_ptr();
    q.dfin_sb = dfinal_states->stride(0), q.dfin_sc = dfinal_states->stride(1),
    q.dfin_sj = dfinal_states->stride(2);
  }
  Tensor dx = empty_bcl(x, batch, dim, seqlen, x.scalar_type());
  q.dx = dx.data_ptr();
  q.dx_sb = dx.stride(0), q.dx_sc = dx.stride(1), q.dx_st = dx.stride(2);
  Tensor dinit = new_empty(x, {return_dinitial_states ? batch : 0, dim, width - 1}, x.scalar_type());
  if (return_dinitial_states) {
    q.dinit = dinit.data_ptr();
    q.dinit_sb = dinit.stride(0), q.dinit_sc = dinit.stride(1), q.dinit_sj = dinit.stride(2);
  }
  // dweight / dbias in the dtypes of weight / bias, written by the kernels' final reduction.
  Tensor dweight = new_empty(x, {dim, width}, weight.scalar_type());
  Tensor dbias = new_empty(x, {bias ? dim : 0}, bias ? bias->scalar_type() : ScalarType::Float);
  q.dweight = dweight.data_ptr();
  q.dbias = bias ? dbias.data_ptr() : nullptr;
  if (batch * dim == 0 || seqlen == 0) {
    // Nothing to convolve: no weight/bias gradient; the state gradient passes straight
    // through (with no new input the final states are the initial states).
    torch::stable::zero_(dweight);
    torch::stable::zero_(dbias);
    if (return_dinitial_states) {
      if (dfinal_states) torch::stable::copy_(dinit, *dfinal_states);
      else torch::stable::zero_(dinit);
    }
    return {dx, dweight, dbias, dinit};
  }
  // Partial-sum rows of dweight/dbias: one per (batch, time chunk) on the CPU; the CUDA
  // launcher picks its own count from its grid.
  q.num_partials = batch * ((seqlen + kConvBwdChunk - 1) / kConvBwdChunk);
#ifdef NK_WITH_CUDA
  if (x.is_cuda()) q.num_partials = causal_conv1d_bwd_cuda_num_partials(q);
#endif
  Tensor partials = new_empty(x, {q.num_partials, dim, width + 1}, ScalarType::Float);
  q.partials = static_cast<float*>(partials.data_ptr());
  NK_ROUTE_BY_DEVICE(x, op, causal_conv1d_bwd_cpu(q), causal_conv1d_bwd_cuda(q, stream));
  return {dx, dweight, dbias, dinit};
}

Tensor causal_conv1d_update(Tensor x, Tensor conv_state, Tensor weight, std::optional<Tensor> bias,
                            bool silu, std::optional<Tensor> conv_state_indices, std::optional<Tensor> parents) {
  const char* op = kUpd;
  NK_CHECK(x.dim() == 2 || x.dim() == 3, op, ": x must be (batch, dim) or (batch, dim, seqlen), got shape ",
           shape_str(x));
  check_float(op, "x", x);
  const int64_t batch = x.size(0), dim = x.size(1), seqlen = x.dim() == 3 ? x.size(2) : 1;
  const int64_t width = check_weight_bias(op, x, weight, bias);
  check_tensor(op, "conv_state", conv_state, {-1, dim, -1}, {}, x, "x");
  check_same_dtype(op, "conv_state", conv_state, x, "x");
  check_size_at_least(op, "conv_state", conv_state, 2, width - 1, "width - 1");
  // conv_state is updated in place: every element its own address, and no overlap with what
  // is read meanwhile.
  check_writable(op, "conv_state", conv_state);
  check_no_overlap(op, "conv_state", conv_state, "x", x);
  check_no_overlap(op, "conv_state", conv_state, "weight", weight);
  if (bias) check_no_overlap(op, "conv_state", conv_state, "bias", *bias);
  std::optional<Tensor> idx;
  if (conv_state_indices) {
    check_tensor(op, "conv_state_indices", *conv_state_indices, {batch}, {ScalarType::Int}, x, "x");
    check_no_overlap(op, "conv_state", conv_state, "conv_state_indices", *conv_state_indices);
    idx = torch::stable::contiguous(*conv_state_indices);
    if (!x.is_cuda())
      check_state_indices(op, "conv_state_indices", *idx, "conv_state", conv_state.size(0));
  } else {
    check_size_at_least(op, "conv_state", conv_state, 0, batch, "batch, when conv_state_indices is None");
  }
  std::optional<Tensor> par;
  if (parents) {
    NK_CHECK(x.dim() == 3, op, ": parents (tree drafts) needs x as (batch, dim, seqlen), got shape ", shape_str(x));
    check_tensor(op, "parents", *parents, {batch, seqlen}, {ScalarType::Int}, x, "x");
    par = torch::stable::contiguous(*parents);
    if (!x.is_cuda()) check_parents(op, *par, "conv_state");  // on CUDA a window meeting a bad parent is NaN
  }
  OptionalDeviceGuard guard(x);
  Tensor out = new_empty(x, x.dim() == 3 ? std::vector<int64_t>{batch, dim, seqlen}
                                         : std::vector<int64_t>{batch, dim}, x.scalar_type());
  Conv1dUpdateParams p{};
  p.batch = batch, p.dim = dim, p.seqlen = seqlen, p.state_len = conv_state.size(2);
  p.width = static_cast<int>(width);
  p.dtype = to_dtype(x.scalar_type());
  p.silu = silu;
  p.x = x.data_ptr();
  p.x_sb = x.stride(0), p.x_sc = x.stride(1), p.x_st = x.dim() == 3 ? x.stride(2) : 0;
  p.conv_state = conv_state.data_ptr();
  p.st_sb = conv_state.stride(0), p.st_sc = conv_state.stride(1), p.st_sj = conv_state.stride(2);
  p.state_batch = conv_state.size(0);
  p.state_indices = idx ? static_cast<const int32_t*>(idx->data_ptr()) : nullptr;
  p.parents = par ? static_cast<const int32_t*>(par->data_ptr()) : nullptr;
  set_weight_bias(p, weight, bias);
  p.out = out.data_ptr();
  p.out_sb = out.stride(0), p.out_sc = out.stride(1), p.out_st = x.dim() == 3 ? out.stride(2) : 0;
  if (out.numel() == 0) return out;
  NK_ROUTE_BY_DEVICE(x, op, causal_conv1d_update_cpu(p), causal_conv1d_update_cuda(p, stream));
  return out;
}

}  // namespace nk
