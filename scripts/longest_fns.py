#!/usr/bin/env python3
"""The longest Rust functions in the workspace (rustfmt layout: a function ends at the first
line after its signature that closes the brace at the signature's indentation).

    scripts/longest_fns.py [--top N] [PATH...]    # default: src crates, top 15
"""
import argparse
import re
from pathlib import Path

FN = re.compile(r"^(\s*)(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")


def functions(path):
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        m = FN.match(line)
        if not m:
            continue
        indent = m.group(1)
        for j in range(i, len(lines)):
            if lines[j].rstrip().endswith(";") and j == i:
                break  # a declaration without a body (trait method)
            if lines[j] == indent + "}" or (j == i and line.rstrip().endswith("}")):
                yield m.group(7), i + 1, j - i + 1
                break


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("paths", nargs="*", default=["src", "crates"])
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    found = []
    for root in args.paths:
        for f in sorted(Path(root).rglob("*.rs")):
            if "/tests/" in str(f) or "/benches/" in str(f):
                continue
            found += [(n, f, line, name) for name, line, n in functions(f)]
    for n, f, line, name in sorted(found, reverse=True)[: args.top]:
        print(f"{n:5d}  {name}  {f}:{line}")


if __name__ == "__main__":
    main()
