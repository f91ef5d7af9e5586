#!/usr/bin/env python3
"""How many 95x95 training patches per second the reference network (convroll4, SPEC.md)
consumes on one GPU: PyTorch training steps (SGD Nesterov, batch of 32 images = 128 inside the
network after the cyclic slice), fp32 and TF32/bf16 variants. This is the rate the data path
must beat to keep an accelerator fed (docs/BENCHMARKS.md).

Usage: python3 scripts/gpu_consumption.py [--steps 200] [--batch 32]
"""
import argparse
import json
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 128])
    args = ap.parse_args()
    try:
        import torch
        import torch.nn as nn
        import torch.nn.functional as F
    except ImportError as e:
        print(json.dumps({"error": f"no torch: {e}"}))
        return 0
    info = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        print(json.dumps(info))
        return 0
    info["device"] = torch.cuda.get_device_name(0)
    dev = torch.device("cuda:0")

    def rot(x, k):
        return torch.rot90(x, k, dims=(2, 3))

    class Slice(nn.Module):
        def forward(self, x):
            return torch.cat([x, rot(x, 1), rot(x, 2), rot(x, 3)], 0)

    class ConvRoll(nn.Module):
        def forward(self, x):
            v = x.view(4, -1, *x.shape[1:])
            outs = []
            for i in range(4):
                outs.append(torch.cat([rot(v[(i + k) % 4], -k) for k in range(4)], 1))
            return torch.cat(outs, 0)

    class DenseRoll(nn.Module):
        def forward(self, x):
            v = x.view(4, -1, x.shape[1])
            return torch.cat([torch.cat([v[(i + k) % 4] for k in range(4)], 1) for i in range(4)], 0)

    class CyclicPoolRMS(nn.Module):
        def forward(self, x):
            v = x.view(4, -1, x.shape[1])
            return torch.sqrt((v * v).mean(0) + 1e-12)

    class Maxout(nn.Module):
        def __init__(self, i, o):
            super().__init__()
            self.lin = nn.Linear(i, 2 * o)

        def forward(self, x):
            return self.lin(x).view(x.shape[0], -1, 2).max(-1).values

    def conv(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.LeakyReLU(1 / 3)]

    pool = lambda: nn.MaxPool2d(3, 2)
    net = nn.Sequential(
        Slice(),
        *conv(1, 32), *conv(32, 16), pool(), ConvRoll(),
        *conv(64, 64), *conv(64, 32), pool(), ConvRoll(),
        *conv(128, 128), *conv(128, 128), *conv(128, 64), pool(), ConvRoll(),
        *conv(256, 256), *conv(256, 256), *conv(256, 128), pool(), ConvRoll(),
        nn.Flatten(), nn.Dropout(0.5), Maxout(512 * 5 * 5, 512), DenseRoll(), CyclicPoolRMS(),
        nn.Dropout(0.5), nn.Linear(2048, 121),
    ).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.003, momentum=0.9, nesterov=True, weight_decay=0.0005)
    results = {}
    for batch in args.batch:
        for mode in ["fp32", "tf32", "bf16_autocast"]:
            torch.backends.cuda.matmul.allow_tf32 = mode != "fp32"
            torch.backends.cudnn.allow_tf32 = mode != "fp32"
            torch.backends.cudnn.benchmark = True
            x = torch.randn(batch, 1, 95, 95, device=dev)
            y = torch.randint(0, 121, (batch,), device=dev)

            def step():
                opt.zero_grad(set_to_none=True)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16_autocast"):
                    loss = F.cross_entropy(net(x), y)
                loss.backward()
                opt.step()

            for _ in range(args.warmup):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            results[f"batch{batch}_{mode}"] = round(batch * args.steps / dt, 1)
            print(f"batch {batch} {mode}: {batch * args.steps / dt:.0f} images/s", file=sys.stderr, flush=True)
    info["images_per_second"] = results
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
