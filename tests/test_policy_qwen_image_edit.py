"""Qwen-Image-Edit (2509 / 2511) policy on tiny random components: the engine's sampler reproduces
QwenImageEditPlusPipeline from the same noise and source images (with Qwen2.5-VL's 3-D rotary positions for the
source's vision tokens, which the pipeline under transformers 5 does not pass); each (instruction, image) is
encoded once; a directory loads; one DenseGRPO iteration through the trainer on edit records."""

import json
import math

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
    """A folder of random-pixel PNGs, :data:`SIZES`."""
    return tiny.random_images(tmp_path_factory.mktemp("sources"), SIZES)


def edits(folder, files, texts=PROMPTS):
    return tiny.edit_prompts(folder, files, texts)


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


T_STEPS, G = 4, 4.0


def _reproduced(pipe, policy, sources, hw, files, monkeypatch):
    """The engine's ODE sample and QwenImageEditPlusPipeline's, from the same noise and sources (at the output's
    size; the pipeline's VAE view of the source, about 1 MP, set to the output's size), the pipeline's text
    encoder told which tokens are the image's: (max latent difference, max image difference, the engine's
    latents, the noise, the schedule)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus
    from diffusers import QwenImagePipeline

    policy = policy.at_resolution(hw, "model.resolution")
    prompts = edits(sources, files)
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", hw[0] * hw[1])
    latents, images = [], []
    image_id = pipe.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with monkeypatch.context() as m:
        m.setattr(pipe.text_encoder, "forward", _mrope(pipe.text_encoder, image_id))
        for i, p in enumerate(prompts):  # (the pipeline takes one prompt per call)
            with Image.open(p.image) as img:
                image = img.convert("RGB")
            call = dict(prompt=str(p), image=image, height=hw[0], width=hw[1], num_inference_steps=T_STEPS,
                        true_cfg_scale=G, negative_prompt=" ")  # fmt: skip
            packed = QwenImagePipeline._pack_latents(noise[i : i + 1], 1, *policy.latent_shape)
            latent = pipe(**call, latents=packed.clone(), output_type="latent").images
            latents.append(QwenImagePipeline._unpack_latents(latent, *hw, policy.vae_scale_factor)[:, :, 0])
            images.append(pipe(**call, latents=packed.clone(), output_type="pt").images)
    theirs, theirs_img = torch.cat(latents), torch.cat(images)
    grid = policy.sigma_grid(T_STEPS)
    torch.testing.assert_close(grid, pipe.scheduler.sigmas, rtol=0, atol=3e-7)
    sched = Schedule(grid, torch.zeros(T_STEPS))
    ours = sample(policy, policy.encode_prompts(prompts), noise, sched, guidance_scale=G, dense=False).latents
    ours = ours[:, T_STEPS]
    diff = (ours - theirs).abs().max().item()
    diff_img = (policy.decode(ours) - theirs_img).abs().max().item()
    print(f"Qwen-Image-Edit g={G} {hw}: max |latent diff| {diff:.2e}, max |image diff| {diff_img:.2e}")
    assert ours.abs().max() > 0.1
    return diff, diff_img, ours, noise, sched


@pytest.mark.parametrize(
    "hw, files",
    [((32, 32), ("s0.png", "s1.png")), ((32, 64), ("s2.png", "s2.png"))],  # (sides the pipeline keeps: x 32)
    ids=["square", "landscape"],
)
def test_engine_ode_reproduces_the_diffusers_pipeline(pipe, policy, sources, hw, files, monkeypatch):
    """The engine's sampler is QwenImageEditPlusPipeline to 1e-5 with true CFG (:func:`_reproduced`). The
    pipeline as it is under transformers 5 (its text encoder not told which tokens are the image's) puts the
    source's vision tokens at text positions, and its embeds move; with the sources swapped, the result moves."""
    diff, diff_img, ours, noise, sched = _reproduced(pipe, policy, sources, hw, files, monkeypatch)
    assert diff <= 1e-5 and diff_img <= 1e-5
    policy = policy.at_resolution(hw, "model.resolution")
    prompts = edits(sources, files)
    view = policy._condition_image(prompts[0].image, *hw)
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import (
        CONDITION_IMAGE_SIZE,
        calculate_dimensions,
    )

    assert view.size == calculate_dimensions(CONDITION_IMAGE_SIZE, hw[1] / hw[0])  # (the pipeline's view)
    untyped = pipe.encode_prompt(str(prompts[0]), image=[view], device="cpu")[0][0]
    ours_embeds = policy.encode_prompts(prompts[:1]).embeds[0]
    with monkeypatch.context() as m:
        image_id = pipe.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        m.setattr(pipe.text_encoder, "forward", _mrope(pipe.text_encoder, image_id))
        typed = pipe.encode_prompt(str(prompts[0]), image=[view], device="cpu")[0][0]
    torch.testing.assert_close(ours_embeds, typed, rtol=1e-5, atol=1e-5)
    away = (untyped - typed).abs().max()
    print(f"  the pipeline's embeds without the image tokens' positions: {away:.2e} away")
    assert away > 1e-4
    other = edits(sources, ["s3.png", "s0.png" if hw == (32, 32) else "s3.png"])
    moved = sample(policy, policy.encode_prompts(other), noise, sched, guidance_scale=G, dense=False).latents
    assert (moved[:, T_STEPS] - ours).abs().max() > 1e-3  # (100 x the tolerance above)


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
    assert calls == [5]  # three (instruction, image) and a negative per image, in one call
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


def test_the_memory_estimate_reads_the_sources_and_matches_the_run(edit_dir, sources, tmp_path, capsys):
    """The estimate's fake tensors go through the text encoder's language model on each prompt with its
    source's image tokens, and the source's latent, and land on the run counted for real: to the byte after
    prompt encoding, below it while the text encoder runs by the vision tower's activations, which the
    estimate does not count (its weights it does); the ``memory`` command writes edit records of its own."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.memory import estimate_run, fake_policy, measure_run, new_fake_mode, run_memory
    from densegrpo_fast.policies import load_policy

    torch.set_num_threads(1)
    dataset = tmp_path / "edits.jsonl"
    dataset.write_text("".join(json.dumps({"prompt": t, "image": str(sources / f)}) + "\n"
                               for t, f in zip(PROMPTS, ("s0.png", "s3.png"), strict=True)))  # fmt: skip

    def config(name):
        return load_config(TrainConfig, None, [
            "model.family=qwen_image_edit", f"model.checkpoint={edit_dir}", f"model.resolution={tiny.RESOLUTION}",
            "model.dtype=fp32", f"prompts.dataset={dataset}", "prompts.prompts_per_iteration=2",
            "sampling.num_steps=4", "sampling.group_size=3", "noise.kind=uniform", "reward.name=redness",
            "lora.rank=4", "grpo.train_batch_size=6", "grpo.beta=0.04", f"eval.dataset={dataset}",
            "run.iterations=2", f"run.output_dir={tmp_path / name / 'run'}", "run.tensorboard=false",
            "model.num_threads=1",
        ])  # fmt: skip

    real, fake = config("real"), config("fake")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # as the estimate runs
        policy = load_policy("qwen_image_edit", str(edit_dir), "cpu", **real.model.adapter_options())
        rope = policy.transformer.pos_embed  # (its rotary tables, cached on first use: see Qwen-Image's test)
        slack = 2 * (rope.pos_freqs.nbytes + rope.neg_freqs.nbytes)
        measured = measure_run(real, policy)
        policy, _ = fake_policy(fake, new_fake_mode())
        est = estimate_run(fake, policy)
    for phase, bytes_ in measured.items():
        gap = bytes_ - est.phases[phase]
        if phase in ("prompt encoding", "evaluation"):  # (the vision tower's activations: 0.3 % here)
            assert -slack <= gap <= slack + 0.01 * bytes_, (phase, gap)
        else:
            assert abs(gap) <= slack, (phase, gap)
    assert measured["rollout + reward"] - sum(est.weights.values()) > 10 * slack
    assert est.calls["transformer"] > 0

    config_file = tmp_path / "edit.yaml"
    config_file.write_text(
        f"model: {{family: qwen_image_edit, checkpoint: {edit_dir}, resolution: {tiny.RESOLUTION}}}\n"
        "prompts: {dataset: /nonexistent/edits.jsonl, prompts_per_iteration: 2}\n"  # the estimate writes its own
        "sampling: {num_steps: 2, group_size: 2}\nreward: {name: redness}\nlora: {rank: 4}\n"
        "grpo: {train_batch_size: 4}\n"
    )
    out = run_memory(str(config_file), [], as_json=True)
    assert out.peak > sum(out.weights.values())
    assert (
        "the text encoder's vision tower: its weights are counted, not its activations"
        in capsys.readouterr().out
    )


def test_2511s_zero_cond_t_transformer_reproduces_its_pipeline(sources, monkeypatch):
    """Qwen-Image-Edit-2511's transformer (``zero_cond_t``: the source's tokens at timestep 0, from
    ``img_shapes``) samples as its pipeline does, given the image tokens' positions."""
    pipe = tiny.qwen_image_edit_pipeline(seed=0, zero_cond_t=True)
    diff, diff_img, *_ = _reproduced(
        pipe, QwenImageEditPolicy(pipe, **OPTS), sources, (32, 32), ("s0.png", "s1.png"), monkeypatch
    )
    assert diff <= 1e-5 and diff_img <= 1e-5


