"""HPSv3 (Ma et al., "HPSv3: Towards Wide-Spectrum Human Preference Score", ICCV 2025): Qwen2-VL-7B-Instruct
fine-tuned on 1.08 M text-image pairs and 1.17 M pairwise human choices into a preference score, the reward
recent flow-GRPO work reports beside HPS v2.1 and PickScore. Higher is better; the score has no fixed range
(images of current models score about 10).

How the released model (``MizzenAI/HPSv3``, one ``HPSv3.safetensors`` of the whole model) scores an image:

- The language model reads a chat: the default system turn, then a user turn of the image and the
  instruction with the prompt, ending in a new special token ``<|Reward|>`` (added to Qwen2-VL's tokenizer
  at the end of its vocabulary: the embedding has a row per token of the tokenizer, 151658, where the base
  model's has 152064).
- A head on the final (normed) hidden state at that token, ``Linear(3584, 1024) - ReLU - Linear(1024, 16) -
  ReLU - Linear(16, 2)`` in float32, gives a mean and a log standard deviation (the model was trained with
  an uncertainty-aware ranking loss); the score is the mean.
- Every token gets the plain 1-D rotary position of its index (three equal M-RoPE axes): the released model
  computed its input embeddings itself and called the decoder with no image grid, so its image tokens never
  had Qwen2-VL's 2-D positions. This module passes those positions explicitly.
- Each image is resized, as uint8 with PIL's bicubic filter as HPSv3's own code does, to about 256 x 28 x 28 =
  200704 pixels in multiples of 28 px, aspect ratio kept (Qwen2-VL's ``smart_resize``: 448 x 448 for a
  square, 588 x 336 for 1920 x 1080), about 256 image tokens; the checkpoint's Qwen2-VL image processor then
  only normalises it and cuts its patches (whatever backend it has: torchvision's resize would round
  otherwise).

What this package does not ship: the instruction text HPSv3 was trained with, the ``INSTRUCTION`` string of
HPSv3's ``hpsv3/dataset/data_collator_qwen.py`` (it contains ``{text_prompt}``). Give that file itself as
``instruction_file``: its ``INSTRUCTION`` assignment is read with Python's parser, byte for byte (leading
newline, trailing spaces), nothing imported. A text file is read as the instruction, and ``instruction`` takes
the string. Another text scores, but not as the model was trained. Tokens after ``<|Reward|>`` cannot change
the score (the model is causal), so the prompt stops there; rows are padded on the right, as the released
model scored them.

The backbone runs in ``dtype`` (bfloat16), the head in float32. Weights load offline: the base model's
folder or cached hub id (``hf download Qwen/Qwen2-VL-7B-Instruct``: its config, tokenizer and image
processor; its weights are not read) and the checkpoint file (``hf download MizzenAI/HPSv3
HPSv3.safetensors``). The LM head is not needed and not loaded. Key layouts of transformers 4.45 (``model.``,
``visual.``, as released) and of later versions (``model.language_model.``, ``model.visual.``) both load.
The memory estimate counts its weights (7.74 B parameters without the LM head: 14.4 GiB in bfloat16, and the
float32 head's 14 MB), not its activations, as for ``vqascore``. transformers >= 4.52 (Qwen2-VL's current
layout).
"""

from __future__ import annotations

from pathlib import Path

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

EXAMPLE = "Qwen/Qwen2-VL-7B-Instruct"
CHECKPOINT_EXAMPLE = "MizzenAI/HPSv3 HPSv3.safetensors"
REWARD_TOKEN = "<|Reward|>"
#: The line that closes the user turn, up to the reward token (the model card's request for a rating).
ASK = "\nPlease provide the overall ratings of this image: "
#: Pixels of every image (256 merged 28 x 28 patches), as the released model was trained and evaluated.
PIXELS = 256 * 28 * 28
#: Rows of the released embedding: Qwen2-VL's 151657 tokens and ``<|Reward|>``.
VOCAB = 151658
SYSTEM = "You are a helpful assistant."  # Qwen2-VL's default system prompt
#: The chat and vision tokens the prompt is written with: neither an instruction nor a prompt may hold one.
SPECIAL = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>",
           REWARD_TOKEN)  # fmt: skip
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FIELDS = ("{text_prompt}", "{prompt}")


