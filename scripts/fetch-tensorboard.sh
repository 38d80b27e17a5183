#!/usr/bin/env bash
# Install TensorBoard's reader (the PyPI package tensorboard==2.21.0 and its dependencies) once into the cache, for
# tests/tensorboard.rs, which reads our event files with it (scripts/read-tensorboard.py). Prints the directory to
# put on PYTHONPATH. Cache: $SAFE_CACHE or ~/.cache/safe. Idempotent: a finished install is marked, a broken or
# half-done one is redone.
set -euo pipefail
version=2.21.0
cache="${SAFE_CACHE:-$HOME/.cache/safe}"
py="$(python3 -c 'import sys; print(f"py{sys.version_info[0]}.{sys.version_info[1]}")')"
dir="$cache/pydeps/tensorboard-$version-$py"
check() {
  PYTHONPATH="$dir" python3 -c "from tensorboard.backend.event_processing import event_accumulator" >&2
}
if [ ! -f "$dir/.complete" ] || ! check 2>/dev/null; then
  rm -rf "$dir"
  mkdir -p "$cache/pydeps"
  python3 -m pip install --quiet --disable-pip-version-check --target "$dir" "tensorboard==$version" >&2
  check || { echo "tensorboard==$version installed in $dir but its event reader does not import" >&2; exit 1; }
  touch "$dir/.complete"
fi
echo "$dir"
