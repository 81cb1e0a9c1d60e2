import pytest
import torch

from densegrpo_fast.dense import (
    advantages,
    step_reward_stats,
    step_rewards,
)
from densegrpo_fast.dense import (
    latent_rewards as score_latents,
)
from densegrpo_fast.kernels import group_advantages_reference
from densegrpo_fast.loss import grpo_loss


def latent_rewards(n_groups=3, G=4, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_groups * G, T + 1, generator=g)


def test_step_rewards_telescope():
    R = latent_rewards()
    dR = step_rewards(R)
    torch.testing.assert_close(dR.sum(1), R[:, -1] - R[:, 0])


def test_dense_mode_normalises_each_step_within_each_group():
    R = latent_rewards()
    A = advantages(R, 4, "dense")
    dR = R[:, 1:] - R[:, :-1]
    for k in range(5):
        for g in range(3):
            col = dR[g * 4 : g * 4 + 4, k].double()
            expected = (col - col.mean()) / (col.std(unbiased=False) + 1e-4)
            torch.testing.assert_close(A[g * 4 : g * 4 + 4, k].double(), expected, rtol=1e-5, atol=1e-5)


def test_sparse_mode_is_terminal_reward_at_every_step():
    R = latent_rewards()
    A = advantages(R, 4, "sparse")
    expected = group_advantages_reference(R[:, -1:].double(), 4).float()
    torch.testing.assert_close(A, expected.expand(-1, 5), rtol=1e-5, atol=1e-6)


def test_dense_baseline_mode_normalises_next_latent_reward():
    R = latent_rewards()
    torch.testing.assert_close(
        advantages(R, 4, "dense_baseline"),
        group_advantages_reference(R[:, 1:].double(), 4).float(),
        rtol=1e-5,
        atol=1e-6,
    )


def test_untrained_steps_get_zero_and_equal_gains_get_zero():
    R = latent_rewards()
    R[:, 3] = R[:, 2]  # step 2 changes nothing for anyone: dR_2 = 0 across every group
    trained = torch.tensor([True, True, True, True, False])
    A = advantages(R, 4, "dense", trained)
    assert torch.equal(A[:, 4], torch.zeros(12)) and torch.equal(A[:, 2], torch.zeros(12))
    assert (A[:, 0] != 0).all()


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_per_reward_advantages_normalise_each_component_then_weigh_them(mode):
    """Each component's advantages on their own, weighted and summed, clipped: a component measured a
    thousand times larger (and shifted) weighs what it weighed; in the plain sum it drowns the other."""
    small, big = latent_rewards(seed=1), latent_rewards(seed=2)
    parts = torch.stack([small, big], dim=-1)  # [12, 6, 2]
    trained = torch.tensor([True, True, False, True, True])
    A = advantages(parts, 4, mode, trained, weights=[1.0, 0.5], clip=1.5)
    want = advantages(small, 4, mode, trained, clip=1.5) + 0.5 * advantages(big, 4, mode, trained, clip=1.5)
    torch.testing.assert_close(A, want.clamp(-1.5, 1.5), rtol=0, atol=0)
    assert (A.abs() == 1.5).any(), "the sum is clipped again"
    assert torch.equal(A[:, 2], torch.zeros(12))
    rescaled = torch.stack([small, 1000 * big + 7], dim=-1)  # (eps ~ 0: the std's epsilon does not count)
    tiny = advantages(parts, 4, mode, trained, weights=[1.0, 0.5], eps=1e-9, clip=1.5)
    again = advantages(rescaled, 4, mode, trained, weights=[1.0, 0.5], eps=1e-9, clip=1.5)
    torch.testing.assert_close(again, tiny, rtol=0, atol=1e-4)
    plain = advantages(small + 0.5 * (1000 * big + 7), 4, mode, trained, eps=1e-9, clip=1.5)
    torch.testing.assert_close(
        plain, advantages(big, 4, mode, trained, eps=1e-9, clip=1.5), rtol=0, atol=0.02
    )
    assert (plain - tiny).abs().max() > 0.1, "in the plain sum the large component decides alone"


