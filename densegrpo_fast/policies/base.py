"""The policy adapter contract: what the engine needs from a text-to-image flow-matching model.

One adapter per model family (toy, sd3, flux). Adapters know nothing of GRPO: they encode prompts,
predict a velocity at a sigma (with classifier-free guidance when asked), and decode latents to images.
Conventions are those of ALGORITHM.md §1: ``x_sigma = (1 - sigma) * x0 + sigma * eps``, the model predicts
``v ≈ eps - x0`` and receives ``timestep = 1000 * sigma``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

import torch


def join_padded(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Several encoder calls' ``(embeds [B_i, L_i, D], mask [B_i, L_i])``, each padded to its own longest
    prompt, as one batch padded with zeros to the longest of all (Qwen-Image's and Z-Image's encodings)."""
    L = max(e.shape[1] for e, _ in parts)
    pad = torch.nn.functional.pad
    return (
        torch.cat([pad(e, (0, 0, 0, L - e.shape[1])) for e, _ in parts]),
        torch.cat([pad(m, (0, L - m.shape[1])) for _, m in parts]),
    )


class PromptEmbeds:
    """Conditioning for a batch of B rows, already on the policy's device.

    What a policy reads (per row):
        embeds:   [B, L, D]  token embeddings (SD3: joint CLIP/T5 sequence)
        pooled:   [B, P]     pooled text vector (Qwen-Image, whose encoder has none: the token mask [B, L])
        neg_embeds / neg_pooled: the same for the negative (empty) prompt, or None when CFG is off.
        reference: [B, N, D'] an edit's source image as tokens (FLUX.1 Kontext, FLUX.2 [klein]), else None.

    What it holds: a table per field and a row index. The B rows of a batch repeat few prompts (a group of
    G rows shares one, and the in-flight completions stack the batch n times), so the table keeps one row
    per distinct prompt and ``rows`` [B] (a LongTensor, or None for "row b is table row b") points into it.
    SD3.5's recipe holds 48 table rows of [333, 4096] for its 1152 trajectories instead of 1152 copies
    (2.9 GiB in bf16). Reading a field gathers the rows (a new [B, ...] tensor): policies read each field
    once per transformer call, so only the call's own rows are ever materialised. A one-row table (the empty
    prompt's negative) is read as a broadcast view of its row, and costs nothing.
    """

    FIELDS = ("embeds", "pooled", "neg_embeds", "neg_pooled", "reference")

    def __init__(
        self,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        neg_embeds: torch.Tensor | None = None,
        neg_pooled: torch.Tensor | None = None,
        *,
        reference: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ):
        U = embeds.shape[0]
        if pooled.shape[0] != U:
            raise ValueError(
                f"pooled has {pooled.shape[0]} rows and embeds {U}: give one pooled row per embeds row"
            )
        if (neg_embeds is None) != (neg_pooled is None):
            raise ValueError("neg_embeds and neg_pooled: give both (CFG) or neither")
        if reference is not None and reference.shape[0] != U:
            raise ValueError(
                f"reference has {reference.shape[0]} rows and embeds {U}: give one reference row per embeds row"
            )
        for name, t in (("neg_embeds", neg_embeds), ("neg_pooled", neg_pooled)):
            if t is not None and t.shape[0] not in (1, U):
                raise ValueError(
                    f"{name} has {t.shape[0]} rows: give 1 (broadcast to every row) or one per embeds row ({U})"
                )
        if rows is not None and (rows.ndim != 1 or rows.dtype != torch.long):
            raise ValueError(
                f"rows must be a 1-d LongTensor of table rows, got {rows.dtype} of shape {tuple(rows.shape)}"
            )
        self.tables = dict(zip(self.FIELDS, (embeds, pooled, neg_embeds, neg_pooled, reference), strict=True))
        self.rows = rows

    @classmethod
    def deduplicated(cls, encode, prompts: list[str], negative=None, key=None) -> PromptEmbeds:
        """``encode(distinct_prompts) -> (embeds, pooled)`` (or ``(embeds, pooled, reference)``) run once per
        distinct prompt, in first-seen order; the B rows of ``prompts`` index the result (a group of G copies
        costs one encoder row and one table row). ``negative``: ``(embeds, pooled)`` of the negative prompt,
        one row each, or None. ``key``: what makes prompts distinct (default: the prompt itself; an editing
        model's is :func:`~densegrpo_fast.prompts.prompt_key`, the text and the source image)."""
        key = key or (lambda p: p)
        unique = cls.distinct(prompts, key)
        embeds, pooled, *reference = encode(unique)
        rows = None
        if len(unique) != len(prompts):
            pos = {key(u): i for i, u in enumerate(unique)}
            rows = torch.tensor([pos[key(p)] for p in prompts], device=embeds.device)
        return cls(
            embeds, pooled, *(negative or (None, None)), reference=next(iter(reference), None), rows=rows
        )

    @staticmethod
    def distinct(prompts: list[str], key=None) -> list[str]:
        """The distinct prompts (by ``key``, default the prompt itself), first-seen first: the table's rows of
        :meth:`deduplicated`."""
        key = key or (lambda p: p)
        firsts = {}
        for p in prompts:
            firsts.setdefault(key(p), p)
        return list(firsts.values())

    def __len__(self) -> int:
        return self.tables["embeds"].shape[0] if self.rows is None else self.rows.shape[0]

    def _read(self, name: str) -> torch.Tensor | None:
        t = self.tables[name]
        if t is None:
            return None
        if t.shape[0] == 1 and self.tables["embeds"].shape[0] != 1:  # one row for all: a broadcast view
            return t.expand(len(self), *t.shape[1:])
        return t if self.rows is None else t[self.rows]

    @property
    def embeds(self) -> torch.Tensor:
        return self._read("embeds")

    @property
    def pooled(self) -> torch.Tensor:
        return self._read("pooled")

    @property
    def has_negative(self) -> bool:
        """Whether negative embeds are present (CFG), without reading them."""
        return self.tables["neg_embeds"] is not None

    @property
    def neg_embeds(self) -> torch.Tensor | None:
        return self._read("neg_embeds")

    @property
    def neg_pooled(self) -> torch.Tensor | None:
        return self._read("neg_pooled")

    @property
    def reference(self) -> torch.Tensor | None:
        return self._read("reference")

    def _table_rows(self) -> torch.Tensor:
        if self.rows is not None:
            return self.rows
        return torch.arange(self.tables["embeds"].shape[0], device=self.tables["embeds"].device)

    def index(self, idx: torch.Tensor | slice) -> PromptEmbeds:
        """Rows ``idx`` (a slice or a LongTensor of row indices), sharing this batch's tables (no copy)."""
        rows = self._table_rows()
        if isinstance(idx, torch.Tensor):
            idx = idx.to(rows.device)
        return PromptEmbeds(**self.tables, rows=rows[idx])

    @staticmethod
    def cat(parts: list[PromptEmbeds]) -> PromptEmbeds:
        """The parts' rows one after the other. Parts that share their tables (rows of one batch) give a
        batch that shares them too; otherwise the rows are gathered into new tables."""
        first = parts[0]
        if all(p.tables[f] is first.tables[f] for p in parts for f in PromptEmbeds.FIELDS):
            return PromptEmbeds(**first.tables, rows=torch.cat([p._table_rows() for p in parts]))
        shapes = {
            (f, p.tables[f].shape[1:]) for p in parts for f in PromptEmbeds.FIELDS if p.tables[f] is not None
        }
        if len(shapes) != len({f for f, _ in shapes}):
            raise ValueError(
                f"PromptEmbeds.cat of batches encoded apart with rows of other shapes ({sorted(shapes)}): a "
                "model whose prompts are padded to the batch's longest (Qwen-Image) gives each encode its own "
                "length; encode the prompts together"
            )
        gathered = {
            f: None if first.tables[f] is None else torch.cat([p._read(f) for p in parts])
            for f in PromptEmbeds.FIELDS
        }
        return PromptEmbeds(**gathered)


