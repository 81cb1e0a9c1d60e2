"""Policy adapters, one per model family, behind :class:`densegrpo_fast.policies.base.Policy`."""

from __future__ import annotations

from densegrpo_fast.policies.base import Policy, PromptEmbeds

__all__ = [
    "EDITING", "FAMILIES", "PRETRAINED", "TEXT_READS_SOURCES", "VIDEO", "Policy", "PromptEmbeds",
    "adapter_class", "load_policy",
]  # fmt: skip

#: The pretrained families: the module and class of each adapter (a diffusers pipeline's components).
PRETRAINED = {
    "sd3": ("densegrpo_fast.policies.sd3", "SD3Policy"),
    "flux": ("densegrpo_fast.policies.flux", "FluxPolicy"),
    "flux_kontext": ("densegrpo_fast.policies.flux_kontext", "FluxKontextPolicy"),
    "qwen_image": ("densegrpo_fast.policies.qwen_image", "QwenImagePolicy"),
    "qwen_image_edit": ("densegrpo_fast.policies.qwen_image_edit", "QwenImageEditPolicy"),
    "z_image": ("densegrpo_fast.policies.z_image", "ZImagePolicy"),
    "flux2_klein": ("densegrpo_fast.policies.flux2_klein", "Flux2KleinPolicy"),
    "wan": ("densegrpo_fast.policies.wan", "WanPolicy"),
}
FAMILIES = ("toy", *PRETRAINED)
#: The families that edit a source image per prompt (their prompts are
#: :class:`~densegrpo_fast.prompts.EditPrompt` s, from a ``.jsonl`` prompt file with an ``image`` per line):
#: "required" where every prompt is an edit (FLUX.1 Kontext), "optional" where the prompt file decides
#: (FLUX.2 [klein]: text prompts, or edits whose source goes in as the reference image). The others generate
#: from text alone. Each adapter's ``edits`` says the same.
EDITING = {"flux_kontext": "required", "qwen_image_edit": "required", "flux2_klein": "optional"}
#: The families whose text encoder reads each edit's source image too (Qwen-Image-Edit): a prompt's encoding is
#: not its text's alone, so no prompt cache serves them. Each adapter's ``text_reads_sources`` says the same.
TEXT_READS_SOURCES = ("qwen_image_edit",)
#: The families that make videos: their ``decode`` gives [B, 3, F, H, W], which the image rewards score frame
#: by frame (:mod:`densegrpo_fast.rewards.video`). Each adapter's ``video`` says the same.
VIDEO = ("wan",)


def adapter_class(family: str):
    """The adapter class of a pretrained ``family`` (imported on first use: diffusers is heavy)."""
    import importlib

    if family not in PRETRAINED:
        raise ValueError(
            f"model.family={family!r} has no pretrained adapter: the pretrained families are {list(PRETRAINED)}"
        )
    module, name = PRETRAINED[family]
    return getattr(importlib.import_module(module), name)


def checkpoint_problem(family: str, checkpoint: str | None, *, local_files_only: bool = True) -> str | None:
    """Why :func:`load_policy` would not find a pretrained family's weights on this machine (None: it would,
    or the family is the toy's, or it may download them), without loading any: the directory, or the Hugging
    Face cache's entry, and the pipeline's folders in it."""
    if family not in PRETRAINED or not local_files_only:
        return None
    try:
        adapter_class(family).resolve(checkpoint, local_files_only=True)
    except ValueError as e:
        return str(e)
    return None


def has_two_experts(family: str, checkpoint: str | None, *, local_files_only: bool = True) -> bool | None:
    """Whether a checkpoint of ``family`` has two experts (Wan 2.2 A14B: ``transformer_2``), from its
    ``model_index.json`` alone (no weights read or downloaded); None where that index is not found or is refused
    (the load then says why), False for the toy."""
    if family not in PRETRAINED:
        return False
    cls = adapter_class(family)
    try:
        index = cls.read_index(checkpoint, local_files_only=local_files_only)
    except ValueError:
        return None
    return "transformer_2" in cls.checkpoint_components(index)


