"""CLIP-based rewards: PickScore, CLIP score and the LAION aesthetic predictor, scored on tensors.

All three share :class:`ClipEncoder`: a transformers ``CLIPModel`` loaded offline from a local folder (or
the user's Hugging Face cache) plus the processor's tokenizer and image settings. Images are preprocessed
on their own device by :func:`clip_preprocess` (no PIL round trip): resize the shortest side to the
processor's size with bicubic + antialias, center crop, normalise with the processor's mean and std.

Measured difference to transformers' PIL ``CLIPImageProcessor`` on the same uint8 images (512 x 512,
300 x 517, 1024 x 768 down to 224; 64 x 64 up to 224; noise and smooth images with sharp edges): one or two
8-bit levels on a few per cent of the values at most (a review measured 3407 of 150528 values one level off
and 8 two levels off on a smooth 512 x 512 image), where PIL's fixed-point arithmetic rounds exact halves the
other way, and ~1e-5 on average in normalised units (a level is 1/255/std ~ 0.015 there).
tests/test_rewards_clip.py pins this bound.

Text embeddings are cached per prompt string (dense rewards score each prompt T+1 times per trajectory), in
an LRU of ``text_cache_size`` prompts on the model's device.

Weights (the real ones; pass their local folders, or the hub ids when they are in the HF cache):

- PickScore: ``model=yuvalkirstain/PickScore_v1``, ``processor=laion/CLIP-ViT-H-14-laion2B-s32B-b79K``.
- aesthetic: ``model=openai/clip-vit-large-patch14`` and ``head=`` the LAION improved-aesthetic-predictor
  state dict (``sac+logos+ava1-l14-linearMSE.pth``) or its safetensors conversion.
- CLIP score: any CLIP, e.g. ``openai/clip-vit-large-patch14``.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections import OrderedDict
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from densegrpo_fast.rewards import count_problems, register
from densegrpo_fast.rewards.images import check_batch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ClipImageSpec:
    """The processor settings the on-device preprocessing needs (CLIP's: shortest side, crop, mean, std)."""

    shortest_edge: int
    crop_height: int
    crop_width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def clip_preprocess(
    images: torch.Tensor, spec: ClipImageSpec, *, torchvision_crop: bool = False
) -> torch.Tensor:
    """CLIP's image preprocessing on tensors, on the images' device.

    Same geometry and resampling as transformers' PIL ``CLIPImageProcessor``: the shortest side goes to
    ``spec.shortest_edge`` and the long side to ``int(shortest_edge * long / short)``; bicubic with
    antialias (PyTorch's antialiased bicubic uses PIL's kernel, a = -0.5), done as PIL does it: a
    horizontal pass, then a vertical one, each clamped to [0, 1] and rounded to 8 bits (PIL stores every
    pass as uint8; without the intermediate clamp, bicubic overshoot on sharp edges differs by up to 20/255);
    center crop with the top-left corner at ``(size - crop) // 2`` (``torchvision_crop``: at
    ``int(round((size - crop) / 2))``, as torchvision's ``CenterCrop`` places it: one pixel further when
    ``size - crop`` is 3 modulo 4); then ``(x - mean) / std``.

    One known difference: for some resizes that shrink the height more than the width (portrait images,
    never square ones), Pillow 13 runs the vertical pass first; its rule is not reproduced here. There a
    pixel near a sharp edge differs by up to 16 levels on noise images, 2 on smooth ones (measured on
    90 x 40 -> 72 x 32); landscape and square images are as above.

    Shape: images [B, 3, H, W] float in [0, 1] -> [B, 3, crop_height, crop_width] float32.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images of shape {tuple(images.shape)}: a reward takes [B, 3, H, W] RGB in [0, 1]")
    x = images.float()
    h, w = x.shape[-2:]
    s = spec.shortest_edge
    new_h, new_w = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
    if new_h < spec.crop_height or new_w < spec.crop_width:
        raise ValueError(
            f"the processor resizes the shortest side to {s} px, smaller than its crop "
            f"{spec.crop_height}x{spec.crop_width}: use a processor whose crop fits inside its resize"
        )
    for size in ((h, new_w), (new_h, new_w)):  # horizontal pass, then vertical, as PIL resamples
        if size != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0.0, 1.0).mul(255).round().div(255)
    if torchvision_crop:
        top, left = int(round((new_h - spec.crop_height) / 2)), int(round((new_w - spec.crop_width) / 2))
    else:
        top, left = (new_h - spec.crop_height) // 2, (new_w - spec.crop_width) // 2
    x = x[..., top : top + spec.crop_height, left : left + spec.crop_width]
    mean = torch.tensor(spec.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


#: CLIP's own image settings (OpenAI's and OpenCLIP's ViT-L/14 and ViT-H/14 processors).
CLIP_IMAGE = ClipImageSpec(
    224, 224, 224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
)

_TEXT = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
#: OpenAI's CLIP ViT-L/14 (``openai/clip-vit-large-patch14``: 427.6 M parameters), a transformers config.
VIT_L_14 = dict(
    text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     hidden_act="quick_gelu", **_TEXT),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="quick_gelu"),
    projection_dim=768,
)  # fmt: skip
#: OpenCLIP's ViT-H/14 (986.1 M parameters): LAION's CLIP-H, PickScore's and HPS's architecture.
VIT_H_14 = dict(
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     hidden_act="gelu", **_TEXT),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu"),
    projection_dim=1024,
)  # fmt: skip
#: The hub ids the CLIP rewards name by default, and their architectures.
BUILT_IN = {
    "yuvalkirstain/PickScore_v1": VIT_H_14,
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": VIT_H_14,
    "openai/clip-vit-large-patch14": VIT_L_14,
}

# (build, names stood in) while ``architectures_only`` is active
_ARCHITECTURES_ONLY: ContextVar[tuple[Callable, list[str]] | None] = ContextVar(
    "architectures_only", default=None
)


@contextlib.contextmanager
def architectures_only(build: Callable[[Callable[[], torch.nn.Module], torch.dtype], torch.nn.Module]):
    """Within: the CLIP rewards are built without reading any weights, for ``densegrpo-fast memory``.

    - Each CLIP model comes from its config: the ``config.json`` of its folder or cached hub id, or, for a
      hub id of :data:`BUILT_IN` not on disk, the built-in architecture.
    - ``build(constructor, dtype)`` makes the model; the estimate gives it fake weights.
    - The tokenizer and image settings are the processor folder's. For a built-in id not on disk they are a
      stand-in tokenizer of CLIP's 77 tokens and CLIP's 224 px settings.
    - HPS reads no checkpoint, and an aesthetic head is a fresh one (nothing is read).
    - ImageReward builds its checkpoint's architecture (``med_config.json`` and the weights' shapes, the file
      mapped, not read), or the released one when the checkpoint is not on disk; BERT's tokenizer is stood
      in for when ``bert-base-uncased`` is not on disk (prompts are padded to 35 tokens either way).

    Yields the list of what was stood in for (the hub ids and heads not on disk). A reward built this way
    scores nothing meaningful."""
    used: list[str] = []
    token = _ARCHITECTURES_ONLY.set((build, used))
    try:
        yield used
    finally:
        _ARCHITECTURES_ONLY.reset(token)


def building_architectures() -> bool:
    """Whether :func:`architectures_only` is active."""
    return _ARCHITECTURES_ONLY.get() is not None


def _stand_in(what: str) -> bool:
    """Within :func:`architectures_only`: note ``what`` as stood in for and return True; else False (the
    caller raises its error)."""
    active = _ARCHITECTURES_ONLY.get()
    if active is not None:
        active[1].append(what)
    return active is not None


def clip_config(name: str, what: str, example: str):
    """The transformers ``CLIPConfig`` of ``name`` (a folder or a cached hub id); within
    :func:`architectures_only`, the built-in one of a default hub id that is not on disk."""
    from transformers import CLIPConfig

    try:
        return CLIPConfig.from_pretrained(str(name), local_files_only=True)
    except OSError as e:
        if str(name) not in BUILT_IN or not _stand_in(str(name)):
            raise _missing(what, str(name), example, e) from None
        return CLIPConfig(**BUILT_IN[str(name)])


def build_architecture(constructor: Callable[[], torch.nn.Module], dtype: torch.dtype) -> torch.nn.Module:
    """``constructor()`` made by :func:`architectures_only`'s ``build``, in ``dtype``."""
    active = _ARCHITECTURES_ONLY.get()
    if active is None:
        raise RuntimeError("build_architecture is only for use within architectures_only")
    return active[0](constructor, dtype)


