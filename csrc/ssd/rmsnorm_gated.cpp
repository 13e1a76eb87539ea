// Op entry points of the gated RMSNorm: argument checks (the one place they live), output
// allocation, and dispatch to the CPU or CUDA kernels. Registered in ssd_ops.cpp.
#include "ssd/rmsnorm_gated.h"

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "common/check.h"
#include "common/device.h"
#include "common/tensor_utils.h"

namespace nk {
namespace {

constexpr const char* kFwd = "rmsnorm_fn";
constexpr const char* kBwd = "rmsnorm_fn (backward)";

// A (..., D) tensor seen as (rows, D): element (r, c) at r * sr + c * sc. The leading dims
// must fold into one stride; when they do not (e.g. a permuted batch), a contiguous copy is
// taken. `t` is replaced by the tensor the strides describe.
struct RowView {
  int64_t sr = 0, sc = 1;
};

RowView row_view(Tensor& t) {
  const int64_t nd = t.dim();
  RowView v;
  v.sc = t.stride(nd - 1);
  bool have = false, ok = true;
  int64_t expect = 0;
  for (int64_t i = nd - 2; i >= 0; --i) {
    if (t.size(i) == 1) continue;
    if (!have) {
      v.sr = t.stride(i);
      have = true;
    } else if (t.stride(i) != expect) {
      ok = false;
      break;
    }
    expect = t.stride(i) * t.size(i);
  }
  if (!ok) {
    t = torch::stable::contiguous(t);
    v.sr = t.size(nd - 1);
    v.sc = 1;
  }
  return v;
}

std::vector<int64_t> sizes_of(const Tensor& t) {
  std::vector<int64_t> s;
  for (int64_t i = 0; i < t.dim(); ++i) s.push_back(t.size(i));
  return s;
}

// Checks shared by forward and backward; returns (rows, D).
std::tuple<int64_t, int64_t> check_args(const char* op, const Tensor& x, const Tensor& weight,
                                        const std::optional<Tensor>& bias,
                                        const std::optional<Tensor>& z, int64_t group_size) {
  NK_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension (..., D), got a 0-d tensor");
  check_float(op, "x", x);
  const int64_t D = x.size(x.dim() - 1);
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) rows *= x.size(i);
  for (auto [arg, t] : {std::pair<const char*, const Tensor*>{"weight", &weight}, {"bias", bias ? &*bias : nullptr}}) {
    if (!t) continue;
    check_dim(op, arg, *t, 1);
    check_float(op, arg, *t, x, "x");
    check_shape(op, arg, *t, {D}, "= (D,) where D = x.shape[-1]");
  }
  if (z) check_like(op, "z", *z, x, "x");
  if (D > 0) {
    NK_CHECK(group_size > 0, op, ": group_size must be positive, got ", group_size);
    NK_CHECK(D % group_size == 0, op, ": group_size (", group_size,
             ") must divide D = x.shape[-1] (", D, ")");
  }
  return {rows, D};
}

// Leading dims of x followed by `last`.
std::vector<int64_t> leading_then(const Tensor& x, int64_t last) {
  std::vector<int64_t> s = sizes_of(x);
  s.back() = last;
  return s;
}

}  // namespace