def test_latent_rewards_of_components_keep_them_apart():
    """A scorer of C components gives R [B, T+1, C], each latent's columns copied as the plain one's."""
    clean = torch.randn(2, 4, 3, 2, 2)  # [B, T+1, *latent]
    decode = lambda x: x  # noqa: E731
    one = lambda images, prompts: images.mean((1, 2, 3))  # noqa: E731
    two = lambda images, prompts: torch.stack([images.mean((1, 2, 3)), images.std((1, 2, 3))], -1)  # noqa: E731
    R1 = score_latents(decode, one, clean, ["a", "b"], [0, 2])
    R2 = score_latents(decode, two, clean, ["a", "b"], [0, 2])
    assert R2.shape == (2, 4, 2) and torch.equal(R2[..., 0], R1)
    assert torch.equal(R2[:, 1], R2[:, 2]) and torch.equal(R2[:, 2, 1], clean[:, 2].std((1, 2, 3)))


def test_unknown_mode():
    with pytest.raises(ValueError, match="dense-ish"):
        advantages(latent_rewards(), 4, "dense-ish")


def test_stats():
    R = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.5]])  # dR: [1, 0] and [-1, 0.5]
    s = step_reward_stats(R)
    assert s["dR_pos_frac"] == [0.5, 0.5] and s["dR_neg_frac"] == [0.5, 0.0]
    assert s["dR_mean"] == [0.0, 0.25] and s["dR_abs_mean"] == [1.0, 0.25]
    assert s["R_mean"] == [0.5, 0.5, 0.75]
    assert s["R_std"] == pytest.approx([2**-0.5, 2**-0.5, 0.5**1.5])  # (unbiased, over the 2 rows)


def test_grpo_loss_clipping_and_gradient():
    old = torch.zeros(4)
    lp = torch.tensor([0.0, 1e-3, -1e-3, 5e-5], requires_grad=True)
    A = torch.tensor([1.0, 1.0, -1.0, 2.0])
    loss, stats = grpo_loss(lp, old, A, clip_range=1e-4)
    loss.backward()
    # rows 1 and 2 are clipped in the direction the advantage pushes: no gradient; rows 0, 3 get
    # d(-A * exp(lp))/dlp / 4 = -A * ratio / 4
    torch.testing.assert_close(
        lp.grad, torch.tensor([-0.25, 0.0, 0.0, -0.5 * torch.exp(torch.tensor(5e-5)).item()])
    )
    assert stats["clip_frac"].item() == 0.5


def test_grpo_loss_clips_higher_above_than_below():
    """clip_range_high widens the upper bound only: a ratio of 1 + 5e-4 with A > 0 keeps its gradient under
    [1 - 1e-4, 1 + 1e-3] and loses it under the symmetric 1e-4; below, 1 - 5e-4 with A < 0 is clipped by both."""
    old = torch.zeros(3)
    lp = torch.log(torch.tensor([1 + 5e-4, 1 - 5e-4, 1 + 2e-3])).requires_grad_()
    A = torch.tensor([1.0, -1.0, 1.0])
    loss, stats = grpo_loss(lp, old, A, 1e-4, clip_range_high=1e-3)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([-(1 + 5e-4) / 3, 0.0, 0.0]))
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)  # rows 1 and 2 lie outside the bounds
    lp.grad = None
    symmetric, stats = grpo_loss(lp, old, A, 1e-4)
    symmetric.backward()
    assert torch.equal(lp.grad, torch.zeros(3)) and stats["clip_frac"].item() == 1.0
    assert torch.equal(grpo_loss(lp, old, A, 1e-4, clip_range_high=1e-4)[0], symmetric)


def test_grpo_loss_on_policy_value_and_kl():
    lp = torch.randn(6)
    A = torch.randn(6)
    kl = torch.rand(6)
    loss, stats = grpo_loss(lp, lp.clone(), A, 1e-4, kl=kl, beta=0.04)
    torch.testing.assert_close(loss, -A.mean() + 0.04 * kl.mean())
    assert stats["ratio_dev_max"].item() == 0.0


