"""Run-directory outputs: metrics.jsonl, TensorBoard events, sample grids and the reward curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


class MetricsLog:
    """Appends one JSON object per iteration to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                self.writer = None

    def truncate_after(self, iteration: int) -> None:
        """Drop entries beyond ``iteration`` (a killed run wrote some after its last checkpoint)."""
        if not self.path.exists():
            return
        kept = [
            ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["iteration"] <= iteration
        ]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            it = record["iteration"]
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration" and math.isfinite(value):
                    self.writer.add_scalar(key, value, it)
                elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                    for k, v in enumerate(value):
                        self.writer.add_scalar(f"{key}/step{k}", v, it)
            self.writer.flush()

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class NullLog:
    """What ranks other than 0 of a torchrun job log to: nothing (rank 0 writes the batch's metrics)."""

    def truncate_after(self, iteration: int) -> None:
        pass

    def write(self, record: dict) -> None:
        pass

    def read(self) -> list[dict]:
        return []

    def close(self) -> None:
        pass


def save_image_grid(images: torch.Tensor, captions: list[str], path: Path, ncols: int = 8) -> None:
    """Images [N, 3, H, W] in [0, 1] with a caption each, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = images.shape[0]
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.7 * ncols, 1.9 * nrows), squeeze=False)
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
