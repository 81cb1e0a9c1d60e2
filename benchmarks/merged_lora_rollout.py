"""Time one toy rollout (the default config's 4 prompts x 8) with ``lora.merge_for_sampling`` on and off,
alternated in one process so that both see the same machine load.

    python benchmarks/merged_lora_rollout.py [--repeats 3] [--threads 1] [key=value ...]
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from densegrpo_fast.config import TrainConfig, load_config
from densegrpo_fast.trainer import collect, setup

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. lora.rank=8")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="merged_lora_"))
    try:
        shutil.copy(
            ROOT / "benchmarks" / "side_by_side" / "psi_seed0.json", out / "psi.json"
        )  # no calibration
        overrides = [f"run.output_dir={out}", f"model.num_threads={args.threads}", *args.overrides]
        run = setup(
            load_config(TrainConfig, ROOT / "configs" / "toy_geneval.yaml", overrides), progress=False
        )
        torch.manual_seed(0)
        with torch.no_grad():  # a trained adapter (B starts at zero; the cost is the same either way)
            for name, p in run.policy.transformer.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        prompts = run.prompts.sample(run.cfg.prompts.prompts_per_iteration, 0)
        seconds: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(args.repeats):
            for merged in (True, False):
                run.cfg.lora.merge_for_sampling = merged
                t0 = time.perf_counter()
                collect(run, prompts, 0)
                seconds[merged].append(time.perf_counter() - t0)
        for merged, s in seconds.items():
            print(f"{'merged' if merged else 'unmerged':>8}: " + ", ".join(f"{x:.2f}" for x in s) + " s")
        print(f"unmerged / merged (best against best): {min(seconds[False]) / min(seconds[True]):.2f}x")
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