def chat_prompt(text: str, image_tokens: int) -> str:
    """Qwen2-VL's chat format of one image then ``text``, in a user turn after the default system turn, up
    to and with the reward token (what the chat template gives, cut there)."""
    return (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        f"{'<|image_pad|>' * image_tokens}<|vision_end|>{text}{ASK}{REWARD_TOKEN}"
    )


def reward_head(width: int) -> torch.nn.Sequential:
    """The released head's layout (its ``rm_head.{0,3,5}`` keys; index 2 is a dropout, off in eval)."""
    return torch.nn.Sequential(
        torch.nn.Linear(width, 1024),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.05),
        torch.nn.Linear(1024, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 2),
    )


def read_instruction(path: str | Path) -> str:
    """The instruction in ``path``: the ``INSTRUCTION`` string assigned in a Python file (HPSv3's
    ``data_collator_qwen.py``; parsed, not run, the last top-level assignment as Python would leave it), or a
    text file's whole content. A ValueError naming the file otherwise."""
    import ast

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(
            f"reward.kwargs.instruction_file={str(path)!r} cannot be read ({e}): give HPSv3's "
            "hpsv3/dataset/data_collator_qwen.py, or a file holding its instruction"
        ) from None
    if path.suffix != ".py":
        return text
    found = [
        node.value.value
        for node in ast.parse(text).body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "INSTRUCTION" for t in node.targets)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    ]
    if not found:
        raise ValueError(
            f"reward.kwargs.instruction_file={str(path)!r} assigns no INSTRUCTION string at its top level: give "
            "HPSv3's hpsv3/dataset/data_collator_qwen.py, or a text file holding the instruction"
        )
    return found[-1]


def _instruction_problems(instruction, instruction_file) -> list[str]:
    where = (
        "HPSv3's instruction is the INSTRUCTION string of its hpsv3/dataset/data_collator_qwen.py, which this "
        "package does not ship"
    )
    if instruction is None and instruction_file is None:
        return [
            f"reward hpsv3 needs its instruction: {where}; save it to a file and set "
            "reward.kwargs.instruction_file=FILE (or give it as reward.kwargs.instruction)"
        ]
    if instruction is not None and instruction_file is not None:
        return ["reward.kwargs.instruction and reward.kwargs.instruction_file both given: keep one"]
    if instruction is not None and not isinstance(instruction, str):
        return [f"reward.kwargs.instruction={instruction!r} must be a string ({where})"]
    if instruction is not None:
        return _text_problems(instruction, "reward.kwargs.instruction")
    try:
        text = read_instruction(instruction_file)
    except ValueError as e:
        return [str(e)]
    return _text_problems(text, f"reward.kwargs.instruction_file={str(instruction_file)!r}")


def _text_problems(text: str, what: str) -> list[str]:
    """An instruction must hold one of {text_prompt} / {prompt}, where each image's prompt goes, and none of
    the chat's special tokens."""
    if tokens := [t for t in SPECIAL if t in text]:
        return [f"{what} holds the special tokens {tokens}, which the chat places itself: remove them"]
    held = [f for f in _FIELDS if f in text]
    if len(held) != 1:
        return [
            f"{what} must contain exactly one of {{text_prompt}} (HPSv3's own) or {{prompt}}, where each "
            f"image's prompt goes; it holds {held or 'neither'}"
        ]
    try:
        _fill(text, "")
    except (IndexError, KeyError, ValueError) as e:
        return [
            f"{what} has a format field other than {held[0]} ({e}): write a literal brace as {{{{ or }}}}"
        ]
    return []


def _fill(text: str, prompt: str) -> str:
    return text.format(text_prompt=prompt) if "{text_prompt}" in text else text.format(prompt=prompt)


