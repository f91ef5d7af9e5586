#!/usr/bin/env python3
"""Single-core Python baseline throughput for the plankton input pipeline.

Measures, in images per second on one CPU core (BLAS/OpenMP threads = 1, process pinned to one
core unless --no-pin):
  a_decode_pil       PIL decode of JPEG bytes already in memory + convert('L') + np.asarray
  b_warp_public      skimage.transform.warp (public API, order=1, mode='constant',
                     preserve_range=True, default clip) of a precomputed float64 image into a
                     95x95 size-normalised patch, with a precomputed 3x3 matrix drawn from the
                     training augmentation ranges
  c_warp_fast_bare   skimage's bare Cython _warp_fast with the same images and matrices
  d_reference_path   the reference's per-sample path: uint8 -> float32 inversion (1 - u8/255),
                     build rescale / centre / uncentre / augmentation transforms as skimage
                     transform objects with fresh random draws, compose them with `+`, and warp
                     with _warp_fast, result cast to float32. (2015's _warp_fast cast its input to
                     float64 itself; today's fused version needs matching dtypes, so the float32
                     image is cast to float64 explicitly, which costs the same.)

Usage (Python tooling venv, see scripts/requirements-tools.txt):
    .pyenv-tools/bin/python scripts/baseline_bench.py /path/to/planktonclas/resources/demo-images
    [--seconds 3] [--warmup 0.5] [--seed 0] [--cpu N | --no-pin]

The folder is searched recursively for *.jpg. Prints one JSON object to stdout.
"""

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
           "VECLIB_MAXIMUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import importlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import PIL  # noqa: E402
import scipy  # noqa: E402
import skimage  # noqa: E402
import skimage.transform as sktf  # noqa: E402
from PIL import Image, features  # noqa: E402

PATCH = (95, 95)
NORM_SIDE = 85.0

TRAIN = dict(rotation=(0.0, 360.0), shift=(-10.0, 10.0), zoom=(1 / 1.6, 1.6),
             stretch=1.3, shear=(-20.0, 20.0))


