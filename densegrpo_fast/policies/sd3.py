"""The Stable Diffusion 3 / 3.5 policy: diffusers' ``StableDiffusion3Pipeline`` components behind
:class:`densegrpo_fast.policies.base.Policy`.

What diffusers does, diffusers keeps doing: prompts go through the pipeline's own ``encode_prompt`` (two
CLIP encoders and T5, joined into the ``[B, 77 + L, 4096]`` sequence and the ``[B, 2048]`` pooled vector
SD3's transformer receives), decoding undoes the VAE's ``scaling_factor`` / ``shift_factor`` as the
pipeline does. This adapter adds what the engine needs on top:

- **Frozen encoders and VAE** (eval, no grad; :class:`~densegrpo_fast.policies.pretrained.DiffusersPolicy`);
  the transformer is frozen too until the trainer adds LoRA or unfreezes it. Text encoders run in the
  policy dtype, the VAE in fp32, one image at a time (dense rewards decode T+1 images per trajectory).
- **Prompt embeddings computed once per distinct prompt**: the trainer encodes G copies of each prompt;
  they are encoded once and gathered. CFG's negative is the empty prompt, encoded once per policy and
  broadcast (no copy per row).
- **Precision**: the transformer runs in bf16 / fp16 / fp32 (``dtype``); it receives ``timestep =
  1000 * sigma`` in fp32 as the pipeline passes it, and the returned velocity is fp32 whatever ``dtype``
  is. The SDE and log-prob math downstream is fp32.
- **Sampling grid**: :meth:`SD3Policy.sigma_grid` is the grid of the checkpoint's own scheduler (SD3.5:
  shift 3.0), used when ``sampling.shift`` is null.

With zero noise and the same initial latents, the engine's sampler on this adapter reproduces
``StableDiffusion3Pipeline`` (tests/test_policy_sd3.py).

Weights load offline by default from a diffusers-format directory or the Hugging Face cache
(:meth:`SD3Policy.load`); a missing component is named in the error with the fix.
"""

from __future__ import annotations

import torch

from densegrpo_fast.config import Resolution, shown_resolution
from densegrpo_fast.policies.base import PromptEmbeds, cfg_velocity
from densegrpo_fast.policies.pretrained import DiffusersPolicy

DEFAULT_REPO = "stabilityai/stable-diffusion-3.5-medium"
COMPONENTS = {
    "transformer": "model", "vae": "model", "text_encoder": "model", "text_encoder_2": "model",
    "text_encoder_3": "model", "tokenizer": "tokenizer", "tokenizer_2": "tokenizer",
    "tokenizer_3": "tokenizer", "scheduler": "scheduler",
}  # fmt: skip


class SD3Policy(DiffusersPolicy):
    """SD3 / SD3.5 behind the :class:`~densegrpo_fast.policies.base.Policy` interface.

    Shape: latents and velocities [B, C, H/f, W/f] float32 (C = the transformer's ``in_channels``, f = the
    VAE's downsampling factor: (16, 64, 64) for SD3.5 at 512 px); images [B, 3, H, W] float32 in [0, 1].

    Args:
        pipe: a ``StableDiffusion3Pipeline`` holding the components (on the device, in their dtypes).
        resolution: image side in pixels (square images), or (height, width).
        max_sequence_length: T5 tokens per prompt (the pipeline's default is 256).
    """

    family = "sd3"
    pipeline_name = "StableDiffusion3Pipeline"
    components = COMPONENTS
    default_repo = DEFAULT_REPO
    default_max_sequence_length = 256

    def __init__(self, pipe, *, resolution: Resolution = 512, max_sequence_length: int = 256):
        super().__init__(pipe, resolution=resolution, max_sequence_length=max_sequence_length)
        self.set_resolution()
        self._negative: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_resolution(self) -> None:
        cfg = self.transformer.config
        height, width = self.check_resolution(
            self.vae_scale_factor * cfg.patch_size,
            f"VAE factor {self.vae_scale_factor} x patch {cfg.patch_size}: whole patches",
        )
        if max(height, width) > cfg.pos_embed_max_size * cfg.patch_size:
            raise ValueError(
                f"{self.resolution_setting} ({shown_resolution(self.resolution)}) is beyond this transformer's "
                f"position embeddings (at most {cfg.pos_embed_max_size * cfg.patch_size * self.vae_scale_factor}"
                " px a side): choose a smaller one"
            )
        self.latent_shape = (cfg.in_channels, height, width)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.text_device,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length,
        )  # fmt: skip
        return embeds, pooled

    def encode_prompts(self, prompts: list[str], *, with_negative: bool = True) -> PromptEmbeds:
        """``embeds`` [B, 77 + L, D] and ``pooled`` [B, P] as the pipeline encodes them, one encoder row per
        distinct prompt; the negative is :attr:`negative_prompt`'s (the empty prompt's), encoded once per policy
        and broadcast."""
        with self.text_encoders_on_device():
            if with_negative and self._negative is None:
                self._negative = self._text([self.negative_prompt])
            return PromptEmbeds.deduplicated(self._text, prompts, self._negative if with_negative else None)

    def set_negative_prompt(self, text: str) -> None:
        super().set_negative_prompt(text)
        self._negative = None  # (encoded anew at the next call)

    def forward_raw(
        self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        """One transformer call: velocity [B, *latent_shape] float32 at per-row ``sigma`` [B] (keeps grad)."""
        out = self.transformer(
            hidden_states=x.to(self.dtype),
            timestep=1000.0 * sigma.float(),
            encoder_hidden_states=embeds.to(self.dtype),
            pooled_projections=pooled.to(self.dtype),
            return_dict=False,
        )[0]
        return out.float()

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        return cfg_velocity(self.forward_raw, x, sigma, cond, guidance_scale)

    def sigma_grid(self, num_steps: int) -> torch.Tensor:
        """The grid of the checkpoint's scheduler, float32 [T+1] (SD3.5: :func:`sigma_grid` at shift 3.0)."""
        from densegrpo_fast.schedule import sigma_grid

        cfg = self.scheduler_config(
            "use_dynamic_shifting", "shift_terminal", fix="give sampling.shift a number (SD3.5 uses 3.0)"
        )
        return sigma_grid(num_steps, cfg.get("shift", 1.0), cfg.get("num_train_timesteps", 1000))
