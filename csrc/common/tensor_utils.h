// Small tensor helpers over the stable API: allocation in a chosen layout, float32 copies.
#pragma once

#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <vector>

#include "common/check.h"

namespace nk {

// Uninitialised tensor of `sizes` on t's device with dtype `dt`.
inline Tensor new_empty(const Tensor& t, std::vector<int64_t> sizes, ScalarType dt) {
  return torch::stable::new_empty(t, sizes, dt);
}

// (b, c, l) tensor laid out like `like` when `like` is channel-last (stride(1) == 1), so a
// channel-last activation gives a channel-last result; contiguous otherwise.
inline Tensor empty_bcl(const Tensor& like, int64_t b, int64_t c, int64_t l, ScalarType dt) {
  if (like.dim() == 3 && like.stride(1) == 1 && c > 1) {
    return torch::stable::transpose(new_empty(like, {b, l, c}, dt), 1, 2);
  }
  return new_empty(like, {b, c, l}, dt);
}

// Contiguous float32 copy (or the tensor itself when it already is one).
inline Tensor contiguous_float(const Tensor& t) {
  Tensor f = t.scalar_type() == ScalarType::Float ? t : torch::stable::to(t, ScalarType::Float);
  return torch::stable::contiguous(f);
}

}  // namespace nk
