"""The Z-Image policy: diffusers' ``ZImagePipeline`` components behind
:class:`densegrpo_fast.policies.base.Policy`.

Z-Image is a 6B single-stream DiT (text and image tokens in one sequence) whose text encoder is Qwen3-4B.
It comes as an undistilled model sampled with CFG (``Tongyi-MAI/Z-Image``) and as a few-step distilled
one sampled without (``Tongyi-MAI/Z-Image-Turbo``). Where it differs from the other families, the adapter
does what ``ZImagePipeline`` does:

- **Prompts.** Each prompt goes into the tokenizer's chat template as a user message (with the generation
  prompt). The embeds are the text encoder's second-to-last hidden state of the prompt's tokens, at most
  ``max_sequence_length`` of them (the pipeline's default, 512), padding dropped. The transformer takes
  each row's tokens at their own length, so a :class:`~densegrpo_fast.policies.base.PromptEmbeds` holds
  ``embeds`` [B, L, 2560] padded to the batch's longest prompt and the token mask [B, L] in its ``pooled``
  field (the encoder has no pooled output), as for Qwen-Image.
- **Velocity.** The transformer predicts ``x0 - eps`` (the pipeline negates it before its scheduler step)
  at ``t = 1 - sigma``; :meth:`ZImagePolicy.velocity` returns ``eps - x0``, the engine's convention. It takes
  each latent as a [C, 1, H, W] tensor and each caption at its own length, as a list; each velocity call
  reads the rows' token counts from the mask (one device-to-host copy of B integers).
- **CFG.** The negative prompt is the empty one and the combination is ``v_pos + w (v_pos - v_neg)``, with
  ``w`` the pipeline's ``guidance_scale`` (0 = no CFG, Z-Image-Turbo's setting). The engine's
  ``guidance_scale`` ``g`` means ``v_neg + g (v_pos - v_neg)`` for every family, which is the same
  combination with ``g = 1 + w``: the pipeline's ``guidance_scale=4`` is the engine's 5.0, its 0 the
  engine's 1.0 (no negative rows). The negative and positive rows run in one transformer call; the
  combination runs in fp32. The pipeline's ``cfg_normalization`` and ``cfg_truncation`` options are not
  reproduced (their defaults, off, are).
- **Latents.** [16, H/8, W/8], unpacked; the transformer cuts its own 2x2 patches. The VAE is FLUX.1's
  (:meth:`~densegrpo_fast.policies.pretrained.DiffusersPolicy.decode`).
- **Sampling grid** (:meth:`ZImagePolicy.sigma_grid`, used when ``sampling.shift`` is null): the
  pipeline's, ``linspace(1, 1/T, T)`` shifted as the checkpoint's scheduler says (Z-Image-Turbo: a static
  shift of 3), then 0.

With zero noise and the same initial latents the engine's sampler reproduces ``ZImagePipeline``
(tests/test_policy_z_image.py). The Omni and edit variants' image conditioning is not supported.
"""

from __future__ import annotations

import torch

from densegrpo_fast.config import Resolution
from densegrpo_fast.policies.base import PromptEmbeds
from densegrpo_fast.policies.pretrained import PackedLatentPolicy, chat_prompts

DEFAULT_REPO = "Tongyi-MAI/Z-Image"
COMPONENTS = {
    "transformer": "model", "vae": "model", "text_encoder": "model", "tokenizer": "tokenizer",
    "scheduler": "scheduler",
}  # fmt: skip
#: The transformer pads each caption to a multiple of this many tokens (diffusers' ``SEQ_MULTI_OF``).
CAPTION_MULTIPLE = 32


