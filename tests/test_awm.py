"""Advantage Weighted Matching's objective (densegrpo_fast/awm.py, grpo.objective=awm in the trainer)."""

import pytest
import torch
from test_nft import batch, capture_micro_batches, first_rollout, pair_noise
from test_trainer import cfg_of, records, without_timing

from densegrpo_fast.awm import GHUBER_OFFSET, awm_loss, scaled_advantage, weighted_error
from densegrpo_fast.nft import noised

AWM = ["grpo.objective=awm", "dense.mode=sparse", "noise.level=0", "grpo.filter_zero_advantage=false",
       "dense.global_std=true", "lora.merge_for_sampling=false"]  # fmt: skip


def reference_loss(x0, eps, t, v, a, weighting, power, v_ref=None, kl=0.0, v_anchor=None, anchor_kl=0.0):
    """The loss written out in float64, sample by sample (the module docstring's formulas)."""
    b, total = x0.shape[0], 0.0
    for j in range(b):
        e = (v[j] - (eps[j] - x0[j])).square().mean().item()
        tj = t[j].item()
        w = {"uniform": e, "t": tj * e,
             "ghuber": tj * ((e + 1e-10) ** power - 1e-10**power) / power}[weighting]  # fmt: skip
        total += a[j].item() * w
        if v_ref is not None:
            total += kl * (v[j] - v_ref[j]).square().mean().item()
        if v_anchor is not None:
            total += anchor_kl * (v[j] - v_anchor[j]).square().mean().item()
    return total / b


@pytest.mark.parametrize("weighting", ["ghuber", "uniform", "t"])
def test_the_loss_is_the_advantage_weighted_flow_matching_error(weighting):
    x0, _, t, v, v_old, a = batch()
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = 2 * a - 1  # (in [-1, 1])
    v_ref, v_anchor = v_old + 0.1, v_old - 0.05
    loss, stats = awm_loss(x0, eps, t, v, a, weighting, 0.25, v_ref, 3e-3, v_anchor, 1.0)
    want = reference_loss(x0, eps, t, v, a, weighting, 0.25, v_ref, 3e-3, v_anchor, 1.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want, rel=1e-5)
    e = (v - (eps - x0)).square().mean((1, 2, 3))
    assert stats["fm_err"].item() == pytest.approx(e.mean().item(), rel=1e-5)
    assert stats["kl"].item() == pytest.approx((v - v_ref).square().mean().item(), rel=1e-5)
    assert stats["anchor_kl"].item() == pytest.approx((v - v_anchor).square().mean().item(), rel=1e-5)
    bare, bare_stats = awm_loss(x0, eps, t, v, a, weighting, 0.25, v_ref, 0.0, v_anchor, 0.0)  # (weights 0)
    assert bare.item() == pytest.approx(reference_loss(x0, eps, t, v, a, weighting, 0.25), rel=1e-5)
    assert "kl" not in bare_stats and "anchor_kl" not in bare_stats


