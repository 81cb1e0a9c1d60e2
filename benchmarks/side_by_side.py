"""The paper's ablations at toy size: DenseGRPO against Flow-GRPO and its own variants, same budget.

    python benchmarks/side_by_side.py --config configs/toy_geneval.yaml --seeds 0 1 --budget-s 300 \\
        --parallel 2 --out runs/side_by_side

Variants (each overrides the config):
    densegrpo          dense rewards, n = remaining, calibrated psi (the default config)
    flow-grpo          sparse terminal reward, uniform a = 0.7 (Flow-GRPO)
    densegrpo-uniform  dense rewards with uniform a = 0.7 (no calibration)
    densegrpo-n1       dense rewards from one-step completions (x0 = x - sigma * v)
    densegrpo-n2       dense rewards from two-step completions
    densegrpo-winrate  dense rewards as win rates in each group under the config's reward (``win_rate``, counted
                       wins: Pref-GRPO's pairwise reward); evaluated by the config's reward itself. Run only
                       when named in --variants
    diffusionnft       DiffusionNFT's forward-process objective (grpo.objective=nft): ODE rollouts of the old
                       policy, the final reward's advantages with the batch's std, every step's time trained.
                       Run only when named in --variants
    awm                Advantage Weighted Matching (grpo.objective=awm): ODE rollouts of the trained policy, the
                       final reward's advantages with the batch's std weighting each pair's flow-matching loss,
                       one optimizer step per iteration (on-policy, as released). Run only when named in
                       --variants
Each variant trains for the same wall-time budget (``run.time_budget_s``) with each seed; every run
evaluates its EMA weights on the held-out prompts at the start, every ``--eval-every`` iterations and at
the end. The calibrated variants of one seed share that seed's psi table (calibrated once, with n =
remaining, before the clock starts; a table is reused only by a call with the same config and overrides).
Writes table.md, results.json and score_vs_time.png under --out. A run that fails is left out of the means
(the table says which), and the script then exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: What the forward-process objectives (nft, awm) need of the DenseGRPO config: the final reward, ODE rollouts,
#: every sample trained, the batch's std.
FORWARD = ["dense.mode=sparse", "noise.kind=uniform", "noise.level=0", "grpo.filter_zero_advantage=false",
           "dense.global_std=true"]  # fmt: skip
VARIANTS = {
    "densegrpo": [],
    "flow-grpo": ["dense.mode=sparse", "noise.kind=uniform"],
    "densegrpo-uniform": ["noise.kind=uniform"],
    "densegrpo-n1": ["dense.completion_steps=1"],
    "densegrpo-n2": ["dense.completion_steps=2"],
    "densegrpo-winrate": lambda cfg: [
        "reward.name=win_rate",
        "reward.kwargs=" + json.dumps({"reward": {"name": cfg.reward.name, "kwargs": cfg.reward.kwargs}}),
    ],
    "diffusionnft": ["grpo.objective=nft", *FORWARD],
    "awm": ["grpo.objective=awm", "grpo.updates_per_iteration=1", *FORWARD],
}
#: The variants run only when named in --variants.
NAMED_ONLY = ("densegrpo-winrate", "diffusionnft", "awm")


def variant_overrides(name: str, config: str, overrides: list[str]) -> list[str]:
    """The overrides of variant ``name``; one built from the config (with the call's overrides) gets it."""
    spec = VARIANTS[name]
    if not callable(spec):
        return spec
    from densegrpo_fast.config import TrainConfig, load_config

    return spec(load_config(TrainConfig, config, overrides))


def run(cmd: list[str], log: Path) -> int:
    with log.open("w") as f:
        return subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
        ).returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/toy_geneval.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--budget-s", type=float, default=300.0, help="training wall time per run (seconds)")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument(
        "--parallel", type=int, default=1, help="runs at once (each uses model.num_threads threads)"
    )
    ap.add_argument(
        "--variants",
        nargs="+",
        default=[v for v in VARIANTS if v not in NAMED_ONLY],
        choices=list(VARIANTS),
    )
    ap.add_argument(
        "--out", default="runs/side_by_side", help="results folder; psi_seed*.json already there are reused"
    )
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every variant")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "densegrpo_fast"]

    # one psi table per seed, made before any clock starts
    made_with = {"config": args.config, "overrides": args.overrides}

    def calibrate(seed: int) -> Path:
        psi = out / f"psi_seed{seed}.json"
        record = psi.with_suffix(".args.json")  # what the table was calibrated for
        if psi.exists() and record.exists() and json.loads(record.read_text()) != made_with:
            raise SystemExit(
                f"{psi} was calibrated for {record.read_text().strip()}, not for this call's config and "
                f"overrides {made_with}: give a fresh --out (or delete the folder's psi tables)"
            )
        if not psi.exists():
            code = run(base + ["calibrate", "--config", args.config, f"run.seed={seed}", f"noise.calibration.path={psi}",
                               *args.overrides], out / f"calibrate_seed{seed}.log")  # fmt: skip
            if code:
                raise SystemExit(f"calibration for seed {seed} failed: see {out}/calibrate_seed{seed}.log")
            record.write_text(json.dumps(made_with))
        return psi

    with ThreadPoolExecutor(args.parallel) as pool:
        psi_paths = dict(zip(args.seeds, pool.map(calibrate, args.seeds), strict=True))

    jobs = []
    for seed in args.seeds:
        for name in args.variants:
            run_dir = out / f"{name}_seed{seed}"
            cmd = base + ["train", "--config", args.config, "--output-dir", str(run_dir), "--no-progress",
                          f"run.seed={seed}", f"run.time_budget_s={args.budget_s}", "run.iterations=100000",
                          "optim.schedule=constant",  # the budget ends these runs: no lr schedule to finish
                          f"run.eval_every={args.eval_every}", f"noise.calibration.path={psi_paths[seed]}",
                          *args.overrides, *variant_overrides(name, args.config, args.overrides)]  # fmt: skip
            if (run_dir / "checkpoint.pt").exists():
                cmd.append("--resume")
            jobs.append((name, seed, run_dir, cmd))
    with ThreadPoolExecutor(args.parallel) as pool:
        codes = list(pool.map(lambda j: run(j[3], j[2].with_suffix(".log")), jobs))
    for (name, seed, run_dir, _), code in zip(jobs, codes, strict=True):
        if code:
            print(f"{name} seed {seed} failed (exit {code}): see {run_dir.with_suffix('.log')}")

    results = {}
    for (name, seed, run_dir, _), code in zip(jobs, codes, strict=True):
        recs = (
            [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
            if (run_dir / "metrics.jsonl").exists()
            else []
        )
        evals = [r for r in recs if "eval_reward" in r]
        steps = [r for r in recs if "reward_mean" in r]
        results.setdefault(name, []).append({"seed": seed, "exit": code, "evals": evals, "iterations": len(steps),
                                             "s_per_iteration": (steps[-1]["wall_s"] / len(steps)) if steps else None})  # fmt: skip
    (out / "results.json").write_text(json.dumps({"budget_s": args.budget_s, "config": args.config,
                                                  "overrides": args.overrides, "results": results}, indent=1))  # fmt: skip
    write_table(results, args, out)
    plot({name: [r for r in runs if not r.get("exit")] for name, runs in results.items()}, out)
    if any(code for code in codes):
        raise SystemExit(1)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else float("nan")


def write_table(results: dict, args, out: Path) -> None:
    """The table of the runs that finished (a failed run's last evaluation is not its end), with the seeds
    each row averages and the runs left out."""
    failed = [f"{name} seed {r['seed']} (exit {r['exit']})" for name, runs in results.items() for r in runs
              if r.get("exit")]  # fmt: skip
    results = {name: [r for r in runs if not r.get("exit")] for name, runs in results.items()}
    keys = sorted(
        {k for runs in results.values() for r in runs for e in r["evals"] for k in e if k.startswith("eval_")}
    )
    lines = [
        f"Held-out scores (EMA weights, ODE sampler of the config's eval section) before and after "
        f"{args.budget_s:.0f} s of training; mean over seeds {args.seeds}.",
        "",
        "| variant | seeds | iterations | s / iteration | "
        + " | ".join(f"{k[5:]} start → end (Δ)" for k in keys)
        + " |",
        "|---|---|---:|---:|" + "---:|" * len(keys),
    ]
    for name, runs in results.items():
        cells = []
        for k in keys:
            start = _mean([r["evals"][0].get(k) for r in runs if r["evals"]])
            end = _mean([r["evals"][-1].get(k) for r in runs if r["evals"]])
            cells.append(f"{start:.3f} → {end:.3f} ({end - start:+.3f})")
        its = _mean([r["iterations"] for r in runs])
        spi = _mean([r["s_per_iteration"] for r in runs])
        seeds = " ".join(str(r["seed"]) for r in runs) or "none"
        lines.append(f"| {name} | {seeds} | {its:.0f} | {spi:.1f} | " + " | ".join(cells) + " |")
    if failed:
        lines += ["", f"Left out, failed: {', '.join(failed)} (see their .log files)."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = (
        "eval_strict"
        if any("eval_strict" in e for runs in results.values() for r in runs for e in r["evals"])
        else "eval_reward"
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, runs) in enumerate(results.items()):
        color = f"C{i}"
        for j, r in enumerate(runs):
            ev = [e for e in r["evals"] if key in e]
            label = name if j == 0 else None
            for ax, x in zip(axes, ("wall_s", "iteration"), strict=True):
                ax.plot(
                    [e[x] for e in ev], [e[key] for e in ev], "o-", color=color, alpha=0.7, label=label, ms=3
                )
    axes[0].set(xlabel="training wall time (s)", ylabel=f"held-out {key[5:]}")
    axes[1].set(xlabel="iteration", ylabel=f"held-out {key[5:]}")
    axes[0].legend(fontsize=7)
    fig.suptitle("toy GenEval: DenseGRPO vs Flow-GRPO and ablations (one line per seed)")
    fig.tight_layout()
    fig.savefig(out / "score_vs_time.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
