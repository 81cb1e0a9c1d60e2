"""Held-out GenEval-style evaluation of a toy policy: sample, detect, score per category, draw a grid.

``densegrpo-fast eval --config configs/toy_geneval.yaml [--checkpoint PATH] [--json]`` runs
:func:`run_eval`. Sampling is the deterministic Euler ODE on SD3's sigma grid with CFG (ALGORITHM.md §1);
the initial noise of prompt ``i`` depends only on (seed, i), so scores do not depend on the batch size.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from densegrpo_fast.config import EvalSection
from densegrpo_fast.policies.base import Policy
from densegrpo_fast.schedule import sigma_grid
from densegrpo_fast.toy.config import ToyEvalConfig
from densegrpo_fast.toy.detector import score
from densegrpo_fast.toy.world import CATEGORIES, ToyPrompt, eval_prompts, parse_prompt, prompt_split


@torch.no_grad()
def sample(
    policy: Policy,
    prompts: list[str],
    noise: torch.Tensor,
    num_steps: int = 20,
    guidance_scale: float = 1.5,
    shift: float = 1.0,
) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] from initial ``noise`` [B, *latent_shape] by the Euler ODE."""
    cond = policy.encode_prompts(prompts, with_negative=guidance_scale != 1.0)
    sig = sigma_grid(num_steps, shift).to(policy.device)
    x = noise.to(policy.device, torch.float32)
    for k in range(num_steps):
        v = policy.velocity(x, sig[k].expand(len(prompts)), cond, guidance_scale)
        x = x + v * (sig[k + 1] - sig[k])
    return policy.decode(x)


# The detector's scores the eval command reports per category (densegrpo_fast.toy.detector.score).
_REPORTED = ("strict", "exact", "partial", "extra")


def heldout_prompts(dataset: str, n: int | None, seed: int) -> list[ToyPrompt]:
    """``n`` prompts of ``dataset``: ``toy:test`` / ``toy:train`` (balanced over categories), or a file of
    toy-world prompts (one per line, or a ``.jsonl`` of prompt fields; cycled to ``n``); ``n = None``: as many
    as the split or file has."""
    if dataset in ("toy:test", "toy:train"):
        split = dataset.split(":")[1]
        n = sum(map(len, prompt_split()[split].values())) if n is None else n
        return eval_prompts(n, seed, split)
    path = Path(dataset)
    if not path.is_file():
        raise ValueError(
            f"eval.dataset={dataset!r} is neither toy:test / toy:train nor an existing file: pass a text file of "
            "toy-world prompts, one per line"
        )
    from densegrpo_fast.prompts import EditPrompt, edit_mismatch, prompt_lines

    # (a .jsonl's prompt fields, as training's evaluation reads them)
    lines = prompt_lines(path, "eval.dataset")
    if not lines:
        raise ValueError(f"eval.dataset={dataset!r} holds no prompt: put one toy-world prompt per line")
    if bad := edit_mismatch("toy", isinstance(lines[0], EditPrompt), "eval.dataset", dataset):
        raise ValueError(bad)
    return [parse_prompt(lines[i % len(lines)]) for i in range(len(lines) if n is None else n)]


