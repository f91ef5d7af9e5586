"""Mean and standard deviation over outer folds of each replay stage's scores
(scripts/replay_planktonclas.sh). Usage: python3 scripts/replay_summary.py WORK FOLDS"""
import json
import statistics
import sys

work, folds = sys.argv[1], int(sys.argv[2])
reports = [json.load(open(f"{work}/replay{k}/report.json")) for k in range(folds)]
print("| stage | valid log loss | test log loss | test top-1 | test loss lower than the stage before on |")
print("|---|---|---|---|---|")
prev = None
for i, stage in enumerate(reports[0]["stages"]):
    name = stage["stage"]

    def col(which, key):
        vals = [r["stages"][i][which][key] for r in reports if r["stages"][i][which]]
        if not vals:
            return "-", []
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{statistics.mean(vals):.3f} ± {sd:.3f}", vals

    v, _ = col("valid", "log_loss")
    t, tl = col("test", "log_loss")
    a, _ = col("test", "top1")
    better = "-"
    if prev and tl and len(prev) == len(tl):
        better = f"{sum(x < y for x, y in zip(tl, prev))} of {len(tl)} folds"
    print(f"| {name} | {v} | {t} | {a} | {better} |")
    # Fusion is a side branch when the replay does not blend it (fuse.only_if_better): the
    # blend is compared with the stage before fusion.
    if tl and name != "+ fusion":
        prev = tl
print()
for k, r in enumerate(reports):
    print(f"fold {k}: " + ", ".join(f"{s['stage']} {s['test']['log_loss']:.3f}" for s in r["stages"] if s["test"])
          + "; blend weights " + ", ".join(f"{n} {w:.2f}" for n, w in r["blend_weights"]))
