"""``group_advantages``: rewards ``[N, K]`` -> GRPO advantages, per group and per column, in one launch.

Rows are the ``N = num_groups * G`` samples, a prompt's group contiguous; columns are the ``K`` steps whose
rewards are normalised separately (DenseGRPO Eq. 10; ``K = 1`` for Flow-GRPO's sparse reward). Peers do
this in NumPy with a Python loop over prompts and a host round trip; here each program owns one group's
``[G, K]`` tile and writes its advantages directly: one launch, no host sync, graph-capturable.
"""

from __future__ import annotations

import operator

import torch

from ._common import FLOAT_DTYPES, LAUNCH, backend_for, empty, tl, triton

# --------------------------------------------------------------------------------------------- kernel


@triton.jit
def _live_tile(r_ptr, mask_ptr, start, N, K, cols, BLOCK_G: tl.constexpr, HAS_MASK: tl.constexpr):
    """Rows ``start .. start + BLOCK_G`` of the whole table, fp32, and which of their entries are live."""
    rows = start + tl.arange(0, BLOCK_G).to(tl.int64)
    live = (rows[:, None] < N) & (cols[None, :] < K)
    if HAS_MASK:
        live = live & (tl.load(mask_ptr + rows, mask=rows < N, other=0) != 0)[:, None]
    x = tl.load(r_ptr + rows[:, None] * K + cols[None, :], mask=live, other=0.0).to(tl.float32)
    return x, live


@triton.jit
def _group_advantages_kernel(
    r_ptr, mask_ptr, out_ptr,
    N, K, G, eps, clip,
    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, HAS_MASK: tl.constexpr, GLOBAL_STD: tl.constexpr,
):  # fmt: skip
    group = tl.program_id(0).to(tl.int64)
    rows = group * G + tl.arange(0, BLOCK_G).to(tl.int64)  # [BLOCK_G]
    cols = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    in_tile = (rows[:, None] < group * G + G) & (cols[None, :] < K)
    r = tl.load(r_ptr + rows[:, None] * K + cols[None, :], mask=in_tile, other=0.0).to(tl.float32)
    live = in_tile
    if HAS_MASK:
        keep = tl.load(mask_ptr + rows, mask=rows < group * G + G, other=0) != 0
        live = live & keep[:, None]
    count = tl.sum(live.to(tl.float32), axis=0)  # [BLOCK_K] live rows per column
    # Division and square root rounded as IEEE rounds them (div_rn, sqrt_rn), as torch does; a GPU's
    # default fp32 ones are approximate.
    mean = tl.div_rn(tl.sum(tl.where(live, r, 0.0), axis=0), tl.maximum(count, 1.0))
    dev = tl.where(live, r - mean[None, :], 0.0)
    std = tl.sqrt_rn(tl.div_rn(tl.sum(dev * dev, axis=0), tl.maximum(count, 1.0)))
    hi = tl.max(tl.where(live, r, -float("inf")), axis=0)
    lo = tl.min(tl.where(live, r, float("inf")), axis=0)
    spread = hi > lo  # a group whose rewards are all equal (or with < 2 live rows) gets advantage 0
    if GLOBAL_STD:
        # Flow-GRPO's option: one std per column over all live rows of the batch. Every program
        # recomputes it from the whole [N, K] table (a few KB, L2-resident): cheaper than a second launch.
        g_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
        g_cnt = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(0, N, BLOCK_G):
            x, m = _live_tile(r_ptr, mask_ptr, start, N, K, cols, BLOCK_G, HAS_MASK)
            g_sum += tl.sum(tl.where(m, x, 0.0), axis=0)
            g_cnt += tl.sum(m.to(tl.float32), axis=0)
        g_mean = tl.div_rn(g_sum, tl.maximum(g_cnt, 1.0))
        g_sq = tl.zeros([BLOCK_K], dtype=tl.float32)
        for start in range(0, N, BLOCK_G):
            x, m = _live_tile(r_ptr, mask_ptr, start, N, K, cols, BLOCK_G, HAS_MASK)
            d = tl.where(m, x - g_mean[None, :], 0.0)
            g_sq += tl.sum(d * d, axis=0)
        std = tl.sqrt_rn(tl.div_rn(g_sq, tl.maximum(g_cnt, 1.0)))
    adv = tl.div_rn(dev, std[None, :] + eps)
    adv = tl.minimum(tl.maximum(adv, -clip), clip)
    adv = tl.where(live & spread[None, :], adv, 0.0)
    tl.store(out_ptr + rows[:, None] * K + cols[None, :], adv, mask=in_tile)


