// Tiny portability macros shared by CPU (.cpp) and CUDA (.cu) code. No torch includes:
// CUDA translation units stay free of torch headers (faster builds, stable-ABI only).
#pragma once

#if defined(__CUDACC__)
#define NK_HD __host__ __device__ __forceinline__
#define NK_DEVICE __device__ __forceinline__
#else
#define NK_HD inline
#endif

namespace nk {

// Element types the floating-point kernels accept; states/accumulators are always float32.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

inline int dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }

}  // namespace nk
