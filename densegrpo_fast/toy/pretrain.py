"""Rectified-flow pretraining of the toy policy on freshly rendered batches.

``densegrpo-fast pretrain-toy --config configs/toy_pretrain.yaml [key=value ...]``

Each step renders ``batch_size`` images of random training prompts (the held-out combinations are never
named), draws ``sigma ~ sigmoid(N(m, s))`` (SD3's logit-normal) and noise, and regresses the velocity
``eps - x0`` at ``x_sigma = (1 - sigma) x0 + sigma eps`` with an MSE loss. A fraction ``prompt_dropout`` of
prompts is replaced by the empty prompt so the model learns the unconditional velocity CFG needs. AdamW with
linear warm-up and cosine decay; an EMA of the weights is what gets exported. ``train.init_checkpoint``
starts from a checkpoint's weights instead of random ones (continued pretraining: fresh optimizer and
schedule, the EMA starting at those weights).

Determinism and resumption: the data, noise, sigmas and dropout of step ``k`` depend only on (seed, k), and
``output_dir/state.pt`` (written atomically every ``checkpoint_every`` steps and at the end) holds the
weights, EMA, optimizer state and step, so a run that is stopped and started again with the same command
produces the same weights as one that never stopped (on the same machine and thread count).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from densegrpo_fast.checkpoint import remove_stale_tmp, write_atomic
from densegrpo_fast.config import dump_config, load_config
from densegrpo_fast.policies.toy import ToyArch, ToyPolicy
from densegrpo_fast.toy.config import PretrainSection, ToyPretrainConfig
from densegrpo_fast.toy.world import render, sample_prompts


def arch_from_config(cfg: ToyPretrainConfig) -> ToyArch:
    return ToyArch(**cfg.arch.model_dump())


def lr_at(step: int, t: PretrainSection) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    frac = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def make_batch(step: int, t: PretrainSection) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step ``step``'s prompts (dropped ones as ''), clean latents x0 [B, 3, S, S], noise and sigma [B]."""
    rng = np.random.default_rng([t.seed, step])
    prompts = sample_prompts("train", t.batch_size, rng)
    x0 = ToyPolicy.encode_images(render(prompts, rng))
    drop = rng.random(t.batch_size) < t.prompt_dropout
    texts = ["" if d else p.text for p, d in zip(prompts, drop, strict=True)]
    g = torch.Generator().manual_seed(int(rng.integers(2**62)))
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.sigmoid(t.logit_normal_mean + t.logit_normal_std * torch.randn(t.batch_size, generator=g))
    return texts, x0, noise, sigma


def _init_weights(path: str, arch: ToyArch) -> dict[str, torch.Tensor]:
    """The weights of ``path`` (a toy checkpoint), checked against ``arch``."""
    if not Path(path).is_file():
        raise ValueError(
            f"train.init_checkpoint {path!r} does not exist: pass a .safetensors file written by "
            "`densegrpo-fast pretrain-toy` (or the shipped densegrpo_fast/toy/assets/toy_sd3.safetensors), or null"
        )
    start = ToyPolicy.load(path)
    if start.arch != arch:
        raise ValueError(
            f"train.init_checkpoint {path!r} has arch {start.arch}, the config asks for {arch}: set the "
            f"config's arch section to the checkpoint's, or start from random weights (init_checkpoint=null)"
        )
    return start.state_dict()


def _save_atomic(obj: dict, path: Path) -> None:
    write_atomic(path, lambda tmp: torch.save(obj, tmp))


def _ema_policy(policy: ToyPolicy, ema: dict[str, torch.Tensor]) -> ToyPolicy:
    out = ToyPolicy(policy.arch)
    out.load_state_dict(ema)
    return out.eval().requires_grad_(False)


# train settings a resumed pretraining may change: how long, where and how it runs, and its evaluations (a
# longer train.steps stretches the cosine schedule: warned); every other one changes what a step computes
RESUMABLE = {
    "steps",
    "output_dir",
    "checkpoint_every",
    "eval_every",
    "eval_prompts",
    "device",
    "num_threads",
    "init_checkpoint",
}  # (init_checkpoint: a resumed run starts from its own weights)


def _check_same_training(saved: dict | None, t, state_path: Path) -> None:
    """Refuse a resume whose train settings would compute other steps than the run's (key by key)."""
    if saved is None:  # (a state.pt from before the settings were kept)
        return
    now = t.model_dump()
    changed = [k for k in now if k not in RESUMABLE and k in saved and saved[k] != now[k]]
    if changed:
        raise ValueError(
            f"{state_path} was trained with other settings: "
            + "; ".join(f"train.{k} was {saved[k]!r}, now {now[k]!r}" for k in changed)
            + ". Resume with the run's settings, or give a new train.output_dir to start afresh"
        )
    if saved.get("steps") != now["steps"]:
        import warnings

        warnings.warn(
            f"train.steps changes from {saved.get('steps')} to {now['steps']} on resume: the cosine learning-rate "
            "schedule is stretched to the new length, so the rate jumps at the resume",
            stacklevel=3,
        )