def _group_advantages_triton(rewards, group_size, eps, clip, mask, global_std):
    N, K = rewards.shape
    out = empty((N, K), torch.float32, rewards.device)
    _group_advantages_kernel[(N // group_size,)](
        rewards, mask if mask is not None else rewards, out, N, K, group_size, float(eps), float(clip),
        BLOCK_G=triton.next_power_of_2(group_size), BLOCK_K=triton.next_power_of_2(K),
        HAS_MASK=mask is not None, GLOBAL_STD=global_std, **LAUNCH,
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------- the op


@torch.library.custom_op("densegrpo::group_advantages", mutates_args=())
def _group_advantages_op(
    rewards: torch.Tensor,
    group_size: int,
    eps: float,
    clip: float,
    mask: torch.Tensor | None,
    global_std: bool,
) -> torch.Tensor:
    args = (rewards, group_size, eps, clip, mask, global_std)
    if backend_for(rewards) == "triton":
        return _group_advantages_triton(*args)
    return group_advantages_reference(*args)


@_group_advantages_op.register_fake
def _(rewards, group_size, eps, clip, mask, global_std):
    return torch.empty_like(rewards, dtype=torch.float32)


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    *,
    eps: float = 1e-4,
    clip: float = 5.0,
    mask: torch.Tensor | None = None,
    global_std: bool = False,
) -> torch.Tensor:
    """Group-normalised advantages, column by column.

    Args:
        rewards: [N, K] (or [N], treated as K = 1), float32/bfloat16/float16; rows ``g*G .. g*G+G-1`` are
            group ``g``. For DenseGRPO the columns are the steps' dense rewards ``dR_k``.
        group_size: G, which must divide N.
        eps: added to the std (Flow-GRPO's 1e-4).
        clip: advantages are clipped to ``[-clip, clip]``.
        mask: optional [N] bool (or 0/1) per row: masked-out rows neither enter the statistics nor get an
            advantage (theirs is 0).
        global_std: divide by the std of the column over all live rows of the batch instead of the group's
            (Flow-GRPO's ``global_std`` option); the mean is always the group's.

    Returns:
        float32 [N, K] (or [N]): ``clip((r - mean_group) / (std + eps))``; 0 for every row of a group whose
        live rewards in that column are all equal. The std is the population std (ddof 0), like NumPy's.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dtype not in FLOAT_DTYPES:
        what = rewards.dtype if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards ({what}) must be a float32/bfloat16/float16 tensor; cast it with .float()")
    squeeze = rewards.dim() == 1
    r2 = rewards.unsqueeze(1) if squeeze else rewards
    if r2.dim() != 2 or r2.shape[0] == 0 or r2.shape[1] == 0:
        raise ValueError(
            f"rewards has shape {tuple(rewards.shape)}: it must be [N, K] (or [N]) with N, K >= 1"
        )
    N = r2.shape[0]
    try:  # (an int, numpy or 0-d tensor integer; not a bool, which would make every group one row)
        size = None if isinstance(group_size, bool) else operator.index(group_size)
    except TypeError:
        size = None
    if size is None or size < 1 or N % size:
        raise ValueError(
            f"group_size ({group_size}) must be a positive integer dividing the number of rows ({N}): "
            "groups must stay whole for per-group advantages"
        )
    group_size = size
    if not eps >= 0 or not clip > 0:
        raise ValueError(f"eps ({eps}) must be >= 0 and clip ({clip}) > 0: Flow-GRPO uses eps=1e-4, clip=5")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != (N,):
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask has shape {shape}: it must be [N] = [{N}], one flag per row")
        if mask.device != rewards.device:
            raise ValueError(
                f"mask is on {mask.device} but rewards on {rewards.device}: move both to one device"
            )
        mask = (mask != 0).to(torch.int8).contiguous()  # (as the reference reads it: 0.5 and 256 are live)
    # (not differentiable: rewards from a model run with gradients are data here)
    out = _group_advantages_op(
        r2.detach().contiguous(), group_size, float(eps), float(clip), mask, bool(global_std)
    )
    return out.squeeze(1) if squeeze else out


def group_advantages_reference(rewards, group_size, eps=1e-4, clip=5.0, mask=None, global_std=False):
    """The spec of :func:`group_advantages` in plain PyTorch. Shape: [N, K] -> float32 [N, K].

    For group ``g`` and column ``k`` over its live rows ``i``:
    ``A_ik = clip((r_ik - mean_i r_ik) / (std_i r_ik + eps), -clip, clip)`` (population std; the global
    option takes the std over all live rows of column k), and ``A_ik = 0`` where the group's live values are
    all equal or the row is masked out.
    """
    cd = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    N, K = rewards.shape
    r = rewards.to(cd).view(N // group_size, group_size, K)
    live = (
        torch.ones_like(r, dtype=torch.bool)
        if mask is None
        else (mask != 0).view(-1, group_size, 1).expand_as(r)
    )
    r = torch.where(live, r, torch.zeros_like(r))  # (a masked row's NaN or inf must not reach the sums)
    w = live.to(cd)
    count = w.sum(1, keepdim=True).clamp_min(1)
    mean = r.sum(1, keepdim=True) / count
    dev = torch.where(live, r - mean, torch.zeros_like(r))
    if global_std:
        g_count = w.sum((0, 1), keepdim=True).clamp_min(1)
        g_mean = r.sum((0, 1), keepdim=True) / g_count
        std = (
            torch.where(live, r - g_mean, torch.zeros_like(r)).square().sum((0, 1), keepdim=True) / g_count
        ).sqrt()
    else:
        std = (dev.square().sum(1, keepdim=True) / count).sqrt()
    hi = torch.where(live, r, -torch.inf).amax(1, keepdim=True)
    lo = torch.where(live, r, torch.inf).amin(1, keepdim=True)
    adv = (dev / (std + eps)).clamp(-clip, clip)
    adv = torch.where(live & (hi > lo), adv, torch.zeros_like(adv))
    return adv.view(N, K)
