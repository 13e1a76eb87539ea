// The shim declares its CUDA entry points (implemented in libtorch_cuda) under USE_CUDA; it
// must be set before any torch header pulls the shim in.
#if defined(NK_WITH_CUDA) && !defined(USE_CUDA)
#define USE_CUDA
#endif
#include <torch/csrc/inductor/aoti_torch/c/shim.h>

#include <dlfcn.h>

#include "common/device.h"

namespace nk {

DType to_dtype(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return DType::F32;
    case ScalarType::Half: return DType::F16;
    case ScalarType::BFloat16: return DType::BF16;
    default: NK_CHECK(false, "internal: unsupported dtype ", dtype_name(t));
  }
}

#ifdef NK_WITH_CUDA
// aoti_torch_get_current_cuda_stream lives in libtorch_cuda, which torch has loaded whenever a
// CUDA tensor exists; it is found there at first use instead of being a link dependency.
void* current_cuda_stream(int32_t device_index) {
  using Fn = decltype(&aoti_torch_get_current_cuda_stream);
  static Fn fn = [] {
    void* lib = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
    return lib ? reinterpret_cast<Fn>(dlsym(lib, "aoti_torch_get_current_cuda_stream")) : nullptr;
  }();
  NK_CHECK(fn != nullptr, "libtorch_cuda is not loaded: is this a CUDA build of torch?");
  void* stream = nullptr;
  NK_CHECK(fn(device_index, &stream) == AOTI_TORCH_SUCCESS,
           "could not get the current CUDA stream of device ", device_index);
  return stream;
}
#endif

void no_cuda_build(const char* op) {
  NK_CHECK(false, op, ": got CUDA tensors, but this nemokernels build has no CUDA kernels "
           "(rebuild with nvcc available or NEMOKERNELS_BUILD_CUDA=1)");
}

}  // namespace nk
