"""Clipped GRPO loss with KL to the reference policy (ALGORITHM.md §3).

Per (sample, step): ``ratio = exp(log_prob - old_log_prob)``,
``loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))``, averaged, plus ``beta * kl``
(``eps_high = eps`` unless set).
The log-probs and KL come from ``densegrpo_fast.kernels.sde_log_prob`` (per-element means).

GRPO-Guard (arXiv 2510.22319) changes two things, each an option here: RatioNorm takes the log-ratio as
``scale * (log_prob - old_log_prob + bias)``, where ``scale`` is the step's noise std and ``bias`` the exact
KL from the old step's Gaussian to the current one (the mean of the log-ratio's shift below 0), and its
gradient reweighting multiplies each pair's policy term by a weight (``1 / |dt|`` of its step).
"""

from __future__ import annotations

import torch


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    clip_range_high: float | None = None,
    *,
    ratio_scale: torch.Tensor | None = None,
    ratio_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (a scalar) and detached statistics. Shapes: all [M] (the rows of one micro-batch).

    The ratio is clipped to ``[1 - clip_range, 1 + clip_range_high]``; ``clip_range_high`` None is
    ``clip_range`` (symmetric, the paper's). A wider upper bound (DAPO's "clip-higher", Flow-GRPO's
    ``clip_range_gt``) lets a row whose advantage is positive raise its probability further.

    ``ratio_scale`` (and ``ratio_bias``, None = 0): GRPO-Guard's RatioNorm, the log-ratio
    ``ratio_scale * (log_prob - old_log_prob + ratio_bias)``. ``weight``: each row's policy term is multiplied
    by it before the mean (the KL term is not)."""
    high = clip_range if clip_range_high is None else clip_range_high
    log_ratio = log_prob - old_log_prob
    if ratio_bias is not None:
        if ratio_scale is None:
            raise ValueError("ratio_bias needs ratio_scale: RatioNorm shifts the log-ratio, then scales it")
        log_ratio = log_ratio + ratio_bias
    if ratio_scale is not None:
        log_ratio = log_ratio * ratio_scale
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    per_row = torch.maximum(unclipped, clipped)
    policy_loss = (per_row if weight is None else per_row * weight).mean()
    loss = policy_loss
    stats = {
        "policy_loss": policy_loss.detach(),
        "clip_frac": ((ratio < 1.0 - clip_range) | (ratio > 1.0 + high)).float().mean().detach(),
        "approx_kl": (0.5 * log_ratio.square()).mean().detach(),
        "log_ratio_mean": log_ratio.mean().detach(),
        "ratio_dev_max": (ratio - 1.0).abs().max().detach(),
    }
    if kl is not None and beta > 0:
        kl_mean = kl.mean()
        loss = loss + beta * kl_mean
        stats["kl"] = kl_mean.detach()
    return loss, stats
