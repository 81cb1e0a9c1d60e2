"""The training recipe end to end on a tiny random toy model (seconds on one CPU thread)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.utils._python_dispatch
from tolerances import assert_on_policy

from densegrpo_fast.calibration import calibration_step
from densegrpo_fast.config import ConfigError, TrainConfig, load_config
from densegrpo_fast.policies.toy import ToyPolicy
from densegrpo_fast.schedule import Schedule, make_schedule
from densegrpo_fast.trainer import setup, train

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy_geneval.yaml"
TIMING = {"wall_s", "rollout_s", "reward_s", "update_s"}


def tiny_overrides(ckpt, out, iterations=3, extra=()):
    return [
        f"model.checkpoint={ckpt}", f"run.output_dir={out}", f"run.iterations={iterations}", "reward.name=redness", "reward.kwargs={}", "eval.rewards={}",
        "noise.kind=uniform", "prompts.prompts_per_iteration=2", "sampling.group_size=4", "sampling.num_steps=4",
        "eval.num_prompts=12", "eval.num_steps=4", "lora.rank=4", "run.checkpoint_every=1", "run.tensorboard=false",
        "run.sample_grid_every=2", "run.eval_every=0", "grpo.train_batch_size=8", "grpo.updates_per_iteration=2", "ema.every=1",
        *extra,
    ]  # fmt: skip


def cfg_of(ckpt, out, **kw):
    return load_config(TrainConfig, CONFIG, tiny_overrides(ckpt, out, **kw))


def records(run_dir):
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def without_timing(recs):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def test_short_training_run_writes_everything_and_is_on_policy(tiny_checkpoint, tmp_path):
    run_dir = train(cfg_of(tiny_checkpoint, tmp_path / "run"), progress=False)
    recs = records(run_dir)
    steps = [r for r in recs if "reward_mean" in r]
    assert [r["iteration"] for r in steps] == [1, 2, 3]
    for r in steps:
        # the first update of every iteration is on-policy (bf16 merged rollouts: within the trainer's limit)
        assert_on_policy(r)
        assert r["rows_trained"] == 8 * 3  # 8 samples x trained steps 0..T-2
        assert len(r["dR_mean"]) == 4 and len(r["R_mean"]) == 5
    evals = [r for r in recs if "eval_reward" in r]
    assert [r["iteration"] for r in evals] == [0, 3]
    for name in (
        "config.yaml",
        "checkpoint.pt",
        "reward_curve.png",
        "step_rewards.png",
        "policy_ema.safetensors",
        "samples/iter_00002.png",
    ):
        assert (run_dir / name).exists(), name
    # the export is a plain policy with LoRA merged, loadable by the eval command
    exported = ToyPolicy.load(run_dir / "policy_ema.safetensors")
    assert not any("lora" in k for k in exported.state_dict())


def test_trainer_heldout_score_is_the_eval_command_score(tiny_checkpoint, tmp_path):
    """Before any update the trainer's held-out evaluation and `densegrpo-fast eval` see the same prompts,
    noise and sampler, so they give the same score (the 20-minute target is read from either)."""
    from densegrpo_fast.toy.evaluate import evaluate
    from densegrpo_fast.trainer import heldout_rewards

    extra = ["model.checkpoint=null", "reward.name=toy_geneval", "reward.kwargs={mode: partial}",
             "eval.rewards={strict: {name: toy_geneval, kwargs: {mode: strict}}}", "eval.num_prompts=30",
             "eval.num_steps=8", "eval.batch_size=16", "lora.enabled=false"]  # fmt: skip
    cfg = load_config(TrainConfig, CONFIG, tiny_overrides(tiny_checkpoint, tmp_path / "run", extra=extra))
    run = setup(cfg, progress=False)
    ours = heldout_rewards(run)
    theirs = evaluate(ToyPolicy.load(None), cfg.eval)
    assert 0 < theirs["strict"] < 1  # the shipped model passes some prompts and fails others
    assert ours["eval_strict"] == theirs["strict"]
    assert ours["eval_reward"] == pytest.approx(theirs["partial"], abs=1e-6)


def test_an_extra_metric_that_is_the_training_reward_is_scored_once(tiny_checkpoint, tmp_path, monkeypatch):
    """The recipes name their training reward in eval.rewards too (the eval command scores only those): the
    trainer's evaluation reuses the training reward's model for it instead of loading a second copy."""
    import densegrpo_fast.trainer as trainer

    extra = ["model.checkpoint=null", "reward.name=toy_geneval", "reward.kwargs={mode: partial}",
             "eval.rewards={same: {name: toy_geneval, kwargs: {mode: partial}}, "
             "strict: {name: toy_geneval, kwargs: {mode: strict}}}",
             "eval.num_prompts=20", "eval.num_steps=4", "eval.batch_size=16"]  # fmt: skip
    cfg = load_config(TrainConfig, CONFIG, tiny_overrides(tiny_checkpoint, tmp_path / "run", extra=extra))
    run = trainer.setup(cfg, progress=False)
    built = []
    real = trainer.build_reward
    monkeypatch.setattr(trainer, "build_reward", lambda name, **kw: built.append(kw) or real(name, **kw))
    scores = trainer.heldout_rewards(run)
    assert built == [{"mode": "strict"}]  # the training reward is not built again
    assert list(scores) == ["eval_reward", "eval_same", "eval_strict"]
    assert scores["eval_same"] == scores["eval_reward"] != scores["eval_strict"]
    with pytest.raises(ConfigError, match=r"eval.rewards.reward: the key 'reward' is taken"):  # eval_reward's
        cfg_of(tiny_checkpoint, tmp_path / "bad", extra=["eval.rewards={reward: {name: redness}}"])


def test_the_export_merges_the_ema_on_the_host_and_leaves_the_run_untouched(tiny_checkpoint, tmp_path):
    """The export copies the transformer to host memory with the EMA swapped in and merges LoRA there: the file
    is exactly the EMA adapters merged into the base, and the run's own weights and EMA are left as they were
    (on a CPU run the copy must be a copy, or the merge would land in the trained weights)."""
    import copy

    from safetensors.torch import load_file

    from densegrpo_fast.trainer import ema_weights, export_policy

    run = setup(cfg_of(tiny_checkpoint, tmp_path / "run"), progress=False)
    with torch.no_grad():  # an EMA apart from the trained adapters, and adapters apart from zero
        for n, p in run.policy.transformer.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
                run.ema[n] += 0.02 * torch.randn_like(run.ema[n])
    live = {k: v.clone() for k, v in run.policy.state_dict().items()}
    ema = {k: v.clone() for k, v in run.ema.items()}
    with ema_weights(run):
        expected = copy.deepcopy(run.policy)
    expected.transformer.fuse_lora()
    expected.transformer.unload_lora()
    path = export_policy(run, tmp_path / "policy_ema.safetensors")
    saved = load_file(path)
    assert saved.keys() == expected.state_dict().keys()
    assert all(torch.equal(saved[k], v.float()) for k, v in expected.state_dict().items())
    assert all(torch.equal(live[k], v) for k, v in run.policy.state_dict().items())
    assert all(torch.equal(ema[k], v) for k, v in run.ema.items())


class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the reads of a tensor's values on the host (.item(), bool(), nonzero, .tolist(), .cpu() ...):
    on a GPU each one waits for all queued work. Reads a GPU run does not make are left out: the kernels'
    argument checks (CPU tensors only) and AdamW's step counter (a CPU tensor on a GPU too)."""

    READS = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "equal", "is_nonzero")
    METHODS = ("tolist", "numpy", "cpu")  # on CPU tensors these never reach the dispatcher
    CPU_ONLY = (os.path.join("kernels", "_common.py"), os.path.join("torch", "optim"))

    def __init__(self):
        super().__init__()
        self.sites: list[str] = []
        self.saved = {}

    def _note(self, what: str) -> None:
        import traceback

        stack = traceback.extract_stack()[:-2]
        if not any(part in f.filename for f in stack for part in self.CPU_ONLY):
            at = next((f for f in reversed(stack) if "densegrpo_fast" in f.filename), stack[-1])
            self.sites.append(f"{what} at {Path(at.filename).name}:{at.lineno}")

    def __enter__(self):
        for name in self.METHODS:
            self.saved[name] = original = getattr(torch.Tensor, name)

            def method(t, *args, _name=name, _original=original, **kwargs):
                self._note(_name)
                return _original(t, *args, **kwargs)

            setattr(torch.Tensor, name, method)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in self.READS:
            self._note(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_update_reads_the_device_a_fixed_number_of_times(tiny_checkpoint, tmp_path):
    """The statistics stay on the device until the update ends (one read), and the schedule's std is
    computed once: an .item() per micro-batch would make the host wait for every backward."""
    from densegrpo_fast.trainer import _advantages, collect, set_window, update

    reads, calls = [], []

    def counted(forward, tag):
        def velocity(*args, **kwargs):
            calls.append(tag)
            return forward(*args, **kwargs)

        return velocity

    for tbs in (8, 2):
        cfg = cfg_of(
            tiny_checkpoint, tmp_path / f"tbs{tbs}", iterations=1, extra=[f"grpo.train_batch_size={tbs}"]
        )
        run = setup(cfg, progress=False)
        set_window(run, 0)
        ro, cond, R, _ = collect(run, run.prompts.sample(cfg.prompts.prompts_per_iteration, 0), 0)
        A = _advantages(run, R)
        run.policy.velocity = counted(run.policy.velocity, tbs)
        with HostReads() as mode:
            update(run, ro, cond, R, 0, A)
        reads.append(mode.sites)
    assert calls.count(2) >= 2 * calls.count(8) > 0  # a quarter of the micro-batch: several times the calls
    # The plan (nonzero of the trained pairs) and the statistics' one copy to the host (.cpu(), then
    # .tolist() of the copy): 3 reads at both sizes.
    assert len(reads[0]) == len(reads[1]) <= 4, reads


def test_weights_move_and_ema_follows(tiny_checkpoint, tmp_path):
    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", iterations=2)
    run = setup(cfg, progress=False)
    before = {n: p.detach().clone() for n, p in run.policy.transformer.named_parameters() if p.requires_grad}
    from densegrpo_fast.trainer import collect, update

    prompts = run.prompts.sample(2, 0)
    ro, cond, R, _ = collect(run, prompts, 0)
    out = update(run, ro, cond, R, 0)
    assert out["grad_norm"] > 0
    after = dict(run.policy.transformer.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before), (
        "an optimizer step must change LoRA weights"
    )
    assert run.opt_steps == 2
    # EMA (decay 0.9, every step) sits between the start and the current weights
    n = next(n for n in before if "lora_B" in n)
    assert not torch.equal(run.ema[n], before[n]) and not torch.equal(run.ema[n], after[n].detach())


def test_kl_target_adapts_the_kl_weight_each_iteration_and_resumes_it(tiny_checkpoint, tmp_path, monkeypatch):
    """PPO's adaptive coefficient: a target far below the KL doubles the weight after every iteration (the
    record holds the weight the iteration trained with) and a resume goes on from the checkpoint's; a target
    far above it halves the weight."""
    from densegrpo_fast.trainer import adapt_beta

    assert adapt_beta(0.04, 1.0, 0.5, 0.04) == 0.08 and adapt_beta(0.04, 0.1, 0.5, 0.04) == 0.02
    assert adapt_beta(0.04, 0.5, 0.5, 0.04) == 0.04 and adapt_beta(0.04, None, 0.5, 0.04) == 0.04
    assert adapt_beta(3.9, 1.0, 0.5, 0.04) == 4.0 and adapt_beta(4e-4, 0.0, 0.5, 0.04) == 4e-4  # (the bounds)
    cfg = lambda n, target: cfg_of(tiny_checkpoint, tmp_path / "run", iterations=n,  # noqa: E731
                                   extra=["grpo.beta=0.04", f"grpo.kl_target={target}"])  # fmt: skip
    train(cfg(2, 1e-12), progress=False)
    train(cfg(3, 1e-12), resume=True, progress=False)
    steps = [r for r in records(tmp_path / "run") if "reward_mean" in r]
    assert all(r["kl"] > 1.5e-12 for r in steps)
    assert [r["beta"] for r in steps] == pytest.approx([0.04, 0.08, 0.16])
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["beta"] == pytest.approx(0.32)
    low = cfg_of(
        tiny_checkpoint, tmp_path / "low", iterations=2, extra=["grpo.beta=0.04", "grpo.kl_target=1e3"]
    )
    from densegrpo_fast import trainer

    used, loss = [], trainer.grpo_loss
    monkeypatch.setattr(trainer, "grpo_loss", lambda *a, **k: used.append(a[5]) or loss(*a, **k))
    train(low, progress=False)
    assert [r["beta"] for r in records(tmp_path / "low") if "reward_mean" in r] == pytest.approx([0.04, 0.02])
    assert sorted(set(used)) == pytest.approx([0.02, 0.04])  # (the loss's weight: the adapted one)
    with pytest.raises(ConfigError, match=r"grpo.kl_target adapts the KL weight from grpo.beta, which is 0"):
        cfg_of(tiny_checkpoint, tmp_path, extra=["grpo.beta=0", "grpo.kl_target=0.01"])


def test_best_of_trains_the_best_and_worst_samples_of_each_group(tiny_checkpoint, tmp_path):
    """grpo.best_of=2 of G = 4: per group the sample with the highest and the one with the lowest final reward
    keep their advantages (the whole group's), the other two get 0 and are not trained."""
    from densegrpo_fast.trainer import _advantages, best_of_rows, collect, update

    final = torch.tensor([0.5, 0.1, 0.9, 0.3, 2.0, 2.0, 1.0, 3.0])
    assert best_of_rows(final, 4, 2).tolist() == [False, True, True, False, False, False, True, True]
    assert best_of_rows(torch.ones(4), 4, 2).tolist() == [True, False, False, True]  # (ties: in row order)
    every = setup(cfg_of(tiny_checkpoint, tmp_path / "all"), progress=False)
    run = setup(cfg_of(tiny_checkpoint, tmp_path / "run", extra=["grpo.best_of=2"]), progress=False)
    ro, cond, R, _ = collect(run, run.prompts.sample(2, 0), 0)
    A, A_every = _advantages(run, R), _advantages(every, R)
    picked = best_of_rows(R[:, -1], 4, 2)
    assert torch.equal(A[picked], A_every[picked]) and (A[~picked] == 0).all() and (A[picked] != 0).any()
    out = update(run, ro, cond, R, 0, A)
    assert out["rows_trained"] == int((A != 0).sum()) <= 2 * 2 * 3  # (2 groups x 2 samples x 3 trained steps)


def test_priority_sampling_sees_every_sample_under_best_of(tiny_checkpoint, tmp_path, monkeypatch):
    """A prompt's priority follows the signal of its whole group, not of the best_of samples it trains."""
    from densegrpo_fast import trainer

    seen, signal = [], trainer.group_signal
    monkeypatch.setattr(trainer, "group_signal", lambda run, A: seen.append(A.clone()) or signal(run, A))
    extra = ["grpo.best_of=2", "prompts.sampling=priority"]
    train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1, extra=extra), progress=False)
    (A,) = seen
    rows = (A != 0).any(1).view(-1, 4).sum(1)  # per group: the samples with a signal
    assert rows.max() > 2, rows  # (best_of=2 alone would leave 2 at most)


