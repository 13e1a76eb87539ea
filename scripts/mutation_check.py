#!/usr/bin/env python3
"""Mutation check: does the test suite catch realistic kernel bugs?

Details: docs/testing.md, section `scripts/mutation_check.py`."""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mutant:
    name: str
    kind: str
    path: str      # file under the repository root
    find: str      # exact text, present exactly once
    replace: str
    tests: tuple   # pytest arguments selecting the tests that must catch it
    rebuild: bool = None  # None: decided by the file's kind (cpu_build)

    @property
    def cpu_build(self) -> bool:
        """CPU kernel sources (and headers shared with them) are compiled into _C; Python files
        and .cu files (compiled by their emulator tests) need no rebuild."""
        if self.rebuild is not None:
            return self.rebuild
        return not self.path.endswith((".cu", ".py"))


def missing_barrier(name, path, before, barrier, tests) -> Mutant:
    """The barrier line `barrier` (with its indent and newline) deleted where it follows `before`."""
    return Mutant(name, "missing barrier", path, before + barrier, before, tests)


MUTANTS = [
    # ---- ssd ------------------------------------------------------------------------------
    Mutant("ssd-cpu-chunk-state-group", "wrong group index", "csrc/ssd/ssd_chunk_scan_cpu.cpp",
           "load_rows<T>(p.B, g.B_off(b, t0, h / g.hpg), p.B_sl, len, g.N, bs.data());",
           "load_rows<T>(p.B, g.B_off(b, t0, h % g.G), p.B_sl, len, g.N, bs.data());",
           ("tests/ssd/test_ssd_chunk_scan.py", "-k", "cpu and not bad_inputs")),
    missing_barrier("ssd-cuda-fwd-missing-barrier", "csrc/ssd/ssd_chunk_scan_fwd_cuda.cu", "",
                    "    __syncthreads();  // before the next step overwrites Bs / Xs (and before the epilogue)\n",
                    ("tests/ssd/test_cuda_emulation_ssd.py", "-k", "test_ssd_emulated and not slow")),
    missing_barrier("ssd-cuda-chain-cumsum-missing-barrier", "csrc/ssd/ssd_chunk_scan_fwd_cuda.cu",
                    "                            : 0.f;  // padding: dt' = 0\n  }\n", "  __syncthreads();\n",
                    ("tests/ssd/test_cuda_emulation_ssd.py", "-k", "chain")),
    Mutant("ssd-cuda-chain-carry-off-by-one", "off-by-one", "csrc/ssd/ssd_chunk_scan_fwd_cuda.cu",
           "expf(cs_s[Q - 1])", "expf(cs_s[Q - 2])", ("tests/ssd/test_cuda_emulation_ssd.py", "-k", "chain")),
    missing_barrier("ssd-cuda-bwd-missing-barrier", "csrc/ssd/ssd_chunk_scan_bwd_cuda.cu",
                    "NK_DEVICE void add_product(Acc& acc, const WarpTile<T, kWarpFN>& wt, float* out) {\n"
                    "  wt.store(warp_share(out), kLdo, 16 * kWarpFN);\n", "  __syncthreads();\n",
                    ("tests/ssd/test_cuda_emulation_ssd.py", "-k", "test_ssd_emulated and not slow")),
    # B3's products read element-wise from `out` (product_to_out) and its shared accumulators
    missing_barrier("ssd-cuda-bwd-product-out-missing-barrier", "csrc/ssd/ssd_chunk_scan_bwd_cuda.cu",
                    "    gemm_gg<kFastKA, kFastKB>(wt, K, As, Bs, fa, fb);\n  wt.store(warp_share(out), kLdo, 16 * kWarpFN);\n",
                    "  __syncthreads();\n", ("tests/ssd/test_cuda_emulation_ssd.py", "-k", "test_ssd_emulated and not slow")),
    Mutant("ssd-cuda-bwd-acc-not-zeroed", "uninitialised accumulator", "csrc/ssd/ssd_chunk_scan_bwd_cuda.cu",
           "  zero_tiles(accb, nnt);", "", ("tests/ssd/test_cuda_emulation_ssd.py", "-k", "test_ssd_emulated and not slow")),
    # packed sequences with a chunk plan: a chunk that starts a sequence must not carry the
    # previous sequence's state, and the backward's state gradient must restart per sequence
    Mutant("ssd-cuda-plan-first-chunk-carries", "missing branch", "csrc/ssd/ssd_chunk_scan_fwd_cuda.cu",
           "const bool first = ssd_chunk_first(p, c), last = ssd_chunk_last(p, c);",
           "const bool first = c == 0, last = ssd_chunk_last(p, c);",
           ("tests/ssd/test_cuda_emulation_ssd.py", "-k", "packed")),
    Mutant("ssd-cuda-bwd-plan-gradient-not-restarted", "missing branch", "csrc/ssd/ssd_chunk_scan_bwd_cuda.cu",
           "  if (ssd_chunk_last(p, t.c)) {  // the end state's gradient restarts",
           "  if (t.c == nc - 1) {  // the end state's gradient restarts",
           ("tests/ssd/test_cuda_emulation_ssd.py", "-k", "packed")),
    Mutant("ssd-cpu-plan-init-row", "wrong index", "csrc/ssd/ssd_chunk_scan_cpu.cpp",
           "h[k] = row >= 0 ? p.init[(row * g.H + hh) * PN + k] : 0.f;",
           "h[k] = row >= 0 ? p.init[(b * g.H + hh) * PN + k] : 0.f;",
           ("tests/ssd/test_ssd_chunk_scan.py", "-k", "packed and cpu")),
    Mutant("ssd-cuda-fwd-ring-slot", "wrong index", "csrc/ssd/ssd_chunk_scan_fwd_cuda.cu",
           "ring ? reinterpret_cast<float*>(static_cast<unsigned char*>(p.workspace) + chain_ring_offset(p)) + chain * kRingTile",
           "ring ? reinterpret_cast<float*>(static_cast<unsigned char*>(p.workspace) + chain_ring_offset(p)) + (chain / 2) * kRingTile",
           ("tests/ssd/test_cuda_emulation_ssd.py", "-k", "without_float32")),
    Mutant("ssd-cuda-bwd-chain-own-slot", "wrong index", "csrc/ssd/ssd_chunk_scan_bwd_cuda.cu",
           "if (off(k) >= 0) q.dstates[base - H * PN + off(k)] = g[k];  // dS_(c-1)",
           "if (off(k) >= 0) q.dstates[base + off(k)] = g[k];  // dS_(c-1)",
           ("tests/ssd/test_cuda_emulation_ssd.py", "-k", "test_ssd_emulated and not slow")),
    Mutant("ssd-cuda-bwd-chain-unpublished-restart", "missing branch", "csrc/ssd/ssd_chunk_scan_bwd_cuda.cu",
           "if (t.c > 0) {  // publish", "if (t.c > 0 && !ssd_chunk_first(p, t.c)) {  // publish",
           ("tests/ssd/test_cuda_emulation_ssd.py", "-k", "test_ssd_emulated and not slow")),
    Mutant("ssd-cuda-bwd-reduce-skipped-tail", "skipped tail", "csrc/ssd/ssd_chunk_scan_bwd_cuda.cu",
           "for (int64_t m = lane; m < rows * P; m += 32)", "for (int64_t m = lane; m < rows * P - 1; m += 32)",
           ("tests/ssd/test_cuda_emulation_ssd.py", "-k", "test_ssd_emulated and not slow")),
    Mutant("ssd-cuda-bwd-dy-dz-group-offset", "wrong index", "csrc/ssd/ssd_chunk_scan_bwd_cuda.cu",
           "const int64_t pp = (t % P8) * 8;", "const int64_t pp = (t % P8);",
           ("tests/ssd/test_cuda_emulation_ssd.py", "-k", "test_ssd_emulated and not slow")),
    Mutant("ssd-cuda-bwd-b0-dD-row-dropped", "skipped tail", "csrc/ssd/ssd_chunk_scan_bwd_cuda.cu",
           "for (int r = 0; r < rows; ++r) sum += red[k * kThreads + r * P8 + g];",
           "for (int r = 0; r + 1 < rows; ++r) sum += red[k * kThreads + r * P8 + g];",
           ("tests/ssd/test_cuda_emulation_ssd.py", "-k", "test_ssd_emulated and not slow")),
    Mutant("ssd-cuda-bwd-sum-bc-group-offset", "wrong index", "csrc/ssd/ssd_chunk_scan_bwd_cuda.cu",
           "const int64_t n = (e % N8) * 8,", "const int64_t n = (e % N8),",
           ("tests/ssd/test_cuda_emulation_ssd.py", "-k", "test_ssd_emulated and not slow")),
    Mutant("ssd-sm90-fragment-column-map", "wrong fragment layout", "csrc/common/wgmma_sm90.cuh",
           "8 * (v / 4) + 2 * (lane % 4) + (v & 1)", "8 * (v / 4) + 2 * (lane / 8) + (v & 1)",
           ("tests/ssd/test_ssd_sm90_layout.py",), rebuild=False),  # the test compiles the header itself
    Mutant("ssd-sm90-b3-halves-atom-order", "wrong shared layout", "csrc/ssd/ssd_chunk_output_sm90.cuh",
           "Shape<Int<kHalf>, Int<N>>{}, Step<_2, _1>{}));", "Shape<Int<kHalf>, Int<N>>{}));",
           ("tests/ssd/test_ssd_sm90_layout.py",), rebuild=False),
    Mutant("models-tree-attention-sees-siblings", "missing mask", "nemokernels/models/layers.py",
           "        anc[:, t] |= row", "        anc[:, t] |= True",
           ("tests/test_serving.py", "-k", "tree")),
    Mutant("ssd-cuda-state-update-swapped-stride", "swapped stride", "csrc/ssd/state_update_cuda.cu",
           "ld_any(p.x.ptr, p.x.dtype, b * p.x.s[0] + t * p.x.s[1] + h * p.x.s[2] + i * p.x.s[3])",
           "ld_any(p.x.ptr, p.x.dtype, b * p.x.s[0] + t * p.x.s[1] + h * p.x.s[3] + i * p.x.s[2])",
           ("tests/ssd/test_cuda_emulation_state.py",)),
    Mutant("ssd-cuda-state-update-skipped-tail", "skipped tail", "csrc/ssd/state_update_cuda.cu",
           "          if (rin[r] && n < N) {", "          if (rin[r] && n < N - 1) {",
           ("tests/ssd/test_cuda_emulation_state.py",)),
    Mutant("ssd-cuda-state-update-tree-wrong-parent", "wrong index", "csrc/ssd/state_update_cuda.cu",
           "load_state<ST>(snap0 + q * d_tok + r * d_row", "load_state<ST>(snap0 + (t - 1) * d_tok + r * d_row",
           ("tests/ssd/test_cuda_emulation_state.py", "-k", "tree")),
    Mutant("ssd-cpu-state-update-tree-skips-root-child", "missing branch", "csrc/ssd/state_update_cpu.cpp",
           "} else if (q != t - 1) {", "} else if (q != t - 1 && q != 0) {",
           ("tests/ssd/test_state_update.py", "-k", "tree and cpu")),
    Mutant("ssd-cuda-conv1d-update-tree-state-off-by-one", "off-by-one", "csrc/ssd/causal_conv1d_cuda.cu",
           "state[(p.state_len + cur) * p.st_sj]", "state[(p.state_len + cur - 1) * p.st_sj]",
           ("tests/ssd/test_cuda_emulation_conv1d.py", "-k", "tree")),
    Mutant("ssd-cuda-state-update-sr-same-bits", "wrong index", "csrc/ssd/state_update_cuda.cu",
           "rq = ssu_sr_group(seed, row, h * p.dim + pr[r], (e0 >> 2) + q, t);",
           "rq = ssu_sr_group(seed, row, h * p.dim + pr[r], (e0 >> 2), t);",
           ("tests/ssd/test_cuda_emulation_state.py", "-k", "stochastic")),
    Mutant("ssd-cuda-state-replay-drops-first-token", "off-by-one", "csrc/ssd/state_update_cuda.cu",
           "  if (replay && last >= 0) {", "  if (replay && last > 0) {",
           ("tests/ssd/test_cuda_emulation_state.py", "-k", "replay")),
    Mutant("ssd-sr-bf16-biased", "biased rounding", "csrc/ssd/numerics.cuh",
           "return ssu_float((u + (r & 0xffffu)) & 0xffff0000u);", "return ssu_float((u + (r & 0x7fffu)) & 0xffff0000u);",
           ("tests/ssd/test_state_update.py", "-k", "stochastic and cpu")),
    Mutant("ssd-cpu-conv1d-window-off-by-one", "off-by-one", "csrc/ssd/causal_conv1d_cpu.cpp",
           "win[k] = x_at<T>(p, b, c, t - (W - 1) + k, sid);", "win[k] = x_at<T>(p, b, c, t - W + k, sid);",
           ("tests/ssd/test_causal_conv1d.py", "-k", "cpu and not bad")),
    missing_barrier("ssd-cuda-conv1d-fwd-missing-barrier", "csrc/ssd/causal_conv1d_cuda.cu", "",
                    "    __syncthreads();  // every window start is read before any output overwrites its row\n",
                    ("tests/ssd/test_cuda_emulation_conv1d.py",)),
    Mutant("ssd-cuda-conv1d-dinit-dropped-column", "off-by-one", "csrc/ssd/causal_conv1d_cuda.cu",
           "if (t < 0 && q.dinit != nullptr && ch < p.dim)", "if (t < -1 && q.dinit != nullptr && ch < p.dim)",
           ("tests/ssd/test_cuda_emulation_conv1d.py",)),
    missing_barrier("ssd-cuda-rmsnorm-missing-barrier", "csrc/ssd/rmsnorm_gated_cuda.cu",
                    "  if ((threadIdx.x & 31) == 0) mine[threadIdx.x >> 5] = v;\n", "  __syncthreads();\n",
                    ("tests/ssd/test_cuda_emulation_rmsnorm.py",)),
    missing_barrier("ssd-cuda-rmsnorm-partials-missing-barrier", "csrc/ssd/rmsnorm_gated_cuda.cu",
                    "      for (int i = 0; i < V; ++i) buf[i * threads + tid] = h == 0 ? dw[k][i] : db[k][i];\n",
                    "      __syncthreads();\n", ("tests/ssd/test_cuda_emulation_rmsnorm.py", "-k", "emulated_two_sms")),
    Mutant("ssd-cuda-rmsnorm-row-stride", "wrong stride", "csrc/ssd/rmsnorm_gated_cuda.cu",
           "const int64_t step = int64_t(gridDim.y) * blockDim.y;",
           "const int64_t step = int64_t(gridDim.y) * blockDim.y + 1;",
           ("tests/ssd/test_cuda_emulation_rmsnorm.py", "-k", "emulated_two_sms")),
    Mutant("ssd-cpu-rmsnorm-group-size", "wrong group size", "csrc/ssd/rmsnorm_gated_cpu.cpp",
           "rmsnorm_rstd(sumsq.total(), static_cast<float>(G), p.eps)",
           "rmsnorm_rstd(sumsq.total(), static_cast<float>(p.dim), p.eps)",
           ("tests/ssd/test_rmsnorm_gated.py", "-k", "cpu and not bad")),
    # ---- moe ------------------------------------------------------------------------------
    Mutant("moe-cpu-router-group-cut", "off-by-one", "csrc/moe/router_cpu.cpp",
           "          if (gkeys[g] < cut)", "          if (gkeys[g] <= cut)",
           ("tests/moe/test_moe_router.py", "-k", "cpu and not bad")),
    Mutant("moe-cuda-plan-scan-skipped-tail", "skipped tail", "csrc/moe/permute_cuda.cu",
           "c1 = c0 + per < p.num_chunks ? c0 + per : p.num_chunks;",
           "c1 = c0 + per < p.num_chunks ? c0 + per : p.num_chunks - 1;",
           ("tests/moe/test_cuda_emulation_moe.py", "-k", "plan")),
    missing_barrier("moe-cuda-plan-scan-missing-barrier", "csrc/moe/permute_cuda.cu",
                    "  part[threadIdx.y][threadIdx.x] = sum;\n", "  __syncthreads();\n",
                    ("tests/moe/test_cuda_emulation_moe.py", "-k", "plan")),
    Mutant("moe-cuda-grouped-gemm-tile-edge", "off-by-one", "csrc/moe/grouped_gemm_cuda.cu",
           "  m_hi = hi;\n  return m0 < m_hi;", "  m_hi = hi - 1;\n  return m0 < m_hi;",
           ("tests/moe/test_cuda_emulation_grouped_gemm.py", "-k", "fwd_dgrad_wgrad")),
    Mutant("moe-cuda-arch-relu2-fused-drops-activation", "dropped epilogue", "csrc/moe/grouped_gemm_cuda.cu",
           "    case kRelu2Epi: grouped_gemm_relu2_sm90_run(p, p.a, p.w, p.out, ws, s); return;",
           "    case kRelu2Epi: arch_gemm(p, MODE, p.a, p.w, p.out, ws, s); return;",
           ("tests/moe/test_cuda_emulation_grouped_gemm.py", "-k", "arch_path_passes")),
    Mutant("moe-cutlass-swap-token-base", "wrong base", "csrc/moe/grouped_gemm_cutlass.cuh",
           "    arr.ptr_b[e] = reinterpret_cast<const typename AR::EB*>(a) + lo * K;",
           "    arr.ptr_b[e] = reinterpret_cast<const typename AR::EB*>(a) + lo * N;",
           ("tests/moe/test_grouped_gemm_setup.py",)),
    Mutant("moe-cutlass-swap-rule-ignored", "dropped condition", "csrc/moe/grouped_gemm_cuda.cu",
           " || p.R > kSwapRowsPerExpert * p.E) return false;", ") return false;",
           ("tests/moe/test_cuda_emulation_grouped_gemm.py", "-k", "swap_ab")),
    Mutant("moe-cuda-nvfp4w-shared-global-scale", "wrong index", "csrc/moe/grouped_gemm_nvfp4w_cuda.cu",
           "const float g = p.global_scale[e * p.global_stride];", "const float g = p.global_scale[0];",
           ("tests/moe/test_grouped_gemm_nvfp4w.py", "-k", "emulated_portable")),
    Mutant("moe-cpu-nvfp4w-scale-after-activation", "wrong order", "csrc/moe/grouped_gemm_nvfp4w_cpu.cpp",
           "        float v = g * acc;\n        if (p.act == GgAct::Relu2) v = relu2(v);",
           "        float v = acc;\n        if (p.act == GgAct::Relu2) v = relu2(v);\n        v *= g;",
           ("tests/moe/test_grouped_gemm_nvfp4w.py", "-k", "matches_float64 and cpu")),
    Mutant("moe-fp8-encode-drops-sign", "dropped sign", "csrc/moe/numerics.cuh",
           "  const uint8_t sign = (float_bits(q) >> 31) != 0u ? 0x80 : 0x00;",
           "  const uint8_t sign = 0x00;",
           ("tests/moe/test_grouped_gemm_fp8.py", "-k", "quantize_rows_matches_torch and cpu")),
    Mutant("moe-cuda-fp8-quantize-vector-halves", "wrong index", "csrc/moe/grouped_gemm_fp8_cuda.cu",
           "codes.y |= static_cast<uint32_t>(fp8_encode(v[j + 4], s)) << (8 * j);",
           "codes.y |= static_cast<uint32_t>(fp8_encode(v[j], s)) << (8 * j);",
           ("tests/moe/test_grouped_gemm_fp8.py", "-k", "emulated_quantize")),
    Mutant("moe-cuda-fp8-row-scale-of-first-row", "wrong index", "csrc/moe/grouped_gemm_fp8_cuda.cu",
           "float v = p.block > 0 ? acc[i] : (acc[i] * p.a_scale[r0 + i]) * ws;",
           "float v = p.block > 0 ? acc[i] : (acc[i] * p.a_scale[r0]) * ws;",
           ("tests/moe/test_grouped_gemm_fp8.py", "-k", "emulated_portable_gemm")),
    Mutant("moe-cutlass-fp8-group-scale-stride", "wrong index", "csrc/moe/grouped_gemm_cutlass.cuh",
           "if (sc.group != nullptr) arr.ptr_group_scale[e] = sc.group + e * sc.group_stride;",
           "if (sc.group != nullptr) arr.ptr_group_scale[e] = sc.group;",
           ("tests/moe/test_grouped_gemm_setup.py",)),
    Mutant("moe-fp8-transposed-start-unaligned", "wrong offset", "csrc/moe/segments.cuh",
           "NK_HD int64_t start16(int64_t lo, int64_t e) { return (lo + 15) / 16 * 16 + 16 * e; }",
           "NK_HD int64_t start16(int64_t lo, int64_t e) { return lo + 16 * e; }",
           ("tests/moe/test_grouped_gemm_setup.py",)),
    Mutant("moe-cuda-fp8-transpose-drops-segment-shift", "wrong offset", "csrc/moe/grouped_gemm_fp8_cuda.cu",
           "p.qT[c * p.W + r + shift[rr]] = tile[cc][rr];", "p.qT[c * p.W + r + (shift[rr] & ~15)] = tile[cc][rr];",
           ("tests/moe/test_grouped_gemm_fp8.py", "-k", "emulated_quantize_t")),
    Mutant("moe-relu2-drops-nan", "dropped NaN", "csrc/moe/numerics.cuh",
           "  return (v > T(0) || v != v) ? v * v : T(0);", "  return v > T(0) ? v * v : T(0);",
           ("tests/moe/test_grouped_gemm.py", "-k", "relu2_keeps_nan and cpu")),
    Mutant("moe-relu2-grad-drops-nan", "dropped NaN", "csrc/moe/numerics.cuh",
           "  return (pre > T(0) || pre != pre) ? dout * T(2) * pre : T(0);",
           "  return pre > T(0) ? dout * T(2) * pre : T(0);",
           ("tests/moe/test_grouped_gemm.py", "-k", "relu2_keeps_nan and cpu")),
    Mutant("moe-cpu-fp8-block-weight-scale-row", "wrong index", "csrc/moe/grouped_gemm_fp8_cpu.cpp",
           "p.w_scale[(e * NB + n / p.block) * KB + kb]", "p.w_scale[(e * NB) * KB + kb]",
           ("tests/moe/test_grouped_gemm_fp8.py", "-k", "block_scaled_gemm_matches_float64 and cpu")),
    Mutant("moe-cuda-fp8-block-row-scale-first-block", "wrong index", "csrc/moe/grouped_gemm_fp8_cuda.cu",
           "fmaf(part[i], p.a_scale[(r0 + i) * KB + kb] *", "fmaf(part[i], p.a_scale[(r0 + i) * KB] *",
           ("tests/moe/test_grouped_gemm_fp8.py", "-k", "emulated_portable_block_scaled")),
    Mutant("moe-cpu-fp8-e4m3-out-unscaled", "dropped scale", "csrc/moe/grouped_gemm_fp8_cpu.cpp",
           "out[r * N + n] = fp8_encode(v, *p.out_scale);", "out[r * N + n] = fp8_encode(v, 1.0f);",
           ("tests/moe/test_grouped_gemm_fp8.py", "-k", "e4m3_output_at_a_static_scale and cpu")),
    Mutant("moe-cuda-arch-shared-operand-drops-relu", "dropped factor", "csrc/moe/grouped_gemm_cuda.cu",
           "static_cast<const T*>(p.dout), static_cast<const T*>(p.pre_in), static_cast<T*>(g), RN);",
           "static_cast<const T*>(p.dout), static_cast<const T*>(p.dout), static_cast<T*>(g), RN);",
           ("tests/moe/test_cuda_emulation_grouped_gemm.py", "-k", "shared_backward_operand")),
    Mutant("moe-cuda-arch-relu2-pre-outputs-swapped", "swapped outputs", "csrc/moe/grouped_gemm_cuda.cu",
           "grouped_gemm_relu2_pre_sm90_run(p, p.a, p.w, p.out, p.pre_out, ws, s);",
           "grouped_gemm_relu2_pre_sm90_run(p, p.a, p.w, p.pre_out, p.out, ws, s);",
           ("tests/moe/test_cuda_emulation_grouped_gemm.py", "-k", "arch_path_passes")),
    # ---- nvfp4 ----------------------------------------------------------------------------
    Mutant("nvfp4-cuda-dequantize-dropped-scale", "dropped scale", "csrc/nvfp4/quantize_cuda.cu",
           "out[4 * h + 2 * q] = from_f<T>((v0 * sb) * g);",
           "out[4 * h + 2 * q] = from_f<T>(v0 * g);",
           ("tests/nvfp4/test_cuda_emulation_nvfp4.py", "-k", "dequantize")),
    # the -0 mask of the packed codes (CUDA), and the encoders' binade step (shared with the CPU)
    *(Mutant(name, kind, f"csrc/nvfp4/{f}", orig, mut, test) for name, kind, f, orig, mut, test in (
        ("nvfp4-cuda-quantize-negative-zero-code", "dropped mask", "quantize_cuda.cu",
         "  return w & (nz | 0x77777777u);", "  return w;",
         ("tests/nvfp4/test_cuda_emulation_nvfp4.py", "-k", "quantize_bit_identical")),
        ("nvfp4-encoder-wrong-binade-step", "off-by-one", "numerics.cuh",
         "  n.M = pe * 4194305.0f;", "  n.M = pe * 8388609.0f;",
         ("tests/nvfp4/test_nvfp4_quantize.py", "-k", "cpu and (matches_reference or ties)")))),
    Mutant("nvfp4-sm90-decoder-sign-bit", "wrong shift", "csrc/nvfp4/gemm_decode_mma_sm90.cuh",
           "((x << 12) & 0x8000u) | ((x << 24) & 0x80000000u);", "((x << 12) & 0x8000u) | ((x << 20) & 0x80000000u);",
           ("tests/nvfp4/test_nvfp4_sm90_check.py", "-k", "decoder")),
    Mutant("nvfp4-sm90-bf16-decoder-low-bytes", "wrong constant", "csrc/nvfp4/gemm_decode_mma_sm90.cuh",
           "kE2M1Bf16LoHi = 0xC0804000u;", "kE2M1Bf16LoHi = 0xC0800000u;",
           ("tests/nvfp4/test_nvfp4_sm90_check.py", "-k", "decoder")),
    Mutant("nvfp4-sm90-decode-row-wrong-word", "wrong index", "csrc/nvfp4/gemm_decode_mma_sm90.cuh",
           "mine[32 * nvfp4::byte_perm(w[2 * kb + 1], 0u, sel)]", "mine[32 * nvfp4::byte_perm(w[2 * kb], 0u, sel)]",
           ("tests/nvfp4/test_nvfp4_sm90_check.py", "-k", "decoder")),
    Mutant("nvfp4-sm90-decode-mma-shape-rule-ignored", "dropped condition", "csrc/nvfp4/gemm_cuda.cu",
           "v[0] == '1' && nvfp4_gemm_decode_mma_sm90_takes(p.M, p.N, p.K);", "v[0] == '1';",
           ("tests/nvfp4/test_cuda_emulation_nvfp4_gemm.py", "-k", "decode_mma")),
    Mutant("nvfp4-cuda-gemm-dropped-a-scale", "dropped scale", "csrc/nvfp4/gemm_cuda.cu",
           "ha[i][h][j] = hmul2_u32(ha[i][h][j], a_scale[i][h]);", "ha[i][h][j] = ha[i][h][j];",
           ("tests/nvfp4/test_cuda_emulation_nvfp4_gemm.py", "-k", "matches_reference")),
    Mutant("nvfp4-cuda-gemm-skipped-k-tail", "skipped tail", "csrc/nvfp4/gemm_cuda.cu",
           "  const int total_kt = static_cast<int>((p.K + kBK - 1) / kBK);\n  const int kt0 =",
           "  const int total_kt = static_cast<int>(p.K / kBK);\n  const int kt0 =",
           ("tests/nvfp4/test_cuda_emulation_nvfp4_gemm.py", "-k", "matches_reference")),
    Mutant("nvfp4-cuda-sm90-global-scale-twice", "scale applied twice", "csrc/nvfp4/gemm_cuda.cu",
           "    q.global_scale = nullptr;", "    q.global_scale = is_a ? p.a_global : p.b_global;",
           ("tests/nvfp4/test_cuda_emulation_nvfp4_gemm.py", "-k", "sm90_path")),
    Mutant("nvfp4-cpu-quantize-dropped-block-scale", "dropped scale", "csrc/nvfp4/quantize_cpu.cpp",
           "              const float y = v[i][j] * inv;", "              const float y = v[i][j];",
           ("tests/nvfp4/test_nvfp4_quantize.py", "-k", "cpu and matches_reference")),
    # ---- spec (verification) ----------------------------------------------------------------
    Mutant("spec-cpu-argmax-chunk-edge", "off-by-one", "csrc/speculative/verify_cpu.cpp",
           "hi = std::min(a.vocab, lo + a.chunk);", "hi = std::min(a.vocab, lo + a.chunk - 1);",
           ("tests/speculative/test_speculative_verify.py", "-k", "cpu and greedy and not bad")),
    missing_barrier("spec-cuda-block-sum-missing-barrier", "csrc/speculative/verify_cuda.cu",
                    "    if (t < s) red[t] += red[t + s];\n", "    __syncthreads();\n",
                    ("tests/speculative/test_cuda_emulation_speculative.py",)),
]


