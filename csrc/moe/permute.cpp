// Op entry points of the MoE permutation plan, gather and combine: argument checks (the one
// place they live), output allocation, dispatch to the CPU or CUDA kernels. Registered in
// moe_ops.cpp. Math and algorithms: permute.h.
#include "moe/permute.h"

#include <limits>
#include <optional>
#include <tuple>

#include "common/check.h"
#include "common/device.h"
#include "common/tensor_utils.h"

namespace nk {
namespace {

void check_act(const char* op, const char* arg, const Tensor& t) {
  check_dim(op, arg, t, 2);
  check_float(op, arg, t);
}

// (rows, width) with unit column stride (a copy when the columns are strided).
Tensor unit_cols(const Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1 ? t : torch::stable::contiguous(t); }

void check_map(const char* op, const char* arg, const Tensor& m, const Tensor& ref, const char* ref_arg) {
  check_tensor(op, arg, m, {-1}, {ScalarType::Int}, ref, ref_arg);
}

// The maps hold int32 slot and row indices: N slots and R rows must fit them.
void check_map_sizes(const char* op, int64_t slots, int64_t rows) {
  check_limit(op, "row_of_slot.shape[0] (slots, tokens * top_k)", slots, kInt32Max,
              "slot indices are int32 (slot_of_row)", "dispatch the tokens in several calls");
  check_limit(op, "the number of permuted rows", rows, kInt32Max, "row indices are int32 (row_of_slot)",
              "dispatch the tokens in several calls");
}

// `top_k` >= 1 divides the N entries of row_of_slot; returns the tokens N / top_k.
int64_t tokens_of(const char* op, const Tensor& row_of_slot, int64_t top_k) {
  NK_CHECK(top_k >= 1 && row_of_slot.size(0) % top_k == 0, op,
           ": top_k must be >= 1 and divide row_of_slot.shape[0] = ", row_of_slot.size(0), ", got ", top_k);
  return row_of_slot.size(0) / top_k;
}

// CPU only (it reads the maps; on CUDA that would need a host sync): both maps are in range and
// are the two maps of one plan, inverse to each other: slot_of_row[row_of_slot[s]] == s for every
// kept slot and row_of_slot[slot_of_row[r]] == r for every non-padding row. The CUDA kernels
// read one map each and bound-check every entry they use, so bad maps there are memory-safe and
// give unspecified values (an out-of-range entry counts as padding / a dropped slot).
void check_maps_agree(const char* op, const Tensor& row_of_slot, const Tensor& slot_of_row) {
  if (!row_of_slot.is_cpu()) return;
  const Tensor ros = torch::stable::contiguous(row_of_slot), sor = torch::stable::contiguous(slot_of_row);
  const int32_t* rs = static_cast<const int32_t*>(ros.data_ptr());
  const int32_t* sr = static_cast<const int32_t*>(sor.data_ptr());
  const int64_t N = ros.size(0), R = sor.size(0);
  for (int64_t r = 0; r < R; ++r)
    NK_CHECK(sr[r] >= -1 && sr[r] < N, op, ": slot_of_row[", r, "] = ", sr[r], " is out of range [-1, ", N, ")");
  for (int64_t s = 0; s < N; ++s)
    NK_CHECK(rs[s] >= -1 && rs[s] < R, op, ": row_of_slot[", s, "] = ", rs[s], " is out of range [-1, ", R, ")");
  for (int64_t s = 0; s < N; ++s)
    NK_CHECK(rs[s] < 0 || sr[rs[s]] == s, op, ": row_of_slot and slot_of_row are not inverse maps: row_of_slot[",
             s, "] = ", rs[s], " but slot_of_row[", rs[s], "] = ", rs[s] >= 0 ? sr[rs[s]] : -1,
             " (pass the two maps of one moe_permute_plan)");
  for (int64_t r = 0; r < R; ++r)
    NK_CHECK(sr[r] < 0 || rs[sr[r]] == r, op, ": row_of_slot and slot_of_row are not inverse maps: slot_of_row[",
             r, "] = ", sr[r], " but row_of_slot[", sr[r], "] = ", sr[r] >= 0 ? rs[sr[r]] : -1,
             " (pass the two maps of one moe_permute_plan)");
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> moe_permute_plan(Tensor topk_ids, int64_t num_experts, int64_t pad_to) {
  const char* op = "moe_permute_plan";
  check_dim(op, "topk_ids", topk_ids, 2);
  check_dtype(op, "topk_ids", topk_ids, {ScalarType::Int});
  check_in_range(op, "num_experts", num_experts, 1, kPermMaxExperts);
  check_in_range(op, "pad_to", pad_to, 1, 4096);
  const int64_t N = topk_ids.size(0) * topk_ids.size(1);
  const int64_t R = N + num_experts * (pad_to - 1);
  NK_CHECK(R < std::numeric_limits<int32_t>::max(), op, ": ", N, " slots + num_experts * (pad_to - 1) = ", R,
           " rows do not fit int32 row indices; plan fewer tokens per call (or a smaller pad_to)");
  OptionalDeviceGuard guard(topk_ids);
  Tensor counts = new_empty(topk_ids, {num_experts}, ScalarType::Int);
  Tensor offsets = new_empty(topk_ids, {num_experts + 1}, ScalarType::Int);
  Tensor row_of_slot = new_empty(topk_ids, {N}, ScalarType::Int);
  Tensor slot_of_row = new_empty(topk_ids, {R}, ScalarType::Int);
  if (N == 0) {
    torch::stable::zero_(counts);
    torch::stable::zero_(offsets);
    torch::stable::fill_(slot_of_row, -1.0);
    return {counts, offsets, row_of_slot, slot_of_row};
  }
  Tensor ids = torch::stable::contiguous(topk_ids);
  const int64_t chunks = (N + kPermChunk - 1) / kPermChunk;
  Tensor scratch = new_empty(topk_ids, {chunks, num_experts}, ScalarType::Int);
  PermutePlanParams p{};
  p.slots = N;
  p.experts = static_cast<int>(num_experts);
  p.pad_to = static_cast<int>(pad_to);
  p.rows = R;
  p.ids = static_cast<const int32_t*>(ids.data_ptr());
  p.num_chunks = chunks;
  p.chunk_counts = static_cast<int32_t*>(scratch.data_ptr());
  p.counts = static_cast<int32_t*>(counts.data_ptr());
  p.offsets = static_cast<int32_t*>(offsets.data_ptr());
  p.row_of_slot = static_cast<int32_t*>(row_of_slot.data_ptr());
  p.slot_of_row = static_cast<int32_t*>(slot_of_row.data_ptr());
  NK_ROUTE_BY_DEVICE(topk_ids, op, moe_permute_plan_cpu(p), moe_permute_plan_cuda(p, stream));
  return {counts, offsets, row_of_slot, slot_of_row};
}

Tensor moe_gather(Tensor x, Tensor slot_of_row, Tensor row_of_slot, int64_t top_k) {
  const char* op = "moe_gather";
  check_act(op, "x", x);
  check_map(op, "slot_of_row", slot_of_row, x, "x");
  check_map(op, "row_of_slot", row_of_slot, x, "x");
  NK_CHECK(top_k >= 1, op, ": top_k must be >= 1, got ", top_k);
  const int64_t T = x.size(0), L = x.size(1), R = slot_of_row.size(0);
  int64_t slots = 0;  // T * top_k, which may overflow for an absurd top_k
  const bool overflow = __builtin_mul_overflow(T, top_k, &slots);
  NK_CHECK(!overflow && row_of_slot.size(0) == slots, op, ": row_of_slot must have x.shape[0] * top_k = ",
           overflow ? str_cat(T, " * ", top_k) : str_cat(slots), " entries (the plan of x's tokens), got shape ",
           shape_str(row_of_slot));
  check_map_sizes(op, row_of_slot.size(0), R);
  check_maps_agree(op, row_of_slot, slot_of_row);
  OptionalDeviceGuard guard(x);
  Tensor out = new_empty(x, {R, L}, x.scalar_type());
  if (R == 0 || L == 0) return out;
  if (T == 0) {  // only padding rows (an empty plan with pad_to > 1)
    torch::stable::zero_(out);
    return out;
  }
  Tensor xc = unit_cols(x), sor = torch::stable::contiguous(slot_of_row);
  GatherParams p{};
  p.tokens = T, p.rows = R, p.width = L, p.top_k = static_cast<int>(top_k);
  p.dtype = to_dtype(x.scalar_type());
  p.x = xc.data_ptr();
  p.x_st = xc.stride(0);
  p.slot_of_row = static_cast<const int32_t*>(sor.data_ptr());
  p.out = out.data_ptr();
  NK_ROUTE_BY_DEVICE(x, op, moe_gather_cpu(p), moe_gather_cuda(p, stream));
  return out;
}

Tensor moe_gather_bwd(Tensor dxs, Tensor row_of_slot, int64_t top_k) {
  const char* op = "moe_gather (backward)";
  check_act(op, "dxs", dxs);
  check_map(op, "row_of_slot", row_of_slot, dxs, "dxs");
  const int64_t T = tokens_of(op, row_of_slot, top_k), R = dxs.size(0), L = dxs.size(1);
  check_map_sizes(op, row_of_slot.size(0), R);
  OptionalDeviceGuard guard(dxs);
  Tensor dx = new_empty(dxs, {T, L}, dxs.scalar_type());
  if (T == 0 || L == 0) return dx;
  Tensor g = unit_cols(dxs), ros = torch::stable::contiguous(row_of_slot);
  GatherBwdParams p{};
  p.tokens = T, p.rows = R, p.width = L, p.top_k = static_cast<int>(top_k);
  p.dtype = to_dtype(dxs.scalar_type());
  p.dxs = g.data_ptr();
  p.dxs_st = g.stride(0);
  p.row_of_slot = static_cast<const int32_t*>(ros.data_ptr());
  p.dx = dx.data_ptr();
  NK_ROUTE_BY_DEVICE(dxs, op, moe_gather_bwd_cpu(p), moe_gather_bwd_cuda(p, stream));
  return dx;
}

namespace {

// Shared checks of the combine and its backward; returns tokens.
int64_t check_combine(const char* op, const Tensor& y, const Tensor& row_of_slot,
                      const std::optional<Tensor>& topk_weights, int64_t top_k) {
  check_act(op, "y", y);
  check_map(op, "row_of_slot", row_of_slot, y, "y");
  const int64_t T = tokens_of(op, row_of_slot, top_k);
  check_map_sizes(op, row_of_slot.size(0), y.size(0));
  if (topk_weights) {
    const Tensor& w = *topk_weights;
    check_tensor(op, "topk_weights", w, {-1, -1}, {ScalarType::Float}, y, "y");
    check_shape(op, "topk_weights", w, {T, top_k}, "(tokens, top_k)");
  }
  return T;
}

CombineParams make_combine(const Tensor& yc, const Tensor& ros, const std::optional<Tensor>& wc, int64_t T,
                           int64_t top_k) {
  CombineParams p{};
  p.tokens = T, p.rows = yc.size(0), p.width = yc.size(1), p.top_k = static_cast<int>(top_k);
  p.dtype = to_dtype(yc.scalar_type());
  p.y = yc.data_ptr();
  p.y_st = yc.stride(0);
  p.row_of_slot = static_cast<const int32_t*>(ros.data_ptr());
  p.weights = wc ? static_cast<const float*>(wc->data_ptr()) : nullptr;
  return p;
}

}  // namespace

Tensor moe_combine(Tensor y, Tensor row_of_slot, Tensor slot_of_row, std::optional<Tensor> topk_weights,
                   int64_t top_k) {
  const char* op = "moe_combine";
  const int64_t T = check_combine(op, y, row_of_slot, topk_weights, top_k);
  check_map(op, "slot_of_row", slot_of_row, y, "y");
  check_size(op, "slot_of_row", slot_of_row, 0, y.size(0));
  check_maps_agree(op, row_of_slot, slot_of_row);
  const int64_t L = y.size(1);
  OptionalDeviceGuard guard(y);
  Tensor out = new_empty(y, {T, L}, y.scalar_type());
  if (T == 0 || L == 0) return out;
  Tensor yc = unit_cols(y), ros = torch::stable::contiguous(row_of_slot);
  std::optional<Tensor> wc;
  if (topk_weights) wc = torch::stable::contiguous(*topk_weights);
  CombineParams p = make_combine(yc, ros, wc, T, top_k);
  p.out = out.data_ptr();
  NK_ROUTE_BY_DEVICE(y, op, moe_combine_cpu(p), moe_combine_cuda(p, stream));
  return out;
}

std::tuple<Tensor, Tensor> moe_combine_bwd(Tensor dout, Tensor y, Tensor row_of_slot, Tensor slot_of_row,
                                           std::optional<Tensor> topk_weights, int64_t top_k,
                                           bool return_dweights) {
  const char* op = "moe_combine (backward)";
  const int64_t T = check_combine(op, y, row_of_slot, topk_weights, top_k);
  const int64_t R = y.size(0), L = y.size(1);
  check_map(op, "slot_of_row", slot_of_row, y, "y");
  check_size(op, "slot_of_row", slot_of_row, 0, R);
  check_maps_agree(op, row_of_slot, slot_of_row);
  check_act(op, "dout", dout);
  check_shape(op, "dout", dout, {T, L});
  check_dtype_and_device(op, "dout", dout, y, "y");
  OptionalDeviceGuard guard(y);
  Tensor dy = new_empty(y, {R, L}, y.scalar_type());
  Tensor dw = new_empty(y, {return_dweights ? T : 0, top_k}, ScalarType::Float);
  if (R == 0) return {dy, dw};
  if (T == 0 || L == 0) {
    torch::stable::zero_(dy);
    if (return_dweights) torch::stable::zero_(dw);
    return {dy, dw};
  }
  Tensor yc = unit_cols(y), ros = torch::stable::contiguous(row_of_slot), go = unit_cols(dout);
  Tensor sor = torch::stable::contiguous(slot_of_row);
  std::optional<Tensor> wc;
  if (topk_weights) wc = torch::stable::contiguous(*topk_weights);
  CombineBwdParams q{};
  q.fwd = make_combine(yc, ros, wc, T, top_k);
  q.fwd.slot_of_row = static_cast<const int32_t*>(sor.data_ptr());
  q.dout = go.data_ptr();
  q.dout_st = go.stride(0);
  q.dy = dy.data_ptr();
  q.dweights = return_dweights ? static_cast<float*>(dw.data_ptr()) : nullptr;
  NK_ROUTE_BY_DEVICE(y, op, moe_combine_bwd_cpu(q), moe_combine_bwd_cuda(q, stream));
  return {dy, dw};
}

}  // namespace nk
