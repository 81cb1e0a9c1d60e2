"""FLUX.1 Kontext policy (instruction editing) on tiny random components: the engine's sampler reproduces
FluxKontextPipeline from the same noise and source images; edit prompt files; one training iteration and a
resumed evaluation on edit records; the families that cannot edit refuse them."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import tiny_models as tiny
import torch
from PIL import Image

from densegrpo_fast.policies.base import Policy
from densegrpo_fast.policies.flux_kontext import FluxKontextPolicy
from densegrpo_fast.prompts import EditPrompt, PromptPriority, PromptSource, prompt_key, prompt_records
from densegrpo_fast.rollout import sample
from densegrpo_fast.schedule import Schedule

PROMPTS = ["make it red", "add a blue square"]
OPTS = dict(resolution=tiny.RESOLUTION, max_sequence_length=tiny.MAX_T5_TOKENS)
#: Source images: (height, width) of each; s3 has another aspect than the 32 px output.
SIZES = {"s0.png": (32, 32), "s1.png": (32, 32), "s2.png": (32, 48), "s3.png": (40, 24)}


@pytest.fixture(scope="module")
def pipe():
    return tiny.flux_kontext_pipeline(seed=0)


@pytest.fixture(scope="module")
def policy(pipe):
    return FluxKontextPolicy(pipe, **OPTS)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A folder of random-pixel PNGs, :data:`SIZES`."""
    return tiny.random_images(tmp_path_factory.mktemp("sources"), SIZES)


def edits(folder, files, texts=PROMPTS):
    return tiny.edit_prompts(folder, files, texts)


def test_implements_the_policy_contract(policy, sources):
    assert isinstance(policy, Policy) and policy.edits == "required"
    cond = policy.encode_prompts(edits(sources, ["s0.png", "s1.png"]))
    assert (
        cond.reference.shape == (2, 64, 16) and not cond.has_negative
    )  # 16 x 16 latent: 8 x 8 tokens of 4 x 4
    x = torch.randn(2, *policy.latent_shape)
    v = policy.velocity(x, torch.tensor([0.7, 0.3]), cond, 2.5)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()


@pytest.mark.parametrize(
    "hw, files",
    [((32, 32), ("s0.png", "s1.png")), ((32, 48), ("s2.png", "s2.png"))],
    ids=["square", "landscape"],
)
def test_engine_ode_reproduces_the_diffusers_pipeline(pipe, policy, sources, hw, files):
    """Zero noise, the same initial latents and source images (at the output's size, which the pipeline takes
    as they are with ``_auto_resize=False``): the engine's sampler is FluxKontextPipeline to 1e-5. Sampled with
    the sources swapped, the result moves: the source tokens reach the velocity."""
    from diffusers import FluxPipeline

    T, g = 4, 2.5
    policy = policy.at_resolution(hw, "model.resolution")
    prompts = edits(sources, files)
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    theirs, theirs_img = [], []
    for i, p in enumerate(prompts):  # (one call per prompt: the pipeline takes one source image per call)
        with Image.open(p.image) as img:
            image = img.convert("RGB")
        call = dict(prompt=str(p), image=image, height=hw[0], width=hw[1], max_area=hw[0] * hw[1],
                    _auto_resize=False, num_inference_steps=T, guidance_scale=g,
                    max_sequence_length=tiny.MAX_T5_TOKENS)  # fmt: skip
        packed = FluxPipeline._pack_latents(noise[i : i + 1], 1, *policy.latent_shape)
        latent = pipe(**call, latents=packed.clone(), output_type="latent").images
        theirs.append(FluxPipeline._unpack_latents(latent, *hw, policy.vae_scale_factor))
        theirs_img.append(pipe(**call, latents=packed.clone(), output_type="pt").images)
    theirs, theirs_img = torch.cat(theirs), torch.cat(theirs_img)

    grid = policy.sigma_grid(T)
    torch.testing.assert_close(grid, pipe.scheduler.sigmas, rtol=0, atol=3e-7)
    sched = Schedule(grid, torch.zeros(T))
    ours = sample(
        policy, policy.encode_prompts(prompts), noise, sched, guidance_scale=g, dense=False
    ).latents[:, T]
    diff = (ours - theirs).abs().max().item()
    diff_img = (policy.decode(ours) - theirs_img).abs().max().item()
    print(f"FLUX.1 Kontext g={g} {hw}: max |latent diff| {diff:.2e}, max |image diff| {diff_img:.2e}")
    assert diff <= 1e-5 and diff_img <= 1e-5
    other = edits(sources, ["s3.png", "s0.png" if hw == (32, 32) else "s3.png"])
    moved = sample(policy, policy.encode_prompts(other), noise, sched, guidance_scale=g, dense=False).latents[
        :, T
    ]
    assert (moved - ours).abs().max() > 1e-2


