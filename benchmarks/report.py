"""Turn the rows of one benchmark run (benchmarks/results.csv) into a Markdown section for RESULTS.md.

    python benchmarks/report.py --csv benchmarks/results.csv --skip N [--tests-log FILE] [--iterations JSON ...]

``--skip N`` skips the first N lines of the CSV (those written before this run). For each op, shape and
dtype the section lists every implementation with its time, GB/s, % of the copy bandwidth measured in the
same run, and the speed-up of the Triton kernel over the peers' eager formulation. ``--iterations`` adds a
table of real-model iterations from the JSON files of benchmarks/real_model_iteration.py (a file that is
missing is listed as such: its run timed out or failed before loading).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--csv", default="benchmarks/results.csv")
    ap.add_argument("--skip", type=int, default=0, help="CSV lines written before this run")
    ap.add_argument("--tests-log", help="pytest log of the gpu tests, for their summary line")
    ap.add_argument("--iterations", nargs="*", default=[], help="JSON files of real_model_iteration.py")
    ap.add_argument(
        "--estimates",
        nargs="*",
        default=[],
        help="`densegrpo-fast memory --json` outputs, estimate_<family>.json",
    )
    args = ap.parse_args()
    kernel_section(args)
    if args.iterations:
        print(iteration_section([Path(p) for p in args.iterations]))
    if args.estimates:
        print(estimate_section([Path(p) for p in args.estimates], [Path(p) for p in args.iterations]))


def kernel_section(args) -> None:
    lines = Path(args.csv).read_text().splitlines() if Path(args.csv).exists() else []
    rows = []
    if lines:
        header, body = lines[0], lines[max(args.skip, 1) :]
        rows = list(csv.DictReader(io.StringIO("\n".join([header, *body]))))
    if not rows:
        print("\n## GPU suite run without benchmark rows (the benchmark step failed or was stopped)\n")
        tests_summary(args)
        return
    r0 = rows[0]
    print(
        f"\n## {r0['device']} — {r0['utc'][:10]}, git {r0['git_sha']}, torch {r0['torch']}, triton {r0['triton']}\n"
    )
    tests_summary(args)
    print(f"Copy bandwidth measured in the same run: {r0['copy_gb_per_s']} GB/s.\n")
    print("| op | shape | dtype | impl | ms (median) | GB/s | % of copy | speed-up vs flow-grpo eager |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    groups = defaultdict(dict)
    for r in rows:
        groups[(r["op"], r["shape"], r["dtype"])][r["impl"]] = r
    for (op, shape, dtype), impls in groups.items():
        peer = impls.get("flow-grpo")
        for impl in ("triton", "triton-graph", "reference", "reference-graph", "flow-grpo"):
            if impl not in impls:
                continue
            r = impls[impl]
            # (not for graph rows: device time against the eager peer's host-bound time is no like for like)
            graph = impl.endswith("-graph")
            speed = f"{_ms(peer) / _ms(r):.1f}x" if peer and not graph else ""
            print(
                f"| {op} | {shape} | {dtype} | {impl} | {_ms(r):.4f} | {r['gb_per_s']} | {r['pct_of_copy']} | {speed} |"
            )
    print()


def _ms(row: dict) -> float:
    """A row's time per call: the median of its rounds (rows written before the median was kept: the mean)."""
    return float(row.get("median_ms") or row["mean_ms"])


def tests_summary(args) -> None:
    """The gpu tests' pytest summary line, when their log is given."""
    if args.tests_log and Path(args.tests_log).exists():
        lines = Path(args.tests_log).read_text().splitlines()
        summary = [
            ln for ln in lines if re.search(r"\d+ (passed|failed)", ln) or ln.startswith("gpu tests skipped")
        ]
        state = [ln for ln in lines if ln.startswith("gpu-state: ")]
        if state:  # name, SM clock, its max, memory clock, temperature, power as the run started
            print(f"GPU at the start (nvidia-smi): `{state[0].removeprefix('gpu-state: ')}`\n")
        print(f"GPU tests: `{summary[-1].strip('= ') if summary else 'no summary line'}`\n")


def _gib(x) -> str:
    return "" if x is None else f"{x:.1f}"


