"""benchmarks/real_model_iteration.py: its --tiny path (the same code as the full-size GPU run: real
adapters, the trainer's setup / collect / update, the probes) runs and reports sound numbers, and its
full-size component configs have the published parameter counts."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tolerances import assert_on_policy

from densegrpo_fast.policies import PRETRAINED

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "real_model_iteration.py"
#: transformer rows per latent row: SD3, Qwen-Image, Z-Image and FLUX.2 [klein] batch CFG, FLUX.1-dev has none
CFG_ROWS = {
    "sd3": 2,
    "flux": 1,
    "flux_kontext": 1,
    "qwen_image": 2,
    "qwen_image_edit": 2,
    "z_image": 2,
    "flux2_klein": 2,
    "wan": 2,
}
#: prompts x group size
RECIPE_ROWS = {
    "sd3": 48 * 24,
    "flux": 48 * 24,
    "flux_kontext": 48 * 24,
    "qwen_image": 48 * 16,
    "qwen_image_edit": 48 * 16,
    "z_image": 48 * 24,
    "flux2_klein": 48 * 24,
    "wan": 16 * 8,
}


def finite_numbers(tree) -> bool:
    if isinstance(tree, dict):
        return all(finite_numbers(v) for v in tree.values())
    if isinstance(tree, list):
        return all(finite_numbers(v) for v in tree)
    return not isinstance(tree, float) or math.isfinite(tree)


@pytest.mark.parametrize(
    "family",
    list(PRETRAINED),
)
def test_tiny_iteration_through_the_trainer(family, tmp_path):
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--family", family, "--tiny", "--compare-sparse", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-2000:]
    assert "dense / sparse:" in out.stdout
    res = json.loads((tmp_path / f"real_{family}_tiny.json").read_text())
    assert finite_numbers(res), res
    s = res["settings"]
    B, T, cap = s["rows"], s["steps"], s["max_rows_per_call"]
    assert (B, T, cap) == (8, 4, 8)
    assert set(res["modes"]) == {"dense", "sparse"}
    for mode, rec in res["modes"].items():
        assert "error" not in rec, rec
        m = rec["metrics"]
        assert_on_policy(m, exact=False)  # the update's first ratio is on-policy
        assert m["rows_trained"] > 0 and m["grad_norm"] > 0
        ph = rec["phases"]
        assert set(ph) == {"encode", "rollout", "reward", "update"}
        assert all(p["seconds"] > 0 for p in ph.values())
        assert rec["seconds"] >= sum(p["seconds"] for p in ph.values()) * 0.99
        # the rollout's calls respect sampling.max_rows_per_call; completions ride them when dense
        latent_rows = B * T * (T + 1) // 2 if mode == "dense" else B * T
        assert ph["rollout"]["velocity_rows"] == latent_rows
        assert ph["rollout"]["max_velocity_rows"] <= cap
        assert ph["rollout"]["transformer_rows"] == CFG_ROWS[family] * latent_rows
        assert ph["reward"]["images_decoded"] == (B * (T + 1) if mode == "dense" else B)
        # update: each trained row once through the policy and once through the reference (KL), in
        # batches of grpo.train_batch_size
        assert ph["update"]["velocity_rows"] == 2 * m["rows_trained"]
        assert ph["update"]["max_velocity_rows"] <= s["train_batch_size"]
        assert rec["estimate_at_recipe_batch"]["rows"] == RECIPE_ROWS[family]
        tflops = (
            ph["rollout"]["transformer_rows"] * res["flops_per_transformer_row"] / ph["rollout"]["seconds"]
        )
        assert rec["rollout_tflop_per_s"] == pytest.approx(tflops / 1e12)
    # then the end of a run: one held-out batch (eval.batch_size prompts, eval.num_steps ODE steps), the export
    end = res["end_of_run"]["phases"]
    assert set(end) == {"evaluation", "export"} and all(p["seconds"] > 0 for p in end.values())
    assert end["evaluation"]["velocity_rows"] == 4 * 4 and end["evaluation"]["images_decoded"] == 4
    assert end["evaluation"]["transformer_rows"] == CFG_ROWS[family] * 4 * 4
    assert "velocity_rows" not in end["export"]
    assert res["flops_per_transformer_row"] > 0  # (the count itself: benchmarks/test_host_vs_device.py)
    ratio = res["dense_over_sparse"]
    assert ratio["images_decoded"] == T + 1
    assert ratio["rollout_transformer_rows"] == (T + 1) / 2


def _load_script():
    spec = importlib.util.spec_from_file_location("real_model_iteration", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_merged_rollout_measures_the_same_rollout_with_the_adapters_merged_then_not(tmp_path, monkeypatch):
    """``--merged-rollout`` (for lora.merge_for_sampling's speed on a GPU), in process on the tiny SD3: three
    rollouts of the same rows, the trainer's merge applied in the second only, and the report's line."""
    import contextlib

    from densegrpo_fast import trainer

    merge_flags, lora_merged = [], trainer.lora_merged

    @contextlib.contextmanager
    def recording(run):
        merge_flags.append(run.cfg.lora.merge_for_sampling)
        with lora_merged(run):
            yield

    monkeypatch.setattr(trainer, "lora_merged", recording)
    threads = torch.get_num_threads()
    try:
        code = _load_script().main(["--family", "sd3", "--tiny", "--merged-rollout", "--no-evaluate-export",
                                    "--out", str(tmp_path)])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    assert merge_flags == [False, True, False]  # one sampling context per rollout: unmerged, merged, unmerged
    res = json.loads((tmp_path / "real_sd3_tiny.json").read_text())
    assert res["modes"] == {} and finite_numbers(res)
    rec = res["merged_rollout"]
    first, un, me = rec["unmerged_first"], rec["unmerged"], rec["merged"]
    assert (first["merged"], un["merged"], me["merged"]) == (False, False, True)
    for r in (first, un, me):
        assert set(r["phases"]) == {"encode", "rollout", "reward"}
        assert r["phases"]["rollout"]["transformer_rows"] == 2 * 8 * 4 * 5 // 2  # CFG x B x T(T+1)/2
    assert rec["unmerged_over_merged"] == pytest.approx(
        un["phases"]["rollout"]["seconds"] / me["phases"]["rollout"]["seconds"]
    )
    report = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "report.py"), "--csv", str(tmp_path / "none.csv"),
         "--iterations", str(tmp_path / "real_sd3_tiny.json")], capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert f"{rec['unmerged_over_merged']:.2f}x" in report.stdout and "no mode finished" not in report.stdout


@pytest.mark.parametrize(
    "family",
    [*PRETRAINED, "wan_a14b"],  # (and the other checkpoints built in: architectures.BUILT_IN_REPOS)
)
def test_full_size_configs_have_the_published_sizes(family):
    """Built on the meta device (no memory, no time): every component of SD3.5-Medium / FLUX.1-dev /
    Qwen-Image / Z-Image / Wan 2.1 has its checkpoint's parameter count (FLUX.2 [klein] 4B's and Wan 2.1 1.3B's
    transformer entries were counted from their built-in configs, so that the other fields stay checked; no independent count was at hand), so the GPU run and the memory estimate measure the real
    shapes."""
    bench = _load_script()
    parts = bench.full_size_components(family, torch.device("meta"), torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32  # the build restores it
    counts = bench.param_counts(parts)
    assert counts.keys() == bench.KNOWN_PARAMS[family].keys()
    for name, known in bench.KNOWN_PARAMS[family].items():
        assert counts[name] == pytest.approx(known, rel=0.01), name
    assert parts["vae"].dtype == torch.float32 and parts["transformer"].dtype == torch.bfloat16


def test_the_recipe_extrapolation_scales_the_trajectory_not_the_updates_fixed_state():
    """The update's calls hold gradients, AdamW's state and a micro-batch's activations (fixed sizes): only
    what the update holds at its start (the rollout's data) grows with the batch; the rollout's trajectory
    grows call by call, so its calls' starts count."""
    bench = _load_script()
    phase = {"seconds": 1.0, "peak_allocated_gib": 20.0, "allocated_start_gib": 11.0,
             "max_allocated_at_call_gib": 15.0}  # fmt: skip
    est = bench.extrapolate({"seconds": 2.0, "phases": {"rollout": phase, "update": phase}}, 8, 80, 10.0)
    assert est["scale"] == 10 and est["seconds"] == 20.0
    assert est["phases"]["rollout"]["peak_allocated_gib"] == 20.0 + 5.0 * 9  # (15 - 10) per batch
    assert est["phases"]["update"]["peak_allocated_gib"] == 20.0 + 1.0 * 9  # (11 - 10) per batch
    assert est["peak_allocated_gib"] == 65.0
