#!/usr/bin/env bash
# The CUDA build on a real GPU (issue 15), in two halves: a lent GPU machine is bare, offline, short-lived (minutes)
# and has no Rust toolchain, so the binaries are built here and carried there.
#
#   bash scripts/gpu-check.sh pack          here: builds `--features cuda` (scripts/cuda-check.sh's toolchain and
#                                           target directory), strips and xz-compresses `safe` and the `devices`
#                                           test binary into .gpu/ (git-ignored), and checks they fit the 64 MiB
#                                           a device call carries.
#   bash scripts/gpu-check.sh run           there, in the repository root, with .gpu carried: unpacks, finds CUDA's
#                                           runtime libraries in the machine's image (cuBLAS, cudart and cuRAND
#                                           from its Python wheels), then
#                                             0. the versions of Python and the packages a TRL side-by-side needs
#                                                (TRL needs datasets, pandas and pyarrow: pyarrow 26.0.1 and
#                                                pandas 3.1.1 for CPython 3.11 are 67 MB of wheels, more than a
#                                                call carries, so staging waits on what the machine has);
#                                             1. nvidia-smi and the device tests on the GPU (tests/devices.rs:
#                                                logits, the update's gradients in f32 and bf16, AdamW, each
#                                                against the CPU);
#                                             1b. per-token log-probs of the tiny model and a random one of
#                                                SmolLM2's shape (`safe logprobs`, f32 and bf16) against
#                                                transformers on the same GPU (python3 there has torch);
#                                             2. the quickstart on model.device = "cuda" for 20 steps: exit 0, a
#                                                checkpoint, finite metrics; and 6 steps straight against 3 resumed
#                                                to 6: the same metrics and checkpoint bytes (exact resume);
#                                             3. the speed and memory table: GRPO on builtin:random-360m and
#                                                builtin:random-1.5b (bf16, 8 completions × 64 tokens, 6 steps),
#                                                the 360M again decoding from bf16 copies (rollout.weights), with
#                                                the peak GPU memory nvidia-smi saw, medians of steps 2..N.
#                                           Logs, metrics and table.md go to $OUT (the device tool's), else
#                                           target/gpu-check.
#   bash scripts/gpu-check.sh run --cpu     the same flow on this machine's CPU with `target/release/safe` and the
#                                           tiny model, to check the script itself without a GPU (PYTHON: an
#                                           interpreter with torch and transformers, e.g. bench-vs-trl's venv;
#                                           PARITY_MODELS="tiny random-360m" for the larger parity check too).
#
# A device call, after `pack` (about 3-5 minutes there, most of it the 1.5B model's steps):
#   command: bash scripts/gpu-check.sh run    carry: [".gpu"]    timeout_s: 420
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-}"
shift || true

