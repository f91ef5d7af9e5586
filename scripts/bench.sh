#!/usr/bin/env bash
# Runs the Python baselines and our criterion benchmarks in one go, on the same images and the
# same machine, and prints the ratios (docs/BENCHMARKS.md quotes this output).
# Per-core figures pin the process to one core with taskset.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PLANKTON_PYTHON:-.pyenv-tools/bin/python}
IMAGES=tests/fixtures/images
OUT=target/bench-report
mkdir -p "$OUT"
CORE=${BENCH_CORE:-0}

echo ">> Python baselines (one core: PIL decode, scikit-image warp)" >&2
"$PY" scripts/baseline_bench.py "$IMAGES" --seconds "${BENCH_SECONDS:-3}" --cpu "$CORE" > "$OUT/python.json"

echo ">> criterion: warp and decode pinned to core $CORE" >&2
taskset -c "$CORE" cargo bench -p plankton-data --bench warp -- --noplot >&2
taskset -c "$CORE" cargo bench -p plankton-core --bench decode -- --noplot >&2

echo ">> criterion: whole data path on all cores" >&2
cargo bench -p plankton-data --bench data_path -- --noplot >&2

"$PY" scripts/bench_report.py "$OUT/python.json" target/criterion | tee "$OUT/report.md"