def _field(obj, key: str):
    """``obj[key]`` for a transformers 4 size dict, ``obj.key`` for a transformers 5 SizeDict."""
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


@contextlib.contextmanager
def quiet_loading():
    """Within: transformers draws no "Loading weights" bar (a reward model is built at every held-out
    evaluation, in the middle of the training's own progress bar)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _download(path: str, example: str) -> str:
    """What to download: ``path`` itself when it is a hub id (not a local path), else the ``example``."""
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not Path(path).exists()
    return path if hub_id and not example.startswith(path) else example


def _missing(what: str, path: str, example: str, error: Exception) -> ValueError:
    example = _download(path, example)
    return ValueError(
        f"reward.kwargs.{what}={path!r}: no {what} found there, nor in the Hugging Face cache (rewards load "
        f"offline, local_files_only). Fix: download it once where there is network, e.g. `hf download {example} "
        f"--local-dir DIR`, and set reward.kwargs.{what}=DIR. ({type(error).__name__}: {error})"
    )


def _image_spec(ip, processor) -> ClipImageSpec:
    """What :func:`clip_preprocess` needs from a transformers CLIP image processor."""
    short = _field(ip.size, "shortest_edge")
    if not short:
        raise ValueError(
            f"reward.kwargs.processor={processor!r}: its image size {ip.size} has no shortest_edge; CLIP "
            "processors resize the shortest side (give the processor folder that came with the model)"
        )
    return ClipImageSpec(
        int(short),
        int(_field(ip.crop_size, "height")),
        int(_field(ip.crop_size, "width")),
        tuple(float(v) for v in ip.image_mean),
        tuple(float(v) for v in ip.image_std),
    )


def _embedding(out) -> torch.Tensor:
    """The projected embedding from ``get_*_features``: a tensor in transformers 4, an output in 5."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def load_processor(processor: str, *, text: bool, image: bool, example: str, what: str = "processor"):
    """The tokenizer (``text``) and the image settings (``image``) of a CLIP processor folder or cached hub
    id, each None when not asked for. Within :func:`architectures_only`, a default hub id that is not on disk
    gets a stand-in tokenizer of CLIP's 77 tokens and CLIP's own image settings."""
    from transformers import AutoImageProcessor, AutoTokenizer

    try:
        spec = None
        if image:
            spec = _image_spec(
                AutoImageProcessor.from_pretrained(str(processor), local_files_only=True), processor
            )
        tokenizer = AutoTokenizer.from_pretrained(str(processor), local_files_only=True) if text else None
    except OSError as e:
        if str(processor) not in BUILT_IN or not _stand_in(f"{processor} (processor)"):
            raise _missing(what, str(processor), example, e) from None
        from densegrpo_fast.policies.architectures import clip_tokenizer

        return (clip_tokenizer() if text else None), (CLIP_IMAGE if image else None)
    return tokenizer, spec


