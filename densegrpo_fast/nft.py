"""DiffusionNFT's objective (Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward Process",
2025): reinforcement on the forward process, with no likelihood and no SDE (``grpo.objective=nft``).

Each iteration samples images with the *old* policy (any sampler; the paper's is a deterministic one), scores
them, and turns each sample's group-normalised advantage ``A`` (mean of its prompt's group, std of the whole
batch, clipped to ``[-s, s]``: the sparse advantages of ``dense.global_std``) into an optimality probability

    r = clip(1/2 + A / (2 s), 0, 1)          (s = nft.adv_scale, 5 as released)

Training noises the clean latent ``x0`` afresh at a time ``t`` of the sampler's grid, ``x_t = (1 - t) x0 + t
eps``, and asks both implicit policies to denoise it:

    v+ = (1 - beta) v_old + beta v        (the positive policy: where the good samples pull)
    v- = (1 + beta) v_old - beta v        (the negative one, its reflection through v_old)

with ``v`` the trained velocity, ``v_old`` the old policy's (no gradient) and ``beta = nft.beta``. In the
released code's x0 form (``x0 +- = x_t - t v +-``), each branch's squared error is divided by its own mean
absolute error (no gradient), and the two are mixed by ``r``:

    loss = s / beta * mean_batch( r |x0+ - x0|^2 / w+  +  (1 - r) |x0- - x0|^2 / w- ),
    w+- = max(mean |x0+- - x0|, 1e-5)

(means over each sample's elements), plus ``nft.kl`` times the mean squared velocity difference to the
reference policy. At ``v = v_old`` the gradient is ``(2 r - 1) s`` times that of the weighted flow-matching
loss, whatever beta is. The old policy follows the trained one once per iteration, ``old <- d old + (1 - d)
theta``, with ``d = min(rate * max(0, n - delay), max)`` after ``n`` optimizer steps (released: rate 1e-3, no
delay, at most 0.5; for OCR 7.5e-3 after 75 steps, at most 0.999).
"""

from __future__ import annotations

import torch

#: The floor of each branch's adaptive weight (the released code's).
WEIGHT_FLOOR = 1e-5


def optimality(A: torch.Tensor, scale: float) -> torch.Tensor:
    """The optimality probability ``r = clip(1/2 + A / (2 scale), 0, 1)`` of advantages ``A``."""
    return (0.5 + A / (2 * scale)).clamp(0, 1)


def noised(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The forward process of rectified flow: ``(1 - t) x0 + t eps``, ``t`` per row."""
    tt = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - tt) * x0 + tt * eps


def nft_loss(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    v: torch.Tensor,
    v_old: torch.Tensor,
    r: torch.Tensor,
    beta: float,
    scale: float,
    v_ref: torch.Tensor | None = None,
    kl_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DiffusionNFT's loss over a micro-batch (the module docstring), in float32, and its statistics: the
    policy term, the two branches' errors, ``r``'s mean and the KL term. Shapes: latents [b, ...], ``t`` and
    ``r`` [b]. ``v_old`` and ``v_ref`` carry no gradient."""
    x0, x_t, v = x0.float(), x_t.float(), v.float()
    v_old = v_old.detach().float()
    tt = t.float().view(-1, *([1] * (x0.dim() - 1)))
    dims = tuple(range(1, x0.dim()))
    branches = []
    for mix in ((1 - beta) * v_old + beta * v, (1 + beta) * v_old - beta * v):
        err = x_t - tt * mix - x0  # x0 predicted by this branch, minus x0
        with torch.no_grad():
            w = err.abs().mean(dims).clamp_min(WEIGHT_FLOOR)
        branches.append((err.square().mean(dims) / w, err.detach().square().mean(dims)))
    (pos, pos_err), (neg, neg_err) = branches
    r = r.float()
    policy = (scale / beta) * (r * pos + (1 - r) * neg).mean()
    stats = {
        "policy_loss": policy.detach(),
        "r_mean": r.mean(),
        "pos_err": pos_err.mean(),
        "neg_err": neg_err.mean(),
    }
    loss = policy
    if v_ref is not None and kl_weight > 0:
        kl = (v - v_ref.detach().float()).square().mean(dims).mean()
        loss = loss + kl_weight * kl
        stats["kl"] = kl.detach()
    return loss, stats


def old_decay(step: int, rate: float, most: float, delay: int = 0) -> float:
    """The weight ``d`` the old policy keeps of itself at optimizer step ``step``: ``min(rate * max(0, step -
    delay), most)`` (0: the old policy becomes the trained one)."""
    return min(rate * max(0, step - delay), most)
