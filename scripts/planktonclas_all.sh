#!/usr/bin/env bash
# All 105 labelled planktonclas images in one dataset folder, WORK/data/train/<class>/ (the
# package puts 8 of them in test/ with their labels in test_labels.csv): cross-validation and
# outer folds then cover every image. Idempotent. Usage: scripts/planktonclas_all.sh WORK [BIN]
set -euo pipefail
WORK=$1
BIN=${2:-./target/release/plankton}
if [ ! -f "$WORK/data/.complete" ]; then
  rm -rf "$WORK/pc" "$WORK/data"
  $BIN data planktonclas --out "$WORK/pc"
  cp -r "$WORK/pc" "$WORK/data"
  tail -n +2 "$WORK/data/test_labels.csv" | while IFS=, read -r img cls; do
    mv "$WORK/data/test/$img" "$WORK/data/train/$cls/"
  done
  rm "$WORK/data/test_labels.csv"
  head -1 "$WORK/pc/sampleSubmission.csv" > "$WORK/data/sampleSubmission.csv"
  touch "$WORK/data/.complete"
fi