def check_tokenizer(tokenizer, vocab_size: int, what: str, processor: str, example: str) -> None:
    """A CLIP tokenizer has exactly the model's vocabulary: transformers builds a near-empty one from a
    folder without ``vocab.json`` / ``merges.txt`` (every prompt then gets the same tokens), and a larger one
    would index past the embeddings."""
    if len(tokenizer) != vocab_size:
        raise ValueError(
            f"reward.kwargs.{what}={processor!r}: its tokenizer has {len(tokenizer)} tokens, the CLIP model's "
            f"vocabulary {vocab_size} (the folder lacks the tokenizer's files, or belongs to another model). "
            f"Fix: `hf download {_download(processor, example)}` (vocab.json and merges.txt are needed), or "
            "give the processor folder that came with the model"
        )


def _encoder_problems(dtype="float32", max_batch=64, text_cache_size=4096, **_) -> list[str]:
    """What is wrong with the kwargs every CLIP reward passes to :class:`ClipEncoder` (the rewards' ``check``:
    ``validate`` finds it without loading weights)."""
    out = [] if dtype in _DTYPES else [f"reward.kwargs.dtype={dtype!r} is not one of {sorted(_DTYPES)}"]
    return out + count_problems(max_batch=max_batch, text_cache_size=text_cache_size)


