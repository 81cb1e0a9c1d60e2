"""The HPSv3 reward (densegrpo_fast/rewards/hpsv3.py) on a tiny random Qwen2-VL saved as HPSv3 is released."""

import pytest
import torch

from densegrpo_fast.rewards import build_reward, kwargs_problems
from densegrpo_fast.rewards.hpsv3 import REWARD_TOKEN, reward_head
from densegrpo_fast.rewards.images import to_uint8

PROMPTS = ["a cat", "two red dogs on a green sofa", 'a photo of the word "hello"', "x"]
#: An instruction of HPSv3's shape (the real one is not shipped): the prompt inside, lines around it.
INSTRUCTION = (
    "\nRate this image for quality and for how well it shows the prompt.\nPrompt - {text_prompt}\n\n\n"
)
PIXELS = 28 * 28 * 16  # (the tiny checkpoint's images: 112 x 112 px for a square, 16 image tokens)


def tiny_qwen2_vl(tokenizer, vocab: int):
    """A two-layer Qwen2-VL (16 wide, one vision block of 14 px patches merged 2 x 2) for ``tokenizer``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    start, image, video = tokenizer.convert_tokens_to_ids(
        ["<|vision_start|>", "<|image_pad|>", "<|video_pad|>"]
    )
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        text_config=dict(
            hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=4096, rope_theta=1000000.0,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=16, mlp_ratio=2, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        vocab_size=vocab, vision_start_token_id=start, image_token_id=image, video_token_id=video,
    ))  # fmt: skip


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(base folder, checkpoint file, the whole model, its head): a tiny Qwen2-VL "base" (config, tokenizer,
    image processor) and a reward model of it with ``<|Reward|>`` added, saved as HPSv3.safetensors is
    (transformers 4.45's key layout: ``model.``, ``visual.``, ``lm_head.``, ``rm_head.``)."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLImageProcessor

    from densegrpo_fast.policies.architectures import qwen_vl_tokenizer

    root = tmp_path_factory.mktemp("tiny_hpsv3")
    tokenizer = qwen_vl_tokenizer()
    torch.manual_seed(0)
    base = tiny_qwen2_vl(tokenizer, len(tokenizer))
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=64 * 64).save_pretrained(root / "base")
    model = tiny_qwen2_vl(tokenizer, len(tokenizer) + 1).eval()
    head = reward_head(16).eval()
    with torch.no_grad():  # a head whose mean moves visibly with the hidden state
        for p in head.parameters():
            p.normal_(0, 0.5)
    state = {}
    for name, t in model.state_dict().items():
        if name.startswith("model.visual."):
            name = name[len("model.") :]
        elif name.startswith("model.language_model."):
            name = "model." + name[len("model.language_model.") :]
        state[name] = t.to(torch.bfloat16).contiguous()
    state |= {f"rm_head.{n}": t.contiguous() for n, t in head.state_dict().items()}
    save_file(state, root / "HPSv3.safetensors")
    return root / "base", root / "HPSv3.safetensors", model, head


@pytest.fixture(scope="module")
def reward(released, tmp_path_factory):
    base, ckpt, _, _ = released
    path = tmp_path_factory.mktemp("instruction") / "instruction.txt"
    path.write_text(INSTRUCTION)
    return build_reward(
        "hpsv3", checkpoint=str(ckpt), instruction_file=str(path), model=str(base), dtype="float32",
        max_batch=3, pixels=PIXELS,
    )  # fmt: skip


def reference(released, r, image: torch.Tensor, prompt: str, positions: str = "1d") -> float:
    """One 48 x 40 image alone, resized as HPSv3 resizes it (PIL bicubic on uint8, to 140 x 112: about
    PIXELS in multiples of 28 px), its whole chat as the chat template writes it (the turn closed after the
    reward token, the assistant's turn opened), through transformers' own Qwen2-VL with the checkpoint's
    weights (bf16, as saved), as the released model ran it: the input embeddings made by hand, the image's
    features put at its tokens, the language model called with no positions (1-D: every token its index).
    ``positions="3d"``: the whole model called with Qwen2-VL's own image positions, which it never had."""
    from PIL import Image

    _, _, model, head = released
    pil = Image.fromarray(to_uint8(image[None])[0].permute(1, 2, 0).numpy()).resize((112, 140), Image.BICUBIC)
    pixels = r.image_processor(images=[pil], do_resize=False, return_tensors="pt")
    assert pixels["image_grid_thw"][0].tolist() == [1, 10, 8]
    n = int(pixels["image_grid_thw"][0].prod()) // 4
    text = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
        f"{'<|image_pad|>' * n}<|vision_end|>{INSTRUCTION.format(text_prompt=prompt)}"
        "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = torch.tensor([r.tokenizer(text).input_ids])
    (at,) = (ids[0] == r.reward_id).nonzero()[0]
    bf16 = model.to(torch.bfloat16).float()  # (the weights as the file holds them)
    with torch.no_grad():
        if positions == "3d":
            out = bf16(input_ids=ids, pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
                       mm_token_type_ids=(ids == r.image_token).int(), output_hidden_states=True)  # fmt: skip
            hidden = out.hidden_states[-1]
        else:
            body = bf16.model
            embeds = body.get_input_embeddings()(ids)
            feats = body.get_image_features(pixels["pixel_values"], pixels["image_grid_thw"]).pooler_output
            mask = (ids == r.image_token)[..., None].expand_as(embeds)
            embeds = embeds.masked_scatter(mask, torch.cat(feats).to(embeds.dtype))
            hidden = body.language_model(inputs_embeds=embeds, position_ids=None).last_hidden_state
        return float(head(hidden[0, at])[0])


def test_the_score_is_the_heads_mean_at_the_reward_token(released, reward):
    """Batched (chunks of 3, prompts of different lengths padded on the right, non-square images) = each image
    scored alone through the whole chat (what follows the reward token cannot matter), with 1-D positions."""
    images = torch.rand(4, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    scores = reward(images, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    alone = torch.tensor([reference(released, reward, im, p) for im, p in zip(images, PROMPTS, strict=True)])
    print(f"scores {scores.tolist()}, alone {alone.tolist()}")
    # (float32 through other batch shapes and masks: measured 1.7e-6 relative, of scores near -29)
    torch.testing.assert_close(scores, alone, rtol=1e-5, atol=0)
    assert alone.max() - alone.min() > 0.1  # (the rows differ by far more than the tolerance)
    # Qwen2-VL's own 2-D image positions would give other scores: tens of times the batching's rounding
    # (measured 4.6e-3 against 4.9e-5)
    three_d = reference(released, reward, images[0], PROMPTS[0], positions="3d")
    print(f"with 3-D image positions {three_d}")
    assert abs(three_d - alone[0]) > 10 * (scores - alone).abs().max()
    # the prompt and the image both matter
    assert reward(images[:1], ["a dog"])[0] != scores[0]
    assert reward(images[1:2], PROMPTS[:1])[0] != scores[0]


def test_every_image_is_resized_to_the_pixels_it_was_trained_at(released):
    """By default every image becomes about 256 x 28 x 28 pixels in multiples of 28 px, as HPSv3 was trained:
    448 x 448 for 1024 x 1024, 588 x 336 for 1920 x 1080 (HPSv3's published examples), whatever the
    checkpoint's image processor says (the tiny one's maximum is 64 x 64)."""
    base, ckpt, _, _ = released
    r = build_reward("hpsv3", checkpoint=str(ckpt), instruction=INSTRUCTION, model=str(base), dtype="float32")
    for (h, w), (rows, cols) in [
        ((1024, 1024), (448, 448)),
        ((1080, 1920), (336, 588)),
        ((48, 40), (504, 420)),
    ]:
        grid = r._inputs(torch.rand(1, 3, h, w), ["a"], torch.device("cpu"))["image_grid_thw"][0]
        assert grid.tolist() == [1, rows // 14, cols // 14], (h, w)


def test_special_tokens_in_a_prompt_or_the_instruction_are_refused(reward):
    with pytest.raises(
        ValueError, match=r"prompt 'a <\|Reward\|> dog' holds the special tokens \['<\|Reward\|>'\]"
    ):
        reward(torch.rand(2, 3, 32, 32), ["a cat", f"a {REWARD_TOKEN} dog"])
    with pytest.raises(ValueError, match=r"holds the special tokens \['<\|image_pad\|>'\]"):
        reward(torch.rand(1, 3, 32, 32), ["a <|image_pad|>"])
    (problem,) = kwargs_problems("hpsv3", {"checkpoint": "c", "instruction": "{text_prompt} <|Reward|>"})
    assert "holds the special tokens ['<|Reward|>']" in problem


def test_hpsv3s_own_module_is_read_for_its_instruction_byte_for_byte(released, reward, tmp_path):
    """``instruction_file`` = HPSv3's data_collator_qwen.py: its INSTRUCTION assignment, parsed (not run: the
    module's imports are not available), its leading newline and trailing spaces kept; a text file is read
    whole; a module without the assignment is refused."""
    from densegrpo_fast.rewards.hpsv3 import read_instruction

    text = "\nFirst line, then two spaces:  \nPrompt - {text_prompt}\n\n\n"
    module = tmp_path / "data_collator_qwen.py"
    module.write_text(
        "import not_installed_here\n"
        f"# INSTRUCTION = {'a commented-out one {text_prompt}'!r}\n"
        f"INSTRUCTION = (\n    {text[:20]!r}\n    {text[20:]!r}\n)\n"
        "def prompt_with_special_token(p):\n    return p\n"
    )
    assert read_instruction(module) == text
    (tmp_path / "plain.txt").write_text(text)
    assert read_instruction(tmp_path / "plain.txt") == text
    (tmp_path / "other.py").write_text("X = 1\n")
    with pytest.raises(ValueError, match=r"assigns no INSTRUCTION string at its top level"):
        read_instruction(tmp_path / "other.py")
    base, ckpt, _, _ = released
    module.write_text(f"INSTRUCTION = {INSTRUCTION!r}\n")
    from_module = build_reward("hpsv3", checkpoint=str(ckpt), instruction_file=str(module), model=str(base),
                               dtype="float32", pixels=PIXELS)  # fmt: skip
    images = torch.rand(2, 3, 40, 40)
    assert torch.equal(from_module(images, PROMPTS[:2]), reward(images, PROMPTS[:2]))


def test_bad_kwargs_and_missing_files_are_named(released, tmp_path):
    base, ckpt, _, _ = released
    (problem,) = kwargs_problems("hpsv3", {"checkpoint": "/x.safetensors"})
    assert problem.startswith("reward hpsv3 needs its instruction") and "data_collator_qwen.py" in problem
    assert (
        "reward hpsv3 needs reward.kwargs.checkpoint"
        in kwargs_problems("hpsv3", {"instruction": "{prompt}"})[0]
    )
    assert (
        "exactly one of {text_prompt}"
        in kwargs_problems("hpsv3", {"checkpoint": "c", "instruction": "Rate it."})[0]
    )
    assert (
        "format field other than"
        in kwargs_problems("hpsv3", {"checkpoint": "c", "instruction": "{prompt} {x}"})[0]
    )
    assert kwargs_problems("hpsv3", {"checkpoint": "c", "instruction": "a", "instruction_file": "b"}) == [
        "reward.kwargs.instruction and reward.kwargs.instruction_file both given: keep one"
    ]
    assert kwargs_problems("hpsv3", {"checkpoint": "c", "instruction": "{prompt}", "pixels": 0}) == [
        "reward.kwargs.pixels=0 must be a whole number >= 1"
    ]
    assert (
        "cannot be read"
        in kwargs_problems("hpsv3", {"checkpoint": "c", "instruction_file": "/no/file.txt"})[0]
    )
    ok = {"checkpoint": str(ckpt), "instruction": INSTRUCTION, "model": str(base), "dtype": "float32"}
    with pytest.raises(
        ValueError, match=r"reward.kwargs.checkpoint='.*nowhere.safetensors' does not exist.*hf download"
    ):
        build_reward("hpsv3", **{**ok, "checkpoint": str(tmp_path / "nowhere.safetensors")})
    with pytest.raises(
        ValueError, match=r"reward.kwargs.model='.*nothing': no model found there.*hf download"
    ):
        build_reward("hpsv3", **{**ok, "model": str(tmp_path / "nothing")})
    with pytest.raises(ValueError, match=r"instruction_file='.*absent.txt' cannot be read"):
        build_reward("hpsv3", **{**{k: v for k, v in ok.items() if k != "instruction"},
                                 "instruction_file": str(tmp_path / "absent.txt")})  # fmt: skip
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt)
    del state["rm_head.5.bias"]
    save_file(state, tmp_path / "cut.safetensors")
    with pytest.raises(
        ValueError, match=r"not an HPSv3 checkpoint.*1 weights missing \(e.g. \['head.5.bias'\]\)"
    ):
        build_reward("hpsv3", **{**ok, "checkpoint": str(tmp_path / "cut.safetensors")})
    state = load_file(ckpt)
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:-1]  # (no row for <|Reward|>)
    save_file(state, tmp_path / "short.safetensors")
    with pytest.raises(
        ValueError, match=r"embed_tokens.weight is \(\d+, 16\) there.*another vocabulary size"
    ):
        build_reward("hpsv3", **{**ok, "checkpoint": str(tmp_path / "short.safetensors")})


def test_the_later_key_layout_loads_too(released, reward, tmp_path):
    """A checkpoint saved by transformers >= 4.52 (``model.language_model.``, ``model.visual.``) scores the same."""
    from safetensors.torch import load_file, save_file

    base, ckpt, _, _ = released
    renamed = {}
    for name, t in load_file(ckpt).items():
        if name.startswith("visual."):
            name = "model." + name
        elif name.startswith("model."):
            name = "model.language_model." + name[len("model.") :]
        renamed[name] = t
    save_file(renamed, tmp_path / "later.safetensors")
    later = build_reward("hpsv3", checkpoint=str(tmp_path / "later.safetensors"), instruction=INSTRUCTION,
                         model=str(base), dtype="float32", pixels=PIXELS)  # fmt: skip
    images = torch.rand(2, 3, 40, 40)
    assert torch.equal(later(images, PROMPTS[:2]), reward(images, PROMPTS[:2]))


def test_the_memory_estimate_builds_its_architecture_with_fake_weights(released):
    """Within ``architectures_only`` (``densegrpo-fast memory``): Qwen2-VL-7B's built-in architecture for the
    default id not on disk (noted as stood in for), with <|Reward|>'s row and the float32 head, fake weights,
    nothing read; it scores fake images as zeros."""
    from densegrpo_fast.memory import _is_fake, new_fake_mode, reward_builder
    from densegrpo_fast.rewards.clip import architectures_only

    mode = new_fake_mode()
    with architectures_only(reward_builder(mode)) as stood_in:
        default = build_reward("hpsv3", checkpoint="/nowhere/HPSv3.safetensors", instruction="{prompt}")
    assert stood_in == ["Qwen/Qwen2-VL-7B-Instruct"]
    params = list(default.model.parameters())
    # Qwen2-VL-7B-Instruct's 8_291_375_616 parameters without its LM head (152064 x 3584), its embedding cut
    # to 151658 rows
    assert sum(p.numel() for p in params) == 8_291_375_616 - 152064 * 3584 - (152064 - 151658) * 3584
    assert all(_is_fake(p) and p.dtype == torch.bfloat16 for p in params)
    assert all(_is_fake(p) and p.dtype == torch.float32 for p in default.head.parameters())
    assert default.model.language_model.embed_tokens.weight.shape == (151658, 3584)
    assert (
        sum(p.numel() for p in default.head.parameters()) == 3584 * 1024 + 1024 + 1024 * 16 + 16 + 16 * 2 + 2
    )
