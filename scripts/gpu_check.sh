#!/usr/bin/env bash
# One command for a GPU machine (torch preinstalled, no network): build for the visible GPU,
# run every test (gpu ones included), compute-sanitizer memcheck + racecheck over each op's GPU
# tests, and `nemokernels bench --quick`. Every step runs even when an earlier one failed; the
# exit status is non-zero if any failed. Output, in ${OUT:-gpu-check-out}/ (three files, since
# only a few come back from a lent machine):
#   gpu-check.log     every step's output, one after another
#   summary.txt       each step's status and time
#   bench-quick.json  the benchmark results
# The whole run is kept under 10 minutes: each step has its own limit, further capped by
# what is left of GPU_CHECK_BUDGET_S (default 570 s).
set -u
cd "$(dirname "$0")/.."

OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
LOG="$OUT/gpu-check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-570}))
FAILED=0

# step NAME LIMIT_S CMD...: run CMD under `timeout`, log it, record its status and time.
step() {
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS)) t0=$SECONDS rc status
    shift 2
    if [ "$left" -lt 10 ]; then
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

# (a) Wheels carried in .whl/ (e.g. nvidia-cutlass, which has no network to come from).
if compgen -G ".whl/*.whl" >/dev/null; then
    step "install .whl/*.whl" 60 python3 -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# Peers' source trees carried in .peers/ (ignored by git; there is no network there):
# mamba_ssm's Triton SSD runs from source (needs einops: carry its wheel in .whl/).
[ -d .peers/mamba/mamba_ssm ] && export NK_MAMBA_SSM_SRC="$PWD/.peers/mamba"

# (b) What we are running on.
step "environment" 30 bash -c 'nvidia-smi; python3 --version;
    python3 -c "import torch; print(\"torch\", torch.__version__, \"CUDA\", torch.version.cuda, torch.cuda.get_device_name())"'

# (c) Build in place for the visible GPU (setup.py's default arch) with every core.
step "build (CUDA, in place)" 300 env NEMOKERNELS_BUILD_CUDA=1 MAX_JOBS="$(nproc)" \
    python3 setup.py build_ext --inplace

# (d), (e) What got built, then the whole test suite.
step "nemokernels info" 60 python3 -m nemokernels info
step "tests (all)" 150 python3 -m pytest tests -q -rs -p no:cacheprovider

# (f) compute-sanitizer over the GPU tests of each test file. PyTorch's caching allocator is
# off so that an out-of-bounds access lands outside any allocation and memcheck sees it;
# NEMOKERNELS_SANITIZER=1 lets tests shrink their sizes (instrumented kernels are slow).
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
GPU_FILES=$(timeout 60 python3 -m pytest tests -q -m gpu --collect-only 2>>"$LOG" |
    grep -o '^tests/test_[A-Za-z0-9_]*\.py' | sort -u)
[ -n "$GPU_FILES" ] || step "find GPU tests" 10 bash -c 'echo "no gpu tests collected"; false'
# memcheck skips torch.compile (slow under the tool) and CUDA-graph capture (with the caching
# allocator off, any allocation inside a capture is an illegal cudaMalloc: an artifact of the
# setting, not of the ops). racecheck is far slower than memcheck: it runs only the GPU tests
# marked `racecheck` (those that cover every kernel with shared memory or block reductions).
for f in $GPU_FILES; do
    step "memcheck $(basename "$f" .py)" 90 env NEMOKERNELS_SANITIZER=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SANITIZER" --tool memcheck --error-exitcode 1 python3 -m pytest "$f" -q -m gpu -k "not compile and not graph"
    if grep -q "mark.racecheck" "$f"; then
        step "racecheck $(basename "$f" .py)" 90 env NEMOKERNELS_SANITIZER=1 PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            "$SANITIZER" --tool racecheck --error-exitcode 1 python3 -m pytest "$f" -q -m "gpu and racecheck"
    fi
done

# (g) Quick benchmark: peaks, ops and baselines, into the results JSON.
step "bench --quick" 120 python3 -m nemokernels bench --quick --out "$OUT/bench-quick.json"

echo "total ${SECONDS}s; $([ $FAILED -eq 0 ] && echo 'all steps passed' || echo 'SOME STEPS FAILED')" | tee -a "$SUMMARY"
exit $FAILED
