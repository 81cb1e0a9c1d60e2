"""``sde_step``: one Flow-GRPO SDE step with its log-probability, fused (densegrpo_fast/ALGORITHM.md §2).

Eager PyTorch (Flow-GRPO's formulation) makes about ten element-wise passes over the latent per step and
looks up each sample's sigma on the host. This kernel reads ``x``, ``v`` and the noise once, writes the
next latent (and, optionally, the ODE next latent ``x + v*dt`` that starts a dense-reward completion), and
reduces the log-prob to a few floats per row: 3 reads + 1 (or 2) writes instead of ~12 passes. Per-row
sigma, sigma_next and std are device tensors read inside the kernel, so the step can be captured in a CUDA
graph and traced by ``torch.compile``.
"""

from __future__ import annotations

import math

import torch

from . import _sde_math as sm
from ._common import LAUNCH, backend_for, check_latent, check_rows, check_schedule, empty, tl, triton, widened

# ---------------------------------------------------------------------------------------------- kernel


@triton.jit
def _sde_step_kernel(
    x_ptr, v_ptr, noise_ptr, sigma_ptr, sigma_next_ptr, std_ptr,  # inputs
    out_ptr, ode_ptr, sum_sq_ptr,  # outputs: next latent, ODE next latent, per-chunk sums of (x'-mean)^2
    N, n_chunks, first_chunk,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, WRITE_ODE: tl.constexpr, CPS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    chunk = first_chunk + tl.program_id(1).to(tl.int64)
    dt, cx, cv, ns, _ = sm.load_row_coefficients(sigma_ptr, sigma_next_ptr, std_ptr, row, CPS)
    base = row * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, CHUNK, BLOCK):
        offs = chunk * CHUNK + start + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        eps = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        mean = sm.step_mean(x, v, cx, cv)
        # The log-prob is taken of the latent as stored (rounded to the output dtype), so that training's
        # recomputation from the stored latent reproduces it bit for bit.
        x_next = (mean + ns * eps).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + base + offs, x_next, mask=mask)
        if WRITE_ODE:
            tl.store(ode_ptr + base + offs, (x + v * dt).to(ode_ptr.dtype.element_ty), mask=mask)
        acc += sm.squared_deviation(x_next.to(tl.float32), mean, mask)
    tl.store(sum_sq_ptr + row * n_chunks + chunk, tl.sum(acc, axis=0))


def _sde_step_triton(sample, velocity, sigma, sigma_next, std, noise, write_ode, cps):
    B, N = sample.shape[0], sample[0].numel()
    n_chunks = triton.cdiv(N, sm.CHUNK)
    out = empty(sample.shape, sample.dtype, sample.device)
    ode = empty(sample.shape, sample.dtype, sample.device) if write_ode else out
    sum_sq = empty((B, n_chunks), torch.float32, sample.device)
    for first, grid in sm.chunk_launches(n_chunks):
        _sde_step_kernel[(B, grid)](
            sample, velocity, noise, sigma, sigma_next, std, out, ode, sum_sq, N, n_chunks, first,
            CHUNK=sm.CHUNK, BLOCK=sm.BLOCK, WRITE_ODE=write_ode, CPS=cps, **LAUNCH,
        )  # fmt: skip
    log_prob, _ = sm.finish_rows(sum_sq, None, N, sigma, sigma_next, std, cps)
    return out, log_prob, (ode if write_ode else None)


# -------------------------------------------------------------------------------------------- the op


