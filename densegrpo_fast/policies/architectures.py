"""Full-size architectures of the checkpoints the recipes train, for building models without their weights.

The memory estimate (:mod:`densegrpo_fast.memory`) and benchmarks/real_model_iteration.py build SD3.5-Medium,
FLUX.1-dev, Qwen-Image, Z-Image, FLUX.2 [klein] 4B, Wan 2.1 T2V 1.3B and Wan 2.2 T2V-A14B from these configs when
the checkpoint is not on disk (fake or random weights, the real shapes). :func:`stand_in_tokenizers` give the real sequence lengths without the tokenizer files: any
lowercase prompt, one token per character, padded to the model's length (Qwen-Image's and Z-Image's
tokenizers pad to the batch's longest prompt instead: one token per byte).
"""

from __future__ import annotations

import string

# Every value below is the published diffusers / transformers config of the checkpoint's component, as far as
# the author knows it. SURE (and checked by --meta against the published parameter counts in KNOWN_PARAMS,
# which tests/test_real_model_bench.py asserts; FLUX.2 [klein]'s counts are the configs' own, so only its
# name's "4B" checks them): all widths, depths, head counts, channel lists, vocabulary and
# position sizes, i.e. everything that sets memory and time; SD3.5-M's dual-attention layers 0..12 and RMS
# qk-norm; the VAEs' scaling / shift factors (1.5305 / 0.0609 SD3, 0.3611 / 0.1159 FLUX) and the schedulers.
# LESS SURE, and irrelevant to cost: activation names and norm epsilons of the CLIP encoders, T5's relative
# attention buckets / max distance, the CLIP token ids (ours are the offline tokenizer's). Qwen-Image's
# scheduler values are those other trainers hard-code for it (ostris/ai-toolkit, SimpleTuner), not read from the
# official file; its transformer and VAE are diffusers' class defaults; Qwen2.5-VL's rope and vision-window
# settings are as recalled. Z-Image's transformer is ZImageTransformer2DModel's defaults (diffusers' defaults are
# Z-Image-Turbo's config); Qwen3-4B's config and Z-Image-Turbo's scheduler (a static shift of 3) are as
# recalled.

#: SD3.5-Medium's MMDiT-X (stabilityai/stable-diffusion-3.5-medium, transformer/config.json).
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
#: FLUX.1-dev's transformer (black-forest-labs/FLUX.1-dev, transformer/config.json): 3072 = 24 heads x 128.
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip
_CLIP_COMMON = dict(
    vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1
)
#: CLIP ViT-L/14's text tower (SD3's text_encoder, FLUX's text_encoder): pooled 768.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu", **_CLIP_COMMON)  # fmt: skip
#: OpenCLIP ViT-bigG/14's text tower (SD3's text_encoder_2): pooled 1280 (768 + 1280 = SD3's 2048).
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu", **_CLIP_COMMON)  # fmt: skip
#: T5 v1.1 XXL's encoder (SD3's text_encoder_3, FLUX's text_encoder_2).
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6, is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)  # fmt: skip
_VAE_COMMON = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, sample_size=1024, use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip
SD3_VAE = dict(scaling_factor=1.5305, shift_factor=0.0609, **_VAE_COMMON)
FLUX_VAE = dict(scaling_factor=0.3611, shift_factor=0.1159, **_VAE_COMMON)
#: Qwen-Image's MMDiT (Qwen/Qwen-Image, transformer/config.json): QwenImageTransformer2DModel's defaults,
#: 60 layers of 24 heads x 128 over Qwen2.5-VL's 3584-wide hidden states.
QWEN_IMAGE_TRANSFORMER = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
#: Qwen2.5-VL-7B-Instruct (Qwen-Image's text_encoder, a whole Qwen2_5_VLForConditionalGeneration: the vision
#: tower and the LM head load with it, though prompts use neither).
QWEN25_VL_7B = dict(
    text_config=dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=128000, rope_theta=1000000.0,
        rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        tie_word_embeddings=False,
    ),
    vision_config=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
        in_chans=3,
    ),
    vocab_size=152064, tie_word_embeddings=False,
)  # fmt: skip
#: Qwen2-VL-7B-Instruct (HPSv3's base): Qwen2.5-VL-7B's language model, and Qwen2-VL's vision tower (32 blocks
#: of 1280, MLP ratio 4, merged into 3584-wide tokens), Qwen2VLVisionConfig's defaults.
QWEN2_VL_7B = dict(
    text_config=dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        tie_word_embeddings=False,
    ),
    vision_config=dict(
        depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, patch_size=14, spatial_merge_size=2,
        temporal_patch_size=2, in_channels=3,
    ),
    vocab_size=152064, tie_word_embeddings=False,
)  # fmt: skip
#: Qwen-Image's VAE (a video VAE of Wan 2.1's layout; AutoencoderKLQwenImage's defaults).
QWEN_IMAGE_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                      temperal_downsample=[False, True, True])  # fmt: skip
QWEN_IMAGE_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_image_seq_len=256,
    max_image_seq_len=8192, base_shift=0.5, max_shift=0.9, shift_terminal=0.02, time_shift_type="exponential",
)  # fmt: skip
#: Z-Image's single-stream DiT (Tongyi-MAI/Z-Image-Turbo, transformer/config.json; ZImageTransformer2DModel's
#: defaults): 30 layers (and 2 + 2 refiner layers) of 30 heads x 128 over Qwen3-4B's 2560-wide states.
Z_IMAGE_TRANSFORMER = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
    n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560, rope_theta=256.0,
    t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512],
)  # fmt: skip
#: Qwen3-4B (Z-Image's text_encoder, a Qwen3Model: no LM head; its input embedding is the tied one).
QWEN3_4B = dict(
    hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
    head_dim=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)  # fmt: skip
