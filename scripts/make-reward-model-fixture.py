#!/usr/bin/env python3
"""Build the tiny reward-model test fixture in tests/fixtures/reward-model/.

Creates two tiny, randomly initialised sequence-classification reward models
(num_labels=1) saved by transformers, a shared byte-level tokenizer, and
reference scores (scores.json) computed by transformers on CPU in float32.

Usage (from the repository root):

    OMP_NUM_THREADS=1 /tmp/hfvenv/bin/python scripts/make-reward-model-fixture.py

Needs torch and transformers (and the `tokenizers` package they pull in);
CPU only, no network. Deterministic: re-running overwrites the fixture.
"""

import json
import os
import platform
import shutil
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "reward-model"
SCRIPT_REL = "scripts/make-reward-model-fixture.py"
REGEN_CMD = f"OMP_NUM_THREADS=1 /tmp/hfvenv/bin/python {SCRIPT_REL}"

PAD, BOS, EOS = 256, 257, 258
SPECIALS = {"<|endoftext|>": PAD, "<|im_start|>": BOS, "<|im_end|>": EOS}

TEXTS = [
    "What is 2 + 3? 5",
    "What is 2 + 3? The answer is 6.",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there!<|im_end|>",
    "a",
    "Rewards can be hacked; PAR bounds them.",
]

SIZES = dict(
    vocab_size=259,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=BOS,
    eos_token_id=EOS,
    pad_token_id=PAD,
    num_labels=1,
)


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_tokenizer() -> PreTrainedTokenizerFast:
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}  # the character for byte b has id b
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # no post-processor: no BOS/EOS added
    tok.add_special_tokens(list(SPECIALS))  # ids 256, 257, 258 in this order
    for t, i in SPECIALS.items():
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    assert tok.get_vocab_size() == 259
    raw_json = json.loads(tok.to_str())
    assert raw_json["post_processor"] is None
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        model_max_length=256,
    )
    return fast, raw_json


def save_tokenizer(tok, raw_json, mdir):
    """save_pretrained, then drop the no-op post-processor transformers 5 inserts.

    transformers 5 replaces a missing post-processor with a TemplateProcessing that
    adds nothing ("$A" / "$A $B"); the fixture's tokenizer.json keeps
    "post_processor": null as built. Everything else must equal the tokenizers build.
    """
    tok.save_pretrained(mdir)
    path = Path(mdir) / "tokenizer.json"
    saved = json.loads(path.read_text())
    pp = saved.get("post_processor")
    if pp is not None:
        assert pp["type"] == "TemplateProcessing" and not pp["special_tokens"], pp
        assert [list(x) for x in pp["single"]] == [["Sequence"]], pp
        saved["post_processor"] = None
    assert saved == raw_json, "tokenizer.json differs from the tokenizers build"
    path.write_text(json.dumps(saved, indent=2, ensure_ascii=False) + "\n")


def check_tokenizer(tok):
    ids = tok("Hi!", add_special_tokens=False)["input_ids"]
    assert ids == [72, 105, 33], ids
    assert tok("Hi!")["input_ids"] == [72, 105, 33], "tokenizer must not add special tokens"
    assert tok.pad_token_id == PAD and tok.bos_token_id == BOS and tok.eos_token_id == EOS
    s = "héllo ✓ \n\t<|im_end|>"
    ids = tok(s, add_special_tokens=False)["input_ids"]
    assert ids[-1] == EOS and all(i < 256 for i in ids[:-1])
    assert ids[:-1] == list("héllo ✓ \n\t".encode("utf-8")), ids
    assert tok.decode(ids) == s, tok.decode(ids)


def perturb(model):
    """score.weight *= 10; every RMSNorm weight = 1 + 0.1 * randn; every bias (Qwen2's q/k/v) = 0.1 * randn, so a
    loader that dropped them would be caught (global RNG stream, in named_parameters order)."""
    with torch.no_grad():
        model.score.weight.mul_(10.0)
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def build_model(kind: str):
    if kind == "llama":
        torch.manual_seed(0)
        cfg = LlamaConfig(**SIZES, attention_bias=False, mlp_bias=False)
        model = LlamaForSequenceClassification(cfg)
    elif kind == "qwen2":
        torch.manual_seed(1)
        cfg = Qwen2Config(**SIZES)
        model = Qwen2ForSequenceClassification(cfg)
    else:
        raise ValueError(kind)
    perturb(model)
    model = model.float().eval()
    return model


