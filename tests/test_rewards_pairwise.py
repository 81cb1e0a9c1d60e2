"""Pairwise rewards (densegrpo_fast/rewards/pairwise.py): the comparison schedule, win rates against a loop
over the pairs, the Bradley-Terry ``win_rate`` reward, and the engine's calls (a column of whole groups at a
time; the evaluation's pointwise view)."""

import itertools
import math

import pytest
import torch

from densegrpo_fast.dense import advantages, latent_rewards
from densegrpo_fast.rewards import build_reward, kwargs_problems, spec_is_pairwise
from densegrpo_fast.rewards.pairwise import is_pairwise, pointwise_view, schedule, score, win_rates


def fixed(scores):
    """A pointwise reward answering ``scores`` (a tensor) whatever the images."""
    return lambda images, prompts: scores[: images.shape[0]].clone()


def win_rate_of(scores, **kwargs):
    fn = build_reward("win_rate", reward={"name": "redness"}, **kwargs)
    fn.pointwise = fixed(scores)
    return fn


def blank(n):
    return torch.zeros(n, 3, 4, 4)


@pytest.mark.parametrize(
    "G,m", [(2, None), (5, None), (8, None), (8, 2), (8, 4), (9, 6), (8, 6), (8, 8), (7, 6)]
)
def test_the_schedule_gives_every_row_the_same_games_and_no_pair_twice(G, m):
    a, b = schedule(G, m)
    pairs = {frozenset(p) for p in zip(a.tolist(), b.tolist(), strict=True)}
    assert len(pairs) == len(a) and all(len(p) == 2 for p in pairs)  # no repeat, no row against itself
    games = torch.bincount(torch.cat([a, b]), minlength=G)
    want = G - 1 if m is None or m >= G - 1 else m
    assert games.tolist() == [want] * G


@pytest.mark.parametrize("opponents", [None, 2, 4])
def test_win_rates_are_the_mean_probability_of_winning_over_each_rows_games(opponents):
    G, groups = 7, 3
    P = torch.rand(groups * G, groups * G, generator=torch.Generator().manual_seed(1))
    out = win_rates(lambda a, b: P[a, b], groups * G, G, opponents)
    a, b = schedule(G, opponents)
    for g in range(groups):
        for i in range(G):
            probs = [P[g * G + x, g * G + y] if x == i else 1 - P[g * G + x, g * G + y]
                     for x, y in zip(a.tolist(), b.tolist(), strict=True) if i in (x, y)]  # fmt: skip
            assert out[g * G + i].item() == pytest.approx(sum(probs).item() / len(probs), abs=1e-6)


def test_counted_wins_and_ties():
    out = win_rate_of(torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0, 0.0, 0.0, 5.0]))(
        blank(8), ["a"] * 4 + ["b"] * 4, 4
    )
    # group a: 3 beats all; 1 loses all; the two 2s beat 1, tie each other, lose to 3. Group b: one 5, three 0s
    assert out.tolist() == pytest.approx([1, 0, 0.5, 0.5, 1 / 3, 1 / 3, 1 / 3, 1])


def test_a_margin_makes_close_scores_a_tie():
    r = torch.tensor([1.0, 1.04, 0.5, 1.2])
    out = win_rate_of(r, margin=0.05)(blank(4), ["p"] * 4, 4)
    # 1.0 and 1.04 tie (within 0.05), both beat 0.5 and lose to 1.2; 0.5 loses all; 1.2 wins all
    assert out.tolist() == pytest.approx([1.5 / 3, 1.5 / 3, 0, 1])
    assert win_rate_of(r)(blank(4), ["p"] * 4, 4).tolist() == pytest.approx([1 / 3, 2 / 3, 0, 1])
    assert any("margin=0.1 counts wins (temperature 0)" in p
               for p in kwargs_problems("win_rate", {"reward": {"name": "redness"}, "margin": 0.1, "temperature": 1}))  # fmt: skip
    assert any("margin=-1 must be a finite number >= 0" in p
               for p in kwargs_problems("win_rate", {"reward": {"name": "redness"}, "margin": -1}))  # fmt: skip


def test_temperature_gives_bradley_terry_probabilities():
    r = torch.tensor([0.3, -0.2, 1.1])
    out = win_rate_of(r, temperature=0.5)(blank(3), ["p"] * 3, 3)
    want = [(torch.sigmoid((r[i] - r[j]) / 0.5).item() + torch.sigmoid((r[i] - r[k]) / 0.5).item()) / 2
            for i, j, k in [(0, 1, 2), (1, 0, 2), (2, 0, 1)]]  # fmt: skip
    assert out.tolist() == pytest.approx(want, abs=1e-6)


