"""Advantage Weighted Matching (Xue et al., "Advantage Weighted Matching: Aligning RL with Pretraining in
Diffusion Models", 2025): the pretraining flow-matching loss, weighted by each sample's advantage
(``grpo.objective=awm``).

AWM treats the whole sampling of a clean latent ``x0`` as one action and takes the flow-matching loss, the
negative of an evidence bound on ``log p(x0)``, as the log-likelihood in a policy gradient. Each iteration
samples with the *current* policy (on-policy: the ratio of the released code is 1 throughout, so it is left
out), scores the images, and scales each sample's group-normalised advantage ``A`` (mean of its prompt's
group, std of the whole batch: the sparse advantages of ``dense.global_std``) into ``[-1, 1]``:

    a = clip(A, -s, s) / s          (s = awm.adv_scale, 5 as released)

Training noises the clean latent afresh at a time ``t`` of the sampler's grid, ``x_t = (1 - t) x0 + t eps``,
and measures the trained velocity's flow-matching error per sample (mean over its elements)

    e = mean |v(x_t, t) - (eps - x0)|^2

which enters through a weighting ``w(e, t)`` (the released default, ``ghuber`` with power ``p``:
``t ((e + 1e-10)^p - 1e-10^p) / p``, whose gradient ``t e^(p - 1)`` grows where the fit is already good and
fades where a sample is pushed away; ``uniform``: ``e``; ``t``: ``t e``):

    loss = mean_pairs( a w(e, t) )  +  awm.kl mean |v - v_ref|^2  +  awm.anchor_kl mean |v - v_anchor|^2

Samples above their group's mean pull the velocity toward their own denoising, those below push it away; the
two KL terms hold it near the base model (``v_ref``) and near the *anchor*, a lagged copy of the trained
weights (the release's "KL-EMA"), which follows them once per iteration, ``anchor <- d anchor + (1 - d)
theta``, with ``d = min(rate * max(0, n - delay), max)`` after ``n`` optimizer steps (released: rate 1e-3, no
delay, at most 0.3).
"""

from __future__ import annotations

from typing import Literal

import torch

#: The offset inside the ``ghuber`` weighting's power (the released code's): it keeps ``e^(p - 1)`` finite at 0.
GHUBER_OFFSET = 1e-10

Weighting = Literal["ghuber", "uniform", "t"]


def scaled_advantage(A: torch.Tensor, scale: float) -> torch.Tensor:
    """``clip(A, -scale, scale) / scale``: advantages in ``[-1, 1]``."""
    return A.clamp(-scale, scale) / scale


def weighted_error(err: torch.Tensor, t: torch.Tensor, weighting: Weighting, power: float) -> torch.Tensor:
    """``w(e, t)`` of the module docstring, per row: the flow-matching error ``err`` [b] as AWM's loss takes
    it (the negative of the release's surrogate log-likelihood)."""
    if weighting == "uniform":
        return err
    if weighting == "t":
        return t * err
    if weighting == "ghuber":
        return t * ((err + GHUBER_OFFSET).pow(power) - GHUBER_OFFSET**power) / power
    raise ValueError(f"awm weighting {weighting!r}: use one of ghuber, uniform, t")


def awm_loss(
    x0: torch.Tensor,
    eps: torch.Tensor,
    t: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    weighting: Weighting = "ghuber",
    power: float = 0.25,
    v_ref: torch.Tensor | None = None,
    kl_weight: float = 0.0,
    v_anchor: torch.Tensor | None = None,
    anchor_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """AWM's loss over a micro-batch (the module docstring), in float32, and its statistics: the policy term,
    the mean flow-matching error, and the two KL terms. Shapes: latents [b, ...], ``t`` and the scaled
    advantages ``a`` [b]. ``v_ref`` and ``v_anchor`` carry no gradient; a term whose weight is 0 is left
    out."""
    x0, eps, v = x0.float(), eps.float(), v.float()
    dims = tuple(range(1, x0.dim()))
    err = (v - (eps - x0)).square().mean(dims)
    policy = (a.float() * weighted_error(err, t.float(), weighting, power)).mean()
    stats = {"policy_loss": policy.detach(), "fm_err": err.detach().mean()}
    loss = policy
    for key, other, weight in (("kl", v_ref, kl_weight), ("anchor_kl", v_anchor, anchor_weight)):
        if other is not None and weight > 0:
            term = (v - other.detach().float()).square().mean(dims).mean()
            loss = loss + weight * term
            stats[key] = term.detach()
    return loss, stats
