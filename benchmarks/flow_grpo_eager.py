"""Eager baselines: the formulation the peers run, transcribed here for the benchmarks.

Flow-GRPO (and DanceGRPO, MixGRPO, ... after it) computes the SDE step on the scheduler object: for each
sample it looks up the index of its timestep in the schedule on the host (a Python loop with a
``nonzero().item()`` per sample), gathers sigma and the next sigma, then runs about ten element-wise
passes in fp32. Its group advantages go through NumPy with one Python iteration per prompt. These
functions reproduce that *formulation* (the math of densegrpo_fast/ALGORITHM.md §2-3 with the same data
movement and host syncs); they are the "peer" rows of the benchmark tables, not part of the package.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _index_of(timesteps: torch.Tensor, t: torch.Tensor) -> int:
    return int((timesteps == t).nonzero()[0].item())  # host sync per sample, as in the peers' scheduler


def _mean_and_log_prob(
    sample, velocity, timestep, sigmas, timesteps, noise_level, next_sample=None, noise=None
):
    """Per-sample sigma lookup on the host, the SDE mean, then the log-prob of ``next_sample`` (or of a
    fresh step with ``noise``): about ten element-wise passes in fp32, as the peers' scheduler step runs."""
    sample, velocity = sample.float(), velocity.float()
    idx = [_index_of(timesteps, t) for t in timestep]
    sigma = sigmas[idx].view(-1, *[1] * (sample.dim() - 1))
    sigma_prev = sigmas[[i + 1 for i in idx]].view_as(sigma)
    sigma_max = sigmas[1].item()
    dt = sigma_prev - sigma
    std_dev_t = torch.sqrt(sigma / (1 - torch.where(sigma == 1, sigma_max, sigma))) * noise_level
    mean = (
        sample * (1 + std_dev_t**2 / (2 * sigma) * dt)
        + velocity * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    prev = mean + std_dev_t * torch.sqrt(-1 * dt) * noise if next_sample is None else next_sample.float()
    log_prob = (
        -((prev.detach() - mean) ** 2) / (2 * ((std_dev_t * torch.sqrt(-1 * dt)) ** 2))
        - torch.log(std_dev_t * torch.sqrt(-1 * dt))
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    return prev, log_prob.mean(dim=tuple(range(1, log_prob.ndim))), mean


def flow_grpo_sde_step(sample, velocity, timestep, sigmas, timesteps, noise, noise_level=0.7):
    """One step for a batch whose rows may sit at different timesteps. Returns (next, log_prob, mean)."""
    return _mean_and_log_prob(sample, velocity, timestep, sigmas, timesteps, noise_level, noise=noise)


def flow_grpo_log_prob(sample, velocity, next_sample, timestep, sigmas, timesteps, noise_level=0.7):
    """Training-time recomputation: the same formulation evaluated at a stored next sample."""
    return _mean_and_log_prob(
        sample, velocity, timestep, sigmas, timesteps, noise_level, next_sample=next_sample
    )[1]


def flow_grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, clip: float = 5.0):
    """Per-prompt statistics in NumPy, one Python iteration per group, then back to the device."""
    r = rewards.detach().float().cpu().numpy()
    out = np.empty_like(r)
    for g0 in range(0, r.shape[0], group_size):
        grp = r[g0 : g0 + group_size]
        out[g0 : g0 + group_size] = (grp - np.mean(grp, axis=0)) / (np.std(grp, axis=0) + eps)
    return torch.from_numpy(np.clip(out, -clip, clip)).to(rewards.device)