def score_single(model, tok, text):
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"])
    assert out.logits.shape == (1, 1)
    return float(out.logits[0, 0])


def score_batch(model, tok, texts, side):
    tok.padding_side = side
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    tok.padding_side = "right"
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert out.logits.shape == (len(texts), 1)
    return [float(x) for x in out.logits[:, 0]], enc["input_ids"].tolist(), enc["attention_mask"].tolist()


def main():
    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)

    tok, tok_raw_json = build_tokenizer()
    check_tokenizer(tok)

    result = {
        "made_with": {
            "script": SCRIPT_REL,
            "command": REGEN_CMD,
            "cwd": "repository root",
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "device": "cpu",
            "dtype": "float32",
            "torch_num_threads": 1,
            "attn_implementation": None,  # filled in below
            "score_definition": "logits[i, 0] of *ForSequenceClassification(num_labels=1); "
            "transformers pools the logits at the rightmost position whose input_id != pad_token_id (256)",
            "padding": "batch of all texts, pad id 256, attention_mask 1 on real tokens / 0 on pads, "
            "no explicit position_ids (transformers default: 0..L-1 for every row)",
            "tokenization": "tokenizer(text, add_special_tokens=False); no BOS/EOS is added",
        },
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "models": {},
    }

    max_diffs = {}
    for kind, dirname in (("llama", "tiny-llama-rm"), ("qwen2", "tiny-qwen2-rm")):
        mdir = OUT / dirname
        model = build_model(kind)
        model.save_pretrained(mdir, safe_serialization=True)
        save_tokenizer(tok, tok_raw_json, mdir)
        # Score with the model as reloaded from disk (checks the round trip).
        reloaded = AutoModelForSequenceClassification.from_pretrained(mdir, dtype=torch.float32).eval()
        for (n1, p1), (n2, p2) in zip(model.state_dict().items(), reloaded.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2), n1
        rtok = AutoTokenizer.from_pretrained(mdir)
        check_tokenizer(rtok)
        # The bare tokenizers library (what the Rust `tokenizers` crate mirrors) must agree.
        bare = Tokenizer.from_file(str(mdir / "tokenizer.json"))
        assert bare.post_processor is None
        for t in TEXTS + ["Hi!"]:
            ids = rtok(t, add_special_tokens=False)["input_ids"]
            assert bare.encode(t, add_special_tokens=True).ids == ids, t
            assert bare.decode(ids, skip_special_tokens=False) == t, t
        attn_impl = reloaded.config._attn_implementation
        result["made_with"]["attn_implementation"] = attn_impl

        single = [score_single(reloaded, rtok, t) for t in TEXTS]
        left, left_ids, left_mask = score_batch(reloaded, rtok, TEXTS, "left")
        right, right_ids, right_mask = score_batch(reloaded, rtok, TEXTS, "right")
        # Cross-check with eager attention (should agree to float rounding).
        eager = AutoModelForSequenceClassification.from_pretrained(
            mdir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        single_eager = [score_single(eager, rtok, t) for t in TEXTS]
        left_eager, _, _ = score_batch(eager, rtok, TEXTS, "left")

        cases = []
        for i, t in enumerate(TEXTS):
            ids = rtok(t, add_special_tokens=False)["input_ids"]
            cases.append(
                {
                    "text": t,
                    "input_ids": ids,
                    "score": single[i],
                    "score_left_padded": left[i],
                    "score_right_padded": right[i],
                }
            )
        d_left = max(abs(a - b) for a, b in zip(single, left))
        d_right = max(abs(a - b) for a, b in zip(single, right))
        d_eager = max(
            max(abs(a - b) for a, b in zip(single, single_eager)),
            max(abs(a - b) for a, b in zip(left, left_eager)),
        )
        max_diffs[kind] = (d_left, d_right, d_eager)
        n_params = sum(p.numel() for p in reloaded.parameters())
        result["models"][dirname] = {
            "architecture": type(reloaded).__name__,
            "seed": 0 if kind == "llama" else 1,
            "init": "default transformers init after torch.manual_seed(seed); then score.weight *= 10 and "
            "every *norm.weight := 1 + 0.1*randn and every *.bias := 0.1*randn (same RNG stream, in named_parameters order)",
            "num_parameters": n_params,
            "padded_batch": {
                "left": {"input_ids": left_ids, "attention_mask": left_mask},
                "right": {"input_ids": right_ids, "attention_mask": right_mask},
            },
            "max_abs_diff_single_vs_left_padded": d_left,
            "max_abs_diff_single_vs_right_padded": d_right,
            "max_abs_diff_sdpa_vs_eager": d_eager,
            "cases": cases,
        }

    with open(OUT / "scores.json", "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")

    write_readme(result)

    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    assert total < 1_000_000, total
    # report
    for name, m in result["models"].items():
        print(f"== {name} ({m['architecture']}, {m['num_parameters']} params)")
        print(f"{'single':>12} {'left':>12} {'right':>12}  text")
        for c in m["cases"]:
            print(f"{c['score']:12.6f} {c['score_left_padded']:12.6f} {c['score_right_padded']:12.6f}  {c['text']!r}")
        print(
            f"max|single-left|={m['max_abs_diff_single_vs_left_padded']:.3e} "
            f"max|single-right|={m['max_abs_diff_single_vs_right_padded']:.3e} "
            f"max|sdpa-eager|={m['max_abs_diff_sdpa_vs_eager']:.3e}"
        )
    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size:8d}  {p.relative_to(ROOT)}")
    print(f"{total:8d}  total")


