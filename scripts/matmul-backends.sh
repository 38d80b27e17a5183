#!/usr/bin/env bash
# f32 and bf16 matmul rates side by side at SmolLM2-135M's shapes (decoding at 1-16 rows, the layers and the LM
# head apart; training forward + backward at 128-4096 rows): Candle's `gemm` build and our decode kernel
# (`cargo bench --bench matmul -- --backends`) beside OpenBLAS and oneDNN (Debian's libopenblas-dev, libdnnl-dev)
# and Intel MKL (PyPI's mkl-devel / mkl-static / mkl-include wheels, installed into $MKL_DIR, default
# ~/.cache/safe/mkl), each through scripts/matmul-backends/bench.c. Backends that are not installed are skipped
# and named. --rounds R alternates the backends R times (default 2); the table prints every round's figure.
#
#   bash scripts/matmul-backends.sh [--rounds R] [--threads T] [--only "candle onednn ..."] [--install]
#
# --only keeps the named backends (candle = Candle's gemm and our decode kernel; openblas, onednn, mkl).
#
# --install fetches what is missing (apt-get for the Debian packages, pip for MKL). Outputs go to
# $BENCH_DIR (default target/matmul-backends).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=2 threads=2 install=0 only=
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --install) install=1; shift ;;
    --only) only=" $2 "; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
out="$(realpath -m "${BENCH_DIR:-target/matmul-backends}")"
mkl="${MKL_DIR:-$HOME/.cache/safe/mkl}"
mkdir -p "$out"
src=scripts/matmul-backends/bench.c
if [ "$install" = 1 ]; then
  [ -f /usr/include/oneapi/dnnl/dnnl.h ] && [ -f /usr/include/x86_64-linux-gnu/cblas.h ] \
    || DEBIAN_FRONTEND=noninteractive apt-get install -y -q libopenblas-dev libdnnl-dev >&2
  # --prefix, not --target: the wheels' headers and libraries are data files, which --target drops.
  [ -f "$mkl/include/mkl.h" ] || python3 -m pip install --quiet --prefix "$mkl" mkl-devel mkl-static mkl-include >&2
fi
mkl_inc=$(dirname "$(find "$mkl" -name mkl.h 2>/dev/null | head -1)" 2>/dev/null || true)
mkl_lib=$(dirname "$(find "$mkl" -name libmkl_core.a 2>/dev/null | head -1)" 2>/dev/null || true)

backends=()
if [ -f /usr/include/x86_64-linux-gnu/cblas.h ] && [ -e /usr/lib/x86_64-linux-gnu/libopenblas.so ]; then
  nm -D /usr/lib/x86_64-linux-gnu/libopenblas.so | grep -q cblas_sbgemm || nobf=-DNO_SBGEMM
  gcc -O2 -DBACKEND_OPENBLAS ${nobf:-} "$src" -o "$out/openblas" -I/usr/include/x86_64-linux-gnu -lopenblas
  backends+=(openblas)
else
  echo "skipped OpenBLAS: apt-get install libopenblas-dev (or --install)" >&2
fi
if [ -f /usr/include/oneapi/dnnl/dnnl.h ]; then
  gcc -O2 -DBACKEND_DNNL "$src" -o "$out/onednn" -ldnnl
  backends+=(onednn)
else
  echo "skipped oneDNN: apt-get install libdnnl-dev (or --install)" >&2
fi
if [ -f "$mkl_inc/mkl.h" ] && [ -f "$mkl_lib/libmkl_core.a" ]; then
  l="$mkl_lib"
  gcc -O2 -DBACKEND_MKL "$src" -o "$out/mkl" -I"$mkl_inc" -Wl,--start-group "$l/libmkl_intel_lp64.a" \
    "$l/libmkl_gnu_thread.a" "$l/libmkl_core.a" -Wl,--end-group -lgomp -lpthread -lm -ldl
  backends+=(mkl)
else
  echo "skipped MKL: no mkl.h and libmkl_core.a under $mkl (--install)" >&2
fi
cargo bench --quiet --bench matmul --no-run
bench_bin=$(cargo bench --bench matmul --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and "matmul" in m["executable"]][0])')

lscpu | grep -E 'Model name' >&2
: > "$out/rates.jsonl"
wanted() { [ -z "$only" ] || [[ "$only" == *" $1 "* ]]; }
for r in $(seq 1 "$rounds"); do
  if wanted candle; then
    echo "round $r: candle" >&2
    RAYON_NUM_THREADS="$threads" "$bench_bin" --backends | sed "s/^{/{\"round\": $r, /" >> "$out/rates.jsonl"
  fi
  for b in "${backends[@]}"; do
    wanted "$b" || continue
    echo "round $r: $b" >&2
    OMP_NUM_THREADS="$threads" OPENBLAS_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads" "$out/$b" "$threads" \
      | sed "s/^{/{\"round\": $r, /" >> "$out/rates.jsonl"
  done
done
python3 - "$out/rates.jsonl" <<'PY' | tee "$out/report.md"
import collections, json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cells = collections.defaultdict(list)
backends, works = [], []
for r in rows:
    if r.get("unavailable"):
        cells[(r["backend"], r["dtype"], None)] = None
        continue
    key = (r["backend"], r["dtype"])
    if key not in backends: backends.append(key)
    w = (r["work"], r["rows"])
    if w not in works: works.append(w)
    cells[(key, w)].append(r["gflops"])
print("GFLOP/s (one figure per round)\n")
print("| backend | dtype | " + " | ".join(f"{w} {n}" for w, n in works) + " |")
print("|---|---|" + "---|" * len(works))
for key in backends:
    print(f"| {key[0]} | {key[1]} | " + " | ".join(", ".join(f"{v:.0f}" for v in cells.get((key, w), [])) or "-" for w in works) + " |")
missing = sorted({(b, d) for (b, d, n) in [k for k in cells if len(k) == 3]})
for b, d in missing: print(f"\n{b} {d}: not in this build of the library")
PY
