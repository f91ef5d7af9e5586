#!/usr/bin/env bash
# A training step of convroll4, ours (benches/train_step.rs in its timing mode) against the same
# network in PyTorch (scripts/pytorch_train_step.py): same machine, same libtorch version, same
# thread count, same batch. Runs alternate (ours, PyTorch, ours, PyTorch, ...) so that drift on a
# shared machine hits both; warm-up steps are discarded. Prints a markdown table of medians and
# the ratio PyTorch / ours (> 1: ours is faster), which docs/BENCHMARKS.md quotes. Before timing,
# each case is checked to compute the same logits and updates on both sides.
#
#   scripts/train_step_compare.sh        # or: make bench-train
# Knobs (environment): PLANKTON_TORCH_PYTHON (default .pyenv-torch/bin/python),
#   ROUNDS (3), THREADS ("2 1"), CASES ("95_w1 95_w0.25 47_w0.5"),
#   PHASES (1: the first round also times forward / backward / optimiser separately),
#   PRELU (1: every round also times PyTorch with torch.prelu for the activation, as plankton
#   computes it, to show what the activation costs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PLANKTON_TORCH_PYTHON:-.pyenv-torch/bin/python}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-"2 1"}
CASES=${CASES:-"95_w1 95_w0.25 47_w0.5"}
PHASES=${PHASES:-1}
PRELU=${PRELU:-0}
OUT=target/train-step-compare
mkdir -p "$OUT"
RESULTS="$OUT/results.jsonl"
: > "$RESULTS"

# (warm-up, timed) steps per case: a step takes ~2-5 s at full width, ~0.1-0.8 s otherwise.
steps_for() {
    case "$1" in
        95_w1) echo "3 10" ;;
        95_w0.25) echo "5 30" ;;
        *) echo "5 50" ;;
    esac
}

# Build once, then run the binaries directly: no rebuild can slip in between the runs.
echo ">> building (release)" >&2
cargo build --release --bin plankton >&2
BENCH=$(cargo bench --bench train_step --no-run --message-format=json 2>/dev/null |
    "$PY" -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "train_step" and m.get("executable"):
        print(m["executable"])')
[ -x "$BENCH" ] || { echo "train_step bench binary not found" >&2; exit 1; }

# First prove that both sides are the same network with the same update (dropout off).
for c in $CASES; do
    echo ">> $c: same parameters, logits and two optimiser steps on both sides?" >&2
    PLANKTON_TRAIN_STEP="case=$c check=$OUT/check-$c.safetensors" "$BENCH"
    "$PY" scripts/pytorch_train_step.py --case "$c" --check "$OUT/check-$c.safetensors" --plankton target/release/plankton
done

for t in $THREADS; do
    for c in $CASES; do
        read -r warm steps <<< "$(steps_for "$c")"
        for r in $(seq 1 "$ROUNDS"); do
            ph=0
            [ "$PHASES" = 1 ] && [ "$r" = 1 ] && ph=1
            echo ">> $c, $t thread(s), round $r/$ROUNDS: ours, then PyTorch$([ "$PRELU" = 1 ] && echo ' (leaky_relu, then prelu)')" >&2
            PLANKTON_TRAIN_STEP="case=$c threads=$t warmup=$warm steps=$steps phases=$ph" "$BENCH" >> "$RESULTS"
            "$PY" scripts/pytorch_train_step.py --case "$c" --threads "$t" --warmup "$warm" --steps "$steps" \
                $([ "$ph" = 1 ] && echo --phases) --plankton target/release/plankton >> "$RESULTS"
            if [ "$PRELU" = 1 ]; then
                "$PY" scripts/pytorch_train_step.py --case "$c" --threads "$t" --warmup "$warm" --steps "$steps" \
                    $([ "$ph" = 1 ] && echo --phases) --activation prelu >> "$RESULTS"
            fi
        done
    done
done

{
    echo "Machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores;" \
        "$(rustc --version | cut -d' ' -f1-2); Python $("$PY" -c 'import platform; print(platform.python_version())')," \
        "torch $("$PY" -c 'import torch; print(torch.__version__)'), libtorch $(sed -n 's/^Version: //p' .libtorch/torch-*.dist-info/METADATA 2>/dev/null || echo '?')"
    echo "Rounds: $ROUNDS alternating runs per case and thread count, batch 32."
    echo
    "$PY" - "$RESULTS" <<'EOF'
import json, statistics as st, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
key = lambda r: (r["threads"], r["case"])  # noqa: E731
order = list(dict.fromkeys(key(r) for r in rows))
med = st.median
runs = lambda k, impl: [r for r in rows if key(r) == k and r["impl"] == impl]  # noqa: E731
prelu = any(r["impl"] == "pytorch-prelu" for r in rows)
print("Per run the median step; per case the median over runs. Ratio > 1: ours is faster.")
print("\"fastest\": the ratio of the fastest single steps (other jobs only ever add time).")
print()
head = "| case | threads | runs x timed steps | ours, s/step | PyTorch, s/step | **PyTorch / ours** | fastest | per round |"
if prelu:
    head += " PyTorch with prelu / ours |"
print(head)
print("|---" * (head.count("|") - 1) + "|")
for k in order:
    ours, torch = runs(k, "plankton"), runs(k, "pytorch")
    o = [med(r["step_s"]) for r in ours]
    p = [med(r["step_s"]) for r in torch]
    fastest = min(min(r["step_s"]) for r in torch) / min(min(r["step_s"]) for r in ours)
    rounds = " ".join(f"{b / a:.2f}" for a, b in zip(o, p))
    line = (f"| {k[1]} | {k[0]} | {len(ours)} x {len(ours[0]['step_s'])} | {med(o):.3f} | {med(p):.3f} | "
            f"**{med(p) / med(o):.2f}** | {fastest:.2f} | {rounds} |")
    if prelu:
        q = [med(r["step_s"]) for r in runs(k, "pytorch-prelu")]
        line += f" {med(q) / med(o):.2f} |" if q else " |"
    print(line)
phased = [r for r in rows if r["forward_s"]]
if phased:
    print()
    print("Phases (first round, median s/step): forward + loss / backward / loss read + optimiser step")
    print()
    impls = [i for i in ("plankton", "pytorch", "pytorch-prelu") if any(r["impl"] == i for r in phased)]
    names = {"plankton": "ours", "pytorch": "PyTorch", "pytorch-prelu": "PyTorch prelu"}
    cols = [f"{names[i]} {ph}" for ph in ("fwd", "bwd", "opt") for i in impls]
    print("| case | threads | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for k in order:
        got = {i: next((r for r in phased if key(r) == k and r["impl"] == i), None) for i in impls}
        if all(got.values()):
            cells = [f"{med(got[i][ph]):.4f}" for ph in ("forward_s", "backward_s", "optimizer_s") for i in impls]
            print(f"| {k[1]} | {k[0]} | " + " | ".join(cells) + " |")
EOF
} | tee "$OUT/report.md"
