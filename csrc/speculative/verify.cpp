// Op entry points of the speculative-verification family: every argument check (the one
// place they live), output and workspace allocation, and dispatch to the CPU or CUDA kernels.
// Shape, dtype and device checks run everywhere. Value checks (token ids inside the vocab,
// probabilities forming distributions, parents forming a tree, per-request parameters in
// range) read the data, so they run on the CPU only: on CUDA they would need a host
// synchronisation. The CUDA kernels are instead memory-safe for any values (ids and counts
// are clamped before indexing) and then give unspecified, in-vocabulary tokens.
#include "speculative/verify.h"

#include <cmath>
#include <optional>
#include <tuple>

#include "common/check.h"
#include "common/device.h"
#include "common/tensor_utils.h"

namespace nk {
namespace {

constexpr const char* kGreedy = "verify_greedy";
constexpr const char* kReject = "rejection_sample";
constexpr const char* kTreeGreedy = "verify_tree_greedy";
constexpr const char* kTreeReject = "verify_tree_rejection";
constexpr const char* kSampling = "sampling_probs";

// CPU vocab chunk: enough (row, chunk) tasks for the thread pool at batch 1.
constexpr int64_t kCpuChunk = 16384;

// The tensor, or a copy whose last dim is contiguous (the kernels need stride(-1) == 1).
Tensor last_dim_contiguous(const Tensor& t) {
  return (t.dim() > 0 && t.stride(t.dim() - 1) != 1 && t.size(t.dim() - 1) > 1) ? torch::stable::contiguous(t) : t;
}

// A contiguous copy of an optional tensor (emplace, not a conditional expression: GCC 12
// reports a false maybe-uninitialized on std::optional<Tensor> built by `c ? x : nullopt`).
std::optional<Tensor> contiguous_opt(const std::optional<Tensor>& t) {
  std::optional<Tensor> r;
  if (t) r.emplace(torch::stable::contiguous(*t));
  return r;
}

std::optional<Tensor> last_dim_contiguous_opt(const std::optional<Tensor>& t) {
  std::optional<Tensor> r;
  if (t) r.emplace(last_dim_contiguous(*t));
  return r;
}

template <typename T>
const T* ptr(const Tensor& t) {
  return static_cast<const T*>(t.data_ptr());
}

// num_draft_tokens (batch,) int64 with values in [0, k] (values checked on the CPU).
void check_num_draft(const char* op, const std::optional<Tensor>& nd, int64_t batch, int64_t k, const Tensor& ref) {
  if (!nd) return;
  check_tensor(op, "num_draft_tokens", *nd, {batch}, {ScalarType::Long}, ref, "draft_token_ids");
  if (!nd->is_cpu()) return;
  Tensor c = torch::stable::contiguous(*nd);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = ptr<int64_t>(c)[b];
    NK_CHECK(n >= 0 && n <= k, op, ": num_draft_tokens[", b, "] must be in [0, k=", k, "], got ", n);
  }
}

// Drafted ids of the used positions j < n_b inside [0, vocab) (CPU only).
void check_id_values(const char* op, const char* arg, const Tensor& ids, const std::optional<Tensor>& nd,
                     int64_t first, int64_t vocab) {
  if (!ids.is_cpu()) return;
  const int64_t batch = ids.size(0), len = ids.size(1);
  std::optional<Tensor> ndc = contiguous_opt(nd);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = ndc ? ptr<int64_t>(*ndc)[b] : len;
    for (int64_t j = first; j < n; ++j) {
      const int64_t v = ptr<int64_t>(ids)[b * ids.stride(0) + j * ids.stride(1)];
      NK_CHECK(v >= 0 && v < vocab, op, ": ", arg, "[", b, ", ", j, "] = ", v,
               " is outside the vocabulary [0, ", vocab, ")");
    }
  }
}

