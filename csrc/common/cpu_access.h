// Typed element access through untyped pointers, for the CPU kernels: load as float32, store
// rounded to the element type T (float, c10::Half, c10::BFloat16).
#pragma once

#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <cstdint>

#include "common/macros.h"

namespace nk {

// Calls f.template operator()<T>() with T the element type of dt (float, c10::Half,
// c10::BFloat16): `dispatch_dtype(dt, [&]<typename T>() { kernel<T>(...); })`.
template <typename F>
void dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::F32: f.template operator()<float>(); break;
    case DType::F16: f.template operator()<c10::Half>(); break;
    case DType::BF16: f.template operator()<c10::BFloat16>(); break;
  }
}

template <typename T>
inline float ld(const void* base, int64_t off) {
  return static_cast<float>(static_cast<const T*>(base)[off]);
}
template <typename T>
inline void st(void* base, int64_t off, float v) {
  static_cast<T*>(base)[off] = static_cast<T>(v);
}

}  // namespace nk