if [ "$mode" = pack ]; then
  shared="${SAFE_SHARED:-$(cd .. && pwd)/shared}"
  eval "$(bash "$shared/cuda/install-cuda-toolkit.sh")"
  target="${SAFE_CUDA_TARGET:-$HOME/.cache/safe-cuda-target}"
  export CARGO_TARGET_DIR="$target"
  cargo build --release --features cuda
  cargo test --release --features cuda --test devices --no-run # its errors, if any, in plain text
  tests=$(cargo test --release --features cuda --test devices --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "devices":
        print(m["executable"])' | tail -1)
  [ -n "$tests" ] || { echo "error: no devices test binary" >&2; exit 1; }
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  rm -rf .gpu && mkdir -p .gpu
  for pair in "safe:$target/release/safe" "devices:$tests"; do
    name=${pair%%:*} src=${pair#*:}
    strip -o ".gpu/$name" "$src"
    xz -T2 -6 -f ".gpu/$name"
  done
  ls -l .gpu
  total=$(du -cb .gpu/* | tail -1 | cut -f1)
  echo "pack: $((total / 1048576)) MiB in .gpu (limit 64 MiB with the working tree)"
  [ "$total" -lt $((56 * 1048576)) ] || { echo "error: .gpu is too large to carry" >&2; exit 1; }
  exit 0
fi

[ "$mode" = run ] || { echo "usage: bash scripts/gpu-check.sh pack | run [--cpu]" >&2; exit 2; }
cpu=0
[ "${1:-}" = --cpu ] && cpu=1
out="${OUT:-target/gpu-check}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"; [ -n "${smi_pid:-}" ] && kill "$smi_pid" 2>/dev/null || true' EXIT
fail=0
note() { echo "$*" | tee -a "$out/summary.txt"; }

if [ "$cpu" = 1 ]; then
  bin=target/release/safe device=cpu speed_models="builtin:tiny builtin:tiny+bf16" parity_models="${PARITY_MODELS:-tiny}" steps=3
  tests="$(ls -t target/release/deps/devices-* 2>/dev/null | grep -v '\.d$' | head -1 || true)"
  dtype=f32
else
  [ -f .gpu/safe.xz ] || { echo "error: .gpu/safe.xz is missing (run pack here, carry .gpu)" >&2; exit 1; }
  for f in .gpu/*.xz; do xz -dc "$f" > "$work/$(basename "$f" .xz)"; chmod +x "$work/$(basename "$f" .xz)"; done
  bin="$work/safe" tests="$work/devices" device=cuda speed_models="builtin:random-360m builtin:random-360m+bf16 builtin:random-1.5b" parity_models="tiny random-360m" steps=6
  dtype=bf16
  # CUDA's runtime libraries as the image's Python wheels hold them (the driver's libcuda comes with the machine).
  libs=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for root in site.getsitepackages() + [site.getusersitepackages()]:
    for name in ("libcublas.so.*", "libcublasLt.so.*", "libcudart.so.*", "libcurand.so.*"):
        for f in glob.glob(os.path.join(root, "nvidia", "**", name), recursive=True):
            dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  note "CUDA libraries from: $libs"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$out/summary.txt"
  ldd "$bin" | grep -E "cuda|cublas|curand|not found" | tee "$out/ldd.txt" || true
fi

python=${PYTHON:-python3}
note "== 0. the machine's Python packages (what a TRL side-by-side there would need staged beside it)"
# A record, not a check: no interpreter there must not stop the run.
"$python" - <<'PY' | tee -a "$out/summary.txt" || note "python: $python did not run"
import importlib.metadata as md, sys

def version(p):
    try:
        return md.version(p)
    except md.PackageNotFoundError:
        return "missing"

names = ("torch", "transformers", "accelerate", "peft", "trl", "datasets", "pandas", "pyarrow", "numpy", "safetensors")
print("python", sys.version.split()[0], *(f"{p} {version(p)}" for p in names))
PY

note "== 1. device tests ($tests)"
if [ -n "$tests" ] && "$tests" --test-threads 1 > "$out/devices.log" 2>&1; then
  note "devices: $(grep -E '^test result' "$out/devices.log")"
else
  note "devices: FAILED (see devices.log)"; tail -20 "$out/devices.log" || true; fail=1
fi

note "== 1b. log-probs against transformers on $device (torch on the same device)"
# The tiny model and a random one of SmolLM2's shape as HF checkpoints (one training step writes one), then the
# per-token log-probs of fixed sequences by `safe logprobs` and by transformers, in f32 and bf16.
"$python" - "$work/parity-in.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for r in range(4):
        prompt = [(r * 37 + j * 11) % 250 + 3 for j in range(5 + 3 * r)]
        completion = [(r * 53 + j * 29) % 250 + 3 for j in range(24 - 4 * r)]
        f.write(json.dumps({"prompt_ids": prompt, "completion_ids": completion}) + "\n")
PY
for shape in $parity_models; do
  if "$bin" train --config configs/quickstart.toml --set model.id="builtin:$shape" --set model.device="$device" \
    --set model.dtype=f32 --set run.max_steps=1 --set run.save_every=1 --set run.output_dir="$work/parity" \
    --set run.name="$shape" --set eval.every=0 --set rollout.prompts_per_step=1 --set rollout.num_generations=2 \
    --set rollout.max_new_tokens=8 --resume never >> "$out/parity.log" 2>&1; then
    ckpt="$work/parity/$shape/checkpoints/step-1"
    for precision in f32 bf16; do
      if "$bin" logprobs --model "$ckpt" --input "$work/parity-in.jsonl" --device "$device" --dtype "$precision" \
        --output "$work/parity-$shape-$precision.jsonl" >> "$out/parity.log" 2>&1 &&
        "$python" - "$ckpt" "$work/parity-$shape-$precision.jsonl" "$device" "$precision" "$shape" > "$work/parity.txt" 2>> "$out/parity.log" <<'PY'; then
import json, sys
import torch
from transformers import AutoModelForCausalLM
ckpt, path, device, dtype, shape = sys.argv[1:]
torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
try:
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch_dtype)
except TypeError:
    model = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch_dtype)
model = model.to(device).eval()
worst, n = 0.0, 0
for line in open(path):
    r = json.loads(line)
    p, c = r["prompt_ids"], r["completion_ids"]
    ids = torch.tensor([p + c], device=device)
    with torch.no_grad():
        logits = model(ids).logits[0, len(p) - 1 : -1].float()  # f32 log-softmax, as TRL takes it
    want = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c, device=device)[:, None])[:, 0].cpu()
    got = torch.tensor(r["logprobs"])
    worst, n = max(worst, (want - got).abs().max().item()), n + len(c)
# f32: summation order only; bf16: both sides round the weights and activations to bf16, in different orders.
tol = {"f32": 2e-3, "bf16": 0.15}[dtype]
print(f"parity {shape} {dtype}: max |Δ log-prob| {worst:.2e} over {n} tokens (tolerance {tol})")
sys.exit(0 if worst <= tol else 1)
PY
        note "$(cat "$work/parity.txt")"
      else
        note "parity $shape $precision: FAILED $(cat "$work/parity.txt" 2>/dev/null) (see parity.log)"; tail -5 "$out/parity.log"; fail=1
      fi
    done
  else
    note "parity $shape: FAILED to write the checkpoint (see parity.log)"; tail -5 "$out/parity.log"; fail=1
  fi
done

note "== 2. quickstart on $device"
if "$bin" train --config configs/quickstart.toml --set model.device="$device" --set run.max_steps=20 \
  --set run.save_every=20 --set run.output_dir="$work/runs" --resume never > "$out/quickstart.log" 2>&1 &&
  [ -f "$work/runs/quickstart/checkpoints/step-20/model.safetensors" ]; then
  cp "$work/runs/quickstart/metrics.jsonl" "$out/quickstart-metrics.jsonl"
  # metrics.jsonl writes a non-finite value as null.
  if python3 - "$out/quickstart-metrics.jsonl" > "$work/qs.txt" <<'PY'; then
import json, math, sys
m = [json.loads(l) for l in open(sys.argv[1])]
bad = [(r.get("step"), k) for r in m for k, v in r.items() if v is None or (isinstance(v, float) and not math.isfinite(v))]
last = m[-1] if m else {}
print(f"quickstart: {len(m)} metric records to step {last.get('step')}, last reward {last.get('reward')}, "
      f"loss {last.get('loss')}, grad norm {last.get('grad_norm')}; non-finite: {bad or 'none'}")
sys.exit(1 if bad or not m else 0)
PY
    note "$(cat "$work/qs.txt")"
  else
    note "$(cat "$work/qs.txt") FAILED"; fail=1
  fi
else
  note "quickstart: FAILED"; tail -20 "$out/quickstart.log"; fail=1
fi

note "== 2b. exact resume on $device (6 steps straight against 3, then resumed to 6)"
resume_run() { "$bin" train --config configs/quickstart.toml --set model.device="$device" --set run.save_every=3 \
  --set run.output_dir="$work/resume" --set eval.every=0 --set run.log_every=1 --set run.name="$1" --set run.max_steps="$2" --resume "$3" \
  >> "$out/resume.log" 2>&1; }
if resume_run straight 6 never && resume_run split 3 never && resume_run split 6 auto; then
  if python3 - "$work/resume" > "$work/resume.txt" <<'PY'; then
import hashlib, json, sys
root = sys.argv[1]
# Training's metrics by step, without wall-clock figures and the end-of-run evaluation (each half has its own).
keep = lambda k: not k.startswith(("timing/", "eval/")) and k != "tokens_per_second"
strip = lambda path: [{k: v for k, v in json.loads(l).items() if keep(k)} for l in open(path)]
by_step = lambda rows: {r["step"]: r for r in rows}
a, b = by_step(strip(f"{root}/straight/metrics.jsonl")), by_step(strip(f"{root}/split/metrics.jsonl"))
digest = lambda run, f: hashlib.sha256(open(f"{root}/{run}/checkpoints/step-6/{f}", "rb").read()).hexdigest()
files = [f for f in ("model.safetensors", "optimizer.safetensors") if digest("straight", f) != digest("split", f)]
first = next((k for k in sorted(a) if a[k] != b.get(k)), None)
same = not files and first is None and len(a) >= 6
print(f"resume: {'bit-exact' if same else 'DIFFERS'} ({len(a)} metric records; differing files: {files or 'none'}; "
      f"first differing step: {first})")
sys.exit(0 if same else 1)
PY
    note "$(cat "$work/resume.txt")"
  else
    note "$(cat "$work/resume.txt") FAILED"; fail=1
  fi
else
  note "resume: FAILED (see resume.log)"; tail -20 "$out/resume.log"; fail=1
fi

note "== 3. speed and memory ($dtype, 8 completions x 64 tokens, $steps steps)"
echo "| model | s/step | gen s | gen tok/s | update s | peak GPU MiB | memory plan |" > "$out/table.md"
echo "|---|---|---|---|---|---|---|" >> "$out/table.md"
for run in $speed_models; do
  # MODEL+bf16: decoding from bf16 copies of the f32 masters (rollout.weights = "bf16").
  model=${run%+bf16} weights=model name=${model#builtin:}
  [ "$model" != "$run" ] && { weights=bf16; name=$name-bf16-decode; }
  rm -f "$work/smi.csv"
  if [ "$cpu" = 0 ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$work/smi.csv" &
    smi_pid=$!
  fi
  if "$bin" train --config configs/quickstart.toml --set model.id="$model" --set model.device="$device" \
    --set model.dtype="$dtype" --set run.name="$name" --set run.max_steps="$steps" --set run.save_every=0 \
    --set run.output_dir="$work/runs" --set run.log_every=1 --set rollout.prompts_per_step=1 --set rollout.num_generations=8 \
    --set rollout.max_new_tokens=64 --set rollout.weights="$weights" --set algorithm.micro_batch_size=0 \
    --set eval.every=0 --resume never \
    > "$out/speed-$name.log" 2>&1; then
    [ -n "${smi_pid:-}" ] && { kill "$smi_pid" 2>/dev/null || true; wait "$smi_pid" 2>/dev/null || true; smi_pid=; }
    cp "$work/runs/$name/metrics.jsonl" "$out/speed-$name-metrics.jsonl"
    python3 - "$out/speed-$name-metrics.jsonl" "$name" "$work/smi.csv" "$out/speed-$name.log" <<'PY' >> "$out/table.md" || fail=1
import json, os, re, statistics, sys
path, name, smi, log = sys.argv[1:]
m = [json.loads(l) for l in open(path)][1:] or [json.loads(l) for l in open(path)]
med = lambda k: statistics.median(r[k] for r in m)
peak = max((int(x) for x in open(smi).read().split() if x.isdigit()), default=0) if os.path.exists(smi) else 0
plan = re.search(r"memory: +(.*)", open(log).read())
print(f"| {name} | {med('timing/step'):.2f} | {med('timing/rollout'):.2f} | {med('tokens_per_second'):.0f} "
      f"| {med('timing/update'):.2f} | {peak or 'n/a'} | {plan.group(1) if plan else ''} |")
PY
  else
    [ -n "${smi_pid:-}" ] && { kill "$smi_pid" 2>/dev/null || true; smi_pid=; }
    echo "| $name | FAILED | | | | | $(grep -o 'error: .*' "$out/speed-$name.log" | head -1 | cut -c8-) |" >> "$out/table.md"
    fail=1
  fi
done
cat "$out/table.md" | tee -a "$out/summary.txt"
[ "$fail" = 0 ] && note "gpu-check: ok" || note "gpu-check: FAILED"
exit "$fail"
