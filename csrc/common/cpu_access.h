// Typed element access through untyped pointers, for the CPU kernels: load as float32, store
// rounded to the element type T (float, c10::Half, c10::BFloat16).
#pragma once

#include <cstdint>

namespace nk {

template <typename T>
inline float ld(const void* base, int64_t off) {
  return static_cast<float>(static_cast<const T*>(base)[off]);
}
template <typename T>
inline void st(void* base, int64_t off, float v) {
  static_cast<T*>(base)[off] = static_cast<T>(v);
}

}  // namespace nk