// Rows (b, j) of a (batch, rows, vocab) float32 tensor with j in [first, last_b] are
// distributions: finite, non-negative, summing to 1 within 1e-3 (CPU only).
void check_distributions(const char* op, const char* arg, const Tensor& t, const std::optional<Tensor>& nd,
                         int64_t first, int64_t extra) {
  if (!t.is_cpu()) return;
  const int64_t batch = t.size(0), rows = t.size(1), vocab = t.size(2);
  std::optional<Tensor> ndc = contiguous_opt(nd);
  const float* base = ptr<float>(t);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t last = ndc ? ptr<int64_t>(*ndc)[b] + extra : rows;  // exclusive
    for (int64_t j = first; j < last && j < rows; ++j) {
      const float* row = base + b * t.stride(0) + j * t.stride(1);
      double sum = 0.0;
      for (int64_t i = 0; i < vocab; ++i) {
        const float v = row[i * t.stride(2)];
        NK_CHECK(std::isfinite(v) && v >= 0.f, op, ": ", arg, "[", b, ", ", j, "] is not a probability "
                 "distribution: entry ", i, " is ", static_cast<double>(v), " (must be finite and >= 0)");
        sum += v;
      }
      NK_CHECK(std::fabs(sum - 1.0) <= 1e-3, op, ": ", arg, "[", b, ", ", j, "] is not a probability "
               "distribution: it sums to ", sum, " (must be 1 within 1e-3)");
    }
  }
}

void check_seed(const char* op, const std::optional<Tensor>& seed_tensor, const Tensor& ref) {
  if (seed_tensor) check_one_element(op, "seed_tensor", *seed_tensor, ScalarType::Long, ref, "target_probs");
}

void check_tree(const char* op, const Tensor& cand, const Tensor& parents, int64_t vocab) {
  if (!parents.is_cpu()) return;
  const int64_t batch = parents.size(0), n = parents.size(1);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t c = 0; c < n; ++c) {
      const int64_t par = ptr<int64_t>(parents)[b * parents.stride(0) + c * parents.stride(1)];
      if (c == 0) {
        NK_CHECK(par == -1, op, ": parents[", b, ", 0] must be -1 (node 0 is the root), got ", par);
      } else {
        NK_CHECK(par >= 0 && par < c, op, ": parents[", b, ", ", c, "] = ", par, " must be in [0, ", c,
                 ") (parents precede their children)");
      }
    }
  }
  check_id_values(op, "candidate_ids", cand, std::nullopt, 1, vocab);
}

// CUDA: one block per row (or per request) on grid dimension x.
void check_grid_rows(const char* op, const char* what, int64_t rows, const Tensor& t) {
  if (!t.is_cuda()) return;
  check_limit(op, what, rows, kInt32Max, "the most the CUDA kernels take (one block each, grid dimension x)",
              "verify the batch in several calls");
}

int64_t num_splits(const Tensor& t, int64_t rows, int64_t vocab) {
#ifdef NK_WITH_CUDA
  if (t.is_cuda()) return spec_cuda_num_splits(rows, vocab);
#endif
  (void)rows;
  return (vocab + kCpuChunk - 1) / kCpuChunk;
}

// Fills nsplit/chunk and allocates the partial buffers of an argmax over (rows, vocab): one
// int64 tensor holds the partial indices (rows * nsplit) and the row argmaxes (rows).
std::tuple<Tensor, Tensor> argmax_workspace(SpecArgmaxParams& a, const Tensor& logits) {
  const int64_t rows = a.batch * a.npos;
  a.chunk = spec_chunk_len(a.vocab, num_splits(logits, rows, a.vocab));
  a.nsplit = (a.vocab + a.chunk - 1) / a.chunk;
  Tensor val = new_empty(logits, {rows, a.nsplit}, ScalarType::Float);
  Tensor idx = new_empty(logits, {rows * (a.nsplit + 1)}, ScalarType::Long);
  a.part_val = static_cast<float*>(val.data_ptr());
  a.part_idx = static_cast<int64_t*>(idx.data_ptr());
  a.row_arg = a.part_idx + rows * a.nsplit;
  return {val, idx};
}

void set_logits(SpecArgmaxParams& a, const Tensor& logits) {
  a.batch = logits.size(0);
  a.npos = logits.size(1);
  a.vocab = logits.size(2);
  a.dtype = to_dtype(logits.scalar_type());
  a.logits = logits.data_ptr();
  a.l_sb = logits.stride(0);
  a.l_st = logits.stride(1);
}

