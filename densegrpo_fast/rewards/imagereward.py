"""ImageReward (Xu et al., 2023), scored on tensors: BLIP with a preference head, without BLIP's own code.

ImageReward is BLIP (a ViT-L/16 image tower and a BERT-base text encoder that cross-attends to the image's
tokens) fine-tuned on human rankings of generated images. The score of an image for a prompt: the prompt's
tokens go through the text encoder, cross-attending to the image tower's output; the ``[CLS]`` state goes
through an MLP (768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations: the LAION aesthetic head's shape);
the result is standardised with the released mean and std (0.16717362830052426, 1.0333394966054072), so
scores sit around 0 with unit spread over ImageReward's data. Flow-GRPO and MixGRPO train and report on it.

- **Weights.** ``ImageReward.pt`` (hub repo ``THUDM/ImageReward``) is the state dict of ImageReward's own
  module: BLIP's ``visual_encoder`` (timm-style ViT) and ``text_encoder`` (BLIP's ``med.py`` BERT) and the
  ``mlp``. BLIP's code needs timm and fairscale, so this module does not use it:
  :func:`blip_to_transformers` renames the weights to transformers' ``BlipVisionModel`` and
  ``BlipTextModel``, ports of the same two networks (the text side keeps ``med.py``'s names). BLIP's
  other parts in the file (its contrastive projections ``vision_proj`` and ``text_proj``) do not take part
  in the score and are dropped, as ImageReward's non-strict load ignores them. The file loads with ``torch.load(weights_only=True)``: tensors only, no code.
- **Architecture.** The text encoder's comes from ``med_config.json`` (beside the checkpoint, or in the
  hub cache next to it; the released one's values are built in when it is absent), with transformers'
  ``BertConfig`` defaults for what it leaves out, as BLIP reads it. The image tower's is
  read from the weights' shapes, with BLIP's fixed settings: 64-dimensional heads (ViT-B 12 x 64, ViT-L
  16 x 64), exact GELU, LayerNorm eps 1e-6.
- **Images: ImageReward's transform.** Its ``_transform(224)``: the shortest side to 224 with PIL's
  bicubic, torchvision's ``CenterCrop`` (whose offset rounds where CLIP's processor floors), OpenAI's mean
  and std. :func:`imagereward_preprocess` does it on the images' device, with PIL's two 8-bit passes (see
  :func:`~densegrpo_fast.rewards.clip.clip_preprocess`).
- **Prompts.** BERT's uncased tokenizer (``bert-base-uncased``, with BLIP's two added tokens ``[DEC]`` and
  ``[ENC]``: 30524 ids), padded and truncated to 35 tokens as ImageReward's scorer does.

Checked (tests/test_rewards_imagereward.py): on tiny random weights, the reward equals a BLIP-layout
forward written in the test (the layouts and forwards of BLIP's ``vit.py`` and ``med.py``), fed by PIL and
a transcription of torchvision's ``Resize`` and ``CenterCrop`` arithmetic.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import torch

from densegrpo_fast.rewards import register
from densegrpo_fast.rewards.checkpoints import from_state, load_tensors, resolve_file
from densegrpo_fast.rewards.clip import (
    _DTYPES,
    CLIP_IMAGE,
    ClipImageSpec,
    _missing,
    _stand_in,
    aesthetic_head,
    build_architecture,
    building_architectures,
    clip_preprocess,
    quiet_loading,
)
from densegrpo_fast.rewards.images import check_batch

FILE = "ImageReward.pt"
CONFIG_FILE = "med_config.json"
_HUB = "THUDM/ImageReward"
_TOKENIZER = "bert-base-uncased"
_TOKENIZER_EXAMPLE = "bert-base-uncased --include '*.json' --include '*.txt'"
#: The released score's standardisation (ImageReward's ``self.mean``, ``self.std``).
MEAN, STD = 0.16717362830052426, 1.0333394966054072
#: ImageReward's scorer pads and truncates every prompt to this many tokens ([CLS] and [SEP] included).
MAX_LENGTH = 35
#: BLIP's tokens added to BERT's vocabulary (``init_tokenizer``): 30522 + 2 = the text encoder's 30524.
ADDED_TOKENS = ("[DEC]", "[ENC]")
HEAD_DIM = 64  # BLIP's ViTs: base 12 heads x 64, large 16 x 64

#: ImageReward's image tower: BLIP's ViT-L/16 at 224 px (``create_vit("large", 224)``), a transformers config.
VIT_L_16 = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6,
)  # fmt: skip
#: The released ``med_config.json``'s settings that shape the network (BERT-base with cross-attention).
MED_CONFIG = dict(
    vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=512, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0,
    add_cross_attention=True,
)  # fmt: skip

#: transformers' ``BertConfig`` defaults of those settings: what BLIP's ``BertConfig.from_json_file`` gives a
#: ``med_config.json`` that leaves one out.
BERT_DEFAULTS = dict(
    vocab_size=30522, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=512, layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0,
)  # fmt: skip

# BLIP ViT name (after ``blip.visual_encoder.``) -> BlipVisionModel name, outside the blocks; inside block i
# the suffixes below. Text-encoder names are the same on both sides (transformers ported med.py).
_VISION_TOP = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = {
    "norm1": "layer_norm1",
    "norm2": "layer_norm2",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_TOWERS = ("blip.visual_encoder.", "blip.text_encoder.")  # BLIP's parts in the score; others are dropped


def blip_to_transformers(
    state: dict[str, torch.Tensor], where: str = "checkpoint"
) -> dict[str, dict[str, torch.Tensor]]:
    """ImageReward's state dict split and renamed: ``{"vision": BlipVisionModel's, "text": BlipTextModel's,
    "head": the MLP's}`` (the head's names are :func:`~densegrpo_fast.rewards.clip.aesthetic_head`'s,
    ``{0,2,4,6,7}.*``). Tensors are shared, not copied. BLIP's other parts (its contrastive projections:
    none takes part in the score) and the saved ``position_ids`` buffer are dropped; the names that
    torch's activation-checkpoint wrapper adds (``._checkpoint_wrapped_module``) are taken out.

    Raises ValueError naming the keys it does not know (another BLIP variant, another model), so nothing is
    silently left at random init."""
    out: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "head": {}}
    unknown = []
    for key, value in state.items():
        key = key.replace("._checkpoint_wrapped_module", "")  # (saved from activation-checkpointed blocks)
        if (key.startswith("blip.") and not key.startswith(_TOWERS)) or key.endswith("position_ids"):
            continue
        if key.startswith("mlp.layers."):
            out["head"][key.removeprefix("mlp.layers.")] = value
        elif key.startswith("blip.text_encoder."):
            out["text"][key.removeprefix("blip.text_encoder.")] = value
        elif key.startswith("blip.visual_encoder."):
            name = key.removeprefix("blip.visual_encoder.")
            parts = name.split(".")
            block = ".".join(parts[2:-1])
            if name in _VISION_TOP:
                out["vision"][_VISION_TOP[name]] = value
            elif len(parts) > 3 and parts[0] == "blocks" and parts[1].isdigit() and block in _VISION_BLOCK:
                out["vision"][f"encoder.layers.{parts[1]}.{_VISION_BLOCK[block]}.{parts[-1]}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{where}: {len(unknown)} weights this conversion of ImageReward's BLIP does not cover, e.g. "
            f"{unknown[:5]}. Fix: give ImageReward's own checkpoint ({FILE} from {_HUB})"
        )
    return out


def vision_config_from_weights(vision: dict[str, torch.Tensor], where: str = "checkpoint") -> dict:
    """The image tower's transformers config, read from its (converted) weights' shapes, with BLIP's fixed
    settings: 64-dimensional heads, exact GELU, LayerNorm eps 1e-6."""
    try:
        width = vision["embeddings.class_embedding"].shape[-1]
        patch = vision["embeddings.patch_embedding.weight"].shape[-1]
        tokens = vision["embeddings.position_embedding"].shape[1]
        mlp = vision["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"{where}: no image-tower weight {e} (not an ImageReward checkpoint)") from None
    depth = len({k.split(".")[2] for k in vision if k.startswith("encoder.layers.")})
    grid = math.isqrt(tokens - 1)
    if grid * grid != tokens - 1 or width % HEAD_DIM:
        raise ValueError(
            f"{where}: an image tower of width {width} with {tokens} position embeddings is not one of BLIP's "
            f"ViTs (a class token plus a square grid, heads of {HEAD_DIM}). Fix: give ImageReward's own "
            f"checkpoint ({FILE} from {_HUB})"
        )
    return dict(
        VIT_L_16, hidden_size=width, intermediate_size=mlp, num_hidden_layers=depth,
        num_attention_heads=width // HEAD_DIM, image_size=grid * patch, patch_size=patch,
    )  # fmt: skip


def text_config(med: dict, encoder_width: int, where: str):
    """transformers' ``BlipTextConfig`` for a BLIP ``med_config.json`` (``med``), cross-attending to an image
    tower of ``encoder_width``. Refuses settings this port does not reproduce."""
    from transformers import BlipTextConfig

    wrong = []
    if not med.get("add_cross_attention", False):
        wrong.append("add_cross_attention is not true (ImageReward's text encoder cross-attends)")
    if med.get("position_embedding_type", "absolute") != "absolute":
        wrong.append(f"position_embedding_type={med['position_embedding_type']!r} (absolute only)")
    if wrong:
        raise ValueError(
            f"{where}: {'; '.join(wrong)}. Fix: give ImageReward's own {CONFIG_FILE} (`hf download {_HUB} "
            f"{CONFIG_FILE}`), or remove the file to use the released one's values"
        )
    # is_decoder builds the cross-attention layers; the score calls the encoder bidirectionally. Generation
    # token ids are not used here (and BLIP's defaults lie outside a small test vocabulary).
    med = {**BERT_DEFAULTS, **med}  # (BLIP reads the file with BertConfig.from_json_file: its defaults)
    return BlipTextConfig(
        **{k: med[k] for k in BERT_DEFAULTS}, encoder_hidden_size=encoder_width, is_decoder=True,
        bos_token_id=None, eos_token_id=None, sep_token_id=None,
    )  # fmt: skip


def find_med_config(checkpoint: str, path: Path | None) -> tuple[dict, str]:
    """The text encoder's ``med_config.json``: beside the checkpoint file, or of the hub repo
    ``checkpoint`` in the cache; else the released one's values (:data:`MED_CONFIG`). With where it came
    from."""
    candidates = [path.parent / CONFIG_FILE] if path is not None else []
    if not Path(checkpoint).expanduser().exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(checkpoint, CONFIG_FILE)
            if isinstance(cached, str):
                candidates.append(Path(cached))
        except Exception:  # not a repo id
            pass
    for c in candidates:
        if c.is_file():
            try:
                return json.loads(c.read_text()), str(c)
            except (OSError, ValueError) as e:
                raise ValueError(
                    f"{c} does not read as JSON ({type(e).__name__}: {e}). Fix: fetch it again (`hf download "
                    f"{_HUB} {CONFIG_FILE}`), or remove it to use the released one's values"
                ) from None
    return dict(MED_CONFIG), "the released med_config.json's values (built in)"


def imagereward_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """ImageReward's ``_transform(size)`` on tensors, on the images' device: the shortest side to ``size``
    with PIL's bicubic (two 8-bit passes), torchvision's center crop, OpenAI's mean and std.

    Shape: images [B, 3, H, W] float in [0, 1] -> [B, 3, size, size] float32."""
    spec = ClipImageSpec(size, size, size, CLIP_IMAGE.mean, CLIP_IMAGE.std)
    return clip_preprocess(images, spec, torchvision_crop=True)


def _stand_in_tokenizer():
    """A BERT WordPiece tokenizer over single letters and digits, for the memory estimate when the real one
    is not on disk (prompts are padded to :data:`MAX_LENGTH` tokens either way)."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789"]
    with tempfile.TemporaryDirectory() as d:  # (from a folder: transformers 5 ignores vocab_file=)
        (Path(d) / "vocab.txt").write_text("\n".join(vocab) + "\n")
        return BertTokenizerFast.from_pretrained(d)


