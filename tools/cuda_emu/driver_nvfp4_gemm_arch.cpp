// nvfp4.gemm's sm_90 path (csrc/nvfp4/gemm_cuda.cu nvfp4_gemm_sm90, built with NK_HAS_SM90)
// under the emulator: the scratch carving, the exact bf16 decode (nvfp4_dequantize_cuda from
// quantize_cuda.cu, linked as its own unit), the alpha/offsets set-up kernel and the bias/convert
// pass run for real; the CUTLASS GEMM (gemm_sm90.cu) is replaced by a naive loop with its
// documented contract (d = alpha * a16 @ b16^T over rows [offsets[0], offsets[1]), bf16 or
// float32 d), so a wrong buffer, scale or rounding order handed to it shows.
// tests/nvfp4/test_cuda_emulation_nvfp4_gemm.py drives it.
#include "driver_nvfp4_gemm.cpp"  // the portable entries, on gemm_cuda.cu built with NK_HAS_SM90

namespace nk {
long long emu_sm90_calls = 0, emu_sm90_f32_calls = 0;
int64_t nvfp4_gemm_sm90_workspace(bool f32_out) { return f32_out ? 512 : 256; }  // checked: left untouched
void nvfp4_gemm_sm90_run(int64_t M, int64_t N, int64_t K, const void* a16, const void* b16, const float* alpha,
                         const int32_t* offsets, void* d, bool f32_out, void* workspace, void*) {
  ++emu_sm90_calls;
  emu_sm90_f32_calls += f32_out;
  if (offsets[0] != 0 || offsets[1] != M) throw std::runtime_error("mock sm90 GEMM: offsets are not {0, M}");
  const auto* a = static_cast<const __nv_bfloat16*>(a16);
  const auto* b = static_cast<const __nv_bfloat16*>(b16);
  auto* ws = static_cast<unsigned char*>(workspace);
  for (int64_t i = 0; i < nvfp4_gemm_sm90_workspace(f32_out); ++i) ws[i] = 0x5A;  // the GEMM owns it
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += __bfloat162float(a[m * K + k]) * __bfloat162float(b[n * K + k]);
      const float v = *alpha * s;
      if (f32_out) static_cast<float*>(d)[m * N + n] = v;
      else static_cast<__nv_bfloat16*>(d)[m * N + n] = __float2bfloat16_rn(v);
    }
}
// The decode-in-the-mainloop kernel (gemm_decode_mma_sm90.cu, NEMOKERNELS_NVFP4_GEMM_DECODE_MMA=1)
// by its contract: out = alpha * a16 (fp16, M x K) @ decode(B)^T (+ bias), rounded once.
long long emu_decode_mma_calls = 0;
void nvfp4_gemm_decode_mma_sm90(const Nvfp4GemmParams& p, const void* a16, const float* alpha, void*) {
  ++emu_decode_mma_calls;
  if (!nvfp4_gemm_decode_mma_sm90_takes(p.M, p.N, p.K)) throw std::runtime_error("mock decode_mma: shape not taken");
  const auto* a = static_cast<const __half*>(a16);
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t n = 0; n < p.N; ++n) {
      float s = 0.f;
      for (int64_t k = 0; k < p.K; ++k) {
        const uint8_t byte = p.b_data[n * (p.K / 2) + k / 2];
        const float b = nvfp4::e2m1_decode((k % 2) ? byte >> 4 : byte & 0xf) *
                        nvfp4::e4m3_decode(p.b_scales[n * (p.K / 16) + k / 16]);
        s += __half2float(a[m * p.K + k]) * b;
      }
      float v = *alpha * s;
      if (p.bias != nullptr) v += p.bias[n];
      switch (p.out_dtype) {
        case DType::F32: static_cast<float*>(p.out)[m * p.N + n] = v; break;
        case DType::F16: static_cast<__half*>(p.out)[m * p.N + n] = __float2half_rn(v); break;
        case DType::BF16: static_cast<__nv_bfloat16*>(p.out)[m * p.N + n] = __float2bfloat16_rn(v); break;
      }
    }
}
}  // namespace nk

EMU_EXPORT long long emu_nvfp4_decode_mma_mock_calls() { return nk::emu_decode_mma_calls; }
EMU_EXPORT long long emu_nvfp4_gemm_sm90_scratch_bytes(const nk::Nvfp4GemmParams* p) {
  return nk::nvfp4_gemm_sm90_scratch_bytes(*p, nk::nvfp4_gemm_sm90_decode_mma(*p));
}
EMU_EXPORT int emu_nvfp4_gemm_sm90(const nk::Nvfp4GemmParams* p, void* scratch, char* err, int errlen) {
  return emu::guarded([&] { nk::nvfp4_gemm_sm90(*p, nk::nvfp4_gemm_sm90_decode_mma(*p), scratch, nullptr); }, err,
                      errlen);
}
EMU_EXPORT long long emu_nvfp4_sm90_mock_calls() { return nk::emu_sm90_calls; }
EMU_EXPORT long long emu_nvfp4_sm90_mock_f32_calls() { return nk::emu_sm90_f32_calls; }
