"""A directory of text-encoder outputs, written once by ``densegrpo-fast encode-prompts`` and read by every
iteration of ``train``, ``calibrate`` and ``eval`` (``model.prompt_cache``), which then load no text encoder.

The frozen text encoders are 4 to 9 B parameters (SD3.5's two CLIPs and T5-XXL: 10.4 GiB in bf16, FLUX.1's
9.1 GiB, Qwen-Image's Qwen2.5-VL 13.2 GiB) that encode the same few thousand prompts again at every
iteration. With a cache they are never loaded: neither the device nor the host holds them, and an
iteration's prompt encoding is a read of a few megabytes per prompt.

Layout of the directory:

- ``index.json``: the format, the identity of what wrote it (:func:`identity`: the family and its encoding
  code's version, the libraries' versions, the text encoders' and tokenizers' files by content, the settings
  that change an encoding), the files' stats, and one entry per prompt: the sha256 of its text -> the shard
  holding it.
- ``shard_00000.safetensors``, ...: per prompt ``<key>.embeds`` [L, D] and ``<key>.second`` (the family's
  second field: SD3's and FLUX.1's pooled vector [P], Qwen-Image's and Z-Image's token mask [L], FLUX.2
  [klein]'s placeholder [1]). The families whose tokenizer pads to the batch's longest prompt (Qwen-Image,
  Z-Image) keep each prompt's own tokens only, and :meth:`PromptCache.get` pads them again to the longest
  of the batch asked for, with zeros and a zero mask, as their encoders' batches are padded.

Each shard, then the index that names it, is written atomically (:func:`~densegrpo_fast.checkpoint.write_atomic`:
on the disk before its rename): a killed ``encode-prompts``, or a crashed host, loses at most the shard being
written, and a rerun encodes only what the index does not hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

FORMAT = 1
INDEX = "index.json"


def text_encoding(cfg) -> str:
    """Where a run's prompt embeddings come from: its text encoders, or ``model.prompt_cache`` (which loads
    none: the digest of the loaded models, which a resume compares, then leaves them out)."""
    return "text encoders" if cfg.model.prompt_cache is None else "prompt cache"


def prompt_hash(text: str) -> str:
    """The key of a prompt: the sha256 of its text (an edit's instruction: its source image is not text
    encoding's business)."""
    return hashlib.sha256(str(text).encode()).hexdigest()


#: Bumped whenever an adapter's text encoding (``_encode``) changes what it returns: caches of another
#: version are refused.
ENCODING_VERSION = 1


def _content_sha256(path: Path, known: dict | None = None) -> tuple[str, list]:
    """The sha256 of a file's content and ``[size, mtime_ns, sha256]`` to remember it by. A file that links
    into a hub cache's blob named by a sha256 (a Git LFS file) has it as its name; a file whose size and
    modification time ``known`` holds is not read again (``known[...][2]``); any other is read whole."""
    real = Path(os.path.realpath(path))
    stat = real.stat()
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name, [stat.st_size, stat.st_mtime_ns, real.name]
    if known is not None and known[:2] == [stat.st_size, stat.st_mtime_ns]:
        return known[2], list(known)
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest(), [stat.st_size, stat.st_mtime_ns, h.hexdigest()]


def encoder_files(root: Path | None, known: dict | None = None) -> tuple[dict[str, str], dict[str, list]]:
    """``{relative path: sha256 of the content}`` of the text encoders' and tokenizers' files of a
    diffusers-format checkpoint directory (``text_encoder*/``, ``tokenizer*/``; empty for None, a model built
    in memory), the same for a hub snapshot and a copy of it; and each file's ``[size, mtime_ns, sha256]``,
    which a later call given them as ``known`` trusts instead of reading the file again."""
    if root is None:
        return {}, {}
    root = Path(root)
    files, stats = {}, {}
    for folder in sorted(
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(("text_encoder", "tokenizer"))
    ):
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                rel = f.relative_to(root).as_posix()
                files[rel], stats[rel] = _content_sha256(f, (known or {}).get(rel))
    return files, stats


def identity(
    policy_cls, root: Path | None, *, dtype: str, max_sequence_length: int, known: dict | None = None
) -> tuple[dict, dict]:
    """What must match between the cache's writer and its reader: the family and its encoding code's version,
    the diffusers and transformers versions, the text encoders' and tokenizers' files (by content), the dtype
    they ran in, the text length, and the negative prompt the family's CFG encodes; and the files' stats
    (:func:`encoder_files`)."""
    import diffusers
    import transformers

    files, stats = encoder_files(root, known)
    ident = {
        "family": policy_cls.family,
        "encoding": f"{policy_cls.__name__} {ENCODING_VERSION}",
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "dtype": str(dtype),
        "max_sequence_length": int(max_sequence_length),
        "negative_prompt": policy_cls.negative_prompt,
        "files": files,
    }
    return ident, stats


def _differences(want: dict, have: dict) -> list[str]:
    out = []
    for k in sorted(set(want) | set(have)):
        if k == "files":
            a, b = want.get(k, {}), have.get(k, {})
            changed = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
            if changed:
                out.append(f"the text encoders' files ({len(changed)} differ, e.g. {changed[0]})")
        elif want.get(k) != have.get(k):
            out.append(f"{k} ({have.get(k)!r} in the cache, {want.get(k)!r} here)")
    return out


def _read_index(root: Path) -> dict | None:
    """The index of the cache directory ``root``, or None where there is none; a ValueError for a file that
    is not one this version reads."""
    index = Path(root) / INDEX
    if not index.exists():
        return None
    try:
        saved = json.loads(index.read_text())
        if saved.get("format") != FORMAT:
            raise ValueError(f"format {saved.get('format')!r}, this version reads {FORMAT}")
        return {"entries": dict(saved["entries"]), "identity": dict(saved["identity"]),
                "stats": dict(saved.get("stats", {}))}  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(
            f"{index} is not a prompt cache this version reads ({e}): write a new one with "
            "`densegrpo-fast encode-prompts` into an empty directory"
        ) from None


def _no_cache(root) -> str:
    return (
        f"model.prompt_cache={str(root)!r} holds no prompt cache ({Path(root) / INDEX} is missing): write it with "
        "`densegrpo-fast encode-prompts --config <this config>` (it encodes the config's prompt files with the "
        "model's text encoders), or set model.prompt_cache=null"
    )


def _uncovered(root, entries: dict, texts, field: str) -> str | None:
    gone = [t for t in dict.fromkeys(map(str, texts)) if prompt_hash(t) not in entries]
    if not gone:
        return None
    return (
        f"{len(gone)} prompt(s) of {field} are not in the prompt cache {root} (model.prompt_cache), e.g. "
        f"{gone[0][:80]!r}: with a cache the text encoders are not loaded. Fix: run `densegrpo-fast encode-prompts "
        "--config <this config>` again (it encodes only what the cache lacks)"
    )


def check_covered(cfg, sources: dict[str, list[str]]) -> None:
    """With ``model.prompt_cache``, a ValueError (before any model loads) where the cache is missing or lacks
    a prompt of a setting (``{field: prompts}``, and the negative prompt: :func:`with_negative`): the text
    encoders are not loaded to encode it."""
    if cfg.model.prompt_cache is not None and (
        bad := coverage_problem(cfg.model.prompt_cache, with_negative(cfg, sources))
    ):
        raise ValueError(bad)


def with_negative(cfg, sources: dict[str, list[str]]) -> dict[str, list[str]]:
    """``sources`` and the negative prompt the config's policy encodes beside them (``model.negative_prompt``, or
    the family's), which ``encode-prompts`` encodes with them: a cache made under another negative lacks it."""
    from densegrpo_fast.policies import negative_prompt_of

    negative = negative_prompt_of(cfg.model.family, cfg.model.negative_prompt)
    field = (
        "model.negative_prompt" if cfg.model.negative_prompt is not None else "the family's negative prompt"
    )
    return sources if negative is None else {**sources, field: [negative]}


def coverage_problem(root, sources: dict[str, list[str]]) -> str | None:
    """Why the cache directory ``root`` cannot serve the prompts of each setting (``{field: prompts}``), or
    None: asked before any model loads, from the index alone."""
    saved = _read_index(Path(root))
    if saved is None:
        return _no_cache(root)
    for field, texts in sources.items():
        if bad := _uncovered(root, saved["entries"], texts, field):
            return bad
    return None


class PromptCache:
    """The cache directory ``root`` for one model's text encoding (``ident``: :func:`identity`). Opening an
    existing one whose identity differs is a ValueError naming what differs; ``create`` makes a new one."""

    def __init__(
        self, root: str | Path, ident: dict, *, padded: bool, create: bool = False, stats: dict | None = None
    ):
        self.root = Path(root)
        self.padded = padded  # whether rows keep their own tokens only and get padded per batch (mask second)
        self.stats = stats or {}  # (the writer's files' [size, mtime_ns, sha256], for identity's next reader)
        saved = _read_index(self.root)
        if saved is None:
            if not create:
                raise ValueError(_no_cache(root))
            self.entries: dict[str, str] = {}
            self.ident = ident
            return
        self.entries, have = saved["entries"], saved["identity"]
        self.stats = self.stats or saved["stats"]
        if diff := _differences(ident, have):
            raise ValueError(
                f"the prompt cache {self.root} was encoded by other text encoders or settings: "
                f"{'; '.join(diff)}. Its embeddings would condition the model on another encoding. Fix: "
                "encode into a new directory (model.prompt_cache=<new dir>, then `densegrpo-fast encode-prompts`), "
                "or give the settings it was written with"
            )
        self.ident = have

    def missing(self, texts) -> list[str]:
        """The distinct texts of ``texts`` the cache does not hold, in first-seen order."""
        return [t for t in dict.fromkeys(map(str, texts)) if prompt_hash(t) not in self.entries]

    def uncovered(self, texts, field: str) -> str | None:
        """Why ``texts`` (the prompts of the setting ``field``) cannot be read from this cache, or None."""
        return _uncovered(self.root, self.entries, texts, field)

    def get(self, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds [U, L, D], second [U, ...])`` of ``texts`` (each must be held), on ``device``: as the
        family's ``_encode(texts)`` returns them."""
        from safetensors import safe_open

        keys = [prompt_hash(t) for t in texts]
        if gone := [t for t, k in zip(texts, keys, strict=True) if k not in self.entries]:
            raise ValueError(self.uncovered(gone, "this batch"))
        rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        by_shard: dict[str, list[str]] = {}
        for k in dict.fromkeys(keys):
            by_shard.setdefault(self.entries[k], []).append(k)
        for shard, ks in by_shard.items():
            with safe_open(str(self.root / shard), framework="pt", device="cpu") as f:
                for k in ks:
                    rows[k] = (f.get_tensor(f"{k}.embeds"), f.get_tensor(f"{k}.second"))
        embeds = [rows[k][0] for k in keys]
        second = [rows[k][1] for k in keys]
        if self.padded:
            L = max(e.shape[0] for e in embeds)
            embeds = [torch.nn.functional.pad(e, (0, 0, 0, L - e.shape[0])) for e in embeds]
            second = [torch.nn.functional.pad(s, (0, L - s.shape[0])) for s in second]
        return torch.stack(embeds).to(device), torch.stack(second).to(device)

    def add(self, texts: list[str], embeds: torch.Tensor, second: torch.Tensor) -> None:
        """Write the encodings of ``texts`` (one row each, as the family's ``_encode`` returned them) as one new
        shard, then the index that names it."""
        from safetensors.torch import save_file

        from densegrpo_fast.checkpoint import write_atomic, write_text_atomic

        tensors = {}
        for b, text in enumerate(texts):
            e, s = embeds[b].detach().cpu(), second[b].detach().cpu()
            if self.padded:
                n = int(s.sum())
                e, s = e[:n], s[:n]
            key = prompt_hash(text)
            tensors[f"{key}.embeds"], tensors[f"{key}.second"] = e.contiguous(), s.contiguous()
        # a new name: past every shard the index names or the directory holds (one of a killed job included)
        taken = {*self.entries.values(), *(p.name for p in self.root.glob("shard_*.safetensors"))}
        numbers = [int(m.group(1)) for n in taken if (m := re.fullmatch(r"shard_(\d+)\.safetensors", n))]
        shard = f"shard_{max(numbers, default=-1) + 1:05d}.safetensors"
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(
            self.root / shard, lambda tmp: save_file(tensors, str(tmp))
        )  # (on the disk before the index)
        for text in texts:
            self.entries[prompt_hash(text)] = shard
        index = {"format": FORMAT, "identity": self.ident, "stats": self.stats, "entries": self.entries}
        write_text_atomic(self.root / INDEX, json.dumps(index))

    def __len__(self) -> int:
        return len(self.entries)


def encode_config(
    cfg, *, batch_size: int = 16, shard_prompts: int = 256, progress: bool = True
) -> tuple[PromptCache, int]:
    """The ``encode-prompts`` command: every distinct prompt of ``prompts.dataset`` and ``eval.dataset``, and
    the family's negative prompt, encoded by the config's model (``batch_size`` prompts per encoder call)
    into ``model.prompt_cache``, ``shard_prompts`` per shard; what the cache holds already is skipped.
    Returns the cache and the number of prompts encoded."""
    from tqdm import tqdm

    from densegrpo_fast import distributed
    from densegrpo_fast.checkpoint import lock_dir, unlock_dir
    from densegrpo_fast.policies import adapter_class
    from densegrpo_fast.prompts import PromptSource

    m = cfg.model
    if m.family == "toy":
        raise ValueError(
            "model.family=toy: the toy's prompt embedding is a part of its model and costs nothing; the prompt "
            "cache serves the pretrained families (sd3, flux, flux_kontext, qwen_image, z_image, flux2_klein, wan)"
        )
    from densegrpo_fast.policies import TEXT_READS_SOURCES

    if m.family in TEXT_READS_SOURCES:
        raise ValueError(
            f"model.family={m.family}: its text encoder reads each edit's source image, so a prompt's encoding "
            "is not its text's alone and a prompt cache (keyed by text) cannot hold it"
        )
    if m.prompt_cache is None:
        raise ValueError(
            "model.prompt_cache is not set: give the directory to write, e.g. "
            "`densegrpo-fast encode-prompts --config <config> model.prompt_cache=cache/<model>`, and the same "
            "setting to train, calibrate and eval"
        )
    texts: list[str] = []
    for field, dataset, seed in (("prompts.dataset", cfg.prompts.dataset, cfg.run.seed),
                                 ("eval.dataset", cfg.eval.dataset, cfg.eval.seed)):  # fmt: skip
        texts += map(str, PromptSource(dataset, seed, field).pool()[0])
    root = Path(m.prompt_cache)
    lock_dir(root, "encode-prompts job")
    try:
        distributed.check_device(m.device)
        # text encoders alone: the transformer and the VAE are built on the meta device, no weights read
        options = {**m.adapter_options(), "prompt_cache": None, "offload_text_encoders": False}
        options.pop("gradient_checkpointing", None)
        options.pop("guidance_scale_2", None)  # (a sampling setting: no encoder reads it)
        negative = options.pop("negative_prompt", None)
        policy = adapter_class(m.family).load(m.checkpoint, device=m.device, text_only=True, **options)
        # (the text encoded beside the prompts: the config's, as load_policy sets it)
        if negative is not None:
            policy.set_negative_prompt(negative)
        saved = _read_index(root)
        ident, stats = policy.prompt_cache_identity(known=saved["stats"] if saved else None)
        cache = PromptCache(root, ident, padded=not policy.pads_prompts, create=True, stats=stats)
        todo = cache.missing([*texts, policy.negative_prompt])
        bar = tqdm(
            total=len(todo), desc="encoding prompts", unit="prompt", disable=not progress, dynamic_ncols=True
        )
        with policy.text_encoders_on_device(), torch.no_grad():
            for start in range(0, len(todo), shard_prompts):
                shard = todo[start : start + shard_prompts]
                parts = []
                for b in range(0, len(shard), batch_size):
                    parts.append(policy._encode(shard[b : b + batch_size]))
                    bar.update(len(shard[b : b + batch_size]))
                cache.add(shard, *_joined(parts, cache.padded))
        bar.close()
    finally:
        unlock_dir(root)
    return cache, len(todo)


def _joined(
    parts: list[tuple[torch.Tensor, torch.Tensor]], padded: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(embeds, second)`` of several encoder calls as one batch (padded families: each padded to the
    longest, as :meth:`PromptCache.add` trims every row to its own tokens again)."""
    from densegrpo_fast.policies.base import join_padded

    if padded:
        return join_padded(parts)
    return torch.cat([e for e, _ in parts]), torch.cat([s for _, s in parts])
