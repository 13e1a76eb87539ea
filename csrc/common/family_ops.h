// How a family registers its ops: a table of {schema, boxed kernel} in
// csrc/<family>/<family>_ops.cpp and NK_REGISTER_FAMILY, which defines every schema (filing it
// under the family, op_registry.h) and registers every kernel for CPU and, in CUDA builds
// only, CUDA (each entry routes by its inputs' device).
#pragma once

#include <torch/csrc/stable/library.h>

#include <cstddef>
#include <iterator>

#include "common/check.h"
#include "common/op_registry.h"

namespace nk {

struct OpDef {
  const char* schema;                                    // "name(args) -> ret"
  void (*kernel)(StableIValue*, uint64_t, uint64_t);     // TORCH_BOX(&entry)
};

void define_ops(torch::stable::detail::StableLibrary& m, const char* family, const OpDef* ops, size_t n);
void impl_ops(torch::stable::detail::StableLibrary& m, const OpDef* ops, size_t n);

}  // namespace nk

#ifdef NK_WITH_CUDA
#define NK_REGISTER_FAMILY_CUDA(table) \
  STABLE_TORCH_LIBRARY_IMPL(nemokernels, CUDA, m) { nk::impl_ops(m, table, std::size(table)); }
#else
#define NK_REGISTER_FAMILY_CUDA(table)
#endif

#define NK_REGISTER_FAMILY(family, table)                                                          \
  STABLE_TORCH_LIBRARY_FRAGMENT(nemokernels, m) { nk::define_ops(m, family, table, std::size(table)); } \
  STABLE_TORCH_LIBRARY_IMPL(nemokernels, CPU, m) { nk::impl_ops(m, table, std::size(table)); }     \
  NK_REGISTER_FAMILY_CUDA(table)