void check_logits(const char* op, const Tensor& logits, int64_t batch, int64_t rows, const Tensor& ref,
                  const char* ref_arg) {
  check_tensor(op, "target_logits", logits, {batch, rows, -1}, kFloatTypes, ref, ref_arg);
  check_size_at_least(op, "target_logits", logits, 2, 1, "the vocabulary size");
}

}  // namespace

std::tuple<Tensor, Tensor> spec_verify_greedy(Tensor draft_token_ids, Tensor target_logits,
                                              std::optional<Tensor> num_draft_tokens) {
  const char* op = kGreedy;
  check_dim(op, "draft_token_ids", draft_token_ids, 2);
  check_dtype(op, "draft_token_ids", draft_token_ids, {ScalarType::Long});
  const int64_t batch = draft_token_ids.size(0), k = draft_token_ids.size(1);
  check_logits(op, target_logits, batch, k + 1, draft_token_ids, "draft_token_ids");
  check_num_draft(op, num_draft_tokens, batch, k, draft_token_ids);
  const int64_t vocab = target_logits.size(2);
  check_grid_rows(op, "batch * (k + 1) (rows of target_logits)", batch * (k + 1), target_logits);
  check_id_values(op, "draft_token_ids", draft_token_ids, num_draft_tokens, 0, vocab);
  OptionalDeviceGuard guard(target_logits);
  Tensor out = new_empty(draft_token_ids, {batch, k + 1}, ScalarType::Long);
  Tensor num_acc = new_empty(draft_token_ids, {batch}, ScalarType::Long);
  if (batch == 0) return {out, num_acc};
  Tensor logits = last_dim_contiguous(target_logits);
  SpecGreedyParams p{};
  set_logits(p.am, logits);
  std::optional<Tensor> ndc = contiguous_opt(num_draft_tokens);
  p.am.num_draft = ndc ? ptr<int64_t>(*ndc) : nullptr;
  auto ws = argmax_workspace(p.am, logits);
  p.k = k;
  p.draft = ptr<int64_t>(draft_token_ids);
  p.d_sb = draft_token_ids.stride(0), p.d_st = draft_token_ids.stride(1);
  p.out = static_cast<int64_t*>(out.data_ptr());
  p.num_accepted = static_cast<int64_t*>(num_acc.data_ptr());
  NK_ROUTE_BY_DEVICE(logits, op, spec_verify_greedy_cpu(p), spec_verify_greedy_cuda(p, stream));
  return {out, num_acc};
}

