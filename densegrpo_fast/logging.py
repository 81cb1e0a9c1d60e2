"""Run-directory outputs: metrics.jsonl, TensorBoard events, Weights & Biases, sample grids and the reward
curve."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from densegrpo_fast.checkpoint import write_text_atomic

WANDB_ID_FILE = "wandb_id.txt"  # the W&B run id of a run directory: a resumed run logs to the same W&B run
WANDB_MISSING = (
    "run.wandb.enabled=true needs the wandb package, which is not installed: pip install "
    "'densegrpo-fast[wandb]', or set run.wandb.enabled=false"
)  # (checked where W&B starts and by `validate`, not by every config load: eval and resume need no wandb)


def scalars(record: dict) -> Iterator[tuple[str, float]]:
    """The plottable values of a metrics record (iteration aside): finite numbers, lists of numbers (one per
    step) as ``key/step{k}``, and mappings of numbers (one per reward component) as ``key/{name}``."""
    for key, value in record.items():
        if key == "iteration":
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            yield key, value
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            for k, v in enumerate(value):
                yield f"{key}/step{k}", v
        elif isinstance(value, dict):
            for name, v in value.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    yield f"{key}/{name}", v


class MetricsLog:
    """Appends one JSON object per iteration to metrics.jsonl and mirrors scalars to TensorBoard and, with
    ``wandb`` (a :class:`densegrpo_fast.config.WandbSection` that is enabled), to Weights & Biases.

    metrics.jsonl is the record a resumed run continues: :meth:`truncate_after` drops what a killed run wrote
    after its last checkpoint, and TensorBoard is told to hide it. A W&B run cannot drop points, so a resumed run logs
    those iterations again into the same W&B run (its id is kept in ``wandb_id.txt``); the charts' x axis is
    ``iteration``.
    """

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = True,
        wandb: Any = None,
        config: dict | None = None,
        resume: bool = False,
    ):
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard_dir = run_dir / "tensorboard" if tensorboard else None
        self.writer = None  # opened at the first write, after truncate_after has said where the run goes on
        self.purge_step: int | None = None
        self.wandb = None
        if wandb is not None and wandb.enabled:
            self.wandb = _start_wandb(run_dir, wandb, config, resume)

    def truncate_after(self, iteration: int) -> None:
        """Drop entries beyond ``iteration`` (a killed run wrote some after its last checkpoint); -1 drops all.
        TensorBoard is told to hide them too (``purge_step``: the events written before, from step
        ``iteration + 1`` on). Both of TensorBoard's loaders honour it: the Rust data server (checked by hand,
        benchmarks/RESULTS.md) and the Python one, which purges from a run's second restart marker on, so a
        fresh run writes the first (-1 here: step 0)."""
        self.purge_step = iteration + 1
        if not self.path.exists():
            return
        kept = [json.dumps(r) for r in self.read() if r["iteration"] <= iteration]
        write_text_atomic(self.path, "".join(ln + "\n" for ln in kept))  # (a kill here keeps the history)

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())  # on disk before the checkpoint that follows it (which is fsynced)
        values = dict(scalars(record))
        it = record["iteration"]
        if (writer := self._tensorboard()) is not None:
            for key, value in values.items():
                writer.add_scalar(key, value, it)
            writer.flush()
        if self.wandb is not None:
            self.wandb.log({"iteration": it, **values})

    def _tensorboard(self):
        """The TensorBoard writer, opened at the first record or image (after :meth:`truncate_after`); None
        without TensorBoard."""
        if self.writer is None and self.tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tensorboard_dir), purge_step=self.purge_step)
        return self.writer

    def image(self, key: str, path: Path, iteration: int) -> None:
        """A PNG written to the run directory (a sample grid), also shown under ``key`` in TensorBoard's images
        (at step ``iteration``) and in W&B."""
        if (writer := self._tensorboard()) is not None:  # (the file's own bytes: no decode and encode again)
            from PIL import Image
            from tensorboard.compat.proto.summary_pb2 import Summary

            with Image.open(path) as picture:  # (its header alone is read)
                (width, height), channels = picture.size, len(picture.getbands())
            image = Summary.Image(
                height=height, width=width, colorspace=channels, encoded_image_string=path.read_bytes()
            )
            writer._get_file_writer().add_summary(
                Summary(value=[Summary.Value(tag=key, image=image)]), iteration
            )
            writer.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({"iteration": iteration, key: wandb.Image(str(path))})

    def video(self, key: str, path: Path, iteration: int) -> None:
        """A GIF written to the run directory (a video family's samples), also shown in W&B under ``key``."""
        if self.wandb is not None:
            import wandb

            self.wandb.log({"iteration": iteration, key: wandb.Video(str(path))})

    def read(self) -> list[dict]:
        """The records of metrics.jsonl (:func:`read_jsonl`)."""
        return read_jsonl(self.path)

    def close(self, failed: bool = False) -> None:
        """Flush and close; ``failed``: the run stopped on an error (its W&B run is marked failed)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish(exit_code=1 if failed else 0)
            self.wandb = None


def _start_wandb(run_dir: Path, settings, config: dict | None, resume: bool):
    """The W&B run of ``run_dir``: a new one (its id written to ``wandb_id.txt``), or with ``resume`` the one
    whose id the run directory holds. Files go to ``run_dir/wandb`` (an offline run's, for ``wandb sync``)."""
    try:
        import wandb
    except ImportError as e:  # (ValueError: the command line says it without a traceback)
        raise ValueError(WANDB_MISSING) from e
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resume and id_file.exists() else None  # None: W&B names a new one
    try:
        run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.name or run_dir.resolve().name,
            tags=list(settings.tags),
            mode=settings.mode,
            id=run_id,
            resume="allow",
            dir=str(run_dir),
            config=config,
            allow_val_change=True,  # a resumed run may extend run.iterations
            reinit="create_new",  # one W&B run per training run, also when a process trains several
        )
    except Exception as e:
        raise ValueError(
            f"run.wandb: wandb.init failed ({type(e).__name__}: {e}). Log in first (`wandb login`, or set "
            "WANDB_API_KEY), or set run.wandb.mode=offline and upload later with `wandb sync "
            f"{run_dir / 'wandb'}/offline-run-*`; or set run.wandb.enabled=false"
        ) from e
    write_text_atomic(id_file, run.id + "\n")
    run.define_metric("iteration")
    run.define_metric("*", step_metric="iteration")
    return run


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file the engine appends to (metrics, evaluation scores, the pretraining
    log); none if it does not exist. A last line cut short (the process was killed, or the disk filled, in
    the middle of a write) is left out with a warning; any other line that is not a JSON object is an
    error."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for n, ln in enumerate(lines, 1):
        if not ln.strip():
            continue
        try:
            record = json.loads(ln)
            why = None if isinstance(record, dict) else f"a {type(record).__name__}, not an object"
        except ValueError as e:
            if n == len(lines):
                warnings.warn(f"{path}: its last line was cut short in a write; left out", stacklevel=2)
                break
            why = e
        if why is not None:
            raise ValueError(
                f"{path}, line {n}, is not a JSON object ({why}): the file was changed outside the run; "
                "mend or delete that line"
            )
        out.append(record)
    return out


class NullLog:
    """What ranks other than 0 of a torchrun job log to: nothing (rank 0 writes the batch's metrics)."""

    def truncate_after(self, iteration: int) -> None:
        pass

    def write(self, record: dict) -> None:
        pass

    def image(self, key: str, path: Path, iteration: int) -> None:
        pass

    def video(self, key: str, path: Path, iteration: int) -> None:
        pass

    def read(self) -> list[dict]:
        return []

    def close(self, failed: bool = False) -> None:
        pass


def video_strips(videos: torch.Tensor, frames: int = 4) -> torch.Tensor:
    """Videos [N, 3, F, H, W] as images [N, 3, H, k W]: ``frames`` frames of each (k of them, evenly spaced from
    the first to the last, as the rewards score them), side by side."""
    from densegrpo_fast.rewards.video import frame_indices

    idx = frame_indices(videos.shape[2], frames)
    return torch.cat([videos[:, :, f] for f in idx], dim=-1)


def gif_preview(videos: torch.Tensor, count: int = 4, side: int = 256) -> torch.Tensor:
    """The first ``count`` videos [N, 3, F, H, W], scaled down (area averaging) so that no side exceeds ``side``
    pixels: a sample grid's GIF of 16 whole videos at 480 x 832 took a review's run 233 s to write, 123 MB."""
    videos = videos[:count]
    n, c, F, H, W = videos.shape
    scale = min(1.0, side / max(H, W))
    if scale == 1.0:
        return videos
    size = (max(1, round(H * scale)), max(1, round(W * scale)))
    frames = videos.transpose(1, 2).reshape(n * F, c, H, W).float()
    small = torch.nn.functional.interpolate(frames, size=size, mode="area")
    return small.view(n, F, c, *size).transpose(1, 2)


def save_gif(videos: torch.Tensor, path: Path, ncols: int = 4, fps: float = 16.0) -> None:
    """Videos [N, 3, F, H, W] in [0, 1] as one animated GIF, tiled ``ncols`` to a row (a single video: itself)."""
    from PIL import Image

    n, _, F, H, W = videos.shape
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    tiles = videos.new_zeros(nrows * ncols, 3, F, H, W)
    tiles[:n] = videos.clamp(0, 1)
    # [rows, cols, 3, F, H, W] -> [F, rows H, cols W, 3]
    grid = tiles.view(nrows, ncols, 3, F, H, W).permute(3, 0, 4, 1, 5, 2).reshape(F, nrows * H, ncols * W, 3)
    arr = (grid * 255).round().to(torch.uint8).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    first, *rest = (Image.fromarray(a) for a in arr)
    first.save(path, save_all=True, append_images=rest, duration=round(1000 / fps), loop=0)


def save_image_grid(images: torch.Tensor, captions: list[str], path: Path, ncols: int = 8) -> None:
    """Images [N, 3, H, W] in [0, 1] with a caption each, as one PNG; videos [N, 3, F, H, W] as strips of four
    frames (:func:`video_strips`), one to a row, each cell as wide as its strip (a 480 x 832 frame then shows at
    about 200 px high)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 1.7  # inches a column
    if images.ndim == 5:
        images, ncols = video_strips(images), 1
        width *= images.shape[-1] / images.shape[-2]
    n = images.shape[0]
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 1.9 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy(), interpolation="nearest")
            ax.set_title(captions[i], fontsize=5.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_reward_curve(records: list[dict], path: Path) -> None:
    """Training reward (R_T mean per iteration) and held-out evaluations against iteration and wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "reward_mean" in r]
    evals = [r for r in records if "eval_reward" in r]
    eval_keys = sorted({k for r in evals for k in r if k.startswith("eval_")})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "iteration", "iteration"), (axes[1], "wall_s", "wall time (s)")):
        if train:
            xs, ys = [r[key] for r in train], [r["reward_mean"] for r in train]
            ax.plot(xs, ys, label="train reward (R_T mean)", alpha=0.35, color="tab:blue")
            w = max(1, len(ys) // 20)  # a few prompts per iteration make R_T noisy: show its trend too
            if w > 1:
                smooth = [
                    sum(ys[max(0, i - w + 1) : i + 1]) / len(ys[max(0, i - w + 1) : i + 1])
                    for i in range(len(ys))
                ]
                ax.plot(xs, smooth, label=f"train reward, mean of last {w}", color="tab:blue")
        for i, ek in enumerate(eval_keys):
            pts = [(r[key], r[ek]) for r in evals if ek in r]
            ax.plot(*zip(*pts, strict=True), "o-", color=f"C{i + 1}", label=f"held-out {ek[5:]} (ODE, EMA)")
        ax.set(xlabel=label, ylabel="reward")
        ax.legend(fontsize=7)
    fig.suptitle("densegrpo-fast training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


STEP_PANELS = (  # (title, how one record's per-step lists give the panel's values, diverging around 0)
    ("mean reward gain dR", lambda r: r["dR_mean"], True),
    ("gains - losses (share of rows; calibration balances it)",
     lambda r: [p - n for p, n in zip(r["dR_pos_frac"], r["dR_neg_frac"], strict=True)], True),
    ("mean |dR| (how much the step decides)", lambda r: r["dR_abs_mean"], False),
)  # fmt: skip


def step_reward_grid(records: list[dict], max_columns: int = 30) -> tuple[list[tuple[int, int]], list]:
    """The dense-reward records (those with per-step dR) binned into at most ``max_columns`` consecutive runs
    of iterations, each averaged (a few prompts an iteration make one record noisy): the (first, last)
    iteration of each bin, and per panel of :data:`STEP_PANELS` a [steps, bins] list of lists."""
    recs = [r for r in records if r.get("dR_mean")]
    if not recs:
        return [], [[] for _ in STEP_PANELS]
    size = math.ceil(len(recs) / max_columns)
    bins = [recs[i : i + size] for i in range(0, len(recs), size)]
    spans = [(b[0]["iteration"], b[-1]["iteration"]) for b in bins]
    panels = []
    for _, values, _ in STEP_PANELS:
        cols = [[sum(vs) / len(vs) for vs in zip(*(values(r) for r in b), strict=True)] for b in bins]
        panels.append([list(row) for row in zip(*cols, strict=True)])  # [steps, bins]
    return spans, panels


def plot_step_rewards(records: list[dict], path: Path) -> bool:
    """Where along the trajectory the reward is decided, over training (dense modes): per denoising step and
    iteration, the mean dR, the balance of gains and losses, and the mean |dR|. False (nothing written) for
    a sparse run, whose records have no per-step rewards."""
    spans, panels = step_reward_grid(records)
    if not spans:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = len(panels[0])
    steps = 1 + max((k for k, row in enumerate(panels[-1]) if any(row)), default=0)
    panels = [grid[:steps] for grid in panels]  # the steps after the last that ever moved R left out
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.2 * len(panels), max(3.0, 1.2 + 0.28 * steps)), squeeze=False
    )
    x_edges = [a - 0.5 for a, _ in spans] + [spans[-1][1] + 0.5]  # each bin spans its iterations
    y_edges = [k - 0.5 for k in range(steps + 1)]
    for ax, (title, _, diverging), grid in zip(axes[0], STEP_PANELS, panels, strict=True):
        if diverging:
            bound = max(1e-12, max(abs(v) for row in grid for v in row))
            mesh = ax.pcolormesh(x_edges, y_edges, grid, cmap="RdBu", vmin=-bound, vmax=bound)
        else:
            mesh = ax.pcolormesh(x_edges, y_edges, grid, cmap="viridis", vmin=0)
        fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.02)
        ax.set_yticks(range(0, steps, max(1, steps // 10)))
        ax.invert_yaxis()  # step 0 (pure noise) on top
        ax.set(title=title, xlabel="iteration", ylabel="denoising step")
        ax.title.set_fontsize(9)
    size = spans[0][1] - spans[0][0] + 1
    title = "dense rewards per step" + (f", means over up to {size} iterations" if size > 1 else "")
    if steps < total:
        title += f"; steps {steps}-{total - 1}: dR = 0 throughout, not shown"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
