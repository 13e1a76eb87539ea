// Error checking for CUDA runtime calls and kernel launches (CUDA translation units only).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define NK_CUDA_CHECK(expr)                                                              \
  do {                                                                                   \
    cudaError_t nk_err_ = (expr);                                                        \
    if (nk_err_ != cudaSuccess) {                                                        \
      throw std::runtime_error(std::string("nemokernels: CUDA error ") +                 \
                               cudaGetErrorString(nk_err_) + " at " __FILE__ ":" +       \
                               std::to_string(__LINE__));                                \
    }                                                                                    \
  } while (0)

// After every launch: catches bad launch configurations at the call site.
#define NK_CUDA_LAUNCH_CHECK() NK_CUDA_CHECK(cudaGetLastError())

namespace nk {

inline int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

// Multiprocessor count of the current device, cached per device (grids are sized from it).
inline int sm_count() {
  static int cached[64] = {};
  int dev = 0;
  NK_CUDA_CHECK(cudaGetDevice(&dev));
  int* slot = (dev >= 0 && dev < 64) ? &cached[dev] : nullptr;
  if (slot && *slot > 0) return *slot;
  int n = 0;
  NK_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  n = n > 0 ? n : 1;
  if (slot) *slot = n;
  return n;
}

}  // namespace nk
