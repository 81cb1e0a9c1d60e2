"""HPS v2.1: OpenCLIP checkpoints converted to transformers' CLIPModel, on tiny random weights.

The oracle is an OpenCLIP-layout model written here (the layout and forward of OpenCLIP's ``CLIP``: fused
``in_proj`` attention in ``nn.MultiheadAttention``, projection matrices applied as ``x @ P``, argmax text
pooling, zero padding to the context length), independent of the transformers code under test. With the real
``open_clip`` importable, the last test compares against it as well (skipped otherwise: open_clip needs
torchvision, whose builds pin their own torch)."""

import json
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import CLIPConfig, CLIPTokenizer

from densegrpo_fast.rewards import build_reward, kwargs_problems
from densegrpo_fast.rewards.clip import VIT_H_14
from densegrpo_fast.rewards.hps import (
    FILES,
    check_architecture,
    hps_preprocess,
    hps_preprocess_reference,
    open_clip_to_transformers,
)

PilClipProcessor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
SIZE, PATCH, WIDTH, HEADS, LAYERS, EMBED, CONTEXT = 32, 8, 32, 4, 2, 16, 77
LONG = "a very long prompt " * 6  # 114 characters: one token each in the tiny vocabulary, so truncated
# an HTML entity escaped twice ("&#98;" is "b") and a ligature ("\ufb01" is "fi"): OpenCLIP's cleaning
# (html.unescape twice, ftfy) turns them into letters, transformers' tokenizer alone would not
PROMPTS = ["a red cat", "a &amp;#98;lue dog on a car", "a red cat", "green \ufb01sh", LONG]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """Like laion/CLIP-ViT-H-14-laion2B-s32B-b79K without weights: config, tokenizer, image processor. The
    end-of-text token has the largest id, as in CLIP's vocabulary (OpenCLIP pools at the argmax id)."""
    d = tmp_path_factory.mktemp("hps_base")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0}
    vocab.update({c: len(vocab) + i for i, c in enumerate(letters)})
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(letters)})
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer.from_pretrained(str(d)).save_pretrained(str(d))
    eot = vocab["<|endoftext|>"]
    text = dict(
        vocab_size=len(vocab), hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=CONTEXT, bos_token_id=0, eos_token_id=eot,
        pad_token_id=eot, hidden_act="gelu",
    )  # fmt: skip
    vision = dict(
        hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        image_size=SIZE, patch_size=PATCH, hidden_act="gelu",
    )  # fmt: skip
    CLIPConfig(text_config=text, vision_config=vision, projection_dim=EMBED).save_pretrained(str(d))
    PilClipProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(
        str(d)
    )
    return d


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1 = nn.LayerNorm(WIDTH)
        self.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.ln_2 = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(WIDTH, 4 * WIDTH), gelu=nn.GELU(), c_proj=nn.Linear(4 * WIDTH, WIDTH))
        )

    def forward(self, x, mask=None):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.resblocks = nn.ModuleList(_Block() for _ in range(LAYERS))

    def forward(self, x, mask=None):
        for block in self.resblocks:
            x = block(x, mask)
        return x