class ZImagePolicy(PackedLatentPolicy):
    """Z-Image behind the :class:`~densegrpo_fast.policies.base.Policy` interface.

    Shape: latents and velocities [B, C, H/f, W/f] float32 (C = the transformer's ``in_channels``, f = the
    VAE's factor: (16, 64, 64) at 512 px); images [B, 3, H, W] in [0, 1].

    Args:
        pipe: a ``ZImagePipeline`` holding the components (on the device, in their dtypes).
        resolution: image side in pixels (square images), or (height, width).
        max_sequence_length: text tokens per prompt at most, chat template included (the pipeline's
            default: 512).
    """

    family = "z_image"
    pipeline_name = "ZImagePipeline"
    components = COMPONENTS
    default_repo = DEFAULT_REPO
    default_max_sequence_length = 512
    model_name = "Z-Image"
    scheduler_fix = "use Z-Image's scheduler config (scheduler/scheduler_config.json)"
    pads_prompts = False  # (to the batch's longest prompt)
    # (the negative prompt of CFG: the pipeline's default, the empty prompt, DiffusersPolicy.negative_prompt)

    def __init__(self, pipe, *, resolution: Resolution = 512, max_sequence_length: int = 512):
        super().__init__(pipe, resolution=resolution, max_sequence_length=max_sequence_length)
        config = self.transformer.config
        # a caption padded to the transformer's multiple, then the image's frame: all on its first rope axis
        limit = config.axes_lens[0] - CAPTION_MULTIPLE
        if not 1 <= max_sequence_length <= limit:
            raise ValueError(
                f"model.max_sequence_length ({max_sequence_length}): this ZImageTransformer2DModel places at "
                f"most {limit} caption tokens (rope axis of {config.axes_lens[0]} positions); give 1 to {limit} "
                "(null: the pipeline's 512)"
            )
        if config.get("siglip_feat_dim") is not None:
            raise ValueError(
                "this ZImageTransformer2DModel sets siglip_feat_dim: an Omni checkpoint, whose image "
                "conditioning the engine does not feed; model.family z_image samples Z-Image's text-to-image "
                "checkpoints (e.g. Tongyi-MAI/Z-Image, Tongyi-MAI/Z-Image-Turbo)"
            )
        self.set_resolution()

    def set_resolution(self) -> None:
        height, width = self.check_resolution(
            2 * self.vae_scale_factor,
            f"VAE factor {self.vae_scale_factor} x {self.model_name}'s 2x2 latent patches",
        )
        self.latent_shape = (self.transformer.config.in_channels, height, width)
        self.image_seq_len = (height // 2) * (width // 2)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``ZImagePipeline.encode_prompt``'s per-prompt embeds, padded into one tensor [U, L, D] with their
        token mask [U, L] (L: the longest prompt's tokens). The pipeline pads every prompt to
        ``max_sequence_length`` before the encoder; here the tokenizer pads to the batch's longest prompt,
        which gives each prompt's kept tokens the same states to rounding (the encoder is causal and its
        rotary positions relative), for far fewer tokens. The spans come from the tokenizer's mask, still on
        the host: no boolean index of device tensors (a host sync), and it runs under the memory estimate's
        fake tensors."""
        pipe = self.pipe
        texts = chat_prompts(pipe.tokenizer, prompts, enable_thinking=True)
        tokens = pipe.tokenizer(
            texts, padding=True, max_length=self.max_sequence_length, truncation=True, return_tensors="pt"
        )
        hidden = pipe.text_encoder(
            input_ids=tokens.input_ids.to(self.text_device),
            attention_mask=tokens.attention_mask.to(self.text_device).bool(),
            output_hidden_states=True,
        ).hidden_states[-2]
        keep = [row.nonzero().flatten() for row in tokens.attention_mask.bool()]
        L = max(len(k) for k in keep)
        embeds = hidden.new_zeros(len(prompts), L, hidden.shape[-1])
        mask = torch.zeros(len(prompts), L, dtype=torch.long)
        for b, k in enumerate(keep):
            embeds[b, : len(k)] = hidden[b, k.to(hidden.device)]
            mask[b, : len(k)] = 1
        return embeds, mask.to(self.text_device)

    def encode_prompts(self, prompts: list[str], *, with_negative: bool = True) -> PromptEmbeds:
        """``embeds`` [B, L, D] and the token mask [B, L] (in the ``pooled`` field), one encoder row per
        distinct prompt; with ``with_negative`` :attr:`negative_prompt`'s (the empty prompt's), encoded in the
        same batch so that it comes padded to the same L."""
        return self._encode_with_negative(prompts, with_negative)

    @staticmethod
    def _token_counts(mask: torch.Tensor) -> list[int]:
        """Each row's caption tokens (one device-to-host copy). Under the memory estimate's fake tensors,
        which hold no values, every row counts at the batch's length, its upper bound."""
        from torch._subclasses.fake_tensor import is_fake

        if is_fake(mask):
            return [mask.shape[1]] * mask.shape[0]
        return mask.sum(1).tolist()

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """Velocity [B, *latent_shape] float32; CFG ``v_neg + g (v_pos - v_neg)`` when ``guidance_scale``
        ``g != 1`` and negative embeds are present, in one transformer call of 2B rows (positive rows
        first, as the pipeline orders them)."""
        B = x.shape[0]
        sigma = sigma.expand(B) if sigma.ndim == 0 else sigma
        latents, embeds, mask = x.to(self.dtype), cond.embeds, cond.pooled  # (the pooled field: the mask)
        cfg = guidance_scale != 1.0 and cond.has_negative
        if cfg:
            latents, sigma = torch.cat([latents, latents]), torch.cat([sigma, sigma])
            embeds, mask = torch.cat([embeds, cond.neg_embeds]), torch.cat([mask, cond.neg_pooled])
        t = 1000.0 * sigma.float()  # the scheduler's timestep; the pipeline passes (1000 - t) / 1000
        embeds = embeds.to(self.dtype)
        out = self.transformer(
            list(latents.unsqueeze(2).unbind(0)),
            (1000.0 - t) / 1000.0,
            [e[:n] for e, n in zip(embeds, self._token_counts(mask), strict=True)],
            return_dict=False,
        )[0]
        out = torch.stack(out)[:, :, 0].float()  # [rows, C, H, W]: x0 - eps
        if cfg:
            pos, neg = out.chunk(2)
            out = pos + (guidance_scale - 1.0) * (pos - neg)  # the pipeline's pos + w (pos - neg), w = g - 1
        return -out
