"""The policy adapter contract: what the engine needs from a text-to-image flow-matching model.

One adapter per model family (toy, sd3, flux). Adapters know nothing of GRPO: they encode prompts,
predict a velocity at a sigma (with classifier-free guidance when asked), and decode latents to images.
Conventions are those of ALGORITHM.md §1: ``x_sigma = (1 - sigma) * x0 + sigma * eps``, the model predicts
``v ≈ eps - x0`` and receives ``timestep = 1000 * sigma``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol, runtime_checkable

import torch


@dataclass
class PromptEmbeds:
    """Conditioning for a batch of prompts, already on the policy's device.

    Shape:
        embeds:   [B, L, D]  token embeddings (SD3: joint CLIP/T5 sequence)
        pooled:   [B, P]     pooled text vector
        neg_embeds / neg_pooled: the same for the negative (empty) prompt, or None when CFG is off.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor
    neg_embeds: torch.Tensor | None = None
    neg_pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn) -> PromptEmbeds:
        return PromptEmbeds(
            **{f.name: (None if (t := getattr(self, f.name)) is None else fn(t)) for f in fields(self)}
        )

    def index(self, idx: torch.Tensor | slice) -> PromptEmbeds:
        """Rows ``idx`` of every field (``idx`` a slice or a LongTensor of row indices)."""
        return self._map(lambda t: t[idx])

    def repeat_interleave(self, n: int) -> PromptEmbeds:
        """Each prompt repeated ``n`` times in place (a prompt's group stays contiguous)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(parts: list[PromptEmbeds]) -> PromptEmbeds:
        first = parts[0]
        return PromptEmbeds(
            **{
                f.name: (
                    None if getattr(first, f.name) is None else torch.cat([getattr(p, f.name) for p in parts])
                )
                for f in fields(first)
            }
        )


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


def run_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype ``module``'s calls run in: ``module.compute_dtype`` where its owner set one (weights kept
    at a higher precision than the calls, as data-parallel sharding keeps fp32 shards of a bf16 model), else
    its first parameter's dtype."""
    return getattr(module, "compute_dtype", None) or next(module.parameters()).dtype


def cfg_velocity(
    forward_raw, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, guidance_scale: float
):
    """Classifier-free guidance in one batched call of ``forward_raw(x, sigma, embeds, pooled)``:
    ``v_neg + g * (v_pos - v_neg)``; a plain conditional call when ``g == 1`` or there are no negative
    embeds. ``sigma``: [B] or a scalar tensor."""
    sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
    if guidance_scale == 1.0 or cond.neg_embeds is None:
        return forward_raw(x, sigma, cond.embeds, cond.pooled)
    v = forward_raw(
        torch.cat([x, x]),
        torch.cat([sigma, sigma]),
        torch.cat([cond.neg_embeds, cond.embeds]),
        torch.cat([cond.neg_pooled, cond.pooled]),
    )
    v_neg, v_pos = v.chunk(2)
    return v_neg + guidance_scale * (v_pos - v_neg)
