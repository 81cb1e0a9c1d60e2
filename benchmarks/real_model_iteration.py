"""Memory and time of real DenseGRPO iterations on SD3.5-Medium, FLUX.1-dev, Qwen-Image, Z-Image or FLUX.2 [klein]
4B, at full size with random weights.

    python benchmarks/real_model_iteration.py --family sd3 --prompts 2 --compare-sparse --out /tmp/bench
    python benchmarks/real_model_iteration.py --family flux --prompts 1 --group-size 8 --out /tmp/bench
    python benchmarks/real_model_iteration.py --family sd3 --tiny --out /tmp/bench    # CPU, seconds (CI)
    python benchmarks/real_model_iteration.py --family flux --meta                    # parameter counts only
    python benchmarks/real_model_iteration.py --family qwen_image --prompts 1 --group-size 8 --out /tmp/bench \
        model.offload_text_encoders=true      # Qwen-Image, a 38 GiB bf16 transformer (not in gpu_suite.sh)

Weights do not change memory or time, so the pipeline's components are built from the configs below, with
random weights, directly on the device in their run dtype (bf16; the VAE fp32 as the adapters load it): no
download, no checkpoint on disk, seconds instead of minutes of CPU initialisation for ~7B (SD3.5-M + T5-XXL)
or ~17B (FLUX.1-dev + T5-XXL) parameters. The tokenizers are the offline single-character stand-ins
(densegrpo_fast/policies/architectures.py) padding to the real sequence lengths (CLIP 77, T5 256 for SD3 /
512 for FLUX), so every tensor has its real shape.

They go into the real adapters (``SD3Policy`` / ``FluxPolicy`` / ``QwenImagePolicy`` / ``ZImagePolicy`` /
``Flux2KleinPolicy``), and the iteration is
the trainer's own:
``trainer.setup`` (LoRA, AdamW, EMA; the policy injected), ``trainer.collect`` (prompt encoding, the SDE
rollout with its in-flight completions, decoding and reward) and ``trainer.update`` (recomputed log-probs,
clipped loss + KL against the LoRA-disabled reference, gradient accumulation, optimizer steps), with the
recipe's settings from configs/sd35m_pickscore.yaml, configs/flux_pickscore.yaml,
configs/qwen_image_pickscore.yaml, configs/z_image_pickscore.yaml, configs/flux2_klein_pickscore.yaml or
configs/wan21_pickscore.yaml.
Overridable: prompts
per iteration, G, T, ``sampling.max_rows_per_call``, ``grpo.train_batch_size`` and any ``key=value``. Two
settings always differ from the recipe: the reward is the registry's ``redness`` (on the device, nearly
free: the engine is measured, not PickScore) and the noise is uniform a = 0.7 (no calibration run; a
calibrated psi only changes the per-step std, not the cost).

Measured per phase (encode, rollout with completions, decode + reward, update), after a device
synchronisation at each boundary: seconds, peak allocated / reserved GPU memory, transformer calls and rows
(CFG rows included), velocity calls and their largest batch, images decoded; the rollout's throughput in
TFLOP/s (its transformer rows times the matmul and attention FLOPs of one, counted on one real call with
torch's FlopCounterMode, over its seconds); and the trainer's metrics
(the on-policy check: in fp32 ``ratio_dev_first``, the first PPO ratio of the update, 1 within 1e-5, which the
--tiny test asserts; in bf16 the rollout's and the update's calls have different batch sizes, so different
GEMM kernels may round differently, the update recomputes the old log-probs, and ``rollout_lp_dev`` says how
far the rollout's are from them; the full-size run reports it rather than asserting it). With
``--compare-sparse`` the same prompts and noise also run sparse (Flow-GRPO: one decode per trajectory) and
the dense / sparse cost ratios are reported. A run at fewer rows than the recipe (a 10-minute GPU call
cannot hold the recipe's 1152 trajectories: 20-40 minutes on an H100 by the estimate in gpu_suite.sh)
is extrapolated to the recipe's batch: seconds scale with the rows, memory by the part of it that grows
with the rows (the allocated memory when each transformer call starts, above what the loaded models hold).
Those extrapolations are labelled as estimates. A CUDA out-of-memory error is recorded with its phase,
not raised, and the next mode still runs.

Writes ``<out>/real_<family>[_tiny].json`` (rewritten after every mode, so a killed run keeps what it
measured) and prints a table. Exit status 1 if a mode failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from densegrpo_fast.config import TrainConfig, load_config, resolution_record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models: the --tiny pipelines
sys.path.insert(0, str(ROOT / "benchmarks"))  # host_vs_device: the FLOP count of a transformer row

RECIPES = {
    "sd3": ROOT / "configs" / "sd35m_pickscore.yaml",
    "flux": ROOT / "configs" / "flux_pickscore.yaml",
    "flux_kontext": ROOT / "configs" / "flux_kontext_vlm_judge.yaml",
    "qwen_image": ROOT / "configs" / "qwen_image_pickscore.yaml",
    "qwen_image_edit": ROOT / "configs" / "qwen_image_edit_vlm_judge.yaml",
    "z_image": ROOT / "configs" / "z_image_pickscore.yaml",
    "flux2_klein": ROOT / "configs" / "flux2_klein_pickscore.yaml",
    "wan": ROOT / "configs" / "wan21_pickscore.yaml",
}
GIB = 2**30

from densegrpo_fast.policies import VIDEO, architectures  # noqa: E402  (architectures: the full-size configs)
from densegrpo_fast.policies.architectures import DEFAULT_SEQ, KNOWN_PARAMS  # noqa: E402


@contextlib.contextmanager
def _built_on(device: torch.device, dtype: torch.dtype):
    """Modules constructed inside are allocated (and randomly initialised) on ``device`` in ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def full_size_components(family: str, device: torch.device, dtype: torch.dtype) -> dict:
    """The pipeline's models at full size with random weights, built on ``device``: the transformer and text
    encoders in ``dtype``, the VAE in fp32 (as ``DiffusersPolicy`` loads it)."""

    def make(name, ctor):
        dt = torch.float32 if name == "vae" else dtype
        with _built_on(device, dt):
            module = ctor()
        # buffers computed in fp32 (SD3's position table) follow; nn.Module.to skips diffusers' from_pretrained
        # advice, which does not apply to a model built in place
        return torch.nn.Module.to(module, device=device, dtype=dt)

    return {name: make(name, ctor) for name, ctor in architectures.full_size_models(family).items()}


