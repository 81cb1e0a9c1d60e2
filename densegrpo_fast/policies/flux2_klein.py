"""The FLUX.2 [klein] policy: diffusers' ``Flux2KleinPipeline`` components behind
:class:`densegrpo_fast.policies.base.Policy`.

FLUX.2 [klein] (4B and 9B) is Black Forest Labs' small FLUX.2: a FLUX-style double- and single-stream
transformer over a Qwen3 text encoder, with FLUX.2's VAE. It comes undistilled ("base", sampled with CFG) and
step-distilled (sampled without). Where it differs from the other families, the adapter does what
``Flux2KleinPipeline`` does:

- **Prompts.** Each prompt goes into the tokenizer's chat template as a user message (no thinking block) and is
  padded to ``max_sequence_length`` tokens (the pipeline's 512); the embeds are Qwen3's hidden states after
  layers 9, 18 and 27, concatenated per token ([B, 512, 3 x 2560] for Qwen3-4B). The transformer sees every
  token, padding included (no mask), at text positions ``(0, 0, 0, l)``. There is no pooled vector: a
  :class:`~densegrpo_fast.policies.base.PromptEmbeds` holds a placeholder [B, 1] in its ``pooled`` field.
- **Latents.** The pipeline samples in the VAE's patchified, batch-normalised space: 2x2 patches of its 32
  channels, [128, H/16, W/16], which is what the engine sees (``latent_shape``). ``velocity`` packs it into
  tokens [B, H/16 * W/16, 128] with image positions ``(0, h, w, 0)``; ``decode`` undoes the VAE's batch-norm
  statistics, unpatchifies and decodes.
- **CFG** (undistilled checkpoints): the empty negative prompt, ``v_neg + g (v_pos - v_neg)`` (the engine's
  convention and the pipeline's), negative and positive rows in one transformer call. A step-distilled
  checkpoint (the pipeline's ``is_distilled``) takes no guidance: a scale other than 1 is refused.
- **Timesteps.** The transformer gets ``1000 sigma`` cast to the model's dtype, then / 1000, as the pipeline
  passes it (its latents are in the model's dtype).
- **Sampling grid** (``sigma_grid``, used when ``sampling.shift`` is null): the pipeline's
  ``linspace(1, 1/T, T)`` under the exponential time shift with FLUX.2's empirical ``mu``
  (:meth:`Flux2KleinPolicy.dynamic_mu`), which depends on the image's token count and on T.

- **Editing** (prompts that are :class:`~densegrpo_fast.prompts.EditPrompt` s, from a ``.jsonl`` prompt file with
  an ``image`` per line): each prompt's source goes in as the pipeline's one reference image: read as
  :func:`~densegrpo_fast.prompts.load_source` reads it (upright, covering the output's size, centre-cropped),
  VAE-encoded to its mode, patchified and batch-normalised as the sampled latent is, packed into tokens after the
  sampled ones at positions ``(10, h, w, 0)``; the transformer's output for them is dropped, and the CFG rows
  hold them too. The pipeline takes the reference at its own size; the engine at the output's, as a pipeline
  call given a source of the output's size, up to 1 MP. Above 1 MP the two part: the pipeline shrinks a
  reference to 1 MP, the engine keeps it at the output's size (more tokens, the whole resolution).

With zero noise and the same initial latents (and source images) the engine's sampler reproduces
``Flux2KleinPipeline`` (tests/test_policy_flux2_klein.py). Several reference images per prompt are not
supported.
"""

from __future__ import annotations

import torch

from densegrpo_fast.config import Resolution
from densegrpo_fast.policies.base import PromptEmbeds
from densegrpo_fast.policies.pretrained import PackedLatentPolicy, chat_prompts
from densegrpo_fast.prompts import EditPrompt

DEFAULT_REPO = "black-forest-labs/FLUX.2-klein-base-4B"
COMPONENTS = {
    "transformer": "model", "vae": "model", "text_encoder": "model", "tokenizer": "tokenizer",
    "scheduler": "scheduler",
}  # fmt: skip
#: Qwen3's hidden states the pipeline concatenates (``text_encoder_out_layers``).
TEXT_LAYERS = (9, 18, 27)


