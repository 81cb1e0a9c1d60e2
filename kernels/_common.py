"""Shared plumbing of the kernels: optional triton import, backend choice, input checks, allocation.

Depends on torch (and triton when present) only: nothing here may import densegrpo_fast.
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional on a CPU machine: the references serve there.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent

    class _Unavailable:
        """Stands in for triton so the kernel modules import; any launch says what to install."""

        @staticmethod
        def constexpr(value=None):  # annotations and module constants of the kernels
            return value

        def jit(self, fn=None, **_):
            return self if fn is None else self

        def __getitem__(self, grid):
            raise RuntimeError("triton is not installed: pip install 'densegrpo-fast[triton]'")

        def __getattr__(self, name):
            return self

    triton = tl = _Unavailable()  # type: ignore[assignment]
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "reference")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def backend_for(t: torch.Tensor) -> str:
    """``"triton"`` or ``"reference"`` for an op on tensor ``t``.

    ``DENSEGRPO_KERNELS=auto`` (default) picks Triton for CUDA tensors and the reference otherwise;
    ``triton`` forces the kernel (on CPU tensors only under ``TRITON_INTERPRET=1``); ``reference`` forces
    the plain-PyTorch path.
    """
    choice = os.environ.get("DENSEGRPO_KERNELS", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(
            f"DENSEGRPO_KERNELS={choice!r} is not a backend: it must be one of {', '.join(BACKENDS)}; "
            "unset it to let each op pick Triton on CUDA and the reference elsewhere"
        )
    if choice == "reference":
        return "reference"
    interpreted = os.environ.get("TRITON_INTERPRET", "0") == "1"
    usable = HAS_TRITON and (t.is_cuda or interpreted)
    if choice == "triton" and not usable:
        why = (
            "triton is not installed"
            if not HAS_TRITON
            else f"tensors are on {t.device} without TRITON_INTERPRET=1"
        )
        raise RuntimeError(
            f"DENSEGRPO_KERNELS=triton but the Triton path cannot run: {why}; use CUDA tensors, set "
            "TRITON_INTERPRET=1 before anything imports triton, or set DENSEGRPO_KERNELS=auto"
        )
    if choice == "triton":
        return "triton"
    return "triton" if (HAS_TRITON and t.is_cuda) else "reference"


def check_values() -> bool:
    """Whether to check argument *values* (std >= 0, sigma_next < sigma).

    Value checks read device tensors on the host, which syncs a GPU and breaks CUDA-graph capture, so they
    run on CPU tensors always (except under ``torch.compile``) and on CUDA tensors only with
    ``DENSEGRPO_CHECK_VALUES=1`` (the schedule that builds sigma and std validates them once, when built).
    """
    return os.environ.get("DENSEGRPO_CHECK_VALUES", "0").strip().lower() in ("1", "true", "yes", "on")


# Options of every launch. FMA contraction is off, so the compiled kernels round each product as written, as
# Triton's interpreter (the CPU tests) and the torch references do (no kernel calls tl.fma); left
# unset, Triton 3.9 warns on the first launch and 3.10 changes its default. (Division and square root are
# IEEE-rounded where the kernels use them: div_rn, sqrt_rn.) Where the interpreter still differs from the
# GPU: reduction order, log, and its bf16 stores (rounded toward zero).
LAUNCH = {"enable_fp_fusion": False}


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer of the ops comes from here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def widened(
    t: torch.Tensor, sample: torch.Tensor, velocity: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``t`` in ``dtype`` if it is narrower than both ``sample`` and ``velocity``, else ``t`` itself.

    A compiled streaming kernel gives each thread 16 bytes of its narrowest latent-sized load (4 fp32 or 8
    bf16 elements), and the row's partial sum adds in that grouping. ``sde_step`` loads the noise and
    ``sde_log_prob`` the stored next sample and the reference velocity; any of them narrower than the step's
    ``x`` and ``v`` would give the two kernels different orders of summation, and the first PPO ratio would
    miss 1 by rounding. Widening (bf16 or fp16 to fp32) is exact, so results do not change.
    """
    if t.element_size() < min(sample.element_size(), velocity.element_size()):
        return t.to(dtype)
    return t


def check_latent(name: str, t: torch.Tensor, like: torch.Tensor | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} has dtype {t.dtype}: it must be float32, bfloat16 or float16; cast it with .float()"
        )
    if t.dim() < 2 or t.shape[0] == 0 or t.numel() == 0:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}: it must be [B, ...] with B >= 1 rows of at least one element "
            "(a batch of scalars is [B, 1])"
        )
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but sample has {tuple(like.shape)}: every latent argument "
                "must have the sample's shape"
            )
        if t.device != like.device:
            raise ValueError(
                f"{name} is on {t.device} but sample is on {like.device}: move all arguments to one device"
            )


def check_rows(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    """Per-row schedule values: fp32 [B] on the latent's device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(
            f"{name} must be a float32 tensor of shape [B] on {like.device}, got {type(t).__name__}; "
            "per-row values are device tensors so the op can live in a CUDA graph"
        )
    if t.dim() != 1 or t.shape[0] != like.shape[0]:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}: it must be [B] = [{like.shape[0]}], one value per row of sample "
            f"(one value for every row: {name}.expand({like.shape[0]}), or torch.full(({like.shape[0]},), value))"
        )
    if t.dtype != torch.float32:
        raise ValueError(f"{name} has dtype {t.dtype}: schedule values must be float32; pass {name}.float()")
    if t.device != like.device:
        raise ValueError(
            f"{name} is on {t.device} but sample is on {like.device}: move all arguments to one device"
        )


def check_schedule(
    sigma: torch.Tensor, sigma_next: torch.Tensor, std: torch.Tensor, cps: bool = False
) -> None:
    """Value rules of one SDE step (host read: see :func:`check_values`)."""
    if torch.compiler.is_compiling() or (sigma.is_cuda and not check_values()):
        return  # values are data: a traced graph cannot branch on them
    if not bool(((sigma > 0) & (sigma <= 1)).all()):
        raise ValueError(
            f"sigma must lie in (0, 1], got {sigma.tolist()}: pass the grid value of the current step"
        )
    if not bool(((sigma_next >= 0) & (sigma_next < sigma)).all()):
        raise ValueError(
            f"sigma_next must satisfy 0 <= sigma_next < sigma (denoising runs downwards, dt < 0), got "
            f"sigma={sigma.tolist()} sigma_next={sigma_next.tolist()}; pass sigma[k] and sigma[k+1] of the grid"
        )
    if not bool(((std >= 0) & torch.isfinite(std)).all()):
        raise ValueError(
            f"std must be finite and >= 0 (0 marks an ODE row), got {std.tolist()}; build it with "
            f"{'cps_std' if cps else 'sde_std'}()"
        )
    if cps and not bool((std <= sigma_next).all()):
        raise ValueError(
            f"under cps, std is the step's noise std and must satisfy std <= sigma_next (the next latent's whole "
            f"noise), got std={std.tolist()} sigma_next={sigma_next.tolist()}; build it with cps_std(sigma_next, eta)"
        )
