"""The in-flight completion engine against plain per-latent completions (densegrpo_fast/ALGORITHM.md §4)."""

import numpy as np
import pytest
import torch

from densegrpo_fast.kernels import sde_log_prob
from densegrpo_fast.policies.toy import ToyArch, ToyPolicy
from densegrpo_fast.rollout import (
    completion_path,
    completion_starts,
    initial_noise,
    reference_completion,
    sample,
)
from densegrpo_fast.schedule import make_schedule
from densegrpo_fast.toy import world


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    arch = ToyArch(num_layers=2, num_heads=2, head_dim=16, text_dim=32, pooled_dim=32)
    return ToyPolicy(arch).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def cond(policy):
    prompts = [p.text for p in world.sample_prompts("train", 3, np.random.default_rng(0))]
    return policy.encode_prompts([p for p in prompts for _ in range(2)])  # 3 groups of 2


def run(policy, cond, schedule, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(6, *policy.latent_shape, generator=g)
    return sample(policy, cond, noise, schedule, guidance_scale=2.0, generator=g, **kw)


def test_completion_paths():
    assert completion_path(0, 5, None) == [0, 1, 2, 3, 4, 5]
    assert completion_path(3, 5, 1) == [3, 5]
    assert completion_path(0, 10, 2) == [0, 5, 10] and completion_path(7, 10, 2) == [7, 9, 10]
    assert completion_path(4, 5, 2) == [4, 5]


@pytest.mark.parametrize("n", [None, 1, 2])
@pytest.mark.parametrize("batching,max_rows", [("fused", None), ("separate", None), ("fused", 5)])
def test_in_flight_completions_equal_plain_completions(policy, cond, n, batching, max_rows):
    sched = make_schedule(6, 3.0, 0.7)
    ro = run(
        policy, cond, sched, completion_steps=n, completion_batching=batching, max_rows_per_call=max_rows
    )
    assert ro.clean.shape == (6, 7, *policy.latent_shape)
    assert torch.equal(ro.clean[:, 6], ro.latents[:, 6])
    for k in range(6):
        ref = reference_completion(policy, cond, ro.latents[:, k], k, sched, 2.0, n)
        torch.testing.assert_close(ro.clean[:, k], ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend,max_rows", [("reference", None), ("triton", None), ("reference", 7)])
def test_noise_free_step_gives_zero_step_reward_exactly(policy, cond, backend, max_rows, monkeypatch):
    """An ODE step inside the rollout changes nothing the completion would not: no completion starts there
    (7 rows a call would give lat[1]'s completion and lat[2] their velocities in calls of other sizes, 1e-7
    apart), so it shares the next latent's clean latent and dR = 0 bit for bit, on either kernel backend."""
    monkeypatch.setenv("DENSEGRPO_KERNELS", backend)
    levels = [0.7, 0.0, 0.7, 0.0, 0.7, 0.7]
    ro = run(policy, cond, make_schedule(6, 3.0, levels), max_rows_per_call=max_rows)
    assert ro.completed == (0, 2, 4, 5)
    for k in (1, 3):
        assert torch.equal(ro.clean[:, k], ro.clean[:, k + 1]), f"step {k} is noise-free"
        assert torch.equal(ro.log_probs[:, k], torch.zeros(6))
    assert not torch.equal(ro.clean[:, 0], ro.clean[:, 1])


def test_sde_window_shares_rewards_outside_it(policy, cond):
    sched = make_schedule(8, 3.0, 0.7, window_start=2, window_size=3)
    assert completion_starts(sched) == [2, 3, 4]
    ro = run(policy, cond, sched)
    for k in (0, 1):
        assert torch.equal(ro.clean[:, k], ro.clean[:, 2])
    for k in (5, 6, 7):
        assert torch.equal(ro.clean[:, k], ro.latents[:, 8])
    for k in (2, 3, 4):
        torch.testing.assert_close(
            ro.clean[:, k],
            reference_completion(policy, cond, ro.latents[:, k], k, sched, 2.0),
            rtol=0,
            atol=1e-5,
        )
    # the ODE completion of lat[1] really is lat[2]'s: same grid, no noise in between
    torch.testing.assert_close(
        reference_completion(policy, cond, ro.latents[:, 0], 0, sched, 2.0), ro.clean[:, 0], rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("n", [1, 2])
def test_window_with_n_step_completions_scores_the_window_end_by_ODE_n(policy, cond, n):
    """With n-step completions the rollout after the window is not ODE_n of lat[we]: the last window step's
    dR must compare two n-step estimates, so lat[we] gets a completion of its own."""
    sched = make_schedule(8, 3.0, 0.7, window_start=2, window_size=3)
    assert completion_starts(sched, n) == [2, 3, 4, 5]
    assert completion_starts(make_schedule(8, 3.0, 0.7, window_start=5, window_size=3), n) == [5, 6, 7]
    # n >= T - we: ODE_n(lat[we]) is the rollout's own ending, no completion needed
    ends_by_ode_n = make_schedule(8, 3.0, 0.7, window_start=4, window_size=4 - n)  # we = 8 - n
    assert completion_starts(ends_by_ode_n, n) == list(range(4, 8 - n))
    # a noise-free window step whose n steps reach the end: its ODE_n is the full completion, lat[k+1]'s
    levels = [0.0, 0.7, 0.7, 0.0, 0.7, 0.0, 0.7, 0.0]
    assert completion_starts(make_schedule(8, 3.0, levels), 2) == [1, 2, 3, 4, 5, 6]
    assert completion_starts(make_schedule(8, 3.0, levels), 4) == [1, 2, 3, 4, 6]
    assert completion_starts(make_schedule(8, 3.0, levels), 5) == [1, 2, 4, 6]
    assert completion_starts(make_schedule(8, 3.0, levels), None) == [1, 2, 4, 6]
    mixed = run(policy, cond, make_schedule(8, 3.0, levels), completion_steps=4)
    assert torch.equal(mixed.clean[:, 5], mixed.clean[:, 6]), "ODE_4(lat[5]) is lat[6]'s full completion"
    ref = reference_completion(policy, cond, mixed.latents[:, 5], 5, make_schedule(8, 3.0, levels), 2.0, 4)
    torch.testing.assert_close(mixed.clean[:, 5], ref, rtol=0, atol=1e-5)
    ro = run(policy, cond, sched, completion_steps=n)
    for k in (2, 3, 4, 5):
        ref = reference_completion(policy, cond, ro.latents[:, k], k, sched, 2.0, n)
        torch.testing.assert_close(ro.clean[:, k], ref, rtol=0, atol=1e-5)
    assert (ro.clean[:, 5] - ro.latents[:, 8]).abs().max() > 1e-2, "ODE_n(lat[5]) is not the final latent"
    for k in (6, 7):
        assert torch.equal(ro.clean[:, k], ro.latents[:, 8])


def test_rollout_is_deterministic_and_log_probs_match_the_kernel(policy, cond):
    sched = make_schedule(4, 3.0, 0.7)
    a, b = run(policy, cond, sched, seed=3), run(policy, cond, sched, seed=3)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.log_probs, b.log_probs)
    assert (a.log_probs != 0).all()
    for k in range(4):  # each step's log-prob is the kernel's on the stored latents, with its velocity
        x, sigma = a.latents[:, k], sched.sigmas[k].expand(6)
        with torch.no_grad():
            v = policy.velocity(x, sigma, cond, 2.0)
        lp, _ = sde_log_prob(
            x, v, a.latents[:, k + 1], sigma, sched.sigmas[k + 1].expand(6), sched.std[k].expand(6)
        )
        torch.testing.assert_close(a.log_probs[:, k], lp, rtol=0, atol=1e-5)
    sparse = run(policy, cond, sched, seed=3, dense=False)
    assert sparse.clean is None
    # completions must not perturb the main rows beyond fp32 rounding
    torch.testing.assert_close(sparse.latents, a.latents, rtol=0, atol=1e-5)


def test_bad_batching(policy, cond):
    with pytest.raises(ValueError, match="completion_batching"):
        run(policy, cond, make_schedule(3, 3.0, 0.7), completion_batching="waves")


@pytest.mark.parametrize("batching", ["fused", "separate"])
def test_max_rows_per_call_caps_every_call_and_changes_nothing_else(policy, cond, batching):
    """The cap is what lets the recipes' 1152 trajectories (x 10 stacked completions) fit one GPU."""
    sched = make_schedule(4, 3.0, 0.7)
    whole = run(policy, cond, sched, completion_batching=batching)
    sizes = []
    velocity = policy.velocity

    def counted(x, sigma, c, g=1.0):
        assert len(c) == x.shape[0] == sigma.shape[0]
        assert c.tables["embeds"] is cond.tables["embeds"]  # each call indexes the batch's table: no copies
        sizes.append(x.shape[0])
        return velocity(x, sigma, c, g)

    policy.velocity = counted
    try:
        capped = run(policy, cond, sched, completion_batching=batching, max_rows_per_call=4)
    finally:
        del policy.velocity
    assert max(sizes) == 4 and sum(sizes) == 6 * (1 + 2 + 3 + 4)
    for name in ("latents", "log_probs", "clean"):
        torch.testing.assert_close(getattr(capped, name), getattr(whole, name), rtol=0, atol=1e-5)


def test_initial_noise_is_one_draw_per_row_or_one_per_group():
    shape = (4, 3, 3)
    own = initial_noise(6, 2, shape, shared=False, generator=torch.Generator().manual_seed(5), device="cpu")
    assert torch.equal(own, torch.randn(6, *shape, generator=torch.Generator().manual_seed(5)))
    g = torch.Generator().manual_seed(5)
    shared = initial_noise(6, 2, shape, shared=True, generator=g, device="cpu")
    draws = torch.randn(3, *shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(shared, draws.repeat_interleave(2, 0))  # rows 2i, 2i+1: group i's draw
    assert not torch.equal(shared[0], shared[2])
    # the stream goes on after the groups' draws, not after one per row
    after = torch.Generator().manual_seed(5)
    torch.randn(3, *shape, generator=after)
    assert torch.equal(torch.randn(2, generator=g), torch.randn(2, generator=after))
    with pytest.raises(ValueError, match="not a multiple of the group size 4"):
        initial_noise(6, 4, shape, shared=True, generator=g, device="cpu")