def test_one_table_row_per_instruction_and_image(policy, sources, monkeypatch):
    """The B rows of a batch hold each (instruction, image) once in the tables, each text once in the text
    encoders' batch and each file once in the VAE's; a source of another aspect is resized to cover the
    output and centre-cropped."""
    texts_encoded, files_read = [], []
    encode = policy._encode
    monkeypatch.setattr(policy, "_encode", lambda texts: texts_encoded.append(texts) or encode(texts))
    opened = Image.open
    monkeypatch.setattr(Image, "open", lambda path: files_read.append(path) or opened(path))
    a = edits(sources, ["s0.png", "s1.png"], [PROMPTS[0]] * 2)  # one instruction, two sources
    rows = [a[0], a[0], a[1], EditPrompt(PROMPTS[1], a[0].image), a[1]]
    cond = policy.encode_prompts(rows)
    assert texts_encoded == [PROMPTS] and files_read == [a[0].image, a[1].image]
    assert cond.tables["reference"].shape[0] == cond.tables["embeds"].shape[0] == 3
    assert cond.rows.tolist() == [0, 0, 1, 2, 1]
    ref = cond.reference
    assert torch.equal(ref[0], ref[3]) and not torch.equal(ref[0], ref[2])
    assert torch.equal(cond.embeds[0], cond.embeds[2]) and not torch.equal(cond.embeds[0], cond.embeds[3])

    # s3 (40 x 24) at 32 x 32: resized to 32 wide (53 high, Lanczos), then the middle 32 rows
    with Image.open(sources / "s3.png") as img:
        cover = img.convert("RGB").resize((32, 53), Image.LANCZOS).crop((0, 10, 32, 42))
    cover.save(sources / "s3_cropped.png")
    cropped = policy.encode_prompts(edits(sources, ["s3_cropped.png"], PROMPTS[:1])).reference
    torch.testing.assert_close(
        policy.encode_prompts(edits(sources, ["s3.png"], PROMPTS[:1])).reference, cropped
    )


def test_a_held_out_reward_may_not_take_a_field_name_of_the_scores_lines():
    from densegrpo_fast.config import ConfigError, TrainConfig, load_config

    with pytest.raises(ConfigError, match=r"eval.rewards.image: the key 'image' names a field"):
        load_config(TrainConfig, None, ["eval.rewards={image: {name: redness}}"])


def test_each_adapter_says_whether_it_edits_as_the_registry_does():
    from densegrpo_fast.policies import EDITING, PRETRAINED, adapter_class

    assert {f: adapter_class(f).edits for f in PRETRAINED} == {f: EDITING.get(f) for f in PRETRAINED}


