"""Crash test of `plankton serve`: N uploads under random `kill -9`s, then every acknowledged
image must be in a finished Parquet file (or quarantined with its error row), loopback only,
bounded in count and time.

What it does:
  1. a tiny run (synthetic 4-class data, a few training steps) unless --run is given;
  2. a daemon on 127.0.0.1:0 with a small roll (files finish every --roll-rows rows, so kills land
     both before and after files are renamed into place);
  3. --clients threads upload --uploads images, each with its own id. A share (--bad) are
     truncated JPEGs (quarantined), and each of those ids is uploaded again later with a good
     image (the reused-id case). A client whose request fails (the daemon is down) retries the
     same upload after the restart, as a camera would;
  4. a killer sends SIGKILL at random moments (--kills times), the daemon is restarted each time;
  5. at the end, SIGTERM (drain), then the finished files are read (pyarrow) and compared with
     what the clients were told.

Reported: uploads acknowledged (202/200/422) vs present in the output, missing (must be 0), ids
with duplicate rows (allowed: at-least-once, told apart by `seq`), reused ids whose good image
was predicted after the quarantined one, the spool left over (must be empty), partial files
left over (must be none). Exit status 1 when a promise was broken.

Usage: python scripts/serve_crash_test.py [--uploads N] [--kills K] [--clients C] [--bad F]
         [--seed S] [--run RUN_DIR] [--out DIR] [--binary PATH]
(needs pyarrow: `make pytools`, then .pyenv-tools/bin/python)
"""
import argparse
import collections
import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent

# The tiny run the daemon's tests train too.
TINY_PIPELINE = ROOT / "pipelines" / "tiny-serve.toml"


def parse_args():
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--uploads", type=int, default=2000)
    a.add_argument("--kills", type=int, default=8)
    a.add_argument("--clients", type=int, default=8)
    a.add_argument("--bad", type=float, default=0.05, help="share of truncated uploads")
    a.add_argument("--roll-rows", type=int, default=50)
    a.add_argument("--seed", type=int, default=1)
    a.add_argument("--run", type=Path, help="a trained run (default: train a tiny one)")
    a.add_argument("--images", type=Path, help="images to upload with --run (JPEG/PNG, searched recursively)")
    a.add_argument("--out", type=Path, help="where to keep the work and report (default: a temp dir)")
    a.add_argument("--binary", type=Path, default=ROOT / "target/release/plankton")
    a.add_argument("--time-limit", type=float, default=600.0, help="seconds before giving up")
    return a.parse_args()


def sh(*cmd):
    subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def tiny_run(binary, work):
    data, run = work / "data", work / "run"
    sh(binary, "synth", "--out", data, "--classes", 4, "--per-class", 8, "--test", 40, "--seed", 11, "--threads", 1)
    sh(binary, "train", "--pipeline", TINY_PIPELINE, "--data", data, "--out", run)
    return run, sorted((data / "test").glob("*"))


