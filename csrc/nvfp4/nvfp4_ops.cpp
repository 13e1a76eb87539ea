// The nvfp4 family's ops: quantize / dequantize and the block-scaled GEMM. Schemas and kernel
// registration; the entries (in this folder) check inputs and route by device. Fakes and
// autograd: nemokernels/nvfp4/.
#include <torch/csrc/stable/library.h>

#include <optional>
#include <tuple>

#include "common/check.h"
#include "common/op_registry.h"

namespace nk {
namespace {
constexpr const char* kFamily = "nvfp4";
}  // namespace

// Entries, defined in this folder.
Tensor nvfp4_gemm(Tensor a_data, Tensor a_scales, Tensor a_global, Tensor b_data, Tensor b_scales,
                  Tensor b_global, ScalarType out_dtype, std::optional<Tensor> bias);
Tensor nvfp4_swizzle_scales(Tensor scales);
std::tuple<Tensor, Tensor, Tensor> nvfp4_quantize(Tensor x, bool block_2d, bool hadamard,
                                                  bool stochastic_rounding, int64_t seed,
                                                  std::optional<Tensor> global_amax,
                                                  std::optional<Tensor> seed_tensor);
Tensor nvfp4_dequantize(Tensor data, Tensor scales, Tensor global_scale, ScalarType out_dtype);

namespace {
void register_kernels(torch::stable::detail::StableLibrary& m) {
  m.impl("nvfp4_gemm", TORCH_BOX(&nvfp4_gemm));
  m.impl("nvfp4_swizzle_scales", TORCH_BOX(&nvfp4_swizzle_scales));
  m.impl("nvfp4_quantize", TORCH_BOX(&nvfp4_quantize));
  m.impl("nvfp4_dequantize", TORCH_BOX(&nvfp4_dequantize));
}
}  // namespace
}  // namespace nk

STABLE_TORCH_LIBRARY_FRAGMENT(nemokernels, m) {
  using nk::family_op;
  using nk::kFamily;
  // ---- nvfp4: block-scaled GEMM ------------------------------------------------------------
  // out (M, N) = (a_global * b_global) * dequant(a) @ dequant(b).T + bias; a: data (M, K/2)
  // uint8, scales (M, K/16) float8_e4m3fn, global 0-dim float32 (read on the device); b alike
  // with N rows. out_dtype float32/float16/bfloat16.
  m.def(family_op(kFamily, "nvfp4_gemm(Tensor a_data, Tensor a_scales, Tensor a_global, Tensor b_data, Tensor b_scales, "
        "Tensor b_global, ScalarType out_dtype, Tensor? bias) -> Tensor"));
  // Row-major (rows, K/16) float8_e4m3fn scales -> flat uint8 in the sm_100 tensor-core (128x4 atom) layout.
  m.def(family_op(kFamily, "nvfp4_swizzle_scales(Tensor scales) -> Tensor"));
  // ---- nvfp4: quantize / dequantize (csrc/nvfp4/quantize.h) ----------------
  // x (R, K) any strides (quantize_t passes x.T); K % 16 == 0. data (R, K/2) uint8, scales
  // (R, K/16) float8_e4m3fn, global_scale () float32 = 1/s_enc. seed keys the stochastic
  // rounding and the Hadamard signs (seed_tensor, 1 element int64 read on the device, overrides
  // it); global_amax (1 element float32) replaces the computed amax.
  m.def(family_op(kFamily, "nvfp4_quantize(Tensor x, bool block_2d, bool hadamard, bool stochastic_rounding, int seed, "
        "Tensor? global_amax, Tensor? seed_tensor) -> (Tensor data, Tensor scales, Tensor global_scale)"));
  // out_dtype float32/float16/bfloat16. Returns (R, K).
  m.def(family_op(kFamily, "nvfp4_dequantize(Tensor data, Tensor scales, Tensor global_scale, ScalarType out_dtype) -> Tensor"));

}

NK_FAMILY_KERNELS(nk::register_kernels)
