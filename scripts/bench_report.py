#!/usr/bin/env python3
"""Turns scripts/baseline_bench.py JSON + criterion's estimates into the BENCHMARKS.md table.

Usage: bench_report.py python.json target/criterion
"""
import json
import os
import platform
import sys


def criterion_rate(root, group, name):
    """Elements per second from criterion's mean estimate (ns per iteration)."""
    base = os.path.join(root, group, name, "new")
    est = json.load(open(os.path.join(base, "estimates.json")))
    bench = json.load(open(os.path.join(base, "benchmark.json")))
    elements = bench["throughput"]["Elements"]
    return elements / (est["mean"]["point_estimate"] * 1e-9)


def main():
    py = json.load(open(sys.argv[1]))
    root = sys.argv[2]
    rates = {k: v["images_per_s"] for k, v in py["results"].items()}
    ours = {
        "warp95": criterion_rate(root, "warp", "95x95_size_normalised"),
        "warp47": criterion_rate(root, "warp", "47x47_fixed_ds5"),
        "decode": criterion_rate(root, "decode", "jpeg_to_gray_fixture_images"),
        "path_cached": criterion_rate(root, "data_path", "epoch_95x95_cached_decode"),
        "path_nocache": criterion_rate(root, "data_path", "epoch_95x95_decode_every_file"),
    }
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    versions = ", ".join(f"{k} {py[k]}" for k in ("python", "numpy", "skimage", "Pillow", "libjpeg_turbo") if k in py)
    print(f"Machine: {cpu}, {os.cpu_count()} cores. Baselines: {versions}; {py.get('images')} images.")
    print()
    print("| what (one core unless noted) | ours, /s | baseline, /s | ratio |")
    print("|---|---|---|---|")
    rows = [
        ("warp 95x95 size-normalised patch (precomputed matrix)", ours["warp95"], "skimage.transform.warp", rates["b_warp_public"]),
        ("same, vs bare `_warp_fast`", ours["warp95"], "skimage _warp_fast", rates["c_warp_fast_bare"]),
        ("same, vs the reference's per-sample path", ours["warp95"], "reference path", rates["d_reference_path"]),
        ("warp 47x47 fixed-scale ds=5", ours["warp47"], "", None),
        ("JPEG decode to grayscale (bytes in memory)", ours["decode"], "PIL decode + convert('L')", rates["a_decode_pil"]),
        ("whole data path, all cores, decode cache warm", ours["path_cached"], "", None),
        ("whole data path, all cores, decode every file", ours["path_nocache"], "", None),
    ]
    for what, v, base_name, base in rows:
        if base:
            print(f"| {what} | {v:,.0f} | {base:,.0f} ({base_name}) | {v / base:.1f}x |")
        else:
            print(f"| {what} | {v:,.0f} | | |")


if __name__ == "__main__":
    main()