def evaluate(policy: Policy, cfg: EvalSection, grid_path: str | Path | None = None) -> dict:
    """Strict, exact and partial scores and the share of images with extra objects (see
    :func:`~densegrpo_fast.toy.detector.score`), overall and per category, on ``cfg.num_prompts`` prompts of
    ``cfg.dataset``, plus the mean of each of ``cfg.rewards`` (registry rewards) under ``"rewards"``."""
    from densegrpo_fast.rewards import build_reward
    from densegrpo_fast.rewards.pairwise import pointwise_view

    if cfg.shift is None:
        raise ValueError(
            "eval.shift is null (the model's own grid), but the toy model has no scheduler of its own: give a "
            "number (configs/toy_geneval.yaml uses 1.0)"
        )
    t0 = time.perf_counter()
    reward_fns = {  # (a pairwise reward scores an image alone through its pointwise view)
        k: pointwise_view(build_reward(r.name, **r.kwargs), f"eval.rewards.{k}")
        for k, r in cfg.rewards.items()
    }
    prompts = heldout_prompts(cfg.dataset, cfg.num_prompts, cfg.seed)
    texts = [p.text for p in prompts]
    g = torch.Generator().manual_seed(cfg.seed)
    noise = torch.randn(len(prompts), *policy.latent_shape, generator=g)
    images: list[torch.Tensor] = []
    metrics: dict[str, list[torch.Tensor]] = {k: [] for k in _REPORTED}
    reward_scores: dict[str, list[torch.Tensor]] = {k: [] for k in reward_fns}
    for i in range(0, len(prompts), cfg.batch_size):
        img = sample(
            policy,
            texts[i : i + cfg.batch_size],
            noise[i : i + cfg.batch_size],
            cfg.num_steps,
            cfg.guidance_scale,
            cfg.shift,
        ).cpu()
        s = score(img, texts[i : i + cfg.batch_size])
        for k, fn in reward_fns.items():
            reward_scores[k].append(fn(img, texts[i : i + cfg.batch_size]).float())
        images.append(img)
        for k in _REPORTED:
            metrics[k].append(s[k])
    images = torch.cat(images)
    per_prompt = {k: torch.cat(v) for k, v in metrics.items()}
    cats = [p.category for p in prompts]
    out: dict = {
        **{k: v.mean().item() for k, v in per_prompt.items()},
        "per_category": {},
        "num_prompts": len(prompts),
        "num_steps": cfg.num_steps,
        "guidance_scale": cfg.guidance_scale,
        "shift": cfg.shift,
        "seed": cfg.seed,
        "dataset": cfg.dataset,
        "rewards": {k: torch.cat(v).mean().item() for k, v in reward_scores.items()},
    }
    for c in CATEGORIES:
        idx = torch.tensor([i for i, k in enumerate(cats) if k == c], dtype=torch.long)
        if len(idx) == 0:
            continue
        out["per_category"][c] = {**{k: v[idx].mean().item() for k, v in per_prompt.items()}, "n": len(idx)}
    out["wall_s"] = time.perf_counter() - t0
    if grid_path is not None and cfg.grid_size > 0:
        save_grid(
            images[: cfg.grid_size], texts[: cfg.grid_size], per_prompt["strict"][: cfg.grid_size], grid_path
        )
    return out


def save_grid(images: torch.Tensor, prompts: list[str], passed: torch.Tensor, path: str | Path) -> None:
    """PNG grid of ``images`` [N, 3, H, W] titled with their prompts and a pass (green) / fail (red) mark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    cols = min(8, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 2.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, text, ok in zip(axes.flat, images, prompts, passed.tolist(), strict=False):
        ax.imshow(img.permute(1, 2, 0).numpy(), interpolation="nearest")
        words = text.split()
        title = " ".join(words[:3]) + ("\n" + " ".join(words[3:]) if len(words) > 3 else "")
        ax.set_title(("\u2713 " if ok else "\u2717 ") + title, fontsize=6.5, color="green" if ok else "red")
    fig.tight_layout(pad=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_scores(res: dict) -> str:
    """The eval command's table: a row per category and one overall, a column per score of ``_REPORTED``."""
    lines = [f"{'category':<14}" + "".join(f" {k:>7}" for k in _REPORTED) + f" {'n':>5}"]
    for name, r, n in [
        *((c, r, r["n"]) for c, r in res["per_category"].items()),
        ("overall", res, res["num_prompts"]),
    ]:
        lines.append(f"{name:<14}" + "".join(f" {r[k]:>7.3f}" for k in _REPORTED) + f" {n:>5}")
    lines.append(
        "strict: every requirement met (GenEval's score); exact: strict with no extra object; "
        "extra: share of images with more objects than asked"
    )
    lines += [f"reward {k}: {v:.4f}" for k, v in res["rewards"].items()]
    lines.append(
        f"({res['num_steps']} Euler steps, CFG {res['guidance_scale']}, shift {res['shift']}, seed {res['seed']}, "
        f"{res['wall_s']:.1f} s)"
    )
    return "\n".join(lines)


def run_eval(config: str, overrides: list[str], checkpoint: str | None = None, as_json: bool = False) -> dict:
    """The ``eval`` command: load config and policy, evaluate, write scores.json, samples.png and the
    resolved config.yaml (its ``model`` and ``eval`` sections) to ``eval.output_dir``."""
    from densegrpo_fast.config import dump_config, load_config
    from densegrpo_fast.policies.toy import ToyPolicy

    cfg = load_config(ToyEvalConfig, config, overrides)
    torch.set_num_threads(cfg.model.num_threads)
    from densegrpo_fast.distributed import check_device

    check_device(cfg.model.device)
    ckpt = checkpoint if checkpoint is not None else cfg.model.checkpoint
    policy = ToyPolicy.load(ckpt, cfg.model.device)
    out_dir = Path(cfg.eval.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, out_dir / "config.yaml")
    res = evaluate(policy, cfg.eval, out_dir / "samples.png")
    res["checkpoint"] = str(ckpt) if ckpt else "shipped"
    (out_dir / "scores.json").write_text(json.dumps(res, indent=2))
    print(
        json.dumps(res, indent=2)
        if as_json
        else format_scores(res) + f"\nwrote {out_dir}/scores.json, samples.png"
    )
    return res
