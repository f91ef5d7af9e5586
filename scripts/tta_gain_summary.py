"""Table of scripts/tta_gain.sh: log loss and top-1 per (transforms, aggregation), mean over
folds, and the throughput each prediction run printed. Standard library only."""
import json
import re
import statistics
import sys
from pathlib import Path

work, folds = Path(sys.argv[1]), int(sys.argv[2])
rows = {}
for report in sorted(work.glob("fold*-tta*/report.json")):
    m = re.match(r"fold(\d+)-tta(\d+)-(.+)", report.parent.name)
    fold, n, agg = int(m.group(1)), int(m.group(2)), m.group(3)
    r = json.loads(report.read_text())
    log = (report.parent.parent / (report.parent.name + ".log")).read_text()
    rate = re.search(r"([\d.]+) images/s, (\d+) patches/s", log)
    rows.setdefault((n, agg), []).append((fold, r["log_loss"], r["top_k"][0], r["n"], float(rate.group(1)), float(rate.group(2))))

print("| transforms | aggregation | folds | log loss (mean ± sd) | top-1 | images/s | patches/s |")
print("|---|---|---|---|---|---|---|")
base = None
for (n, agg), rs in sorted(rows.items()):
    ll = [r[1] for r in rs]
    top1 = [r[2] for r in rs]
    if n == 1:
        base = statistics.mean(ll)
    sd = statistics.stdev(ll) if len(ll) > 1 else 0.0
    print(f"| {n} | {agg} | {len(rs)} | {statistics.mean(ll):.3f} ± {sd:.3f} | {statistics.mean(top1):.3f} | "
          f"{statistics.median(r[4] for r in rs):.1f} | {statistics.median(r[5] for r in rs):.0f} |")
if base is not None:
    print()
    for (n, agg), rs in sorted(rows.items()):
        if n > 1:
            per_fold = {r[0]: r[1] for r in rs}
            base_fold = {r[0]: r[1] for r in rows[(1, "mean-probability")]}
            gains = [base_fold[f] - per_fold[f] for f in per_fold if f in base_fold]
            better = sum(g > 0 for g in gains)
            print(f"tta {n} {agg}: log loss lower than one pass by {statistics.mean(gains):.3f} on average, on {better} of {len(gains)} folds")
