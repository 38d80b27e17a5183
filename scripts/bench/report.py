"""Side-by-side table of `safe` and TRL GRPO runs made by scripts/bench-vs-trl.sh.

Usage: python3 report.py BENCH_DIR HF_MODEL_DIR
Reads BENCH_DIR/round-*/{trl.json,trl.time,safe.time,runs/safe-bench/metrics.jsonl} and BENCH_DIR/matmul.json.
Figures are medians over steps 2..N (the first step is warm-up), as ../shared/fixtures/trl_baseline.md.
"""
import glob, json, os, re, statistics, sys

bench, hf = sys.argv[1], sys.argv[2]
# The model's shape: the HF folder TRL loads, or (without TRL) the config saved in a `safe` checkpoint.
configs = [os.path.join(hf, "config.json")] + sorted(glob.glob(os.path.join(bench, "round-*/runs/*/checkpoints/*/config.json")))
cfg = json.load(open(next(c for c in configs if os.path.exists(c))))
h, inter, layers, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
# Multiply-adds per token of the decoder's linear layers, and of the LM head (applied at completion positions only,
# by both trainers). Attention scores are left out (under 5% at these lengths).
lin = layers * (h * nh * d + 2 * h * nkv * d + nh * d * h + 3 * h * inter)
head = vocab * h


def update_flops(prompt_tok, completion_tok, with_reference):
    """Useful FLOPs of one update: policy forward + backward (3 forwards) and, with β > 0, one reference forward."""
    fwd = 2 * (lin * (prompt_tok + completion_tok) + head * completion_tok)
    return fwd * (4 if with_reference else 3), fwd


def peak_rss_mib(path):
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(path).read())
    return int(m.group(1)) / 1024 if m else float("nan")


med = lambda xs: statistics.median(xs) if xs else float("nan")
matmul = json.load(open(os.path.join(bench, "matmul.json")))
rows = []
for rd in sorted(glob.glob(os.path.join(bench, "round-*"))):
    r = {"round": os.path.basename(rd)}
    tj = os.path.join(rd, "trl.json")
    if os.path.exists(tj):
        t = json.load(open(tj))
        steps = [l for l in t["logs"] if "num_tokens" in l]
        cum = [0] + [l["num_tokens"] for l in steps]
        tot_tok = [b - a for a, b in zip(cum, cum[1:])]  # prompt + completion tokens per step
        gen_tok = t["gen_tokens"]
        score = t["score_s (gen+ref/old logps+reward)"]
        train = [s - c for s, c in zip(t["step_wall_s"], score)]
        ref = [c - g for c, g in zip(score, t["gen_s"])]
        fl = [update_flops(tt - g, g, False)[0] for tt, g in zip(tot_tok, gen_tok)]
        r["trl"] = {
            "step": med(t["step_wall_s"][1:]),
            "gen_tok_s": med([n / s for n, s in zip(gen_tok, t["gen_s"])][1:]),
            "gen": med(t["gen_s"][1:]),
            "ref": med(ref[1:]),
            "update": med(train[1:]),
            "len": statistics.mean(g / 8 for g in gen_tok[1:]),
            "rss": peak_rss_mib(os.path.join(rd, "trl.time")),
            "gflops": med([f / s / 1e9 for f, s in zip(fl, train)][1:]) if len(fl) == len(train) else float("nan"),
        }
    sm = os.path.join(rd, "runs", "safe-bench", "metrics.jsonl")
    if os.path.exists(sm):
        m = [json.loads(l) for l in open(sm)]
        ref = [x.get("timing/reference", 0.0) for x in m]
        upd = [x["timing/update"] - rf for x, rf in zip(m, ref)]
        nan = float("nan")
        fl = [update_flops(x.get("tokens/prompt", nan), x.get("tokens/completion", nan), False)[0] for x in m]
        r["safe"] = {
            "step": med([x["timing/step"] for x in m][1:]),
            "gen_tok_s": med([x["tokens_per_second"] for x in m][1:]),
            "gen": med([x["timing/rollout"] for x in m][1:]),
            "ref": med([rf + x["timing/reward"] for x, rf in zip(m, ref)][1:]),
            "update": med(upd[1:]),
            "len": statistics.mean(x["completions/mean_length"] for x in m[1:]),
            "rss": peak_rss_mib(os.path.join(rd, "safe.time")),
            "gflops": med([f / s / 1e9 for f, s in zip(fl, upd)][1:]),
        }
    rows.append(r)

cols = [("step", "s/step", "{:.2f}"), ("gen", "gen s", "{:.2f}"), ("gen_tok_s", "gen valid tok/s", "{:.0f}"),
        ("ref", "ref+reward s", "{:.2f}"), ("update", "update s", "{:.2f}"), ("gflops", "update GFLOP/s", "{:.0f}"),
        ("len", "mean compl. len", "{:.1f}"), ("rss", "peak RSS MiB", "{:.0f}")]
print(f"machine f32 matmul (Candle, model shapes, {matmul['rows']} rows): {matmul['gflops']:.0f} GFLOP/s")
print("| round | trainer | " + " | ".join(c[1] for c in cols) + " | update / matmul |")
print("|---|---|" + "---|" * (len(cols) + 1))
for r in rows:
    for who in ("trl", "safe"):
        if who in r:
            v = r[who]
            print(f"| {r['round']} | {who} | " + " | ".join(f.format(v[k]) for k, _, f in cols)
                  + f" | {v['gflops'] / matmul['gflops']:.0%} |")
    if "trl" in r and "safe" in r:
        t, s = r["trl"], r["safe"]
        ratio = lambda k: s[k] / t[k] if t[k] else float("nan")
        print(f"| {r['round']} | safe/TRL | " + " | ".join(f"{ratio(k):.2f}x" for k, _, _ in cols) + " | |")
