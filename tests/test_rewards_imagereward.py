"""ImageReward: BLIP checkpoints converted to transformers' BLIP towers, on tiny random weights.

The oracle is a BLIP-layout model written here: the layouts and forwards of BLIP's ``vit.py`` (timm-style
ViT: fused ``qkv``, pre-norm blocks, a final norm) and ``med.py`` (BERT without token types, post-norm,
self-attention masked by ``(1 - mask) * -10000``, then cross-attention to the image tokens, then the
feed-forward), ImageReward's MLP and standardisation, independent of the transformers code under test. Its
images go through PIL and a transcription of torchvision's ``Resize`` / ``CenterCrop`` arithmetic, its
prompts through the pure-Python BERT tokenizer ImageReward used, with BLIP's tokens added as
``init_tokenizer`` adds them."""

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tolerances import assert_on_policy
from transformers import BertTokenizer

from densegrpo_fast.rewards import build_reward, kwargs_problems
from densegrpo_fast.rewards.clip import CLIP_IMAGE, ClipImageSpec, clip_preprocess
from densegrpo_fast.rewards.imagereward import (
    CONFIG_FILE,
    FILE,
    MAX_LENGTH,
    MEAN,
    MED_CONFIG,
    STD,
    blip_to_transformers,
    imagereward_preprocess,
)

SIZE, PATCH, VWIDTH, VLAYERS, TWIDTH, THEADS, TLAYERS = 32, 8, 128, 2, 48, 4, 2
WORDS = ["red", "cat", "on", "blue", "dog", "the", "of", "photo", "green"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *LETTERS, *("##" + c for c in LETTERS)]
LONG = " ".join(["a red cat on the blue dog"] * 6)  # 42 words: truncated at 35 tokens
PROMPTS = ["a red cat", "A Photo of the GREEN dog", "a red cat", "a café on\tthe blue dog!", LONG]
MED = dict(MED_CONFIG, vocab_size=len(VOCAB) + 2, hidden_size=TWIDTH, intermediate_size=2 * TWIDTH,
           num_hidden_layers=TLAYERS, num_attention_heads=THEADS, max_position_embeddings=64)  # fmt: skip


# ---- the oracle: BLIP's layout and forward -------------------------------------------------------------


