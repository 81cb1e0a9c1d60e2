"""The VQAScore reward (densegrpo_fast/rewards/vqascore.py) on a tiny random Qwen2.5-VL checkpoint."""

import pytest
import tiny_models as tiny
import torch

from densegrpo_fast.rewards import build_reward, kwargs_problems
from densegrpo_fast.rewards.images import to_uint8
from densegrpo_fast.rewards.vqascore import QUESTION, chat_prompt

PROMPTS = ["a cat", "two red dogs on a green sofa", 'a photo of the word "hello"', "x"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny.qwen_vl_checkpoint(tmp_path_factory.mktemp("tiny_qwen_vl"))


@pytest.fixture(scope="module")
def reward(checkpoint):
    r = build_reward("vqascore", model=str(checkpoint), dtype="float32", max_batch=3)
    r.model.lm_head.weight.data.mul_(40)  # peaked logits: a wrong position or pad moves the score visibly
    return r


def reference(r, image: torch.Tensor, prompt: str) -> float:
    """log P(answer | image, question) for one image alone (no padding), from the full logits: VQAScore's
    definition, written out."""
    pixels = r.image_processor(
        images=[to_uint8(image[None])[0].permute(1, 2, 0).numpy()], return_tensors="pt"
    )
    n = int(pixels["image_grid_thw"][0].prod()) // 4
    ids = r.tokenizer(chat_prompt(QUESTION.format(prompt=prompt), n)).input_ids + r.answer_ids
    typed = {}
    if r.typed:  # (transformers 5: the image tokens' 3-D positions need them)
        typed["mm_token_type_ids"] = (torch.tensor([ids]) == r.image_token).int()
    with torch.no_grad():
        logits = r.model(
            input_ids=torch.tensor([ids]), pixel_values=pixels["pixel_values"],
            image_grid_thw=pixels["image_grid_thw"], **typed,
        ).logits[0].double()  # fmt: skip
    A, L = len(r.answer_ids), len(ids)
    log_p = logits[L - A - 1 : L - 1].log_softmax(-1)
    return float(sum(log_p[i, t] for i, t in enumerate(r.answer_ids)))


def test_the_score_is_the_teacher_forced_probability_of_yes(reward):
    """Batched (chunks of 3, prompts of different lengths padded on the left, non-square images) = each
    image scored alone; the tiny tokenizer spells "Yes" in 3 tokens, so the answer's tokens are
    teacher-forced and their probabilities multiplied."""
    assert len(reward.answer_ids) == 3
    images = torch.rand(4, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    scores = reward(images, PROMPTS)
    assert scores.shape == (4,) and scores.dtype == torch.float32
    assert ((scores >= 0) & (scores <= 1)).all()
    ours = scores.double().log()
    theirs = torch.tensor([reference(reward, im, p) for im, p in zip(images, PROMPTS, strict=True)]).double()
    print(f"log scores {ours.tolist()}, alone {theirs.tolist()}")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert theirs.max() - theirs.min() > 0.05  # (the rows differ by far more than the tolerance)
    # the prompt and the image both matter
    assert reward(images[:1], ["a dog"])[0] != scores[0]
    assert reward(images[1:2], PROMPTS[:1])[0] != scores[0]


def test_the_image_tokens_get_their_3d_positions(reward, monkeypatch):
    """Qwen2.5-VL's rotary positions of the image tokens (rows and columns of its patch grid) are computed for
    every row: a batched-versus-alone comparison cannot see them missing (a whole row shifted by the same
    offset scores the same), so the call is watched."""
    body = reward.model.model
    calls = []

    def watched(*args, **kwargs):
        out = type(body).get_rope_index(body, *args, **kwargs)
        calls.append((kwargs.get("image_grid_thw", args[1] if len(args) > 1 else None), out[0]))
        return out

    monkeypatch.setattr(body, "get_rope_index", watched)
    reward(torch.rand(2, 3, 48, 40), PROMPTS[:2])
    ((grid, positions),) = calls
    assert grid is not None and positions.shape[0] == 3  # (temporal, height, width)
    assert not torch.equal(positions[1], positions[2])  # the image's rows and columns differ


def test_the_answers_log_probability_is_the_log_softmax_chunk_by_chunk(monkeypatch):
    from densegrpo_fast.rewards import vqascore

    monkeypatch.setattr(vqascore, "VOCAB_CHUNK", 100)  # 263 rows: 3 chunks, the last short
    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(16, 263).to(torch.bfloat16)
    hidden = torch.randn(2, 3, 16, generator=g).to(torch.bfloat16) * 8
    answer = torch.tensor([5, 200, 262])
    ours = vqascore.answer_log_probs(hidden, head, answer)
    full = (hidden.double() @ head.weight.double().T + head.bias.double()).log_softmax(-1)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), full[:, range(3), answer], rtol=0, atol=1e-5)