#: FLUX.2 [klein] 4B's transformer (black-forest-labs/FLUX.2-klein-4B and -base-4B, transformer/config.json, as
#: other projects hard-code it): 5 double-stream and 20 single-stream blocks of 24 heads x 128 over three of
#: Qwen3-4B's 2560-wide hidden states (7680), 128 input channels (FLUX.2's VAE's 32, in 2x2 patches).
FLUX2_KLEIN_4B_TRANSFORMER = dict(
    patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False,
)  # fmt: skip
#: FLUX.2's VAE (AutoencoderKLFlux2's defaults): 32 latent channels, batch-norm statistics over 2x2 patches.
FLUX2_VAE = dict(latent_channels=32, block_out_channels=(128, 256, 512, 512), patch_size=(2, 2))
#: FLUX.2 [klein]'s scheduler as recalled (dynamic shifting; the pipeline passes its own empirical mu).
FLUX2_KLEIN_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                             time_shift_type="exponential")  # fmt: skip
#: Z-Image-Turbo's scheduler: a static shift of 3 on the pipeline's linspace(1, 1/T, T).
Z_IMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
    max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
)  # fmt: skip
#: Wan 2.1 T2V 1.3B's transformer (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json, as recalled): 30
#: blocks of 12 heads x 128 (1536 wide), cross-attention to UMT5-XXL's 4096-wide states, 1x2x2 patches.
WAN21_1_3B_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip
#: Wan's 14B transformer: each of Wan 2.2 T2V-A14B's two experts (Wan-AI/Wan2.2-T2V-A14B-Diffusers,
#: transformer/ and transformer_2/config.json), and Wan 2.1 T2V 14B's: 40 blocks of 40 heads x 128 (5120 wide).
WAN_14B_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip
#: Checkpoints built in beside each family's default repo, by repo id: (family, architecture key). The key
#: selects :func:`full_size_models`, :func:`scheduler`, :data:`KNOWN_PARAMS` and :data:`PIPELINE_SETTINGS`.
BUILT_IN_REPOS = {"Wan-AI/Wan2.2-T2V-A14B-Diffusers": ("wan", "wan_a14b")}
#: The pipelines' settings of a built-in architecture (``model_index.json``'s, beside its components): Wan 2.2
#: T2V-A14B's low-noise expert takes over below timestep 875.
PIPELINE_SETTINGS = {"wan_a14b": {"boundary_ratio": 0.875}}
#: UMT5-XXL's encoder (Wan's text_encoder, a UMT5EncoderModel): 24 layers of 64 heads x 64 over 4096, gated GELU.
UMT5_XXL = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
    dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
)  # fmt: skip
#: Wan 2.1's video VAE (AutoencoderKLWan's defaults): 16 channels, 8x spatial and 4x temporal factors.
WAN21_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True])  # fmt: skip
#: Wan 2.1's released scheduler: UniPC with flow sigmas at flow_shift 3 (480p; 5 for 720p).
WAN_SCHEDULER = dict(
    num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
    solver_order=2, solver_type="bh2", final_sigmas_type="zero", lower_order_final=True,
)  # fmt: skip
#: Parameter counts (millions) of the released checkpoints, from their sizes on disk as the author recalls them
#: (16-bit files: SD3.5-M transformer 4.94 GB = 2243 M parameters + the 226 M-value position table, the "2.5B";
#: T5-XXL encoder 9.52 GB; CLIP-G 1.39 GB; CLIP-L 0.25 GB; FLUX.1-dev 23.8 GB, the "12B"; VAEs 0.17 GB), not
#: read from the files (no network). --meta and the test check the configs against them within 1%.
KNOWN_PARAMS = {
    "sd3": {"transformer": 2243, "text_encoder": 123.7, "text_encoder_2": 694.7, "text_encoder_3": 4762,
            "vae": 83.8},
    "flux": {"transformer": 11901, "text_encoder": 123.1, "text_encoder_2": 4762, "vae": 83.8},
    # FLUX.1 Kontext [dev]: FLUX.1-dev's architecture and encoders (the "12B" of its model card)
    "flux_kontext": {"transformer": 11901, "text_encoder": 123.1, "text_encoder_2": 4762, "vae": 83.8},
    # Qwen-Image: its model card's "20B"; Qwen2.5-VL-7B-Instruct's 8.29 B (its model card); the VAE's
    # 127 M is Wan 2.1's VAE (0.25 GB in 16 bits, 0.51 GB in fp32)
    "qwen_image": {"transformer": 20430, "text_encoder": 8292, "vae": 126.9},
    # Qwen-Image-Edit-2511: Qwen-Image's transformer, encoder and VAE (its model card builds on Qwen-Image)
    "qwen_image_edit": {"transformer": 20430, "text_encoder": 8292, "vae": 126.9},
    # Z-Image: the "6B" of its model card, 6.15 B as its bf16 transformer's 12.3 GB; Qwen3-4B's 4.02 B (its
    # model card, embeddings included, the 151936 x 2560 of them counted once); FLUX.1's VAE
    "z_image": {"transformer": 6155, "text_encoder": 4022, "vae": 83.8},
    # FLUX.2 [klein] 4B: the "4B" of its name, 3.88 B counted from the config above (no independent figure was at
    # hand, so this entry checks only the name's rounding); Qwen3-4B as Z-Image's; FLUX.2's VAE, counted likewise
    "flux2_klein": {"transformer": 3876, "text_encoder": 4022, "vae": 84.0},
    # Wan 2.1 T2V 1.3B: the "1.3B" of its name, counted from the config above (only the name's rounding checks
    # it); UMT5-XXL's encoder, 5.68 B (11.4 GB in bf16); Wan 2.1's VAE as Qwen-Image's
    "wan": {"transformer": 1419, "text_encoder": 5680, "vae": 126.9},
    # Wan 2.2 T2V-A14B: two experts of 14.29 B each, counted from the config above, which is the published one
    # (the "A14B" of its name: 14 B active per step); UMT5-XXL and Wan 2.1's VAE as above
    "wan_a14b": {"transformer": 14289, "transformer_2": 14289, "text_encoder": 5680, "vae": 126.9},
}  # fmt: skip
DEFAULT_SEQ = {
    "sd3": 256,
    "flux": 512,
    "flux_kontext": 512,
    "qwen_image": 512,
    "qwen_image_edit": 512,
    "z_image": 512,
    "flux2_klein": 512,
    "wan": 512,
    "wan_a14b": 512,
}


