// NVFP4 block-scaled GEMM: out = alpha * (A_hat @ B_hat^T) + bias, the GEMM of
// nemokernels.nvfp4.gemm (docs/design.md section 4.3). Parameter struct shared by the op entry
// (gemm.cpp), the CPU kernel (gemm_cpu.cpp), the portable CUDA kernel (gemm_cuda.cu), the Hopper
// kernels (gemm_sm90.cu, gemm_decode_mma_sm90.cu) and the Blackwell CUTLASS kernel
// (gemm_sm100.cu). No torch types here.
// Details: docs/nvfp4.md, section `csrc/nvfp4/gemm.h`.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace nk {

struct Nvfp4GemmParams {
  int64_t M, N, K;            // K % 16 == 0
  const uint8_t* a_data;      // (M, K/2), row stride a_ld bytes (contiguous rows)
  const uint8_t* a_scales;    // (M, K/16), row stride K/16
  const uint8_t* b_data;      // (N, K/2)
  const uint8_t* b_scales;    // (N, K/16)
  const float* a_global;      // 0-dim float32 on the operands' device
  const float* b_global;
  const float* bias;          // (N,) float32 contiguous, or null
  void* out;                  // (M, N) contiguous, out_dtype
  DType out_dtype;
};

// Block-scaled layout of the scale factors that sm_100 tensor cores read (CUTLASS
// Sm1xxBlkScaledConfig, 16-element vectors): 128x4 atoms of (rows, scale columns). Rows are
// padded to a multiple of 128, scale columns (K/16) to a multiple of 4. Within an atom the
// byte offset of (row r, column c) is (r % 32) * 16 + ((r / 32) % 4) * 4 + c % 4, and atoms
// are laid out column-major over (row tile, column tile): atom (rt, ct) starts at
// (rt * num_col_tiles + ct) * 512. (CUTLASS docs: blackwell_functionality.md, "Scale Factor
// Layouts"; checked on the CPU against a brute-force copy of that formula in the tests.)
NK_HD int64_t nvfp4_sf_swizzled_offset(int64_t r, int64_t c, int64_t num_col_tiles) {
  const int64_t atom = (r / 128) * num_col_tiles + (c / 4);
  return atom * 512 + (r % 32) * 16 + ((r / 32) % 4) * 4 + (c % 4);
}
NK_HD int64_t nvfp4_sf_swizzled_size(int64_t rows, int64_t sf_cols) {
  return ((rows + 127) / 128) * 128 * ((sf_cols + 3) / 4) * 4;
}

void nvfp4_gemm_cpu(const Nvfp4GemmParams& p);
// Row-major (rows, sf_cols) e4m3 bytes -> the swizzled layout above (padding zero-filled).
void nvfp4_swizzle_scales_cpu(const uint8_t* src, uint8_t* dst, int64_t rows, int64_t sf_cols);

// The CUDA kernel nvfp4_gemm runs for an (M, N, K) problem on a device (16-byte aligned operands,
// which the entry guarantees): kNvfp4PathCutlassSm100 when this build has the sm_100 CUTLASS
// kernel for the device's compute capability (common/arch.h) and the kernel takes the shape;
// kNvfp4PathCutlassSm90 on an sm_90 device when this build has the sm_90a units, N % 8 == 0 and
// M, N, K fit int (NEMOKERNELS_NVFP4_GEMM_PORTABLE=1 turns it off); else kNvfp4PathPortable.
// The op routes by nvfp4_gemm_cuda_path and the tests ask the same function
// (nemokernels.nvfp4.gemm_path, through _C) which path they exercise: one predicate.
constexpr int kNvfp4PathPortable = 0;
constexpr int kNvfp4PathCutlassSm90 = 90;
constexpr int kNvfp4PathCutlassSm100 = 100;
// Limits of the portable kernel: 128-row tiles on grid dimension y, K tiles of 64 counted in int.
constexpr int64_t kNvfp4PortableMaxM = 65535LL * 128;
constexpr int64_t kNvfp4PortableMaxK = 2147483647LL * 64;

#ifdef NK_WITH_CUDA
int nvfp4_gemm_cuda_path(int device_index, int64_t M, int64_t N, int64_t K);
// Number of K splits the portable kernel uses on the current device (1: none). With splits > 1 it
// needs a float32 workspace of splits * M * N (partial sums, reduced in split order).
int nvfp4_gemm_cuda_splits(const Nvfp4GemmParams& p);
void nvfp4_gemm_cuda(const Nvfp4GemmParams& p, int splits, float* workspace, void* stream);
void nvfp4_swizzle_scales_cuda(const uint8_t* src, uint8_t* dst, int64_t rows, int64_t sf_cols,
                               void* stream);
