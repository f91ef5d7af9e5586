#!/usr/bin/env bash
# Usage: scripts/loop_planktonclas.sh [WORK_DIR] [FOLDS]   (e.g. FOLDS="0 1"; env: BIN, STEPS, FT_STEPS, K)
# One round of the EcoTaxa validation loop on the 105 real planktonclas images. Per fold k of a
# 5-fold split: fold k is the held-out TEST set; the other ~84 images are halved (per class,
# alternating in path order) into a labelled SEED and an unlabelled POOL.
#   A  from scratch on SEED                                   (STEPS)
#   B  --init-from A on SEED + the K least confident POOL images, exported to EcoTaxa, "validated"
#      by rewriting the TSV with their true classes, and imported back    (FT_STEPS)
#   C  --init-from A on SEED + K random POOL images with their true labels (FT_STEPS; control)
#   D  from scratch on B's training set                       (STEPS)
# Every run trains with no validation images and is scored with its final weights on TEST.
# Idempotent: finished runs are kept. Prints: fold, run, images, steps, seconds, log loss, top-1.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mkdir -p "${1:-loop-work}" && cd "${1:-loop-work}" && pwd)
FOLDS=${2:-0}
BIN=${BIN:-./target/release/plankton}
STEPS=${STEPS:-1200}
FT_STEPS=${FT_STEPS:-400}
PIPE=pipelines/planktonclas-cyclic.toml
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

scripts/planktonclas_all.sh "$WORK" "$BIN"
[ -f "$WORK/data/splits/cv-fold4.csv" ] || $BIN split --data "$WORK/data" --folds 5 --out "$WORK/data/splits/cv.csv"