def test_best_of_is_checked_against_the_group(tiny_checkpoint, tmp_path):
    for extra, said in [
        (["grpo.best_of=3"], r"grpo.best_of \(3\) must be even and below sampling.group_size \(4\)"),
        (["grpo.best_of=4"], r"grpo.best_of \(4\) must be even and below"),
        (
            ["grpo.best_of=2", "grpo.filter_zero_advantage=false"],
            "grpo.best_of needs grpo.filter_zero_advantage",
        ),
    ]:
        with pytest.raises(ConfigError, match=said):
            cfg_of(tiny_checkpoint, tmp_path, extra=extra)


@pytest.mark.parametrize("warmup", [False, True])
def test_the_ema_decays_as_configured_and_warms_up_as_flow_grpo(tiny_checkpoint, tmp_path, warmup):
    """One optimizer step, then an EMA update: decay 0.5 without the warm-up; min(0.5, 1 / 10) with it
    (Flow-GRPO's (1 + s) / (10 + s) at its step s = 0). A LoRA's B starts at 0, so its EMA is (1 - decay) B."""
    extra = [
        "ema.decay=0.5",
        "ema.every=1",
        "grpo.updates_per_iteration=1",
        f"ema.warmup={str(warmup).lower()}",
    ]
    run = setup(cfg_of(tiny_checkpoint, tmp_path / "run", extra=extra), progress=False)
    from densegrpo_fast.trainer import collect, update

    ro, cond, R, _ = collect(run, run.prompts.sample(2, 0), 0)
    update(run, ro, cond, R, 0)
    assert run.opt_steps == 1
    weights = dict(run.policy.transformer.named_parameters())
    b = [n for n in run.ema if "lora_B" in n]
    assert b and any(weights[n].abs().sum() > 0 for n in b)
    for n in b:
        torch.testing.assert_close(
            run.ema[n], (0.9 if warmup else 0.5) * weights[n].detach(), rtol=1e-6, atol=0
        )


@pytest.mark.parametrize(
    "extra",
    [
        ["dense.mode=sparse"],
        ["dense.mode=dense_baseline", "dense.completion_steps=1"],
        ["noise.window_start=1", "noise.window_size=2", "dense.completion_batching=separate"],
        ["lora.enabled=false", "grpo.beta=0.04"],
        ["model.autocast=null"],
        ["sampling.reward_waves=2", "dense.mode=sparse"],
        [
            "grpo.kl_exact=true"
        ],  # (the old log-probs' recomputation takes no KL: it once asked for the exact one)
    ],
    ids=[
        "sparse",
        "dense_baseline-n1",
        "window-separate",
        "full-finetune",
        "fp32",
        "reward-waves-sparse",
        "kl-exact",
    ],  # fmt: skip
)
def test_variants_run(tiny_checkpoint, tmp_path, extra):
    run_dir = train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1, extra=extra), progress=False)
    (r,) = [r for r in records(run_dir) if "reward_mean" in r]
    assert_on_policy(r, exact=False)
    if "noise.window_start=1" in extra:
        assert r["rows_trained"] == 8 * 2  # only the window's steps train


def test_a_window_with_one_step_completions_scores_the_window_end(tiny_checkpoint, tmp_path, monkeypatch):
    """n = 1 under a window [0, 2) of 4 steps: R_2 is the reward of ODE_1(lat[2]), not the final image's."""
    from densegrpo_fast import trainer
    from densegrpo_fast.dense import latent_rewards

    seen = []

    def spy(decode, reward_fn, clean, prompts, columns, **kw):
        seen.append((clean.clone(), list(columns)))
        return latent_rewards(decode, reward_fn, clean, prompts, columns, **kw)

    monkeypatch.setattr(trainer, "latent_rewards", spy)
    extra = ["noise.window_start=0", "noise.window_size=2", "dense.completion_steps=1"]
    run = setup(cfg_of(tiny_checkpoint, tmp_path / "run", extra=extra), progress=False)
    ro, _, R, _ = trainer.collect(run, run.prompts.sample(2, 0), 0)
    ((clean, columns),) = seen
    assert columns == [0, 1, 2]
    assert not torch.equal(clean[:, 2], ro.latents[:, 4]) and torch.equal(clean[:, 3], ro.latents[:, 4])
    rows = [p for p in run.prompts.sample(2, 0) for _ in range(4)]
    with torch.no_grad():
        for k, lat in ((2, clean[:, 2]), (4, ro.latents[:, 4])):
            torch.testing.assert_close(
                R[:, k], run.reward_fn(run.policy.decode(lat), rows).float(), rtol=0, atol=0
            )


def test_shared_initial_noise_gives_a_group_one_start_and_parts_its_rows_at_the_first_sde_step(
    tiny_checkpoint, tmp_path
):
    """sampling.share_initial_noise under a window from step 1: lat[0] and lat[1] (after the ODE step 0) are
    one latent per group; the SDE step 1 parts the rows; groups start from different draws."""
    from densegrpo_fast import trainer

    extra = ["sampling.share_initial_noise=true", "noise.window_start=1", "noise.window_size=2"]
    run = setup(cfg_of(tiny_checkpoint, tmp_path / "run", extra=extra), progress=False)
    ro, _, R, _ = trainer.collect(run, run.prompts.sample(2, 0), 0)
    lat = ro.latents.view(2, 4, *ro.latents.shape[1:])  # [group, row, step, ...]
    for k in (0, 1):
        assert torch.equal(lat[:, :, k], lat[:, :1, k].expand_as(lat[:, :, k])), k
    assert not torch.equal(lat[0, 0, 0], lat[1, 0, 0])
    assert not torch.equal(lat[:, 0, 2], lat[:, 1, 2])
    torch.testing.assert_close(R[:, 0].view(2, 4), R[::4, 0, None].expand(2, 4), rtol=0, atol=1e-6)
    assert (R[:, 2].view(2, 4).std(1) > 1e-4).all()  # the rewards part with the latents
    # the same configuration without the option: every row its own start
    run = setup(cfg_of(tiny_checkpoint, tmp_path / "own", extra=extra[1:]), progress=False)
    ro, _, _, _ = trainer.collect(run, run.prompts.sample(2, 0), 0)
    assert not torch.equal(ro.latents[0, 0], ro.latents[1, 0])


def test_autocast_samples_rollouts_only(tiny_checkpoint, tmp_path):
    """model.autocast reaches the rollout (its samples differ from fp32 ones), not the update (which
    recomputes the old log-probs: the first ratio is exactly 1, though the rollout's log-probs differ) and
    not the held-out evaluation (its scores equal fp32 ones)."""
    from densegrpo_fast.trainer import collect, heldout_rewards, update

    out = {}
    for mode in ("bf16", "null"):
        extra = [f"model.autocast={mode}", "lora.merge_for_sampling=false"]
        run = setup(cfg_of(tiny_checkpoint, tmp_path / mode, extra=extra), progress=False)
        ev = heldout_rewards(run)
        ro, cond, R, _ = collect(run, run.prompts.sample(2, 0), 0)
        out[mode] = ro.latents, update(run, ro, cond, R, 0), ev
    (lat16, up16, ev16), (lat32, up32, ev32) = out["bf16"], out["null"]
    assert torch.equal(lat16[:, 0], lat32[:, 0])  # same initial noise ...
    assert not torch.allclose(lat16[:, -1], lat32[:, -1], atol=1e-4)  # ... sampled in another precision
    assert (lat16[:, -1] - lat32[:, -1]).abs().max() < 0.2  # ... yet the same model
    # recomputed old log-probs make the first ratio 1 by construction: no check, so none is reported
    assert up16["ratio_dev_first"] is None and up32["ratio_dev_first"] == 0.0
    assert 0 < up16["rollout_lp_dev"] < 1e-3 and "rollout_lp_dev" not in up32
    assert ev16 == ev32


def test_a_rollout_off_the_updates_policy_is_caught_where_the_update_recomputes(
    tiny_checkpoint, tmp_path, monkeypatch
):
    """With bf16 rollouts the update recomputes the old log-probs (its first ratio is 1 by construction), so
    the on-policy check is rollout_lp_dev: a rollout whose noise level is 10 % off the update's shows it about
    250x above bf16 rounding, past ROLLOUT_LP_DEV_LIMIT, and training warns."""
    import dataclasses

    from densegrpo_fast import trainer

    run = setup(cfg_of(tiny_checkpoint, tmp_path / "ok", extra=["model.autocast=bf16"]), progress=False)
    ro, cond, R, _ = trainer.collect(run, run.prompts.sample(2, 0), 0)
    fine = trainer.update(run, ro, cond, R, 0)["rollout_lp_dev"]
    real_sample = trainer.sample

    def off_policy(policy, cond, noise, schedule, **kw):
        return real_sample(
            policy, cond, noise, dataclasses.replace(schedule, noise_level=schedule.noise_level * 1.1), **kw
        )

    monkeypatch.setattr(trainer, "sample", off_policy)
    run = setup(cfg_of(tiny_checkpoint, tmp_path / "off", extra=["model.autocast=bf16"]), progress=False)
    ro, cond, R, _ = trainer.collect(run, run.prompts.sample(2, 0), 0)
    off = trainer.update(run, ro, cond, R, 0)["rollout_lp_dev"]
    assert fine < trainer.ROLLOUT_LP_DEV_LIMIT / 4 and off > 4 * trainer.ROLLOUT_LP_DEV_LIMIT, (fine, off)
    with pytest.warns(UserWarning, match=r"iteration 1: the rollout's log-probs differ .* measurably other"):
        train(
            cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1, extra=["model.autocast=bf16"]),
            progress=False,
        )


