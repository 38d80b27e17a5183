#!/usr/bin/env python3
"""Build the PEFT LoRA fixture in tests/fixtures/peft/ (issue 18): PEFT's adapters on the tiny bases, with PEFT's
logits, and PEFT's logits for the adapter `safe` exports.

Made with torch 2.15.0, transformers 5.23.0 and peft 0.21.2 (Python 3.11, CPU, float32); the outputs are
committed, so CI needs no Python ML stack. To remake it (from the repository root; the bases are read from
../shared/fixtures/tiny, see its README.md, and are not copied):

    python3 -m venv ~/.cache/safe/peft-venv
    ~/.cache/safe/peft-venv/bin/pip install torch==2.15.0 transformers==5.23.0 peft==0.21.2
    ~/.cache/safe/peft-venv/bin/python scripts/make-peft-fixture.py            # step 1: PEFT's adapters
    UPDATE_PEFT_FIXTURE=1 cargo test --test peft_fixture ours_llama_adapter     # step 2: our adapter + logits
    ~/.cache/safe/peft-venv/bin/python scripts/make-peft-fixture.py            # step 3: PEFT loads ours

What it writes:

- tests/fixtures/peft/tiny-llama/adapter/, tests/fixtures/peft/tiny-qwen2/adapter/: `adapter_config.json` +
  `adapter_model.safetensors` exactly as PEFT's `save_pretrained` writes them. Llama: r 4, alpha 8, q/v/up/down;
  Qwen2: r 6, alpha 5, rsLoRA, q/k/o/gate. `init_lora_weights=False`, so B is not zero (seed 1234).
- tests/fixtures/peft/<name>/logits.json: the logits with the adapter active (6 decimals) on the base fixture's
  three id sequences (`sequences`), the second sequence left-padded (pad id 0) to the first one's length in a batch
  of two (`left_padded_second_row_logits`, real positions only, positions counted from the first real token, as
  in the base fixture), the merged model's (`merge_and_unload`) logits on the first sequence (`merged_first_logits`)
  and the largest |merged - adapter| over every sequence (`merged_max_abs_diff`).
- tests/fixtures/peft/ours-llama/peft_logits.json, when ours-llama/ holds the adapter our code exported (step 2):
  `PeftModel.from_pretrained(tiny-llama, ours-llama)` on the files as they are, its logits on the sequences of
  ours-llama/our_logits.json, and the largest |PEFT - ours| (`max_abs_diff_vs_ours`, also printed).

Deterministic: re-running overwrites the fixture with the same values.
"""

import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import peft  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASES = ROOT.parent / "shared" / "fixtures" / "tiny"
OUT = ROOT / "tests" / "fixtures" / "peft"

ADAPTERS = {
    "tiny-llama": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    "tiny-qwen2": dict(r=6, lora_alpha=5, use_rslora=True, target_modules=["q_proj", "k_proj", "o_proj", "gate_proj"]),
}


def rounded(rows):
    return [[round(v, 6) for v in row] for row in rows.tolist()]


def base(name):
    m = AutoModelForCausalLM.from_pretrained(BASES / name, dtype=torch.float32)
    return m.eval()


def logits_of(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def left_padded_second_row(model, a, b):
    pad = [0] * (len(a) - len(b))
    ids = torch.tensor([a, pad + b])
    mask = torch.tensor([[1] * len(a), [0] * len(pad) + [1] * len(b)])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=pos).logits[1, len(pad):]


def make_adapter(name, settings):
    seqs = [s["input_ids"] for s in json.load(open(BASES / name / "reference_logits.json"))["sequences"]]
    torch.manual_seed(1234)
    config = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", init_lora_weights=False, **settings)
    model = get_peft_model(base(name), config).eval()
    d = OUT / name
    # A path relative to the repository root, not this machine's; and no model card (README.md).
    model.peft_config["default"].base_model_name_or_path = f"../shared/fixtures/tiny/{name}"
    model.save_pretrained(d / "adapter")
    (d / "adapter" / "README.md").unlink(missing_ok=True)
    adapter_logits = [logits_of(model, s) for s in seqs]
    padded = left_padded_second_row(model, seqs[0], seqs[1])
    merged = copy.deepcopy(model).merge_and_unload().eval()
    merged_logits = [logits_of(merged, s) for s in seqs]
    merged_diff = max((m - a).abs().max().item() for m, a in zip(merged_logits, adapter_logits))
    base_diff = max((logits_of(base(name), s) - a).abs().max().item() for s, a in zip(seqs, adapter_logits))
    out = {
        "model": name,
        "made_with": versions(),
        "sequences": [{"input_ids": s, "logits": rounded(l)} for s, l in zip(seqs, adapter_logits)],
        "left_padded_second_row_logits": rounded(padded),
        "merged_first_logits": rounded(merged_logits[0]),
        "merged_max_abs_diff": merged_diff,
    }
    json.dump(out, open(d / "logits.json", "w"))
    pad_diff = (padded - adapter_logits[1]).abs().max().item()
    print(f"{name}: |merged - adapter| max {merged_diff:.3g}, |left-padded - unpadded| max {pad_diff:.3g}, "
          f"|adapter - base| max {base_diff:.3g}")


def load_ours():
    d = OUT / "ours-llama"
    if not (d / "adapter_config.json").is_file():
        print(f"{d} holds no adapter yet: run `UPDATE_PEFT_FIXTURE=1 cargo test --test peft_fixture "
              "ours_llama_adapter`, then this script again", file=sys.stderr)
        return
    ours = json.load(open(d / "our_logits.json"))
    model = PeftModel.from_pretrained(base("tiny-llama"), d).eval()
    rows, worst = [], 0.0
    for s in ours["sequences"]:
        logits = logits_of(model, s["input_ids"])
        worst = max(worst, (logits - torch.tensor(s["logits"])).abs().max().item())
        rows.append({"input_ids": s["input_ids"], "logits": rounded(logits)})
    json.dump({"model": "tiny-llama + ours-llama", "made_with": versions(), "sequences": rows,
               "max_abs_diff_vs_ours": worst}, open(d / "peft_logits.json", "w"))
    print(f"ours-llama: PEFT's logits with our adapter vs ours: max |diff| {worst:.3g}")


def versions():
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(versions())
    for name, settings in ADAPTERS.items():
        make_adapter(name, settings)
    load_ours()
