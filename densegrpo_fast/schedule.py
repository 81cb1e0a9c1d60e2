"""Sigma grid and noise schedules (ALGORITHM.md §1, §2, §5, §6).

Conventions: step ``k = 0..T-1`` takes ``lat[k]`` at ``sigma[k]`` to ``lat[k+1]`` at ``sigma[k+1]``;
``sigma[0] = 1 > ... > sigma[T] = 0``; the transformer receives ``timestep = 1000 * sigma``.

A :class:`Schedule` is the grid plus the per-step noise level ``a_k`` (the paper's psi) and the SDE
coefficient ``std_k = a_k * sqrt(sigma_k / (1 - sigma_k))`` (with Flow-GRPO's guard at ``sigma = 1``).
``a_k = 0`` makes step k an ODE step: outside an SDE window (DenseGRPO-Fast, §6) every step is one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from densegrpo_fast.kernels import sde_std


def sigma_grid(num_steps: int, shift: float = 3.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """SD3's flow-match Euler grid, float32 [T+1] (equal to diffusers' FlowMatchEulerDiscreteScheduler).

    ``s = linspace(1, s_min, T)`` with the scheduler's ``s_min`` (the shifted ``1 / num_train_timesteps``),
    then ``sigma = shift * s / (1 + (shift - 1) * s)``, then a final 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps ({num_steps}) must be >= 1: the sampler needs at least one step")
    if not shift > 0:
        raise ValueError(f"shift ({shift}) must be > 0 (SD3.5 uses 3.0; 1.0 is no shift)")
    t_min = 1.0 / num_train_timesteps
    s_min = shift * t_min / (1 + (shift - 1) * t_min)
    s = torch.linspace(1.0, s_min, num_steps, dtype=torch.float64)
    sigma = shift * s / (1 + (shift - 1) * s)
    return torch.cat([sigma, torch.zeros(1, dtype=torch.float64)]).float()


def window_mask(num_steps: int, start: int | None, size: int | None) -> torch.Tensor:
    """bool [T]: the steps that run the SDE (all of them without a window)."""
    mask = torch.ones(num_steps, dtype=torch.bool)
    if start is None and size is None:
        return mask
    if start is None or size is None or size < 1 or start < 0 or start + size > num_steps:
        raise ValueError(
            f"SDE window start={start} size={size} must satisfy 0 <= start, size >= 1, start + size <= "
            f"num_steps ({num_steps}); give both, or neither for SDE at every step"
        )
    mask[:] = False
    mask[start : start + size] = True
    return mask


@dataclass(frozen=True)
class Schedule:
    """The grid and the per-step noise of one sampler.

    Shape:
        sigmas:      [T+1] float32, 1 -> 0
        noise_level: [T]   float32, a_k (0 on ODE steps)
        std:         [T]   float32, the SDE coefficient of each step (0 on ODE steps)
    """

    sigmas: torch.Tensor
    noise_level: torch.Tensor

    def __post_init__(self):
        T = self.num_steps
        if self.sigmas.shape != (T + 1,) or self.noise_level.shape != (T,):
            raise ValueError(
                f"sigmas must be [T+1] and noise_level [T], got {tuple(self.sigmas.shape)} / {tuple(self.noise_level.shape)}"
            )
        if (
            not bool((self.sigmas[1:] < self.sigmas[:-1]).all())
            or self.sigmas[0] != 1
            or self.sigmas[-1] != 0
        ):
            raise ValueError(f"sigmas must fall strictly from 1 to 0, got {self.sigmas.tolist()}")
        if not bool(((self.noise_level >= 0) & torch.isfinite(self.noise_level)).all()):
            raise ValueError(f"noise levels must be finite and >= 0, got {self.noise_level.tolist()}")

    @property
    def num_steps(self) -> int:
        return self.noise_level.shape[0]

    @property
    def std(self) -> torch.Tensor:
        guard = float(self.sigmas[1]) if self.num_steps > 1 else 0.0
        return sde_std(self.sigmas[:-1], self.noise_level, sigma_guard=guard)

    @property
    def sde_steps(self) -> torch.Tensor:
        """bool [T]: steps with noise (the only ones with a log-prob)."""
        return self.noise_level > 0

    def to(self, device) -> Schedule:
        return Schedule(self.sigmas.to(device), self.noise_level.to(device))


def make_schedule(
    num_steps: int,
    shift: float,
    noise_level: float | list[float] | torch.Tensor,
    window_start: int | None = None,
    window_size: int | None = None,
) -> Schedule:
    """A schedule with uniform ``a`` (a float) or per-step ``a_k`` (a list/tensor of length T), zeroed
    outside the SDE window when one is given."""
    a = torch.as_tensor(noise_level, dtype=torch.float32)
    if a.dim() == 0:
        a = a.expand(num_steps).clone()
    if a.shape != (num_steps,):
        raise ValueError(
            f"noise level has {a.numel()} values but the sampler has num_steps={num_steps}: give one value "
            "(uniform) or one per step (a calibrated table made for this num_steps)"
        )
    a = torch.where(window_mask(num_steps, window_start, window_size), a, torch.zeros_like(a))
    return Schedule(sigma_grid(num_steps, shift), a)
