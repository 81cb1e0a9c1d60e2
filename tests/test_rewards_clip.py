"""CLIP rewards (PickScore, CLIP score, aesthetic) on a tiny random CLIP built offline from configs."""

import json
import pickle

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from densegrpo_fast.rewards import build_reward
from densegrpo_fast.rewards.clip import (
    Aesthetic,
    ClipImageSpec,
    ClipScore,
    PickScore,
    aesthetic_head,
    clip_preprocess,
)

# transformers 5 names the PIL-backed processor CLIPImageProcessorPil; in 4 CLIPImageProcessor is the PIL one
PilClipProcessor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
SIZE = 32  # the tiny model's image size (= the processor's shortest side and crop)
PROMPTS = ["a red cat", "a blue dog on a car", "a red cat", "green"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A folder like a hub CLIP checkpoint: tiny random CLIPModel + tokenizer + PIL image processor."""
    d = tmp_path_factory.mktemp("tiny_clip")
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: len(vocab) + i for i, c in enumerate(letters)})
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate(letters)})
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(d))
    torch.manual_seed(0)
    text = dict(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )  # fmt: skip
    vision = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=SIZE,
        patch_size=8,
    )  # fmt: skip
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    PilClipProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(
        str(d)
    )
    return d


def _images(b, h, w, seed=0):
    """uint8-representable images (x = k / 255), so the PIL processor sees exactly the same pixels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8).float() / 255


def _pil_pixels(images, processor):
    u8 = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return processor(images=list(u8), return_tensors="pt")["pixel_values"]


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("hw", [(512, 512), (300, 517), (64, 64)])
def test_preprocessing_matches_the_pil_clip_processor(hw):
    """At most 2 8-bit levels on any pixel (PIL's fixed-point rounding; 1 level when downscaling), ~1e-5 on
    average: the on-device path reproduces PIL's two uint8 passes (see clip_preprocess)."""
    processor = PilClipProcessor()  # CLIP's defaults: shortest side 224, crop 224, OpenAI mean/std
    spec = ClipImageSpec(224, 224, 224, tuple(processor.image_mean), tuple(processor.image_std))
    smooth = F.interpolate(_images(2, 9, 9, seed=1), size=hw, mode="bicubic", align_corners=False).clamp(0, 1)
    images = torch.cat([_images(2, *hw), (smooth * 255).round() / 255])  # noise and smooth
    ours = clip_preprocess(images, spec)
    ref = _pil_pixels(images, processor)
    assert ours.shape == ref.shape == (4, 3, 224, 224) and ours.dtype == torch.float32
    level = 1 / 255 / min(processor.image_std)  # one 8-bit level in normalised units (0.015)
    err = (ours - ref).abs()
    assert err.max() <= 2 * level + 1e-5, err.max()
    assert err.mean() <= 0.01 * level, err.mean()


def test_pickscore_equals_clip_logits_and_is_deterministic(clip_dir):
    reward = build_reward("pickscore", model=str(clip_dir), processor=str(clip_dir))
    images = _images(4, 40, 48)
    scores = reward(images, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert torch.equal(reward(images, PROMPTS), scores)  # deterministic, and the cached text path agrees
    # Reference: transformers' own forward on the PIL processor's pixels; logits_per_image = the raw score
    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    tokens = reward.clip.tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**tokens, pixel_values=_pil_pixels(images, PilClipProcessor.from_pretrained(clip_dir)))
    ref = logits.logits_per_image.diagonal()
    # the pixels differ by <= 1 level on a few pixels (test above): the scores by far less than their spread
    assert (scores - ref).abs().max() <= 1e-3 * ref.abs().max(), (scores, ref)
    assert (scores - ref).abs().max() < 0.01 * (ref.max() - ref.min())
    scaled = PickScore(model=str(clip_dir), processor=str(clip_dir), scale=1 / 26)
    torch.testing.assert_close(scaled(images, PROMPTS), scores / 26, rtol=1e-6, atol=0)


def test_pickscore_in_bfloat16_keeps_the_float32_logit_scale(clip_dir):
    """In bfloat16 the logit scale itself rounds (PickScore's ln 100 to 4.594: every score 1.1 % low); it is
    read in float32 before the cast."""
    fp32 = PickScore(model=str(clip_dir), processor=str(clip_dir))
    bf16 = PickScore(model=str(clip_dir), processor=str(clip_dir), dtype="bfloat16")
    assert bf16.clip.model.logit_scale.dtype == torch.bfloat16
    assert bf16.clip.model.logit_scale.float().exp() != fp32.clip.logit_scale  # (what rounding would give)
    assert torch.equal(bf16.clip.logit_scale, fp32.clip.logit_scale)
    assert fp32.clip.logit_scale == fp32.clip.model.logit_scale.detach().exp()
    images = _images(4, 40, 48)
    cos = (bf16.clip.image_embeds(images) * bf16.clip.text_embeds(PROMPTS)).sum(-1).float()
    torch.testing.assert_close(bf16(images, PROMPTS), fp32.clip.logit_scale * cos, rtol=1e-6, atol=0)