def build_pipeline(family: str, tiny: bool, device: torch.device, dtype: torch.dtype, seed: int):
    """The family's pipeline (``StableDiffusion3Pipeline``, ``FluxPipeline``, ``FluxKontextPipeline``,
    ``QwenImagePipeline``,
    ``ZImagePipeline``, ``Flux2KleinPipeline``, ``WanPipeline``) with random components: tiny (tests/tiny_models.py, fp32 on the CPU) or full size on
    ``device``, with the stand-in tokenizers."""
    import diffusers
    import tiny_models

    from densegrpo_fast.policies import adapter_class

    if tiny:
        return getattr(tiny_models, f"{family}_pipeline")(seed)
    torch.manual_seed(seed)
    parts = full_size_components(family, device, dtype)
    pipeline = getattr(diffusers, adapter_class(family).pipeline_name)
    return pipeline(
        scheduler=architectures.scheduler(family), **architectures.stand_in_tokenizers(family), **parts
    )


def param_counts(modules: dict) -> dict[str, float]:
    """Millions of parameters per component."""
    return {
        name: round(sum(p.numel() for p in m.parameters()) / 1e6, 3)
        for name, m in modules.items()
        if isinstance(m, torch.nn.Module)
    }


# ------------------------------------------------------------------------------------------ instrumentation


