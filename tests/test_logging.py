"""The run's metrics outside metrics.jsonl: Weights & Biases (run.wandb), and a fresh run's log."""

import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from test_trainer import cfg_of, records

from densegrpo_fast import trainer
from densegrpo_fast.config import TrainConfig, load_config
from densegrpo_fast.logging import WANDB_ID_FILE, MetricsLog, plot_step_rewards, scalars, step_reward_grid
from densegrpo_fast.trainer import train

ROOT = Path(__file__).resolve().parents[1]


class FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records what the trainer asks of it."""

    def __init__(self):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # what the config's check finds
        self.runs = []
        self.ids = iter(f"id{k}" for k in range(100))

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, logs=[], metrics=[], exit_code=None)
        run.id = kwargs["id"] or next(self.ids)  # as wandb: a new id unless one is given
        run.log = run.logs.append
        run.define_metric = lambda name, **kw: run.metrics.append((name, kw))
        run.finish = lambda exit_code=0: setattr(run, "exit_code", exit_code)
        self.runs.append(run)
        return run

    class Image:
        def __init__(self, path):
            self.path = path

    class Video(Image):
        pass


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    return fake


def test_scalars_flatten_per_step_lists_and_skip_what_cannot_be_plotted():
    record = {"iteration": 3, "reward_mean": 0.5, "rows": 24, "dR_mean": [0.1, -0.2], "note": "x",
              "ratio_dev_first": None, "bad": float("nan"), "empty": [],
              "reward_parts_mean": {"pick": 21.5, "ocr": float("nan"), "jpeg": -3.0}}  # fmt: skip
    assert dict(scalars(record)) == {
        "reward_mean": 0.5,
        "rows": 24,
        "dR_mean/step0": 0.1,
        "dR_mean/step1": -0.2,
        "reward_parts_mean/pick": 21.5,
        "reward_parts_mean/jpeg": -3.0,
    }


def test_wandb_gets_every_record_the_grids_and_a_resumed_run_keeps_its_id(
    tiny_checkpoint, tmp_path, fake_wandb
):
    extra = [
        "run.wandb.enabled=true",
        "run.wandb.project=proj",
        "run.wandb.tags=[toy]",
        "run.sample_grid_every=2",
    ]
    run_dir = train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=2, extra=extra), progress=False)
    (first,) = fake_wandb.runs
    kw = first.kwargs
    assert kw["id"] is None and (run_dir / WANDB_ID_FILE).read_text().strip() == first.id == "id0"
    assert (kw["project"], kw["name"], kw["tags"], kw["mode"]) == ("proj", "run", ["toy"], "online")
    assert kw["dir"] == str(run_dir) and kw["resume"] == "allow" and kw["reinit"] == "create_new"
    saved = load_config(TrainConfig, run_dir / "config.yaml")
    assert kw["config"] == saved.model_dump(mode="json")
    assert first.metrics == [("iteration", {}), ("*", {"step_metric": "iteration"})]
    metrics = [entry for entry in first.logs if "samples" not in entry]
    expected = [{"iteration": r["iteration"], **dict(scalars(r))} for r in records(run_dir)]
    assert metrics == expected
    assert any("dR_mean/step0" in m for m in metrics) and any("eval_reward" in m for m in metrics)
    (grid,) = [entry for entry in first.logs if "samples" in entry]
    assert grid["iteration"] == 2 and grid["samples"].path == str(run_dir / "samples" / "iter_00002.png")
    assert first.exit_code == 0  # finished, not failed

    resumed = cfg_of(tiny_checkpoint, tmp_path / "run", iterations=3, extra=extra)
    train(resumed, resume=True, progress=False)
    second = fake_wandb.runs[1]
    assert second.kwargs["id"] == "id0" and second.kwargs["resume"] == "allow"  # the same W&B run, continued
    assert [m["iteration"] for m in second.logs] == [3, 3]  # iteration 3, its evaluation
    assert second.exit_code == 0

    # resuming may switch W&B off (and on: where the run dir has no id yet, the W&B run is a new one)
    off = cfg_of(
        tiny_checkpoint, tmp_path / "run", iterations=4, extra=[*extra[1:], "run.wandb.enabled=false"]
    )
    train(off, resume=True, progress=False)
    assert len(fake_wandb.runs) == 2


def test_a_fresh_run_gets_a_new_wandb_id_and_an_empty_log(tiny_checkpoint, tmp_path, fake_wandb):
    """A first attempt killed before its first checkpoint leaves metrics (and a W&B id) behind; a new run in
    that directory (no --resume: nothing to resume) starts both anew, evaluation at iteration 0 included."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = [
        {"iteration": 0, "wall_s": 0.0, "eval_reward": 9.0},
        {"iteration": 1, "wall_s": 1.0, "reward_mean": 9.0},
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    (run_dir / WANDB_ID_FILE).write_text("stale\n")
    train(cfg_of(tiny_checkpoint, run_dir, iterations=1, extra=["run.wandb.enabled=true"]), progress=False)
    recs = records(run_dir)
    assert [(r["iteration"], "eval_reward" in r) for r in recs] == [(0, True), (1, False), (1, True)]
    assert all(r.get("eval_reward") != 9.0 and r.get("reward_mean") != 9.0 for r in recs)
    assert fake_wandb.runs[0].kwargs["id"] is None and (run_dir / WANDB_ID_FILE).read_text() == "id0\n"