def test_text_embeddings_are_cached_per_prompt(clip_dir, monkeypatch):
    reward = PickScore(model=str(clip_dir), processor=str(clip_dir), text_cache_size=3)
    calls = []
    tokenizer = reward.clip.tokenizer
    monkeypatch.setattr(
        reward.clip, "tokenizer", lambda texts, **kw: calls.append(list(texts)) or tokenizer(texts, **kw)
    )
    images = _images(4, SIZE, SIZE)
    first = reward(images, PROMPTS)
    assert calls == [["a red cat", "a blue dog on a car", "green"]]  # unique prompts, one batch
    assert (reward.clip.cache_misses, reward.clip.cache_hits) == (3, 1)
    again = reward(images, PROMPTS)
    assert calls == [["a red cat", "a blue dog on a car", "green"]] and reward.clip.cache_hits == 5
    assert torch.equal(first, again)
    reward(images[:1], ["a yellow sun"])  # a 4th prompt: the least recently used one leaves
    assert list(reward.clip._cache) == ["a red cat", "green", "a yellow sun"]


def test_clip_score_is_the_cosine_and_scales(clip_dir):
    images = _images(3, SIZE, SIZE)
    prompts = PROMPTS[:3]
    plain = ClipScore(model=str(clip_dir))(images, prompts)  # processor defaults to the model's folder
    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    tok = CLIPTokenizer.from_pretrained(str(clip_dir))
    with torch.no_grad():
        pixels = _pil_pixels(images, PilClipProcessor.from_pretrained(clip_dir))
        img = _features(model.get_image_features(pixel_values=pixels))
        txt = _features(model.get_text_features(**tok(prompts, padding=True, return_tensors="pt")))
    cos = F.cosine_similarity(img, txt)
    torch.testing.assert_close(plain, cos, atol=1e-5, rtol=0)  # 32 px in, no resize: the same pixels
    assert plain.abs().max() <= 1
    assert torch.equal(ClipScore(model=str(clip_dir), scale=100)(images, prompts), 100 * plain)


def test_aesthetic_head_from_safetensors_and_torch_state_dict(clip_dir, tmp_path):
    torch.manual_seed(1)
    head = aesthetic_head(16)  # the tiny CLIP's projection dim; the real head takes ViT-L/14's 768
    state = {f"layers.{k}": v for k, v in head.state_dict().items()}
    save_file(state, str(tmp_path / "head.safetensors"))
    torch.save(state, tmp_path / "head.pt")
    images = _images(3, 40, 40)
    a = Aesthetic(head=str(tmp_path / "head.safetensors"), model=str(clip_dir))
    scores = a(images, PROMPTS[:3])
    assert scores.shape == (3,) and scores.dtype == torch.float32
    emb = F.normalize(ClipScore(model=str(clip_dir)).clip.image_embeds(images), dim=-1)
    torch.testing.assert_close(scores, head.eval()(emb).squeeze(-1), atol=1e-6, rtol=0)
    b = build_reward("aesthetic", head=str(tmp_path / "head.pt"), model=str(clip_dir))
    assert torch.equal(b(images, PROMPTS[:3]), scores)


class _Payload:
    def __reduce__(self):  # unpickling this would create a file: the loader must refuse, not run it
        return (open, ("/tmp/densegrpo_should_not_exist", "w"))