def _problems(
    checkpoint=None,
    instruction=None,
    instruction_file=None,
    dtype="bfloat16",
    max_batch=8,
    pixels=PIXELS,
    **_,
) -> list[str]:
    """What is wrong with the kwargs, found without loading weights (``validate``)."""
    out = [] if dtype in _DTYPES else [f"reward.kwargs.dtype={dtype!r} is not one of {sorted(_DTYPES)}"]
    if checkpoint is None:
        out.append(
            f"reward hpsv3 needs reward.kwargs.checkpoint: the released HPSv3.safetensors (`hf download "
            f"{CHECKPOINT_EXAMPLE}`)"
        )
    return (
        out
        + _instruction_problems(instruction, instruction_file)
        + count_problems(max_batch=max_batch, pixels=pixels)
    )


@register("hpsv3")
class HPSv3:
    """HPSv3, the human-preference score of a Qwen2-VL-7B reward model: the mean its head gives at the
    ``<|Reward|>`` token after the image and the instruction with the prompt; higher is better, about 10
    for current models (see the module docstring).

    kwargs: ``checkpoint`` (the released ``HPSv3.safetensors``: required), ``instruction_file`` (a file
    holding HPSv3's instruction, with ``{text_prompt}``; or the text itself as ``instruction``: required,
    not shipped), ``model`` (folder or cached hub id of Qwen2-VL-7B-Instruct, for its config, tokenizer and
    image processor; default Qwen/Qwen2-VL-7B-Instruct), ``processor`` (default the model's), ``device``
    (default: the images'), ``dtype`` (bfloat16), ``max_batch`` (images per forward pass, 8), ``pixels``
    (each image's area, 200704 as trained).
    """

    check = staticmethod(_problems)

    def __init__(
        self,
        checkpoint: str | None = None,
        instruction: str | None = None,
        instruction_file: str | None = None,
        model: str = EXAMPLE,
        processor: str | None = None,
        device: str | None = None,
        dtype: str = "bfloat16",
        max_batch: int = 8,
        pixels: int = PIXELS,
    ):
        problems = _problems(checkpoint, instruction, instruction_file, dtype, max_batch, pixels)
        if problems:
            raise ValueError("; ".join(problems))
        if instruction_file is not None:
            instruction = read_instruction(instruction_file)
        self.instruction, self.max_batch, self.pixels = instruction, max_batch, pixels
        self.device = torch.device(device) if device else None
        self._placed: torch.device | None = None
        self.estimating = building_architectures()  # (densegrpo-fast memory: see the module docstring)
        config = _config(str(model))
        if self.estimating:
            from transformers import Qwen2VLModel

            config.text_config.vocab_size = VOCAB
            width = config.text_config.hidden_size
            self.model = build_architecture(lambda: Qwen2VLModel(config), _DTYPES[dtype])
            self.head = build_architecture(lambda: reward_head(width), torch.float32)
            return
        import transformers
        from packaging.version import Version
        from transformers import AutoImageProcessor, AutoTokenizer

        if Version(transformers.__version__) < Version("4.52"):  # (Qwen2-VL's model holding its LM)
            raise ValueError(
                f"reward hpsv3 needs transformers >= 4.52 (Qwen2-VL's current layout); transformers "
                f"{transformers.__version__} is installed: pip install -U 'transformers>=4.52' (keep your torch)"
            )
        source = str(processor or model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            self.image_processor = AutoImageProcessor.from_pretrained(source, local_files_only=True)
        except OSError as e:
            raise _missing("processor", source, EXAMPLE, e) from None
        self.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
        self.reward_id = self.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        self.image_token = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        if self.image_token in (None, self.tokenizer.unk_token_id):
            raise ValueError(
                f"reward.kwargs.processor={source!r}: its tokenizer lacks Qwen2-VL's <|image_pad|>: give the folder "
                f"of Qwen2-VL-7B-Instruct (`hf download {EXAMPLE}`)"
            )
        self.merge = int(getattr(self.image_processor, "merge_size", 2)) ** 2
        self.factor = int(getattr(self.image_processor, "patch_size", 14)) * int(
            getattr(self.image_processor, "merge_size", 2)
        )
        config.text_config.vocab_size = len(self.tokenizer)
        self.model, self.head = _load(config, Path(checkpoint), _DTYPES[dtype], source)

    #: What the memory estimate says of it (see the module docstring).
    estimate_note = (
        "its weights are counted, not its activations (a forward of max_batch images without gradients): its "
        "images are prepared on the host, which fake tensors cannot do"
    )

    def _inputs(self, images: torch.Tensor, prompts: list[str], device: torch.device) -> dict:
        """One chunk's inputs: the images resized as HPSv3 resizes them, their pixels and grid from the image
        processor, the chat prompts with each image's tokens, padded on the right, and every token's 1-D
        position on the three rotary axes."""
        for p in prompts:
            if tokens := [t for t in SPECIAL if t in p]:
                raise ValueError(
                    f"prompt {p!r} holds the special tokens {tokens}, which HPSv3's chat places itself (its score "
                    f"is read at the only {REWARD_TOKEN}, after the only image): remove them from the prompt"
                )
        pixels = self.image_processor(images=self._resized(images), do_resize=False, return_tensors="pt")
        grid = pixels["image_grid_thw"]
        texts = [
            chat_prompt(_fill(self.instruction, p), int(g.prod()) // self.merge)
            for p, g in zip(prompts, grid, strict=True)
        ]
        tokens = self.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        ids, mask = tokens.input_ids, tokens.attention_mask
        position = torch.arange(ids.shape[1]).expand(3, len(texts), -1)
        return {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "position_ids": position.to(device),
            "pixel_values": pixels["pixel_values"].to(device, self.model.dtype),
            "image_grid_thw": grid.to(device),
        }

    def _resized(self, images: torch.Tensor) -> list:
        """Each image as uint8, resized with PIL's bicubic filter to Qwen2-VL's ``smart_resize`` of its size
        with ``pixels`` as both bounds (HPSv3's own resize)."""
        from PIL import Image

        out = []
        for image in to_uint8(images).permute(0, 2, 3, 1).numpy():
            h, w = image.shape[:2]
            rh, rw = _smart_resize(h, w, self.factor, self.pixels)
            out.append(Image.fromarray(image).resize((rw, rh), Image.BICUBIC))
        return out

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        if self.estimating:  # (fake weights: nothing to score with)
            return images.new_zeros(len(prompts), dtype=torch.float32)
        device = place(self, images, self.model, self.head)
        out = []
        for s in range(0, len(prompts), self.max_batch):
            chunk = self._inputs(images[s : s + self.max_batch], prompts[s : s + self.max_batch], device)
            hidden = self.model(**chunk, use_cache=False).last_hidden_state
            last = chunk["attention_mask"].sum(1) - 1  # (right-padded: each row's reward token)
            out.append(self.head(hidden[torch.arange(len(last), device=device), last].float())[:, 0])
        return torch.cat(out).to(images.device)


def _smart_resize(h: int, w: int, factor: int, pixels: int) -> tuple[int, int]:
    """Qwen2-VL's ``smart_resize`` (transformers' own) with ``pixels`` as its minimum and maximum."""
    try:  # (transformers 5: the PIL processor's module imports without torchvision)
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
    return smart_resize(h, w, factor=factor, min_pixels=pixels, max_pixels=pixels)


def _config(model: str):
    """The ``Qwen2VLConfig`` of ``model`` (a folder or a cached hub id), or Qwen2-VL-7B's built-in one for
    the default id when it is not on disk (within the memory estimate, noted as stood in for)."""
    from transformers import Qwen2VLConfig

    from densegrpo_fast.policies.architectures import QWEN2_VL_7B

    try:
        config = Qwen2VLConfig.from_pretrained(model, local_files_only=True)
    except OSError as e:
        if model != EXAMPLE or not _stand_in(model):
            raise _missing("model", model, EXAMPLE, e) from None
        return Qwen2VLConfig(**QWEN2_VL_7B)
    if config.model_type != "qwen2_vl":
        raise ValueError(
            f"reward.kwargs.model={model!r} is a {config.model_type!r} checkpoint: HPSv3 is a Qwen2-VL-7B-Instruct "
            f"(`hf download {EXAMPLE}`)"
        )
    return config


def _renamed(key: str) -> str | None:
    """A checkpoint key's name in (Qwen2VLModel, head) terms: ``model.`` / ``visual.`` (transformers 4.45's
    layout, as released) or ``model.language_model.`` / ``model.visual.`` (later ones); None for the LM
    head, which the score does not use."""
    if key.startswith("rm_head."):
        return "head." + key[len("rm_head.") :]
    if key.startswith("lm_head."):
        return None
    for old, new in (("model.visual.", "visual."), ("model.language_model.", "language_model."),
                     ("visual.", "visual."), ("model.", "language_model.")):  # fmt: skip
        if key.startswith(old):
            return "model." + new + key[len(old) :]
    return "model." + key  # (unknown: reported as unexpected)


def _load(config, checkpoint: Path, dtype: torch.dtype, source: str):
    """The backbone (``Qwen2VLModel``, in ``dtype``) and the head (float32) with the checkpoint's weights:
    their parameters made on the meta device (accelerate's ``init_empty_weights``; the buffers, e.g. the
    rotary frequencies, made as usual), then the file's tensors assigned one at a time, so its 16 GB are in
    memory once."""
    from accelerate import init_empty_weights  # (peft's dependency)
    from safetensors import SafetensorError, safe_open
    from transformers import Qwen2VLModel

    if not checkpoint.is_file():
        raise ValueError(
            f"reward.kwargs.checkpoint={str(checkpoint)!r} does not exist: download the released weights where "
            f"there is network, `hf download {CHECKPOINT_EXAMPLE} --local-dir DIR`, and give DIR/HPSv3.safetensors"
        )
    with init_empty_weights(include_buffers=False), quiet_loading():
        parts = torch.nn.ModuleDict(
            {"model": Qwen2VLModel(config), "head": reward_head(config.text_config.hidden_size)}
        )
    want = {n: tuple(p.shape) for n, p in parts.named_parameters()}
    state = {}
    try:
        with safe_open(str(checkpoint), framework="pt") as f:
            names = {_renamed(key): key for key in f.keys()}  # noqa: SIM118 (a safe_open handle is no dict)
            names.pop(None, None)
            # (the names and shapes before any tensor is read: a wrong 16 GB file is refused at once)
            missing, unexpected = sorted(want.keys() - names.keys()), sorted(names.keys() - want.keys())
            if missing or unexpected:
                raise ValueError(
                    f"reward.kwargs.checkpoint={str(checkpoint)!r} is not an HPSv3 checkpoint of the Qwen2-VL at "
                    f"reward.kwargs.model: {len(missing)} weights missing (e.g. {missing[:3]}), {len(unexpected)} "
                    f"unexpected (e.g. {unexpected[:3]}); give the released HPSv3.safetensors"
                )
            shapes = [(n, tuple(f.get_slice(k).get_shape()), want[n]) for n, k in names.items()
                      if tuple(f.get_slice(k).get_shape()) != want[n]]  # fmt: skip
            if not shapes:
                for name, key in names.items():
                    state[name] = f.get_tensor(key).to(torch.float32 if name.startswith("head.") else dtype)
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"reward.kwargs.checkpoint={str(checkpoint)!r} is not a readable safetensors file ({e}): give the "
            "released HPSv3.safetensors"
        ) from None
    if shapes:
        name, got, wanted = shapes[0]
        rows = " (the embedding: its tokenizer, with <|Reward|> added, has another vocabulary size)"
        raise ValueError(
            f"reward.kwargs.checkpoint={str(checkpoint)!r}: {name} is {got} there, {wanted} for the Qwen2-VL at "
            f"{source!r}{rows if 'embed_tokens' in name else ''}; give Qwen2-VL-7B-Instruct's folder as "
            "reward.kwargs.model"
        )
    parts.load_state_dict(state, assign=True)
    for module in parts.values():
        module.requires_grad_(False).eval()
    return parts["model"], parts["head"]