std::tuple<Tensor, Tensor> spec_rejection_sample(Tensor draft_token_ids, std::optional<Tensor> draft_probs,
                                                 Tensor target_probs, std::optional<Tensor> num_draft_tokens,
                                                 std::optional<Tensor> seed_tensor, int64_t seed) {
  const char* op = kReject;
  check_dim(op, "draft_token_ids", draft_token_ids, 2);
  check_dtype(op, "draft_token_ids", draft_token_ids, {ScalarType::Long});
  const int64_t batch = draft_token_ids.size(0), k = draft_token_ids.size(1);
  check_tensor(op, "target_probs", target_probs, {batch, k + 1, -1}, {ScalarType::Float}, draft_token_ids,
               "draft_token_ids");
  check_size_at_least(op, "target_probs", target_probs, 2, 1, "the vocabulary size");
  const int64_t vocab = target_probs.size(2);
  if (draft_probs)
    check_tensor(op, "draft_probs", *draft_probs, {batch, k, vocab}, {ScalarType::Float}, draft_token_ids,
                 "draft_token_ids");
  check_num_draft(op, num_draft_tokens, batch, k, draft_token_ids);
  check_seed(op, seed_tensor, target_probs);
  check_grid_rows(op, "batch", batch, target_probs);
  check_id_values(op, "draft_token_ids", draft_token_ids, num_draft_tokens, 0, vocab);
  if (draft_probs) check_distributions(op, "draft_probs", *draft_probs, num_draft_tokens, 0, 0);
  check_distributions(op, "target_probs", target_probs, num_draft_tokens, 0, 1);
  OptionalDeviceGuard guard(target_probs);
  Tensor out = new_empty(draft_token_ids, {batch, k + 1}, ScalarType::Long);
  Tensor num_acc = new_empty(draft_token_ids, {batch}, ScalarType::Long);
  if (batch == 0) return {out, num_acc};
  Tensor pt = last_dim_contiguous(target_probs);
  std::optional<Tensor> qt = last_dim_contiguous_opt(draft_probs);
  std::optional<Tensor> ndc = contiguous_opt(num_draft_tokens);
  SpecRejectionParams p{};
  p.batch = batch, p.k = k, p.vocab = vocab;
  p.draft = ptr<int64_t>(draft_token_ids);
  p.d_sb = draft_token_ids.stride(0), p.d_st = draft_token_ids.stride(1);
  if (qt) p.q = ptr<float>(*qt), p.q_sb = qt->stride(0), p.q_st = qt->stride(1);
  p.p = ptr<float>(pt), p.p_sb = pt.stride(0), p.p_st = pt.stride(1);
  p.num_draft = ndc ? ptr<int64_t>(*ndc) : nullptr;
  p.seed_ptr = seed_tensor ? ptr<int64_t>(*seed_tensor) : nullptr;
  p.seed = static_cast<uint64_t>(seed);
  p.chunk = spec_chunk_len(vocab, num_splits(pt, batch, vocab));
  p.nsplit = (vocab + p.chunk - 1) / p.chunk;
  Tensor keys = new_empty(pt, {2, batch, p.nsplit}, ScalarType::Float);
  Tensor idxs = new_empty(pt, {2, batch, p.nsplit}, ScalarType::Long);
  p.part_key = static_cast<float*>(keys.data_ptr());
  p.part_key2 = p.part_key + batch * p.nsplit;
  p.part_idx = static_cast<int64_t*>(idxs.data_ptr());
  p.part_idx2 = p.part_idx + batch * p.nsplit;
  p.out = static_cast<int64_t*>(out.data_ptr());
  p.num_accepted = static_cast<int64_t*>(num_acc.data_ptr());
  NK_ROUTE_BY_DEVICE(pt, op, spec_rejection_sample_cpu(p), spec_rejection_sample_cuda(p, stream));
  return {out, num_acc};
}

std::tuple<Tensor, Tensor, Tensor> spec_verify_tree_greedy(Tensor candidate_ids, Tensor parents,
                                                           Tensor target_logits, int64_t max_depth) {
  const char* op = kTreeGreedy;
  check_dim(op, "candidate_ids", candidate_ids, 2);
  check_dtype(op, "candidate_ids", candidate_ids, {ScalarType::Long});
  const int64_t batch = candidate_ids.size(0), n = candidate_ids.size(1);
  check_size_at_least(op, "candidate_ids", candidate_ids, 1, 1, "the root node");
  check_tensor(op, "parents", parents, {batch, n}, {ScalarType::Long}, candidate_ids, "candidate_ids");
  check_logits(op, target_logits, batch, n, candidate_ids, "candidate_ids");
  check_in_range(op, "max_depth", max_depth, 0, n - 1, "n_nodes - 1");
  const int64_t vocab = target_logits.size(2);
  check_grid_rows(op, "batch * n_nodes (rows of target_logits)", batch * n, target_logits);
  check_tree(op, candidate_ids, parents, vocab);
  OptionalDeviceGuard guard(target_logits);
  Tensor out = new_empty(candidate_ids, {batch, max_depth + 1}, ScalarType::Long);
  Tensor nodes = new_empty(candidate_ids, {batch, max_depth + 1}, ScalarType::Long);
  Tensor num_acc = new_empty(candidate_ids, {batch}, ScalarType::Long);
  if (batch == 0) return {out, nodes, num_acc};
  Tensor logits = last_dim_contiguous(target_logits);
  SpecTreeGreedyParams p{};
  set_logits(p.am, logits);
  auto ws = argmax_workspace(p.am, logits);
  p.n_nodes = n, p.max_depth = max_depth;
  p.cand = ptr<int64_t>(candidate_ids), p.c_sb = candidate_ids.stride(0), p.c_sn = candidate_ids.stride(1);
  p.parents = ptr<int64_t>(parents), p.par_sb = parents.stride(0), p.par_sn = parents.stride(1);
  p.out = static_cast<int64_t*>(out.data_ptr());
  p.nodes = static_cast<int64_t*>(nodes.data_ptr());
  p.num_accepted = static_cast<int64_t*>(num_acc.data_ptr());
  NK_ROUTE_BY_DEVICE(logits, op, spec_verify_tree_greedy_cpu(p), spec_verify_tree_greedy_cuda(p, stream));
  return {out, nodes, num_acc};
}

