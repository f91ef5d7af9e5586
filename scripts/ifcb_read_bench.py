#!/usr/bin/env python3
"""Baseline: reading every ROI's pixels of an IFCB bin with libifcb (an independent parser, PyPI).

Versions used: Python 3.11.7, libifcb 0.8.1, numpy 2.4.6 (pillow 13.0.0 comes with libifcb).

Run:
    python3.11 -m venv /tmp/ifcbbench/venv
    /tmp/ifcbbench/venv/bin/pip install libifcb==0.8.1
    /tmp/ifcbbench/venv/bin/python scripts/ifcb_read_bench.py \
        --make /tmp/ifcbbench/bin --rois 5000 --seed 0
    /tmp/ifcbbench/venv/bin/python scripts/ifcb_read_bench.py \
        --read /tmp/ifcbbench/bin/D20240611T010000_IFCB104.hdr --repeat 5 --check --seed 0

--make DIR writes one current-generation bin DIR/D20240611T010000_IFCB104.{roi,adc,hdr} byte for
byte as the Rust writer (crates/core/src/ifcb.rs, write_bin) lays it out: ROI i's width*height
pixels appended to .roi, ADC row i+1 with ROIx = ROIy = 1, ROIwidth, ROIheight, start_byte, the
other fields zero. Widths are uniform in 40..=400, heights in 30..=200, pixels uniform uint8, all
from numpy.random.default_rng(seed) (sizes first, then all pixels as one draw).

--read HDR times, R times (--repeat, default 5), a full read of the bin from its paths:
libifcb.ROIReader(hdr, adc, roi) parses the header and ADC file, then every ADC row with
width*height > 0 becomes a libifcb ROI whose `.array` (libifcb's own seek + read + frombuffer +
reshape to (height, width) uint8) is taken and one byte of it summed. Prints one JSON object;
median_s is the median wall time of one full read (parse + pixels), parse_s / pixels_s the
medians of the two parts. Files are read warm from the page cache after the first pass.

The ROI objects are built from the rows libifcb parsed (`reader.adc_data`) with libifcb's own ROI
class, so the pixel path is libifcb's; `reader.rois` (which libifcb 0.8.1 fills only for rows
with ROIx != 0: bins written with ROIx = 0 had none) is reported as "libifcb_rois_attr".

--check (with --read) regenerates the pixels from --seed (and the ROI count from the ADC file, or
--rois) and asserts that libifcb's array of every ROI equals the bytes written, first 3 included.
"""

import argparse
import json
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

PID = "D20240611T010000_IFCB104"
HEADER = (
    "softwareVersion: plankton bench\n"
    "sampleTime: 20240611T010000\n"
    "ADCFileFormat: trigger#, ADC_time, PMTA, PMTB, PMTC, PMTD, peakA, peakB, peakC, peakD, "
    "time of flight, grabtimestart, grabtimeend, ROIx, ROIy, ROIwidth, ROIheight,start_byte, "
    "comparator_out, STartPoint, SignalLength, status, runTime, inhibitTime\n"
)


def synth(n, seed):
    """Widths, heights and all pixels (one flat uint8 array) of n synthetic ROIs."""
    rng = np.random.default_rng(seed)
    widths = rng.integers(40, 400, size=n, endpoint=True)
    heights = rng.integers(30, 200, size=n, endpoint=True)
    total = int((widths * heights).sum())
    pixels = rng.integers(0, 256, size=total, dtype=np.uint8)
    return widths, heights, pixels


def make(out_dir, n, seed):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    widths, heights, pixels = synth(n, seed)
    rows = []
    start = 0
    for i in range(n):
        w, h = int(widths[i]), int(heights[i])
        rows.append(f"{i+1},{i*0.25:.6f},0,0,0,0,0,0,0,0,0,0,0,1,1,{w},{h},{start},0,0,0,0,0,0\n")
        start += w * h
    base = out_dir / PID
    # Same order as the Rust writer: .roi, .adc, then the header.
    Path(str(base) + ".roi").write_bytes(pixels.tobytes())
    Path(str(base) + ".adc").write_text("".join(rows))
    Path(str(base) + ".hdr").write_text(HEADER)
    print(json.dumps({"bin": str(base) + ".hdr", "rois": n, "bytes": start, "seed": seed}))


