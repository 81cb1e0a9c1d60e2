"""Sigma grid and noise schedules (ALGORITHM.md §1, §2, §5, §6).

Conventions: step ``k = 0..T-1`` takes ``lat[k]`` at ``sigma[k]`` to ``lat[k+1]`` at ``sigma[k+1]``;
``sigma[0] = 1 > ... > sigma[T] = 0``; the transformer receives ``timestep = 1000 * sigma``.

A :class:`Schedule` is the grid plus the per-step noise level ``a_k`` (the paper's psi) and the SDE
coefficient ``std_k = a_k * sqrt(sigma_k / (1 - sigma_k))`` (with Flow-GRPO's guard at ``sigma = 1``), or
under CPS (``sde="cps"``) the noise std ``sigma_{k+1} sin(a_k pi / 2)`` with ``a_k`` as eta.
``a_k = 0`` makes step k an ODE step: outside an SDE window (DenseGRPO-Fast, §6) every step is one.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from densegrpo_fast.kernels import cps_std, sde_std

SDES = ("flow_grpo", "cps")  # the SDE steps a schedule may take (config noise.sde)


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


def resolution_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX.1's resolution-dependent shift exponent ``mu``: linear in the image token count, from
    ``base_shift`` at ``base_seq_len`` tokens to ``max_shift`` at ``max_seq_len`` (FLUX.1-dev's scheduler
    values are the defaults; 1024 tokens = 512 px gives ``mu ≈ 0.63``, a shift of ``exp(mu) ≈ 1.88``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return base_shift + slope * (image_seq_len - base_seq_len)


def flux_sigma_grid(num_steps: int, mu: float, shift_terminal: float | None = None) -> torch.Tensor:
    """FLUX.1's flow-match Euler grid, float32 [T+1] (equal to FluxPipeline's scheduler sigmas), also
    Qwen-Image's (with its ``shift_terminal``).

    ``s = linspace(1, 1/T, T)``, then the exponential time shift
    ``sigma = e^mu / (e^mu + 1/s - 1)`` (which is :func:`sigma_grid`'s shift formula with
    ``shift = e^mu``), then a final 0. Unlike SD3's grid, ``s`` ends at ``1/T`` (SD3's ends at the shifted
    ``1 / num_train_timesteps``), so every point but the first differs. ``mu`` from :func:`resolution_mu`.
    ``shift_terminal`` (Qwen-Image's scheduler: 0.02) stretches ``1 - sigma`` so that the last sigma before
    the final 0 is ``shift_terminal``, as diffusers' scheduler does; the first stays 1.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps ({num_steps}) must be >= 1: the sampler needs at least one step")
    if shift_terminal is not None and not 0 < shift_terminal < 1:
        raise ValueError(f"shift_terminal ({shift_terminal}) must lie in (0, 1): the last sigma before 0")
    shift = math.exp(mu)
    s = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    sigma = shift * s / (1 + (shift - 1) * s)
    if shift_terminal is not None and num_steps > 1:
        # (one step: 1 - sigma[-1] = 0, which diffusers' stretch divides by; its grid is [1, 0] here too)
        sigma = 1 - (1 - sigma) * (1 - shift_terminal) / (1 - sigma[-1])
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


def window_starts(num_steps: int, size: int, trained: Sequence[bool]) -> list[int]:
    """The starts a moving window takes: those of the ``num_steps - size + 1`` that put at least one trained
    step (``trained[k]``, grpo.trained_steps) in the window; a window of untrained steps would train nothing
    for a whole rollout's cost (size 1 on the grid's last step, which is not trained by default)."""
    return [p for p in range(num_steps - size + 1) if any(trained[p : p + size])]


def window_start_at(
    move: str,
    start: int,
    size: int,
    num_steps: int,
    iteration: int,
    *,
    every: int = 1,
    seed: int = 0,
    starts: Sequence[int] | None = None,
) -> int:
    """The first SDE step of iteration ``iteration``'s window: ``start`` (fixed); moved one start later
    every ``every`` iterations from ``start`` (from the first start at or after it), wrapping over ``starts``
    (sliding, MixGRPO); or drawn uniformly from ``starts``, a function of (seed, iteration) alone so a resumed
    run draws the same (random). ``starts`` (default: all ``num_steps - size + 1``) is :func:`window_starts`'s
    list in the trainer."""
    if move == "fixed":
        return start
    starts = list(range(num_steps - size + 1)) if starts is None else list(starts)
    if not starts:
        raise ValueError(f"a moving window of size {size} over {num_steps} steps has no start to take")
    if move == "sliding":
        first = next((j for j, p in enumerate(starts) if p >= start), 0)
        return starts[(first + iteration // every) % len(starts)]
    if move == "random":
        return starts[random.Random(seed * 1_000_003 + iteration).randrange(len(starts))]
    raise ValueError(f"window move {move!r} is not one of fixed, sliding, random")


@dataclass(frozen=True)
class Schedule:
    """The grid and the per-step noise of one sampler.

    Shape:
        sigmas:      [T+1] float32, 1 -> 0
        noise_level: [T]   float32, a_k (0 on ODE steps); eta in [0, 1] under CPS
        std:         [T]   float32, the kernels' ``std`` of each step (0 on ODE steps): the SDE coefficient,
                           or under CPS the noise std
    ``sde``: ``"flow_grpo"`` (ALGORITHM.md §2) or ``"cps"`` (coefficients-preserving sampling).
    """

    sigmas: torch.Tensor
    noise_level: torch.Tensor
    sde: str = "flow_grpo"

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
        if self.sde not in SDES:
            raise ValueError(f"sde {self.sde!r} is not one of {', '.join(SDES)}")
        if self.cps and not bool((self.noise_level <= 1).all()):
            raise ValueError(
                f"noise levels must be <= 1 under CPS (eta: the share of fresh noise is sin(eta pi / 2)), got "
                f"{self.noise_level.tolist()}"
            )

    @property
    def num_steps(self) -> int:
        return self.noise_level.shape[0]

    @property
    def cps(self) -> bool:
        return self.sde == "cps"

    @functools.cached_property
    def std(self) -> torch.Tensor:
        """Computed once per schedule: the guard is read on the host (a device sync where sigmas live on a
        GPU), and the update asks for ``std`` in every micro-batch."""
        if self.cps:
            return cps_std(self.sigmas[1:], self.noise_level)
        guard = float(self.sigmas[1]) if self.num_steps > 1 else 0.0
        return sde_std(self.sigmas[:-1], self.noise_level, sigma_guard=guard)

    @functools.cached_property
    def step_std(self) -> torch.Tensor:
        """[T] float32: the std of each step's Gaussian (0 on ODE steps): ``std * sqrt(-dt)``, or under CPS
        ``std`` itself. GRPO-Guard's RatioNorm scales a step's log-ratio by it."""
        if self.cps:
            return self.std
        return self.std * (self.sigmas[:-1] - self.sigmas[1:]).sqrt()

    @property
    def sde_steps(self) -> torch.Tensor:
        """bool [T]: steps with noise (the only ones with a log-prob). Under CPS the grid's last step has
        none at any eta (its noise std is ``sigma[T] = 0`` times eta's share)."""
        noisy = self.noise_level > 0
        return noisy & (self.sigmas[1:] > 0) if self.cps else noisy

    def with_noise(self, noise_level: torch.Tensor) -> Schedule:
        """The same grid and SDE with other per-step levels."""
        return Schedule(self.sigmas, noise_level, self.sde)

    def to(self, device) -> Schedule:
        return Schedule(self.sigmas.to(device), self.noise_level.to(device), self.sde)


def sampler_grid(num_steps: int, shift: float | None, policy=None) -> torch.Tensor:
    """The grid a run samples on, float32 [T+1]: SD3's :func:`sigma_grid` with ``shift``, or with
    ``shift=None`` the model's own, ``policy.sigma_grid(num_steps)`` (the grid of the checkpoint's own
    scheduler and pipeline: FLUX.1's resolution-dependent one, or SD3's with its scheduler's shift)."""
    if shift is not None:
        return sigma_grid(num_steps, shift)
    own = getattr(policy, "sigma_grid", None)
    if own is None:
        raise ValueError(
            f"sampling.shift is null (the model's own grid) but {type(policy).__name__} has no scheduler of "
            "its own: give a number (SD3.5 uses 3.0, the toy config 1.0)"
        )
    return own(num_steps)


def make_schedule(
    num_steps: int,
    shift: float | None,
    noise_level: float | list[float] | torch.Tensor,
    window_start: int | None = None,
    window_size: int | None = None,
    *,
    sigmas: torch.Tensor | None = None,
    sde: str = "flow_grpo",
) -> Schedule:
    """A schedule with uniform ``a`` (a float) or per-step ``a_k`` (a list/tensor of length T), zeroed
    outside the SDE window when one is given. The grid is ``sigmas`` [T+1] when given (e.g. from
    :func:`sampler_grid`), else ``sigma_grid(num_steps, shift)``; ``sde`` the step (see :class:`Schedule`)."""
    a = torch.as_tensor(noise_level, dtype=torch.float32)
    if a.dim() == 0:
        a = a.expand(num_steps).clone()
    if a.shape != (num_steps,):
        raise ValueError(
            f"noise level has {a.numel()} values but the sampler has num_steps={num_steps}: give one value "
            "(uniform) or one per step (a calibrated table made for this num_steps)"
        )
    a = torch.where(window_mask(num_steps, window_start, window_size), a, torch.zeros_like(a))
    return Schedule(sigma_grid(num_steps, shift) if sigmas is None else sigmas.float(), a, sde)