@torch.library.custom_op("densegrpo::sde_step", mutates_args=())
def _sde_step_op(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    std: torch.Tensor,
    noise: torch.Tensor,
    write_ode: bool,
    cps: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (sample, velocity, sigma, sigma_next, std, noise, write_ode, cps)
    if backend_for(sample) == "triton":
        out, log_prob, ode = _sde_step_triton(*args)
    else:
        out, log_prob, ode = sde_step_reference(*args)
    # custom ops return tensors only: an absent ODE output travels as an empty tensor
    return out, log_prob, (ode if ode is not None else sample.new_empty(0))


@_sde_step_op.register_fake
def _(sample, velocity, sigma, sigma_next, std, noise, write_ode, cps=False):
    ode = torch.empty_like(sample) if write_ode else sample.new_empty(0)
    return torch.empty_like(sample), sample.new_empty(sample.shape[0], dtype=torch.float32), ode


def sde_step(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    std: torch.Tensor,
    noise: torch.Tensor,
    *,
    write_ode: bool = False,
    cps: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One SDE step per row, with the log-probability of the step taken.

    Args:
        sample: ``x`` at sigma, [B, ...] float32/bfloat16/float16 (any trailing shape).
        velocity: ``v`` at (x, sigma) after CFG, same shape, any of those dtypes.
        sigma, sigma_next: per-row grid values, float32 [B], ``0 <= sigma_next < sigma <= 1``.
        std: per-row SDE coefficient (``a_k * sqrt(s / (1 - s))``, see :func:`sde_std`), float32 [B], ``>= 0``;
            ``0`` makes the row an ODE row (``x + v * dt``, log-prob 0).
        noise: ``eps ~ N(0, I)``, same shape as sample, any float dtype.
        write_ode: also return ``x + v * dt`` for every row (the first Euler step of a completion that
            reuses this velocity).
        cps: take the coefficients-preserving step instead (Wang & Yu 2025): ``std`` is then the noise std
            itself, ``0 <= std <= sigma_next`` (see :func:`cps_std`), and the mean
            ``(1 - sigma_next) x0 + sqrt(sigma_next^2 - std^2) x1`` with ``x0 = x - s v``, ``x1 = x + (1 - s) v``.

    Returns:
        ``(next_sample, log_prob, ode_next)``: next_sample in sample's dtype; log_prob float32 [B] (the
        per-element mean of the Gaussian log-density, taken at next_sample as stored); ode_next in sample's
        dtype, or None.

    All math is fp32 whatever the input dtype. Non-contiguous inputs are copied. The step is not
    differentiable (inputs are detached): training differentiates :func:`sde_log_prob` instead.
    """
    check_latent("sample", sample)
    check_latent("velocity", velocity, like=sample)
    check_latent("noise", noise, like=sample)
    for name, t in (("sigma", sigma), ("sigma_next", sigma_next), ("std", std)):
        check_rows(name, t, like=sample)
    check_schedule(sigma, sigma_next, std, cps)
    sample, velocity, noise = (t.detach().contiguous() for t in (sample, velocity, noise))
    sigma, sigma_next, std = (t.detach().contiguous() for t in (sigma, sigma_next, std))
    noise = widened(noise, sample, velocity, sample.dtype)  # the summation order sde_log_prob has
    out, log_prob, ode = _sde_step_op(sample, velocity, sigma, sigma_next, std, noise, write_ode, cps)
    return out, log_prob, (ode if write_ode else None)


# --------------------------------------------------------------------------------------- reference


def sde_step_reference(
    sample, velocity, sigma, sigma_next, std, noise, write_ode: bool = False, cps: bool = False
):
    """The spec of :func:`sde_step` in plain PyTorch (its CPU path and benchmark baseline).

    With ``s = sigma``, ``dt = sigma_next - s`` (negative), per row::

        mean = x * (1 + std^2 / (2 s) * dt) + v * (1 + std^2 (1 - s) / (2 s)) * dt
        x'   = mean + std * sqrt(-dt) * eps                         (stored in sample's dtype)
        log_prob = mean_i[ -(x'_i - mean_i)^2 / (2 std^2 (-dt)) ] - log(std sqrt(-dt)) - log(sqrt(2 pi))
        ode_next = x + v * dt

    With ``cps``: ``mean = (1 - sigma_next) (x - s v) + sqrt(sigma_next^2 - std^2) (x + (1 - s) v)`` and
    ``x' = mean + std * eps`` (the log-prob likewise with ``std`` in place of ``std sqrt(-dt)``).

    ``log_prob`` is 0 on rows with ``std == 0``. Computed in fp32 (fp64 when an input is fp64).
    """
    cd = sm.compute_dtype(sample, velocity, sigma)
    x, v, eps = sample.to(cd), velocity.to(cd), noise.to(cd)
    sigma, sigma_next, std = sigma.to(cd), sigma_next.to(cd), std.to(cd)
    dt, _, _, ns = sm.row_coefficients(sigma, sigma_next, std, cps)
    shape = (-1,) + (1,) * (x.dim() - 1)
    mean = sm.mean_reference(x, v, sigma, sigma_next, std, cps)
    out = (mean + ns.view(shape) * eps).to(sample.dtype)
    log_prob = sm.log_prob_reference_from_mean(out.to(cd), mean, sigma, sigma_next, std, cps)
    ode = (x + v * dt.view(shape)).to(sample.dtype) if write_ode else None
    return out, log_prob, ode


def sde_std(sigma: torch.Tensor, noise_level: torch.Tensor | float, sigma_guard: float) -> torch.Tensor:
    """The SDE coefficient ``std = a * sqrt(s / (1 - s))`` of densegrpo_fast/ALGORITHM.md §2.

    At ``s == 1`` (the first step of the grid) ``1 - s`` is replaced by ``1 - sigma_guard``, where
    ``sigma_guard`` is the grid's ``sigma[1]`` (Flow-GRPO's guard). ``noise_level`` is ``a`` (a float) or the
    per-row ``a_k`` (a tensor broadcastable to ``sigma``).
    """
    if not 0.0 <= sigma_guard < 1.0:
        raise ValueError(
            f"sigma_guard ({sigma_guard}) must lie in [0, 1): pass the grid's second value sigma[1]"
        )
    if torch.compiler.is_compiling():  # (values are data in a traced graph; a CUDA tensor is not read back)
        negative = False
    elif isinstance(noise_level, torch.Tensor):
        negative = not noise_level.is_cuda and bool((noise_level < 0).any())
    else:
        negative = noise_level < 0
    if negative:
        raise ValueError(
            f"noise_level ({noise_level}) must be >= 0: it scales the SDE noise (Flow-GRPO: 0.7)"
        )
    one_minus = 1.0 - torch.where(sigma >= 1.0, torch.full_like(sigma, sigma_guard), sigma)
    return noise_level * torch.sqrt(sigma / one_minus)


def cps_std(sigma_next: torch.Tensor, noise_level: torch.Tensor | float) -> torch.Tensor:
    """The noise std of a coefficients-preserving step (Wang & Yu 2025), ``sigma_next * sin(eta pi / 2)``,
    the ``std`` that :func:`sde_step` takes with ``cps=True``. ``noise_level`` is ``eta`` in [0, 1] (a float,
    or per-row values broadcastable to ``sigma_next``): 0 is the ODE step, 1 replaces all of the next latent's
    noise with fresh noise. The last step of a grid (``sigma_next == 0``) has no noise under any ``eta``.
    """
    if torch.compiler.is_compiling():
        bad = False
    elif isinstance(noise_level, torch.Tensor):
        bad = not noise_level.is_cuda and bool(((noise_level < 0) | (noise_level > 1)).any())
    else:
        bad = not 0.0 <= noise_level <= 1.0
    if bad:
        raise ValueError(
            f"noise_level ({noise_level}) must lie in [0, 1] under CPS: it is eta, the share of the next "
            "latent's noise drawn afresh as sin(eta pi / 2); use a value of at most 1"
        )
    eta = torch.as_tensor(noise_level, dtype=sigma_next.dtype, device=sigma_next.device)
    # (capped at sigma_next: a sine rounded above 1 would make the step's sqrt(sigma_next^2 - std^2) NaN)
    return torch.minimum(sigma_next * torch.sin(eta * (math.pi / 2)), sigma_next)
