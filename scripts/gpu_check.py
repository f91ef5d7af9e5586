#!/usr/bin/env python3
"""The GPU check as one prepared run: correctness on the GPU against the CPU, then speed.

Run it through scripts/gpu_check.sh (see there for the two commands). Phases, each one line in
<out>/results.jsonl, summarised in summary.json and summary.md:

  environment     what the binary found: libtorch, CUDA, devices (`plankton devices --json`)
  train_parity    the demo network (pipelines/demo-train.toml, dropout off) trained N steps from
                  the same seed on the CPU and on --device: per-step losses within 1e-3 relative
  invariance      the cyclic net's 90-degree invariance on --device (`plankton model --check-invariance`)
  predict_parity  `plankton predict` of the CPU-trained run on the CPU and on --device: the
                  probabilities within 1e-4
  train_speed     convroll4 (full width, 95x95, 121 classes) trained by `plankton train` on
                  synthetic images: images/s, the loader's batch-wait fraction, peak GPU memory,
                  at the reference's batch 32 fp32 and at larger batches / bf16 / channels-last
  pytorch_speed   the same network in the machine's own PyTorch, eager and torch.compile
                  (scripts/pytorch_train_step.py), same batch and precision
  tta_speed       `plankton predict` with 70 transforms per image: images/s
  daemon          `plankton serve` with the model on --device under back-to-back uploads
                  (scripts/serve_load.py): sustained images/s and where the time goes

A correctness failure makes the exit status 1; a phase that fails to run is recorded with its
error and the run goes on; phases that would overrun --budget-s are recorded as skipped.
--tiny shrinks every size so the whole run takes about a minute on 2 CPU cores (`make test`).
"""

import argparse
import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_IMAGES = 215_040 * 32  # the reference convroll4 schedule: 215,040 steps of 32 images
TRAIN_REL_TOL = 1e-3
PREDICT_ABS_TOL = 1e-4
CORRECTNESS = ("train_parity", "invariance", "predict_parity")


