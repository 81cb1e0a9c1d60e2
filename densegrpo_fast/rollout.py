"""SDE rollout with log-probs, carrying the dense-reward ODE completions in flight (ALGORITHM.md §4).

The completion of ``lat[j]`` runs on the rollout's own sigma grid: its first Euler step reuses the
velocity the rollout computed at ``lat[j]`` (the ``write_ode`` output of the fused ``sde_step``), after
which it sits at ``sigma[j+1]``, exactly where the rollout is. So at step k one transformer call serves the
B main rows *and* every completion currently at ``sigma[k]``; when the rollout ends, every completion has
reached ``sigma = 0``. Dense rewards with ``n = remaining`` then cost T sequential calls in all (with
``B * T(T-1)/2`` extra rows in them) instead of ``T + T(T-1)/2`` calls.

A completion with ``n`` steps (the paper's ablations n = 1, 2) follows a sub-grid of the rollout's grid
from ``sigma[j]`` to 0 (indices ``j = i_0 < i_1 < ... < i_n = T``, spread evenly), so its intermediate
points are also grid points and ride the rollout's calls the same way. ``n = 1`` is the one-shot
``x0 = x - sigma * v`` and costs no extra forward at all.

**Batch composition.** A row's velocity can depend on which rows share its call (matmul blocking), and the
training step recomputes the main rows' velocities in batches of its own. ``completion_batching="fused"``
puts completion rows in the main rows' call (fewest calls); ``"separate"`` gives them a call of their own so
that the main rows see exactly the batch they would see without dense rewards. Completions only feed the
reward, never the PPO ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from densegrpo_fast.kernels import sde_step
from densegrpo_fast.policies.base import Policy, PromptEmbeds
from densegrpo_fast.schedule import Schedule


def completion_path(start: int, num_steps: int, n: int | None) -> list[int]:
    """Grid indices a completion of ``lat[start]`` visits: ``[start, ..., T]`` with ``n`` steps (None = all
    remaining steps; n larger than what remains is capped)."""
    remaining = num_steps - start
    n = remaining if n is None else min(n, remaining)
    return [start + math.ceil(i * remaining / n) for i in range(n + 1)]


def completion_starts(schedule: Schedule, completion_steps: int | None = None) -> list[int]:
    """Latents whose reward needs a completion of its own.

    Full completions (``completion_steps`` None): ``lat[k]`` for each step ``k`` with noise. A step without
    noise is the first Euler step of ``lat[k]``'s completion on the same grid, so ``R_k = R_{k+1}`` by
    definition and ``dR_k = 0`` exactly (ALGORITHM.md §6): before an SDE window ``R_k = R_ws``, from its
    end ``we`` on the rollout itself is the ODE (``R_k = R_T``), and inside it a step calibrated to psi = 0
    shares the next latent's reward. (Completed anyway, it would differ in the last bits whenever
    ``max_rows_per_call`` splits its rows otherwise than the next latent's, and count as a gain or a loss.)

    ``n``-step completions: every ``lat[ws..we-1]``, since ``ODE_n(lat[k])`` and ``ODE_n(lat[k+1])`` end
    at different grid points; and ``lat[we]`` too, as ``ODE_n(lat[we])`` is not the rollout's own ending:
    the last window step's ``dR = R_we - R_{we-1}`` compares two n-step estimates, like the other window
    steps. Except where ``n >= T - k`` and step ``k`` has no noise: ``ODE_n(lat[k])`` is then the full
    completion, which is ``lat[k+1]``'s (for ``k = we``, the rollout's own ending). Latents before ``ws``
    and after ``we`` (untrained ODE steps) still share ``R_ws`` and ``R_T``: a choice, not ``ODE_n`` of each,
    which only their logged ``dR`` (0) depends on. The logged ``dR`` of step ``we`` is then not 0: it
    compares ``R_T`` with ``ODE_n(lat[we])``'s reward.
    """
    sde = schedule.sde_steps.tolist()
    if not any(sde):
        return []
    T = len(sde)
    ws = sde.index(True)
    we = T - sde[::-1].index(True)
    n = T if completion_steps is None else completion_steps
    return [k for k in range(ws, min(we + 1, T)) if sde[k] or n < T - k]


def initial_noise(
    rows: int,
    group_size: int,
    latent_shape: tuple[int, ...],
    *,
    shared: bool,
    generator: torch.Generator,
    device: torch.device | str,
) -> torch.Tensor:
    """``lat[0]`` of ``rows`` rows in groups of ``group_size`` contiguous rows, float32 [rows, *latent]: a
    draw per row, or with ``shared`` one draw per group repeated over its rows (``sampling.
    share_initial_noise``). Either way drawn from ``generator`` in row order, before any SDE noise."""
    if not shared:
        return torch.randn(rows, *latent_shape, generator=generator, device=device)
    if rows % group_size:
        raise ValueError(
            f"shared initial noise needs whole groups: {rows} rows is not a multiple of the group size "
            f"{group_size}; pass the rows of whole groups"
        )
    per_group = torch.randn(rows // group_size, *latent_shape, generator=generator, device=device)
    return per_group.repeat_interleave(group_size, dim=0)


@dataclass
class Rollout:
    """What a rollout produced, and what training needs from it.

    Shape:
        latents:   [B, T+1, *latent] float32, ``lat[0]`` the initial noise, ``lat[T]`` the clean latent
        log_probs: [B, T] float32, 0 on ODE steps
        clean:     [B, T+1, *latent] float32 or None: the clean latent of each ``R_k`` (completions of
                   ``lat[k]`` for the starts that needed one, ``lat[T]`` last); rows of latents that share a
                   reward with another (outside an SDE window) are copies of it
        completed: the ``k`` whose ``clean[:, k]`` is a completion of its own (:func:`completion_starts`): the
                   columns to score, with ``T``
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    clean: torch.Tensor | None
    completed: tuple[int, ...] = ()


