"""The recipe: setup -> (rollout -> score -> advantages -> update)* -> save.

Thin by design: every step is a separately tested function (``rollout.sample``, ``dense.latent_rewards``,
``dense.advantages``, ``kernels.sde_log_prob``, ``loss.grpo_loss``); this module wires them together, keeps
the run directory, and resumes. Nothing here knows which model family or reward it drives.

Randomness is derived from ``(run.seed, iteration)`` (prompts, initial noise, SDE noise, the order of the
training rows), so a resumed run repeats exactly what an uninterrupted one does: on the CPU with
``run.deterministic`` its metrics are identical (with the same number of processes, under torchrun).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from densegrpo_fast import distributed
from densegrpo_fast.awm import awm_loss, scaled_advantage
from densegrpo_fast.calibration import calibrate, calibration_changes, load_psi
from densegrpo_fast.checkpoint import (
    check_trainable_names,
    load_checkpoint,
    load_trainable_state,
    lock_dir,
    own_optimizer_state,
    remove_stale_tmp,
    save_checkpoint,
    trainable_state,
    unlock_dir,
    write_atomic,
)
from densegrpo_fast.config import TrainConfig, dump_config, flat
from densegrpo_fast.dense import advantages, latent_rewards, step_reward_stats
from densegrpo_fast.evaluate import noise_for
from densegrpo_fast.kernels import sde_log_prob
from densegrpo_fast.logging import (
    MetricsLog,
    NullLog,
    gif_preview,
    plot_reward_curve,
    plot_step_rewards,
    save_gif,
    save_image_grid,
)
from densegrpo_fast.lora_init import check_checkpoint_experts, start_adapters_from
from densegrpo_fast.loss import grpo_loss
from densegrpo_fast.nft import nft_loss, noised, old_decay, optimality
from densegrpo_fast.policies import has_two_experts, load_policy
from densegrpo_fast.policies.base import compile_blocks, encoded_batches
from densegrpo_fast.prompt_cache import check_covered, text_encoding
from densegrpo_fast.prompts import (
    EditPrompt,
    PromptPriority,
    PromptSource,
    edit_mismatch,
    prompt_key,
    source_blind,
    source_pixels,
)
from densegrpo_fast.rewards import build_reward, spec_is_pairwise
from densegrpo_fast.rewards.pairwise import pointwise_view, score
from densegrpo_fast.rewards.remote import check_same_servers
from densegrpo_fast.rewards.video import scoring_decode
from densegrpo_fast.rollout import Rollout, initial_noise, sample
from densegrpo_fast.schedule import (
    Schedule,
    make_schedule,
    sampler_grid,
    window_mask,
    window_start_at,
    window_starts,
)

# Where the update recomputes the old log-probs (autocast or merged-adapter rollouts, bf16 / fp16 or compiled
# transformers) the first ratio is 1 by construction, and the on-policy check is how far the rollout's own
# log-probs are from the recomputed ones (``rollout_lp_dev``, the mean over the trained pairs). In the toy's
# bf16 rollouts (benchmarks/toy_training's runs): 2.5e-5 to 2.3e-4 with a fixed window; with a random one, up
# to 5.7e-4 for windows starting at step 5 or before and 4.5e-3 for those at 6 or 7, where the noise is small
# and bf16's error in the velocity weighs 1/std^2 more. A rollout whose noise level is 10 % off the update's:
# 1.3e-2 (tests/test_trainer.py; a mismatched std moves the mean log-prob to second order only). Above this
# limit, 10x Flow-GRPO's clip range, the rollout's ratios under the update's policy sit outside the clip range
# from the gap alone: the run says so once, as something to check.
ROLLOUT_LP_DEV_LIMIT = 1e-3


def _window_steps(T: int, ws: int | None, size: int | None) -> range:
    """The steps a psi table must cover: the fixed window's, or every step (no window, or a moving one)."""
    return range(T) if ws is None else range(ws, min(ws + size, T))


def _seed(cfg: TrainConfig, iteration: int, stream: int) -> int:
    return (cfg.run.seed * 1_000_003 + iteration * 7919 + stream * 104_729) % (2**63)


