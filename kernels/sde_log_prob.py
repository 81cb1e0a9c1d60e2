"""``sde_log_prob``: training-time log-prob of a stored SDE step, differentiable in the velocity.

Training recomputes ``log p(x' | x, v_theta)`` for the stored ``(x, x')`` of the rollout with the current
policy's velocity (densegrpo_fast/ALGORITHM.md §2), and optionally the KL to the reference policy's
velocity in the same pass. Forward reads x, v, x' (and v_ref) once and writes a few floats per row; backward reads them again
and writes ``dL/dv`` once: 4 (5 with KL) passes in all, against ~20 for eager forward + autograd.

The forward shares its tiling and arithmetic with ``sde_step`` (see ``_sde_math``), so on the rollout's own
``(x, v, x')`` it returns the log-prob ``sde_step`` wrote bit for bit, on either backend, for any batch
split on the Triton path (its order of summation depends on the row length alone). The reference sums a
row in the same tiles (``_sde_math.row_sums``), which makes it batch-independent on a CPU; on a GPU torch
may still split a tile's sum differently for another batch size, so ``DENSEGRPO_KERNELS=reference`` on CUDA
promises the agreement for equal batches only.
"""

from __future__ import annotations

import torch

from . import _sde_math as sm
from ._common import LAUNCH, backend_for, check_latent, check_rows, check_schedule, empty, tl, triton, widened

# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _sde_log_prob_fwd_kernel(
    x_ptr, v_ptr, xn_ptr, vref_ptr, sigma_ptr, sigma_next_ptr, std_ptr,
    sum_sq_ptr, sum_dv2_ptr,  # per-chunk sums of (x' - mean)^2 and of (v - v_ref)^2
    N, n_chunks, first_chunk,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, WITH_KL: tl.constexpr, CPS: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    chunk = first_chunk + tl.program_id(1).to(tl.int64)
    dt, cx, cv, ns, _ = sm.load_row_coefficients(sigma_ptr, sigma_next_ptr, std_ptr, row, CPS)
    base = row * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, CHUNK, BLOCK):
        offs = chunk * CHUNK + start + tl.arange(0, BLOCK)
        mask = offs < N
        x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        xn = tl.load(xn_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        acc += sm.squared_deviation(xn, sm.step_mean(x, v, cx, cv), mask)
        if WITH_KL:
            vref = tl.load(vref_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
            acc_kl += sm.squared_deviation(v, vref, mask)
    tl.store(sum_sq_ptr + row * n_chunks + chunk, tl.sum(acc, axis=0))
    if WITH_KL:
        tl.store(sum_dv2_ptr + row * n_chunks + chunk, tl.sum(acc_kl, axis=0))


@triton.jit
def _sde_log_prob_bwd_kernel(
    x_ptr, v_ptr, xn_ptr, vref_ptr, sigma_ptr, sigma_next_ptr, std_ptr,
    grad_lp_ptr, grad_kl_ptr,  # per row: dL/dlog_prob, dL/dkl
    grad_ptr, N, first_tile,
    BLOCK: tl.constexpr, WITH_KL: tl.constexpr, CPS: tl.constexpr,
):  # fmt: skip
    """``dv = coef_lp * (x' - mean) + coef_kl * (v - v_ref)``: element-wise, one tile per program; the
    per-row factors as :func:`_backward_coefficients` computes them, here in every program."""
    row = tl.program_id(0).to(tl.int64)
    offs = (first_tile + tl.program_id(1).to(tl.int64)) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    base = row * N
    dt, cx, cv, ns, sd = sm.load_row_coefficients(sigma_ptr, sigma_next_ptr, std_ptr, row, CPS)
    sde = sd != 0.0
    safe_ns = tl.where(sde, ns, 1.0)
    coef_lp = tl.where(sde, tl.div_rn(tl.load(grad_lp_ptr + row) * cv, safe_ns * safe_ns * N), 0.0)
    x = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    xn = tl.load(xn_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    grad = coef_lp * (xn - sm.step_mean(x, v, cx, cv))
    if WITH_KL:
        safe_std = tl.where(sde, sd, 1.0)
        coef_kl = tl.where(sde, tl.div_rn(tl.load(grad_kl_ptr + row) * cv * cv, safe_std * safe_std * N), 0.0)
        vref = tl.load(vref_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        grad += coef_kl * (v - vref)
    tl.store(grad_ptr + base + offs, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- launchers


def _forward_triton(sample, velocity, next_sample, sigma, sigma_next, std, ref_velocity, cps):
    B, N = sample.shape[0], sample[0].numel()
    n_chunks = triton.cdiv(N, sm.CHUNK)
    with_kl = ref_velocity is not None
    sum_sq = empty((B, n_chunks), torch.float32, sample.device)
    sum_dv2 = empty((B, n_chunks), torch.float32, sample.device) if with_kl else sum_sq
    for first, grid in sm.chunk_launches(n_chunks):
        _sde_log_prob_fwd_kernel[(B, grid)](
            sample, velocity, next_sample, ref_velocity if with_kl else velocity, sigma, sigma_next, std,
            sum_sq, sum_dv2, N, n_chunks, first, CHUNK=sm.CHUNK, BLOCK=sm.BLOCK, WITH_KL=with_kl, CPS=cps,
            **LAUNCH,
        )  # fmt: skip
    return sm.finish_rows(sum_sq, sum_dv2 if with_kl else None, N, sigma, sigma_next, std, cps)


def _backward_coefficients(grad_lp, grad_kl, n, sigma, sigma_next, std, cps):
    """Per-row factors of the reference backward, 0 on ODE rows (the kernel computes the same in each of
    its programs). Shape: [B] each."""
    _, _, cv, ns = sm.row_coefficients(sigma, sigma_next, std, cps)
    sde = std != 0
    safe_ns = torch.where(sde, ns, torch.ones_like(ns))
    safe_std = torch.where(sde, std, torch.ones_like(std))
    zero = torch.zeros_like(cv)
    coef_lp = torch.where(sde, grad_lp * cv / (safe_ns * safe_ns * n), zero)
    coef_kl = torch.where(sde, grad_kl * cv * cv / (safe_std * safe_std * n), zero)
    return coef_lp, coef_kl


def _backward_triton(
    grad_lp, grad_kl, sample, velocity, next_sample, sigma, sigma_next, std, ref_velocity, cps
):
    B, N = sample.shape[0], sample[0].numel()
    with_kl = ref_velocity is not None
    grad = empty(velocity.shape, velocity.dtype, velocity.device)
    for first, grid in sm.chunk_launches(triton.cdiv(N, sm.BLOCK)):
        _sde_log_prob_bwd_kernel[(B, grid)](
            sample, velocity, next_sample, ref_velocity if with_kl else velocity, sigma, sigma_next, std,
            grad_lp, grad_kl, grad, N, first, BLOCK=sm.BLOCK, WITH_KL=with_kl, CPS=cps, **LAUNCH,
        )  # fmt: skip
    return grad


def _backward_reference(
    grad_lp, grad_kl, sample, velocity, next_sample, sigma, sigma_next, std, ref_velocity, cps
):
    """The backward in closed form, in torch (custom-op bodies run below autograd, so no autograd here);
    the tests check it against autograd through :func:`sde_log_prob_reference`."""
    cd = sm.compute_dtype(sample, velocity, sigma)
    x, v, xn = sample.to(cd), velocity.to(cd), next_sample.to(cd)
    sigma, sigma_next, std = sigma.to(cd), sigma_next.to(cd), std.to(cd)
    shape = (-1,) + (1,) * (x.dim() - 1)
    coef_lp, coef_kl = _backward_coefficients(
        grad_lp.to(cd), grad_kl.to(cd), x[0].numel(), sigma, sigma_next, std, cps
    )
    grad = coef_lp.view(shape) * (xn - sm.mean_reference(x, v, sigma, sigma_next, std, cps))
    if ref_velocity is not None:
        grad = grad + coef_kl.view(shape) * (v - ref_velocity.to(cd))
    return grad.to(velocity.dtype)


# --------------------------------------------------------------------------------------------- the ops


@torch.library.custom_op("densegrpo::sde_log_prob", mutates_args=())
def _sde_log_prob_op(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    next_sample: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    std: torch.Tensor,
    ref_velocity: torch.Tensor | None,
    cps: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (sample, velocity, next_sample, sigma, sigma_next, std, ref_velocity, cps)
    if backend_for(sample) == "triton":
        log_prob, kl = _forward_triton(*args)
    else:
        log_prob, kl = sde_log_prob_reference(*args)
    return log_prob, (kl if kl is not None else log_prob.new_empty(0))


@_sde_log_prob_op.register_fake
def _(sample, velocity, next_sample, sigma, sigma_next, std, ref_velocity, cps=False):
    B = sample.shape[0]
    return sample.new_empty(B, dtype=torch.float32), sample.new_empty(
        0 if ref_velocity is None else B, dtype=torch.float32
    )


@torch.library.custom_op("densegrpo::sde_log_prob_backward", mutates_args=())
def _sde_log_prob_backward_op(
    grad_lp: torch.Tensor,
    grad_kl: torch.Tensor,
    sample: torch.Tensor,
    velocity: torch.Tensor,
    next_sample: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    std: torch.Tensor,
    ref_velocity: torch.Tensor | None,
    cps: bool = False,
) -> torch.Tensor:
    args = (grad_lp, grad_kl, sample, velocity, next_sample, sigma, sigma_next, std, ref_velocity, cps)
    return _backward_triton(*args) if backend_for(sample) == "triton" else _backward_reference(*args)


@_sde_log_prob_backward_op.register_fake
def _(grad_lp, grad_kl, sample, velocity, next_sample, sigma, sigma_next, std, ref_velocity, cps=False):
    return torch.empty_like(velocity)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6], inputs[6])
    ctx.cps = inputs[7]


def _backward(ctx, grad_lp, grad_kl):
    sample, velocity, next_sample, sigma, sigma_next, std, ref_velocity = ctx.saved_tensors
    grad_lp = (grad_lp.float() if grad_lp is not None else torch.zeros_like(sigma)).contiguous()
    if ref_velocity is None:
        grad_kl = grad_lp  # not read (no KL term): saves a launch
    else:
        grad_kl = grad_kl.float() if (grad_kl is not None and grad_kl.numel()) else torch.zeros_like(sigma)
    grad_v = _sde_log_prob_backward_op(
        grad_lp, grad_kl.contiguous(), sample, velocity, next_sample, sigma, sigma_next, std,
        ref_velocity, ctx.cps,
    )  # fmt: skip
    # Only the velocity is differentiable: the stored latents and the schedule are data, the reference
    # velocity a constant.
    return None, grad_v, None, None, None, None, None, None


torch.library.register_autograd("densegrpo::sde_log_prob", _backward, setup_context=_setup_context)


def sde_log_prob(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    next_sample: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    std: torch.Tensor,
    *,
    ref_velocity: torch.Tensor | None = None,
    kl_exact: bool = False,
    cps: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of the stored step ``sample -> next_sample`` under ``velocity``, and optionally the KL.

    Args:
        sample, next_sample: the stored ``x`` and ``x'``, [B, ...] float32/bfloat16/float16.
        velocity: the current policy's velocity at ``(x, sigma)`` (after CFG), same shape; gradients flow
            into it (and only into it).
        sigma, sigma_next, std: per-row float32 [B], as for :func:`sde_step`.
        ref_velocity: the reference policy's velocity (no gradient); given, the KL is returned too.
        kl_exact: return the exact Gaussian KL ``(mean - mean_ref)^2 / (2 std^2 (-dt))`` instead of
            Flow-GRPO's default ``(mean - mean_ref)^2 / (2 std^2)`` (densegrpo_fast/ALGORITHM.md §2).
        cps: the step was taken by :func:`sde_step` with ``cps=True`` (``std`` is its noise std); the KL is
            then the exact Gaussian KL ``(mean - mean_ref)^2 / (2 std^2)`` whatever ``kl_exact`` says.

    Returns:
        ``(log_prob, kl)``, float32 [B] each (kl None without ``ref_velocity``); both 0 on rows with
        ``std == 0``.
    """
    check_latent("sample", sample)
    check_latent("velocity", velocity, like=sample)
    check_latent("next_sample", next_sample, like=sample)
    if kl_exact and ref_velocity is None:
        raise ValueError(
            "kl_exact=True needs ref_velocity: the KL is taken to the reference policy's velocity"
        )
    if ref_velocity is not None:
        check_latent("ref_velocity", ref_velocity, like=sample)
    # rollout data made under torch.inference_mode cannot be saved for backward (a traced graph has none)
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        sample, next_sample, sigma, sigma_next, std = (
            t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t
            for t in (sample, next_sample, sigma, sigma_next, std)
        )
        if ref_velocity is not None and ref_velocity.is_inference():
            ref_velocity = ref_velocity.clone()
    if ref_velocity is not None:  # (widened where narrower: the summation order of sde_step, see widened)
        ref_velocity = widened(ref_velocity.detach().contiguous(), sample, velocity, velocity.dtype)
    for name, t in (("sigma", sigma), ("sigma_next", sigma_next), ("std", std)):
        check_rows(name, t, like=sample)
    check_schedule(sigma, sigma_next, std, cps)
    log_prob, kl = _sde_log_prob_op(
        sample.detach().contiguous(), velocity.contiguous(),
        widened(next_sample.detach().contiguous(), sample, velocity, sample.dtype),
        sigma.contiguous(), sigma_next.contiguous(), std.contiguous(), ref_velocity, cps,
    )  # fmt: skip
    if ref_velocity is None:
        return log_prob, None
    if kl_exact and not cps:
        kl = kl / (sigma - sigma_next)
    return log_prob, kl


def sde_log_prob_reference(
    sample, velocity, next_sample, sigma, sigma_next, std, ref_velocity=None, cps: bool = False
):
    """The spec of :func:`sde_log_prob` in plain PyTorch, differentiable in ``velocity`` by autograd.

    ``mean = x * cx + v * cv`` as in :func:`sde_step_reference`;
    ``log_prob = mean_i[-(x'_i - mean_i)^2 / (2 std^2 (-dt))] - log(std sqrt(-dt)) - log(sqrt(2 pi))``;
    ``kl = mean_i[(mean_i - mean_ref_i)^2] / (2 std^2)`` with ``mean_ref`` from ``ref_velocity``.
    With ``cps``, the step of :func:`sde_step_reference` with ``cps`` and the same KL (``std`` is the noise
    std there, so it is the exact one). Both are 0 on rows with ``std == 0``. Returns ``(log_prob, kl or None)``, float32 [B] (fp64 for fp64 inputs).
    """
    cd = sm.compute_dtype(sample, velocity, sigma)
    x, v, xn = sample.to(cd), velocity.to(cd), next_sample.to(cd)
    sigma, sigma_next, std = sigma.to(cd), sigma_next.to(cd), std.to(cd)
    mean = sm.mean_reference(x, v, sigma, sigma_next, std, cps)
    log_prob = sm.log_prob_reference_from_mean(xn, mean, sigma, sigma_next, std, cps)
    if ref_velocity is None:
        return log_prob, None
    mean_ref = sm.mean_reference(x, ref_velocity.to(cd), sigma, sigma_next, std, cps)
    sde = std != 0
    safe_std = torch.where(sde, std, torch.ones_like(std))
    kl = (mean - mean_ref).square().flatten(1).mean(1) / (2.0 * safe_std * safe_std)
    return log_prob, torch.where(sde, kl, torch.zeros_like(kl))
