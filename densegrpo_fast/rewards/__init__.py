"""Registry of reward functions. Rewards know nothing of models.

A reward is a callable ``reward(images [B, 3, H, W] float32 in [0, 1], prompts: list[str]) -> [B] float32``.
Register a factory with :func:`register`; :func:`build_reward` makes one from a config's name and kwargs.

Rewards with weights or servers live in their own modules, imported at the end of this one so that they
register; their heavy imports (transformers, PIL, easyocr) happen when a reward is built, not here:

- ``pickscore``, ``clip_score``, ``aesthetic``, ``source_similarity`` (editing: CLIP similarity of an edit
  to its source): :mod:`densegrpo_fast.rewards.clip`
- ``hps`` (HPS v2.1 / v2, OpenCLIP weights converted to transformers): :mod:`densegrpo_fast.rewards.hps`
- ``imagereward`` (ImageReward v1.0, BLIP weights converted to transformers):
  :mod:`densegrpo_fast.rewards.imagereward`
- ``jpeg_compressibility``, ``jpeg_incompressibility``: :mod:`densegrpo_fast.rewards.jpeg`
- ``ocr``: :mod:`densegrpo_fast.rewards.ocr`
- ``vqascore`` (VQAScore with a Qwen2.5-VL model): :mod:`densegrpo_fast.rewards.vqascore`
- ``hpsv3`` (HPSv3, a Qwen2-VL-7B preference model): :mod:`densegrpo_fast.rewards.hpsv3`
- ``vlm_judge`` (a vision-language model behind an OpenAI-compatible server: vLLM, SGLang, an API):
  :mod:`densegrpo_fast.rewards.vlm_judge`
- ``multi`` (weighted sum): :mod:`densegrpo_fast.rewards.multi`
- ``win_rate`` (pairwise: each image's win rate in its group under a pointwise reward) and ``vlm_pairwise`` (a
  judge shown two images): :mod:`densegrpo_fast.rewards.pairwise`, :mod:`densegrpo_fast.rewards.vlm_judge`
- ``geneval_detector`` (GenEval's detector, colours and rules, for a server in an environment with mmdetection):
  :mod:`densegrpo_fast.rewards.geneval_detector`
- ``remote``, ``geneval`` (reward server client): :mod:`densegrpo_fast.rewards.remote`; the server is
  :mod:`densegrpo_fast.rewards.server` (``densegrpo-fast serve-reward``)
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Callable
from typing import Protocol

import torch


class Reward(Protocol):
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...


_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register(name: str):
    """Decorator: ``@register("name")`` on a factory ``(**kwargs) -> Reward``."""

    def deco(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in _REGISTRY:
            raise ValueError(f"reward {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return deco


def count_problems(**counts) -> list[str]:
    """``reward.kwargs`` values that must be whole numbers >= 1 (``max_batch: 2.5``, ``true`` or ``0`` are
    not), each named with the rule."""
    return [
        f"reward.kwargs.{name}={value!r} must be a whole number >= 1"
        for name, value in counts.items()
        if isinstance(value, bool) or not isinstance(value, int) or value < 1
    ]


def available() -> list[str]:
    return sorted(_REGISTRY)


def unknown_name(name: object, where: str = "reward.name") -> str:
    """The error for a reward name not in the registry, with the nearest registered one."""
    near = difflib.get_close_matches(str(name), available(), n=1)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return f"{where}={name!r} is not a registered reward: {hint}choose one of {available()}"


def kwargs_problems(name: str, kwargs: dict) -> list[str]:
    """What is wrong with ``reward.kwargs`` for the registered reward ``name``, found without building it
    (no weights load): keyword names the factory does not take, required ones missing, and the values a
    factory declares checkable in its ``check`` attribute (a function of the kwargs returning problems)."""
    factory = _REGISTRY[name]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        params = [p for p in inspect.signature(factory).parameters if p != "kwargs"]
        return [f"reward {name!r} does not take reward.kwargs={kwargs} ({e}); its keywords are {params}"]
    check = getattr(factory, "check", None)
    return list(check(**kwargs)) if check else []


def describe(name: str) -> dict:
    """What ``densegrpo-fast rewards`` shows of the registered reward ``name``: its summary (the docstring's
    first paragraph, on one line, Sphinx roles dropped), its keywords with their defaults, the required ones
    (no default) by name, and the module and qualified name that document it."""
    factory = _REGISTRY[name]
    doc = inspect.getdoc(factory) or ""
    summary = " ".join(doc.split("\n\n")[0].split()).replace("``", "`")
    summary = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", summary)
    params = [
        p
        for p in inspect.signature(factory).parameters.values()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    return {
        "name": name,
        "summary": summary,
        "required": [p.name for p in params if p.default is inspect.Parameter.empty],
        "keywords": {p.name: p.default for p in params if p.default is not inspect.Parameter.empty},
        "module": factory.__module__,
        "qualname": f"{factory.__module__}.{factory.__qualname__}",
    }


def spec_is_pairwise(name: str, kwargs: dict) -> bool:
    """Whether the reward ``name`` built with ``kwargs`` compares the images of a group
    (:mod:`densegrpo_fast.rewards.pairwise`), found without building it: its factory's ``pairwise``, or, for a
    weighted sum, any of its components'."""
    factory = _REGISTRY.get(name)
    if factory is None:
        return False
    if getattr(factory, "pairwise", False):
        return True
    parts = kwargs.get("rewards") if name == "multi" and isinstance(kwargs, dict) else None
    return isinstance(parts, dict) and any(
        isinstance(p, dict) and spec_is_pairwise(p.get("name"), p.get("kwargs") or {}) for p in parts.values()
    )