#endif
#ifdef NK_HAS_SM90
// The sm_90 path (Hopper has no FP4 tensor cores): A and B decoded to bf16 in scratch (exact:
// e2m1 x e4m3 fits bf16; nvfp4_dequantize_cuda with no global scale), then the MoE grouped
// GEMM's CUTLASS wgmma kernel as one group with D = alpha * acc in its epilogue (alpha = a_global
// * b_global read on the device). D is the output itself for bf16 without bias, else a float32
// accumulator that nvfp4_bias_convert_cuda rounds once after adding the bias. Composed in
// gemm_cuda.cu (under the emulator with a mock GEMM), the GEMM in gemm_sm90.cu.
// decode_mma: nvfp4_gemm_sm90_decode_mma(p), decided once per call for both.
int64_t nvfp4_gemm_sm90_scratch_bytes(const Nvfp4GemmParams& p, bool decode_mma);
void nvfp4_gemm_sm90(const Nvfp4GemmParams& p, bool decode_mma, void* scratch, void* stream);
// The CUTLASS GEMM of that path: d (M, N) = alpha * a16 (M, K) @ b16 (N, K)^T, bf16 operands,
// d bf16 or float32 (f32_out); offsets: (2,) int32 {0, M} on the device.
int64_t nvfp4_gemm_sm90_workspace(bool f32_out);
void nvfp4_gemm_sm90_run(int64_t M, int64_t N, int64_t K, const void* a16, const void* b16, const float* alpha,
                         const int32_t* offsets, void* d, bool f32_out, void* workspace, void* stream);
// The same path with B decoded inside the mainloop (gemm_decode_mma_sm90.cu; opt-in,
// NEMOKERNELS_NVFP4_GEMM_DECODE_MMA=1): A decoded to fp16 in scratch (exact, as for bf16), B's
// codes and scales streamed and decoded in registers into wgmma's A operand (D^T = B A^T),
// out = alpha * acc (+ bias) rounded once by its epilogue. Takes K % 64 == 0 (whole 64-deep
// steps), N % 8 == 0 (16-byte output stores) and at most 65535 token tiles of 128.
NK_HD bool nvfp4_gemm_decode_mma_sm90_takes(int64_t M, int64_t N, int64_t K) {
  return M > 0 && N > 0 && K > 0 && K % 64 == 0 && N % 8 == 0 && (M + 127) / 128 <= 65535;
}
void nvfp4_gemm_decode_mma_sm90(const Nvfp4GemmParams& p, const void* a16, const float* alpha, void* stream);
// Whether this call takes it: the switch (read here) and the shape rule.
bool nvfp4_gemm_sm90_decode_mma(const Nvfp4GemmParams& p);
// The same kernel over expert segments: the MoE experts' GEMM with NVFP4 weights and bf16 or fp16
// tokens (nemokernels.moe.grouped_gemm with an NVFP4Tensor weight; entry grouped_gemm_nvfp4w in
// csrc/moe/grouped_gemm.cpp). out[r] = act(alpha[e] * a[r] @ What[e]^T) for r in expert
// e's rows, What = e2m1 x e4m3 decoded in registers; rows outside every segment are not written.
struct Nvfp4GroupedArgs {
  int64_t R, N, K, experts;  // K % 64 == 0, N % 8 == 0
  bool bf16;                 // tokens and out bf16, else fp16
  const void* a;             // (R, K)
  const uint8_t* codes;      // (experts, N, K / 2)
  const uint8_t* scales;     // (experts, N, K / 16) E4M3
  const float* alpha;        // alpha[e * alpha_stride] (device)
  int64_t alpha_stride;      // 1: one per expert, 0: shared
  const int32_t* offsets;    // (experts + 1,) on the device
  bool relu2;
  void* out;                 // (R, N)
};
void nvfp4_grouped_decode_mma_sm90(const Nvfp4GroupedArgs& g, void* stream);
#endif
#ifdef NK_HAS_SM100
// Whether the CUTLASS block-scaled kernel takes this problem (alignment, sizes).
bool nvfp4_gemm_sm100_supported(const Nvfp4GemmParams& p);
// Workspace bytes the CUTLASS kernel needs (allocated by the entry).
int64_t nvfp4_gemm_sm100_workspace_size(const Nvfp4GemmParams& p);
// a_sf / b_sf: swizzled scales; alpha: device float (a_global * b_global); out must be bf16
// (M, N) contiguous; bias is added by a second pass when given.
void nvfp4_gemm_sm100(const Nvfp4GemmParams& p, const uint8_t* a_sf, const uint8_t* b_sf,
                      float* alpha, void* workspace, void* stream);
#endif

}  // namespace nk