@runtime_checkable
class Policy(Protocol):
    """What every model adapter provides. Nothing in the trainer may depend on more than this."""

    #: The trainable module (the transformer, possibly LoRA-wrapped by the trainer).
    transformer: torch.nn.Module
    #: Shape of one latent, e.g. (16, 64, 64) for SD3.5 at 512 px or (3, 32, 32) for the toy.
    latent_shape: tuple[int, ...]

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the transformer runs in (:func:`run_dtype`; the SDE math is fp32 whatever this is);
        the adapter casts the transformer's inputs to it."""
        ...

    def encode_prompts(self, prompts: list[str], *, with_negative: bool = True) -> PromptEmbeds:
        """Embed prompts (frozen encoders, no grad). ``with_negative`` adds the empty-prompt embeds for CFG."""
        ...

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """Velocity at ``x`` [B, *latent_shape] and per-row ``sigma`` [B] (fp32 in [0, 1]).

        With ``guidance_scale > 1`` and negative embeds present, returns the CFG velocity
        ``v_neg + g * (v_pos - v_neg)`` computed in one batched call. Output dtype: float32.
        """
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, *latent_shape] -> images [B, 3, H, W] float32 in [0, 1]."""
        ...


def text_encoders_on_device(policy):
    """``policy.text_encoders_on_device()`` where the adapter offloads its text encoders (the pretrained
    families with ``model.offload_text_encoders``), else nothing: held around several encodes, the encoders
    come to the device once for them all (:func:`encoded_batches`)."""
    hold = getattr(policy, "text_encoders_on_device", None)
    return hold() if hold is not None else contextlib.nullcontext()


#: Batches whose prompts an evaluation encodes in one visit of offloaded text encoders (:func:`encoded_batches`).
ENCODE_GROUP = 16


def encoded_batches(policy, batches: list[list], **encode_kwargs) -> Iterator[PromptEmbeds]:
    """``policy.encode_prompts(batch, **encode_kwargs)`` of each of ``batches``, in order, as an evaluation
    samples them. Where the adapter offloads its text encoders, they come to the device once per
    :data:`ENCODE_GROUP` batches, encode those batches' prompts together, and leave before the batches are
    sampled and decoded: the evaluation's sampling never shares the device with them (10.6 GiB of UMT5-XXL, 9.5
    of T5-XXL), for one round trip per group. Otherwise each batch is encoded as it comes."""
    group = ENCODE_GROUP if getattr(policy, "offload_text_encoders", False) else 1
    for g in range(0, len(batches), group):
        with text_encoders_on_device(policy):
            encoded = [policy.encode_prompts(batch, **encode_kwargs) for batch in batches[g : g + group]]
        yield from encoded
        del encoded


#: Dynamo's cache entries per compiled code object. One block class serves every layer, in several variants
#: (with and without gradients, adapters on and off, under autocast or not, a block type's layers that differ
#: such as SD3.5's dual-attention layers); torch's default of 8 would send the later variants back to eager.
RECOMPILE_LIMIT = 64


def block_lists(module: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
    """The block lists of a transformer, by dotted name: its top-level ``nn.ModuleList`` children, as
    diffusers' transformers hold their blocks. A module of several experts (Wan 2.2 A14B's
    :class:`~densegrpo_fast.policies.wan.ExpertPair`, whose ``expert_names`` names them) gives each expert's.
    Regional compilation (:func:`compile_blocks`) and FSDP2's units (``distributed.shard``) are these blocks."""
    experts = getattr(module, "expert_names", ())
    if experts:
        return {f"{e}.{n}": blocks for e in experts for n, blocks in block_lists(getattr(module, e)).items()}
    return {n: c for n, c in module.named_children() if isinstance(c, torch.nn.ModuleList)}


