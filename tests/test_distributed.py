"""Data parallelism under torchrun, on the CPU (gloo): two processes train what one process trains.

A two-process job splits each iteration's rows in two; rank r's rows are sampled exactly as wave r of a
single process with ``sampling.reward_waves=2`` (same noise streams, same batch per transformer call), so the
rollouts and rewards of the first iteration must be equal bit for bit, and the summed gradient equal to one
process's up to the order of the additions.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_trainer import CONFIG, ROOT, records, tiny_overrides, without_timing
from tolerances import assert_on_policy

from densegrpo_fast.distributed import Dist
from densegrpo_fast.trainer import wave_bounds

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is not available in this torch build",
)

# (not the checkout on PYTHONPATH: its kernels/ folder would shadow the PyPI `kernels` that transformers imports)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DENSEGRPO_DIST_TIMEOUT_MIN": "2"}
TRAIN = ["-m", "densegrpo_fast", "train", "--config", str(CONFIG), "--no-progress"]
EXTRA = [
    "model.num_threads=1",
    "run.sample_grid_every=0",
    "eval.num_prompts=8",
]  # and 2 updates per iteration


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


def python(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True, timeout=300)


def trainable(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=False)["trainable"]


@pytest.fixture(scope="module")
def two_process_run(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "run"
    done = torchrun([*TRAIN, *tiny_overrides(tiny_checkpoint, out, iterations=2, extra=EXTRA)])
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


def test_the_collectives_under_torchrun():
    done = torchrun([str(ROOT / "tests" / "distributed_worker.py")])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "rank 0: ok" in done.stdout and "rank 1: ok" in done.stdout  # the two may share a line


def test_the_weight_checksum_is_exact_and_sees_one_bit_and_a_permutation():
    from densegrpo_fast.distributed import _checksum

    t = torch.randn(1001, dtype=torch.bfloat16)
    whole = _checksum(t)
    assert torch.equal(_checksum(t, chunk=7), whole) and torch.equal(_checksum(t, "cpu", chunk=1000), whole)
    flipped = t.view(torch.int16).clone()
    flipped[500] ^= 1  # the lowest bit of one element
    assert not torch.equal(_checksum(flipped.view(torch.bfloat16)), whole)
    assert not torch.equal(_checksum(t.flip(0)), whole)
    assert torch.equal(_checksum(t.double()), _checksum(t.double().clone()))  # (8-byte floats: int64 bits)


def test_the_weights_digest_sees_one_bit_and_not_the_order_of_the_modules():
    """What a resume compares with what its run began from: two loads of the same weights agree, whatever
    order the modules are met in; one bit of one weight differs."""
    from densegrpo_fast.distributed import weights_digest

    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 3), torch.nn.LayerNorm(7)
    want = weights_digest({"a": a, "b": b})
    assert weights_digest([b, a]) == want and weights_digest({"x": [a], "y": (b,)}) == want
    assert weights_digest(a) != want
    with torch.no_grad():
        bits = a.weight.view(torch.int32)
        bits[1, 2] ^= 1
    assert weights_digest({"a": a, "b": b}) != want


@pytest.mark.gpu
def test_the_weight_checksum_is_the_same_on_the_gpu():
    """Ranks sum on their own devices, offloaded weights chunk by chunk on the GPU: the sums must be exact."""
    from densegrpo_fast.distributed import _checksum

    for dtype in (torch.bfloat16, torch.float32, torch.int64):
        t = (torch.randn(3_000_001) * 100).to(dtype)
        want = _checksum(t)
        assert torch.equal(_checksum(t, "cuda", chunk=1 << 20).cpu(), want), dtype
        assert torch.equal(_checksum(t.cuda()).cpu(), want), dtype


def test_a_rank_that_loaded_other_weights_stops_every_rank(tiny_checkpoint, tmp_path):
    done = torchrun(
        [str(ROOT / "tests" / "distributed_worker.py"), "setup", str(tiny_checkpoint), str(tmp_path)]
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "rank 0: refused" in done.stdout and "rank 1: refused" in done.stdout


def test_the_eval_command_refuses_a_rank_with_another_config_or_other_weights(tmp_path):
    import tiny_models as tiny

    tiny.sd3_pipeline(seed=0).save_pretrained(tmp_path / "sd3")
    (tmp_path / "prompts.txt").write_text("a red circle\na green dog\n")
    done = torchrun(
        [str(ROOT / "tests" / "distributed_worker.py"), "evalcmd", str(tmp_path / "sd3"), str(tmp_path)]
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "rank 0: refused" in done.stdout and "rank 1: refused" in done.stdout


def test_two_processes_train_what_one_process_with_two_waves_trains(
    two_process_run, tiny_checkpoint, tmp_path
):
    dist_dir, done = two_process_run
    assert done.stdout.count("run directory:") == 1, "rank 0 alone reports"
    one = python([*TRAIN, *tiny_overrides(tiny_checkpoint, tmp_path / "one", iterations=2,
                                          extra=[*EXTRA, "sampling.reward_waves=2"])])  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = records(dist_dir), records(tmp_path / "one")
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b] == [0, 1, 2, 2], "one line per record"

    # iteration 1 samples with the initial weights: the same rollouts, rewards and advantages
    exact = ["reward_mean", "reward_std", "R_mean", "R_std", "dR_mean", "dR_pos_frac", "rows_trained",
             "adv_nonzero_frac", "lr"]  # fmt: skip
    assert {k: a[1][k] for k in exact} == {k: b[1][k] for k in exact}
    assert_on_policy(a[1])  # each rank's first update is on-policy
    # The gradients summed over the ranks are one process's in both optimizer steps of iteration 1 (a
    # factor 2, or other pairs in a step, would show). Only the order of the additions differs, and Adam,
    # which divides each gradient by its own size, turns the rounding of near-cancelling gradients into
    # weight differences of ~2e-3 of a step; from iteration 2 on the runs differ by that.
    assert a[1]["grad_norm"] == pytest.approx(b[1]["grad_norm"], rel=1e-5)
    assert a[2]["grad_norm"] == pytest.approx(b[2]["grad_norm"], rel=1e-3)
    assert a[2]["R_mean"] == pytest.approx(b[2]["R_mean"], rel=1e-3)
    assert a[3]["eval_reward"] == pytest.approx(b[3]["eval_reward"], rel=1e-3)
    wa, wb = trainable(dist_dir), trainable(tmp_path / "one")
    assert set(wa) == set(wb)
    # LoRA B starts at zero, so its weights are the update itself
    ua = torch.cat([wa[n].flatten() for n in wa if "lora_B" in n])
    ub = torch.cat([wb[n].flatten() for n in wa if "lora_B" in n])
    assert (ub != 0).float().mean() > 0.5, "the weights moved"
    assert (ua - ub).norm() <= 1e-2 * ub.norm()


def test_a_two_process_run_resumes_where_it_stopped(two_process_run, tiny_checkpoint, tmp_path):
    dist_dir, _ = two_process_run
    overrides = tiny_overrides(tiny_checkpoint, tmp_path / "run", iterations=2, extra=EXTRA)
    first = torchrun([*TRAIN, *overrides, "--max-iterations", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun([*TRAIN, *overrides, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the same iterations (the stopped run also evaluated when it stopped, at iteration 1)
    steps = [r for r in without_timing(records(tmp_path / "run")) if "reward_mean" in r]
    assert steps == [r for r in without_timing(records(dist_dir)) if "reward_mean" in r]
    assert without_timing(records(tmp_path / "run"))[-1] == without_timing(records(dist_dir))[-1]
    assert all(torch.equal(t, trainable(dist_dir)[n]) for n, t in trainable(tmp_path / "run").items())


def test_rows_that_do_not_split_over_the_processes_are_refused(tiny_checkpoint, tmp_path, monkeypatch):
    from test_trainer import cfg_of

    from densegrpo_fast.trainer import setup

    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match=r"= 8 rows per iteration cannot be split evenly over 3 processes"):
        setup(cfg_of(tiny_checkpoint, tmp_path / "run"), progress=False)
    monkeypatch.setenv("WORLD_SIZE", "6")
    with pytest.raises(ValueError, match=r"reward_waves \(3\) exceeds the 2 rows each of the 6 processes"):
        setup(cfg_of(tiny_checkpoint, tmp_path / "run", extra=["prompts.prompts_per_iteration=3",
                                                               "sampling.reward_waves=3"]), progress=False)  # fmt: skip
    assert not (tmp_path / "run").exists(), "refused before anything is written"


def test_a_world_size_without_a_rank_is_a_clear_error(monkeypatch):
    from densegrpo_fast import distributed

    with pytest.raises(
        ValueError, match=r"train.device='gpu' is not a torch device .*use cpu, cuda or cuda:N"
    ):
        distributed.check_device("gpu", "train.device")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="WORLD_SIZE=2 but RANK is not set: launch with torchrun"):
        distributed.from_env("cpu")


def test_each_process_takes_its_own_gpu(monkeypatch):
    assert Dist(1, 4, 1).device("cuda") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a scheduler showing each process one GPU
    assert Dist(3, 4, 3).device("cuda") == "cuda:0"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on a node with one GPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ValueError, match=r"runs 2 processes \(LOCAL_WORLD_SIZE\) but has one GPU"):
        Dist(1, 2, 1).device("cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")  # each shown its own
    assert Dist(1, 2, 1).device("cuda") == "cuda:0"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # 4 processes on 2 GPUs: two per GPU
    assert Dist(1, 4, 1).device("cuda") == "cuda:1"
    with pytest.raises(
        ValueError, match=r"LOCAL_RANK=3, but this process sees 2 GPUs .* at most 2 processes"
    ):
        Dist(3, 4, 3).device("cuda")
    monkeypatch.undo()
    assert Dist(1, 4, 1).device("cpu") == "cpu"
    assert Dist().device("cuda:3") == "cuda:3"
    with pytest.raises(
        ValueError, match=r"model.device='cuda:0' names one GPU, but this job has 2 processes"
    ):
        Dist(0, 2, 0).device("cuda:0")


def test_a_finished_process_leaves_with_its_output_and_exit_handlers():
    """``distributed.leave``: what the process printed (unflushed, through a pipe), its exit handlers and its
    exit code survive skipping the interpreter's teardown; the teardown's own work (``__del__`` of what is
    still alive) does not run."""
    script = (
        "import atexit, sys\n"
        "from densegrpo_fast import distributed\n"
        "atexit.register(lambda: print('exit handler ran'))\n"
        "class Torn:\n"
        "    def __del__(self): print('teardown ran')\n"
        "alive = Torn()\n"
        "print('partial line', end='')\n"
        "sys.stderr.write('to stderr')\n"
        "distributed.leave(3)\n"
        "print('after leave')\n"
    )
    env = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}  # (buffered, as a pipe is by default)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "partial lineexit handler ran\n" and done.stderr.endswith("to stderr")


def test_only_train_eval_and_calibrate_run_under_torchrun(monkeypatch, capsys):
    from densegrpo_fast.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["show-config", "--config", str(CONFIG)]) == 2
    err = capsys.readouterr().err
    assert "only `train`, `eval` and `calibrate` run data-parallel; run it without torchrun" in err
    assert main(["eval", "--config", str(CONFIG)]) == 2
    assert "the toy's eval report runs as one process" in capsys.readouterr().err


def test_a_group_split_over_two_processes_trains(tiny_checkpoint, tmp_path):
    """One prompt's group of 4 over two processes (2 rows each): its advantages come from the gathered
    rewards; with zero-advantage rows filtered a rank may hold fewer rows than the other, and the ranks
    still step together (the checkpoint's sync check would stop the job otherwise)."""
    # fp32, unmerged: the update uses the rollout's log-probs, so the first ratio is a real check
    extra = [*EXTRA, "prompts.prompts_per_iteration=1", "grpo.filter_zero_advantage=true", "model.autocast=null",
             "lora.merge_for_sampling=false"]  # fmt: skip
    done = torchrun([*TRAIN, *tiny_overrides(tiny_checkpoint, tmp_path / "run", iterations=2, extra=extra)])
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r for r in records(tmp_path / "run") if "reward_mean" in r]
    assert len(steps) == 2
    for r in steps:  # 4 rows x 3 trained steps, less those with zero advantage
        assert 0 < r["rows_trained"] <= 12 and r["rows_trained"] == round(12 * r["adv_nonzero_frac"])
        # rank 0's first micro-batch before any optimizer step (None: its rows had no pair in the first)
        assert r["ratio_dev_first"] in (0.0, None), r
        assert r["R_std"][0] > 1e-3  # four initial noises: four completions of lat[0]
    assert any(r["ratio_dev_first"] == 0.0 for r in steps)
    # sampling.share_initial_noise: the group's one initial noise reaches both ranks' rows (it is drawn for
    # every row before a rank takes its slice), so lat[0]'s reward is one value; the SDE step 0 parts them
    shared = [*extra, "sampling.share_initial_noise=true"]
    done = torchrun(
        [*TRAIN, *tiny_overrides(tiny_checkpoint, tmp_path / "shared", iterations=1, extra=shared)]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (r,) = [r for r in records(tmp_path / "shared") if "reward_mean" in r]
    assert r["R_std"][0] < 1e-6 < 1e-3 < r["R_std"][1], r["R_std"]


def test_two_processes_evaluate_what_one_process_evaluates(tmp_path):
    """The eval command's sampler and scores under torchrun: prompt i on rank i % 2, one score file per
    rank while it runs, merged by rank 0; every score equals one process's (batches of one prompt's two
    images in both). A job killed midway leaves rank files, which a single process resumes and merges."""
    from test_evaluate import rows, run, tiny_policy

    done = torchrun([str(ROOT / "tests" / "distributed_worker.py"), "eval", str(tmp_path / "two")])
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "rank 0 sampled 6 images" in done.stdout and "rank 1 sampled 4 images" in done.stdout
    one = run(tiny_policy(), tmp_path / "one", batch_size=2)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert rows(tmp_path / "two") == sorted(rows(tmp_path / "one"), key=lambda r: r["index"])
    assert not list((tmp_path / "two").glob("scores.rank*"))
    assert two["scores"]["redness"] == pytest.approx(one["scores"]["redness"], rel=1e-12)

    lines = (
        (tmp_path / "two" / "scores.jsonl").read_text().splitlines()
    )  # as if killed: 0 and 2 done on rank 0
    (tmp_path / "two" / "scores.rank0.jsonl").write_text(lines[0] + "\n" + lines[2] + "\n")
    (tmp_path / "two" / "scores.jsonl").unlink()
    resumed = run(tiny_policy(), tmp_path / "two", batch_size=2)
    assert rows(tmp_path / "two") == rows(tmp_path / "one") and resumed["scores"] == two["scores"]
    assert not list((tmp_path / "two").glob("scores.rank*"))


def test_reward_waves_of_a_rank_hold_whole_groups_when_it_has_enough():
    assert wave_bounds(48, 24, 2) == [0, 24, 48]  # one process: waves of whole groups
    assert wave_bounds(72, 24, 4) == [0, 18, 36, 54, 72]  # 3 groups, 4 waves: rows (never an empty wave)
    assert wave_bounds(36, 24, 4) == [0, 9, 18, 27, 36]  # 1.5 groups (1152 rows over 32 processes)
    assert wave_bounds(48, 24, 4) == [0, 12, 24, 36, 48]


def test_a_simulated_job_is_rank_0_with_every_other_rank_mirroring_it():
    """``memory --nproc N`` runs the trainer as rank 0 of a job whose other ranks hold what rank 0 holds: the
    helpers answer as such a job would, in one process, and everything is restored after."""
    from densegrpo_fast import distributed

    with distributed.simulated_job(3) as d:
        assert d == Dist(0, 3, 0) and distributed.from_env("cpu") == d and distributed.world_size() == 3
        t = torch.tensor([[1.0, 2.0]])
        assert torch.equal(distributed.gather_rows(d, t), t.repeat(3, 1))
        assert torch.equal(distributed.sum_(d, t), 3 * t) and torch.equal(t, torch.tensor([[1.0, 2.0]]))
        assert distributed.max_(d, 0.5, "cpu") == 0.5 and distributed.broadcast(d, {"a": 1}) == {"a": 1}
        assert distributed.mean_stats(d, {"loss": [1.0, 3.0]}) == {"loss": 2.0}
        assert distributed.mean_stats(d, {"loss": [1.0, 3.0]}, weights=[1, 3]) == {"loss": 2.5}
        assert distributed.on_main(d, lambda: "rank 0's") == "rank 0's"
        distributed.check_same(d, [0.5], "psi", "fix")
        w = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))]
        w[0].grad = torch.ones(2)
        distributed.sum_grads(d, w)  # three equal gradients; one that no rank has stays None
        assert torch.equal(w[0].grad, torch.full((2,), 3.0)) and w[1].grad is None
        distributed.check_in_sync(d, w, "w")
        distributed.barrier(d)
        distributed.shutdown(d)
    assert distributed.world_size() == 1 and distributed.from_env("cpu") == distributed.SINGLE
    assert distributed.dist is torch.distributed and not torch.distributed.is_initialized()
    with pytest.raises(KeyError), distributed.simulated_job(2):  # an error inside restores everything too
        raise KeyError("inside")
    assert distributed.world_size() == 1 and distributed.dist is torch.distributed
    assert not torch.distributed.is_initialized()


