#!/usr/bin/env bash
# The `onednn` build (the linear layers' f32 and bf16 matmuls through oneDNN), checked on this machine (CI runs this
# after the tests): installs Debian's libdnnl-dev when it is missing, then runs that build's oneDNN unit tests
# (f32 values and gradients against Candle's matmul, bf16 against the f32 products rounded) and the decoder's
# parity and gradient tests (bf16 included), the GRPO update, exact resume, LoRA and the device tests through it.
# Usage: bash scripts/onednn-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -f /usr/include/oneapi/dnnl/dnnl.h ]; then
  sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q libdnnl-dev >/dev/null \
    || { $sudo apt-get update -q >/dev/null && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q libdnnl-dev >/dev/null; }
fi
echo "== cargo test --features onednn (oneDNN's products, the decoder through them)"
cargo test --locked --features onednn --lib -- model::onednn model::llama
cargo test --locked --features onednn --test model_parity --test grpo_update --test train_resume --test lora --test devices
echo "onednn-check: ok"
