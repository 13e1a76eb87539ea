#include "common/check.h"

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

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

namespace {

std::vector<int64_t> sizes_of(const Tensor& t) {
  std::vector<int64_t> s;
  for (int64_t i = 0; i < t.dim(); ++i) s.push_back(t.size(i));
  return s;
}

}  // namespace

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += str_cat(i ? ", " : "", shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

std::string shape_str(const Tensor& t) { return shape_str(sizes_of(t)); }

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

void check_dtype(const char* op, const char* arg, ScalarType t, std::initializer_list<ScalarType> allowed) {
  for (auto a : allowed)
    if (t == a) return;
  std::string names;
  for (auto a : allowed) names += str_cat(names.empty() ? "" : ", ", dtype_name(a));
  NK_CHECK(false, op, ": ", arg, " must be one of {", names, "}, got ", dtype_name(t));
}

void check_dtype(const char* op, const char* arg, const Tensor& t,
                 std::initializer_list<ScalarType> allowed) {
  check_dtype(op, arg, t.scalar_type(), allowed);
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

void check_float(const char* op, const char* arg, const Tensor& t) { check_dtype(op, arg, t, kFloatTypes); }

void check_float(const char* op, const char* arg, const Tensor& t, const Tensor& ref, const char* ref_arg) {
  check_float(op, arg, t);
  check_same_device(op, arg, t, ref, ref_arg);
}

void check_shape(const char* op, const char* arg, const Tensor& t, const std::vector<int64_t>& shape,
                 const std::string& meaning) {
  NK_CHECK(sizes_of(t) == shape, op, ": ", arg, " must have shape ", shape_str(shape), meaning.empty() ? "" : " ",
           meaning, ", got ", shape_str(t));
}

void check_size_at_least(const char* op, const char* arg, const Tensor& t, int64_t d, int64_t min,
                         const char* what) {
  NK_CHECK(t.size(d) >= min, op, ": ", arg, ".shape[", d, "] must be at least ", min, " (", what, "), got shape ",
           shape_str(t));
}

void check_same_dtype(const char* op, const char* arg, const Tensor& t, const Tensor& ref, const char* ref_arg) {
  NK_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", arg, " must have ", ref_arg, "'s dtype ",
           dtype_name(ref.scalar_type()), ", got ", dtype_name(t.scalar_type()));
}

void check_same_shape(const char* op, const char* arg, const Tensor& t, const Tensor& ref, const char* ref_arg) {
  NK_CHECK(sizes_of(t) == sizes_of(ref), op, ": ", arg, " must have ", ref_arg, "'s shape ", shape_str(ref),
           ", got ", shape_str(t));
}

void check_dtype_and_device(const char* op, const char* arg, const Tensor& t, const Tensor& ref, const char* ref_arg) {
  check_same_dtype(op, arg, t, ref, ref_arg);
  check_same_device(op, arg, t, ref, ref_arg);
}

void check_like(const char* op, const char* arg, const Tensor& t, const Tensor& ref, const char* ref_arg) {
  check_same_shape(op, arg, t, ref, ref_arg);
  check_dtype_and_device(op, arg, t, ref, ref_arg);
}

void check_one_element(const char* op, const char* arg, const Tensor& t) {
  NK_CHECK(t.numel() == 1, op, ": ", arg, " must hold exactly one element, got shape ", shape_str(t));
}

void check_one_element(const char* op, const char* arg, const Tensor& t, ScalarType dtype, const Tensor& ref,
                       const char* ref_arg) {
  check_one_element(op, arg, t);
  check_dtype(op, arg, t, {dtype});
  check_same_device(op, arg, t, ref, ref_arg);
}

void check_in_range(const char* op, const char* arg, int64_t value, int64_t lo, int64_t hi, const char* hi_what) {
  NK_CHECK(value >= lo && value <= hi, op, ": ", arg, " must be in [", lo, ", ", hi_what ? hi_what : "",
           hi_what ? " = " : "", hi, "], got ", value);
}

void check_tensor(const char* op, const char* arg, const Tensor& t, std::initializer_list<int64_t> sizes,
                  std::initializer_list<ScalarType> dtypes, const Tensor& ref, const char* ref_arg) {
  check_dim(op, arg, t, static_cast<int64_t>(sizes.size()));
  if (dtypes.size() > 0) check_dtype(op, arg, t, dtypes);
  check_same_device(op, arg, t, ref, ref_arg);
  int64_t d = 0;
  for (int64_t s : sizes) {
    if (s >= 0) check_size(op, arg, t, d, s);
    ++d;
  }
}

namespace {

int64_t elem_bytes(ScalarType t) {
  switch (t) {
    case ScalarType::Double:
    case ScalarType::Long: return 8;
    case ScalarType::Float:
    case ScalarType::Int: return 4;
    case ScalarType::Half:
    case ScalarType::BFloat16: return 2;
    default: return 1;
  }
}

// A tensor's bytes as `runs`: an inner block of `inner` bytes (the dimensions whose strides
// leave no gap, smallest stride first) repeated at the offsets spanned by the outer
// dimensions (byte stride, size). Dimensions of size 1 or stride 0 add no bytes.
struct Runs {
  uintptr_t base = 0;
  int64_t inner = 0;
  std::vector<std::pair<int64_t, int64_t>> outer;
  int64_t hull = 0;  // bytes from base to the end of the last element
  int64_t count() const {
    int64_t n = 1;
    for (auto& d : outer) n = n > (int64_t{1} << 40) / d.second ? (int64_t{1} << 40) : n * d.second;
    return n;
  }
};

Runs runs_of(const Tensor& t) {
  Runs r;
  const int64_t es = elem_bytes(t.scalar_type());
  r.base = reinterpret_cast<uintptr_t>(t.data_ptr());
  std::vector<std::pair<int64_t, int64_t>> dims;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) != 0) dims.push_back({t.stride(d) * es, t.size(d)});
  std::sort(dims.begin(), dims.end());
  r.inner = es;
  size_t i = 0;
  for (; i < dims.size() && dims[i].first <= r.inner; ++i) r.inner += dims[i].first * (dims[i].second - 1);
  r.outer.assign(dims.begin() + i, dims.end());
  r.hull = r.inner;
  for (auto& d : r.outer) r.hull += d.first * (d.second - 1);
  return r;
}