def test_two_processes_calibrate_psi_together(tiny_checkpoint, tmp_path):
    """Algorithm 1 under torchrun: each rank rolls out half of a round's rows, the step rewards are
    gathered (the table counts every rank's trajectories), and every rank trains with the same psi."""
    extra = [*EXTRA, "noise.kind=calibrated", "noise.calibration.iterations=3", "noise.calibration.prompts=1"]
    done = torchrun([*TRAIN, *tiny_overrides(tiny_checkpoint, tmp_path / "run", iterations=1, extra=extra)])
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads((tmp_path / "run" / "psi.json").read_text())
    assert table["trajectories_per_round"] == 4 and len(table["trajectory"]) == 4  # 1 prompt x 4, 3 rounds
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["psi"]
    assert saved.tolist() == pytest.approx(table["psi"], abs=1e-7)
    # the calibrate command under torchrun takes the same steps
    cal = ["-m", "densegrpo_fast", "calibrate", "--config", str(CONFIG)]
    alone = torchrun([*cal, *tiny_overrides(tiny_checkpoint, tmp_path / "cal", extra=extra)])
    assert alone.returncode == 0, alone.stderr[-3000:]
    assert alone.stdout.count("written to") == 1, "rank 0 alone reports"
    assert json.loads((tmp_path / "cal" / "psi.json").read_text())["trajectory"] == table["trajectory"]