std::tuple<Tensor, Tensor, Tensor> spec_verify_tree_rejection(Tensor candidate_ids, Tensor parents,
                                                              Tensor draft_probs, Tensor target_probs,
                                                              int64_t max_depth, std::optional<Tensor> seed_tensor,
                                                              int64_t seed) {
  const char* op = kTreeReject;
  check_dim(op, "candidate_ids", candidate_ids, 2);
  check_dtype(op, "candidate_ids", candidate_ids, {ScalarType::Long});
  const int64_t batch = candidate_ids.size(0), n = candidate_ids.size(1);
  NK_CHECK(n >= 1 && n <= kMaxTreeNodes, op, ": candidate_ids must have 1 to ", kMaxTreeNodes,
           " nodes (root included), got shape ", shape_str(candidate_ids));
  check_tensor(op, "parents", parents, {batch, n}, {ScalarType::Long}, candidate_ids, "candidate_ids");
  check_tensor(op, "target_probs", target_probs, {batch, n, -1}, {ScalarType::Float}, candidate_ids, "candidate_ids");
  check_size_at_least(op, "target_probs", target_probs, 2, 1, "the vocabulary size");
  const int64_t vocab = target_probs.size(2);
  check_tensor(op, "draft_probs", draft_probs, {batch, n, vocab}, {ScalarType::Float}, candidate_ids,
               "candidate_ids");
  check_in_range(op, "max_depth", max_depth, 0, n - 1, "n_nodes - 1");
  check_seed(op, seed_tensor, target_probs);
  check_grid_rows(op, "batch", batch, target_probs);
  check_tree(op, candidate_ids, parents, vocab);
  check_distributions(op, "draft_probs", draft_probs, std::nullopt, 1, 0);
  check_distributions(op, "target_probs", target_probs, std::nullopt, 0, 0);
  OptionalDeviceGuard guard(target_probs);
  Tensor out = new_empty(candidate_ids, {batch, max_depth + 1}, ScalarType::Long);
  Tensor nodes = new_empty(candidate_ids, {batch, max_depth + 1}, ScalarType::Long);
  Tensor num_acc = new_empty(candidate_ids, {batch}, ScalarType::Long);
  if (batch == 0) return {out, nodes, num_acc};
  Tensor pt = last_dim_contiguous(target_probs);
  Tensor qt = last_dim_contiguous(draft_probs);
  SpecTreeRejectionParams p{};
  p.batch = batch, p.n_nodes = n, p.vocab = vocab, p.max_depth = max_depth;
  p.cand = ptr<int64_t>(candidate_ids), p.c_sb = candidate_ids.stride(0), p.c_sn = candidate_ids.stride(1);
  p.parents = ptr<int64_t>(parents), p.par_sb = parents.stride(0), p.par_sn = parents.stride(1);
  p.q = ptr<float>(qt), p.q_sb = qt.stride(0), p.q_sn = qt.stride(1);
  p.p = ptr<float>(pt), p.p_sb = pt.stride(0), p.p_sn = pt.stride(1);
  p.seed_ptr = seed_tensor ? ptr<int64_t>(*seed_tensor) : nullptr;
  p.seed = static_cast<uint64_t>(seed);
  p.out = static_cast<int64_t*>(out.data_ptr());
  p.nodes = static_cast<int64_t*>(nodes.data_ptr());
  p.num_accepted = static_cast<int64_t*>(num_acc.data_ptr());
  NK_ROUTE_BY_DEVICE(pt, op, spec_verify_tree_rejection_cpu(p), spec_verify_tree_rejection_cuda(p, stream));
  return {out, nodes, num_acc};
}