class ClipEncoder:
    """A CLIP model with on-device image preprocessing and a per-prompt text-embedding cache.

    ``model``: folder (or cached hub id) of a transformers ``CLIPModel``, or the model itself (built from
    other weights, as HPS's are). ``processor``: folder of its processor (tokenizer +
    ``preprocessor_config.json``), default the model's folder. ``device``: where the model runs; ``None``
    follows the images (the model moves on the first call). ``dtype``: float32, bfloat16 or float16 for the
    model's weights (preprocessing and similarities stay float32). ``max_batch``: images per forward pass.

    A reward whose model was trained with other preprocessing (HPS) gives its own: ``tokenizer`` (loaded),
    ``preprocess`` (images [B, 3, H, W] in [0, 1] -> normalised pixels; default :func:`clip_preprocess` with
    the processor's settings) and ``clean`` (applied to each prompt before tokenising; the cache keeps the
    prompt as given).
    """

    def __init__(
        self,
        model: str | torch.nn.Module,
        processor: str | None = None,
        *,
        device: str | None = None,
        dtype: str = "float32",
        max_batch: int = 64,
        text_cache_size: int = 4096,
        need_text: bool = True,
        example: str = "openai/clip-vit-large-patch14",
        tokenizer=None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        clean: Callable[[str], str] | None = None,
    ):
        from transformers import CLIPModel

        problems = _encoder_problems(dtype=dtype, max_batch=max_batch, text_cache_size=text_cache_size)
        if problems:
            raise ValueError("; ".join(problems))
        if isinstance(model, torch.nn.Module):
            self.model = model
        elif building_architectures():  # (densegrpo-fast memory: no weights read)
            config = clip_config(str(model), "model", example)
            self.model = build_architecture(lambda: CLIPModel(config), _DTYPES[dtype])
        else:
            try:
                with quiet_loading():
                    self.model = CLIPModel.from_pretrained(str(model), local_files_only=True)
            except OSError as e:
                raise _missing("model", str(model), example, e) from None
        text = need_text and tokenizer is None
        self.tokenizer, self.spec = tokenizer, None
        if text or preprocess is None:
            processor = processor or (model if isinstance(model, str) else None)
            if processor is None:
                raise ValueError("ClipEncoder: a model given as a module needs a processor folder, or a "
                                 "tokenizer and a preprocess function")  # fmt: skip
            loaded, self.spec = load_processor(
                processor, text=text, image=preprocess is None, example=example
            )
            self.tokenizer = loaded if text else tokenizer
            if text and not building_architectures():
                vocab = int(self.model.config.text_config.vocab_size)
                check_tokenizer(self.tokenizer, vocab, "processor", str(processor), example)
        self.preprocess = preprocess or functools.partial(clip_preprocess, spec=self.spec)  # (no cycle)
        self.clean = clean
        self.model.requires_grad_(False).eval()
        #: the model's logit scale exp'd in float32, read before any cast: in bfloat16 PickScore's ln 100 rounds
        #: to 4.594, and every score would come out 1.1 % low (None when building with fake weights)
        self.logit_scale: torch.Tensor | None = None
        if not building_architectures():  # (built in its dtype there; a fake model cannot be moved)
            if isinstance(getattr(self.model, "logit_scale", None), torch.Tensor):
                self.logit_scale = self.model.logit_scale.detach().float().exp().cpu()
            self.model.to(_DTYPES[dtype])
        self.dtype = _DTYPES[dtype]
        self.device = torch.device(device) if device else None
        self._placed: torch.device | None = None
        self.max_batch = max_batch
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = text_cache_size
        self.cache_hits = self.cache_misses = 0

    def place(self, images: torch.Tensor) -> torch.device:
        """Moves the model to its device (the images' one when ``device`` is None); returns that device."""
        dev = self.device or images.device
        if dev != self._placed:
            self.model.to(dev)
            self._cache.clear()  # cached embeddings live on the model's device
            self._placed = dev
        return dev

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings. Shape: [B, 3, H, W] in [0, 1] -> [B, D] float32."""
        dev = self.place(images)
        out = []
        for chunk in images.split(self.max_batch):
            pixels = self.preprocess(chunk.to(dev)).to(self.dtype)
            out.append(_embedding(self.model.get_image_features(pixel_values=pixels)).float())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings, from the cache where the prompt was seen. Shape: [B, D] float32."""
        if self.tokenizer is None:
            raise RuntimeError("this ClipEncoder was built with need_text=False")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))  # unique, in order
        self.cache_misses += len(missing)  # prompts encoded
        self.cache_hits += len(prompts) - len(missing)  # rows served without encoding
        for i in range(0, len(missing), self.max_batch):
            batch = missing[i : i + self.max_batch]
            texts = [self.clean(p) for p in batch] if self.clean else batch
            tokens = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.model.device)
            emb = _embedding(self.model.get_text_features(**tokens)).float()
            for p, e in zip(batch, F.normalize(emb, dim=-1), strict=True):
                self._cache[p] = e
        rows = []
        for p in prompts:
            self._cache.move_to_end(p)
            rows.append(self._cache[p])
        out = torch.stack(rows)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out


