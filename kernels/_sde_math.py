"""Math shared by ``sde_step`` and ``sde_log_prob`` (densegrpo_fast/ALGORITHM.md §2), once for Triton and
once for torch.

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

With ``cps`` (coefficients-preserving sampling, Wang & Yu 2025; ALGORITHM.md §2), ``std`` is the step's noise
std itself, ``0 <= std <= sigma_next``, and the mean keeps the flow's coefficients: with
``x0 = x - s v``, ``x1 = x + (1 - s) v`` and ``r = sqrt(sigma_next^2 - std^2)``::

    mean = (1 - sigma_next) x0 + r x1:   cx = (1 - sigma_next) + r,   cv = r (1 - s) - s (1 - sigma_next)
    ns   = std,   so the kl above is the exact Gaussian KL (Flow-GRPO's CPS takes that one)

An ODE row (``std == 0``) takes the Euler coefficients above, not the CPS ones (equal in exact arithmetic,
not in fp32), so it matches a completion's Euler steps bit for bit under either sampler.
"""

from __future__ import annotations

import math

import torch

from ._common import LAUNCH, empty, tl, triton

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG_SQRT_2PI = tl.constexpr(LOG_SQRT_2PI)  # the same, for kernels (they read only constexpr globals)

# Elements per program along a row, and per loop iteration inside it. A row of N elements is reduced as
# ceil(N / CHUNK) partial sums (one per program) that `finish_rows` adds in an order fixed by N: at the SD3.5-M shape
# (N = 16*64*64 = 65536) that is 16 programs per row, so B = 24 already fills an H100's 132 SMs ~3 times.
CHUNK = 4096
BLOCK = 1024
# CUDA launches at most 65535 programs along a grid's second axis, where the kernels put a row's chunks
# (the backward, its tiles of BLOCK): a longer row takes several launches, each from its first chunk. The
# partial sums stay one per chunk, so the order of summation is unchanged. `finish_rows` adds a row's
# partials in one tile of up to FINISH_BLOCK (rows of up to 16 M elements); a longer row's in several
# tiles, one after the other.
MAX_GRID_Y = 65535
FINISH_BLOCK = 4096


def chunk_launches(n: int) -> list[tuple[int, int]]:
    """``(first, count)`` of each launch over ``n`` programs along a row: one launch unless n > MAX_GRID_Y."""
    return [(first, min(MAX_GRID_Y, n - first)) for first in range(0, n, MAX_GRID_Y)]