def test_a_binary_reward_trains_as_its_win_rates_do():
    """With 0/1 scores, counted win rates are an affine map of the scores within each group, so GRPO's
    normalised advantages are the same; with a high temperature, nearly so for any scores."""
    G = 6
    r = torch.randint(0, 2, (4 * G,), generator=torch.Generator().manual_seed(3)).float()
    r[:G] = torch.tensor([1.0, 0, 0, 0, 0, 0])  # (one group with a single winner)
    prompts = [p for p in "abcd" for _ in range(G)]
    wins = win_rate_of(r)(blank(4 * G), prompts, G)
    assert not torch.allclose(wins, r)
    A_points = advantages(
        r[:, None].repeat(1, 2), G, "sparse", eps=0
    )  # (the std's epsilon would scale apart)
    A_wins = advantages(wins[:, None].repeat(1, 2), G, "sparse", eps=0)
    torch.testing.assert_close(A_wins, A_points, atol=1e-5, rtol=0)
    smooth = torch.rand(4 * G, generator=torch.Generator().manual_seed(4))
    wins = win_rate_of(smooth, temperature=100.0)(blank(4 * G), prompts, G)
    A_points = advantages(smooth[:, None].repeat(1, 2), G, "sparse", eps=0)
    A_wins = advantages(wins[:, None].repeat(1, 2), G, "sparse", eps=0)
    torch.testing.assert_close(A_wins, A_points, atol=1e-3, rtol=0)
    counted = win_rate_of(smooth)(blank(4 * G), prompts, G)  # counted wins keep only the order
    assert (advantages(counted[:, None].repeat(1, 2), G, "sparse") - A_points).abs().max() > 0.05


def test_bad_groups_and_scores_are_named():
    fn = win_rate_of(torch.arange(4.0))
    with pytest.raises(
        ValueError, match="called without group_size: score images alone through its pointwise"
    ):
        fn(blank(4), ["a"] * 4)
    with pytest.raises(ValueError, match="group_size=1 must be a whole number >= 2"):
        fn(blank(4), ["a"] * 4, 1)
    with pytest.raises(ValueError, match="not whole groups of 3"):
        fn(blank(4), ["a"] * 4, 3)
    with pytest.raises(ValueError, match=r"rows 2..3 should be one group of one prompt"):
        fn(blank(4), ["a", "a", "b", "c"], 2)
    out = win_rate_of(torch.tensor([1.0, math.nan, 0.0, 2.0]))(blank(4), ["a", "a", "b", "b"], 2)
    assert out[:2].isnan().all() and out[2:].tolist() == [
        0,
        1,
    ]  # (a NaN score is not hidden: its group is NaN)


def test_kwargs_are_checked_without_building():
    ok = {"reward": {"name": "redness"}}
    assert kwargs_problems("win_rate", ok) == []
    said = [
        ({"reward": {"name": "rednes"}}, "did you mean 'redness'"),
        ({"reward": "redness"}, "must be a mapping {name: ..., kwargs: {...}}"),
        ({**ok, "temperature": -1}, "temperature=-1 must be a finite number >= 0"),
        ({**ok, "opponents": 3}, "opponents=3 must be an even whole number >= 2"),
        ({"reward": {"name": "win_rate", "kwargs": ok}}, "compares images itself"),
        (
            {"reward": {"name": "redness", "kwargs": {"x": 1}}},
            "reward.kwargs.reward: reward 'redness' does not take",
        ),
    ]
    for kwargs, msg in said:
        problems = kwargs_problems("win_rate", kwargs)
        assert any(msg in p for p in problems), (kwargs, problems)
        with pytest.raises(ValueError, match=__import__("re").escape(msg)):
            build_reward("win_rate", **kwargs)
    assert spec_is_pairwise("win_rate", ok) and not spec_is_pairwise("redness", {})
    assert spec_is_pairwise("multi", {"rewards": {"w": {"name": "win_rate", "kwargs": ok}}})
    assert not spec_is_pairwise("multi", {"rewards": {"r": {"name": "redness"}}})


