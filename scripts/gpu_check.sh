#!/usr/bin/env bash
# The whole GPU check as one prepared run (docs/BENCHMARKS.md "The GPU check").
#
# On the CPU machine (cargo, libtorch):
#   scripts/gpu_check.sh pack                  # release binary, stripped -> target/gpu-pack/
#   scripts/gpu_check.sh run --device cpu --tiny --out target/gpu-check-dry   # the dry run `make test` does
# On the GPU machine (no Rust, no registry: its own PyTorch install supplies libtorch):
#   scripts/gpu_check.sh run --out "$OUT/gpu-check"   # ~8 minutes; --budget-s caps it
#
# Writes results.jsonl (one line per measurement), summary.json and summary.md to --out, and
# exits 1 if a correctness check failed. Needs python3 (stdlib; pyarrow for the prediction
# comparison, which PLANKTON_CHECK_PYTHON or .pyenv-tools provide here and the GPU machine has).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PLANKTON_CHECK_PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .pyenv-tools/bin/python ]; then PY=.pyenv-tools/bin/python; else PY=python3; fi
fi
exec "$PY" scripts/gpu_check.py "$@"
