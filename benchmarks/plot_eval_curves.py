"""Held-out scores of several training runs against iteration (or training time), in one plot.

    python benchmarks/plot_eval_curves.py OUT.png LABEL=runs/a/metrics.jsonl LABEL=runs/b/metrics.jsonl \\
        [--keys eval_strict eval_exact] [--x iteration|wall]

Each run gets one colour; each key (an ``eval_*`` field of metrics.jsonl) one line style. ``--x wall`` puts
the runs' training minutes (``wall_s`` / 60, evaluation excluded) on the x axis: the comparison at equal time.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("runs", nargs="+", help="LABEL=path/to/metrics.jsonl")
    ap.add_argument("--keys", nargs="+", default=["eval_strict", "eval_exact"])
    ap.add_argument("--title", default="held-out scores during training")
    ap.add_argument("--x", choices=["iteration", "wall"], default="iteration")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = ["-", "--", ":", "-."]
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, spec in enumerate(args.runs):
        label, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"run {spec!r} must be LABEL=path/to/metrics.jsonl")
        recs = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
        for j, key in enumerate(args.keys):
            pts = points(recs, key, args.x)
            if not pts:
                raise SystemExit(f"{path} has no {key!r} records: pick --keys among its eval_* fields")
            ax.plot(*zip(*pts, strict=True), styles[j % len(styles)], marker="o", ms=3, color=f"C{i}",
                    label=f"{label}: {key.removeprefix('eval_')}")  # fmt: skip
    xlabel = "iteration" if args.x == "iteration" else "training minutes (evaluation excluded)"
    ax.set(xlabel=xlabel, ylabel="held-out score", title=args.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


def points(records: list[dict], key: str, x: str = "iteration") -> list[tuple[float, float]]:
    """(x, score) of the records that carry ``key``; x is the iteration or the training minutes."""
    return [(r["iteration"] if x == "iteration" else r["wall_s"] / 60, r[key]) for r in records if key in r]


if __name__ == "__main__":
    main()
