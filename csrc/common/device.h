// Which device a call runs on, and the CUDA stream torch has current there.
#pragma once

#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/tensor.h>

#include <memory>

#include "common/check.h"
#include "common/macros.h"

namespace nk {

DType to_dtype(ScalarType t);

#ifdef NK_WITH_CUDA
// torch's current CUDA stream on `device_index`, as a cudaStream_t (void* here).
void* current_cuda_stream(int32_t device_index);
#endif

// Makes the tensor's device current for the lifetime of the guard (no-op for CPU tensors).
class OptionalDeviceGuard {
 public:
  explicit OptionalDeviceGuard(const Tensor& t) {
    if (t.is_cuda()) guard_ = std::make_unique<torch::stable::accelerator::DeviceGuard>(t.get_device_index());
  }

 private:
  std::unique_ptr<torch::stable::accelerator::DeviceGuard> guard_;
};

// Raised when a CUDA tensor reaches an op in a build without CUDA kernels.
[[noreturn]] void no_cuda_build(const char* op);

}  // namespace nk

// Runs `cpu_call` or `cuda_call` by the device of tensor `t`; `cuda_call` may use `stream`
// (torch's current stream on that device). In a CPU-only build the CUDA call is not compiled.
#ifdef NK_WITH_CUDA
#define NK_ROUTE_BY_DEVICE(t, op, cpu_call, cuda_call)                             \
  do {                                                                             \
    if ((t).is_cuda()) {                                                           \
      [[maybe_unused]] void* stream = ::nk::current_cuda_stream((t).get_device_index()); \
      cuda_call;                                                                   \
    } else {                                                                       \
      cpu_call;                                                                    \
    }                                                                              \
  } while (0)
#else
#define NK_ROUTE_BY_DEVICE(t, op, cpu_call, cuda_call) \
  do {                                                 \
    if ((t).is_cuda()) ::nk::no_cuda_build(op);        \
    cpu_call;                                          \
  } while (0)
#endif