def find_warp_fast():
    for mod in ("skimage.transform._warps_cy", "skimage.transform._warps",
                "skimage._shared.interpolation"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        f = getattr(m, "_warp_fast", None)
        if f is not None:
            return f, mod + "._warp_fast"
    raise SystemExit("could not locate skimage's _warp_fast")


_warp_fast, WARP_FAST_WHERE = find_warp_fast()


def draw_params(rng):
    """One training augmentation draw, in the reference's order."""
    sx_, sy_ = rng.uniform(*TRAIN["shift"]), rng.uniform(*TRAIN["shift"])
    rot = rng.uniform(*TRAIN["rotation"])
    shear = rng.uniform(*TRAIN["shear"])
    flip = rng.randint(2) > 0
    zoom = math.exp(rng.uniform(math.log(TRAIN["zoom"][0]), math.log(TRAIN["zoom"][1])))
    st = math.exp(rng.uniform(-math.log(TRAIN["stretch"]), math.log(TRAIN["stretch"])))
    return rot, (sx_, sy_), shear, flip, zoom * st, zoom / st


def explicit_matrix(shape, out_shape, ds, rot, shift, shear, flip, zoom_x, zoom_y):
    """M = G . R of SPEC.md (classic skimage affine), maps output (x, y) to source (x, y)."""
    rows, cols = shape
    th, tw = out_shape
    if flip:
        rot, shear = rot + 180.0, shear + 180.0
    r, s = math.radians(rot), math.radians(shear)
    sx, sy = 1.0 / zoom_x, 1.0 / zoom_y
    A = np.array([[sx * math.cos(r), -sy * math.sin(r + s), shift[0]],
                  [sx * math.sin(r), sy * math.cos(r + s), shift[1]],
                  [0.0, 0.0, 1.0]])
    cx, cy = cols / 2.0 - 0.5, rows / 2.0 - 0.5
    T = lambda tx, ty: np.array([[1.0, 0, tx], [0, 1.0, ty], [0, 0, 1.0]])  # noqa: E731
    R = np.diag([ds, ds, 1.0]) @ T(cols / (2 * ds) - tw / 2.0, rows / (2 * ds) - th / 2.0)
    return T(cx, cy) @ A @ T(-cx, -cy) @ R


def reference_sample(u8, rng):
    """The reference's full per-sample path (own re-implementation, same operations)."""
    img = 1 - (u8 / np.float32(255.0))
    ds = max(img.shape) / NORM_SIDE
    rows, cols = img.shape
    th, tw = PATCH
    t_rescale = (sktf.SimilarityTransform(translation=(cols / (2.0 * ds) - tw / 2.0,
                                                       rows / (2.0 * ds) - th / 2.0))
                 + sktf.AffineTransform(scale=(ds, ds)))
    centre = np.array([cols, rows]) / 2.0 - 0.5
    t_center = sktf.SimilarityTransform(translation=centre)
    t_uncenter = sktf.SimilarityTransform(translation=-centre)
    rot, shift, shear, flip, zoom_x, zoom_y = draw_params(rng)
    if flip:
        rot, shear = rot + 180.0, shear + 180.0
    t_aug = sktf.AffineTransform(scale=(1 / zoom_x, 1 / zoom_y), rotation=np.deg2rad(rot),
                                 shear=np.deg2rad(shear), translation=shift)
    tf = t_rescale + (t_uncenter + t_aug + t_center)
    out = _warp_fast(img.astype(np.float64), tf.params, output_shape=PATCH, mode="constant",
                     order=1)
    return np.asarray(out).astype("float32")


def measure(fn, n_items, seconds, warmup):
    k = 0
    t_end = time.perf_counter() + warmup
    while time.perf_counter() < t_end:
        fn(k % n_items)
        k += 1
    count = 0
    t0 = time.perf_counter()
    t_end = t0 + seconds
    while True:
        fn(k % n_items)
        k += 1
        count += 1
        t = time.perf_counter()
        if t >= t_end:
            break
    elapsed = t - t0
    return {"images_per_s": round(count / elapsed, 1), "count": count,
            "elapsed_s": round(elapsed, 3), "us_per_image": round(1e6 * elapsed / count, 2)}


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="folder searched recursively for *.jpg")
    ap.add_argument("--seconds", type=float, default=3.0, help="measured wall time per figure")
    ap.add_argument("--warmup", type=float, default=0.5, help="warm-up wall time per figure")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu", type=int, default=None, help="core to pin to (default: first allowed)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the process to one core")
    args = ap.parse_args()

    pinned = None
    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        pinned = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {pinned})

    paths = sorted(p for p in Path(args.folder).rglob("*") if p.suffix.lower() == ".jpg")
    if not paths:
        raise SystemExit("no .jpg under %s" % args.folder)
    blobs = [p.read_bytes() for p in paths]
    u8s = [np.asarray(Image.open(io.BytesIO(b)).convert("L"), dtype=np.uint8) for b in blobs]
    floats = [1.0 - u.astype(np.float64) / 255.0 for u in u8s]

    rng = np.random.RandomState(args.seed)
    # a pool of (image, matrix) pairs: each image 4 times with different training draws
    pool = []
    for rep in range(4):
        for i, x in enumerate(floats):
            ds = max(x.shape) / NORM_SIDE
            pool.append((x, explicit_matrix(x.shape, PATCH, ds, *draw_params(rng))))

    def a(k):
        return np.asarray(Image.open(io.BytesIO(blobs[k])).convert("L"))

    def b(k):
        x, M = pool[k]
        return sktf.warp(x, M, output_shape=PATCH, order=1, mode="constant", cval=0.0,
                         preserve_range=True)

    def c(k):
        x, M = pool[k]
        return _warp_fast(x, M, output_shape=PATCH, order=1, mode="constant", cval=0.0)

    # sanity: the public warp without its output clipping is the bare _warp_fast
    for k in range(min(len(pool), 16)):
        x, M = pool[k]
        out_b = sktf.warp(x, M, output_shape=PATCH, order=1, mode="constant", cval=0.0,
                          preserve_range=True, clip=False)
        assert out_b.shape == PATCH and np.array_equal(out_b, np.asarray(c(k)))

    rng_d = np.random.RandomState(args.seed + 1)

    def d(k):
        return reference_sample(u8s[k], rng_d)

    results = {
        "a_decode_pil": measure(a, len(blobs), args.seconds, args.warmup),
        "b_warp_public": measure(b, len(pool), args.seconds, args.warmup),
        "c_warp_fast_bare": measure(c, len(pool), args.seconds, args.warmup),
        "d_reference_path": measure(d, len(u8s), args.seconds, args.warmup),
    }
    pixels = [u.size for u in u8s]
    out = {
        "benchmark": "python baseline, single core",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "skimage": skimage.__version__,
        "Pillow": PIL.__version__,
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "scipy": scipy.__version__,
        "warp_fast": WARP_FAST_WHERE,
        "cpu": cpu_model(),
        "pinned_cpu": pinned,
        "threads_env": {v: os.environ[v] for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                     "OPENBLAS_NUM_THREADS")},
        "images": len(blobs),
        "jpeg_bytes_mean": round(sum(map(len, blobs)) / len(blobs), 1),
        "pixels_mean": round(sum(pixels) / len(pixels), 1),
        "pixels_median": int(np.median(pixels)),
        "patch": list(PATCH),
        "seconds": args.seconds,
        "warmup_s": args.warmup,
        "results": results,
    }
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
