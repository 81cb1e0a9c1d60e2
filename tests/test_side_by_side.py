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
    # the folder's psi table is not reused by a call with other settings
    again = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "side_by_side.py"), "--seeds", "0", "--budget-s", "0.5",
         "--variants", "densegrpo", "--out", str(tmp_path / "sbs"), *overrides, "noise.level=0.5"],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert (
        again.returncode != 0
        and "was calibrated for" in again.stderr
        and "give a fresh --out" in again.stderr
    )


def test_a_failed_run_is_left_out_of_the_table_and_named(tmp_path):
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("side_by_side", ROOT / "benchmarks" / "side_by_side.py")
    sbs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sbs)
    ev = lambda r: {"iteration": 0, "wall_s": 0.0, "eval_reward": r}  # noqa: E731
    results = {"densegrpo": [
        {"seed": 0, "exit": 0, "evals": [ev(0.4), ev(0.6)], "iterations": 10, "s_per_iteration": 2.0},
        {"seed": 1, "exit": 1, "evals": [ev(0.4), ev(0.1)], "iterations": 2, "s_per_iteration": 2.0},
    ]}  # fmt: skip
    sbs.write_table(results, types.SimpleNamespace(budget_s=60.0, seeds=[0, 1]), tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert (
        "| densegrpo | 0 | 10 | 2.0 | 0.400 → 0.600 (+0.200) |" in table
    )  # seed 1's cut-short run not in it
    assert "Left out, failed: densegrpo seed 1 (exit 1)" in table


def test_the_win_rate_variant_wraps_the_config_s_own_reward():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from side_by_side import variant_overrides
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    config = str(ROOT / "configs" / "toy_geneval.yaml")
    got = variant_overrides("densegrpo-winrate", config, ["reward.kwargs={mode: partial}"])
    assert got == [
        "reward.name=win_rate",
        'reward.kwargs={"reward": {"name": "toy_geneval", "kwargs": {"mode": "partial"}}}',
    ]
    assert variant_overrides("flow-grpo", config, []) == ["dense.mode=sparse", "noise.kind=uniform"]
    from densegrpo_fast.config import TrainConfig, load_config

    cfg = load_config(TrainConfig, config, got)  # (the overrides parse as the command line takes them)
    assert cfg.reward.name == "win_rate" and cfg.reward.kwargs["reward"]["kwargs"] == {"mode": "partial"}


def test_every_variant_makes_a_config_the_checks_take():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from side_by_side import VARIANTS, variant_overrides
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from densegrpo_fast.config import TrainConfig, load_config

    config = str(ROOT / "configs" / "toy_geneval.yaml")
    objectives = {}
    for name in VARIANTS:
        cfg = load_config(TrainConfig, config, variant_overrides(name, config, []))
        objectives[name] = cfg.grpo.objective
    assert (
        objectives["diffusionnft"] == "nft"
        and objectives["awm"] == "awm"
        and objectives["densegrpo"] == "grpo"
    )