def test_grpo_loss_ratio_norm_shifts_then_scales_and_weights_the_policy_term():
    """RatioNorm: ratio = exp(scale * (lp - old + bias)); the weight multiplies each row's policy term, not
    the KL term. Value and gradient against the formula written out."""
    g = torch.Generator().manual_seed(0)
    old = torch.randn(5, generator=g)
    lp = (old + 1e-3 * torch.randn(5, generator=g)).requires_grad_()
    A, bias = torch.randn(5, generator=g), 1e-3 * torch.rand(5, generator=g)
    scale, weight, kl = 0.1 + torch.rand(5, generator=g), 1 + torch.rand(5, generator=g), torch.rand(5)
    loss, stats = grpo_loss(
        lp, old, A, 10.0, kl=kl, beta=0.5, ratio_scale=scale, ratio_bias=bias, weight=weight
    )
    ratio = torch.exp(scale * (lp - old + bias))  # (a clip range of 10 binds nowhere)
    want = (-A * ratio * weight).mean() + 0.5 * kl.mean()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad, -A * ratio * scale * weight / 5, rtol=1e-5, atol=0)
    torch.testing.assert_close(stats["log_ratio_mean"], (scale * (lp - old + bias)).mean().detach())
    with pytest.raises(ValueError, match="ratio_bias needs ratio_scale"):
        grpo_loss(lp, old, A, 1e-4, ratio_bias=bias)


@pytest.mark.parametrize("cps", [False, True], ids=["flow_grpo", "cps"])
def test_ratio_norm_bias_is_the_mean_shift_of_the_log_ratio(cps):
    """GRPO-Guard's premise and its fix, on the kernels' own step: with x' drawn from the old policy's step
    and a current velocity off the old one, the log-ratio lp_new - lp_old has mean -b over the noise (b the
    exact KL from the old step's Gaussian to the new one, as the trainer takes it from sde_log_prob), so the
    ratio sits below 1; step_std * (log-ratio + b) is mean_i[(x' - mean_old)_i (mean_new - mean_old)_i] /
    step_std (float64, from the reference step's means), whose mean is 0. A bias missing the KL's |dt|
    (Flow-GRPO's KL form), or a scale that is not the step's noise std, fails the closed form."""
    from densegrpo_fast.kernels import sde_log_prob, sde_step, sde_step_reference
    from densegrpo_fast.schedule import make_schedule

    sched = make_schedule(10, 3.0, 0.7, sde="cps" if cps else "flow_grpo")
    B, k = 4096, 3
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 4, 8, 8, generator=g)
    v_old = torch.randn(x.shape, generator=g)
    v_new = v_old + torch.randn(x.shape, generator=g)  # (far off: a shift well above the sampling error)
    rows = lambda t: t.expand(B).contiguous()  # noqa: E731
    s, sn, std = rows(sched.sigmas[k]), rows(sched.sigmas[k + 1]), rows(sched.std[k])
    xn, lp_old, _ = sde_step(x, v_old, s, sn, std, torch.randn(x.shape, generator=g), cps=cps)
    lp_new, b = sde_log_prob(x, v_new, xn, s, sn, std, ref_velocity=v_old, kl_exact=True, cps=cps)
    plain = lp_new - lp_old
    S = sched.step_std[k]
    normed = S * (plain + b)

    def mean_of(v):  # float64, the reference step without noise
        d = lambda t: t.double()  # noqa: E731
        return sde_step_reference(d(x), d(v), d(s), d(sn), d(std), torch.zeros_like(d(x)), cps=cps)[0]

    mean_old, mean_new, S64 = mean_of(v_old), mean_of(v_new), S.double()
    closed = ((xn.double() - mean_old) * (mean_new - mean_old)).flatten(1).mean(1) / S64
    torch.testing.assert_close(normed.double(), closed, rtol=1e-4, atol=2e-7)
    want_b = (mean_new - mean_old).square().flatten(1).mean(1) / (2 * S64 * S64)
    torch.testing.assert_close(b.double(), want_b, rtol=1e-5, atol=0)
    # over the noise: the plain log-ratio's mean is -b (left-shifted), the normalised one's 0
    se = plain.std() / B**0.5
    assert b.mean() > 20 * se  # (the shift is far above the sampling error here)
    assert abs(plain.mean() + b.mean()) < 4 * se, (plain.mean(), b.mean(), se)
    assert abs(normed.mean()) < 4 * normed.std() / B**0.5