class Daemon:
    def __init__(self, binary, work, run, roll_rows):
        self.cfg = work / "daemon.toml"
        self.cfg.write_text(f"""
name = "crash-test"
model = "{run}"
threads = 1
spool = "{work}/spool"
quarantine = "{work}/quarantine"
[watch]
enabled = false
[http]
bind = "127.0.0.1:0"
sync_timeout_ms = 20000
backpressure = "block"
[batch]
max_images = 16
max_latency_ms = 5
[queue]
ingest = 256
patches = 64
workers = 1
[output]
dir = "{work}/out"
roll_rows = {roll_rows}
roll_seconds = 2
""")
        self.binary, self.work = binary, work
        self.proc, self.port = None, None

    def start(self):
        log = open(self.work / "daemon.log", "a")
        self.proc = subprocess.Popen([str(self.binary), "serve", "--pipeline", str(self.cfg)],
                                     stdout=subprocess.PIPE, stderr=log, text=True)
        for line in self.proc.stdout:
            m = re.match(r"listening on http://[^:]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
            if line.startswith("ready: "):
                break
        else:
            raise SystemExit(f"daemon did not start: see {self.work / 'daemon.log'}")
        # Keep reading stdout so the daemon never blocks on a full pipe.
        threading.Thread(target=lambda p=self.proc: [None for _ in p.stdout], daemon=True).start()

    def kill9(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def main():
    args = parse_args()
    args.binary = args.binary.resolve()
    rng = random.Random(args.seed)
    out = args.out or Path(tempfile.mkdtemp(prefix="plankton-crash-"))
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()  # the daemon's config takes paths relative to its own folder
    work = out / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    if args.run:
        if not args.images:
            raise SystemExit("--run needs --images")
        run, images = args.run.resolve(), sorted(args.images.rglob("*"))[:500]
    else:
        run, images = tiny_run(args.binary, work)
    good = [p.read_bytes() for p in images if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    assert good, "no images to upload"

    # The uploads: (id, bytes, kind). Each truncated id comes back later with a good image.
    tasks = []
    reuse = []
    for i in range(args.uploads):
        uid = f"u{i:06d}"
        if rng.random() < args.bad:
            tasks.append((uid, good[i % len(good)][:40], "bad"))
            reuse.append(uid)
        else:
            tasks.append((uid, good[i % len(good)], "good"))
    for j, uid in enumerate(reuse):
        pos = rng.randrange(tasks.index(next(t for t in tasks if t[0] == uid)) + 1, len(tasks) + 1)
        tasks.insert(pos, (uid, good[j % len(good)], "reused"))

    daemon = Daemon(args.binary, work, run, args.roll_rows)
    daemon.start()
    lock = threading.Lock()
    cursor = [0]
    acked = collections.defaultdict(list)  # id -> kinds acknowledged
    refused_422 = collections.Counter()
    retries = [0]
    up = threading.Event()
    up.set()
    deadline = time.monotonic() + args.time_limit

    def client():
        while time.monotonic() < deadline:
            with lock:
                if cursor[0] >= len(tasks):
                    return
                uid, body, kind = tasks[cursor[0]]
                cursor[0] += 1
            while time.monotonic() < deadline:
                # A reused id goes only after its bad upload was acknowledged (the client learns
                # of the refusal first, as a real one would).
                if kind == "reused":
                    with lock:
                        ready = "bad" in acked[uid]
                    if not ready:
                        time.sleep(0.01)
                        continue
                up.wait()
                port = daemon.port
                try:
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    wait = "&wait=true" if kind == "bad" else ""
                    c.request("POST", f"/v1/images?id={uid}{wait}", body=body)
                    r = c.getresponse()
                    r.read()
                    c.close()
                except (OSError, http.client.HTTPException):
                    retries[0] += 1
                    time.sleep(0.05)
                    continue
                if r.status in (200, 202) or (r.status == 422 and kind == "bad"):
                    with lock:
                        acked[uid].append(kind)
                        if r.status == 422:
                            refused_422[kind] += 1
                    break
                if r.status == 503:
                    time.sleep(0.05)
                    continue
                raise SystemExit(f"{uid} ({kind}): unexpected {r.status}")

    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in threads:
        t.start()
    # Kills at random moments of the upload stream: when the acknowledged count passes each of
    # --kills random points (plus a random few milliseconds, so a kill can land mid-request).
    points = sorted(rng.sample(range(max(1, len(tasks) // 20), len(tasks)), min(args.kills, len(tasks) - 1)))
    kills = 0
    t0 = time.monotonic()
    for point in points:
        while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            with lock:
                done = sum(len(k) for k in acked.values())
            if done >= point:
                break
            time.sleep(0.002)
        if not any(t.is_alive() for t in threads):
            break
        time.sleep(rng.uniform(0.0, 0.02))
        up.clear()
        daemon.kill9()
        kills += 1
        daemon.start()
        up.set()
    for t in threads:
        t.join()
    stop_status = daemon.stop()
    took = time.monotonic() - t0

    # What the output holds.
    outdir = work / "out"
    partial = [p.name for p in outdir.iterdir() if p.name.endswith(".partial")]
    rows = collections.defaultdict(list)  # id -> [(seq, has_probabilities)]
    for f in sorted(outdir.glob("predictions-*.parquet")):
        # `seq` came with issue 12: an older daemon's files (run for comparison) lack it.
        names = pq.read_schema(f).names
        cols = ["image_id", "probabilities"] + (["seq"] if "seq" in names else [])
        for r in pq.read_table(f, columns=cols).to_pylist():
            rows[r["image_id"]].append((r.get("seq", 0), r["probabilities"] is not None))
    def listing(d):
        return sorted(p.name for p in d.iterdir()) if d.is_dir() else []

    spool_left = listing(work / "spool" / "pending")
    owed_left = listing(work / "spool" / "quarantined")
    quarantined = {p.name for p in (work / "quarantine").iterdir() if not p.name.endswith(".reason")}

    missing, reuse_wrong, bad_missing = [], [], []
    for uid, kinds in acked.items():
        have = rows.get(uid, [])
        if "good" in kinds and not any(ok for _, ok in have):
            missing.append(uid)
        if "bad" in kinds and not any(not ok for _, ok in have):
            bad_missing.append(uid)
        if "reused" in kinds:
            bad_seqs = [s for s, ok in have if not ok]
            good_seqs = [s for s, ok in have if ok]
            if not good_seqs or (bad_seqs and max(good_seqs) < max(bad_seqs)):
                reuse_wrong.append(uid)
    unacked = [t for t in tasks if t[2] not in acked.get(t[0], [])]
    duplicated = sum(1 for uid, have in rows.items() if len(have) > len(acked.get(uid, [])))
    extra_rows = sum(max(0, len(have) - len(acked.get(uid, []))) for uid, have in rows.items())
    report = {
        "uploads": len(tasks),
        "kills": kills,
        "clients": args.clients,
        "seconds": round(took, 1),
        "client_retries": retries[0],
        "acknowledged": sum(len(k) for k in acked.values()),
        "unacknowledged_at_the_end": len(unacked),
        "ids_in_output": len(rows),
        "rows_in_output": sum(len(h) for h in rows.values()),
        "missing_acknowledged_images": len(missing),
        "missing_error_rows": len(bad_missing),
        "reused_ids": len(reuse),
        "reused_ids_not_predicted_after_their_quarantine": len(reuse_wrong),
        "refused_422": dict(refused_422),
        "quarantined_files": len(quarantined),
        "ids_with_duplicate_rows": duplicated,
        "duplicate_rows": extra_rows,
        "spool_left": len(spool_left),
        "owed_error_rows_left": len(owed_left),
        "partial_files_left": len(partial),
        "sigterm_exit": stop_status,
    }
    broken = (missing or bad_missing or reuse_wrong or unacked or spool_left or owed_left or partial
              or stop_status != 0)
    report["verdict"] = "BROKEN" if broken else "ok"
    (out / "crash_report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in report.items()]
    (out / "crash_report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if missing or bad_missing or reuse_wrong:
        print("examples:", (missing + bad_missing + reuse_wrong)[:10], file=sys.stderr)
    print(f"report: {out / 'crash_report.json'}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
