// C ABI of the emulated NVFP4 quantize / dequantize kernels (csrc/nvfp4/quantize_cuda.cu,
// rewritten by transform.py into quantize_cuda.emu.cpp in the build directory), for
// tests/nvfp4/test_cuda_emulation_nvfp4.py. The ctypes mirrors of the param structs are parsed from
// csrc/nvfp4/quantize.h and checked against the generated offsetof table.
#include "emu_api.h"
#include "quantize_cuda.emu.cpp"
#include "nvfp4_params_layout.inc"

EMU_EXPORT int emu_nvfp4_quantize_cuda(const nk::Nvfp4QuantParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::nvfp4_quantize_cuda(*p, nullptr); }, err, errlen);
}
EMU_EXPORT int emu_nvfp4_dequantize_cuda(const nk::Nvfp4DequantParams* p, char* err, int errlen) {
  return emu::guarded([&] { nk::nvfp4_dequantize_cuda(*p, nullptr); }, err, errlen);
}
EMU_EXPORT long long emu_nvfp4_blocks_run() { return emu::blocks_run; }
