// Error checking for CUDA runtime calls and kernel launches (CUDA translation units only).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "common/macros.h"

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

// Compute capability of device dev, or of the current device, as major * 10 + minor (90: sm_90).
inline int device_cc(int dev) {
  int major = 0, minor = 0;
  NK_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  NK_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  return major * 10 + minor;
}
inline int current_device_cc() {
  int dev = 0;
  NK_CUDA_CHECK(cudaGetDevice(&dev));
  return device_cc(dev);
}

// A base TMA, cp.async and 16-byte vector accesses can take (host and device).
NK_HD bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

// cudaFuncSetAttribute(kKernel, MaxDynamicSharedMemorySize, bytes) when this kernel has not yet
// been allowed that many bytes on the current device: the driver call costs host time (wall time
// per op call) when repeated on every launch. One record per kernel (the template argument) and
// device; a race between threads only repeats the call.
template <auto kKernel>
inline void allow_dynamic_smem(int bytes) {
  static std::atomic<int> allowed[64] = {};
  int dev = 0;
  NK_CUDA_CHECK(cudaGetDevice(&dev));
  if (dev >= 0 && dev < 64 && allowed[dev].load(std::memory_order_relaxed) >= bytes) return;
  NK_CUDA_CHECK(cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (dev >= 0 && dev < 64) allowed[dev].store(bytes, std::memory_order_relaxed);
}

}  // namespace nk
