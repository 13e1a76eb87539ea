#!/usr/bin/env bash
# Runs the rmsnorm_gated CUDA kernels under a host emulation (no GPU needed; see the .cpp).
# The kernel launches `k<<<grid, block, 0, stream>>>(args)` are rewritten to emu_launch calls.
set -eu
cd "$(dirname "$0")/.."
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
TMP=$(mktemp -d)
sed -E 's/^( *)(case [0-9]: )?([A-Za-z_][A-Za-z_0-9<>:, ]*)<<<(.+), 0, stream>>>\((.*)\);/\1\2emu_launch(\3, \4, \5);/' \
    csrc/ssd/rmsnorm_gated_cuda.cu >"$TMP/kern.inc"
g++ -std=c++20 -O1 -I"$CUDA_HOME/include" -Icsrc -I"$TMP" scripts/emulate_rmsnorm_gated_cuda.cpp -o "$TMP/emu" -lpthread
"$TMP/emu"
