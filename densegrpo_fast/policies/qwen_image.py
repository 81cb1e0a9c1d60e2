"""The Qwen-Image policy: diffusers' ``QwenImagePipeline`` components behind
:class:`densegrpo_fast.policies.base.Policy`.

Qwen-Image is a 20B MMDiT whose one text encoder is the Qwen2.5-VL-7B language model. Where it differs from
SD3 and FLUX.1, the adapter does what ``QwenImagePipeline`` does:

- **Prompts.** Each prompt goes into the pipeline's chat template. ``encode_prompt`` takes the last hidden
  state of the prompt's tokens after the template's system part, at most ``max_sequence_length`` of them
  (the pipeline's default, 512). The result is ``embeds`` [B, L, 3584], padded to the batch's longest
  prompt, and a token mask [B, L]. The text encoder has no pooled output, so a
  :class:`~densegrpo_fast.policies.base.PromptEmbeds` holds the token mask in its ``pooled`` field
  (``neg_pooled``: the negative prompt's).
- **CFG** is the pipeline's "true CFG": a negative prompt (``" "``, the one Qwen-Image's model card
  recommends, also used by Flow-GRPO's rollouts) and ``v = v_neg + g (v_pos - v_neg)``, rescaled per token
  to the conditional prediction's norm (``v * |v_pos| / |v|`` over the 64 channels of each packed 2x2
  patch). ``g`` is the pipeline's ``true_cfg_scale`` (``sampling.guidance_scale``; 4.0 in the model card).
  The engine runs the negative and positive rows in one transformer call. The negative prompt is encoded
  with the batch's prompts, so both come padded to one length, and the transformer's attention mask drops
  the padding, so each row gets what it gets alone. The combination runs in fp32.
- **Latents.** The engine sees an unpacked latent [16, H/8, W/8], as for FLUX.1. ``velocity`` packs it
  into 2x2 patch tokens [B, H/16 * W/16, 64] and unpacks the output. The VAE is a video VAE: ``decode``
  adds a frame axis, undoes the per-channel ``latents_mean`` / ``latents_std`` normalisation, and takes the
  one frame.
- **Timesteps.** The transformer gets ``timestep = sigma``, rounded as the pipeline rounds ``1000 * sigma``
  in the model's dtype (as for FLUX.1, see :mod:`densegrpo_fast.policies.flux`).
- **Sampling grid** (:meth:`QwenImagePolicy.sigma_grid`, used when ``sampling.shift`` is null): the
  pipeline's, shifted by the image's token count (``max_shift`` 0.9 at 8192 tokens in Qwen-Image's
  scheduler), with its ``shift_terminal`` (0.02: the last sigma before 0).

With zero noise and the same initial latents the engine's sampler reproduces ``QwenImagePipeline``
(tests/test_policy_qwen_image.py). Guidance-distilled checkpoints (``guidance_embeds``) are not supported;
Qwen-Image-Edit's are another family (:mod:`densegrpo_fast.policies.qwen_image_edit`), whose source tokens
this class's ``velocity`` takes as the embeds' ``reference``.
"""

from __future__ import annotations

import torch

from densegrpo_fast.config import Resolution
from densegrpo_fast.policies.base import PromptEmbeds
from densegrpo_fast.policies.pretrained import PackedLatentPolicy

DEFAULT_REPO = "Qwen/Qwen-Image"
COMPONENTS = {
    "transformer": "model", "vae": "model", "text_encoder": "model", "tokenizer": "tokenizer",
    "scheduler": "scheduler",
}  # fmt: skip
#: The pipeline's limit on ``max_sequence_length`` (its tokenizer's budget after the template).
MAX_SEQUENCE_LENGTH = 1024