# Issue-18 rewrites (screens, bounded top-k, router key reduction), each caught by an emulation
# test: (name, kind, file, find, replace, test file, -k selection).
_SPEC_EMU, _MOE_EMU = "tests/speculative/test_cuda_emulation_speculative.py", "tests/moe/test_cuda_emulation_moe.py"
_SPEC_CU = "csrc/speculative/verify_cuda.cu"
MUTANTS += [Mutant(name, kind, path, find, repl, (tests, "-k", sel)) for name, kind, path, find, repl, tests, sel in (
    ("spec-cuda-argmax-screen-misses-nan", "weakened screen", _SPEC_CU, "      if (sum == sum) {",
     "      if (true) {", _SPEC_EMU, "greedy_long_chunks"),
    ("spec-race-screen-margin", "weakened screen", "csrc/speculative/numerics.cuh",
     "return !(1.0f - u > (k * w) * 1.0001f);", "return !(1.0f - u > (k * w) * 0.01f);", _SPEC_EMU,
     "rejection_sample_long_chunks"),
    ("spec-cuda-sampling-topk-drops-ties", "dropped ties", _SPEC_CU, "  while (nk < c && s_v[nk] == thr) ++nk;",
     "  (void)c;", _SPEC_EMU, "ties_and_overflow"),
    ("moe-cuda-router-key-max-low-word", "wrong reduction", "csrc/moe/router_cuda.cu",
     "hi == mhi ? static_cast<unsigned>(v) : 0u", "static_cast<unsigned>(v)", _MOE_EMU, "router"),
)]


