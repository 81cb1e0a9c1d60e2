"""The ablation script runs every variant on the same budget and writes its table and plot."""

import subprocess
import sys
from pathlib import Path

import torch

from densegrpo_fast.policies.toy import ToyArch, ToyPolicy

ROOT = Path(__file__).resolve().parents[1]


def test_side_by_side_smoke(tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.safetensors"
    ToyPolicy(ToyArch(num_layers=1, num_heads=2, head_dim=16, text_dim=32, pooled_dim=32)).save(ckpt)
    overrides = [
        f"model.checkpoint={ckpt}", "reward.name=redness", "reward.kwargs={}", "eval.rewards={}",
        "prompts.prompts_per_iteration=2", "sampling.group_size=2", "sampling.num_steps=3", "eval.num_prompts=6",
        "eval.num_steps=2", "noise.calibration.iterations=2", "run.tensorboard=false", "run.sample_grid_every=0",
    ]  # fmt: skip
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "side_by_side.py"), "--seeds", "0", "--budget-s", "0.5",
         "--eval-every", "1", "--variants", "densegrpo", "flow-grpo", "--out", str(tmp_path / "sbs"), *overrides],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    table = (tmp_path / "sbs" / "table.md").read_text()
    assert "| densegrpo |" in table and "| flow-grpo |" in table and "nan" not in table
    assert (tmp_path / "sbs" / "score_vs_time.png").exists()
    assert (tmp_path / "sbs" / "psi_seed0.json").exists()
