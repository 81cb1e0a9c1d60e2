"""group_advantages on both backends against a float64 reference (densegrpo_fast/ALGORITHM.md §3-4,
DenseGRPO Eq. 10)."""

import importlib

import pytest
import torch
from tolerances import assert_close_by_rule

from densegrpo_fast.kernels import group_advantages, group_advantages_reference

adv_module = importlib.import_module("densegrpo_fast.kernels.group_advantages")


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv("DENSEGRPO_KERNELS", request.param)
    monkeypatch.setattr(
        adv_module,
        "empty",
        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device),
    )
    return request.param


def rewards(n_groups, G, K, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n_groups * G, K, generator=g) * 0.3 + torch.rand(n_groups * G, 1, generator=g)
    return r.to(dtype)


def eager_numpy_style(r, G, eps=1e-4, clip=5.0):
    """Flow-GRPO's formulation (NumPy per prompt, population std), transcribed in fp32 torch."""
    out = torch.empty_like(r, dtype=torch.float32)
    for g0 in range(0, r.shape[0], G):
        grp = r[g0 : g0 + G].float()
        out[g0 : g0 + G] = ((grp - grp.mean(0)) / (grp.std(0, unbiased=False) + eps)).clamp(-clip, clip)
    return out


@pytest.mark.parametrize(
    "n_groups,G,K", [(1, 1, 1), (3, 4, 1), (2, 24, 10), (7, 5, 3), (48, 24, 10), (5, 37, 17)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_float64(backend, n_groups, G, K, dtype):
    r = rewards(n_groups, G, K, dtype)
    out = group_advantages(r, G)
    assert out.dtype == torch.float32 and out.shape == r.shape
    ref = group_advantages_reference(r.double(), G)
    eager = eager_numpy_style(r, G)
    if G == 1:
        eager = torch.zeros_like(eager)  # a group of one has no spread: advantage 0 by definition
    assert_close_by_rule(out, eager, ref, torch.float32, "advantages")


def test_matches_independent_formula(backend):
    r = rewards(4, 6, 3)
    expected = eager_numpy_style(r, 6)
    torch.testing.assert_close(group_advantages(r, 6), expected, rtol=1e-5, atol=1e-5)


def test_zero_spread_group_gets_exactly_zero(backend):
    r = rewards(3, 5, 4)
    r[5:10, 1] = 0.1  # group 1, column 1: all equal (0.1 is not exact in binary: the mean may not be 0.1)
    r[10:15] = 0.3  # group 2: all equal everywhere
    out = group_advantages(r, 5)
    assert torch.equal(out[5:10, 1], torch.zeros(5))
    assert torch.equal(out[10:15], torch.zeros(5, 4))
    assert (out[0:5] != 0).all()


def test_clip(backend):
    r = torch.zeros(60, 2)
    r[0] = 1.0  # one outlier among 30: z = sqrt(29) > 5
    r[30, 1] = -1.0  # and one below, in the second group's second column: z = -sqrt(29)
    out = group_advantages(r, 30, clip=5.0)
    assert out[0, 0].item() == 5.0 and out[30, 1].item() == -5.0
    assert out[30, 0].item() == 0.0 and 0 < out[31, 1].item() < 1  # (no spread: 0; the others unclipped)
    ref = group_advantages_reference(r.double(), 30, clip=5.0)
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("global_std", [False, True])
def test_mask_excludes_rows(backend, global_std):
    r = rewards(4, 6, 3)
    mask = torch.ones(24, dtype=torch.bool)
    mask[[1, 7, 8, 20]] = False
    r_poison = r.clone()
    r_poison[[1, 7]] = 1e6  # masked rows must not leak into any statistic: a large value, inf or NaN
    r_poison[8], r_poison[20, 1] = torch.inf, torch.nan
    out = group_advantages(r_poison, 6, mask=mask, global_std=global_std)
    assert torch.equal(out[~mask], torch.zeros(4, 3))
    ref = group_advantages_reference(r.double(), 6, mask=mask, global_std=global_std)
    assert_close_by_rule(out, ref.float(), ref, torch.float32, "masked advantages")
    if not global_std:  # the live rows of a group equal a plain normalisation of those rows alone
        live = [0, 2, 3, 4, 5]
        torch.testing.assert_close(out[live], eager_numpy_style(r[live], 5), rtol=1e-5, atol=1e-5)


def test_global_std(backend):
    r = rewards(6, 4, 5)
    out = group_advantages(r, 4, global_std=True)
    g = r.view(6, 4, 5)
    expected = ((g - g.mean(1, keepdim=True)) / (r.std(0, unbiased=False) + 1e-4)).clamp(-5, 5).view(24, 5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_one_dimensional_input(backend):
    r = rewards(3, 4, 1).squeeze(1)
    out = group_advantages(r, 4)
    assert out.shape == (12,)
    torch.testing.assert_close(out, eager_numpy_style(r[:, None], 4).squeeze(1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rewards=torch.zeros(10, 2), group_size=4), r"group_size \(4\) must .*divid.* \(10\)"),
        (dict(rewards=torch.zeros(8, 2), group_size=0), "group_size"),
        (dict(rewards=torch.zeros(8, 2, dtype=torch.int64), group_size=4), "float32"),
        (dict(rewards=torch.zeros(8, 2, 2), group_size=4), r"\[N, K\]"),
        (dict(rewards=torch.zeros(8, 2), group_size=4, mask=torch.ones(7)), r"mask has shape \(7,\)"),
        (dict(rewards=torch.zeros(8, 2), group_size=4, clip=0.0), "clip"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(**kwargs)
