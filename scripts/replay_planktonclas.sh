#!/usr/bin/env bash
# The whole replay (pipelines/replay-planktonclas.toml) on the 105 real planktonclas images,
# scored on labelled held-out images: the images are cut into FOLDS stratified outer folds;
# for each, the fold is the replay's test set (labels in test_labels.csv, which no stage reads
# except the scoring) and the rest its labelled data. docs/RESULTS.md "The whole chain".
# Usage: scripts/replay_planktonclas.sh [WORK_DIR] [FOLDS]   (resumable: rerun to continue)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-cv-work}
FOLDS=${2:-3}
BIN=./target/release/plankton

scripts/planktonclas_all.sh "$WORK" "$BIN"
$BIN split --data "$WORK/data" --folds "$FOLDS" --out "$WORK/data/splits/outer.csv" --seed 2015

for k in $(seq 0 $((FOLDS - 1))); do
  set_dir="$WORK/outer$k"
  if [ ! -f "$set_dir/.complete" ]; then
    rm -rf "$set_dir" && mkdir -p "$set_dir/test"
    echo "image,class" > "$set_dir/test_labels.csv"
    tail -n +2 "$WORK/data/splits/outer-fold$k.csv" | while IFS=, read -r path cls subset; do
      if [ "$subset" = valid ]; then
        cp "$WORK/data/$path" "$set_dir/test/"
        echo "$(basename "$path"),$cls" >> "$set_dir/test_labels.csv"
      else
        mkdir -p "$set_dir/train/$cls" && cp "$WORK/data/$path" "$set_dir/train/$cls/"
      fi
    done
    { head -1 "$WORK/data/sampleSubmission.csv"; } > "$set_dir/sampleSubmission.csv"
    touch "$set_dir/.complete"
  fi
  /usr/bin/time -f "%e" -o "$WORK/replay$k.time" \
    $BIN replay --pipeline pipelines/replay-planktonclas.toml --data "$set_dir" --out "$WORK/replay$k" \
    > "$WORK/replay$k.log" 2>&1
  echo "outer fold $k: $(cat "$WORK/replay$k.time") s"
done
python3 scripts/replay_summary.py "$WORK" "$FOLDS"
