"""HPS v2.1 / v2.0 (Human Preference Score; Wu et al., 2023), scored on tensors.

HPS is OpenCLIP's ViT-H-14 fine-tuned on human preference pairs. The score of an image for a prompt is the
cosine of their embeddings: HPS's own scorer takes the dot product of the two L2-normalised embeddings, with
no logit scale. DanceGRPO and MixGRPO train and evaluate on HPS v2.1.

- **Weights.** The checkpoints (``HPS_v2.1_compressed.pt``, ``HPS_v2_compressed.pt`` in the hub repo
  ``xswu/HPSv2``) are OpenCLIP state dicts. OpenCLIP needs torchvision, whose builds pin one torch each, so
  this module does not use it. :func:`open_clip_to_transformers` renames the weights to a transformers
  ``CLIPModel`` of the same architecture; the hub's ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` is that very
  conversion of OpenCLIP's ViT-H-14. Its config and tokenizer come from ``base``; the weights of ``base``
  are not read. The checkpoint loads with ``torch.load(weights_only=True)``: tensors only, no code.
- **Images: HPS's validation transform, not CLIP's.** HPS's scorer builds it with ``light_augmentation``:
  the image as a float tensor, its longest side resized to 224 (bicubic, antialiased, on floats: no clamp,
  no 8-bit rounding), zero-padded to 224 x 224 (the padding split as ``pad // 2`` before), then OpenAI's
  mean and std. :func:`hps_preprocess` does the same on the images' device.
- **Prompts: OpenCLIP's text cleaning.** Its tokenizer first runs ``ftfy.fix_text`` (curly quotes
  straightened, broken encodings repaired) and ``html.unescape`` twice, which transformers' CLIP tokenizer
  does not. :func:`open_clip_clean` does it before tokenising; it needs ``ftfy``
  (``pip install 'densegrpo-fast[hps]'``).

Checked (tests/test_rewards_hps.py): on tiny random weights, the reward equals an OpenCLIP-layout forward
written in the test, fed by :func:`hps_preprocess_reference` (HPS's transform transcribed step by step)
and OpenCLIP's tokens. In a scratch
environment with the real ``open_clip`` 3.3.0 (torchvision stubbed: its model code does not use it), it
equals the real ViT-H-14 on random weights, its tokenizer included (benchmarks/RESULTS.md, "HPS v2.1").
"""

from __future__ import annotations

import functools
import html
import re
from pathlib import Path

import torch

from densegrpo_fast.rewards import register
from densegrpo_fast.rewards.checkpoints import from_state, load_tensors, resolve_file
from densegrpo_fast.rewards.clip import (
    _DTYPES,
    CLIP_IMAGE,
    VIT_H_14,
    ClipEncoder,
    build_architecture,
    building_architectures,
    check_tokenizer,
    clip_config,
    load_processor,
)
from densegrpo_fast.rewards.images import check_batch

#: HPS's versions (its own names; "v2" for v2.0 too) and their files in the hub repo.
FILES = {"v2.1": "HPS_v2.1_compressed.pt", "v2.0": "HPS_v2_compressed.pt", "v2": "HPS_v2_compressed.pt"}
SIZE = 224
_BASE_EXAMPLE = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K --include '*.json' --include '*.txt'"
_HUB = "xswu/HPSv2"

# OpenCLIP name -> transformers CLIPModel name, outside the residual blocks; "T" marks a projection matrix,
# which OpenCLIP applies as x @ P and transformers as a Linear (x @ W.T): W = P.T.
_TOP = {
    "logit_scale": "logit_scale",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "text_projection": "T:text_projection.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj": "T:visual_projection.weight",
}
# Inside block i of a tower: OpenCLIP suffix -> transformers suffix (in_proj is split into q, k, v below).
_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_BLOCK_KEY = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_IN_PROJ = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")