def compile_blocks(transformer: torch.nn.Module, backend: str | Callable = "inductor") -> int:
    """``torch.compile`` each block of the transformer's block lists in place (regional compilation: every
    ``nn.ModuleList`` child, as diffusers' transformers hold their blocks: ``transformer_blocks`` and
    ``single_transformer_blocks`` in SD3, FLUX.1, FLUX.2 and Qwen-Image; ``layers``, ``noise_refiner`` and
    ``context_refiner`` in Z-Image, whose calls' sequence lengths follow their captions, so that its blocks
    recompile once for shapes that vary). Layers of one class share their compiled code, so compiling costs
    a few graphs whatever the depth; the embedders and output layers stay eager. Call after adapters are injected and weights sharded;
    compiling itself is lazy (at each block's first call). Raises dynamo's per-function cache limit for the
    whole process (:data:`RECOMPILE_LIMIT`). Returns the number of blocks.

    A compiled block called under a torch dispatch mode (FlopCounterMode, a fake-tensor mode) is marked by
    dynamo to run eagerly from then on: count or trace such calls under
    ``torch.compiler.set_stance("force_eager")``."""
    import torch._dynamo.config

    blocks = [block for child in block_lists(transformer).values() for block in child]
    if not blocks:
        raise ValueError(
            f"model.compile: {type(transformer).__name__} has no block list (a ModuleList of blocks) to "
            "compile; set model.compile=false"
        )
    config = torch._dynamo.config
    name = "recompile_limit" if "recompile_limit" in config._config else "cache_size_limit"  # torch < 2.7
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    for block in blocks:
        block.compile(backend=backend)
    return len(blocks)


def run_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype ``module``'s calls run in: ``module.compute_dtype`` where its owner set one (weights kept
    at a higher precision than the calls, as data-parallel sharding keeps fp32 shards of a bf16 model), else
    its first parameter's dtype."""
    return getattr(module, "compute_dtype", None) or next(module.parameters()).dtype


def cfg_velocity(
    forward_raw,
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: PromptEmbeds,
    guidance_scale: float | torch.Tensor,
):
    """Classifier-free guidance in one batched call of ``forward_raw(x, sigma, embeds, pooled)``:
    ``v_neg + g * (v_pos - v_neg)``; a plain conditional call when ``g == 1`` or there are no negative
    embeds. ``sigma``: [B] or a scalar tensor. ``guidance_scale``: one scale, or one per row [B] (Wan 2.2
    A14B's low-noise expert's rows at a scale of their own)."""
    sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
    per_row = torch.is_tensor(guidance_scale)
    if per_row:
        guidance_scale = guidance_scale.view(-1, *(1,) * (x.ndim - 1))
    if (not per_row and guidance_scale == 1.0) or not cond.has_negative:
        return forward_raw(x, sigma, cond.embeds, cond.pooled)
    v = forward_raw(
        torch.cat([x, x]),
        torch.cat([sigma, sigma]),
        torch.cat([cond.neg_embeds, cond.embeds]),
        torch.cat([cond.neg_pooled, cond.pooled]),
    )
    v_neg, v_pos = v.chunk(2)
    return v_neg + guidance_scale * (v_pos - v_neg)
