#!/usr/bin/env python3
"""One training step of convroll4 in PyTorch, timed: the baseline for benches/train_step.rs.

The same network as plankton's `preset = "convroll4"` (crates/data/src/config/model.rs `preset_branch`,
src/model/network.rs, src/model/cyclic.rs), written the way a PyTorch user would:

  cyclic slice (x, rot90 x, rot180 x, rot270 x along the batch), then per stage 3x3 "same"
  convs with bias and leaky ReLU (slope 1/3), 3x3 stride-2 max pool, cyclic conv roll; dropout,
  dense + leaky ReLU, cyclic dense roll, dropout, dense + leaky ReLU, RMS cyclic pool, dropout,
  linear classifier, cross-entropy. SGD with Nesterov momentum 0.9, lr 0.003, L2 0.0005 on
  the non-bias parameters (PyTorch's weight_decay is the gradient coefficient: 2 * 0.0005).

Prints one JSON line with every timed step (the same fields as the bench binary's timing mode,
see scripts/train_step_compare.sh). With --plankton BINARY it checks that its parameter count
equals `plankton model` for the same patch size and width, and stops if not. With --check FILE
(written by the bench binary: `PLANKTON_TRAIN_STEP="case=... check=FILE"`) it loads plankton's
initial parameters and input batch instead of timing, and checks the logits and the parameters
after two optimiser steps (dropout off) against plankton's.

    python scripts/pytorch_train_step.py --case 95_w0.25 --threads 2 --warmup 3 --steps 10

Throughput mode (scripts/gpu_check.sh): --device cuda --batch 128 --precision bf16
--channels-last --compile times --steps steps after --warmup as one block between two device
synchronisations (no per-step loss read-back, as a PyTorch user would train on a GPU), on one
fixed batch already on the device: the model's speed without any data loading. TF32 is off unless
--tf32 (plankton's [compute] default), so fp32 means the same arithmetic on both sides.
"""

import argparse
import json
import math
import os
import re
import struct
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH = 32
CLASSES = 121
LR = 0.003
MOMENTUM = 0.9
WEIGHT_DECAY = 0.0005  # lambda of lambda * sum(w^2), as plankton's [train] weight_decay
CASES = {"95_w1": (95, 1.0), "95_w0.25": (95, 0.25), "47_w0.5": (47, 0.5)}
# filters per conv of each stage; every stage ends with pool + conv roll
STAGES = [[32, 16], [64, 32], [128, 128, 64], [256, 256, 128]]
DENSE = 256
SLOPE = 1.0 / 3.0
DROPOUT = 0.5


def scaled(n, width):
    # Rust's f64::round rounds halves away from zero (Python's round() would round to even).
    return max(1, int(math.floor(n * width + 0.5)))


def pooled_size(size, n):
    for _ in range(n):
        size = max(size - 3, 0) // 2 + 1
    return size


def auto_stages(size):
    stages = 1
    for n in range(1, len(STAGES) + 1):
        if size >= 3 and pooled_size(size, n) >= 5:
            stages = n
        else:
            break
    return stages


def cyclic_slice(x):
    return torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)], dim=0)


def cyclic_conv_roll(x):
    views = x.chunk(4, dim=0)
    rows = []
    for i in range(4):
        # block k comes from view i+k, rotated back by -90k degrees (k = 0 needs no rotation)
        blocks = [views[i] if k == 0 else torch.rot90(views[(i + k) % 4], -k, dims=(2, 3)) for k in range(4)]
        rows.append(torch.cat(blocks, dim=1))
    return torch.cat(rows, dim=0)


def cyclic_roll(x):
    views = x.chunk(4, dim=0)
    return torch.cat([torch.cat([views[(i + k) % 4] for k in range(4)], dim=1) for i in range(4)], dim=0)


