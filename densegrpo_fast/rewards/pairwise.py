"""Pairwise rewards: each image's win rate against the other images of its group (Pref-GRPO, arXiv 2508.20751).

A pointwise reward scores each image alone, and GRPO normalises the scores per group: where a group's scores lie
close together, a difference the reward model cannot really tell apart is stretched to a whole standard deviation
(Pref-GRPO's "illusory advantage"), and the policy learns to chase it. A pairwise reward compares the images of a
group two at a time instead; an image's reward is the share of its comparisons it wins, in [0, 1].

**The protocol.** A reward whose ``pairwise`` attribute is true is called ``reward(images, prompts,
group_size=G)``: the rows come in contiguous groups of G images of one prompt (the engine's layout), and it
answers each row's win rate. Its ``pointwise`` attribute is what scores an image alone, where there is no group
(the held-out evaluation), or None where the reward has no such view. :func:`score` calls either kind.

**Dense rewards.** A rollout's latent k is completed to an image for each row, and each row's completion is
compared with the completions of its group's other rows at the same latent: ``R[:, k]`` is the win rate at step
k and ``dR_k = R[:, k+1] - R[:, k]`` the win rate the step gained. A group's win rates average 1/2 at every step
whenever ``P(a beats b) + P(b beats a) = 1`` (the Bradley-Terry form and ``both_orders`` make it so), so their mean
says nothing of progress: the held-out evaluation scores the pointwise view.

**Cost.** A group of G compares G (G - 1) / 2 pairs (twice with ``both_orders``) at each latent scored, which for
a judge model is most of an iteration's time: ``opponents`` m (even) compares each image with m others of its
group only (a circulant schedule: image i with i +- 1, ..., i +- m/2 modulo G; the rows of a group are
exchangeable, so no shuffle is needed), G m / 2 pairs.

Two pairwise rewards are registered:

- ``win_rate``: the Bradley-Terry win rate of a pointwise reward, ``P(a beats b) = sigmoid((r_a - r_b) / t)``, or
  with ``temperature`` t = 0 the count of wins (1 for a higher score, 1/2 for a tie). Rank-based: a reward whose
  scores differ by 1e-6 gives the same win rates as one whose scores differ by 10 (t = 0).
- ``vlm_pairwise`` (:mod:`densegrpo_fast.rewards.vlm_judge`): a vision-language judge behind an OpenAI-compatible
  server shown the two images, as Pref-GRPO's UnifiedReward-Think is.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from densegrpo_fast.rewards import (
    Reward,
    available,
    build_reward,
    kwargs_problems,
    register,
    spec_is_pairwise,
    unknown_name,
)
from densegrpo_fast.rewards.images import check_batch


def is_pairwise(reward_fn) -> bool:
    """Whether ``reward_fn`` (a reward, or a bound method of one such as ``WeightedSum.stack``) compares the
    images of a group."""
    return bool(getattr(getattr(reward_fn, "__self__", reward_fn), "pairwise", False))


def score(reward_fn, images: torch.Tensor, prompts: list[str], group_size: int) -> torch.Tensor:
    """``reward_fn``'s scores of ``images``: a pairwise reward is told the group size (its rows come in contiguous
    groups of ``group_size``), a pointwise one scores each image alone."""
    if is_pairwise(reward_fn):
        return reward_fn(images, prompts, group_size=group_size)
    return reward_fn(images, prompts)


def pointwise_view(reward_fn, where: str = "reward"):
    """What scores an image alone for ``reward_fn``: the reward itself, or a pairwise reward's ``pointwise``
    view; a ValueError naming ``where`` for a pairwise reward that has none."""
    if not is_pairwise(reward_fn):
        return reward_fn
    view = getattr(reward_fn, "pointwise", None)
    if view is None:
        raise ValueError(
            f"{where} compares images in pairs and has no pointwise view to score a held-out image alone, as the "
            "evaluation does: give it a `pointwise` attribute (a reward of one image), or use a pointwise reward there"
        )
    return view


def pointwise_spec(name: str, kwargs: dict) -> dict | None:
    """The ``{name, kwargs}`` of the reward that scores images alone for the pairwise reward ``name`` built with
    ``kwargs`` (its ``pointwise`` view), or None for a pointwise reward: ``win_rate``'s own reward,
    ``vlm_pairwise``'s ``vlm_judge`` on its server, a weighted sum's parts each mapped. What the noise is calibrated
    on, and what an ``eval.rewards`` entry equal to it is scored by."""
    kwargs = kwargs or {}
    if name == "win_rate":
        inner = kwargs.get("reward") or {}
        return {"name": inner.get("name"), "kwargs": inner.get("kwargs") or {}}
    if name == "vlm_pairwise":
        from densegrpo_fast.rewards.vlm_judge import view_kwargs

        return {"name": "vlm_judge", "kwargs": view_kwargs(kwargs)}
    if name == "multi" and spec_is_pairwise(name, kwargs):
        parts = {
            k: {**p, **(pointwise_spec(p.get("name"), p.get("kwargs") or {}) or {})}
            for k, p in kwargs["rewards"].items()
        }
        return {"name": "multi", "kwargs": {**kwargs, "rewards": parts}}
    return None


def same_scoring(name: str, kwargs: dict, other: dict) -> bool:
    """Whether the reward ``name`` with ``kwargs`` scores as ``other`` (``{name, kwargs}``) does: the same name, and
    the same kwargs once the factory's defaults fill what either leaves out and the settings that only say how a
    reward is reached are dropped (:func:`densegrpo_fast.evaluate.scoring_kwargs`)."""
    import inspect

    from densegrpo_fast.evaluate import scoring_kwargs
    from densegrpo_fast.rewards import _REGISTRY

    if name != other.get("name") or name not in _REGISTRY:
        return False
    defaults = {
        p.name: p.default
        for p in inspect.signature(_REGISTRY[name]).parameters.values()
        if p.default is not inspect.Parameter.empty
    }
    full = lambda kw: scoring_kwargs({**defaults, **(kw or {})})  # noqa: E731
    return full(kwargs) == full(other.get("kwargs"))


def schedule(group_size: int, opponents: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs ``(a, b)`` of one group's rows that are compared, as two index tensors of equal length: every
    pair once (``opponents`` None, or >= group_size - 1), or each row with the ``opponents`` (even) rows around it
    in a circle. Every row plays the same number of games either way."""
    G = group_size
    if opponents is None or opponents >= G - 1:
        a, b = torch.triu_indices(G, G, offset=1)
        return a, b
    rows = torch.arange(G)
    a = rows.repeat(opponents // 2)
    b = torch.cat([(rows + d) % G for d in range(1, opponents // 2 + 1)])
    return a, b


def win_rates(
    prefer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rows: int,
    group_size: int,
    opponents: int | None = None,
) -> torch.Tensor:
    """Each row's win rate in its group. ``prefer(a, b)`` takes two index tensors of rows (a pair per entry, both
    in one group) and answers ``P(row a beats row b)`` per pair, in [0, 1]; a row's win rate is the mean, over its
    games, of its probability of winning. Shape: [rows] float32 (rows: contiguous groups of ``group_size``)."""
    a, b = schedule(group_size, opponents)
    start = torch.arange(0, rows, group_size)[:, None]
    a, b = (start + a).flatten(), (start + b).flatten()
    p = prefer(a, b).float().cpu()
    if p.shape != a.shape:
        raise ValueError(f"a pairwise judge answered {tuple(p.shape)} for {a.numel()} pairs")
    wins = torch.zeros(rows).index_add_(0, a, p).index_add_(0, b, 1 - p)
    games = torch.zeros(rows).index_add_(0, a, torch.ones_like(p)).index_add_(0, b, torch.ones_like(p))
    return wins / games


def group_problems(images: torch.Tensor, prompts: list[str], group_size: object) -> list[str]:
    """What is wrong with a pairwise reward's call: the groups must be whole, of at least two rows, and share
    their prompt."""
    if group_size is None:
        return [
            "a pairwise reward compares the images of a group and was called without group_size: score images "
            "alone through its pointwise view (densegrpo_fast.rewards.pairwise.pointwise_view)"
        ]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        return [
            f"a pairwise reward compares the images of a group: group_size={group_size!r} must be a whole "
            "number >= 2 (sampling.group_size)"
        ]
    if len(prompts) % group_size:
        return [
            f"{len(prompts)} rows are not whole groups of {group_size}: a pairwise reward scores whole groups"
        ]
    for s in range(0, len(prompts), group_size):
        if any(p != prompts[s] for p in prompts[s : s + group_size]):
            return [
                f"rows {s}..{s + group_size - 1} should be one group of one prompt, but hold "
                f"{sorted(set(map(str, prompts[s : s + group_size])))[:3]}: a pairwise reward compares images "
                "of the same prompt"
            ]
    return []


def check_groups(images: torch.Tensor, prompts: list[str], group_size: object) -> None:
    """:func:`group_problems` as a ValueError, after the usual reward input checks."""
    check_batch(images, prompts)
    if problems := group_problems(images, prompts, group_size):
        raise ValueError(problems[0])


def opponents_problems(opponents: object) -> list[str]:
    if opponents is None:
        return []
    if isinstance(opponents, bool) or not isinstance(opponents, int) or opponents < 2 or opponents % 2:
        return [
            f"reward.kwargs.opponents={opponents!r} must be an even whole number >= 2 (each image meets that "
            "many others of its group, half on each side of a circle), or null: every pair"
        ]
    return []


def _spec_problems(spec: object, where: str) -> list[str]:
    """A nested reward spec ``{name, kwargs}``, checked without building it."""
    if not isinstance(spec, dict) or "name" not in spec or set(spec) - {"name", "kwargs"}:
        return [
            f"{where}={spec!r} must be a mapping {{name: ..., kwargs: {{...}}}} naming a registered reward"
        ]
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        return [f"{where}.kwargs={kwargs!r} must be a mapping of keyword arguments"]
    if spec["name"] not in available():
        return [unknown_name(spec["name"], f"{where}.name")]
    if spec_is_pairwise(spec["name"], kwargs):
        return [f"{where}.name={spec['name']!r} compares images itself: win_rate takes a pointwise reward"]
    return [f"{where}: {p}" for p in kwargs_problems(spec["name"], kwargs)]


def _win_rate_problems(
    reward: object = None, temperature: object = 0.0, opponents: object = None, margin: object = 0.0
) -> list[str]:
    out = _spec_problems(reward, "reward.kwargs.reward")
    for name, value, rule in [("temperature", temperature, "0: count wins, a tie half"),
                              ("margin", margin, "scores closer than it are a tie")]:  # fmt: skip
        if (
            isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0
        ):  # fmt: skip
            out.append(f"reward.kwargs.{name}={value!r} must be a finite number >= 0 ({rule})")
    if isinstance(margin, int | float) and not isinstance(margin, bool) and margin > 0 and temperature != 0:
        out.append(
            f"reward.kwargs.margin={margin!r} counts wins (temperature 0): with temperature={temperature!r} the "
            "Bradley-Terry probability already gives close scores about half a win; set one of the two"
        )
    return out + opponents_problems(opponents)


@register("win_rate")
class WinRate:
    """Each image's win rate in its group under a pointwise reward (Bradley-Terry): ``P(a beats b) =
    sigmoid((r_a - r_b) / temperature)``, or with ``temperature`` 0 the share of the group it outscores (a tie
    half a win).

    kwargs: ``reward`` (the pointwise reward, ``{name, kwargs}``), ``temperature`` (0: count wins), ``margin``
    (counted wins: scores that differ by no more than it are a tie, e.g. a reward's noise level, so that a
    difference the reward cannot tell apart does not make a whole win), ``opponents`` (null: every pair; an
    even m: each image against m others of its group). The held-out evaluation scores ``reward`` itself.
    """

    pairwise = True

    def __init__(
        self, reward: dict, temperature: float = 0.0, opponents: int | None = None, margin: float = 0.0
    ):
        if problems := _win_rate_problems(reward, temperature, opponents, margin):
            raise ValueError("; ".join(problems))
        #: The reward whose scores are compared; it scores held-out images alone.
        self.pointwise: Reward = build_reward(reward["name"], **(reward.get("kwargs") or {}))
        self.temperature, self.opponents, self.margin = float(temperature), opponents, float(margin)
        #: An edit's source reaches the comparison as it reaches the pointwise reward.
        self.sees_sources = getattr(self.pointwise, "sees_sources", False)
        if hasattr(self.pointwise, "check_prompts"):
            self.check_prompts = self.pointwise.check_prompts

    def __call__(
        self, images: torch.Tensor, prompts: list[str], group_size: int | None = None
    ) -> torch.Tensor:
        check_groups(images, prompts, group_size)
        r = self.pointwise(images, prompts).float().cpu()
        t, m = self.temperature, self.margin

        def prefer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            if t > 0:
                return torch.sigmoid((r[a] - r[b]) / t)
            d = r[a] - r[b]
            return (d > m).float() + 0.5 * (d.abs() <= m).float()

        out = win_rates(prefer, len(prompts), group_size, self.opponents)
        bad = (~torch.isfinite(r)).view(-1, group_size).any(1)  # (comparisons would hide a NaN score, and
        out.view(-1, group_size)[bad] = math.nan  # skew its group: the trainer names such scores)
        return out.to(images.device)


WinRate.check = staticmethod(_win_rate_problems)
