// The grouped GEMM's arch (CUTLASS) path of csrc/moe/grouped_gemm_cuda.cu under the emulator,
// built with NK_HAS_SM90: path selection (grouped_gemm_cuda_prepare), workspace carving, the
// zero fills, the relu^2 pass and the relu^2-backward operand pass run for real; the CUTLASS
// grouped GEMM itself is replaced by a naive loop with the documented operand contract of each
// kind (csrc/moe/grouped_gemm_cutlass.cuh), so a wrong base pointer or buffer handed to it
// shows. tests/moe/test_cuda_emulation_grouped_gemm.py drives it.
#include "driver_moe.cpp"  // the entries, on the kernels built with NK_HAS_SM90

#include <algorithm>

namespace nk {
namespace {
float ldb(const void* p, int64_t i) { return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]); }
void stb(void* p, int64_t i, float v) { static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); }
void seg(const GroupedGemmParams& p, int64_t e, int64_t& lo, int64_t& hi) {
  lo = std::clamp<int64_t>(p.offsets[e], 0, p.R);
  hi = std::clamp<int64_t>(p.offsets[e + 1], lo, p.R);
}
}  // namespace
long long emu_mock_calls = 0;
int64_t grouped_gemm_sm90_workspace(int64_t, int) { return 0; }
int64_t grouped_gemm_wgrad_sm90_workspace(int64_t) { return 0; }
void grouped_gemm_sm90_run(const GroupedGemmParams& p, int kind, const void* A, const void* B, void* D, void*,
                           void*) {
  ++emu_mock_calls;
  for (int64_t e = 0; e < p.E; ++e) {
    int64_t lo, hi;
    seg(p, e, lo, hi);
    for (int64_t r = lo; r < hi; ++r) {
      if (kind == kGgFwd) {
        for (int64_t n = 0; n < p.N; ++n) {
          float s = 0;
          for (int64_t k = 0; k < p.K; ++k) s += ldb(A, r * p.K + k) * ldb(B, e * p.N * p.K + n * p.K + k);
          stb(D, r * p.N + n, s);
        }
      } else {
        for (int64_t c = 0; c < p.K; ++c) {
          float s = 0;
          for (int64_t n = 0; n < p.N; ++n) s += ldb(A, r * p.N + n) * ldb(B, e * p.N * p.K + n * p.K + c);
          stb(D, r * p.K + c, s);
        }
      }
    }
  }
}
// The fused relu^2 forwards: relu(sum)^2 of the float32 sum, one bf16 rounding, into D; the
// training one also writes the sum rounded once into pre.
void mock_relu2(const GroupedGemmParams& p, const void* A, const void* B, void* D, void* pre) {
  for (int64_t e = 0; e < p.E; ++e) {
    int64_t lo, hi;
    seg(p, e, lo, hi);
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t n = 0; n < p.N; ++n) {
        float s = 0;
        for (int64_t k = 0; k < p.K; ++k) s += ldb(A, r * p.K + k) * ldb(B, e * p.N * p.K + n * p.K + k);
        stb(D, r * p.N + n, s > 0.f ? s * s : 0.f);
        if (pre != nullptr) stb(pre, r * p.N + n, s);
      }
  }
}
long long emu_mock_relu2_calls = 0;
int64_t grouped_gemm_relu2_sm90_workspace(int64_t) { return 0; }
void grouped_gemm_relu2_sm90_run(const GroupedGemmParams& p, const void* A, const void* B, void* D, void*, void*) {
  ++emu_mock_relu2_calls;
  mock_relu2(p, A, B, D, nullptr);
}
long long emu_mock_relu2_pre_calls = 0;
int64_t grouped_gemm_relu2_pre_sm90_workspace(int64_t) { return 0; }
void grouped_gemm_relu2_pre_sm90_run(const GroupedGemmParams& p, const void* A, const void* B, void* D, void* pre,
                                     void*, void*) {
  ++emu_mock_relu2_pre_calls;
  mock_relu2(p, A, B, D, pre);
}
// The opt-in 64-row-tile forward (NEMOKERNELS_GROUPED_GEMM_TILE=64): the same contracts.
long long emu_mock_m64_calls = 0;
int64_t grouped_gemm_m64_plain_sm90_workspace(int64_t) { return 0; }
int64_t grouped_gemm_m64_relu2_sm90_workspace(int64_t) { return 0; }
void grouped_gemm_m64_plain_sm90_run(const GroupedGemmParams& p, const void* A, const void* B, void* D, void* ws,
                                     void* s) {
  ++emu_mock_m64_calls;
  grouped_gemm_sm90_run(p, kGgFwd, A, B, D, ws, s);
  --emu_mock_calls;
}
void grouped_gemm_m64_relu2_sm90_run(const GroupedGemmParams& p, const void* A, const void* B, void* D, void* ws,
                                     void* s) {
  ++emu_mock_m64_calls;
  grouped_gemm_relu2_sm90_run(p, A, B, D, ws, s);
  --emu_mock_relu2_calls;
}
// The opt-in swapped forward (NEMOKERNELS_GROUPED_GEMM_SWAP_AB=1): the forward's contract (A the
// tokens, B the weights, D the row-major output); the operand swap is inside its setup.
long long emu_mock_swap_calls = 0;
int64_t grouped_gemm_swap_plain_sm90_workspace(int64_t) { return 0; }
int64_t grouped_gemm_swap_relu2_sm90_workspace(int64_t) { return 0; }
void grouped_gemm_swap_plain_sm90_run(const GroupedGemmParams& p, const void* A, const void* B, void* D, void* ws,
                                      void* s) {
  ++emu_mock_swap_calls;
  grouped_gemm_sm90_run(p, kGgFwd, A, B, D, ws, s);
  --emu_mock_calls;
}
void grouped_gemm_swap_relu2_sm90_run(const GroupedGemmParams& p, const void* A, const void* B, void* D, void*,
                                      void*) {
  ++emu_mock_swap_calls;
  mock_relu2(p, A, B, D, nullptr);
}
void grouped_gemm_wgrad_sm90_run(const GroupedGemmParams& p, const void* G, const void* A, void* D, void*, void*) {
  ++emu_mock_calls;
  for (int64_t e = 0; e < p.E; ++e) {
    int64_t lo, hi;
    seg(p, e, lo, hi);
    if (hi == lo) continue;  // M = 0: no tiles, dw[e] is left to the zero pass
    for (int64_t n = 0; n < p.N; ++n)
      for (int64_t c = 0; c < p.K; ++c) {
        float s = 0;
        for (int64_t r = lo; r < hi; ++r) s += ldb(G, r * p.N + n) * ldb(A, r * p.K + c);
        stb(D, e * p.N * p.K + n * p.K + c, s);
      }
  }
}
}  // namespace nk