def on_policy(metrics: dict) -> str:
    """The update's on-policy check: ``ratio_dev_first`` (0) where it used the rollout's own log-probs,
    else ``rollout_lp_dev`` (the rollout's log-probs against the update's recomputed ones; bf16 rounding
    gives about 1e-4). Empty when no row was trained."""
    dev, lp = metrics.get("ratio_dev_first"), metrics.get("rollout_lp_dev")
    if dev is not None:
        return f"ratio dev {dev:.1e}"
    return "" if lp is None else f"lp dev {lp:.1e}"


def iteration_section(paths: list[Path]) -> str:
    """Markdown: one row per (model, mode) of real_model_iteration.py, with the dense / sparse ratios and
    the extrapolation to the recipe's batch."""
    results = [(p, json.loads(p.read_text())) for p in paths if p.exists()]
    out, errors = [], []
    if results:
        r0 = results[0][1]
        v = r0["versions"]
        out.append(
            f"\n### Real-model DenseGRPO iterations ({'tiny' if r0['tiny'] else 'full size'}, random weights) — "
            f"{r0['device']}, {r0['utc'][:10]}, "
            f"git {r0['git_sha']}, torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}, "
            f"peft {v['peft']}\n"
        )
        out.append(
            "Command: `python benchmarks/real_model_iteration.py` (see benchmarks/gpu_suite.sh for the arguments). "
            "Seconds after a device sync at each phase boundary; peak = `torch.cuda.max_memory_allocated` in the "
            "phase; rollout TFLOP/s = its transformer rows x the matmul and attention FLOPs of one row "
            "(counted on one real call) / its seconds; the last two columns are linear extrapolations to the "
            "recipe's 48 x 24 rows (estimates).\n"
        )
        out.append(
            "| model | mode | prompts x G | T | rows/call | train batch | loaded GiB | encode s | rollout s | "
            "reward s | update s | iteration s | peak GiB rollout / reward / update | transformer rows "
            "(rollout + update) | rollout TFLOP/s | images | on-policy check | est. min @ recipe | "
            "est. peak GiB @ recipe |"
        )
        out.append(
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|"
        )
    for _, r in results:
        s = r["settings"]
        head = (
            f"| {r['family']} | {{mode}} | {s['prompts']} x {s['group_size']} | {s['steps']} | "
            f"{s['max_rows_per_call']} | {s['train_batch_size']} | {_gib(r.get('load', {}).get('allocated_gib'))} |"
        )
        if "load_error" in r:
            errors.append(f"{r['family']}: failed while loading: {r['load_error']}")
        if not r["modes"] and "merged_rollout" not in r:  # (--merged-rollout runs no mode: its own line)
            out.append(head.format(mode="—") + " no mode finished |" + " |" * 11)
        for mode, m in r["modes"].items():
            ph = m.get("phases", {})
            sec = lambda k, ph=ph: f"{ph[k]['seconds']:.1f}" if k in ph else ""
            peaks = " / ".join(
                _gib(ph.get(k, {}).get("peak_allocated_gib")) for k in ("rollout", "reward", "update")
            )
            rows = f"{ph.get('rollout', {}).get('transformer_rows', '')} + {ph.get('update', {}).get('transformer_rows', '')}"
            est = m.get("estimate_at_recipe_batch", {})
            tflops = f"{m['rollout_tflop_per_s']:.3g}" if "rollout_tflop_per_s" in m else ""
            if "error" in m:
                errors.append(f"{r['family']} {mode}: {m['error']}")
                total, ratio_dev, est_min = "FAILED", "", ""
            else:
                total, ratio_dev = f"{m['seconds']:.1f}", on_policy(m["metrics"])
                est_min = f"{est['seconds'] / 60:.1f}" if est else "(is the recipe)"
            out.append(
                head.format(mode=mode)
                + f" {sec('encode')} | {sec('rollout')} | {sec('reward')} | {sec('update')} | {total} | {peaks} | "
                f"{rows} | {tflops} | {ph.get('reward', {}).get('images_decoded', '')} | {ratio_dev} | "
                f"{est_min} | "
                f"{_gib(est.get('peak_allocated_gib'))} |"
            )
    for _, r in results:
        end = r.get("end_of_run")
        if end is None:
            continue
        if "error" in end:
            errors.append(f"{r['family']} end of run: {end['error']}")
            continue
        line = ", ".join(
            f"{k} {ph['seconds']:.1f} s"
            + (f", peak {ph['peak_allocated_gib']:.2f} GiB" if "peak_allocated_gib" in ph else "")
            for k, ph in end["phases"].items()
        )
        out.append(
            f"\n{r['family']} end of run (one held-out batch of the eval section, then the export): {line}."
        )
    for _, r in results:
        merged = r.get("merged_rollout")
        if merged is None:
            continue
        s = r["settings"]
        parts = []
        for key in ("unmerged", "merged"):  # (the ratio's pair; "unmerged_first" warmed up)
            m = merged.get(key, {"error": "not reached"})
            if "error" in m:
                errors.append(f"{r['family']} rollout, LoRA {key}: {m['error']}")
                continue
            tflops = f", {m['rollout_tflop_per_s']:.3g} TFLOP/s" if "rollout_tflop_per_s" in m else ""
            parts.append(f"{key} {m['phases']['rollout']['seconds']:.2f} s{tflops}")
        ratio = f" ({merged['unmerged_over_merged']:.2f}x)" if "unmerged_over_merged" in merged else ""
        out.append(
            f"\n{r['family']} rollout with the LoRA adapters unmerged and merged for sampling "
            f"(`lora.merge_for_sampling`), {s['prompts']} x {s['group_size']}, the same rows: "
            + ", ".join(parts)
            + ratio
            + "."
        )
    for _, r in results:
        if "dense_over_sparse" in r:
            ratio = ", ".join(f"{k} {v:.2f}x" for k, v in r["dense_over_sparse"].items())
            out.append(f"\n{r['family']} dense / sparse, same prompts and noise: {ratio}.")
    out += [f"\nFAILED: {e}" for e in errors]
    for path in paths:
        if not path.exists():
            out.append(f"\n{path.name}: no result (the run timed out or failed before loading; see its log).")
    return "\n".join(out) + "\n"


