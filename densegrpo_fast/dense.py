"""Latent rewards -> step rewards -> per-step group advantages (ALGORITHM.md §3, §4).

``R`` holds the latent rewards of a rollout, ``R[:, k] = reward(decode(ODE_n(lat[k])))`` for ``k < T``
and ``R[:, T] = reward(decode(lat[T]))``. Three modes share this one engine so comparisons are fair:

- ``dense`` (DenseGRPO Eq. 10): ``dR_k = R_{k+1} - R_k``, normalised per step within each group;
- ``sparse`` (Flow-GRPO): the terminal reward ``R_T`` normalised within each group, the same at every step;
- ``dense_baseline`` (the paper's ablation): ``R_{k+1}`` normalised per step within each group.

Advantages of steps that are not trained (ODE steps, the last step by default) are 0. The normalisation is
one launch of the ``group_advantages`` kernel over all columns.
"""

from __future__ import annotations

from enum import Enum

import torch

from densegrpo_fast.kernels import group_advantages
from densegrpo_fast.rewards.pairwise import is_pairwise, score


class AdvantageMode(str, Enum):
    dense = "dense"
    sparse = "sparse"
    dense_baseline = "dense_baseline"


def step_rewards(latent_rewards: torch.Tensor) -> torch.Tensor:
    """``dR_k = R_{k+1} - R_k``. Shape: [N, T+1] -> [N, T]. Their sum over k is ``R_T - R_0``."""
    return latent_rewards[:, 1:] - latent_rewards[:, :-1]


def advantages(
    latent_rewards: torch.Tensor,
    group_size: int,
    mode: AdvantageMode | str = AdvantageMode.dense,
    trained: torch.Tensor | None = None,
    *,
    global_std: bool = False,
    eps: float = 1e-4,
    clip: float = 5.0,
    weights: list[float] | None = None,
) -> torch.Tensor:
    """Per-(sample, step) advantages. Shape: R [N, T+1] -> A float32 [N, T].

    ``trained`` (bool [T]) marks the steps that get an advantage; the others get 0. R [N, T+1, C] holds the
    C components of a multi reward (``dense.multi_reward=per_reward``, MixGRPO's advantage aggregation):
    each component's advantages on their own, summed with ``weights`` and clipped again, so a component's
    scale no longer decides its share.
    """
    if latent_rewards.dim() == 3:
        total = sum(
            w * advantages(latent_rewards[..., c].contiguous(), group_size, mode, trained, global_std=global_std,
                           eps=eps, clip=clip)
            for c, w in enumerate(weights)
        )  # fmt: skip
        return total.clamp(-clip, clip).contiguous()
    mode = AdvantageMode(mode)
    N, T1 = latent_rewards.shape
    T = T1 - 1
    if mode is AdvantageMode.dense:
        adv = group_advantages(
            step_rewards(latent_rewards), group_size, eps=eps, clip=clip, global_std=global_std
        )
    elif mode is AdvantageMode.dense_baseline:
        adv = group_advantages(latent_rewards[:, 1:], group_size, eps=eps, clip=clip, global_std=global_std)
    else:
        final = group_advantages(latent_rewards[:, T:], group_size, eps=eps, clip=clip, global_std=global_std)
        adv = final.expand(N, T)
    if trained is not None:
        adv = adv * trained.to(adv.device, adv.dtype)
    return adv.contiguous()


def step_reward_stats(latent_rewards: torch.Tensor) -> dict[str, list[float]]:
    """Per-step summaries for the logs: reward mean/std, mean dR and |dR|, and the share of gains and losses."""
    dR = step_rewards(latent_rewards.float())
    return {
        "R_mean": latent_rewards.float().mean(0).tolist(),
        "R_std": latent_rewards.float().std(0).tolist() if latent_rewards.shape[0] > 1 else None,
        "dR_mean": dR.mean(0).tolist(),
        "dR_abs_mean": dR.abs().mean(0).tolist(),
        "dR_pos_frac": (dR > 0).float().mean(0).tolist(),
        "dR_neg_frac": (dR < 0).float().mean(0).tolist(),
    }


@torch.no_grad()
def latent_rewards(
    decode,
    reward_fn,
    clean: torch.Tensor,
    prompts: list[str],
    columns: list[int],
    chunk: int = 256,
    group_size: int | None = None,
) -> torch.Tensor:
    """Score the clean latents of a rollout: ``R`` float32 [B, T+1] (or [B, T+1, C] for a ``reward_fn``
    that scores C components, e.g. ``WeightedSum.stack``).

    ``clean`` is [B, T+1, *latent]; only ``columns`` (the latents that had a completion of their own, and
    T) are decoded and scored, the others copy the reward of the next latent as the rollout copied it. A
    pairwise reward (:mod:`densegrpo_fast.rewards.pairwise`) compares the completions of each group (contiguous
    rows of ``group_size``) at the same latent: it is called a column at a time, on whole groups.
    """
    from densegrpo_fast.rewards.video import scoring_decode

    decode, chunk = scoring_decode(decode, reward_fn, chunk)  # (videos: only the frames scored are kept)
    B, T1 = clean.shape[:2]
    cols = sorted(set(columns) | {T1 - 1})
    if is_pairwise(reward_fn):
        step = max(1, chunk // group_size) * group_size  # whole groups per call
        scores = torch.stack(
            [
                torch.cat([
                    score(reward_fn, decode(clean[i : i + step, c]), prompts[i : i + step], group_size).float()
                    for i in range(0, B, step)
                ])
                for c in cols
            ],
            dim=1,
        )  # fmt: skip
    else:
        flat = clean[:, cols].flatten(0, 1)  # [B * len(cols), *latent], row-major: sample, then column
        flat_prompts = [p for p in prompts for _ in cols]
        scores = torch.cat(
            [
                reward_fn(decode(flat[i : i + chunk]), flat_prompts[i : i + chunk]).float()
                for i in range(0, len(flat), chunk)
            ]
        )
        scores = scores.view(B, len(cols), *scores.shape[1:])
    R = torch.empty(B, T1, *scores.shape[2:], device=scores.device)
    j = len(cols) - 1
    for idx in range(T1 - 1, -1, -1):
        if idx in cols:  # otherwise keep the smallest scored column above idx
            j = cols.index(idx)
        R[:, idx] = scores[:, j]
    return R
