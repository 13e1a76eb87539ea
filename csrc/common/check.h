// Input checks shared by every op entry point. Each message names the op and the argument,
// and says what was expected and what arrived, so a bad call fails loudly and clearly.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <stdexcept>
#include <string>
#include <vector>

#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

namespace nk {

// Message building without iostreams: on the H100 machine (GCC 13 headers, torch 2.11 process)
// an ostringstream instantiated inside this library crashed while formatting an error message.
// std::string and std::to_string have no such dependence on the runtime's locale machinery.
namespace detail {
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
template <typename T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
void append(std::string& s, T v) {
  s += std::to_string(v);
}
}  // namespace detail

template <typename... Args>
std::string str_cat(const Args&... args) {
  std::string s;
  (detail::append(s, args), ...);
  return s;
}

}  // namespace nk

// Throws std::runtime_error("nemokernels: <message>"); torch surfaces it as RuntimeError.
#define NK_CHECK(cond, ...)                                                   \
  do {                                                                        \
    if (!(cond)) {                                                            \
      throw std::runtime_error(::nk::str_cat("nemokernels: ", __VA_ARGS__)); \
    }                                                                         \
  } while (0)

namespace nk {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;

const char* dtype_name(ScalarType t);
std::string shape_str(const Tensor& t);
std::string shape_str(const std::vector<int64_t>& shape);
std::string device_str(const Tensor& t);

// `op` is the public op name used as the message prefix, `arg` the argument name.
void check_dim(const char* op, const char* arg, const Tensor& t, int64_t dim);
void check_size(const char* op, const char* arg, const Tensor& t, int64_t d, int64_t size);
void check_dtype(const char* op, const char* arg, const Tensor& t,
                 std::initializer_list<ScalarType> allowed);
// The same for a dtype argument (an op's out_dtype).
void check_dtype(const char* op, const char* arg, ScalarType t, std::initializer_list<ScalarType> allowed);
void check_same_device(const char* op, const char* arg, const Tensor& t, const Tensor& ref,
                       const char* ref_arg);

// The activation dtypes the kernels take: float32, float16, bfloat16.
inline constexpr std::initializer_list<ScalarType> kFloatTypes = {ScalarType::Float, ScalarType::Half,
                                                                  ScalarType::BFloat16};

// t's dtype is one of kFloatTypes; with `ref`, t is also on ref's device.
void check_float(const char* op, const char* arg, const Tensor& t);
void check_float(const char* op, const char* arg, const Tensor& t, const Tensor& ref, const char* ref_arg);
// t has exactly `shape` (rank and every size); `meaning` (optional) says where it comes from:
//   "dt must have shape (2, 10, 4) (like x), got (2, 9, 4)"
void check_shape(const char* op, const char* arg, const Tensor& t, const std::vector<int64_t>& shape,
                 const std::string& meaning = "");
// t.shape[d] >= min; `what` says what min is ("batch, when state_batch_indices is None").
void check_size_at_least(const char* op, const char* arg, const Tensor& t, int64_t d, int64_t min,
                         const char* what);
// t has ref's dtype / ref's shape / ref's dtype and device / all three (check_like: shape, dtype,
// device).
void check_same_dtype(const char* op, const char* arg, const Tensor& t, const Tensor& ref, const char* ref_arg);
void check_same_shape(const char* op, const char* arg, const Tensor& t, const Tensor& ref, const char* ref_arg);
void check_dtype_and_device(const char* op, const char* arg, const Tensor& t, const Tensor& ref, const char* ref_arg);
void check_like(const char* op, const char* arg, const Tensor& t, const Tensor& ref, const char* ref_arg);
// t holds one element (any rank): a scalar passed as a tensor (a seed, a global scale).
void check_one_element(const char* op, const char* arg, const Tensor& t);
// The same, then its dtype and that it is on ref's device.
void check_one_element(const char* op, const char* arg, const Tensor& t, ScalarType dtype, const Tensor& ref,
                       const char* ref_arg);
// An integer argument inside [lo, hi]: "pad_to must be in [1, 4096], got 0"; `hi_what` names
// the upper bound ("topk_group must be in [1, n_group = 4], got 5").
void check_in_range(const char* op, const char* arg, int64_t value, int64_t lo, int64_t hi,
                    const char* hi_what = nullptr);
// The usual checks of one argument, in order: check_dim (the rank of `sizes`), check_dtype
// (an empty `dtypes`: any dtype), check_same_device (against `ref`), then check_size for every
// dim whose expected size is >= 0 (-1: any size).
void check_tensor(const char* op, const char* arg, const Tensor& t, std::initializer_list<int64_t> sizes,
                  std::initializer_list<ScalarType> dtypes, const Tensor& ref, const char* ref_arg);

// Size limits of a kernel (int32 indices, CUDA grid dimensions): `what` = value must be at most
// `limit`; `why` names the limit, `how` says how to stay under it. For example
//   "grouped_gemm: N = 5000000 exceeds 4194240, the most the CUDA kernels take (grid dimension y
//    = ceil(N / 64) <= 65535); split w along N into several calls"
void check_limit(const char* op, const char* what, int64_t value, int64_t limit, const char* why,
                 const char* how);
constexpr int64_t kInt32Max = 2147483647;      // int32 indices and CUDA grid dimension x
constexpr int64_t kGridYZMax = 65535;          // CUDA grid dimensions y and z

// ---- In-place safety: checks of the tensors an op writes (host-side arithmetic on pointers and
// strides only, so they cost no device sync and hold on every device).

// Throws unless every element of `t` has its own address: no expanded (stride 0) dimension of
// size > 1, and strides that nest (sorted by stride, each at least the extent of the smaller
// ones; every layout torch's views produce except as_strided overlaps passes).
void check_writable(const char* op, const char* arg, const Tensor& t);
// Whether some byte of `a` may also be a byte of `b` (same device assumed). Exact at the
// granularity of the tensors' contiguous runs (interleaved views of one buffer that share no
// element do not overlap); conservative (true) only when both hulls overlap and the runs are
// too many to enumerate (over ~4M).
bool may_overlap(const Tensor& a, const Tensor& b);
// Throws when `written` (the op's output argument `written_arg`) may share memory with
// `read` (an input `read_arg` the op reads while it writes `written_arg`).
void check_no_overlap(const char* op, const char* written_arg, const Tensor& written, const char* read_arg,
                      const Tensor& read);
// Slot indices of a state cache, read on the host (so CPU tensors only: on CUDA this would
// need a device sync). `idx` is a contiguous int32 (n,) tensor; each entry must be < `rows`
// (the row count of `state_arg`; negative = a padded slot, skipped) and, when `distinct`
// (the state is updated in place), no row may appear twice (padded entries may repeat).
void check_state_indices(const char* op, const char* arg, const Tensor& idx, const char* state_arg, int64_t rows,
                         bool distinct = true);
// The parents of draft trees, read on the host (CPU tensors only, as above). `parents` is a
// contiguous int32 (batch, T) tensor; each parents[b, t] must be in [-1, t): a root (-1, which
// continues from `root`, e.g. "the state row") or an earlier token.
void check_parents(const char* op, const Tensor& parents, const char* root);

}  // namespace nk