Tensor spec_sampling_probs(Tensor logits, std::optional<Tensor> temperature, double temperature_value,
                           std::optional<Tensor> top_k, int64_t top_k_value, std::optional<Tensor> top_p,
                           double top_p_value, std::optional<Tensor> min_p, double min_p_value) {
  const char* op = kSampling;
  NK_CHECK(logits.dim() == 2 || logits.dim() == 3, op,
           ": logits must be (batch, vocab) or (batch, tokens, vocab), got shape ", shape_str(logits));
  check_float(op, "logits", logits);
  const int64_t batch = logits.size(0), per_req = logits.dim() == 3 ? logits.size(1) : 1;
  const int64_t vocab = logits.size(logits.dim() - 1);
  check_size_at_least(op, "logits", logits, logits.dim() - 1, 1, "the vocabulary size");
  NK_CHECK(std::isfinite(temperature_value) && temperature_value >= 0.0, op,
           ": temperature must be finite and >= 0 (0 = greedy), got ", temperature_value);
  NK_CHECK(top_k_value >= 0, op, ": top_k must be >= 0 (0 = no top-k), got ", top_k_value);
  NK_CHECK(top_p_value > 0.0 && top_p_value <= 1.0, op, ": top_p must be in (0, 1], got ", top_p_value);
  NK_CHECK(min_p_value >= 0.0 && min_p_value <= 1.0, op, ": min_p must be in [0, 1], got ", min_p_value);
  auto check_param = [&](const char* arg, const std::optional<Tensor>& t, ScalarType dt) {
    if (t) check_tensor(op, arg, *t, {batch}, {dt}, logits, "logits");
  };
  check_param("temperature", temperature, ScalarType::Float);
  check_param("top_k", top_k, ScalarType::Long);
  check_param("top_p", top_p, ScalarType::Float);
  check_param("min_p", min_p, ScalarType::Float);
  check_grid_rows(op, "the rows of logits (batch * tokens)", batch * per_req, logits);
  std::optional<Tensor> tc = contiguous_opt(temperature), kc = contiguous_opt(top_k), pc = contiguous_opt(top_p),
                        mc = contiguous_opt(min_p);
  if (logits.is_cpu()) {
    for (int64_t b = 0; b < batch; ++b) {
      if (tc) {
        const float v = ptr<float>(*tc)[b];
        NK_CHECK(std::isfinite(v) && v >= 0.f, op, ": temperature[", b, "] must be finite and >= 0, got ",
                 static_cast<double>(v));
      }
      if (kc) NK_CHECK(ptr<int64_t>(*kc)[b] >= 0, op, ": top_k[", b, "] must be >= 0, got ", ptr<int64_t>(*kc)[b]);
      if (pc) {
        const float v = ptr<float>(*pc)[b];
        NK_CHECK(v > 0.f && v <= 1.f, op, ": top_p[", b, "] must be in (0, 1], got ", static_cast<double>(v));
      }
      if (mc) {
        const float v = ptr<float>(*mc)[b];
        NK_CHECK(v >= 0.f && v <= 1.f, op, ": min_p[", b, "] must be in [0, 1], got ", static_cast<double>(v));
      }
    }
  }
  OptionalDeviceGuard guard(logits);
  Tensor out = new_empty(logits, logits.dim() == 3 ? std::vector<int64_t>{batch, per_req, vocab}
                                                   : std::vector<int64_t>{batch, vocab}, ScalarType::Float);
  if (batch * per_req == 0) return out;
  Tensor l = last_dim_contiguous(logits);
  SpecSamplingParams p{};
  p.rows = batch * per_req, p.per_req = per_req, p.vocab = vocab;
  p.dtype = to_dtype(l.scalar_type());
  p.logits = l.data_ptr();
  p.l_sb = l.stride(0);
  p.l_st = l.dim() == 3 ? l.stride(1) : 0;
  p.temperature = tc ? ptr<float>(*tc) : nullptr;
  p.temperature_value = static_cast<float>(temperature_value);
  p.top_k = kc ? ptr<int64_t>(*kc) : nullptr;
  p.top_k_value = top_k_value;
  p.top_p = pc ? ptr<float>(*pc) : nullptr;
  p.top_p_value = static_cast<float>(top_p_value);
  p.min_p = mc ? ptr<float>(*mc) : nullptr;
  p.min_p_value = static_cast<float>(min_p_value);
  p.out = static_cast<float*>(out.data_ptr());
  NK_ROUTE_BY_DEVICE(l, op, spec_sampling_probs_cpu(p), spec_sampling_probs_cuda(p, stream));
  return out;
}

}  // namespace nk
