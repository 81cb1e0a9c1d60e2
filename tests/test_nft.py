"""DiffusionNFT's objective (densegrpo_fast/nft.py, grpo.objective=nft in the trainer)."""

import pytest
import torch
from test_trainer import cfg_of, records, without_timing

from densegrpo_fast.nft import WEIGHT_FLOOR, nft_loss, noised, old_decay, optimality

NFT = ["grpo.objective=nft", "dense.mode=sparse", "noise.level=0", "grpo.filter_zero_advantage=false",
       "dense.global_std=true", "lora.merge_for_sampling=false"]  # fmt: skip


def reference_loss(x0, x_t, t, v, v_old, r, beta, scale, v_ref=None, kl=0.0) -> float:
    """The loss written out in float64, sample by sample (the module docstring's formula)."""
    total = 0.0
    b = x0.shape[0]
    for j in range(b):
        parts = []
        for mix in ((1 - beta) * v_old[j] + beta * v[j], (1 + beta) * v_old[j] - beta * v[j]):
            err = x_t[j] - t[j] * mix - x0[j]
            w = max(err.abs().mean().item(), WEIGHT_FLOOR)
            parts.append(err.square().mean().item() / w)
        total += r[j].item() * parts[0] + (1 - r[j].item()) * parts[1]
    loss = scale / beta * total / b
    if v_ref is not None:
        loss += kl * sum((v[j] - v_ref[j]).square().mean().item() for j in range(b)) / b
    return loss


def batch(seed=0, b=5):
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(b, 4, 6, 6, generator=g, dtype=torch.float64), torch.randn(b, 4, 6, 6, generator=g)
    t = torch.rand(b, generator=g, dtype=torch.float64)
    x_t = noised(x0, t, eps.double())
    v_old = (eps.double() - x0) + 0.3 * torch.randn(b, 4, 6, 6, generator=g, dtype=torch.float64)
    v = v_old + 0.2 * torch.randn(b, 4, 6, 6, generator=g, dtype=torch.float64)
    r = torch.rand(b, generator=g, dtype=torch.float64)
    return x0, x_t, t, v, v_old, r


def first_rollout(cfg):
    """A run set up from ``cfg`` and its first iteration's rollout: (run, ro, cond, R, A)."""
    from densegrpo_fast import trainer

    run = trainer.setup(cfg, progress=False)
    prompts = run.prompts.sample(cfg.prompts.prompts_per_iteration, 0)
    ro, cond, R, _ = trainer.collect(run, prompts, 0)
    return run, ro, cond, R, trainer._advantages(run, R)


def capture_micro_batches(monkeypatch, name: str, seen: list[dict]) -> None:
    """Record each micro-batch's pairs (rows ``i``, steps ``k``) of ``trainer.<name>`` in ``seen``."""
    from densegrpo_fast import trainer

    micro = getattr(trainer, name)

    def micro_batch(run_, ro_, cond_, i, k, *args):
        seen.append({"i": i.clone(), "k": k.clone()})
        return micro(run_, ro_, cond_, i, k, *args)

    monkeypatch.setattr(trainer, name, micro_batch)


def pair_noise(cfg, shape, i, k, iteration=0):
    """The noise of pairs (rows ``i``, steps ``k``) drawn from their own seeds, as the update draws it."""
    from densegrpo_fast.trainer import _pair_seed

    return torch.stack([
        torch.randn(shape, generator=torch.Generator().manual_seed(_pair_seed(cfg, iteration, a, c)))
        for a, c in zip(i.tolist(), k.tolist(), strict=True)
    ])  # fmt: skip


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_the_loss_is_the_mix_of_the_two_implicit_policies_errors(beta):
    x0, x_t, t, v, v_old, r = batch()
    v_ref = v_old + 0.1
    loss, stats = nft_loss(x0, x_t, t, v, v_old, r, beta, 5.0, v_ref, 1e-2)
    want = reference_loss(x0, x_t, t, v, v_old, r, beta, 5.0, v_ref, 1e-2)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want, rel=1e-5)
    assert stats["r_mean"].item() == pytest.approx(r.mean().item(), rel=1e-6)
    eps = torch.randn_like(x0)
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    assert torch.equal(noised(x0, ones, eps), eps) and torch.equal(noised(x0, zeros, eps), x0)


