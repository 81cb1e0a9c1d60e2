"""The FLUX.1 policy: diffusers' ``FluxPipeline`` components behind
:class:`densegrpo_fast.policies.base.Policy`.

FLUX.1-dev is guidance-distilled: the guidance scale is an *input* of the transformer (its ``guidance``
embedding), not a second batch, so there is no CFG here. ``encode_prompts`` returns no negative embeds
whatever ``with_negative`` says, and ``velocity`` is one transformer row per latent row with
``guidance = guidance_scale`` (``sampling.guidance_scale``; FLUX.1-dev's usual value is 3.5). A checkpoint
without a guidance embedding (FLUX.1-schnell) takes ``guidance_scale = 1`` only. The pipeline's optional
"true CFG" (a negative prompt on top of the distilled guidance) is not offered.

The engine sees an unpacked latent [16, H/8, W/8], as for SD3: ``velocity`` packs it into FLUX's 2x2
patch tokens [B, H/16 * W/16, 64], builds the rotary position ids (``img_ids`` from the patch grid,
``txt_ids`` zeros), and unpacks the transformer's output, all with the pipeline's own static helpers.
The transformer takes ``timestep = sigma`` and multiplies by 1000 inside, so it sees ``1000 * sigma``
like every other family. The value is rounded as FluxPipeline rounds it, so that a trained adapter meets at
inference the timesteps it was trained on: the pipeline casts ``t = 1000 * sigma`` to the transformer's
dtype and passes ``t / 1000``. In bf16 the transformer's own cast of an fp32 sigma gives another value for
about a quarter of all sigmas, by up to 4 timestep units above sigma = 0.5 (bf16 holds 512..1000 to 4 units).

Prompts: CLIP's pooled vector ``pooled`` [B, 768] and T5's token embeddings ``embeds`` [B, L, 4096]
(``L = max_sequence_length``, 512 for FLUX.1-dev), through the pipeline's ``encode_prompt``, once per
distinct prompt. The sampling grid (:meth:`FluxPolicy.sigma_grid`, used when ``sampling.shift`` is null) is
FluxPipeline's: shifted by the image's token count (:func:`densegrpo_fast.schedule.flux_sigma_grid`).
"""

from __future__ import annotations

import torch

from densegrpo_fast.config import Resolution
from densegrpo_fast.policies.base import PromptEmbeds
from densegrpo_fast.policies.pretrained import PackedLatentPolicy

DEFAULT_REPO = "black-forest-labs/FLUX.1-dev"
COMPONENTS = {
    "transformer": "model", "vae": "model", "text_encoder": "model", "text_encoder_2": "model",
    "tokenizer": "tokenizer", "tokenizer_2": "tokenizer", "scheduler": "scheduler",
}  # fmt: skip


class FluxPolicy(PackedLatentPolicy):
    """FLUX.1 behind the :class:`~densegrpo_fast.policies.base.Policy` interface.

    Shape: latents and velocities [B, C, H/f, W/f] float32, unpacked (C = the transformer's
    ``in_channels / 4``, f = the VAE's factor: (16, 64, 64) at 512 px); images [B, 3, H, W] in [0, 1].

    Args:
        pipe: a ``FluxPipeline`` holding the components (on the device, in their dtypes).
        resolution: image side in pixels (square images), or (height, width).
        max_sequence_length: T5 tokens per prompt (FLUX.1-dev: 512).
    """

    family = "flux"
    has_cfg = False  # (guidance-distilled: the guidance goes in as an input)
    pipeline_name = "FluxPipeline"
    components = COMPONENTS
    default_repo = DEFAULT_REPO
    default_max_sequence_length = 512
    model_name = "FLUX.1"
    scheduler_fix = "use FLUX.1-dev's or FLUX.1-schnell's scheduler config (scheduler/scheduler_config.json)"

    def __init__(self, pipe, *, resolution: Resolution = 512, max_sequence_length: int = 512):
        super().__init__(pipe, resolution=resolution, max_sequence_length=max_sequence_length)
        self.set_resolution()

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.text_device,
            max_sequence_length=self.max_sequence_length,
        )
        return embeds, pooled

    def encode_prompts(self, prompts: list[str], *, with_negative: bool = True) -> PromptEmbeds:
        """``embeds`` [B, L, D] (T5) and ``pooled`` [B, P] (CLIP), one encoder row per distinct prompt;
        never negative embeds (guidance is an input of the distilled model, not a second batch), whatever
        ``with_negative`` says."""
        with self.text_encoders_on_device():
            return PromptEmbeds.deduplicated(self._text, prompts)

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """Velocity [B, *latent_shape] float32; ``guidance_scale`` goes in as the ``guidance`` input."""
        from diffusers import FluxPipeline

        B, C, H, W = x.shape
        sigma = sigma.expand(B) if sigma.ndim == 0 else sigma
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((B,), guidance_scale, device=x.device, dtype=torch.float32)
        elif guidance_scale != 1.0:
            raise ValueError(
                f"guidance scale {guidance_scale} (sampling.guidance_scale, or eval.guidance_scale when "
                "evaluating): this FLUX checkpoint has no guidance embedding (e.g. FLUX.1-schnell) and takes "
                "no guidance: set it to 1"
            )
        packed = FluxPipeline._pack_latents(x.to(self.dtype), B, C, H, W)  # [B, H/2 * W/2, 4C]
        img_ids = FluxPipeline._prepare_latent_image_ids(B, H // 2, W // 2, x.device, self.dtype)
        hidden, img_ids = self._image_tokens(packed, img_ids, cond)
        embeds = cond.embeds  # gathered once: [B, L, D]
        txt_ids = torch.zeros(embeds.shape[1], 3, device=x.device, dtype=self.dtype)
        out = self.transformer(
            hidden_states=hidden,
            timestep=(1000.0 * sigma.float()).to(self.dtype) / 1000,  # FluxPipeline's rounding
            guidance=guidance,
            pooled_projections=cond.pooled.to(self.dtype),
            encoder_hidden_states=embeds.to(self.dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0][:, : packed.shape[1]]  # (an editing model's source tokens follow the sampled ones: dropped)
        f = self.vae_scale_factor
        return FluxPipeline._unpack_latents(out, H * f, W * f, f).float()

    def _image_tokens(self, packed: torch.Tensor, img_ids: torch.Tensor, cond: PromptEmbeds):
        """The transformer's image tokens and their rotary ids: the sampled latent's (FLUX.1), to which an
        editing model (:class:`~densegrpo_fast.policies.flux_kontext.FluxKontextPolicy`) adds its source's."""
        return packed, img_ids
