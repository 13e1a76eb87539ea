// The op list, derived rather than kept by hand: each family's csrc/<family>/<family>_ops.cpp
// defines its schemas through NK_REGISTER_FAMILY (family_ops.h), which files every op under its
// family here, and _C.op_families() reads the list back. Torch-free, so csrc/module.cpp can use it.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace nk {

// The op name of `schema` ("name(args) -> ret"); throws on a malformed schema.
std::string schema_op_name(const char* schema);
// Files `op` under `family`.
void file_op(const std::string& op, const char* family);

// (op, family) for every op defined so far (every op, once _C is loaded), in definition order.
const std::vector<std::pair<std::string, std::string>>& op_families();

}  // namespace nk

