"""Summarises cross-validation runs: mean and standard deviation over folds of the final
validation scores (last row of each run's history.csv). Standard library only.
Usage: cv_summary.py RUNS_DIR NET [NET ...]   (runs are RUNS_DIR/<net>-fold<k>/)"""
import csv
import statistics
import sys
from pathlib import Path

runs, nets = Path(sys.argv[1]), sys.argv[2:]
print("| network | folds | accuracy (top-1) | top-5 | log loss | minutes per run |")
print("|---|---|---|---|---|---|")
for net in nets:
    rows, minutes = [], []
    for run in sorted(runs.glob(f"{net}-fold*")):
        if not run.is_dir() or not (run / "model.safetensors").exists():
            continue
        with open(run / "history.csv") as f:
            rows.append(list(csv.DictReader(f))[-1])
        t = run.with_name(run.name + ".time")
        if t.exists():
            minutes.append(float(t.read_text().split()[-1]) / 60)

    def ms(key):
        v = [float(r[key]) for r in rows]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{statistics.mean(v):.3f} ± {sd:.3f}"

    if rows:
        mins = f"{statistics.mean(minutes):.1f}" if minutes else "-"
        print(f"| {net} | {len(rows)} | {ms('valid_top1')} | {ms('valid_top5')} | {ms('valid_loss')} | {mins} |")
