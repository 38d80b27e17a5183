#!/usr/bin/env bash
# docs/report.png: train two quickstart runs that differ in one key (optim.lr), list them with `safe runs`, write
# `safe report` of both and screenshot its top with headless Chromium.
#
#   bash scripts/report-screenshot.sh            # builds --release; SAFE_BIN=path/to/safe uses that binary
#
# Runs go to $OUT (default target/report-screenshot, started over each time). Needs `chromium` (Debian package).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-target/report-screenshot}"
PNG="${PNG:-docs/report.png}"
if [ -z "${SAFE_BIN:-}" ]; then
    cargo build --release --locked
    SAFE_BIN="${CARGO_TARGET_DIR:-target}/release/safe"
fi
BROWSER="${SAFE_CHROMIUM:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}"
[ -n "$BROWSER" ] || { echo "no chromium found: apt-get install chromium, or set SAFE_CHROMIUM" >&2; exit 2; }

rm -rf "$OUT"
mkdir -p "$OUT"
for lr in 1e-3 3e-4; do
    "$SAFE_BIN" train --config configs/quickstart.toml --resume never \
        --set run.output_dir="$OUT" --set run.name="lr-$lr" --set optim.lr="$lr" >"$OUT/lr-$lr.log"
done
"$SAFE_BIN" runs "$OUT"
"$SAFE_BIN" report "$OUT/lr-1e-3" "$OUT/lr-3e-4" -o "$OUT/report.html"

# The runs table and the first rows of charts; a small PNG for the README.
PROFILE="$(mktemp -d)"
trap 'rm -rf "$PROFILE"' EXIT
"$BROWSER" --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
    --user-data-dir="$PROFILE" --window-size=1180,830 --screenshot="$PNG" \
    "file://$(realpath "$OUT/report.html")" 2>/dev/null
size=$(stat -c %s "$PNG")
echo "$PNG: $size bytes"
if [ "$size" -ge 300000 ]; then
    echo "$PNG is $size bytes (over 300 KB): lower --window-size" >&2
    exit 1
fi