def negative_prompt_of(family: str, configured: str | None) -> str | None:
    """The negative prompt a ``family`` policy encodes for CFG: ``configured`` (``model.negative_prompt``), else
    the family's own (the pipeline's); None for the toy, whose prompt embedding is a part of its model, and for
    the guidance-distilled families, which have no CFG."""
    if family == "toy" or not adapter_class(family).has_cfg:
        return None
    return configured if configured is not None else adapter_class(family).negative_prompt


def with_family_negative(older: dict, family: str | None) -> dict:
    """``older``, a record that may predate ``model.negative_prompt`` (an eval protocol, a psi table's
    ``calibrated_for``), with the negative prompt it sampled with where it records none: the ``family``'s."""
    if "negative_prompt" in older or family not in PRETRAINED:
        return older
    negative = negative_prompt_of(family, None)
    return older if negative is None else {**older, "negative_prompt": negative}


def load_policy(
    family: str,
    checkpoint: str | None,
    device: str,
    *,
    dtype: str = "fp32",
    resolution: int | tuple[int, int] = 512,
    frames: int | None = None,
    guidance_scale_2: float | None = None,
    negative_prompt: str | None = None,
    max_sequence_length: int | None = None,
    local_files_only: bool = True,
    gradient_checkpointing: bool = False,
    offload_text_encoders: bool = False,
    prompt_cache: str | None = None,
    transformer_on_host: bool = False,
) -> Policy:
    """The frozen base policy of ``family`` from ``checkpoint`` on ``device``.

    The keyword options are the model section's (``cfg.model.adapter_options()``) and apply to the
    pretrained families (sd3, flux, flux_kontext, qwen_image, z_image, flux2_klein, wan); the toy model loads fp32
    from its own file and ignores them (``model.autocast``, which the trainer applies, serves every family).
    ``max_sequence_length=None`` takes the family's default (SD3: 256 T5 tokens, FLUX.1 and Kontext: 512,
    Qwen-Image, Z-Image and FLUX.2 [klein]: 512 text tokens, Wan: 512). ``frames``: a video family's
    frames per video (None: its default), refused by the image families. ``guidance_scale_2``: the low-noise
    expert's CFG scale of a checkpoint with two experts (Wan 2.2 T2V-A14B), refused by others.
    ``negative_prompt``: CFG's negative prompt (None: the family's default), refused by the families without CFG.
    ``transformer_on_host`` (every family): the transformer stays in host memory, the rest goes to ``device`` (a
    sharded run's FSDP2 moves the transformer there a block at a time).
    """
    if family == "toy":
        from densegrpo_fast.policies.toy import ToyPolicy

        policy = ToyPolicy.load(checkpoint, device=device)
        if transformer_on_host:  # (tiny: loaded on the device and moved back)
            policy.transformer.to("cpu")
        return policy
    if family not in PRETRAINED:
        raise ValueError(
            f"model.family={family!r} has no adapter: the families available are {list(FAMILIES)}"
        )
    # (refused before any weights load, where the index says one transformer)
    two = guidance_scale_2 is None or has_two_experts(family, checkpoint, local_files_only=local_files_only)
    if two is False:
        raise ValueError(
            f"model.guidance_scale_2 ({guidance_scale_2}) is the low-noise expert's CFG scale of a checkpoint with "
            f"two experts (Wan 2.2 T2V-A14B), and model.checkpoint={checkpoint!r} (model.family {family}) has one "
            "transformer: remove it"
        )
    policy = adapter_class(family).load(
        checkpoint, device=device, dtype=dtype, resolution=resolution, frames=frames,
        max_sequence_length=max_sequence_length, local_files_only=local_files_only,
        offload_text_encoders=offload_text_encoders, prompt_cache=prompt_cache,
        transformer_on_host=transformer_on_host,
    )  # fmt: skip
    if guidance_scale_2 is not None:
        policy.set_guidance_scale_2(guidance_scale_2)
    if negative_prompt is not None:
        policy.set_negative_prompt(negative_prompt)
    if gradient_checkpointing:
        policy.transformer.enable_gradient_checkpointing()
    return policy