# dataset DIR LIST: DIR/train/<class>/ with the images of LIST (path,class; paths under data/)
dataset() {
  mkdir -p "$1/test"
  while IFS=, read -r p c; do mkdir -p "$1/train/$c"; cp "$WORK/data/$p" "$1/train/$c/"; done < "$2"
}
# all_train DIR: a split file putting every labelled image of DIR in training (no validation)
all_train() {
  (cd "$1" && echo path,class,subset && for f in train/*/*; do echo "$f,$(basename "$(dirname "$f")"),train"; done) > "$1/split.csv"
}
# train RUN DATA STEPS [ARGS...]: train once, time it
train() {
  local run=$1 data=$2 steps=$3; shift 3
  [ -f "$run/model.safetensors" ] && return
  rm -rf "$run"; all_train "$data"
  local t0=$SECONDS
  $BIN train --data "$data" --split "$data/split.csv" --out "$run" --steps "$steps" "$@" > "$run.log" 2>&1
  echo $((SECONDS - t0)) > "$run.time"
}
# score FOLD FOLD_DIR RUN DATASET STEPS: one table row, TEST scored with the run's final weights
score() {
  local run=$2/$3
  [ -f "$run.test.parquet" ] || $BIN predict --model "$run" --data "$2/test-ds" --weights final --out "$run.test.parquet" > /dev/null
  local line; line=$($BIN evaluate --predictions "$run.test.parquet" --data "$2/test-ds" 2>/dev/null | head -1)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$3" "$(find "$2/$4/train" -type f | wc -l)" "$5" "$(cat "$run.time")" \
    "$(sed -E 's/.*log loss ([0-9.]+).*/\1/' <<< "$line")" "$(sed -E 's/.*top-1 ([0-9.]+).*/\1/' <<< "$line")"
}

ROWS=$WORK/results.tsv
printf 'fold\trun\ttrain_images\tsteps\tseconds\ttest_log_loss\ttest_top1\n' > "$ROWS"
for k in $FOLDS; do
  F=$WORK/fold$k
  mkdir -p "$F"
  if [ ! -f "$F/.sets" ]; then
    rm -rf "${F:?}"/*
    awk -F, '$3=="valid"{print $1","$2}' "$WORK/data/splits/cv-fold$k.csv" > "$F/test.csv"
    awk -F, '$3=="train"{print $1","$2}' "$WORK/data/splits/cv-fold$k.csv" | sort | awk -F, -v F="$F" '{print > (F "/" (n[$2]++ % 2 ? "pool" : "seed") ".csv")}'
    dataset "$F/test-ds" /dev/null; dataset "$F/a-ds" "$F/seed.csv"
    (echo image,class; sed 's|.*/||' "$F/test.csv") > "$F/test-ds/test_labels.csv"
    cp "$WORK/data/sampleSubmission.csv" "$F/test-ds/"  # predict wants a class list even with --model
    cut -d, -f1 "$F/test.csv" | xargs -I{} cp "$WORK/data/{}" "$F/test-ds/test/"
    cut -d, -f1 "$F/pool.csv" | xargs -I{} cp "$WORK/data/{}" "$F/a-ds/test/"
    # C's K random pool images (fixed seed)
    shuf -n "${K:-$(( $(wc -l < "$F/pool.csv") / 2 ))}" --random-source=<(yes "$k") "$F/pool.csv" > "$F/random.csv"
    touch "$F/.sets"
  fi
  NK=$(wc -l < "$F/random.csv")
  echo "fold $k: test $(wc -l < "$F/test.csv"), seed $(wc -l < "$F/seed.csv"), pool $(wc -l < "$F/pool.csv"), K $NK" >&2

  train "$F/A" "$F/a-ds" "$STEPS" --pipeline "$PIPE"

  # The loop: predict the pool, export the K least confident, validate them, import them back.
  if [ ! -f "$F/imported/objects.csv" ]; then
    $BIN predict --model "$F/A" --data "$F/a-ds" --subset test --weights final --out "$F/pool.parquet" > /dev/null
    rm -rf "$F/pack.zip" "$F/pack" "$F/imported"
    $BIN export ecotaxa --predictions "$F/pool.parquet" --out "$F/pack.zip" --least-confident-first --limit "$NK" >&2
    unzip -q "$F/pack.zip" -d "$F/pack"
    # "validation": status validated, category = the true class (object_id is the image file name)
    sed 's|.*/||' "$F/pool.csv" > "$F/pool-truth.csv"
    awk -F'\t' -v OFS='\t' 'NR == FNR { split($0, a, ","); c[a[1]] = a[2]; next }
      FNR == 1 { for (i = 1; i <= NF; i++) { h = $i; sub(/^\xef\xbb\xbf/, "", h); col[h] = i } }
      FNR > 2 { $col["object_annotation_status"] = "validated"; $col["object_annotation_category"] = c[$col["object_id"]] }
      { print }' "$F/pool-truth.csv" "$F/pack/ecotaxa_pack.tsv" > "$F/validated.tsv"
    mv "$F/validated.tsv" "$F/pack/ecotaxa_pack.tsv"
    $BIN import ecotaxa "$F/pack" --out "$F/imported" >&2
  fi
  if [ ! -d "$F/b-ds" ]; then
    dataset "$F/b-ds.tmp" "$F/seed.csv"; cp -r "$F/imported/train/." "$F/b-ds.tmp/train/"; mv "$F/b-ds.tmp" "$F/b-ds"
  fi
  if [ ! -d "$F/c-ds" ]; then
    cat "$F/seed.csv" "$F/random.csv" > "$F/c.csv"; dataset "$F/c-ds.tmp" "$F/c.csv"; mv "$F/c-ds.tmp" "$F/c-ds"
  fi
  train "$F/B" "$F/b-ds" "$FT_STEPS" --init-from "$F/A"
  train "$F/C" "$F/c-ds" "$FT_STEPS" --init-from "$F/A"
  train "$F/D" "$F/b-ds" "$STEPS" --pipeline "$PIPE"
  score "$k" "$F" A a-ds "$STEPS" >> "$ROWS"
  score "$k" "$F" B b-ds "A+$FT_STEPS" >> "$ROWS"
  score "$k" "$F" C c-ds "A+$FT_STEPS" >> "$ROWS"
  score "$k" "$F" D b-ds "$STEPS" >> "$ROWS"
done
column -t -s $'\t' "$ROWS"
