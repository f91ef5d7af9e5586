"""Reads a plankton predictions Parquet file the way downstream users would (pyarrow, pandas,
DuckDB) and checks it, then compares `plankton evaluate`'s log loss with scikit-learn's.

Usage: check_predictions.py PRED.parquet REPORT.json EXPECTED_ROWS EXPECTED_VIEWS
Prints one JSON line with what it found; exits non-zero on any mismatch.
Tested with pyarrow 26.0.1, pandas 3.1.1, duckdb 2.0.1, scikit-learn 1.9.1, numpy 2.4.6.
"""
import json
import sys

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from sklearn.metrics import log_loss

path, report_path, expected_rows, expected_views = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

table = pq.read_table(path)
meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
classes = json.loads(meta["plankton.class_names"])
model = json.loads(meta["plankton.model"])
assert meta["plankton.format"] == "predictions/1", meta["plankton.format"]
assert table.num_rows == expected_rows, (table.num_rows, expected_rows)
assert model["views"] == expected_views, model["views"]
assert model["tta"]["transforms"] == expected_views or expected_views == 1
for name in ["image_id", "source_path", "model_id", "label", "predicted_class", "confidence",
             "entropy", "probabilities", "top_classes", "top_probabilities", "views", "error"]:
    assert name in table.column_names, name

df = pd.read_parquet(path)
ok = df[df["error"].isna()]
probs = np.stack(ok["probabilities"].to_numpy()).astype(np.float64)
assert probs.shape[1] == len(classes), probs.shape
assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5), probs.sum(axis=1)
argmax = [classes[i] for i in probs.argmax(axis=1)]
assert list(ok["predicted_class"]) == argmax
assert np.allclose(ok["confidence"].to_numpy(), probs.max(axis=1), atol=1e-7)
assert all(len(t) == min(5, len(classes)) for t in ok["top_classes"])
assert (ok["views"] == expected_views).all()
failed = df[df["error"].notna()]
assert failed["probabilities"].isna().all()
assert (failed["views"] == 0).all()

con = duckdb.connect()
n_duck, mean_conf = con.execute(
    f"SELECT count(*), avg(confidence) FROM read_parquet('{path}')").fetchone()
assert n_duck == expected_rows, n_duck
assert abs(mean_conf - ok["confidence"].astype(np.float64).mean()) < 1e-6
first = con.execute(
    f"SELECT probabilities[1] FROM read_parquet('{path}') WHERE error IS NULL LIMIT 1").fetchone()[0]
assert abs(first - probs[0, 0]) < 1e-7

labelled = ok[ok["label"].notna()]
lp = np.stack(labelled["probabilities"].to_numpy()).astype(np.float64)
lp = lp / lp.sum(axis=1, keepdims=True)
lp = np.clip(lp, 1e-15, 1 - 1e-15)  # Kaggle's clipping (sklearn >= 1.5 clips to float eps only)
# Integer labels: with string labels sklearn would assume the columns sorted alphabetically.
y = [classes.index(c) for c in labelled["label"]]
sk = log_loss(y, lp, labels=list(range(len(classes))))
report = json.load(open(report_path))
assert abs(report["log_loss"] - sk) < 1e-6, (report["log_loss"], sk)
assert report["n"] == len(labelled)
print(json.dumps({"rows": table.num_rows, "failed": len(failed), "sklearn_log_loss": sk,
                  "plankton_log_loss": report["log_loss"], "duckdb_rows": n_duck}))
