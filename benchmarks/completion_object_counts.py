"""What the detector sees in one-step (n = 1) and full (n = remaining) completions of the same latents.

    python benchmarks/completion_object_counts.py [--checkpoint PATH] [--batches 4]

Rolls out the toy model on training prompts (8 prompts x 8 samples per batch, the config's 10-step grid with
uniform a = 0.7 on its SDE window, so no calibration runs), once with ``completion_steps=1`` and once with the
remaining steps, and prints the mean number of detected objects and the exact reward of the completions of
the latents each needs scored (lat[0..2], and lat[3] for n = 1: the window's end) and of the finished image.
The one-step predictions show fewer shapes than the finished images. (The seventh session read this as why
n = 1 taught clutter; that run's clutter came from a bug in scoring the window's last step, fixed in the
twenty-first session: RESULTS.md.)
"""

from __future__ import annotations

import argparse
import tempfile

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/toy_geneval.yaml")
    ap.add_argument("--checkpoint", default=None, help="toy checkpoint (default: the shipped one)")
    ap.add_argument("--batches", type=int, default=4)
    args = ap.parse_args()

    from densegrpo_fast import trainer
    from densegrpo_fast.config import TrainConfig, load_config

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:  # the run directory setup() writes
        overrides = ["noise.kind=uniform", f"run.output_dir={tmp}", "run.wandb.enabled=false"]
        if args.checkpoint:
            overrides.append(f"model.checkpoint={args.checkpoint}")
        cfg = load_config(TrainConfig, args.config, overrides)
        run = trainer.setup(cfg, progress=False)
        for n in (1, None):
            objects, reward = _count(run, n, args.batches)
            label = "n = 1" if n == 1 else "n = remaining"
            print(f"{label}: completion of " + ", ".join(
                f"{name}: {torch.cat(objects[name]).mean():.2f} objects, reward {torch.cat(reward[name]).mean():.3f}"
                for name in objects
            ))  # fmt: skip


def _count(run, n: int | None, batches: int):
    from densegrpo_fast.rewards.pairwise import pointwise_view
    from densegrpo_fast.rollout import sample
    from densegrpo_fast.toy.detector import detect

    cfg, policy = run.cfg, run.policy
    G = cfg.sampling.group_size
    objects: dict[str, list[torch.Tensor]] = {}
    reward: dict[str, list[torch.Tensor]] = {}
    for b in range(batches):
        prompts = run.prompts.sample(8, 100 + b)
        rows = [p for p in prompts for _ in range(G)]
        cond = policy.encode_prompts(rows)
        gen = torch.Generator().manual_seed(b)
        noise = torch.randn(len(rows), *policy.latent_shape, generator=gen)
        with torch.no_grad(), cfg.model.autocast_context():
            ro = sample(policy, cond, noise, run.schedule, guidance_scale=cfg.sampling.guidance_scale,
                        generator=gen, completion_steps=n)  # fmt: skip
        latents = {f"lat[{k}]": ro.clean[:, k] for k in ro.completed}
        latents["final"] = ro.latents[:, -1]
        for name, lat in latents.items():
            images = policy.decode(lat)
            objects.setdefault(name, []).append(detect(images).valid.sum(1).float())
            reward.setdefault(name, []).append(
                pointwise_view(run.reward_fn)(images, rows)
            )  # (a win rate: 1/2)
    return objects, reward


if __name__ == "__main__":
    main()
