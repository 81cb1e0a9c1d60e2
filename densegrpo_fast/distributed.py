"""Data parallelism across processes launched by ``torchrun`` (torch.distributed; nothing home-made).

Every process runs the whole recipe on its share of the iteration's rows: the ``B = prompts x G`` rows are
cut into ``world`` contiguous slices, rank ``r`` rolls out, scores and trains slice ``r``. What crosses
processes is small:

* the rewards ``R`` [B, T+1] are gathered, so every rank computes the advantages of the whole batch (a group
  may span two ranks; the ``global_std`` option sees every row) and logs the batch's reward statistics;
* every rank plans the update of the whole batch as one process would (the same (row, step) pairs in the same
  optimizer steps) and trains the pairs of its own rows; the gradients are summed once per optimizer step,
  after the rank's micro-batches have accumulated (each loss is scaled by the step's row count over the whole
  batch, so the sum is one process's gradient);
* the calibration's step rewards (every rank calibrates psi on its share of each round's rows);
* a few scalars (the iteration's wall time, held-out score sums), and what rank 0 read or did alone (the
  psi table, the run directory's set-up), or its error (:func:`on_main`).

That is the replicated path (LoRA by default, full fine-tuning with ``model.sharding=replicate``): every
rank holds a whole copy of the model. Full fine-tuning otherwise, and LoRA with ``model.sharding=fsdp``,
shards the transformer with FSDP2 (the end of this module), which reduces the gradients itself in each
backward pass.

Why not wrap the transformer in ``DistributedDataParallel``: DDP needs every rank to run the same number of
synchronised backward passes, and here a rank's micro-batch count depends on its rows
(``grpo.filter_zero_advantage`` drops rows with zero advantage, so one rank can have none at all); and the
adapters' own API (``disable_adapters`` for the KL reference, parameter names in checkpoints) stays
unwrapped. The update makes one reduction per optimizer step (two per iteration in the recipes) after
minutes of rollout, so DDP's overlap of communication with the backward pass would save nothing one can
measure. Every rank applies the same summed gradient with the same optimizer, so the weights stay
identical; :func:`check_in_sync` verifies that at every checkpoint.

Rank 0 alone writes the run directory (config, psi table, metrics, checkpoints, grids, the exported policy);
with several nodes the run directory must be on a shared file system, as every rank reads the checkpoint
when resuming (and checks that it resumed where rank 0 did).

A collective fails after ``DENSEGRPO_DIST_TIMEOUT_MIN`` minutes (default 30), so that a job whose rank
died on another node does not hang for long (in a healthy job no rank waits for another that long).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import hashlib
import math
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from densegrpo_fast.policies.base import block_lists

#: Minutes a rank waits at a collective before failing.
TIMEOUT_ENV = "DENSEGRPO_DIST_TIMEOUT_MIN"


@dataclass(frozen=True)
class Dist:
    """This process's place in the job. ``world == 1``: a single process, and every helper is a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, total: int) -> slice:
        """This rank's contiguous slice of ``total`` rows (``total`` divisible by ``world``)."""
        n = total // self.world
        return slice(self.rank * n, (self.rank + 1) * n)

    def device(self, device: str) -> str:
        """The device this rank runs on: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
        if not self.enabled or torch.device(device).type != "cuda":
            return device
        if torch.device(device).index is not None:
            raise ValueError(
                f"model.device={device!r} names one GPU, but this job has {self.world} processes: set "
                "model.device=cuda and each process takes the GPU of its LOCAL_RANK"
            )
        return f"cuda:{_gpu_index(self.local_rank)}"


def _gpu_index(local_rank: int) -> int:
    """The GPU of local rank ``local_rank``: the rank itself, or cuda:0 where a scheduler shows each process one
    GPU through CUDA_VISIBLE_DEVICES. More processes than visible GPUs would put two on one GPU (NCCL refuses
    it, or the GPU runs out of memory): an error."""
    n = torch.cuda.device_count()
    if not n:
        return local_rank
    if n == 1:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local_world > 1 and not os.environ.get("CUDA_VISIBLE_DEVICES"):
            raise ValueError(
                f"this node runs {local_world} processes (LOCAL_WORLD_SIZE) but has one GPU: they would share it "
                "(NCCL refuses that); launch one process per GPU (torchrun --nproc-per-node 1)"
            )
        return 0  # (one GPU shown to each process, through CUDA_VISIBLE_DEVICES)
    if local_rank >= n:
        raise ValueError(
            f"LOCAL_RANK={local_rank}, but this process sees {n} GPUs (cuda:0 to cuda:{n - 1}): launch at most "
            f"{n} processes per node (torchrun --nproc-per-node), or show each process its own GPU with "
            "CUDA_VISIBLE_DEVICES"
        )
    return local_rank


#: A single process (the default wherever a ``Dist`` is optional).
SINGLE = Dist()


def world_size() -> int:
    """The number of processes torchrun launched (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def speaks() -> bool:
    """Whether this process reports to the user: the only one, or rank 0 of a torchrun job."""
    return world_size() == 1 or os.environ.get("RANK") == "0"


def check_device(device: str, key: str = "model.device") -> None:
    """A ValueError unless this machine has ``device`` (the setting ``key``), before any model work."""
    try:
        d = torch.device(device)
    except RuntimeError as e:  # e.g. "gpu"
        raise ValueError(f"{key}={device!r} is not a torch device ({e}): use cpu, cuda or cuda:N") from None
    if d.type != "cuda":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(
            f"{key}={device!r}, but this torch ({torch.__version__}) sees no CUDA device: set "
            f"{key}=cpu, or run on a machine with a GPU (and a CUDA build of torch)"
        )
    if d.index is not None and d.index >= count:
        raise ValueError(
            f"{key}={device!r}, but this machine has {count} CUDA device(s) (cuda:0 to cuda:{count - 1}): "
            "choose one of them"
        )


def from_env(device: str) -> Dist:
    """The job torchrun launched (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``), with its process group set up
    (NCCL on CUDA, gloo on the CPU); a plain ``Dist()`` when not launched by torchrun."""
    world = world_size()
    if world == 1:
        return SINGLE
    if "RANK" not in os.environ:
        raise ValueError(
            f"WORLD_SIZE={world} but RANK is not set: launch with torchrun (it sets both), or unset WORLD_SIZE "
            "to run one process"
        )
    d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(_gpu_index(d.local_rank))
        minutes = float(os.environ.get(TIMEOUT_ENV, "30"))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=minutes))
    if dist.get_world_size() != world or dist.get_rank() != d.rank:
        raise RuntimeError(
            f"a process group (rank {dist.get_rank()} of {dist.get_world_size()}) was set up before densegrpo_fast "
            f"with another rank or size than the environment's (RANK={d.rank}, WORLD_SIZE={world}): let "
            "densegrpo_fast set it up, or give the environment the group's rank and size"
        )
    return d


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int) -> NoReturn:
    """Ends a process of a torchrun job whose work is done: exit handlers run and output is flushed while
    the interpreter is whole, then the process exits with ``code`` without the interpreter's teardown.
    Python threads still running are not joined, and C-level stdio buffers are not flushed: the commands
    write and close their files before they return.

    Why: gloo's worker threads outlive ``destroy_process_group`` whenever something outside Python still
    holds the group. FSDP2's device mesh does, and so does a collective run under a ``TorchDispatchMode``
    (the memory tracker); both measured by counting the threads named ``pt_gloo_runloop`` after
    :func:`shutdown`. The tests' two-process jobs aborted after their work was done, at random, 3 times on
    loaded 2-core machines (2026-12; SIGABRT, "terminate called without an active exception"), and torchrun
    then reports the job failed. The likely mechanism (not traced): such a thread drops the last reference
    to a finished collective's tensors during the teardown and takes the GIL there."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def on_main(d: Dist, fn):
    """``fn()`` run by rank 0 alone (quick work: reading or writing the run directory) while the others wait;
    every rank returns its result (picklable), or raises its error: a ValueError stays a ValueError,
    anything else is a RuntimeError naming it."""
    if not d.enabled:
        return fn()
    box = [None]
    if d.main:
        try:
            result = fn()
            box = [(True, result)]
        except BaseException as e:  # (a KeyboardInterrupt or SystemExit too: the others must not wait it out)
            box = [(False, (type(e).__name__, str(e)))]
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    ok, payload = box[0]
    if ok:
        return payload
    name, message = payload
    raise ValueError(message) if name == "ValueError" else RuntimeError(f"rank 0 failed: {name}: {message}")


def check_same(d: Dist, value, what: str, fix: str) -> None:
    """Raise on every rank unless every rank's ``value`` (picklable, small) equals rank 0's. A dict is
    shown by the keys that differ (up to eight, of the first rank that differs)."""
    if not d.enabled:
        return
    every, bad = _unlike_rank_0(d, value)
    if not bad:
        return
    if isinstance(value, dict):
        r = bad[0]
        keys = [k for k in sorted({*every[0], *every[r]}) if every[0].get(k) != every[r].get(k)]
        shown = "; ".join(
            f"{k}: {every[0].get(k)!r} on rank 0, {every[r].get(k)!r} on rank {r}" for k in keys[:8]
        )
        more = f"; and {len(keys) - 8} more" if len(keys) > 8 else ""
        raise RuntimeError(f"{what} differs between rank 0 and rank(s) {bad} ({shown}{more}): {fix}")
    raise RuntimeError(
        f"{what} differs between rank 0 ({every[0]}) and rank(s) {bad} ({[every[r] for r in bad]}): {fix}"
    )


def check_same_config(d: Dist, cfg, files: tuple[str, ...] = ()) -> None:
    """Raise on every rank unless every rank was given rank 0's config (each setting, paths included), runs
    the same densegrpo-fast (version and sources) and torch version, and finds the same bytes in the files
    that the settings ``files`` name (prompt datasets; ``toy:`` splits are generated, not read). A node
    launched with another config file or override, or another checkout, or holding another copy of a dataset,
    would otherwise train apart from the others, or wait in a collective the others never reach."""
    if not d.enabled:
        return
    import densegrpo_fast
    from densegrpo_fast.config import flat

    mine = {"densegrpo_fast version": densegrpo_fast.__version__, "torch version": torch.__version__,
            "densegrpo_fast sources (sha256)": _source_digest()}  # fmt: skip
    mine |= flat(cfg.model_dump(mode="json"))
    for key in files:
        if mine[key] is None:
            continue
        path = Path(mine[key])
        if path.is_dir() and (path / "index.json").is_file():  # (a prompt cache: its index names every shard)
            path = path / "index.json"
        if path.is_file():
            mine[f"{key} (the file's sha256)"] = _file_digest(path)
    fix = (
        "launch every process with the same config file, overrides and package versions, and give every node "
        "the same files at the same paths (a node that keeps them elsewhere can link them there)"
    )
    check_same(d, mine, "the config", fix)


def _source_digest() -> str:
    """sha256 of this package's Python sources, the kernels' included: two checkouts of different commits
    differ, whatever ``__version__`` says."""
    import densegrpo_fast
    import densegrpo_fast.kernels

    h = hashlib.sha256()
    for module in (densegrpo_fast, densegrpo_fast.kernels):
        root = Path(module.__file__).parent
        for f in sorted(root.rglob("*.py")):
            h.update(f"{module.__name__}/{f.relative_to(root).as_posix()}\n".encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unlike_rank_0(d: Dist, value) -> tuple[list, list[int]]:
    """Every rank's ``value`` (picklable, small), and the ranks whose value is not rank 0's."""
    every = [None] * d.world
    dist.all_gather_object(every, value)
    return every, [r for r, v in enumerate(every) if v != every[0]]


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def gather_rows(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` [n, ...] (equal n) concatenated in rank order: [world * n, ...] on every rank."""
    if not d.enabled:
        return t
    parts = [torch.empty_like(t) for _ in range(d.world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def sum_(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks (a new tensor; ``t`` itself when single-process)."""
    if not d.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def max_(d: Dist, value: float, device) -> float:
    """The largest of the ranks' ``value`` (the same answer on every rank)."""
    if not d.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def broadcast(d: Dist, obj):
    """Rank 0's ``obj`` (picklable, small) on every rank."""
    if not d.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_stats(
    d: Dist, stats: dict[str, list[float]], weights: list[float] | None = None, maxima: tuple[str, ...] = ()
) -> dict[str, float]:
    """Each key's mean over the values every rank holds (a rank may hold none, or not every key), each value
    weighted by ``weights`` (aligned with every key's list: e.g. the pairs of each micro-batch, so that the
    result is the mean over pairs) when given; the largest value for the keys in ``maxima``."""

    def local(key: str, vals: list[float]) -> list[float]:
        if key in maxima:
            return [max(vals), 1.0]
        w = weights if weights is not None else [1.0] * len(vals)
        return [sum(v * x for v, x in zip(vals, w, strict=True)), float(sum(w))]

    every: list[dict[str, list[float]]] = [{key: local(key, vals) for key, vals in stats.items() if vals}]
    if d.enabled:
        mine = every[0]
        every = [{} for _ in range(d.world)]
        dist.all_gather_object(every, mine)
    total: dict[str, list[float]] = {}
    for part in every:
        for key, (s, n) in part.items():
            acc = total.setdefault(key, [-math.inf, 0.0] if key in maxima else [0.0, 0.0])
            acc[0] = max(acc[0], s) if key in maxima else acc[0] + s
            acc[1] += n
    return {key: s if key in maxima else s / n for key, (s, n) in total.items()}


def broadcast_params(d: Dist, params: list[torch.nn.Parameter], device=None) -> None:
    """Copy rank 0's values of ``params`` to every rank (freshly initialised adapters). ``device``: where the
    collective runs, for parameters elsewhere (a sharded run's adapters are made in host memory, where NCCL
    does not reach): each goes there and back; None: where each one is."""
    if not d.enabled:
        return
    with torch.no_grad():
        for p in params:
            if device is None or p.device == torch.device(device):
                dist.broadcast(p.data, src=0)
                continue
            staged = p.data.to(device, copy=True)
            dist.broadcast(staged, src=0)
            p.data.copy_(staged)


def sum_grads(d: Dist, params: list[torch.nn.Parameter], bucket_bytes: int = 1 << 27) -> None:
    """Sum the ranks' ``.grad`` of ``params`` in place, in buckets of at most ``bucket_bytes`` per dtype (one
    all-reduce per bucket). A parameter without a gradient on a rank (no rows this step) counts as zero
    there; one without a gradient on every rank keeps none (the optimizer skips it, as in one process)."""
    if not d.enabled or not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(has)
    params = [p for p, n in zip(params, has.tolist(), strict=True) if n]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        bucket, size = [], 0
        for p in group + [None]:
            if p is not None and (not bucket or size + p.grad.nbytes <= bucket_bytes):
                bucket.append(p)
                size += p.grad.nbytes
                continue
            flat = torch.cat([q.grad.reshape(-1) for q in bucket])
            dist.all_reduce(flat)
            for q, g in zip(bucket, flat.split([q.numel() for q in bucket]), strict=True):
                q.grad.copy_(g.view_as(q.grad))
            bucket, size = ([p], p.grad.nbytes) if p is not None else ([], 0)


def check_in_sync(
    d: Dist, tensors: list[torch.Tensor], what: str, fix: str | None = None, device=None
) -> None:
    """Raise on every rank if the ranks' ``tensors`` differ (exact checksums of their bits, compared as one
    digest per rank, so ranks holding different numbers of tensors are told apart too; sharded tensors differ
    by design and are left out). ``fix``: what the user should do (by default: report it, as the ranks were
    given the same weights). ``device``: where the checksums are computed (each tensor's own by default);
    host tensors go there a chunk at a time (a GPU sums an offloaded T5 in a second, one CPU thread in a
    minute)."""
    if not d.enabled:
        return
    _check_sums(d, _sums(tensors, device), what, fix)


def _sums(tensors: list[torch.Tensor], device=None) -> list[tuple[int, int]]:
    """:func:`_checksum` of each tensor of ``tensors`` not sharded, in their order."""
    with torch.no_grad():
        return [tuple(_checksum(t, device).tolist()) for t in tensors if not is_sharded(t)]


def _check_sums(d: Dist, sums: list[tuple[int, int]], what: str, fix: str | None) -> None:
    digest = hashlib.sha256(repr([list(s) for s in sums]).encode()).hexdigest()
    _, bad = _unlike_rank_0(d, digest)
    if bad:
        fix = fix or (
            "the processes no longer train the same model. Run every rank with the same config and package "
            "version; report it if they did"
        )
        raise RuntimeError(f"{what} differ between rank 0 and rank(s) {bad}: {fix}")


def _loaded_fix(where: str) -> str:
    return (
        f"every process must load the same weights: give {where} the same files on every node (a hub cache of "
        "another revision, or weights still being copied, differ)"
    )


def check_loaded(d: Dist, obj, what: str, where: str, device=None) -> None:
    """:func:`check_in_sync` of the weights of every torch model in ``obj`` (:func:`weights_of`), which each
    rank loaded itself from the files that the settings ``where`` name; ``what`` names them in the error."""
    if not d.enabled:
        return
    check_in_sync(d, weights_of(obj), f"{what} weights", _loaded_fix(where), device)


def weights_digest(obj, device=None, d: Dist | None = None, what: str = "", where: str = "") -> str:
    """A sha256 of the exact checksums (:func:`_checksum`) of every weight reachable from ``obj``
    (:func:`weights_of`), sorted: two loads of the same files agree on any device and in any order the
    modules are met in, and one changed weight changes it. What a resume compares with what its run began
    from (a model directory replaced at the same path, a hub cache moved to another revision). With ``d`` (a
    torchrun job), also :func:`check_loaded`'s comparison across the ranks, from the same checksums."""
    sums = _sums(weights_of(obj), device)
    if d is not None and d.enabled:
        _check_sums(d, sums, f"{what} weights", _loaded_fix(where))
    return hashlib.sha256(repr(sorted(sums)).encode()).hexdigest()


def weights_of(obj, depth: int = 6) -> list[torch.Tensor]:
    """The parameters and buffers of every ``torch.nn.Module`` reachable from ``obj`` (:func:`reachable`),
    each once: a policy's models (transformer, text encoders, VAE: its own, or its pipeline's), a reward's
    (PickScore's CLIP, each part of a weighted sum)."""
    found = {
        id(t): t for m in reachable(obj, torch.nn.Module, depth) for t in [*m.parameters(), *m.buffers()]
    }
    return list(found.values())


def reachable(obj, kind: type, depth: int = 6) -> list:
    """The instances of ``kind`` reachable from ``obj`` through attributes, lists, tuples and dicts,
    ``depth`` levels deep, each once, in the order met (the walk goes into neither them nor torch modules)."""
    found: dict[int, object] = {}
    seen: set[int] = set()

    def walk(o, left: int) -> None:
        if isinstance(o, kind):
            found.setdefault(id(o), o)
            return
        if getattr(type(o), "transparent", False):  # (a wrapper such as FrameMean: no level spent)
            walk(o.wrapped, left)
            return
        if isinstance(o, torch.nn.Module):
            return
        if left == 0 or id(o) in seen or isinstance(o, (str, bytes, int, float, torch.Tensor, type)):
            return
        seen.add(id(o))
        if isinstance(o, dict):
            children = list(o.values())
        elif isinstance(o, (list, tuple)):
            children = list(o)
        else:
            children = list(getattr(o, "__dict__", {}).values())
        for child in children:
            walk(child, left - 1)

    walk(obj, depth)
    return list(found.values())


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _checksum(t: torch.Tensor, device=None, chunk: int = 1 << 24) -> torch.Tensor:
    """Two int64 checksums of ``t``'s elements as bit patterns, their sum and their sum weighted by position
    (so a permutation shows), modulo 2**64: exact, so independent of the order of the additions (float sums
    are not, from one GPU model to another), and a NaN compares like any other value. Summed ``chunk``
    elements at a time on ``device`` (``t``'s own by default), so the int64 temporaries are at most 128 MiB
    each (T5's embedding: 132 M elements)."""
    flat = t.detach().reshape(-1)
    if flat.is_floating_point():
        flat = flat.view(_BITS[flat.element_size()])
    device = t.device if device is None else torch.device(device)
    total = torch.zeros(2, dtype=torch.int64, device=device)
    for start in range(0, flat.numel(), chunk):
        wide = flat[start : start + chunk].to(device).to(torch.int64)  # (moved in its own width)
        at = torch.arange(start + 1, start + 1 + wide.numel(), dtype=torch.int64, device=device)
        total[0] += wide.sum()
        total[1] += (wide * at).sum()
    return total


class _Mirror:
    """``torch.distributed`` as rank 0 of a job whose other ranks hold what rank 0 holds: what rank 0 would
    receive, made from its own values, with the allocations of the real calls (none: they write into the
    tensors given). See :func:`simulated_job`."""

    ReduceOp = dist.ReduceOp

    def __init__(self, world: int):
        self.world = world

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self, group=None) -> int:
        return self.world

    def get_rank(self, group=None) -> int:
        return 0

    def all_gather(self, parts, t, group=None, async_op=False):
        for p in parts:
            p.copy_(t)

    def all_gather_object(self, every, obj, group=None):
        every[:] = [copy.deepcopy(obj) for _ in every]

    def all_reduce(self, t, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if op == dist.ReduceOp.SUM:
            t.mul_(self.world)
        elif op not in (dist.ReduceOp.MAX, dist.ReduceOp.MIN):
            raise NotImplementedError(f"simulated all_reduce with {op}")

    def broadcast(self, t, src=0, group=None, async_op=False):
        pass  # rank 0's values stay

    def broadcast_object_list(self, objects, src=0, group=None, device=None):
        pass

    def barrier(self, group=None, async_op=False, device_ids=None):
        pass

    def destroy_process_group(self, group=None):
        pass


@contextlib.contextmanager
def simulated_job(world: int) -> Iterator[Dist]:
    """Within: this process is rank 0 of a ``world``-process torchrun job whose other ranks hold what rank 0
    holds, and nothing is sent. The trainer takes its share of the rows and runs the job's code (its gathers,
    sums and the rank-0 work), so rank 0's memory can be counted in one process (``densegrpo-fast memory
    --nproc N``). This module's helpers answer through :class:`_Mirror`; FSDP2 runs on torch's fake process
    group (``backend="fake"``: its collectives leave their outputs as they are), so a sharded transformer
    holds and gathers its shards as in the job, with other values. (The swap reaches those who look the helpers
    up on this module when they call, as the trainer does.)"""
    global dist, world_size, from_env

    if dist.is_initialized():
        raise RuntimeError("simulated_job: this process is already in a process group (a torchrun job?)")
    from torch.testing._internal.distributed.fake_pg import FakeStore  # (registers the "fake" backend)

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    saved = dist, world_size, from_env
    dist = _Mirror(world)
    world_size = lambda: world  # noqa: E731
    from_env = lambda device: Dist(0, world, 0)  # noqa: E731
    try:
        yield Dist(0, world, 0)
    finally:
        dist, world_size, from_env = saved
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- FSDP2
#
# Full fine-tuning under torchrun shards the transformer (and its frozen KL reference) with FSDP2
# (``model.sharding``): each process holds 1/N of every parameter, gradient and AdamW moment, and the layers
# are gathered for each call. The weights train as fp32 shards (the master weights) while the calls run in the
# model's dtype, and the gradients are summed in fp32. LoRA with ``model.sharding=fsdp`` shards the frozen base
# in its dtype and the fp32 adapters, each gathered as it is. The transformer comes from host memory, a unit at
# a time, so no device holds it whole. Every call of a sharded module is a collective, so every
# rank makes the same calls: the rollout does by construction (equal rows), the update pads a rank's shorter list
# of micro-batches with calls whose loss is multiplied by zero, the held-out eval a rank's shorter share of the
# prompts with samples it does not score. Checkpoints hold the whole tensors in the single-process layout, so a
# sharded run resumes with any process count, or in one process.


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def fsdp_available() -> bool:
    """Whether this torch has FSDP2 with summed gradients (``fully_shard`` and
    ``set_force_sum_reduction_for_comms``: torch 2.8 and later)."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard  # noqa: F401
    except ImportError:
        return False
    return hasattr(FSDPModule, "set_force_sum_reduction_for_comms")


def shard(
    module: torch.nn.Module, compute_dtype: torch.dtype | None = None, *, keep_dtypes: bool = False
) -> None:
    """FSDP2 over every process, in place: each block of ``module``'s top-level ``ModuleList``s (the
    transformer blocks) is one unit, the rest is the root's.

    ``compute_dtype``: the trained module's weights are kept as fp32 shards (upcast unit by unit, so one
    whole fp32 block at a time is in memory) and gathered in ``compute_dtype`` for its calls, with gradients
    summed in fp32; ``module.compute_dtype`` records it for the policy adapter, which casts the inputs itself
    as it does for an unsharded model (FSDP casts nothing: the calls are the unsharded model's, bit for bit).
    None keeps the parameters as they are (the frozen reference). Gradients are summed over the ranks, not
    averaged: each rank's loss is already scaled by the whole batch's counts. Every unit, the root too, frees
    its gathered weights after each call, so weights written into the shards (the EMA swap) are what the
    next call gathers.

    ``keep_dtypes``: every parameter is kept and gathered in its own dtype, so the calls are the unsharded
    model's bit for bit: a LoRA run's transformer (its frozen base in ``compute_dtype``, its adapters in fp32,
    as unsharded; only they have gradients, summed in fp32), or a frozen one (the ``calibrate`` command's)."""
    if getattr(module, "expert_names", ()):
        raise ValueError(
            "model.sharding: this checkpoint has two experts (Wan 2.2 A14B), which FSDP2 does not shard here: a "
            "call runs one expert's blocks for some rows and the other's for the rest, and each process must "
            "gather the same units at once; set model.sharding=replicate (each process holds both experts)"
        )
    kept = None if keep_dtypes else compute_dtype
    for blocks in block_lists(module).values():
        for block in blocks:
            _shard_unit(block, kept)
    _shard_root(module, kept)
    if keep_dtypes:
        module.compute_dtype = compute_dtype
    # FLUX's transformer returns a view; FSDP warns that an in-place op on it would skip the gradients'
    # gathering hook. The engine never changes a model's output in place (the sharded tests compare the
    # trained weights with one process's), so the warning would only alarm.
    warnings.filterwarnings("ignore", r"FSDP2-wrapped module \(\w+\) returned a view tensor", UserWarning)


def sharded_frozen_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``module`` (the KL reference), sharded as :func:`shard` shards it and built block by
    block: besides ``module``, one whole block of the copy is in memory at a time, not the whole copy that
    ``copy.deepcopy`` then :func:`shard` would hold (a second 24 GB for FLUX.1's transformer in bf16)."""
    lists = block_lists(module)
    shared = {id(block): block for blocks in lists.values() for block in blocks}
    frozen = copy.deepcopy(module, shared)  # everything but the blocks, which are ``module``'s own for now
    for name, blocks in lists.items():
        mine = frozen.get_submodule(name)
        for i, block in enumerate(blocks):
            one = copy.deepcopy(block).requires_grad_(False)
            _shard_unit(one, None)
            mine[i] = one
    if any(id(m) in shared for m in frozen.modules()):  # (a block reachable otherwise than by its list)
        raise RuntimeError("the KL reference still shares a block with the trained model: please report it")
    frozen.requires_grad_(False)
    _shard_root(frozen, None)
    return frozen


def _mixed_precision(compute_dtype: torch.dtype | None):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if compute_dtype is None or compute_dtype == torch.float32:
        return MixedPrecisionPolicy(cast_forward_inputs=False)
    return MixedPrecisionPolicy(
        param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
    )


def _shard_unit(m: torch.nn.Module, compute_dtype: torch.dtype | None) -> None:
    from torch.distributed.fsdp import fully_shard

    if compute_dtype is not None:
        for p in m.parameters():
            if not is_sharded(p):
                p.data = p.data.float()
    fully_shard(m, mp_policy=_mixed_precision(compute_dtype))


def _shard_root(module: torch.nn.Module, compute_dtype: torch.dtype | None) -> None:
    """The root unit of :func:`shard`, its blocks sharded already, and the settings of every unit."""
    from torch.distributed.fsdp import FSDPModule

    _shard_unit(module, compute_dtype)
    module.set_reshard_after_forward(True)  # the root keeps its weights gathered after a call otherwise
    if compute_dtype is not None:
        module.compute_dtype = compute_dtype
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain sum (gloo has no pre-multiplied sum)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every rank calls: the whole tensors of sharded ``tensors``, on the CPU, gathered one at a time (rank 0's
    answer; the others get an empty dict)."""
    out = {}
    with torch.no_grad():
        for name, t in tensors.items():
            whole = t.full_tensor() if is_sharded(t) else t.detach()
            if dist.get_rank() == 0:
                out[name] = whole.cpu()
    return out


def full_model_state(module: torch.nn.Module, *, frozen: bool = False) -> dict[str, torch.Tensor]:
    """Every rank calls: the whole trainable parameters of sharded ``module`` on the CPU, gathered one at a
    time (rank 0's answer). ``frozen``: its whole state, the frozen parameters and the buffers too (a LoRA run's
    export, whose base weights the merge needs); a checkpoint gathers only what trains."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if frozen:
        return get_model_state_dict(module, options=_full_options())
    return full_tensors({n: p for n, p in module.named_parameters() if p.requires_grad})


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Every rank calls: the whole AdamW state of sharded ``module`` on the CPU in ``optimizer.state_dict()``'s
    own layout (parameters numbered in the optimizer's order), which a single process loads too (rank 0's
    answer; the others get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not optimizer.state:  # no step yet (the same on every rank): get_optimizer_state_dict would take a
        return optimizer.state_dict() if dist.get_rank() == 0 else {}  # zero step, and Adam's count with it
    state = get_optimizer_state_dict(module, optimizer, options=_full_options())
    if dist.get_rank() != 0:
        return {}
    number = {name: i for i, name in enumerate(_optimizer_names(module, optimizer))}
    return {
        "state": {number[name]: s for name, s in state["state"].items()},
        "param_groups": [{**g, "params": [number[n] for n in g["params"]]} for g in state["param_groups"]],
    }


def load_full_state(
    module: torch.nn.Module, optimizer: torch.optim.Optimizer, trainable: dict, optim_state: dict
) -> None:
    """Every rank calls with the same whole state (read from the checkpoint, its names checked): each keeps
    its shards (and ``trainable``'s entries are replaced by them)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    names = _optimizer_names(module, optimizer)
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(module, trainable, options=options)
    if not optim_state["state"]:  # saved before any step: hyperparameters only (see full_optimizer_state)
        optimizer.load_state_dict(optim_state)
        return
    by_name = {
        "state": {names[i]: s for i, s in optim_state["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in optim_state["param_groups"]
        ],
    }
    set_optimizer_state_dict(module, optimizer, by_name, options=options)


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``whole`` (the same on every rank) cut as sharded ``like`` is, on its device."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole.to(like.device, like.dtype), like.device_mesh, like.placements)


def _optimizer_names(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of ``optimizer``'s parameters in its own order (parameters of ``module``)."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
