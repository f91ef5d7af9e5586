#!/usr/bin/env bash
# The gain of test-time augmentation on the real images: 5-fold CV of the small cyclic net
# (scripts/cv_planktonclas.sh, NETS=cyclic), then each fold's held-out images predicted with the
# FINAL weights, no calibration, as a single un-augmented pass and with the reference's 70
# quasi-random transforms under each aggregation. Usage: scripts/tta_gain.sh [WORK_DIR] [FOLDS]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-cv-work}
FOLDS=${2:-5}
BIN=./target/release/plankton
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} NETS=cyclic scripts/cv_planktonclas.sh "$WORK" "$FOLDS"
mkdir -p "$WORK/tta"
for k in $(seq 0 $((FOLDS - 1))); do
  run="$WORK/runs/cyclic-fold$k"
  for n in 1 10 35 70; do
    for agg in mean-probability geometric-mean entropy-weighted; do
      if [ "$n" = 1 ] && [ "$agg" != mean-probability ]; then continue; fi
      out="$WORK/tta/fold$k-tta$n-$agg"
      $BIN predict --model "$run" --weights final --no-calibration --data "$WORK/data" --subset valid \
        --tta "$n" --aggregation "$agg" --out "$out.parquet" > "$out.log" 2>&1
      $BIN evaluate --predictions "$out.parquet" --out "$out" > /dev/null
    done
  done
done
python3 scripts/tta_gain_summary.py "$WORK/tta" "$FOLDS"