def test_a_source_is_read_upright_by_its_exif_orientation(tmp_path):
    """A photo whose EXIF orientation says "rotate" is taken as its viewer shows it (as diffusers' load_image
    reads it), not as its pixels are stored."""
    from PIL import ImageOps

    from densegrpo_fast.prompts import load_source

    stored = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 16, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # (rotate 90 degrees clockwise to view)
    stored.save(tmp_path / "photo.png", exif=exif)
    upright = load_source(str(tmp_path / "photo.png"), 16, 8)
    assert upright.size == (8, 16)
    with Image.open(tmp_path / "photo.png") as img:
        assert np.array_equal(np.asarray(upright), np.asarray(ImageOps.exif_transpose(img).convert("RGB")))
    assert not np.array_equal(np.asarray(upright), np.asarray(stored.transpose(Image.TRANSPOSE)))


def test_prompts_without_a_source_image_or_with_an_unreadable_one_are_refused(policy, tmp_path):
    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ValueError, match=r"the source image .*cut.png.* cannot be read"):
        policy.encode_prompts([EditPrompt("make it red", str(tmp_path / "cut.png"))])
    with pytest.raises(
        ValueError,
        match=r'FLUX.1 Kontext edits a source image, and the prompt .make it red. has none.*"image"',
    ):
        policy.encode_prompts(PROMPTS)