CHARS = string.ascii_lowercase + string.digits


def clip_tokenizer(max_length: int = 77):
    """A byte-level BPE CLIP tokenizer over single characters, no merges, padding prompts to ``max_length``."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer():
    """A unigram T5 tokenizer over single characters (and the word-start marker)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -1.0) for c in CHARS] + [("\u2581" + c, -1.5) for c in CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def qwen_tokenizer():
    """A byte-level BPE tokenizer without merges (one token per byte) and Qwen's chat tokens, padding to
    the batch's longest prompt as Qwen2.5's does."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


#: A chat template that renders one user message as Qwen3's does with ``enable_thinking=True`` (the stand-in
#: tokenizers' and the tests'; the checkpoint's tokenizer brings Qwen3's own).
QWEN3_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def qwen3_tokenizer():
    """:func:`qwen_tokenizer` with Qwen3's chat template (Z-Image's tokenizer), padding with Qwen3's pad token."""
    tokenizer = qwen_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


#: Qwen2.5-VL's vision tokens, in the order :func:`qwen_vl_tokenizer` adds them.
VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")


def qwen_vl_tokenizer():
    """:func:`qwen_tokenizer` with Qwen2.5-VL's vision tokens (Qwen-Image-Edit's text encoder sees images)."""
    tokenizer = qwen_tokenizer()
    tokenizer.add_special_tokens(
        {"additional_special_tokens": ["<|im_start|>", "<|im_end|>", *VISION_TOKENS]}
    )
    return tokenizer


def stand_in_tokenizers(family: str) -> dict:
    """The pipeline's tokenizers for ``family``, as stand-ins (see the module docstring); Qwen-Image-Edit's
    processor is not loaded (the adapter reads its image processor: :func:`stand_in_image_processor`)."""
    if family == "sd3":
        return {"tokenizer": clip_tokenizer(), "tokenizer_2": clip_tokenizer(), "tokenizer_3": t5_tokenizer()}
    if family == "qwen_image":
        return {"tokenizer": qwen_tokenizer()}
    if family == "qwen_image_edit":
        return {"tokenizer": qwen_vl_tokenizer(), "processor": None}
    if family in ("z_image", "flux2_klein"):
        return {"tokenizer": qwen3_tokenizer()}
    if family in ("wan", "wan_a14b"):
        return {"tokenizer": t5_tokenizer()}
    return {"tokenizer": clip_tokenizer(), "tokenizer_2": t5_tokenizer()}


