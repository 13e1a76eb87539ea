#!/usr/bin/env bash
# Checks a built wheel as a user gets it: installed into a fresh venv with another torch (a CPU
# wheel from local disk, default the 2.13 one in /opt/wheels) and no nvcc on PATH, it imports,
# `nemokernels info` reports the build, and the CPU tests pass against the installed package
# (python -P: the checkout's nemokernels/ is not on the path).
# Usage: scripts/check_wheel.sh WHEEL [TORCH_WHEEL]
set -euo pipefail
cd "$(dirname "$0")/.."
wheel=$(realpath "$1")
torch_whl=${2:-$(ls "${PIP_FIND_LINKS:-/opt/wheels}"/torch-2.1[1-3]*+cpu-cp3*-*linux*_x86_64.whl 2>/dev/null | head -n 1 || true)}
if [ -z "$torch_whl" ]; then
  echo "check_wheel: no torch 2.11-2.13 CPU wheel on local disk; pass one as the second argument"
  exit 1
fi
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q "$torch_whl" numpy pytest pytest-xdist hypothesis safetensors
"$venv/bin/python" -m pip install -q --no-deps "$wheel"
# No CUDA toolkit: the wheel must not need one (system directories only, CUDA_HOME unset).
clean_path=/usr/bin:/bin
unset CUDA_HOME CUDA_PATH
if PATH="$clean_path" command -v nvcc > /dev/null; then echo "check_wheel: nvcc is on $clean_path"; exit 1; fi
cd tests
PATH="$venv/bin:$clean_path" "$venv/bin/python" -P - <<'EOF'
import nemokernels, nemokernels._C as C, torch
assert "site-packages" in nemokernels.__file__, nemokernels.__file__
print(f"check_wheel: nemokernels {C.__version__} from {nemokernels.__file__} under torch {torch.__version__}, "
      f"built with torch {C.built_with_torch}, CUDA archs {C.cuda_archs or 'none'}")
EOF
PATH="$venv/bin:$clean_path" "$venv/bin/nemokernels" info
PATH="$venv/bin:$clean_path" "$venv/bin/python" -P -m pytest . -q -n 2 -p no:cacheprovider
