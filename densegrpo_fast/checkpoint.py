"""Atomic, resumable checkpoints: trainable weights, optimizer, EMA, RNG states, position, psi."""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"


def write_atomic(path: Path, write) -> Path:
    """Write ``path`` whole or not at all: ``write(tmp)`` fills a tmp file beside it (named by this process,
    so two jobs writing one path never share it), whose data is synced to the disk before the rename (a
    crash of the host, not only of the process, leaves the old file or the new one, never an empty one). A
    failed write (a full disk) leaves no tmp file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_stale_tmp(folder: Path) -> None:
    """Remove the tmp files of :func:`write_atomic` in ``folder`` whose writer no longer runs (a write cut by
    a SIGKILL: a checkpoint, an export, several GB each); another live job's write in progress stays."""
    for leftover in Path(folder).glob("*.*.tmp"):
        if not _process_alive(leftover.name.rsplit(".", 2)[1]):
            leftover.unlink(missing_ok=True)


def _process_alive(pid: str) -> bool:
    """Whether process ``pid`` (a tmp file's writer) runs on this machine. (A writer killed whose pid another
    process has taken since, after a container restart, keeps its file: rare, and safe.)"""
    try:
        if int(pid) == os.getpid():  # this process has written nothing yet: a leftover of an earlier one
            return False
        os.kill(int(pid), 0)
    except ValueError:  # (not a pid: not a tmp file of ours)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


_LOCKS: dict[str, object] = {}  # the directories this process holds: their lock files, open


def lock_dir(directory: Path, what: str) -> None:
    """Hold ``directory``'s lock (an exclusive ``flock`` of its ``.lock`` file) until :func:`unlock_dir`, or
    raise a ValueError naming the process that holds it: two jobs writing one run or evaluation directory
    interleave their files (duplicate score lines, checkpoints of two runs). The kernel drops the lock when
    its holder ends, however it ends. A second call of one process for one directory holds it already. Where
    ``fcntl`` is missing (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        return
    directory = Path(directory)
    key = str(directory.resolve())
    if key in _LOCKS:
        return
    directory.mkdir(parents=True, exist_ok=True)
    f = open(directory / ".lock", "a+")  # noqa: SIM115 (held open until unlock_dir, or the process ends)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise ValueError(
            f"{directory} is in use by another {what} (process {holder}, which holds {directory / '.lock'}): "
            "wait for it to end or stop it (a torchrun job killed by its launcher alone may leave its "
            "workers running), or give another directory"
        ) from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKS[key] = f


def unlock_dir(directory: Path) -> None:
    """Let go of ``directory``'s lock (:func:`lock_dir`), if this process holds it."""
    f = _LOCKS.pop(str(Path(directory).resolve()), None)
    if f is not None:
        f.close()  # (closing the file drops its flock)


def write_text_atomic(path: Path, text: str) -> None:
    """:func:`write_atomic` of ``text``: the run directory's records a resume reads back (config, psi table,
    metrics, evaluation files)."""
    write_atomic(path, lambda tmp: tmp.write_text(text))


def save_checkpoint(run_dir: Path, state: dict) -> Path:
    """Write ``state`` to run_dir/checkpoint.pt atomically (a kill mid-write leaves the previous one)."""
    return write_atomic(run_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def load_checkpoint(run_dir: Path) -> dict | None:
    path = run_dir / CHECKPOINT
    if not path.exists():
        return None
    # mmap: the ranks of a node that all resume read one page cache, not one copy each of the optimizer state
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise ValueError(
            f"{path} cannot be read ({type(e).__name__}: {e}): it is damaged (it is only ever replaced whole, "
            "so something outside the run changed it). Resume from a copy of it, or move it away to train the "
            "run directory's config again from the start"
        ) from None


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (LoRA adapters, or everything in full fine-tuning), not copied: ``torch.save``
    copies each to the host as it writes it, so a copy here would only add a second transformer on the device
    during a full fine-tuning's checkpoint."""
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


def check_trainable_names(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A ValueError unless the tensors of a checkpoint's ``state`` are the trained parameters of ``module``:
    none the model lacks, and none of its trained ones left out (it would resume at its initial value)."""
    params = dict(module.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(
            f"checkpoint holds {len(missing)} parameters this model lacks (e.g. {missing[0]!r}): was it written "
            "with another model or LoRA config? Resume with the run's own config.yaml"
        )
    absent = [n for n, p in params.items() if p.requires_grad and n not in state]
    if absent:
        raise ValueError(
            f"checkpoint lacks {len(absent)} of this model's trained parameters (e.g. {absent[0]!r}): was it "
            "written with another LoRA config, or another version of diffusers / peft that names them otherwise? "
            "Resume with the run's own config.yaml and the versions that wrote it"
        )


def own_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give ``optimizer`` copies of the host tensors it loaded from a checkpoint: read with ``mmap``, they are
    pages of the file (AdamW keeps its ``step`` tensors, and on a CPU its moments, as loaded), which would keep
    the replaced checkpoint's whole file mapped, and its disk space taken, until the process ends."""
    for st in optimizer.state.values():
        for key, value in st.items():
            if isinstance(value, torch.Tensor) and value.device.type == "cpu":
                st[key] = value.clone()


def load_trainable_state(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    check_trainable_names(module, state)
    params = dict(module.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)