class Check:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        # Thousands of small files: keep them out of --out where that folder is shipped back.
        self.work = Path(args.work).resolve() if args.work else self.out / "work"
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.results = self.out / "results.jsonl"
        self.results.write_text("")
        for stale in ("summary.json", "summary.md"):
            (self.out / stale).unlink(missing_ok=True)
        self.started = time.monotonic()
        self.deadline = self.started + args.budget_s
        self.env = os.environ.copy()
        self.env.setdefault("RUST_LOG", "warn")
        self.env.pop("RUST_BACKTRACE", None)
        self.device = args.device
        self.binary = self.find_binary()
        self.failed = False

    # ---- plumbing ----
    def find_binary(self):
        if self.args.binary:
            return str(Path(self.args.binary).resolve())
        for p in (ROOT / "target/gpu-pack/plankton", ROOT / "target/release/plankton"):
            if p.exists():
                return str(p)
        sys.exit("no plankton binary: run `scripts/gpu_check.sh pack` (or cargo build --release) first")

    def record(self, phase, **fields):
        line = {"phase": phase, "t": round(time.monotonic() - self.started, 1), **fields}
        with open(self.results, "a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"[{line['t']:7.1f}s] {phase}: " + json.dumps(fields)[:400], flush=True)
        return line

    def left(self):
        return self.deadline - time.monotonic()

    def run(self, argv, timeout=None, log=None):
        """Runs a command, stdout returned; a failure raises with the command's last output."""
        timeout = timeout or max(self.left(), 30)
        p = subprocess.run([str(a) for a in argv], env=self.env, capture_output=True, text=True, timeout=timeout)
        if log:
            (self.work / log).write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-8:]
            raise RuntimeError(f"{' '.join(map(str, argv[:3]))} ... exited {p.returncode}: " + " | ".join(tail))
        return p.stdout

    def plankton(self, *argv, **kw):
        return self.run([self.binary, *argv], **kw)

    def phase(self, name, need_s, fn):
        if self.left() < need_s:
            self.record(name, skipped=f"budget: {self.left():.0f} s left, needs about {need_s} s")
            # A correctness check that did not run has not passed.
            self.failed |= name in CORRECTNESS
            return
        try:
            fn()
        except Exception as e:  # recorded; the next phase still runs
            self.record(name, error=str(e)[:2000])
            self.failed |= name in CORRECTNESS

    def ensure_libtorch(self):
        """A binary built elsewhere finds libtorch through LD_LIBRARY_PATH: the torch install of
        --torch-python (the GPU machine's own PyTorch) when its build-time rpath is absent here."""
        ldd = subprocess.run(["ldd", self.binary], capture_output=True, text=True, env=self.env).stdout
        if "libtorch_cpu.so => not found" not in ldd:
            return None
        code = "import importlib.util, os; s = importlib.util.find_spec('torch'); print(os.path.join(s.submodule_search_locations[0], 'lib'))"
        lib = subprocess.run([self.args.torch_python, "-c", code], capture_output=True, text=True).stdout.strip()
        if not lib or not Path(lib, "libtorch_cpu.so").exists():
            sys.exit(f"{self.binary} needs libtorch_cpu.so and {self.args.torch_python} has no torch to lend it")
        self.env["LD_LIBRARY_PATH"] = lib + (":" + self.env["LD_LIBRARY_PATH"] if self.env.get("LD_LIBRARY_PATH") else "")
        return lib

    def gpu_memory(self):
        return GpuMemory(self.device)

    # ---- sizes ----
    def sizes(self):
        if self.args.tiny:
            return dict(classes=4, per_class=10, test=16, parity_steps=12, speed_size=47, speed_width=0.5,
                        speed_case="47_w0.5", speed_steps=8, speed_configs=[(8, "fp32", False), (16, "bf16", True)],
                        compile_configs=[], torch_steps=3, tta=4, daemon_s=3)
        return dict(classes=121, per_class=24, test=1000, parity_steps=50, speed_size=95, speed_width=1.0,
                    speed_case="95_w1", speed_steps=800,
                    speed_configs=[(32, "fp32", False), (32, "bf16", True), (128, "fp32", False), (128, "bf16", True), (256, "bf16", True)],
                    compile_configs=[(32, "fp32", False), (128, "bf16", True)], torch_steps=200, tta=70, daemon_s=20)

    # ---- phases ----
    def environment(self):
        lib = self.ensure_libtorch()
        info = json.loads(self.plankton("devices", "--json"))
        smi = None
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True).stdout.strip()
        self.record("environment", binary=self.binary, binary_mib=round(os.path.getsize(self.binary) / 2**20, 1),
                    ld_library_path=lib, devices=info, nvidia_smi=smi, cpus=os.cpu_count(), device=self.device,
                    tiny=self.args.tiny)

    def data(self):
        s = self.sizes()
        t = time.monotonic()
        self.plankton("synth", "--out", self.work / "data", "--classes", s["classes"], "--per-class", s["per_class"],
                      "--test", s["test"], "--seed", 7)
        self.record("data", classes=s["classes"], train_images=s["classes"] * s["per_class"], test_images=s["test"],
                    seconds=round(time.monotonic() - t, 1))

    def parity_pipeline(self):
        """The demo network (pipelines/demo-train.toml) with dropout off: dropout masks come from
        each device's own generator, everything else is seeded identically on both."""
        text = (ROOT / "pipelines/demo-train.toml").read_text()
        text = re.sub(r"(?m)^\[train\]$", "[train]\ndropout = false\nlog_every = 10", text)
        text = re.sub(r"(?m)^\[zmuv\]\nsamples = \d+", "[zmuv]\nsamples = 256", text)
        path = self.work / "parity.toml"
        path.write_text(text)
        return path

    def train_parity(self):
        s = self.sizes()
        pipeline = self.parity_pipeline()
        losses = {}
        for tag, dev in (("cpu", "cpu"), ("device", self.device)):
            run = self.work / f"parity-{tag}"
            log = self.work / f"parity-{tag}-losses.csv"
            self.plankton("train", "--pipeline", pipeline, "--data", self.work / "data", "--out", run, "--device", dev,
                          "--steps", s["parity_steps"], "--loss-log", log, log=f"parity-{tag}.log")
            losses[tag] = [float(r["loss"]) for r in csv.DictReader(open(log))]
        a, b = losses["cpu"], losses["device"]
        worst = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)) if a and len(a) == len(b) else float("inf")
        ok = len(a) == s["parity_steps"] and len(b) == len(a) and worst <= TRAIN_REL_TOL
        self.failed |= not ok
        self.record("train_parity", ok=ok, steps=len(a), max_relative_difference=worst, tolerance=TRAIN_REL_TOL,
                    first_loss=[a[0] if a else None, b[0] if b else None], last_loss=[a[-1] if a else None, b[-1] if b else None])

    def invariance(self):
        path = self.work / "invariance.json"
        self.plankton("model", "--pipeline", ROOT / "pipelines/demo-train.toml", "--classes", 121, "--device", self.device,
                      "--check-invariance", "--json", path)
        r = json.loads(path.read_text())
        self.failed |= not r["ok"]
        self.record("invariance", **r)

    def predict_parity(self):
        import pyarrow.parquet as pq  # noqa: the GPU machine has pyarrow; .pyenv-tools here
        tables = {}
        for tag, dev in (("cpu", "cpu"), ("device", self.device)):
            out = self.work / f"predict-{tag}.parquet"
            self.plankton("predict", "--model", self.work / "parity-cpu", "--data", self.work / "data", "--out", out,
                          "--device", dev, "--tta", 4, "--no-calibration", "--weights", "final", log=f"predict-{tag}.log")
            t = pq.read_table(out).to_pydict()
            tables[tag] = {i: p for i, p, e in zip(t["image_id"], t["probabilities"], t["error"]) if e is None}
        a, b = tables["cpu"], tables["device"]
        common = sorted(set(a) & set(b))
        worst = max((abs(x - y) for i in common for x, y in zip(a[i], b[i])), default=float("inf"))
        ok = len(common) == len(a) == len(b) and len(common) > 0 and worst <= PREDICT_ABS_TOL
        self.failed |= not ok
        self.record("predict_parity", ok=ok, images=len(common), max_abs_difference=worst, tolerance=PREDICT_ABS_TOL)

    def speed_pipeline(self, batch, precision, channels_last, steps):
        s = self.sizes()
        path = self.work / f"speed-b{batch}-{precision}{'-cl' if channels_last else ''}.toml"
        path.write_text(f"""name = "gpu-check-speed"
seed = 1

[[patch]]
rows = {s['speed_size']}
cols = {s['speed_size']}

[zmuv]
samples = 256

[split]
valid_fraction = 0.0

[batch]
size = {batch}
drop_last = true

[channels]
batches = 8

[model]
preset = "convroll4"
width = {s['speed_width']}

[train]
steps = {steps}
validate_every = {steps // 2}
checkpoint_every = {steps}
log_every = 50
weight_decay = 0.0005

[compute]
precision = "{precision}"
channels_last = {str(channels_last).lower()}
""")
        return path

    def train_speed(self):
        s = self.sizes()
        for batch, precision, cl in s["speed_configs"]:
            # The same number of images per config, at least 200 steps: the first half is warm-up.
            steps = max(s["speed_steps"] * 32 // batch, 8 if self.args.tiny else 200)
            steps -= steps % 2
            name = f"b{batch}-{precision}{'-cl' if cl else ''}"
            if self.left() < 60:
                self.record("train_speed", config=name, skipped="budget")
                continue
            run = self.work / f"speed-{name}"
            try:
                with self.gpu_memory() as mem:
                    self.plankton("train", "--pipeline", self.speed_pipeline(batch, precision, cl, steps), "--data",
                                  self.work / "data", "--out", run, "--device", self.device, log=f"speed-{name}.log")
                rows = list(csv.DictReader(open(run / "history.csv")))
                last = rows[-1]
                rate = float(last["images_per_second"])
                self.record("train_speed", config=name, batch=batch, precision=precision, channels_last=cl, steps=steps,
                            images_per_second=rate, batch_wait_fraction=float(last["batch_wait_fraction"]),
                            peak_gpu_memory_mib=mem.peak, reference_schedule_hours=round(REFERENCE_IMAGES / rate / 3600, 3))
            except Exception as e:
                self.record("train_speed", config=name, error=str(e)[:2000])

    def pytorch_speed(self):
        s = self.sizes()
        probe = subprocess.run([self.args.torch_python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
        if probe.returncode != 0:
            self.record("pytorch_speed", skipped=f"no torch in {self.args.torch_python}")
            return
        # Eager for every config, then torch.compile (about a minute of compiling each) for the
        # reference's config and the fastest one.
        runs = [(c, False) for c in s["speed_configs"]] + [(c, True) for c in s["compile_configs"]]
        for (batch, precision, cl), compiled in runs:
            name = f"b{batch}-{precision}{'-cl' if cl else ''}{'-compile' if compiled else ''}"
            if self.left() < (120 if compiled else 40):
                self.record("pytorch_speed", config=name, skipped="budget")
                continue
            steps = max(s["torch_steps"] * 32 // batch, 3)
            argv = [self.args.torch_python, ROOT / "scripts/pytorch_train_step.py", "--case", s["speed_case"],
                    "--device", self.device, "--batch", batch, "--precision", precision, "--steps", steps,
                    "--warmup", 10 if not self.args.tiny else 1]
            if cl:
                argv.append("--channels-last")
            if compiled:
                argv.append("--compile")
            try:
                out = self.run(argv, timeout=max(min(self.left(), 300), 30), log=f"pytorch-{name}.log")
                r = json.loads(out.strip().splitlines()[-1])
                self.record("pytorch_speed", config=name, **r)
            except Exception as e:
                self.record("pytorch_speed", config=name, error=str(e)[:2000])

    def tta_speed(self):
        s = self.sizes()
        run = self.work / "speed-b32-fp32" if not self.args.tiny else self.work / "parity-cpu"
        if not (run / "final.safetensors").exists() and not any(run.glob("*.safetensors")):
            run = self.work / "parity-cpu"
        out = self.work / "tta.parquet"
        # Four images' views per forward pass on the GPU (the run's own batch of 32 patches would
        # leave it mostly idle); the tiny run keeps the run's batch.
        extra = [] if self.args.tiny else ["--batch-size", 4 * s["tta"]]
        text = self.plankton("predict", "--model", run, "--data", self.work / "data", "--out", out, "--device", self.device,
                             "--tta", s["tta"], "--weights", "final", *extra, log="tta.log")
        m = re.search(r"predicted (\d+) of (\d+) images x (\d+) view.*?in ([\d.]+) s: ([\d.]+) images/s, ([\d.]+) patches/s", text)
        if not m:
            raise RuntimeError("no rate line in predict's output: " + text[-300:])
        self.record("tta_speed", model=run.name, batch_size=extra[1] if extra else None, images=int(m.group(1)), views=int(m.group(3)), seconds=float(m.group(4)),
                    images_per_second=float(m.group(5)), patches_per_second=float(m.group(6)))

    def daemon(self):
        s = self.sizes()
        run = self.work / "speed-b32-fp32"
        if not (run / "pipeline.toml").exists():
            run = self.work / "parity-cpu"
        images = self.work / "data" / "test"
        out = self.run([sys.executable, ROOT / "scripts/serve_load.py", run, images, 20, s["daemon_s"], 16, "--binary", self.binary,
                        "--device", self.device, "--only", "overload", "--json"],
                       timeout=max(min(self.left(), 240), 30), log="daemon.log")
        r = json.loads(out.strip().splitlines()[-1])
        self.record("daemon", model=run.name, **r)

    def all(self):
        # SIGTERM (a timeout) ends the run like Ctrl-C: what was measured is still summarised.
        signal.signal(signal.SIGTERM, interrupted)
        try:
            self.phase("environment", 5, self.environment)
            self.phase("data", 10, self.data)
            self.phase("train_parity", 20, self.train_parity)
            self.phase("invariance", 5, self.invariance)
            self.phase("predict_parity", 10, self.predict_parity)
            self.phase("train_speed", 60, self.train_speed)
            self.phase("tta_speed", 30, self.tta_speed)
            self.phase("daemon", 40, self.daemon)
            self.phase("pytorch_speed", 40, self.pytorch_speed)
        except KeyboardInterrupt:
            self.record("interrupted", error="the run was interrupted; later phases did not run")
            self.failed = True
        finally:
            ok = summarise(self.out, self.results)
        return 0 if ok and not self.failed else 1


def interrupted(*_):
    raise KeyboardInterrupt


class GpuMemory:
    """Peak `memory.used` of the GPU while the block runs (nvidia-smi, every 100 ms)."""

    def __init__(self, device):
        self.enabled = device != "cpu" and shutil.which("nvidia-smi") is not None
        self.peak = None

    def __enter__(self):
        if self.enabled:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-lms", "100"],
                                         stdout=subprocess.PIPE, text=True)
            self.values = []
            self.reader = threading.Thread(target=lambda: [self.values.append(float(v)) for v in self.proc.stdout if v.strip()])
            self.reader.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.proc.terminate()
            self.proc.wait()
            self.reader.join()
            self.peak = max(self.values, default=None)
        return False


def summarise(out, results):
    rows = [json.loads(line) for line in open(results) if line.strip()]
    by = {}
    for r in rows:
        by.setdefault(r["phase"], []).append(r)
    env = (by.get("environment") or [{}])[0]
    summary = {"results": rows}
    md = ["# GPU check", ""]
    if "device" in env:
        md += [f"device `{env.get('device')}`, {env.get('nvidia_smi') or 'no nvidia-smi'}, {env.get('cpus')} cores, "
               f"binary {env.get('binary_mib')} MiB" + (" (tiny sizes: a dry run, not figures)" if env.get("tiny") else ""), ""]
    else:
        md += ["(the environment phase did not run)", ""]
    md += ["| check | result |", "|---|---|"]
    for name, key, tol in (("train_parity", "max_relative_difference", "relative"), ("predict_parity", "max_abs_difference", "absolute"),
                           ("invariance", "max_relative_difference", "relative")):
        for r in by.get(name, []):
            if "ok" in r:
                md.append(f"| {name} | {'ok' if r['ok'] else 'FAILED'}: {key.replace('_', ' ')} {r[key]:.2e} (tolerance {r.get('tolerance', 0):.0e}) |")
            else:
                md.append(f"| {name} | {r.get('error') or r.get('skipped')} |")
    md += ["", "| training | images/s | batch wait | peak GPU MiB | reference schedule (h) |", "|---|---|---|---|---|"]
    for r in by.get("train_speed", []):
        if "images_per_second" in r:
            md.append(f"| plankton {r['config']} | {r['images_per_second']:.0f} | {100 * r['batch_wait_fraction']:.1f}% | "
                      f"{r['peak_gpu_memory_mib'] or '-'} | {r['reference_schedule_hours']:.2f} |")
        else:
            md.append(f"| plankton {r.get('config')} | {r.get('error') or r.get('skipped')} | | | |")
    for r in by.get("pytorch_speed", []):
        if "images_per_second" in r:
            md.append(f"| PyTorch {r['torch']} {r['config']} | {r['images_per_second']:.0f} | (fixed batch on the device) | "
                      f"{r.get('peak_memory_mib') or '-'} (allocated) | {REFERENCE_IMAGES / r['images_per_second'] / 3600:.2f} |")
        else:
            md.append(f"| PyTorch {r.get('config', '')} | {r.get('error') or r.get('skipped')} | | | |")
    ours = {r["config"]: r["images_per_second"] for r in by.get("train_speed", []) if "images_per_second" in r}
    theirs = {r["config"]: r["images_per_second"] for r in by.get("pytorch_speed", []) if "images_per_second" in r}
    ratios = {}
    for cfg, rate in ours.items():
        for suffix in ("", "-compile"):
            if cfg + suffix in theirs:
                ratios[f"{cfg} vs PyTorch {'compile' if suffix else 'eager'}"] = round(rate / theirs[cfg + suffix], 3)
    summary["ratios"] = ratios
    if ratios:
        title = "ours / PyTorch (same network, batch, precision)"
        if env.get("tiny"):
            title += ", tiny sizes: not a figure"
        md += ["", f"| {title} | ratio |", "|---|---|"]
        md += [f"| {k} | {v:.2f} |" for k, v in ratios.items()]
    for r in by.get("tta_speed", []):
        if "images_per_second" in r:
            md += ["", f"TTA prediction: {r['images']} images x {r['views']} views in {r['seconds']:.1f} s: "
                       f"{r['images_per_second']:.1f} images/s ({r['patches_per_second']:.0f} patches/s)"]
    for r in by.get("daemon", []):
        if "predictions_per_second" in r:
            busy = ", ".join(f"{k} {v:.2f} s/s" for k, v in r.get("busy_per_second", {}).items())
            md += ["", f"daemon: {r['predictions_per_second']:.1f} predictions/s sustained over {r['seconds']:.0f} s "
                       f"({r['accepted']} accepted, {r['refused']} refused 503); stage busy time: {busy}"]
    bad = [r for r in rows if "error" in r]
    if bad:
        md += ["", "errors:"] + [f"- {r['phase']} {r.get('config', '')}: {r['error'][:300]}" for r in bad]
    # Passed only if every correctness check ran and passed.
    checks = {r["phase"]: r.get("ok") for r in rows if r["phase"] in CORRECTNESS}
    summary["ok"] = all(checks.get(c) is True for c in CORRECTNESS) and not any("interrupted" == r["phase"] for r in rows)
    md.insert(2, f"**{'all correctness checks passed' if summary['ok'] else 'NOT PASSED: a correctness check failed or did not run'}**\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return summary["ok"]


def pack(args):
    out = (ROOT / args.out).resolve()
    subprocess.run(["cargo", "build", "--release", "--bin", "plankton"], cwd=ROOT, check=True)
    out.mkdir(parents=True, exist_ok=True)
    binary = out / "plankton"
    shutil.copy2(ROOT / "target/release/plankton", binary)
    subprocess.run(["strip", binary], check=True)
    version = (ROOT / ".libtorch/torch/version.py").read_text()
    torch = re.search(r"__version__ = '([^']+)'", version).group(1)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    (out / "BUILD.json").write_text(json.dumps({"torch": torch, "commit": commit}) + "\n")
    size = binary.stat().st_size / 2**20
    print(f"{binary}: {size:.1f} MiB stripped, built against torch {torch} at {commit[:10]}")
    if size > 48:
        sys.exit(f"the packed binary is {size:.0f} MiB: too big to carry with the tree (64 MiB in all)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="build and strip the release binary into --out (default target/gpu-pack)")
    p.add_argument("--out", default="target/gpu-pack")
    r = sub.add_parser("run", help="run the check")
    r.add_argument("--out", required=True, help="folder for results.jsonl, summary.json, summary.md and work/")
    r.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (the dry run)")
    r.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU dry run)")
    r.add_argument("--work", help="folder for the data, runs and logs (default: <out>/work)")
    r.add_argument("--binary", help="plankton binary (default target/gpu-pack/plankton, else target/release/plankton)")
    r.add_argument("--budget-s", type=float, default=480, help="skip phases that would end later than this")
    r.add_argument("--torch-python", default=shutil.which("python3") or sys.executable,
                   help="Python with torch: lends libtorch to a carried binary; runs the PyTorch baseline")
    args = ap.parse_args()
    if args.cmd == "pack":
        pack(args)
        return 0
    return Check(args).all()


if __name__ == "__main__":
    sys.exit(main())