class Flux2KleinPolicy(PackedLatentPolicy):
    """FLUX.2 [klein] behind the :class:`~densegrpo_fast.policies.base.Policy` interface.

    Shape: latents and velocities [B, C, H/(2f), W/(2f)] float32, patchified (C = the transformer's
    ``in_channels``: 128, f = the VAE's factor 8: (128, 32, 32) at 512 px); images [B, 3, H, W] in [0, 1].

    Args:
        pipe: a ``Flux2KleinPipeline`` holding the components (on the device, in their dtypes).
        resolution: image side in pixels (square images), or (height, width).
        max_sequence_length: text tokens per prompt, chat template included (the pipeline's 512); every
            prompt is padded to it.
    """

    family = "flux2_klein"
    pipeline_name = "Flux2KleinPipeline"
    components = COMPONENTS
    default_repo = DEFAULT_REPO
    default_max_sequence_length = 512
    model_name = "FLUX.2 [klein]"
    scheduler_fix = "use FLUX.2 [klein]'s scheduler config (scheduler/scheduler_config.json)"
    edits = "optional"
    # (the negative prompt of CFG: the pipeline's, the empty prompt, DiffusersPolicy.negative_prompt)

    def __init__(self, pipe, *, resolution: Resolution = 512, max_sequence_length: int = 512):
        super().__init__(pipe, resolution=resolution, max_sequence_length=max_sequence_length)
        if self.transformer.config.guidance_embeds:
            raise ValueError(
                "this Flux2Transformer2DModel sets guidance_embeds: a FLUX.2 [dev] checkpoint (Mistral text "
                "encoder, guidance as an input); model.family flux2_klein samples FLUX.2 [klein] checkpoints "
                "(e.g. black-forest-labs/FLUX.2-klein-base-4B)"
            )
        self.distilled = bool(pipe.config.get("is_distilled", False))
        self.set_resolution()

    def set_resolution(self) -> None:
        height, width = self.check_resolution(
            2 * self.vae_scale_factor,
            f"VAE factor {self.vae_scale_factor} x {self.model_name}'s 2x2 latent patches",
        )
        self.latent_shape = (self.transformer.config.in_channels, height // 2, width // 2)
        self.image_seq_len = (height // 2) * (width // 2)

    def dynamic_mu(self, cfg, num_steps: int) -> float:
        """FLUX.2's empirical ``mu``, which the pipeline computes from the image's token count and the step
        count (the scheduler config's ``mu`` settings are not used)."""
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        return compute_empirical_mu(image_seq_len=self.image_seq_len, num_steps=num_steps)

    #: The text encoder's part that encoding calls: Qwen3ForCausalLM's ``model``, without its LM head (the
    #: pipeline calls the whole model, whose logits over 151,936 tokens for every prompt token it drops: 7.6 GB
    #: in bf16 for 49 prompts of 512 tokens).
    text_encoder_call = "model"

    @staticmethod
    def unused_modules(pipe) -> dict[str, torch.nn.Module]:
        """Qwen3's LM head, which encoding never calls, where it is not the input embedding (Qwen3-8B, FLUX.2
        [klein] 9B's encoder: 0.62 B parameters; Qwen3-4B ties them)."""
        encoder = pipe.text_encoder
        head, body = getattr(encoder, "lm_head", None), getattr(encoder, "model", None)
        if head is None or body is None:
            return {}
        kept = {id(p) for p in body.parameters()}
        return {} if any(id(p) in kept for p in head.parameters()) else {"text_encoder.lm_head": head}

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``Flux2KleinPipeline.encode_prompt``'s embeds [U, max_sequence_length, 3 D] (tests/
        test_policy_flux2_klein.py: equal), and a placeholder [U, 1] for the pooled field. As the pipeline:
        the chat template without a thinking block, every prompt padded to ``max_sequence_length``, Qwen3's
        hidden states after layers 9, 18 and 27 side by side per token; here from the decoder alone
        (:attr:`text_encoder_call`), not the whole causal LM."""
        pipe = self.pipe
        texts = chat_prompts(pipe.tokenizer, prompts, enable_thinking=False)
        tokens = pipe.tokenizer(
            texts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
            return_tensors="pt",
        )  # fmt: skip
        encoder = pipe.text_encoder
        states = getattr(encoder, self.text_encoder_call)(
            input_ids=tokens.input_ids.to(self.text_device), attention_mask=tokens.attention_mask.to(self.text_device),
            output_hidden_states=True, use_cache=False,
        ).hidden_states  # fmt: skip
        embeds = torch.cat([states[k] for k in TEXT_LAYERS], dim=-1).to(encoder.dtype)
        return embeds, embeds.new_zeros(len(prompts), 1)

    def encode_prompts(self, prompts: list[str], *, with_negative: bool = True) -> PromptEmbeds:
        """``embeds`` [B, L, 3 D], one encoder row per distinct prompt; with ``with_negative`` (and an
        undistilled checkpoint) :attr:`negative_prompt`'s (the empty prompt's), encoded in the same call. Edits (every prompt an
        :class:`~densegrpo_fast.prompts.EditPrompt`) add their sources' tokens as ``reference``."""
        with_negative = with_negative and not self.distilled
        if any(isinstance(p, EditPrompt) for p in prompts):
            return self._encode_edits(prompts, with_negative)
        return self._encode_with_negative(prompts, with_negative)

    def _source_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """The pipeline's own encoding of a reference (its ``prepare_image_latents`` of one image): the VAE's
        mode, patchified, batch-normalised, packed."""
        from diffusers import Flux2KleinPipeline

        return Flux2KleinPipeline._pack_latents(self.pipe._encode_vae_image(image, generator=None))

    def guidance_problem(self, scale: float, setting: str) -> str | None:
        if not self.distilled or scale == 1.0:
            return None
        return (
            f"{setting} ({scale}): this FLUX.2 [klein] checkpoint is step-distilled (is_distilled) and takes no "
            "guidance: set sampling.guidance_scale=1 and eval.guidance_scale=1 (the family's default, 4.0, is "
            "the base models')"
        )

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """Velocity [B, *latent_shape] float32; CFG ``v_neg + g (v_pos - v_neg)`` when ``guidance_scale``
        ``g != 1`` and negative embeds are present, in one transformer call of 2B rows."""
        from diffusers import Flux2KleinPipeline

        problem = self.guidance_problem(guidance_scale, "guidance scale")
        if problem is not None:
            raise ValueError(problem)
        B, C, H, W = x.shape
        sigma = sigma.expand(B) if sigma.ndim == 0 else sigma
        packed = Flux2KleinPipeline._pack_latents(x.to(self.dtype))  # [B, H * W, C]
        tokens = packed.shape[1]
        img_ids = Flux2KleinPipeline._prepare_latent_ids(x[:1]).to(x.device)
        reference = self._checked_reference(cond, tokens)
        if reference is not None:  # an edit's source, after the sampled tokens, at time position 10
            packed = torch.cat([packed, reference.to(self.dtype)], 1)
            ref_ids = Flux2KleinPipeline._prepare_image_ids([x[:1]]).to(x.device)
            img_ids = torch.cat([img_ids, ref_ids], 1)
        embeds = cond.embeds
        cfg = guidance_scale != 1.0 and cond.has_negative
        if cfg:
            packed, sigma, embeds = (
                torch.cat([packed, packed]),
                torch.cat([sigma, sigma]),
                torch.cat([cond.neg_embeds, embeds]),
            )
        rows = packed.shape[0]
        img_ids = img_ids.expand(rows, -1, -1)
        txt_ids = Flux2KleinPipeline._prepare_text_ids(embeds[:1]).to(x.device).expand(rows, -1, -1)
        out = self.transformer(
            hidden_states=packed,
            timestep=(1000.0 * sigma.float()).to(self.dtype) / 1000,  # the pipeline's rounding
            guidance=None,
            encoder_hidden_states=embeds.to(self.dtype),
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0][:, :tokens].float()
        if cfg:
            neg, pos = out.chunk(2)
            out = neg + guidance_scale * (pos - neg)
        return out.permute(0, 2, 1).reshape(out.shape[0], C, H, W)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, *latent_shape] -> images [B, 3, H, W] float32 in [0, 1], as the pipeline decodes: the
        VAE's batch-norm statistics undone, the 2x2 patches unpatchified."""
        from diffusers import Flux2KleinPipeline

        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, torch.float32)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device)
        z = Flux2KleinPipeline._unpatchify_latents(latents.float() * std.float() + mean)
        images = vae.decode(z.to(vae.dtype), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