std::tuple<Tensor, Tensor> rmsnorm_gated_fwd(Tensor x, Tensor weight, std::optional<Tensor> bias,
                                             std::optional<Tensor> z, double eps, int64_t group_size,
                                             bool norm_before_gate) {
  auto [rows, D] = check_args(kFwd, x, weight, bias, z, group_size);
  NK_CHECK(std::isfinite(eps) && eps >= 0, kFwd, ": eps must be finite and >= 0, got ", eps);
  OptionalDeviceGuard guard(x);
  const int64_t ngroups = D > 0 ? D / group_size : 0;
  Tensor out = new_empty(x, sizes_of(x), x.scalar_type());
  Tensor rstd = new_empty(x, leading_then(x, ngroups), ScalarType::Float);
  if (rows * D == 0) return {out, rstd};
  Tensor wc = torch::stable::contiguous(weight);  // a view when already contiguous: no copy
  auto bc = bias ? std::optional<Tensor>(torch::stable::contiguous(*bias)) : std::nullopt;
  RmsNormFwdParams p{};
  p.rows = rows, p.dim = D, p.group_size = group_size;
  p.dtype = to_dtype(x.scalar_type());
  p.eps = static_cast<float>(eps);
  p.norm_before_gate = norm_before_gate;
  RowView xv = row_view(x);
  p.x = x.data_ptr(), p.x_sr = xv.sr, p.x_sc = xv.sc;
  if (z) {
    RowView zv = row_view(*z);
    p.z = z->data_ptr(), p.z_sr = zv.sr, p.z_sc = zv.sc;
  }
  p.weight = wc.data_ptr(), p.weight_dtype = to_dtype(wc.scalar_type());
  p.bias = bc ? bc->data_ptr() : nullptr, p.bias_dtype = bc ? to_dtype(bc->scalar_type()) : DType::F32;
  p.out = out.data_ptr();
  p.rstd = static_cast<float*>(rstd.data_ptr());
  NK_ROUTE_BY_DEVICE(x, kFwd, rmsnorm_gated_fwd_cpu(p), rmsnorm_gated_fwd_cuda(p, stream));
  return {out, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rmsnorm_gated_bwd(
    Tensor dout, Tensor x, Tensor weight, std::optional<Tensor> bias, std::optional<Tensor> z,
    Tensor rstd, int64_t group_size, bool norm_before_gate) {
  const char* op = kBwd;
  auto [rows, D] = check_args(op, x, weight, bias, z, group_size);
  check_like(op, "dout", dout, x, "x");
  const int64_t ngroups = D > 0 ? D / group_size : 0;
  check_dtype(op, "rstd", rstd, {ScalarType::Float});
  check_same_device(op, "rstd", rstd, x, "x");
  check_shape(op, "rstd", rstd, leading_then(x, ngroups), "= x.shape[:-1] + (D / group_size,)");
  OptionalDeviceGuard guard(x);
  Tensor dx = new_empty(x, sizes_of(x), x.scalar_type());
  Tensor dz = z ? new_empty(x, sizes_of(x), x.scalar_type()) : new_empty(x, {0}, x.scalar_type());
  // The kernels write dweight / dbias in the parameters' dtypes (no cast afterwards).
  Tensor dweight = new_empty(x, {D}, weight.scalar_type());
  Tensor dbias = new_empty(x, {bias ? D : 0}, bias ? bias->scalar_type() : ScalarType::Float);
  if (rows * D == 0) {
    torch::stable::zero_(dweight);  // no rows: nothing to sum
    torch::stable::zero_(dbias);
    return {dx, dweight, dbias, dz};
  }
  Tensor wc = torch::stable::contiguous(weight);
  auto bc = bias ? std::optional<Tensor>(torch::stable::contiguous(*bias)) : std::nullopt;
  Tensor rstd_c = torch::stable::contiguous(rstd);
  RmsNormBwdParams q{};
  RmsNormFwdParams& p = q.fwd;
  p.rows = rows, p.dim = D, p.group_size = group_size;
  p.dtype = to_dtype(x.scalar_type());
  p.norm_before_gate = norm_before_gate;
  RowView xv = row_view(x);
  p.x = x.data_ptr(), p.x_sr = xv.sr, p.x_sc = xv.sc;
  if (z) {
    RowView zv = row_view(*z);
    p.z = z->data_ptr(), p.z_sr = zv.sr, p.z_sc = zv.sc;
  }
  p.weight = wc.data_ptr(), p.weight_dtype = to_dtype(wc.scalar_type());
  p.bias = bc ? bc->data_ptr() : nullptr, p.bias_dtype = bc ? to_dtype(bc->scalar_type()) : DType::F32;
  p.rstd = static_cast<float*>(rstd_c.data_ptr());
  RowView gv = row_view(dout);
  q.dout = dout.data_ptr(), q.dout_sr = gv.sr, q.dout_sc = gv.sc;
  q.dx = dx.data_ptr();
  q.dz = z ? dz.data_ptr() : nullptr;
  q.dweight = dweight.data_ptr();
  q.dbias = bias ? dbias.data_ptr() : nullptr;
  // Partial-sum rows of dweight/dbias: one per chunk of rows on the CPU; the CUDA launcher
  // picks its own count from its grid.
  q.num_partials = (rows + kRmsNormCpuRowChunk - 1) / kRmsNormCpuRowChunk;
#ifdef NK_WITH_CUDA
  if (x.is_cuda()) q.num_partials = rmsnorm_gated_bwd_cuda_num_partials(q);
#endif
  Tensor partials = new_empty(x, {q.num_partials, 2, D}, ScalarType::Float);
  q.partials = static_cast<float*>(partials.data_ptr());
  NK_ROUTE_BY_DEVICE(x, op, rmsnorm_gated_bwd_cpu(q), rmsnorm_gated_bwd_cuda(q, stream));
  return {dx, dweight, dbias, dz};
}

}  // namespace nk