def estimate_section(estimates: list[Path], iterations: list[Path]) -> str:
    """Markdown: the CPU memory estimate (densegrpo_fast/memory.py) of each real-model run against the peak
    the run measured (dense mode), per phase, in GiB."""
    measured = {}
    for p in iterations:
        if p.exists():
            r = json.loads(p.read_text())
            ph = {
                **r.get("modes", {}).get("dense", {}).get("phases", {}),
                **r.get("end_of_run", {}).get("phases", {}),  # evaluation, export
            }
            if isinstance(r.get("load", {}).get("setup"), dict):  # the trainer's set-up, after the build
                ph["setup"] = r["load"]["setup"]
            peaks = {
                k: ph[k].get("peak_allocated_gib")
                for k in ("setup", "encode", "rollout", "reward", "update", "evaluation", "export")
                if k in ph
            }
            # (the optional merged-rollout run's file holds its set-up alone: it must not stand for the family)
            if peaks and "merged_rollout" not in r:
                measured.setdefault(r["family"], peaks)
    out = [
        "\n### Memory estimate on the CPU against the measured peak\n",
        "`densegrpo-fast memory --json` with the run's settings (fake weights, the trainer's own code, on this "
        "machine's CPU), against `torch.cuda.max_memory_allocated` of the dense run above (its first iteration: "
        "AdamW's state, which the estimate includes, is missing from its rollout).\n",
        "| model | phase | estimated GiB | measured GiB | estimated / measured |",
        "|---|---|---:|---:|---:|",
    ]
    for p in estimates:
        family = p.stem.removeprefix("estimate_")
        try:
            est = {k: v / 2**30 for k, v in json.loads(p.read_text())["phases"].items()}
        except (OSError, ValueError, KeyError):  # not written (yet), or cut by its timeout
            log = p.with_suffix(".log")
            last = log.read_text().strip().splitlines()[-1:] if log.exists() else []
            out.append(f"| {family} | no estimate: {last[0][:150] if last else 'no log'} | | | |")
            continue
        real = measured.get(family, {})
        pairs = {
            "setup": real.get("setup"),
            "prompt encoding": real.get("encode"),
            "rollout + reward": max((real[k] for k in ("rollout", "reward") if real.get(k)), default=None),
            "update": real.get("update"),
            "evaluation": real.get("evaluation"),  # one held-out batch, after the modes
            "export": real.get("export"),
        }
        for phase, value in est.items():
            m = pairs.get(phase)
            ratio = f"{value / m:.3f}" if m else ""
            out.append(f"| {family} | {phase} | {value:.2f} | {'' if m is None else f'{m:.2f}'} | {ratio} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
