"""Throughput of the daemon through NATS JetStream (one and two daemons) against direct folder
ingest, in one run on one machine, and the duplicates one `kill -9` leaves (docs/BENCHMARKS.md).

Each case: a fresh nats-server (JetStream on a temp store), fresh daemon folders, the same N
images; time from the first publish (or the first file copied into the watched folder) until
every image has a row in a finished Parquet file. All cases use one torch thread and one
decode worker per daemon, so two daemons on two cores can show whether the group scales.

Cases:
  folder        one daemon, [watch] on a folder the images are copied into (files rolled every
                second)
  nats-1        one daemon, `plankton publish` of the folder, files rolled every second
  nats-2        two daemons sharing the durable consumer
  nats-1-roll300  nats-1 with the default roll_seconds (300): the ack-after-durable rule lets the
                group hold at most max_ack_pending images until their file is finished, so this
                measures the pressure roll (a file is finished early when the group nears the cap)
  kill          two daemons, one killed with SIGKILL mid-stream and restarted: extra rows

Usage: python scripts/nats_bench.py [--images N] [--binary PATH] [--nats-server PATH]
       [--max-ack-pending M] [--out DIR]
(needs pyarrow: `make pytools`, then .pyenv-tools/bin/python; nats-server: `make nats-server`)
"""
import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
TINY_PIPELINE = ROOT / "pipelines" / "tiny-serve.toml"


def parse_args():
    a = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    a.add_argument("--images", type=int, default=2000)
    a.add_argument("--max-ack-pending", type=int, default=256)
    a.add_argument("--binary", type=Path, default=ROOT / "target/release/plankton")
    a.add_argument("--nats-server", type=Path, default=ROOT / ".tools/bin/nats-server")
    a.add_argument("--out", type=Path, help="work folder (default: a temp dir)")
    a.add_argument("--cases", default="folder,nats-1,nats-2,nats-1-roll300,kill")
    return a.parse_args()


def sh(*cmd):
    subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nats:
    def __init__(self, binary, store):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [str(binary), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(store)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("nats-server did not start")

    @property
    def url(self):
        return f"nats://127.0.0.1:{self.port}"

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class Daemon:
    def __init__(self, binary, work, run, nats_url=None, watch_dir=None, roll_seconds=1, max_ack_pending=256):
        work.mkdir(parents=True, exist_ok=True)
        self.work, self.binary = work, binary
        self.cfg = work / "daemon.toml"
        source = ""
        if nats_url:
            source = f"""
[nats]
enabled = true
servers = ["{nats_url}"]
stream = "BENCH"
subjects = ["bench.>"]
consumer = "bench"
batch = 64
ack_wait_seconds = 5
max_ack_pending = {max_ack_pending}
"""
        if watch_dir:
            source = f"""
[watch]
enabled = true
dir = "{watch_dir}"
mode = "notify"
settle_ms = 50
"""
        self.cfg.write_text(f"""name = "bench"
model = "{run}"
device = "cpu"
threads = 1
spool = "{work / 'spool'}"
quarantine = "{work / 'quarantine'}"
[http]
enabled = false
{source}
[batch]
max_images = 32
max_latency_ms = 20
[queue]
workers = 1
[output]
dir = "{work / 'out'}"
roll_rows = 100000
roll_seconds = {roll_seconds}
""")
        self.proc = None

    def start(self):
        log = open(self.work / "daemon.log", "a")
        self.proc = subprocess.Popen([str(self.binary), "serve", "--pipeline", str(self.cfg)],
                                     stdout=subprocess.PIPE, stderr=log, text=True)
        for line in self.proc.stdout:
            if line.startswith("ready:"):
                return
        raise SystemExit(f"daemon did not start: {(self.work / 'daemon.log').read_text()[-2000:]}")

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=120)

    def rows(self):
        ids = []
        out = self.work / "out"
        for f in sorted(out.glob("predictions-*.parquet")) if out.exists() else []:
            ids.extend(pq.read_table(f, columns=["image_id"]).column("image_id").to_pylist())
        return ids


