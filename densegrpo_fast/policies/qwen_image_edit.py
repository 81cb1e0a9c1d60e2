"""The Qwen-Image-Edit policy: instruction-based image editing with Qwen-Image-Edit-2509 and -2511, diffusers'
``QwenImageEditPlusPipeline`` components behind :class:`densegrpo_fast.policies.base.Policy`.

Qwen-Image-Edit is Qwen-Image's 20B MMDiT trained to edit. Where it differs from
:class:`~densegrpo_fast.policies.qwen_image.QwenImagePolicy`, the adapter does what the pipeline does for one
source image:

- **The text encoder sees the source.** The instruction goes into the pipeline's chat template after
  ``"Picture 1: "`` and the image's vision tokens; Qwen2.5-VL encodes it with its vision tower on the source
  resized to about 384 x 384 px (the pipeline's ``CONDITION_IMAGE_SIZE``, the source's aspect kept, sides
  multiples of 32). The embeds are the last hidden states after the template's first 64 tokens, every one of
  them: the pipeline cuts nothing, so ``model.max_sequence_length`` does not apply. The negative prompt
  (``" "``) is encoded with the same image, so each row has its own negative embeds.
- **The source's latent goes into the transformer** after the sampled tokens, as a second image of
  ``img_shapes`` (its rotary positions follow from that); its output is dropped. The latent is the VAE's
  mode, normalised by the VAE's ``latents_mean`` / ``latents_std`` and packed as the sampled one. The
  negative rows of true CFG take it too. Qwen-Image-Edit-2511's transformer (``zero_cond_t``) gives the
  source tokens timestep 0 itself, from ``img_shapes``.
- **The source comes in at the output's size**, as for FLUX.1 Kontext
  (:mod:`densegrpo_fast.policies.flux_kontext`): resized to cover ``model.resolution`` and centre-cropped. The
  pipeline resizes it to about 1 MP instead (``VAE_IMAGE_SIZE``), four times the tokens at 512 px output.

Everything else is Qwen-Image's: true CFG with the norm rescale, the unpacked latent the engine sees, the
grid shifted by the sampled image's token count, the timestep rounding, the video VAE's decode. Each prompt is
an :class:`~densegrpo_fast.prompts.EditPrompt`; each distinct (instruction, image) is encoded once. The text
encoding reads the source, so a prompt cache (``model.prompt_cache``, keyed by text) does not serve it. The
first Qwen-Image-Edit (``QwenImageEditPipeline``, another template, the source at the VAE's size for the
text encoder too) is not supported.
"""

from __future__ import annotations

import inspect
import math

import torch

from densegrpo_fast.config import image_hw
from densegrpo_fast.policies.base import PromptEmbeds, join_padded
from densegrpo_fast.policies.qwen_image import QwenImagePolicy, kept_tokens

COMPONENTS = {
    "transformer": "model", "vae": "model", "text_encoder": "model", "tokenizer": "tokenizer",
    "processor": "processor", "scheduler": "scheduler",
}  # fmt: skip
#: The pipeline's area of the text encoder's view of the source (``CONDITION_IMAGE_SIZE``).
CONDITION_AREA = 384 * 384
#: The template's part before each instruction, per source image (one here).
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


