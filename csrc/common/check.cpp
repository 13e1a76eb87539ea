#include "common/check.h"

namespace nk {

const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Double: return "float64";
    case ScalarType::Int: return "int32";
    case ScalarType::Long: return "int64";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Bool: return "bool";
    case ScalarType::Float8_e4m3fn: return "float8_e4m3fn";
    case ScalarType::Float8_e5m2: return "float8_e5m2";
    case ScalarType::Char: return "int8";
    case ScalarType::Short: return "int16";
    case ScalarType::ComplexFloat: return "complex64";
    case ScalarType::ComplexDouble: return "complex128";
    default: return "an unsupported dtype";
  }
}

std::string shape_str(const Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) s += str_cat(i ? ", " : "", t.size(i));
  return s + (t.dim() == 1 ? ",)" : ")");
}

std::string device_str(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  if (t.is_cuda()) return str_cat("cuda:", t.get_device_index());
  return "another device";
}

void check_dim(const char* op, const char* arg, const Tensor& t, int64_t dim) {
  NK_CHECK(t.dim() == dim, op, ": ", arg, " must have ", dim, " dimensions, got shape ",
           shape_str(t));
}

void check_size(const char* op, const char* arg, const Tensor& t, int64_t d, int64_t size) {
  NK_CHECK(t.size(d) == size, op, ": ", arg, ".shape[", d, "] must be ", size, ", got shape ",
           shape_str(t));
}

void check_dtype(const char* op, const char* arg, const Tensor& t,
                 std::initializer_list<ScalarType> allowed) {
  for (auto a : allowed)
    if (t.scalar_type() == a) return;
  std::string names;
  for (auto a : allowed) names += str_cat(names.empty() ? "" : ", ", dtype_name(a));
  NK_CHECK(false, op, ": ", arg, " must be one of {", names, "}, got ",
           dtype_name(t.scalar_type()));
}

void check_same_device(const char* op, const char* arg, const Tensor& t, const Tensor& ref,
                       const char* ref_arg) {
  bool same = t.is_cpu() == ref.is_cpu() && t.is_cuda() == ref.is_cuda() &&
              (!t.is_cuda() || t.get_device_index() == ref.get_device_index());
  NK_CHECK(same, op, ": ", arg, " is on ", device_str(t), " but ", ref_arg, " is on ",
           device_str(ref), "; all tensors must be on one device");
}

void check_limit(const char* op, const char* what, int64_t value, int64_t limit, const char* why,
                 const char* how) {
  NK_CHECK(value <= limit, op, ": ", what, " = ", value, " exceeds ", limit, ", ", why, "; ", how);
}

bool is_float_type(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Half || t == ScalarType::BFloat16;
}

}  // namespace nk