def load_tokenizer(tokenizer: str):
    """BERT's uncased tokenizer from a folder (``vocab.txt`` is enough) or the HF cache, with BLIP's two added
    tokens. (The fast one: the same WordPiece tokens as the slow one ImageReward used.)"""
    from transformers import AutoTokenizer, BertTokenizerFast

    local = Path(tokenizer).expanduser()
    name = str(local) if local.exists() else str(tokenizer)
    vocab_only = (local / "vocab.txt").is_file() and not (local / "tokenizer_config.json").exists()
    try:  # (AutoTokenizer, because BertTokenizerFast builds an empty tokenizer where it finds no files)
        if vocab_only:  # (no config saying which tokenizer it is: AutoTokenizer cannot tell)
            tok = BertTokenizerFast.from_pretrained(name)
        else:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as e:  # (ValueError: a folder without a tokenizer's files)
        if str(tokenizer) != _TOKENIZER or not _stand_in(f"{tokenizer} (tokenizer)"):
            raise _missing("tokenizer", str(tokenizer), _TOKENIZER_EXAMPLE, e) from None
        tok = _stand_in_tokenizer()
    tok.add_tokens(list(ADDED_TOKENS), special_tokens=True)
    return tok


def _no_init():
    """transformers' context that skips weight initialisation (its home moved in transformers 5)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


class ImageRewardModel(torch.nn.Module):
    """BLIP's image tower and text encoder (transformers' ports) and ImageReward's MLP head."""

    def __init__(self, vision: torch.nn.Module, text: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.vision, self.text, self.head = vision, text, head

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """The head's raw output (before the standardisation). Shapes: pixels [B, 3, S, S], tokens [B, L]
        -> [B] float32 (the head runs in float32, as ImageReward's does)."""
        image = self.vision(pixel_values=pixels).last_hidden_state  # [B, 1 + grid^2, width]
        text = self.text(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image
        ).last_hidden_state
        return self.head(text[:, 0].float()).squeeze(-1)


def _head(state: dict[str, torch.Tensor], hidden: int, where: str) -> torch.nn.Module:
    head = aesthetic_head(hidden)
    expected = set(head.state_dict())
    if set(state) != expected:
        raise ValueError(
            f"{where}: the preference head's weights are {sorted(state)}, not ImageReward's MLP "
            f"{sorted(expected)}. Fix: give ImageReward's own checkpoint ({FILE} from {_HUB})"
        )
    try:
        head.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise ValueError(f"{where}: the preference head does not take the text encoder's {hidden}-d state "
                         f"({str(e).splitlines()[0]})") from None  # fmt: skip
    return head


def _read(path: Path, med: dict, med_from: str, where: str):
    """The checkpoint's converted weights (mapped, not read) and the two towers' configs."""
    from transformers import BlipVisionConfig

    parts = blip_to_transformers(load_tensors(path, f"`hf download {_HUB} {FILE}`"), where)
    vcfg = BlipVisionConfig(**vision_config_from_weights(parts["vision"], where))
    return parts, vcfg, text_config(med, vcfg.hidden_size, med_from)


def _load(path: Path, med: dict, med_from: str) -> ImageRewardModel:
    from transformers import BlipTextModel, BlipVisionModel

    where = f"reward.kwargs.checkpoint={str(path)!r}"
    parts, vcfg, tcfg = _read(path, med, med_from, where)
    fix = f"Fix: give ImageReward's own checkpoint ({FILE}) with its {CONFIG_FILE} beside it"
    vision = from_state(BlipVisionModel, vcfg, parts["vision"], f"{where}: the image tower", fix)
    text_misfit = f"{where}: the text encoder does not fit {med_from}"
    # (ImageReward's text encoder has no pooler)
    text = from_state(BlipTextModel, tcfg, parts["text"], text_misfit, fix, add_pooling_layer=False)
    return ImageRewardModel(vision, text, _head(parts["head"], tcfg.hidden_size, where))


def _architecture(checkpoint: str, dtype: torch.dtype) -> ImageRewardModel:
    """Within :func:`~densegrpo_fast.rewards.clip.architectures_only`: the model with the checkpoint's
    architecture and no weights read (its ``med_config.json`` and its weights' shapes, the file memory-mapped,
    not read); the released architecture, noted as stood in for, when the checkpoint is not on disk. The
    towers in ``dtype``, the head in float32, as loaded for real."""
    from transformers import BlipTextModel, BlipVisionConfig, BlipVisionModel

    try:
        path = resolve_file(checkpoint, FILE, _HUB, "ImageReward checkpoint")
    except ValueError:
        path = None
        _stand_in(f"{checkpoint} (checkpoint)")
    if path is None:
        vcfg = BlipVisionConfig(**VIT_L_16)
        tcfg = text_config(MED_CONFIG, vcfg.hidden_size, "built in")
    else:  # (the weights are mapped, not read, and dropped here)
        _, vcfg, tcfg = _read(path, *find_med_config(checkpoint, path), str(path))

    def towers() -> ImageRewardModel:
        with _no_init():  # (BLIP's truncated-normal init reads values: fake tensors have none)
            return ImageRewardModel(
                BlipVisionModel(vcfg), BlipTextModel(tcfg, add_pooling_layer=False), torch.nn.Identity()
            )

    model = build_architecture(towers, dtype)
    model.head = build_architecture(lambda: aesthetic_head(tcfg.hidden_size), torch.float32)
    return model


@register("imagereward")
class ImageReward:
    """ImageReward v1.0: BLIP's text encoder cross-attending to the image, its ``[CLS]`` state through the
    preference MLP, standardised as released (``(raw - 0.1672) / 1.0333``), times ``scale``.

    kwargs: ``checkpoint`` (``ImageReward.pt``, a folder holding it, or the hub id ``THUDM/ImageReward``
    when it is in the HF cache; default the latter; ``med_config.json`` is read from beside it),
    ``tokenizer`` (folder or cached hub id of BERT's uncased tokenizer; default ``bert-base-uncased``, whose
    ``*.json`` and ``*.txt`` files are enough), ``scale`` (default 1: ImageReward as papers report it),
    ``device`` (where the model runs; None follows the images), ``dtype`` (the BLIP towers' weights:
    float32, bfloat16 or float16; the head stays float32), ``max_batch`` (images per forward pass).
    """

    def __init__(
        self,
        checkpoint: str = _HUB,
        tokenizer: str = _TOKENIZER,
        scale: float = 1.0,
        device: str | None = None,
        dtype: str = "float32",
        max_batch: int = 32,
    ):
        problems = ImageReward.check(dtype=dtype, max_batch=max_batch)
        if problems:
            raise ValueError(problems[0])
        # the tokenizer first, so that a missing one is named before the 1.8 GB checkpoint loads
        self.tokenizer = load_tokenizer(str(tokenizer))
        if building_architectures():  # densegrpo-fast memory: no weights read
            self.checkpoint = None
            self.model = _architecture(str(checkpoint), _DTYPES[dtype])
        else:
            self.checkpoint = resolve_file(str(checkpoint), FILE, _HUB, "ImageReward checkpoint")
            med, med_from = find_med_config(str(checkpoint), self.checkpoint)
            vocab = int(med.get("vocab_size", BERT_DEFAULTS["vocab_size"]))
            if "vocab_size" not in med:
                med_from = f"{med_from}, which leaves it out: BertConfig's default"
            if len(self.tokenizer) != vocab:
                raise ValueError(
                    f"reward.kwargs.tokenizer={tokenizer!r} has {len(self.tokenizer)} tokens ([DEC] and [ENC] "
                    f"included), but the text encoder's vocabulary (from {med_from}) is {vocab}: the folder "
                    "lacks the tokenizer's files or holds another tokenizer, or the checkpoint's "
                    f"{CONFIG_FILE} is not beside it. Fix: `hf download {_TOKENIZER_EXAMPLE}` (or give "
                    f"BERT's uncased tokenizer folder), and keep {CONFIG_FILE} beside the checkpoint"
                )
            with quiet_loading():
                self.model = _load(self.checkpoint, med, med_from)
            self.model.vision.to(_DTYPES[dtype])
            self.model.text.to(_DTYPES[dtype])
        self.model.requires_grad_(False).eval()
        self.dtype = _DTYPES[dtype]
        self.image_size = int(self.model.vision.config.image_size)
        self.device = torch.device(device) if device else None
        self._placed: torch.device | None = None
        self.max_batch = int(max_batch)
        self.scale = float(scale)

    @staticmethod
    def check(dtype: str = "float32", max_batch: int = 32, **_) -> list[str]:
        problems = []
        if dtype not in _DTYPES:
            problems.append(f"reward.kwargs.dtype={dtype!r} is not one of {sorted(_DTYPES)}")
        if not isinstance(max_batch, int) or max_batch < 1:
            problems.append(f"reward.kwargs.max_batch={max_batch!r} must be a positive integer")
        return problems

    def tokens(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        """ImageReward's tokens: padded and truncated to :data:`MAX_LENGTH`."""
        out = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
        )
        return {"input_ids": out["input_ids"].to(device), "attention_mask": out["attention_mask"].to(device)}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        dev = self.device or images.device
        if dev != self._placed:  # (moved once, not walked at every call: dense rewards call it often)
            self.model.to(dev)
            self._placed = dev
        out = []
        for start in range(0, len(prompts), self.max_batch):
            chunk = images[start : start + self.max_batch].to(dev)
            pixels = imagereward_preprocess(chunk, self.image_size).to(self.dtype)
            tokens = self.tokens(prompts[start : start + self.max_batch], dev)
            out.append(self.model(pixels, tokens["input_ids"], tokens["attention_mask"]))
        raw = torch.cat(out)
        return (self.scale * (raw - MEAN) / STD).to(images.device)
