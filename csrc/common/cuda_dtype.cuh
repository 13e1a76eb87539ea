// Activation dtype <-> float32 on the device, shared by every CUDA kernel file (CUDA
// translation units only; no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/macros.h"

namespace nk {

template <typename T> NK_DEVICE float to_f(T v);
template <> NK_DEVICE float to_f<float>(float v) { return v; }
template <> NK_DEVICE float to_f<__half>(__half v) { return __half2float(v); }
template <> NK_DEVICE float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> NK_DEVICE T from_f(float v);
template <> NK_DEVICE float from_f<float>(float v) { return v; }
template <> NK_DEVICE __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> NK_DEVICE __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

}  // namespace nk