def cyclic_pool_rms(x):
    views = x.view(4, x.shape[0] // 4, *x.shape[1:])
    return torch.sqrt(views.square().mean(dim=0) + 1e-12)


class ConvRoll4(nn.Module):
    def __init__(self, size, width, classes=CLASSES, activation="leaky_relu"):
        super().__init__()
        # "prelu": torch.prelu with a fixed 1-element slope tensor, what plankton's network.rs
        # does (tch has no leaky_relu with a slope); for diagnosis only.
        if activation == "prelu":
            slope = torch.tensor([SLOPE])
            self.act = lambda x: torch.prelu(x, slope)
        else:
            self.act = lambda x: F.leaky_relu(x, SLOPE)
        self.stages = nn.ModuleList()
        channels = 1
        for stage in STAGES[: auto_stages(size)]:
            convs = nn.ModuleList()
            for f in stage:
                f = scaled(f, width)
                convs.append(nn.Conv2d(channels, f, 3, padding=1))
                channels = f
            self.stages.append(convs)
            size = (size - 3) // 2 + 1
            channels *= 4  # conv roll
        units = scaled(DENSE, width)
        self.dense1 = nn.Linear(channels * size * size, units)
        self.dense2 = nn.Linear(4 * units, units)  # after the dense roll
        self.classifier = nn.Linear(units, classes)
        # plankton's initialisation: orthogonal weights, conv/dense biases 0.1, classifier 0
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.orthogonal_(m.weight)
                nn.init.constant_(m.bias, 0.0 if m is self.classifier else 0.1)

    def forward(self, x):
        x = cyclic_slice(x)
        for convs in self.stages:
            for conv in convs:
                x = self.act(conv(x))
            x = F.max_pool2d(x, 3, stride=2)
            x = cyclic_conv_roll(x)
        x = torch.flatten(x, 1)
        x = F.dropout(x, DROPOUT, self.training)
        x = self.act(self.dense1(x))
        x = cyclic_roll(x)
        x = F.dropout(x, DROPOUT, self.training)
        x = self.act(self.dense2(x))
        x = cyclic_pool_rms(x)
        x = F.dropout(x, DROPOUT, self.training)
        return self.classifier(x)


def plankton_params(binary, size, width):
    """`total: N parameters` of `plankton model` for the same preset, patch and width."""
    toml = f'[[patch]]\nrows = {size}\ncols = {size}\n\n[model]\npreset = "convroll4"\nwidth = {width}\n'
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(toml)
    try:
        out = subprocess.run(
            [binary, "model", "--pipeline", f.name, "--classes", str(CLASSES)],
            check=True, capture_output=True, text=True,
        ).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"^total: (\d+) parameters", out, re.M)
    if not m:
        sys.exit(f"no `total: N parameters` line in the output of {binary} model:\n{out}")
    return int(m.group(1))


def opt_for(net):
    decay = [p for name, p in net.named_parameters() if not name.endswith("bias")]
    no_decay = [p for name, p in net.named_parameters() if name.endswith("bias")]
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": 2 * WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, momentum=MOMENTUM, nesterov=True,
    )


def read_safetensors(path):
    dtypes = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64}
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, h in header.items():
        b, e = h["data_offsets"]
        buf = bytearray(data[8 + n + b:8 + n + e])
        out[name] = torch.frombuffer(buf, dtype=dtypes[h["dtype"]]).reshape(h["shape"]) if e > b else \
            torch.zeros(h["shape"], dtype=dtypes[h["dtype"]])
    return out


def plankton_order(name):
    """Creation order of plankton's parameters: b<branch>.l<layer>.<kind>.<weight|bias>, classifier."""
    m = re.fullmatch(r"b(\d+)\.l(\d+)\.\w+\.(weight|bias)", name)
    if m:
        return (0, int(m.group(1)), int(m.group(2)), m.group(3) == "bias")
    return (1, 0, 0, name.endswith("bias"))