@register("pickscore")
class PickScore:
    """PickScore (Kirstain et al., 2023): ``logit_scale.exp() * cos(image_emb, text_emb)`` of the PickScore
    CLIP-H, times ``scale``.

    ``scale`` = 1 (default) gives the raw PickScore as papers report it (SD3.5-M ~21.7, Flow-GRPO ~23.3, see
    ALGORITHM.md); Flow-GRPO trains on ``raw / 26`` (``scale: 0.038461538``). GRPO's group normalisation
    makes the scale irrelevant to the advantages except through the ``+ eps`` of the std and in ``multi``.

    kwargs: ``model`` (default ``yuvalkirstain/PickScore_v1``), ``processor`` (default
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``), ``scale``, and :class:`ClipEncoder`'s ``device``, ``dtype``,
    ``max_batch``, ``text_cache_size``.
    """

    check = staticmethod(_encoder_problems)  # (validate: the encoder's kwargs, without weights)

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        scale: float = 1.0,
        device: str | None = None,
        dtype: str = "float32",
        max_batch: int = 64,
        text_cache_size: int = 4096,
    ):
        self.clip = ClipEncoder(
            model,
            processor,
            device=device,
            dtype=dtype,
            max_batch=max_batch,
            text_cache_size=text_cache_size,
            example="yuvalkirstain/PickScore_v1",
        )
        self.scale = float(scale)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        cos = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)  # [B]
        logit_scale = self.clip.logit_scale
        if logit_scale is None:  # (fake weights: the memory estimate)
            logit_scale = self.clip.model.logit_scale.detach().float().exp()
        return (self.scale * logit_scale.to(cos.device) * cos.float()).to(images.device)


