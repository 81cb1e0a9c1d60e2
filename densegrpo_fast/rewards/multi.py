"""Weighted sum of registry rewards.

Config form::

    reward:
      name: multi
      kwargs:
        rewards:
          pick: {name: pickscore, kwargs: {model: /w/PickScore_v1, processor: /w/CLIP-H}, weight: 1.0}
          jpeg: {name: jpeg_compressibility, weight: 0.1}

The score is ``sum_k weight_k * reward_k`` in the order given. Components are **not** normalised: raw
PickScore is ~22 while a JPEG size is tens of kB and a CLIP cosine ~0.3, so choose weights on the scale of
each reward (GRPO then normalises the sum per group, not each term). Training with
``dense.multi_reward: per_reward`` instead normalises each component's step rewards per group and step
and sums the advantages with these weights (MixGRPO's advantage aggregation): the weights are then
relative importances, whatever each reward's scale (but for ``dense.adv_eps``, added to each component's
std, which shrinks a component whose step rewards spread by less than ~1e-3).
"""

from __future__ import annotations

import math

import torch

from densegrpo_fast.rewards import Reward, available, build_reward, kwargs_problems, register, unknown_name
from densegrpo_fast.rewards.pairwise import is_pairwise, score

_SPEC_KEYS = {"name", "kwargs", "weight"}


def _weight_problem(where: str, weight) -> str | None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        return f"{where}.weight={weight!r} must be a finite number"
    return None


@register("multi")
class WeightedSum:
    """A weighted sum of registered rewards, each part built as its own reward.

    ``rewards``: ``{key: {name, kwargs (optional), weight (optional, default 1)}}``."""

    def __init__(self, rewards: dict):
        if not isinstance(rewards, dict) or not rewards:
            raise ValueError(
                f"reward.kwargs.rewards={rewards!r} must be a non-empty mapping "
                "{key: {name: ..., kwargs: {...}, weight: ...}}"
            )
        self.parts: dict[str, tuple[Reward, float]] = {}
        for key, spec in rewards.items():
            where = f"reward.kwargs.rewards.{key}"
            if not isinstance(spec, dict) or "name" not in spec or set(spec) - _SPEC_KEYS:
                raise ValueError(
                    f"{where}={spec!r} must be a mapping with 'name' and optional 'kwargs' and 'weight' "
                    f"(unknown keys: {sorted(set(spec) - _SPEC_KEYS) if isinstance(spec, dict) else '-'})"
                )
            weight = spec.get("weight", 1.0)
            if problem := _weight_problem(where, weight):
                raise ValueError(problem)
            kwargs = spec.get("kwargs") or {}
            if not isinstance(kwargs, dict):
                raise ValueError(f"{where}.kwargs={kwargs!r} must be a mapping of keyword arguments")
            self.parts[key] = (build_reward(spec["name"], **kwargs), float(weight))
        #: Whether every component sees an edit's source image (densegrpo_fast.prompts.source_blind).
        self.sees_sources = all(getattr(fn, "sees_sources", False) for fn, _ in self.parts.values())
        #: Whether a component compares the images of a group (:mod:`densegrpo_fast.rewards.pairwise`): the
        #: sum is then called with the group size, which the pairwise components get.
        self.pairwise = any(is_pairwise(fn) for fn, _ in self.parts.values())

    @property
    def pointwise(self) -> WeightedSum | None:
        """The sum with each pairwise component replaced by its pointwise view (what scores a held-out image
        alone), or None where one has none. (A property: stored, it would name the components' models twice.)"""
        views = {
            k: (getattr(fn, "pointwise", None) if is_pairwise(fn) else fn, w)
            for k, (fn, w) in self.parts.items()
        }
        if not self.pairwise or any(fn is None for fn, _ in views.values()):
            return None
        view = object.__new__(WeightedSum)
        view.parts, view.sees_sources, view.pairwise = views, self.sees_sources, False
        return view

    @staticmethod
    def check(rewards: dict) -> list[str]:
        """Each component's name and kwargs checked as the top-level reward's are (nothing is built); the
        shape of the mapping itself is checked when the reward is built."""
        problems = []
        for key, spec in rewards.items() if isinstance(rewards, dict) else ():
            if not isinstance(spec, dict) or not isinstance(spec.get("kwargs") or {}, dict):
                continue
            if problem := _weight_problem(f"reward.kwargs.rewards.{key}", spec.get("weight", 1.0)):
                problems.append(problem)
            name = spec.get("name")
            if name not in available():
                problems.append(unknown_name(name, f"reward.kwargs.rewards.{key}.name"))
            else:
                problems += [
                    f"reward.kwargs.rewards.{key}: {p}"
                    for p in kwargs_problems(name, spec.get("kwargs") or {})
                ]
        return problems

    def components(
        self, images: torch.Tensor, prompts: list[str], group_size: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Each component's unweighted score (a pairwise one's with ``group_size``). Shape: {key: [B] float32} on
        the images' device."""
        return {
            k: score(fn, images, prompts, group_size).float().to(images.device)
            for k, (fn, _) in self.parts.items()
        }

    @property
    def weights(self) -> list[float]:
        """The components' weights, in their order."""
        return [w for _, w in self.parts.values()]

    def stack(self, images: torch.Tensor, prompts: list[str], group_size: int | None = None) -> torch.Tensor:
        """Each component's unweighted score, side by side (``dense.multi_reward=per_reward`` trains on
        them). Shape: [B, components] float32."""
        return torch.stack(list(self.components(images, prompts, group_size).values()), dim=-1)

    def combine(self, parts: torch.Tensor) -> torch.Tensor:
        """The weighted sum of scores laid out as :meth:`stack` gives them (any leading shape): the reward,
        added in the components' order as ``__call__`` adds them."""
        total = None
        for i, w in enumerate(self.weights):
            term = w * parts[..., i]
            total = term if total is None else total + term
        return total

    def __call__(
        self, images: torch.Tensor, prompts: list[str], group_size: int | None = None
    ) -> torch.Tensor:
        return self.combine(self.stack(images, prompts, group_size))
