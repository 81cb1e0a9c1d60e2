"""Tiny random-weight SD3, FLUX.1 (and Kontext), FLUX.2 [klein], Qwen-Image and Z-Image pipelines, built
offline from configs (no downloads).

Same architectures and pipelines as the real models, with every width cut to a few dozen channels, one
or two layers, and tokenizers whose vocabulary is single characters (any lowercase prompt tokenizes).
A 32 px image is a 4-channel 16 x 16 latent (VAE factor 2).
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

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
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
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
    from diffusers import FluxPipeline, FluxTransformer2DModel
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


def flux_kontext_pipeline(seed: int = 0):
    """``FluxKontextPipeline`` over :func:`flux_pipeline`'s tiny components (FLUX.1 Kontext is FLUX.1-dev's
    architecture)."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**flux_pipeline(seed).components)


def tiny_qwen25_vl(tokenizer, vision_ids: tuple[int, int, int], **vision):
    """A two-layer Qwen2.5-VL (16 wide, one vision block: ``vision`` adds to its config) for ``tokenizer``;
    ``vision_ids``: the vision-start, image and video token ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    n = len(tokenizer)
    start, image, video = vision_ids
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=n, max_position_embeddings=4096, rope_theta=1000000.0,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                           **vision),
        vocab_size=n, vision_start_token_id=start, image_token_id=image, video_token_id=video,
    ))  # fmt: skip


def seeing_qwen25_vl():
    """The byte-level tokenizer with Qwen's chat and vision tokens, and :func:`tiny_qwen25_vl` for it with
    a vision tower: one block, 14 px patches merged 2 x 2, windows of 56 px."""
    tokenizer = architectures.qwen_vl_tokenizer()
    ids = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|video_pad|>"])
    model = tiny_qwen25_vl(tokenizer, ids, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=56, fullatt_block_indexes=[0])  # fmt: skip
    return tokenizer, model


def _qwen_image_parts(**transformer_kwargs):
    """Qwen-Image's tiny video VAE (factor 2) and transformer, and its scheduler (Qwen-Image-Edit's too)."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 2.0],
    )  # fmt: skip
    transformer = QwenImageTransformer2DModel(**{
        **dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
               num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4)),
        **transformer_kwargs,
    })  # fmt: skip
    return vae, transformer, FlowMatchEulerDiscreteScheduler(**architectures.QWEN_IMAGE_SCHEDULER)


def qwen_image_pipeline(seed: int = 0, **transformer_kwargs):
    """``QwenImagePipeline`` with tiny random components (Qwen-Image's scheduler config, a two-layer
    Qwen2.5-VL, a video VAE of factor 2), fp32, on the CPU. The tokenizer is byte-level (one token per
    byte): the chat template's system part is longer than the pipeline's 34 dropped tokens, so a slice of
    it stays in front of each prompt's tokens, which changes nothing the engine relies on."""
    from diffusers import QwenImagePipeline

    torch.manual_seed(seed)
    tokenizer = architectures.qwen_tokenizer()
    n = len(tokenizer)
    text_encoder = tiny_qwen25_vl(tokenizer, (n, n + 1, n + 2))  # (it never sees an image)
    vae, transformer, scheduler = _qwen_image_parts(**transformer_kwargs)
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def qwen_image_edit_pipeline(seed: int = 0, **transformer_kwargs):
    """``QwenImageEditPlusPipeline`` (Qwen-Image-Edit-2509 / -2511) with tiny random components: Qwen-Image's
    (:func:`qwen_image_pipeline`) with a Qwen2.5-VL that sees images (one vision block, 14 px patches merged
    2 x 2) and its processor (images resized to 28 x 28 to 400 x 400 px: the pipeline's ~384 x 384 view of a
    source keeps its size, 196 image tokens)."""
    from diffusers import QwenImageEditPlusPipeline
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor

    torch.manual_seed(seed)
    tokenizer, text_encoder = seeing_qwen25_vl()

    class Processor(Qwen2_5_VLProcessor):  # (transformers 5 wants a video processor, which needs torchvision)
        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

        def save_pretrained(self, directory, **kwargs):  # (its image processor and tokenizer, as released)
            self.image_processor.save_pretrained(directory)
            self.tokenizer.save_pretrained(directory)

    # model_index.json names the processor as a released checkpoint does
    Processor.__name__, Processor.__module__ = "Qwen2_5_VLProcessor", Qwen2_5_VLProcessor.__module__

    processor = Processor(
        image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=400 * 400), tokenizer=tokenizer
    )
    vae, transformer, scheduler = _qwen_image_parts(**transformer_kwargs)
    return QwenImageEditPlusPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
        transformer=transformer,
    )