def test_an_edit_prompt_file(tmp_path, sources):
    """A .jsonl line's ``image`` is a path relative to the file (or absolute); the prompt is its instruction
    (a str), carrying the image; an image that is missing, or a file that mixes edits and plain prompts, is
    refused with the line."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes((sources / "s0.png").read_bytes())
    path = tmp_path / "edits.jsonl"
    lines = [{"prompt": " make it red ", "image": "imgs/a.png", "tag": "colour"},
             {"prompt": "add a hat", "image": str(sources / "s1.png")}]  # fmt: skip
    path.write_text("".join(json.dumps(obj) + "\n" for obj in lines))
    (first, tag), (second, _) = prompt_records(path, "prompts.dataset")
    assert first == "make it red" and isinstance(first, str) and tag == "colour"
    assert first.image == str(tmp_path / "imgs" / "a.png") and second.image == str(sources / "s1.png")
    assert prompt_key(first) == ("make it red", first.image) and prompt_key("a cat") == ("a cat", None)
    again = pickle.loads(pickle.dumps(first))
    assert type(again) is EditPrompt and again == first and again.image == first.image
    assert PromptSource(str(path)).edits and not PromptSource("toy:train").edits

    for obj, said in [
        ({"prompt": "x", "image": "imgs/none.png"}, r"line 1: the image .*none.png.* is not a file"),
        ({"prompt": "x", "image": 3}, r"line 1: 'image' must be a non-empty path string"),
    ]:
        path.write_text(json.dumps(obj) + "\n")
        with pytest.raises(ValueError, match=said):
            prompt_records(path, "prompts.dataset")
    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"prompt": "a cat"}) + "\n")
    with pytest.raises(ValueError, match=r"line 2 has no .image. and line 1 has one"):
        PromptSource(str(path))


def test_priority_keeps_one_entry_per_instruction_and_image(tmp_path, sources):
    path = tmp_path / "edits.jsonl"
    path.write_text("".join(
        json.dumps({"prompt": "make it red", "image": str(sources / f)}) + "\n" for f in ("s0.png", "s1.png")
    ))  # fmt: skip
    priority = PromptPriority(PromptSource(str(path)), floor=0.1)
    first, second = PromptSource(str(path)).heldout(None)
    priority.observe([first], [0.0])
    assert priority.signal.tolist() == [0.5, 1.0]  # the same instruction on the other image keeps its signal


def _overrides(tmp_path, ckpt, dataset):
    return [
        "model.family=flux_kontext", f"model.checkpoint={ckpt}", f"model.resolution={tiny.RESOLUTION}",
        f"model.max_sequence_length={tiny.MAX_T5_TOKENS}", f"prompts.dataset={dataset}",
        "prompts.prompts_per_iteration=2", "sampling.num_steps=3", "sampling.group_size=2", "noise.kind=uniform",
        "reward.name=redness", "lora.rank=4", "grpo.train_batch_size=4", f"eval.dataset={dataset}",
        "eval.num_prompts=2", "eval.num_steps=2", "run.iterations=1", f"run.output_dir={tmp_path / 'run'}",
        "run.tensorboard=false",
    ]  # fmt: skip


def test_one_iteration_through_the_trainer_and_a_resumed_evaluation(pipe, sources, tmp_path, monkeypatch):
    """One DenseGRPO iteration on edit records (the guidance 2.5 of the family's defaults); the eval command's
    scores name each prompt's image, and a resume onto a file whose image changed at an index is refused."""
    import math

    from tolerances import assert_on_policy

    from densegrpo_fast import trainer
    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.evaluate import run_eval
    from densegrpo_fast.trainer import train

    pipe.save_pretrained(tmp_path / "kontext")
    dataset = tmp_path / "edits.jsonl"
    records = [
        {"prompt": t, "image": str(sources / f)} for t, f in zip(PROMPTS, ("s0.png", "s1.png"), strict=True)
    ]
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = load_config(
        TrainConfig, None, [*_overrides(tmp_path, tmp_path / "kontext", dataset), "run.sample_grid_every=1"]
    )
    assert cfg.sampling.guidance_scale == 2.5 and cfg.sampling.shift is None and cfg.eval.num_prompts == 2
    grids = []
    monkeypatch.setattr(trainer, "save_image_grid", lambda images, caps, path: grids.append((images, caps)))
    with pytest.warns(UserWarning, match=r"the rewards \['redness'\] do not see the sources"):
        run_dir = train(cfg, progress=False)
    # the sample grid: each group's source (as the policy took it) before its two edits
    images, caps = grids[0]  # (iteration 1's first two prompts, two rows each)
    assert len(caps) == 6 and [c.split("\n")[0] for c in caps[::3]] == ["source of", "source of"]
    first = str(caps[0].split("\n")[1])
    with Image.open(records[PROMPTS.index(first)]["image"]) as img:
        source = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(images[0], source)
    (step,) = [
        r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "reward_mean" in r
    ]
    assert step["rows_trained"] > 0 and math.isfinite(step["grad_norm"])
    assert_on_policy(step, exact=False)

    out = tmp_path / "eval"
    args = ["model.family=flux_kontext", f"model.checkpoint={tmp_path / 'kontext'}",
            f"model.resolution={tiny.RESOLUTION}", f"model.max_sequence_length={tiny.MAX_T5_TOKENS}",
            f"eval.dataset={dataset}", "eval.num_steps=2", f"eval.output_dir={out}", "eval.rewards={redness: {name: redness}}"]  # fmt: skip
    with pytest.warns(UserWarning, match=r"the rewards \['redness'\] do not see the sources"):
        first = run_eval(None, args, progress=False)
    scored = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["image"]) for r in scored] == [(r["prompt"], r["image"]) for r in records]
    # resumed with the file named from another working directory: no transformer call, the same scores
    calls = []
    velocity = FluxKontextPolicy.velocity
    monkeypatch.setattr(FluxKontextPolicy, "velocity", lambda *a, **k: calls.append(1) or velocity(*a, **k))
    monkeypatch.chdir(tmp_path)
    again = run_eval(None, [*args[:4], "eval.dataset=edits.jsonl", *args[5:]], progress=False)
    assert again["scores"] == first["scores"] and calls == []
    records[1]["image"] = str(sources / "s0.png")
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(ValueError, match=r"holds scores of prompt 1 .*s1.png.*s0.png"):
        run_eval(None, args, progress=False)


