"""VQAScore (Lin et al., "Evaluating Text-to-Visual Generation with Image-to-Text Generation", ECCV 2024)
with a Qwen2.5-VL model: the probability that the model answers "Yes" to the question
``Does this figure show "{prompt}"? Please answer yes or no.`` about the image, in [0, 1].

A vision-language model judges the whole prompt (objects, counts, colours, relations, text) without a
detector server, and the score is a probability, not a parsed rating: it moves smoothly with the image,
which dense rewards need (a rating of 1 to 5 leaves most of a step's reward gains at exactly 0).

How it scores, per image (``VQAScore.__call__``):

- The image goes to the checkpoint's image processor on the host (as uint8, the pipeline's ``output_type``
  round trip): Qwen2.5-VL's resize to multiples of 28 px within ``min_pixels``/``max_pixels``, then its
  14 px patches. The processor is transformers' own, so the pixels are those the model was trained on.
- The prompt is Qwen2.5-VL's chat format, written here (the model card's template with its default system
  prompt): ``<|im_start|>system ... <|im_start|>user <|vision_start|><|image_pad|> x N <|vision_end|>
  QUESTION<|im_end|> <|im_start|>assistant``, N = the image's patches / 4 (2 x 2 merged).
- The answer's tokens follow, teacher-forced; the score is the product of their probabilities (the
  softmax over the whole vocabulary), as VQAScore defines it. Qwen's tokenizer makes "Yes" one token.
  Prompts are padded on the left, so that every row's answer sits at the end; the language model returns
  its last states, and the LM head runs on the answer's positions alone, in float32 (a chunk of the
  vocabulary at a time): bfloat16 logits of 20 to 30 would be rounded in steps of 0.125, a jitter of about
  10 % in the score, where dense rewards need its small differences.
- The image tokens get Qwen2.5-VL's 3-D rotary positions (transformers 5 computes them only when told
  which tokens are the image's: ``mm_token_type_ids``, which its processor returns and which is passed
  here).

The model runs in ``dtype`` (default bfloat16) on ``device`` (default: the images' device). The memory
estimate (``densegrpo-fast memory``) counts its weights (built from the checkpoint's config, or Qwen2.5-VL-7B's
built-in one when the default is not on disk: 8.29 B parameters, 15.4 GiB in bfloat16), not its activations:
its images are prepared on the host, which fake tensors cannot do, so it scores nothing there (a note says
so). Weights load offline from a folder or the Hugging Face cache
(``hf download Qwen/Qwen2.5-VL-7B-Instruct``).
"""

from __future__ import annotations

import inspect

import torch

from densegrpo_fast.rewards import count_problems, register
from densegrpo_fast.rewards.clip import (
    _missing,
    _stand_in,
    build_architecture,
    building_architectures,
    quiet_loading,
)
from densegrpo_fast.rewards.images import check_batch, place, to_uint8

QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'
ANSWER = "Yes"
SYSTEM = "You are a helpful assistant."  # Qwen2.5-VL's default system prompt
EXAMPLE = "Qwen/Qwen2.5-VL-7B-Instruct"
#: The chat and vision tokens the prompt is written with (Qwen2.5-VL's tokenizer has them all).
SPECIAL = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
#: Vocabulary rows per float32 matmul of the LM head (Qwen2.5-VL-7B: 152 k rows of 3584; 235 MB a chunk).
VOCAB_CHUNK = 16384
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def chat_prompt(question: str, image_tokens: int) -> str:
    """Qwen2.5-VL's chat format for one image and one question, up to the assistant's answer: what its chat
    template gives for a user turn of an image then the question, with the default system prompt and the
    generation prompt (transformers' Qwen2.5-VL documentation shows the same string)."""
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        f"{'<|image_pad|>' * image_tokens}<|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def _problems(
    question: str = QUESTION, answer: str = ANSWER, dtype: str = "bfloat16", max_batch: int = 8, **_
) -> list[str]:
    """What is wrong with the kwargs, found without loading weights (``validate``)."""
    out = [] if dtype in _DTYPES else [f"reward.kwargs.dtype={dtype!r} is not one of {sorted(_DTYPES)}"]
    if not isinstance(question, str) or "{prompt}" not in question:
        out.append(
            f"reward.kwargs.question={question!r} must contain {{prompt}}, where each image's prompt goes "
            f"(VQAScore's: {QUESTION!r})"
        )
    else:
        try:
            question.format(prompt="")
        except (IndexError, KeyError, ValueError) as e:
            out.append(
                f"reward.kwargs.question={question!r} has a format field other than {{prompt}} ({e}): "
                "write a literal brace as {{ or }}"
            )
    if not isinstance(answer, str) or not answer.strip():
        out.append(f"reward.kwargs.answer={answer!r} must be the non-empty answer scored (VQAScore's: 'Yes')")
    return out + count_problems(max_batch=max_batch)