// Start offsets (from base) of every run, ascending.
std::vector<int64_t> run_starts(const Runs& r) {
  std::vector<int64_t> v{0};
  for (auto& [stride, size] : r.outer) {
    std::vector<int64_t> next;
    next.reserve(v.size() * size);
    for (int64_t k = 0; k < size; ++k)
      for (int64_t o : v) next.push_back(o + k * stride);
    v.swap(next);
  }
  std::sort(v.begin(), v.end());
  return v;
}

}  // namespace

void check_writable(const char* op, const char* arg, const Tensor& t) {
  for (int64_t d = 0; d < t.dim(); ++d)
    NK_CHECK(t.size(d) <= 1 || t.stride(d) != 0, op, ": ", arg, " is written, so it must not be an expanded "
             "view (stride 0 in dimension ", d, " of size ", t.size(d), "); pass a tensor with its own memory "
             "for every element (e.g. .clone())");
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.push_back({t.stride(d), t.size(d)});
  std::sort(dims.begin(), dims.end());
  int64_t extent = 1;  // elements spanned by the dimensions of smaller stride
  for (auto& [stride, size] : dims) {
    NK_CHECK(stride >= extent, op, ": ", arg, " is written, so its elements must not overlap in memory; its "
             "strides must nest (each at least the extent of the smaller ones), got shape ", shape_str(t),
             " with a stride of ", stride, " inside an extent of ", extent, " elements");
    extent = stride * (size - 1) + extent;
  }
}

bool may_overlap(const Tensor& a, const Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const Runs ra = runs_of(a), rb = runs_of(b);
  const uintptr_t a_end = ra.base + ra.hull, b_end = rb.base + rb.hull;
  if (a_end <= rb.base || b_end <= ra.base) return false;  // disjoint hulls: the common case
  constexpr int64_t kMaxRuns = int64_t{1} << 22;
  if (ra.count() + rb.count() > kMaxRuns) return true;
  const std::vector<int64_t> sa = run_starts(ra), sb = run_starts(rb);
  // Runs of one tensor have one length, so their ends ascend with their starts: one merge.
  size_t i = 0, j = 0;
  while (i < sa.size() && j < sb.size()) {
    const uintptr_t a0 = ra.base + sa[i], a1 = a0 + ra.inner, b0 = rb.base + sb[j], b1 = b0 + rb.inner;
    if (a1 <= b0) ++i;
    else if (b1 <= a0) ++j;
    else return true;
  }
  return false;
}

void check_no_overlap(const char* op, const char* written_arg, const Tensor& written, const char* read_arg,
                      const Tensor& read) {
  NK_CHECK(!may_overlap(written, read), op, ": ", written_arg, " must not share memory with ", read_arg,
           " (", written_arg, " is written while ", read_arg, " is read), got overlapping views: ", written_arg,
           " ", shape_str(written), " and ", read_arg, " ", shape_str(read), "; pass separate tensors (e.g. "
           ".clone() one of them)");
}

}  // namespace nk

namespace nk {

void check_state_indices(const char* op, const char* arg, const Tensor& idx, const char* state_arg, int64_t rows,
                         bool distinct) {
  NK_CHECK(idx.is_cpu() && idx.is_contiguous() && idx.scalar_type() == ScalarType::Int && idx.dim() == 1,
           "internal: check_state_indices needs a contiguous int32 CPU vector");
  const int32_t* v = static_cast<const int32_t*>(idx.data_ptr());
  const int64_t n = idx.size(0);
  std::vector<std::pair<int32_t, int64_t>> seen;  // (row, entry)
  for (int64_t b = 0; b < n; ++b) {
    NK_CHECK(v[b] < rows, op, ": ", arg, "[", b, "] = ", v[b], " is out of range for ", state_arg, " with ", rows,
             " rows (expected -1 for a padded slot or 0..", rows - 1, ")");
    if (v[b] >= 0) seen.push_back({v[b], b});
  }
  if (!distinct) return;
  std::sort(seen.begin(), seen.end());
  for (size_t i = 1; i < seen.size(); ++i)
    NK_CHECK(seen[i].first != seen[i - 1].first, op, ": ", arg, " holds row ", seen[i].first, " twice (entries ",
             seen[i - 1].second, " and ", seen[i].second, "); each ", state_arg, " row is updated in place by at "
             "most one batch entry (expected distinct rows, negative for padded slots)");
}

void check_parents(const char* op, const Tensor& parents, const char* root) {
  NK_CHECK(parents.is_cpu() && parents.is_contiguous() && parents.scalar_type() == ScalarType::Int &&
               parents.dim() == 2,
           "internal: check_parents needs a contiguous int32 CPU (batch, T) tensor");
  const int32_t* v = static_cast<const int32_t*>(parents.data_ptr());
  const int64_t batch = parents.size(0), T = parents.size(1);
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t t = 0; t < T; ++t)
      NK_CHECK(v[b * T + t] >= -1 && v[b * T + t] < t, op, ": parents[", b, ", ", t, "] = ", v[b * T + t],
               " must be in [-1, ", t, "): -1 continues from ", root, ", otherwise an earlier token (parents "
               "precede their children)");
}

}  // namespace nk