def sqrt_rn(t: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root, as the kernels' ``tl.sqrt_rn`` (IEEE's) gives it. torch's own fp32
    ``sqrt`` is not correctly rounded on every CPU (torch 2.13 on an AMD EPYC: 14 % of fp32 results 1 ulp off,
    1 % of fp64 ones), so an fp32 root is taken from the fp64 one (whose last-bit error moves the fp32 rounding
    only at a tie to within 2^-29)."""
    return torch.sqrt(t) if t.dtype == torch.float64 else torch.sqrt(t.double()).to(t.dtype)


def row_coefficients(sigma: torch.Tensor, sigma_next: torch.Tensor, std: torch.Tensor, cps: bool = False):
    """Per-row ``(dt, cx, cv, ns)`` of the SDE step (``cps``: of the CPS step), in the dtype of ``sigma``.
    Shape: each [B]."""
    dt = sigma_next - sigma
    if cps:
        ode = std == 0
        root = sqrt_rn(sigma_next * sigma_next - std * std)
        cx = torch.where(ode, torch.ones_like(dt), (1.0 - sigma_next) + root)
        cv = torch.where(ode, dt, root * (1.0 - sigma) - sigma * (1.0 - sigma_next))
        return dt, cx, cv, std
    var = std * std
    cx = 1.0 + var / (2.0 * sigma) * dt
    cv = (1.0 + var * (1.0 - sigma) / (2.0 * sigma)) * dt
    ns = std * sqrt_rn(-dt)
    return dt, cx, cv, ns


def finish_log_prob(sum_sq: torch.Tensor, n: int, sigma, sigma_next, std, cps: bool = False) -> torch.Tensor:
    """Per-row log-prob from the sum over elements of ``(x' - mean)^2``. Shape: sum_sq [B] -> [B]."""
    _, _, _, ns = row_coefficients(sigma, sigma_next, std, cps)
    sde = std != 0  # (a negative std, refused by the checks, would give NaN here, not a silent 0)
    safe_ns = torch.where(sde, ns, torch.ones_like(ns))
    lp = -(sum_sq / n) / (2.0 * safe_ns * safe_ns) - torch.log(safe_ns) - LOG_SQRT_2PI
    return torch.where(sde, lp, torch.zeros_like(lp))


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/bf16/fp16 inputs; fp64 when any input is fp64 (the tests' exact reference)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def mean_reference(x, v, sigma, sigma_next, std, cps: bool = False):
    """``mean = x * cx + v * cv`` with per-row coefficients broadcast over the latent dims."""
    _, cx, cv, _ = row_coefficients(sigma, sigma_next, std, cps)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return x * cx.view(shape) + v * cv.view(shape)


def row_sums(t: torch.Tensor) -> torch.Tensor:
    """Per-row sums of ``t`` [B, ...] -> [B], a row of more than ``CHUNK`` elements summed in ``CHUNK``-long
    tiles (zero-padded), then the tiles' sums: an order fixed by the row length. torch's own CPU sum splits
    a lone row of 32768 elements or more across threads but sums each row of a batch in one piece, so a
    training micro-batch of one row would miss the rollout's log-prob by an ulp."""
    flat = t.flatten(1)
    if flat.shape[1] <= CHUNK:  # (one tile: summed in one piece, alone or in a batch)
        return flat.sum(1)
    flat = torch.nn.functional.pad(flat, (0, -flat.shape[1] % CHUNK))
    return flat.view(flat.shape[0], -1, CHUNK).sum(2).sum(1)


def log_prob_reference_from_mean(
    next_sample, mean, sigma, sigma_next, std, cps: bool = False
) -> torch.Tensor:
    """Shared by both references: the log-prob of ``next_sample`` given the step mean. Shape: [B]."""
    sum_sq = row_sums((next_sample - mean).square())
    return finish_log_prob(sum_sq, next_sample[0].numel(), sigma, sigma_next, std, cps)


# ------------------------------------------------------------------------------------------------ Triton


@triton.jit
def load_row_coefficients(sigma_ptr, sigma_next_ptr, std_ptr, row, CPS: tl.constexpr):
    """Per-row ``dt, cx, cv, ns`` in fp32: the operations of :func:`row_coefficients` in its order, each
    rounded as IEEE rounds it (``div_rn``, ``sqrt_rn``: a GPU's default fp32 division and square root are
    approximate), so they are the floats torch computes in fp32; and the row's ``std`` itself."""
    s = tl.load(sigma_ptr + row)
    sn = tl.load(sigma_next_ptr + row)
    dt = sn - s
    sd = tl.load(std_ptr + row)
    if CPS:
        ode = sd == 0.0
        root = tl.sqrt_rn(sn * sn - sd * sd)
        cx = tl.where(ode, 1.0, (1.0 - sn) + root)
        cv = tl.where(ode, dt, root * (1.0 - s) - s * (1.0 - sn))
        ns = sd
    else:
        var = sd * sd
        cx = 1.0 + tl.div_rn(var, 2.0 * s) * dt
        cv = (1.0 + tl.div_rn(var * (1.0 - s), 2.0 * s)) * dt
        ns = sd * tl.sqrt_rn(-dt)
    return dt, cx, cv, ns, sd


@triton.jit
def step_mean(x, v, cx, cv):
    """``x * cx + v * cv``, each product rounded (launches never contract to FMA): the floats the torch
    references compute, so an ODE row's ``x + v * dt`` here equals the rollout's own Euler steps of a
    completion bit for bit (a noise-free step's dR is exactly 0 on every backend)."""
    return x * cx + v * cv


@triton.jit
def squared_deviation(next_sample, mean, mask):
    d = next_sample - mean
    return tl.where(mask, d * d, 0.0)


@triton.jit
def _row_total(ptr, row, n_chunks, BLOCK_C: tl.constexpr, TILES: tl.constexpr):
    """A row's partials summed: one tile, or TILES of them added in order."""
    offs = tl.arange(0, BLOCK_C)
    total = tl.sum(tl.load(ptr + row * n_chunks + offs, mask=offs < n_chunks, other=0.0), axis=0)
    for t in range(1, TILES):
        more = t * BLOCK_C + offs
        total += tl.sum(tl.load(ptr + row * n_chunks + more, mask=more < n_chunks, other=0.0), axis=0)
    return total


@triton.jit
def _finish_kernel(
    sum_sq_ptr, sum_dv2_ptr, sigma_ptr, sigma_next_ptr, std_ptr,  # per-chunk partials [B, n_chunks]; rows
    log_prob_ptr, kl_ptr,  # outputs [B]
    N, n_chunks,
    BLOCK_C: tl.constexpr, TILES: tl.constexpr, WITH_KL: tl.constexpr, CPS: tl.constexpr,
):  # fmt: skip
    """Per row: the partials added in an order fixed by n_chunks alone, then :func:`finish_log_prob` (and
    the KL of the module docstring) in fp32. torch's own reduction may pick another order for another B on
    a GPU, which would break the bit-exact agreement of a rollout batch and a training micro-batch; this
    cannot."""
    row = tl.program_id(0).to(tl.int64)
    sum_sq = _row_total(sum_sq_ptr, row, n_chunks, BLOCK_C, TILES)
    _, _, cv, ns, sd = load_row_coefficients(sigma_ptr, sigma_next_ptr, std_ptr, row, CPS)
    sde = sd != 0.0
    safe_ns = tl.where(sde, ns, 1.0)
    n = N * 1.0  # fp32, as torch divides by a Python int
    lp = -tl.div_rn(tl.div_rn(sum_sq, n), 2.0 * safe_ns * safe_ns) - tl.log(safe_ns) - _LOG_SQRT_2PI
    tl.store(log_prob_ptr + row, tl.where(sde, lp, 0.0))
    if WITH_KL:
        sum_dv2 = _row_total(sum_dv2_ptr, row, n_chunks, BLOCK_C, TILES)
        safe_std = tl.where(sde, sd, 1.0)
        kl = tl.div_rn(tl.div_rn(sum_dv2, n) * (cv * cv), 2.0 * safe_std * safe_std)
        tl.store(kl_ptr + row, tl.where(sde, kl, 0.0))


def finish_rows(sum_sq, sum_dv2, n: int, sigma, sigma_next, std, cps: bool = False):
    """``(log_prob, kl)``, each float32 [B], from the per-chunk partials [B, n_chunks] of a row of ``n``
    elements, in one launch; ``kl`` is None when ``sum_dv2`` is. On a GPU the log-prob of a step costs the
    streaming kernel and this one, nothing more."""
    B, n_chunks = sum_sq.shape
    block = min(triton.next_power_of_2(n_chunks), FINISH_BLOCK)
    with_kl = sum_dv2 is not None
    log_prob = empty((B,), torch.float32, sum_sq.device)
    kl = empty((B,), torch.float32, sum_sq.device) if with_kl else log_prob
    _finish_kernel[(B,)](
        sum_sq, sum_dv2 if with_kl else sum_sq, sigma, sigma_next, std, log_prob, kl, n, n_chunks,
        BLOCK_C=block, TILES=triton.cdiv(n_chunks, block), WITH_KL=with_kl, CPS=cps, **LAUNCH,
    )  # fmt: skip
    return log_prob, (kl if with_kl else None)