class _Visual(nn.Module):
    def __init__(self):
        super().__init__()
        n = (SIZE // PATCH) ** 2
        self.class_embedding = nn.Parameter(torch.empty(WIDTH))
        self.positional_embedding = nn.Parameter(torch.empty(n + 1, WIDTH))
        self.proj = nn.Parameter(torch.empty(WIDTH, EMBED))
        self.conv1 = nn.Conv2d(3, WIDTH, PATCH, PATCH, bias=False)
        self.ln_pre = nn.LayerNorm(WIDTH)
        self.transformer = _Transformer()
        self.ln_post = nn.LayerNorm(WIDTH)

    def forward(self, pixels):
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # [B, patches, W]
        x = torch.cat([self.class_embedding.expand(len(x), 1, WIDTH), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class OpenClipLike(nn.Module):
    """OpenCLIP's ``CLIP`` (ViT image tower, classic text tower) with its parameter names."""

    def __init__(self, vocab_size):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.empty(CONTEXT, WIDTH))
        self.text_projection = nn.Parameter(torch.empty(WIDTH, EMBED))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.visual = _Visual()
        self.transformer = _Transformer()
        self.token_embedding = nn.Embedding(vocab_size, WIDTH)
        self.ln_final = nn.LayerNorm(WIDTH)
        g = torch.Generator().manual_seed(0)
        for name, p in self.named_parameters():  # every weight random, LayerNorm scales around 1
            scale = 0.3 if p.ndim == 1 else 0.2
            base = 1.0 if ("ln" in name and name.endswith("weight")) else 0.0
            p.data = base + scale * torch.randn(p.shape, generator=g)

    def encode_text(self, ids):  # ids [B, CONTEXT], zero-padded
        x = self.token_embedding(ids) + self.positional_embedding
        mask = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
        x = self.ln_final(self.transformer(x, mask))
        return x[torch.arange(len(ids)), ids.argmax(-1)] @ self.text_projection

    def score(self, pixels, ids):
        img = F.normalize(self.visual(pixels), dim=-1)
        txt = F.normalize(self.encode_text(ids), dim=-1)
        return (img * txt).sum(-1)


def _ids(base_dir, prompts):
    """OpenCLIP's tokens: its cleaning (ftfy, HTML unescaped twice), BOS, BPE, EOT, cut to the context
    length with EOT kept last, zeros after."""
    import html

    import ftfy

    tok = CLIPTokenizer.from_pretrained(str(base_dir))
    rows = []
    for p in prompts:
        r = tok(html.unescape(html.unescape(ftfy.fix_text(p))).strip())["input_ids"]
        rows.append(r if len(r) <= CONTEXT else r[: CONTEXT - 1] + r[-1:])
    return torch.tensor([r + [0] * (CONTEXT - len(r)) for r in rows])


def _images(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


@pytest.fixture(scope="module")
def open_clip_model(base_dir):
    vocab = json.loads((base_dir / "vocab.json").read_text())
    return OpenClipLike(len(vocab)).eval()


@pytest.mark.parametrize("layout", ["hps_fp16", "bare_ddp"])
def test_hps_matches_open_clip_layout_forward(tmp_path, base_dir, open_clip_model, layout):
    """The converted model scores what the OpenCLIP-layout forward scores on the same weights: HPS's own
    checkpoint layout (``{"state_dict": ...}`` in fp16) and a bare state dict saved from DDP (``module.``) in
    torch's legacy file format (which cannot be memory-mapped)."""
    state = open_clip_model.state_dict()
    ref = open_clip_model
    if layout == "hps_fp16":
        state = {k: v.half() for k, v in state.items()}
        ref = OpenClipLike(open_clip_model.token_embedding.num_embeddings).eval()
        ref.load_state_dict({k: v.float() for k, v in state.items()})
        obj = {"state_dict": state, "epoch": 1, "name": "hps"}
    else:
        obj = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / FILES["v2.1"]
    torch.save(obj, path, _use_new_zipfile_serialization=layout == "hps_fp16")  # torch's legacy format too
    reward = build_reward("hps", checkpoint=str(tmp_path), base=str(base_dir), max_batch=3)  # a folder
    assert reward.checkpoint == path
    images = _images(len(PROMPTS), 40, 70)  # not square: resized to 18 x 32 (40 * 32 / 70 rounded), padded
    got = reward(images, PROMPTS)
    with torch.no_grad():
        want = ref.score(hps_preprocess_reference(images, SIZE), _ids(base_dir, PROMPTS))
    assert got.dtype == torch.float32 and got.shape == (len(PROMPTS),)
    assert want.abs().min() > 0.01 and want.std() > 0.05  # scores that tell rows apart
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)


def _save(path, open_clip_model, **extra):
    state = {**open_clip_model.state_dict(), **extra}
    torch.save({"state_dict": state}, path)
    return path


def test_hps_from_hub_cache_and_missing_files(tmp_path, base_dir, open_clip_model, monkeypatch):
    """The default checkpoint is the hub id, found offline in the Hugging Face cache; a version whose file
    is not there, or a base that is not on disk, gets the command that fetches it."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--xswu--HPSv2" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (cache / "models--xswu--HPSv2" / "refs").mkdir()
    (cache / "models--xswu--HPSv2" / "refs" / "main").write_text("0123abcd")
    _save(snapshot / FILES["v2.1"], open_clip_model)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reward = build_reward("hps", base=str(base_dir))
    assert reward.checkpoint == snapshot / FILES["v2.1"]
    with pytest.raises(ValueError, match=r"hf download xswu/HPSv2 HPS_v2_compressed\.pt"):
        build_reward("hps", base=str(base_dir), version="v2")
    with pytest.raises(ValueError, match=r"reward\.kwargs\.base=.*laion/CLIP-ViT-H-14-laion2B-s32B-b79K"):
        build_reward("hps", base=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"folder without HPS_v2\.1_compressed\.pt"):
        build_reward("hps", checkpoint=str(tmp_path / "hub"), base=str(base_dir))
    assert kwargs_problems("hps", {"version": "v3"}) == [
        "reward.kwargs.version='v3' is not an HPS version: choose one of ['v2.1', 'v2.0', 'v2']"
    ]
    assert kwargs_problems("hps", {"version": "v2", "scale": 2.0}) == []


class _Code:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_hps_refuses_what_it_cannot_load_faithfully(tmp_path, base_dir, open_clip_model):
    """No full unpickling; another OpenCLIP architecture's weights are named, not left at random init; a
    base of another width is refused; a base with OpenAI CLIP's quick GELU is refused."""
    code = tmp_path / "code.pt"
    torch.save({"state_dict": {"x": _Code()}}, code)
    with pytest.raises(ValueError, match=r"not loaded with full unpickling.*HPS_v2\.1_compressed\.pt"):
        build_reward("hps", checkpoint=str(code), base=str(base_dir))
    cut = tmp_path / "my_hps.pt"  # a download cut short, of version v2.0: the hint names v2.0's file
    cut.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(
        ValueError, match=r"fetch it again \(`hf download xswu/HPSv2 HPS_v2_compressed\.pt`\)"
    ):
        build_reward("hps", checkpoint=str(cut), version="v2.0", base=str(base_dir))
    pooled = _save(
        tmp_path / "attn_pool.pt", open_clip_model, **{"visual.attn_pool.query": torch.zeros(4, 8)}
    )
    with pytest.raises(ValueError, match=r"visual\.attn_pool\.query"):
        build_reward("hps", checkpoint=str(pooled), base=str(base_dir))
    ok = _save(tmp_path / "ok.pt", open_clip_model)
    for change, match in [
        ({"projection_dim": 2 * EMBED}, "does not fit the architecture"),
        ({"text_config": {"hidden_act": "quick_gelu"}}, "quick_gelu"),
    ]:
        other = tmp_path / f"base_{len(list(tmp_path.iterdir()))}"
        other.mkdir()
        for f in base_dir.iterdir():
            (other / f.name).write_bytes(f.read_bytes())
        config = json.loads((other / "config.json").read_text())
        for key, value in change.items():
            if isinstance(value, dict):
                config[key].update(value)
            else:
                config[key] = value
        (other / "config.json").write_text(json.dumps(config))
        with pytest.raises(ValueError, match=match):
            build_reward("hps", checkpoint=str(ok), base=str(other))


def test_open_clip_conversion_shares_untouched_tensors(open_clip_model):
    """Renamed weights are the checkpoint's tensors (no copy of CLIP-H's 2-4 GB); only the split and the
    transposed ones are new, and every converted name is a CLIPModel parameter."""
    state = open_clip_model.state_dict()
    out = open_clip_to_transformers(state)
    assert out["text_model.embeddings.token_embedding.weight"] is state["token_embedding.weight"]
    q = out["vision_model.encoder.layers.1.self_attn.q_proj.weight"]
    torch.testing.assert_close(q, state["visual.transformer.resblocks.1.attn.in_proj_weight"][:WIDTH])
    assert torch.equal(out["visual_projection.weight"], state["visual.proj"].t())
    assert len(out) == len(state) + 4 * 2 * LAYERS  # each in_proj weight and bias becomes three


def test_hps_against_real_open_clip(base_dir, tmp_path):
    """The real OpenCLIP ``CLIP`` (tiny config) as the oracle, when the package is importable."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip needs torchvision (pins its own torch)")
    vocab = json.loads((base_dir / "vocab.json").read_text())
    torch.manual_seed(1)
    model = open_clip.model.CLIP(
        embed_dim=EMBED,
        vision_cfg=dict(
            layers=LAYERS, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH, image_size=SIZE
        ),
        text_cfg=dict(context_length=CONTEXT, vocab_size=len(vocab), width=WIDTH, heads=HEADS, layers=LAYERS),
    ).eval()
    for p in model.parameters():  # LayerNorms and biases away from their init, too
        p.data += 0.1 * torch.randn_like(p)
    path = tmp_path / "real.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    reward = build_reward("hps", checkpoint=str(path), base=str(base_dir))
    images = _images(len(PROMPTS), 40, 56, seed=3)
    with torch.no_grad():
        img = model.encode_image(hps_preprocess_reference(images, SIZE), normalize=True)
        txt = model.encode_text(_ids(base_dir, PROMPTS), normalize=True)
    torch.testing.assert_close(reward(images, PROMPTS), (img * txt).sum(-1), atol=2e-6, rtol=0)


@pytest.mark.parametrize("h, w", [(512, 512), (300, 517), (768, 512), (224, 224), (100, 60), (224, 100)])
def test_hps_preprocess_is_hps_validation_transform(h, w):
    """On the images' device, batched: HPS's transform (longest side to 224, floats, zero padding). The
    smooth-plus-sharp images would differ by many 8-bit levels from CLIP's PIL-style preprocessing."""
    g = torch.Generator().manual_seed(h + w)
    images = F.avg_pool2d(torch.rand(3, 3, h, w, generator=g), 5, 1, 2)
    images[:, :, h // 3 : h // 2] = 1.0  # a sharp bright band: bicubic overshoots past 1 and is not clamped
    got = hps_preprocess(images)
    assert got.shape == (3, 3, 224, 224) and got.dtype == torch.float32
    torch.testing.assert_close(got, hps_preprocess_reference(images, 224), atol=1e-6, rtol=0)
    if h != w:  # the padding is black: 0 before normalising
        black = (0 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
            [0.26862954, 0.26130258, 0.27577711]
        )
        corner = got[0, :, 0, 0]
        torch.testing.assert_close(corner, black)


def test_the_base_must_be_vit_h_14_where_no_shape_tells(base_dir, tmp_path, monkeypatch, open_clip_model):
    """Head counts, norms and activations change no weight shape: a ViT-H-14-wide config with other heads,
    or any config with other norms or activations, is refused; HPS needs no image processor file; without
    ftfy the reward says how to install it."""
    from transformers import CLIPConfig

    check_architecture(CLIPConfig(**VIT_H_14), "laion")  # the real one passes
    heads = CLIPConfig(**{**VIT_H_14, "text_config": {**VIT_H_14["text_config"], "num_attention_heads": 8}})
    with pytest.raises(ValueError, match=r"text_config.num_attention_heads=8 \(ViT-H-14: 16\)"):
        check_architecture(heads, "other")
    eps = CLIPConfig(**{**VIT_H_14, "vision_config": {**VIT_H_14["vision_config"], "layer_norm_eps": 1e-6}})
    with pytest.raises(ValueError, match=r"vision_config.layer_norm_eps=1e-06 .*hf download laion"):
        check_architecture(eps, "other")
    no_image = tmp_path / "base"
    no_image.mkdir()
    for f in base_dir.iterdir():
        if f.name != "preprocessor_config.json":
            (no_image / f.name).write_bytes(f.read_bytes())
    path = _save(tmp_path / "ok.pt", open_clip_model)
    build_reward("hps", checkpoint=str(path), base=str(no_image))
    no_vocab = tmp_path / "no_vocab"  # transformers builds a near-empty tokenizer there: every prompt alike
    no_vocab.mkdir()
    for f in base_dir.iterdir():
        if f.name not in ("vocab.json", "merges.txt", "tokenizer.json"):
            (no_vocab / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match=r"its tokenizer has \d+ tokens, the CLIP model's vocabulary 54"):
        build_reward("hps", checkpoint=str(path), base=str(no_vocab))
    monkeypatch.setitem(__import__("sys").modules, "ftfy", None)
    with pytest.raises(ValueError, match=r"needs ftfy.*pip install 'densegrpo-fast\[hps\]'"):
        build_reward("hps", checkpoint=str(path), base=str(base_dir))
