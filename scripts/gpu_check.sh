#!/usr/bin/env bash
# One prioritised command for a lent GPU machine (torch preinstalled, no network). Each step is
# time-limited and runs even when an earlier one failed; the whole run stays under
# GPU_CHECK_BUDGET_S (default 540 s). In order of value:
#   1. environment; load the carried _C (built here for 90a, docs/gpu-round.md), else build it
#   2. GPU tests with pytest-xdist (torch.compile tests apart, later)
#   3. benchmarks of the ops the open issues target against the peers (mamba_ssm's Triton
#      kernels from .peers/mamba): event, GPU (summed kernels) and wall time
#   4. torch.profiler per-kernel breakdown of the slowest ops, ours and the peer's
# Details: docs/testing.md, section `scripts/gpu_check.sh`.
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT" "$OUT/ab"
LOG="$OUT/gpu-check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-540}))
FAILED=0
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
JOBS=${GPU_CHECK_JOBS:-8}

# step NAME LIMIT_S CMD...: run CMD under `timeout`, log it, record its status and time.
step() {
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS)) t0=$SECONDS rc status
    shift 2
    if [ "$left" -lt 15 ]; then
        status="SKIPPED (out of time)"
        rc=1
    else
        [ "$limit" -gt "$left" ] && limit=$left
        echo "===== $name (limit ${limit}s): $*" >>"$LOG"
        timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
        rc=$?
        case $rc in
            0) status=ok ;;
            124 | 137) status="TIMED OUT after ${limit}s" ;;
            *) status="FAILED (exit $rc)" ;;
        esac
    fi
    [ "$rc" -eq 0 ] || FAILED=1
    printf '%-34s %-26s %4ds\n' "$name" "$status" $((SECONDS - t0)) | tee -a "$SUMMARY"
    echo "===== $name: $status" >>"$LOG"
    return 0
}

# Wheels carried in .whl/ (none are needed on the H200 image: einops and triton are there).
if compgen -G ".whl/*.whl" >/dev/null; then
    step "install .whl/*.whl" 60 python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
# mamba_ssm's source (carried in .peers/, ignored by git): its Triton kernels are the peers.
[ -d .peers/mamba/mamba_ssm ] && export NK_MAMBA_SSM_SRC="$PWD/.peers/mamba"

# 1. What we are running on; the carried _C, else a build for the visible GPU.
step "environment" 30 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv;
    python3 --version; python3 -c "import torch, triton; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda,
    torch.cuda.get_device_name(), \"triton\", triton.__version__)"'
if ! python3 -c "import nemokernels._C" >>"$LOG" 2>&1; then
    step "build (CUDA, in place)" 300 env NEMOKERNELS_BUILD_CUDA=1 MAX_JOBS="$(nproc)" \
        python3 setup.py build_ext --inplace
fi
step "nemokernels info" 60 python3 -m nemokernels info

# 2. Every GPU test but the torch.compile ones, 8 processes.
step "gpu tests (-n $JOBS, no compile)" 120 python3 -m pytest tests -q -rfEs -p no:cacheprovider \
    -m gpu -k "not compile" -n "$JOBS"

# 3. The targeted ops against the peers at the quick points (all SHAPES points with
#    --fast-timing took over 150 s on 2026-12-04: mamba_ssm autotunes at every new shape);
#    no torch.compile baselines (minutes of compiling), no eager SSD reference.
step "bench targets" 120 python3 -m nemokernels bench --quick \
    --op mamba_chunk_scan_combined --op selective_state_update --op rmsnorm_fn \
    --skip-baseline compile --skip-baseline torch_chunked --out "$OUT/bench-targets.json"