def test_merged_lora_sampling_matches_unmerged_and_restores_the_weights(tiny_checkpoint, tmp_path):
    """lora.merge_for_sampling folds trained (non-zero) adapters into temporary weights: the rollout equals
    the unmerged one to fp32 rounding, the base weights come back bit for bit with the adapters on, and the
    update, recomputing the old log-probs, starts at ratio 1 exactly."""
    from densegrpo_fast.trainer import collect, lora_merged, update

    out = {}
    for merge in ("true", "false"):
        extra = ["model.autocast=null", f"lora.merge_for_sampling={merge}"]
        run = setup(cfg_of(tiny_checkpoint, tmp_path / merge, extra=extra), progress=False)
        torch.manual_seed(1)
        with torch.no_grad():  # a trained adapter: LoRA's B starts at zero, which would hide a wrong merge
            for name, p in run.policy.transformer.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
        before = {k: v.clone() for k, v in run.policy.transformer.state_dict().items()}
        x = torch.randn(4, *run.policy.latent_shape)
        cond = run.policy.encode_prompts(["a red circle"] * 4)
        sigma = torch.full((4,), 0.7)
        with torch.no_grad():
            v_plain = run.policy.velocity(x, sigma, cond, 1.5)
            with lora_merged(run):
                v_merged = run.policy.velocity(x, sigma, cond, 1.5)
            run.policy.transformer.disable_adapters()
            v_base = run.policy.velocity(x, sigma, cond, 1.5)
            run.policy.transformer.enable_adapters()
        assert (v_plain - v_base).abs().max() > 1e-2  # the adapters matter at this size
        if merge == "true":
            assert not torch.equal(v_merged, v_plain)  # another rounding: the merge happened ...
            torch.testing.assert_close(v_merged, v_plain, rtol=1e-5, atol=1e-5)  # ... of the right weights
        else:
            assert torch.equal(v_merged, v_plain)  # off: the plain forward
        after = run.policy.transformer.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        ro, cond, R, _ = collect(run, run.prompts.sample(2, 0), 0)
        out[merge] = ro.latents, update(run, ro, cond, R, 0)
    (lat_m, up_m), (lat_p, up_p) = out["true"], out["false"]
    torch.testing.assert_close(lat_m, lat_p, rtol=0, atol=1e-4)
    assert up_m["ratio_dev_first"] is None and up_p["ratio_dev_first"] == 0.0  # (merged: recomputed)
    assert 0 < up_m["rollout_lp_dev"] < 1e-4 and "rollout_lp_dev" not in up_p


def test_autocast_on_a_cpu_without_native_bf16_warns(tiny_checkpoint, tmp_path, monkeypatch):
    from densegrpo_fast import trainer

    monkeypatch.setattr(trainer, "_cpu_has_native", lambda dtype: False)
    with pytest.warns(UserWarning, match="model.autocast=bf16.*emulated.*model.autocast=null"):
        setup(cfg_of(tiny_checkpoint, tmp_path / "run", extra=["model.autocast=bf16"]), progress=False)


def test_learning_rate_schedule():
    from densegrpo_fast.config import OptimSection

    o = OptimSection(lr=1e-3, schedule="cosine", warmup_iterations=3, min_lr_ratio=0.1)
    lrs = [o.lr_at(i, 13) for i in range(14)]
    assert lrs[:3] == pytest.approx([2.5e-4, 5e-4, 7.5e-4])  # linear warm-up, never 0
    assert lrs[3] == pytest.approx(1e-3) and lrs[8] == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    assert lrs[13] == pytest.approx(1e-4) and all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    lin = OptimSection(lr=1e-3, schedule="linear")
    assert [lin.lr_at(i, 4) for i in (0, 2, 4, 9)] == pytest.approx([1e-3, 5e-4, 0.0, 0.0])
    assert OptimSection(lr=1e-3).lr_at(50, 10) == 1e-3


def test_trainer_steps_with_the_scheduled_learning_rate(tiny_checkpoint, tmp_path):
    cfg = cfg_of(
        tiny_checkpoint, tmp_path / "run", iterations=3, extra=["optim.schedule=linear", "optim.lr=1e-3"]
    )
    run_dir = train(cfg, progress=False)
    lrs = [r["lr"] for r in records(run_dir) if "reward_mean" in r]
    assert lrs == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3])
    with pytest.raises(ConfigError, match=r"optim.warmup_iterations \(3\) must be < run.iterations \(3\)"):
        cfg_of(tiny_checkpoint, tmp_path / "bad", iterations=3, extra=["optim.warmup_iterations=3"])


def test_reward_waves_overlap_scoring_with_the_next_rollout(tiny_checkpoint, tmp_path, monkeypatch):
    """With sampling.reward_waves=2 the first wave is scored on the worker thread while the second rolls out,
    and the numbers equal those of scoring each wave in line. Sleeps stand in for a slow model and a slow
    (remote) reward, so the overlap shows whatever the machine's load."""
    import threading

    from densegrpo_fast import trainer

    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", extra=["sampling.reward_waves=2"])
    run = setup(cfg, progress=False)
    spans: dict[str, list] = {"sample": [], "reward": []}
    real_sample, real_reward = trainer.sample, run.reward_fn

    def slow_sample(*args, **kwargs):
        t = time.perf_counter()
        time.sleep(0.3)
        out = real_sample(*args, **kwargs)
        spans["sample"].append((t, time.perf_counter()))
        return out

    def slow_reward(images, prompts):
        t = time.perf_counter()
        time.sleep(0.4)  # one call per wave (all its scored columns together)
        out = real_reward(images, prompts)
        spans["reward"].append((t, time.perf_counter(), threading.current_thread().name))
        return out

    monkeypatch.setattr(trainer, "sample", slow_sample)
    run.reward_fn = slow_reward
    prompts = run.prompts.sample(2, 0)
    trainer.collect(run, prompts, 0, overlap=False)  # warm-up: the first calls pay one-off set-up costs
    spans = {"sample": [], "reward": []}
    t = time.perf_counter()
    ro_a, _, R_a, times = trainer.collect(run, prompts, 0, overlap=True)
    overlapped = time.perf_counter() - t
    (_, s1), first_reward = spans["sample"], spans["reward"][0]
    assert first_reward[2].startswith("reward"), "the first wave is scored on the worker thread"
    assert first_reward[0] < s1[1] and first_reward[1] > s1[0], "its scoring overlaps the second rollout"
    assert times["reward_busy_s"] > times["reward_s"]
    spans = {"sample": [], "reward": []}
    t = time.perf_counter()
    ro_b, _, R_b, _ = trainer.collect(run, prompts, 0, overlap=False)
    in_line = time.perf_counter() - t
    assert torch.equal(R_a, R_b) and torch.equal(ro_a.latents, ro_b.latents)
    assert torch.equal(ro_a.log_probs, ro_b.log_probs) and R_a.shape == (8, 5)
    assert overlapped < in_line - 0.15, (overlapped, in_line)  # ~0.3 s of the ~1.4 s is hidden
    with pytest.raises(
        ConfigError, match=r"sampling.reward_waves \(3\) must be <= prompts.prompts_per_iteration"
    ):
        cfg_of(tiny_checkpoint, tmp_path / "bad", extra=["sampling.reward_waves=3"])


@pytest.mark.gpu
def test_reward_waves_on_a_side_cuda_stream_equal_in_line_scoring(tiny_checkpoint, tmp_path):
    """The GPU path of the waves: each wave's reward runs on a side stream after an event of the rollout's
    stream; the numbers must equal scoring on the rollout's own stream."""
    from densegrpo_fast.trainer import collect

    extra = ["sampling.reward_waves=2", "model.device=cuda", "model.autocast=null"]
    run = setup(cfg_of(tiny_checkpoint, tmp_path / "run", extra=extra), progress=False)
    prompts = run.prompts.sample(2, 0)
    ro_a, _, R_a, _ = collect(run, prompts, 0, overlap=True)
    ro_b, _, R_b, _ = collect(run, prompts, 0, overlap=False)
    assert R_a.is_cuda and torch.equal(R_a, R_b) and torch.equal(ro_a.latents, ro_b.latents)


@pytest.mark.gpu
def test_a_gpu_run_resumes_with_its_ema_on_the_gpu(tiny_checkpoint, tmp_path):
    """checkpoint.pt loads onto the CPU; the resumed EMA must land on the parameters' device (it once stayed
    on the CPU, and the next EMA step failed against CUDA parameters)."""
    extra = ["model.device=cuda", "model.autocast=null"]
    train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1, extra=extra), progress=False)
    run = setup(
        cfg_of(tiny_checkpoint, tmp_path / "run", iterations=2, extra=extra), resume=True, progress=False
    )
    assert run.iteration == 1 and all(t.is_cuda for t in run.ema.values())
    train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=2, extra=extra), resume=True, progress=False)
    assert [r["iteration"] for r in records(tmp_path / "run") if "reward_mean" in r] == [1, 2]


def test_calibrated_noise_is_calibrated_once_and_saved(tiny_checkpoint, tmp_path):
    extra = ["noise.kind=calibrated", "noise.calibration.iterations=3", "noise.calibration.prompts=1"]
    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1, extra=extra)
    run_dir = train(cfg, progress=False)
    psi = json.loads((run_dir / "psi.json").read_text())
    assert len(psi["trajectory"]) == 4 and len(psi["psi"]) == 4
    assert (run_dir / "psi.png").exists()
    for a, b in zip(psi["trajectory"][:-1], psi["trajectory"][1:], strict=True):
        assert all(abs(abs(x - y) - 0.01) < 1e-6 or y in (0.0, 1.5) for x, y in zip(a, b, strict=True))
    # each round's counts are those its move was decided on: up where |gains - losses| < eps1, down elsewhere
    rows = 1 * cfg.sampling.group_size
    assert len(psi["gains"]) == len(psi["losses"]) == 3
    for a, b, pos, neg in zip(
        psi["trajectory"][:-1], psi["trajectory"][1:], psi["gains"], psi["losses"], strict=True
    ):
        for x, y, p, n in zip(a, b, pos, neg, strict=True):
            assert 0 <= p + n <= rows
            if 0.0 < y < 1.5:
                assert (y > x) == (abs(p - n) < 2)
    # the absolute noise scale per step, for the calibrated and the initial psi
    sigmas = torch.tensor(psi["sigmas"])
    want = Schedule(sigmas, torch.tensor(psi["psi"])).std
    torch.testing.assert_close(torch.tensor(psi["std"]), want, rtol=0, atol=0)
    n = cfg.noise  # (the toy config's window: steps 0-2 of 4)
    initial = make_schedule(4, None, n.level, n.window_start, n.window_size, sigmas=sigmas)
    assert psi["std_initial"] == initial.std.tolist()
    assert psi["std_initial"][3] == 0 < min(psi["std_initial"][:3])


def test_a_resumed_run_whose_psi_table_is_gone_keeps_its_psi(tiny_checkpoint, tmp_path, monkeypatch):
    from densegrpo_fast import trainer

    extra = ["noise.kind=calibrated", "noise.calibration.iterations=3", "noise.calibration.prompts=1"]
    run_dir = train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1, extra=extra), progress=False)
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)["psi"]
    (run_dir / "psi.json").unlink()

    def no_calibration(*args, **kwargs):
        raise AssertionError("a resumed run must not calibrate again")

    monkeypatch.setattr(trainer, "calibrate", no_calibration)
    with pytest.warns(UserWarning, match="psi table .* is gone: resuming with the psi the run trained with"):
        run = setup(
            cfg_of(tiny_checkpoint, tmp_path / "run", iterations=2, extra=extra), resume=True, progress=False
        )
    assert torch.equal(run.base_schedule.noise_level.cpu(), saved) and saved.abs().sum() > 0
    # a table calibrated again in between (the calibrate command, a shared path) does not change the run's noise
    (run_dir / "psi.json").write_text(json.dumps({"psi": [1.2, 1.1, 1.0, 0.0], "trajectory": []}))
    with pytest.warns(
        UserWarning, match=r"psi table .* holds psi \[1.2, 1.1, 1.0, 0.0\]: resuming with the psi"
    ):
        run = setup(
            cfg_of(tiny_checkpoint, tmp_path / "run", iterations=2, extra=extra), resume=True, progress=False
        )
    assert torch.equal(run.base_schedule.noise_level.cpu(), saved)
    # a table made for another window (a shared path calibrated again) cannot even be read for this run
    other = {"psi": [0, 0, 1.0, 1.0], "trajectory": [], "calibrated_steps": [2, 3]}
    (run_dir / "psi.json").write_text(json.dumps(other))
    with pytest.warns(
        UserWarning, match="now holds a table for another grid, window or SDE: resuming with the psi"
    ):
        run = setup(
            cfg_of(tiny_checkpoint, tmp_path / "run", iterations=2, extra=extra), resume=True, progress=False
        )
    assert torch.equal(run.base_schedule.noise_level.cpu(), saved)