def test_the_registry_and_the_config_refuse_a_prompt_cache(tmp_path):
    from densegrpo_fast.config import ConfigError, TrainConfig, load_config
    from densegrpo_fast.policies import PRETRAINED, TEXT_READS_SOURCES, adapter_class

    assert {f for f in PRETRAINED if adapter_class(f).text_reads_sources} == set(TEXT_READS_SOURCES)
    with pytest.raises(
        ConfigError, match=r"model.prompt_cache=.* with model.family qwen_image_edit: its text encoder reads"
    ):
        load_config(TrainConfig, None, ["model.family=qwen_image_edit", f"model.prompt_cache={tmp_path}"])
    from densegrpo_fast.prompt_cache import encode_config

    cfg = load_config(TrainConfig, None, ["model.family=qwen_image_edit"])
    cfg.model.prompt_cache = str(tmp_path)  # (past the config's check)
    with pytest.raises(ValueError, match=r"its text encoder reads each edit's source image"):
        encode_config(cfg, progress=False)


def test_the_first_qwen_image_edit_is_refused_and_a_processor_saved_by_transformers_5_is_found(
    edit_dir, tmp_path
):
    import shutil

    from densegrpo_fast.policies.pretrained import missing_parts
    from densegrpo_fast.policies.qwen_image_edit import COMPONENTS

    first = tmp_path / "first"
    shutil.copytree(edit_dir, first)
    index = json.loads((first / "model_index.json").read_text())
    (first / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImageEditPipeline"}))
    with pytest.raises(
        ValueError, match=r"is a QwenImageEditPipeline checkpoint.*give a 2509 or 2511 checkpoint"
    ):
        QwenImageEditPolicy.load(first, dtype="fp32", **OPTS)
    nested = tmp_path / "nested"
    shutil.copytree(edit_dir, nested)
    settings = json.loads((nested / "processor" / "preprocessor_config.json").read_text())
    (nested / "processor" / "preprocessor_config.json").unlink()
    assert missing_parts(nested, COMPONENTS) == ["processor/preprocessor_config.json"]
    (nested / "processor" / "processor_config.json").write_text(json.dumps({"image_processor": settings}))
    assert missing_parts(nested, COMPONENTS) == []


def test_the_text_encoder_takes_a_few_rows_at_a_time_to_the_same_result(policy, sources):
    """``encode_rows`` rows per text-encoder call, each call padded to its own longest: the embeds of one call
    of all the rows (the mask hides the padding; float rounding of another batch)."""
    import copy

    prompts = edits(sources, ["s0.png", "s1.png", "s3.png", "s0.png"], ["make it red", "add a blue square",
                                                                          "make it red", "a much longer instruction"])  # fmt: skip
    whole = policy.encode_prompts(prompts)
    few = copy.copy(policy)
    few.encode_rows = 2
    parts = few.encode_prompts(prompts)
    for field in ("embeds", "pooled", "neg_embeds", "neg_pooled", "reference"):
        torch.testing.assert_close(getattr(parts, field), getattr(whole, field), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("option", ["guidance_embeds", "use_additional_t_cond", "use_layer3d_rope"])
def test_a_guidance_distilled_or_layered_transformer_is_refused(option):
    with pytest.raises(ValueError, match=rf"sets \['{option}'\]: a guidance-distilled or a layered model's"):
        QwenImageEditPolicy(tiny.qwen_image_edit_pipeline(seed=0, **{option: True}), **OPTS)