def test_without_the_wandb_package_validate_and_train_say_so_and_a_resume_may_do_without(
    tiny_checkpoint, tmp_path, fake_wandb, monkeypatch, capsys
):
    from densegrpo_fast import cli

    extra = ["run.wandb.enabled=true"]
    train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1, extra=extra), progress=False)  # with W&B
    monkeypatch.setitem(sys.modules, "wandb", None)  # now not installed: `import wandb` fails
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else find_spec(n, *a))
    assert cli.main(["validate", "--config", str(ROOT / "configs" / "toy_geneval.yaml"), *extra]) == 2
    assert "run.wandb.enabled=true needs the wandb package" in capsys.readouterr().err
    monkeypatch.setattr(trainer, "load_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=r"needs the wandb package.*densegrpo-fast\[wandb\]"):
        train(cfg_of(tiny_checkpoint, tmp_path / "other", iterations=1, extra=extra), progress=False)
    monkeypatch.undo()  # (the package still missing, the model loads again)
    monkeypatch.setitem(sys.modules, "wandb", None)
    # the saved config asks for W&B, which this machine lacks: resuming without it is allowed
    off = cfg_of(tiny_checkpoint, tmp_path / "run", iterations=2, extra=["run.wandb.enabled=false"])
    train(off, resume=True, progress=False)
    assert [r["iteration"] for r in records(tmp_path / "run") if "reward_mean" in r] == [1, 2]


def test_a_run_that_fails_marks_its_wandb_run_failed(tiny_checkpoint, tmp_path, fake_wandb, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("no such checkpoint")

    monkeypatch.setattr(trainer, "load_policy", broken)  # setup fails after the log (and W&B) opened
    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1, extra=["run.wandb.enabled=true"])
    with pytest.raises(ValueError, match="no such checkpoint"):
        train(cfg, progress=False)
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    monkeypatch.setattr(
        trainer, "update", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("out of memory"))
    )
    with pytest.raises(RuntimeError, match="out of memory"):  # and the loop fails
        train(cfg, progress=False)
    assert [r.exit_code for r in fake_wandb.runs] == [1, 1]


