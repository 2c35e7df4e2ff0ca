#!/usr/bin/env bash
# Builds the GPU tests and the `fla` binary here and runs them on a GPU machine that has no
# Rust: `scripts/gpu-run.sh prepare` (here: build, copy into .device/, which git ignores), then
# on the GPU machine, from the repository root, `scripts/gpu-run.sh run [OUTDIR]`: the CUDA
# tests (recurrent step, chunk forward and backward, layers, GEMV, cuBLAS GEMM), `fla verify --device cuda` on the
# kernel fixtures, a compute-sanitizer pass, `fla bench ops --device cuda`, profiled GEMV and decode launches.
# `scripts/gpu-run.sh side [OUTDIR] [--seconds S] [--only a,b]` (on the GPU machine): our
# `fla bench ops --device cuda` next to FLA 0.6.0 (Python, Triton) on the same shapes, through
# scripts/fla_side_by_side.py; `prepare` downloads FLA's pure-Python wheels (and einops) into
# .device/wheels, `side` unpacks them into .device/pylib the first time.
# `scripts/gpu-run.sh hf [--prompt-tokens N]` (on the GPU machine): `fla bench model --device cuda`
# next to HF transformers with FLA (scripts/hf_model_bench.py) on the same model shape.
set -uo pipefail
cd "$(dirname "$0")/.."
# FLA's wheels unpacked into .device/pylib (once).
pylib() {
  if [ ! -d .device/pylib/fla ]; then
    ls .device/wheels/*.whl > /dev/null 2>&1 || { echo "no wheels in .device/wheels: run $0 prepare" >&2; exit 1; }
    python3 -m pip install --no-deps --no-index --target .device/pylib .device/wheels/*.whl \
      || for w in .device/wheels/*.whl; do python3 -m zipfile -e "$w" .device/pylib/ || exit 1; done
  fi
}
case "${1:-}" in
prepare)
  set -e
  [ -x .cuda/nvidia/cu13/bin/nvcc ] || [ -n "${FLA_NVCC:-}" ] || scripts/install-nvcc.sh
  mkdir -p .device
  bin() { cargo test --release "$@" --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -n 1; }
  cp "$(bin -p fla-ops --test cuda)" .device/cuda-tests
  cp "$(bin -p fla-ops --test cuda_chunk)" .device/cuda-chunk-tests
  cp "$(bin -p fla-ops --test cuda_chunk_bwd)" .device/cuda-chunk-bwd-tests
  cp "$(bin -p fla-nn --test cuda_nn)" .device/cuda-nn-tests
  cp "$(bin -p fla-nn --test cuda_matmul)" .device/cuda-matmul-tests
  cp "$(bin -p fla-models --test cuda_models)" .device/cuda-models-tests
  cp "$(bin -p fla-core --lib)" .device/fla-core-tests
  cp "$(bin -p fla-core --test cuda_gemm)" .device/cuda-gemm-tests
  cargo build --release -p fla-cli
  cp target/release/fla .device/fla
  strip .device/cuda-tests .device/cuda-chunk-tests .device/cuda-chunk-bwd-tests .device/cuda-nn-tests .device/cuda-matmul-tests .device/cuda-models-tests .device/fla-core-tests .device/cuda-gemm-tests .device/fla
  mkdir -p .device/fixtures && cp ../shared/fixtures/kernels/*.safetensors .device/fixtures/
  mkdir -p .device/models && cp -r ../shared/fixtures/models/*_tiny .device/models/
  # for `side`: FLA 0.6.0 and its one pure-Python dependency, installed there without network
  mkdir -p .device/wheels
  ls .device/wheels/fla_core-0.6.0-*.whl .device/wheels/flash_linear_attention-0.6.0-*.whl \
    .device/wheels/einops-*.whl > /dev/null 2>&1 \
    || python3 -m pip download --no-deps -d .device/wheels fla-core==0.6.0 flash-linear-attention==0.6.0 einops==0.8.2 \
    || echo "warning: could not download the FLA wheels into .device/wheels (only \`side\` needs them)"
  cp scripts/fla_side_by_side.py scripts/hf_model_bench.py .device/
  ls -la .device
  ;;
run)
  out="${2:-${OUT:-/tmp}}"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  .device/fla-core-tests cuda --nocapture 2>&1 | tee "$out/core-tests.log"
  .device/cuda-tests --nocapture --test-threads=1 2>&1 | tee "$out/tests.log"
  .device/cuda-chunk-tests --nocapture --test-threads=1 2>&1 | tee "$out/chunk-tests.log"
  .device/cuda-chunk-bwd-tests --nocapture --test-threads=1 2>&1 | tee "$out/chunk-bwd-tests.log"
  .device/cuda-nn-tests --nocapture --test-threads=1 2>&1 | tee "$out/nn-tests.log"
  .device/cuda-matmul-tests --nocapture --test-threads=1 2>&1 | tee "$out/matmul-tests.log"
  FLA_MODELS_DIR=.device/models .device/cuda-models-tests --nocapture --test-threads=1 2>&1 | tee "$out/models-tests.log"
  .device/cuda-gemm-tests --nocapture --test-threads=1 2>&1 | tee "$out/gemm-tests.log"
  .device/fla verify --device cuda .device/fixtures/*.safetensors 2>&1 | tee "$out/verify.log" | tail -n 1
  timeout 120 compute-sanitizer --tool memcheck --print-limit 10 .device/cuda-tests kda --test-threads=1 \
    > "$out/memcheck.log" 2>&1 && echo "memcheck: $(grep "ERROR SUMMARY" "$out/memcheck.log")" \
    || { echo "memcheck failed or timed out:"; tail -n 20 "$out/memcheck.log"; }
  timeout 120 compute-sanitizer --tool memcheck --print-limit 10 .device/cuda-matmul-tests ragged --test-threads=1 \
    > "$out/memcheck-gemv.log" 2>&1 && echo "memcheck gemv: $(grep "ERROR SUMMARY" "$out/memcheck-gemv.log")" \
    || { echo "memcheck gemv failed or timed out:"; tail -n 20 "$out/memcheck-gemv.log"; }
  .device/fla bench ops --device cuda --seconds 1 2>&1 | tee "$out/bench.txt"
  for v in ${FLA_VARIANTS:-}; do
    echo "== variant $v"
    FLA_RECURRENT_VARIANT=$v .device/cuda-tests --test-threads=1 > "$out/tests-$v.log" 2>&1 \
      && echo "tests: ok" || { echo "tests: FAILED"; grep -E "rel err|unavailable|failed" "$out/tests-$v.log" | head -n 5; }
    FLA_RECURRENT_VARIANT=$v .device/fla bench ops --device cuda --seconds 0.5 --only decode 2>&1 \
      | grep -E "^decode|error" | sed "s/^/$v /" | tee -a "$out/variants.txt" || true
  done
  # The GEMV kernel on the 4 MB out-projection and the 7 MB down projection (U = 16 path).
  for s in out_proj down_proj; do
    timeout 100 ncu --clock-control none -k regex:^gemv_ --launch-skip 5 --launch-count 1 --section SpeedOfLight \
      --section Occupancy --section LaunchStats .device/fla bench ops --device cuda --seconds 0.01 --only "gemv_$s" \
      > "$out/ncu-gemv-$s.txt" 2>&1 || echo "ncu failed or timed out"
    echo "== ncu gemv $s"
    grep -E "gemv_|Duration|DRAM Throughput|Memory Throughput|Registers Per|Achieved Occupancy|Grid Size" \
      "$out/ncu-gemv-$s.txt" || tail -n 20 "$out/ncu-gemv-$s.txt"
  done
  for v in "" ${FLA_NCU_VARIANTS:-}; do
    FLA_RECURRENT_VARIANT=$v timeout 100 ncu --clock-control none -k regex:recurrent_step --launch-skip 5 \
      --launch-count 1 --section SpeedOfLight --section Occupancy --section LaunchStats \
      .device/fla bench ops --device cuda --seconds 0.01 --only decode64 > "$out/ncu$v.txt" 2>&1 \
      || echo "ncu failed or timed out"
    echo "== ncu N=64 variant '$v'"
    grep -E "Duration|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy|Block Limit Reg" \
      "$out/ncu$v.txt" || tail -n 20 "$out/ncu$v.txt"
  done
  ;;
side)
  shift
  out="${OUT:-}"
  if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then out="$1"; shift; fi
  pylib
  script=scripts/fla_side_by_side.py
  [ -f "$script" ] || script=.device/fla_side_by_side.py
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  if [ -n "$out" ]; then
    mkdir -p "$out"
    python3 "$script" --fla-bin .device/fla --pylib .device/pylib --out "$out/side_by_side.jsonl" "$@" 2>&1 \
      | tee "$out/side_by_side.txt"
  else
    python3 "$script" --fla-bin .device/fla --pylib .device/pylib "$@"
  fi
  ;;
hf)
  # Our GPU model next to HF transformers (with FLA) on the same model shape and card.
  shift
  tokens=8192
  [ "${1:-}" = "--prompt-tokens" ] && tokens="$2"
  pylib
  script=scripts/hf_model_bench.py
  [ -f "$script" ] || script=.device/hf_model_bench.py
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
  .device/fla bench model --device cuda --seconds 2 --prompt-tokens "$tokens" --decode-tokens 64 --json
  python3 "$script" --pylib .device/pylib --prompt-tokens "$tokens"
  ;;
*)
  echo "usage: $0 prepare | run [OUTDIR] | side [OUTDIR] [--seconds S] [--only a,b] [--no-ours] | hf [--prompt-tokens N]" >&2
  exit 2
  ;;
esac
