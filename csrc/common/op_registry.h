// The op list, derived rather than kept by hand: each family's csrc/<family>/<family>_ops.cpp
// defines its schemas through nk::family_op, which files the op under the family, and
// _C.op_families() reads the list back. Torch-free, so csrc/module.cpp can include it.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace nk {

// Files the op named by `schema` ("name(args) -> ret") under `family` and returns `schema`,
// for use as m.def(family_op("ssd", "causal_conv1d_fwd(...) -> ...")).
const char* family_op(const char* family, const char* schema);

// (op, family) for every op defined so far (every op, once _C is loaded), in definition order.
const std::vector<std::pair<std::string, std::string>>& op_families();

}  // namespace nk

// In <family>_ops.cpp: registers `impls(m)` (the family's m.impl calls) for the CPU key and, in
// CUDA builds only, the CUDA key (every entry routes by its inputs' device).
#ifdef NK_WITH_CUDA
#define NK_FAMILY_KERNELS(impls)                                  \
  STABLE_TORCH_LIBRARY_IMPL(nemokernels, CPU, m) { impls(m); }    \
  STABLE_TORCH_LIBRARY_IMPL(nemokernels, CUDA, m) { impls(m); }
#else
#define NK_FAMILY_KERNELS(impls) STABLE_TORCH_LIBRARY_IMPL(nemokernels, CPU, m) { impls(m); }
#endif