@dataclass
class Run:
    """Everything that lives across iterations."""

    cfg: TrainConfig
    dir: Path
    policy: object
    reward_fn: object
    prompts: PromptSource
    eval_prompts: PromptSource
    schedule: Schedule  # this iteration's (see set_window)
    trained: torch.Tensor  # bool [T], this iteration's trained steps
    optimizer: torch.optim.Optimizer
    ema: dict[str, torch.Tensor] | None
    reference: torch.nn.Module | None  # frozen copy for full fine-tuning (LoRA disables its adapters instead)
    log: MetricsLog
    priority: PromptPriority | None = None  # prompts.sampling = priority
    iteration: int = 0
    opt_steps: int = 0
    wall_s: float = 0.0
    base_schedule: Schedule | None = None  # every step's noise; a moving window takes its steps from it
    trained_steps: torch.Tensor | None = None  # bool [T], grpo.trained_steps before the window applies
    window_start: int | None = None  # this iteration's, for a moving window
    starts: list[int] | None = None  # the starts a moving window takes (_moving_starts; None: every one)
    dist: distributed.Dist = distributed.SINGLE  # this process's share of a torchrun job
    sharded: bool = False  # the transformer (and reference) sharded over the ranks with FSDP2
    shell: torch.nn.Module | None = None  # sharded: the unsharded transformer on "meta" (export)
    served: dict | None = None  # what the reward servers host (their /health); a resume compares
    base_weights: str | None = None  # distributed.weights_digest of the loaded model; a resume compares
    beta: float = 0.0  # the KL weight: grpo.beta, or where grpo.kl_target adapts it, its current value
    old: dict[str, torch.Tensor] | None = None  # the lagged trained weights: nft's old policy, awm's anchor

    @property
    def params(self) -> list[torch.nn.Parameter]:
        """The trained parameters (those the optimizer steps)."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def name(self) -> str:
        if self.cfg.grpo.objective != "grpo":
            return {"nft": "DiffusionNFT", "awm": "AWM"}[self.cfg.grpo.objective]
        return "DenseGRPO" if self.cfg.dense.mode != "sparse" else "Flow-GRPO"


# --------------------------------------------------------------------------------------------- setup


def setup(cfg: TrainConfig, resume: bool = False, progress: bool = True, policy=None) -> Run:
    """Build or resume a run; fails before any model work on a bad config or a clashing run dir.

    ``policy``: an already-built frozen base policy, used instead of loading ``cfg.model`` (the benchmarks
    inject full-size random-weight models this way); it must be what ``load_policy`` would return.

    Launched by ``torchrun``, every process calls this: rank 0 alone writes the run directory, every rank
    takes its share of the psi calibration (see :mod:`densegrpo_fast.distributed`).
    """
    run_dir = Path(cfg.run.output_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    if ckpt_path.exists() and not resume:
        raise ValueError(
            f"run.output_dir={str(run_dir)!r} already holds a run (checkpoint.pt): pass --resume to continue it, "
            "or choose another --output-dir"
        )
    if resume and ckpt_path.exists():  # (before the config's check, whose warnings would not matter)
        _check_iterations_left(cfg, run_dir)
    if resume and (run_dir / "config.yaml").exists():
        _check_same_run(cfg, run_dir / "config.yaml")
    elif resume and distributed.speaks():
        warnings.warn(
            f"--resume: {run_dir.resolve()} holds no run (no config.yaml, no checkpoint.pt): a new run starts "
            "there. If you meant to continue a run, stop and give its directory (--output-dir)"
            if not ckpt_path.exists()
            else f"--resume: {run_dir.resolve()} has a checkpoint but no config.yaml: the run goes on without "
            "the check that this config is its own",
            stacklevel=2,
        )
    if cfg.lora.enabled and cfg.lora.init is not None and not (resume and ckpt_path.exists()):
        _check_inits(cfg)  # (a resumed run's adapters come from its checkpoint)
    distributed.check_device(cfg.model.device)
    # (name errors before the model loads; a video family's reward scores the videos' frames)
    reward_fn = cfg.reward.for_policy(build_reward(cfg.reward.name, **cfg.reward.kwargs), cfg.model.video)
    pointwise_view(reward_fn, f"reward {cfg.reward.name!r}")  # (for the evaluation: refused now)
    prompts = PromptSource(cfg.prompts.dataset, cfg.run.seed)
    eval_prompts = PromptSource(cfg.eval.dataset, cfg.eval.seed, "eval.dataset")
    for field, source in (("prompts.dataset", prompts), ("eval.dataset", eval_prompts)):
        if bad := edit_mismatch(cfg.model.family, source.edits, field, source.dataset):
            raise ValueError(bad)
    _check_prompts(reward_fn, cfg.reward.name, {"prompts.dataset": prompts, "eval.dataset": eval_prompts})
    if policy is None:  # (one given, e.g. the memory estimate's fake one, brings its own conditioning)
        check_covered(cfg, {"prompts.dataset": prompts.pool()[0], "eval.dataset": eval_prompts.pool()[0]})
    if blind := source_blind(prompts.edits or eval_prompts.edits, {cfg.reward.name: reward_fn}):
        warnings.warn(blind, stacklevel=2)
    if distributed.world_size() > 1:
        _check_world(cfg, distributed.world_size())
    dist = distributed.from_env(cfg.model.device)
    distributed.check_same_config(dist, cfg, ("prompts.dataset", "eval.dataset", "model.prompt_cache"))
    with warnings.catch_warnings():  # (_build says it, once)
        warnings.simplefilter("ignore")
        check_optimizer(cfg, _shards(cfg, dist))  # before any model work

    torch.set_num_threads(cfg.model.num_threads)
    _warn_if_autocast_is_emulated(cfg)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(cfg.run.seed)
    distributed.barrier(dist)  # every rank has read the run directory before rank 0 writes to it
    distributed.on_main(dist, lambda: _start_run_dir(cfg, run_dir))
    opened = []  # rank 0's log: its W&B run (a login problem) fails here, before any model work, on every rank
    distributed.on_main(dist, lambda: opened.append(_open_log(cfg, run_dir, resume)))
    log = opened[0] if opened else NullLog()
    with _closed_on_failure(log):
        return _build(cfg, run_dir, resume, progress, policy, reward_fn, prompts, eval_prompts, dist, log)


@contextlib.contextmanager
def _closed_on_failure(log):
    """Close ``log`` if the work inside fails (its W&B run marked failed, not left open), and re-raise."""
    try:
        yield
    except BaseException:
        log.close(failed=True)
        raise


def _build(cfg, run_dir, resume, progress, policy, reward_fn, prompts, eval_prompts, dist, log) -> Run:
    """The model, the noise schedule, LoRA or the reference, the optimizer and EMA, and a resumed run's state:
    the part of :func:`setup` after the run directory and its log are open."""
    sharded = _shards(cfg, dist)
    device = dist.device(cfg.model.device)
    if policy is None:  # (sharded: FSDP2 moves the transformer to the device as it shards it, below)
        policy = load_policy(
            cfg.model.family,
            cfg.model.checkpoint,
            device,
            **cfg.model.adapter_options(),
            transformer_on_host=sharded,
        )
    else:  # (a policy handed in: the settings load_policy applies apply to it too)
        if cfg.model.guidance_scale_2 is not None:
            policy.set_guidance_scale_2(cfg.model.guidance_scale_2)
        if cfg.model.negative_prompt is not None:
            policy.set_negative_prompt(cfg.model.negative_prompt)
    for setting, scale in (("sampling.guidance_scale", cfg.sampling.guidance_scale),
                           ("eval.guidance_scale", cfg.eval.guidance_scale)):  # fmt: skip
        problem = getattr(policy, "guidance_problem", lambda *_: None)(scale, setting)
        if problem is not None:
            raise ValueError(problem)
    # every process loaded its models itself: from the same files?
    # (before any adapter or checkpoint: what a resume compares; and across the ranks, from the same sums)
    base_weights = distributed.weights_digest(policy, device, dist, "the loaded models'", "model.checkpoint")
    distributed.check_loaded(dist, reward_fn, "the reward models'", "reward.kwargs", device)
    served = check_same_servers(dist, {"reward": reward_fn})
    state = load_checkpoint(run_dir) if resume else None
    if state is not None and dist.main:
        _warn_if_servers_changed(state.get("served"), served)
        _warn_if_base_changed(cfg, state.get("base_weights"), base_weights, state.get("text_encoding"))
    if resume:  # before any collective that depends on it (a rank that saw no checkpoint would calibrate)
        fix = (
            "every rank must read the same run directory: put run.output_dir on a file system all nodes share"
        )
        position = None if state is None else (state["iteration"], state["opt_steps"])
        distributed.check_same(dist, position, "the resumed (iteration, optimizer step)", fix)
    saved_psi = state.get("psi") if state is not None else None
    if saved_psi is not None:
        saved_psi = saved_psi.clone()  # (not a page of the mmapped file)
    if cfg.lora.enabled:  # before the calibration: a mistyped name would cost it
        _check_lora_targets(cfg, policy.transformer)
    init = cfg.lora.init if state is None else None  # (a resumed run's adapters come from its checkpoint)
    warm = cfg.lora.enabled and init is not None
    compute_dtype = policy.dtype  # (sharded full fine-tuning trains fp32 weights, its calls stay in this)
    # a warm start calibrates psi on the policy it trains from (ALGORITHM.md §5): its adapters come first
    if warm:
        _add_adapters(cfg, policy, init)
    if sharded:  # the calibration's calls too go through the shards: the whole transformer is on no device
        reference, params, shell = _trained(cfg, policy, dist, warm, sharded, compute_dtype)
    base = _schedule(cfg, policy, reward_fn, prompts, run_dir, progress, dist, saved_psi)
    fix = "the ranks built their noise schedules apart, which they must not: please report it"
    distributed.check_same(dist, base.noise_level.tolist(), "psi", fix)  # a consistency check
    T = cfg.sampling.num_steps
    trained_steps = torch.zeros(T, dtype=torch.bool)
    trained_steps[cfg.trained_steps()] = True
    if not sharded:  # (a warm start's adapters came before the calibration, the others come after it)
        reference, params, shell = _trained(cfg, policy, dist, warm, sharded, compute_dtype)
    transformer = policy.transformer
    if cfg.model.compile:  # after the adapters and the sharding, which change the modules compiled
        for module in (transformer, reference):
            if module is not None:
                compile_blocks(module, cfg.model.compile_backend)
    optimizer = make_optimizer(cfg, params, sharded)
    ema = (
        {n: p.detach().clone() for n, p in transformer.named_parameters() if p.requires_grad}
        if cfg.ema.enabled
        else None
    )
    old = (  # (nft's old policy and awm's anchor start as the trained weights)
        {n: p.detach().clone() for n, p in transformer.named_parameters() if p.requires_grad}
        if lagged_key(cfg) is not None
        else None
    )
    base = base.to(policy.device)
    run = Run(cfg, run_dir, policy, reward_fn, prompts, eval_prompts, base, trained_steps, optimizer, ema, reference,
              log, base_schedule=base, trained_steps=trained_steps, dist=dist, sharded=sharded,
              shell=shell, served=served, base_weights=base_weights, beta=cfg.grpo.beta, old=old)  # fmt: skip
    if cfg.noise.window_move != "fixed":  # (the base schedule is fixed for the run: its starts too)
        run.starts = _moving_starts(run)
        _note_skipped_starts(run)
    set_window(run, 0)
    if cfg.prompts.sampling == "priority":
        run.priority = PromptPriority(prompts, cfg.prompts.priority_floor)
    if state is not None:
        if sharded:  # every rank cuts its shards from the whole tensors
            check_trainable_names(transformer, state["trainable"])
            distributed.load_full_state(transformer, optimizer, state["trainable"], state["optimizer"])
        else:
            _warn_if_narrowed(transformer, state["trainable"], dist)
            load_trainable_state(transformer, state["trainable"])
            optimizer.load_state_dict(state["optimizer"])
        own_optimizer_state(optimizer)
        lagged = lagged_key(cfg)
        if old is not None and state.get(lagged) is None:  # (train refuses a change of objective)
            raise ValueError(
                f"{run_dir / 'checkpoint.pt'} holds no {lagged}, which grpo.objective={cfg.grpo.objective} resumes "
                f"from: was it written by another objective, with awm.anchor_kl=0, or by an older version? Resume "
                "with the run's own config.yaml"
            )
        for kept, key in ((ema, "ema"), (old, lagged)):
            if kept is not None and state.get(key) is not None:
                for name, t in state[key].items():
                    kept[name].copy_(
                        distributed.shard_like(t, kept[name]) if sharded else t
                    )  # onto their device
        run.iteration, run.opt_steps, run.wall_s = state["iteration"], state["opt_steps"], state["wall_s"]
        if cfg.grpo.kl_target is not None:  # (a checkpoint of a run without kl_target: from grpo.beta)
            run.beta = state.get("beta") or cfg.grpo.beta
        if state.get("world", 1) != dist.world and dist.main:
            warnings.warn(
                f"resuming with {dist.world} process(es) a run checkpointed with {state.get('world', 1)}: it "
                "continues, but samples other noise than the uninterrupted run would have",
                stacklevel=2,
            )
        torch.set_rng_state(state["torch_rng"])
        if run.priority is not None:
            run.priority.load_state_dict(state["prompt_priority"])
        log.truncate_after(run.iteration)
        distributed.on_main(dist, functools.partial(_drop_exports_after, run_dir, run.iteration))
    elif resume:
        log.truncate_after(0)
        distributed.on_main(dist, functools.partial(_drop_exports_after, run_dir, 0))
    if resume:
        kept = [*(ema or {}).values(), *(old or {}).values()]
        distributed.check_in_sync(dist, run.params + kept, "the resumed weights, EMA or lagged weights")
    return run


def _trained(cfg: TrainConfig, policy, dist: distributed.Dist, warm: bool, sharded: bool, compute_dtype):
    """What trains, set up on ``policy.transformer``: the LoRA adapters (a warm start's are there already),
    or every weight with a frozen copy as the KL reference; then, in a sharded run, FSDP2's shards of both.
    Returns (the reference or None, the trained parameters, the meta shell a sharded run exports through)."""
    reference = None
    transformer = policy.transformer
    if cfg.lora.enabled and not warm:
        _add_adapters(cfg, policy, None)
    elif not cfg.lora.enabled:
        if _kl_weight(cfg) > 0:
            if sharded:  # block by block: never a second whole copy beside the transformer
                reference = distributed.sharded_frozen_copy(transformer)
            else:
                reference = copy.deepcopy(transformer).requires_grad_(False)
        transformer.requires_grad_(True)
        if not sharded and compute_dtype != torch.float32 and dist.main:
            fix = (
                "train LoRA adapters, which are fp32, or load the model in fp32 (model.dtype=fp32)"
                if cfg.optim.name == "adamw8bit"  # (which FSDP2's sharded weights do not take)
                else "under torchrun, model.sharding=fsdp keeps fp32 weights (or train LoRA adapters, which are "
                "fp32)"
            )
            warnings.warn(
                f"full fine-tuning of a {compute_dtype} transformer in one copy per process trains the "
                f"{compute_dtype} weights themselves: lr-sized steps below one ulp round away, and the "
                f"optimizer's moments and the EMA round too; {fix}",
                stacklevel=3,
            )
    params = [p for p in transformer.parameters() if p.requires_grad]
    if cfg.lora.enabled:
        # rank 0's initial adapters everywhere (full: one file), through the device (sharded: they are in host
        # memory, beside the base FSDP2 has not moved yet)
        distributed.broadcast_params(dist, params, dist.device(cfg.model.device))
    if not sharded:
        return reference, params, None
    # (the list would keep every whole parameter, upcast to fp32 as its unit is sharded, alive until the last
    # unit is done: the whole model in fp32 beside its shards, 44 GiB for FLUX.1)
    del params
    shell = _meta_copy(transformer) if dist.main else None
    distributed.shard(transformer, compute_dtype, keep_dtypes=cfg.lora.enabled)
    params = [p for p in transformer.parameters() if p.requires_grad]  # their shards
    if dist.main:
        mine = sum(p.to_local().nbytes for p in params) / 2**20
        whole = sum(p.numel() * p.element_size() for p in params) / 2**20
        if cfg.lora.enabled:
            base = [p for p in transformer.parameters() if not p.requires_grad]
            held = sum(p.to_local().nbytes for p in base) / 2**20
            print(f"FSDP2: the transformer's base and its LoRA adapters sharded over {dist.world} processes, calls "
                  f"in {compute_dtype}; frozen base {held:.1f} MiB ({compute_dtype}) and adapters {mine:.1f} MiB of "
                  f"{whole:.1f} MiB (fp32) in this process", flush=True)  # fmt: skip
        else:
            what = "the transformer and its KL reference" if reference is not None else "the transformer"
            print(f"FSDP2: {what} sharded over {dist.world} processes, calls in {compute_dtype}; trained weights "
                  f"{mine:.1f} MiB of {whole:.1f} MiB (fp32) in this process", flush=True)  # fmt: skip
    return reference, params, shell


def _kl_weight(cfg: TrainConfig) -> float:
    """The weight of the KL term to the reference policy (0: no reference forward): grpo.beta, nft.kl or
    awm.kl."""
    return {"nft": cfg.nft.kl, "awm": cfg.awm.kl}.get(cfg.grpo.objective, cfg.grpo.beta)


def lagged_key(cfg: TrainConfig) -> str | None:
    """The checkpoint's key of the lagged trained weights the objective keeps (``Run.old``): nft's old
    policy, awm's anchor (when its KL weight is above 0); None: none kept."""
    if cfg.grpo.objective == "nft":
        return "nft_old"
    if cfg.grpo.objective == "awm" and cfg.awm.anchor_kl > 0:
        return "awm_anchor"
    return None


def _check_lora_targets(cfg: TrainConfig, transformer: torch.nn.Module) -> None:
    """The ``lora.target_modules`` that match no module of the transformer (peft's rule for a list: the whole
    name, or its end after a dot), found before any model work rather than after the psi calibration: none
    matching is a ValueError (peft's own refusal, earlier); some is a warning, since peft leaves them out and
    one list may serve models whose blocks differ (a toy's last block has no ``ff_context``)."""
    names = [n for n, _ in transformer.named_modules()]
    targets = cfg.lora.target_modules
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not missing:
        return
    first = getattr(transformer, "expert_names", ())  # (two experts: the first's names, without its prefix)
    inner = getattr(transformer, first[0]) if first else transformer
    linear = [n for n, m in inner.named_modules() if isinstance(m, torch.nn.Linear)]
    suffixes = sorted({n.split(".", 2)[-1] if n.count(".") >= 2 else n for n in linear})
    what = (
        f"lora.target_modules {missing} match no module of the {cfg.model.family} transformer (a target is a "
        f"module name or its end after a dot; its linear layers end in, e.g., {suffixes[:12]})"
    )
    if len(missing) == len(targets):
        raise ValueError(f"{what}: no adapter would train; fix the names")
    if distributed.speaks():
        warnings.warn(f"{what}: they get no adapter; check their spelling", stacklevel=3)


def _add_adapters(cfg: TrainConfig, policy, init: str | None) -> None:
    """The run's LoRA adapters on the transformer, in fp32, set to the LoRA at ``init`` when given."""
    from peft import LoraConfig

    transformer = policy.transformer
    transformer.add_adapter(
        LoraConfig(
            r=cfg.lora.rank,
            lora_alpha=cfg.lora.alpha,
            target_modules=cfg.lora.target_modules,
            init_lora_weights="gaussian",
        )
    )
    # adapters train in fp32 over a bf16 / fp16 base (as diffusers' cast_training_params does): in bf16 an
    # lr-3e-4 step of a weight of size 0.1 is below one ulp, and Adam's moments and the EMA would round too
    # (and a warm start's weights would round on the way in)
    for p in transformer.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    if init is not None:
        start_adapters_from(policy, init, cfg.lora.init_2)


def _check_inits(cfg) -> None:
    """``lora.init`` (and ``lora.init_2``) there and pairing with the checkpoint's transformers, before any model
    loads."""
    check_checkpoint_experts(cfg.model, "lora.init", cfg.lora.init, cfg.lora.init_2)


def _check_prompts(reward_fn, name: str, sources: dict[str, PromptSource]) -> None:
    """A ValueError naming the prompts the training reward cannot score (a reward with ``check_prompts``,
    e.g. OCR's quoted text), found before any model work rather than when a bad prompt is first drawn."""
    check = getattr(reward_fn, "check_prompts", None)
    if check is None:
        return
    for where, source in sources.items():
        texts = list(dict.fromkeys(source.pool()[0]))
        if bad := check(texts):
            raise ValueError(
                f"{where}={source.dataset!r}: reward {name!r} cannot score {len(bad)} of its {len(texts)} prompts, "
                f"e.g. {bad[:3]}: mend or drop those lines"
            )


def _warn_if_narrowed(
    module: torch.nn.Module, saved: dict[str, torch.Tensor], dist: distributed.Dist
) -> None:
    """A sharded run keeps fp32 weights; resumed unsharded (one process, or replicated) in a bf16 / fp16 model,
    its weights, EMA and Adam's moments are rounded to the model's dtype."""
    params = dict(module.named_parameters())
    pairs = {
        (t.dtype, params[n].dtype)
        for n, t in saved.items()
        if n in params and t.dtype.itemsize > params[n].dtype.itemsize
    }
    if pairs and dist.main:
        (wide, narrow), *_ = sorted(pairs, key=str)
        warnings.warn(
            f"the checkpoint holds trained weights in {wide} but this run's are {narrow} (a sharded run's fp32 "
            "weights resumed without sharding): the weights, their EMA and Adam's moments are rounded to "
            f"{narrow}. To keep them, resume with the processes and model.sharding=fsdp the run had",
            stacklevel=3,
        )


def _shards(cfg: TrainConfig, dist: distributed.Dist) -> bool:
    """Whether this job shards the transformer with FSDP2 (``model.sharding``): under torchrun, full
    fine-tuning unless told to replicate, LoRA when told to shard; not where this torch lacks FSDP2 with summed
    gradients."""
    wanted = cfg.model.sharding == "fsdp" or (cfg.model.sharding == "auto" and not cfg.lora.enabled)
    if not (dist.enabled and wanted):
        return False
    m = cfg.model
    # (before any model loads)
    if has_two_experts(m.family, m.checkpoint, local_files_only=m.local_files_only):
        raise ValueError(
            f"model.sharding={m.sharding}: this checkpoint has two experts (Wan 2.2 A14B), which FSDP2 does not "
            "shard here (a call runs one expert's blocks for some rows and the other's for the rest, and every "
            "process must gather the same units at once): set model.sharding=replicate, each process holding both "
            "experts (with LoRA, lora.enabled=true, auto replicates too)"
        )
    if distributed.fsdp_available():
        return True
    if cfg.model.sharding == "fsdp":
        raise ValueError(
            f"model.sharding=fsdp needs FSDP2 with summed gradients, which torch {torch.__version__} lacks "
            "(torch 2.8 or later): upgrade torch, or set model.sharding=replicate"
        )
    if dist.main:
        warnings.warn(
            f"model.sharding=auto: torch {torch.__version__} has no FSDP2 with summed gradients (2.8 or later), "
            "so full fine-tuning keeps a whole copy of the model in each process",
            stacklevel=3,
        )
    return False


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose parameters are on the "meta" device (no memory) and whose buffers are
    copied to the CPU: the unsharded shape a sharded run's whole weights are loaded into for export."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for p in module.parameters()}  # fmt: skip
    memo.update({id(b): b.detach().to("cpu", copy=True) for b in module.buffers()})
    return copy.deepcopy(module, memo)


def _start_run_dir(cfg: TrainConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_dir(run_dir, "training run")  # (until train() ends)
    remove_stale_tmp(run_dir)  # (a checkpoint or an export that a SIGKILL cut: no cleanup ran)
    dump_config(cfg, run_dir / "config.yaml")


def _open_log(cfg: TrainConfig, run_dir: Path, resume: bool) -> MetricsLog:
    """Rank 0's metrics log (and its W&B run, opened before the model loads so a login problem shows at
    once). A fresh run starts it empty: an earlier attempt in the directory that never checkpointed (the
    directory is only refused when it holds a checkpoint) leaves entries a new run must not continue."""
    log = MetricsLog(run_dir, cfg.run.tensorboard, cfg.run.wandb, cfg.model_dump(mode="json"), resume)
    if not resume:
        log.truncate_after(-1)
    return log


def _check_world(cfg: TrainConfig, world: int) -> None:
    """A torchrun job of ``world`` processes splits each iteration's rows evenly (and each rank's waves hold
    at least one row)."""
    rows = cfg.prompts.prompts_per_iteration * cfg.sampling.group_size
    if rows % world:
        raise ValueError(
            f"prompts.prompts_per_iteration x sampling.group_size = {rows} rows per iteration cannot be split "
            f"evenly over {world} processes (WORLD_SIZE): each process takes the same number of rows; choose "
            f"a process count that divides {rows}, or change the prompts per iteration"
        )
    if cfg.sampling.reward_waves > rows // world:
        raise ValueError(
            f"sampling.reward_waves ({cfg.sampling.reward_waves}) exceeds the {rows // world} rows each of the "
            f"{world} processes rolls out: lower the waves"
        )
    groups = cfg.prompts.prompts_per_iteration
    if spec_is_pairwise(cfg.reward.name, cfg.reward.kwargs) and (
        groups % world or groups // world < cfg.sampling.reward_waves
    ):
        raise ValueError(
            f"reward {cfg.reward.name!r} compares the images of a group, so each of the {world} processes (and each "
            f"of its sampling.reward_waves={cfg.sampling.reward_waves} waves) must hold whole groups, but "
            f"prompts.prompts_per_iteration={groups} groups do not split so: choose a process count that divides "
            f"{groups} and waves <= {groups} / processes"
        )


def _cpu_has_native(dtype: str) -> bool:
    """Whether oneDNN runs ``dtype`` (bf16 / fp16) matmuls natively on this CPU (avx512_bf16, AMX, ...)."""
    if dtype == "bf16":
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_fp16_supported()


def _warn_if_autocast_is_emulated(cfg: TrainConfig) -> None:
    m = cfg.model
    if m.autocast is None or torch.device(m.device).type != "cpu":
        return
    if not _cpu_has_native(m.autocast):
        warnings.warn(
            f"model.autocast={m.autocast}: this CPU has no native {m.autocast} matmuls (avx512_bf16 / AMX), so "
            "they are emulated and slower than fp32; set model.autocast=null",
            stacklevel=2,
        )


#: What a resumed run may change: how long it runs, how it logs and checkpoints, where its directory is, how
#: its blocks and threads run; not what an iteration computes. (lora.init and lora.init_2: the checkpoint's
#: adapters replace the start, so the files may move or go.)
RESUMABLE_CHANGES = (
    "run.iterations", "run.time_budget_s", "run.output_dir", "run.checkpoint_every", "run.sample_grid_every",
    "run.eval_every", "run.export_every", "run.keep_exports", "run.tensorboard", "run.wandb", "model.compile",
    "model.compile_backend", "model.num_threads", "lora.init", "lora.init_2",
    # how many rows a call takes: the memory's knobs, for a run that ran out of it; like model.compile, they
    # change only the rounding of what an iteration computes
    "sampling.max_rows_per_call", "grpo.train_batch_size", "eval.batch_size",
    # where the prompt embeddings come from (the encoders, or their outputs cached: the same to rounding)
    "model.prompt_cache", "model.offload_text_encoders",
)  # fmt: skip


def _check_iterations_left(cfg: TrainConfig, run_dir: Path) -> None:
    """A resume whose run.iterations (``--max-iterations``) is below the iteration the run has reached is
    refused before the run directory is touched (it would train nothing and rewrite config.yaml); one equal
    to it exports and evaluates the finished run again."""
    done = load_checkpoint(run_dir)["iteration"]
    if cfg.run.iterations < done:
        raise ValueError(
            f"--resume: the run in {run_dir} has trained {done} iterations, more than run.iterations="
            f"{cfg.run.iterations} (--max-iterations): there is nothing left to train; give at least {done + 1} "
            "to go on"
        )


def _resumable(key: str) -> bool:
    """Whether a resume may change the flattened config key ``key``: one of RESUMABLE_CHANGES, or a reward
    setting that says how it is reached or batched, not what it scores (``evaluate.NOT_SCORING``: the url of
    a served reward, ``reward.kwargs.url`` or a sum's ``reward.kwargs.rewards.NAME.kwargs.url``, its timeouts
    and batch sizes, a judge's concurrency): a server may restart elsewhere, and what it hosts is compared
    instead (its /health against the checkpoint's record, where the client asked, ``check`` true as by
    default, and the checkpoint has one)."""
    from densegrpo_fast.evaluate import NOT_SCORING

    return key in RESUMABLE_CHANGES or (
        key.startswith("reward.kwargs.") and key.rsplit(".", 1)[-1] in NOT_SCORING
    )


def _check_same_run(cfg: TrainConfig, saved_path: Path) -> None:
    from densegrpo_fast.config import load_config
    from densegrpo_fast.evaluate import scoring_settings

    def dumped(c: TrainConfig) -> dict:  # (eval.rewards compared by what they score: a url may move)
        d = c.model_dump(mode="json")
        d["eval"]["rewards"] = scoring_settings(d["eval"]["rewards"], c.model.video)
        return d

    whole = {*RESUMABLE_CHANGES, "eval.rewards"}  # (compared as wholes)
    saved = flat(dumped(load_config(TrainConfig, saved_path)), whole)
    now = flat(dumped(cfg), whole)
    diffs = [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if not _resumable(k) and saved.get(k) != now.get(k)
    ]
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise ValueError(
            f"--resume with a config that differs from the run's own ({saved_path}): {shown}. Resume with "
            f"--config {saved_path} (it may change only "
            f"{', '.join(RESUMABLE_CHANGES)}, and a reward's url, timeouts, batch sizes and concurrency)"
        )
    before, after = saved["run.iterations"], now["run.iterations"]
    if before != after and now["optim.schedule"] != "constant" and distributed.speaks():
        warnings.warn(
            f"run.iterations {before} -> {after} with optim.schedule={now['optim.schedule']}: the learning-rate "
            f"decay now ends at iteration {after}, so from here on the learning rate follows the stretched "
            "schedule (it steps up where the run is extended)",
            stacklevel=3,
        )


def run_calibration(cfg: TrainConfig, progress: bool = True) -> tuple[torch.Tensor, Path]:
    """The ``calibrate`` command: Algorithm 1 with the config's policy (with ``lora.init``'s adapters, as a
    warm-started run trains from them), reward and prompts, before any training; returns psi and the path
    of the table (``noise.calibration.path`` or the run directory's psi.json), written with its plot. Under
    torchrun every process calibrates on its share of the rows."""
    torch.set_num_threads(cfg.model.num_threads)
    distributed.check_device(cfg.model.device)
    reward_fn = cfg.reward.for_policy(build_reward(cfg.reward.name, **cfg.reward.kwargs), cfg.model.video)
    pointwise_view(reward_fn, f"reward {cfg.reward.name!r}")  # (what psi is calibrated on: refused now)
    prompts = PromptSource(cfg.prompts.dataset, cfg.run.seed)
    if bad := edit_mismatch(cfg.model.family, prompts.edits, "prompts.dataset", prompts.dataset):
        raise ValueError(bad)
    check_covered(cfg, {"prompts.dataset": prompts.pool()[0]})
    m = cfg.model
    d = distributed.from_env(m.device)
    distributed.check_same_config(d, cfg, ("prompts.dataset", "model.prompt_cache"))
    check_same_servers(d, {"reward": reward_fn})
    init = cfg.lora.init if cfg.lora.enabled else None
    if init is not None:
        _check_inits(cfg)
    sharded = _shards(cfg, d)  # (as train shards it: no process holds the whole transformer)
    device = d.device(m.device)
    policy = load_policy(m.family, m.checkpoint, device, **m.adapter_options(), transformer_on_host=sharded)
    distributed.check_loaded(d, policy, "the loaded models'", "model.checkpoint", device)
    distributed.check_loaded(d, reward_fn, "the reward models'", "reward.kwargs", device)
    if init is not None:  # the policy the runs train from, as train calibrates a warm start
        _add_adapters(cfg, policy, init)
    if sharded:  # (nothing trains: every weight keeps its dtype)
        distributed.shard(policy.transformer, policy.dtype, keep_dtypes=True)
        if d.main:
            print(
                f"FSDP2: the transformer sharded over {d.world} processes, calls in {policy.dtype}",
                flush=True,
            )
    path = Path(cfg.noise.calibration.path or Path(cfg.run.output_dir) / "psi.json")
    psi = calibrate(policy, reward_fn, prompts, cfg, path, progress and d.main, dist=d)
    distributed.shutdown(d)
    return psi, path


def _schedule(
    cfg,
    policy,
    reward_fn,
    prompts,
    run_dir: Path,
    progress: bool,
    dist: distributed.Dist = distributed.SINGLE,
    saved_psi: torch.Tensor | None = None,
) -> Schedule:
    """The noise of every step the run may use: the fixed window's, or every step's for a moving window.

    Calibrated noise comes from the checkpoint of a resumed run (``saved_psi``: what it trained with; a
    warning when the psi table is gone or now holds another psi), else from the psi table when it exists
    (rank 0 reads it and sends it to the others), else from Algorithm 1, run by every rank of a torchrun job
    on its share of the rows."""
    n = cfg.noise
    T = cfg.sampling.num_steps
    grid = sampler_grid(T, cfg.sampling.shift, policy)
    ws, size = (n.window_start, n.window_size) if n.window_move == "fixed" else (None, None)
    if n.kind == "uniform":
        return make_schedule(T, cfg.sampling.shift, n.level, ws, size, sigmas=grid, sde=n.sde)
    path = Path(n.calibration.path) if n.calibration.path else run_dir / "psi.json"
    read = lambda: _read_psi(path, n, grid, ws, size, cfg)  # noqa: E731
    if saved_psi is not None:  # the table only to compare: one this run cannot use is "another psi"
        read = functools.partial(_readable_or_none, read)
    psi = distributed.on_main(dist, read)
    if saved_psi is not None:  # a resumed run goes on with the psi it trained with
        saved_psi = saved_psi.float().cpu()
        used = window_mask(T, ws, size)  # (the checkpoint holds 0 outside a fixed window, a table may not)
        if dist.main and (psi is None or not torch.equal(psi[used], saved_psi[used])):
            if psi is not None:
                now = f"holds psi {[round(p, 3) for p in psi.tolist()]}"
            else:
                now = "is gone" if not path.exists() else "now holds a table for another grid, window or SDE"
            warnings.warn(
                f"psi table {path} {now}: resuming with the psi the run trained with, from its checkpoint "
                f"({[round(p, 3) for p in saved_psi.tolist()]})",
                stacklevel=2,
            )
        psi = saved_psi
    if psi is None:
        psi = calibrate(policy, reward_fn, prompts, cfg, path, progress and dist.main, dist=dist)
    trained = set(cfg.trained_steps())
    dead = [k for k in _window_steps(T, ws, size) if k in trained and psi[k] == 0]
    if dead and dist.main:
        warnings.warn(
            f"calibrated psi is 0 at steps {dead} (psi {[round(p, 3) for p in psi.tolist()]}, from {path}): "
            "those steps run without noise, as ODE steps, and train nothing. To keep them exploring, set "
            "noise.calibration.psi_min above 0 (e.g. 0.05) and calibrate again (delete the table)",
            stacklevel=2,
        )
    return make_schedule(T, cfg.sampling.shift, psi, ws, size, sigmas=grid, sde=n.sde)


def _readable_or_none(read):
    """``read()``, or None (with no warning of its own) when the table cannot serve this run."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return read()
    except (ValueError, OSError, KeyError):
        return None


def _read_psi(path: Path, n, grid: torch.Tensor, ws, size, cfg: TrainConfig) -> torch.Tensor | None:
    """The psi table at ``path`` if there is one (None: calibrate), refused if it was calibrated on another
    sigma grid or misses a step the window needs; a warning if it was calibrated for another model, warm
    start, guidance or reward (a table shared through ``noise.calibration.path``, or one a crashed run left),
    or if an older version calibrated it on n-step completions (``dense.completion_steps``), which this one no
    longer does (ALGORITHM.md §5)."""
    from densegrpo_fast.calibration import calibrated_for

    if not path.exists():
        return None
    T = len(grid) - 1
    psi, covered, record = load_psi(path, T)
    then = record.get("sigmas")  # (older tables do not record it)
    if then is not None and not torch.allclose(torch.tensor(then), grid.cpu().float(), rtol=0, atol=1e-5):
        raise ValueError(
            f"psi table {path} was calibrated on the sigma grid {[round(s, 4) for s in then]}, but this run "
            f"samples on {[round(s, 4) for s in grid.tolist()]} (sampling.shift, or the model's own shift): psi "
            "balances each step's gains and losses on its own grid. Delete the file (or point "
            "noise.calibration.path elsewhere) to calibrate for this grid"
        )
    then = record.get("sde", "flow_grpo")  # (older tables do not record it: they were all flow_grpo's)
    if then != n.sde:
        raise ValueError(
            f"psi table {path} was calibrated for noise.sde={then}, this run samples with noise.sde={n.sde}: psi "
            "is a multiple of sqrt(s / (1 - s)) for flow_grpo and eta for cps, so the table means other noise "
            "here. Delete the file (or point noise.calibration.path elsewhere) to calibrate for this SDE"
        )
    then = record.get("calibrated_for")
    if then is not None and (diff := calibration_changes(then, calibrated_for(cfg), cfg.model.family)):
        warnings.warn(
            f"psi table {path} was calibrated for another run ({diff}): Algorithm 1 balances the gains and losses "
            "of its own policy and reward, so this psi may not balance this run's. Delete the file (or point "
            "noise.calibration.path elsewhere) to calibrate for this run, or keep it if the difference is meant",
            stacklevel=2,
        )
    then = record.get("completion_steps")  # (older tables do not record it; those were all n = remaining)
    if then is not None:
        warnings.warn(
            f"psi table {path} was calibrated with dense.completion_steps={then} by an older version: the "
            "balance of gains and losses it tuned was counted on n-step completions, whose bias moves psi even "
            "where a step has no noise; calibration now completes every latent to the end whatever n. Delete "
            "the file (or point noise.calibration.path elsewhere) to calibrate again",
            stacklevel=2,
        )
    # the window's steps that have noise at all (as calibration counts them: under CPS not the grid's last)
    noisy = (
        make_schedule(T, None, 1.0, ws, size, sigmas=grid.cpu(), sde=n.sde)
        .sde_steps.nonzero()
        .flatten()
        .tolist()
    )
    missing = [k for k in noisy if k not in covered]
    if missing:
        raise ValueError(
            f"psi table {path} was calibrated for steps {covered} (psi {[round(p, 3) for p in psi.tolist()]}), "
            f"but noise.window_move={n.window_move} with window_start={n.window_start}, "
            f"window_size={n.window_size} needs steps {missing} too: they would run without noise and train "
            "nothing. Delete the file (or point noise.calibration.path elsewhere) to calibrate for this window"
        )
    return psi


def check_optimizer(cfg, sharded: bool = False) -> None:
    """A ValueError, with the fix, where ``optim.name`` cannot run: bitsandbytes' 8-bit AdamW over FSDP2's
    sharded weights (its kernels do not take them), or without bitsandbytes installed."""
    if cfg.optim.name != "adamw8bit":
        return
    if sharded:
        raise ValueError(
            "optim.name=adamw8bit with the transformer sharded by FSDP2 (full fine-tuning under torchrun): "
            "bitsandbytes' optimizer does not take sharded weights; use optim.name=adamw (its state is sharded "
            "too), or model.sharding=replicate"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise ValueError(
            f"optim.name=adamw8bit needs bitsandbytes ({e}): pip install 'densegrpo-fast[bnb]' (keeps your "
            "torch), or use optim.name=adamw"
        ) from None


def make_optimizer(cfg, params: list[torch.Tensor], sharded: bool = False) -> torch.optim.Optimizer:
    """``optim.name``'s optimizer over ``params``: torch's AdamW, or bitsandbytes' 8-bit AdamW
    (:func:`check_optimizer` says where it cannot run)."""
    o = cfg.optim
    check_optimizer(cfg, sharded)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))


def set_window(run: Run, iteration: int) -> None:
    """Point ``run.schedule`` and ``run.trained`` at iteration ``iteration``'s SDE window (with a fixed
    window, the same every iteration)."""
    n, base = run.cfg.noise, run.base_schedule
    start = None
    if n.window_move == "fixed":
        schedule = base
    else:
        T = base.num_steps
        start = window_start_at(n.window_move, n.window_start, n.window_size, T, iteration,
                                every=n.window_every, seed=run.cfg.run.seed, starts=run.starts)  # fmt: skip
        mask = window_mask(T, start, n.window_size).to(base.noise_level.device)
        schedule = base.with_noise(torch.where(mask, base.noise_level, torch.zeros_like(base.noise_level)))
    run.schedule = schedule
    run.window_start = start
    # (nft, awm: a step's time is trained on, whatever noise its rollout drew)
    run.trained = run.trained_steps
    if run.cfg.grpo.objective == "grpo":
        run.trained = run.trained & schedule.sde_steps.cpu()  # an ODE step has no log-prob to train


def _warn_if_servers_changed(saved: dict | None, served: dict) -> None:
    """A resumed run whose reward servers now host another reward, mode or ``--kwargs`` than at its last
    checkpoint (by their ``/health``; a checkpoint of an older version holds none): a warning, since a server
    may move on purpose, but its scores may no longer mean what the run trained on."""
    if saved is not None and saved != served:
        warnings.warn(
            f"the reward servers host {served or 'nothing'} now, and {saved} when the run wrote its checkpoint "
            "(by their GET /health; kwargs_digest is a digest of their --kwargs): the resumed run's rewards "
            "may not mean what it trained on; point reward.kwargs.url at servers started as before (or start "
            "a new run)",
            stacklevel=3,
        )


def _warn_if_base_changed(
    cfg: TrainConfig, saved: str | None, now: str, saved_encoding: str | None = None
) -> None:
    """A resumed run whose model, loaded from the same ``model.checkpoint``, holds other weights than when the
    run began (the directory replaced, a hub cache moved to another revision; a checkpoint of an older version
    holds no digest): a warning, since its adapters or weights go on from a model they were not trained on. A
    run resumed with or without a prompt cache where it began otherwise cannot be compared: another warning."""
    if saved_encoding is not None and saved_encoding != text_encoding(cfg):
        warnings.warn(
            f"the run began with its prompt embeddings from its {saved_encoding} and resumes with them from its "
            f"{text_encoding(cfg)} (model.prompt_cache): the digest of the loaded models covers the text "
            "encoders only where they are loaded, so the base model cannot be compared with the one the run "
            "began from; resume with the setting it began with for that check",
            stacklevel=3,
        )
        return
    if saved is not None and saved != now:
        warnings.warn(
            f"the model loaded from model.checkpoint={cfg.model.checkpoint!r} holds other weights than when the "
            f"run wrote its checkpoint (digest {now[:12]}, then {saved[:12]}): the resumed run trains on from "
            "another base model; restore the files the run began with (for a hub name: the same revision in the "
            "hub cache), or start a new run on this one",
            stacklevel=3,
        )


def _note_skipped_starts(run: Run) -> None:
    """Says which starts a moving window skips (``run.starts``), once, at the start of a run."""
    n, starts = run.cfg.noise, run.starts
    if starts is None or not run.dist.main:
        return
    skipped = [p for p in range(run.base_schedule.num_steps - n.window_size + 1) if p not in starts]
    if skipped:
        print(f"noise.window_move={n.window_move}: the window skips the starts {skipped}, whose steps are not "
              f"trained (grpo.trained_steps {run.cfg.trained_steps()}) or have no noise, so it takes the starts "
              f"{starts}", flush=True)  # fmt: skip


def _moving_starts(run: Run) -> list[int] | None:
    """The starts a moving window takes: those whose window holds a step that is trained and has noise (a
    calibrated psi may be 0); None (every start) when no step is both, a run that trains nothing anyway
    (warned of by the calibration). Computed once per run (``run.starts``): one read of the device."""
    base = run.base_schedule
    live = (run.trained_steps & base.sde_steps.cpu()).tolist()
    return window_starts(base.num_steps, run.cfg.noise.window_size, live) or None


# --------------------------------------------------------------------------------------------- one iteration


def collect(run: Run, prompts: list[str], iteration: int, overlap: bool = True):
    """Rollout and rewards for one iteration. Returns (rollout, cond, R [B, T+1], seconds per phase).

    With ``sampling.reward_waves`` W > 1 the prompt groups roll out in W waves; each wave's clean latents
    are decoded and scored on a worker thread (on a side CUDA stream on a GPU) while the next wave rolls
    out, so only the last wave's reward stays on the critical path. All waves sample with the same weights:
    nothing goes off-policy. ``overlap=False`` scores each wave before the next starts (the same numbers;
    the tests' reference); with W = 1 scoring is always in line. Times: ``rollout_s`` until the last wave
    is sampled, ``reward_s`` the wait for the rewards after it, ``reward_busy_s`` (W > 1) the scoring time
    itself, most of it hidden behind the rollout.

    In a torchrun job each rank takes its slice of the rows (``run.dist.rows``) and returns that slice's
    rollout and rewards; wave ``w`` of rank ``r`` draws its SDE noise from the stream of wave ``r * W + w``.
    When each rank holds whole groups and W divides their number, the waves are those of one process with
    ``reward_waves = world * W``, which then samples exactly what the job does (for Qwen-Image, up to float
    rounding: each rank pads its prompts to its own longest).
    """
    cfg, policy, d = run.cfg, run.policy, run.dist
    G = cfg.sampling.group_size
    rows = [p for p in prompts for _ in range(G)]
    device = torch.device(policy.device)
    gen = torch.Generator(device=device).manual_seed(_seed(cfg, iteration, 1))
    t0 = time.perf_counter()
    mine = d.rows(len(rows))  # every row in a single process
    noise = initial_noise(len(rows), G, policy.latent_shape, shared=cfg.sampling.share_initial_noise,
                          generator=gen, device=device)[mine]  # fmt: skip
    rows = rows[mine]
    cond = policy.encode_prompts(rows)
    W = cfg.sampling.reward_waves
    bounds = wave_bounds(len(rows), G, W)
    waves = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    busy: list[float] = []
    results, rollouts = [], []
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward") if W > 1 and overlap else None
    try:
        for w, rs in enumerate(waves):
            # one wave: the SDE noise continues the initial noise's stream; waves: one stream each
            wave_gen = (
                gen
                if W * d.world == 1
                else torch.Generator(device=device).manual_seed(_seed(cfg, iteration, 10 + d.rank * W + w))
            )
            # (nft: the old policy samples; the trained weights are back after each wave)
            rolled = run.old if cfg.grpo.objective == "nft" else None
            with swapped(run, rolled), cfg.model.autocast_context(), lora_merged(run):
                ro = sample(
                    policy, cond.index(rs), noise[rs], run.schedule, guidance_scale=cfg.sampling.guidance_scale,
                    generator=wave_gen, completion_steps=cfg.dense.completion_steps, dense=cfg.dense.mode != "sparse",
                    completion_batching=cfg.dense.completion_batching, max_rows_per_call=cfg.sampling.max_rows_per_call,
                )  # fmt: skip
            rollouts.append(ro)
            if device.type == "cuda" and w == len(waves) - 1:  # the rollout's own stream, not the reward's
                torch.cuda.current_stream(device).synchronize()
            t1 = time.perf_counter()  # the last wave's: rollout_s ends here
            if pool is None:  # in line: the rollout waits for its reward
                results.append(_score_wave(run, ro, rows[rs], None, busy))
                continue
            ready = torch.cuda.Event() if device.type == "cuda" else None
            if ready is not None:
                ready.record()
            results.append(pool.submit(_score_wave, run, ro, rows[rs], ready, busy))
            for r in results:  # a wave that failed to score stops the rollout now, not after the last wave
                if r.done() and r.exception() is not None:
                    raise r.exception()
        parts = [r.result() if isinstance(r, Future) else r for r in results]
        if pool is not None and device.type == "cuda":  # made on side streams, read on this one from now on
            for r in parts:
                r.record_stream(torch.cuda.current_stream(device))
        R = torch.cat(parts).to(device)  # (a plugin reward may answer on the CPU)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)  # (on an error: waves not yet scoring are dropped)
    times = {"rollout_s": t1 - t0, "reward_s": time.perf_counter() - t1}
    if W > 1:
        times["reward_busy_s"] = sum(busy)
    ro = rollouts[0] if W == 1 else Rollout(torch.cat([r.latents for r in rollouts]),
                                            torch.cat([r.log_probs for r in rollouts]), None)  # fmt: skip
    ro.clean = None  # the completions feed the reward only: training never needs them
    return ro, cond, R, times


def wave_bounds(rows: int, group_size: int, waves: int) -> list[int]:
    """Row bounds of ``waves`` reward waves over ``rows`` rows: whole groups when the rows hold at least
    ``waves`` whole groups (always so in one process), single rows otherwise (a rank's share of a torchrun
    job may hold fewer groups than waves, or part of one)."""
    unit = group_size if rows % group_size == 0 and rows // group_size >= waves else 1
    return [int(b) * unit for b in torch.linspace(0, rows // unit, waves + 1).round()]


@torch.no_grad()
def _score_wave(run: Run, ro: Rollout, rows: list[str], ready, busy: list[float]) -> torch.Tensor:
    """Decode and score one wave (on the reward worker thread): R [b, T+1]. ``ready``: the CUDA event after
    the wave's rollout, which the side stream waits on; the stream is drained before R is handed back."""
    t0 = time.perf_counter()
    stream = torch.cuda.Stream(ro.latents.device) if ready is not None else None
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        if stream is not None:
            stream.wait_event(ready)
        T = run.schedule.num_steps
        scorer = _reward_scorer(run)
        G = run.cfg.sampling.group_size
        if ro.clean is not None:
            R = latent_rewards(run.policy.decode, scorer, ro.clean, rows, ro.completed, group_size=G)
        else:
            decode, _ = scoring_decode(run.policy.decode, scorer, 0)  # (videos: only the frames scored)
            final = score(scorer, decode(ro.latents[:, T]), rows, G).float()
            R = torch.zeros(len(rows), T + 1, *final.shape[1:], device=ro.latents.device)
            R[:, T] = final
        R = R.to(ro.latents.device)  # (a plugin reward may answer on the CPU; record_stream needs CUDA)
    if stream is not None:
        stream.synchronize()
    busy.append(time.perf_counter() - t0)
    return R


def _reward_scorer(run: Run):
    """What scores a wave's images: the reward, or (``dense.multi_reward=per_reward``) its components side by
    side, [b] or [b, C]."""
    return run.reward_fn.stack if run.cfg.dense.multi_reward == "per_reward" else run.reward_fn


def _advantages(run: Run, R: torch.Tensor, best_of: bool = True) -> torch.Tensor:
    """[B, T] advantages of the rollout's rewards ``R`` [B, T + 1] (zero on untrained steps), or of its
    components' [B, T + 1, C] (``dense.multi_reward=per_reward``); with ``best_of``, :func:`_keep_best_of`'s."""
    d = run.cfg.dense
    weights = run.reward_fn.weights if R.dim() == 3 else None
    A = advantages(R, run.cfg.sampling.group_size, d.mode, run.trained, global_std=d.global_std,
                   eps=d.adv_eps, clip=d.adv_clip, weights=weights)  # fmt: skip
    return _keep_best_of(run, A, R) if best_of else A


def _keep_best_of(run: Run, A: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """``A`` with, under ``grpo.best_of``, the advantages of the samples it leaves out set to 0, which
    filter_zero_advantage skips (``A`` itself without it)."""
    if run.cfg.grpo.best_of is None:
        return A
    final = (run.reward_fn.combine(R) if R.dim() == 3 else R)[:, -1]
    return A * best_of_rows(final, run.cfg.sampling.group_size, run.cfg.grpo.best_of)[:, None]


def best_of_rows(final: torch.Tensor, G: int, k: int) -> torch.Tensor:
    """``grpo.best_of``: bool [B], per group of ``G`` contiguous rows the ``k // 2`` with the highest ``final``
    reward and the ``k // 2`` with the lowest (ties in row order: the lowest are the earliest of them, the
    highest the latest), on ``final``'s device."""
    order = final.view(-1, G).argsort(dim=1, stable=True)
    picked = torch.cat([order[:, : k // 2], order[:, G - k // 2 :]], dim=1)
    mask = torch.zeros(order.shape, dtype=torch.bool, device=final.device)
    mask.scatter_(1, picked, True)
    return mask.view(-1)


def adapt_beta(beta: float, kl: float | None, target: float, start: float) -> float:
    """``grpo.kl_target``: the next iteration's KL weight after one whose mean KL was ``kl`` (PPO's adaptive
    coefficient, Schulman et al. 2017: doubled above 1.5 x target, halved below target / 1.5), kept within
    [start / 100, start x 100]; unchanged when no pair trained (``kl`` None)."""
    if kl is None:
        return beta
    if kl > 1.5 * target:
        beta *= 2
    elif kl < target / 1.5:
        beta /= 2
    return min(max(beta, start / 100), start * 100)


def step_sample(
    trained: torch.Tensor, rows: int, fraction: float, seed: int, stratified: bool = False
) -> torch.Tensor:
    """``grpo.step_fraction``: for each of ``rows`` samples, ``ceil(fraction x n)`` of the ``n`` trained steps
    (``trained``, bool [T]) drawn at random, without replacement, from ``seed`` (the same on every rank);
    ``stratified`` (``grpo.step_draw``): one from each of as many runs of the sorted trained steps, of
    near-equal count (``tensor_split``'s: the first ones one longer). At least one step while any is trained.
    Shape: bool [rows, T] on the CPU."""
    steps = trained.cpu().nonzero()[:, 0]
    take = math.ceil(fraction * len(steps) - 1e-9)  # (0.14 x 50 is 7.000000000000001 in floats)
    take = max(1, take) if len(steps) else 0
    gen = torch.Generator().manual_seed(seed)
    if take == 0:  # (nothing trained: a calibrated psi of 0 on every trained step)
        return torch.zeros(rows, trained.numel(), dtype=torch.bool)
    if stratified:
        chosen = torch.stack([
            span[torch.randint(len(span), (rows,), generator=gen)] for span in steps.tensor_split(take)
        ], 1)  # fmt: skip
    else:
        chosen = steps[torch.rand(rows, len(steps), generator=gen).argsort(1)[:, :take]]
    mask = torch.zeros(rows, trained.numel(), dtype=torch.bool)
    mask[torch.arange(rows)[:, None], chosen] = True
    return mask


def group_signal(run: Run, A: torch.Tensor) -> list[float]:
    """Per group, the fraction of its trained (row, step) advantages ``A`` [B, T] that are non-zero: what
    priority sampling scales a prompt's chance by."""
    A = A[:, run.trained.to(A.device)]
    if A.shape[1] == 0:
        return [0.0] * (A.shape[0] // run.cfg.sampling.group_size)
    return (A != 0).float().view(-1, run.cfg.sampling.group_size * A.shape[1]).mean(1).tolist()


def update(run: Run, ro, cond, R: torch.Tensor, iteration: int, A: torch.Tensor | None = None) -> dict:
    """The GRPO update on one rollout: recomputed log-probs, clipped loss + KL, AdamW, EMA. ``A``: the
    advantages when the caller has them already (computed from ``R`` otherwise).

    In a torchrun job ``ro``, ``cond`` and ``R`` are the rank's rows and ``A`` the whole batch's: every rank
    plans the update of the whole batch exactly as one process does (which (row, step) pairs, in which
    optimizer step), then trains the pairs of its own rows, each loss scaled by its step's pair count over
    the whole batch; the gradients summed over the ranks are one process's.
    """
    cfg, d = run.cfg, run.dist
    A = _advantages(run, R) if A is None else A
    trained = run.trained.to(A.device).expand_as(A)  # the whole batch's (row, step) cells of trained steps
    rows, steps, lr = _planned_pairs(run, A, iteration)
    # Statistics stay on the device until the update ends, then come to the host in one read: an .item() per
    # micro-batch would make the host wait for each backward before it queues the next forward.
    stats: dict[str, list[torch.Tensor]] = {}  # per micro-batch: means over its pairs
    sizes: list[int] = []  # pairs per micro-batch: the weights of those means
    grad_norms: list[torch.Tensor] = []  # per optimizer step
    first_ratio_dev, stepped = None, False  # the first ratio is on-policy only before any optimizer step
    u = cfg.grpo.updates_per_iteration
    chunks = list(zip(rows.tensor_split(u), steps.tensor_split(u), strict=True))
    counts = [c.numel() for c, _ in chunks]  # the whole batch's pairs per optimizer step
    A_all = A
    grpo = cfg.grpo
    tbs = grpo.train_batch_size
    # sharded: every rank makes as many calls per optimizer step as the rank with the most micro-batches
    calls = [_most_micro_batches(r, A.shape[0], d.world, tbs) for r, _ in chunks] if run.sharded else None
    if d.enabled:  # this rank's pairs, renumbered from its first row
        mine = d.rows(A.shape[0])
        A = A[mine]
        chunks = [_own_pairs(mine, r, k) for r, k in chunks]
    # Old log-probs. Rollout and update share their numerics (fp32, adapters unmerged): the rollout's own, exact
    # (ratio 1 at the first update). A rollout under model.autocast, or with merged adapters, sampled with
    # velocities rounded otherwise (bf16 moves log-probs by about the clip range); the update then recomputes
    # them itself: the first chunk's in its own forward, the later chunks' here, before any optimizer step.
    # The same holds for a bf16 / fp16 transformer (pretrained models): the rollout's calls and the update's
    # micro-batches have other batch sizes, hence other kernels and other roundings.
    recompute = (
        cfg.model.autocast is not None
        or (cfg.lora.enabled and cfg.lora.merge_for_sampling)
        or run.policy.dtype != torch.float32
        or cfg.model.compile  # compiled blocks: other kernels than the rollout's at the update's batch sizes
        or grpo.ratio_norm  # RatioNorm's bias needs the old velocities, which the recompute keeps
    )
    old_lp, old_v = (
        _recompute_log_probs(run, ro, cond, chunks[1:], calls and calls[1:], grpo.ratio_norm)
        if recompute
        else (ro.log_probs, None)
    )
    sched = run.schedule
    for c, (chunk_rows, chunk_steps) in enumerate(chunks):
        n = counts[c]
        if n == 0:  # no pair in this step (on any rank)
            continue
        batches = list(_micro_batches(chunk_rows, chunk_steps, tbs))
        _idle_calls(run, ro, cond, calls[c] - len(batches) if calls else 0, backward=True)
        at = 0  # the micro-batch's first pair in its chunk
        for i, k in batches:
            lp, kl, v = _step_log_prob(run, ro, cond, i, k, with_kl=cfg.grpo.beta > 0)
            old = lp.detach() if recompute and c == 0 else old_lp[i, k]  # chunk 0: no optimizer step yet
            guard = {}
            if grpo.ratio_norm:  # (chunk 0: the old velocity is v itself, so the bias and its gradient are 0)
                bias = None if c == 0 else _ratio_bias(run, ro, i, k, v, old_v[c - 1][at : at + i.numel()])
                guard = {"ratio_scale": sched.step_std[k], "ratio_bias": bias}
            at += i.numel()
            if grpo.step_weight == "inverse_dt":
                guard["weight"] = 1.0 / (sched.sigmas[k] - sched.sigmas[k + 1])
            loss, s = grpo_loss(
                lp, old, A[i, k], grpo.clip_range, kl, run.beta, grpo.clip_range_high, **guard
            )
            if recompute:  # the on-policy check here: how far the rollout's log-probs are from the update's
                s["rollout_lp_dev"] = (old - ro.log_probs[i, k]).abs().mean()
            (loss * (i.numel() / n)).backward()
            if not recompute and not stepped and first_ratio_dev is None:  # (recomputed: 1 by construction)
                first_ratio_dev = s["ratio_dev_max"]
            for key, val in s.items():
                stats.setdefault(key, []).append(val)
            sizes.append(i.numel())
        if old_v is not None and c > 0:
            old_v[c - 1] = None  # (its chunk's pairs are trained)
        grad_norms.append(_step_and_clip(run))
        stepped = True
    nonzero = ((A_all != 0) & trained).sum() / trained.sum().clamp_min(1)  # 0 when no step is trained
    host = _read_once({**stats, "grad_norm": grad_norms, "_first": [first_ratio_dev], "_nonzero": [nonzero]})
    first, nonzero_frac, norms = host.pop("_first")[0], host.pop("_nonzero")[0], host.pop("grad_norm")
    if not all(math.isfinite(g) for g in norms):  # (the same on every rank: the norm of the summed gradient)
        raise NonFiniteError(
            f"iteration {iteration + 1}: the gradient norm was {norms} (a NaN or inf in the loss: an "
            "overflowing ratio, or a non-finite velocity); the weights and EMA this update wrote are not "
            f"checkpointed, and the last checkpoint in {run.dir} is intact. Lower optim.lr, or check that "
            "model.dtype and model.autocast suit the model, then train again with --resume"
        )
    # over every rank's pairs (the loss the update optimised); ratio_dev_max: the largest of any pair
    out = distributed.mean_stats(run.dist, host, weights=sizes, maxima=("ratio_dev_max",))
    # ratio_dev_first: the first ratio of any rank that trained a pair before the first optimizer step (a rank
    # may have none); in the grad norm's gather
    late = {"grad_norm": norms, "ratio_dev_first": [] if first is None else [first]}
    out.update(distributed.mean_stats(run.dist, late, maxima=("ratio_dev_first",)))
    out.setdefault("ratio_dev_first", None)
    out["lr"] = lr
    out["rows_trained"] = int(sum(counts))  # (row, step) pairs
    out["adv_nonzero_frac"] = nonzero_frac
    return out


def _planned_pairs(run: Run, A: torch.Tensor, iteration: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The whole batch's (row, step) pairs an update trains, in its shuffled order (the trained steps, their
    ``grpo.step_fraction`` sample, without the zero advantages under ``grpo.filter_zero_advantage``), and the
    iteration's learning rate, set on the optimizer. One host sync per iteration, to plan the update."""
    cfg = run.cfg
    keep = run.trained.to(A.device).expand_as(A)
    if cfg.grpo.step_fraction < 1:
        keep = keep & step_sample(
            run.trained, A.shape[0], cfg.grpo.step_fraction, _seed(cfg, iteration, 3),
            stratified=cfg.grpo.step_draw == "stratified",
        ).to(A.device)  # fmt: skip
    if cfg.grpo.filter_zero_advantage:
        keep = keep & (A != 0)
    rows, steps = keep.nonzero(as_tuple=True)
    lr = cfg.optim.lr_at(iteration, cfg.run.iterations)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    gen = torch.Generator().manual_seed(_seed(cfg, iteration, 2))
    order = torch.randperm(rows.numel(), generator=gen).to(rows.device)
    return rows[order], steps[order], lr


def _own_pairs(mine: slice, rows: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the whole batch's pairs, this rank's (its rows ``mine``), renumbered from its first row."""
    sel = (rows >= mine.start) & (rows < mine.stop)
    return rows[sel] - mine.start, steps[sel]


def _ema_step(run: Run) -> None:
    """The EMA's step after an optimizer step (every ema.every of them)."""
    cfg = run.cfg
    if run.ema is None or run.opt_steps % cfg.ema.every != 0:
        return
    decay = cfg.ema.decay
    if cfg.ema.warmup:  # Flow-GRPO's (1 + s) / (10 + s) with s = opt_steps - 1, its 0-based step
        decay = min(decay, run.opt_steps / (run.opt_steps + 9))
    with torch.no_grad():
        for name, p in run.policy.transformer.named_parameters():
            if name in run.ema:
                run.ema[name].lerp_(p.detach(), 1.0 - decay)


def _step_and_clip(run: Run) -> torch.Tensor:
    """The gradients summed over the ranks (FSDP has summed them), clipped; the optimizer's step and the EMA's.
    Returns the gradient norm before the clip."""
    cfg = run.cfg
    if not run.sharded:  # (FSDP sums the shards' gradients in each backward)
        distributed.sum_grads(run.dist, run.params)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.optim.grad_clip)
    if distributed.is_sharded(grad_norm):
        grad_norm = grad_norm.full_tensor()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.opt_steps += 1
    _ema_step(run)
    return grad_norm.detach()


def updater(cfg: TrainConfig):
    """The update of the config's objective: :func:`update` (GRPO), or :func:`update_forward` (nft, awm)."""
    return update if cfg.grpo.objective == "grpo" else update_forward


def update_forward(
    run: Run, ro, cond, R: torch.Tensor, iteration: int, A: torch.Tensor | None = None
) -> dict:
    """The update of a forward-process objective on one rollout: DiffusionNFT's (``grpo.objective=nft``,
    :mod:`densegrpo_fast.nft`) or AWM's (``awm``, :mod:`densegrpo_fast.awm`). Each (sample, step) pair noises
    the sample's clean latent afresh at its step's time, and the trained velocity learns from the sample's
    final-reward advantage (nft: with the old policy's velocity, its weights swapped in, no gradient; awm: with
    the anchor's in its KL term); AdamW, the EMA, then the lagged weights' step toward the trained ones (nft's
    old policy, awm's anchor). The pairs, their micro-batches and, in a torchrun job, the ranks' shares are
    planned as the GRPO update plans them (:func:`update`); each pair's noise is drawn from its own seed (the
    iteration, its row in the whole batch and its step), so a job draws what one process draws."""
    cfg, d, objective = run.cfg, run.dist, run.cfg.grpo.objective
    nft = objective == "nft"
    A = _advantages(run, R) if A is None else A
    rows, steps, lr = _planned_pairs(run, A, iteration)
    # (on the host: each pair's noise seed needs its row and step there, with no read per micro-batch)
    rows, steps = rows.cpu(), steps.cpu()
    u, tbs = cfg.grpo.updates_per_iteration, cfg.grpo.train_batch_size
    chunks = list(zip(rows.tensor_split(u), steps.tensor_split(u), strict=True))
    counts = [c.numel() for c, _ in chunks]
    calls = [_most_micro_batches(r, A.shape[0], d.world, tbs) for r, _ in chunks] if run.sharded else None
    # each pair's signal: nft's optimality probability, awm's advantage scaled into [-1, 1]
    signal = optimality(A, cfg.nft.adv_scale) if nft else scaled_advantage(A, cfg.awm.adv_scale)
    micro_batch = _nft_micro_batch if nft else _awm_micro_batch
    first = 0
    if d.enabled:
        mine = d.rows(A.shape[0])
        first, signal = mine.start, signal[mine]
        chunks = [_own_pairs(mine, r, k) for r, k in chunks]
    stats: dict[str, list[torch.Tensor]] = {}
    sizes: list[int] = []
    grad_norms: list[torch.Tensor] = []
    for c, (chunk_rows, chunk_steps) in enumerate(chunks):
        n = counts[c]
        if n == 0:
            continue
        batches = list(_micro_batches(chunk_rows, chunk_steps, tbs))
        idle = calls[c] - len(batches) if calls else 0
        k = run.trained.nonzero()[:1].flatten()
        for _ in range(idle):  # (a rank with fewer micro-batches: the same calls, times zero)
            loss, _ = micro_batch(run, ro, cond, torch.zeros_like(k), k, signal, iteration, first)
            (loss * 0.0).backward()
        for i, k in batches:
            loss, s = micro_batch(run, ro, cond, i, k, signal, iteration, first)
            (loss * (i.numel() / n)).backward()
            for key, val in s.items():
                stats.setdefault(key, []).append(val)
            sizes.append(i.numel())
        grad_norms.append(_step_and_clip(run))
    host = _read_once({**stats, "grad_norm": grad_norms})
    norms = host.pop("grad_norm")
    if not all(math.isfinite(g) for g in norms):  # (before the lagged weights take any of these)
        raise NonFiniteError(
            f"iteration {iteration + 1}: the gradient norm was {norms} (a NaN or inf in the {objective} loss: a "
            f"non-finite velocity); the weights and EMA this update wrote are not checkpointed, and the last "
            f"checkpoint in {run.dir} is intact. Lower optim.lr, or check that model.dtype and model.autocast suit "
            "the model, then train again with --resume"
        )
    out = distributed.mean_stats(run.dist, host, weights=sizes)
    if run.old is not None:  # the lagged weights' step toward the trained ones
        if nft:
            schedule = (cfg.nft.old_decay_rate, cfg.nft.old_decay_max, cfg.nft.old_decay_delay)
        else:
            schedule = (cfg.awm.anchor_decay_rate, cfg.awm.anchor_decay_max, cfg.awm.anchor_decay_delay)
        decay = old_decay(run.opt_steps, *schedule)
        with torch.no_grad():
            for name, p in run.policy.transformer.named_parameters():
                if name in run.old:
                    run.old[name].lerp_(p.detach(), 1.0 - decay)
        out["old_decay" if nft else "anchor_decay"] = decay
    out.update(distributed.mean_stats(run.dist, {"grad_norm": norms}))
    out["ratio_dev_first"] = None  # (no ratio: nothing samples log-probs)
    out["lr"] = lr
    out["rows_trained"] = int(sum(counts))
    return out


def _noised_pairs(run: Run, ro, cond, i: torch.Tensor, k: torch.Tensor, iteration: int, first: int):
    """The inputs of a forward-process micro-batch: pairs (row ``i`` of this rank, step ``k``; on the host)
    give the clean latents ``x0``, their steps' times ``t``, the noise ``eps`` (each pair's own seed;
    ``first``: this rank's first row in the whole batch), ``x_t`` and the rows' conditioning; ``i`` and ``k``
    on the device."""
    device = ro.latents.device
    seeds = [
        _pair_seed(run.cfg, iteration, first + a, b) for a, b in zip(i.tolist(), k.tolist(), strict=True)
    ]
    i, k = i.to(device), k.to(device)
    x0 = ro.latents[i, -1]
    t = run.schedule.sigmas[k]
    eps = torch.stack([  # (each pair's own stream, drawn where the latents are: no host round trip)
        torch.randn(x0.shape[1:], generator=torch.Generator(device).manual_seed(s), device=device) for s in seeds
    ]).to(x0.dtype)  # fmt: skip
    return i, k, x0, t, eps, noised(x0, t, eps), cond.index(i)


def _nft_micro_batch(run: Run, ro, cond, i: torch.Tensor, k: torch.Tensor, r: torch.Tensor, iteration: int,
                     first: int):  # fmt: skip
    """One micro-batch of :func:`update_forward` under nft: ``r`` the optimality probabilities of this rank's
    pairs' rows (:func:`_noised_pairs` for the rest)."""
    cfg, policy, scale = run.cfg, run.policy, run.cfg.sampling.guidance_scale
    i, k, x0, t, _, x_t, ci = _noised_pairs(run, ro, cond, i, k, iteration, first)
    with torch.no_grad(), swapped(run, run.old):
        v_old = policy.velocity(x_t, t, ci, scale)
    v = policy.velocity(x_t, t, ci, scale)  # (as GRPO's update, outside model.autocast)
    v_ref = _reference_velocity(run, x_t, t, ci) if cfg.nft.kl > 0 else None
    return nft_loss(x0, x_t, t, v, v_old, r[i, k], cfg.nft.beta, cfg.nft.adv_scale, v_ref, cfg.nft.kl)


def _awm_micro_batch(run: Run, ro, cond, i: torch.Tensor, k: torch.Tensor, a: torch.Tensor, iteration: int,
                     first: int):  # fmt: skip
    """One micro-batch of :func:`update_forward` under awm: ``a`` the scaled advantages of this rank's pairs'
    rows (:func:`_noised_pairs` for the rest). The anchor's velocity comes first: swapping its weights in
    after the trained velocity would change the parameters its backward reads."""
    w, policy, scale = run.cfg.awm, run.policy, run.cfg.sampling.guidance_scale
    i, k, x0, t, eps, x_t, ci = _noised_pairs(run, ro, cond, i, k, iteration, first)
    v_anchor = None
    if run.old is not None:
        with torch.no_grad(), swapped(run, run.old):
            v_anchor = policy.velocity(x_t, t, ci, scale)
    v = policy.velocity(x_t, t, ci, scale)  # (as GRPO's update, outside model.autocast)
    v_ref = _reference_velocity(run, x_t, t, ci) if w.kl > 0 else None
    return awm_loss(x0, eps, t, v, a[i, k], w.weighting, w.power, v_ref, w.kl, v_anchor, w.anchor_kl)


def _pair_seed(cfg: TrainConfig, iteration: int, row: int, step: int) -> int:
    """The noise seed of a forward-process pair (``row`` of the whole batch, ``step``) at ``iteration``: a hash
    of the four and the objective, so no two pairs of any iterations share a stream, nor meet
    :func:`_seed`'s."""
    import hashlib

    key = f"{cfg.grpo.objective}:{cfg.run.seed}:{iteration}:{row}:{step}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


class NonFiniteError(ValueError):
    """A reward or a gradient came out NaN or infinite: the run stops before the weights it would write."""


def check_finite_rewards(run: Run, R: torch.Tensor, ro=None) -> None:
    """Stop the run when the reward gave NaN or inf: its advantages would be NaN, and so would every weight
    after the update. (One host read, where the update's plan reads the device anyway.) ``ro``: this rank's
    rollout; when its latents or completions are not finite, the policy is to blame, not the reward, and the
    run stops even if the reward turned them into finite scores (an image cast to uint8 is black). Every
    rank learns of any rank's (one collective), so all of them stop with the same message."""
    bad = ~torch.isfinite(R)
    sampled = [] if ro is None else [t for t in (ro.latents, ro.clean) if t is not None]
    reward_bad, *overflow = torch.stack([bad.any(), *(~torch.isfinite(t).all() for t in sampled)]).tolist()
    if distributed.max_(run.dist, float(any(overflow)), R.device) > 0:
        start = (
            "the weights of the updates so far make the transformer overflow; the last checkpoint in "
            f"{run.dir} leads back here, so --resume would stop again: start a new run with a lower optim.lr "
            "(lora.init can start one from an earlier export's LoRA), and look at grad_norm in metrics.jsonl, "
            "which grows before this"
            if run.opt_steps > 0
            else "the starting weights make the transformer overflow before any update: check model.checkpoint "
            "(and lora.init), and model.dtype (fp16 overflows where bf16 does not)"
        )
        raise NonFiniteError(
            f"iteration {run.iteration + 1}: the rollout's latents are not finite (the rewards: "
            f"{int(bad.sum())} of {R.numel()} non-finite): {start}"
        )
    if reward_bad:
        where = bad.nonzero()  # (row, latent) or, per-reward, (row, latent, component)
        first = tuple(where[0].tolist())
        raise NonFiniteError(
            f"iteration {run.iteration + 1}: reward {run.cfg.reward.name!r} gave {len(where)} non-finite "
            f"score(s) among {R.numel()} (first: row {first[0]}, latent {first[1]}"
            f"{f', component {first[2]}' if len(first) > 2 else ''}, {R[first].item()}); training on them would "
            "write NaN into the weights. The run stops "
            f"before this iteration's update: its last checkpoint in {run.dir} is intact. Fix the reward, then "
            "train again with --resume"
        )


def _read_once(values: dict[str, list[torch.Tensor | None]]) -> dict[str, list[float | None]]:
    """The scalar tensors of ``values`` as floats, copied to the host in one read (one device sync).
    None stays None."""
    scalars = [v.detach().double().reshape(()) for vals in values.values() for v in vals if v is not None]
    flat = iter(torch.stack([s.to(scalars[0].device) for s in scalars]).cpu().tolist() if scalars else [])
    return {key: [None if v is None else next(flat) for v in vals] for key, vals in values.items()}


def _micro_batches(rows: torch.Tensor, steps: torch.Tensor, size: int):
    """(rows, steps) index pairs in slices of at most ``size`` (the update's micro-batches)."""
    for start in range(0, rows.numel(), size):
        yield rows[start : start + size], steps[start : start + size]


def _most_micro_batches(rows: torch.Tensor, total: int, world: int, size: int) -> int:
    """The most micro-batches of ``size`` any of ``world`` ranks holds among the pairs of ``rows`` (indices
    into ``total`` rows, cut in equal contiguous slices per rank)."""
    per_rank = torch.bincount(rows.cpu() // (total // world), minlength=world)
    return int((per_rank.max().item() + size - 1) // size)


def _idle_calls(run: Run, ro, cond, count: int, backward: bool) -> None:
    """``count`` micro-batches' calls that change nothing (this rank's first row at a trained step, its loss
    times zero; forward only unless ``backward``): under FSDP every call is a collective, so a rank with fewer
    micro-batches makes these instead."""
    if count <= 0:
        return
    k = run.trained.nonzero()[:1].flatten().to(ro.latents.device)
    i = torch.zeros_like(k)
    for _ in range(count):
        if backward:
            lp, _, _ = _step_log_prob(run, ro, cond, i, k, with_kl=run.cfg.grpo.beta > 0)
            (lp.sum() * 0.0).backward()
        else:
            with torch.no_grad():
                _step_log_prob(run, ro, cond, i, k, with_kl=False)


def _step_log_prob(run: Run, ro, cond, i: torch.Tensor, k: torch.Tensor, with_kl: bool):
    """Log-prob of the stored steps ``lat[i, k] -> lat[i, k+1]`` under the current policy, the KL to the
    reference policy when ``with_kl`` (else None), and the velocity they came from."""
    cfg, sched = run.cfg, run.schedule
    x, ci, sigma = ro.latents[i, k], cond.index(i), sched.sigmas[k]
    v = run.policy.velocity(x, sigma, ci, cfg.sampling.guidance_scale)
    v_ref = _reference_velocity(run, x, sigma, ci) if with_kl else None
    lp, kl = sde_log_prob(x, v, ro.latents[i, k + 1], sigma, sched.sigmas[k + 1], sched.std[k], ref_velocity=v_ref,
                          kl_exact=cfg.grpo.kl_exact and with_kl, cps=sched.cps)  # fmt: skip
    return lp, kl, v


def _ratio_bias(run: Run, ro, i: torch.Tensor, k: torch.Tensor, v: torch.Tensor, old_v: torch.Tensor):
    """GRPO-Guard's RatioNorm bias of the pairs ``(i, k)``: the exact KL from the old step's Gaussian (the
    velocity ``old_v``) to the current one (``v``), by how much the log-ratio's mean falls below 0
    (ALGORITHM.md §3). A second pass of the kernel, for its KL alone."""
    sched = run.schedule
    return sde_log_prob(ro.latents[i, k], v, ro.latents[i, k + 1], sched.sigmas[k], sched.sigmas[k + 1],
                        sched.std[k], ref_velocity=old_v, kl_exact=True, cps=sched.cps)[1]  # fmt: skip


@torch.no_grad()
def _recompute_log_probs(
    run: Run, ro, cond, chunks, calls: list[int] | None = None, keep_velocities: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor | None] | None]:
    """``ro.log_probs`` with the (row, step) entries of ``chunks`` recomputed by the current policy at the
    update's own precision, in the update's micro-batches (sharded: ``calls`` per chunk, padded with idle
    ones); with ``keep_velocities``, also each chunk's velocities, [its pairs, *latent] in the order of its
    micro-batches (else None). One buffer per chunk, made whole at its first micro-batch: the memory
    estimate, which runs three micro-batches of a chunk, counts all of it."""
    out = ro.log_probs.clone()
    kept: list[torch.Tensor | None] = []
    for c, (chunk_rows, chunk_steps) in enumerate(chunks):
        batches = list(_micro_batches(chunk_rows, chunk_steps, run.cfg.grpo.train_batch_size))
        _idle_calls(run, ro, cond, calls[c] - len(batches) if calls else 0, backward=False)
        kept.append(None)
        at = 0
        for i, k in batches:
            lp, _, v = _step_log_prob(run, ro, cond, i, k, with_kl=False)
            out[i, k] = lp
            if keep_velocities:
                if kept[-1] is None:
                    kept[-1] = v.new_empty((chunk_rows.numel(), *v.shape[1:]))
                kept[-1][at : at + i.numel()] = v
            at += i.numel()
    return out, kept if keep_velocities else None


def _reference_velocity(run: Run, x, sigma, cond):
    """The base model's velocity: LoRA adapters disabled, or the frozen copy in full fine-tuning."""
    policy, cfg = run.policy, run.cfg
    with torch.no_grad():
        if run.reference is None:
            policy.transformer.disable_adapters()
            try:
                return policy.velocity(x, sigma, cond, cfg.sampling.guidance_scale)
            finally:
                policy.transformer.enable_adapters()
        trained, policy.transformer = policy.transformer, run.reference
        try:
            return policy.velocity(x, sigma, cond, cfg.sampling.guidance_scale)
        finally:
            policy.transformer = trained


@contextlib.contextmanager
def lora_merged(run: Run):
    """Sample with every LoRA layer's adapter folded into a fresh copy of its base weight and the adapters
    off (``lora.merge_for_sampling``): one matmul per layer instead of three. The base weights are swapped
    back untouched after (never merged into in place, so no rounding drift); no gradient flows here."""
    if not (run.cfg.lora.enabled and run.cfg.lora.merge_for_sampling):
        yield
        return
    from peft.tuners.lora import LoraLayer

    transformer, swapped, disabled = run.policy.transformer, [], False
    try:
        with torch.no_grad():
            for m in transformer.modules():
                if isinstance(m, LoraLayer) and not m.merged:
                    base = m.get_base_layer()
                    w = base.weight.data
                    delta = sum(m.get_delta_weight(a) for a in m.active_adapters if a in m.lora_A)
                    swapped.append((base, w))
                    base.weight.data = (w + delta).to(w.dtype)
        transformer.disable_adapters()
        disabled = True
        yield
    finally:
        if disabled:
            transformer.enable_adapters()
        for base, w in swapped:
            base.weight.data = w


@contextlib.contextmanager
def ema_weights(run: Run):
    """Swap the EMA weights in (for evaluation and export), and the trained ones back after."""
    with swapped(run, run.ema):
        yield


@contextlib.contextmanager
def swapped(run: Run, weights: dict[str, torch.Tensor] | None):
    """Swap ``weights`` (the EMA, nft's old policy, awm's anchor; by name) into the trained parameters, and the
    trained ones back after (nothing when None). Under FSDP2 the copies write the shards: each call gathers
    them anew (the root too: distributed.shard reshards it after each forward)."""
    if weights is None:
        yield
        return
    params = dict(run.policy.transformer.named_parameters())
    saved = {n: params[n].detach().clone() for n in weights}
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)


@torch.no_grad()
def heldout_rewards(run: Run) -> dict[str, float]:
    """Mean rewards of ODE samples (the eval section's sampler) on held-out prompts: ``eval_reward`` (the
    training reward) and ``eval_<key>`` for each of ``eval.rewards``."""
    cfg, policy = run.cfg, run.policy
    e = cfg.eval
    stance = contextlib.nullcontext()
    if e.resolution is not None:  # (a copy sharing the transformer, EMA, merged adapters; or the policy)
        policy = policy.at_resolution(e.resolution)
        if (
            policy is not run.policy and cfg.model.compile and hasattr(torch.compiler, "set_stance")
        ):  # (>= 2.6)
            # compiled blocks that met a second image size would recompile with its sequence length
            # dynamic, and training would then run that shape-generic graph too: this evaluation runs eager
            stance = torch.compiler.set_stance("force_eager")
    own = cfg.eval_rewards_built()  # (an entry equal to the training reward is scored by its model)
    same = {f"eval_{k}" for k in e.rewards if k not in own}
    # built for each evaluation and freed after it: kept, their weights would sit on the device through every
    # rollout and update (the memory estimate counts them in the evaluation phase only)
    # (a pairwise reward scores a held-out image alone through its pointwise view: win rates average 1/2)
    fns = {
        "eval_reward": pointwise_view(run.reward_fn),
        **{
            f"eval_{k}": pointwise_view(
                r.for_policy(build_reward(r.name, **r.kwargs), cfg.model.video), f"eval.rewards.{k}"
            )
            for k, r in own.items()
        },
    }
    d = run.dist
    check_same_servers(d, {k: fns[f"eval_{k}"] for k in own})
    for k in own:  # each rank built these from its own files: the same weights?
        distributed.check_loaded(
            d, fns[f"eval_{k}"], f"eval.rewards.{k}'s", f"eval.rewards.{k}.kwargs", policy.device
        )
    sched = Schedule(sampler_grid(e.num_steps, e.shift, policy), torch.zeros(e.num_steps)).to(policy.device)
    # The eval command's prompts and noise, drawn on the CPU, so that a row's noise depends on neither the
    # device nor the batch size and this matches `densegrpo-fast eval` on the exported EMA policy.
    if cfg.model.family == "toy":  # (densegrpo_fast.toy.evaluate: one stream, one image per prompt)
        prompts = run.eval_prompts.heldout(e.num_prompts)
        all_noise = torch.randn(
            len(prompts), *policy.latent_shape, generator=torch.Generator().manual_seed(e.seed)
        )
    else:  # (densegrpo_fast.evaluate: the file's first num_prompts, images_per_prompt each, noise per image)
        lines = run.eval_prompts.heldout(None)
        pairs = [(i, j) for i in range(len(lines[: e.num_prompts])) for j in range(e.images_per_prompt)]
        prompts = [lines[i] for i, _ in pairs]
        all_noise = torch.stack([noise_for(policy, e.seed, i, j) for i, j in pairs])
    scores: dict[str, list[torch.Tensor]] = {k: [] for k in fns}
    lo, hi = (len(prompts) * d.rank) // d.world, (len(prompts) * (d.rank + 1)) // d.world  # this rank's
    # sharded: every rank samples batches of the same sizes (its last prompt repeated, and not scored)
    end = lo + math.ceil(len(prompts) / d.world) if run.sharded else hi
    starts = range(lo, end, e.batch_size)
    indices = [[min(j, max(hi - 1, 0)) for j in range(s, min(s + e.batch_size, end))] for s in starts]
    # (offloaded encoders: on the device for a group of batches' prompts, off it while those are sampled)
    conds = encoded_batches(policy, [[prompts[j] for j in idx] for idx in indices])
    with stance:
        for s, idx, cond in zip(starts, indices, conds, strict=True):
            chunk = [prompts[j] for j in idx]
            noise = all_noise[idx].to(policy.device)
            # (an ODE: its SDE noise is multiplied by 0, drawn from a generator of its own, not the global one)
            ro = sample(policy, cond, noise, sched, guidance_scale=e.guidance_scale, dense=False,
                        max_rows_per_call=cfg.sampling.max_rows_per_call, generator=torch.Generator(policy.device))  # fmt: skip
            real = max(0, min(len(idx), hi - s))
            if real == 0:
                continue
            images = policy.decode(ro.latents[:real, -1])
            for k, fn in fns.items():
                scores[k].append(fn(images, chunk[:real]).float())
    if not d.enabled:
        means = {k: torch.cat(v).mean().item() for k, v in scores.items()}
    else:
        zero = torch.zeros((), dtype=torch.float64, device=policy.device)
        sums = torch.stack(
            [torch.cat(v).double().sum().to(policy.device) if v else zero for v in scores.values()]
        )
        means = dict(zip(scores, (distributed.sum_(d, sums) / len(prompts)).tolist(), strict=True))
    keys = ["eval_reward", *(f"eval_{name}" for name in e.rewards)]
    return {k: means["eval_reward" if k in same else k] for k in keys}


def export_policy(run: Run, path: Path) -> Path | None:
    """The EMA policy with LoRA merged, saved by the adapter (``policy.save``) for evaluation; with LoRA on
    a pretrained model (sd3, flux, qwen_image, z_image, flux2_klein, wan), also the EMA adapters alone in diffusers' LoRA format, in
    ``lora_ema/`` beside it
    (``StableDiffusion3Pipeline.load_lora_weights``). Every rank calls; rank 0 writes (its error stops every
    rank); a sharded run's whole weights are gathered first, in the model's dtype."""
    if not hasattr(run.policy, "save"):
        return None
    whole = None
    if run.sharded:  # (LoRA: the frozen base too, which the merge needs)
        with ema_weights(run):
            whole = distributed.full_model_state(run.policy.transformer, frozen=run.cfg.lora.enabled)
    return distributed.on_main(run.dist, lambda: _export(run, path, whole))


def _export(run: Run, path: Path, whole: dict[str, torch.Tensor] | None) -> Path:
    if whole is not None:  # a sharded run: its whole weights in the unsharded shape, as the base model ran
        shell = copy.deepcopy(run.shell)
        if not run.cfg.lora.enabled:  # (LoRA's are in their own dtypes already: the base's, fp32 adapters)
            for n, t in whole.items():  # in place: each fp32 tensor is freed as its cast is made
                whole[n] = t.to(run.policy.dtype) if t.is_floating_point() else t
        shell.load_state_dict(whole, strict=False, assign=True)
        exported = copy.deepcopy(run.policy, {id(run.policy.transformer): shell})
    else:
        with ema_weights(run):
            exported = host_copy(run.policy)
    _write_export(run, exported, path)
    return path


def host_copy(policy):
    """A copy of ``policy`` whose transformer is in host memory, where the save puts the weights anyway: merged
    on the device, a second transformer (FLUX.1-dev: 22 GiB) would make the end of the run its memory peak.
    The other models are shared (``DiffusersPolicy.__deepcopy__``)."""
    transformer = policy.transformer
    with torch.no_grad():  # (copy=True: on a CPU run too, the merge must not touch the trained weights)
        memo = {
            id(p): torch.nn.Parameter(p.to("cpu", copy=True), p.requires_grad)
            for p in transformer.parameters()
        }
        memo.update({id(b): b.to("cpu", copy=True) for b in transformer.buffers()})
    return copy.deepcopy(policy, memo)


def _write_export(run: Run, exported, path: Path) -> None:
    """The EMA adapters in diffusers' LoRA format (pretrained models), then the policy with LoRA merged."""
    if run.cfg.lora.enabled and hasattr(exported, "save_lora"):
        from peft.utils import get_peft_model_state_dict

        lora = get_peft_model_state_dict(exported.transformer)
        exported.save_lora(path.parent / "lora_ema", lora, run.cfg.lora.alpha / run.cfg.lora.rank)
    if run.cfg.lora.enabled:
        exported.transformer.fuse_lora()
        exported.transformer.unload_lora()
    exported.save(path, metadata={"source": "densegrpo-fast train", "iteration": run.iteration})


def checkpoint(run: Run) -> None:
    """Rank 0 writes the checkpoint (its error stops every rank), after every rank has checked that it trains
    the same weights; a sharded run's whole tensors are gathered first, so the checkpoint is one process's."""
    transformer = run.policy.transformer
    gathered = None  # sharded: (weights, optimizer state, EMA), whole, on rank 0
    if run.sharded:  # collectives: every rank takes part
        gathered = (
            distributed.full_model_state(transformer),
            distributed.full_optimizer_state(transformer, run.optimizer),
            distributed.full_tensors(run.ema) if run.ema is not None else None,
            distributed.full_tensors(run.old) if run.old is not None else None,
        )
    else:
        kept = [*(run.ema or {}).values(), *(run.old or {}).values()]
        distributed.check_in_sync(run.dist, run.params + kept, "the trained weights, EMA or lagged weights")

    def write() -> None:  # rank 0 alone
        trainable, optimizer, ema, old = gathered or (
            trainable_state(transformer),
            run.optimizer.state_dict(),
            run.ema,
            run.old,
        )
        save_checkpoint(
            run.dir,
            {
                "iteration": run.iteration,
                "opt_steps": run.opt_steps,
                "wall_s": run.wall_s,
                "trainable": trainable,
                "optimizer": optimizer,
                "ema": ema,
                **({lagged_key(run.cfg): old} if old is not None else {}),
                "torch_rng": torch.get_rng_state(),
                "psi": run.base_schedule.noise_level.cpu(),
                "prompt_priority": run.priority.state_dict() if run.priority is not None else None,
                "world": run.dist.world,
                "served": run.served,
                "base_weights": run.base_weights,
                "text_encoding": text_encoding(run.cfg),
                "beta": run.beta,
            },
        )
        records = run.log.read()
        plot_reward_curve(records, run.dir / "reward_curve.png")
        plot_step_rewards(records, run.dir / "step_rewards.png")

    distributed.on_main(run.dist, write)


# --------------------------------------------------------------------------------------------- the loop


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run (or resume) training; returns the run directory."""
    run = setup(cfg, resume=resume, progress=progress)
    with _closed_on_failure(run.log):
        _loop(run, progress)
    distributed.on_main(run.dist, run.log.close)  # (W&B's finish: its error reaches every rank)
    distributed.on_main(run.dist, lambda: unlock_dir(run.dir))
    distributed.shutdown(run.dist)
    return run.dir


def _loop(run: Run, progress: bool) -> None:
    """The iterations (rollout, update, log, grids, evaluations, checkpoints) and the export."""
    from tqdm import tqdm

    cfg = run.cfg
    d = run.dist
    total = cfg.run.iterations
    bar = tqdm(total=total, initial=run.iteration, desc=run.name,
               disable=not (progress and d.main), dynamic_ncols=True)  # fmt: skip
    budget = cfg.run.time_budget_s
    if distributed.broadcast(d, _export_missing(run)):  # (rank 0 holds the run directory and the log)
        export_kept(run)
    if distributed.broadcast(d, _evaluation_missing(run)):
        _evaluate(run, bar)
    warned_lp_dev = False
    while not _finished(run):
        t0 = time.perf_counter()
        it = run.iteration
        n_prompts = cfg.prompts.prompts_per_iteration
        prompts = (run.priority or run.prompts).sample(n_prompts, it)
        set_window(run, it)
        ro, cond, R, times = collect(run, prompts, it)  # this rank's rows
        t1 = time.perf_counter()
        R_all = distributed.gather_rows(d, R)  # the whole batch's: advantages see every group whole
        check_finite_rewards(run, R_all, ro)
        A_all = _advantages(run, R_all)
        up = updater(cfg)(run, ro, cond, R, it, A_all)
        if cfg.grpo.kl_target is not None:  # the weight this iteration trained with, then the next one's
            up["beta"] = run.beta
            run.beta = adapt_beta(run.beta, up.get("kl"), cfg.grpo.kl_target, cfg.grpo.beta)
        times["update_s"] = time.perf_counter() - t1
        if run.priority is not None:
            # (each group's signal over all its samples, not the best_of it trains)
            signal = A_all if cfg.grpo.best_of is None else _advantages(run, R_all, best_of=False)
            run.priority.observe(prompts, group_signal(run, signal))
        run.iteration += 1
        run.wall_s += distributed.max_(d, time.perf_counter() - t0, R.device)  # the slowest rank's
        R, parts = R_all, None
        if R.dim() == 3:  # per-reward advantages: the components' rewards, and their weighted sum
            parts, R = R, run.reward_fn.combine(R)
        stats = step_reward_stats(R) if cfg.dense.mode != "sparse" else {}
        record = {"iteration": run.iteration, "wall_s": round(run.wall_s, 3), "reward_mean": R[:, -1].mean().item(),
                  "reward_std": R[:, -1].std().item(), **up, **stats, **{k: round(v, 4) for k, v in times.items()}}  # fmt: skip
        if parts is not None:
            means = parts[:, -1].mean(0).tolist()
            record["reward_parts_mean"] = dict(zip(run.reward_fn.parts, means, strict=True))
        if run.window_start is not None:
            record["window_start"] = run.window_start
        distributed.on_main(d, functools.partial(run.log.write, record))  # its error stops every rank
        bar.update(1)
        post = {"reward": f"{record['reward_mean']:.3f}"}
        if up["ratio_dev_first"] is not None:
            post["ratio_dev"] = f"{up['ratio_dev_first']:.1e}"
        elif "rollout_lp_dev" in up:
            post["lp_dev"] = f"{up['rollout_lp_dev']:.1e}"
            if up["rollout_lp_dev"] > ROLLOUT_LP_DEV_LIMIT and d.main and not warned_lp_dev:
                warned_lp_dev = True
                _warn_off_policy(run.iteration, up["rollout_lp_dev"])
        if budget is not None:  # the bar's ETA counts toward run.iterations; the budget usually ends it first
            post["budget_left"] = f"{max(0.0, budget - run.wall_s) / 60:.1f}min"
        bar.set_postfix(post)
        if cfg.run.sample_grid_every and run.iteration % cfg.run.sample_grid_every == 0:
            distributed.on_main(d, functools.partial(_sample_grid, run, ro, prompts, R))
        del ro, cond, R, R_all, A_all, parts  # not held through the evaluation and the next rollout
        if _finished(run) or run.iteration % cfg.run.checkpoint_every == 0:  # first: an export or evaluation
            checkpoint(run)  # that fails loses nothing
        if _export_due(run):
            export_kept(run)
        if _evaluation_due(run):
            _evaluate(run, bar)
    bar.close()
    if d.main:
        _say_how_it_ended(run)
    _final_export(run)


def _say_how_it_ended(run: Run) -> None:
    """A line when run.time_budget_s ended the run before run.iterations (the bar's budget_left is gone
    with the bar, and ``--no-progress`` shows none), and a warning when the EMA never updated: its exports
    then hold the starting weights."""
    cfg = run.cfg
    if run.iteration < cfg.run.iterations:
        print(f"stopped by run.time_budget_s={cfg.run.time_budget_s:g}: {run.iteration} of {cfg.run.iterations} "
              f"iterations in {run.wall_s / 60:.1f} min of training", flush=True)  # fmt: skip
    if cfg.ema.enabled and run.opt_steps < cfg.ema.every:
        warnings.warn(
            f"the EMA never updated: it updates every ema.every={cfg.ema.every} optimizer steps, and the run "
            f"made {run.opt_steps}, so its exports (policy_ema.safetensors) hold the starting weights; lower "
            "ema.every, or train longer",
            stacklevel=3,
        )


def _final_export(run: Run) -> None:
    """The run's export, ``policy_ema.safetensors`` (and ``lora_ema/``) in its directory; when the last
    iteration's kept export holds the same EMA weights already, its files instead: the policy hard-linked
    where the file system allows, else copied (written atomically: neither file is ever rewritten in place),
    and the adapters copied."""
    kept = kept_export_dir(run.dir, run.iteration)
    if distributed.broadcast(run.dist, _export_due(run) and (kept / "policy_ema.safetensors").exists()):
        distributed.on_main(run.dist, functools.partial(_reuse_export, kept, run.dir))
    else:
        export_policy(run, run.dir / "policy_ema.safetensors")


def _reuse_export(kept: Path, run_dir: Path) -> None:
    policy = run_dir / "policy_ema.safetensors"
    if policy.exists() and os.path.samefile(policy, kept / "policy_ema.safetensors"):
        return  # (a resumed finished run: linked already; a rename onto the same file would keep the tmp)

    def link(src: Path, tmp: Path) -> None:
        try:
            os.link(src, tmp)
        except OSError:  # (a file system without hard links)
            shutil.copyfile(src, tmp)

    if (kept / "lora_ema").is_dir():
        shutil.rmtree(run_dir / "lora_ema", ignore_errors=True)
        shutil.copytree(kept / "lora_ema", run_dir / "lora_ema")
    write_atomic(policy, functools.partial(link, kept / "policy_ema.safetensors"))


def _finished(run: Run) -> bool:
    """Whether the run has done run.iterations, or used up run.time_budget_s."""
    budget = run.cfg.run.time_budget_s
    return run.iteration >= run.cfg.run.iterations or (budget is not None and run.wall_s >= budget)


def _evaluation_due(run: Run) -> bool:
    """Whether an evaluation follows the current iteration: the last one, and every run.eval_every."""
    every = run.cfg.run.eval_every
    return _finished(run) or bool(every and run.iteration % every == 0)


def _export_due(run: Run) -> bool:
    """Whether a kept export follows the current iteration (every run.export_every)."""
    every = run.cfg.run.export_every
    return bool(every and run.iteration and run.iteration % every == 0)


def kept_export_dir(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / "exports" / f"iter_{iteration:05d}"


def _export_missing(run: Run) -> bool:
    """Whether the kept export of the current iteration is due but absent: a run killed after a checkpoint,
    before the export that follows it (written last, ``policy_ema.safetensors`` marks a whole export)."""
    policy = kept_export_dir(run.dir, run.iteration) / "policy_ema.safetensors"
    return _export_due(run) and hasattr(run.policy, "save") and not policy.exists()


def export_kept(run: Run) -> None:
    """The export of :func:`export_policy` into ``exports/iter_NNNNN/``, then (rank 0) the oldest kept
    exports beyond run.keep_exports removed."""
    export_policy(run, kept_export_dir(run.dir, run.iteration) / "policy_ema.safetensors")
    keep = run.cfg.run.keep_exports
    if keep is not None:
        distributed.on_main(run.dist, functools.partial(_prune_exports, run.dir, keep))


def _kept_exports(run_dir: Path) -> list[tuple[int, Path]]:
    """The kept exports' (iteration, folder), oldest first."""
    found = [(p.name[5:], p) for p in (Path(run_dir) / "exports").glob("iter_*")]
    return sorted((int(i), p) for i, p in found if i.isdigit())


def _prune_exports(run_dir: Path, keep: int) -> None:
    kept = _kept_exports(run_dir)
    for _, old in kept[: max(0, len(kept) - keep)]:
        shutil.rmtree(old)


def _drop_exports_after(run_dir: Path, iteration: int) -> None:
    """A resumed run's: the kept exports of iterations after its checkpoint, which it trains again (as the log
    drops their records)."""
    for i, folder in _kept_exports(run_dir):
        if i > iteration:
            shutil.rmtree(folder)


def _evaluation_missing(run: Run) -> bool:
    """Whether the run's evaluation at its current iteration is due but not in the log: the start of a
    fresh run, or a run killed between a checkpoint and the evaluation after it (the checkpoint comes first)."""
    records = run.log.read()
    if run.iteration == 0:
        return not records
    return _evaluation_due(run) and not any(
        r["iteration"] == run.iteration and "eval_reward" in r for r in records
    )


def _sample_grid(run: Run, ro, prompts: list[str], R: torch.Tensor) -> None:
    """Rank 0's first rows (the batch's first: the rows a single process would show, as far as it has them)
    with their rewards, as a PNG in ``samples/``; an edit run shows each group's source before its edits."""
    n = min(16, ro.latents.shape[0])
    images = run.policy.decode(ro.latents[:n, -1])
    rows = [p for p in prompts for _ in range(run.cfg.sampling.group_size)][:n]
    caps = [f"{p}\nR={r:.2f}" for p, r in zip(rows, R[:n, -1].tolist(), strict=True)]
    if isinstance(rows[0], EditPrompt):
        shown, captions = [], []
        for i, (p, image, cap) in enumerate(zip(rows, images, caps, strict=True)):
            if i == 0 or prompt_key(rows[i - 1]) != prompt_key(p):  # (the first row of a group)
                shown.append(source_pixels(p.image, *images.shape[-2:]).to(images.device))
                captions.append(f"source of\n{p}")
            shown.append(image)
            captions.append(cap)
        images, caps = torch.stack(shown), captions
    path = run.dir / "samples" / f"iter_{run.iteration:05d}.png"
    save_image_grid(images, caps, path)
    run.log.image("samples", path, run.iteration)
    if images.ndim == 5:  # (videos: the grid shows strips of frames, the GIF the first four playing, small)
        save_gif(gif_preview(images), path.with_suffix(".gif"), fps=getattr(run.policy, "fps", 16.0))
        run.log.video("samples_video", path.with_suffix(".gif"), run.iteration)


def ema_heldout_rewards(run: Run) -> dict[str, float]:
    """:func:`heldout_rewards` of the EMA weights (with LoRA merged for sampling): the run's evaluation."""
    with ema_weights(run), lora_merged(run):
        return heldout_rewards(run)


def _warn_off_policy(iteration: int, lp_dev: float) -> None:
    warnings.warn(
        f"iteration {iteration}: the rollout's log-probs differ from the update's recomputed ones by "
        f"{lp_dev:.2e} on average (rollout_lp_dev; limit {ROLLOUT_LP_DEV_LIMIT:g}, 10x the default clip range): "
        "the samples come from a policy measurably other than the one trained. bf16 rounding alone gives about "
        "1e-4, more at late, low-noise steps; a larger gap can also mean that sampling and training disagree on "
        "the step (noise level, sigma grid, conditioning, weights). To tell them apart, run a few iterations "
        "with fp32 rollouts (model.autocast=null lora.merge_for_sampling=false, and model.dtype=fp32 "
        "model.compile=false for the pretrained families), whose ratio_dev_first is 0 (about 1e-7 has been "
        "seen with other rollout call sizes)",
        stacklevel=3,
    )


def _evaluate(run: Run, bar) -> None:
    bar.set_description_str("evaluating")
    scores = ema_heldout_rewards(run)
    record = {"iteration": run.iteration, "wall_s": round(run.wall_s, 3), **scores}
    distributed.on_main(run.dist, functools.partial(run.log.write, record))
    bar.set_description_str(run.name)
    if run.dist.main:
        bar.write(
            f"iteration {run.iteration}: held-out " + ", ".join(f"{k[5:]} {v:.4f}" for k, v in scores.items())
        )