def test_a_sharded_run_calibrates_psi_through_its_shards(tiny_checkpoint, tmp_path):
    """Sharded (LoRA over an FSDP2 base), psi is calibrated after the sharding, by train and by the calibrate
    command alike: the calls are the replicated model's, so the steps of psi are the replicated job's."""
    extra = [
        *EXTRA,
        *LORA,
        "noise.kind=calibrated",
        "noise.calibration.iterations=3",
        "noise.calibration.prompts=1",
    ]
    cal = ["-m", "densegrpo_fast", "calibrate", "--config", str(CONFIG)]
    tables = {}
    for name, args, sharding in [
        ("train", TRAIN, "fsdp"),
        ("calibrate", cal, "fsdp"),
        ("replicated", cal, "replicate"),
    ]:
        over = tiny_overrides(
            tiny_checkpoint, tmp_path / name, iterations=1, extra=[*extra, f"model.sharding={sharding}"]
        )
        done = torchrun([*args, *over])
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("FSDP2: the transformer" in done.stdout) == (sharding == "fsdp")
        tables[name] = json.loads((tmp_path / name / "psi.json").read_text())["trajectory"]
    assert tables["train"] == tables["calibrate"] == tables["replicated"]
    assert len(tables["train"]) == 4


def test_calibration_rows_that_do_not_split_are_refused(tiny_checkpoint, tmp_path):
    from test_trainer import cfg_of

    from densegrpo_fast.calibration import calibrate

    cfg = cfg_of(tiny_checkpoint, tmp_path / "run", extra=["noise.calibration.prompts=1"])  # 1 x 4 rows
    with pytest.raises(ValueError, match=r"= 4 calibration rows per round cannot be split evenly over 3"):
        calibrate(None, None, None, cfg, tmp_path / "psi.json", dist=Dist(0, 3, 0))