@register("clip_score")
class ClipScore:
    """CLIP score: ``scale * cos(image_emb, text_emb)``.

    ``scale`` = 1 (default) is the plain cosine in [-1, 1]; ``scale: 100`` gives the x100 convention of the
    text-to-image literature and torchmetrics' ``CLIPScore`` (which also clamps at 0; this reward does not, so
    negative cosines still rank). kwargs: ``model``, ``processor`` (default: the model's folder), ``scale``,
    and :class:`ClipEncoder`'s ``device``, ``dtype``, ``max_batch``, ``text_cache_size``.
    """

    check = staticmethod(_encoder_problems)  # (validate: the encoder's kwargs, without weights)

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        scale: float = 1.0,
        device: str | None = None,
        dtype: str = "float32",
        max_batch: int = 64,
        text_cache_size: int = 4096,
    ):
        self.clip = ClipEncoder(
            model, processor, device=device, dtype=dtype, max_batch=max_batch, text_cache_size=text_cache_size
        )
        self.scale = float(scale)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        cos = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)
        return (self.scale * cos).to(images.device)


@register("source_similarity")
class SourceSimilarity:
    """How much of an edit's source image the edit keeps: ``scale * cos(CLIP(edit), CLIP(source))``, the
    "CLIP-I" of the editing literature. The prompts must be edits (:class:`~densegrpo_fast.prompts.EditPrompt`);
    the source is taken as the editing policy took it, at the edit's size
    (:func:`~densegrpo_fast.prompts.load_source`). Alone it rewards changing nothing: weigh it beside a reward
    of the instruction (``multi``: a ``vlm_judge`` and this).

    kwargs: ``model`` (default ``openai/clip-vit-large-patch14``), ``processor`` (default: the model's),
    ``scale``, and :class:`ClipEncoder`'s ``device``, ``dtype``, ``max_batch``; ``source_cache_size`` source
    embeddings are kept (each source is embedded once, not once per dense step).
    """

    check = staticmethod(_encoder_problems)  # (validate: the encoder's kwargs, without weights)
    #: It compares each image with its source (densegrpo_fast.prompts.source_blind).
    sees_sources = True

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        scale: float = 1.0,
        device: str | None = None,
        dtype: str = "float32",
        max_batch: int = 64,
        source_cache_size: int = 4096,
    ):
        self.clip = ClipEncoder(
            model, processor, device=device, dtype=dtype, max_batch=max_batch, need_text=False
        )
        self.scale = float(scale)
        self._sources: OrderedDict[tuple[str, int, int], torch.Tensor] = OrderedDict()
        self._cache_size = int(source_cache_size)

    @staticmethod
    def check_prompts(prompts: list[str]) -> list[str]:
        """The prompts this reward cannot score: those without a source image."""
        from densegrpo_fast.prompts import EditPrompt

        return [p for p in prompts if not isinstance(p, EditPrompt)]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from densegrpo_fast.prompts import source_pixels

        check_batch(images, prompts)
        if bad := self.check_prompts(prompts):
            raise ValueError(
                f"reward source_similarity compares each image with its prompt's source image, and the prompt "
                f"{str(bad[0])[:80]!r} has none: train or evaluate on edit records (a .jsonl prompt file with an "
                "'image' per line)"
            )
        height, width = images.shape[-2:]
        keys = [(p.image, height, width) for p in prompts]
        missing = list(dict.fromkeys(k for k in keys if k not in self._sources))
        if missing:
            batch = torch.stack([source_pixels(*k) for k in missing]).to(images.device)
            for k, e in zip(missing, self.clip.image_embeds(batch), strict=True):
                self._sources[k] = e
        sources = []
        for k in keys:
            self._sources.move_to_end(k)
            sources.append(self._sources[k])
        while len(self._sources) > self._cache_size:
            self._sources.popitem(last=False)
        cos = (self.clip.image_embeds(images) * torch.stack(sources).to(images.device)).sum(-1)
        return (self.scale * cos).to(images.device)