def write_readme(result):
    mw = result["made_with"]
    text = f"""# Tiny reward-model fixture

Two tiny, randomly initialised sequence-classification reward models (one scalar
output, `num_labels=1`) saved by Hugging Face transformers, plus reference scores
computed by transformers. Meant for testing reward-model loading and scoring
against transformers; the scores mean nothing.

Made by `{mw['script']}` with torch {mw['torch']}, transformers {mw['transformers']},
tokenizers {mw['tokenizers']}, Python {mw['python']}, on CPU in float32
(attention implementation `{mw['attn_implementation']}`; eager agrees, see `scores.json`).

Regenerate (from the repository root; overwrites this directory):

    {mw['command']}

## Files

- `tiny-llama-rm/`: `LlamaForSequenceClassification`, seed 0.
- `tiny-qwen2-rm/`: `Qwen2ForSequenceClassification` (q/k/v biases), seed 1.

  Both: vocab 259, hidden 32, intermediate 64, 2 layers, 4 heads, 2 KV heads,
  head_dim 8, max positions 256, rms_norm_eps 1e-6, rope_theta 10000, untied
  embeddings, pad/bos/eos = 256/257/258. Default init, then `score.weight *= 10`
  and every RMSNorm weight set to `1 + 0.1*randn` so scores are not tiny.
  Each directory holds `config.json`, `model.safetensors` (float32) and the
  tokenizer (`tokenizer.json`, `tokenizer_config.json`, identical in both).
- Tokenizer: byte-level BPE with no merges. Ids 0..255 are the GPT-2
  `bytes_to_unicode()` characters, the character for byte b having id b, so a
  text's ids are its UTF-8 bytes. Added special tokens `<|endoftext|>` = 256
  (pad), `<|im_start|>` = 257 (bos), `<|im_end|>` = 258 (eos). ByteLevel
  pre-tokenizer (no prefix space, no regex split) and decoder, no
  post-processor: nothing is added around the text (`"Hi!"` -> `[72, 105, 33]`).
  (transformers 5 would save a no-op `TemplateProcessing` here; the script writes
  `"post_processor": null` back and checks the file is otherwise unchanged.)
- `scores.json`: for each model, `cases`: `text`, `input_ids`
  (`tokenizer(text, add_special_tokens=False)`), `score` (`logits[0, 0]` for the
  text alone, batch of 1, no padding), `score_left_padded` and
  `score_right_padded` (the same text scored inside one batch of all five texts
  padded with id 256 on the left / on the right, attention mask 0 on the pads,
  no explicit position ids). Also the padded batches themselves, the max
  absolute differences between single and padded scores, and `made_with`.

transformers pools each row's logits at the rightmost position whose input id
is not the pad id (256), so right padding picks the last real token, and with
left padding the last position is always real. Note that transformers does not
shift position ids for left padding; RoPE is relative, so the scores still agree
with the unpadded ones to float rounding.
"""
    (OUT / "README.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
