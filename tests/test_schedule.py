import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from densegrpo_fast.schedule import (
    Schedule,
    make_schedule,
    sigma_grid,
    window_mask,
    window_start_at,
    window_starts,
)


@pytest.mark.parametrize("T,shift", [(10, 3.0), (40, 3.0), (1, 3.0), (7, 1.0), (28, 1.5)])
def test_sigma_grid_equals_diffusers(T, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(T)
    ours = sigma_grid(T, shift)
    assert ours.shape == (T + 1,) and ours[0] == 1.0 and ours[-1] == 0.0
    torch.testing.assert_close(ours, sched.sigmas.float(), rtol=0, atol=2e-7)
    torch.testing.assert_close(1000 * ours[:-1], sched.timesteps.float(), rtol=1e-6, atol=1e-4)


def test_uniform_std_has_the_guard_at_sigma_one():
    s = make_schedule(10, 3.0, 0.7)
    std = s.std
    sig = s.sigmas
    assert torch.isfinite(std).all()
    torch.testing.assert_close(std[0], 0.7 * torch.sqrt(1 / (1 - sig[1])))
    torch.testing.assert_close(std[1:], 0.7 * torch.sqrt(sig[1:-1] / (1 - sig[1:-1])))


def test_window_and_calibrated_levels():
    psi = [0.5 + 0.1 * k for k in range(10)]
    s = make_schedule(10, 3.0, psi, window_start=2, window_size=3)
    assert s.sde_steps.tolist() == [False, False, True, True, True, False, False, False, False, False]
    torch.testing.assert_close(s.noise_level[2:5], torch.tensor(psi[2:5]))
    assert (s.std[~s.sde_steps] == 0).all()


def test_moving_window_starts():
    # sliding: one step later every `every` iterations, wrapped over the 10 - 3 + 1 = 8 positions
    slide = [window_start_at("sliding", 2, 3, 10, i, every=2) for i in range(18)]
    assert slide == [2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 0, 0, 1, 1, 2, 2]
    assert [window_start_at("fixed", 2, 3, 10, i) for i in range(3)] == [2, 2, 2]
    # random: a function of (seed, iteration) alone, every position drawn, none out of range
    draws = [window_start_at("random", 0, 3, 10, i, seed=5) for i in range(400)]
    assert draws == [window_start_at("random", 0, 3, 10, i, seed=5) for i in range(400)]
    assert set(draws) == set(range(8))
    assert draws != [window_start_at("random", 0, 3, 10, i, seed=6) for i in range(400)]
    with pytest.raises(ValueError, match="not one of"):
        window_start_at("jumping", 0, 3, 10, 0)
    # restricted to the starts whose window holds a trained step: by default every step but the last is
    # trained, under CPS every step but the last two
    trained, cps = [True] * 9 + [False], [True] * 8 + [False] * 2
    assert window_starts(10, 1, trained) == list(range(9))
    assert window_starts(10, 2, trained) == list(range(9))  # [8, 9] trains 8: every start of size 2
    assert window_starts(10, 2, cps) == list(range(8))
    assert window_starts(10, 2, [False] * 10) == []
    starts = window_starts(10, 1, cps)
    assert [window_start_at("sliding", 6, 1, 10, i, starts=starts) for i in range(4)] == [6, 7, 0, 1]
    # a start that is not a window's own goes on from the next that is
    assert [window_start_at("sliding", 5, 1, 10, i, starts=[1, 3, 7]) for i in range(3)] == [7, 1, 3]
    drawn = {window_start_at("random", 0, 1, 10, i, seed=5, starts=starts) for i in range(400)}
    assert drawn == set(starts)
    with pytest.raises(ValueError, match="has no start"):
        window_start_at("sliding", 0, 2, 10, 0, starts=[])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            dict(num_steps=10, shift=3.0, noise_level=[0.7] * 9),
            "has 9 values but the sampler has num_steps=10",
        ),
        (dict(num_steps=10, shift=3.0, noise_level=-0.1), "noise levels must be finite and >= 0"),
        (dict(num_steps=10, shift=3.0, noise_level=0.7, window_start=8, window_size=3), "start \\+ size <="),
        (dict(num_steps=10, shift=3.0, noise_level=0.7, window_start=2), "give both"),
        (dict(num_steps=0, shift=3.0, noise_level=0.7), "num_steps \\(0\\) must be >= 1"),
        (dict(num_steps=10, shift=0.0, noise_level=0.7), "shift"),
    ],
)
def test_bad_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(**kwargs)


def test_schedule_rejects_bad_grid():
    with pytest.raises(ValueError, match="fall strictly"):
        Schedule(torch.tensor([1.0, 0.5, 0.6, 0.0]), torch.zeros(3))
    assert window_mask(4, None, None).all()


def test_a_cps_schedule_keeps_its_sde_through_copies_and_its_last_step_has_no_noise():
    from densegrpo_fast.kernels import cps_std

    sched = make_schedule(4, 3.0, 0.7, sde="cps")
    for copy in (sched.to("cpu"), sched.with_noise(torch.full((4,), 0.5))):
        assert copy.cps and copy.sde == "cps"
    torch.testing.assert_close(sched.std, cps_std(sched.sigmas[1:], 0.7), rtol=0, atol=0)
    assert sched.std[3] == 0 and sched.sde_steps.tolist() == [True, True, True, False]
    assert make_schedule(4, 3.0, 0.7).sde_steps.tolist() == [True] * 4  # Flow-GRPO's last step is noisy
    with pytest.raises(ValueError, match=r"must be <= 1 under CPS"):
        make_schedule(4, 3.0, 1.2, sde="cps")
    with pytest.raises(ValueError, match=r"sde 'ddim' is not one of flow_grpo, cps"):
        make_schedule(4, 3.0, 0.7, sde="ddim")
