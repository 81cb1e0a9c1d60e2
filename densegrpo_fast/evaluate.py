"""Evaluation of any policy on a prompt file, resumable: per-prompt scores plus a summary.

The papers' protocol (Flow-GRPO, DenseGRPO): the deterministic Euler ODE with ``eval.num_steps`` steps (40
for SD3.5) and CFG ``eval.guidance_scale`` (4.5), from the EMA weights of a run. Each (prompt ``i``, image
``j``) draws its initial noise from its own generator seeded by ``(eval.seed, i, j)``, so a score does not
depend on the batch size, on the device's call order, or on whether the run was resumed.

Outputs in ``eval.output_dir``:
    scores.jsonl   one line per prompt: ``{"index", "prompt", "<reward>": [per-image scores]}``, appended
                   batch by batch; a killed evaluation resumes by skipping the indices already there
    summary.json   the mean of each reward over all images, the protocol, the checkpoint, the count; for a
                   ``.jsonl`` prompt file with GenEval's ``tag`` per line, also each reward's mean per tag
                   (``by_tag``) and the mean of those (``tag_mean``: GenEval's "Overall", an average over
                   its six tasks, not over its 553 prompts; prompts without a tag enter neither, and
                   ``untagged_prompts`` counts them)
    images/        ``{index:05d}_{j}.png`` when ``eval.save_images`` is on (a video family's: ``.gif``)

Under ``torchrun`` the prompts are shared out (prompt ``i`` to rank ``i % world``); each rank appends to
``scores.rank<r>.jsonl``, and at the end rank 0 merges every file into ``scores.jsonl`` (sorted by index)
and writes the summary. Since a sample's noise depends on (prompt, image) only, the scores are those of a
single process, and a killed job resumes with any number of processes.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from densegrpo_fast import distributed
from densegrpo_fast.checkpoint import lock_dir, unlock_dir, write_text_atomic
from densegrpo_fast.distributed import Dist
from densegrpo_fast.logging import read_jsonl, save_gif
from densegrpo_fast.lora_init import (
    check_checkpoint_experts,
    lora_config_identity,
    lora_identity,
    merge_lora,
    second_lora,
)
from densegrpo_fast.policies import negative_prompt_of, with_family_negative
from densegrpo_fast.policies.base import Policy, PromptEmbeds, compile_blocks, encoded_batches
from densegrpo_fast.prompt_cache import check_covered, text_encoding
from densegrpo_fast.prompts import (
    EditPrompt,
    edit_mismatch,
    prompt_key,
    prompt_lines,
    prompt_tags,
    source_blind,
)
from densegrpo_fast.rewards.remote import _is_number

#: GenEval's six task tags (its metadata's "tag"): its overall score is the mean over these
GENEVAL_TASKS = frozenset({"single_object", "two_object", "counting", "colors", "position", "color_attr"})


def noise_for(policy: Policy, seed: int, index: int, image: int) -> torch.Tensor:
    """The initial latent of image ``image`` of prompt ``index`` [*latent_shape], drawn on the CPU. A CPU
    generator keeps only its seed's low 32 bits, so ``seed`` is mixed into them (times an odd constant: every
    seed draws apart); seed 0 draws what it always has."""
    g = torch.Generator().manual_seed((seed * 0x9E3779B1 + (index << 8) + image) % 2**64)
    return torch.randn(*policy.latent_shape, generator=g)


@torch.no_grad()
def ode_sample(
    policy: Policy,
    prompts: list[str],
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    guidance_scale: float,
    cond: PromptEmbeds | None = None,
) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1]: the Euler ODE ``x <- x + v * (sigma[k+1] - sigma[k])`` from ``noise``;
    ``cond``: the prompts' embeddings, encoded already (None: encoded here)."""
    if cond is None:
        cond = policy.encode_prompts(prompts, with_negative=guidance_scale > 1.0)
    sig = sigmas.to(policy.device, torch.float32)
    x = noise.to(policy.device, torch.float32)
    for k in range(len(sig) - 1):
        v = policy.velocity(x, sig[k].expand(len(prompts)), cond, guidance_scale)
        x = x + v * (sig[k + 1] - sig[k])
    return policy.decode(x)


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """Non-empty lines of a prompt file (or a JSONL file with a ``prompt`` field per line)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(
            f"eval.dataset={str(path)!r} is not a file: pass a text file with one prompt per line, or a .jsonl "
            "file with a 'prompt' per line (the "
            "GenEval, OCR and PickScore prompt sets are not shipped; see the README)"
        )
    lines = prompt_lines(p, "eval.dataset")
    if not lines:
        raise ValueError(
            f"eval.dataset={str(path)!r} holds no prompt: put one prompt per line (a .jsonl file: one object "
            "with a 'prompt' per line)"
        )
    return lines[:limit] if limit else lines


def evaluate(
    policy: Policy,
    prompts: list[str],
    rewards: dict[str, Callable[[torch.Tensor, list[str]], torch.Tensor]],
    sigmas: torch.Tensor,
    *,
    guidance_scale: float,
    images_per_prompt: int = 1,
    batch_size: int = 8,
    seed: int = 0,
    output_dir: str | Path,
    save_images: bool = False,
    info: dict | None = None,
    progress: bool = True,
    dist: Dist = distributed.SINGLE,
    tags: list[str | None] | None = None,
) -> dict:
    """Score ``prompts`` (``images_per_prompt`` ODE samples each) with every reward of ``rewards``.

    Resumes from the scores in ``output_dir``; returns (and writes) the summary. ``dist``: this process's
    share of a torchrun job (every rank calls this with the same arguments). ``tags``: one per prompt (e.g.
    GenEval's tasks), for the summary's per-tag means.
    """
    if tags is not None and len(tags) != len(prompts):
        raise ValueError(f"{len(tags)} tags for {len(prompts)} prompts: give one tag per prompt (or None)")
    from tqdm.auto import tqdm

    from densegrpo_fast.rewards.remote import check_same_servers

    d = dist
    out = Path(output_dir)
    protocol = {"num_prompts": len(prompts), "images_per_prompt": images_per_prompt,
                "num_steps": len(sigmas) - 1, "sigmas": [round(v, 6) for v in sigmas.tolist()],
                "guidance_scale": guidance_scale, "seed": seed,
                # paths as absolute ones: a resume from another working directory finds the same files
                **{k: resolved_path(v) if k in _PATHS else v for k, v in (info or {}).items()}}  # fmt: skip
    served = check_same_servers(d, rewards)  # (every rank's servers host the same rewards?)
    if served:  # what a served reward scores: its url, which may change on a resume, does not say
        protocol["served"] = {k: [{a: b for a, b in s.items() if a != "kwargs_digest"} for s in v]
                              for k, v in served.items()}  # fmt: skip
        # the digests of the servers' --kwargs apart: an evaluation begun by a version without them resumes
        protocol["served_kwargs"] = {k: [s.get("kwargs_digest") for s in v] for k, v in served.items()}
    # every rank checks what is there before rank 0 writes anything, so a refusal stops them all alike
    _check_output_dir(out)
    _check_same_protocol(out / "protocol.json", protocol)
    distributed.on_main(d, lambda: lock_dir(out, "evaluation"))  # (until the summary is written)
    scores_path = out / ("scores.jsonl" if not d.enabled else f"scores.rank{d.rank}.jsonl")  # this rank's
    if scores_path.exists() and not (text := scores_path.read_text()).endswith("\n") and text:
        # a line cut short by a kill: scored again
        write_text_atomic(scores_path, text[: text.rfind("\n") + 1])
    distributed.barrier(d)  # (every rank reads every rank's file: after each has cut its own)
    done = _read_scores(out, rewards, images_per_prompt)
    _check_same_prompts(out, done, prompts)
    distributed.barrier(d)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "protocol.json").exists():  # whole or not at all: a resume reads it back
            write_text_atomic(out / "protocol.json", json.dumps(protocol, indent=2))
        if save_images:
            (out / "images").mkdir(exist_ok=True)
    distributed.barrier(d)
    # One work item per (prompt, image); a prompt's images are scored in one batch or several.
    mine = [i for i in range(len(prompts)) if i % d.world == d.rank]
    todo = [(i, j) for i in mine if i not in done for j in range(images_per_prompt)]
    t0 = time.perf_counter()
    pending: dict[int, dict[str, list[float]]] = {}
    desc = "evaluating" if not d.enabled else f"evaluating (rank 0 of {d.world})"
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo) // images_per_prompt, desc=desc, unit="prompt",
               disable=not (progress and d.main))  # fmt: skip
    batches = [todo[s : s + batch_size] for s in range(0, len(todo), batch_size)]
    # (offloaded encoders: on the device for a group of batches' prompts, off it while those are sampled)
    conds = encoded_batches(policy, [[prompts[i] for i, _ in items] for items in batches],
                            with_negative=guidance_scale > 1.0)  # fmt: skip
    with scores_path.open("a") as f:
        for items, cond in zip(batches, conds, strict=True):
            texts = [prompts[i] for i, _ in items]
            noise = torch.stack([noise_for(policy, seed, i, j) for i, j in items])
            images = ode_sample(policy, texts, noise, sigmas, guidance_scale, cond)
            batch_scores = {k: fn(images, texts).float().cpu().tolist() for k, fn in rewards.items()}
            for n, (i, j) in enumerate(items):
                row = pending.setdefault(i, {k: [] for k in rewards})
                for k in rewards:
                    row[k].append(batch_scores[k][n])
                if save_images:
                    if images.ndim == 5:  # (a video: an animated GIF)
                        fps = getattr(policy, "fps", 16.0)
                        save_gif(images[n : n + 1], out / "images" / f"{i:05d}_{j}.gif", fps=fps)
                    else:
                        _save_png(images[n], out / "images" / f"{i:05d}_{j}.png")
                if j == images_per_prompt - 1:  # the prompt is complete: write it (the resume unit)
                    image = {"image": prompts[i].image} if isinstance(prompts[i], EditPrompt) else {}
                    done[i] = {"index": i, "prompt": prompts[i], **image, **pending.pop(i)}
                    f.write(json.dumps(done[i]) + "\n")
                    f.flush()
                    bar.update(1)
    bar.close()
    distributed.barrier(d)  # every rank's scores are on disk

    def finish() -> dict:  # rank 0; an error here reaches every rank
        scored = done
        if d.enabled or any(out.glob("scores.rank*.jsonl")):  # a job's own files, or a killed job's
            scored = _read_scores(out, rewards, images_per_prompt)
            if len(scored) != len(prompts):  # (checked before the rank files are merged away)
                raise ValueError(
                    f"{out} holds scores for {len(scored)} of {len(prompts)} prompts after every process "
                    "finished: eval.output_dir must be a directory every node of the job shares"
                )
            scored = _merge(out, rewards, images_per_prompt)
        summary = _summary(out, scored, rewards, protocol, t0, tags)
        unlock_dir(out)
        return summary

    return distributed.on_main(d, finish)


def _merge(out: Path, rewards: dict, images_per_prompt: int) -> dict[int, dict]:
    """Every score file of ``out`` into ``scores.jsonl``, sorted by index, and the rank files removed."""
    done = _read_scores(out, rewards, images_per_prompt)
    write_text_atomic(out / "scores.jsonl", "".join(json.dumps(done[i]) + "\n" for i in sorted(done)))
    for p in out.glob("scores.rank*.jsonl"):
        p.unlink()
    return done


def _check_output_dir(out: Path) -> None:
    """``eval.output_dir`` must be a directory (or not exist yet) and its score files files."""
    fix = "give eval.output_dir a new directory"
    if out.exists() and not out.is_dir():
        raise ValueError(f"eval.output_dir {str(out)!r} is a file, not a directory: {fix}")
    for p in [out / "scores.jsonl", *sorted(out.glob("scores.rank*.jsonl"))]:
        if p.exists() and not p.is_file():
            raise ValueError(
                f"{p} is not a file but an evaluation writes its scores there: move it away or {fix}"
            )


def _read_scores(out: Path, rewards: dict, images_per_prompt: int) -> dict[int, dict]:
    """The prompts already scored in ``out``: ``scores.jsonl`` and the rank files of a data-parallel job.
    A line must be one this evaluation could have written: an ``index``, a ``prompt`` and, for each reward,
    ``images_per_prompt`` numbers."""
    done = {}
    for path in [out / "scores.jsonl", *sorted(out.glob("scores.rank*.jsonl"))]:
        for row in read_jsonl(path):  # (a last line cut short by a kill: that prompt is scored again)
            if missing := [k for k in rewards if k not in row]:
                raise ValueError(
                    f"{path} holds no scores for {missing}: it was written with other rewards; "
                    "give eval.output_dir a new directory (or delete the file) to evaluate afresh"
                )
            index, scores = row.get("index"), [row[k] for k in rewards]
            if not (
                isinstance(index, int)
                and not isinstance(index, bool)
                and index >= 0
                and isinstance(row.get("prompt"), str)
                and all(
                    isinstance(v, list) and len(v) == images_per_prompt and all(map(_is_number, v))
                    for v in scores
                )
            ):
                raise ValueError(
                    f"{path} holds a line that is not a prompt's scores ({json.dumps(row)[:120]}): a line is "
                    f'{{"index": i >= 0, "prompt": "...", "<reward>": [{images_per_prompt} numbers]}} for each of '
                    f"{list(rewards)}; the file was changed outside the evaluation: mend or delete that line (its "
                    "prompt is then scored again)"
                )
            done[index] = row
    return done


def _summary(out: Path, done: dict, rewards: dict, protocol: dict, t0: float, tags=None) -> dict:
    """Each reward's mean over every scored image, with the protocol; with ``tags`` (one per prompt), also
    each reward's mean per tag and the mean of those; written to ``summary.json``. A score that is not finite
    (a reward that failed on an image) enters no mean: ``nonfinite_scores`` counts them per reward, with a
    warning naming the first prompts (a mean of none is null)."""

    def mean(rows: list[dict], k: str) -> float | None:
        finite = [v for r in rows for v in r[k] if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else None

    rows = [done[i] for i in sorted(done)]
    summary = {
        "scores": {k: mean(rows, k) for k in rewards},
        **{k: v for k, v in protocol.items() if k != "sigmas"},
        "wall_s_this_call": round(time.perf_counter() - t0, 3),
    }
    bad = {k: [r["index"] for r in rows if not all(map(math.isfinite, r[k]))] for k in rewards}
    if any(bad.values()):
        summary["nonfinite_scores"] = {
            k: sum(not math.isfinite(v) for r in rows for v in r[k]) for k in rewards if bad[k]
        }
        warnings.warn(
            "some scores are not finite and enter no mean ("
            + "; ".join(
                f"{k}: {summary['nonfinite_scores'][k]}, prompts {v[:5]}{' ...' if len(v) > 5 else ''}"
                for k, v in bad.items()
                if v
            )
            + f"; {out / 'scores.jsonl'} keeps them): the reward failed on those images",
            stacklevel=2,
        )
    if tags is not None:  # (prompts without a tag enter no task's mean; they are counted)
        groups: dict[str, list[dict]] = {}
        for r in rows:
            if tags[r["index"]] is not None:
                groups.setdefault(tags[r["index"]], []).append(r)
        if groups:  # (none when eval.num_prompts keeps only untagged lines)
            by_tag = {k: {t: mean(g, k) for t, g in groups.items()} for k in rewards}
            summary["by_tag"] = by_tag
            summary["tag_mean"] = {
                k: None if None in v.values() else sum(v.values()) / len(v) for k, v in by_tag.items()
            }
        if untagged := sum(tags[i] is None for i in done):
            summary["untagged_prompts"] = untagged
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _shown(key: tuple[str, str | None]) -> str:
    """A prompt's text, and its source image where it has one, for messages."""
    return repr(key[0]) + ("" if key[1] is None else f" (image {key[1]!r})")


def _check_same_prompts(out: Path, done: dict, prompts: list[str]) -> None:
    """Scores kept in ``out`` must be of the prompts now at their indices (a prompt file edited or reordered
    at the same path would put them on other prompts, and under other tags)."""
    for i in sorted(done):
        kept = (done[i]["prompt"], done[i].get("image"))
        if i >= len(prompts) or kept != prompt_key(prompts[i]):
            now = _shown(prompt_key(prompts[i])) if i < len(prompts) else "no prompt"
            raise ValueError(
                f"{out} holds scores of prompt {i} {_shown(kept)}, but the prompt file has {now} there: "
                "it changed since; give eval.output_dir a new directory (or delete the old one) to evaluate afresh"
            )


#: Reward settings that say how a reward is reached or batched, not what it scores: a resumed evaluation may
#: change them (a GenEval server restarted on another port, another batch size).
NOT_SCORING = frozenset(
    {
        "url",
        "timeout_s",
        "retries",
        "backoff_s",
        "check",
        "max_batch",
        "device",
        "text_cache_size",
        "detector_batch",
        "concurrency",
        "api_key_env",
    }
)
# (compared resolved: runs/x and /abs/runs/x are one file)
_PATHS = ("model", "checkpoint", "lora", "lora_2", "dataset")


def resolved_path(value):
    return (
        str(Path(value).expanduser().resolve())
        if isinstance(value, str) and Path(value).expanduser().exists()
        else value
    )


def scoring_settings(rewards: dict, video: bool = False) -> dict:
    """``eval.rewards`` as the protocol records it: names and the kwargs that change scores; for a video
    family, also the frames each scores."""
    return {
        k: {"name": r["name"], "kwargs": scoring_kwargs(r.get("kwargs") or {}),
            **({"frames": r.get("frames")} if video else {})}
        for k, r in rewards.items()
    }  # fmt: skip


def scoring_kwargs(kwargs):
    """A reward's ``kwargs`` without the settings of :data:`NOT_SCORING`, at any depth (a weighted sum's parts
    hold kwargs of their own: a served part's url among them)."""
    if isinstance(kwargs, dict):
        return {k: scoring_kwargs(v) for k, v in kwargs.items() if k not in NOT_SCORING}
    return [scoring_kwargs(v) for v in kwargs] if isinstance(kwargs, list) else kwargs


def checkpoint_identity(path: str | None) -> dict | None:
    """What tells one exported policy from another at the same path: the iteration its export records
    (``densegrpo-fast train`` rewrites ``policy_ema.safetensors`` when a run goes on) and its size."""
    if path is None or not Path(path).is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return {"iteration": meta.get("iteration"), "bytes": Path(path).stat().st_size}


def _check_same_protocol(path: Path, protocol: dict) -> None:
    """Resuming is only sound under the same protocol: compare with the one saved by the first call (an
    entry an older version did not save is not compared; paths are compared resolved)."""
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except ValueError as e:
            raise ValueError(
                f"{path} is not JSON ({e}): it was cut short when first written; delete it (the scores beside it "
                "are then resumed under this call's protocol) or give eval.output_dir a new directory"
            ) from None
        if not isinstance(saved, dict):  # (written by hand: a protocol.json of ours is always an object)
            raise ValueError(
                f"{path} holds {type(saved).__name__} {str(saved)[:80]!r}, not the JSON object an evaluation "
                "writes: delete it (the scores beside it are then resumed under this call's protocol) or give "
                "eval.output_dir a new directory"
            )
        saved = with_family_negative(saved, saved.get("family"))
        same = lambda k, a, b: resolved_path(a) == resolved_path(b) if k in _PATHS else a == b  # noqa: E731
        diff = {k: (saved[k], v) for k, v in protocol.items() if k in saved and not same(k, saved[k], v)}
        if diff:
            raise ValueError(
                f"{path.parent} holds an evaluation made under another protocol ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}): "
                "give eval.output_dir a new directory (or delete the old one) to evaluate afresh"
            )


def run_eval(
    config: str,
    overrides: list[str],
    checkpoint: str | None = None,
    as_json: bool = False,
    progress: bool = True,
    lora: str | None = None,
    lora_2: str | None = None,
) -> dict:
    """The ``eval`` command. Toy models get the toy world's per-category report
    (:func:`densegrpo_fast.toy.evaluate.run_eval`); the pretrained families' models are sampled by the eval
    section's ODE (``--checkpoint``: a run's ``policy_ema.safetensors``, else the base model; ``--lora``: a
    LoRA merged into it, ``--lora-2`` Wan 2.2 A14B's low-noise expert's; at ``eval.resolution`` where it is
    set) and scored by each of ``eval.rewards``, resumably, into ``eval.output_dir``."""
    from densegrpo_fast.config import dump_config, load_config, resolution_record
    from densegrpo_fast.policies import load_policy
    from densegrpo_fast.rewards import build_reward
    from densegrpo_fast.rewards.pairwise import pointwise_view
    from densegrpo_fast.schedule import sampler_grid
    from densegrpo_fast.toy.config import ToyEvalConfig

    cfg = load_config(ToyEvalConfig, config, overrides)
    if cfg.model.family == "toy":
        from densegrpo_fast.toy.evaluate import run_eval as toy_eval

        if distributed.world_size() > 1:
            raise ValueError(
                "the toy's eval report runs as one process (it takes seconds to minutes): run it without torchrun"
            )
        if lora is not None or lora_2 is not None:
            raise ValueError(
                f"{'--lora' if lora is not None else '--lora-2'} merges a LoRA into a pretrained family's model: the "
                "toy's eval takes --checkpoint only"
            )
        return toy_eval(config, overrides, checkpoint=checkpoint, as_json=as_json)
    e = cfg.eval
    if checkpoint is not None and not Path(checkpoint).is_file():  # (before any model or reward loads)
        what = "is a directory" if Path(checkpoint).is_dir() else "does not exist"
        raise ValueError(
            f"--checkpoint {checkpoint!r} {what}: give the policy_ema.safetensors of a training run (or "
            "leave --checkpoint out to evaluate the base model)"
        )
    if lora_2 is not None and cfg.model.family != "wan":
        raise ValueError(
            f"--lora-2 {lora_2!r} merges the low-noise expert's LoRA of Wan 2.2 T2V-A14B (model.family wan with "
            f"two experts): model.family {cfg.model.family} has one transformer; remove it"
        )
    if lora is not None or lora_2 is not None:
        check_checkpoint_experts(cfg.model, "--lora", lora, lora_2)
    if not e.rewards:
        raise ValueError(
            "eval.rewards is empty: name at least one reward to score the samples with, e.g. "
            "eval.rewards={pickscore: {name: pickscore, kwargs: {model: /path/to/PickScore_v1}}}"
        )
    distributed.check_device(cfg.model.device)  # (before the rewards load their weights)
    prompts = read_prompts(e.dataset, e.num_prompts)
    edits = isinstance(prompts[0], EditPrompt)  # (a file holds edits or text prompts: prompt_records)
    if bad := edit_mismatch(cfg.model.family, edits, "eval.dataset", e.dataset):
        raise ValueError(bad)
    check_covered(cfg, {"eval.dataset": prompts})
    tags = prompt_tags(Path(e.dataset), "eval.dataset")
    tags = tags[: len(prompts)] if tags is not None else None
    # (a pairwise reward scores an image alone through its pointwise view)
    rewards = {
        k: pointwise_view(
            r.for_policy(build_reward(r.name, **r.kwargs), cfg.model.video), f"eval.rewards.{k}"
        )
        for k, r in e.rewards.items()
    }
    if blind := source_blind(edits, rewards):
        warnings.warn(blind, stacklevel=2)
    torch.set_num_threads(cfg.model.num_threads)
    m = cfg.model
    d = distributed.from_env(m.device)  # under torchrun: one share of the prompts per process
    distributed.check_same_config(d, cfg, ("eval.dataset", "model.prompt_cache"))
    policy = load_policy(m.family, m.checkpoint, d.device(m.device), **m.adapter_options())
    problem = getattr(policy, "guidance_problem", lambda *_: None)(e.guidance_scale, "eval.guidance_scale")
    if problem is not None:
        raise ValueError(problem)
    if checkpoint is not None:
        policy.load_weights(checkpoint)
    # the weights evaluated, told apart exactly: an export retrained at the same path with the same size and
    # iteration, a base model replaced. Not a hash of the files: safetensors writes its metadata in another
    # order each time, so two exports of the same weights differ in their bytes (an older version's protocol
    # held such a hash, checkpoint_sample, which is no longer compared). Taken before a LoRA merges (its float
    # arithmetic may round otherwise on another device; --lora is told apart by its files).
    weights = distributed.weights_digest(policy, policy.device)
    if lora is not None:
        merge_lora(policy, lora, lora_2)
    second = second_lora(lora, lora_2) if getattr(policy.transformer, "expert_names", ()) else None
    if e.resolution is not None:
        policy = policy.at_resolution(e.resolution)
    distributed.check_loaded(
        d, policy, "the loaded models'", "model.checkpoint, --checkpoint, --lora and --lora-2", policy.device
    )
    distributed.check_loaded(d, rewards, "eval.rewards' models'", "eval.rewards' kwargs", policy.device)
    if m.compile:
        compile_blocks(policy.transformer, m.compile_backend)
    out = Path(e.output_dir)
    summary = evaluate(
        policy, prompts, rewards, sampler_grid(e.num_steps, e.shift, policy), guidance_scale=e.guidance_scale,
        images_per_prompt=e.images_per_prompt, batch_size=e.batch_size, seed=e.seed, output_dir=out,
        save_images=e.save_images, progress=progress, dist=d, tags=tags,
        info={"family": m.family, "model": m.checkpoint, "checkpoint": checkpoint, "dataset": e.dataset,
              "resolution": resolution_record(e.resolution or m.resolution), "dtype": m.dtype,
              "max_sequence_length": m.max_sequence_length,
              "checkpoint_identity": checkpoint_identity(checkpoint),
              "weights": weights, "text_encoding": text_encoding(cfg), "lora": lora,
              "lora_weights": lora_identity(lora), "lora_config": lora_config_identity(lora),
              # (Wan 2.2 A14B's low-noise expert's: older protocols, without it, stay valid)
              **({"lora_2": str(second), "lora_2_weights": lora_identity(second),
                  "lora_2_config": lora_config_identity(second)} if second is not None else {}),
              "rewards": scoring_settings({k: r.model_dump(mode="json") for k, r in e.rewards.items()}, m.video),
              **({"frames": policy.frames} if m.video else {}),
              **({"guidance_scale_2": m.guidance_scale_2}
                 if m.guidance_scale_2 is not None and e.guidance_scale != 1 else {}),
              **({"negative_prompt": negative}
                 if (negative := negative_prompt_of(m.family, m.negative_prompt)) is not None
                 and e.guidance_scale != 1 else {})},
    )  # fmt: skip
    if d.main:
        dump_config(cfg, out / "config.yaml")
    distributed.shutdown(d)
    if not d.main:
        return summary
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        show = lambda v: "none finite" if v is None else f"{v:.4f}"  # noqa: E731
        for k, v in summary["scores"].items():
            print(f"{k:<20} {show(v)}")
        for k, per_tag in summary.get("by_tag", {}).items():
            print(f"{k} by tag: " + ", ".join(f"{t} {show(v)}" for t, v in per_tag.items()))
            present = set(per_tag)
            if present <= GENEVAL_TASKS and present != GENEVAL_TASKS:  # (e.g. eval.num_prompts cut the file)
                what = f"over {len(present)} of GenEval's {len(GENEVAL_TASKS)} tasks: not its overall"
            else:
                what = "GenEval's overall" if present == GENEVAL_TASKS else "over the tags present"
            print(f"{k} mean over tags ({what}): {show(summary['tag_mean'][k])}")
        print(
            f"({summary['num_prompts']} prompts x {e.images_per_prompt}, {e.num_steps} Euler steps, CFG "
            f"{e.guidance_scale}, seed {e.seed})\nwrote {out}/scores.jsonl, summary.json"
        )
    return summary


def _save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(arr).save(path)
