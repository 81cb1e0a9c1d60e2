"""Turn the rows of one benchmark run (benchmarks/results.csv) into a Markdown section for RESULTS.md.

    python benchmarks/report.py --csv benchmarks/results.csv --skip N [--tests-log FILE]

``--skip N`` skips the first N lines of the CSV (those written before this run). For each op, shape and
dtype the section lists every implementation with its time, GB/s, % of the copy bandwidth measured in the
same run, and the speed-up of the Triton kernel over the peers' eager formulation.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default="benchmarks/results.csv")
    ap.add_argument("--skip", type=int, default=0, help="CSV lines written before this run")
    ap.add_argument("--tests-log", help="pytest log of the gpu tests, for their summary line")
    args = ap.parse_args()
    lines = Path(args.csv).read_text().splitlines()
    header, body = lines[0], lines[max(args.skip, 1) :]
    rows = list(csv.DictReader(io.StringIO("\n".join([header, *body]))))
    if not rows:
        print("\n(no benchmark rows in this run)\n")
        return
    r0 = rows[0]
    print(
        f"\n## {r0['device']} — {r0['utc'][:10]}, git {r0['git_sha']}, torch {r0['torch']}, triton {r0['triton']}\n"
    )
    if args.tests_log and Path(args.tests_log).exists():
        summary = [
            ln
            for ln in Path(args.tests_log).read_text().splitlines()
            if re.search(r"\d+ (passed|failed)", ln)
        ]
        print(f"GPU tests: `{summary[-1].strip('= ') if summary else 'no summary line'}`\n")
    print(f"Copy bandwidth measured in the same run: {r0['copy_gb_per_s']} GB/s.\n")
    print("| op | shape | dtype | impl | ms | GB/s | % of copy | speed-up vs flow-grpo eager |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["op"], r["shape"], r["dtype"])][r["impl"]] = r
    for (op, shape, dtype), impls in groups.items():
        peer = impls.get("flow-grpo")
        for impl in ("triton", "reference", "flow-grpo"):
            if impl not in impls:
                continue
            r = impls[impl]
            speed = f"{float(peer['mean_ms']) / float(r['mean_ms']):.1f}x" if peer else ""
            print(
                f"| {op} | {shape} | {dtype} | {impl} | {float(r['mean_ms']):.4f} | {r['gb_per_s']} | {r['pct_of_copy']} | {speed} |"
            )
    print()


if __name__ == "__main__":
    main()
