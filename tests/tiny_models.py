"""Tiny random-weight SD3 and FLUX.1 pipelines, built offline from configs (no downloads).

Same architectures and pipelines as the real models, with every width cut to a few dozen channels, one
or two layers, and tokenizers whose vocabulary is single characters (any lowercase prompt tokenizes).
A 32 px image is a 4-channel 16 x 16 latent (VAE factor 2).
"""

from __future__ import annotations

import torch

from densegrpo_fast.policies import architectures

CHARS = architectures.CHARS
MAX_CLIP_TOKENS = 16  # the tokenizers' model_max_length (77 in the real models)
MAX_T5_TOKENS = 24  # max_sequence_length (256 for SD3, 512 for FLUX.1-dev)
RESOLUTION = 32


def clip_tokenizer(max_length: int = MAX_CLIP_TOKENS):
    """The single-character CLIP tokenizer (:mod:`densegrpo_fast.policies.architectures`), padding prompts to
    ``max_length`` tokens."""
    return architectures.clip_tokenizer(max_length)


def t5_tokenizer():
    return architectures.t5_tokenizer()


def clip_text_config(**kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(clip_tokenizer()), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_CLIP_TOKENS, bos_token_id=0, eos_token_id=1,
        pad_token_id=1, **kw,
    )  # fmt: skip


def t5_encoder(d_model: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=len(t5_tokenizer()), d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5EncoderModel(cfg)


def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=RESOLUTION, scaling_factor=1.5, shift_factor=0.06,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip


def sd3_pipeline(seed: int = 0, **transformer_kwargs):
    """``StableDiffusion3Pipeline`` with tiny random components, fp32, on the CPU: SD3-Medium's transformer
    layout by default; ``qk_norm="rms_norm"`` is SD3.5-Large's, and with ``dual_attention_layers`` too
    SD3.5-Medium's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=RESOLUTION // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32,
        pooled_projection_dim=64, pos_embed_max_size=16, **transformer_kwargs,
    )  # fmt: skip
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(),
        text_encoder=CLIPTextModelWithProjection(clip_text_config(projection_dim=32)),
        tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(projection_dim=32)),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=t5_encoder(d_model=64),
        tokenizer_3=t5_tokenizer(),
    )


def flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """``FluxPipeline`` with tiny random components (FLUX.1-dev's scheduler config), fp32, on the CPU."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256, max_image_seq_len=4096,
        base_shift=0.5, max_shift=1.15,
    )  # fmt: skip
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae(),
        text_encoder=CLIPTextModel(clip_text_config()),
        tokenizer=clip_tokenizer(),
        text_encoder_2=t5_encoder(d_model=32),
        tokenizer_2=t5_tokenizer(),
        transformer=transformer,
    )
