// Op entry points of the grouped GEMM over experts: argument checks (the one place they
// live), contiguous copies of strided inputs, output allocation, and dispatch to the CPU or
// CUDA kernels. Registered in moe_ops.cpp.
//
// Offsets values (monotone, inside [0, R]) are checked on the CPU only: on CUDA that would
// need a host synchronisation. The CUDA kernels clamp every segment into [0, R] instead, so
// bad offsets there are memory-safe but give unspecified values (docs/known-issues.md).
#include "moe/grouped_gemm.h"

#include <algorithm>

#include <optional>
#include <string>
#include <tuple>

#include "common/check.h"
#include "common/device.h"
#include "common/tensor_utils.h"
#include "moe/segments.cuh"

namespace nk {
namespace {

constexpr const char* kFwd = "grouped_gemm";
constexpr const char* kDgrad = "grouped_gemm (dgrad)";
constexpr const char* kWgrad = "grouped_gemm (wgrad)";

GgType gg_type(const char* op, const char* arg, const Tensor& t) {
  if (t.is_cuda()) {
    check_float(op, arg, t);
  } else {
    check_dtype(op, arg, t, {ScalarType::Float, ScalarType::Half, ScalarType::BFloat16, ScalarType::Double});
  }
  switch (t.scalar_type()) {
    case ScalarType::Half: return GgType::F16;
    case ScalarType::BFloat16: return GgType::BF16;
    case ScalarType::Double: return GgType::F64;
    default: return GgType::F32;
  }
}

// Size limits. Every device: R rows are addressed by int32 expert_offsets. CUDA: the portable
// kernels' grids put ceil(cols / 64) column tiles (64: the SIMT tile; the tensor-core tile is 128)
// on grid dimension y, so the output columns (N for the forward, K for dgrad and wgrad) are at
// most 65535 * 64; the CUTLASS kernels (problem shapes in int) are within that as well.
constexpr int64_t kGgColTile = 64;

void check_sizes(const char* op, const Tensor& t, int64_t R, const char* cols_name, int64_t cols) {
  check_limit(op, "the number of rows R", R, kInt32Max, "the range of the int32 expert_offsets",
              "split the rows into several calls");
  if (t.is_cuda()) {
    check_limit(op, cols_name, cols, kGridYZMax * kGgColTile,
                "the most the CUDA kernels take (grid dimension y = ceil(cols / 64) <= 65535)",
                "split the weights along that dim into several calls");
  }
}

// expert_offsets (E + 1,) int32 on ref's device; on the CPU also its values. Returns E.
int64_t check_offsets(const char* op, const Tensor& offsets, const Tensor& ref, const char* ref_arg,
                      int64_t R, int64_t expect_e) {
  check_tensor(op, "expert_offsets", offsets, {-1}, {ScalarType::Int}, ref, ref_arg);
  check_size_at_least(op, "expert_offsets", offsets, 0, 1, "E + 1 entries");
  const int64_t E = offsets.size(0) - 1;
  NK_CHECK(!offsets.is_cuda() || E <= 65535, op, ": at most 65535 experts on CUDA (a grid dimension), got ", E);
  NK_CHECK(expect_e < 0 || E == expect_e, op, ": expert_offsets must have E + 1 = ", expect_e + 1,
           " entries (w has E = ", expect_e, " experts), got shape ", shape_str(offsets));
  if (offsets.is_cpu()) {
    Tensor c = torch::stable::contiguous(offsets);
    const int32_t* o = static_cast<const int32_t*>(c.data_ptr());
    NK_CHECK(o[0] >= 0, op, ": expert_offsets[0] must be >= 0, got ", o[0]);
    for (int64_t e = 0; e < E; ++e) {
      NK_CHECK(o[e + 1] >= o[e], op, ": expert_offsets must be non-decreasing, got offsets[", e, "] = ", o[e],
               " > offsets[", e + 1, "] = ", o[e + 1]);
    }
    NK_CHECK(o[E] <= R, op, ": expert_offsets[E] must be <= the number of rows ", R, ", got ", o[E]);
  }
  return E;
}

Tensor contig(const Tensor& t) { return torch::stable::contiguous(t); }

std::optional<Tensor> check_pre(const char* op, const std::optional<Tensor>& pre, const Tensor& dout) {
  std::optional<Tensor> r;
  if (!pre) return r;
  check_dim(op, "preact", *pre, 2);
  check_like(op, "preact", *pre, dout, "dout");
  r.emplace(contig(*pre));
  return r;
}

GroupedGemmParams base_params(GgType dt, int64_t R, int64_t N, int64_t K, int64_t E, const Tensor& offsets) {
  GroupedGemmParams p{};
  p.dtype = dt;
  p.R = R, p.N = N, p.K = K, p.E = E;
  p.offsets = static_cast<const int32_t*>(offsets.data_ptr());
  return p;
}

// (E + 1,) int32 scratch for the CUDA tile map (unused on the CPU).
Tensor tile_scratch(const Tensor& like, int64_t E) {
  return new_empty(like, {like.is_cuda() ? E + 1 : 0}, ScalarType::Int);
}

// On CUDA: prepare(p) picks the kernel path of the call (sets p.arch) and returns the workspace
// bytes it needs; they are allocated through torch's caching allocator (graph capture and streams
// work as for any tensor) and set as p.workspace.
template <class P, class Prepare>
std::optional<Tensor> workspace_for(const Tensor& like, P& p, Prepare prepare) {
  std::optional<Tensor> ws;
  if (like.is_cuda()) {
    const int64_t bytes = prepare(p);
    if (bytes > 0) {
      ws.emplace(new_empty(like, {bytes}, ScalarType::Byte));
      p.workspace = ws->data_ptr();
    }
  }
  return ws;
}

std::optional<Tensor> arch_workspace(const Tensor& like, GroupedGemmParams& p, GgOp op) {
#ifdef NK_WITH_CUDA
  return workspace_for(like, p, [op](GroupedGemmParams& q) { return grouped_gemm_cuda_prepare(q, op); });
#else
  (void)like, (void)p, (void)op;
  return std::nullopt;
#endif
}

}  // namespace

std::tuple<Tensor, Tensor> grouped_gemm_fwd(Tensor a, Tensor w, Tensor expert_offsets, const std::string& activation,
                                             bool save_preact) {
  const char* op = kFwd;
  check_dim(op, "a", a, 2);
  const GgType dt = gg_type(op, "a", a);
  check_dim(op, "w", w, 3);
  check_dtype_and_device(op, "w", w, a, "a");
  const int64_t R = a.size(0), K = a.size(1), E = w.size(0), N = w.size(1);
  NK_CHECK(w.size(2) == K, op, ": w must be (E, N, K) with K = a.shape[1] = ", K, ", got w shape ",
           shape_str(w), " and a shape ", shape_str(a));
  NK_CHECK(activation == "none" || activation == "relu2", op, ": activation must be \"none\" or \"relu2\", got \"",
           activation, "\"");
  const bool relu2 = activation == "relu2";
  check_sizes(op, a, R, "N (w.shape[1], the output columns)", N);
  check_offsets(op, expert_offsets, a, "a", R, E);
  const bool keep_pre = save_preact && relu2;
  OptionalDeviceGuard guard(a);
  Tensor ac = contig(a), wc = contig(w), oc = contig(expert_offsets);
  Tensor out = new_empty(a, {R, N}, a.scalar_type());
  Tensor pre = new_empty(a, {keep_pre ? R : 0, N}, a.scalar_type());
  if (out.numel() == 0) return {out, pre};
  if (K == 0 || E == 0) {  // empty sums: act(0) = 0 everywhere
    torch::stable::zero_(out);
    if (keep_pre) torch::stable::zero_(pre);
    return {out, pre};
  }
  Tensor scratch = tile_scratch(a, E);
  GroupedGemmParams p = base_params(dt, R, N, K, E, oc);
  p.a = ac.data_ptr();
  p.w = wc.data_ptr();
  p.out = out.data_ptr();
  p.pre_out = keep_pre ? pre.data_ptr() : nullptr;
  p.act = relu2 ? GgAct::Relu2 : GgAct::None;
  p.tile_offsets = a.is_cuda() ? static_cast<int32_t*>(scratch.data_ptr()) : nullptr;
  auto ws = arch_workspace(a, p, kGgFwd);
  NK_ROUTE_BY_DEVICE(a, op, grouped_gemm_fwd_cpu(p), grouped_gemm_fwd_cuda(p, stream));
  return {out, pre};
}

Tensor grouped_gemm_dgrad(Tensor dout, Tensor w, Tensor expert_offsets, std::optional<Tensor> preact) {
  const char* op = kDgrad;
  check_dim(op, "dout", dout, 2);
  const GgType dt = gg_type(op, "dout", dout);
  check_dim(op, "w", w, 3);
  check_dtype_and_device(op, "w", w, dout, "dout");
  const int64_t R = dout.size(0), N = dout.size(1), E = w.size(0), K = w.size(2);
  NK_CHECK(w.size(1) == N, op, ": w must be (E, N, K) with N = dout.shape[1] = ", N, ", got w shape ",
           shape_str(w), " and dout shape ", shape_str(dout));
  check_sizes(op, dout, R, "K (w.shape[2], the output columns)", K);
  check_offsets(op, expert_offsets, dout, "dout", R, E);
  auto pre = check_pre(op, preact, dout);
  OptionalDeviceGuard guard(dout);
  Tensor dc = contig(dout), wc = contig(w), oc = contig(expert_offsets);
  Tensor da = new_empty(dout, {R, K}, dout.scalar_type());
  if (da.numel() == 0) return da;
  if (N == 0 || E == 0) {
    torch::stable::zero_(da);
    return da;
  }
  Tensor scratch = tile_scratch(dout, E);
  GroupedGemmParams p = base_params(dt, R, N, K, E, oc);
  p.dout = dc.data_ptr();
  p.w = wc.data_ptr();
  p.pre_in = pre ? pre->data_ptr() : nullptr;
  p.out = da.data_ptr();
  p.tile_offsets = dout.is_cuda() ? static_cast<int32_t*>(scratch.data_ptr()) : nullptr;
  auto ws = arch_workspace(dout, p, kGgDgrad);
  NK_ROUTE_BY_DEVICE(dout, op, grouped_gemm_dgrad_cpu(p), grouped_gemm_dgrad_cuda(p, stream));
  return da;
}

Tensor grouped_gemm_wgrad(Tensor dout, Tensor a, Tensor expert_offsets, std::optional<Tensor> preact) {
  const char* op = kWgrad;
  check_dim(op, "dout", dout, 2);
  const GgType dt = gg_type(op, "dout", dout);
  check_dim(op, "a", a, 2);
  check_dtype_and_device(op, "a", a, dout, "dout");
  const int64_t R = dout.size(0), N = dout.size(1), K = a.size(1);
  NK_CHECK(a.size(0) == R, op, ": a must have dout's number of rows ", R, ", got a shape ", shape_str(a),
           " and dout shape ", shape_str(dout));
  check_sizes(op, dout, R, "K (a.shape[1], the output columns)", K);
  const int64_t E = check_offsets(op, expert_offsets, dout, "dout", R, -1);
  auto pre = check_pre(op, preact, dout);
  OptionalDeviceGuard guard(dout);
  Tensor dc = contig(dout), ac = contig(a), oc = contig(expert_offsets);
  Tensor dw = new_empty(dout, {E, N, K}, dout.scalar_type());
  if (dw.numel() == 0) return dw;
  if (R == 0) {
    torch::stable::zero_(dw);
    return dw;
  }
  GroupedGemmParams p = base_params(dt, R, N, K, E, oc);
  p.dout = dc.data_ptr();
  p.a = ac.data_ptr();
  p.pre_in = pre ? pre->data_ptr() : nullptr;
  p.out = dw.data_ptr();
  auto ws = arch_workspace(dout, p, kGgWgrad);
  NK_ROUTE_BY_DEVICE(dout, op, grouped_gemm_wgrad_cpu(p), grouped_gemm_wgrad_cuda(p, stream));
  return dw;
}

// grouped_gemm with NVFP4 expert weights (forward only): the checks, then the CPU kernel or the
// CUDA path grouped_gemm_nvfp4w_cuda_path picks (the sm_90a wgmma kernel or the portable one).
Tensor grouped_gemm_nvfp4w(Tensor a, Tensor w_data, Tensor w_scales, Tensor w_global, Tensor expert_offsets,
                           const std::string& activation) {
  const char* op = "grouped_gemm (NVFP4 weights)";
  check_dim(op, "a", a, 2);
  check_dtype(op, "a", a, {ScalarType::Float, ScalarType::Half, ScalarType::BFloat16});
  const GgType dt = gg_type(op, "a", a);
  const int64_t R = a.size(0), K = a.size(1);
  NK_CHECK(K % 16 == 0, op, ": K = a.shape[1] must be a multiple of 16 (one NVFP4 scale per 16 values), got ", K);
  check_tensor(op, "w.data", w_data, {-1, -1, K / 2}, {ScalarType::Byte}, a, "a");
  const int64_t E = w_data.size(0), N = w_data.size(1);
  check_tensor(op, "w.scales", w_scales, {E, N, K / 16}, {ScalarType::Float8_e4m3fn}, a, "a");
  check_dtype(op, "w.global_scale", w_global, {ScalarType::Float});
  check_same_device(op, "w.global_scale", w_global, a, "a");
  NK_CHECK(w_global.dim() <= 1 && (w_global.numel() == 1 || w_global.numel() == E), op,
           ": w.global_scale must hold one float32 per expert (E = ", E, ") or one for all, got shape ",
           shape_str(w_global));
  NK_CHECK(activation == "none" || activation == "relu2", op, ": activation must be \"none\" or \"relu2\", got \"",
           activation, "\"");
  check_sizes(op, a, R, "N (w.data.shape[1], the output columns)", N);
  check_offsets(op, expert_offsets, a, "a", R, E);
  OptionalDeviceGuard guard(a);
  Tensor ac = contig(a), dc = contig(w_data), sc = contig(w_scales), gc = contig(w_global), oc = contig(expert_offsets);
  Tensor out = new_empty(a, {R, N}, a.scalar_type());
  if (out.numel() == 0) return out;
  if (K == 0 || E == 0) {  // empty sums: act(0) = 0 everywhere
    torch::stable::zero_(out);
    return out;
  }
  GroupedGemmNvfp4wParams p{};
  p.dtype = dt;
  p.R = R, p.N = N, p.K = K, p.E = E;
  p.offsets = static_cast<const int32_t*>(oc.data_ptr());
  p.a = ac.data_ptr();
  p.codes = static_cast<const uint8_t*>(dc.data_ptr());
  p.scales = static_cast<const uint8_t*>(sc.data_ptr());
  p.global_scale = static_cast<const float*>(gc.data_ptr());
  p.global_stride = gc.numel() == E && E > 1 ? 1 : 0;
  p.act = activation == "relu2" ? GgAct::Relu2 : GgAct::None;
  p.out = out.data_ptr();
#ifdef NK_WITH_CUDA
  if (a.is_cuda()) p.arch = grouped_gemm_nvfp4w_cuda_path(p);
#endif
  NK_ROUTE_BY_DEVICE(a, op, grouped_gemm_nvfp4w_cpu(p), grouped_gemm_nvfp4w_cuda(p, stream));
  return out;
}

// grouped_gemm with FP8 rows and FP8 expert weights (forward only): the checks, then the CPU
// kernel or the CUDA path grouped_gemm_fp8_cuda_prepare picks (CUTLASS on sm_90a, else portable).
std::tuple<Tensor, Tensor> grouped_gemm_fp8(Tensor a, Tensor a_scale, Tensor w, Tensor w_scale, Tensor expert_offsets,
                                            const std::string& activation, ScalarType out_dtype, bool save_preact,
                                            std::optional<Tensor> out_scale) {
  const char* op = "grouped_gemm (FP8)";
  check_dim(op, "a", a, 2);
  check_dtype(op, "a", a, {ScalarType::Float8_e4m3fn});
  const int64_t R = a.size(0), K = a.size(1);
  check_tensor(op, "w", w, {-1, -1, K}, {ScalarType::Float8_e4m3fn}, a, "a");
  const int64_t E = w.size(0), N = w.size(1);
  // Per-block scales (a_scale 2-D): a_scale (R, K / 128), w_scale (E, ceil(N / 128), K / 128).
  const int64_t block = a_scale.dim() == 2 ? 128 : 0;
  if (block > 0) {
    NK_CHECK(K % block == 0, op, ": per-block scales need K % 128 == 0, got K = ", K);
    check_tensor(op, "a_scale", a_scale, {R, K / block}, {ScalarType::Float}, a, "a");
    check_tensor(op, "w_scale", w_scale, {E, (N + block - 1) / block, K / block}, {ScalarType::Float}, a, "a");
    NK_CHECK(out_dtype != ScalarType::Float8_e4m3fn && !save_preact, op,
             ": per-block scales take 16- or 32-bit outputs and keep no pre-activation");
  } else {
    check_tensor(op, "a_scale", a_scale, {R}, {ScalarType::Float}, a, "a");
    check_dtype(op, "w_scale", w_scale, {ScalarType::Float});
    check_same_device(op, "w_scale", w_scale, a, "a");
    NK_CHECK(w_scale.dim() <= 1 && (w_scale.numel() == 1 || w_scale.numel() == E), op,
             ": w_scale must hold one float32 per expert (E = ", E, ") or one for all (or, with a 2-D a_scale, one ",
             "per 128 x 128 block), got shape ", shape_str(w_scale));
  }
  NK_CHECK(activation == "none" || activation == "relu2", op, ": activation must be \"none\" or \"relu2\", got \"",
           activation, "\"");
  const bool e4m3_out = out_dtype == ScalarType::Float8_e4m3fn;
  NK_CHECK(out_dtype == ScalarType::BFloat16 || out_dtype == ScalarType::Half || out_dtype == ScalarType::Float ||
               e4m3_out,
           op, ": out_dtype must be bfloat16, float16, float32 or float8_e4m3fn");
  NK_CHECK(e4m3_out == out_scale.has_value(), op, ": out_scale (the static scale of e4m3 output codes) goes with ",
           "out_dtype float8_e4m3fn, and only with it");
  std::optional<Tensor> osc;
  if (e4m3_out) {
    check_dtype(op, "out_scale", *out_scale, {ScalarType::Float});
    check_same_device(op, "out_scale", *out_scale, a, "a");
    NK_CHECK(out_scale->numel() == 1, op, ": out_scale must be one float32, got shape ", shape_str(*out_scale));
    NK_CHECK(!save_preact, op, ": no pre-activation with e4m3 output (training keeps 16-bit outputs)");
    osc.emplace(contig(*out_scale));
    if (osc->is_cpu()) {
      const float v = *static_cast<const float*>(osc->data_ptr());
      NK_CHECK(v > 0.0f && v <= 3.402823466e38f, op, ": out_scale must be positive and finite, got ", v);
    }
  }
  check_sizes(op, a, R, "N (w.shape[1], the output columns)", N);
  check_offsets(op, expert_offsets, a, "a", R, E);
  OptionalDeviceGuard guard(a);
  Tensor ac = contig(a), sc = contig(a_scale), wc = contig(w), wsc = contig(w_scale), oc = contig(expert_offsets);
  const bool keep_pre = save_preact && activation == "relu2";
  Tensor out = new_empty(a, {R, N}, out_dtype);
  Tensor pre = new_empty(a, {keep_pre ? R : 0, N}, out_dtype);
  if (out.numel() == 0) return {out, pre};
  if (K == 0 || E == 0) {  // empty sums: act(0) = 0 everywhere
    torch::stable::zero_(out);
    if (keep_pre) torch::stable::zero_(pre);
    return {out, pre};
  }
  GroupedGemmFp8Params p{};
  p.dtype = e4m3_out                        ? GgType::E4M3
            : out_dtype == ScalarType::BFloat16 ? GgType::BF16
            : out_dtype == ScalarType::Half     ? GgType::F16
                                                : GgType::F32;
  p.out_scale = e4m3_out ? static_cast<const float*>(osc->data_ptr()) : nullptr;
  p.R = R, p.N = N, p.K = K, p.E = E;
  p.offsets = static_cast<const int32_t*>(oc.data_ptr());
  p.a = static_cast<const uint8_t*>(ac.data_ptr());
  p.a_scale = static_cast<const float*>(sc.data_ptr());
  p.w = static_cast<const uint8_t*>(wc.data_ptr());
  p.w_scale = static_cast<const float*>(wsc.data_ptr());
  p.w_scale_stride = wsc.numel() == E && E > 1 ? 1 : 0;
  p.block = block;
  p.act = activation == "relu2" ? GgAct::Relu2 : GgAct::None;
  p.out = out.data_ptr();
  p.pre = keep_pre ? pre.data_ptr() : nullptr;
#ifdef NK_WITH_CUDA
  auto ws = workspace_for(a, p, grouped_gemm_fp8_cuda_prepare);
#endif
  NK_ROUTE_BY_DEVICE(a, op, grouped_gemm_fp8_cpu(p), grouped_gemm_fp8_cuda(p, stream));
  return {out, pre};
}

// Rows of x to e4m3 with a float32 scale each, gathered by slot_of_row when it is not empty.
std::tuple<Tensor, Tensor> moe_quantize_fp8(Tensor x, Tensor slot_of_row, int64_t top_k, Tensor static_scale,
                                            int64_t block) {
  const char* op = "moe_quantize_fp8";
  NK_CHECK(block == 0 || block == 128, op, ": block must be 0 (a scale per row) or 128, got ", block);
  check_dim(op, "x", x, 2);
  check_dtype(op, "x", x, {ScalarType::Float, ScalarType::Half, ScalarType::BFloat16});
  const int64_t T = x.size(0), K = x.size(1);
  const bool gather = slot_of_row.numel() > 0;
  if (gather) {
    check_tensor(op, "slot_of_row", slot_of_row, {-1}, {ScalarType::Int}, x, "x");
    NK_CHECK(top_k >= 1, op, ": top_k must be >= 1, got ", top_k);
    NK_CHECK(T <= kInt32Max / top_k, op, ": T * top_k must fit in int32");
  }
  const int64_t R = gather ? slot_of_row.size(0) : T;
  const bool fixed = static_scale.numel() > 0;
  NK_CHECK(block == 0 || (!fixed && K % block == 0), op, ": per-block scales are dynamic and need K % ", block,
           " == 0, got K = ", K, fixed ? " and a static scale" : "");
  NK_CHECK(!fixed || static_scale.numel() == 1 || (!gather && R % static_scale.numel() == 0), op,
           ": static_scale holds ", static_scale.numel(), " values; more than one is for blocks of rows ",
           "(row r takes scale r / (rows / scales)), which must divide the ", R, " rows, and not with slot_of_row ",
           "(a gathered row's expert is not its block: reduce a per-expert input_scale to one value)");
  if (fixed) {
    check_dtype(op, "static_scale", static_scale, {ScalarType::Float});
    check_same_device(op, "static_scale", static_scale, x, "x");
    NK_CHECK(static_scale.dim() <= 1, op, ": static_scale must be 0-dim or 1-dim, got shape ", shape_str(static_scale));
    if (static_scale.is_cpu()) {
      Tensor sc = torch::stable::contiguous(static_scale);
      const float* v = static_cast<const float*>(sc.data_ptr());
      for (int64_t i = 0; i < sc.numel(); ++i) {
        NK_CHECK(v[i] > 0.0f && v[i] <= 3.402823466e38f, op, ": static_scale must be positive and finite, got ", v[i],
                 " at ", i);
      }
    }
  }
  OptionalDeviceGuard guard(x);
  Tensor xc = contig(x), sr = contig(slot_of_row), ss = contig(static_scale);
  if (gather && x.is_cpu()) {
    const int32_t* s = static_cast<const int32_t*>(sr.data_ptr());
    for (int64_t r = 0; r < R; ++r) {
      NK_CHECK(s[r] >= -1 && s[r] < T * top_k, op, ": slot_of_row[", r, "] = ", s[r], " is outside [-1, T * top_k = ",
               T * top_k, ")");
    }
  }
  Tensor q = new_empty(x, {R, K}, ScalarType::Float8_e4m3fn);
  Tensor scale = block > 0 ? new_empty(x, {R, K / block}, ScalarType::Float) : new_empty(x, {R}, ScalarType::Float);
  if (R == 0) return {q, scale};
  QuantizeFp8Params p{};
  p.block = block;
  p.dtype = gg_type(op, "x", x);
  p.T = T, p.R = R, p.K = K;
  p.x = xc.data_ptr();
  p.slot_of_row = gather ? static_cast<const int32_t*>(sr.data_ptr()) : nullptr;
  p.top_k = gather ? top_k : 1;
  p.static_scale = fixed ? static_cast<const float*>(ss.data_ptr()) : nullptr;
  p.rows_per_scale = fixed ? R / static_scale.numel() : 1;
  p.q = static_cast<uint8_t*>(q.data_ptr());
  p.scale = static_cast<float*>(scale.data_ptr());
  NK_ROUTE_BY_DEVICE(x, op, moe_quantize_fp8_cpu(p), moe_quantize_fp8_cuda(p, stream));
  return {q, scale};
}

// The FP8 wgrad's operands: x (R, C) transposed to (C, padded16_width(R, E)), column scales.
std::tuple<Tensor, Tensor> moe_quantize_fp8_t(Tensor x, Tensor expert_offsets) {
  const char* op = "moe_quantize_fp8_t";
  check_dim(op, "x", x, 2);
  check_dtype(op, "x", x, {ScalarType::Float, ScalarType::Half, ScalarType::BFloat16});
  const int64_t R = x.size(0), C = x.size(1);
  const int64_t E = check_offsets(op, expert_offsets, x, "x", R, -1);
  const int64_t W = padded16_width(R, E);
  OptionalDeviceGuard guard(x);
  Tensor xc = contig(x), oc = contig(expert_offsets);
  Tensor qT = new_empty(x, {C, W}, ScalarType::Float8_e4m3fn);
  Tensor scale = new_empty(x, {C}, ScalarType::Float);
  if (C == 0) return {qT, scale};
  QuantizeFp8TParams p{};
  p.dtype = gg_type(op, "x", x);
  p.R = R, p.C = C, p.E = E, p.W = W;
  p.offsets = static_cast<const int32_t*>(oc.data_ptr());
  p.x = xc.data_ptr();
  p.qT = static_cast<uint8_t*>(qT.data_ptr());
  p.scale = static_cast<float*>(scale.data_ptr());
  std::optional<Tensor> partial;
  if (x.is_cuda()) {
    partial.emplace(new_empty(x, {std::max<int64_t>((R + kFp8TRowChunk - 1) / kFp8TRowChunk, 1), C}, ScalarType::Float));
    p.partial = static_cast<float*>(partial->data_ptr());
  }
  NK_ROUTE_BY_DEVICE(x, op, moe_quantize_fp8_t_cpu(p), moe_quantize_fp8_t_cuda(p, stream));
  return {qT, scale};
}

// dw (E, N, K) of the FP8 experts from the transposed operands of moe_quantize_fp8_t.
Tensor grouped_gemm_fp8_wgrad(Tensor gT, Tensor g_scale, Tensor aT, Tensor a_scale, Tensor expert_offsets,
                              ScalarType out_dtype) {
  const char* op = "grouped_gemm (FP8 wgrad)";
  check_dim(op, "gT", gT, 2);
  check_dtype(op, "gT", gT, {ScalarType::Float8_e4m3fn});
  const int64_t N = gT.size(0), W = gT.size(1);
  check_tensor(op, "g_scale", g_scale, {N}, {ScalarType::Float}, gT, "gT");
  check_tensor(op, "aT", aT, {-1, W}, {ScalarType::Float8_e4m3fn}, gT, "gT");
  const int64_t K = aT.size(0);
  check_tensor(op, "a_scale", a_scale, {K}, {ScalarType::Float}, gT, "gT");
  check_tensor(op, "expert_offsets", expert_offsets, {-1}, {ScalarType::Int}, gT, "gT");
  check_size_at_least(op, "expert_offsets", expert_offsets, 0, 1, "E + 1 entries");
  const int64_t E = expert_offsets.size(0) - 1;
  NK_CHECK(W % 16 == 0 && W >= 16 * E, op, ": gT / aT must be (., padded16_width(R, E)) as moe_quantize_fp8_t makes "
           "them (a multiple of 16, at least 16 E), got width ", W, " with E = ", E);
  const int64_t R = W - 16 * E;  // >= the rows the operands came from: offsets clamp into it
  check_offsets(op, expert_offsets, gT, "gT", R, E);
  NK_CHECK(out_dtype == ScalarType::BFloat16 || out_dtype == ScalarType::Float, op,
           ": out_dtype must be bfloat16 or float32");
  OptionalDeviceGuard guard(gT);
  Tensor gc = contig(gT), gsc = contig(g_scale), ac = contig(aT), asc = contig(a_scale), oc = contig(expert_offsets);
  Tensor dw = new_empty(gT, {E, N, K}, out_dtype);
  if (dw.numel() == 0) return dw;
  GroupedGemmFp8WgradParams p{};
  p.dtype = out_dtype == ScalarType::BFloat16 ? GgType::BF16 : GgType::F32;
  p.R = R, p.N = N, p.K = K, p.E = E, p.W = W;
  p.offsets = static_cast<const int32_t*>(oc.data_ptr());
  p.gT = static_cast<const uint8_t*>(gc.data_ptr());
  p.g_scale = static_cast<const float*>(gsc.data_ptr());
  p.aT = static_cast<const uint8_t*>(ac.data_ptr());
  p.a_scale = static_cast<const float*>(asc.data_ptr());
  p.dw = dw.data_ptr();
#ifdef NK_WITH_CUDA
  auto ws = workspace_for(gT, p, grouped_gemm_fp8_wgrad_cuda_prepare);
#endif
  NK_ROUTE_BY_DEVICE(gT, op, grouped_gemm_fp8_wgrad_cpu(p), grouped_gemm_fp8_wgrad_cuda(p, stream));
  return dw;
}

// Both gradients of one forward. The CUTLASS path has no operand transform, so dgrad and wgrad
// would each write g = round(dout * 2 * relu(pre)) (R x N) into their workspace: here it is
// written once and both take it as their dout. Elsewhere (CPU, the portable kernels, which fuse
// g into their operand loads) this is dgrad then wgrad as they are.
std::tuple<Tensor, Tensor> grouped_gemm_bwd(Tensor dout, Tensor a, Tensor w, Tensor expert_offsets,
                                            std::optional<Tensor> preact) {
#ifdef NK_WITH_CUDA
  if (preact && dout.is_cuda()) {
    const char* op = "grouped_gemm (backward)";
    check_dim(op, "dout", dout, 2);
    const GgType dt = gg_type(op, "dout", dout);
    check_dim(op, "a", a, 2);
    check_dim(op, "w", w, 3);
    check_dtype_and_device(op, "a", a, dout, "dout");
    check_dtype_and_device(op, "w", w, dout, "dout");
    auto pre = check_pre(op, preact, dout);
    OptionalDeviceGuard guard(dout);
    Tensor dc = contig(dout), ac = contig(a), wc = contig(w);
    GroupedGemmParams p = base_params(dt, dout.size(0), dout.size(1), a.size(1), w.size(0), expert_offsets);
    p.dout = dc.data_ptr(), p.pre_in = pre->data_ptr(), p.a = ac.data_ptr(), p.w = wc.data_ptr();
    if (grouped_gemm_cuda_shared_operand(p)) {
      Tensor g = new_empty(dout, {p.R, p.N}, dout.scalar_type());
      grouped_gemm_relu2_operand_cuda(p, g.data_ptr(), current_cuda_stream(dout.get_device_index()));
      return {grouped_gemm_dgrad(g, wc, expert_offsets, std::nullopt),
              grouped_gemm_wgrad(g, ac, expert_offsets, std::nullopt)};
    }
  }
#endif
  return {grouped_gemm_dgrad(dout, w, expert_offsets, preact), grouped_gemm_wgrad(dout, a, expert_offsets, preact)};
}

}  // namespace nk
