#!/usr/bin/env bash
# 5-fold stratified cross-validation on the 105 labelled planktonclas images: the small cyclic
# net against the plain net of the same compute (pipelines/planktonclas-{cyclic,plain}.toml).
# Reports the FINAL weights' validation scores (not the best checkpoint, which would be chosen on
# the very fold it is scored on). Usage: scripts/cv_planktonclas.sh [WORK_DIR] [FOLDS]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-cv-work}
FOLDS=${2:-5}
BIN=${BIN:-./target/release/plankton}
NETS=${NETS:-"cyclic plain"}
mkdir -p "$WORK/runs"

scripts/planktonclas_all.sh "$WORK" "$BIN"
$BIN split --data "$WORK/data" --folds "$FOLDS" --out "$WORK/data/splits/cv.csv"

# One torch thread per run and the runs of a fold side by side (one core each): two processes
# with two OpenMP threads each on two cores would spin against each other.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
train_one() {
  local net=$1 k=$2 run="$WORK/runs/$1-fold$2" resume=
  if [ -f "$run/model.safetensors" ]; then return; fi
  if [ -d "$run/checkpoints" ]; then resume=--resume; else rm -rf "$run"; fi
  /usr/bin/time -f "%e" -o "$run.time" $BIN train --pipeline "pipelines/planktonclas-$net.toml" \
    --data "$WORK/data" --split "$WORK/data/splits/cv-fold$k.csv" --out "$run" $resume \
    > "$run.log" 2>&1
  echo "$net fold $k: $(tail -1 "$run.log") ($(cat "$run.time") s)"
}
for k in $(seq 0 $((FOLDS - 1))); do
  for net in $NETS; do train_one "$net" "$k" & done
  wait
done
python3 scripts/cv_summary.py "$WORK/runs" $NETS
