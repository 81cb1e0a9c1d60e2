"""Clipped GRPO loss with KL to the reference policy (ALGORITHM.md §3).

Per (sample, step): ``ratio = exp(log_prob - old_log_prob)``,
``loss = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))``, averaged, plus ``beta * kl``
(``eps_high = eps`` unless set).
The log-probs and KL come from ``densegrpo_fast.kernels.sde_log_prob`` (per-element means).
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
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (a scalar) and detached statistics. Shapes: all [M] (the rows of one micro-batch).

    The ratio is clipped to ``[1 - clip_range, 1 + clip_range_high]``; ``clip_range_high`` None is
    ``clip_range`` (symmetric, the paper's). A wider upper bound (DAPO's "clip-higher", Flow-GRPO's
    ``clip_range_gt``) lets a row whose advantage is positive raise its probability further."""
    high = clip_range if clip_range_high is None else clip_range_high
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    policy_loss = torch.maximum(unclipped, clipped).mean()
    loss = policy_loss
    stats = {
        "policy_loss": policy_loss.detach(),
        "clip_frac": ((ratio < 1.0 - clip_range) | (ratio > 1.0 + high)).float().mean().detach(),
        "approx_kl": (0.5 * log_ratio.square()).mean().detach(),
        "ratio_dev_max": (ratio - 1.0).abs().max().detach(),
    }
    if kl is not None and beta > 0:
        kl_mean = kl.mean()
        loss = loss + beta * kl_mean
        stats["kl"] = kl_mean.detach()
    return loss, stats
