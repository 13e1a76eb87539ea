// Op entry points of the NVFP4 quantize / dequantize ops: argument checks (the one place they
// live), output allocation, and dispatch to the CPU or CUDA kernels. Registered in
// nvfp4_ops.cpp; the public wrappers are nemokernels/nvfp4/quantize.py.
#include "nvfp4/quantize.h"

#include <cmath>
#include <optional>
#include <tuple>

#include "common/check.h"
#include "common/device.h"
#include "common/tensor_utils.h"

namespace nk {
namespace {

constexpr const char* kQuant = "nvfp4.quantize";
constexpr const char* kDequant = "nvfp4.dequantize";

}  // namespace

std::tuple<Tensor, Tensor, Tensor> nvfp4_quantize(Tensor x, bool block_2d, bool hadamard,
                                                  bool stochastic_rounding, int64_t seed,
                                                  std::optional<Tensor> global_amax,
                                                  std::optional<Tensor> seed_tensor) {
  const char* op = kQuant;
  NK_CHECK(x.dim() == 2, op, ": x must be a 2-D (rows, K) view (the Python wrapper flattens the leading "
           "dims), got shape ", shape_str(x));
  check_float(op, "x", x);
  const int64_t rows = x.size(0), cols = x.size(1);
  NK_CHECK(cols % 16 == 0, op, ": the quantized dim (K, the last dim; the token dim for quantize_t) must "
           "be a multiple of 16 (one E4M3 scale per 16 elements), got shape ", shape_str(x));
  if (global_amax) check_one_element(op, "global_amax", *global_amax, ScalarType::Float, x, "x");
  if (seed_tensor) check_one_element(op, "seed_tensor", *seed_tensor, ScalarType::Long, x, "x");
  OptionalDeviceGuard guard(x);
  Tensor data = new_empty(x, {rows, cols / 2}, ScalarType::Byte);
  Tensor scales = new_empty(x, {rows, cols / 16}, ScalarType::Float8_e4m3fn);
  Tensor gscale = new_empty(x, {}, ScalarType::Float);
  if (rows * cols == 0) {
    // amax of nothing is 0: s_enc = 1 (a given global_amax is not read: no host sync).
    torch::stable::fill_(gscale, 1.0);
    return {data, scales, gscale};
  }
  std::optional<Tensor> gamax;
  if (global_amax) gamax.emplace(torch::stable::contiguous(*global_amax));
  if (gamax && gamax->is_cpu()) {
    const float v = *static_cast<const float*>(gamax->data_ptr());
    NK_CHECK(std::isfinite(v) && v >= 0.0f, op, ": global_amax must be finite and >= 0, got ",
             static_cast<double>(v));
  }
  Nvfp4QuantParams p{};
  p.rows = rows, p.cols = cols;
  p.dtype = to_dtype(x.scalar_type());
  p.a = x.data_ptr();
  p.a_sr = x.stride(0), p.a_sc = x.stride(1);
  p.block_2d = block_2d, p.hadamard = hadamard, p.stochastic = stochastic_rounding;
  p.seed = static_cast<uint64_t>(seed);
  std::optional<Tensor> seed_c;
  if (seed_tensor) seed_c.emplace(torch::stable::contiguous(*seed_tensor));
  p.seed_ptr = seed_c ? static_cast<const int64_t*>(seed_c->data_ptr()) : nullptr;
  p.global_amax = gamax ? static_cast<const float*>(gamax->data_ptr()) : nullptr;
  p.data = static_cast<uint8_t*>(data.data_ptr());
  p.scales = static_cast<uint8_t*>(scales.data_ptr());
  p.global_scale = static_cast<float*>(gscale.data_ptr());
  std::optional<Tensor> partials;
  if (x.is_cuda() && !gamax) {
    partials.emplace(new_empty(x, {kAmaxMaxPartials}, ScalarType::Float));
    p.partials = static_cast<float*>(partials->data_ptr());
  }
  bool finite = true;
  NK_ROUTE_BY_DEVICE(x, op, finite = nvfp4_quantize_cpu(p), nvfp4_quantize_cuda(p, stream));
  NK_CHECK(finite, op, ": x holds NaN or Inf; NVFP4 has no encoding for non-finite values (on CUDA "
           "this is not checked: the global scale comes out NaN instead)");
  return {data, scales, gscale};
}

Tensor nvfp4_dequantize(Tensor data, Tensor scales, Tensor global_scale, ScalarType out_dtype) {
  const char* op = kDequant;
  check_dim(op, "data", data, 2);
  check_dtype(op, "data", data, {ScalarType::Byte});
  check_dim(op, "scales", scales, 2);
  check_dtype(op, "scales", scales, {ScalarType::Float8_e4m3fn});
  check_same_device(op, "scales", scales, data, "data");
  check_same_device(op, "global_scale", global_scale, data, "data");
  check_dtype(op, "global_scale", global_scale, {ScalarType::Float});
  check_one_element(op, "global_scale", global_scale);
  const int64_t rows = data.size(0), cols = data.size(1) * 2;
  NK_CHECK(cols % 16 == 0, op, ": data.shape[-1] * 2 (K) must be a multiple of 16, got data shape ",
           shape_str(data));
  check_shape(op, "scales", scales, {rows, cols / 16}, str_cat("for data of shape ", shape_str(data)));
  check_dtype(op, "out_dtype", out_dtype, kFloatTypes);
  const ScalarType odt = out_dtype;
  OptionalDeviceGuard guard(data);
  Tensor out = new_empty(data, {rows, cols}, odt);
  if (rows * cols == 0) return out;
  // Bytes of a row must be contiguous (the kernels read them in order); rows may be strided.
  Tensor d = data.stride(1) == 1 ? data : torch::stable::contiguous(data);
  Tensor s = scales.stride(1) == 1 ? scales : torch::stable::contiguous(scales);
  Tensor g = torch::stable::contiguous(global_scale);
  Nvfp4DequantParams p{};
  p.rows = rows, p.cols = cols;
  p.data = static_cast<const uint8_t*>(d.data_ptr());
  p.d_sr = d.stride(0);
  p.scales = static_cast<const uint8_t*>(s.data_ptr());
  p.s_sr = s.stride(0);
  p.global_scale = static_cast<const float*>(g.data_ptr());
  p.dtype = to_dtype(odt);
  p.out = out.data_ptr();
  NK_ROUTE_BY_DEVICE(data, op, nvfp4_dequantize_cpu(p), nvfp4_dequantize_cuda(p, stream));
  return out;
}

}  // namespace nk