# --------------------------------------------------------------------------------------------- FSDP2
# Full fine-tuning under torchrun shards the transformer and its KL reference (model.sharding=auto). The
# micro-batch size 3 gives the ranks different micro-batch counts (the shorter list is padded with idle calls),
# 9 held-out prompts split 5 / 4 (the shorter rank samples a padded batch), and the EMA evaluated after
# iteration 1 must leave the trained weights in place for iteration 2 (no checkpoint in between).
FULL = ["lora.enabled=false", "grpo.beta=0.04", "grpo.train_batch_size=3", "eval.num_prompts=9", "run.eval_every=1",
        "run.checkpoint_every=2", "run.sample_grid_every=1"]  # fmt: skip


def full_overrides(ckpt, out, extra=()):
    return tiny_overrides(ckpt, out, iterations=2, extra=[*EXTRA, *FULL, *extra])


@pytest.fixture(scope="module")
def sharded_run(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    done = torchrun([*TRAIN, *full_overrides(tiny_checkpoint, out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP2: the transformer and its KL reference sharded over 2 processes" in done.stdout
    return out


def _update_of(run_dir: Path, base: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    start = load_file(base)
    w = trainable(run_dir)
    return torch.cat([(w[n] - start[f"transformer.{n}"]).flatten() for n in sorted(w)])


@pytest.mark.parametrize("sharding", ["auto", "replicate"])
def test_full_fine_tuning_over_two_processes_trains_what_one_process_trains(
    sharding, sharded_run, tiny_checkpoint, tmp_path
):
    if sharding == "auto":
        dist_dir = sharded_run
    else:  # a whole copy per process, gradients summed by hand
        dist_dir = tmp_path / "replicated"
        done = torchrun([*TRAIN, *full_overrides(tiny_checkpoint, dist_dir, ["model.sharding=replicate"])])
        assert done.returncode == 0, done.stderr[-3000:]
        assert "FSDP2" not in done.stdout
    one = python([*TRAIN, *full_overrides(tiny_checkpoint, tmp_path / "one", ["sampling.reward_waves=2"])])
    assert one.returncode == 0, one.stderr[-3000:]
    (a, ea), (b, eb) = (
        ([r for r in recs if "reward_mean" in r], [r for r in recs if "eval_reward" in r])
        for recs in (records(dist_dir), records(tmp_path / "one"))
    )
    exact = ["reward_mean", "reward_std", "R_mean", "R_std", "dR_mean", "rows_trained", "lr"]
    assert {k: a[0][k] for k in exact} == {k: b[0][k] for k in exact}
    assert_on_policy(a[0])
    assert a[0]["grad_norm"] == pytest.approx(b[0]["grad_norm"], rel=1e-5)
    # iteration 2 samples with weights 1e-6 apart (and the EMA evaluated in between left them in place)
    assert a[1]["R_mean"] == pytest.approx(b[1]["R_mean"], rel=1e-4)
    assert a[1]["grad_norm"] == pytest.approx(b[1]["grad_norm"], rel=1e-4)
    assert len(ea) == len(eb) == 3  # iterations 0, 1, 2, the same 9 prompts scored
    for x, y in zip(ea, eb, strict=True):
        assert x["eval_reward"] == pytest.approx(y["eval_reward"], rel=1e-5)
    # the whole weights, in one process's layout; the update (weights minus the start) equal up to rounding
    ua, ub = _update_of(dist_dir, tiny_checkpoint), _update_of(tmp_path / "one", tiny_checkpoint)
    assert ub.norm() > 0
    assert (ua - ub).norm() <= 1e-4 * ub.norm()  # measured 5e-6 (sharded)
    sa, sb = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (dist_dir, tmp_path / "one"))
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    assert sa["optimizer"]["state"].keys() == sb["optimizer"]["state"].keys()
    for i, s in sb["optimizer"]["state"].items():
        assert sa["optimizer"]["state"][i]["exp_avg_sq"].shape == s["exp_avg_sq"].shape
        torch.testing.assert_close(
            sa["optimizer"]["state"][i]["exp_avg_sq"], s["exp_avg_sq"], rtol=1e-3, atol=1e-12
        )
    from safetensors.torch import load_file

    pa, pb = (
        load_file(dist_dir / "policy_ema.safetensors"),
        load_file(tmp_path / "one" / "policy_ema.safetensors"),
    )
    assert pa.keys() == pb.keys()
    for n, t in pb.items():
        torch.testing.assert_close(pa[n], t, rtol=0, atol=1e-5)


def sharded_bf16_matches_one_process(model: list[str], tmp_path: Path, lora: bool = False) -> dict:
    """For the SD3 / FLUX tests: one iteration of bf16 full fine-tuning of the tiny ``model`` (its
    ``model.*`` / ``sampling.*`` overrides) on two prompts, output in tmp_path/run, sharded over two processes
    and in one process sampling the ranks' rows as two waves. The sharded calls are the whole bf16 model's,
    so the rollouts and rewards agree bit for bit (FSDP casting the inputs itself would round them
    otherwise). ``lora``: fp32 LoRA adapters over the sharded bf16 base instead (gathered in fp32: in bf16 the
    rollouts would differ). Returns the sharded run's iteration record."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    args = [
        *TRAIN, *model, "model.dtype=bf16", f"prompts.dataset={prompts}", "prompts.prompts_per_iteration=2",
        "sampling.num_steps=3", "sampling.group_size=2", "sampling.shift=null", "noise.kind=uniform",
        "reward.name=redness", "reward.kwargs={}", "eval.rewards={}", "grpo.beta=0.04",
        *(["lora.rank=4", "lora.merge_for_sampling=false", "model.sharding=fsdp"] if lora else ["lora.enabled=false"]),
        "grpo.train_batch_size=3", f"eval.dataset={prompts}", "eval.num_prompts=3", "eval.num_steps=2",
        "run.iterations=1", "run.tensorboard=false", "run.sample_grid_every=0", "ema.every=1", "model.num_threads=1",
    ]  # fmt: skip
    done = torchrun([*args, f"run.output_dir={tmp_path / 'run'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sharded over 2 processes, calls in torch.bfloat16" in done.stdout
    one = python([*args, f"run.output_dir={tmp_path / 'one'}", "sampling.reward_waves=2"])
    assert one.returncode == 0, one.stderr[-3000:]
    (step,), (ref,) = ([r for r in records(tmp_path / d) if "reward_mean" in r] for d in ("run", "one"))
    exact = ["reward_mean", "reward_std", "R_mean", "R_std", "dR_mean", "rows_trained"]
    assert {k: step[k] for k in exact} == {k: ref[k] for k in exact}
    assert math.isfinite(step["grad_norm"]) and step["grad_norm"] > 0
    # the same gradient: the one process's norm is of bf16 gradients (0.4 % apart; measured 0.05-0.16 %)
    assert step["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-2)
    assert step["ratio_dev_first"] is None  # bf16 calls: the update recomputed the old log-probs ...
    assert_on_policy(step)  # ... and the rollout's lie within the trainer's limit of them
    return step


@pytest.mark.slow  # (the slow tier: .ci/run runs it after the default one)
def test_a_sharded_run_with_compiled_blocks_trains_what_the_eager_one_trains(
    sharded_run, tiny_checkpoint, tmp_path
):
    """model.compile after FSDP2's sharding: dynamo traces each block with the sharding's hooks around it.
    Through the ``eager`` backend (the captured graphs run as captured) the run must be the eager run."""
    compiled = tmp_path / "compiled"
    extra = ["model.compile=true", "model.compile_backend=eager"]
    done = torchrun([*TRAIN, *full_overrides(tiny_checkpoint, compiled, extra)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert without_timing(records(compiled)) == without_timing(records(sharded_run))


@pytest.mark.slow  # (the slow tier: .ci/run runs it after the default one)
def test_a_sharded_run_resumes_with_two_processes_or_one(sharded_run, tiny_checkpoint, tmp_path):
    import shutil

    overrides = full_overrides(tiny_checkpoint, tmp_path / "run")
    first = torchrun([*TRAIN, *overrides, "--max-iterations", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copytree(tmp_path / "run", tmp_path / "stopped")
    # the checkpoint is one process's: a single process resumes it (other noise: it samples in one wave)
    single = python([*TRAIN, *overrides, "--resume"])
    assert single.returncode == 0, single.stderr[-3000:]
    assert "resuming with 1 process(es) a run checkpointed with 2" in single.stderr
    last = [r for r in records(tmp_path / "run") if "reward_mean" in r][-1]
    assert last["iteration"] == 2
    assert_on_policy(last)
    # and two processes resume it to the uninterrupted run's weights, bit for bit
    shutil.rmtree(tmp_path / "run")
    shutil.copytree(tmp_path / "stopped", tmp_path / "run")
    resumed = torchrun([*TRAIN, *overrides, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # every record (the stopped run also evaluated at iteration 1, as the uninterrupted one did), the weights,
    # the EMA and the export: the EMA and the optimizer state came back from the whole tensors too
    assert without_timing(records(tmp_path / "run")) == without_timing(records(sharded_run))
    saved, want = (
        torch.load(d / "checkpoint.pt", weights_only=False) for d in (tmp_path / "run", sharded_run)
    )
    for key in ("trainable", "ema"):
        assert saved[key].keys() == want[key].keys()
        assert all(torch.equal(t, want[key][n]) for n, t in saved[key].items()), key
    from safetensors.torch import load_file

    pa, pb = (
        load_file(tmp_path / "run" / "policy_ema.safetensors"),
        load_file(sharded_run / "policy_ema.safetensors"),
    )
    assert all(torch.equal(t, pb[n]) for n, t in pa.items())
    assert (tmp_path / "run" / "samples" / "iter_00002.png").exists()  # drawn by rank 0 through on_main


def test_a_sharded_iteration_that_trains_nothing_evaluates_and_exports(tiny_checkpoint, tmp_path):
    # the random tiny model never passes the strict detector: every group's advantages are 0, no pair trains
    strict = ["run.iterations=1", "reward.name=toy_geneval", "reward.kwargs={mode: strict}"]
    done = torchrun([*TRAIN, *full_overrides(tiny_checkpoint, tmp_path / "run", strict)])
    assert done.returncode == 0, done.stderr[-3000:]
    (step,) = [r for r in records(tmp_path / "run") if "reward_mean" in r]
    assert step["rows_trained"] == 0 and (tmp_path / "run" / "policy_ema.safetensors").exists()


@pytest.mark.slow  # (the slow tier: .ci/run runs it after the default one)
def test_ratio_norm_over_two_sharded_processes_trains_what_one_process_trains(tiny_checkpoint, tmp_path):
    """grpo.ratio_norm under FSDP2: each rank keeps the old velocities of its own pairs of the second optimizer
    step, in the micro-batches of its first pass, while the rank with fewer pads both passes with idle
    calls; the summed gradients of both optimizer steps are one process's."""
    extra = ["grpo.ratio_norm=true", "grpo.step_weight=inverse_dt", "run.iterations=1"]
    done = torchrun([*TRAIN, *full_overrides(tiny_checkpoint, tmp_path / "run", extra)])
    assert done.returncode == 0, done.stderr[-3000:]
    one = python(
        [*TRAIN, *full_overrides(tiny_checkpoint, tmp_path / "one", [*extra, "sampling.reward_waves=2"])]
    )
    assert one.returncode == 0, one.stderr[-3000:]
    (a,), (b,) = ([r for r in records(tmp_path / d) if "reward_mean" in r] for d in ("run", "one"))
    exact = ["reward_mean", "R_mean", "dR_mean", "rows_trained"]
    assert {k: a[k] for k in exact} == {k: b[k] for k in exact}
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert a["log_ratio_mean"] == pytest.approx(b["log_ratio_mean"], rel=1e-3, abs=1e-9)


# LoRA over a sharded base (model.sharding=fsdp): the frozen base's shards in the model's dtype and the
# adapters' in fp32, each gathered in its own dtype, so every call is the replicated LoRA model's bit for bit.
LORA = ["lora.merge_for_sampling=false"]


def lora_overrides(ckpt, out, sharding="fsdp", extra=()):
    return tiny_overrides(
        ckpt, out, iterations=2, extra=[*EXTRA, *LORA, f"model.sharding={sharding}", *extra]
    )


@pytest.fixture(scope="module")
def sharded_lora_run(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_lora") / "run"
    done = torchrun([*TRAIN, *lora_overrides(tiny_checkpoint, out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP2: the transformer's base and its LoRA adapters sharded over 2 processes" in done.stdout
    return out


def _without_grad_norm(recs: list[dict]) -> tuple[list[dict], list[float | None]]:
    recs = without_timing(recs)
    return [{k: v for k, v in r.items() if k != "grad_norm"} for r in recs], [
        r.get("grad_norm") for r in recs
    ]


def test_lora_over_a_sharded_base_trains_what_replicated_lora_trains(
    sharded_lora_run, tiny_checkpoint, tmp_path
):
    replicated = tmp_path / "replicated"
    done = torchrun([*TRAIN, *lora_overrides(tiny_checkpoint, replicated, "replicate")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FSDP2" not in done.stdout
    (a, na), (b, nb) = (_without_grad_norm(records(d)) for d in (sharded_lora_run, replicated))
    assert a == b  # every rollout, reward, statistic and held-out score
    # (the norm of sharded gradients sums its squares in another order; no clip bit, so the steps are equal)
    assert [n is None for n in na] == [n is None for n in nb]
    assert [n for n in na if n is not None] == pytest.approx([n for n in nb if n is not None], rel=1e-6)
    sa, sb = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (sharded_lora_run, replicated))
    for key in ("trainable", "ema"):
        assert sa[key].keys() == sb[key].keys()
        assert all(torch.equal(t, sb[key][n]) for n, t in sa[key].items()), key
    assert all("lora_" in n for n in sa["trainable"])  # the adapters alone: no base weight gathered
    assert all(t.dtype == torch.float32 and not t.requires_grad for t in sa["trainable"].values())
    assert sa["optimizer"]["param_groups"] == sb["optimizer"]["param_groups"]
    assert sa["optimizer"]["state"].keys() == sb["optimizer"]["state"].keys() and sb["optimizer"]["state"]
    for i, s in sb["optimizer"]["state"].items():
        for moment in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa["optimizer"]["state"][i][moment], s[moment]), (i, moment)
    from safetensors.torch import load_file

    # the export merges the EMA adapters into the whole base, gathered for it
    pa, pb = (load_file(d / "policy_ema.safetensors") for d in (sharded_lora_run, replicated))
    assert pa.keys() == pb.keys() and all(torch.equal(t, pb[n]) for n, t in pa.items())


@pytest.mark.slow  # (the slow tier: .ci/run runs it after the default one)
def test_lora_over_a_sharded_base_resumes_with_two_processes_or_one(
    sharded_lora_run, tiny_checkpoint, tmp_path
):
    import shutil

    overrides = lora_overrides(tiny_checkpoint, tmp_path / "run")
    first = torchrun([*TRAIN, *overrides, "--max-iterations", "1"])
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copytree(tmp_path / "run", tmp_path / "stopped")
    resumed = torchrun([*TRAIN, *overrides, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the same iterations (the stopped run also evaluated when it stopped, at iteration 1)
    steps = [r for r in without_timing(records(tmp_path / "run")) if "reward_mean" in r]
    assert steps == [r for r in without_timing(records(sharded_lora_run)) if "reward_mean" in r]
    assert without_timing(records(tmp_path / "run"))[-1] == without_timing(records(sharded_lora_run))[-1]
    saved, want = (
        torch.load(d / "checkpoint.pt", weights_only=False) for d in (tmp_path / "run", sharded_lora_run)
    )
    for key in ("trainable", "ema"):
        assert saved[key].keys() == want[key].keys() and saved[key], key
        assert all(torch.equal(t, want[key][n]) for n, t in saved[key].items()), key
    # the checkpoint is one process's: a single process resumes it
    shutil.rmtree(tmp_path / "run")
    shutil.copytree(tmp_path / "stopped", tmp_path / "run")
    single = python([*TRAIN, *overrides, "--resume"])
    assert single.returncode == 0, single.stderr[-3000:]
    last = [r for r in records(tmp_path / "run") if "reward_mean" in r][-1]
    assert last["iteration"] == 2
    assert_on_policy(last)


@pytest.mark.slow  # (the slow tier: .ci/run runs it after the default one)
def test_lora_over_a_sharded_base_with_compiled_blocks_trains_what_the_eager_one_trains(
    sharded_lora_run, tiny_checkpoint, tmp_path
):
    """model.compile over the sharded base: dynamo traces each block with the sharding's hooks around it, and
    through the ``eager`` backend (the captured graphs run as captured) the run is the eager sharded run."""
    compiled = tmp_path / "compiled"
    extra = ["model.compile=true", "model.compile_backend=eager"]
    done = torchrun([*TRAIN, *lora_overrides(tiny_checkpoint, compiled, extra=extra)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert without_timing(records(compiled)) == without_timing(records(sharded_lora_run))


FORWARD = ["dense.mode=sparse", "noise.level=0", "grpo.filter_zero_advantage=false", "dense.global_std=true",
           "lora.merge_for_sampling=false", "grpo.train_batch_size=7"]  # fmt: skip
OBJECTIVES = {
    "nft": (["grpo.objective=nft", "nft.kl=0.01"], "nft_old", ["old_decay"], ["r_mean"]),
    "awm": (["grpo.objective=awm", "awm.kl=0.01", "awm.anchor_decay_rate=0.1"], "awm_anchor", ["anchor_decay"],
            ["fm_err", "anchor_kl"]),
}  # fmt: skip


@pytest.mark.parametrize("objective, sharding", [("nft", "replicate"), ("nft", "fsdp"), ("awm", "fsdp")])
def test_two_processes_train_forward_objectives_as_one_process_with_two_waves(
    objective, sharding, tiny_checkpoint, tmp_path
):
    """grpo.objective=nft or awm over two processes (LoRA replicated, or over a sharded base): each pair's noise
    comes from its row in the whole batch, so the job's first update sees one process's pairs; 7-pair
    micro-batches leave the ranks different micro-batch counts (the shorter one pads with idle calls under
    FSDP2). The lagged weights (nft's old policy, awm's anchor) follow the same trained weights."""
    overrides, lagged, exact_keys, close_keys = OBJECTIVES[objective]
    extra = [*EXTRA, *FORWARD, *overrides]
    done = torchrun([*TRAIN, *tiny_overrides(tiny_checkpoint, tmp_path / "job", iterations=2,
                                             extra=[*extra, f"model.sharding={sharding}"])])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    one = python([*TRAIN, *tiny_overrides(tiny_checkpoint, tmp_path / "one", iterations=2,
                                          extra=[*extra, "sampling.reward_waves=2"])])  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = ([r for r in records(tmp_path / d) if "reward_mean" in r] for d in ("job", "one"))
    exact = ["reward_mean", "reward_std", "rows_trained", "lr", *exact_keys]
    assert {k: a[0][k] for k in exact} == {k: b[0][k] for k in exact}
    for key in (
        "policy_loss",
        "kl",
        "grad_norm",
        *close_keys,
    ):  # (awm's policy term is a mean of signed terms
        # that cancels to 4e-4 here: its float32 rounding is above rel 1e-5 of that, whence abs)
        assert a[0][key] == pytest.approx(b[0][key], rel=1e-5, abs=1e-7), key
    assert a[1]["reward_mean"] == pytest.approx(b[1]["reward_mean"], rel=1e-3)
    sa, sb = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in ("job", "one"))
    assert sa[lagged].keys() == sb[lagged].keys() and sa[lagged]
    for n, t in sb[lagged].items():
        torch.testing.assert_close(sa[lagged][n], t, rtol=1e-3, atol=1e-6)


def test_adapters_in_host_memory_are_broadcast_through_the_device(monkeypatch):
    """A sharded LoRA run makes its adapters in host memory (the base is there until FSDP2 moves it), and NCCL
    broadcasts device tensors only: each goes through the given device and back ("cpu:0" stands in for one)."""
    from densegrpo_fast import distributed

    seen = []

    def broadcast(t, src):  # (rank 0's values arrive)
        seen.append((t.device, t.data_ptr()))
        t.fill_(7.0)

    monkeypatch.setattr(distributed.dist, "broadcast", broadcast)
    p = torch.nn.Parameter(torch.zeros(3))
    distributed.broadcast_params(Dist(1, 2, 1), [p], "cpu:0")
    assert len(seen) == 1 and seen[0][1] != p.data_ptr()  # a staged copy ...
    assert p.tolist() == [7.0, 7.0, 7.0]  # ... copied back
    distributed.broadcast_params(Dist(1, 2, 1), [p])  # no device: in place
    assert seen[1] == (torch.device("cpu"), p.data_ptr())


def test_lora_merged_for_sampling_over_a_sharded_base_is_refused(tiny_checkpoint, tmp_path):
    from test_trainer import cfg_of

    with pytest.raises(ValueError, match=r"lora.merge_for_sampling with model.sharding=fsdp"):
        cfg_of(
            tiny_checkpoint, tmp_path / "run", extra=["model.sharding=fsdp", "lora.merge_for_sampling=true"]
        )


def test_the_padded_micro_batch_count_is_the_busiest_ranks():
    from densegrpo_fast.trainer import _most_micro_batches

    rows = torch.tensor([0, 1, 2, 3, 4, 9, 10])  # 12 rows over 3 ranks: 4, 1 and 2 pairs
    assert _most_micro_batches(rows, 12, 3, 3) == 2
    assert _most_micro_batches(rows, 12, 3, 4) == 1
    assert _most_micro_batches(rows[4:], 12, 3, 1) == 2


@pytest.mark.slow  # (the slow tier: .ci/run runs it after the default one)
def test_rank_0_alone_logs_to_wandb_and_its_failure_stops_every_rank(tiny_checkpoint, tmp_path):
    pytest.importorskip("wandb")
    # no W&B login whatever this machine's: no WANDB_* variables, a home (and ~/.netrc) of the test's own
    env = {k: v for k, v in ENV.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "netrc"))
    run = lambda out, extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *TRAIN,
         *tiny_overrides(tiny_checkpoint, out, iterations=1, extra=[*EXTRA, *extra])],
        env={**env, "WANDB_SILENT": "true"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    done = run(tmp_path / "offline", ["run.wandb.enabled=true", "run.wandb.mode=offline"])
    assert done.returncode == 0, done.stderr[-3000:]
    (only,) = (tmp_path / "offline" / "wandb").glob("offline-run-*")  # one W&B run, rank 0's
    run_id = (tmp_path / "offline" / "wandb_id.txt").read_text().strip()
    assert only.name.endswith(run_id) and b"reward_mean" in (only / f"run-{run_id}.wandb").read_bytes()
    # online without a login: rank 0's error reaches rank 1 through on_main, and both leave at once
    failed = run(tmp_path / "online", ["run.wandb.enabled=true", f"run.wandb.project=p{os.getpid()}"])
    assert failed.returncode != 0
    assert failed.stderr.count("wandb.init failed") >= 2, failed.stderr[-3000:]  # said by both ranks
    assert not (tmp_path / "online" / "metrics.jsonl").exists()