def test_bad_kwargs_are_named_and_missing_weights_say_what_to_download(checkpoint, tmp_path):
    assert kwargs_problems("vqascore", {"question": "Is it a cat?"})[0].startswith(
        "reward.kwargs.question='Is it a cat?' must contain {prompt}"
    )
    assert "format field other than {prompt}" in kwargs_problems("vqascore", {"question": "{prompt} {x}"})[0]
    assert kwargs_problems("vqascore", {"dtype": "fp8", "max_batch": 0, "answer": " "}) == [
        "reward.kwargs.dtype='fp8' is not one of ['bfloat16', 'float16', 'float32']",
        "reward.kwargs.answer=' ' must be the non-empty answer scored (VQAScore's: 'Yes')",
        "reward.kwargs.max_batch=0 must be a whole number >= 1",
    ]
    assert kwargs_problems("vqascore", {"model": "/x", "min_pixels": 3136}) == []
    with pytest.raises(
        ValueError, match=r"reward.kwargs.model='.*nothing': no model found there.*hf download"
    ):
        build_reward("vqascore", model=str(tmp_path / "nothing"))
    from densegrpo_fast.policies.architectures import qwen_tokenizer

    plain = tmp_path / "plain_tokenizer"
    qwen_tokenizer().save_pretrained(plain)
    (plain / "preprocessor_config.json").write_text((checkpoint / "preprocessor_config.json").read_text())
    with pytest.raises(ValueError, match=r"its tokenizer lacks Qwen2.5-VL's tokens \['<\|vision_start\|>'"):
        build_reward("vqascore", model=str(checkpoint), processor=str(plain), dtype="float32")


def test_the_memory_estimate_builds_its_architecture_with_fake_weights(checkpoint):
    """Within ``architectures_only`` (``densegrpo-fast memory``): the checkpoint's architecture, or
    Qwen2.5-VL-7B's built-in one for the default id not on disk (noted as stood in for), with fake weights
    in the reward's dtype and nothing read; it scores fake images as zeros (nothing to score with)."""
    from densegrpo_fast.memory import _is_fake, new_fake_mode, reward_builder
    from densegrpo_fast.rewards.clip import architectures_only

    mode = new_fake_mode()
    with architectures_only(reward_builder(mode)) as stood_in:
        default = build_reward("vqascore")
        on_disk = build_reward("vqascore", model=str(checkpoint), dtype="float32")
    assert stood_in == ["Qwen/Qwen2.5-VL-7B-Instruct"]
    params = list(default.model.parameters())
    assert sum(p.numel() for p in params) == 8_292_166_656  # (Qwen2.5-VL-7B-Instruct)
    assert all(_is_fake(p) and p.dtype == torch.bfloat16 for p in params)
    real = build_reward("vqascore", model=str(checkpoint), dtype="float32").model
    assert [(n, p.shape) for n, p in on_disk.model.named_parameters()] == [
        (n, p.shape) for n, p in real.named_parameters()
    ]
    with mode:
        scores = on_disk(torch.rand(2, 3, 64, 64), PROMPTS[:2])
    assert scores.shape == (2,) and _is_fake(scores)
    missing = r"reward.kwargs.model='/nowhere': no model found there"
    with pytest.raises(ValueError, match=missing), architectures_only(reward_builder(mode)):
        build_reward("vqascore", model="/nowhere")