def z_image_pipeline(seed: int = 0, **scheduler_kwargs):
    """``ZImagePipeline`` with tiny random components (Z-Image-Turbo's scheduler config unless
    ``scheduler_kwargs`` replace it, a two-layer Qwen3, FLUX.1's VAE layout of factor 2), fp32, on the CPU.
    The tokenizer is byte-level (one token per byte) with a Qwen3-like chat template."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    tokenizer = architectures.qwen3_tokenizer()
    text_encoder = Qwen3Model(Qwen3Config(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
    ))  # fmt: skip
    transformer = ZImageTransformer2DModel(
        in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
        axes_dims=[8, 4, 4], axes_lens=[512, 64, 64],
    )  # fmt: skip
    # (its pad tokens start at zero: random ones, so that a caption padded wrongly shows)
    for pad in (transformer.x_pad_token, transformer.cap_pad_token):
        torch.nn.init.normal_(pad)
    scheduler = FlowMatchEulerDiscreteScheduler(**(scheduler_kwargs or architectures.Z_IMAGE_SCHEDULER))
    return ZImagePipeline(
        scheduler=scheduler,
        vae=vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def flux2_klein_pipeline(seed: int = 0, distilled: bool = False):
    """``Flux2KleinPipeline`` with tiny random components (a 28-layer Qwen3 causal LM 16 wide, since the
    pipeline reads its hidden states after layers 9, 18 and 27, with tied embeddings; a one-double-block,
    one-single-block transformer; FLUX.2's VAE layout of factor 2 with 4 latent channels, so 16 patchified
    ones, and batch-norm statistics away from 0 and 1), fp32, on the CPU. ``distilled``: the pipeline's
    ``is_distilled`` (no CFG)."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tokenizer = architectures.qwen3_tokenizer()
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        hidden_size=16, intermediate_size=16, num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    ))  # fmt: skip
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )  # fmt: skip
    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
        sample_size=RESOLUTION,
    )  # fmt: skip
    vae.bn.running_mean.copy_(torch.randn(16) * 0.3)
    vae.bn.running_var.copy_(torch.rand(16) + 0.5)
    scheduler = FlowMatchEulerDiscreteScheduler(**architectures.FLUX2_KLEIN_SCHEDULER)
    return Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
        is_distilled=distilled,
    )  # fmt: skip


def qwen_vl_checkpoint(root, seed: int = 0):
    """A tiny random Qwen2.5-VL checkpoint in ``root`` (model, tokenizer, image processor), as
    ``hf download Qwen/Qwen2.5-VL-7B-Instruct`` lays one out: two text layers, one vision block, 14 px
    patches merged 2 x 2, images resized to at most 64 x 64 px; the byte-level tokenizer with Qwen's chat and
    vision tokens. Returns ``root``."""
    from transformers import Qwen2VLImageProcessor

    torch.manual_seed(seed)
    tokenizer, model = seeing_qwen25_vl()
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=64 * 64).save_pretrained(root)
    return root


def exported_lora_round_trip(
    make_pipe, Adapter, opts: dict, prompts: list[str], guidance: float, tmp_path, targets=None
):
    """``save_lora`` writes diffusers' format: ``<Pipeline>.load_lora_weights`` on a fresh base model
    (``make_pipe()``) gives the adapted velocity (alpha / r folded into lora_B: the loaders assume
    alpha = r), and ``lora.init`` starts a run's own adapter (alpha 2, another scale) from the file with the
    same velocity. ``Adapter(pipe, **opts)`` is the family's policy; ``targets``: the LoRA's target modules
    (default: the config's)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from densegrpo_fast.config import LoRASection
    from densegrpo_fast.lora_init import start_adapters_from

    targets = targets or LoRASection().target_modules
    policy = Adapter(make_pipe(), **opts)
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7, 0.3])
    cond = policy.encode_prompts(prompts)
    base = policy.velocity(x, sigma, cond, guidance)
    policy.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="gaussian")
    )
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: B starts at zero
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapted = policy.velocity(x, sigma, cond, guidance)
    policy.save_lora(tmp_path / "lora", get_peft_model_state_dict(policy.transformer), 8 / 4)
    fresh = make_pipe()
    fresh.load_lora_weights(tmp_path / "lora")
    loaded = Adapter(fresh, **opts).velocity(x, sigma, cond, guidance)
    assert (adapted - base).abs().max() > 1e-2  # the adapter matters ...
    torch.testing.assert_close(loaded, adapted, rtol=0, atol=1e-5)  # ... and comes back whole
    started = Adapter(make_pipe(), **opts)
    started.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=2, target_modules=targets, init_lora_weights="gaussian")
    )
    assert start_adapters_from(started, tmp_path / "lora") == len(
        [n for n in get_peft_model_state_dict(policy.transformer) if "lora_A" in n]
    )
    torch.testing.assert_close(started.velocity(x, sigma, cond, guidance), adapted, rtol=0, atol=1e-5)


def random_images(folder, sizes: dict[str, tuple[int, int]], seed: int = 0):
    """Random-pixel PNGs in ``folder``, ``{name: (height, width)}`` (an editing model's source images).
    Returns ``folder``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder


def edit_prompts(folder, files, texts):
    """An :class:`~densegrpo_fast.prompts.EditPrompt` per (instruction, file of ``folder``)."""
    from densegrpo_fast.prompts import EditPrompt

    return [EditPrompt(t, str(folder / f)) for t, f in zip(texts, files, strict=True)]


def wan_pipeline(
    seed: int = 0, expand_timesteps: bool = False, boundary_ratio: float | None = None, **scheduler_kwargs
):
    """``WanPipeline`` with tiny random components: a two-layer WanTransformer3DModel, a one-layer UMT5, a Wan
    VAE of base width 3 (spatial factor 8, temporal factor 4), FlowMatchEulerDiscreteScheduler at shift 3
    unless ``scheduler_kwargs`` replace it; fp32 on the CPU. ``expand_timesteps``: Wan 2.2 TI2V-5B's
    per-token timesteps. ``boundary_ratio``: Wan 2.2 A14B's two experts, a second random transformer
    (``transformer_2``, the low-noise expert) taking over below ``boundary_ratio x 1000``."""
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = t5_tokenizer()
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        dropout_rate=0.0,
    ))  # fmt: skip
    shape = dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )  # fmt: skip
    transformer = WanTransformer3DModel(**shape)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**(scheduler_kwargs or {"shift": 3.0}))
    second = None if boundary_ratio is None else WanTransformer3DModel(**shape)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae, scheduler=scheduler,
        expand_timesteps=expand_timesteps, transformer_2=second, boundary_ratio=boundary_ratio,
    )  # fmt: skip
