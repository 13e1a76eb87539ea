// The namespace `nemokernels` and the derived op list (op_registry.h). The schemas themselves
// are defined by each family in csrc/<family>/<family>_ops.cpp (STABLE_TORCH_LIBRARY_FRAGMENT).
#include "common/op_registry.h"

#include <torch/csrc/stable/library.h>

#include <stdexcept>

namespace nk {

namespace {
std::vector<std::pair<std::string, std::string>>& registry() {
  static std::vector<std::pair<std::string, std::string>> ops;  // built at load, read-only after
  return ops;
}
}  // namespace

const char* family_op(const char* family, const char* schema) {
  const std::string s(schema);
  const auto paren = s.find('(');
  if (paren == std::string::npos || paren == 0) throw std::logic_error("nemokernels: malformed schema: " + s);
  registry().emplace_back(s.substr(0, paren), family);
  return schema;
}

const std::vector<std::pair<std::string, std::string>>& op_families() { return registry(); }

}  // namespace nk

// Owns the namespace; the families add their ops to it as fragments.
STABLE_TORCH_LIBRARY(nemokernels, m) { (void)m; }
