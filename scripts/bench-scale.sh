#!/usr/bin/env bash
# How GRPO step time and peak memory grow with num_generations, max_new_tokens and model size, on this machine:
# SmolLM2-135M-Instruct (GGUF, f32) and random models with SmolLM2-360M's and Qwen2.5-1.5B's shapes
# (builtin:random-360m, builtin:random-1.5b). One prompt per step, β = 0.04, the benchmark prompts and digit reward
# of scripts/bench-vs-trl.sh; medians of steps 2..N. A configuration the memory plan refuses is reported with the
# plan's message instead of figures.
#
# --lora: instead, full fine-tuning against LoRA r=16 and r=64 (alpha = 2r, all seven linear layers, the KL
# reference being the base with the adapters off) on each of the three models, 8 generations of 64 tokens; the
# 1.5B shape's full fine-tuning is refused by the memory plan on a 24 GB machine.
#
# --model NAME (with --lora): only that model (smollm2-135m, random-360m or random-1.5b).
# --ranks "R ..." (with --lora): only these ranks (0 = full fine-tuning; default "0 16 64").
# --bf16-base (with --lora): the adapters' base held in bf16 (lora.base_dtype = "bf16").
# --set KEY=VALUE: passed on to every run (e.g. rollout.weights=bf16).
#
#   bash scripts/bench-scale.sh [--steps N] [--grad-ckpt] [--set K=V] [--lora [--model NAME] [--ranks R] [--bf16-base]]
set -euo pipefail
cd "$(dirname "$0")/.."
steps=3 sets=() lora=0 only= ranks="0 16 64" base=
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --lora) lora=1; shift ;;
    --model) only=$2; shift 2 ;;
    --ranks) ranks=$2; shift 2 ;;
    --bf16-base) base='base_dtype = "bf16"'; shift ;;
    --set) sets+=(--set "$2"); shift 2 ;;
    --grad-ckpt) sets+=(--set algorithm.gradient_checkpointing=true); shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
out="$(realpath -m "${BENCH_DIR:-target/bench-scale}")"
mkdir -p "$out"
gguf="$(bash scripts/fetch-smollm2.sh)"
cargo build --release --quiet
python3 scripts/bench/make_inputs.py "$out" "$gguf" "$steps" 0.04
echo "| model | training | num_generations | max_new_tokens | s/step | gen s | update s | mean compl. len | peak RSS GiB | memory plan |"
echo "|---|---|---|---|---|---|---|---|---|---|"
run() { # model label, model id, generations, max tokens[, LoRA rank: 0 or absent = full fine-tuning]
  local rank="${5:-0}" recipe="$out/safe.toml" what=full
  if [ "$rank" != 0 ]; then
    recipe="$out/safe-lora-r$rank.toml" what="LoRA r$rank${base:+, bf16 base}"
    { cat "$out/safe.toml"; printf '\n[lora]\nrank = %s\nalpha = %s.0\ntargets = ["all-linear"]\n%s\n' "$rank" "$((2 * rank))" "$base"; } > "$recipe"
  fi
  local rd="$out/$1-g$3-t$4-r$rank"
  rm -rf "$rd" && mkdir -p "$rd"
  if RAYON_NUM_THREADS=2 /usr/bin/time -v -o "$rd/time" target/release/safe train --config "$recipe" \
    --set run.output_dir="$rd/runs" --set model.id="$2" --set rollout.num_generations="$3" \
    --set rollout.max_new_tokens="$4" --set algorithm.micro_batch_size=0 --set run.save_every=0 \
    "${sets[@]}" > "$rd/log" 2>&1; then
    find "$rd/runs" -name '*.safetensors' -delete
    python3 - "$rd" "$1" "$3" "$4" "$what" <<'PY'
import json, re, statistics, sys
rd, model, g, t, what = sys.argv[1:]
m = [json.loads(l) for l in open(f"{rd}/runs/safe-bench/metrics.jsonl")][1:]
med = lambda k: statistics.median(x[k] for x in m)
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{rd}/time").read()).group(1)) / 2**20
plan = re.search(r"memory: +(.*)", open(f"{rd}/log").read())
print(f"| {model} | {what} | {g} | {t} | {med('timing/step'):.2f} | {med('timing/rollout'):.2f} | {med('timing/update'):.2f} "
      f"| {statistics.mean(x['completions/mean_length'] for x in m):.1f} | {rss:.2f} | {plan.group(1) if plan else ''} |")
PY
  elif grep -q "terminated by signal" "$rd/time"; then
    # Killed (the kernel's OOM killer, most likely): what it reached, and what the plan said.
    local rss plan
    rss=$(awk '/Maximum resident set size/ {printf "%.2f", $6 / 1048576}' "$rd/time")
    plan=$(grep -o 'memory: .*' "$rd/log" | head -1 | cut -c9- | sed 's/^ *//')
    echo "| $1 | $what | $3 | $4 | killed ($(grep -o 'signal [0-9]*' "$rd/time")) | | | | $rss | $plan |"
  else
    echo "| $1 | $what | $3 | $4 | refused | | | | | $(grep -o 'error: .*' "$rd/log" | head -1 | cut -c8-) |"
  fi
}
if [ "$lora" = 1 ]; then
  for model in "smollm2-135m $gguf" "random-360m builtin:random-360m" "random-1.5b builtin:random-1.5b"; do
    set -- $model
    [ -n "$only" ] && [ "$only" != "$1" ] && continue
    for rank in $ranks; do run "$1" "$2" 8 64 "$rank"; done
  done
  exit 0
fi
run smollm2-135m "$gguf" 4 64
run smollm2-135m "$gguf" 8 64
run smollm2-135m "$gguf" 16 64
run smollm2-135m "$gguf" 8 256
run random-360m builtin:random-360m 8 64
run random-360m builtin:random-360m 16 64
run random-1.5b builtin:random-1.5b 8 64
