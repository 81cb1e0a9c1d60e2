"""HPS v2 / v2.1 (Human Preference Score; Wu et al., 2023), scored on tensors.

HPS is OpenCLIP's ViT-H-14 fine-tuned on human preference pairs; the score of an image for a prompt is the
cosine of their embeddings (HPS's own scorer: the dot product of the two L2-normalised embeddings, no logit
scale), about 0.2-0.35 for current models. DanceGRPO and MixGRPO train and evaluate on HPS v2.1.

Its checkpoints (``HPS_v2.1_compressed.pt``, ``HPS_v2_compressed.pt`` in the hub repo ``xswu/HPSv2``) are
OpenCLIP state dicts. OpenCLIP itself needs torchvision, whose builds pin one torch each, so this module does
not use it: :func:`open_clip_to_transformers` renames the weights to a transformers ``CLIPModel`` of the same
architecture (the hub's ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` is that very conversion of OpenCLIP's
ViT-H-14), whose config, tokenizer and image processor come from ``base``; only those small files of ``base``
are read, not its weights. Images go through :class:`~densegrpo_fast.rewards.clip.ClipEncoder` (on-device
resize of the shortest side to 224, bicubic, center crop, OpenAI's mean and std: HPS's validation transform,
the same for square images; for other shapes the crop's offset may differ by a pixel from torchvision's,
which rounds it). The checkpoint loads with ``torch.load(weights_only=True)``: tensors only, no code.

Checked (tests/test_rewards_hps.py): the converted model's scores equal those of an independent OpenCLIP-layout
forward written in the test (fused ``in_proj`` attention, argmax pooling) on tiny random weights; and, in a
scratch environment with the real ``open_clip`` 3.3.0 (torchvision stubbed: its model code does not use it),
the real ViT-H-14's embeddings on random weights (benchmarks/RESULTS.md, "HPS v2.1").
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from densegrpo_fast.rewards import register
from densegrpo_fast.rewards.clip import ClipEncoder, _missing
from densegrpo_fast.rewards.images import check_batch

FILES = {"v2.1": "HPS_v2.1_compressed.pt", "v2": "HPS_v2_compressed.pt"}
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
            f"{unknown[:5]}: only plain ViT CLIPs (ViT-B/L/H-14 with a projection matrix) convert"
        )
    return out


def resolve_checkpoint(checkpoint: str, version: str) -> Path:
    """The HPS checkpoint file: ``checkpoint`` itself, the version's file inside a folder, or that file in the
    Hugging Face cache when ``checkpoint`` is a hub id (offline: nothing is downloaded)."""
    p = Path(checkpoint).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if (p / FILES[version]).is_file():
            return p / FILES[version]
        raise ValueError(
            f"reward.kwargs.checkpoint={checkpoint!r} is a folder without {FILES[version]} (HPS {version}). "
            f"Fix: give the file itself, or a folder holding it (`hf download {_HUB} {FILES[version]} "
            "--local-dir DIR`)"
        )
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(checkpoint, FILES[version], local_files_only=True))
    except Exception as e:  # not in the cache, or not a repo id at all
        raise ValueError(
            f"reward.kwargs.checkpoint={checkpoint!r}: no HPS {version} checkpoint there, nor {FILES[version]} "
            f"of that hub repo in the Hugging Face cache (rewards load offline). Fix: `hf download {_HUB} "
            f"{FILES[version]}` where there is network, or set reward.kwargs.checkpoint to the file "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def load_open_clip_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict of an OpenCLIP checkpoint file: a bare state dict or one under ``state_dict`` (HPS's),
    with DistributedDataParallel's ``module.`` prefix dropped; loaded weights-only (no code runs)."""
    try:
        try:  # mapped, not read: the fp16 ViT-H-14 is 2 GB, and the conversion to fp32 copies it anyway
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # a file in torch's legacy (pre-1.6, not zip) format cannot be mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the weights-only unpickler refuses anything but tensors and plain containers
        raise ValueError(
            f"reward.kwargs.checkpoint={str(path)!r} does not load as a plain checkpoint of tensors "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); it is not loaded with full "
            "unpickling, because that runs code"
        ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"reward.kwargs.checkpoint={str(path)!r} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


@register("hps")
class HPS:
    """HPS v2.1 (or v2): ``scale * cos(image_emb, text_emb)`` of the HPS-tuned OpenCLIP ViT-H-14.

    kwargs: ``checkpoint`` (the ``.pt`` file, a folder holding it, or the hub id ``xswu/HPSv2`` when it is
    in the HF cache; default the latter), ``version`` (``v2.1``, the default, or ``v2``: which file of a
    folder or hub repo), ``base`` (folder or cached hub id of the architecture's transformers config,
    tokenizer and image processor; default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, which PickScore
    uses as its processor too; its weights are not read), ``scale`` (default 1: HPS as papers report it),
    and :class:`~densegrpo_fast.rewards.clip.ClipEncoder`'s ``device``, ``dtype``, ``max_batch``,
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
        problems = HPS.check(version=version)
        if problems:
            raise ValueError(problems[0])
        from transformers import CLIPConfig, CLIPModel

        try:
            config = CLIPConfig.from_pretrained(str(base), local_files_only=True)
        except OSError as e:
            raise _missing(
                "base", str(base), "laion/CLIP-ViT-H-14-laion2B-s32B-b79K --include '*.json' '*.txt'", e
            ) from None
        acts = {config.text_config.hidden_act, config.vision_config.hidden_act}
        if acts != {"gelu"}:
            raise ValueError(
                f"reward.kwargs.base={base!r} has activations {sorted(acts)}; HPS's ViT-H-14 uses exact GELU "
                "(OpenAI's CLIPs use quick_gelu). Fix: base=laion/CLIP-ViT-H-14-laion2B-s32B-b79K (config files)"
            )
        path = resolve_checkpoint(str(checkpoint), version)
        state = open_clip_to_transformers(
            load_open_clip_state(path), where=f"reward.kwargs.checkpoint={str(path)!r}"
        )
        misfit = f"reward.kwargs.checkpoint={str(path)!r} does not fit the architecture of reward.kwargs.base={base!r}"
        fix = "Fix: give the base whose config matches the checkpoint (ViT-H-14 for HPS)"
        try:
            model, info = CLIPModel.from_pretrained(
                None, config=config, state_dict=state, output_loading_info=True, dtype=torch.float32
            )
        except RuntimeError as e:  # transformers refuses weights of another shape
            raise ValueError(
                f"{misfit}: weights of another shape ({str(e).splitlines()[0]}). {fix}"
            ) from None
        missing = [k for k in info["missing_keys"] if not k.endswith("position_ids")]
        bad = missing + list(info["unexpected_keys"]) + [str(m) for m in info["mismatched_keys"]]
        if bad:
            raise ValueError(
                f"{misfit}: {len(bad)} weights missing, unexpected or of another shape, e.g. {bad[:4]}. {fix}"
            )
        self.clip = ClipEncoder(
            model, str(base), device=device, dtype=dtype, max_batch=max_batch, text_cache_size=text_cache_size
        )
        self.scale = float(scale)
        self.checkpoint = path

    @staticmethod
    def check(version: str = "v2.1", **_) -> list[str]:
        if version in FILES:
            return []
        return [f"reward.kwargs.version={version!r} is not an HPS version: choose one of {list(FILES)}"]

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        cos = (self.clip.image_embeds(images) * self.clip.text_embeds(prompts)).sum(-1)  # [B]
        return (self.scale * cos).to(images.device)