class Probe:
    """Clocks, counts and memory of what the trainer's functions do with the policy, changing nothing they
    compute: wrappers on the policy's ``encode_prompts`` / ``velocity`` / ``decode`` (instance attributes,
    which the trainer, the rollout and the reward path call) and a forward pre-hook on the transformer.

    Phases follow the trainer's order: ``encode`` (prompt embeddings) ends when ``encode_prompts`` returns,
    ``rollout`` (SDE steps + in-flight completions) at the first ``decode``, ``reward`` (decodes + reward)
    when ``collect`` returns, ``update`` when ``update`` returns. Each boundary synchronises the device.
    """

    def __init__(self, policy, device: torch.device):
        self.cuda = device.type == "cuda"
        self.phase = "load"
        self.t0 = time.perf_counter()
        self.phases: dict[str, dict] = {}
        self.counts: dict[str, Counter] = {}
        self._start_allocated = 0

        encode, velocity, decode = policy.encode_prompts, policy.velocity, policy.decode

        def encode_prompts(prompts, **kw):
            out = encode(prompts, **kw)
            if self.phase == "encode":
                self.mark("rollout")
            return out

        def counted_velocity(x, sigma, cond, guidance_scale=1.0):
            c = self._count()
            c["velocity_calls"] += 1
            c["velocity_rows"] += x.shape[0]
            c["max_velocity_rows"] = max(c["max_velocity_rows"], x.shape[0])
            if self.cuda:  # memory held when a call starts: the part that grows with the batch (no sync)
                c["max_allocated_at_call"] = max(c["max_allocated_at_call"], torch.cuda.memory_allocated())
            return velocity(x, sigma, cond, guidance_scale)

        def counted_decode(latents):
            if self.phase == "rollout":
                self.mark("reward")
            c = self._count()
            c["decode_calls"] += 1
            c["images_decoded"] += latents.shape[0]
            return decode(latents)

        policy.encode_prompts, policy.velocity, policy.decode = (
            encode_prompts,
            counted_velocity,
            counted_decode,
        )
        policy.transformer.register_forward_pre_hook(self._transformer_call, with_kwargs=True)

    def _count(self) -> Counter:
        return self.counts.setdefault(self.phase, Counter())

    def _transformer_call(self, module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        c = self._count()
        c["transformer_calls"] += 1
        c["transformer_rows"] += len(x)  # (a tensor's rows, or Z-Image's list of latents)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def start(self, phase: str) -> None:
        """Begin ``phase`` with fresh peak-memory statistics (the previous phase is dropped unrecorded)."""
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self.phase, self.t0 = phase, time.perf_counter()
        self.phases, self.counts = {}, {}
        self._start_allocated = torch.cuda.memory_allocated() if self.cuda else 0

    def mark(self, next_phase: str) -> None:
        """End the current phase (seconds after a sync, peak memory) and begin ``next_phase``."""
        self.sync()
        now = time.perf_counter()
        rec = {"seconds": now - self.t0}
        if self.cuda:
            rec["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
            rec["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
            rec["allocated_start_gib"] = self._start_allocated / GIB
            rec["allocated_end_gib"] = torch.cuda.memory_allocated() / GIB
            torch.cuda.reset_peak_memory_stats()
            self._start_allocated = torch.cuda.memory_allocated()
        rec.update(self.counts.get(self.phase, {}))
        if "max_allocated_at_call" in rec:
            rec["max_allocated_at_call_gib"] = rec.pop("max_allocated_at_call") / GIB
        self.phases[self.phase] = rec
        self.phase, self.t0 = next_phase, now


# ------------------------------------------------------------------------------------------ the measurement

COLOURS = ("red", "green", "blue", "yellow")
THINGS = ("cat", "dog", "car", "house", "tree", "bird", "boat", "cup", "clock", "horse", "chair", "apple")


def write_prompts(path: Path, edits: bool = False) -> Path:
    """48 short lowercase prompts that the offline tokenizers take whole, the tiny CLIP's 16 tokens too (the
    length does not matter: the encoders pad every prompt to their full sequence). ``edits``: as edit records
    (``path`` a .jsonl file), each with a source image of its own (random pixels; each is resized to the
    sampled size, so its own size does not matter)."""
    import json

    import numpy as np
    from PIL import Image

    lines = [f"{c} {t}" for t in THINGS for c in COLOURS]
    path.parent.mkdir(parents=True, exist_ok=True)
    if edits:
        rng = np.random.default_rng(0)
        for i in range(len(lines)):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                path.parent / f"source{i}.png"
            )
        lines = [
            json.dumps({"prompt": f"make it {t}", "image": f"source{i}.png"}) for i, t in enumerate(lines)
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def prompts_path(family: str, work: Path) -> Path:
    """Where the run's prompts are: a text file, or edit records for an editing family."""
    from densegrpo_fast.policies import EDITING

    return work / ("prompts.jsonl" if EDITING.get(family) == "required" else "prompts.txt")


def config_for(args, mode: str, work: Path, device: torch.device) -> TrainConfig:
    prompts_file = prompts_path(args.family, work)
    over = [
        f"model.device={device}", f"prompts.dataset={prompts_file}", f"eval.dataset={prompts_file}",
        "reward.name=redness", "reward.kwargs={}", "eval.rewards={}", "noise.kind=uniform", "noise.level=0.7",
        f"dense.mode={mode}", f"run.output_dir={work / 'run'}",
        "run.tensorboard=false", "run.wandb.enabled=false", "run.deterministic=false", f"run.seed={args.seed}",
    ]  # fmt: skip
    if args.tiny:
        import tiny_models

        over += [
            "model.dtype=fp32", f"model.resolution={tiny_models.RESOLUTION}",
            f"model.max_sequence_length={tiny_models.MAX_T5_TOKENS}", "model.num_threads=1",
            "prompts.prompts_per_iteration=2", "sampling.group_size=4", "sampling.num_steps=4",
            "sampling.reward_waves=1",  # (the Kontext recipe's 4 waves need 4 prompts)
            "sampling.max_rows_per_call=8", "grpo.train_batch_size=4", "eval.num_steps=4", "eval.batch_size=4",
            *(["model.frames=5"] if args.family in VIDEO else []),  # (Wan: 2 latent frames)
        ]  # fmt: skip
    for key, value in (
        ("prompts.prompts_per_iteration", args.prompts),
        ("sampling.group_size", args.group_size),
        ("sampling.num_steps", args.steps),
        ("sampling.max_rows_per_call", args.max_rows_per_call),
        ("grpo.train_batch_size", args.train_batch_size),
    ):
        if value is not None:
            over.append(f"{key}={value}")
    batch = load_config(TrainConfig, RECIPES[args.family], [*over, *args.overrides]).eval.largest_batch()
    # one held-out batch (the evaluation measured at the end), as the memory estimate takes it; the user's own
    # overrides still come last
    return load_config(
        TrainConfig, RECIPES[args.family], [*over, f"eval.num_prompts={batch}", *args.overrides]
    )


def warm_up(run, probe: Probe) -> None:
    """One forward + backward at the update's batch and one decode, so that the measured phases do not pay
    for CUDA / cuBLAS / cuDNN initialisation; gradients are dropped, no optimizer step."""
    policy, cfg = run.policy, run.cfg
    n = min(cfg.grpo.train_batch_size, cfg.rows_per_iteration)
    cond = policy.encode_prompts(run.prompts.sample(1, 10**6) * n)
    x = torch.randn(n, *policy.latent_shape, device=policy.device)
    sigma = run.schedule.sigmas[:1].expand(n)
    policy.velocity(x, sigma, cond, cfg.sampling.guidance_scale).square().mean().backward()
    run.optimizer.zero_grad(set_to_none=True)
    policy.decode(x[:1])
    probe.sync()


def transformer_row_flops(policy) -> int:
    """FLOPs of one transformer row as the rollout runs it (adapters on): the matmuls and attention of one
    real call of one latent row without a CFG batch, counted by torch's FlopCounterMode. Zero embeddings of
    the real sequence length stand in for the text encoders' output (no offloaded encoder is moved).

    Under ``force_eager``: a compiled block (``model.compile``) called under a dispatch mode would be marked
    by dynamo to run eagerly for the rest of the process, and the run would measure eager code."""
    from host_vs_device import CPU_ATTENTION_FLOPS, zero_cond
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *policy.latent_shape, device=policy.device)
    sigma = torch.full((1,), 0.5, device=policy.device)
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    eager = stance("force_eager") if stance is not None else contextlib.nullcontext()
    with torch.no_grad(), eager, counter:
        policy.velocity(x, sigma, zero_cond(policy, 1, cfg_on=False, device=policy.device), 1.0)
    return counter.get_total_flops()


def rollout_tflops(rec: dict, flops_per_row: int) -> float:
    """The rollout's matmul and attention throughput: its transformer rows (CFG rows included) times the
    FLOPs of one, over its seconds (which include the SDE steps and the completions' Euler steps)."""
    ph = rec["phases"]["rollout"]
    return ph["transformer_rows"] * flops_per_row / ph["seconds"] / 1e12


def measure_mode(run, probe: Probe, iterations: int) -> dict:
    """``iterations`` trainer iterations (collect + update); the phases and metrics of the last one."""
    from densegrpo_fast.trainer import collect, update

    cfg = run.cfg
    seconds = []
    for it in range(iterations):
        prompts = run.prompts.sample(cfg.prompts.prompts_per_iteration, it)
        probe.start("encode")
        t0 = time.perf_counter()
        ro, cond, R, trainer_times = collect(run, prompts, it)
        probe.mark("update")
        metrics = update(run, ro, cond, R, it)
        probe.mark("done")
        seconds.append(time.perf_counter() - t0)
        reward_mean = (
            (run.reward_fn.combine(R) if R.dim() == 3 else R)[:, -1].mean().item()
        )  # (per_reward: parts)
        del ro, cond, R
    return {
        "mode": cfg.dense.mode,
        "seconds": seconds[-1],
        "seconds_per_iteration": seconds,
        "phases": dict(probe.phases),
        "trainer_times": trainer_times,
        "reward_mean": reward_mean,
        "metrics": metrics,
    }


def measure_rollout(run, probe: Probe, merged: bool) -> dict:
    """One rollout (``collect``: prompt encoding, the rollout, the reward) with the LoRA adapters merged for
    sampling (``lora.merge_for_sampling``) or not; no update: the update is the same either way."""
    from densegrpo_fast.trainer import collect

    cfg = run.cfg.model_copy(deep=True)
    cfg.lora.merge_for_sampling = merged
    run = dataclasses.replace(run, cfg=cfg)
    prompts = run.prompts.sample(cfg.prompts.prompts_per_iteration, 0)
    probe.start("encode")
    t0 = time.perf_counter()
    ro, cond, R, _ = collect(run, prompts, 0)
    probe.mark("done")
    rec = {"merged": merged, "seconds": time.perf_counter() - t0, "phases": dict(probe.phases)}
    rec["reward_mean"] = (run.reward_fn.combine(R) if R.dim() == 3 else R)[:, -1].mean().item()
    del ro, cond, R
    return rec


def measure_end(run, probe: Probe) -> dict:
    """The rest of a run, as the trainer makes it at its end: ``evaluation`` (one held-out batch of the eval
    section's sampler, EMA weights in, LoRA merged) and ``export`` (the EMA transformer copied to the host and
    merged there; its files are not written: the device holds none of them)."""
    from densegrpo_fast.trainer import ema_heldout_rewards, export_policy

    policy = run.policy
    probe.start("evaluation")
    ema_heldout_rewards(run)
    probe.mark("export")
    methods = [m for m in ("save", "save_lora") if hasattr(policy, m)]
    for m in methods:  # (instance attributes: the export's copy of the policy has them too)
        setattr(policy, m, lambda *args, **kwargs: None)
    try:
        export_policy(run, run.dir / "policy_ema.safetensors")
    finally:
        for m in methods:
            delattr(policy, m)
    probe.mark("done")
    return {"phases": dict(probe.phases)}


def extrapolate(result: dict, rows: int, recipe_rows: int, base_gib: float | None) -> dict:
    """The recipe's batch from a smaller one: seconds x rows ratio; peak memory + the batch-proportional part
    (allocated memory above the loaded run's) x (ratio - 1). That part is what the phase holds at its start,
    or, for the phases before the update, at a transformer call's start (the rollout's trajectory grows
    call by call). Not the update's calls: they also hold the adapters' gradients, AdamW's state and the
    policy forward's activations under the KL reference's call, all of fixed size (``train_batch_size``), which
    23x (SD3.5-M) or 143x (FLUX.1) would turn into hundreds of GiB."""
    scale = recipe_rows / rows
    est = {"rows": recipe_rows, "scale": scale, "seconds": result["seconds"] * scale, "phases": {}}
    for name, ph in result["phases"].items():
        e = {"seconds": ph["seconds"] * scale}
        if base_gib is not None and "peak_allocated_gib" in ph:
            at_call = ph.get("max_allocated_at_call_gib", 0.0) if name != "update" else 0.0
            held = max(ph["allocated_start_gib"], at_call) - base_gib
            e["peak_allocated_gib"] = ph["peak_allocated_gib"] + max(held, 0.0) * (scale - 1)
        est["phases"][name] = e
    peaks = [e["peak_allocated_gib"] for e in est["phases"].values() if "peak_allocated_gib" in e]
    if peaks:
        est["peak_allocated_gib"] = max(peaks)
    return est


def git_sha() -> str:
    """The checkout's commit; $GIT_SHA first (the device machines get the tree without .git: gpu_suite.sh's
    header gives the command that passes it)."""
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "diffusers", "transformers", "peft", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def run_meta(family: str) -> int:
    """Build the full-size components on the meta device (no memory) and compare their sizes."""
    counts = param_counts(full_size_components(family, torch.device("meta"), torch.bfloat16))
    bad = []
    for name, known in KNOWN_PARAMS[family].items():
        ok = abs(counts[name] - known) <= 0.01 * known
        bad += [] if ok else [name]
        print(f"{name:<16}{counts[name]:>10.1f} M   expected {known:>8.1f} M   {'ok' if ok else 'MISMATCH'}")
    print(json.dumps({"family": family, "params_m": counts}))
    return 1 if bad else 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=list(RECIPES), required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny random components on the CPU (CI smoke run)")
    ap.add_argument("--meta", action="store_true", help="only build the full-size configs on 'meta', count")
    ap.add_argument("--prompts", type=int, help="prompts per iteration (recipe: 48)")
    ap.add_argument(
        "--group-size", type=int, help="G (recipe: sd3, flux, z_image and flux2_klein 24, qwen_image 16)"
    )
    ap.add_argument("--steps", type=int, help="T (recipe: 10)")
    ap.add_argument(
        "--max-rows-per-call",
        type=int,
        help="sampling.max_rows_per_call (recipe: sd3 96, flux 48, qwen_image 32, z_image 48, flux2_klein 24)",
    )
    ap.add_argument(
        "--train-batch-size",
        type=int,
        help="grpo.train_batch_size (recipe: sd3 8, flux 4, qwen_image 4, z_image 8, flux2_klein 8)",
    )
    ap.add_argument("--dense-mode", choices=["dense", "sparse"], default="dense")
    ap.add_argument("--compare-sparse", action="store_true", help="also run sparse, same prompts and noise")
    ap.add_argument(
        "--merged-rollout", action="store_true",
        help="instead of the modes: rollouts with the LoRA adapters unmerged, merged for sampling, unmerged",
    )  # fmt: skip
    ap.add_argument("--iterations", type=int, default=1, help="measured iterations per mode (last is kept)")
    ap.add_argument("--no-warmup", action="store_true", help="measure the first calls cold")
    ap.add_argument(
        "--no-evaluate-export", action="store_true",
        help="skip the held-out batch and the export measured after the modes (their end of a run)",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu (--tiny: cpu)")
    ap.add_argument("--out", default="runs/real_model_iteration", help="folder of the JSON (nothing else)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied last")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.meta:
        return run_meta(args.family)
    args.tag = "_tiny" if args.tiny else ""
    device = torch.device(args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda"))
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    json_path = Path(args.out) / f"real_{args.family}{args.tag}.json"
    work = Path(tempfile.mkdtemp(prefix=f"real_{args.family}_"))  # run dir and prompts: not in --out
    write_prompts(prompts_path(args.family, work), edits=prompts_path(args.family, work).suffix == ".jsonl")
    modes = [args.dense_mode] + (["sparse"] if args.compare_sparse and args.dense_mode != "sparse" else [])
    cfgs = {m: config_for(args, m, work, device) for m in modes}  # config errors before model work
    cfg = cfgs[modes[0]]
    recipe_rows = load_config(TrainConfig, RECIPES[args.family]).rows_per_iteration  # 48 x 24
    result = {
        "family": args.family, "tiny": args.tiny,
        "device": torch.cuda.get_device_name(device) if cuda else f"cpu ({os.cpu_count()} cores)",
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_sha": git_sha(), "versions": versions(),
        "settings": {
            "prompts": cfg.prompts.prompts_per_iteration, "group_size": cfg.sampling.group_size,
            "rows": cfg.rows_per_iteration, "steps": cfg.sampling.num_steps,
            "max_rows_per_call": cfg.sampling.max_rows_per_call, "train_batch_size": cfg.grpo.train_batch_size,
            "updates_per_iteration": cfg.grpo.updates_per_iteration, "resolution": resolution_record(cfg.model.resolution),
            "dtype": cfg.model.dtype, "guidance_scale": cfg.sampling.guidance_scale, "beta": cfg.grpo.beta,
            "lora_rank": cfg.lora.rank, "gradient_checkpointing": cfg.model.gradient_checkpointing,
            "offload_text_encoders": cfg.model.offload_text_encoders,
            "recipe_rows": recipe_rows, "overrides": args.overrides,
        },
        "modes": {},
    }  # fmt: skip
    print(f"[{args.family}{args.tag}] {result['device']}: {cfg.prompts.prompts_per_iteration} prompts x "
          f"{cfg.sampling.group_size}, T={cfg.sampling.num_steps}, modes {modes}", flush=True)  # fmt: skip
    write_json(json_path, result)
    try:
        run, probe = load(args, cfg, device, result)
    except Exception as e:  # an OOM or a bug while building: recorded, so the report names it
        traceback.print_exc()
        result["load_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        write_json(json_path, result)
        return 1
    write_json(json_path, result)

    base = result["load"].get("allocated_gib")
    failed = False
    for mode in [] if args.merged_rollout else modes:
        try:
            rec = measure_mode(dataclasses.replace(run, cfg=cfgs[mode]), probe, args.iterations)
        except Exception as e:  # CUDA out of memory above all: the next mode still runs
            traceback.print_exc()
            failed = True
            rec = {"mode": mode, "error": f"{type(e).__name__} in phase {probe.phase!r}: {str(e)[:300]}",
                   "phases": dict(probe.phases)}  # fmt: skip
            if cuda:
                rec["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        run.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if "error" not in rec and "flops_per_transformer_row" in result:
            rec["rollout_tflop_per_s"] = rollout_tflops(rec, result["flops_per_transformer_row"])
        if "error" not in rec and cfg.rows_per_iteration != recipe_rows:
            rec["estimate_at_recipe_batch"] = extrapolate(rec, cfg.rows_per_iteration, recipe_rows, base)
        result["modes"][mode] = rec
        write_json(json_path, result)
        print(summary_line(mode, rec), flush=True)

    if len(modes) == 2 and not failed:  # written before the end of run, which a timeout may cut
        result["dense_over_sparse"] = ratios(*(result["modes"][m] for m in modes))
        print("dense / sparse: " + ", ".join(f"{k} {v:.2f}x" for k, v in result["dense_over_sparse"].items()))
        write_json(json_path, result)
    if args.merged_rollout:
        failed = measure_merged(run, probe, result, json_path) or failed

    end_failed = False
    if not args.no_evaluate_export:  # its own record: a failure here (an OOM) leaves the modes' figures whole
        try:
            result["end_of_run"] = measure_end(dataclasses.replace(run, cfg=cfg), probe)
        except Exception as e:
            traceback.print_exc()
            end_failed = True
            result["end_of_run"] = {"error": f"{type(e).__name__} in phase {probe.phase!r}: {str(e)[:300]}",
                                    "phases": dict(probe.phases)}  # fmt: skip
        end = result["end_of_run"]
        print("  end of run: " + (f"FAILED: {end['error']}" if "error" in end else ", ".join(
            f"{k} {ph['seconds']:.2f} s" + (f", peak {ph['peak_allocated_gib']:.1f} GiB" if "peak_allocated_gib" in ph else "")
            for k, ph in end["phases"].items())), flush=True)  # fmt: skip
        write_json(json_path, result)
    write_json(json_path, result)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {json_path}")
    return 1 if failed or end_failed else 0


def measure_merged(run, probe: Probe, result: dict, json_path: Path) -> bool:
    """``--merged-rollout``: the rollout unmerged, merged, then unmerged again, in ``result["merged_rollout"]``
    (the first pays for whatever the warm-up left cold: the ratio is of the last two); True if one failed."""
    recs, failed = {}, False
    result["merged_rollout"] = recs
    for key, merged in (("unmerged_first", False), ("merged", True), ("unmerged", False)):
        try:
            rec = measure_rollout(run, probe, merged)
        except Exception as e:  # an OOM above all: recorded, so the report names it
            traceback.print_exc()
            failed = True
            rec = {"error": f"{type(e).__name__} in phase {probe.phase!r}: {str(e)[:300]}"}
        gc.collect()
        if probe.cuda:
            torch.cuda.empty_cache()
        if "error" not in rec and "flops_per_transformer_row" in result:
            rec["rollout_tflop_per_s"] = rollout_tflops(rec, result["flops_per_transformer_row"])
        recs[key] = rec
        write_json(json_path, result)
        print(f"  rollout, LoRA {key}: " + (f"FAILED: {rec['error']}" if "error" in rec else
              f"{rec['phases']['rollout']['seconds']:.2f} s"), flush=True)  # fmt: skip
    if not failed:
        recs["unmerged_over_merged"] = (
            recs["unmerged"]["phases"]["rollout"]["seconds"] / recs["merged"]["phases"]["rollout"]["seconds"]
        )
        print(f"rollout unmerged / merged: {recs['unmerged_over_merged']:.2f}x", flush=True)
    write_json(json_path, result)
    return failed


def load(args, cfg: TrainConfig, device: torch.device, result: dict):
    """Components -> adapter -> ``trainer.setup`` with the policy injected -> warm-up. Records the load
    phase (seconds, memory, parameter counts) in ``result``; returns the run and its probe."""
    from densegrpo_fast.policies.pretrained import as_dtype
    from densegrpo_fast.trainer import setup

    t0 = time.perf_counter()
    from densegrpo_fast.policies import adapter_class

    pipe = build_pipeline(args.family, args.tiny, device, as_dtype(cfg.model.dtype), args.seed)
    Adapter = adapter_class(args.family)
    seq = cfg.model.max_sequence_length or DEFAULT_SEQ[args.family]
    policy = Adapter(
        pipe,
        resolution=cfg.model.resolution,
        max_sequence_length=seq,
        **Adapter.shape_options(cfg.model.frames),
    )
    if getattr(policy, "vl_images", ...) is None:  # (Qwen-Image-Edit at full size: the stand-in's processor)
        policy.vl_images = architectures.stand_in_image_processor()
    if cfg.model.gradient_checkpointing:  # as load_policy does
        policy.transformer.enable_gradient_checkpointing()
    policy.offload_text_encoders_(cfg.model.offload_text_encoders)
    result["params_m"] = param_counts(pipe.components)
    probe = Probe(policy, device)
    probe.sync()
    load_rec = {"build_s": time.perf_counter() - t0}
    if probe.cuda:
        load_rec["build_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
    probe.start("setup")
    run = setup(cfg, progress=False, policy=policy)  # LoRA, AdamW, EMA: the trainer's own
    probe.mark("warmup")
    if not args.no_warmup:
        warm_up(run, probe)
    probe.mark("idle")
    load_rec.update({k: probe.phases[k] for k in ("setup", "warmup")})
    try:  # (a figure of the report, not of the run: its failure is recorded, the run goes on)
        result["flops_per_transformer_row"] = transformer_row_flops(policy)
    except Exception as e:
        traceback.print_exc()
        result["flops_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    if probe.cuda:
        load_rec["allocated_gib"] = torch.cuda.memory_allocated() / GIB
        load_rec["reserved_gib"] = torch.cuda.memory_reserved() / GIB
    result["load"] = load_rec
    return run, probe


def _total(rec: dict, key: str) -> float:
    return sum(ph.get(key, 0) for ph in rec["phases"].values())


def ratios(dense: dict, sparse: dict) -> dict[str, float]:
    out = {"seconds": dense["seconds"] / sparse["seconds"]}
    for ph in ("rollout", "reward", "update"):
        out[f"{ph}_seconds"] = dense["phases"][ph]["seconds"] / sparse["phases"][ph]["seconds"]
    for key in ("transformer_rows", "images_decoded"):
        if _total(sparse, key):
            out[key] = _total(dense, key) / _total(sparse, key)
    out["rollout_transformer_rows"] = (
        dense["phases"]["rollout"]["transformer_rows"] / sparse["phases"]["rollout"]["transformer_rows"]
    )
    if "peak_allocated_gib" in dense["phases"]["rollout"]:
        peak = lambda r: max(ph["peak_allocated_gib"] for ph in r["phases"].values())
        out["peak_allocated"] = peak(dense) / peak(sparse)
    return out


def summary_line(mode: str, rec: dict) -> str:
    import report

    if "error" in rec:
        return f"  {mode}: FAILED: {rec['error']}"
    parts = [f"  {mode}: {rec['seconds']:.2f} s"]
    for name in ("encode", "rollout", "reward", "update"):
        ph = rec["phases"][name]
        mem = f", peak {ph['peak_allocated_gib']:.1f} GiB" if "peak_allocated_gib" in ph else ""
        parts.append(f"{name} {ph['seconds']:.2f} s{mem}")
    if "rollout_tflop_per_s" in rec:
        parts.append(f"rollout {rec['rollout_tflop_per_s']:.3g} TFLOP/s")
    m = rec["metrics"]
    parts.append(
        f"transformer rows {int(_total(rec, 'transformer_rows'))}, images {int(_total(rec, 'images_decoded'))}, "
        f"on-policy check {report.on_policy(m) or 'none (no row trained)'}"
    )
    if "estimate_at_recipe_batch" in rec:
        e = rec["estimate_at_recipe_batch"]
        mem = f", peak ~{e['peak_allocated_gib']:.0f} GiB" if "peak_allocated_gib" in e else ""
        parts.append(f"estimate at {e['rows']} rows: ~{e['seconds'] / 60:.0f} min{mem}")
    return " | ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
