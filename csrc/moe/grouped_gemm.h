// Grouped GEMM over experts (LatentMoE up/down projections), forward, dgrad and wgrad.
// Parameter structs shared by the op entry (grouped_gemm.cpp), the CPU kernels
// (grouped_gemm_cpu.cpp) and the CUDA kernels (grouped_gemm_cuda.cu, _sm90.cu, _sm100.cu).
// No torch types here, so the CUDA translation units compile without torch headers.
// Details: docs/moe.md, section `csrc/moe/grouped_gemm.h`.
#pragma once

#include <cstdint>
#include <cstdlib>

#include "common/macros.h"

namespace nk {

// Element type of the grouped GEMM operands. F64 exists on the CPU only (gradcheck); E4M3 only as
// the FP8 GEMM's output (codes of a static scale: GroupedGemmFp8Params::out_scale).
enum class GgType : int { F32 = 0, F16 = 1, BF16 = 2, F64 = 3, E4M3 = 4 };

enum class GgAct : int { None = 0, Relu2 = 1 };

// Row tile of the fwd/dgrad schedules: each expert's segment is cut into tiles of this many
// rows (the last one partial), so sum over experts of ceil(count_e / kGgRowTile) <=
// ceil(R / kGgRowTile) + E bounds the number of row tiles without reading the offsets.
constexpr int kGgRowTileCpu = 64;

struct GroupedGemmParams {
  GgType dtype;
  int64_t R;            // rows of a / dout
  int64_t N, K;         // w is (E, N, K)
  int64_t E;
  const int32_t* offsets;  // (E + 1,) on the tensors' device
  // fwd: a (R, K), w (E, N, K) -> out (R, N), pre (R, N) or null
  // dgrad: dout (R, N), w, pre (R, N) or null -> da (R, K)
  // wgrad: dout (R, N), a (R, K), pre or null -> dw (E, N, K)
  // All contiguous (the entry copies strided inputs).
  const void* a;
  const void* w;
  const void* dout;
  const void* pre_in;   // dgrad/wgrad: saved pre-activation (relu2 backward fused), or null
  void* out;            // fwd out / dgrad da / wgrad dw
  void* pre_out;        // fwd: pre-activation output (relu2 with grad), or null
  GgAct act;            // fwd only
  // CUDA scratch: (E + 1,) int32, the per-expert row-tile prefix sums (portable kernels).
  int32_t* tile_offsets;
  // CUDA path of this call, set by grouped_gemm_cuda_prepare: 0 portable, 90 / 100 the CUTLASS
  // kernels of grouped_gemm_*sm90.cu / *sm100.cu, which use `workspace` (torch-allocated).
  int arch;
  void* workspace;
  // The CUTLASS forward's epilogue scale, D = alpha * acc (one device float), or null for 1. Only
  // nvfp4.gemm's sm_90 path sets it (the global scales); the MoE op entries leave it null, and
  // the CPU and portable kernels do not read it.
  const float* alpha;
};

// grouped_gemm with NVFP4 expert weights and 16-bit or float32 tokens (W4A16 on the GPU):
// out[r] = act(g[e] * a[r] @ What[e]^T) for r in expert e's rows, What[e] = e2m1(code) x
// e4m3(scale) (exact), float32 accumulation, one rounding to a's dtype; rows outside every
// segment are zeros. Forward only (nemokernels.moe.grouped_gemm with an NVFP4Tensor weight).
struct GroupedGemmNvfp4wParams {
  GgType dtype;             // of a and out: F32, F16 or BF16
  int64_t R, N, K, E;       // K % 16 == 0
  const int32_t* offsets;   // (E + 1,) on the tensors' device
  const void* a;            // (R, K)
  const uint8_t* codes;     // (E, N, K / 2), element 2i in the low nibble of byte i
  const uint8_t* scales;    // (E, N, K / 16) E4M3
  const float* global_scale;  // g[e * global_stride]
  int64_t global_stride;    // 1: one per expert, 0: shared
  GgAct act;
  void* out;                // (R, N)
  int arch;                 // CUDA: 90 when the sm_90a kernel runs it, else 0 (set by the entry)
};
void grouped_gemm_nvfp4w_cpu(const GroupedGemmNvfp4wParams& p);
#ifdef NK_WITH_CUDA
// NEMOKERNELS_GROUPED_GEMM_PORTABLE=1: the portable kernels for every grouped GEMM (benchmarks,
// A/B tests). Read per call.
inline bool grouped_gemm_portable_forced() {
  const char* v = std::getenv("NEMOKERNELS_GROUPED_GEMM_PORTABLE");
  return v != nullptr && v[0] == '1';
}
// The CUDA path of one call: 90 (the decode-in-the-mainloop wgmma kernel,
// csrc/nvfp4/gemm_decode_mma_sm90.cu) for 16-bit tokens with K % 64 == 0, N % 8 == 0 and
// 16-byte aligned operands on an sm_90 device of an sm_90a build, unless
// NEMOKERNELS_GROUPED_GEMM_PORTABLE=1; else 0 (the portable SIMT kernel).
int grouped_gemm_nvfp4w_cuda_path(const GroupedGemmNvfp4wParams& p);
void grouped_gemm_nvfp4w_cuda(const GroupedGemmNvfp4wParams& p, void* stream);
#endif

// grouped_gemm with FP8 (e4m3) operands, Model Optimizer's scheme: token rows quantized with one
// float32 scale each (QuantizeFp8Params), weights with one per expert (or one for all):
// out[r] = act((acc * a_scale[r]) * w_scale[e]) for r in expert e's rows, acc = sum over k of
// e4m3(a[r, k]) * e4m3(w[e, n, k]) in float32 (every product exact), one rounding to out's
// dtype; rows outside every segment are zeros. Forward only.
struct GroupedGemmFp8Params {
  GgType dtype;             // of out: F32, F16, BF16, or E4M3: out = fp8_encode(act(v), *out_scale)
  int64_t R, N, K, E;
  const int32_t* offsets;   // (E + 1,) on the tensors' device
  const uint8_t* a;         // (R, K) e4m3
  const float* a_scale;     // (R,)
  const uint8_t* w;         // (E, N, K) e4m3
  const float* w_scale;     // w_scale[e * w_scale_stride]
  int64_t w_scale_stride;   // 1: one per expert, 0: shared
  GgAct act;
  void* out;                // (R, N)
  void* pre;                // (R, N) in out's dtype: the scaled accumulator before relu^2 (training), or null
  const float* out_scale;   // E4M3 output: the static scale of the codes (the next GEMM's input scale)
  // 128: per-block scales (DeepSeek-style FP8): a_scale (R, K / 128) per row and 128-column block,
  // w_scale (E, ceil(N / 128), K / 128) per 128 x 128 weight block; out = act(sum over k blocks of
  // fmaf(partial, a_scale[r, kb] * w_scale[e, n / 128, kb], acc)), partial the block's float32 sum.
  // 0: the per-row / per-expert scales above.
  int64_t block;
  int arch;                 // CUDA: 90 when the sm_90a CUTLASS kernel runs it, else 0 (set by the entry)
  void* workspace;          // the sm_90a path's (grouped_gemm_fp8_sm90_workspace bytes), torch-allocated
};
void grouped_gemm_fp8_cpu(const GroupedGemmFp8Params& p);

// Rows to e4m3 with one float32 scale each, the FP8 grouped GEMM's A operand (moe_quantize_fp8),
// gathered on the way when slot_of_row is given (row r = x[slot_of_row[r] / top_k]; -1: a zero
// row of scale 1): scale = amax(|row|) / 448 (fp8_row_scale), or the one static scale;
// q = fp8_encode(x / scale) (moe/numerics.cuh: the CPU and CUDA kernels agree bit for bit).
struct QuantizeFp8Params {
  GgType dtype;                // of x: F32, F16 or BF16
  int64_t T, R, K;             // x (T, K) contiguous; R output rows (T without slot_of_row)
  const void* x;
  const int32_t* slot_of_row;  // (R,) or null
  int64_t top_k;
  const float* static_scale;   // null: the dynamic per-row scale; else row r takes
  int64_t rows_per_scale;      // static_scale[r / rows_per_scale] (R / the number of scales)
  int64_t block;               // 128: a dynamic scale per row and 128-column block, scale (R, K / 128)
  uint8_t* q;                  // (R, K) e4m3
  float* scale;                // (R,), or (R, K / block)
};
void moe_quantize_fp8_cpu(const QuantizeFp8Params& p);

// The FP8 wgrad's operands (moe_quantize_fp8_t): x (R, C) transposed to qT (C, W), W =
// padded16_width(R, E), expert e's rows at columns [start16(lo_e, e), + count_e) (segments.cuh),
// every other column zero; one float32 scale per column c over the rows inside the segments:
// fp8_row_scale(amax), codes fp8_encode(x / scale[c]).
struct QuantizeFp8TParams {
  GgType dtype;             // of x: F32, F16 or BF16
  int64_t R, C, E, W;
  const int32_t* offsets;   // (E + 1,)
  const void* x;            // (R, C) contiguous
  uint8_t* qT;              // (C, W) e4m3
  float* scale;             // (C,)
  float* partial;           // CUDA scratch: (ceil(R / kFp8TRowChunk), C) float32 partial amaxes
};
constexpr int kFp8TRowChunk = 1024;  // rows per partial amax of the CUDA kernel
void moe_quantize_fp8_t_cpu(const QuantizeFp8TParams& p);

// The FP8 wgrad: dw[e] (N x K) = (acc * g_scale[n]) * a_scale[k], acc = sum over the
// expert's rows i of gT[n, s + i] * aT[k, s + i] (s = start16(lo_e, e)), float32 sums of exact
// products, one rounding; zero for experts without rows.
struct GroupedGemmFp8WgradParams {
  GgType dtype;             // of dw: F32 or BF16
  int64_t R, N, K, E, W;    // W = padded16_width(R, E)
  const int32_t* offsets;
  const uint8_t* gT;        // (N, W) e4m3
  const float* g_scale;     // (N,)
  const uint8_t* aT;        // (K, W) e4m3
  const float* a_scale;     // (K,)
  void* dw;                 // (E, N, K)
  int arch;                 // CUDA: 90 for the CUTLASS kernel, else 0
  void* workspace;
};
void grouped_gemm_fp8_wgrad_cpu(const GroupedGemmFp8WgradParams& p);
#ifdef NK_WITH_CUDA
void moe_quantize_fp8_cuda(const QuantizeFp8Params& p, void* stream);
void moe_quantize_fp8_t_cuda(const QuantizeFp8TParams& p, void* stream);
int64_t grouped_gemm_fp8_wgrad_cuda_prepare(GroupedGemmFp8WgradParams& p);
void grouped_gemm_fp8_wgrad_cuda(const GroupedGemmFp8WgradParams& p, void* stream);
// The CUDA path of one FP8 call: 90 (the CUTLASS kernel, grouped_gemm_fp8_sm90.cu) for bf16
// output (or E4M3 after relu^2, N % 16 == 0) with K % 16 == 0, N % 8 == 0 and 16-byte aligned
// operands on an sm_90 device of an sm_90a build, unless NEMOKERNELS_GROUPED_GEMM_PORTABLE=1; else
// 0 (the portable SIMT kernel). Returns the workspace bytes that path needs (0: portable); allocate
// them and set p.workspace.
int64_t grouped_gemm_fp8_cuda_prepare(GroupedGemmFp8Params& p);
void grouped_gemm_fp8_cuda(const GroupedGemmFp8Params& p, void* stream);
#endif
#ifdef NK_HAS_SM90
int64_t grouped_gemm_fp8_sm90_workspace(int64_t E);
void grouped_gemm_fp8_sm90_run(const GroupedGemmFp8Params& p, void* stream);
// Per-block scales (p.block 128): grouped_gemm_fp8_blockwise_sm90.cu; the workspace holds the scales
// re-laid for CUTLASS (a_scale per group M-major, w_scale per expert N-major) and the group arrays.
int64_t grouped_gemm_fp8_blockwise_sm90_workspace(int64_t R, int64_t N, int64_t K, int64_t E);
void grouped_gemm_fp8_blockwise_sm90_run(const GroupedGemmFp8Params& p, void* stream);
int64_t grouped_gemm_fp8_wgrad_sm90_workspace(int64_t E);
void grouped_gemm_fp8_wgrad_sm90_run(const GroupedGemmFp8WgradParams& p, void* stream);
#endif

void grouped_gemm_fwd_cpu(const GroupedGemmParams& p);
void grouped_gemm_dgrad_cpu(const GroupedGemmParams& p);
void grouped_gemm_wgrad_cpu(const GroupedGemmParams& p);

enum GgOp : int { kGgFwd = 0, kGgDgrad = 1, kGgWgrad = 2 };

#ifdef NK_WITH_CUDA
// Picks the CUDA path of one call (sets p.arch) from the current device, the dtype and the
// alignment of the operands, and returns the workspace bytes that path needs (0: portable).
// Call it with every pointer of p set; then allocate the workspace and set p.workspace.
int64_t grouped_gemm_cuda_prepare(GroupedGemmParams& p, GgOp op);
// Portable kernels (every arch): wmma tensor cores for fp16/bf16, SIMT for fp32; they hand
// over to the arch kernels when p.arch says so.
void grouped_gemm_fwd_cuda(const GroupedGemmParams& p, void* stream);
void grouped_gemm_dgrad_cuda(const GroupedGemmParams& p, void* stream);
void grouped_gemm_wgrad_cuda(const GroupedGemmParams& p, void* stream);
// grouped_gemm_bwd: whether dgrad and wgrad of p (dout, pre_in, a, w set) both take the arch
// kernels, which materialise the relu^2 backward operand; and that operand, g (R x N) =
// round(dout * 2 * relu(pre_in)), written once for both.
bool grouped_gemm_cuda_shared_operand(const GroupedGemmParams& p);
void grouped_gemm_relu2_operand_cuda(const GroupedGemmParams& p, void* g, void* stream);
#endif

// CUTLASS pointer-array grouped GEMMs, bf16 only; A / B / D are the operand bases of each kind
// (grouped_gemm_cutlass.cuh), the relu^2 passes and zero fills run in grouped_gemm_cuda.cu.
#ifdef NK_HAS_SM90
int64_t grouped_gemm_sm90_workspace(int64_t E, int kind);  // kind: kGgFwd or kGgDgrad
void grouped_gemm_sm90_run(const GroupedGemmParams& p, int kind, const void* A, const void* B, void* D,
                           void* workspace, void* stream);
int64_t grouped_gemm_wgrad_sm90_workspace(int64_t E);
void grouped_gemm_wgrad_sm90_run(const GroupedGemmParams& p, const void* G, const void* A, void* D, void* workspace,
                                 void* stream);
// Forward with relu^2 in the epilogue (no pre-activation saved): grouped_gemm_relu2_sm90.cu.
int64_t grouped_gemm_relu2_sm90_workspace(int64_t E);
void grouped_gemm_relu2_sm90_run(const GroupedGemmParams& p, const void* A, const void* B, void* D, void* workspace,
                                 void* stream);
// Forward with relu^2 in the epilogue that also stores the pre-activation (training):
// grouped_gemm_relu2_pre_sm90.cu.
int64_t grouped_gemm_relu2_pre_sm90_workspace(int64_t E);
void grouped_gemm_relu2_pre_sm90_run(const GroupedGemmParams& p, const void* A, const void* B, void* D, void* pre,
                                     void* workspace, void* stream);
// Forward with swapped operands (weight rows x 32 tokens per tile), plain and relu^2 (opt-in,
// NEMOKERNELS_GROUPED_GEMM_SWAP_AB=1, few rows per expert): grouped_gemm_swap_{plain,relu2}_sm90.cu.
int64_t grouped_gemm_swap_plain_sm90_workspace(int64_t E);
void grouped_gemm_swap_plain_sm90_run(const GroupedGemmParams& p, const void* A, const void* B, void* D,
                                      void* workspace, void* stream);
int64_t grouped_gemm_swap_relu2_sm90_workspace(int64_t E);
void grouped_gemm_swap_relu2_sm90_run(const GroupedGemmParams& p, const void* A, const void* B, void* D,
                                      void* workspace, void* stream);
// Forward on 64-row tiles, plain and relu^2 (opt-in, NEMOKERNELS_GROUPED_GEMM_TILE=64):
// grouped_gemm_m64_{plain,relu2}_sm90.cu.
int64_t grouped_gemm_m64_plain_sm90_workspace(int64_t E);
void grouped_gemm_m64_plain_sm90_run(const GroupedGemmParams& p, const void* A, const void* B, void* D,
                                     void* workspace, void* stream);
int64_t grouped_gemm_m64_relu2_sm90_workspace(int64_t E);
void grouped_gemm_m64_relu2_sm90_run(const GroupedGemmParams& p, const void* A, const void* B, void* D,
                                     void* workspace, void* stream);
#endif
#ifdef NK_HAS_SM100
int64_t grouped_gemm_sm100_workspace(int64_t E, int kind);
void grouped_gemm_sm100_run(const GroupedGemmParams& p, int kind, const void* A, const void* B, void* D,
                            void* workspace, void* stream);
int64_t grouped_gemm_wgrad_sm100_workspace(int64_t E);
void grouped_gemm_wgrad_sm100_run(const GroupedGemmParams& p, const void* G, const void* A, void* D,
                                  void* workspace, void* stream);
#endif

}  // namespace nk
