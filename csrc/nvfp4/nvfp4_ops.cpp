// The nvfp4 family's ops: quantize / dequantize and the block-scaled GEMM. Schemas and kernel
// registration; the entries (in this folder) check inputs and route by device. Fakes and
// autograd: nemokernels/nvfp4/.
#include <optional>
#include <tuple>

#include "common/family_ops.h"

namespace nk {
// Entries, defined in this folder.
Tensor nvfp4_gemm(Tensor a_data, Tensor a_scales, Tensor a_global, Tensor b_data, Tensor b_scales,
                  Tensor b_global, ScalarType out_dtype, std::optional<Tensor> bias);
Tensor nvfp4_swizzle_scales(Tensor scales);
std::tuple<Tensor, Tensor, Tensor> nvfp4_quantize(Tensor x, bool block_2d, bool hadamard,
                                                  bool stochastic_rounding, int64_t seed,
                                                  std::optional<Tensor> global_amax,
                                                  std::optional<Tensor> seed_tensor);
Tensor nvfp4_dequantize(Tensor data, Tensor scales, Tensor global_scale, ScalarType out_dtype);

// Schemas (with what the shapes and dtypes mean) and the kernel of each.
const OpDef kOps[] = {
  // ---- nvfp4: block-scaled GEMM ------------------------------------------------------------
  // out (M, N) = (a_global * b_global) * dequant(a) @ dequant(b).T + bias; a: data (M, K/2)
  // uint8, scales (M, K/16) float8_e4m3fn, global 0-dim float32 (read on the device); b alike
  // with N rows. out_dtype float32/float16/bfloat16.
  {"nvfp4_gemm(Tensor a_data, Tensor a_scales, Tensor a_global, Tensor b_data, Tensor b_scales, "
   "Tensor b_global, ScalarType out_dtype, Tensor? bias) -> Tensor",
   TORCH_BOX(&nvfp4_gemm)},
  // Row-major (rows, K/16) float8_e4m3fn scales -> flat uint8 in the sm_100 tensor-core (128x4 atom) layout.
  {"nvfp4_swizzle_scales(Tensor scales) -> Tensor",
   TORCH_BOX(&nvfp4_swizzle_scales)},
  // ---- nvfp4: quantize / dequantize (csrc/nvfp4/quantize.h) ----------------
  // x (R, K) any strides (quantize_t passes x.T); K % 16 == 0. data (R, K/2) uint8, scales
  // (R, K/16) float8_e4m3fn, global_scale () float32 = 1/s_enc. seed keys the stochastic
  // rounding and the Hadamard signs (seed_tensor, 1 element int64 read on the device, overrides
  // it); global_amax (1 element float32) replaces the computed amax.
  {"nvfp4_quantize(Tensor x, bool block_2d, bool hadamard, bool stochastic_rounding, int seed, "
   "Tensor? global_amax, Tensor? seed_tensor) -> (Tensor data, Tensor scales, Tensor global_scale)",
   TORCH_BOX(&nvfp4_quantize)},
  // out_dtype float32/float16/bfloat16. Returns (R, K).
  {"nvfp4_dequantize(Tensor data, Tensor scales, Tensor global_scale, ScalarType out_dtype) -> Tensor",
   TORCH_BOX(&nvfp4_dequantize)},
};

}  // namespace nk

NK_REGISTER_FAMILY("nvfp4", nk::kOps)
