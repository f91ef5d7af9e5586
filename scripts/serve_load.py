"""Load test of `plankton serve` on loopback, bounded in time and count (standard library only).

Starts the daemon on a trained run, then:
  1. fixed rate: RATE uploads/s (open loop: requests are sent on schedule, whatever the answers)
     for SECONDS, each with ?wait=true so the answer carries the prediction;
  2. overload: CLIENTS threads uploading back to back for SECONDS (no pause), with a small
     ingest queue so backpressure (503 + Retry-After) must show.
Reports per phase: uploads sent, accepted, refused (503), sustained predictions/s, client-side
end-to-end latency p50/p99 (upload sent -> prediction received), and the daemon's peak resident
memory (VmHWM). Prints a Markdown table.

Usage: python3 scripts/serve_load.py RUN_DIR IMAGE_DIR [RATE] [SECONDS] [CLIENTS]
           [--binary B] [--device D] [--only fixed|overload] [--json]
--device puts the model on D (auto, cpu, cuda, ...); --json ends with one JSON line for the
overload phase, with each daemon stage's busy time per wall-clock second (spool = copy + fsync,
decode = decode + warp, model = forward pass, writer = Parquet rows and finished files):
scripts/gpu_check.py reads it.
"""
import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("run")
ap.add_argument("image_dir")
ap.add_argument("rate", nargs="?", type=float, default=20.0)
ap.add_argument("seconds", nargs="?", type=float, default=15.0)
ap.add_argument("clients", nargs="?", type=int, default=16)
ap.add_argument("--binary", default=str(Path(__file__).resolve().parent.parent / "target/release/plankton"))
ap.add_argument("--device", default="cpu")
ap.add_argument("--only", choices=["fixed", "overload"])
ap.add_argument("--json", action="store_true")
args = ap.parse_args()
run, image_dir = Path(args.run).resolve(), Path(args.image_dir)
rate, seconds, clients = args.rate, args.seconds, args.clients
binary = Path(args.binary)
images = [p.read_bytes() for p in sorted(image_dir.rglob("*.jpg")) + sorted(image_dir.rglob("*.png"))][:200]
assert images, f"no .jpg or .png under {image_dir}"
STAGES = ("spool", "decode", "model", "writer")


def start(work, ingest):
    cfg = work / "daemon.toml"
    cfg.write_text(f"""
model = "{run}"
device = "{args.device}"
threads = 0
spool = "{work}/spool"
quarantine = "{work}/quarantine"
[watch]
enabled = false
[http]
bind = "127.0.0.1:0"
sync_timeout_ms = 30000
[batch]
max_images = 32
max_latency_ms = 20
[queue]
ingest = {ingest}
patches = 64
[output]
dir = "{work}/out"
roll_rows = 100000
roll_seconds = 30
""")
    proc = subprocess.Popen([str(binary), "serve", "--pipeline", str(cfg)], stdout=subprocess.PIPE,
                            stderr=open(work / "daemon.log", "w"), text=True)
    addr = None
    ready = False
    for line in proc.stdout:
        m = re.match(r"listening on http://(\S+)", line)
        if m:
            addr = m.group(1)
        if line.startswith("ready"):
            ready = True
            break
    if not ready:
        code = proc.wait(timeout=60)
        log = (work / "daemon.log").read_text().strip().splitlines()
        raise SystemExit(f"the daemon did not start (exit {code}): " + " | ".join(log[-5:]))
    host, port = addr.rsplit(":", 1)
    return proc, host, int(port)


def upload(host, port, i, results, wait=True):
    t0 = time.monotonic()
    try:
        c = http.client.HTTPConnection(host, port, timeout=60)
        c.request("POST", f"/v1/images?id=load-{i}" + ("&wait=true" if wait else ""), body=images[i % len(images)])
        r = c.getresponse()
        r.read()
        c.close()
        results.append((r.status, time.monotonic() - t0))
    except Exception as e:  # counted, not raised: the load test reports errors
        results.append((str(e), time.monotonic() - t0))


