// C ABI of the emulated NVFP4 quantize / dequantize kernels (csrc/nvfp4/quantize_cuda.cu,
// rewritten by transform.py into quantize_cuda.emu.cpp in the build directory), for
// tests/nvfp4/test_cuda_emulation_nvfp4.py.
#include "emu_api.h"
#include "quantize_cuda.emu.cpp"

#include "params_layout.inc"  // offsetof table of Nvfp4QuantParams / Nvfp4DequantParams (generated)

EMU_ENTRY(emu_nvfp4_quantize_cuda, Nvfp4QuantParams, nvfp4_quantize_cuda)
EMU_ENTRY(emu_nvfp4_dequantize_cuda, Nvfp4DequantParams, nvfp4_dequantize_cuda)
EMU_COUNTERS
