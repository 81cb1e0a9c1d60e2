"""Math shared by ``sde_step`` and ``sde_log_prob`` (ALGORITHM.md §2), once for Triton and once for torch.

The rollout writes a log-prob with ``sde_step`` and training recomputes it with ``sde_log_prob``; the PPO
ratio of the first update is 1 only if both compute the same floats in the same order. So both kernels call
the same ``@triton.jit`` helpers below with the same tiling, and both references call the same torch
functions. Tiling depends on the row length only (never on the batch size), so a micro-batch of the
rollout's rows reproduces the rollout's partial sums exactly.

Per row, with ``s = sigma``, ``dt = sigma_next - sigma < 0``::

    mean = x * cx + v * cv,   cx = 1 + std^2 / (2 s) * dt,   cv = (1 + std^2 (1 - s) / (2 s)) * dt
    x'   = mean + ns * eps,   ns = std * sqrt(-dt)
    log_prob = -(1/N) * sum_i (x'_i - mean_i)^2 / (2 ns^2) - log(ns) - log(sqrt(2 pi))
    kl       =  (1/N) * sum_i (v_i - v_ref_i)^2 * cv^2 / (2 std^2)      (= (mean - mean_ref)^2 / (2 std^2))

Rows with ``std == 0`` are ODE rows: ``cx = 1``, ``cv = dt`` and ``x' = x + v * dt`` exactly, and their
log-prob and KL are defined as 0 (the Gaussian is degenerate there; such rows must never reach a loss).
"""

from __future__ import annotations

import math

import torch

from ._common import LAUNCH, tl, triton

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# Elements per program along a row, and per loop iteration inside it. A row of N elements is reduced as
# ceil(N / CHUNK) partial sums (one per program) that `row_sums` adds in an order fixed by N: at the SD3.5-M shape
# (N = 16*64*64 = 65536) that is 16 programs per row, so B = 24 already fills an H100's 132 SMs ~3 times.
CHUNK = 4096
BLOCK = 1024


def row_coefficients(sigma: torch.Tensor, sigma_next: torch.Tensor, std: torch.Tensor):
    """Per-row ``(dt, cx, cv, ns)`` of the SDE step, in the dtype of ``sigma``. Shape: each [B]."""
    dt = sigma_next - sigma
    var = std * std
    cx = 1.0 + var / (2.0 * sigma) * dt
    cv = (1.0 + var * (1.0 - sigma) / (2.0 * sigma)) * dt
    ns = std * torch.sqrt(-dt)
    return dt, cx, cv, ns


def finish_log_prob(sum_sq: torch.Tensor, n: int, sigma, sigma_next, std) -> torch.Tensor:
    """Per-row log-prob from the sum over elements of ``(x' - mean)^2``. Shape: sum_sq [B] -> [B]."""
    _, _, _, ns = row_coefficients(sigma, sigma_next, std)
    sde = std > 0
    safe_ns = torch.where(sde, ns, torch.ones_like(ns))
    lp = -(sum_sq / n) / (2.0 * safe_ns * safe_ns) - torch.log(safe_ns) - LOG_SQRT_2PI
    return torch.where(sde, lp, torch.zeros_like(lp))


def finish_kl(sum_dv2: torch.Tensor, n: int, sigma, sigma_next, std) -> torch.Tensor:
    """Per-row KL from the sum over elements of ``(v - v_ref)^2``. Shape: [B] -> [B]."""
    _, _, cv, _ = row_coefficients(sigma, sigma_next, std)
    sde = std > 0
    safe_std = torch.where(sde, std, torch.ones_like(std))
    kl = (sum_dv2 / n) * (cv * cv) / (2.0 * safe_std * safe_std)
    return torch.where(sde, kl, torch.zeros_like(kl))


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 when any input is fp64 (the tests' exact reference)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def mean_reference(x, v, sigma, sigma_next, std):
    """``mean = x * cx + v * cv`` with per-row coefficients broadcast over the latent dims."""
    _, cx, cv, _ = row_coefficients(sigma, sigma_next, std)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return x * cx.view(shape) + v * cv.view(shape)


def log_prob_reference_from_mean(next_sample, mean, sigma, sigma_next, std) -> torch.Tensor:
    """Shared by both references: the log-prob of ``next_sample`` given the step mean. Shape: [B]."""
    sum_sq = (next_sample - mean).square().flatten(1).sum(1)
    return finish_log_prob(sum_sq, next_sample[0].numel(), sigma, sigma_next, std)


# ------------------------------------------------------------------------------------------------ Triton


@triton.jit
def load_row_coefficients(sigma_ptr, sigma_next_ptr, std_ptr, row):
    """Per-row ``dt, cx, cv, ns`` in fp32 (the same expressions as :func:`row_coefficients`)."""
    s = tl.load(sigma_ptr + row)
    dt = tl.load(sigma_next_ptr + row) - s
    sd = tl.load(std_ptr + row)
    var = sd * sd
    cx = 1.0 + var / (2.0 * s) * dt
    cv = (1.0 + var * (1.0 - s) / (2.0 * s)) * dt
    ns = sd * tl.sqrt(-dt)
    return dt, cx, cv, ns


@triton.jit
def step_mean(x, v, cx, cv):
    """``x * cx + v * cv`` as one explicit FMA so no kernel contracts it differently."""
    return tl.fma(v, cv, x * cx)


@triton.jit
def squared_deviation(next_sample, mean, mask):
    d = next_sample - mean
    return tl.where(mask, d * d, 0.0)


@triton.jit
def _row_sum_kernel(partial_ptr, out_ptr, n_chunks, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    vals = tl.load(partial_ptr + row * n_chunks + offs, mask=offs < n_chunks, other=0.0)
    tl.store(out_ptr + row, tl.sum(vals, axis=0))


def row_sums(partial: torch.Tensor) -> torch.Tensor:
    """Sum of each row of the per-chunk partials [B, n_chunks] -> [B], in an order fixed by n_chunks alone.

    torch's own reduction may pick a different strategy for a different B on a GPU, which would break the
    bit-exact agreement between a rollout batch and a training micro-batch; this launch cannot.
    """
    B, n_chunks = partial.shape
    out = torch.empty(B, dtype=torch.float32, device=partial.device)
    _row_sum_kernel[(B,)](partial, out, n_chunks, BLOCK_C=triton.next_power_of_2(n_chunks), **LAUNCH)
    return out
