// The op list, derived rather than kept by hand: each family's csrc/<family>/<family>_ops.cpp
// defines its schemas through NK_REGISTER_FAMILY (family_ops.h), which files every op under its
// family here, and _C.op_families() reads the list back. Torch-free, so csrc/module.cpp can use it.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace nk {

// (op, family) for every op defined so far (every op, once _C is loaded), in definition order.
const std::vector<std::pair<std::string, std::string>>& op_families();

}  // namespace nk