def test_latent_rewards_compare_each_column_of_whole_groups():
    """A dense rollout's completions are compared within their group at the same latent: each call holds whole
    groups of one column, and R[:, k] is that column's win rates (an unscored column copies the next)."""
    G, groups, T = 3, 4, 4
    B = G * groups
    clean = torch.randn(B, T + 1, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    prompts = [f"p{i // G}" for i in range(B)]
    calls = []

    def points(images, prompts):
        calls.append((images[:, 0, 0, 0].clone(), list(prompts)))
        return images.flatten(1).sum(1)

    fn = build_reward("win_rate", reward={"name": "redness"})
    fn.pointwise = points
    decode = lambda z: z.expand(-1, 3, -1, -1)  # noqa: E731
    R = latent_rewards(
        decode, fn, clean, prompts, [0, 1, 3], chunk=7, group_size=G
    )  # 7 rows: 2 groups a call
    assert [len(p) for _, p in calls] == [6, 6] * 4
    for c, col in enumerate([0, 1, 3, 4]):  # (T is always scored)
        got = torch.cat([calls[2 * c][0], calls[2 * c + 1][0]])
        assert torch.equal(got, clean[:, col, 0, 0, 0])
        scores = clean[:, col].flatten(1).sum(1) * 3
        want = [sum((scores[i] > scores[j]).item() + 0.5 * (scores[i] == scores[j]).item()
                    for j in range(g * G, g * G + G) if j != i) / (G - 1)
                for g in range(groups) for i in range(g * G, g * G + G)]  # fmt: skip
        assert R[:, col].tolist() == pytest.approx(want)
    assert torch.equal(R[:, 2], R[:, 3])


def test_a_sum_passes_the_group_size_to_its_pairwise_parts_and_evaluates_their_views():
    fn = build_reward("multi", rewards={"w": {"name": "win_rate", "kwargs": {"reward": {"name": "redness"}}},
                                        "r": {"name": "redness", "weight": 0.5}})  # fmt: skip
    assert is_pairwise(fn) and is_pairwise(fn.stack)
    x = torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    red = build_reward("redness")(x, ["a"] * 4)
    parts = score(fn.stack, x, ["a"] * 4, 4)
    order = red.argsort().argsort().float() / 3  # (distinct scores: the rank over the 3 others)
    torch.testing.assert_close(parts, torch.stack([order, red], 1))
    torch.testing.assert_close(pointwise_view(fn)(x, ["a"] * 4), 1.5 * red)
    with pytest.raises(ValueError, match="called without group_size"):
        fn(x, ["a"] * 4)


def test_the_reward_server_refuses_a_pairwise_reward():
    from densegrpo_fast.rewards.server import load_reward

    with pytest.raises(ValueError, match="compares the images of a group, which the server's requests"):
        load_reward("win_rate", {"reward": {"name": "redness"}})


def test_a_torchrun_job_must_hold_whole_groups_per_process(tiny_checkpoint, tmp_path):
    from test_trainer import cfg_of

    from densegrpo_fast.trainer import _check_world

    cfg = cfg_of(
        tiny_checkpoint, tmp_path, extra=["reward.name=win_rate", "reward.kwargs={reward: {name: redness}}"]
    )
    assert cfg.prompts.prompts_per_iteration == 2 and cfg.sampling.group_size == 4
    _check_world(cfg, 2)
    with pytest.raises(ValueError, match="each of the 4 processes .* must hold whole groups"):
        _check_world(cfg, 4)  # (8 rows split over 4 processes: half a group each)
    waves = cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"reward_waves": 2})})
    _check_world(waves, 1)
    with pytest.raises(ValueError, match="and each of its sampling.reward_waves=2 waves"):
        _check_world(waves, 2)  # (one group per process cannot make two waves of whole groups)
    _check_world(
        cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"name": "redness", "kwargs": {}})}), 4
    )


def test_a_toy_run_trains_on_win_rates_and_evaluates_the_pointwise_reward(tiny_checkpoint, tmp_path):
    """A dense iteration of the toy with win rates of a smooth reward (redness): each step's latent rewards are
    win rates (a group's mean 1/2 at every latent), it trains, and the held-out evaluation scores the reward
    itself, as a run on that reward alone does."""
    from test_trainer import cfg_of, records

    from densegrpo_fast.trainer import train

    def run(name, extra):
        return records(
            train(cfg_of(tiny_checkpoint, tmp_path / name, iterations=1, extra=extra), progress=False)
        )

    wins = run("wins", ["reward.name=win_rate", "reward.kwargs={reward: {name: redness}}"])
    plain = run("plain", ["reward.name=redness"])
    (step,) = [r for r in wins if "reward_mean" in r]
    assert step["R_mean"] == pytest.approx([0.5] * 5, abs=1e-6)  # (every latent: win rates of whole groups)
    assert step["R_std"][-1] > 0.1 and step["rows_trained"] > 0
    evals = lambda recs: [r["eval_reward"] for r in recs if "eval_reward" in r]  # noqa: E731
    assert evals(wins)[0] == evals(plain)[0]  # (before training: the same policy, scored by redness)
    assert abs(evals(wins)[0] - 0.5) > 0.1