def wait_rows(daemons, n, limit=1800):
    t0 = time.time()
    while time.time() - t0 < limit:
        ids = [i for d in daemons for i in d.rows()]
        if len(set(ids)) >= n:
            return ids
        time.sleep(0.05)
    raise SystemExit(f"only {len(set(ids))} of {n} images after {limit} s")


def publish(binary, url, images):
    subprocess.run([str(binary), "publish", "--nats", url, "--stream", "BENCH", "--subject", "bench.cam1",
                    str(images)], check=True, stdout=subprocess.DEVNULL)


def case(name, a, work, run, images, n):
    root = work / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    result = {"case": name}
    if name == "folder":
        watch = root / "in"
        watch.mkdir()
        d = Daemon(a.binary, root / "d", run, watch_dir=watch)
        d.start()
        t0 = time.time()
        for f in sorted(images.iterdir()):
            shutil.copy(f, watch / f.name)
        ids = wait_rows([d], n)
        result["seconds"] = time.time() - t0
        d.stop()
    else:
        nats = Nats(a.nats_server, root / "js")
        count = 2 if name in ("nats-2", "kill") else 1
        roll = 300 if name == "nats-1-roll300" else 1
        ds = [Daemon(a.binary, root / f"d{i}", run, nats_url=nats.url, roll_seconds=roll,
                     max_ack_pending=a.max_ack_pending) for i in range(count)]
        for d in ds:
            d.start()
        t0 = time.time()
        publish(a.binary, nats.url, images)
        result["published_s"] = time.time() - t0
        if name == "kill":
            while len(ds[0].rows()) < n // 4:
                time.sleep(0.02)
            ds[0].kill()
            ds[0].start()
        if roll == 300:
            # The last messages wait for the roll like any source's rows (a backlog's tail holds
            # less than the pressure threshold): timed up to the rows before that tail.
            target = n - a.max_ack_pending
            ids = wait_rows(ds, target)
            result["seconds"] = time.time() - t0
            result["timed_rows"] = target
        else:
            ids = wait_rows(ds, n)
            result["seconds"] = time.time() - t0
        time.sleep(1.5)  # rows of messages redelivered after the last one counted
        ids = [i for d in ds for i in d.rows()]
        result["rows_per_daemon"] = [len(d.rows()) for d in ds]
        for d in ds:
            if roll == 300:
                d.kill()  # not waiting 300 s for the tail's file
            else:
                d.stop()
        nats.stop()
    result["rows"] = len(ids)
    result["extra_rows"] = len(ids) - len(set(ids))
    result["images_per_s"] = result.get("timed_rows", n) / result["seconds"]
    return result


def main():
    a = parse_args()
    work = a.out or Path(tempfile.mkdtemp(prefix="nats-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data, run = work / "data", work / "run"
    if not run.exists():
        sh(a.binary, "synth", "--out", data, "--classes", 4, "--per-class", 8, "--test", a.images, "--seed", 11)
        sh(a.binary, "train", "--pipeline", TINY_PIPELINE, "--data", data, "--out", run)
    images = data / "test"
    n = sum(1 for _ in images.iterdir())
    results = []
    for name in a.cases.split(","):
        r = case(name, a, work, run, images, n)
        results.append(r)
        print(json.dumps(r), flush=True)
    base = next((r for r in results if r["case"] == "folder"), None)
    print(f"\n{n} images, max_ack_pending {a.max_ack_pending}; ratios against folder ingest in this run")
    print("| case | images/s | vs folder | extra rows |")
    print("|---|---|---|---|")
    for r in results:
        ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}" if base else "-"
        print(f"| {r['case']} | {r['images_per_s']:.0f} | {ratio} | {r['extra_rows']} |")
    (work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.exit(main())