@torch.no_grad()
def sample(
    policy: Policy,
    cond: PromptEmbeds,
    init_noise: torch.Tensor,
    schedule: Schedule,
    *,
    guidance_scale: float,
    generator: torch.Generator | None = None,
    completion_steps: int | None = None,
    dense: bool = True,
    completion_batching: str = "fused",
    max_rows_per_call: int | None = None,
) -> Rollout:
    """One rollout of B trajectories with its dense-reward completions.

    Args:
        cond: prompt embeddings of the B rows (a prompt's group contiguous).
        init_noise: ``lat[0]``, [B, *latent].
        schedule: grid and per-step noise (``schedule.to(device)`` first).
        completion_steps: ``n`` of ``ODE_n`` (None = remaining steps, the paper's choice).
        dense: compute the completions (False: sparse reward, only ``lat[T]`` is clean).
        completion_batching: ``"fused"`` or ``"separate"`` (see the module docstring).
        max_rows_per_call: split each step's rows into calls of at most this many (memory, cache).
    """
    if completion_batching not in ("fused", "separate"):
        raise ValueError(f"completion_batching={completion_batching!r} must be 'fused' or 'separate'")
    B = init_noise.shape[0]
    T = schedule.num_steps
    device = init_noise.device
    sigmas = schedule.sigmas.to(device)
    std = schedule.std.to(device)
    starts = completion_starts(schedule, completion_steps) if dense else []
    paths = {j: completion_path(j, T, completion_steps) for j in starts}

    latents = init_noise.new_empty((B, T + 1, *init_noise.shape[1:]), dtype=torch.float32)
    latents[:, 0] = init_noise
    log_probs = torch.zeros(B, T, device=device)
    state: dict[int, torch.Tensor] = {}  # start j -> its completion, currently at some grid point
    finished: dict[int, torch.Tensor] = {}  # start j -> its clean latent
    at: dict[int, int] = {}  # start j -> index into paths[j] of where it sits

    for k in range(T):
        x = latents[:, k]
        riding = [j for j in state if paths[j][at[j]] == k]  # completions now at sigma[k]
        rows = [x] + [state[j] for j in riding]
        sig_k = sigmas[k].expand(B)
        if completion_batching == "fused" or not riding:
            v_all = _velocity(policy, torch.cat(rows), sigmas[k], cond, guidance_scale, max_rows_per_call)
            v_main, v_rest = v_all[:B], v_all[B:]
        else:
            v_main = _velocity(policy, x, sigmas[k], cond, guidance_scale, max_rows_per_call)
            v_rest = _velocity(
                policy, torch.cat(rows[1:]), sigmas[k], cond, guidance_scale, max_rows_per_call
            )

        starts_here = k in paths
        first_is_next = starts_here and paths[k][1] == k + 1
        noise = torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32)
        x_next, lp, ode = sde_step(
            x, v_main, sig_k, sigmas[k + 1].expand(B), std[k].expand(B), noise, write_ode=first_is_next,
            cps=schedule.cps,
        )  # fmt: skip
        latents[:, k + 1] = x_next
        log_probs[:, k] = lp

        for i, j in enumerate(riding):  # Euler step of each riding completion to its next grid point
            nxt = paths[j][at[j] + 1]
            state[j] = state[j] + v_rest[i * B : (i + 1) * B] * (sigmas[nxt] - sigmas[k])
            at[j] += 1
        if starts_here:  # the completion of lat[k] starts with the rollout's own velocity
            nxt = paths[k][1]
            state[k] = ode if first_is_next else x + v_main * (sigmas[nxt] - sigmas[k])
            at[k] = 1
        for j in [j for j in state if paths[j][at[j]] == T]:
            finished[j] = state.pop(j)

    assert not state, "every completion reaches sigma = 0 by the last step"
    clean = None
    if dense:
        clean = torch.empty_like(latents)
        clean[:, T] = latents[:, T]
        for idx in range(T - 1, -1, -1):  # outside an SDE window a latent shares the next one's reward
            clean[:, idx] = finished[idx] if idx in finished else clean[:, idx + 1]
    return Rollout(latents=latents, log_probs=log_probs, clean=clean, completed=tuple(starts))