def test_an_offline_wandb_run_is_written_under_the_run_directory(tiny_checkpoint, tmp_path, monkeypatch):
    """The real package, offline: the W&B run's file holds the metrics, ready for `wandb sync`."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    extra = ["run.wandb.enabled=true", "run.wandb.mode=offline", "run.sample_grid_every=1"]
    run_dir = train(cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1, extra=extra), progress=False)
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    (data,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    blob = data.read_bytes()
    (step,) = [r for r in records(run_dir) if "reward_mean" in r]
    for key in ("reward_mean", "eval_reward", "dR_mean/step0", "samples"):
        assert key.encode() in blob, key
    assert json.dumps(step["reward_mean"]).encode() in blob  # the value (history values are JSON)


def _tensorboard(run_dir, tag):
    """The scalars as TensorBoard's Python loaders see them: the classic accumulator, and the one its server
    reads with (``--load_fast=false``), which takes a run's first restart marker for the initial start and
    purges only from the second. (The Rust data server, the default, was checked by hand: RESULTS.md.)"""
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    classic = [(e.step, e.value) for e in acc.Scalars(tag)]
    acc = plugin_event_accumulator.EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    served = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
    assert served == classic
    return classic


def test_tensorboard_hides_what_a_killed_run_wrote_after_its_checkpoint(tmp_path):
    killed = MetricsLog(tmp_path)
    killed.truncate_after(-1)
    for it in (1, 2, 3, 4):
        killed.write({"iteration": it, "reward_mean": float(it)})
    killed.close()  # (killed, it would not have closed: the events are flushed at each write)
    resumed = MetricsLog(tmp_path, resume=True)
    resumed.truncate_after(2)  # the checkpoint was at iteration 2
    for it in (3, 4, 5):
        resumed.write({"iteration": it, "reward_mean": 10.0 * it})
    resumed.close()
    assert _tensorboard(tmp_path, "reward_mean") == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
    assert [r["reward_mean"] for r in resumed.read()] == [1.0, 2.0, 30.0, 40.0, 50.0]
    fresh = MetricsLog(tmp_path)  # a new run in the directory: nothing earlier shows
    fresh.truncate_after(-1)
    fresh.write({"iteration": 1, "reward_mean": -1.0})
    fresh.close()
    assert _tensorboard(tmp_path, "reward_mean") == [(1, -1.0)]


def test_tensorboard_shows_the_sample_grids_and_hides_a_killed_runs_later_ones(tmp_path):
    """A sample grid's PNG is an image in TensorBoard at its iteration, pixel for pixel (RGB or RGBA); one a
    killed run wrote after its checkpoint is hidden as its scalars are."""
    import io

    import numpy as np
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    grids = {}
    for it in (1, 2, 3):  # (matplotlib writes RGBA grids: the third)
        grids[it] = np.random.default_rng(it).integers(0, 256, (6, 10, 3 if it < 3 else 4), dtype=np.uint8)
        Image.fromarray(grids[it]).save(tmp_path / f"iter_{it}.png")
    killed = MetricsLog(tmp_path)
    killed.truncate_after(-1)
    for it in (1, 2):
        killed.write({"iteration": it, "reward_mean": float(it)})
        killed.image("samples", tmp_path / f"iter_{it}.png", it)
    killed.close()
    resumed = MetricsLog(tmp_path, resume=True)
    resumed.truncate_after(1)  # (the checkpoint was at iteration 1: iteration 2's grid is redrawn)
    resumed.image("samples", tmp_path / "iter_3.png", 2)
    resumed.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    shown = {
        e.step: np.asarray(Image.open(io.BytesIO(e.encoded_image_string))) for e in acc.Images("samples")
    }
    assert sorted(shown) == [1, 2]
    assert np.array_equal(shown[1], grids[1]) and np.array_equal(shown[2], grids[3])


def _dense_record(it, dR, pos, neg):
    return {"iteration": it, "dR_mean": dR, "dR_abs_mean": [abs(v) for v in dR], "dR_pos_frac": pos,
            "dR_neg_frac": neg}  # fmt: skip


def test_step_reward_grid_bins_iterations_and_keeps_steps_apart(tmp_path):
    recs = [_dense_record(it, [0.1 * it, -0.2], [0.5, 0.0], [0.25, 1.0]) for it in (1, 2, 3, 4, 5)]
    recs.insert(2, {"iteration": 2, "eval_reward": 0.3})  # an evaluation record: no per-step rewards
    spans, (dR, balance, size) = step_reward_grid(recs, max_columns=2)
    assert spans == [(1, 3), (4, 5)]  # ceil(5 / 2) = 3 iterations a column, the last one shorter
    torch.testing.assert_close(
        torch.tensor(dR), torch.tensor([[0.2, 0.45], [-0.2, -0.2]])
    )  # [steps, columns]
    torch.testing.assert_close(torch.tensor(balance), torch.tensor([[0.25, 0.25], [-1.0, -1.0]]))
    torch.testing.assert_close(torch.tensor(size), torch.tensor([[0.2, 0.45], [0.2, 0.2]]))
    assert plot_step_rewards(recs, tmp_path / "steps.png") and (tmp_path / "steps.png").stat().st_size > 0
    sparse = [{"iteration": 1, "reward_mean": 0.5}, {"iteration": 1, "eval_reward": 0.4}]
    assert step_reward_grid(sparse) == ([], [[], [], []])
    assert not plot_step_rewards(sparse, tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def test_a_wandb_that_cannot_start_stops_the_run_before_any_model_work(
    tiny_checkpoint, tmp_path, fake_wandb, monkeypatch
):
    def refuse(**kwargs):
        raise RuntimeError("No API key configured")

    fake_wandb.init = refuse
    monkeypatch.setattr(trainer, "load_policy", lambda *a, **k: pytest.fail("the model was loaded"))
    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", iterations=1, extra=["run.wandb.enabled=true"])
    with pytest.raises(
        ValueError, match=r"wandb.init failed \(RuntimeError: No API key.*run.wandb.mode=offline"
    ):
        train(cfg, progress=False)
    assert (
        not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / WANDB_ID_FILE).exists()
    )


def test_a_kill_while_resuming_keeps_the_metrics_history(tmp_path, monkeypatch):
    """The kept entries replace metrics.jsonl whole: killed before the swap, the file is as it was."""
    import os

    log = MetricsLog(tmp_path, tensorboard=False)
    for it in (1, 2, 3):
        log.write({"iteration": it, "reward_mean": float(it)})
    before = log.path.read_text()

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)  # (the swap: densegrpo_fast.checkpoint.write_text_atomic)
    with pytest.raises(KeyboardInterrupt):
        MetricsLog(tmp_path, resume=True, tensorboard=False).truncate_after(1)
    assert log.path.read_text() == before
    monkeypatch.undo()
    MetricsLog(tmp_path, resume=True, tensorboard=False).truncate_after(1)
    assert [r["iteration"] for r in log.read()] == [1]


def test_a_last_line_cut_short_is_left_out_and_any_other_bad_line_named(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    for it in range(3):
        log.write({"iteration": it, "loss": 0.5 * it})
    whole = log.path.read_text()
    log.path.write_text(whole + '{"iteration": 3, "lo')  # killed, or a full disk, in the middle of a write
    with pytest.warns(UserWarning, match="last line was cut short"):
        log.truncate_after(1)  # as a resumed run does
    assert [r["iteration"] for r in log.read()] == [0, 1]
    log.path.write_text(whole.replace('"iteration": 1', '"iteration": 1,,'))
    with pytest.raises(
        ValueError, match=r"metrics.jsonl, line 2, is not a JSON object .*mend or delete that line"
    ):
        log.read()
    log.path.write_text(whole.replace('{"iteration": 1, "loss": 0.5}', "[1, 0.5]"))  # JSON, not a record
    with pytest.raises(ValueError, match=r"line 2, is not a JSON object \(a list, not an object\)"):
        log.read()
