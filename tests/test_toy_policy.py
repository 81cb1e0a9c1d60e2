"""Toy policy: the Policy contract, CFG in one call, checkpoints, and the checkpoint shipped in the package."""

import pytest
import torch

from densegrpo_fast.policies.base import Policy, PromptEmbeds
from densegrpo_fast.policies.toy import DEFAULT_CHECKPOINT, ToyArch, ToyPolicy
from densegrpo_fast.toy.evaluate import sample

TINY = ToyArch(num_layers=1, num_heads=2, head_dim=8, text_dim=8, pooled_dim=8)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ToyPolicy(TINY).eval()


def test_implements_the_policy_contract(tiny):
    assert isinstance(tiny, Policy)
    assert tiny.latent_shape == (3, 32, 32) and tiny.dtype == torch.float32 and tiny.device.type == "cpu"


def test_encode_prompts_gives_what_sd3_receives(tiny):
    cond = tiny.encode_prompts(["a red circle", "three squares"])
    assert isinstance(cond, PromptEmbeds) and len(cond) == 2
    assert cond.embeds.shape == (2, TINY.max_words, TINY.text_dim) and cond.pooled.shape == (
        2,
        TINY.pooled_dim,
    )
    assert cond.neg_embeds.shape == cond.embeds.shape and cond.neg_pooled.shape == cond.pooled.shape
    empty = tiny.encode_prompts([""], with_negative=False)
    assert torch.equal(cond.neg_embeds[0], empty.embeds[0]) and empty.pooled.abs().sum() == 0
    assert tiny.encode_prompts(["a circle"], with_negative=False).neg_embeds is None
    with pytest.raises(ValueError, match="'pink' .* not in the toy vocabulary"):
        tiny.encode_prompts(["a pink circle"])


def test_cfg_velocity_is_one_batched_call_of_both_branches(tiny):
    torch.manual_seed(1)
    x = torch.randn(3, 3, 32, 32)
    sigma = torch.tensor([0.9, 0.5, 0.1])
    cond = tiny.encode_prompts(["a circle", "a red square", "two triangles"])
    v_pos = tiny.velocity(x, sigma, PromptEmbeds(cond.embeds, cond.pooled))
    v_neg = tiny.velocity(x, sigma, PromptEmbeds(cond.neg_embeds, cond.neg_pooled))
    calls = []
    hook = tiny.transformer.register_forward_hook(lambda *a: calls.append(1))
    v = tiny.velocity(x, sigma, cond, guidance_scale=2.0)
    hook.remove()
    assert len(calls) == 1 and v.dtype == torch.float32 and v.shape == x.shape
    torch.testing.assert_close(v, v_neg + 2.0 * (v_pos - v_neg), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v_pos, v_neg)


def test_save_load_round_trip(tiny, tmp_path):
    tiny.save(tmp_path / "m.safetensors", {"step": 3})
    back = ToyPolicy.load(tmp_path / "m.safetensors")
    assert back.arch == TINY
    noise = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(
        sample(back, ["a circle", "a square"], noise, 3), sample(tiny, ["a circle", "a square"], noise, 3)
    )
    with pytest.raises(ValueError, match="does not exist"):
        ToyPolicy.load(tmp_path / "missing.safetensors")


def test_damaged_or_foreign_checkpoints_are_named_with_the_fix(tiny, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    good = tmp_path / "m.safetensors"
    tiny.save(good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(good)), str(bare))
    wider = tmp_path / "wider.safetensors"  # the metadata of another architecture than the weights
    save_file(load_file(str(good)), str(wider), metadata={"arch": json.dumps({**vars(TINY), "head_dim": 16})})
    for path, why in [
        (cut, "SafetensorError"),
        (bare, "ValueError: no 'arch' metadata"),
        (wider, "RuntimeError: Error"),
    ]:
        with pytest.raises(
            ValueError, match=rf"{path.name} is not a readable toy checkpoint \({why}.*pretrain-toy"
        ):
            ToyPolicy.load(path)
    with pytest.raises(ValueError, match="is a directory"):
        ToyPolicy.load(tmp_path)


def test_shipped_checkpoint_loads_and_generates():
    assert DEFAULT_CHECKPOINT.is_file(), "the pretrained toy checkpoint must ship inside the package"
    assert DEFAULT_CHECKPOINT.stat().st_size <= 15 * 2**20
    policy = ToyPolicy.load()
    noise = torch.randn(4, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    prompts = [
        "a red circle",
        "two squares",
        "a triangle left of a circle",
        "a blue square and a cyan triangle",
    ]
    img = sample(policy, prompts, noise, num_steps=8)
    assert img.shape == (4, 3, 32, 32) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1 and img.std() > 0.05
    torch.testing.assert_close(img, sample(policy, prompts, noise, num_steps=8))