def test_at_the_old_policy_the_gradient_is_2r_minus_1_times_the_weighted_flow_matching_gradient():
    """At v = v_old both branches predict the same x0; the gradient is then (2 r - 1) s times that of the
    flow-matching error weighted by its mean absolute value, whatever beta is."""
    x0, x_t, t, _, v_old, r = batch(1)
    for beta in (1.0, 0.1):
        v = v_old.clone().float().requires_grad_(True)
        loss, _ = nft_loss(x0, x_t, t, v, v_old, r, beta, 5.0)
        (grad,) = torch.autograd.grad(loss, v)
        u = v_old.clone().float().requires_grad_(True)
        err = x_t.float() - t.float().view(-1, 1, 1, 1) * u - x0.float()
        w = err.detach().abs().mean((1, 2, 3))
        fm = ((2 * r.float() - 1) * err.square().mean((1, 2, 3)) / w).mean()
        (want,) = torch.autograd.grad(5.0 * fm, u)
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)
        assert grad.abs().max() > 1e-3


def test_the_optimality_probability_and_the_old_policys_decay():
    A = torch.tensor([-7.0, -5.0, 0.0, 2.5, 5.0, 9.0])
    assert optimality(A, 5.0).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
    assert [old_decay(s, 1e-3, 0.5) for s in (0, 100, 499, 600)] == pytest.approx([0.0, 0.1, 0.499, 0.5])
    assert [old_decay(s, 7.5e-3, 0.999, delay=75) for s in (0, 75, 100, 400)] == pytest.approx(
        [0.0, 0.0, 0.1875, 0.999]
    )


def test_nft_refuses_what_it_does_not_combine_with(tiny_checkpoint, tmp_path):
    from densegrpo_fast.config import ConfigError

    with pytest.raises(ConfigError) as e:
        cfg_of(
            tiny_checkpoint, tmp_path, extra=["grpo.objective=nft", "noise.kind=calibrated", "grpo.best_of=2"]
        )
    text = str(e.value)
    for part in ("dense.mode='dense'", "set dense.mode=sparse", "noise.kind=calibrated", "set noise.kind=uniform",
                 "filter_zero_advantage", "grpo.best_of"):  # fmt: skip
        assert part in text, part
    cfg = cfg_of(tiny_checkpoint, tmp_path, extra=NFT)  # noise.level=0 (the ODE) is taken
    assert cfg.trained_steps() == list(range(cfg.sampling.num_steps))  # every time of the grid, t = 1 too