def check(net, path):
    """Plankton's parameters and batch in, the same logits and updated parameters out."""
    ref = read_safetensors(path)
    names = sorted((k for k in ref if "." in k and not k.startswith("after.")), key=plankton_order)
    params = list(net.parameters())
    if len(names) != len(params):
        sys.exit(f"check: plankton has {len(names)} parameter tensors, PyTorch {len(params)}")
    with torch.no_grad():
        for name, p in zip(names, params):
            if tuple(ref[name].shape) != tuple(p.shape):
                sys.exit(f"check: {name} has shape {tuple(ref[name].shape)}, PyTorch {tuple(p.shape)}")
            p.copy_(ref[name])
    net.eval()
    with torch.no_grad():
        logits = net(ref["input"])
    scale = ref["logits"].abs().max().item()
    err = (logits - ref["logits"]).abs().max().item()
    ok = err <= 1e-4 * max(scale, 1.0)
    print(f"logits: max |difference| {err:.3g} (max |logit| {scale:.3g})", file=sys.stderr)
    opt = opt_for(net)
    for _ in range(2):
        F.cross_entropy(net(ref["input"]), ref["labels"]).backward()
        opt.step()
        opt.zero_grad()
    worst = 0.0
    for name, p in zip(names, params):
        before, after = ref[name], ref["after." + name]
        moved = (after - before).abs().max().item()
        e = (p.detach() - after).abs().max().item() / max(moved, 1e-12)
        worst = max(worst, e)
    print(f"after two steps: max |difference| / max |update|, worst parameter: {worst:.3g}", file=sys.stderr)
    ok = ok and worst <= 1e-3
    print("check: " + ("same network and update" if ok else "MISMATCH"), file=sys.stderr)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), default="95_w0.25")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--warmup", type=int, default=3, help="steps run first and discarded")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--phases", action="store_true",
                    help="then as many steps again, timed as forward+loss / backward / loss read + optimiser step")
    ap.add_argument("--plankton", help="plankton binary: assert the same parameter count as `plankton model`")
    ap.add_argument("--activation", choices=["leaky_relu", "prelu"], default="leaky_relu",
                    help="prelu: plankton's formulation of the leaky ReLU (diagnosis)")
    ap.add_argument("--check", metavar="FILE", help="compare with the bench binary's check file instead of timing")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]: with cuda, throughput mode")
    ap.add_argument("--batch", type=int, default=BATCH, help="images per step (throughput mode)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast (throughput mode)")
    ap.add_argument("--channels-last", action="store_true", help="channels-last model and input (throughput mode)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (throughput mode)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 in convolutions and matmuls")
    ap.add_argument("--no-benchmark", action="store_true", help="leave cudnn.benchmark off")
    args = ap.parse_args()
    if args.device != "cpu" or args.compile or args.precision != "fp32" or args.channels_last or args.batch != BATCH:
        sys.exit(throughput(args))

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    size, width = CASES[args.case]
    torch.manual_seed(0)
    net = ConvRoll4(size, width, activation=args.activation)
    n_params = sum(p.numel() for p in net.parameters())
    if args.plankton:
        ours = plankton_params(args.plankton, size, width)
        if ours != n_params:
            sys.exit(f"parameter count differs: PyTorch {n_params}, plankton {ours} ({args.case})")
    if args.check:
        sys.exit(0 if check(net, args.check) else 1)
    net.train()
    opt = opt_for(net)
    inputs = torch.randn(BATCH, 1, size, size)
    labels = torch.randint(0, CLASSES, (BATCH,))

    def step():
        loss = F.cross_entropy(net(inputs), labels)
        loss.backward()
        value = loss.item()
        if math.isfinite(value):
            opt.step()
        opt.zero_grad()
        return value

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    fwd, bwd, upd = [], [], []
    if args.phases:
        for _ in range(args.steps):
            t0 = time.perf_counter()
            loss = F.cross_entropy(net(inputs), labels)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            if math.isfinite(loss.item()):
                opt.step()
            opt.zero_grad()
            t3 = time.perf_counter()
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            upd.append(t3 - t2)
    r = lambda v: [round(x, 6) for x in v]  # noqa: E731
    print(json.dumps({
        "impl": "pytorch" if args.activation == "leaky_relu" else "pytorch-" + args.activation,
        "case": args.case, "threads": torch.get_num_threads(), "params": n_params, "torch": torch.__version__,
        "step_s": r(times), "forward_s": r(fwd), "backward_s": r(bwd), "optimizer_s": r(upd),
    }, separators=(",", ":")))


def throughput(args):
    """Images/s of training steps on one fixed batch on the device; one JSON line."""
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = not args.no_benchmark
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    size, width = CASES[args.case]
    torch.manual_seed(0)
    net = ConvRoll4(size, width).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    net.train()
    opt = opt_for(net)
    inputs = torch.randn(args.batch, 1, size, size, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, CLASSES, (args.batch,), device=device)
    model = torch.compile(net) if args.compile else net
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def step():
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(inputs).float(), labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    wall = time.perf_counter() - t0
    last = loss.item()
    print(json.dumps({
        "impl": "pytorch-compile" if args.compile else "pytorch-eager", "case": args.case, "device": args.device,
        "batch": args.batch, "precision": args.precision, "channels_last": args.channels_last, "tf32": args.tf32,
        "torch": torch.__version__, "steps": args.steps, "warmup_s": round(warm_s, 3), "seconds": round(wall, 4),
        "images_per_second": round(args.steps * args.batch / wall, 1), "last_loss": last,
        "peak_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
    }, separators=(",", ":")))
    return 0 if math.isfinite(last) else 1


if __name__ == "__main__":
    main()