def aesthetic_head(in_features: int = 768) -> torch.nn.Module:
    """The LAION improved-aesthetic-predictor MLP: in -> 1024 -> 128 -> 64 -> 16 -> 1, no activations, dropout
    0.2 / 0.2 / 0.1 after the first three layers (inactive in eval). Parameter names ``layers.{0,2,4,6,7}``
    match the released state dict."""
    return torch.nn.Sequential(
        torch.nn.Linear(in_features, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    )


class _AestheticHead(torch.nn.Module):
    def __init__(self, in_features: int):
        super().__init__()
        self.layers = aesthetic_head(in_features)


def load_aesthetic_head(path: str, in_features: int) -> torch.nn.Module:
    """The head's weights from a ``.safetensors`` file or a torch state dict (``torch.load`` with
    ``weights_only=True``: tensors only, no arbitrary objects unpickled)."""
    p = Path(path)
    if building_architectures():  # (densegrpo-fast memory: the head's shapes are enough; nothing is read)
        if not p.is_file():
            _stand_in(f"{path} (aesthetic head)")
        return (
            build_architecture(lambda: _AestheticHead(in_features), torch.float32)
            .requires_grad_(False)
            .eval()
        )
    if not p.is_file():
        raise ValueError(
            f"reward.kwargs.head={path!r}: no such file. Fix: give the LAION aesthetic head "
            "(sac+logos+ava1-l14-linearMSE.pth, from github.com/christophschuhmann/improved-aesthetic-predictor) "
            "or its .safetensors conversion"
        )
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # the weights-only unpickler refuses anything but tensors and containers
            raise ValueError(
                f"reward.kwargs.head={path!r} is not a plain state dict of tensors ({type(e).__name__}: "
                f"{str(e).splitlines()[0]}); it is not loaded with full unpickling because that runs code"
            ) from None
    head = _AestheticHead(in_features)
    expected = set(head.state_dict())
    if not isinstance(state, dict) or set(state) != expected:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"reward.kwargs.head={path!r} holds {found}, not the LAION aesthetic MLP's {sorted(expected)}"
        )
    shape = tuple(state["layers.0.weight"].shape)
    if shape != (1024, in_features):
        raise ValueError(
            f"reward.kwargs.head={path!r}: first layer {shape} does not take the CLIP model's "
            f"{in_features}-d embeddings: the head must match the CLIP (ViT-L/14: 768)"
        )
    head.load_state_dict(state)
    return head.requires_grad_(False).eval()


@register("aesthetic")
class Aesthetic:
    """LAION aesthetic score: the MLP head on the L2-normalised CLIP image embedding (roughly 1..10).

    kwargs: ``head`` (path of the head's weights, required), ``model`` (default
    ``openai/clip-vit-large-patch14``), ``processor`` (default: the model's), and :class:`ClipEncoder`'s
    ``device``, ``dtype``, ``max_batch``. The head runs in float32.
    """

    check = staticmethod(_encoder_problems)  # (validate: the encoder's kwargs, without weights)

    def __init__(
        self,
        head: str,
        model: str = "openai/clip-vit-large-patch14",
        processor: str | None = None,
        device: str | None = None,
        dtype: str = "float32",
        max_batch: int = 64,
    ):
        self.clip = ClipEncoder(
            model, processor, device=device, dtype=dtype, max_batch=max_batch, need_text=False
        )
        self.head = load_aesthetic_head(head, int(self.clip.model.config.projection_dim))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        emb = self.clip.image_embeds(images)  # [B, D]
        self.head.to(emb.device)
        return self.head.layers(emb).squeeze(-1).to(images.device)
