// C ABI of the emulated portable NVFP4 GEMM (csrc/nvfp4/gemm_cuda.cu, rewritten by transform.py
// into gemm_cuda.emu.cpp in the build directory; its PTX pieces have C++ twins under
// EMU_HAVE_INT_ATOMICS, mma.sync with the real fragment layout), for
// tests/nvfp4/test_cuda_emulation_nvfp4_gemm.py.
#include "emu_api.h"
#include "gemm_cuda.emu.cpp"

#include "params_layout.inc"  // offsetof table of Nvfp4GemmParams (generated)

EMU_EXPORT int emu_nvfp4_gemm_cuda(const nk::Nvfp4GemmParams* p, int splits, float* workspace, char* err,
                                   int errlen) {
  return emu::guarded([&] { nk::nvfp4_gemm_cuda(*p, splits, workspace, nullptr); }, err, errlen);
}
// The split count the op entry would pick (the emulator reports 132 SMs).
EMU_EXPORT long long emu_nvfp4_gemm_cuda_splits(const nk::Nvfp4GemmParams* p) { return nk::nvfp4_gemm_cuda_splits(*p); }
EMU_EXPORT int emu_nvfp4_swizzle_scales_cuda(const uint8_t* src, uint8_t* dst, long long rows, long long cols,
                                             char* err, int errlen) {
  return emu::guarded([&] { nk::nvfp4_swizzle_scales_cuda(src, dst, rows, cols, nullptr); }, err, errlen);
}
EMU_EXPORT int emu_nvfp4_bias_convert_cuda(const float* acc, const float* bias, void* out, int out_dtype,
                                           long long M, long long N, char* err, int errlen) {
  return emu::guarded(
      [&] { nk::nvfp4_bias_convert_cuda(acc, bias, out, static_cast<nk::DType>(out_dtype), M, N, nullptr); }, err,
      errlen);
}
EMU_COUNTERS