def test_the_gradient_pulls_samples_above_the_mean_toward_their_denoising_and_pushes_the_others_away():
    """A step down the loss's gradient lowers the flow-matching error of a sample with a > 0 and raises that of
    one with a < 0; ghuber's gradient is t e^(p - 1) times the error's, larger where the fit is better."""
    x0, _, t, v0, _, _ = batch(2, b=4)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a = torch.tensor([1.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    v = v0.clone().float().requires_grad_(True)
    loss, _ = awm_loss(x0, eps, t, v, a, "ghuber", 0.25)
    (grad,) = torch.autograd.grad(loss, v)

    def err(u):
        return (u.double() - (eps - x0)).square().mean((1, 2, 3))

    e0, e1 = err(v.detach()), err(v.detach() - 1e-2 * grad)
    assert e1[0] < e0[0] and e1[1] > e0[1] and e1[2] < e0[2] and e1[3] == e0[3]
    u = v0.clone().float().requires_grad_(True)
    eu = (u - (eps - x0).float()).square().mean((1, 2, 3))
    coef = (a * t * (eu.detach().double() + GHUBER_OFFSET) ** (0.25 - 1)).float() / 4
    (want,) = torch.autograd.grad((coef * eu).sum(), u)
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-8)
    # power 1 is the t weighting
    e = torch.tensor([0.0, 0.3, 2.0])
    torch.testing.assert_close(
        weighted_error(e, torch.tensor([0.2, 0.5, 1.0]), "ghuber", 1.0), torch.tensor([0.0, 0.15, 2.0])
    )


def test_the_advantage_is_clipped_and_scaled_into_minus_one_one():
    A = torch.tensor([-7.0, -5.0, 0.0, 2.5, 5.0, 9.0])
    assert scaled_advantage(A, 5.0).tolist() == [-1.0, -1.0, 0.0, 0.5, 1.0, 1.0]


def test_awm_refuses_what_it_does_not_combine_with_and_trains_the_releases_times(tiny_checkpoint, tmp_path):
    from densegrpo_fast.config import ConfigError

    with pytest.raises(ConfigError) as e:
        cfg_of(
            tiny_checkpoint, tmp_path, extra=["grpo.objective=awm", "noise.kind=calibrated", "grpo.best_of=2"]
        )
    text = str(e.value)
    for part in ("grpo.objective=awm with dense.mode='dense'", "set dense.mode=sparse", "noise.kind=calibrated",
                 "filter_zero_advantage: a sample of advantage 0 still has its awm KL terms", "grpo.best_of"):  # fmt: skip
        assert part in text, part
    cfg = cfg_of(tiny_checkpoint, tmp_path, extra=AWM)  # noise.level=0 (the ODE) is taken
    assert cfg.sampling.num_steps == 4 and cfg.trained_steps() == [1, 2]
    for T, want in ((14, list(range(1, 12))), (10, list(range(1, 8 + 1))), (3, [1]), (2, [0, 1])):
        window = ["noise.window_start=null", "noise.window_size=null"]
        cfg = cfg_of(tiny_checkpoint, tmp_path, extra=[*AWM, *window, f"sampling.num_steps={T}"])
        assert cfg.trained_steps() == want, T
    cfg = cfg_of(tiny_checkpoint, tmp_path, extra=[*AWM, "grpo.clip_range=0.2", "awm.anchor_kl=0",
                                                   "awm.anchor_decay_max=0.5", "nft.beta=0.1"])  # fmt: skip
    notes = {key: why for keys, why in cfg.ignored_settings() for key in keys}
    assert notes["grpo.clip_range"].startswith("grpo.objective=awm has no ratio to clip")
    assert notes["awm.anchor_decay_max"] == "awm.anchor_kl=0 keeps no anchor"
    assert notes["nft.beta"] == "the nft section serves grpo.objective=nft"
    assert "awm.anchor_kl" not in notes
    cfg = cfg_of(
        tiny_checkpoint,
        tmp_path,
        extra=[*AWM, "grpo.step_draw=stratified", "awm.weighting=t", "awm.power=0.5"],
    )
    notes = {key: why for keys, why in cfg.ignored_settings() for key in keys}
    assert notes["grpo.step_draw"] == "grpo.step_fraction=1 trains every trained step: nothing is drawn"
    assert notes["awm.power"] == "awm.weighting=t has no power (the ghuber weighting's)"


def test_a_run_samples_with_the_trained_weights_and_moves_the_anchor_toward_them(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """The rollouts run with the trained weights (on-policy), the anchor's velocity with the anchor's weights
    swapped in; after each update the anchor takes its step (anchor <- d anchor + (1 - d) theta)."""
    from densegrpo_fast import trainer

    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", iterations=2, extra=[*AWM, "awm.anchor_decay_rate=0.2"])
    run = trainer.setup(cfg, progress=False)
    start = {n: t.clone() for n, t in run.old.items()}
    seen, real = [], trainer.sample

    def sample(policy, *args, **kwargs):
        params = dict(policy.transformer.named_parameters())
        seen.append({n: params[n].detach().clone() for n in run.old})
        return real(policy, *args, **kwargs)

    monkeypatch.setattr(trainer, "sample", sample)
    velocities, loss, micro = [], trainer.awm_loss, trainer._awm_micro_batch

    def micro_batch(run_, ro_, cond_, i, *args):
        velocities.append({"i": i.clone()})
        return micro(run_, ro_, cond_, i, *args)

    def awm_loss(x0, eps, t, v, a, weighting, power, v_ref, kl, v_anchor, anchor_kl):
        velocities[-1].update(x0=x0, eps=eps, t=t, v=v.detach().clone(), v_anchor=v_anchor.clone())
        return loss(x0, eps, t, v, a, weighting, power, v_ref, kl, v_anchor, anchor_kl)

    monkeypatch.setattr(trainer, "_awm_micro_batch", micro_batch)
    monkeypatch.setattr(trainer, "awm_loss", awm_loss)
    prompts = run.prompts.sample(cfg.prompts.prompts_per_iteration, 0)
    for it in range(2):
        velocities.clear()
        trained = {
            n: p.detach().clone() for n, p in run.policy.transformer.named_parameters() if n in run.old
        }
        anchor = {n: t.clone() for n, t in run.old.items()}
        ro, cond, R, _ = trainer.collect(run, prompts, it)
        assert all(torch.equal(seen[-1][n], t) for n, t in trained.items())  # (the trained weights sampled)
        out = trainer.update_forward(run, ro, cond, R, it)
        after = dict(run.policy.transformer.named_parameters())
        assert out["anchor_decay"] == pytest.approx(min(0.2 * run.opt_steps, 0.3))  # (2 optimizer steps each)
        assert out["rows_trained"] == R.shape[0] * 2 and "old_decay" not in out
        first = velocities[0]
        if it == 0:
            for n, t in run.old.items():
                torch.testing.assert_close(
                    t, torch.lerp(start[n], after[n].detach(), 1 - out["anchor_decay"])
                )
            assert torch.equal(first["v"], first["v_anchor"])  # (before any optimizer step: anchor = trained)
            continue
        # the anchor's velocity is the anchor's weights' (swapped in), not the trained ones'
        assert not torch.equal(anchor[next(iter(anchor))], trained[next(iter(anchor))])
        x_t = noised(first["x0"], first["t"], first["eps"])
        with torch.no_grad(), trainer.swapped(run, anchor):
            want = run.policy.velocity(x_t, first["t"], cond.index(first["i"]), cfg.sampling.guidance_scale)
        assert torch.equal(first["v_anchor"], want) and not torch.equal(first["v"], want)
    assert any(
        not torch.equal(seen[0][n], t) for n, t in seen[1].items()
    )  # (the second rollout: trained again)


def test_without_an_anchor_kl_no_anchor_is_kept(tiny_checkpoint, tmp_path):
    from densegrpo_fast import trainer

    cfg = cfg_of(
        tiny_checkpoint, tmp_path / "run", iterations=1, extra=[*AWM, "awm.anchor_kl=0", "run.eval_every=0"]
    )
    assert trainer.setup(cfg, progress=False).old is None
    run_dir = trainer.train(cfg, progress=False)
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert "awm_anchor" not in state and "nft_old" not in state
    step = [r for r in records(run_dir) if "reward_mean" in r][0]
    assert "anchor_kl" not in step and "anchor_decay" not in step and step["kl"] > 0


def test_a_run_resumes_to_the_uninterrupted_runs_records_and_weights(tiny_checkpoint, tmp_path):
    from densegrpo_fast.trainer import train

    extra = [
        *AWM,
        "optim.schedule=constant",
        "awm.anchor_decay_rate=0.1",
    ]  # (lr independent of run.iterations)
    whole = train(cfg_of(tiny_checkpoint, tmp_path / "whole", iterations=2, extra=extra), progress=False)
    train(cfg_of(tiny_checkpoint, tmp_path / "cut", iterations=1, extra=extra), progress=False)  # (stopped)
    cut = cfg_of(tiny_checkpoint, tmp_path / "cut", iterations=2, extra=extra)
    resumed = train(cut, resume=True, progress=False)
    steps = [r for r in records(resumed) if "reward_mean" in r]
    assert without_timing(steps) == without_timing([r for r in records(whole) if "reward_mean" in r])
    assert {"policy_loss", "fm_err", "kl", "anchor_kl", "anchor_decay"} <= steps[0].keys()
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (resumed, whole))
    for key in ("trainable", "ema", "awm_anchor"):
        assert a[key].keys() == b[key].keys() and a[key], key
        assert all(torch.equal(t, b[key][n]) for n, t in a[key].items()), key


def test_each_pair_is_the_clean_latent_noised_at_its_steps_time_with_its_own_seed(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """What the update feeds the loss: x0 = the rollout's last latent of the pair's row, t = sigma of its step,
    eps from the pair's own seed (awm's, not nft's), a = its scaled advantage, v = the trained velocity at
    x_t, v_ref = the base model's velocity (adapters off)."""
    from densegrpo_fast import trainer

    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", extra=[*AWM, "grpo.train_batch_size=5"])
    run, ro, cond, R, A = first_rollout(cfg)
    seen, loss = [], trainer.awm_loss
    capture_micro_batches(monkeypatch, "_awm_micro_batch", seen)

    def awm_loss(x0, eps, t, v, a, weighting, power, v_ref, kl, v_anchor, anchor_kl):
        seen[-1].update(x0=x0, eps=eps, t=t, v=v.detach().clone(), a=a, v_ref=v_ref)
        return loss(x0, eps, t, v, a, weighting, power, v_ref, kl, v_anchor, anchor_kl)

    monkeypatch.setattr(trainer, "awm_loss", awm_loss)
    trained = {n: p.detach().clone() for n, p in run.policy.transformer.named_parameters()}
    trainer.update_forward(run, ro, cond, R, 0, A)
    assert sum(len(b["i"]) for b in seen) == R.shape[0] * len(cfg.trained_steps())
    assert {int(k) for b in seen for k in b["k"]} == set(cfg.trained_steps())
    policy = run.policy
    for n, b in enumerate(seen):
        i, k = b["i"], b["k"]
        assert torch.equal(b["x0"], ro.latents[i, -1]) and torch.equal(b["t"], run.schedule.sigmas[k])
        eps = pair_noise(cfg, ro.latents.shape[2:], i, k)
        assert torch.equal(b["eps"], eps)
        assert torch.equal(b["a"], scaled_advantage(A, cfg.awm.adv_scale)[i, k])
        x_t = noised(b["x0"], b["t"], eps)
        if n == 0:  # (no optimizer step yet: the trained weights are the ones the run set up with)
            params = dict(policy.transformer.named_parameters())
            with torch.no_grad():
                for name, t in trained.items():
                    params[name].copy_(t)
            with torch.no_grad():
                assert torch.equal(
                    b["v"], policy.velocity(x_t, b["t"], cond.index(i), cfg.sampling.guidance_scale)
                )
        policy.transformer.disable_adapters()
        with torch.no_grad():
            base = policy.velocity(x_t, b["t"], cond.index(i), cfg.sampling.guidance_scale)
        policy.transformer.enable_adapters()
        assert torch.equal(b["v_ref"], base)
    nft = cfg_of(tiny_checkpoint, tmp_path / "run", extra=[*AWM, "grpo.objective=nft"])
    assert trainer._pair_seed(cfg, 0, 0, 1) != trainer._pair_seed(nft, 0, 0, 1)
    import hashlib

    for c, objective in ((nft, "nft"), (cfg, "awm")):  # (nft's key as its runs so far drew it)
        key = f"{objective}:{c.run.seed}:3:5:1".encode()
        assert (
            trainer._pair_seed(c, 3, 5, 1)
            == int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        )


def test_an_sde_window_on_steps_awm_does_not_train_by_default_is_taken(tiny_checkpoint, tmp_path):
    """awm trains its steps' times whatever noise the rollout drew: a window on steps outside them is no error."""
    window = ["noise.level=0.7", "noise.window_start=3", "noise.window_size=1"]  # (T = 4: steps 1, 2 trained)
    assert cfg_of(tiny_checkpoint, tmp_path / "w", extra=[*AWM, *window]).trained_steps() == [1, 2]


@pytest.mark.slow  # (the slow tier: .ci/run runs it after the default one)
@pytest.mark.parametrize("lora", [True, False])
def test_gradient_checkpointing_recomputes_with_the_trained_weights(lora, tmp_path_factory, tmp_path):
    """The anchor's weights are swapped in and out before the trained forward, so the checkpointed blocks'
    recomputation in the backward reads the trained weights: the tiny SD3's run is the one without it."""
    import tiny_models as tiny

    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.trainer import train

    root = tmp_path_factory.mktemp("tiny_sd3")
    tiny.sd3_pipeline(seed=0).save_pretrained(root)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    base = [
        *AWM, "model.family=sd3", f"model.checkpoint={root}", f"model.resolution={tiny.RESOLUTION}",
        f"model.max_sequence_length={tiny.MAX_T5_TOKENS}", f"prompts.dataset={prompts}", "prompts.prompts_per_iteration=2",
        "sampling.num_steps=3", "sampling.group_size=2", "sampling.shift=null", "noise.kind=uniform", "reward.name=redness",
        "reward.kwargs={}", "eval.rewards={}", "grpo.train_batch_size=3", "awm.kl=0.01", "awm.anchor_decay_rate=0.2",
        "run.iterations=2", "run.eval_every=0", "run.tensorboard=false", "run.sample_grid_every=0",
        "lora.rank=4" if lora else "lora.enabled=false",
    ]  # fmt: skip
    runs = []
    for gc in (False, True):
        cfg = load_config(TrainConfig, None, [*base, f"model.gradient_checkpointing={str(gc).lower()}",
                                              f"run.output_dir={tmp_path / str(gc)}"])  # fmt: skip
        runs.append([r for r in records(train(cfg, progress=False)) if "reward_mean" in r])
    plain, checkpointed = runs
    assert without_timing(plain) == without_timing(checkpointed)
    assert plain[1]["anchor_kl"] > 0 and plain[1]["anchor_decay"] > 0


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_the_forward_objectives_train_on_win_rates(objective, tiny_checkpoint, tmp_path):
    """A pairwise reward (win rates of redness in each group) feeds nft and awm as any reward does: the
    samples' rewards average 1/2, the update trains every pair, and the held-out score is redness itself."""
    from densegrpo_fast.trainer import train

    extra = [
        *AWM,
        f"grpo.objective={objective}",
        "reward.name=win_rate",
        "reward.kwargs={reward: {name: redness}}",
    ]
    recs = records(
        train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1, extra=extra), progress=False)
    )
    (step,) = [r for r in recs if "reward_mean" in r]
    assert step["reward_mean"] == pytest.approx(0.5, abs=1e-6) and step["reward_std"] > 0.1
    assert step["rows_trained"] == 8 * (4 if objective == "nft" else 2) and step["grad_norm"] > 0
    plain = cfg_of(
        tiny_checkpoint, tmp_path / "plain", iterations=1, extra=[*extra[:-2], "reward.name=redness"]
    )
    evals = [r["eval_reward"] for r in records(train(plain, progress=False)) if "eval_reward" in r]
    assert [r["eval_reward"] for r in recs if "eval_reward" in r][0] == evals[0]


