// The namespace `nemokernels`, the derived op list (op_registry.h) and the registration helpers
// (family_ops.h). The schemas themselves are in each family's csrc/<family>/<family>_ops.cpp.
#include "common/family_ops.h"

#include <stdexcept>

namespace nk {

namespace {
std::vector<std::pair<std::string, std::string>>& registry() {
  static std::vector<std::pair<std::string, std::string>> ops;  // built at load, read-only after
  return ops;
}

// The op name of `schema` ("name(args) -> ret"); throws on a malformed schema.
std::string schema_op_name(const char* schema) {
  const std::string s(schema);
  const auto paren = s.find('(');
  if (paren == std::string::npos || paren == 0) throw std::logic_error("nemokernels: malformed schema: " + s);
  return s.substr(0, paren);
}
}  // namespace

void define_ops(torch::stable::detail::StableLibrary& m, const char* family, const OpDef* ops, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    m.def(ops[i].schema);
    registry().emplace_back(schema_op_name(ops[i].schema), family);
  }
}

void impl_ops(torch::stable::detail::StableLibrary& m, const OpDef* ops, size_t n) {
  for (size_t i = 0; i < n; ++i) m.impl(schema_op_name(ops[i].schema).c_str(), ops[i].kernel);
}

const std::vector<std::pair<std::string, std::string>>& op_families() { return registry(); }

}  // namespace nk

// Owns the namespace; the families add their ops to it as fragments.
STABLE_TORCH_LIBRARY(nemokernels, m) { (void)m; }