# 3b. Issue 17's A/B: the SSD with its sm_90a wgmma kernels (opt-in, never run before: the
#     forward's state chain tile and chunk output, the backward's B1 and B3 column and row
#     kernels) against bench-targets above (the portable kernels). Run their GPU tests first
#     (-k sm90 in step 2): if they fail, these numbers mean nothing.
step "bench mamba_chunk, sm90 chunk output" 90 env NEMOKERNELS_SSD_SM90=1 python3 -m nemokernels bench --quick \
    --op mamba_chunk_scan_combined --skip-baseline compile --skip-baseline torch_chunked \
    --out "$OUT/ab/bench-ssd-sm90.json"
step "profile mamba_chunk, sm90 kernels" 60 bash -c "NEMOKERNELS_SSD_SM90=1 python3 bench/profile_kernels.py \
    --case 'mamba_chunk_scan_combined.fwd_bwd:nano b1 L8192' --case 'mamba_chunk_scan_combined:super b1 L8192' \
    > $OUT/ab/profile-ssd-sm90.txt 2>&1"

# 4. Where the time goes, ours and the peer's, and the SSD at the SHAPES points by GPU time.
step "profile" 100 bash -c "python3 bench/profile_kernels.py --baseline mamba_ssm_triton --baseline torch_grouped_mm \
    --case 'mamba_chunk_scan_combined.fwd_bwd:nano b1 L8192' --case 'mamba_chunk_scan_combined:nano b1 L8192' \
    --case 'mamba_chunk_scan_combined:super b1 L8192' --case 'mamba_chunk_scan_combined.fwd_bwd:super b1 L8192' \
    --case 'mamba_chunk_scan_combined:nano b4 L8192' --case 'mamba_chunk_scan_combined.fwd_bwd:nano b4 L8192' \
    --case 'mamba_chunk_scan_combined:super b4 L32768' --case 'mamba_chunk_scan_combined.fwd_bwd:super b4 L32768' \
    --case 'selective_state_update:nano b64' --case 'rmsnorm_fn:nano rows8192' \
    --case 'nvfp4.quantize 1x16:' --case 'causal_conv1d_fn:' --case 'causal_conv1d_fn.fwd_bwd:' \
    --case 'grouped_gemm.up_relu2:super T4096 uniform' --case 'selective_state_update_multi:' \
    --case 'causal_conv1d_update:' --case 'rmsnorm_fn.fwd_bwd:' --case 'nvfp4.quantize 1x16 given amax:' \
    --case 'nvfp4.dequantize:' --case 'speculative.verify_greedy:b1' --case 'speculative.verify_greedy:b64' \
    --case 'speculative.rejection_sample:b64' --case 'speculative.sampling_probs:b64' \
    --case 'moe_router:' > $OUT/profile.txt 2>&1"

# 5. compute-sanitizer. The caching allocator is off so that an out-of-bounds access lands
#    outside any allocation; NEMOKERNELS_SANITIZER=1 lets tests shrink their sizes. torch.compile
#    and CUDA-graph tests are left out (with the caching allocator off, any allocation inside a
#    capture is an illegal cudaMalloc: an artifact of the setting, not of the ops).
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
for tool in memcheck racecheck; do
    step "$tool (racecheck-marked)" 100 env NEMOKERNELS_SANITIZER=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SANITIZER" --tool "$tool" --error-exitcode 1 python3 -m pytest tests -q -p no:cacheprovider \
        -m "gpu and racecheck" -k "not compile and not graph"
done

# 6. The torch.compile GPU tests.
step "gpu tests (compile)" 90 python3 -m pytest tests -q -rfEs -p no:cacheprovider -m gpu -k compile -n "$JOBS"

# 7. Nsight Compute: speed of light, occupancy and launch statistics per kernel.
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
if [ -n "$NCU" ]; then
    # Our kernels only (namespace nk::), the first 30 launches.
    step "ncu" 120 bash -c "'$NCU' --clock-control none --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section MemoryWorkloadAnalysis --launch-count 30 \
        --kernel-name-base demangled -k 'regex:nk::' \
        python3 bench/profile_kernels.py --plain --calls 1 \
        --case 'mamba_chunk_scan_combined.fwd_bwd:nano b1 L8192' --case 'selective_state_update:nano b64' \
        --case 'rmsnorm_fn:nano rows8192' --case 'nvfp4.quantize 1x16:' > $OUT/ncu.txt 2>&1"
