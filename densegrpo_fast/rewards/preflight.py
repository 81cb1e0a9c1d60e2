"""``densegrpo-fast validate --load-rewards``: build a config's rewards for real and score one image with each,
before any GPU time is spent.

``validate`` alone checks the rewards' names and keywords. This loads every reward the run would build (the
training reward and each ``eval.rewards`` entry) with its weights, from disk, and scores one image for one
prompt: a missing checkpoint, a tokenizer folder without its files, an extra not installed or a reward
server that does not answer shows up here, each with its reward's own message and fix, all at once. The
score itself is of a made-up image (a smooth colour field); it shows the reward's scale, not a verdict.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from densegrpo_fast.rewards import build_reward


@dataclass
class Checked:
    """One reward of the config: where it is set, what it is, and what loading and scoring it gave."""

    where: str  # "reward" or "eval.rewards.<key>"
    name: str
    load_s: float = 0.0
    score_s: float = 0.0
    score: float | None = None
    error: str | None = None

    def line(self, size: int) -> str:
        head = f"{self.where} {self.name!r}"
        if self.error is not None:
            return f"{head}: FAILED: {self.error}"
        return (
            f"{head}: built in {self.load_s:.1f} s; one {size} px image scored in {self.score_s:.2f} s: "
            f"{self.score:.4g}"
        )


def probe_image(size: int, seed: int = 0) -> torch.Tensor:
    """A smooth colour field [1, 3, size, size] in [0, 1]: an image-like input for any reward."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def image_size(cfg) -> int:
    """The side of the images the run's rewards see: the toy world's, or ``model.resolution``."""
    if cfg.model.family == "toy":
        from densegrpo_fast.toy.world import IMAGE_SIZE

        return IMAGE_SIZE
    return int(cfg.model.resolution)


def first_prompt(cfg) -> str:
    """The training prompts' first draw, or a generic prompt when the prompt source cannot be read here."""
    from densegrpo_fast.prompts import PromptSource

    try:
        return PromptSource(cfg.prompts.dataset, cfg.run.seed).sample(1, 0)[0]
    except ValueError:  # no prompt file on this machine: the rewards still load and score
        return "a photo of a cat"


def check_rewards(cfg, device: str = "cpu") -> Iterator[Checked]:
    """Build each reward of ``cfg`` (the training one, then ``eval.rewards``; an evaluation entry equal to the
    training reward is scored by that reward's model and not built twice) on ``device`` and score one
    image of the model's resolution for a training prompt. Yields each result as it is done; failures are
    recorded in it, not raised."""
    sections = [("reward", cfg.reward)]
    sections += [(f"eval.rewards.{k}", r) for k, r in cfg.eval.rewards.items() if r != cfg.reward]
    image = probe_image(image_size(cfg)).to(device)
    prompt = first_prompt(cfg)
    for where, r in sections:
        checked = Checked(where, r.name)
        t0 = time.perf_counter()
        try:
            fn = build_reward(r.name, **r.kwargs)
            checked.load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            score = fn(image, [prompt])
            checked.score_s = time.perf_counter() - t0
            checked.score = float(torch.as_tensor(score).float().flatten()[0])
        except Exception as e:  # every failure is reported, with the reward's own message
            checked.error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        yield checked