def test_a_psi_table_calibrated_for_another_window_is_refused(tiny_checkpoint, tmp_path):
    cal = ["noise.kind=calibrated", "noise.calibration.iterations=1", "noise.calibration.prompts=1"]
    extra = [*cal, "noise.window_start=0", "noise.window_size=2"]
    run_dir = train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1, extra=extra), progress=False)
    table = run_dir / "psi.json"
    assert json.loads(table.read_text())["calibrated_steps"] == [0, 1]
    # shared through noise.calibration.path, it still serves its own window (as on resume) ...
    shared = [*extra, f"noise.calibration.path={table}"]
    setup(cfg_of(tiny_checkpoint, tmp_path / "run2", extra=shared), progress=False)
    # ... but a moved window would get no noise and train nothing: refused before any training
    moved = [*cal, "noise.window_start=2", "noise.window_size=2", f"noise.calibration.path={table}"]
    with pytest.raises(ValueError, match=r"calibrated for steps \[0, 1\].*needs steps \[2, 3\]"):
        setup(cfg_of(tiny_checkpoint, tmp_path / "run3", extra=moved), progress=False)
    # ... and so would another sigma grid: psi balanced its steps' gains and losses on its own
    regrid = [*shared, "sampling.shift=3.0"]
    with pytest.raises(
        ValueError, match=r"calibrated on the sigma grid \[1.0, .*but this run samples on \[1.0, 0.8577"
    ):
        setup(cfg_of(tiny_checkpoint, tmp_path / "run5", extra=regrid), progress=False)
    # an older table without the record is judged by the steps it gives noise
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"psi": [0.7, 0.7, 0.0, 0.0], "trajectory": []}))
    wider = [*cal, "noise.window_start=1", "noise.window_size=2", f"noise.calibration.path={old}"]
    with pytest.raises(ValueError, match=r"needs steps \[2\]"):
        setup(cfg_of(tiny_checkpoint, tmp_path / "run4", extra=wider), progress=False)


@pytest.mark.parametrize(
    "sde, kl",
    [("flow_grpo", []), ("cps", []), ("flow_grpo", ["grpo.beta=0.5", "grpo.kl_exact=true"])],
    ids=["flow_grpo", "cps", "flow_grpo-exact-kl"],
)
def test_ratio_norm_steps_with_grpo_guards_gradient(sde, kl, tiny_checkpoint, tmp_path, monkeypatch):
    """grpo.ratio_norm with step_weight=inverse_dt, computed here independently for each of three optimizer
    steps: the gradient of -mean over the step's pairs of A w exp(mean_i[(x' - mean_old)_i (mean_new -
    mean_old)_i] / S) (RatioNorm's log-ratio in closed form: mean_old from the weights before the update,
    mean_new from those of the step, S the pair's noise std, w = 1 / |dt|; float64 from the reference step's
    means), plus beta times the exact KL to the base model's step. A bias left out, a scale or weight of
    the wrong step, in the first optimizer step or a later one, or old velocities of the wrong chunk or
    taken after the first step fail it."""
    from densegrpo_fast.dense import advantages
    from densegrpo_fast.kernels import sde_step_reference
    from densegrpo_fast.trainer import _seed, collect, update

    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", extra=[
        "grpo.ratio_norm=true", "grpo.step_weight=inverse_dt", f"noise.sde={sde}", "grpo.beta=0",
        "grpo.clip_range=10", "grpo.train_batch_size=3", "grpo.updates_per_iteration=3", "optim.grad_clip=1e9",
        "optim.lr=0.01", "model.autocast=null", "lora.merge_for_sampling=false", *kl,
    ])  # fmt: skip
    run = setup(cfg, progress=False)
    ro, cond, R, _ = collect(run, run.prompts.sample(2, 0), 0)
    d, sched = cfg.dense, run.schedule
    A = advantages(R, cfg.sampling.group_size, d.mode, run.trained, global_std=d.global_std, eps=d.adv_eps,
                   clip=d.adv_clip)  # fmt: skip
    rows, steps = (run.trained[None, :] & (A != 0)).nonzero(as_tuple=True)  # the update's plan, written out
    order = torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(_seed(cfg, 0, 2)))
    chunks = list(zip(rows[order].tensor_split(3), steps[order].tensor_split(3), strict=True))
    assert min(i.numel() for i, _ in chunks) > 3  # (several micro-batches in each optimizer step)
    params = {n: p for n, p in run.policy.transformer.named_parameters() if p.requires_grad}
    weights, grads = (
        [{n: p.detach().clone() for n, p in params.items()}],
        [],
    )  # before each step; its gradient
    real_step = run.optimizer.step

    def step(*args, **kwargs):
        grads.append({n: p.grad.detach().clone() for n, p in params.items()})
        out = real_step(*args, **kwargs)
        weights.append({n: p.detach().clone() for n, p in params.items()})
        return out

    monkeypatch.setattr(run.optimizer, "step", step)
    update(run, ro, cond, R, 0)
    assert len(grads) == 3

    def velocity(w, i, k):  # of the pairs (i, k) under the trained weights w
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(w[n])
        return run.policy.velocity(
            ro.latents[i, k], sched.sigmas[k], cond.index(i), cfg.sampling.guidance_scale
        )

    def mean_of(v, i, k):  # float64, the reference step without noise
        x, s, sn, std = (
            t.double() for t in (ro.latents[i, k], sched.sigmas[k], sched.sigmas[k + 1], sched.std[k])
        )
        return sde_step_reference(x, v.double(), s, sn, std, torch.zeros_like(x), cps=sched.cps)[0]

    for c, (i, k) in enumerate(chunks):
        with torch.no_grad():
            mean_old = mean_of(velocity(weights[0], i, k), i, k)
            run.policy.transformer.disable_adapters()
            mean_ref = mean_of(velocity(weights[c], i, k), i, k)
            run.policy.transformer.enable_adapters()
        mean_new = mean_of(velocity(weights[c], i, k), i, k)
        xn, sigma, sigma_next = ro.latents[i, k + 1], sched.sigmas[k], sched.sigmas[k + 1]
        S = sched.step_std[k].double()
        log_ratio = ((xn.double() - mean_old) * (mean_new - mean_old)).flatten(1).mean(1) / S
        w = 1.0 / (sigma - sigma_next).double()
        loss = -(A[i, k].double() * w * torch.exp(log_ratio)).mean()
        loss = loss + cfg.grpo.beta * ((mean_new - mean_ref).square().flatten(1).mean(1) / (2 * S * S)).mean()
        want = torch.autograd.grad(loss, list(params.values()))
        g_want = torch.cat([g.flatten() for g in want]).float()
        g_got = torch.cat([grads[c][n].flatten() for n in params])
        assert g_want.norm() > 0
        assert (g_got - g_want).norm() <= 1e-4 * g_want.norm(), (c, (g_got - g_want).norm(), g_want.norm())


def test_cps_trains_on_policy_and_calibrates_eta(tiny_checkpoint, tmp_path):
    """noise.sde=cps over every step: the rollout takes the CPS step (the grid's last step is the Euler step,
    log-prob 0, and the steps before it are CPS's own), the update recomputes those log-probs (the first ratio
    is 1: the flag reaches both), the steps before the last two train (step T - 2's noise is near 0),
    calibration moves eta and leaves the last step out, a later CPS run reads the table and a flow_grpo run
    refuses it."""
    from densegrpo_fast import trainer
    from densegrpo_fast.kernels import cps_std, sde_step

    cal = ["noise.kind=calibrated", "noise.calibration.iterations=3", "noise.calibration.prompts=1",
           "noise.window_start=null", "noise.window_size=null", "lora.merge_for_sampling=false",
           "model.autocast=null"]  # fmt: skip
    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", iterations=2, extra=[*cal, "noise.sde=cps"])
    run = setup(cfg, progress=False)
    table = json.loads((tmp_path / "run" / "psi.json").read_text())
    assert table["sde"] == "cps" and table["calibrated_steps"] == [0, 1, 2]
    assert table["psi"][3] == pytest.approx(0.7, abs=1e-7)  # (the level, never moved)
    for a, b in zip(table["trajectory"][:-1], table["trajectory"][1:], strict=True):  # eta moves by eps2
        assert [abs(y - x) for x, y in zip(a, b, strict=True)] == pytest.approx([0.01] * 3 + [0], abs=1e-6)
    sched = run.schedule
    assert sched.cps and sched.sde_steps.tolist() == [True, True, True, False]
    torch.testing.assert_close(sched.std, cps_std(sched.sigmas[1:], sched.noise_level), rtol=0, atol=0)
    ro, cond, R, _ = trainer.collect(run, run.prompts.sample(2, 0), 0)
    assert (ro.log_probs[:, :3] != 0).all() and (ro.log_probs[:, 3] == 0).all()
    # step 1's noise, read back from the stored latents through CPS's mean and std, is unit Gaussian noise
    # (a rollout that took Flow-GRPO's step with these values fails this)
    B = ro.latents.shape[0]
    x = ro.latents[:, 1]
    with torch.no_grad():
        v = run.policy.velocity(x, sched.sigmas[1], cond, cfg.sampling.guidance_scale)
    rows = lambda t: t.expand(B).contiguous()  # noqa: E731
    mean, _, _ = sde_step(x, v, rows(sched.sigmas[1]), rows(sched.sigmas[2]), rows(sched.std[1]),
                          torch.zeros_like(x), cps=True)  # fmt: skip
    eps = (ro.latents[:, 2] - mean) / sched.std[1]
    m, sd = eps.mean().item(), eps.std().item()
    assert abs(m) < 0.1 and abs(sd - 1) < 0.1, (m, sd)
    assert run.trained.tolist() == [True, True, False, False]  # (step 2's noise is sigma[3] sin(eta pi / 2))
    record = trainer.update(run, ro, cond, R, 0)
    assert_on_policy(record)
    # one optimizer step later the ratios stay near 1 (3.6e-4; with step 2 trained, 0.73: its log-ratio swings
    # as 1 / std)
    assert record["ratio_dev_max"] < 1e-2
    # the table's noise scale is CPS's, sigma_next sin(eta pi / 2)
    want = cps_std(torch.tensor(table["sigmas"][1:]), torch.tensor(table["psi"]))
    torch.testing.assert_close(torch.tensor(table["std"]), want, rtol=0, atol=0)
    # a later CPS run reads the table (its last step was never calibrated, and need not be) ...
    path = tmp_path / "run" / "psi.json"
    shared = [*cal, "noise.sde=cps", f"noise.calibration.path={path}"]
    again = setup(cfg_of(tiny_checkpoint, tmp_path / "run3", extra=shared), progress=False)
    assert torch.equal(again.base_schedule.noise_level.cpu(), torch.tensor(table["psi"]))
    # ... and a flow_grpo run refuses it: there it would mean other noise
    other = [*cal, f"noise.calibration.path={path}"]
    with pytest.raises(
        ValueError, match="calibrated for noise.sde=cps, this run samples with noise.sde=flow_grpo"
    ):
        setup(cfg_of(tiny_checkpoint, tmp_path / "run2", extra=other), progress=False)


def test_calibration_counts_on_exact_completions_whatever_n_the_run_trains_with(tiny_checkpoint, tmp_path):
    """An n-step dR drifts one way even on a step without noise, which Algorithm 1 would read as imbalance
    (ALGORITHM.md §5): psi is calibrated on n = remaining steps for every dense.completion_steps."""
    extra = ["noise.kind=calibrated", "noise.calibration.iterations=3", "noise.calibration.prompts=2"]
    tables = []
    for n in ("null", "1", "2"):
        setup(
            cfg_of(tiny_checkpoint, tmp_path / n, extra=[*extra, f"dense.completion_steps={n}"]),
            progress=False,
        )
        tables.append(json.loads((tmp_path / n / "psi.json").read_text()))
    for t in tables:
        assert t["completion_steps"] is None
        assert (t["gains"], t["losses"], t["trajectory"]) == (
            tables[0]["gains"],
            tables[0]["losses"],
            tables[0]["trajectory"],
        )


def test_a_psi_table_calibrated_for_another_policy_or_reward_warns(tiny_checkpoint, tmp_path):
    """A shared table (noise.calibration.path) records what it balanced: the same run reads it silently, one
    with other guidance or another reward is told so."""
    table = tmp_path / "psi.json"
    extra = ["noise.kind=calibrated", "noise.calibration.iterations=2", f"noise.calibration.path={table}"]
    setup(cfg_of(tiny_checkpoint, tmp_path / "a", extra=extra), progress=False)
    assert json.loads(table.read_text())["calibrated_for"]["reward"] == {"name": "redness", "kwargs": {}}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        setup(cfg_of(tiny_checkpoint, tmp_path / "b", extra=extra), progress=False)
        record = json.loads(table.read_text())  # an earlier version's record, without dtype and resolution:
        for key in ("dtype", "resolution"):  # only what it holds is compared
            del record["calibrated_for"][key]
        table.write_text(json.dumps(record))
        setup(cfg_of(tiny_checkpoint, tmp_path / "b2", extra=extra), progress=False)
    other = [*extra, "sampling.guidance_scale=2.0", "reward.name=toy_geneval", "reward.kwargs={mode: strict}"]
    from densegrpo_fast.calibration import calibrated_for

    served = ["reward.name=remote", "reward.kwargs={url: 'http://127.0.0.1:1', timeout_s: 5, check: false}"]
    assert calibrated_for(cfg_of(tiny_checkpoint, tmp_path, extra=served))["reward"] == {
        "name": "remote",
        "kwargs": {},
    }
    with pytest.warns(UserWarning, match=r"calibrated for another run \(guidance_scale: 1.5 -> 2.0; reward: "
                                         r"\{'name': 'redness', 'kwargs': \{\}\} -> \{'name': 'toy_geneval'"):  # fmt: skip
        setup(cfg_of(tiny_checkpoint, tmp_path / "c", extra=other), progress=False)


