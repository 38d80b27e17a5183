#!/usr/bin/env bash
# A refactor keeps behaviour: run the same recipes with two `safe` binaries and compare every metric (timing aside)
# and the hash of every checkpoint tensor file (policy, optimizer, critic).
#
#   bash scripts/same-behaviour.sh OLD_BIN NEW_BIN [WORK_DIR]
#
# Recipes: configs/quickstart.toml (400 steps), configs/par-reward-model.toml (4 steps), and 6-step builtin:tiny
# runs of grpo (β > 0, μ = 2), grpo (bnpo, masked truncation), grpo_lambda, ppo (adaptive KL) and safe.
# Exit 0 when every metrics file and checkpoint is identical (metric key order aside), 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=$1; NEW=$2; WORK=${3:-$(mktemp -d)}
run_all() { # BIN OUT
BIN=$1; OUT=$2; rm -rf "$OUT"; mkdir -p "$OUT"
export RAYON_NUM_THREADS=2
for i in $(seq 0 4); do echo "{\"prompt\": \"What is $i + 1?\", \"answer\": \"$((i+1))\"}"; done > "$OUT/data.jsonl"
TINY='[run]
name = "t"
output_dir = "OUTDIR/runs"
max_steps = 6
save_every = 3
completions_every = 1
[model]
id = "builtin:tiny"
[data]
source = "OUTDIR/data.jsonl"
chat = false
[rollout]
prompts_per_step = 2
num_generations = 4
max_new_tokens = 6
[algorithm]
ALGO
[critic]
CRITIC
[optim]
lr = 3e-3
warmup_steps = 1
schedule = "constant"
[[reward]]
name = "correct"
rule = "exact_answer"
[[reward]]
name = "short"
rule = "length"
target = 3
weight = 0.1
'
mk() { # name algo critic
  local t="${TINY//OUTDIR/$OUT}"; t="${t//ALGO/$2}"; t="${t//CRITIC/$3}"; printf '%s' "$t" > "$OUT/$1.toml"; }
mk grpo 'beta = 0.04
num_iterations = 2
micro_batch_size = 4' ''
mk grpo_bnpo 'beta = 0.04
loss_type = "bnpo"
mask_truncated_completions = true
micro_batch_size = 8' ''
mk grpo_lambda 'kind = "grpo_lambda"
correctness_reward = "correct"
beta = 0.0' ''
mk ppo 'kind = "ppo"
ppo_epochs = 2
num_mini_batches = 2
kl_target = 0.01
beta = 0.04
micro_batch_size = 2' 'lr = 1e-3'
mk safe 'kind = "safe"
micro_batch_size = 2
[algorithm.safe]
phase_window = 4' 'lr = 1e-3'
# grpo_lambda needs a single reward
python3 - "$OUT/grpo_lambda.toml" <<'PY'
import sys; p=sys.argv[1]; t=open(p).read(); i=t.index('[[reward]]\nname = "short"'); open(p,'w').write(t[:i])
PY
sed -i 's/num_generations = 4/num_generations = 2/' "$OUT/safe.toml"
for r in grpo grpo_bnpo grpo_lambda ppo safe; do
  "$BIN" train --config "$OUT/$r.toml" --set run.name=$r --resume never > "$OUT/$r.log" 2>&1 || { echo "FAIL $r"; tail "$OUT/$r.log"; }
done
"$BIN" train --config configs/quickstart.toml --set run.output_dir="$OUT/runs" --resume never > "$OUT/quickstart.log" 2>&1
"$BIN" train --config configs/par-reward-model.toml --set run.output_dir="$OUT/runs" --set run.max_steps=4 --resume never > "$OUT/par.log" 2>&1 || echo "FAIL par"
for d in "$OUT"/runs/*/; do
  d=${d%/}; n=$(basename "$d")
  python3 -c '
import json,sys
for l in open(sys.argv[1]):
    v=json.loads(l); print(",".join(f"{k}={v[k]}" for k in v if not k.startswith("timing/") and k!="tokens_per_second"))
' "$d/metrics.jsonl" > "$OUT/$n.metrics"
  (cd "$d/checkpoints" && find . -name '*.safetensors' | sort | xargs sha256sum) > "$OUT/$n.ckpt"
done
}
run_all "$OLD" "$WORK/old"
run_all "$NEW" "$WORK/new"
status=0
for f in "$WORK"/old/*.metrics "$WORK"/old/*.ckpt; do
  n=$(basename "$f")
  if cmp -s "$f" "$WORK/new/$n"; then echo "same  $n"
  elif [[ $n == *.metrics ]] && diff <(tr ',' '\n' < "$f" | sort) <(tr ',' '\n' < "$WORK/new/$n" | sort) >/dev/null; then
    echo "same  $n (key order differs)"
  else echo "DIFF  $n"; status=1; fi
done
exit $status
