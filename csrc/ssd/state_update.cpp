// Op entry points of the decode state updates: argument checks (the one place they live),
// output allocation, and dispatch to the CPU or CUDA kernel. Registered in ssd_ops.cpp.
#include "ssd/state_update.h"

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#include "common/check.h"
#include "common/device.h"
#include "common/tensor_utils.h"

namespace nk {
namespace {

constexpr const char* kSingle = "selective_state_update";
constexpr const char* kMulti = "selective_state_update_multi";
constexpr const char* kReplay = "selective_state_update_replay";

// The operand's strides in the kernel's dim order; -1 = a dim the tensor does not have.
SsuArg make_arg(const Tensor& t, std::initializer_list<int> dims) {
  SsuArg a;
  a.ptr = t.data_ptr();
  a.dtype = to_dtype(t.scalar_type());
  int k = 0;
  for (int d : dims) a.s[k++] = d < 0 ? 0 : t.stride(d);
  return a;
}

bool const_over(const Tensor& t, int d) { return t.size(d) <= 1 || t.stride(d) == 0; }

Tensor run(const char* op, bool multi, Tensor state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C,
           std::optional<Tensor> D, std::optional<Tensor> z, std::optional<Tensor> dt_bias, bool dt_softplus,
           std::optional<Tensor> state_batch_indices, std::optional<Tensor> snapshots,
           std::optional<Tensor> parents, std::optional<Tensor> rounding_seed,
           std::optional<Tensor> replay_to = std::nullopt) {
  const bool replay = replay_to.has_value();  // multi-token shapes, the state written in place
  NK_CHECK(state.dim() == 4 || state.dim() == 3, op, ": state must be (slots, nheads, dim, dstate) or "
           "(slots, dim, dstate), got shape ", shape_str(state));
  check_float(op, "state", state);
  const bool hd = state.dim() == 4;  // with a head dim (Mamba-2); without: the Mamba-1 form
  const int64_t rows = state.size(0), H = hd ? state.size(1) : 1, P = state.size(-2), N = state.size(-1);
  // x: multi (b, T, [H,] P), single (b, [H,] P)
  const int64_t xdims = (multi ? 2 : 1) + (hd ? 2 : 1);
  NK_CHECK(x.dim() == xdims, op, ": x must have ", xdims, " dimensions (",
           multi ? "batch, tokens, " : "batch, ", hd ? "nheads, dim" : "dim", ") to match state ",
           shape_str(state), ", got shape ", shape_str(x));
  check_float(op, "x", x, state, "state");
  const int64_t batch = x.size(0), T = multi ? x.size(1) : 1;
  std::vector<int64_t> xs = {batch};
  if (multi) xs.push_back(T);
  if (hd) xs.push_back(H);
  xs.push_back(P);
  check_shape(op, "x", x, xs, "(from state and x.shape[0])");
  const char* like_x = "(like x)";
  auto check_input = [&](const char* arg, const Tensor& t, const std::vector<int64_t>& want, const char* meaning) {
    check_float(op, arg, t, state, "state");
    check_shape(op, arg, t, want, meaning);
  };
  check_input("dt", dt, xs, like_x);
  if (z) check_input("z", *z, xs, like_x);
  // B, C: multi (b, T, [G,] N), single (b, [G,] N)
  const int64_t bdims = (multi ? 2 : 1) + (hd ? 2 : 1);
  NK_CHECK(B.dim() == bdims, op, ": B must have ", bdims, " dimensions (", multi ? "batch, tokens, " : "batch, ",
           hd ? "ngroups, dstate" : "dstate", "), got shape ", shape_str(B));
  const int64_t G = hd ? B.size(-2) : 1;
  NK_CHECK(G >= 1 && H % G == 0, op, ": nheads (", H, ") must be a multiple of ngroups (B.shape[", bdims - 2,
           "] = ", G, ")");
  std::vector<int64_t> bs = {batch};
  if (multi) bs.push_back(T);
  if (hd) bs.push_back(G);
  bs.push_back(N);
  check_input("B", B, bs, "(batch[, tokens][, ngroups], dstate)");
  check_input("C", C, bs, "(like B)");
  std::vector<int64_t> as = hd ? std::vector<int64_t>{H, P, N} : std::vector<int64_t>{P, N};
  check_input("A", A, as, hd ? "(nheads, dim, dstate), any strides (e.g. (nheads,) expanded)"
                             : "(dim, dstate)");
  std::vector<int64_t> ds = hd ? std::vector<int64_t>{H, P} : std::vector<int64_t>{P};
  if (D) check_input("D", *D, ds, hd ? "(nheads, dim), any strides" : "(dim,)");
  if (dt_bias) check_input("dt_bias", *dt_bias, ds, hd ? "(nheads, dim), any strides" : "(dim,)");
  if (state.is_cuda())
    NK_CHECK(N <= ssu_cuda_max_dstate(to_dtype(state.scalar_type())), op, ": dstate = ", N,
             " is too large for the CUDA kernel (at most ", ssu_cuda_max_dstate(to_dtype(state.scalar_type())),
             " for a ", dtype_name(state.scalar_type()), " state, ", ssu_cuda_max_dstate(DType::BF16),
             " for a float16 / bfloat16 one; the CPU path takes any)");
  // What the op writes (the state in place, or the snapshots) must have its own memory: no
  // element twice, and nothing shared with a tensor read meanwhile.
  auto check_written = [&](const char* arg, const Tensor& w) {
    check_writable(op, arg, w);
    if (multi && !replay) check_no_overlap(op, arg, w, "state", state);
    const std::pair<const char*, const Tensor*> reads[] = {{"x", &x}, {"dt", &dt}, {"A", &A}, {"B", &B}, {"C", &C}};
    for (auto [name, t] : reads) check_no_overlap(op, arg, w, name, *t);
    if (D) check_no_overlap(op, arg, w, "D", *D);
    if (z) check_no_overlap(op, arg, w, "z", *z);
    if (dt_bias) check_no_overlap(op, arg, w, "dt_bias", *dt_bias);
    if (state_batch_indices) check_no_overlap(op, arg, w, "state_batch_indices", *state_batch_indices);
    if (parents) check_no_overlap(op, arg, w, "parents", *parents);
    if (replay_to) check_no_overlap(op, arg, w, "replay_to", *replay_to);
  };
  if (!multi || replay) check_written("state", state);
  if (snapshots) {
    std::vector<int64_t> ss = {batch, T};
    if (hd) ss.push_back(H);
    ss.push_back(P);
    ss.push_back(N);
    check_shape(op, "intermediate_states", *snapshots, ss, "(batch, tokens, [nheads,] dim, dstate)");
    check_dtype_and_device(op, "intermediate_states", *snapshots, state, "state");
  }
  std::optional<Tensor> idx;
  if (state_batch_indices) {
    check_tensor(op, "state_batch_indices", *state_batch_indices, {batch}, {ScalarType::Int}, state, "state");
    idx = torch::stable::contiguous(*state_batch_indices);
    // On the CPU the indices are checked without a device sync (on CUDA they cannot be: an
    // out-of-range row gives NaN outputs there, never an out-of-bounds access, and duplicate
    // rows of the in-place update race but stay in bounds). The multi-token update only reads
    // the state, so its rows may repeat.
    if (!state.is_cuda()) check_state_indices(op, "state_batch_indices", *idx, "state", rows, !multi || replay);
  } else {
    check_size_at_least(op, "state", state, 0, batch, "batch, when state_batch_indices is None");
  }
  if (snapshots) check_written("intermediate_states", *snapshots);
  std::optional<Tensor> par;
  if (parents) {
    NK_CHECK(snapshots.has_value() || replay, op, ": parents (tree drafts) needs intermediate_states: a token "
             "continues from its parent's state, which is read back from there");
    check_tensor(op, "parents", *parents, {batch, T}, {ScalarType::Int}, state, "state");
    if (snapshots) check_no_overlap(op, "intermediate_states", *snapshots, "parents", *parents);
    par = torch::stable::contiguous(*parents);
    // On the CPU each parent must precede its child (on CUDA an invalid node is NaN, see state_update.h).
    if (!state.is_cuda()) check_parents(op, *par, "the state row");
  }

  std::optional<Tensor> upto;
  if (replay) {  // values are clamped to [-1, T - 1] by the kernels: nothing to check on the host
    check_tensor(op, "replay_to", *replay_to, {batch}, {ScalarType::Int}, state, "state");
    upto = torch::stable::contiguous(*replay_to);
  }
  std::optional<Tensor> seed;
  if (rounding_seed) {
    NK_CHECK(state.scalar_type() != ScalarType::Float, op, ": stochastic rounding (rounding_seed) applies to a "
             "float16 / bfloat16 state; a float32 state is stored unrounded");
    check_one_element(op, "rounding_seed", *rounding_seed, ScalarType::Long, state, "state");
    seed = torch::stable::contiguous(*rounding_seed);
  }

  OptionalDeviceGuard guard(state);
  Tensor out = new_empty(x, replay ? std::vector<int64_t>{0} : xs, x.scalar_type());  // a replay has none
  SsuParams p{};
  p.batch = batch, p.seqlen = T, p.nheads = H, p.dim = P, p.dstate = N;
  p.heads_per_group = H / G;
  p.state_rows = rows;
  p.dt_softplus = dt_softplus;
  p.state_dtype = to_dtype(state.scalar_type());
  p.state = state.data_ptr();
  {
    const SsuArg a = hd ? make_arg(state, {0, 1, 2, 3}) : make_arg(state, {0, -1, 1, 2});
    for (int k = 0; k < 4; ++k) p.st_s[k] = a.s[k];
  }
  // Kernel dim orders: x-like (b, t, h, p), B/C (b, t, g, n), A (h, p, n), D/dt_bias (h, p).
  auto bthp = [&](const Tensor& t) {
    if (multi) return hd ? make_arg(t, {0, 1, 2, 3}) : make_arg(t, {0, 1, -1, 2});
    return hd ? make_arg(t, {0, -1, 1, 2}) : make_arg(t, {0, -1, -1, 1});
  };
  p.x = bthp(x);
  p.dt = bthp(dt);
  if (z) p.z = bthp(*z);
  p.B = bthp(B);
  p.C = bthp(C);
  p.A = hd ? make_arg(A, {0, 1, 2}) : make_arg(A, {-1, 0, 1});
  if (D) p.D = hd ? make_arg(*D, {0, 1}) : make_arg(*D, {-1, 0});
  if (dt_bias) p.dt_bias = hd ? make_arg(*dt_bias, {0, 1}) : make_arg(*dt_bias, {-1, 0});
  p.state_indices = idx ? static_cast<const int32_t*>(idx->data_ptr()) : nullptr;
  p.parents = par ? static_cast<const int32_t*>(par->data_ptr()) : nullptr;
  p.sr_seed = seed ? static_cast<const int64_t*>(seed->data_ptr()) : nullptr;
  p.replay_to = upto ? static_cast<const int32_t*>(upto->data_ptr()) : nullptr;
  if (!multi || replay) {
    p.in_place = true;
    p.snap = replay ? nullptr : state.data_ptr();
  } else if (snapshots) {
    p.snap = snapshots->data_ptr();
    const SsuArg a = hd ? make_arg(*snapshots, {0, 1, 2, 3, 4}) : make_arg(*snapshots, {0, 1, -1, 2, 3});
    for (int k = 0; k < 5; ++k) p.snap_s[k] = a.s[k];
  }
  p.out_dtype = to_dtype(out.scalar_type());
  if (!replay) {
    p.out = out.data_ptr();
    const SsuArg a = bthp(out);
    for (int k = 0; k < 4; ++k) p.out_s[k] = a.s[k];
  }
  const int pd = hd ? 1 : 0;  // P's dim in A / D / dt_bias
  p.head_decay = const_over(dt, static_cast<int>(xdims - 1)) && (!dt_bias || const_over(*dt_bias, pd)) &&
                 const_over(A, pd) && const_over(A, pd + 1);
  if (batch * T * H * P == 0) return out;
  NK_ROUTE_BY_DEVICE(state, op, selective_state_update_cpu(p), selective_state_update_cuda(p, stream));
  return out;
}

}  // namespace

Tensor selective_state_update(Tensor state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C,
                              std::optional<Tensor> D, std::optional<Tensor> z, std::optional<Tensor> dt_bias,
                              bool dt_softplus, std::optional<Tensor> state_batch_indices,
                              std::optional<Tensor> rounding_seed) {
  return run(kSingle, false, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices, std::nullopt,
             std::nullopt, rounding_seed);
}

Tensor selective_state_update_multi(Tensor state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C,
                                    std::optional<Tensor> D, std::optional<Tensor> z,
                                    std::optional<Tensor> dt_bias, bool dt_softplus,
                                    std::optional<Tensor> state_batch_indices,
                                    std::optional<Tensor> intermediate_states, std::optional<Tensor> parents,
                                    std::optional<Tensor> rounding_seed) {
  return run(kMulti, true, state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices,
             intermediate_states, parents, rounding_seed);
}

void selective_state_update_replay(Tensor state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C,
                                   std::optional<Tensor> dt_bias, bool dt_softplus,
                                   std::optional<Tensor> state_batch_indices, Tensor replay_to,
                                   std::optional<Tensor> parents, std::optional<Tensor> rounding_seed) {
  run(kReplay, true, state, x, dt, A, B, C, std::nullopt, std::nullopt, dt_bias, dt_softplus, state_batch_indices,
      std::nullopt, parents, rounding_seed, replay_to);
}

}  // namespace nk