EMU_EXPORT long long emu_gg_prepare(nk::GroupedGemmParams* p, int op) {
  return (long long)nk::grouped_gemm_cuda_prepare(*p, static_cast<nk::GgOp>(op));
}
// grouped_gemm_bwd's shared operand: whether it is taken, and g written once.
EMU_EXPORT long long emu_gg_shared_operand(nk::GroupedGemmParams* p) {
  return nk::grouped_gemm_cuda_shared_operand(*p) ? 1 : 0;
}
EMU_EXPORT long long emu_gg_relu2_operand(nk::GroupedGemmParams* p, void* g) {
  nk::grouped_gemm_relu2_operand_cuda(*p, g, nullptr);
  return 0;
}
EMU_EXPORT long long emu_gg_mock_calls() { return nk::emu_mock_calls; }
EMU_EXPORT long long emu_gg_mock_relu2_calls() { return nk::emu_mock_relu2_calls; }
EMU_EXPORT long long emu_gg_mock_relu2_pre_calls() { return nk::emu_mock_relu2_pre_calls; }
EMU_EXPORT long long emu_gg_mock_swap_calls() { return nk::emu_mock_swap_calls; }
EMU_EXPORT long long emu_gg_mock_m64_calls() { return nk::emu_mock_m64_calls; }
