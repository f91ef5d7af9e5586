#!/usr/bin/env bash
# Leave-one-class-out test of the unknown-image scores (max_probability, energy, mahalanobis) on
# a dataset (default: the 105 real planktonclas images; any competition-layout folder with a
# sampleSubmission.csv as DATA, with PIPELINE for its network): per fold, train on all classes
# but one (a sampleSubmission.csv without the held-out class makes train skip its folder), fit the unknown
# rule (calibrate --unknown), predict the run's validation images plus every image of the held-out
# class (predict --subset held-out) and score them (evaluate: AUROC per score, and at the run's
# thresholds the held-out images caught and the known ones flagged). Idempotent: finished steps
# are kept. RIDGES="0.1 1.0" also re-fits the rule (no retraining) with those --ridge values in
# copies of each run. Prints a TSV.
# Usage: BIN=... [PIPELINE=...] [MIN_IMAGES=...] scripts/unknown_heldout.sh WORK [DATA]
# (DATA: a competition-layout folder with all classes; default WORK/data, the planktonclas images
# built by scripts/planktonclas_all.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:?usage: unknown_heldout.sh WORK [DATA]}
BIN=${BIN:-./target/release/plankton}
PIPELINE=${PIPELINE:-pipelines/planktonclas-cyclic.toml}
RIDGES=${RIDGES:-}
# The pipeline's 10% validation split leaves 9-10 known images per fold, under calibrate's
# default --min-images (50) and under 10 too: the thresholds are noisy, the AUROCs less so.
MIN_IMAGES=${MIN_IMAGES:-5}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ -n "${2:-}" ]; then
  DATA=$2
else
  scripts/planktonclas_all.sh "$WORK" "$BIN"
  DATA=$WORK/data
fi
DATA=$(cd "$DATA" && pwd)
mkdir -p "$WORK/unknown"
W=$(cd "$WORK/unknown" && pwd)
IFS=, read -r -a HEADER < <(head -1 "$DATA/sampleSubmission.csv" | tr -d '\r')
CLASSES=("${HEADER[@]:1}")

# calibrate + predict + evaluate for one run directory (args: run dir, held-out dataset, ridge)
score_run() {
  local run=$1 held=$2 ridge=$3
  if [ ! -f "$run/unknown.json" ]; then
    $BIN calibrate --model "$run" --unknown --data "$held" --device cpu --min-images "$MIN_IMAGES" \
      --ridge "$ridge" > "$run/calibrate.log" 2>&1 || { echo "calibrate failed: $run" >&2; tail -5 "$run/calibrate.log" >&2; return 1; }
  fi
  if [ ! -f "$run/held_out.parquet" ]; then
    $BIN predict --model "$run" --data "$DATA" --subset held-out --out "$run/held_out.parquet.tmp" \
      --device cpu > "$run/predict.log" 2>&1 || { echo "predict failed: $run" >&2; tail -5 "$run/predict.log" >&2; return 1; }
    mv "$run/held_out.parquet.tmp" "$run/held_out.parquet"
  fi
  if [ ! -f "$run/report/unknown.json" ]; then
    $BIN evaluate --predictions "$run/held_out.parquet" --data "$DATA" --out "$run/report" \
      > "$run/evaluate.log" 2>&1 || { echo "evaluate failed: $run" >&2; tail -5 "$run/evaluate.log" >&2; return 1; }
  fi
}

for c in "${CLASSES[@]}"; do
  held="$W/H_$c" run="$W/run_$c"
  mkdir -p "$held"
  ln -sfn "$DATA/train" "$held/train"
  keep=("image")
  for k in "${CLASSES[@]}"; do [ "$k" = "$c" ] || keep+=("$k"); done
  (IFS=,; echo "${keep[*]}") > "$held/sampleSubmission.csv"
  if [ ! -f "$run/model.safetensors" ]; then
    resume=
    if [ -d "$run/checkpoints" ]; then resume=--resume; else rm -rf "$run"; fi
    mkdir -p "$W/logs"
    /usr/bin/time -f "%e" -o "$W/logs/train_$c.time" $BIN train --pipeline "$PIPELINE" \
      --data "$held" --out "$run" --device cpu $resume > "$W/logs/train_$c.log" 2>&1 \
      || { echo "train failed: $c" >&2; tail -5 "$W/logs/train_$c.log" >&2; continue; }
    cp "$W/logs/train_$c.time" "$run/train.time"
  fi
  score_run "$run" "$held" 0.01 || continue
  for r in $RIDGES; do
    rr="$W/run_$c-ridge$r"
    if [ ! -f "$rr/model.safetensors" ]; then
      rm -rf "$rr"; mkdir -p "$rr"
      # the run without its unknown rule, predictions and report (checkpoints are not needed)
      for f in "$run"/*; do
        case $(basename "$f") in
          unknown.json|held_out.parquet*|report|checkpoints|*.log) ;;
          *) cp -r "$f" "$rr/" ;;
        esac
      done
    fi
    score_run "$rr" "$held" "$r" || true
  done
done

python3 - "$W" "$DATA" "${CLASSES[@]}" <<'EOF'
import csv, json, statistics, sys
from pathlib import Path
w, data, classes = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
count = {c: sum(1 for p in (data / "train" / c).iterdir() if p.is_file()) for c in classes}
SCORES = ["max_probability", "energy", "mahalanobis"]

def fmt(x):
    return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))

def table(suffix, title):
    print(f"# {title}; caught/flagged: the `unknown` column (mahalanobis rule) on held-out / known images")
    print("\t".join(["fold", "known_images", "known_scored", "held_out", "steps", "train_s", "valid_top1",
                     *[f"auroc_{s}" for s in SCORES], "held_out_caught", "known_flagged"]))
    means = {s: [] for s in SCORES}
    for c in classes:
        run, base = w / f"run_{c}{suffix}", w / f"run_{c}"
        steps = top1 = secs = None
        if (base / "history.csv").exists():
            rows = list(csv.DictReader(open(base / "history.csv")))
            if rows:
                steps, top1 = rows[-1]["step"], float(rows[-1]["valid_top1"])
        if (base / "train.time").exists():
            secs = float(base.joinpath("train.time").read_text().split()[-1])
        rep = run / "report" / "unknown.json"
        rep = json.load(open(rep)) if rep.exists() else {"scores": []}
        au = {e["score"]: e.get("auroc") for e in rep["scores"]}
        for s in SCORES:
            if au.get(s) is not None:
                means[s].append(au[s])
        # known images: the run's validation images in the predictions (evaluate's count)
        print("\t".join(map(fmt, [c, sum(v for k, v in count.items() if k != c), rep.get("known"), rep.get("held_out", count[c]), steps,
                                  secs, top1, *[au.get(s) for s in SCORES],
                                  rep.get("rule_held_out_detected"),
                                  rep.get("rule_false_unknown_rate")])))
    print("\t".join(["mean", "", "", "", "", "", "",
                     *[fmt(statistics.mean(means[s])) if means[s] else "-" for s in SCORES], "", ""]))

table("", "ridge 0.01 (calibrate's default)")
for r in sorted({p.name.split("-ridge", 1)[1] for p in w.glob("run_*-ridge*")}, key=float):
    table(f"-ridge{r}", f"ridge {r}")
EOF
