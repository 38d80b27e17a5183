#!/usr/bin/env bash
# The CUDA build, checked on a machine without a GPU (CI runs this after the tests):
#   1. installs CUDA 13.0's build toolchain from PyPI wheels and a libcuda stub (../shared/cuda; idempotent);
#   2. builds `--features cuda` (release) in a target directory outside the clone, reused when present
#      (SAFE_CUDA_TARGET, default ~/.cache/safe-cuda-target);
#   3. runs that build's CPU tests of the device choice and a short training run with the stub on
#      LD_LIBRARY_PATH: `model.device = "auto"` must fall back to the CPU, `"cuda"` must be exit 2 naming it.
# Usage: bash scripts/cuda-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${SAFE_SHARED:-$(cd .. && pwd)/shared}"
[ -f "$shared/cuda/install-cuda-toolkit.sh" ] || { echo "error: $shared/cuda/install-cuda-toolkit.sh is missing" >&2; exit 1; }
eval "$(bash "$shared/cuda/install-cuda-toolkit.sh")"
target="${SAFE_CUDA_TARGET:-$HOME/.cache/safe-cuda-target}"
export CARGO_TARGET_DIR="$target"
echo "== cargo build --release --features cuda (target $target)"
cargo build --release --features cuda
stubs="$(dirname "$CUDA_HOME")/stubs"
[ -f "$stubs/libcuda.so.1" ] || [ -f "$stubs/libcuda.so" ] || { echo "error: no libcuda stub in $stubs" >&2; exit 1; }
export LD_LIBRARY_PATH="$stubs:$LD_LIBRARY_PATH"
echo "== CPU tests of the CUDA build (stub driver)"
cargo test --release --features cuda --test devices
bin="$target/release/safe"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "== safe train on the CUDA build, model.device = \"auto\", no GPU"
"$bin" train --config configs/quickstart.toml --set run.max_steps=3 --set run.output_dir="$work" \
    --set run.name=auto --resume never 2>"$work/auto.err" | tail -3
cat "$work/auto.err"
grep -q 'device "auto": no usable CUDA device' "$work/auto.err" ||
    { echo "error: the CUDA build did not say it fell back to the CPU" >&2; exit 1; }
[ -f "$work/auto/checkpoints/step-3/model.safetensors" ] || { echo "error: no checkpoint after 3 steps" >&2; exit 1; }
echo "== model.device = \"cuda\" without a GPU is exit 2"
set +e
"$bin" train --config configs/quickstart.toml --set model.device=cuda --set run.output_dir="$work" \
    --set run.name=cuda --resume never >/dev/null 2>"$work/cuda.err"
rc=$?
set -e
cat "$work/cuda.err"
[ "$rc" = 2 ] || { echo "error: model.device = \"cuda\" without a GPU exited $rc, not 2" >&2; exit 1; }
grep -q 'opening cuda:0' "$work/cuda.err" || { echo "error: the message does not name cuda:0" >&2; exit 1; }
echo "cuda-check: ok"