@register("vqascore")
class VQAScore:
    """VQAScore with a Qwen2.5-VL model: the probability that it answers "Yes" to 'Does this figure show
    "{prompt}"? Please answer yes or no.' about the image, in [0, 1] (see the module docstring).

    kwargs: ``model`` (folder or cached hub id of a Qwen2.5-VL checkpoint, default
    Qwen/Qwen2.5-VL-7B-Instruct), ``processor`` (folder of its tokenizer and image processor, default the
    model's), ``question`` (with ``{prompt}``), ``answer`` (default "Yes"), ``device`` (default: the images'),
    ``dtype`` (bfloat16), ``max_batch`` (images per forward pass, 8), ``min_pixels`` / ``max_pixels`` (the
    image processor's resize bounds; default the checkpoint's).
    """

    check = staticmethod(_problems)

    def __init__(
        self,
        model: str = EXAMPLE,
        processor: str | None = None,
        question: str = QUESTION,
        answer: str = ANSWER,
        device: str | None = None,
        dtype: str = "bfloat16",
        max_batch: int = 8,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
    ):
        problems = _problems(question=question, answer=answer, dtype=dtype, max_batch=max_batch)
        if problems:
            raise ValueError("; ".join(problems))
        self.device = torch.device(device) if device else None
        self._placed: torch.device | None = None
        self.estimating = building_architectures()  # (densegrpo-fast memory: see the module docstring)
        if self.estimating:
            from transformers import Qwen2_5_VLForConditionalGeneration

            config = _config(str(model))
            self.model = build_architecture(
                lambda: Qwen2_5_VLForConditionalGeneration(config), _DTYPES[dtype]
            )
            return
        import transformers
        from packaging.version import Version
        from transformers import AutoImageProcessor, AutoTokenizer

        if Version(transformers.__version__) < Version("4.52"):  # (Qwen2.5-VL's model holding its LM)
            raise ValueError(
                f"reward vqascore needs transformers >= 4.52 (Qwen2.5-VL's current layout); transformers "
                f"{transformers.__version__} is installed: pip install -U 'transformers>=4.52' (keep your torch)"
            )
        cls = transformers.Qwen2_5_VLForConditionalGeneration
        old = Version(transformers.__version__) < Version("4.56")  # (named torch_dtype before)
        try:
            with quiet_loading():
                self.model = cls.from_pretrained(
                    str(model), local_files_only=True, **{"torch_dtype" if old else "dtype": _DTYPES[dtype]}
                )
        except OSError as e:
            raise _missing("model", str(model), EXAMPLE, e) from None
        if self.model.config.model_type != "qwen2_5_vl":
            raise ValueError(
                f"reward.kwargs.model={str(model)!r} is a {self.model.config.model_type!r} checkpoint: vqascore "
                f"scores with Qwen2.5-VL (e.g. `hf download {EXAMPLE}`)"
            )
        source = str(processor or model)
        sizes = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            self.image_processor = AutoImageProcessor.from_pretrained(source, local_files_only=True, **sizes)
        except OSError as e:
            raise _missing("processor", source, EXAMPLE, e) from None
        unknown = [
            t
            for t in SPECIAL
            if self.tokenizer.convert_tokens_to_ids(t) in (None, self.tokenizer.unk_token_id)
        ]
        if unknown:
            raise ValueError(
                f"reward.kwargs.processor={source!r}: its tokenizer lacks Qwen2.5-VL's tokens {unknown}: give "
                f"the folder of a Qwen2.5-VL checkpoint (e.g. `hf download {EXAMPLE}`)"
            )
        self.merge = int(getattr(self.image_processor, "merge_size", 2)) ** 2
        self.image_token = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        body = self.model.model
        #: transformers 5 computes the image tokens' 3-D positions only when told which they are
        self.typed = "mm_token_type_ids" in inspect.signature(body.forward).parameters
        self.question, self.max_batch = question, max_batch
        self.answer_ids = self.tokenizer(answer, add_special_tokens=False).input_ids
        self.model.requires_grad_(False).eval()

    def _inputs(self, images: torch.Tensor, prompts: list[str], device: torch.device) -> dict:
        """The model's inputs for one chunk: pixels and grid from the image processor, the chat prompts with
        each image's tokens, left-padded, and the answer's tokens but its last (teacher-forced)."""
        pixels = self.image_processor(
            images=list(to_uint8(images).permute(0, 2, 3, 1).numpy()), return_tensors="pt"
        )
        grid = pixels["image_grid_thw"]
        texts = [
            chat_prompt(self.question.format(prompt=p), int(g.prod()) // self.merge)
            for p, g in zip(prompts, grid, strict=True)
        ]
        tokens = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        forced = torch.tensor(self.answer_ids[:-1], dtype=torch.long).expand(len(texts), -1)
        ids = torch.cat([tokens.input_ids, forced], 1)
        out = {
            "input_ids": ids.to(device),
            "attention_mask": torch.cat([tokens.attention_mask, torch.ones_like(forced)], 1).to(device),
            "pixel_values": pixels["pixel_values"].to(device, self.model.dtype),
            "image_grid_thw": grid.to(device),
        }
        if self.typed:  # text 0, image 1 (as the processor's create_mm_token_type_ids)
            out["mm_token_type_ids"] = (ids == self.image_token).int().to(device)
        return out

    #: What the memory estimate says of it (see the module docstring).
    estimate_note = (
        "its weights are counted, not its activations (a forward of max_batch images without gradients): its "
        "images are prepared on the host, which fake tensors cannot do"
    )

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        if self.estimating:  # (fake weights: nothing to score with)
            return images.new_zeros(len(prompts), dtype=torch.float32)
        device = place(self, images, self.model)
        answer = torch.tensor(self.answer_ids, device=device)
        out = []
        for s in range(0, len(prompts), self.max_batch):
            chunk = self._inputs(images[s : s + self.max_batch], prompts[s : s + self.max_batch], device)
            hidden = self.model.model(**chunk, use_cache=False).last_hidden_state[:, -len(self.answer_ids) :]
            out.append(answer_log_probs(hidden, self.model.lm_head, answer).sum(1).exp())
        return torch.cat(out).to(images.device)


def _config(model: str):
    """The ``Qwen2_5_VLConfig`` of ``model`` (a folder or a cached hub id), or Qwen2.5-VL-7B's built-in one for
    the default id when it is not on disk (noted as stood in for): the memory estimate's architecture."""
    from transformers import Qwen2_5_VLConfig

    from densegrpo_fast.policies.architectures import QWEN25_VL_7B

    try:
        return Qwen2_5_VLConfig.from_pretrained(model, local_files_only=True)
    except OSError as e:
        if model != EXAMPLE or not _stand_in(model):
            raise _missing("model", model, EXAMPLE, e) from None
        return Qwen2_5_VLConfig(**QWEN25_VL_7B)


def answer_log_probs(hidden: torch.Tensor, head: torch.nn.Linear, answer: torch.Tensor) -> torch.Tensor:
    """``log softmax(head(hidden))[..., answer]`` in float32, the head's weights cast a chunk of
    :data:`VOCAB_CHUNK` rows at a time (never the whole head). Shapes: hidden [b, A, D], answer [A] -> [b, A]."""
    h = hidden.float()
    weight, bias = head.weight, head.bias
    norm = None  # log-sum-exp of the logits over the vocabulary, chunk by chunk
    for start in range(0, weight.shape[0], VOCAB_CHUNK):
        rows = slice(start, start + VOCAB_CHUNK)
        logits = h @ weight[rows].float().T + (0 if bias is None else bias[rows].float())
        part = logits.logsumexp(-1)
        norm = part if norm is None else torch.logaddexp(norm, part)
    picked = (h * weight[answer].float()).sum(-1) + (0 if bias is None else bias[answer].float())
    return picked - norm
