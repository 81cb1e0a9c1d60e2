"""Run by test_distributed.py under ``torchrun --nproc_per_node=2`` (gloo, CPU): with no argument, checks
the collectives of densegrpo_fast.distributed and exits non-zero, with the failed assertion, if one is
wrong; with ``eval OUT``, evaluates test_evaluate.py's tiny policy data-parallel into OUT; with
``memory CHECKPOINT OUT [OVERRIDES]`` (test_memory.py), counts rank 0's memory in two iterations of
test_memory's tiny SD3 run (``memory.measure_run``) and writes it to OUT/rank0.json; with ``setup CHECKPOINT
OUT``, checks that a rank whose loaded weights differ stops the set-up (or, for an eval.rewards entry, the
evaluation; or the calibrate command) of every rank; with ``evalcmd SD3_DIR OUT``, checks that the eval command refuses a rank with
another config or other weights."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from densegrpo_fast import distributed

d = distributed.from_env("cpu")
if sys.argv[1:2] == ["eval"]:
    from test_evaluate import run, tiny_policy

    from densegrpo_fast import evaluate

    sampled, ode_sample = [], evaluate.ode_sample
    evaluate.ode_sample = lambda policy, prompts, *a: (
        sampled.extend(prompts) or ode_sample(policy, prompts, *a)
    )
    run(tiny_policy(), sys.argv[2], batch_size=2, dist=d)
    distributed.shutdown(d)
    print(f"rank {d.rank} sampled {len(sampled)} images")
    distributed.leave(0)
if sys.argv[1:2] == ["setup"]:  # setup CHECKPOINT OUT: a rank that loaded other weights stops every rank
    from test_trainer import cfg_of

    from densegrpo_fast.policies import load_policy
    from densegrpo_fast.rewards import register
    from densegrpo_fast.trainer import heldout_rewards, run_calibration, setup

    class Ranked:  # a reward whose model's weights depend on the rank that built it
        def __init__(self):
            self.head = torch.nn.Linear(3, 1)
            torch.nn.init.constant_(self.head.weight, 1.0 + d.rank)

        def __call__(self, images, prompts):
            return self.head(images.mean((2, 3))).squeeze(1)

    register("_ranked")(Ranked)
    policy = load_policy("toy", sys.argv[2], "cpu")
    # another setting on one rank, or another file at the same (relative) path, stops the set-up at once
    lr = cfg_of(sys.argv[2], sys.argv[3], iterations=1, extra=[f"optim.lr={1e-4 * (1 + d.rank)}"])
    with pytest.raises(RuntimeError, match=r"the config differs between rank 0 and rank\(s\) \[1\] \(optim.lr: "
                       r"0.0001 on rank 0, 0.0002 on rank 1\): launch every process with the same config"):  # fmt: skip
        setup(lr, progress=False, policy=policy)
    real = distributed._source_digest  # another checkout on one node
    distributed._source_digest = lambda: real() if d.rank == 0 else "another checkout"
    with pytest.raises(RuntimeError, match=r"\(densegrpo_fast sources \(sha256\): '[0-9a-f]{64}' on rank 0, "
                       r"'another checkout' on rank 1\)"):  # fmt: skip
        setup(cfg_of(sys.argv[2], sys.argv[3], iterations=1), progress=False, policy=policy)
    distributed._source_digest = real
    own = Path(sys.argv[3]) / f"rank{d.rank}"
    own.mkdir()
    (own / "prompts.txt").write_text(f"a prompt of rank {d.rank}\n")
    os.chdir(own)
    file = cfg_of(
        sys.argv[2], Path(sys.argv[3]) / "file", iterations=1, extra=["prompts.dataset=prompts.txt"]
    )
    with pytest.raises(
        RuntimeError, match=r"\(prompts.dataset \(the file's sha256\): '[0-9a-f]{64}' on rank 0, "
    ):
        setup(file, progress=False, policy=policy)
    cfg = cfg_of(sys.argv[2], sys.argv[3], iterations=1, extra=["reward.name=_ranked"])
    with pytest.raises(
        RuntimeError, match=r"the reward models' weights differ between rank 0 and rank\(s\) \[1\]"
    ):
        setup(cfg, progress=False, policy=policy)
    with pytest.raises(  # the calibrate command loads its own models and compares them too
        RuntimeError, match=r"the reward models' weights differ between rank 0 and rank\(s\) \[1\]"
    ):
        run_calibration(cfg, progress=False)
    assert not (Path(cfg.run.output_dir) / "psi.json").exists()
    # the evaluation's own rewards, built at each evaluation, are compared there
    ranked = ["eval.rewards={ranked: {name: _ranked}}", "eval.num_prompts=2", "eval.num_steps=2"]
    run = setup(
        cfg_of(sys.argv[2], Path(sys.argv[3]) / "eval", iterations=1, extra=ranked),
        progress=False,
        policy=policy,
    )
    with pytest.raises(
        RuntimeError, match=r"eval.rewards.ranked's weights differ between rank 0 and rank\(s\) \[1\]"
    ):
        heldout_rewards(run)
    run.log.close()
    if d.rank == 1:
        with torch.no_grad():
            policy.text_encoder.pos[0, 0] += 1e-3  # (a frozen model: the text encoder's, not the transformer)
    with pytest.raises(
        RuntimeError, match=r"the loaded models' weights differ between rank 0 and rank\(s\) \[1\]"
    ):
        setup(cfg_of(sys.argv[2], sys.argv[3], iterations=1), progress=False, policy=policy)
    distributed.shutdown(d)
    print(f"rank {d.rank}: refused", flush=True)
    distributed.leave(0)
if sys.argv[1:2] == ["evalcmd"]:  # evalcmd SD3_DIR OUT: the eval command refuses ranks set up unlike rank 0
    import tiny_models as tiny

    from densegrpo_fast.evaluate import run_eval
    from densegrpo_fast.policies.sd3 import SD3Policy

    torch.set_num_threads(1)
    sd3, out = sys.argv[2], Path(sys.argv[3])
    ev = ["model.family=sd3", f"model.checkpoint={sd3}", f"model.resolution={tiny.RESOLUTION}", "model.num_threads=1",
          f"model.max_sequence_length={tiny.MAX_T5_TOKENS}", f"eval.dataset={out / 'prompts.txt'}", "eval.num_steps=2",
          "eval.num_prompts=null", "eval.shift=null", "eval.rewards={red: {name: redness}}",
          f"eval.output_dir={out / 'ev'}"]  # fmt: skip
    with pytest.raises(
        RuntimeError, match=r"the config differs between rank 0 and rank\(s\) \[1\] \(eval.seed: 0 "
    ):
        run_eval(None, [*ev, f"eval.seed={d.rank}"], progress=False)
    checkpoint = None
    if d.rank == 1:  # the same config with another --checkpoint: the base transformer with one weight moved
        moved = SD3Policy.load(sd3, resolution=tiny.RESOLUTION)
        with torch.no_grad():
            next(moved.transformer.parameters()).view(-1)[0] += 1e-3
        checkpoint = str(out / "moved.safetensors")
        moved.save(checkpoint)
    with pytest.raises(
        RuntimeError,
        match=r"the loaded models' weights differ between rank 0 and rank\(s\) \[1\]: every process",
    ):
        run_eval(None, ev, checkpoint=checkpoint, progress=False)
    assert not (out / "ev" / "scores.jsonl").exists()
    distributed.shutdown(d)
    print(f"rank {d.rank}: refused", flush=True)
    distributed.leave(0)
if sys.argv[1:2] == ["memory"]:
    from test_memory import _config
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from densegrpo_fast.memory import measure_run
    from densegrpo_fast.policies import load_policy

    torch.set_num_threads(1)
    out = Path(sys.argv[3])
    # every rank is given the same config (set-up compares them); rank 0 writes its prompt file first
    cfg = _config(sys.argv[2], out / "run", "fp32", sys.argv[4:]) if d.main else None
    distributed.barrier(d)
    cfg = cfg or _config(sys.argv[2], out / "run", "fp32", sys.argv[4:])
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # as test_memory counts
        policy = load_policy("sd3", sys.argv[2], "cpu", **cfg.model.adapter_options())
        measured = measure_run(cfg, policy)
    if d.main:
        (out / "rank0.json").write_text(json.dumps(measured))
    distributed.shutdown(d)
    distributed.leave(0)  # (the counted collectives keep gloo's threads alive past the shutdown)
assert d.world == 2 and d.enabled and d.main == (d.rank == 0)
r = d.rank

# rows: contiguous, equal slices in rank order
assert d.rows(8) == slice(4 * r, 4 * r + 4)
every = distributed.gather_rows(d, torch.full((3, 2), float(r)))
assert torch.equal(every, torch.tensor([[0.0] * 2] * 3 + [[1.0] * 2] * 3))

# sum_grads: several buckets (a 40-byte bucket holds ten fp32 values), two dtypes, a parameter without a
# gradient on one rank, which counts as zero, and one without a gradient on any rank, which keeps none
params = [torch.nn.Parameter(torch.zeros(n, dtype=dt)) for n, dt in [(3, torch.float32), (7, torch.float32),
          (12, torch.float32), (5, torch.float64), (4, torch.float32), (2, torch.float32)]]  # fmt: skip
for i, p in enumerate(params):
    if not (r == 1 and i == 2) and i != 5:
        p.grad = torch.arange(p.numel(), dtype=p.dtype) * (i + 1) + 100 * r
distributed.sum_grads(d, params, bucket_bytes=40)
for i, p in enumerate(params[:5]):
    ramp = torch.arange(p.numel(), dtype=p.dtype) * (i + 1)
    want = ramp if i == 2 else 2 * ramp + 100
    assert p.grad.dtype == p.dtype and torch.equal(p.grad, want), (i, p.grad, want)
assert params[5].grad is None

# sums, maxima, rank 0's objects, per-key means over micro-batches of every rank
assert torch.equal(distributed.sum_(d, torch.tensor([1, r])), torch.tensor([2, 1]))
assert distributed.max_(d, 0.5 + r, "cpu") == 1.5
assert distributed.broadcast(d, {"from": r}) == {"from": 0}
stats = {"loss": [1.0, 3.0], "kl": [2.0]} if r == 0 else {"loss": [5.0]}
assert distributed.mean_stats(d, stats) == {"loss": 3.0, "kl": 2.0}
# weighted by each micro-batch's pairs (rank 0: 1 and 3 pairs, rank 1: 2), and a maximum over every rank
weights = [1.0, 3.0] if r == 0 else [2.0]
stats = {"loss": [1.0, 3.0], "dev": [0.5, 0.25]} if r == 0 else {"loss": [5.0], "dev": [0.75]}
got = distributed.mean_stats(d, stats, weights=weights, maxima=("dev",))
assert got == {"loss": (1 * 1 + 3 * 3 + 5 * 2) / 6, "dev": 0.75}, got

# rank 0's one-off work: its result, or its error, on every rank
assert distributed.on_main(d, lambda: {"psi": r}) == {"psi": 0}


def fail(kind):
    raise kind("no psi table")


with pytest.raises(ValueError, match="^no psi table$"):
    distributed.on_main(d, lambda: fail(ValueError))
with pytest.raises(KeyError if r == 0 else RuntimeError, match="no psi table"):
    distributed.on_main(d, lambda: fail(KeyError))
distributed.check_same(d, ("at", 3), "the position", "fix it")
with pytest.raises(
    RuntimeError, match=r"the position differs between rank 0 \(3\) and rank\(s\) \[1\] \(\[4\]\): fix"
):
    distributed.check_same(d, 3 + r, "the position", "fix it")

# what the reward servers host: each rank reaches its own server (a url list), started with another reward
from densegrpo_fast.rewards import build_reward  # noqa: E402
from densegrpo_fast.rewards.remote import check_same_servers  # noqa: E402
from densegrpo_fast.rewards.server import RewardServer, kwargs_digest  # noqa: E402

server = RewardServer(build_reward("redness"), name="redness").start()
assert check_same_servers(d, {"r": build_reward("remote", url=server.url)}) == {
    "r": [{"reward": "redness", "kwargs_digest": kwargs_digest(None)}]
}
server.stop()
server = RewardServer(build_reward("redness"), name=["redness", "jpeg_compressibility"][r]).start()
with pytest.raises(RuntimeError, match=r"what the reward servers host \(their GET /health\) differs between rank 0 and "
                   r"rank\(s\) \[1\] \(r: \[\{'reward': 'redness', 'kwargs_digest': '[0-9a-f]{16}'\}\] on rank 0, "
                   r"\[\{'reward': 'jpeg"):  # fmt: skip
    check_same_servers(d, {"r": build_reward("remote", url=server.url)})
server.stop()
# the same reward with other --kwargs (a sum's weights of opposite signs) is told apart by its digest
server = RewardServer(build_reward("redness"), name="multi", kwargs={"weight": [1.0, -1.0][r]}).start()
with pytest.raises(
    RuntimeError, match=r"what the reward servers host .* differs between rank 0 and rank\(s\) \[1\]"
):
    check_same_servers(d, {"r": build_reward("remote", url=server.url)})
server.stop()

# parameters broadcast from rank 0 are in sync; a rank that drifts makes every rank raise
w = [torch.nn.Parameter(torch.randn(5) + r)]
distributed.broadcast_params(d, w)
distributed.check_in_sync(d, w, "w")
if r == 1:
    w[0].data[2] += 1e-6
with pytest.raises(RuntimeError, match=r"w differ between rank 0 and rank\(s\) \[1\]"):
    distributed.check_in_sync(d, w, "w")
with pytest.raises(RuntimeError, match=r"v differ between rank 0 and rank\(s\) \[1\]: fix it"):
    distributed.check_in_sync(d, [torch.ones(3)] * (2 if r == 1 else 1), "v", "fix it")  # one tensor more
distributed.check_in_sync(d, [torch.tensor([float("nan"), 1.0], dtype=torch.bfloat16)], "nan")  # NaN is NaN
distributed.check_in_sync(d, [torch.arange(4), torch.tensor([True, False])], "integers")
with pytest.raises(RuntimeError, match=r"b differ"):
    distributed.check_in_sync(d, [torch.tensor([1.0, 2.0]) if r == 0 else torch.tensor([2.0, 1.0])], "b")


# FSDP2: the whole state in one process's layout, and back into the shards; an optimizer that has not
# stepped saves (and resumes) no state, not a zero step that would shift Adam's bias correction
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 6), torch.nn.Linear(6, 6)])
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


torch.manual_seed(0)
net = Net()
whole = {n: t.clone() for n, t in net.state_dict().items()}
distributed.shard(net, torch.float32)
assert all(distributed.is_sharded(p) for p in net.parameters())
opt = torch.optim.AdamW(list(net.parameters()), lr=0.1)
saved = distributed.full_optimizer_state(net, opt)
assert not opt.state and (
    saved == {} if r else saved["state"] == {} and saved["param_groups"][0]["params"] == [0, 1, 2, 3, 4, 5]
)
distributed.load_full_state(net, opt, dict(whole), distributed.broadcast(d, saved))  # (it fills the dict)
assert not opt.state, "a resumed optimizer that never stepped holds no state"
net(torch.randn(3, 4) + r).square().sum().backward()
opt.step()
state, saved = distributed.full_model_state(net), distributed.full_optimizer_state(net, opt)
if r == 0:
    assert state.keys() == whole.keys() and not torch.equal(state["head.weight"], whole["head.weight"])
    assert sorted(saved["state"]) == [0, 1, 2, 3, 4, 5] and saved["state"][4]["exp_avg"].shape == (2, 6)
    assert all(s["step"].item() == 1 for s in saved["state"].values())
else:
    assert state == {} and saved == {}

distributed.barrier(d)
distributed.shutdown(d)
print(f"rank {r}: ok", flush=True)
distributed.leave(0)  # (FSDP2's mesh keeps gloo's threads alive past the shutdown)