def test_cps_calibration_bounds_eta_by_1(tiny_checkpoint, tmp_path, monkeypatch):
    """Balanced every round (stubbed counts), psi rises by eps2 and stops at 1 under CPS, whatever psi_max."""
    from densegrpo_fast import calibration

    monkeypatch.setattr(calibration, "balance_counts", lambda dR: (torch.zeros(dR.shape[1]),) * 2)
    extra = ["noise.kind=calibrated", "noise.calibration.iterations=3", "noise.calibration.prompts=1",
             "noise.sde=cps", "noise.level=0.98", "noise.calibration.psi_max=1.5"]  # fmt: skip
    setup(cfg_of(tiny_checkpoint, tmp_path / "run", extra=extra), progress=False)
    table = json.loads((tmp_path / "run" / "psi.json").read_text())
    got = [p for row in table["trajectory"] for p in row[:3]]
    assert got == pytest.approx([0.98] * 3 + [0.99] * 3 + [1.0] * 6, abs=1e-6)


def test_cps_config_rules(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"noise.level \(1.2\) must be <= 1 with noise.sde=cps"):
        cfg_of(tiny_checkpoint, tmp_path, extra=["noise.sde=cps", "noise.level=1.2"])
    with pytest.raises(
        ConfigError, match=r"noise.calibration.psi_min \(1.1\) must be <= 1 with noise.sde=cps"
    ):
        cfg_of(tiny_checkpoint, tmp_path, extra=["noise.sde=cps", "noise.calibration.psi_min=1.1"])
    with pytest.raises(ConfigError, match=r"grpo.trained_steps contains the grid's last step 3"):
        cfg_of(tiny_checkpoint, tmp_path, extra=["noise.sde=cps", "grpo.trained_steps=[2,3]"])
    cfg_of(
        tiny_checkpoint,
        tmp_path,
        extra=["noise.sde=flow_grpo", "noise.level=1.2", "grpo.trained_steps=[2,3]"],
    )
    # by default CPS trains every step with noise but the last one, as Flow-GRPO: steps 0 to T - 3
    assert cfg_of(tiny_checkpoint, tmp_path, extra=["noise.sde=cps"]).trained_steps() == [0, 1]
    assert cfg_of(tiny_checkpoint, tmp_path).trained_steps() == [0, 1, 2]
    assert cfg_of(
        tiny_checkpoint, tmp_path, extra=["noise.sde=cps", "grpo.trained_steps=[2]"]
    ).trained_steps() == [2]
    for sde, start in (("cps", 2), ("flow_grpo", 3)):
        with pytest.raises(ConfigError, match=r"the window holds only steps that grpo.trained_steps null"):
            cfg_of(tiny_checkpoint, tmp_path, extra=[f"noise.sde={sde}", f"noise.window_start={start}",
                                                    f"noise.window_size={4 - start}"])  # fmt: skip
    cfg_of(
        tiny_checkpoint,
        tmp_path,
        extra=["noise.sde=flow_grpo", "noise.window_start=2", "noise.window_size=2"],
    )
    two = ["sampling.num_steps=2", "noise.window_start=null", "noise.window_size=null"]
    with pytest.raises(ConfigError, match=r"sampling.num_steps=2 under noise.sde=cps leaves no step"):
        cfg_of(tiny_checkpoint, tmp_path, extra=["noise.sde=cps", *two])
    assert cfg_of(tiny_checkpoint, tmp_path, extra=two).trained_steps() == [0]


def test_moving_window_calibrates_every_step_and_moves_each_iteration(tiny_checkpoint, tmp_path):
    extra = ["noise.kind=calibrated", "noise.calibration.iterations=2", "noise.calibration.prompts=1",
             "noise.window_start=0", "noise.window_size=2", "noise.window_move=sliding", "grpo.trained_steps=[0,1,2,3]"]  # fmt: skip
    run_dir = train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=3, extra=extra), progress=False)
    psi = json.loads((run_dir / "psi.json").read_text())["psi"]
    assert all(p > 0 for p in psi)  # calibrated over every step, not only the first window's
    steps = [r for r in records(run_dir) if "reward_mean" in r]
    assert [r["window_start"] for r in steps] == [0, 1, 2]
    for r in steps:
        assert_on_policy(r, exact=False)
        assert r["rows_trained"] == 8 * 2  # the window's two steps, wherever it is
        k = r["window_start"]
        # outside the window every step is an ODE step: no reward gain there
        assert all(d == 0 for j, d in enumerate(r["dR_mean"]) if not k <= j < k + 2)
    # a table calibrated for a fixed window has steps without noise: a moving window refuses it
    bad = tmp_path / "psi_fixed.json"
    bad.write_text(json.dumps({"psi": [0.7, 0.7, 0.0, 0.0], "trajectory": []}))
    cfg = cfg_of(tiny_checkpoint, tmp_path / "run2", extra=[*extra, f"noise.calibration.path={bad}"])
    with pytest.raises(ValueError, match=r"window_move=sliding .* needs steps \[2, 3\]"):
        setup(cfg, progress=False)
    with pytest.raises(ConfigError, match="window_move=random needs a window"):
        load_config(
            TrainConfig,
            CONFIG,
            ["noise.window_move=random", "noise.window_start=null", "noise.window_size=null"],
        )


def test_moving_window_skips_starts_that_train_nothing(tiny_checkpoint, tmp_path, capsys):
    """Size 1 over 4 steps: the grid's last step is not trained by default, so the window never starts
    there (it would roll out and train nothing) and says so once."""
    extra = ["noise.window_start=1", "noise.window_size=1", "noise.window_move=sliding"]
    run_dir = train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=4, extra=extra), progress=False)
    steps = [r for r in records(run_dir) if "reward_mean" in r]
    assert [r["window_start"] for r in steps] == [1, 2, 0, 1]
    assert all(r["rows_trained"] == 8 for r in steps)
    out = capsys.readouterr().out
    assert out.count("the window skips the starts [3]") == 1 and "takes the starts [0, 1, 2]" in out


def test_a_resume_against_servers_hosting_other_kwargs_warns(tiny_checkpoint, tmp_path):
    """A resume may take a served reward at another url (a restarted server); the checkpoint records what the
    servers host (their /health, with a digest of their --kwargs), so a resume against a server started with
    other --kwargs warns, and one against a server started as before does not."""
    from densegrpo_fast.rewards import build_reward
    from densegrpo_fast.rewards.server import RewardServer

    servers = [
        RewardServer(build_reward("redness"), name="redness", kwargs=kw).start() for kw in ({}, {}, {"x": 1})
    ]
    try:
        extra = lambda url: [
            "reward.name=remote",
            f"reward.kwargs={{url: '{url}'}}",
            "optim.schedule=constant",
        ]  # noqa: E731
        cfg = lambda url, n: cfg_of(tiny_checkpoint, tmp_path / "run", iterations=n, extra=extra(url))  # noqa: E731
        train(cfg(servers[0].url, 1), progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            train(cfg(servers[1].url, 2), resume=True, progress=False)  # (the same reward at another url)
        with pytest.warns(
            UserWarning, match=r"the reward servers host .*'kwargs_digest'.* may not mean what it"
        ):
            train(cfg(servers[2].url, 3), resume=True, progress=False)
        assert [r["iteration"] for r in records(tmp_path / "run") if "reward_mean" in r] == [1, 2, 3]
    finally:
        for s in servers:
            s.stop()
    with pytest.raises(
        ValueError, match=r"it may change only .*, and a reward's url, timeouts, batch sizes and concurrency"
    ):
        train(
            cfg_of(tiny_checkpoint, tmp_path / "run", iterations=4, extra=["sampling.group_size=2"]),
            resume=True,
        )


def test_a_resume_whose_base_model_file_holds_other_weights_warns(tiny_checkpoint, tmp_path):
    """The checkpoint records a digest of the model as loaded (before any adapter): the same file resumes
    silently, one rewritten at the same path with other weights (a replaced directory, another hub revision)
    warns."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = tmp_path / "base.safetensors"
    shutil.copy(tiny_checkpoint, base)
    cfg = lambda n: cfg_of(base, tmp_path / "run", iterations=n, extra=["optim.schedule=constant"])  # noqa: E731
    train(cfg(1), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        train(cfg(2), resume=True, progress=False)
    weights = load_file(str(base))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3  # one tensor, slightly
    save_file(weights, str(base), metadata=safe_metadata(tiny_checkpoint))
    with pytest.warns(UserWarning, match=r"model.checkpoint=.*base.safetensors' holds other weights than when the "
                                         r"run wrote its checkpoint .*restore the files"):  # fmt: skip
        train(cfg(3), resume=True, progress=False)


def safe_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_a_resume_may_move_an_eval_reward_but_not_change_what_it_scores(tiny_checkpoint, tmp_path):
    from densegrpo_fast.config import dump_config
    from densegrpo_fast.trainer import _check_same_run

    judge = (
        "eval.rewards={j: {name: vlm_judge, kwargs: {url: '%s', model: m, concurrency: %d, check: false}}}"
    )
    dump_config(
        cfg_of(tiny_checkpoint, tmp_path, extra=[judge % ("http://a:1/v1", 4)]), tmp_path / "config.yaml"
    )
    _check_same_run(
        cfg_of(tiny_checkpoint, tmp_path, extra=[judge % ("http://b:2/v1", 16)]), tmp_path / "config.yaml"
    )
    other = judge.replace("model: m", "model: other") % ("http://a:1/v1", 4)
    with pytest.raises(ValueError, match=r"eval.rewards: .*'model': 'm'.* -> .*'model': 'other'"):
        _check_same_run(cfg_of(tiny_checkpoint, tmp_path, extra=[other]), tmp_path / "config.yaml")


def test_a_resume_below_the_reached_iteration_is_refused_untouched(tiny_checkpoint, tmp_path):
    run_dir = train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=2), progress=False)
    saved = (run_dir / "config.yaml").read_text()
    with pytest.raises(
        ValueError, match=r"has trained 2 iterations, more than run.iterations=1 .*give at least 3"
    ):
        train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1), resume=True, progress=False)
    assert (run_dir / "config.yaml").read_text() == saved  # (not rewritten with run.iterations 1)


def test_a_mistyped_lora_target_is_named_before_the_calibration(tiny_checkpoint, tmp_path):
    """None of the targets matching is refused before the calibration (peft refused it after); one of several
    missing is a warning (peft leaves it out: one list serves models whose blocks differ)."""
    extra = ["lora.target_modules=[attn.to_qq, attn.to_kk]", "noise.kind=calibrated"]
    with pytest.raises(
        ValueError,
        match=r"lora.target_modules \['attn.to_qq', 'attn.to_kk'\] match no module of the toy .*attn.to_q.*no adapter would train",
    ):
        setup(cfg_of(tiny_checkpoint, tmp_path / "run", extra=extra), progress=False)
    assert not (tmp_path / "run" / "psi.json").exists()
    extra = ["lora.target_modules=[attn.to_q, attn.to_qq]"]
    with pytest.warns(
        UserWarning, match=r"\['attn.to_qq'\] match no module .*they get no adapter; check their spelling"
    ):
        run = setup(cfg_of(tiny_checkpoint, tmp_path / "run2", extra=extra), progress=False)
    assert any("lora" in n for n, p in run.policy.transformer.named_parameters() if p.requires_grad)


def test_a_run_or_evaluation_directory_in_use_by_another_process_is_refused(tiny_checkpoint, tmp_path):
    """Two jobs writing one directory interleave their files: the second is refused while the first holds
    the directory's lock, and goes on once that process ends (the kernel drops the lock, however it ends)."""
    from densegrpo_fast.evaluate import evaluate
    from densegrpo_fast.rewards import build_reward
    from densegrpo_fast.schedule import sigma_grid

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from densegrpo_fast.checkpoint import "
         "lock_dir; [lock_dir(Path(d), 'job') for d in sys.argv[1:]]; print('held', flush=True); time.sleep(60)",
         str(tmp_path / "run"), str(tmp_path / "ev")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            ValueError, match=rf"run is in use by another training run \(process {holder.pid}"
        ):
            train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1), progress=False)
        policy = ToyPolicy.load(tiny_checkpoint)
        with pytest.raises(ValueError, match=r"ev is in use by another evaluation"):
            evaluate(policy, ["a red circle"], {"r": build_reward("redness")}, sigma_grid(2, 1.0), guidance_scale=1.0,
                     output_dir=tmp_path / "ev", progress=False)  # fmt: skip
    finally:
        holder.kill()
        holder.wait()
    train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1), progress=False)
    train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=2), resume=True, progress=False)  # (let go)


