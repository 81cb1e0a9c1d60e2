"""The FLUX.1 Kontext policy: instruction-based image editing, diffusers' ``FluxKontextPipeline`` components
behind :class:`densegrpo_fast.policies.base.Policy`.

Kontext is FLUX.1-dev's architecture trained to edit: the source image's VAE latent, packed into 2x2 patch
tokens as the sampled latent is, goes into the transformer after the sampled tokens, with rotary ids whose
first axis is 1 (the sampled tokens' is 0); the transformer's output for the source tokens is dropped. The
guidance is an input (guidance-distilled, no CFG batch), as FLUX.1-dev's; everything else is
:class:`~densegrpo_fast.policies.flux.FluxPolicy`'s: the text encoders, the unpacked latent the engine sees,
the grid shifted by the *sampled* image's token count, the timestep rounding.

Each prompt is an :class:`~densegrpo_fast.prompts.EditPrompt`: the instruction and its source image, from a
``.jsonl`` prompt file whose lines carry an ``image`` path. ``encode_prompts`` encodes each distinct
(instruction, image) once: the image is read (:func:`~densegrpo_fast.prompts.load_source`: its EXIF
orientation applied, resized to cover the policy's resolution and centre-cropped; an image already at that
size is untouched), encoded to the VAE's mode (the pipeline's ``sample_mode="argmax"``) and packed into the
embeds' ``reference`` table. So the source comes in at the output's size, as the pipeline takes it with
``_auto_resize=False`` and an image of the output's size; the pipeline's default instead resizes the source to
the ~1 MP Kontext resolution nearest its aspect, which at 512 px output would be four times the tokens. The
VAE encodes in its own fp32 (the adapters load it so), where the pipeline in bf16 encodes the source in bf16:
the source latents then differ by bf16 rounding (one bf16 unit, 0.018, measured by a review), the engine's
being the more exact.
"""

from __future__ import annotations

import torch

from densegrpo_fast.policies.base import PromptEmbeds
from densegrpo_fast.policies.flux import COMPONENTS, FluxPolicy


class FluxKontextPolicy(FluxPolicy):
    """FLUX.1 Kontext behind the :class:`~densegrpo_fast.policies.base.Policy` interface.

    Shape: as :class:`~densegrpo_fast.policies.flux.FluxPolicy`; ``encode_prompts`` takes
    :class:`~densegrpo_fast.prompts.EditPrompt` s and adds the packed source latents [B, N, 4C] (N = the
    sampled image's token count) as the embeds' ``reference``.
    """

    family = "flux_kontext"
    pipeline_name = "FluxKontextPipeline"
    components = COMPONENTS
    default_repo = "black-forest-labs/FLUX.1-Kontext-dev"
    model_name = "FLUX.1 Kontext"
    scheduler_fix = "use FLUX.1 Kontext's scheduler config (scheduler/scheduler_config.json)"
    edits = "required"

    def encode_prompts(self, prompts: list[str], *, with_negative: bool = True) -> PromptEmbeds:
        """``embeds`` and ``pooled`` as FLUX.1's, and ``reference``, the packed source latent of each
        prompt's image: one table row per distinct (instruction, image); never negative embeds."""
        return self._encode_edits(prompts, with_negative=False)

    def _source_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """The pipeline's own encoding (the VAE's mode, shifted and scaled), packed as the sampled latent."""
        from diffusers import FluxPipeline

        latent = self.pipe._encode_vae_image(image, generator=None)
        return FluxPipeline._pack_latents(latent, 1, *latent.shape[1:])

    def _image_tokens(self, packed: torch.Tensor, img_ids: torch.Tensor, cond: PromptEmbeds):
        reference = self._checked_reference(cond, packed.shape[1])
        if reference is None:
            raise ValueError(
                f"{self.model_name} samples from a source image, and these prompt embeds hold none: encode the "
                "EditPrompts with this policy's encode_prompts"
            )
        ref_ids = img_ids.clone()  # (the source is at the sampled image's size: its grid, ...)
        ref_ids[..., 0] = 1  # (... marked as the pipeline marks the source image's tokens)
        return torch.cat([packed, reference.to(self.dtype)], 1), torch.cat([img_ids, ref_ids])