def test_aesthetic_head_errors(clip_dir, tmp_path):
    with pytest.raises(ValueError, match=r"head='.*missing.pt': no such file"):
        Aesthetic(head=str(tmp_path / "missing.pt"), model=str(clip_dir))
    torch.save({"layers.0.weight": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="not a plain state dict of tensors"):
        Aesthetic(head=str(tmp_path / "evil.pt"), model=str(clip_dir))
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(_Payload(), protocol=2))
    with pytest.raises(ValueError, match="not a plain state dict"):
        Aesthetic(head=str(tmp_path / "raw.pt"), model=str(clip_dir))
    wrong = {f"layers.{k}": v for k, v in aesthetic_head(768).state_dict().items()}
    torch.save(wrong, tmp_path / "vitl.pt")
    with pytest.raises(ValueError, match=r"does not take the CLIP model's 16-d embeddings"):
        Aesthetic(head=str(tmp_path / "vitl.pt"), model=str(clip_dir))
    torch.save({"w": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not the LAION aesthetic MLP"):
        Aesthetic(head=str(tmp_path / "other.pt"), model=str(clip_dir))


def test_missing_weights_name_the_path_and_the_fix(tmp_path, clip_dir):
    with pytest.raises(ValueError) as e:
        build_reward("pickscore", model=str(tmp_path / "nope"), processor=str(clip_dir))
    msg = str(e.value)
    assert f"reward.kwargs.model='{tmp_path / 'nope'}'" in msg and "local_files_only" in msg
    assert "hf download yuvalkirstain/PickScore_v1 --local-dir DIR" in msg
    with pytest.raises(ValueError, match=r"reward.kwargs.processor='.*empty'"):
        (tmp_path / "empty").mkdir()
        build_reward("clip_score", model=str(clip_dir), processor=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="does not take reward.kwargs"):
        build_reward("pickscore", model=str(clip_dir), procesor=str(clip_dir))
    with pytest.raises(ValueError, match="dtype='fp8'"):
        build_reward("clip_score", model=str(clip_dir), dtype="fp8")


def test_bfloat16_weights_and_batch_chunks(clip_dir):
    images = _images(5, SIZE, SIZE)
    prompts = [*PROMPTS, "a cat"]
    full = ClipScore(model=str(clip_dir))(images, prompts)
    chunked = ClipScore(model=str(clip_dir), max_batch=2)(images, prompts)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=0)
    half = ClipScore(model=str(clip_dir), dtype="bfloat16")(images, prompts)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=0.05, rtol=0)  # bf16 weights: ~3 significant digits
    with pytest.raises(ValueError, match="5 images but 4 prompts"):
        ClipScore(model=str(clip_dir))(images, PROMPTS)


def test_building_a_reward_draws_no_loading_bar(clip_dir, capfd):
    """A reward model is built at every held-out evaluation: transformers' "Loading weights" bar would cut
    into the training's progress bar. The bar's setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    build_reward("pickscore", model=str(clip_dir), processor=str(clip_dir))
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()


def test_the_weights_the_ranks_compare_include_each_reward_model(clip_dir):
    """distributed.weights_of finds a reward's models through its attributes, in a weighted sum's parts too."""
    from densegrpo_fast.distributed import weights_of

    pick = build_reward("pickscore", model=str(clip_dir), processor=str(clip_dir))
    want = {id(t) for t in [*pick.clip.model.parameters(), *pick.clip.model.buffers()]}
    assert want and {id(t) for t in weights_of(pick)} == want
    spec = {"name": "pickscore", "kwargs": {"model": str(clip_dir), "processor": str(clip_dir)}}
    both = build_reward("multi", rewards={"a": spec, "b": {**spec, "weight": 0.5}})
    assert len(weights_of(both)) == 2 * len(want)  # (two models built, each counted once)
    assert weights_of(build_reward("jpeg_compressibility")) == []


def test_source_similarity_compares_each_edit_with_its_source(clip_dir, tmp_path):
    """``source_similarity``: the CLIP cosine of each image and its prompt's source, taken at the image's size;
    an edit equal to its source scores ``scale``; each source is embedded once; plain prompts are refused; a
    ``multi`` sees the sources only where all its parts do."""
    from PIL import Image

    from densegrpo_fast.prompts import EditPrompt, source_blind

    x = _images(3, SIZE, SIZE)
    for i in range(2):
        Image.fromarray((x[i].permute(1, 2, 0) * 255).round().byte().numpy()).save(tmp_path / f"s{i}.png")
    fn = build_reward("source_similarity", model=str(clip_dir), scale=100)
    prompts = [EditPrompt("keep it", str(tmp_path / f"s{i}.png")) for i in (0, 1, 0)]
    embedded = []
    image_embeds = fn.clip.image_embeds
    fn.clip.image_embeds = lambda images: embedded.append(len(images)) or image_embeds(images)
    got = fn(x, prompts)
    assert embedded == [2, 3]  # the two sources once, then the three images
    torch.testing.assert_close(got[:2], torch.full((2,), 100.0), rtol=0, atol=1e-3)
    torch.testing.assert_close(got[2:], 100 * (image_embeds(x[2:]) * image_embeds(x[:1])).sum(-1))
    assert got[2] < 99
    assert fn(x, prompts).tolist() == got.tolist() and embedded[2:] == [3]  # (the sources from the cache)
    with pytest.raises(ValueError, match=r"the prompt 'a plain caption' has none"):
        fn(x[:1], ["a plain caption"])
    assert fn.check_prompts(["a plain caption", prompts[0]]) == ["a plain caption"]
    parts = {"kept": {"name": "source_similarity", "kwargs": {"model": str(clip_dir)}}}
    assert source_blind(True, {"multi": build_reward("multi", rewards=parts)}) is None
    parts["looks"] = {"name": "clip_score", "kwargs": {"model": str(clip_dir)}}
    assert "['multi'] do not see the sources" in source_blind(
        True, {"multi": build_reward("multi", rewards=parts)}
    )