class _Block(nn.Module):  # vit.py's Block: pre-norm attention with a fused qkv, pre-norm MLP
    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, n, d = x.shape
        heads = d // 64
        q, k, v = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (d // heads) ** -0.5).softmax(-1)
        x = x + self.attn.proj((a @ v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class _ViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, VWIDTH, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, VWIDTH) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, (SIZE // PATCH) ** 2 + 1, VWIDTH) * 0.5)
        self.blocks = nn.ModuleList(_Block(VWIDTH) for _ in range(VLAYERS))
        self.norm = nn.LayerNorm(VWIDTH, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def _attention(d, kv_width):  # med.py's BertAttention: self (query, key, value) + output (dense, LayerNorm)
    m = nn.Module()
    m.self = nn.Module()
    m.self.query, m.self.key, m.self.value = nn.Linear(d, d), nn.Linear(kv_width, d), nn.Linear(kv_width, d)
    m.output = nn.Module()
    m.output.dense, m.output.LayerNorm = nn.Linear(d, d), nn.LayerNorm(d, eps=1e-12)
    return m


def _attend(m, x, kv, bias, heads):
    b, n, d = x.shape

    def split(t):
        return t.view(len(t), -1, heads, d // heads).transpose(1, 2)

    q, k, v = split(m.self.query(x)), split(m.self.key(kv)), split(m.self.value(kv))
    s = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if bias is not None:
        s = s + bias
    ctx = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    return m.output.LayerNorm(m.output.dense(ctx) + x)


class _Bert(nn.Module):  # med.py's BertModel (no pooler), every layer with cross-attention
    def __init__(self, heads=THEADS):
        super().__init__()
        self.heads = heads
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(MED["vocab_size"], TWIDTH)
        self.embeddings.position_embeddings = nn.Embedding(MED["max_position_embeddings"], TWIDTH)
        self.embeddings.LayerNorm = nn.LayerNorm(TWIDTH, eps=1e-12)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList()
        for _ in range(TLAYERS):
            layer = nn.Module()
            layer.attention, layer.crossattention = _attention(TWIDTH, TWIDTH), _attention(TWIDTH, VWIDTH)
            layer.intermediate, layer.output = nn.Module(), nn.Module()
            layer.intermediate.dense = nn.Linear(TWIDTH, MED["intermediate_size"])
            layer.output.dense = nn.Linear(MED["intermediate_size"], TWIDTH)
            layer.output.LayerNorm = nn.LayerNorm(TWIDTH, eps=1e-12)
            self.encoder.layer.append(layer)

    def forward(self, ids, mask, image):
        e = self.embeddings
        x = e.LayerNorm(e.word_embeddings(ids) + e.position_embeddings(torch.arange(ids.shape[1])))
        bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
        for layer in self.encoder.layer:
            x = _attend(layer.attention, x, x, bias, self.heads)
            x = _attend(layer.crossattention, x, image, None, self.heads)  # every image token attended
            x = layer.output.LayerNorm(layer.output.dense(F.gelu(layer.intermediate.dense(x))) + x)
        return x


class _Oracle(nn.Module):
    """ImageReward's module: ``blip.{visual_encoder, text_encoder, vision_proj, text_proj}`` and ``mlp``."""

    def __init__(self, heads=THEADS):
        super().__init__()
        self.blip = nn.Module()
        self.blip.visual_encoder, self.blip.text_encoder = _ViT(), _Bert(heads)
        self.blip.vision_proj, self.blip.text_proj = nn.Linear(VWIDTH, 16), nn.Linear(TWIDTH, 16)
        self.mlp = nn.Module()
        self.mlp.layers = nn.Sequential(
            nn.Linear(TWIDTH, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )  # fmt: skip
        with torch.no_grad():  # spread the tiny model's outputs (default inits give near-constant scores)
            for p in self.parameters():
                if p.ndim >= 2:
                    p.normal_(0, 1.0 / math.sqrt(p.shape[-1] if p.ndim == 2 else p[0].numel()))
                else:  # norms' scales and shifts and the biases away from 1 and 0: a swap shows
                    p.add_(torch.randn_like(p) * 0.2)

    @torch.no_grad()
    def score(self, pixels, ids, mask):
        cls = self.blip.text_encoder(ids, mask, self.blip.visual_encoder(pixels))[:, 0]
        return ((self.mlp.layers(cls) - MEAN) / STD).squeeze(-1)


def _oracle_pixels(images, size=SIZE):
    """ImageReward's ``_transform``: PIL bicubic resize of the shortest side, torchvision's center crop,
    ``ToTensor``, OpenAI's normalisation; on uint8 images as it reads them."""
    out = []
    for img in (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy():
        h, w = img.shape[:2]
        new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
        pil = Image.fromarray(img).resize((new_w, new_h), Image.BICUBIC)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        x = torch.from_numpy(np.asarray(pil.crop((left, top, left + size, top + size))).copy())
        x = x.permute(2, 0, 1).float() / 255
        out.append(
            (x - torch.tensor(CLIP_IMAGE.mean).view(3, 1, 1)) / torch.tensor(CLIP_IMAGE.std).view(3, 1, 1)
        )
    return torch.stack(out)


def _python_bert_tokenizer(tok_dir):
    """The pure-Python WordPiece tokenizer ImageReward used (transformers 5 renamed it; its ``BertTokenizer``
    is the Rust one the reward uses, so comparing against that would compare it with itself)."""
    try:
        from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
    except ImportError:  # transformers 4: BertTokenizer is the Python one
        return BertTokenizer(vocab_file=str(tok_dir / "vocab.txt"))
    return BertTokenizerLegacy(vocab_file=str(tok_dir / "vocab.txt"))


def _oracle_tokens(tok_dir, prompts):
    tok = _python_bert_tokenizer(tok_dir)  # BLIP's init_tokenizer
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    t = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    return t["input_ids"], t["attention_mask"], tok


# ---- fixtures ------------------------------------------------------------------------------------------


def _images(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(
        torch.rand(b, 3, 5, 5, generator=g), size=(h, w), mode="bicubic", align_corners=False
    )
    return (smooth.clamp(0, 1) * 255).round() / 255  # uint8-representable: PIL sees the same pixels


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert_tok")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer.from_pretrained(str(d)).save_pretrained(str(d))  # (v5 ignores vocab_file=)
    return d


@pytest.fixture(scope="module")
def oracle():
    torch.manual_seed(0)
    return _Oracle().eval()


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory, oracle):
    d = tmp_path_factory.mktemp("imagereward")
    state = dict(oracle.state_dict())
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]  # older BLIP code saved it
    torch.save(state, d / FILE)
    (d / CONFIG_FILE).write_text(json.dumps(MED))
    return d


# ---- tests ---------------------------------------------------------------------------------------------


def test_the_reward_equals_blip_on_its_own_preprocessing_and_tokens(ckpt_dir, tok_dir, oracle):
    """Non-square images (one whose crop margin is 3 mod 4, where torchvision's crop rounds up), prompts
    with capitals, an accent and more than 35 tokens."""
    reward = build_reward("imagereward", checkpoint=str(ckpt_dir), tokenizer=str(tok_dir))
    ids, mask, _ = _oracle_tokens(tok_dir, PROMPTS)
    assert int(mask[-1].sum()) == MAX_LENGTH and int(mask[0].sum()) == 5  # truncated; [CLS] a red cat [SEP]
    tokens = reward.tokens(PROMPTS, torch.device("cpu"))
    assert torch.equal(tokens["input_ids"], ids) and torch.equal(tokens["attention_mask"], mask)
    for seed, (h, w) in enumerate([(48, 71), (64, 32), (40, 40)]):  # 48 x 71 -> 32 x 47: a margin of 15
        images = _images(len(PROMPTS), h, w, seed=seed)
        pixels = _oracle_pixels(images)
        want = oracle.score(pixels, ids, mask)
        got = reward(images, PROMPTS)
        assert got.shape == (5,) and got.dtype == torch.float32
        assert want.std() > 0.1  # the scores spread: a wrong weight moves them
        # on the oracle's own pixels the model agrees to fp32 rounding; the on-device preprocessing differs
        # from PIL by at most a level on a few pixels (next test): a score moves by far less than its spread
        raw = reward.model(pixels, tokens["input_ids"], tokens["attention_mask"])
        torch.testing.assert_close((raw - MEAN) / STD, want, atol=2e-5, rtol=0)
        torch.testing.assert_close(got, want, atol=2e-3 * float(want.std()), rtol=0)
        alone = reward(images[3:4], PROMPTS[3:4])  # a row scores the same alone as in its batch
        torch.testing.assert_close(alone, got[3:4], atol=1e-5, rtol=0)


@pytest.mark.parametrize("h, w, size", [(48, 71, SIZE), (40, 40, SIZE), (512, 1031, 224)])
def test_preprocessing_matches_pil_and_torchvision_crop(h, w, size):
    """At most 2 8-bit levels on any pixel, ~1e-5 on average (as CLIP's preprocessing), on smooth and noise
    images. 48 x 71 -> 32 x 47 and 512 x 1031 -> 224 x 451 leave crop margins of 15 and 227 (3 mod 4):
    there torchvision's crop starts a column later than CLIP's processor's. (Portrait images: see
    clip_preprocess on the order of PIL's passes.)"""
    g = torch.Generator().manual_seed(h)
    noise = torch.randint(0, 256, (2, 3, h, w), generator=g).float() / 255
    images = torch.cat([_images(2, h, w, seed=w), noise])
    ours, ref = imagereward_preprocess(images, size), _oracle_pixels(images, size)
    assert ours.shape == ref.shape == (4, 3, size, size)
    level = 1 / 255 / min(CLIP_IMAGE.std)
    err = (ours - ref).abs()
    assert err.max() <= 2 * level + 1e-5 and err.mean() <= 0.01 * level, (err.max(), err.mean())
    floor_crop = clip_preprocess(images, ClipImageSpec(size, size, size, CLIP_IMAGE.mean, CLIP_IMAGE.std))
    if (int(size * w / h) - size) % 4 == 3:
        assert (floor_crop - ref).abs().mean() > 100 * err.mean()  # a column off
    else:
        assert torch.equal(floor_crop, ours)


def test_the_heads_come_from_med_config(tmp_path, tok_dir, oracle):
    """A head count no weight shape shows: med_config.json's is used, so a file with another one scores
    differently. Without the file, the released config's values apply (the tiny model is refused)."""
    d = tmp_path / "ir"
    d.mkdir()
    torch.save(oracle.state_dict(), d / FILE)
    (d / CONFIG_FILE).write_text(json.dumps(dict(MED, num_attention_heads=2)))
    images = _images(3, 40, 40, seed=6)
    reward = build_reward("imagereward", checkpoint=str(d / FILE), tokenizer=str(tok_dir))
    two_heads = _Oracle(heads=2).eval()
    two_heads.load_state_dict(oracle.state_dict())
    ids, mask, _ = _oracle_tokens(tok_dir, PROMPTS[:3])
    pixels = _oracle_pixels(images)
    got = (reward.model(pixels, ids, mask) - MEAN) / STD
    torch.testing.assert_close(got, two_heads.score(pixels, ids, mask), atol=2e-5, rtol=0)
    assert (got - oracle.score(pixels, ids, mask)).abs().max() > 1e-3
    (d / CONFIG_FILE).unlink()
    with pytest.raises(
        ValueError, match=r"vocabulary \(from the released med_config.json's values.*is 30524"
    ):
        build_reward("imagereward", checkpoint=str(d), tokenizer=str(tok_dir))


def test_settings_a_med_config_leaves_out_take_bert_s_defaults(tmp_path, tok_dir, oracle):
    """As BLIP's ``BertConfig.from_json_file`` reads the file: GELU, eps 1e-12 and pad id 0 when absent."""
    d = tmp_path / "ir"
    d.mkdir()
    torch.save(oracle.state_dict(), d / FILE)
    med = {k: v for k, v in MED.items() if k not in ("hidden_act", "layer_norm_eps", "pad_token_id")}
    (d / CONFIG_FILE).write_text(json.dumps(med))
    reward = build_reward("imagereward", checkpoint=str(d), tokenizer=str(tok_dir))
    assert (reward.model.text.config.hidden_act, reward.model.text.config.layer_norm_eps) == ("gelu", 1e-12)
    ids, mask, _ = _oracle_tokens(tok_dir, PROMPTS)
    pixels = _oracle_pixels(_images(len(PROMPTS), 40, 40, seed=8))
    got = (reward.model(pixels, ids, mask) - MEAN) / STD
    torch.testing.assert_close(got, oracle.score(pixels, ids, mask), atol=2e-5, rtol=0)
    # the vocabulary too: BERT's 30522, not the release's 30524, when the file leaves it out
    (d / CONFIG_FILE).write_text(json.dumps({k: v for k, v in med.items() if k != "vocab_size"}))
    with pytest.raises(ValueError, match=r"which leaves it out: BertConfig's default\) is 30522"):
        build_reward("imagereward", checkpoint=str(d), tokenizer=str(tok_dir))


def test_conversion_names_what_it_does_not_know(oracle):
    state = dict(oracle.state_dict())
    parts = blip_to_transformers(state)
    assert set(parts["head"]) == {f"{i}.{w}" for i in (0, 2, 4, 6, 7) for w in ("weight", "bias")}
    assert (
        parts["vision"]["encoder.layers.1.self_attn.projection.weight"]
        is state["blip.visual_encoder.blocks.1.attn.proj.weight"]
    )
    # every weight but BLIP's two projections (and nothing else) lands in one of the three parts
    assert sum(map(len, parts.values())) == len(state) - 4
    assert not any(k.startswith("blip.") for part in parts.values() for k in part)
    state["blip.itm_head.weight"] = torch.zeros(1)  # a BLIP part outside the score: dropped
    assert sum(map(len, blip_to_transformers(state).values())) == len(state) - 5
    # names saved from activation-checkpointed modules: a whole block, or a sub-module, of either tower
    for pattern in (r"(blocks\.\d+)\.", r"(layer\.\d+)\.", r"(\.attn)\.", r"(\.attention)\."):
        wrapped = {
            re.sub(pattern, r"\1._checkpoint_wrapped_module.", k, count=1): v for k, v in state.items()
        }
        assert wrapped != state
        assert {p: d.keys() for p, d in blip_to_transformers(wrapped).items()} == {
            p: d.keys() for p, d in blip_to_transformers(state).items()
        }
    state["blip.visual_encoder.blocks.0.adapter_after_attn.fc.weight"] = torch.zeros(1)  # inside a tower
    state["itm_head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"2 weights .*adapter_after_attn.*itm_head.*THUDM/ImageReward"):
        blip_to_transformers(state)


def test_a_folder_with_only_vocab_txt_is_a_tokenizer(ckpt_dir, tok_dir, tmp_path):
    """BERT's tokenizer needs nothing but its vocabulary (the hub folder has more; a hand-made one may not)."""
    (tmp_path / "vocab.txt").write_bytes((tok_dir / "vocab.txt").read_bytes())
    reward = build_reward("imagereward", checkpoint=str(ckpt_dir), tokenizer=str(tmp_path))
    full = build_reward("imagereward", checkpoint=str(ckpt_dir), tokenizer=str(tok_dir))
    cpu = torch.device("cpu")
    assert torch.equal(reward.tokens(PROMPTS, cpu)["input_ids"], full.tokens(PROMPTS, cpu)["input_ids"])


def test_bfloat16_towers_and_batch_chunks(ckpt_dir, tok_dir):
    images = _images(5, 40, 56, seed=7)
    ref = build_reward("imagereward", checkpoint=str(ckpt_dir), tokenizer=str(tok_dir))(images, PROMPTS)
    chunked = build_reward("imagereward", checkpoint=str(ckpt_dir), tokenizer=str(tok_dir), max_batch=2)
    torch.testing.assert_close(chunked(images, PROMPTS), ref, atol=1e-5, rtol=0)
    bf16 = build_reward("imagereward", checkpoint=str(ckpt_dir), tokenizer=str(tok_dir), dtype="bfloat16")
    assert bf16.model.vision.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert bf16.model.head[0].weight.dtype == torch.float32
    out = bf16(images, PROMPTS)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.2 * float(ref.std())


def test_missing_files_and_bad_kwargs_name_the_fix(tmp_path, ckpt_dir, tok_dir):
    with pytest.raises(ValueError, match=r"hf download THUDM/ImageReward ImageReward\.pt"):
        build_reward("imagereward", checkpoint=str(tmp_path / "nowhere"), tokenizer=str(tok_dir))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"folder without ImageReward\.pt"):
        build_reward("imagereward", checkpoint=str(tmp_path / "empty"), tokenizer=str(tok_dir))
    with pytest.raises(ValueError, match=r"reward\.kwargs\.tokenizer=.*hf download bert-base-uncased"):
        build_reward("imagereward", checkpoint=str(ckpt_dir), tokenizer=str(tmp_path / "no_tokenizer"))
    other = tmp_path / "other_tok"
    other.mkdir()
    (other / "vocab.txt").write_text("\n".join(VOCAB[:-3]) + "\n")
    BertTokenizer.from_pretrained(str(other)).save_pretrained(str(other))
    with pytest.raises(ValueError, match=r"has 65 tokens \(\[DEC\] and \[ENC\] included\), but .* is 68"):
        build_reward("imagereward", checkpoint=str(ckpt_dir), tokenizer=str(other))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / FILE).write_bytes(b"not a checkpoint")
    (tmp_path / "bad" / CONFIG_FILE).write_text(json.dumps(MED))
    with pytest.raises(ValueError, match="not loaded with full unpickling"):
        build_reward("imagereward", checkpoint=str(tmp_path / "bad"), tokenizer=str(tok_dir))
    assert kwargs_problems("imagereward", {"dtype": "float64"})
    assert kwargs_problems("imagereward", {"max_batch": 0})
    assert not kwargs_problems("imagereward", {"checkpoint": "x", "dtype": "bfloat16"})


def _fake_reward(**kwargs):
    from densegrpo_fast.memory import new_fake_mode, reward_builder
    from densegrpo_fast.rewards.clip import architectures_only

    mode = new_fake_mode()
    with architectures_only(reward_builder(mode)) as used:  # (as the estimate builds rewards)
        reward = build_reward("imagereward", **kwargs)
    return reward, used, mode


def test_the_memory_estimate_builds_the_released_architecture():
    """Within architectures_only, with nothing on disk: BLIP ViT-L/16 + BERT-base with cross-attention + the
    MLP, fake weights, the towers in the asked dtype and the head in float32 as for real; the parameter count
    derived here from the architecture's widths; a fake image scores (the estimate needs that call)."""
    from transformers import AutoTokenizer

    from densegrpo_fast.memory import _is_fake

    reward, used, mode = _fake_reward(checkpoint="/nowhere/ImageReward.pt", dtype="bfloat16")
    try:  # (as the reward looks for it)
        AutoTokenizer.from_pretrained("bert-base-uncased", local_files_only=True)
        tokenizer = []
    except OSError:
        tokenizer = ["bert-base-uncased (tokenizer)"]
    assert used == [*tokenizer, "/nowhere/ImageReward.pt (checkpoint)"]
    params = list(reward.model.parameters())
    assert all(_is_fake(p) for p in params)

    def linear(i, o):
        return i * o + o

    d, w, v = 1024, 768, 30524  # ViT-L width, BERT-base width, vocabulary
    vit = 3 * 16 * 16 * d + d + d + 197 * d + 24 * (linear(d, 3 * d) + linear(d, d) + linear(d, 4 * d)
                                                     + linear(4 * d, d) + 4 * d) + 2 * d  # fmt: skip
    attn = 4 * linear(w, w) + 2 * w
    cross = 2 * linear(w, w) + 2 * linear(d, w) + 2 * w
    bert = (v + 512) * w + 2 * w + 12 * (attn + cross + linear(w, 3072) + linear(3072, w) + 2 * w)
    head = linear(w, 1024) + linear(1024, 128) + linear(128, 64) + linear(64, 16) + linear(16, 1)
    assert sum(p.numel() for p in params) == vit + bert + head
    assert {p.dtype for p in reward.model.vision.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in reward.model.text.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in reward.model.head.parameters()} == {torch.float32}
    with mode:
        out = reward(torch.rand(2, 3, 64, 64), ["a prompt", "another"])
    assert out.shape == (2,) and out.dtype == torch.float32


def test_the_memory_estimate_reads_a_checkpoint_s_architecture_not_its_weights(ckpt_dir, tok_dir):
    """A checkpoint on disk gives the estimate its own architecture (med_config.json and the weights'
    shapes, the file mapped, not read): the same parameters, by name and shape, as the real load."""
    real = build_reward("imagereward", checkpoint=str(ckpt_dir), tokenizer=str(tok_dir))
    fake, used, _ = _fake_reward(checkpoint=str(ckpt_dir), tokenizer=str(tok_dir))
    assert used == []
    shapes = {k: tuple(p.shape) for k, p in real.model.named_parameters()}
    assert {k: tuple(p.shape) for k, p in fake.model.named_parameters()} == shapes
    assert fake.model.text.config.num_attention_heads == THEADS


def test_malformed_checkpoints_and_configs_are_refused(tmp_path, tok_dir, oracle):
    state = dict(oracle.state_dict())
    d = tmp_path / "ir"
    d.mkdir()

    def build(state, med):
        torch.save(state, d / FILE)
        (d / CONFIG_FILE).write_text(med if isinstance(med, str) else json.dumps(med))
        return build_reward("imagereward", checkpoint=str(d), tokenizer=str(tok_dir))

    pos = "blip.visual_encoder.pos_embed"
    with pytest.raises(ValueError, match="not one of BLIP's ViTs"):
        build({**state, pos: state[pos][:, :-1]}, MED)  # 16 positions: no class token plus a square grid
    with pytest.raises(ValueError, match=r"does not read as JSON.*hf download THUDM/ImageReward med_config"):
        build(state, "{not json")
    with pytest.raises(ValueError, match="add_cross_attention is not true"):
        build(state, dict(MED, add_cross_attention=False))
    with pytest.raises(ValueError, match=r"holds \['weights'\], not a state dict of tensors"):
        build({"weights": [1, 2]}, MED)


def test_one_densegrpo_iteration_of_the_tiny_sd3_on_imagereward(ckpt_dir, tok_dir, tmp_path):
    """The reward in the trainer: dense rewards scored in two waves on the worker thread, the policy's
    32 px images upscaled to the tower's size, a held-out evaluation scoring it under another key."""
    import math

    import tiny_models as tiny

    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.trainer import train

    sd3_dir = tmp_path / "sd3"
    tiny.sd3_pipeline(seed=0).save_pretrained(sd3_dir)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\nthe blue dog\na photo of the green dog\n")
    ir = f"{{checkpoint: {ckpt_dir}, tokenizer: {tok_dir}}}"
    overrides = [
        "model.family=sd3", f"model.checkpoint={sd3_dir}", f"model.resolution={tiny.RESOLUTION}",
        f"model.max_sequence_length={tiny.MAX_T5_TOKENS}", f"prompts.dataset={prompts}",
        "prompts.prompts_per_iteration=2", "sampling.num_steps=3", "sampling.group_size=2", "sampling.shift=null",
        "sampling.reward_waves=2", "noise.kind=uniform", "reward.name=imagereward", f"reward.kwargs={ir}",
        "lora.rank=4", "grpo.train_batch_size=4", f"eval.dataset={prompts}", "eval.num_prompts=3",
        "eval.num_steps=2", f"eval.rewards={{ir: {{name: imagereward, kwargs: {ir}}}}}", "run.iterations=1",
        f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false", "run.eval_every=1",
    ]  # fmt: skip
    run_dir = train(load_config(TrainConfig, None, overrides), progress=False)
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (step,) = [r for r in recs if "reward_mean" in r]
    rewards = step["R_mean"] + step["dR_mean"]
    assert all(math.isfinite(v) for v in rewards) and step["reward_std"] > 0, step
    assert step["rows_trained"] > 0
    assert_on_policy(step, exact=False)
    evals = [r for r in recs if any(k.startswith("eval_ir") for k in r)]
    assert evals and all(math.isfinite(v) for r in evals for k, v in r.items() if k.startswith("eval_ir"))