def kept_tokens(
    hidden: torch.Tensor, attention_mask: torch.Tensor, drop: int, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's hidden states after the template's first ``drop`` tokens (at most ``limit``), padded with
    zeros to the longest row: embeds [B, L, D] and their mask [B, L] (host, long). The rows' spans come from the
    tokenizer's ``attention_mask``, still on the host: no boolean index of device tensors (a host sync), and it
    runs under the memory estimate's fake tensors."""
    spans = []
    for row in attention_mask.bool():
        where = row.nonzero().flatten()
        first, last = int(where[0]) + drop, int(where[-1]) + 1
        spans.append((first, last if limit is None else min(last, first + limit)))
    L = max(last - first for first, last in spans)
    embeds = hidden.new_zeros(len(spans), L, hidden.shape[-1])
    mask = torch.zeros(len(spans), L, dtype=torch.long)
    for b, (first, last) in enumerate(spans):
        embeds[b, : last - first] = hidden[b, first:last]
        mask[b, : last - first] = 1
    return embeds, mask


class QwenImagePolicy(PackedLatentPolicy):
    """Qwen-Image behind the :class:`~densegrpo_fast.policies.base.Policy` interface.

    Shape: latents and velocities [B, C, H/f, W/f] float32, unpacked (C = the transformer's
    ``in_channels / 4``, f = the VAE's factor: (16, 64, 64) at 512 px); images [B, 3, H, W] in [0, 1].

    Args:
        pipe: a ``QwenImagePipeline`` holding the components (on the device, in their dtypes).
        resolution: image side in pixels (square images), or (height, width).
        max_sequence_length: text tokens per prompt at most (the pipeline's default: 512; at most 1024).
    """

    family = "qwen_image"
    pipeline_name = "QwenImagePipeline"
    components = COMPONENTS
    default_repo = DEFAULT_REPO
    default_max_sequence_length = 512
    model_name = "Qwen-Image"
    scheduler_fix = "use Qwen-Image's scheduler config (scheduler/scheduler_config.json)"
    pads_prompts = False  # (to the batch's longest prompt)
    #: The text encoder's part that encoding calls: Qwen2_5_VLForConditionalGeneration's model, without its LM
    #: head (logits over 152k tokens for each prompt token: 49 prompts of 570 tokens take 7.9 GiB in bf16).
    text_encoder_call = "model"
    #: The negative prompt of true CFG (Qwen-Image's model card: a single space).
    negative_prompt = " "
    #: Transformer options the family does not sample with, and why.
    refused_options = ("guidance_embeds", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope")
    refused_why = (
        "a guidance-distilled, an edit or a layered model's checkpoint (Qwen-Image-Layered's extra timestep "
        "input and 3-D rotary positions); model.family qwen_image samples Qwen-Image's text-to-image checkpoints "
        "(e.g. Qwen/Qwen-Image) with true CFG (Qwen-Image-Edit-2509 and -2511: model.family qwen_image_edit)"
    )

    def __init__(self, pipe, *, resolution: Resolution = 512, max_sequence_length: int = 512):
        super().__init__(pipe, resolution=resolution, max_sequence_length=max_sequence_length)
        if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(
                f"model.max_sequence_length ({max_sequence_length}): QwenImagePipeline takes 1 to "
                f"{MAX_SEQUENCE_LENGTH} text tokens; null takes its default, 512"
            )
        config = self.transformer.config
        unsupported = [k for k in self.refused_options if config.get(k)]
        if unsupported:
            raise ValueError(f"this QwenImageTransformer2DModel sets {unsupported}: {self.refused_why}")
        self._check_libraries()
        self.set_resolution()

    @staticmethod
    def unused_modules(pipe) -> dict[str, torch.nn.Module]:
        """Qwen2.5-VL's vision tower and LM head: a text prompt's encoding calls neither (Qwen2.5-VL-7B: 0.67 B
        and 0.55 B parameters, 2.3 GiB in bf16). The head stays with the rest where its weight is the
        language model's input embedding (a checkpoint that ties them)."""
        encoder = pipe.text_encoder
        body = getattr(encoder, "model", None)
        out = {}
        if getattr(body, "visual", None) is not None:
            out["text_encoder.model.visual"] = body.visual
        head = getattr(encoder, "lm_head", None)
        if head is not None and body is not None:
            kept = {id(p) for p in body.parameters()}
            if not any(id(p) in kept for p in head.parameters()):
                out["text_encoder.lm_head"] = head
        return out

    def _check_libraries(self) -> None:
        """A ValueError, with the fix, for a diffusers whose Qwen-Image transformer does not mask the text's
        padding itself (it then takes ``txt_seq_lens``; the batched CFG call relies on the mask) or a
        transformers whose Qwen2.5-VL ``model`` is the text decoder alone (before 4.52: the outer model then
        computes the rotary positions, which :meth:`_encode` skips)."""
        import inspect

        import diffusers
        import transformers

        if "max_txt_seq_len" not in inspect.signature(self.transformer.pos_embed.forward).parameters:
            raise ValueError(
                f"model.family {self.family} needs a diffusers whose QwenImageTransformer2DModel masks the "
                f"text's padding itself (encoder_hidden_states_mask, no txt_seq_lens); diffusers "
                f"{diffusers.__version__} does not: pip install -U diffusers (keep your torch)"
            )
        if self.pipe.text_encoder is None:  # (loaded with a prompt cache: nothing is encoded)
            return
        body = getattr(self.pipe.text_encoder, self.text_encoder_call, None)
        if body is None or not hasattr(body, "language_model"):
            raise ValueError(
                f"model.family {self.family} needs transformers >= 4.52 (Qwen2.5-VL's model holding its "
                f"language model); transformers {transformers.__version__} has another layout: pip install -U "
                "'transformers>=4.52' (keep your torch)"
            )

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``QwenImagePipeline.encode_prompt``'s embeds and token mask (padded, never None): equal to the
        pipeline's to the bit where no prompt is cut, within float rounding where one is
        (tests/test_policy_qwen_image.py). Where they differ:

        - The pipeline finds each prompt's tokens with a boolean index of the device's mask and
          ``.tolist()`` of their lengths (a host sync per encode). Here the tokenizer's mask, still on the
          host, gives each row's span: the same slices, without a sync, and under the memory estimate's fake
          tensors, which have no values to index by.
        - The pipeline encodes up to its tokenizer's budget (1024 tokens after the template's system part)
          and then keeps ``max_sequence_length`` of them; here the tokenizer stops at what is kept. The
          encoder is causal, so the kept tokens' states are the same, up to the rounding of a shorter batch.
        - The text encoder runs without its LM head (:attr:`text_encoder_call`)."""
        pipe = self.pipe
        drop = pipe.prompt_template_encode_start_idx
        tokens = pipe.tokenizer(
            [pipe.prompt_template_encode.format(p) for p in prompts],
            max_length=min(pipe.tokenizer_max_length, self.max_sequence_length) + drop, padding=True,
            truncation=True, return_tensors="pt",
        )  # fmt: skip
        encoder = pipe.text_encoder
        # the pipeline's hidden_states[-1] is the language model's normed last state: asked for directly, it
        # costs neither the other layers' kept states nor the LM head's logits for every token
        hidden = getattr(encoder, self.text_encoder_call)(
            input_ids=tokens.input_ids.to(self.text_device),
            attention_mask=tokens.attention_mask.to(self.text_device),
            use_cache=False,  # (no key-value cache: 57 KB per token of Qwen2.5-VL-7B, kept for nothing)
        ).last_hidden_state
        embeds, mask = kept_tokens(hidden, tokens.attention_mask, drop, self.max_sequence_length)
        return embeds.to(encoder.dtype), mask.to(self.text_device)

    def encode_prompts(self, prompts: list[str], *, with_negative: bool = True) -> PromptEmbeds:
        """``embeds`` [B, L, D] and the token mask [B, L] (in the ``pooled`` field), one encoder row per
        distinct prompt; with ``with_negative`` the negative prompt's, encoded in the same batch so that
        it comes padded to the same L."""
        return self._encode_with_negative(prompts, with_negative)

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """Velocity [B, *latent_shape] float32; true CFG with the norm rescale when ``guidance_scale > 1``
        and negative embeds are present, in one transformer call of 2B rows."""
        from diffusers import QwenImagePipeline

        B, C, H, W = x.shape
        sigma = sigma.expand(B) if sigma.ndim == 0 else sigma
        packed = QwenImagePipeline._pack_latents(x.to(self.dtype), B, C, H, W)  # [B, H/2 * W/2, 4C]
        embeds, mask = cond.embeds, cond.pooled  # (the pooled field holds the token mask)
        tokens, shapes = packed.shape[1], [(1, H // 2, W // 2)]
        reference = self._checked_reference(cond, tokens)  # an edit's source (Qwen-Image-Edit), after
        if reference is not None:
            packed, shapes = torch.cat([packed, reference.to(self.dtype)], dim=1), shapes * 2
        cfg = guidance_scale != 1.0 and cond.has_negative
        if cfg:
            packed, sigma = torch.cat([packed, packed]), torch.cat([sigma, sigma])
            embeds, mask = torch.cat([cond.neg_embeds, embeds]), torch.cat([cond.neg_pooled, mask])
        out = self.transformer(
            hidden_states=packed,
            timestep=(1000.0 * sigma.float()).to(self.dtype) / 1000,  # the pipeline's rounding
            encoder_hidden_states=embeds.to(self.dtype),
            encoder_hidden_states_mask=mask,
            img_shapes=[shapes] * packed.shape[0],
            return_dict=False,
        )[0][:, :tokens].float()
        if cfg:
            neg, pos = out.chunk(2)
            out = neg + guidance_scale * (pos - neg)
            out = out * (pos.norm(dim=-1, keepdim=True) / out.norm(dim=-1, keepdim=True))
        f = self.vae_scale_factor
        return QwenImagePipeline._unpack_latents(out, H * f, W * f, f)[:, :, 0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, *latent_shape] -> images [B, 3, H, W] float32 in [0, 1], as the pipeline decodes:
        the VAE's per-channel normalisation undone, one frame."""
        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device).view(shape)
        z = (latents.float()[:, :, None] * std + mean).to(vae.dtype)
        images = vae.decode(z, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
