"""``densegrpo-fast validate --load-rewards``: build a config's rewards for real and score two images with each,
before any GPU time is spent.

``validate`` alone checks the rewards' names and keywords. This loads every reward the run would build (the
training reward and each ``eval.rewards`` entry with a model of its own) with its weights, from disk, and
scores two images for two prompts: a missing checkpoint, a tokenizer folder without its files, an extra not
installed or a reward server that does not answer (each of a list of servers) shows up here, each with its
reward's own message and fix, all at once. So does a reward that does not return one finite score per
image. The scores themselves are of made-up images (smooth colour fields); they show the reward's scale,
not a verdict.

The prompts are the run's own: the training prompts' first draws for the training reward, the first
held-out prompts for the ``eval.rewards``. Where the prompt file is not on this machine a stand-in with a
quoted text (which the OCR reward needs) takes its place, and the line says so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from densegrpo_fast.config import image_hw
from densegrpo_fast.rewards import build_reward
from densegrpo_fast.rewards.pairwise import is_pairwise, pointwise_view
from densegrpo_fast.rewards.remote import SERVED

#: The prompt when the run's prompt file cannot be read here (quoted text: the OCR reward needs one).
STAND_IN = 'a shop sign that says "open"'


@dataclass
class Checked:
    """One reward of the config: where it is set, what it is, and what loading and scoring it gave."""

    where: str  # "reward", "eval.rewards.<key>", with "[url i]" for one server of a list
    name: str
    load_s: float = 0.0
    score_s: float = 0.0
    scores: list[float] | None = None
    error: str | None = None
    note: str | None = None  # how it was checked, when not with the run's own prompts, or why not at all
    size: tuple[int, int] = (0, 0)  # (height, width) of the images it scored (held-out: eval.resolution's)

    def line(self) -> str:
        head = f"{self.where} {self.name!r}"
        if self.error is not None:
            return f"{head}: FAILED: {self.error}"
        if self.scores is None:
            return f"{head}: {self.note}"
        scores = ", ".join(f"{v:.4g}" for v in self.scores)
        note = f" ({self.note})" if self.note else ""
        return (
            f"{head}: built in {self.load_s:.1f} s; {_two_images(self.size)} scored in {self.score_s:.2f} s: "
            f"{scores}{note}"
        )


def _two_images(size: tuple[int, int]) -> str:
    """``two 512 px images``, or ``two images 48 px high and 32 px wide`` (48x32 would be ambiguous)."""
    h, w = size
    return f"two {h} px images" if h == w else f"two images {h} px high and {w} px wide"


def probe_images(size: int | tuple[int, int], n: int = 2) -> torch.Tensor:
    """``n`` smooth colour fields [n, 3, H, W] in [0, 1] of ``size`` (a side, or (H, W)), the same every
    call: image-like inputs."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=image_hw(size), mode="bilinear", align_corners=False)


def image_size(cfg, heldout: bool = False) -> tuple[int, int]:
    """(height, width) of the images the run's rewards see: the toy world's, or ``model.resolution``'s (the
    held-out evaluation's rewards: ``eval.resolution``'s when it is set)."""
    if cfg.model.family == "toy":
        from densegrpo_fast.toy.world import IMAGE_SIZE

        return IMAGE_SIZE, IMAGE_SIZE
    return image_hw((heldout and cfg.eval.resolution) or cfg.model.resolution)


def run_prompts(dataset: str, seed: int, heldout: bool, n: int = 2) -> tuple[list[str], str | None]:
    """``n`` prompts of ``dataset`` (its first held-out ones, or its first training draws), with None; or
    :data:`STAND_IN` with the reason when the file cannot be read here."""
    from densegrpo_fast.prompts import PromptSource

    try:
        source = PromptSource(dataset, seed)
        return (source.heldout(n) if heldout else source.sample(n, 0)), None
    except (ValueError, OSError):  # not on this machine (the recipes' prompt sets are not shipped)
        return [STAND_IN] * n, f"stand-in prompt: {dataset!r} is not readable here"


def _entries(cfg) -> Iterator[tuple[str, object, bool]]:
    """(where, reward section, held-out prompts?) of each reward to check; a list of servers, one by one."""
    sections = [("reward", cfg.reward, False)]
    sections += [(f"eval.rewards.{k}", r, True) for k, r in cfg.eval_rewards_built().items()]
    for where, r, heldout in sections:
        urls = r.kwargs.get("url") if r.name in SERVED else None
        if isinstance(urls, list | tuple) and len(urls) > 1:
            for i, url in enumerate(urls):
                yield f"{where}[url {i}]", r.model_copy(update={"kwargs": {**r.kwargs, "url": url}}), heldout
        else:
            yield where, r, heldout


def check_rewards(cfg, device: str | torch.device = "cpu", before=None) -> Iterator[Checked]:
    """Build each reward of ``cfg`` on ``device`` and score two images of the run's size for two of the run's
    prompts; check that it returns two finite scores. Yields each result as it is done (failures are
    recorded in it, not raised); ``before(where, name)`` is called before each build (a model takes a
    while to load, a server up to its timeout to answer). Entries of ``eval.rewards`` equal to the training
    reward are reported as scored by its model."""
    for where, r, heldout in _entries(cfg):
        if before is not None:
            before(where, r.name)
        dataset, seed = (cfg.eval.dataset, cfg.eval.seed) if heldout else (cfg.prompts.dataset, cfg.run.seed)
        prompts, note = run_prompts(dataset, seed, heldout)
        size = image_size(cfg, heldout)
        images = probe_images(size).to(device)
        checked, fn = Checked(where, r.name, note=note, size=size), None
        t0 = time.perf_counter()
        try:
            fn = build_reward(r.name, **r.kwargs)
            checked.load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            if is_pairwise(fn) and not heldout:  # the two images as one group of the first prompt
                out = fn(images, prompts[:1] * 2, group_size=2)
                checked.note = "; ".join(filter(None, [checked.note, "win rates of the two as one group"]))
                alone = torch.as_tensor(pointwise_view(fn, where)(images, prompts)).float()
                if tuple(alone.shape) != (2,) or not torch.isfinite(alone).all():  # (the evaluation's view)
                    raise ValueError(
                        f"its pointwise view, which the held-out evaluation scores, returned {alone}"
                    )
                checked.note += f"; alone, as evaluated: {', '.join(f'{v:.4g}' for v in alone.tolist())}"
            else:
                out = pointwise_view(fn, where)(images, prompts)
            checked.score_s = time.perf_counter() - t0
            out = torch.as_tensor(out)
            if tuple(out.shape) != (2,):
                raise ValueError(
                    f"it returned shape {tuple(out.shape)} for 2 images, not (2,): a reward returns one score "
                    "per image"
                )
            checked.scores = out.detach().float().cpu().tolist()
            if not all(map(math.isfinite, checked.scores)):
                raise ValueError(f"it returned {checked.scores} for 2 images: a score that is not finite")
        except Exception as e:  # every failure is reported, with the reward's own message
            checked.error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            checked.scores = None
        finally:
            del fn  # (one reward model in memory at a time)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
        yield checked
    built = cfg.eval_rewards_built()
    for key, r in cfg.eval.rewards.items():
        if key not in built:
            yield Checked(f"eval.rewards.{key}", r.name, note="scored by the training reward's model")
