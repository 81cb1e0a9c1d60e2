"""Qwen-Image-Edit (2509 / 2511) policy on tiny random components: the engine's sampler reproduces
QwenImageEditPlusPipeline from the same noise and source images (with Qwen2.5-VL's 3-D rotary positions for the
source's vision tokens, which the pipeline under transformers 5 does not pass); each (instruction, image) is
encoded once; a directory loads; one DenseGRPO iteration through the trainer on edit records."""

import json
import math

import numpy as np
import pytest
import tiny_models as tiny
import torch
from PIL import Image

from densegrpo_fast.policies.base import Policy
from densegrpo_fast.policies.qwen_image_edit import QwenImageEditPolicy, condition_size
from densegrpo_fast.prompts import EditPrompt
from densegrpo_fast.rollout import sample
from densegrpo_fast.schedule import Schedule

PROMPTS = ["make it red", "add a blue square"]
OPTS = dict(resolution=tiny.RESOLUTION, max_sequence_length=512)
#: Source images: (height, width) of each; s3 has another aspect than any output.
SIZES = {"s0.png": (32, 32), "s1.png": (32, 32), "s2.png": (32, 64), "s3.png": (40, 24)}


@pytest.fixture(scope="module")
def pipe():
    return tiny.qwen_image_edit_pipeline(seed=0)


@pytest.fixture(scope="module")
def policy(pipe):
    return QwenImageEditPolicy(pipe, **OPTS)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder


def edits(folder, files, texts=PROMPTS):
    return [EditPrompt(t, str(folder / f)) for t, f in zip(texts, files, strict=True)]


def test_implements_the_policy_contract(policy, sources):
    assert isinstance(policy, Policy) and policy.edits == "required"
    cond = policy.encode_prompts(edits(sources, ["s0.png", "s1.png"]))
    assert cond.reference.shape == (2, 64, 16) and cond.has_negative  # 16 x 16 latent: 8 x 8 tokens of 4 x 4
    assert cond.neg_embeds.shape[0] == 2  # (a negative per source image)
    x = torch.randn(2, *policy.latent_shape)
    v = policy.velocity(x, torch.tensor([0.7, 0.3]), cond, 4.0)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    # the source's latent tokens reach the velocity themselves (not only through the text encoder's view)
    swapped = policy.encode_prompts(edits(sources, ["s0.png", "s1.png"]))
    swapped.tables["reference"] = swapped.tables["reference"].flip(0)
    moved = policy.velocity(x, torch.tensor([0.7, 0.3]), swapped, 4.0)
    assert (moved - v).abs().max() > 1e-4  # (float rounding: 1e-7)
    with pytest.raises(ValueError, match=r"source image"):
        policy.encode_prompts(["make it red"])


def test_the_condition_size_is_the_pipelines():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
        CONDITION_IMAGE_SIZE,
        calculate_dimensions,
    )

    for w, h in [(512, 512), (1024, 768), (640, 1536), (32, 48)]:
        assert condition_size(w, h) == calculate_dimensions(CONDITION_IMAGE_SIZE, w / h)


def _mrope(text_encoder, image_id):
    """``text_encoder`` called with ``mm_token_type_ids`` (its image tokens), which the pipeline omits."""
    forward = text_encoder.forward

    def with_types(*args, input_ids=None, **kwargs):
        return forward(*args, input_ids=input_ids, mm_token_type_ids=(input_ids == image_id).int(), **kwargs)

    return with_types