def test_a_run_samples_with_the_old_policy_and_trains_it_toward_the_new_one(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """The rollouts run with the old policy's weights swapped in; after each update the old policy takes its
    step toward the trained weights (old <- d old + (1 - d) theta); the trained weights are back after."""
    from densegrpo_fast import trainer

    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", iterations=2, extra=[*NFT, "nft.old_decay_rate=0.2"])
    run = trainer.setup(cfg, progress=False)
    start = {n: t.clone() for n, t in run.old.items()}
    seen, real = [], trainer.sample

    def sample(policy, *args, **kwargs):
        params = dict(policy.transformer.named_parameters())
        seen.append(all(torch.equal(params[n], t) for n, t in run.old.items()))
        return real(policy, *args, **kwargs)

    monkeypatch.setattr(trainer, "sample", sample)
    velocities, loss = [], trainer.nft_loss

    def nft_loss(x0, x_t, t, v, v_old, *args):  # (the velocities of each micro-batch's two policies)
        velocities.append((v.detach().clone(), v_old.clone()))
        return loss(x0, x_t, t, v, v_old, *args)

    monkeypatch.setattr(trainer, "nft_loss", nft_loss)
    prompts = run.prompts.sample(cfg.prompts.prompts_per_iteration, 0)
    for it in range(2):
        velocities.clear()
        ro, cond, R, _ = trainer.collect(run, prompts, it)
        out = trainer.update_forward(run, ro, cond, R, it)
        trained = dict(run.policy.transformer.named_parameters())
        assert out["old_decay"] == pytest.approx(min(0.2 * run.opt_steps, 0.5))  # (2 optimizer steps each)
        if it == 0:  # (the old policy began as the trained one: the weights the first rollout sampled with)
            for n, t in run.old.items():
                torch.testing.assert_close(t, torch.lerp(start[n], trained[n].detach(), 1 - out["old_decay"]))
            moved = [n for n in run.old if not torch.equal(run.old[n], trained[n])]
            assert moved and out["rows_trained"] == R.shape[0] * cfg.sampling.num_steps
            v, v_old = velocities[0]  # before any optimizer step: the old policy is the trained one
            assert torch.equal(v, v_old)
        else:  # the old policy's velocity, its weights swapped in, not the trained one's
            v, v_old = velocities[0]
            assert not torch.equal(v, v_old) and (v - v_old).abs().max() < 0.5 * v.abs().max()
    assert seen == [True, True]
    assert any(not torch.equal(run.old[n], p) for n, p in trained.items() if n in run.old)  # (back: trained)


def test_a_run_resumes_to_the_uninterrupted_runs_records_and_weights(tiny_checkpoint, tmp_path):
    from densegrpo_fast.trainer import train

    extra = [*NFT, "nft.kl=0.01", "optim.schedule=constant"]  # (the lr does not depend on run.iterations)
    whole = train(cfg_of(tiny_checkpoint, tmp_path / "whole", iterations=2, extra=extra), progress=False)
    train(cfg_of(tiny_checkpoint, tmp_path / "cut", iterations=1, extra=extra), progress=False)  # (stopped)
    cut = cfg_of(tiny_checkpoint, tmp_path / "cut", iterations=2, extra=extra)
    resumed = train(cut, resume=True, progress=False)
    steps = [r for r in records(resumed) if "reward_mean" in r]
    assert without_timing(steps) == without_timing([r for r in records(whole) if "reward_mean" in r])
    assert {"policy_loss", "r_mean", "kl", "old_decay"} <= steps[0].keys() and steps[0]["rows_trained"] > 0
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (resumed, whole))
    for key in ("trainable", "ema", "nft_old"):
        assert a[key].keys() == b[key].keys() and a[key], key
        assert all(torch.equal(t, b[key][n]) for n, t in a[key].items()), key


def test_each_pair_is_the_clean_latent_noised_at_its_steps_time_with_its_own_seed(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """What the update feeds the loss: x0 = the rollout's last latent of the pair's row, t = sigma of its step,
    x_t from the pair's own seed, r = the optimality of its advantage, v_ref = the base model's velocity
    (adapters off), v_old = v before any optimizer step."""
    from densegrpo_fast import trainer

    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", extra=[*NFT, "nft.kl=0.01", "grpo.train_batch_size=5"])
    run, ro, cond, R, A = first_rollout(cfg)
    seen, loss = [], trainer.nft_loss
    capture_micro_batches(monkeypatch, "_nft_micro_batch", seen)

    def nft_loss(x0, x_t, t, v, v_old, r, beta, scale, v_ref, kl):
        seen[-1].update(x0=x0, x_t=x_t, t=t, v=v.detach().clone(), v_old=v_old, r=r, v_ref=v_ref)
        return loss(x0, x_t, t, v, v_old, r, beta, scale, v_ref, kl)

    monkeypatch.setattr(trainer, "nft_loss", nft_loss)
    trainer.update_forward(run, ro, cond, R, 0, A)
    assert sum(len(b["i"]) for b in seen) == R.shape[0] * cfg.sampling.num_steps
    policy = run.policy
    for n, b in enumerate(seen):
        i, k = b["i"], b["k"]
        assert torch.equal(b["x0"], ro.latents[i, -1]) and torch.equal(b["t"], run.schedule.sigmas[k])
        eps = pair_noise(cfg, ro.latents.shape[2:], i, k)
        assert torch.equal(b["x_t"], noised(b["x0"], b["t"], eps))
        assert torch.equal(b["r"], optimality(A, cfg.nft.adv_scale)[i, k])
        if n == 0:  # (no optimizer step yet: the old policy is the trained one)
            assert torch.equal(b["v"], b["v_old"])
        policy.transformer.disable_adapters()
        with torch.no_grad():
            base = policy.velocity(b["x_t"], b["t"], cond.index(i), cfg.sampling.guidance_scale)
        policy.transformer.enable_adapters()
        assert torch.equal(b["v_ref"], base)
    assert (
        len({trainer._pair_seed(cfg, it, a, c) for it in range(3) for a in range(64) for c in range(10)})
        == 3 * 640
    )