def test_a_run_ended_by_its_time_budget_says_so_and_an_ema_never_updated_warns(
    tiny_checkpoint, tmp_path, capsys
):
    extra = ["run.time_budget_s=0.001", "ema.every=100"]  # (the first iteration uses up the budget)
    with pytest.warns(
        UserWarning, match=r"the EMA never updated: .*ema.every=100 optimizer steps, and the run made 2"
    ):
        train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=5, extra=extra), progress=False)
    assert "stopped by run.time_budget_s=0.001: 1 of 5 iterations in" in capsys.readouterr().out


def test_calibration_step_follows_algorithm_1():
    psi = torch.tensor([0.7, 0.7, 0.7, 0.0])
    dR = torch.tensor(
        [[1.0, 1.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]]
    )
    active = torch.tensor([True, True, True, False])
    out = calibration_step(psi, dR, eps1=2, eps2=0.01, psi_min=0.0, psi_max=1.5, active=active)
    # step 0: 2 gains, 2 losses -> balanced -> up; step 1: 3 gains, 0 losses -> down;
    # step 2: all dR == 0 count on neither side -> balanced -> up; step 3: outside the window -> unchanged
    torch.testing.assert_close(out, torch.tensor([0.71, 0.69, 0.71, 0.0]))
    # 70 rounds down from 0.7 reach psi_min exactly (fp32 steps of 0.01 alone would leave 3.7e-7: a step
    # with a vanishing std, trained on log-probs that are rounding noise), and 80 up reach psi_max
    down, up = torch.tensor([0.7]), torch.tensor([0.7])
    for _ in range(70):
        down = calibration_step(down, torch.ones(3, 1), 2, 0.01, 0.0, 1.5, torch.tensor([True]))
    for _ in range(80):
        up = calibration_step(up, torch.zeros(3, 1), 2, 0.01, 0.0, 1.5, torch.tensor([True]))
    assert down.item() == 0.0 and up.item() == 1.5


def test_calibration_notes_a_balance_test_that_chance_alone_fails():
    """Symmetric continuous dR over the SD3.5 recipes' 1152 rows: |#gains - #losses| < 2 in about 2 % of the
    rounds, so psi only falls (a note says so); the toy's 0/1 rewards at 32 rows (many dR = 0) meet it often."""
    from densegrpo_fast.calibration import balance_counts, balance_note

    def counts(dR_rounds):
        pairs = [balance_counts(dR) for dR in dR_rounds]
        return [p.tolist() for p, _ in pairs], [n.tolist() for _, n in pairs]

    g = torch.Generator().manual_seed(0)
    wide = counts([torch.randn(1152, 3, generator=g) for _ in range(20)])
    note = balance_note(*wide, eps1=2, steps=[0, 1, 2], rows=1152)
    assert note is not None and "sqrt(1152) = 34" in note and "noise.calibration.eps1" in note
    toy = counts([torch.randint(-1, 2, (32, 3), generator=g).float() * (torch.rand(32, 3, generator=g) < 0.2)
                  for _ in range(20)])  # fmt: skip
    assert balance_note(*toy, eps1=2, steps=[0, 1, 2], rows=32) is None
    assert balance_note(*wide, eps1=80, steps=[0, 1, 2], rows=1152) is None  # (eps1 at the chance scale)


def test_psi_tables_that_leave_a_step_without_noise_or_came_from_other_completions_warn(
    tiny_checkpoint, tmp_path
):
    table = tmp_path / "psi.json"
    table.write_text(
        json.dumps({"psi": [0.7, 0.0, 0.6, 0.0], "trajectory": [], "calibrated_steps": [0, 1, 2]})
    )
    extra = [
        "noise.kind=calibrated",
        "noise.window_start=0",
        "noise.window_size=3",
        f"noise.calibration.path={table}",
    ]
    with pytest.warns(UserWarning, match=r"calibrated psi is 0 at steps \[1\] .*calibration.psi_min above 0"):
        setup(cfg_of(tiny_checkpoint, tmp_path / "run", extra=extra), progress=False)
    other = tmp_path / "psi_n1.json"
    other.write_text(json.dumps({"psi": [0.7, 0.6, 0.6, 0.0], "trajectory": [], "calibrated_steps": [0, 1, 2],
                                 "completion_steps": 1}))  # fmt: skip
    extra[-1] = f"noise.calibration.path={other}"
    with pytest.warns(UserWarning, match=r"calibrated with dense.completion_steps=1 by an older version"):
        setup(cfg_of(tiny_checkpoint, tmp_path / "run2", extra=extra), progress=False)


def test_an_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    from densegrpo_fast.checkpoint import write_atomic, write_text_atomic

    path = tmp_path / "psi.json"
    write_text_atomic(path, "old")

    def full_disk(tmp):
        tmp.write_text("half of the n")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, full_disk)
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]  # (and no tmp file)
    other = tmp_path / "psi.json.1.tmp"  # another job's write of the same path, in progress: untouched
    other.write_text("another job's")
    write_text_atomic(path, "new")
    assert path.read_text() == "new" and other.read_text() == "another job's"


def test_existing_run_needs_resume(tiny_checkpoint, tmp_path, monkeypatch):
    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1)
    train(cfg, progress=False)
    with pytest.raises(ValueError, match="already holds a run.*--resume"):
        train(cfg, progress=False)
    other = cfg_of(tiny_checkpoint, tmp_path / "run", iterations=2, extra=["grpo.beta=0.5", "optim.lr=0.001"])
    with pytest.raises(
        ValueError,
        match=r"config.yaml\): grpo.beta: 0.04 -> 0.5; optim.lr: 0.0003 -> 0.001\. Resume",
    ):
        train(other, resume=True, progress=False)
    # what only says how long and where the run goes may change: its directory by another path, a time budget
    # (a run stopped by its budget is extended), checkpoints, logs, threads; and the rows per call
    monkeypatch.chdir(tmp_path)
    moved = Path("run")  # (the run was started with an absolute path)
    extended = ["run.time_budget_s=600", "run.checkpoint_every=5", "run.eval_every=1", "model.num_threads=2",
                "sampling.max_rows_per_call=5", "grpo.train_batch_size=3", "eval.batch_size=5"]  # fmt: skip
    with pytest.warns(
        UserWarning, match=r"run.iterations 1 -> 2 with optim.schedule=cosine: .*decay now ends at"
    ):
        train(cfg_of(tiny_checkpoint, moved, iterations=2, extra=extended), resume=True, progress=False)
    assert [r["iteration"] for r in records(tmp_path / "run") if "reward_mean" in r] == [1, 2]


def test_resume_of_a_directory_without_a_run_says_so(tiny_checkpoint, tmp_path):
    with pytest.warns(UserWarning, match=r"--resume: .*nowhere holds no run .*a new run starts there"):
        setup(cfg_of(tiny_checkpoint, tmp_path / "nowhere", iterations=1), resume=True, progress=False)
    train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1), progress=False)
    (tmp_path / "run" / "config.yaml").unlink()
    with pytest.warns(
        UserWarning, match="has a checkpoint but no config.yaml: the run goes on without the check"
    ):
        run = setup(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=2), resume=True, progress=False)
    assert run.iteration == 1