def tracked_files(root: Path):
    out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    return [f for f in out.decode().split("\0") if f]


def copy_tree(root: Path, dest: Path) -> None:
    for rel in tracked_files(root):
        src = root / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    # The checkout's built extension serves the CUDA-kernel mutants (their tests compile the
    # kernels from the copy's sources); CPU-kernel mutants rebuild _C in the copy.
    for so in (root / "nemokernels").glob("_C*.so"):
        shutil.copy2(so, dest / "nemokernels" / so.name)


def build_cpu(dest: Path, log) -> float:
    t0 = time.time()
    env = dict(os.environ, NEMOKERNELS_BUILD_CUDA="0")
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=dest, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        log((r.stdout + r.stderr)[-4000:])
        raise RuntimeError("CPU build failed in the mutation copy")
    return time.time() - t0


def run_tests(dest: Path, tests) -> tuple:
    """(pytest exit code, summary line)."""
    env = dict(os.environ, PYTHONPATH=str(dest))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    r = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True)
    lines = [ln for ln in (r.stdout + r.stderr).strip().splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if re.search(r"\d+ (passed|failed|error|skipped|deselected)", ln)),
                   lines[-1] if lines else "")
    return r.returncode, summary.strip("= ")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", dest="select", action="append", default=[], help="only mutants whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--keep", action="store_true", help="keep the working copy (printed)")
    args = ap.parse_args()
    mutants = [m for m in MUTANTS if not args.select or any(s in m.name for s in args.select)]
    if args.list:
        for m in mutants:
            print(f"{m.name:42s} {m.kind:18s} {m.path}")
        return 0
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    dest = Path(tempfile.mkdtemp(prefix="nk-mutation-"))
    results = []
    try:
        copy_tree(ROOT, dest)
        built = False
        # CUDA-kernel mutants first: they use the checkout's _C, so no build until a CPU one.
        for m in sorted(mutants, key=lambda m: m.cpu_build):
            t0 = time.time()
            f = dest / m.path
            original = f.read_text()
            count = original.count(m.find)
            if count != 1:
                results.append((m, "STALE", f"the mutant's text occurs {count} times in {m.path}", 0.0))
                log(f"[{m.name}] STALE: its text occurs {count} times in {m.path}")
                continue
            try:
                f.write_text(original.replace(m.find, m.replace))
                if m.cpu_build:
                    secs = build_cpu(dest, log)
                    built = True
                    log(f"[{m.name}] built in {secs:.0f} s")
                rc, summary = run_tests(dest, m.tests)
            finally:
                f.write_text(original)
            status = {1: "caught", 0: "SURVIVED"}.get(rc, f"ERROR (pytest exit {rc})")
            if rc == 0 and " passed" not in summary:
                status = "NOT RUN"  # everything skipped or deselected: nothing tested the mutant
            results.append((m, status, summary, time.time() - t0))
            log(f"[{m.name}] {status}: {summary} ({time.time() - t0:.0f} s)")
        if built:  # leave no mutated _C behind in the copy (matters only with --keep)
            build_cpu(dest, log)
    finally:
        if args.keep:
            log(f"working copy kept: {dest}")
        else:
            shutil.rmtree(dest, ignore_errors=True)
    log("\nmutant                                     kind               result     tests")
    for m, status, summary, secs in results:
        log(f"{m.name:42s} {m.kind:18s} {status:10s} {summary} ({secs:.0f} s)")
    bad = [m.name for m, status, *_ in results if status != "caught"]
    log(f"\n{len(results) - len(bad)} of {len(results)} mutants caught" + (f"; not caught: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