def test_settings_unlike_the_releases_are_noted_by_validate_and_warned_by_train(tmp_path, capsys):
    from pathlib import Path

    from densegrpo_fast.cli import main
    from densegrpo_fast.config import TrainConfig, load_config

    root = Path(__file__).resolve().parents[1]
    toy = root / "configs" / "toy_geneval.yaml"
    over = [
        *AWM,
        "noise.kind=uniform",
        "dense.global_std=false",
        "dense.adv_clip=2.5",
    ]  # (the toy file: 2 updates per iteration)
    caveats = load_config(TrainConfig, toy, over).caveats()
    assert [c.split(":")[0] for c in caveats] == [
        "grpo.objective=awm with grpo.updates_per_iteration=2",
        "grpo.objective=awm with dense.global_std=false",
        "dense.adv_clip=2.5 below awm.adv_scale=5.0",
    ]
    assert "keeps a within [-c/s, c/s]" in caveats[2] and caveats[2].endswith("set dense.adv_clip=5.0")
    nft = load_config(TrainConfig, toy, [*over, "grpo.objective=nft"]).caveats()
    assert len(nft) == 2 and "r within [1/2 - c/(2s), 1/2 + c/(2s)]" in nft[1]  # (nft is off-policy anyway)
    for recipe in ("sd35m_awm_pickscore", "sd35m_nft_pickscore", "toy_geneval"):
        assert load_config(TrainConfig, root / "configs" / f"{recipe}.yaml").caveats() == [], recipe
    assert main(["validate", "--config", str(toy), *over]) == 0
    assert f"note: {caveats[0]}" in capsys.readouterr().err
    with pytest.warns(UserWarning) as seen:  # (then refused later: no such prompt file)
        code = main(["train", "--config", str(toy), "--output-dir", str(tmp_path / "run"), *over,
                     "prompts.dataset=/none.txt"])  # fmt: skip
    assert code == 2 and set(caveats) <= {str(w.message) for w in seen}