def test_resume_after_sigkill_matches_an_uninterrupted_run(tiny_checkpoint, tmp_path):
    iterations = 24
    common = tiny_overrides(
        tiny_checkpoint,
        tmp_path / "a",
        iterations,
        extra=["run.checkpoint_every=3", "run.sample_grid_every=0", "optim.schedule=cosine",
               "optim.warmup_iterations=2"],  # the lr follows the iteration: no scheduler state to restore
    )  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "densegrpo_fast", "train", "--config", str(CONFIG), "--no-progress"]
    killed = subprocess.Popen(cmd + common, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "a" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if (
            metrics.exists()
            and sum(1 for ln in metrics.read_text().splitlines() if '"reward_mean"' in ln) >= 7
        ):
            break
        if killed.poll() is not None:
            pytest.fail(f"training ended before it could be killed: {killed.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert len(records(tmp_path / "a")) < iterations + 2, "the run must be killed before it finished"
    resumed = subprocess.run(cmd + common + ["--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    alone = subprocess.run(
        cmd + [o.replace(str(tmp_path / "a"), str(tmp_path / "b")) for o in common],
        env=env,
        capture_output=True,
        text=True,
    )
    assert alone.returncode == 0, alone.stderr[-2000:]
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    assert len(a) == len(b) == iterations + 2
    assert without_timing(a) == without_timing(b)


def test_priority_sampling_table_is_checkpointed_and_resumed(tiny_checkpoint, tmp_path):
    # A random model never passes the strict detector: every group is all-zero, teaches nothing, and its
    # prompt's signal halves at each visit, so the table is unlike a fresh one's (all 1).
    extra = ["prompts.sampling=priority", "reward.name=toy_geneval", "reward.kwargs={mode: strict}"]
    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", iterations=3, extra=extra)
    train(cfg, progress=False)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["prompt_priority"]
    seen = [s for s in state["signal"] if s != 1.0]
    assert len(seen) >= 2 and all(s in (0.5, 0.25, 0.125) for s in seen)
    resumed = setup(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=4, extra=extra), resume=True)
    assert resumed.priority.signal.tolist() == state["signal"]
    assert all(r["rows_trained"] == 0 for r in records(tmp_path / "run") if "rows_trained" in r)


@pytest.mark.parametrize(
    "override,match",
    [
        ("sampling.group_sze=4", "did you mean 'sampling.group_size'"),
        ("noise.level=-0.5", "noise.level = -0.5: Input should be greater than or equal to 0"),
        (
            "model.checkpoint=/does/not/exist.safetensors",
            "model.checkpoint='/does/not/exist.safetensors' does not exist",
        ),
        ("reward.name=toy_genevl", "did you mean 'toy_geneval'"),
        ("reward.kwargs.mode=strcit", "reward.kwargs.mode='strcit' is not a toy_geneval mode"),
        ("eval.rewards.strict.kwargs.mode=stric", "eval.rewards.strict: reward.kwargs.mode='stric' is not"),
        ("reward.kwargs={mod: strict}", "does not take reward.kwargs=.*its keywords are \\['mode'\\]"),
        ("sampling.group_size=1", "sampling.group_size = 1: Input should be greater than or equal to 2"),
        ("eval.images_per_prompt=4", "eval.images_per_prompt \\(4\\): the toy evaluation draws one image"),
    ],
)
def test_bad_configs_fail_before_any_model_work(override, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, CONFIG, [override, f"run.output_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


def test_cli_reports_config_errors_without_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "densegrpo_fast", "train", "--config", str(CONFIG), "reward.name=nope", "--output-dir", str(tmp_path / "r")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.returncode == 2
    assert "reward.name='nope' is not a registered reward" in out.stderr and "Traceback" not in out.stderr
    zero = subprocess.run(
        [sys.executable, "-m", "densegrpo_fast", "train", "--config", str(CONFIG), "--max-iterations", "0",
         "--output-dir", str(tmp_path / "r")],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert zero.returncode == 2 and "--max-iterations: '0' must be at least 1" in zero.stderr
    assert not (tmp_path / "r").exists()


def test_readme_main_job_runs_a_few_iterations_with_the_shipped_model(tmp_path):
    """The README's main job (the toy config, shipped checkpoint, calibrated noise), cut down to seconds."""
    out = subprocess.run(
        [sys.executable, "-m", "densegrpo_fast", "train", "--config", str(CONFIG), "--output-dir", str(tmp_path / "run"),
         "--max-iterations", "2", "--no-progress", "noise.calibration.iterations=2", "noise.calibration.prompts=1",
         "prompts.prompts_per_iteration=2", "eval.num_prompts=12", "eval.num_steps=4"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "held-out reward" in out.stdout
    # what the run directory holds (two iterations: no sample grid yet, it comes every 10)
    assert "(metrics.jsonl, reward_curve.png, policy_ema.safetensors)" in out.stdout
    recs = records(tmp_path / "run")
    steps = [r for r in recs if "reward_mean" in r]
    assert len(steps) == 2 and all(
        r["ratio_dev_first"] is None or r["ratio_dev_first"] <= 1e-5 for r in steps
    )
    assert (tmp_path / "run" / "psi.json").exists() and (tmp_path / "run" / "reward_curve.png").exists()


def test_calibrate_command_writes_the_psi_table(tiny_checkpoint, tmp_path, capsys):
    from densegrpo_fast.cli import main

    args = tiny_overrides(tiny_checkpoint, tmp_path / "run", extra=["noise.kind=calibrated",
                                                                     "noise.calibration.iterations=2"])  # fmt: skip
    assert main(["calibrate", "--config", str(CONFIG), *args]) == 0
    table = json.loads((tmp_path / "run" / "psi.json").read_text())
    assert len(table["psi"]) == 4 and (tmp_path / "run" / "psi.png").exists()
    said = capsys.readouterr()
    assert "psi = [" in said.out and "note:" not in said.err
    uniform = tiny_overrides(tiny_checkpoint, tmp_path / "u", extra=["noise.calibration.iterations=1"])
    assert main(["calibrate", "--config", str(CONFIG), *uniform]) == 0
    assert (
        "note: noise.kind=uniform: a run reads this table only with noise.kind=calibrated"
        in capsys.readouterr().err
    )


def test_a_damaged_checkpoint_is_named_and_a_failed_write_leaves_no_tmp_file(tmp_path, monkeypatch):
    from densegrpo_fast import checkpoint

    checkpoint.save_checkpoint(tmp_path, {"iteration": 3})
    assert checkpoint.load_checkpoint(tmp_path)["iteration"] == 3
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(ValueError, match=r"checkpoint.pt cannot be read .*damaged"):
        checkpoint.load_checkpoint(tmp_path)

    def full_disk(state, path):
        Path(path).write_bytes(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_checkpoint(tmp_path, {"iteration": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_a_checkpoint_must_hold_every_trained_parameter_and_a_killed_writes_tmp_goes(tmp_path):
    from densegrpo_fast import checkpoint
    from densegrpo_fast.trainer import _start_run_dir

    model = torch.nn.Linear(2, 2)
    model.bias.requires_grad_(False)
    checkpoint.check_trainable_names(model, {"weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match=r"lacks 1 of this model's trained parameters \(e.g. 'weight'\)"):
        checkpoint.check_trainable_names(model, {})
    with pytest.raises(ValueError, match=r"holds 1 parameters this model lacks \(e.g. 'other'\)"):
        checkpoint.check_trainable_names(model, {"weight": torch.zeros(2, 2), "other": torch.zeros(1)})
    (tmp_path / "checkpoint.pt.4194399.tmp").write_bytes(b"half of a checkpoint a SIGKILL cut")  # (> pid_max)
    (tmp_path / "policy_ema.safetensors.4194399.tmp").write_bytes(b"half an export")
    live = tmp_path / f"checkpoint.pt.{os.getppid()}.tmp"  # a live process's write in progress
    (tmp_path / f"checkpoint.pt.{os.getpid()}.tmp").write_bytes(b"this process has written nothing yet")
    live.write_bytes(b"being written")
    (tmp_path / "notes.v2.tmp").write_text("not a tmp file of ours")
    _start_run_dir(load_config(TrainConfig, CONFIG, []), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", live.name, "config.yaml", "notes.v2.tmp"]


def test_fp32_weights_resumed_into_a_bf16_model_warn():
    from densegrpo_fast.distributed import SINGLE
    from densegrpo_fast.trainer import _warn_if_narrowed

    model = torch.nn.Linear(2, 2).to(torch.bfloat16)
    saved = {n: p.detach().float() for n, p in model.named_parameters()}
    with pytest.warns(UserWarning, match=r"in torch.float32 but this run's are torch.bfloat16 .*rounded"):
        _warn_if_narrowed(model, saved, SINGLE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_if_narrowed(model.float(), saved, SINGLE)  # the same dtype: nothing to say


def test_a_wave_that_fails_to_score_stops_the_rollout_early(tiny_checkpoint, tmp_path, monkeypatch):
    from densegrpo_fast import trainer

    cfg = cfg_of(
        tiny_checkpoint,
        tmp_path / "run",
        extra=["prompts.prompts_per_iteration=4", "sampling.reward_waves=4"],
    )
    run = setup(cfg, progress=False)
    waves, real_sample = [], trainer.sample

    def counted(*args, **kwargs):
        waves.append(1)
        time.sleep(0.2)  # (a wave's rollout outlasts the failing reward's start)
        return real_sample(*args, **kwargs)

    def fails(images, prompts):
        raise RuntimeError("the reward's GPU fell over")

    monkeypatch.setattr(trainer, "sample", counted)
    run.reward_fn = fails
    with pytest.raises(RuntimeError, match="fell over"):
        trainer.collect(run, run.prompts.sample(4, 0), 0)
    assert len(waves) < 4  # before: every wave rolled out (and the queued ones scored) before the error


def test_the_checkpoint_comes_before_the_evaluation_and_a_lost_evaluation_is_made_on_resume(
    tiny_checkpoint, tmp_path, monkeypatch
):
    from densegrpo_fast import trainer

    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", iterations=2, extra=["run.eval_every=1"])
    real = trainer.ema_heldout_rewards
    calls = []

    def fails_at_the_end(run):
        calls.append(run.iteration)
        if run.iteration == 2:
            raise RuntimeError("the reward server went down")
        return real(run)

    monkeypatch.setattr(trainer, "ema_heldout_rewards", fails_at_the_end)
    with pytest.raises(RuntimeError, match="went down"):
        train(cfg, progress=False)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["iteration"] == 2
    monkeypatch.setattr(trainer, "ema_heldout_rewards", real)
    rng = torch.get_rng_state()
    train(cfg, resume=True, progress=False)  # nothing left to train: the evaluation, then the export
    evals = [r["iteration"] for r in records(tmp_path / "run") if "eval_reward" in r]
    assert evals == [0, 1, 2] and (tmp_path / "run" / "policy_ema.safetensors").exists()
    assert torch.equal(torch.get_rng_state(), rng)  # (the evaluation draws no global random numbers)


def test_kept_exports_every_n_iterations_the_latest_kept_and_a_lost_one_made_on_resume(
    tiny_checkpoint, tmp_path, monkeypatch
):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from densegrpo_fast import trainer

    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", iterations=3,
                 extra=["run.export_every=1", "run.keep_exports=2"])  # fmt: skip
    train(cfg, progress=False)
    exports = tmp_path / "run" / "exports"
    assert sorted(p.name for p in exports.iterdir()) == ["iter_00002", "iter_00003"], "the latest two"
    final = load_file(tmp_path / "run" / "policy_ema.safetensors")
    kept = {i: load_file(exports / f"iter_{i:05d}" / "policy_ema.safetensors") for i in (2, 3)}
    assert final.keys() == kept[3].keys() and all(torch.equal(final[k], kept[3][k]) for k in final)
    assert any(not torch.equal(final[k], kept[2][k]) for k in final), "iteration 2's EMA is another policy"
    with safe_open(exports / "iter_00002" / "policy_ema.safetensors", "pt") as f:
        assert f.metadata()["iteration"] == "2"
    final_file = (
        tmp_path / "run" / "policy_ema.safetensors"
    )  # the last kept export, linked: not written twice
    assert final_file.stat().st_ino == (exports / "iter_00003" / "policy_ema.safetensors").stat().st_ino

    # killed after iteration 3's checkpoint, before its export: the resume writes it before anything else;
    # exports of later iterations (a run that went on past its last checkpoint) are dropped, as its log lines
    train(
        cfg, resume=True, progress=False
    )  # a finished run resumed: the final export linked once, no tmp left
    assert sorted(p.name for p in (tmp_path / "run").glob("policy_ema*")) == ["policy_ema.safetensors"]
    shutil.rmtree(exports / "iter_00003")
    for later in ("iter_00004", "iter_100000"):
        (exports / later).mkdir()
    monkeypatch.setattr(trainer, "ema_heldout_rewards", lambda run: pytest.fail("evaluation already logged"))
    train(cfg, resume=True, progress=False)
    again = load_file(exports / "iter_00003" / "policy_ema.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final)
    assert sorted(p.name for p in exports.iterdir()) == ["iter_00002", "iter_00003"]
    for name in ("iter_99999", "iter_100000", "iter_x"):  # the oldest by number, not by name
        (exports / name).mkdir()
    trainer._prune_exports(tmp_path / "run", 2)
    assert sorted(p.name for p in exports.iterdir()) == ["iter_100000", "iter_99999", "iter_x"]


def test_per_reward_advantages_train_on_each_components_own_gains(tiny_checkpoint, tmp_path, monkeypatch):
    from densegrpo_fast import trainer

    parts = (
        "reward.kwargs={rewards: {red: {name: redness}, small: {name: jpeg_compressibility, weight: 0.001}}}"
    )
    extra = ["reward.name=multi", parts, "dense.multi_reward=per_reward"]
    seen, real = [], trainer._advantages
    monkeypatch.setattr(trainer, "_advantages", lambda run, R: seen.append(R) or real(run, R))
    train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1, extra=extra), progress=False)
    (R,) = seen
    assert R.shape == (8, 5, 2), "each component's latent rewards"
    (rec,) = [r for r in records(tmp_path / "run") if "reward_mean" in r]
    means = rec["reward_parts_mean"]
    assert means.keys() == {"red", "small"}
    assert rec["reward_mean"] == pytest.approx(means["red"] + 0.001 * means["small"], rel=1e-5)
    assert_on_policy(rec)
    with pytest.raises(
        ConfigError, match=r"dense.multi_reward=per_reward normalises the components of a multi"
    ):
        cfg_of(tiny_checkpoint, tmp_path / "no", extra=["dense.multi_reward=per_reward"])


def test_step_fraction_trains_a_random_share_of_each_samples_steps(tiny_checkpoint, tmp_path):
    from densegrpo_fast.trainer import step_sample

    trained = torch.tensor([False, True, True, True, False, True])
    mask = step_sample(trained, 50, 0.5, seed=7)
    assert (mask.sum(1) == 2).all() and not mask[:, ~trained].any()  # ceil(0.5 x 4) of the trained four
    assert torch.equal(mask, step_sample(trained, 50, 0.5, seed=7)), "every rank draws the same"
    assert len({tuple(r) for r in mask.tolist()}) > 3 and not torch.equal(
        mask, step_sample(trained, 50, 0.5, 8)
    )
    assert step_sample(trained, 3, 1.0, seed=7)[:, trained].all()
    assert (step_sample(torch.ones(50, dtype=torch.bool), 4, 0.14, seed=7).sum(1) == 7).all(), "not 8"
    run_dir = train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1, extra=["grpo.step_fraction=0.5"]),
                    progress=False)  # fmt: skip
    (rec,) = [r for r in records(run_dir) if "reward_mean" in r]
    assert rec["rows_trained"] == 8 * 2, "ceil(0.5 x 3 trained steps) per sample"
    assert_on_policy(rec)


def test_a_stratified_draw_takes_one_step_of_each_run_of_consecutive_trained_steps():
    from densegrpo_fast.trainer import step_sample

    trained = torch.zeros(14, dtype=torch.bool)
    trained[1:12] = True  # steps 1-11: runs [1, 2] [3, 4] [5, 6] [7, 8] [9, 10] [11] for 6 draws
    mask = step_sample(trained, 400, 0.5, seed=7, stratified=True)
    assert (mask.sum(1) == 6).all() and not mask[:, ~trained].any()
    for run in ([1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11]):
        assert (mask[:, run].sum(1) == 1).all(), run  # one per run, every sample
        assert all(mask[:, k].float().mean() > 0.4 for k in run), run  # each of a run's steps drawn
    assert torch.equal(mask, step_sample(trained, 400, 0.5, seed=7, stratified=True)), (
        "every rank draws the same"
    )
    rand = step_sample(trained, 400, 0.5, seed=7)
    assert (rand.sum(1) == 6).all() and (rand[:, [1, 2]].sum(1) != 1).any()  # (random: not one per run)
    sparse = torch.zeros(10, dtype=torch.bool)
    sparse[[0, 3, 5, 9]] = True  # (runs of the sorted trained steps: [0, 3] and [5, 9])
    mask = step_sample(sparse, 200, 0.5, seed=1, stratified=True)
    assert (mask[:, [0, 3]].sum(1) == 1).all() and (mask[:, [5, 9]].sum(1) == 1).all() and mask[:, 3].any()
    none = torch.zeros(10, dtype=torch.bool)  # (nothing trained: an empty draw, either way)
    for stratified in (False, True):
        assert not step_sample(none, 5, 0.5, seed=1, stratified=stratified).any()


def test_the_update_plans_the_stratified_draw(tiny_checkpoint, tmp_path):
    from densegrpo_fast import trainer

    extra = ["grpo.objective=awm", "dense.mode=sparse", "noise.kind=uniform", "noise.level=0",
             "grpo.filter_zero_advantage=false", "grpo.trained_steps=[0, 1, 2, 3]", "grpo.step_fraction=0.5"]  # fmt: skip
    for draw, want in (("stratified", True), ("random", False)):
        run = trainer.setup(cfg_of(tiny_checkpoint, tmp_path / draw, extra=[*extra, f"grpo.step_draw={draw}"]),
                            progress=False)  # fmt: skip
        A = torch.ones(64, 4)
        rows, steps, _ = trainer._planned_pairs(run, A, 0)
        early = torch.zeros(64, dtype=torch.long).index_add_(0, rows, (steps < 2).long())
        assert rows.numel() == 64 * 2
        assert bool((early == 1).all()) == want, draw  # (stratified: one of steps 0-1 and one of 2-3 each)


def test_prompts_the_reward_cannot_score_stop_the_run_before_it_starts(tmp_path):
    from densegrpo_fast.prompts import PromptSource
    from densegrpo_fast.rewards import build_reward
    from densegrpo_fast.trainer import _check_prompts

    class Reads:
        def read(self, images):
            return ["open"] * len(images)

    ocr = build_reward("ocr", recognizer=Reads())
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text('a sign saying "open"\na "closed" sign\n')
    bad.write_text('a sign saying "open"\na sign with no quotes\n')
    _check_prompts(ocr, "ocr", {"prompts.dataset": PromptSource(str(good))})
    with pytest.raises(
        ValueError,
        match=r"eval.dataset=.*bad.txt.*cannot score 1 of its 2 prompts, e.g. \['a sign with no quotes'\]",
    ):
        _check_prompts(
            ocr, "ocr", {"prompts.dataset": PromptSource(str(good)), "eval.dataset": PromptSource(str(bad))}
        )
    _check_prompts(
        build_reward("redness"), "redness", {"x": PromptSource(str(bad))}
    )  # (no check: nothing to say)
    toy = tmp_path / "toy.txt"  # capitals read as the toy model's tokenizer reads them; a relation left of a
    toy.write_text("A Red Circle\ntwo squares\na red circle left of a square\n")  # colour-less shape does not
    with pytest.raises(
        ValueError, match=r"cannot score 1 of its 3 prompts, e.g. \['a red circle left of a square'\]"
    ):
        _check_prompts(
            build_reward("toy_geneval"), "toy_geneval", {"prompts.dataset": PromptSource(str(toy))}
        )


@pytest.mark.parametrize("where", ["reward", "loss"])
def test_a_nan_stops_the_run_before_its_checkpoint(where, tiny_checkpoint, tmp_path, monkeypatch):
    """A NaN reward (before the update) or a NaN loss (its gradient norm) stops the run with a clear error;
    the checkpoint of the iteration before stays as it was, its weights finite, and a resume goes on."""
    from densegrpo_fast import trainer

    calls = []
    if where == "reward":
        real = trainer.latent_rewards

        def patched(*args, **kwargs):
            R = real(*args, **kwargs)
            calls.append(1)
            return (
                torch.where(torch.arange(R.numel()).view_as(R) == 5, float("nan"), R)
                if len(calls) == 2
                else R
            )

        monkeypatch.setattr(trainer, "latent_rewards", patched)
        match = r"iteration 2: reward 'redness' gave 1 non-finite score\(s\) among .*last checkpoint in .* is intact"
    else:
        real, real_update = trainer.grpo_loss, trainer.update

        def update(run, ro, cond, R, it, A=None):
            calls.append(it)
            return real_update(run, ro, cond, R, it, A)

        def patched(*args, **kwargs):
            loss, s = real(*args, **kwargs)
            return (loss * float("nan") if calls[-1] == 1 else loss), s  # the second iteration's

        monkeypatch.setattr(trainer, "update", update)
        monkeypatch.setattr(trainer, "grpo_loss", patched)
        match = r"iteration 2: the gradient norm was \[.*nan.*\].*last checkpoint in .* is intact"
    cfg = cfg_of(
        tiny_checkpoint, tmp_path / "run", extra=["grpo.train_batch_size=64", "grpo.updates_per_iteration=1"]
    )
    with pytest.raises(trainer.NonFiniteError, match=match):
        train(cfg, progress=False)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["iteration"] == 1
    assert all(torch.isfinite(t).all() for t in [*state["trainable"].values(), *state["ema"].values()])
    assert [r["iteration"] for r in records(tmp_path / "run") if "reward_mean" in r] == [1]
    monkeypatch.setattr(trainer, "latent_rewards" if where == "reward" else "grpo_loss", real)
    train(cfg, resume=True, progress=False)
    assert [r["iteration"] for r in records(tmp_path / "run") if "reward_mean" in r] == [1, 2, 3]


@pytest.mark.parametrize(
    "when, reward",
    [("update", "redness"), ("update", "jpeg_compressibility"), ("start", "redness")],
    ids=["after-an-update", "after-an-update-uint8-reward", "from-the-start"],
)
def test_weights_that_overflow_the_rollout_are_named_not_the_reward(
    when, reward, tiny_checkpoint, tmp_path, monkeypatch
):
    """Finite but huge weights make the rollout's latents NaN: the error names the weights, not the reward,
    also where the reward turns the NaN images into finite scores (JPEG casts them to uint8: black images,
    every advantage 0, a run that would train nothing on). After an update, a resume would stop again; from
    the start, the starting weights are named."""
    from densegrpo_fast import trainer

    def overflow(run):
        with torch.no_grad():
            for p in run.policy.transformer.parameters():
                if p.requires_grad:
                    p.fill_(1e30)

    if when == "update":
        real_update = trainer.update

        def update(run, *args, **kwargs):
            out = real_update(run, *args, **kwargs)
            overflow(run)
            return out

        monkeypatch.setattr(trainer, "update", update)
        match = r"iteration 2: the rollout's latents are not finite .*--resume would stop again"
    else:
        real_window = trainer.set_window

        def set_window(run, iteration):
            overflow(run)
            return real_window(run, iteration)

        monkeypatch.setattr(trainer, "set_window", set_window)
        match = (
            r"iteration 1: the rollout's latents are not finite .*the starting weights make the transformer"
        )
    with pytest.raises(trainer.NonFiniteError, match=match):
        train(cfg_of(tiny_checkpoint, tmp_path / "run", extra=[f"reward.name={reward}"]), progress=False)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_a_resumed_run_keeps_no_page_of_its_checkpoint_file_mapped(tiny_checkpoint, tmp_path):
    """The checkpoint is read with mmap; AdamW keeps loaded host tensors as they are (its step counts, on a
    CPU its moments), which kept the file mapped, and the disk space of every replaced checkpoint taken."""
    import gc

    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1)
    train(cfg, progress=False)
    run = setup(cfg, resume=True, progress=False)
    gc.collect()
    maps = Path("/proc/self/maps").read_text()
    assert str(tmp_path / "run" / "checkpoint.pt") not in maps
    assert run.optimizer.state  # (the state was loaded: there was something to keep mapped)


@pytest.mark.parametrize(
    "mode, extra",
    [
        ("dense", []),
        ("sparse", []),
        ("dense_baseline", []),
        ("dense", ["dense.global_std=true", "dense.adv_clip=1.0"]),
    ],
    ids=["dense", "sparse", "dense_baseline", "global-std-clip1"],
)
def test_the_first_step_applies_the_policy_gradient_of_the_rollouts_advantages(
    mode, extra, tiny_checkpoint, tmp_path, monkeypatch
):
    """What the first optimizer step applies, computed here independently: at ratio 1 (no clip binds) and
    beta 0, the gradient of -mean over the kept (row, step) pairs of A[i, k] log p(lat[i, k+1] | lat[i, k]),
    with A the config's advantages of the rollout's rewards and the log-probs from the reference op in one
    call per step (the update runs micro-batches of 5, of unequal weight). Then the EMA's closed form. A
    flipped sign, advantages of the wrong step, a dropped micro-batch weight, or an inverted EMA decay
    fail it; the tests before only saw that the weights moved."""
    from densegrpo_fast.dense import advantages
    from densegrpo_fast.kernels import sde_log_prob_reference
    from densegrpo_fast.trainer import collect, update

    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", extra=[
        f"dense.mode={mode}", "grpo.beta=0", "grpo.updates_per_iteration=1", "grpo.train_batch_size=5",
        "model.autocast=null", "lora.merge_for_sampling=false", "optim.grad_clip=1e9", "ema.decay=0.75",
        "ema.every=1", *extra,
    ])  # fmt: skip
    run = setup(cfg, progress=False)
    ro, cond, R, _ = collect(run, run.prompts.sample(2, 0), 0)
    d, G, sched = cfg.dense, cfg.sampling.group_size, run.schedule
    A = advantages(R, G, mode, run.trained, global_std=d.global_std, eps=d.adv_eps, clip=d.adv_clip)
    keep = run.trained[None, :] & (A != 0)
    assert keep.sum() > 5  # (several micro-batches)
    params = {n: p for n, p in run.policy.transformer.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in params.items()}
    B = A.shape[0]
    loss = 0.0
    for k in range(A.shape[1]):
        if keep[:, k].any():
            x, sigma = ro.latents[:, k], sched.sigmas[k].expand(B)
            v = run.policy.velocity(x, sigma, cond, cfg.sampling.guidance_scale)
            lp, _ = sde_log_prob_reference(
                x, v, ro.latents[:, k + 1], sigma, sched.sigmas[k + 1].expand(B), sched.std[k].expand(B)
            )
            loss = loss - (A[:, k] * keep[:, k] * lp).sum() / keep.sum()
    want = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    got = {}
    real_step = run.optimizer.step

    def step(*args, **kwargs):
        got.update({n: p.grad.detach().clone() for n, p in params.items()})
        return real_step(*args, **kwargs)

    monkeypatch.setattr(run.optimizer, "step", step)
    update(run, ro, cond, R, 0)
    g_want = torch.cat([want[n].flatten() for n in params])
    g_got = torch.cat([got[n].flatten() for n in params])
    assert g_want.norm() > 0
    assert (g_got - g_want).norm() <= 1e-4 * g_want.norm(), ((g_got - g_want).norm(), g_want.norm())
    for n, p in params.items():  # ema (started at the weights) <- lerp(ema, weights, 1 - decay)
        assert torch.equal(run.ema[n], before[n].lerp(p.detach(), 0.25)), n


@pytest.mark.bnb
def test_8bit_adamw_trains_and_resumes_as_an_uninterrupted_run(tiny_checkpoint, tmp_path):
    """optim.name=adamw8bit (bitsandbytes): the larger weights' moments are 8-bit blocks, the small ones'
    fp32; a run stopped after its first iteration and resumed has the uninterrupted run's records and
    weights, bit for bit (the 8-bit state goes through the checkpoint whole)."""
    pytest.importorskip("bitsandbytes")
    # (a constant learning rate: the first part's schedule would otherwise end at its own last iteration)
    extra = ["optim.name=adamw8bit", "lora.enabled=false", "grpo.beta=0", "optim.schedule=constant"]
    whole = train(cfg_of(tiny_checkpoint, tmp_path / "whole", iterations=2, extra=extra), progress=False)
    run = setup(cfg_of(tiny_checkpoint, tmp_path / "whole", iterations=2, extra=extra), resume=True)
    kinds = {st["state1"].dtype for st in run.optimizer.state.values()}
    assert kinds == {torch.uint8, torch.float32}, kinds  # 8-bit blocks, and fp32 under 4096 weights
    assert type(run.optimizer).__name__ == "AdamW8bit"
    train(cfg_of(tiny_checkpoint, tmp_path / "part", iterations=1, extra=extra), progress=False)
    part = train(
        cfg_of(tiny_checkpoint, tmp_path / "part", iterations=2, extra=extra), resume=True, progress=False
    )
    steps = [[r for r in without_timing(records(d)) if "reward_mean" in r] for d in (part, whole)]
    assert len(steps[0]) == 2 and steps[0] == steps[1]
    a, b = (torch.load(d / "checkpoint.pt", weights_only=False)["trainable"] for d in (part, whole))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_8bit_adamw_is_refused_where_it_cannot_run(tiny_checkpoint, tmp_path, monkeypatch):
    import sys

    from densegrpo_fast.trainer import make_optimizer

    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", extra=["optim.name=adamw8bit"])
    params = [torch.nn.Parameter(torch.zeros(4))]
    with pytest.raises(
        ValueError, match=r"adamw8bit with the transformer sharded by FSDP2.*optim.name=adamw"
    ):
        make_optimizer(cfg, params, sharded=True)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # (not installed)
    with pytest.raises(ValueError, match=r"needs bitsandbytes.*pip install 'densegrpo-fast\[bnb\]'"):
        make_optimizer(cfg, params)
    with pytest.raises(ValueError, match=r"needs bitsandbytes"):  # the run's set-up: before any model work
        setup(cfg, progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"adamw8bit with model.sharding=fsdp"):
        cfg_of(tiny_checkpoint, tmp_path / "run", extra=["optim.name=adamw8bit", "model.sharding=fsdp",
                                                          "lora.enabled=false"])  # fmt: skip