fi

# 8. The other families, quick shapes.
step "bench rest (quick)" 120 python3 -m nemokernels bench --quick \
    --op causal_conv1d --op nvfp4 --op NVFP4Linear --op grouped_gemm --op moe --op speculative. \
    --skip-baseline compile --out "$OUT/bench-rest.json"

# 9. Issue 19's A/B: the grouped GEMM forward on 64-row pingpong tiles (opt-in) against the
#    bench-rest numbers above (128-row tiles; relu^2 fused in the epilogue when no gradient).
step "bench grouped_gemm, 64-row tiles" 90 env NEMOKERNELS_GROUPED_GEMM_TILE=64 python3 -m nemokernels bench \
    --quick --op grouped_gemm --skip-baseline compile --out "$OUT/ab/bench-gg-m64.json"

# 9b. Issue 19's A/B at decode sizes: the grouped GEMM and the LatentMoE layer at T64 and T512
#     with the forward's operands swapped (opt-in: weight rows x 32 tokens per tile) and without.
for swap in 0 1; do
    step "bench grouped_gemm and latent_moe T64/T512, swap_ab=$swap" 75 env NEMOKERNELS_GROUPED_GEMM_SWAP_AB=$swap \
        python3 -m nemokernels bench --fast-timing --op grouped_gemm --op latent_moe --shape "T64 " --shape "T512 " \
        --skip-baseline compile --skip-baseline torch_mm_loop --skip-baseline torch_loop \
        --out "$OUT/ab/bench-small-swap$swap.json"
done

# 9c. Issue 23: the FP8 grouped GEMM (e4m3 peak measured in the same run; against bf16,
#     torch._grouped_mm and torch._scaled_grouped_mm) and the LatentMoE layer with FP8 / NVFP4
#     experts against its bf16 experts, at T64 and T4096.
step "bench FP8 / NVFP4 experts" 90 python3 -m nemokernels bench --fast-timing \
    --op grouped_gemm.fp8 --op latent_moe.fp8_experts --op latent_moe.nvfp4_experts --shape "T64 " --shape "T4096 " \
    --skip-baseline compile --out "$OUT/ab/bench-lowp-experts.json"

# 10. Issue 19's A/B: nvfp4.gemm and NVFP4Linear on the portable kernel (the 2026-12-04 path)
#     against bench-rest above (on an H100/H200: bf16 decode + the CUTLASS wgmma GEMM).
step "bench nvfp4, portable kernel" 90 env NEMOKERNELS_NVFP4_GEMM_PORTABLE=1 python3 -m nemokernels bench \
    --quick --op nvfp4.gemm --op NVFP4Linear --skip-baseline compile --out "$OUT/ab/bench-nvfp4-portable.json"

# 10b. Issue 19's A/B: nvfp4.gemm with B decoded inside the mainloop (opt-in, K % 64 == 0 shapes)
#      against bench-rest above (bf16 decode + the CUTLASS wgmma GEMM) and step 10.
step "bench nvfp4, decode in the mainloop" 90 env NEMOKERNELS_NVFP4_GEMM_DECODE_MMA=1 python3 -m nemokernels bench \
    --quick --op nvfp4.gemm --op NVFP4Linear --skip-baseline compile --out "$OUT/ab/bench-nvfp4-decode-mma.json"

# The A/B JSONs travel as one file (at most 8 files come back from a lent machine).
if [ -d "$OUT/ab" ]; then tar -cf "$OUT/bench-ab.tar" -C "$OUT/ab" . && rm -rf "$OUT/ab"; fi

echo "total ${SECONDS}s; $([ $FAILED -eq 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED')" | tee -a "$SUMMARY"
exit $FAILED