def test_a_pairwise_reward_without_a_pointwise_view_is_refused_before_the_model_loads(
    tiny_checkpoint, tmp_path
):
    from test_trainer import cfg_of

    from densegrpo_fast.trainer import train

    class NoView:
        pairwise, pointwise = True, None

    import densegrpo_fast.trainer as trainer

    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1)
    real = trainer.build_reward
    trainer.build_reward = lambda name, **kw: NoView()
    try:
        with pytest.raises(ValueError, match="has no pointwise view to score a held-out image alone"):
            train(cfg, progress=False)
    finally:
        trainer.build_reward = real
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_every_pair_is_asked_once_per_column_group():
    calls = []

    def prefer(a, b):
        calls.append(len(a))
        return torch.full((len(a),), 0.5)

    assert win_rates(prefer, 12, 4).tolist() == [0.5] * 12
    assert calls == [3 * 6]  # 3 groups x 6 pairs, in one call
    assert len(list(itertools.combinations(range(4), 2))) == 6


def test_psi_is_calibrated_on_the_pointwise_view(tiny_checkpoint, tmp_path):
    """A group's win rates sum to G/2 at every latent, so gains and losses would about balance whatever the
    noise did: win_rate of redness calibrates exactly as redness does."""
    import json

    from test_trainer import cfg_of

    from densegrpo_fast.trainer import setup

    extra = ["noise.kind=calibrated", "noise.calibration.iterations=3", "noise.calibration.prompts=2"]
    tables = []
    for name, reward in [("wins", ["reward.name=win_rate", "reward.kwargs={reward: {name: redness}}"]),
                         ("plain", ["reward.name=redness"])]:  # fmt: skip
        setup(cfg_of(tiny_checkpoint, tmp_path / name, extra=[*extra, *reward]), progress=False)
        tables.append(json.loads((tmp_path / name / "psi.json").read_text()))
    wins, plain = tables
    assert (wins["gains"], wins["losses"], wins["trajectory"]) == (
        plain["gains"],
        plain["losses"],
        plain["trajectory"],
    )
    assert any(abs(p - n) >= 2 for p, n in zip(wins["gains"][0], wins["losses"][0], strict=True))
    assert (
        wins["calibrated_for"] == plain["calibrated_for"]
    )  # (so either run reads the other's table silently)


def test_the_toy_eval_command_scores_a_pairwise_entry_by_its_view(tiny_checkpoint, tmp_path):
    from densegrpo_fast.config import EvalSection
    from densegrpo_fast.policies.toy import ToyPolicy
    from densegrpo_fast.toy.evaluate import evaluate

    policy = ToyPolicy.load(tiny_checkpoint)
    rewards = {
        "red": {"name": "redness"},
        "wins": {"name": "win_rate", "kwargs": {"reward": {"name": "redness"}}},
    }
    cfg = EvalSection(num_prompts=4, num_steps=2, batch_size=4, shift=1.0, rewards=rewards)
    out = evaluate(policy, cfg)
    assert out["rewards"]["wins"] == out["rewards"]["red"]


@pytest.mark.parametrize(
    "extra",
    [["dense.mode=sparse"], ["sampling.reward_waves=2"], ["dense.mode=sparse", "sampling.reward_waves=2"]],
    ids=["sparse", "waves", "sparse-waves"],
)
def test_win_rates_train_through_the_sparse_and_the_waved_paths(tiny_checkpoint, tmp_path, extra):
    """The final-only scoring of sparse mode and the reward waves (each wave whole groups, scored while the next
    rolls out) hand the reward whole groups too: the final latent's win rates average 1/2 and the run trains."""
    from test_trainer import cfg_of, records

    from densegrpo_fast.trainer import train

    over = ["reward.name=win_rate", "reward.kwargs={reward: {name: redness}}", "run.eval_every=0", *extra]
    (step,) = [r for r in records(train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1, extra=over),
                                        progress=False)) if "reward_mean" in r]  # fmt: skip
    assert step["reward_mean"] == pytest.approx(0.5, abs=1e-6) and step["rows_trained"] > 0