def condition_size(width: int, height: int, area: int = CONDITION_AREA) -> tuple[int, int]:
    """The pipeline's ``calculate_dimensions``: (width, height) of about ``area`` pixels at the aspect
    ``width / height``, each side rounded to a multiple of 32."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    return round(w / 32) * 32, round(w / ratio / 32) * 32


class QwenImageEditPolicy(QwenImagePolicy):
    """Qwen-Image-Edit-2509 / -2511 behind the :class:`~densegrpo_fast.policies.base.Policy` interface.

    Shape: as :class:`~densegrpo_fast.policies.qwen_image.QwenImagePolicy`; ``encode_prompts`` takes
    :class:`~densegrpo_fast.prompts.EditPrompt` s and adds the packed source latents [B, N, 4C] (N = the
    sampled image's token count) as the embeds' ``reference``.
    """

    family = "qwen_image_edit"
    pipeline_name = "QwenImageEditPlusPipeline"
    components = COMPONENTS
    default_repo = "Qwen/Qwen-Image-Edit-2511"
    model_name = "Qwen-Image-Edit"
    scheduler_fix = "use Qwen-Image-Edit's scheduler config (scheduler/scheduler_config.json)"
    edits = "required"
    text_reads_sources = True
    refused_options = ("guidance_embeds", "use_additional_t_cond", "use_layer3d_rope")
    refused_why = (
        "a guidance-distilled or a layered model's checkpoint (Qwen-Image-Layered's extra timestep input and 3-D "
        "rotary positions); model.family qwen_image_edit samples Qwen-Image-Edit-2509 and -2511 with true CFG"
    )
    #: The pipeline's ``Qwen2VLProcessor`` is not loaded: in transformers 5 it requires torchvision (for its
    #: video processor), and the adapter needs only its image processor and the tokenizer (:attr:`vl_images`).
    skip_components = ("processor",)

    def __init__(self, pipe, **kwargs):
        super().__init__(pipe, **kwargs)
        #: Qwen2.5-VL's image processor (the pipeline processor's, or the checkpoint's ``processor/`` folder's).
        self.vl_images = getattr(pipe.processor, "image_processor", None)

    @classmethod
    def load(cls, path_or_repo_id=None, **kwargs):
        """:meth:`DiffusersPolicy.load`, with the image processor read from the checkpoint's ``processor/``."""
        policy = super().load(path_or_repo_id, **kwargs)
        policy.vl_images = cls.image_processor(policy.root)
        return policy

    @classmethod
    def check_index(cls, index: dict, root) -> None:
        """Refuse the first Qwen-Image-Edit's pipeline (and any other), from ``model_index.json``."""
        named = index.get("_class_name")
        if named != cls.pipeline_name:
            raise ValueError(
                f"{root} is a {named} checkpoint; model.family qwen_image_edit samples {cls.pipeline_name}'s "
                "(Qwen-Image-Edit-2509, -2511), whose template and view of the source differ from the first "
                "Qwen-Image-Edit's (QwenImageEditPipeline, not supported): give a 2509 or 2511 checkpoint"
            )

    @staticmethod
    def image_processor(root):
        """Qwen2.5-VL's image processor of the checkpoint directory ``root`` (its ``processor/`` folder)."""
        from transformers import AutoImageProcessor

        return AutoImageProcessor.from_pretrained(root / "processor", local_files_only=True)

    def encode_prompts(self, prompts: list[str], *, with_negative: bool = True) -> PromptEmbeds:
        """``embeds`` [B, L, D] and the token mask [B, L] (``pooled``) of each (instruction, source image), the
        negative prompt's with the same image (``neg_embeds`` / ``neg_pooled``, one row per table row), and
        the packed source latents (``reference``); one table row per distinct (instruction, image)."""
        from densegrpo_fast.prompts import EditPrompt, prompt_key, source_image_problem

        plain = [p for p in prompts if not isinstance(p, EditPrompt)]
        if plain:
            raise ValueError(source_image_problem(plain[0], self.model_name))
        unique = PromptEmbeds.distinct(prompts, prompt_key)  # (the table's rows, as deduplicated keeps them)
        images = [p.image for p in unique]
        files = list(dict.fromkeys(images))  # (the negative prompt once per image, whatever the instruction)
        extra = [self.negative_prompt] * len(files) if with_negative else []
        with self.text_encoders_on_device():
            embeds, mask = self._encode_with_images(
                [*map(str, unique), *extra], [*images, *(files if with_negative else [])]
            )
        U = len(unique)
        negative = None
        if with_negative:
            at = torch.tensor([U + files.index(f) for f in images], device=embeds.device)
            negative = (embeds[at], mask[at])
        reference = self._encode_references(images)
        return PromptEmbeds.deduplicated(
            lambda _: (embeds[:U], mask[:U], reference), prompts, negative, key=prompt_key
        )

    #: Rows per text-encoder call. An iteration's distinct (instruction, image) and a negative per image are
    #: each a few hundred tokens with the source's: the recipe's 96 rows at once put the estimate's prompt
    #: encoding at 79.1 GiB, 16 at a time at 62.0 GiB (benchmarks/RESULTS.md).
    encode_rows = 16

    def _encode_with_images(self, texts: list[str], paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The pipeline's ``encode_prompt`` of each text with the source image at the path beside it: the
        embeds [U, L, D] padded to the longest row, and the token mask [U, L]; :attr:`encode_rows` rows per
        call of the text encoder, each padded to its own longest (the mask hides the padding)."""
        n = self.encode_rows
        return join_padded(
            [self._encode_rows(texts[i : i + n], paths[i : i + n]) for i in range(0, len(texts), n)]
        )

    def _encode_rows(self, texts: list[str], paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One text-encoder call of :meth:`_encode_with_images`; each image file of the call read once."""
        pipe, image_pad = self.pipe, "<|image_pad|>"
        height, width = image_hw(self.resolution)
        files = list(dict.fromkeys(paths))
        pixels = self.vl_images(
            images=[self._condition_image(p, height, width) for p in files], return_tensors="pt"
        )
        per_file = dict(zip(files, pixels["pixel_values"].split(
            [int(g.prod()) for g in pixels["image_grid_thw"]]), strict=True))  # fmt: skip
        grid = dict(zip(files, pixels["image_grid_thw"], strict=True))
        merge = int(getattr(self.vl_images, "merge_size", 2)) ** 2
        template, drop = pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx
        texts = [  # (as Qwen2VLProcessor expands each image's pad token to the image's merged patches)
            template.format(PICTURE.format(1) + t).replace(
                image_pad, image_pad * (int(grid[p].prod()) // merge)
            )
            for t, p in zip(texts, paths, strict=True)
        ]
        tokens = pipe.tokenizer(texts, padding=True, return_tensors="pt")
        encoder = pipe.text_encoder
        inputs = dict(
            input_ids=tokens.input_ids.to(self.device),
            attention_mask=tokens.attention_mask.to(self.device),
            pixel_values=torch.cat([per_file[p] for p in paths]).to(self.device, encoder.dtype),
            image_grid_thw=torch.stack([grid[p] for p in paths]).to(self.device),
        )
        body = getattr(encoder, self.text_encoder_call)
        if "mm_token_type_ids" in inspect.signature(type(body).forward).parameters:
            # transformers 5 gives the image tokens Qwen2.5-VL's 3-D rotary positions only when told which
            # they are (transformers 4 found them by their id)
            image_id = pipe.tokenizer.convert_tokens_to_ids(image_pad)
            inputs["mm_token_type_ids"] = (tokens.input_ids == image_id).int().to(self.device)
        hidden = self._vl_call(body, inputs)
        # every token after the template's first part: the pipeline cuts none
        embeds, mask = kept_tokens(hidden, tokens.attention_mask, drop)
        return embeds.to(encoder.dtype), mask.to(self.device)

    def _vl_call(self, body, inputs: dict) -> torch.Tensor:
        """Qwen2.5-VL's last hidden states [U, L, D] for ``inputs``. (The memory estimate replaces it: its fake
        tensors cannot run the vision tower, which reads the values of the patch grid.)"""
        return body(**inputs, use_cache=False).last_hidden_state

    def _condition_image(self, path: str, height: int, width: int):
        """The text encoder's view of a source (a PIL image): the source at the output's size
        (:func:`~densegrpo_fast.prompts.load_source`) resized as the pipeline resizes its condition image."""
        from densegrpo_fast.prompts import load_source

        w, h = condition_size(width, height)
        return self.pipe.image_processor.resize(load_source(path, height, width), h, w)

    def _source_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """The pipeline's own encoding (the VAE's mode, normalised), packed as the sampled latent."""
        latent = self.pipe._encode_vae_image(image[:, :, None], generator=None)  # [1, C, 1, h, w]
        return self.pipe._pack_latents(latent, 1, latent.shape[1], *latent.shape[3:])

    @staticmethod
    def unused_modules(pipe) -> dict[str, torch.nn.Module]:
        """Qwen2.5-VL's LM head, where it is not the input embedding: an edit's encoding calls the vision
        tower (Qwen-Image's text prompts never do)."""
        return {k: m for k, m in QwenImagePolicy.unused_modules(pipe).items() if not k.endswith(".visual")}