def build_reward(name: str, **kwargs) -> Reward:
    """The reward registered as ``name``, built with ``kwargs``; unknown names get the nearest valid one."""
    if name not in _REGISTRY:
        raise ValueError(unknown_name(name))
    factory = _REGISTRY[name]
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:  # (a TypeError from inside the factory is its own: it is not caught here)
        raise ValueError(f"reward {name!r} does not take reward.kwargs={kwargs}: {e}") from None
    return factory(**kwargs)


@register("toy_geneval")
def _toy_geneval(mode: str = "partial") -> Reward:
    """The toy world's GenEval-style detector, by ``mode``: the fraction of requirements met (``partial``),
    0/1 for all met (``strict``), 0/1 for all met and nothing extra (``exact``), and two blends
    (``count_exact``, ``partial_exact``; see :mod:`densegrpo_fast.toy.detector`)."""
    from densegrpo_fast.toy.detector import ToyGenEvalReward

    return ToyGenEvalReward(mode=mode)


def _toy_geneval_check(mode: str = "partial") -> list[str]:
    from densegrpo_fast.toy.detector import MODES

    if mode in MODES:
        return []
    return [f"reward.kwargs.mode={mode!r} is not a toy_geneval mode: choose one of {list(MODES)}"]


_toy_geneval.check = _toy_geneval_check


@register("redness")
def _redness() -> Reward:
    """Weight-free test reward: mean of ``red - (green + blue) / 2`` over the image, in [-1, 1].

    Dense and smooth in the pixels, so even an untrained model gets spread-out rewards: the tests use it to
    drive real updates through the engine in seconds."""

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        r, g, b = images.float().unbind(1)
        return (r - (g + b) / 2).flatten(1).mean(1)

    return reward


# The rewards of the modules listed in the docstring register themselves on import (light imports only).
from densegrpo_fast.rewards import (  # noqa: E402, F401
    clip,
    geneval_detector,
    hps,
    hpsv3,
    imagereward,
    jpeg,
    multi,
    ocr,
    pairwise,
    remote,
    vlm_judge,
    vqascore,
)