def open_clip_to_transformers(
    state: dict[str, torch.Tensor], where: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """An OpenCLIP CLIP state dict (ViT image tower with a ``proj`` matrix, the classic text tower: ViT-B/L/H,
    as HPS uses) renamed to transformers' ``CLIPModel``: the fused attention ``in_proj`` is split into
    ``q_proj``, ``k_proj``, ``v_proj`` (in that order, as ``nn.MultiheadAttention`` packs them) and the two
    projection matrices are transposed. Tensors are shared, not copied, where no transpose or split is needed.

    Raises ValueError naming the keys it does not know (another architecture: attention pooling, layer
    scale, a timm or HF text tower), so nothing is silently left at random init."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        if key == "attn_mask" or key.endswith(".attn_mask"):  # a buffer older OpenCLIP versions saved
            continue
        if key in _TOP:
            name = _TOP[key]
            if name.startswith("T:"):
                out[name[2:]] = value.t().contiguous()
            else:
                out[name] = value
            continue
        m = _IN_PROJ.match(key)
        if m:
            tower = "vision_model" if m[1] else "text_model"
            for part, chunk in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"{tower}.encoder.layers.{m[2]}.self_attn.{part}_proj.{m[3]}"] = chunk.contiguous()
            continue
        m = _BLOCK_KEY.match(key)
        if m and m[3] in _BLOCK:
            tower = "vision_model" if m[1] else "text_model"
            out[f"{tower}.encoder.layers.{m[2]}.{_BLOCK[m[3]]}.{m[4]}"] = value
            continue
        unknown.append(key)
    if unknown:
        raise ValueError(
            f"{where}: {len(unknown)} weights of an OpenCLIP architecture this conversion does not cover, e.g. "
            f"{unknown[:5]}: only plain ViT CLIPs (ViT-B/L/H-14 with a projection matrix) convert. Fix: give "
            f"an HPS v2 / v2.1 checkpoint ({FILES['v2.1']} from {_HUB})"
        )
    return out


def hps_preprocess(images: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """HPS's validation transform on tensors, on the images' device: the longest side to ``size`` (the other
    to ``round(side * size / longest)``), bicubic with antialias on the float images, zero padding to
    ``size`` x ``size`` (``pad // 2`` on the left and top), then OpenAI's mean and std.

    One deviation: HPS's ``ResizeMaxSize`` neither resizes nor pads an image whose longest side is already
    ``size``, so a non-square one reaches the model unpadded and is refused; here it is padded.

    Shape: images [B, 3, H, W] float in [0, 1] -> [B, 3, size, size] float32."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images of shape {tuple(images.shape)}: a reward takes [B, 3, H, W] RGB in [0, 1]")
    x = images.float()
    h, w = x.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = round(h * scale), round(w * scale)  # (HPS's arithmetic, to its rounding)
    if (new_h, new_w) != (h, w):
        x = torch.nn.functional.interpolate(
            x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False
        )
    pad_h, pad_w = size - new_h, size - new_w
    x = torch.nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    mean = torch.tensor(CLIP_IMAGE.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_IMAGE.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def hps_preprocess_reference(images: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """:func:`hps_preprocess`'s spec: HPS's validation transform transcribed step by step, image by image, as
    torchvision runs it on a float tensor (``ToTensor``; ``ResizeMaxSize``: ``scale = size / max(h, w)``,
    bicubic with antialias to ``round(side * scale)``, padding ``[left, top, right, bottom]`` with zeros;
    ``MaskAwareNormalize`` with OpenAI's mean and std). The tests and benchmarks/hps_vs_open_clip.py feed
    it to the oracles."""
    mean = torch.tensor(CLIP_IMAGE.mean).view(3, 1, 1)
    std = torch.tensor(CLIP_IMAGE.std).view(3, 1, 1)
    out = []
    for img in images.float().cpu():
        height, width = img.shape[1:]
        scale = size / float(max(height, width))
        new_size = tuple(round(dim * scale) for dim in (height, width))
        img = torch.nn.functional.interpolate(
            img[None], size=new_size, mode="bicubic", align_corners=False, antialias=True
        )[0]
        pad_h, pad_w = size - new_size[0], size - new_size[1]
        left, top, right, bottom = pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2
        img = torch.nn.functional.pad(img, (left, right, top, bottom), value=0.0)
        out.append((img - mean) / std)
    return torch.stack(out)


def open_clip_clean(text: str) -> str:
    """OpenCLIP's text cleaning before its tokenizer: ``ftfy.fix_text``, ``html.unescape`` twice, strip (the
    whitespace and lowercasing that follow, transformers' CLIP tokenizer does as well)."""
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def check_architecture(config, base: str) -> None:
    """The ``base`` config's settings that no weight shape reveals: a wrong one would load the checkpoint and
    score wrongly, so it is refused. Every config: exact GELU and LayerNorm eps 1e-5 (OpenCLIP's ViT-H-14;
    OpenAI's CLIPs use quick GELU). One of ViT-H-14's widths (the real model): its head counts too."""
    wrong = []
    for tower in ("text", "vision"):
        got, want = getattr(config, f"{tower}_config"), VIT_H_14[f"{tower}_config"]
        expected = {"hidden_act": "gelu", "layer_norm_eps": 1e-5}
        if got.hidden_size == want["hidden_size"]:
            expected["num_attention_heads"] = want["num_attention_heads"]
        wrong += [
            f"{tower}_config.{key}={getattr(got, key, None)!r} (ViT-H-14: {value!r})"
            for key, value in expected.items()
            if getattr(got, key, None) != value
        ]
    if wrong:
        raise ValueError(
            f"reward.kwargs.base={base!r} is not OpenCLIP's ViT-H-14, HPS's architecture: {'; '.join(wrong)}. "
            f"Fix: base=laion/CLIP-ViT-H-14-laion2B-s32B-b79K (`hf download {_BASE_EXAMPLE}`)"
        )


def resolve_checkpoint(checkpoint: str, version: str) -> Path:
    """The HPS checkpoint file: ``checkpoint`` itself, the version's file inside a folder, or that file in the
    Hugging Face cache when ``checkpoint`` is a hub id (offline: nothing is downloaded)."""
    return resolve_file(checkpoint, FILES[version], _HUB, f"HPS {version} checkpoint")


def load_open_clip_state(path: Path, version: str = "v2.1") -> dict[str, torch.Tensor]:
    """The state dict of an OpenCLIP checkpoint file: a bare state dict or one under ``state_dict`` (HPS's),
    with DistributedDataParallel's ``module.`` prefix dropped; loaded weights-only (no code runs)."""
    return load_tensors(path, f"`hf download {_HUB} {FILES[version]}`")  # (the version's own file)


def _load(path: Path, config, base: str, version: str = "v2.1") -> torch.nn.Module:
    """The fp32 ``CLIPModel`` of ``config`` with the OpenCLIP checkpoint's weights, every one of them."""
    from transformers import CLIPModel

    where = f"reward.kwargs.checkpoint={str(path)!r}"
    state = open_clip_to_transformers(load_open_clip_state(path, version), where=where)
    return from_state(
        CLIPModel,
        config,
        state,
        misfit=f"{where} does not fit the architecture of reward.kwargs.base={base!r}",
        fix="Fix: give the base whose config matches the checkpoint (ViT-H-14 for HPS)",
    )


@register("hps")
class HPS:
    """HPS v2.1 (or v2.0): ``scale * cos(image_emb, text_emb)`` of the HPS-tuned OpenCLIP ViT-H-14, with
    HPS's image transform (:func:`hps_preprocess`) and OpenCLIP's text cleaning (:func:`open_clip_clean`).

    kwargs: ``checkpoint`` (the ``.pt`` file, a folder holding it, or the hub id ``xswu/HPSv2`` when it is
    in the HF cache; default the latter), ``version`` (``v2.1``, the default, or ``v2.0``: which file of a
    folder or hub repo), ``base`` (folder or cached hub id with the architecture's transformers config and
    CLIP tokenizer; default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, whose ``*.json`` and ``*.txt`` files
    are enough), ``scale`` (default 1: HPS as papers report it), and
    :class:`~densegrpo_fast.rewards.clip.ClipEncoder`'s ``device``, ``dtype``, ``max_batch``,
    ``text_cache_size``.
    """

    def __init__(
        self,
        checkpoint: str = _HUB,
        version: str = "v2.1",
        base: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        scale: float = 1.0,
        device: str | None = None,
        dtype: str = "float32",
        max_batch: int = 64,
        text_cache_size: int = 4096,
    ):
        problems = HPS.check(version=version, dtype=dtype)
        if problems:
            raise ValueError(problems[0])
        clean = open_clip_clean
        try:
            import ftfy  # noqa: F401  (OpenCLIP's text cleaning)
        except ImportError:
            if not building_architectures():  # (the memory estimate reads no prompt for its meaning)
                raise ValueError(
                    "reward 'hps' needs ftfy, which cleans prompts as HPS's tokenizer did. Fix: pip install "
                    "'densegrpo-fast[hps]' (or pip install ftfy)"
                ) from None
            clean = str.strip
        from transformers import CLIPModel

        # everything small first, so that a missing file is named before the 2 GB checkpoint loads
        config = clip_config(str(base), "base", _BASE_EXAMPLE)
        check_architecture(config, str(base))
        tokenizer, _ = load_processor(str(base), text=True, image=False, example=_BASE_EXAMPLE, what="base")
        if building_architectures():  # densegrpo-fast memory: the architecture, no checkpoint read
            self.checkpoint = None
            model = build_architecture(lambda: CLIPModel(config), _DTYPES[dtype])
        else:
            check_tokenizer(tokenizer, int(config.text_config.vocab_size), "base", str(base), _BASE_EXAMPLE)
            self.checkpoint = resolve_checkpoint(str(checkpoint), version)
            model = _load(self.checkpoint, config, base, version)
        self.clip = ClipEncoder(
            model,
            device=device,
            dtype=dtype,
            max_batch=max_batch,
            text_cache_size=text_cache_size,
            tokenizer=tokenizer,
            preprocess=functools.partial(hps_preprocess, size=int(config.vision_config.image_size)),
            clean=clean,
        )
        self.scale = float(scale)

    @staticmethod
    def check(version: str = "v2.1", dtype: str = "float32", **_) -> list[str]:
        problems = []
        if version not in FILES:
            problems.append(
                f"reward.kwargs.version={version!r} is not an HPS version: choose one of {list(FILES)}"
            )
        if dtype not in _DTYPES:
            problems.append(f"reward.kwargs.dtype={dtype!r} is not one of {sorted(_DTYPES)}")
        return problems

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        cos = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)  # [B]
        return (self.scale * cos).to(images.device)
