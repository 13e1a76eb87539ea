// Op entry of nvfp4_gemm (nemokernels.nvfp4.gemm): argument checks (the one place they live),
// output allocation, and routing: CPU -> C++ kernel; a GPU this build has the sm_100 kernels for
// (nvfp4_gemm_cuda_path) -> CUTLASS block-scaled tcgen05 GEMM when the problem meets its
// alignment (else the portable kernel); sm_90 -> decode to bf16, then the CUTLASS wgmma GEMM
// (N % 8 == 0, else the portable kernel); other GPUs -> the portable in-register dequantizing
// tensor-core kernel. Registered in nvfp4_ops.cpp.
#include "nvfp4/gemm.h"

#include <cstdint>
#include <cstdlib>
#include <optional>

#include "common/arch.h"
#include "common/check.h"
#include "common/device.h"
#include "common/tensor_utils.h"

namespace nk {

#ifdef NK_WITH_CUDA
int nvfp4_device_sm(int device_index);  // gemm_cuda.cu
void nvfp4_alpha_cuda(const float* a_global, const float* b_global, float* alpha, void* stream);
void nvfp4_bias_convert_cuda(const float* acc, const float* bias, void* out, DType out_dtype,
                             int64_t M, int64_t N, void* stream);
#endif

namespace {

constexpr const char* kOp = "nvfp4.gemm";
constexpr int64_t kIntMax = 2147483647LL;  // CUTLASS problem shapes are int

// Contiguous, and 16-byte aligned (the CUDA kernels load 8/16-byte chunks): a copy otherwise.
Tensor contiguous_aligned(const Tensor& t) {
  Tensor c = torch::stable::contiguous(t);
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = torch::stable::clone(c);
  return c;
}

void check_operand(const char* which, const Tensor& data, const Tensor& scales, const Tensor& global,
                   int64_t K) {
  const std::string d = str_cat(which, ".data"), s = str_cat(which, ".scales"),
                    g = str_cat(which, ".global_scale");
  check_dim(kOp, d.c_str(), data, 2);
  check_dtype(kOp, d.c_str(), data, {ScalarType::Byte});
  check_dim(kOp, s.c_str(), scales, 2);
  check_dtype(kOp, s.c_str(), scales, {ScalarType::Float8_e4m3fn});
  check_shape(kOp, s.c_str(), scales, {data.size(0), K / 16},
              str_cat("(one scale per 16 elements of K = ", K, ")"));
  check_same_device(kOp, s.c_str(), scales, data, d.c_str());
  check_dtype(kOp, g.c_str(), global, {ScalarType::Float});
  NK_CHECK(global.numel() == 1 && global.dim() <= 1, kOp, ": ", g,
           " must be a float32 scalar (0-dim tensor), got shape ", shape_str(global));
  check_same_device(kOp, g.c_str(), global, data, d.c_str());
}

#ifdef NK_WITH_CUDA
// The portable kernel, with its split-K workspace when it splits (few output tiles, long K).
void gemm_cuda_portable(const Tensor& like, const Nvfp4GemmParams& p, void* stream) {
  const int splits = nvfp4_gemm_cuda_splits(p);
  Tensor ws = new_empty(like, {splits > 1 ? splits * p.M * p.N : 0}, ScalarType::Float);
  nvfp4_gemm_cuda(p, splits, splits > 1 ? static_cast<float*>(ws.data_ptr()) : nullptr, stream);
}
#endif

}  // namespace

#ifdef NK_WITH_CUDA
int nvfp4_gemm_cuda_path(int device_index, int64_t M, int64_t N, int64_t K) {
  const int sm = nvfp4_device_sm(device_index);  // throws where there is no such device
#ifdef NK_HAS_SM100
  if (M > 0 && N > 0 && sm100_kernels_run_on(sm)) {
    // Shape checks only: a stand-in 16-byte aligned address (never dereferenced) for the operands,
    // which the entry makes 16-byte aligned before the call.
    Nvfp4GemmParams q{};
    q.M = M, q.N = N, q.K = K;
    q.a_data = q.b_data = reinterpret_cast<const uint8_t*>(uintptr_t{256});
    if (nvfp4_gemm_sm100_supported(q)) return kNvfp4PathCutlassSm100;
  }
#endif
#ifdef NK_HAS_SM90
  // NEMOKERNELS_NVFP4_GEMM_PORTABLE=1 forces the portable kernel (benchmarks, A/B tests). The
  // bf16 rows of A and B (K % 16 == 0) and of D (N % 8) must be 16-byte aligned for TMA; the
  // CUTLASS problem shape is int.
  const char* force = std::getenv("NEMOKERNELS_NVFP4_GEMM_PORTABLE");
  const bool forced = force != nullptr && force[0] == '1';
  if (!forced && sm == 90 && M > 0 && N > 0 && K > 0 && N % 8 == 0 && M <= kIntMax && N <= kIntMax && K <= kIntMax) {
    return kNvfp4PathCutlassSm90;
  }
#endif
  (void)sm, (void)M, (void)N, (void)K;
  return kNvfp4PathPortable;
}
#endif

Tensor nvfp4_gemm(Tensor a_data, Tensor a_scales, Tensor a_global, Tensor b_data, Tensor b_scales,
                  Tensor b_global, ScalarType out_dtype, std::optional<Tensor> bias) {
  NK_CHECK(a_data.dim() == 2 && b_data.dim() == 2, kOp, ": a.data and b.data must be 2-D (rows, K/2), got ",
           shape_str(a_data), " and ", shape_str(b_data));
  const int64_t M = a_data.size(0), N = b_data.size(0), K = a_data.size(1) * 2;
  NK_CHECK(b_data.size(1) * 2 == K, kOp, ": a and b must have the same K (a is (", M, ", ", K,
           "), b is (", N, ", ", b_data.size(1) * 2, "))");
  NK_CHECK(K % 16 == 0, kOp, ": K must be a multiple of 16 (one e4m3 scale per 16 elements), got K = ", K);
  check_operand("a", a_data, a_scales, a_global, K);
  check_operand("b", b_data, b_scales, b_global, K);
  check_same_device(kOp, "b.data", b_data, a_data, "a.data");
  check_dtype(kOp, "out_dtype", out_dtype, kFloatTypes);
  if (bias) check_tensor(kOp, "bias", *bias, {N}, kFloatTypes, a_data, "a.data");
#ifdef NK_WITH_CUDA
  const int path = a_data.is_cuda() ? nvfp4_gemm_cuda_path(a_data.get_device_index(), M, N, K) : kNvfp4PathPortable;
  if (a_data.is_cuda() && path == kNvfp4PathPortable) {
    check_limit(kOp, "M (a.data.shape[0])", M, kNvfp4PortableMaxM,
                "the most the portable CUDA kernel takes (128-row tiles on grid dimension y <= 65535)",
                "split a into row blocks of at most 8388480 rows");
    check_limit(kOp, "K", K, kNvfp4PortableMaxK, "the most the portable CUDA kernel counts (int K tiles of 64)",
                "split the reduction into several calls and add the results");
  }
#endif
  OptionalDeviceGuard guard(a_data);
  Tensor out = new_empty(a_data, {M, N}, out_dtype);
  if (M == 0 || N == 0) return out;

  Tensor ad = contiguous_aligned(a_data), as = contiguous_aligned(a_scales);
  Tensor bd = contiguous_aligned(b_data), bs = contiguous_aligned(b_scales);
  std::optional<Tensor> b32;
  if (bias) b32.emplace(contiguous_float(*bias));
  Nvfp4GemmParams p{};
  p.M = M, p.N = N, p.K = K;
  p.a_data = static_cast<const uint8_t*>(ad.data_ptr());
  p.a_scales = static_cast<const uint8_t*>(as.data_ptr());
  p.b_data = static_cast<const uint8_t*>(bd.data_ptr());
  p.b_scales = static_cast<const uint8_t*>(bs.data_ptr());
  p.a_global = static_cast<const float*>(a_global.data_ptr());
  p.b_global = static_cast<const float*>(b_global.data_ptr());
  p.bias = b32 ? static_cast<const float*>(b32->data_ptr()) : nullptr;
  p.out = out.data_ptr();
  p.out_dtype = to_dtype(out_dtype);

#ifdef NK_HAS_SM100
  if (a_data.is_cuda() && path == kNvfp4PathCutlassSm100) {
    void* stream = current_cuda_stream(a_data.get_device_index());
    // Scales in the tensor-core layout, alpha as one device float, and (unless the result is
    // float32 without bias) a float32 accumulator that one pass converts and adds bias to.
    const int64_t sf_cols = K / 16;
    Tensor a_sf = new_empty(a_data, {nvfp4_sf_swizzled_size(M, sf_cols)}, ScalarType::Byte);
    Tensor b_sf = new_empty(a_data, {nvfp4_sf_swizzled_size(N, sf_cols)}, ScalarType::Byte);
    nvfp4_swizzle_scales_cuda(p.a_scales, static_cast<uint8_t*>(a_sf.data_ptr()), M, sf_cols, stream);
    nvfp4_swizzle_scales_cuda(p.b_scales, static_cast<uint8_t*>(b_sf.data_ptr()), N, sf_cols, stream);
    Tensor alpha = new_empty(a_data, {1}, ScalarType::Float);
    nvfp4_alpha_cuda(p.a_global, p.b_global, static_cast<float*>(alpha.data_ptr()), stream);
    const bool direct = p.out_dtype == DType::F32 && p.bias == nullptr;
    Tensor acc = direct ? out : new_empty(a_data, {M, N}, ScalarType::Float);
    Nvfp4GemmParams q = p;
    q.out = acc.data_ptr();
    q.out_dtype = DType::F32;
    q.bias = nullptr;
    Tensor ws = new_empty(a_data, {nvfp4_gemm_sm100_workspace_size(q)}, ScalarType::Byte);
    nvfp4_gemm_sm100(q, static_cast<const uint8_t*>(a_sf.data_ptr()),
                     static_cast<const uint8_t*>(b_sf.data_ptr()), static_cast<float*>(alpha.data_ptr()),
                     ws.data_ptr(), stream);
    if (!direct) {
      nvfp4_bias_convert_cuda(static_cast<const float*>(acc.data_ptr()), p.bias, out.data_ptr(), p.out_dtype,
                              M, N, stream);
    }
    return out;
  }
#endif
#ifdef NK_HAS_SM90
  if (a_data.is_cuda() && path == kNvfp4PathCutlassSm90) {
    const bool decode_mma = nvfp4_gemm_sm90_decode_mma(p);  // read once: sizing and call agree
    Tensor scratch = new_empty(a_data, {nvfp4_gemm_sm90_scratch_bytes(p, decode_mma)}, ScalarType::Byte);
    nvfp4_gemm_sm90(p, decode_mma, scratch.data_ptr(), current_cuda_stream(a_data.get_device_index()));
    return out;
  }
#endif
  NK_ROUTE_BY_DEVICE(a_data, kOp, nvfp4_gemm_cpu(p), gemm_cuda_portable(a_data, p, stream));
  return out;
}

// The scale swizzle on its own (tests pin the index map on the CPU; the sm_100 path runs the
// CUDA twin): (rows, K/16) e4m3 -> flat uint8 in the tensor-core layout.
Tensor nvfp4_swizzle_scales(Tensor scales) {
  const char* op = "nvfp4_swizzle_scales";
  check_dim(op, "scales", scales, 2);
  check_dtype(op, "scales", scales, {ScalarType::Float8_e4m3fn});
  const int64_t rows = scales.size(0), cols = scales.size(1);
  OptionalDeviceGuard guard(scales);
  Tensor out = new_empty(scales, {nvfp4_sf_swizzled_size(rows, cols)}, ScalarType::Byte);
  if (out.numel() == 0) return out;
  Tensor s = contiguous_aligned(scales);
  const auto* src = static_cast<const uint8_t*>(s.data_ptr());
  auto* dst = static_cast<uint8_t*>(out.data_ptr());
  NK_ROUTE_BY_DEVICE(scales, op, nvfp4_swizzle_scales_cpu(src, dst, rows, cols),
                     nvfp4_swizzle_scales_cuda(src, dst, rows, cols, stream));
  return out;
}

}  // namespace nk