def stand_in_image_processor():
    """Qwen2.5-VL's image processor with its defaults (14 px patches merged 2 x 2, 56 x 56 to 1280 x 28 x 28
    pixels), as Qwen-Image-Edit's checkpoint brings it."""
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor()


def full_size_models(family: str) -> dict:
    """Constructors of the pipeline's models at full size, by component name (call them under the device,
    dtype or fake mode wanted); the VAE's entry is ``"vae"``. ``family``: a family (its default checkpoint's
    architecture), or another built-in checkpoint's key (:data:`BUILT_IN_REPOS`: ``wan_a14b``)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    if family == "qwen_image":
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        return {
            "transformer": lambda: QwenImageTransformer2DModel(**QWEN_IMAGE_TRANSFORMER),
            "text_encoder": lambda: Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_7B)),
            "vae": lambda: AutoencoderKLQwenImage(**QWEN_IMAGE_VAE),
        }
    if family == "qwen_image_edit":  # (2511: the source's tokens at timestep 0, zero_cond_t)
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        tokenizer = qwen_vl_tokenizer()  # (the stand-in's ids for the vision tokens)
        start, image, _, video = tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
        ids = dict(vision_start_token_id=start, image_token_id=image, video_token_id=video)
        return {
            "transformer": lambda: QwenImageTransformer2DModel(**QWEN_IMAGE_TRANSFORMER, zero_cond_t=True),
            "text_encoder": lambda: Qwen2_5_VLForConditionalGeneration(
                Qwen2_5_VLConfig(**QWEN25_VL_7B, **ids)
            ),
            "vae": lambda: AutoencoderKLQwenImage(**QWEN_IMAGE_VAE),
        }
    if family == "z_image":
        from diffusers import ZImageTransformer2DModel
        from transformers import Qwen3Config, Qwen3Model

        return {
            "transformer": lambda: ZImageTransformer2DModel(**Z_IMAGE_TRANSFORMER),
            "text_encoder": lambda: Qwen3Model(Qwen3Config(**QWEN3_4B)),
            "vae": lambda: AutoencoderKL(**FLUX_VAE),
        }
    if family == "flux2_klein":
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return {
            "transformer": lambda: Flux2Transformer2DModel(**FLUX2_KLEIN_4B_TRANSFORMER),
            "text_encoder": lambda: Qwen3ForCausalLM(Qwen3Config(**QWEN3_4B)),
            "vae": lambda: AutoencoderKLFlux2(**FLUX2_VAE),
        }
    if family in ("wan", "wan_a14b"):
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        experts = (
            {"transformer": lambda: WanTransformer3DModel(**WAN21_1_3B_TRANSFORMER)}
            if family == "wan"
            else {
                name: lambda: WanTransformer3DModel(**WAN_14B_TRANSFORMER)
                for name in ("transformer", "transformer_2")
            }
        )
        return {
            **experts,
            "text_encoder": lambda: UMT5EncoderModel(UMT5Config(**UMT5_XXL)),
            "vae": lambda: AutoencoderKLWan(**WAN21_VAE),
        }
    t5 = lambda: T5EncoderModel(T5Config(**T5_XXL))  # noqa: E731
    if family == "sd3":
        return {
            "transformer": lambda: SD3Transformer2DModel(**SD35M_TRANSFORMER),
            "text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
            "text_encoder_3": t5,
            "vae": lambda: AutoencoderKL(**SD3_VAE),
        }
    return {
        "transformer": lambda: FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L)),
        "text_encoder_2": t5,
        "vae": lambda: AutoencoderKL(**FLUX_VAE),
    }


def scheduler(family: str):
    """The checkpoint's flow-matching scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if family in ("wan", "wan_a14b"):  # (A14B's taken to be Wan 2.1's: a grid, no memory or time)
        return UniPCMultistepScheduler(**WAN_SCHEDULER)

    configs = {"sd3": SD3_SCHEDULER, "flux": FLUX_SCHEDULER, "flux_kontext": FLUX_SCHEDULER,
               "qwen_image": QWEN_IMAGE_SCHEDULER, "qwen_image_edit": QWEN_IMAGE_SCHEDULER,
               "z_image": Z_IMAGE_SCHEDULER, "flux2_klein": FLUX2_KLEIN_SCHEDULER}  # fmt: skip
    return FlowMatchEulerDiscreteScheduler(**configs[family])