@pytest.mark.parametrize(
    "hw, files",
    [((32, 32), ("s0.png", "s1.png")), ((32, 64), ("s2.png", "s2.png"))],  # (sides the pipeline keeps: x 32)
    ids=["square", "landscape"],
)
def test_engine_ode_reproduces_the_diffusers_pipeline(pipe, policy, sources, hw, files, monkeypatch):
    """Zero noise, the same initial latents and source images (at the output's size; the pipeline's VAE view
    of the source, about 1 MP, set to the output's size): the engine's sampler is QwenImageEditPlusPipeline to
    1e-5 with true CFG, once the pipeline's text encoder is told which tokens are the image's. Without that
    (the pipeline as it is under transformers 5) the source's vision tokens sit at text positions, and the
    embeds move; with the sources swapped, the result moves."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus
    from diffusers import QwenImagePipeline

    T, g = 4, 4.0
    policy = policy.at_resolution(hw, "model.resolution")
    prompts = edits(sources, files)
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", hw[0] * hw[1])

    def theirs_(typed: bool):
        latents, images = [], []
        image_id = pipe.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        with monkeypatch.context() as m:
            if typed:
                m.setattr(pipe.text_encoder, "forward", _mrope(pipe.text_encoder, image_id))
            for i, p in enumerate(prompts):  # (the pipeline takes one prompt per call)
                with Image.open(p.image) as img:
                    image = img.convert("RGB")
                call = dict(prompt=str(p), image=image, height=hw[0], width=hw[1], num_inference_steps=T,
                            true_cfg_scale=g, negative_prompt=" ")  # fmt: skip
                packed = QwenImagePipeline._pack_latents(noise[i : i + 1], 1, *policy.latent_shape)
                latent = pipe(**call, latents=packed.clone(), output_type="latent").images
                latents.append(
                    QwenImagePipeline._unpack_latents(latent, *hw, policy.vae_scale_factor)[:, :, 0]
                )
                images.append(pipe(**call, latents=packed.clone(), output_type="pt").images)
        return torch.cat(latents), torch.cat(images)

    theirs, theirs_img = theirs_(typed=True)
    grid = policy.sigma_grid(T)
    torch.testing.assert_close(grid, pipe.scheduler.sigmas, rtol=0, atol=3e-7)
    sched = Schedule(grid, torch.zeros(T))
    ours = sample(
        policy, policy.encode_prompts(prompts), noise, sched, guidance_scale=g, dense=False
    ).latents[:, T]
    diff = (ours - theirs).abs().max().item()
    diff_img = (policy.decode(ours) - theirs_img).abs().max().item()
    print(f"Qwen-Image-Edit g={g} {hw}: max |latent diff| {diff:.2e}, max |image diff| {diff_img:.2e}")
    assert diff <= 1e-5 and diff_img <= 1e-5 and ours.abs().max() > 0.1
    # the pipeline as it is: the source's vision tokens at text positions, another encoding
    view = policy._condition_image(prompts[0].image, *hw)
    untyped = pipe.encode_prompt(str(prompts[0]), image=[view], device="cpu")[0][0]
    ours_embeds = policy.encode_prompts(prompts[:1]).embeds[0]
    with monkeypatch.context() as m:
        m.setattr(
            pipe.text_encoder,
            "forward",
            _mrope(pipe.text_encoder, pipe.tokenizer.convert_tokens_to_ids("<|image_pad|>")),
        )
        typed = pipe.encode_prompt(str(prompts[0]), image=[view], device="cpu")[0][0]
    torch.testing.assert_close(ours_embeds, typed, rtol=1e-5, atol=1e-5)
    print(
        f"  the pipeline's embeds without the image tokens' positions: {(untyped - typed).abs().max():.2e} away"
    )
    assert (untyped - typed).abs().max() > 1e-4
    other = edits(sources, ["s3.png", "s0.png" if hw == (32, 32) else "s3.png"])
    moved = sample(policy, policy.encode_prompts(other), noise, sched, guidance_scale=g, dense=False).latents[
        :, T
    ]
    assert (moved - ours).abs().max() > 1e-3  # (100 x the tolerance above)


def test_one_table_row_per_instruction_and_image(policy, sources, monkeypatch):
    """Each (instruction, image) once in the tables and in the text encoder's batch (with its negative), each
    file read once for the text encoder's view and once for the VAE's."""
    calls = []
    body = policy.pipe.text_encoder.model
    forward = body.forward
    monkeypatch.setattr(body, "forward", lambda **kw: calls.append(kw["input_ids"].shape[0]) or forward(**kw))
    opened = Image.open
    files_read = []
    monkeypatch.setattr(Image, "open", lambda path: files_read.append(path) or opened(path))
    a = edits(sources, ["s0.png", "s1.png"], [PROMPTS[0]] * 2)  # one instruction, two sources
    rows = [a[0], a[0], a[1], EditPrompt(PROMPTS[1], a[0].image), a[1]]
    cond = policy.encode_prompts(rows)
    assert calls == [6]  # three (instruction, image) and their three negatives, in one call
    assert sorted(files_read) == sorted([a[0].image, a[1].image] * 2)
    assert cond.tables["reference"].shape[0] == cond.tables["embeds"].shape[0] == 3
    assert cond.rows.tolist() == [0, 0, 1, 2, 1]
    ref = cond.reference
    assert torch.equal(ref[0], ref[3]) and not torch.equal(ref[0], ref[2])
    # the same text with another image: another encoding (the text encoder sees the image)
    assert not torch.equal(cond.embeds[0], cond.embeds[2]) and not torch.equal(
        cond.neg_embeds[0], cond.neg_embeds[2]
    )
    assert torch.equal(cond.neg_embeds[0], cond.neg_embeds[3])  # (one negative per image)
    # rows encoded in one batch are each what they are alone
    alone = policy.encode_prompts([a[1]])
    n = int(alone.pooled.sum())
    torch.testing.assert_close(cond.embeds[2][:n], alone.embeds[0][:n], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def edit_dir(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_qwen_image_edit")
    pipe.save_pretrained(root)
    return root


def test_loads_a_diffusers_directory_without_its_processor(edit_dir, policy, sources):
    from densegrpo_fast.policies import load_policy

    loaded = load_policy("qwen_image_edit", str(edit_dir), "cpu", dtype="fp32", **OPTS)
    assert isinstance(loaded, QwenImageEditPolicy) and loaded.pipe.processor is None
    prompts = edits(sources, ["s0.png", "s1.png"])
    want, got = policy.encode_prompts(prompts), loaded.encode_prompts(prompts)
    for field in ("embeds", "pooled", "neg_embeds", "neg_pooled", "reference"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"reads each edit's source image.*model.prompt_cache=null"):
        load_policy("qwen_image_edit", str(edit_dir), "cpu", dtype="fp32", prompt_cache=str(edit_dir), **OPTS)


def test_one_densegrpo_iteration_on_edits(edit_dir, sources, tmp_path):
    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.trainer import train

    prompts = tmp_path / "edits.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t, "image": str(sources / f)}) + "\n"
                               for t, f in [("make it red", "s0.png"), ("add a blue square", "s1.png")]))  # fmt: skip
    cfg = load_config(TrainConfig, None, [
        "model.family=qwen_image_edit", f"model.checkpoint={edit_dir}", f"model.resolution={tiny.RESOLUTION}",
        f"prompts.dataset={prompts}", "prompts.prompts_per_iteration=2", "sampling.num_steps=3",
        "sampling.group_size=2", "noise.kind=uniform", "reward.name=redness", "lora.rank=4",
        "grpo.train_batch_size=4", "grpo.beta=0.04", f"eval.dataset={prompts}", "eval.num_prompts=2",
        "eval.num_steps=2", "run.iterations=1", "ema.every=1", f"run.output_dir={tmp_path / 'run'}",
        "run.tensorboard=false", "model.num_threads=1",
    ])  # fmt: skip
    run_dir = train(cfg, progress=False)
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (step,) = [r for r in recs if "reward_mean" in r]
    assert (
        all(math.isfinite(v) for v in step["dR_mean"]) and step["rows_trained"] > 0 and step["grad_norm"] > 0
    )


def test_the_memory_estimate_says_it_does_not_cover_the_family(edit_dir, tmp_path):
    from densegrpo_fast.memory import run_memory

    config_file = tmp_path / "edit.yaml"
    config_file.write_text(f"model: {{family: qwen_image_edit, checkpoint: {edit_dir}, resolution: 32}}\n")
    with pytest.raises(
        ValueError, match=r"does not cover Qwen-Image-Edit yet: its text encoder's vision tower"
    ):
        run_memory(str(config_file), [])