def _truncate_log(path: Path, step: int) -> None:
    """Keep the records of steps up to ``step``: a killed run logged steps after its last state.pt, which the
    resumed run logs again (a cut last line goes too)."""
    from densegrpo_fast.checkpoint import write_text_atomic
    from densegrpo_fast.logging import read_jsonl

    if path.is_file():
        kept = [json.dumps(r) + "\n" for r in read_jsonl(path) if r["step"] <= step]
        write_text_atomic(path, "".join(kept))


def pretrain(cfg: ToyPretrainConfig, progress: bool = True) -> Path:
    """Train (or resume) and return the path of the exported EMA checkpoint ``output_dir/ema.safetensors``."""
    t = cfg.train
    from densegrpo_fast.distributed import check_device

    check_device(t.device, "train.device")  # (before the run directory is made)
    torch.set_num_threads(t.num_threads)
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out)
    state_path = out / "state.pt"
    arch = arch_from_config(cfg)

    torch.manual_seed(t.seed)
    policy = ToyPolicy(arch)
    if t.init_checkpoint is not None and not state_path.is_file():  # a resumed run has its own weights
        policy.load_state_dict(_init_weights(t.init_checkpoint, arch))
    policy = policy.to(t.device).train()
    opt = torch.optim.AdamW(policy.parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.99))
    ema = {k: v.detach().clone() for k, v in policy.state_dict().items()}
    step, wall = 0, 0.0
    if state_path.is_file():
        st = torch.load(state_path, map_location=t.device, weights_only=False)
        if st["arch"] != cfg.arch.model_dump():
            raise ValueError(
                f"{state_path} was trained with arch {st['arch']}, the config asks for {cfg.arch.model_dump()}: "
                f"use the same arch to resume, or a new train.output_dir to start afresh"
            )
        _check_same_training(st.get("train"), t, state_path)
        policy.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        ema = st["ema"]
        step, wall = st["step"], st["wall_s"]
    _truncate_log(out / "log.jsonl", step)  # (0 without a state: a run killed before its first one)
    dump_config(cfg, out / "config.yaml")

    def save_state() -> None:  # the export first: a kill between the two leaves state.pt behind, never ahead
        _ema_policy(policy, ema).save(out / "ema.safetensors", {"step": step, "seed": t.seed})
        _save_atomic(
            {
                "model": policy.state_dict(),
                "optimizer": opt.state_dict(),
                "ema": ema,
                "step": step,
                "wall_s": wall,
                "arch": cfg.arch.model_dump(),
                "train": t.model_dump(),
            },
            state_path,
        )

    log = (out / "log.jsonl").open("a")
    bar = tqdm(total=t.steps, initial=step, desc="pretrain-toy", disable=not progress, dynamic_ncols=True)
    t_start = time.perf_counter() - wall
    loss_avg = None
    while step < t.steps:
        texts, x0, noise, sigma = make_batch(step, t)
        x0, noise, sigma = x0.to(t.device), noise.to(t.device), sigma.to(t.device)
        s = sigma.view(-1, 1, 1, 1)
        x = (1 - s) * x0 + s * noise
        embeds, pooled = policy.embed(texts)
        v = policy.forward_raw(x, sigma, embeds, pooled)
        loss = (v - (noise - x0)).pow(2).mean()
        lr = lr_at(step, t)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(policy.parameters(), t.grad_clip)
        opt.step()
        decay = min(t.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, p in policy.state_dict().items():
                ema[k].lerp_(p, 1 - decay) if p.is_floating_point() else ema[k].copy_(p)
        step += 1
        wall = time.perf_counter() - t_start
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.1e}")
        rec = {
            "step": step,
            "loss": loss.item(),
            "grad_norm": gnorm.item(),
            "lr": lr,
            "wall_s": round(wall, 2),
        }
        if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
            from densegrpo_fast.toy.evaluate import evaluate

            ema_pol = _ema_policy(policy, ema).to(t.device)
            res = evaluate(
                ema_pol, cfg.eval.model_copy(update={"num_prompts": t.eval_prompts, "grid_size": 0})
            )
            rec["eval"] = {
                "strict": res["strict"],
                "partial": res["partial"],
                **{c: round(r["strict"], 3) for c, r in res["per_category"].items()},
            }
            ema_pol.save(out / f"ema_step{step:06d}.safetensors", {"step": step, "seed": t.seed})
            tqdm.write(
                f"step {step}: held-out strict {res['strict']:.3f} partial {res['partial']:.3f} {rec['eval']}"
            )
            t_start = time.perf_counter() - wall  # eval time is not training time
        log.write(json.dumps(rec) + "\n")
        if step % t.checkpoint_every == 0 or step == t.steps:
            log.flush()
            save_state()
    bar.close()
    log.close()
    if not (out / "ema.safetensors").is_file():
        save_state()
    return out / "ema.safetensors"


def run_pretrain(config: str, overrides: list[str]) -> Path:
    """The ``pretrain-toy`` command."""
    cfg = load_config(ToyPretrainConfig, config, overrides)
    path = pretrain(cfg)
    print(f"wrote {path}")
    return path