def peak_rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric(host, port, name):
    c = http.client.HTTPConnection(host, port, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    m = re.search("^" + re.escape(name) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def summarise(name, results, wall, pid, latencies=None):
    ok = [t for s, t in results if s in (200, 202)]
    refused = sum(1 for s, _ in results if s == 503)
    other = [s for s, _ in results if s not in (200, 202, 503)]
    lat = latencies or ok
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return (f"| {name} | {len(results)} | {len(ok)} | {refused} | {len(other)} | {len(ok) / wall:.1f} | "
            f"{1000 * q[49]:.0f} | {1000 * q[98]:.0f} | {peak_rss_mib(pid):.0f} |")


def busy_seconds(host, port):
    return {st: metric(host, port, f'plankton_stage_busy_seconds_sum{{stage="{st}"}}') for st in STAGES}


rows = []
last = None
with tempfile.TemporaryDirectory() as tmp:
    if args.only != "overload":
        work = Path(tmp) / "fixed"
        work.mkdir()
        proc, host, port = start(work, ingest=1024)
        results, threads = [], []
        n = int(rate * seconds)
        t_start = time.monotonic()
        for i in range(n):
            delay = t_start + i / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t = threading.Thread(target=upload, args=(host, port, i, results))
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        rows.append(summarise(f"fixed rate {rate:g}/s", results, time.monotonic() - t_start, proc.pid))
        proc.terminate()
        proc.wait(timeout=60)

    if args.only != "fixed":
        work = Path(tmp) / "overload"
        work.mkdir()
        proc, host, port = start(work, ingest=8)
        results = []
        stop = time.monotonic() + seconds
        counter = iter(range(10**9))
        lock = threading.Lock()

        def client():
            while time.monotonic() < stop:
                with lock:
                    i = next(counter)
                upload(host, port, i, results, wait=False)

        busy_before = busy_seconds(host, port)
        t_start = time.monotonic()
        workers = [threading.Thread(target=client) for _ in range(clients)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        # Every accepted upload must come out predicted: wait for the count (bounded).
        accepted = sum(1 for s, _ in results if s == 202)
        deadline = time.monotonic() + 120
        while metric(host, port, "plankton_predict_images_total") < accepted and time.monotonic() < deadline:
            time.sleep(0.1)
        wall = time.monotonic() - t_start
        predicted = metric(host, port, "plankton_predict_images_total")
        assert predicted >= accepted, f"only {predicted} of {accepted} accepted uploads predicted"
        busy_after = busy_seconds(host, port)
        # Latency: the daemon's own histogram (accepted -> row), the clients did not wait.
        p50 = metric(host, port, 'plankton_serve_latency_seconds{quantile="0.5"}')
        p99 = metric(host, port, 'plankton_serve_latency_seconds{quantile="0.99"}')
        refused = sum(1 for s, _ in results if s == 503)
        other = sum(1 for s, _ in results if s not in (202, 503))
        rss = peak_rss_mib(proc.pid)
        rows.append(f"| overload ({clients} clients back to back, no wait, ingest queue 8) | {len(results)} | {accepted} | "
                    f"{refused} | {other} | {accepted / wall:.1f} | {1000 * p50:.0f}* | {1000 * p99:.0f}* | {rss:.0f} |")
        last = {"uploads": len(results), "accepted": accepted, "refused": refused, "other_errors": other,
                "seconds": round(wall, 2), "predictions_per_second": round(accepted / wall, 1),
                "latency_p50_ms": round(1000 * p50, 1), "latency_p99_ms": round(1000 * p99, 1), "peak_rss_mib": round(rss),
                "busy_per_second": {st: round((busy_after[st] - busy_before[st]) / wall, 3) for st in STAGES},
                "device_asked": args.device, "clients": clients}
        proc.terminate()
        code = proc.wait(timeout=60)
        assert code == 0, f"daemon exited {code}"

print("| phase | uploads | predicted | refused (503) | other errors | predictions/s | p50 ms | p99 ms | peak RSS MiB |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(r)
print(f"\nmodel: {run} on {args.device}; {len(images)} distinct images from {image_dir}; {os.cpu_count()} cores")
print("* overload latency: the daemon's histogram (spooled -> row), clients did not wait for answers")
if args.json and last:
    print(json.dumps(last))