def test_families_that_do_not_edit_refuse_edit_records_and_kontext_refuses_plain_prompts(
    pipe, sources, tmp_path, capsys
):
    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.trainer import setup

    edit_file = tmp_path / "edits.jsonl"
    edit_file.write_text(json.dumps({"prompt": "make it red", "image": str(sources / "s0.png")}) + "\n")
    plain = tmp_path / "prompts.txt"
    plain.write_text("a red circle\n")
    toy = [f"prompts.dataset={edit_file}", f"run.output_dir={tmp_path / 'toy'}", "run.tensorboard=false"]
    with pytest.raises(ValueError, match=r"prompts.dataset=.*edits.jsonl.* source images.*model.family=toy"):
        setup(load_config(TrainConfig, None, toy), progress=False)
    from densegrpo_fast.cli import main

    toy_config = str(Path(__file__).resolve().parents[1] / "configs" / "toy_geneval.yaml")
    assert main(["validate", "--config", toy_config, f"eval.dataset={edit_file}"]) == 2
    assert "gives source images ('image' on its lines), which model.family=toy" in capsys.readouterr().err
    assert main(["eval", "--config", toy_config, f"eval.dataset={edit_file}"]) == 2  # (the toy's own report)
    assert "gives source images ('image' on its lines), which model.family=toy" in capsys.readouterr().err
    pipe.save_pretrained(tmp_path / "kontext")
    kontext = _overrides(tmp_path, tmp_path / "kontext", plain)
    with pytest.raises(ValueError, match=r"model.family=flux_kontext edits source images.*prompts.dataset"):
        setup(load_config(TrainConfig, None, kontext), progress=False)


def test_the_memory_estimate_reads_the_sources_and_matches_the_run(pipe, sources, tmp_path, capsys):
    """The estimate's fake tensors go through the source images' encoding (real pixels, fake VAE weights) and
    land on the run counted for real, to the byte but for a 12-byte tensor of the rollout's noise schedule
    that the real run holds while it encodes its second iteration's prompts; the ``memory`` command writes
    edit records of its own."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.memory import estimate_run, fake_policy, measure_run, new_fake_mode, run_memory
    from densegrpo_fast.policies import load_policy

    torch.set_num_threads(1)
    pipe.save_pretrained(tmp_path / "kontext")
    dataset = tmp_path / "edits.jsonl"
    files = ("s0.png", "s3.png")
    lines = [
        json.dumps({"prompt": t, "image": str(sources / f)}) for t, f in zip(PROMPTS, files, strict=True)
    ]
    dataset.write_text("".join(line + "\n" for line in lines))

    def config(name):
        (tmp_path / name).mkdir()
        extra = ["sampling.group_size=3", "grpo.train_batch_size=6", "grpo.beta=0.04", "run.iterations=2",
                 f"run.output_dir={tmp_path / name / 'run'}"]  # fmt: skip
        return load_config(
            TrainConfig, None, [*_overrides(tmp_path / name, tmp_path / "kontext", dataset), *extra]
        )

    real, fake = config("real"), config("fake")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # as the estimate runs
        policy = load_policy("flux_kontext", str(tmp_path / "kontext"), "cpu", **real.model.adapter_options())
        measured = measure_run(real, policy)
        policy, _ = fake_policy(fake, new_fake_mode())
        est = estimate_run(fake, policy)
    for phase, bytes_ in measured.items():  # (the 12 bytes: as FLUX.2 [klein]'s test says)
        assert 0 <= bytes_ - est.phases[phase] <= (12 if phase == "prompt encoding" else 0), phase
    assert measured["rollout + reward"] - sum(est.weights.values()) > 100_000
    assert est.calls["transformer"] > 0

    config_file = tmp_path / "kontext.yaml"
    config_file.write_text(
        f"model: {{family: flux_kontext, checkpoint: {tmp_path / 'kontext'}, resolution: {tiny.RESOLUTION}}}\n"
        "prompts: {dataset: /nonexistent/edits.jsonl, prompts_per_iteration: 2}\n"  # the estimate writes its own
        "sampling: {num_steps: 2, group_size: 2}\nreward: {name: redness}\nlora: {rank: 4}\n"
        "grpo: {train_batch_size: 4}\n"
    )
    out = run_memory(str(config_file), [], as_json=True)
    assert out.peak > sum(out.weights.values())