def _velocity(policy: Policy, x, sigma, cond: PromptEmbeds, guidance_scale: float, max_rows: int | None):
    """``policy.velocity`` of ``x`` [n * B, ...] at the one grid point ``sigma`` (a 0-d tensor), where row r
    takes prompt row ``r % B`` of ``cond`` (B rows: the main rows, then n - 1 stacks of completions).

    With ``max_rows`` the rows go in calls of at most that many. Each call's conditioning indexes ``cond``'s
    tables, so only that call's rows of [L, D] embeddings are gathered (at SD3 / FLUX sizes they outweigh
    the latents).
    """
    total, B = x.shape[0], len(cond)
    if total == B and (max_rows is None or total <= max_rows):  # the batch itself: nothing to index
        return policy.velocity(x, sigma.expand(total), cond, guidance_scale)
    prompt_row = torch.arange(total, device=x.device) % B
    step = total if max_rows is None else max_rows
    parts = []
    for s in range(0, total, step):
        idx = slice(s, s + step)
        n = x[idx].shape[0]
        parts.append(policy.velocity(x[idx], sigma.expand(n), cond.index(prompt_row[idx]), guidance_scale))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


@torch.no_grad()
def reference_completion(
    policy: Policy,
    cond: PromptEmbeds,
    lat: torch.Tensor,
    start: int,
    schedule: Schedule,
    guidance_scale: float,
    n: int | None = None,
) -> torch.Tensor:
    """The plain definition: Euler ODE from ``sigma[start]`` to 0 along ``completion_path``, one call per
    step with nothing else in the batch (the tests' reference for the in-flight engine)."""
    sig = schedule.sigmas.to(lat.device)
    path = completion_path(start, schedule.num_steps, n)
    x = lat
    for a, b in zip(path[:-1], path[1:], strict=True):
        v = policy.velocity(x, sig[a].expand(x.shape[0]), cond, guidance_scale)
        x = x + v * (sig[b] - sig[a])
    return x