def read_bin(hdr_path):
    """One full libifcb read of a bin: returns (arrays, checksum, n stock rois, parse s, pixels s)."""
    from libifcb import ROIReader
    from libifcb.native_interface import ROI

    base = str(hdr_path)[: -len(".hdr")]
    t0 = time.perf_counter()
    with open(base + ".roi", "rb") as roi_fp:
        reader = ROIReader(str(hdr_path), base + ".adc", roi_fp)
        t1 = time.perf_counter()
        arrays = []
        checksum = 0
        for number, row in enumerate(reader.adc_data, start=1):
            w, h = int(row["roi_width"]), int(row["roi_height"])
            if w * h <= 0:
                continue
            roi = ROI(reader.triggers, roi_fp, int(row["start_byte"]), w, h,
                      int(row["roi_x"]), int(row["roi_y"]), number,
                      int(row["trigger_number"]))
            a = roi.array  # libifcb: seek, read w*h bytes, frombuffer, reshape (h, w)
            checksum += int(a[0, 0])
            arrays.append(a)
        t2 = time.perf_counter()
    return arrays, checksum, len(reader.rois), t1 - t0, t2 - t1


def check(arrays, n, seed):
    widths, heights, pixels = synth(n, seed)
    assert len(arrays) == n, f"libifcb gave {len(arrays)} ROIs, {n} written"
    off = 0
    for i, a in enumerate(arrays):
        w, h = int(widths[i]), int(heights[i])
        want = pixels[off:off + w * h].reshape(h, w)
        off += w * h
        assert a.dtype == np.uint8 and a.shape == (h, w), f"ROI {i+1}: {a.dtype} {a.shape}"
        assert np.array_equal(a, want), f"ROI {i+1}: pixels differ"
    return n


def bench(hdr_path, repeat, do_check, seed, n_rois):
    times, parse, pix = [], [], []
    for _ in range(repeat):
        t = time.perf_counter()
        arrays, checksum, stock, tp, tx = read_bin(hdr_path)
        times.append(time.perf_counter() - t)
        parse.append(tp)
        pix.append(tx)
    n = len(arrays)
    total = sum(a.size for a in arrays)
    med = statistics.median(times)
    out = {
        "tool": "libifcb",
        "version": version("libifcb"),
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "rois": n,
        "bytes": total,
        "repeat": repeat,
        "median_s": round(med, 6),
        "rois_per_s": round(n / med, 1),
        "mb_per_s": round(total / med / 1e6, 2),
        "parse_s": round(statistics.median(parse), 6),
        "pixels_s": round(statistics.median(pix), 6),
        "times_s": [round(t, 6) for t in times],
        "checksum": checksum,
        "libifcb_rois_attr": stock,
    }
    if do_check:
        if n_rois is None:
            n_rois = sum(1 for line in open(str(hdr_path)[:-4] + ".adc") if line.strip())
        out["checked_rois"] = check(arrays, n_rois, seed)
    print(json.dumps(out))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--make", metavar="DIR", help="write a synthetic bin into DIR")
    g.add_argument("--read", metavar="HDR", help="time libifcb reading the bin of this .hdr")
    p.add_argument("--rois", type=int, default=None, help="ROIs to write (--make, default 5000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--check", action="store_true",
                   help="with --read: compare libifcb's arrays with the pixels regenerated from --seed")
    a = p.parse_args()
    if a.make:
        make(a.make, 5000 if a.rois is None else a.rois, a.seed)
    else:
        if not a.read.endswith(".hdr"):
            p.error("--read takes the bin's .hdr path")
        bench(a.read, a.repeat, a.check, a.seed, a.rois)


if __name__ == "__main__":
    main()
