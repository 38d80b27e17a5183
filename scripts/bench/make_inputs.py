"""Write the TRL benchmark's 64 chat prompts (the same list trl_grpo_bench.py builds) as JSONL for `safe`,
and the `safe` recipe that matches its GRPOConfig.

Usage: python3 make_inputs.py OUT_DIR GGUF STEPS BETA
"""
import json, os, sys

out, gguf, steps, beta = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
subjects = ["apples", "books", "cars", "dogs", "eggs", "flowers", "glasses", "hats"]
with open(os.path.join(out, "prompts.jsonl"), "w") as f:
    for i in range(64):
        x, y = 3 + (i * 7) % 41, 2 + (i * 11) % 29
        s = subjects[i % 8]
        q = [f"What is {x} + {y}?", f"Tom has {x} {s} and buys {y} more. How many {s} does he have?",
             f"What is {x} times {y}?", f"Write one short sentence about {s}."][i % 4]
        f.write(json.dumps({"prompt": [{"role": "user", "content": q}]}) + "\n")

# TRL's GRPOConfig in trl_grpo_bench.py: 1 prompt x 8 completions per step, 64 new tokens, dapo, lr 1e-6 linear,
# max_grad_norm 1, temperature 1, no top-k/top-p, beta as given, f32, reward = "contains a digit".
recipe = f"""
[run]
name = "safe-bench"
output_dir = "{out}/runs"
seed = 0
max_steps = {steps}
save_every = 0
completions_every = 0

[model]
id = "{gguf}"
dtype = "f32"

[data]
source = "{out}/prompts.jsonl"
chat = true

[rollout]
prompts_per_step = 1
num_generations = 8
max_new_tokens = 64
temperature = 1.0

[algorithm]
kind = "grpo"
loss_type = "dapo"
beta = {beta}
use_bias_correction_kl = true
micro_batch_size = 8

[optim]
lr = 1e-6
schedule = "linear"
max_grad_norm = 1.0

[[reward]]
name = "digit"
rule = "regex"
pattern = "[0-9]"
"""
with open(os.path.join(out, "safe.toml"), "w") as f:
    f.write(recipe)
