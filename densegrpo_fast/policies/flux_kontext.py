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

from densegrpo_fast.config import image_hw
from densegrpo_fast.policies.base import PromptEmbeds
from densegrpo_fast.policies.flux import COMPONENTS, FluxPolicy
from densegrpo_fast.prompts import load_source


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

    @torch.no_grad()
    def _encode_references(self, paths: list[str]) -> torch.Tensor:
        """The source images at ``paths``, each read once, as packed VAE latents [U, N, 4C] in the
        transformer's dtype."""
        from diffusers import FluxPipeline

        height, width = image_hw(self.resolution)
        files = list(dict.fromkeys(paths))
        images = [
            self.pipe.image_processor.preprocess(load_source(f, height, width), height, width) for f in files
        ]
        vae = self.pipe.vae
        pixels = torch.cat(images).to(self.device, vae.dtype)
        latents = (
            vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor
        ) * vae.config.scaling_factor
        packed = FluxPipeline._pack_latents(latents, len(files), *latents.shape[1:])
        index = {f: i for i, f in enumerate(files)}
        return packed[torch.tensor([index[p] for p in paths], device=packed.device)].to(self.dtype)

    def _image_tokens(self, packed: torch.Tensor, img_ids: torch.Tensor, cond: PromptEmbeds):
        from diffusers import FluxPipeline

        B = packed.shape[0]
        ref_ids = FluxPipeline._prepare_latent_image_ids(
            B, self.latent_shape[1] // 2, self.latent_shape[2] // 2, packed.device, self.dtype
        )
        ref_ids[..., 0] = 1  # the pipeline's mark of the source image's tokens
        reference = cond.reference
        if reference is None or reference.shape[1] != packed.shape[1]:
            held = "none" if reference is None else f"{reference.shape[1]} source tokens"
            raise ValueError(
                f"{self.model_name} samples {packed.shape[1]} tokens from a source image of as many, and these "
                f"prompt embeds hold {held}: encode the EditPrompts with the encode_prompts of the policy that "
                "samples them (at its resolution)"
            )
        return torch.cat([packed, reference.to(self.dtype)], 1), torch.cat([img_ids, ref_ids])
