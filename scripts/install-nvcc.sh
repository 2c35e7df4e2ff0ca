#!/usr/bin/env bash
# Installs nvcc 13.0 (no root, from the Python package index) into <repo>/.cuda, where the
# fla-kernels build script finds it. See ../shared/CUDA_BUILD.md for why these pins.
# Usage: scripts/install-nvcc.sh [DIR]   (DIR defaults to <repo>/.cuda)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
dir="${1:-$repo/.cuda}"
python3 -m pip install --no-deps --quiet --target "$dir" \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
nvcc="$dir/nvidia/cu13/bin/nvcc"
"$nvcc" --version | tail -n 2
echo "nvcc installed at $nvcc; rebuild (cargo build) to compile the kernels"
