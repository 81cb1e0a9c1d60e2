"""The pretrain-toy and eval commands: resumption, determinism, the eval JSON, and user errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from densegrpo_fast import cli
from densegrpo_fast.config import ConfigError, load_config
from densegrpo_fast.toy import pretrain as pt
from densegrpo_fast.toy.config import ToyEvalConfig, ToyPretrainConfig
from densegrpo_fast.toy.evaluate import heldout_prompts
from densegrpo_fast.toy.world import CATEGORIES

TINY = [
    "arch.num_layers=1",
    "arch.num_heads=2",
    "arch.head_dim=8",
    "arch.text_dim=8",
    "arch.pooled_dim=8",
    "train.batch_size=4",
    "train.steps=6",
    "train.warmup_steps=2",
    "train.checkpoint_every=3",
    "train.eval_every=0",
]


def _pretrain(out, extra=()):
    cfg = load_config(
        ToyPretrainConfig, "configs/toy_pretrain.yaml", [*TINY, f"train.output_dir={out}", *extra]
    )
    return load_file(str(pt.pretrain(cfg, progress=False)))


def test_resumed_pretraining_equals_uninterrupted(tmp_path, monkeypatch):
    straight = _pretrain(tmp_path / "a")
    real = pt.make_batch

    def crash_at_4(step, t):
        if step == 4:
            raise KeyboardInterrupt  # the run dies after the step-3 checkpoint and one more step
        return real(step, t)

    monkeypatch.setattr(pt, "make_batch", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        _pretrain(tmp_path / "b")
    assert torch.load(tmp_path / "b" / "state.pt", weights_only=False)["step"] == 3
    monkeypatch.setattr(pt, "make_batch", real)
    resumed = _pretrain(tmp_path / "b")
    assert straight.keys() == resumed.keys()
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    other_seed = _pretrain(tmp_path / "c", ["train.seed=1"])
    assert any(not torch.equal(straight[k], other_seed[k]) for k in straight)
    lines = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [
        1,
        2,
        3,
        4,
        5,
        6,
    ]  # (step 4 was logged before the kill)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_kill_at_the_last_save_leaves_no_stale_export(when, tmp_path, monkeypatch):
    """The last step's export comes before its state.pt. Killed before the state is written, the resume
    starts from the step-3 state and exports again; killed after it, both are the last step's. (Written the
    other way round, a kill after the state left the step-3 export beside a finished state, and the next call
    returned it.)"""
    from safetensors import safe_open

    straight = _pretrain(tmp_path / "a")
    real = pt._save_atomic

    def killed_at_the_end(obj, path):
        if when == "after":
            real(obj, path)
        if obj["step"] == 6:
            raise KeyboardInterrupt
        if when == "before":
            real(obj, path)

    monkeypatch.setattr(pt, "_save_atomic", killed_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        _pretrain(tmp_path / "b")
    monkeypatch.setattr(pt, "_save_atomic", real)
    resumed = _pretrain(tmp_path / "b")
    with safe_open(str(tmp_path / "b" / "ema.safetensors"), framework="pt") as f:
        assert f.metadata()["step"] == "6"
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_a_resume_that_would_compute_other_steps_is_refused_key_by_key(tmp_path):
    _pretrain(tmp_path / "a", ["train.steps=3"])
    with pytest.raises(ValueError, match=r"train.batch_size was 4, now 8; train.seed was 0, now 7\. Resume"):
        _pretrain(tmp_path / "a", ["train.seed=7", "train.batch_size=8"])
    with pytest.warns(UserWarning, match="train.steps changes from 3 to 6 on resume"):
        _pretrain(tmp_path / "a", ["train.eval_every=0", "train.checkpoint_every=2"])


def test_resume_with_another_arch_is_an_error(tmp_path):
    _pretrain(tmp_path / "a", ["train.steps=1"])
    with pytest.raises(ValueError, match="use the same arch to resume"):
        _pretrain(tmp_path / "a", ["arch.num_layers=2"])


def test_continued_pretraining_starts_from_the_checkpoint(tmp_path):
    first = tmp_path / "a" / "ema.safetensors"
    start = _pretrain(tmp_path / "a")
    zero_lr = _pretrain(tmp_path / "b", [f"train.init_checkpoint={first}", "train.lr=1e-30", "train.steps=2"])
    for k in start:  # a vanishing lr keeps the starting weights (and the EMA starts at them)
        torch.testing.assert_close(zero_lr[k], start[k], rtol=0, atol=1e-6, msg=k)
    scratch = _pretrain(tmp_path / "c", ["train.lr=1e-30", "train.steps=2"])
    assert any((scratch[k] - start[k]).abs().max() > 1e-3 for k in start)
    with pytest.raises(ValueError, match="set the config's arch section to the checkpoint's"):
        _pretrain(tmp_path / "d", [f"train.init_checkpoint={first}", "arch.num_layers=2"])
    with pytest.raises(ValueError, match="init_checkpoint .* does not exist: pass a .safetensors file"):
        _pretrain(tmp_path / "e", [f"train.init_checkpoint={tmp_path / 'nope.safetensors'}"])


def test_eval_command_json_has_every_category(tmp_path, capsys):
    out = tmp_path / "eval"
    argv = [
        "eval",
        "--config",
        "configs/toy_geneval.yaml",
        "--json",
        "eval.num_prompts=12",
        "eval.num_steps=2",
    ]
    assert cli.main([*argv, f"eval.output_dir={out}", "eval.grid_size=6"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["per_category"]) == set(CATEGORIES)
    for r in [*res["per_category"].values(), res]:
        assert 0 <= r["exact"] <= r["strict"] <= r["partial"] <= 1 and 0 <= r["extra"] <= 1
        # an image with extra objects is never exact: exact <= 1 - extra, prompt by prompt and so on average
        assert r["exact"] <= 1 - r["extra"] + 1e-6
    assert all(r["n"] == 2 for r in res["per_category"].values())
    assert res["rewards"]["exact"] == pytest.approx(res["exact"], abs=1e-6)  # the config's eval.rewards entry
    assert json.loads((out / "scores.json").read_text())["strict"] == res["strict"]
    assert (out / "samples.png").stat().st_size > 1000
    assert load_config(ToyEvalConfig, out / "config.yaml").eval.num_steps == 2


def test_user_errors_name_value_rule_and_fix(tmp_path, capsys):
    missing = str(tmp_path / "nope.safetensors")
    assert cli.main(["eval", "--config", "configs/toy_geneval.yaml", "--checkpoint", missing]) == 2
    assert f"{missing!r} does not exist: pass a .safetensors file written by" in capsys.readouterr().err
    with pytest.raises(ConfigError) as e:
        load_config(ToyEvalConfig, "configs/toy_geneval.yaml", ["eval.num_steps=0", "eval.cfg_scale=2"])
    msg = str(e.value)
    assert "eval.num_steps = 0" in msg and "greater than or equal to 1" in msg
    assert "eval.cfg_scale: unknown key" in msg
    with pytest.raises(ConfigError, match="train.stpes: unknown key; did you mean 'train.steps'"):
        load_config(ToyPretrainConfig, "configs/toy_pretrain.yaml", ["train.stpes=3"])
    with pytest.raises(ValueError, match="is not a toy-world prompt"):
        heldout_prompts(str(_write(tmp_path / "p.txt", "a circle\na pink elephant\n")), 4, 0)


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_pretraining_on_a_missing_device_or_a_negative_seed_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"train.device='cuda', but this torch .* set train.device=cpu"):
        _pretrain(tmp_path / "gpu", ["train.device=cuda"])
    assert not (tmp_path / "gpu").exists()
    with pytest.raises(ConfigError, match="train.seed"):
        _pretrain(tmp_path / "neg", ["train.seed=-1"])


def test_a_run_killed_before_its_first_state_logs_each_step_once(tmp_path, monkeypatch):
    real = pt.make_batch

    def crash_at_2(step, t):
        if step == 2:
            raise KeyboardInterrupt  # before the step-3 checkpoint: no state.pt yet
        return real(step, t)

    monkeypatch.setattr(pt, "make_batch", crash_at_2)
    with pytest.raises(KeyboardInterrupt):
        _pretrain(tmp_path / "a")
    assert not (tmp_path / "a" / "state.pt").exists()
    monkeypatch.setattr(pt, "make_batch", real)
    _pretrain(tmp_path / "a")
    lines = (tmp_path / "a" / "log.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3, 4, 5, 6]
