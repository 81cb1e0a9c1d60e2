"""FLUX.2 [klein] policy on tiny random components: the contract (patchified, batch-normalised latents, the
three Qwen3 layers side by side, CFG in one batched call, a distilled checkpoint's refusal of guidance),
Flux2KleinPipeline's grid with its empirical mu, the pipeline reproduced by the engine's sampler, and the
trainer, the LoRA export and the memory estimate on it."""

import math

import pytest
import tiny_models as tiny
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu
from tolerances import assert_on_policy

from densegrpo_fast.policies import load_policy
from densegrpo_fast.policies.base import Policy
from densegrpo_fast.policies.flux2_klein import Flux2KleinPolicy
from densegrpo_fast.rollout import sample
from densegrpo_fast.schedule import Schedule, flux_sigma_grid

PROMPTS = ["a red circle", "two blue squares beside a tall green tree"]
#: Below the 79 tokens the byte-level tokenizer gives the second prompt in its chat template (the first: 50),
#: so that truncation is exercised; every prompt is padded to it.
MAX_TOKENS = 64
OPTS = dict(resolution=tiny.RESOLUTION, max_sequence_length=MAX_TOKENS)


@pytest.fixture(scope="module")
def pipe():
    return tiny.flux2_klein_pipeline(seed=0)


@pytest.fixture(scope="module")
def policy(pipe):
    return Flux2KleinPolicy(pipe, **OPTS)


@pytest.fixture(scope="module")
def klein_dir(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_flux2_klein")
    pipe.save_pretrained(root)
    return root


def _latents_as_the_pipeline_returns_them(pipe, latents):
    """The engine's latents [B, 128-like, h, w] -> the pipeline's ``output_type="latent"``: the VAE's
    batch-norm statistics undone, unpatchified."""
    mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
    return Flux2KleinPipeline._unpatchify_latents(latents * std + mean)


def test_implements_the_policy_contract(policy, pipe):
    assert isinstance(policy, Policy)
    # the engine sees the patchified latent: 4 VAE channels x 2 x 2 = 16, 32 px / (factor 2 x 2) = 8
    assert policy.latent_shape == (16, 8, 8) and policy.dtype == torch.float32
    for m in (pipe.vae, pipe.text_encoder, policy.transformer):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    cond = policy.encode_prompts([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    assert cond.embeds.shape == (3, MAX_TOKENS, 48) and cond.pooled.shape == (3, 1)  # 3 layers x 16 wide
    assert cond.has_negative and cond.neg_embeds.shape == cond.embeds.shape
    assert torch.equal(cond.embeds[0], cond.embeds[2]) and not torch.equal(cond.embeds[0], cond.embeds[1])
    images = policy.decode(torch.randn(2, *policy.latent_shape))
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    with pytest.raises(ValueError, match=r"model.resolution \(42\) must be a multiple of 4"):
        Flux2KleinPolicy(pipe, resolution=42, max_sequence_length=MAX_TOKENS)  # (VAE factor 2 x 2x2 patches)


@pytest.mark.parametrize("max_tokens", [MAX_TOKENS, 128])
def test_the_prompt_embeds_are_the_pipelines(pipe, max_tokens):
    """The adapter's encode (the decoder alone, no LM head) gives ``Flux2KleinPipeline.encode_prompt``'s
    embeds to the bit, prompts cut (64 tokens) or not (128)."""
    policy = Flux2KleinPolicy(pipe, resolution=tiny.RESOLUTION, max_sequence_length=max_tokens)
    prompts = [*PROMPTS, ""]
    theirs, text_ids = pipe.encode_prompt(list(prompts), device="cpu", max_sequence_length=max_tokens)
    ours, _ = policy._encode(prompts)
    assert ours.shape == theirs.shape == (3, max_tokens, 48) and text_ids.shape == (3, max_tokens, 4)
    assert torch.equal(ours, theirs)


def test_cfg_is_one_batched_call(policy):
    x = torch.randn(2, *policy.latent_shape)
    sigma = torch.tensor([0.9, 0.3])
    cond = policy.encode_prompts(PROMPTS)
    rows = []
    hook = policy.transformer.register_forward_hook(
        lambda m, a, kw, out: rows.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    v = policy.velocity(x, sigma, cond, guidance_scale=4.0)
    v_pos = policy.velocity(x, sigma, cond, guidance_scale=1.0)
    v_neg = policy.velocity(x, sigma, policy.encode_prompts(["", ""], with_negative=False))
    hook.remove()
    assert rows == [4, 2, 2] and v.dtype == torch.float32 and v.shape == x.shape
    torch.testing.assert_close(v, v_neg + 4.0 * (v_pos - v_neg), rtol=0, atol=2e-5)
    assert (v - v_pos).abs().max() > 1e-3  # (the guidance moves it)
    alone = policy.velocity(x[1:], sigma[1:], policy.encode_prompts(PROMPTS[1:]), guidance_scale=4.0)
    torch.testing.assert_close(alone, v[1:], rtol=0, atol=2e-5)


def test_a_distilled_checkpoint_takes_no_guidance(tmp_path):
    """A step-distilled checkpoint (``is_distilled`` in its model_index.json) encodes no negative prompt, and a
    guidance scale other than 1 is refused by the adapter and, as soon as it is loaded, by the trainer; the
    memory estimate builds it distilled too."""
    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.memory import fake_policy, new_fake_mode
    from densegrpo_fast.trainer import setup

    pipe = tiny.flux2_klein_pipeline(seed=0, distilled=True)
    distilled = Flux2KleinPolicy(pipe, **OPTS)
    cond = distilled.encode_prompts(PROMPTS)
    assert not cond.has_negative  # (no negative prompt encoded)
    x, sigma = torch.randn(2, *distilled.latent_shape), torch.tensor([0.9, 0.3])
    assert distilled.velocity(x, sigma, cond).shape == x.shape
    with pytest.raises(ValueError, match=r"guidance scale \(4.0\).*step-distilled \(is_distilled\)"):
        distilled.velocity(x, sigma, cond, 4.0)
    root = tmp_path / "distilled"
    pipe.save_pretrained(root)
    overrides = _overrides(root, tmp_path)
    cfg = load_config(TrainConfig, None, overrides)
    assert fake_policy(cfg, new_fake_mode())[0].distilled
    with pytest.raises(ValueError, match=r"^sampling.guidance_scale \(4.0\): .*step-distilled"):
        setup(cfg, progress=False)
    with pytest.raises(ValueError, match=r"^eval.guidance_scale \(4.0\): .*step-distilled"):
        setup(load_config(TrainConfig, None, [*overrides, "sampling.guidance_scale=1"]), progress=False)


def test_bf16_transformer_sees_the_pipelines_timesteps(pipe):
    """In bf16 the transformer gets Flux2KleinPipeline's timestep values at every step of a 50-step grid (the
    pipeline casts ``1000 sigma`` to the latents' dtype, then divides), not a plain cast of sigma, and from the
    same first latents returns the same velocity, bit for bit."""
    import copy

    bf16 = copy.copy(pipe)  # everything but the VAE in bf16, as the engine loads a checkpoint
    for name in ("transformer", "text_encoder"):
        setattr(bf16, name, copy.deepcopy(getattr(pipe, name)).to(torch.bfloat16))
    policy = Flux2KleinPolicy(bf16, **OPTS)
    calls = []  # (the timestep, the output)
    hook = bf16.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append((kwargs["timestep"], out[0])), with_kwargs=True
    )
    T = 50
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    try:
        bf16(prompt=list(PROMPTS), height=32, width=32, num_inference_steps=T, guidance_scale=1.0,
             max_sequence_length=MAX_TOKENS, output_type="latent", latents=noise.to(torch.bfloat16))  # fmt: skip
        theirs, calls[:] = list(calls), []
        cond, grid = policy.encode_prompts(PROMPTS, with_negative=False), policy.sigma_grid(T)
        first = policy.velocity(noise, grid[0].expand(2), cond)
        for k in range(1, T):
            policy.velocity(noise, grid[k].expand(2), cond)
    finally:
        hook.remove()
    ours_t, theirs_t = [t for t, _ in calls], [t for t, _ in theirs]
    assert len(ours_t) == T and all(map(torch.equal, ours_t, theirs_t)), (ours_t, theirs_t)
    plain = [grid[k].to(torch.bfloat16).expand(2) for k in range(T)]
    assert not all(map(torch.equal, plain, theirs_t)), "this grid does not tell the two roundings apart"
    theirs_v = theirs[0][1].float().permute(0, 2, 1).reshape(2, *policy.latent_shape)
    torch.testing.assert_close(first, theirs_v, rtol=0, atol=0)


@pytest.mark.parametrize(
    "T,hw", [(2, (32, 32)), (4, (32, 32)), (50, (32, 32)), (28, (48, 32)), (10, (512, 512))]
)
def test_the_grid_is_the_pipelines(pipe, T, hw):
    """linspace(1, 1/T, T) under the exponential shift with FLUX.2's empirical mu, which follows the token count
    and, up to 4300 tokens, the step count, as Flux2KleinPipeline sets the scheduler (the tiny VAE's factor 2
    makes 512 px 16384 tokens: past 4300)."""
    import numpy as np

    policy = Flux2KleinPolicy(pipe, resolution=hw, max_sequence_length=MAX_TOKENS)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    mu = compute_empirical_mu(image_seq_len=policy.image_seq_len, num_steps=T)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / T, T), mu=mu)
    ours = policy.sigma_grid(T)
    torch.testing.assert_close(ours, scheduler.sigmas, rtol=0, atol=3e-7)
    assert torch.equal(ours, flux_sigma_grid(T, mu))
    other = compute_empirical_mu(image_seq_len=policy.image_seq_len, num_steps=T + 10)
    assert (other == mu) == (policy.image_seq_len > 4300)  # (the step count moves mu up to 4300 tokens)


@pytest.mark.parametrize("g, hw", [(4.0, (32, 32)), (1.0, (32, 32)), (4.0, (48, 32))])
def test_engine_ode_reproduces_the_diffusers_pipeline(pipe, policy, g, hw):
    """Zero noise, the same initial latents: the engine's sampler is Flux2KleinPipeline to 1e-5, with CFG (4.0;
    the pipeline's two calls, the engine's one) and without, square and portrait ([height, width] = [48, 32]),
    and the transformer sees the pipeline's timesteps (within the grid's float32 rounding, 3e-7)."""
    T = 4
    policy = policy.at_resolution(hw, "model.resolution")
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    call = dict(
        height=hw[0], width=hw[1], num_inference_steps=T, guidance_scale=g, max_sequence_length=MAX_TOKENS
    )
    times = []
    hook = policy.transformer.register_forward_hook(
        lambda m, a, kw, out: times.append(kw["timestep"].clone()), with_kwargs=True
    )
    try:
        theirs = pipe(prompt=list(PROMPTS), **call, latents=noise.clone(), output_type="latent").images
        theirs_times, times[:] = times[:: 2 if g > 1 else 1], []  # (the pipeline's CFG: a second call)
        theirs_img = pipe(prompt=list(PROMPTS), **call, latents=noise.clone(), output_type="pt").images
        times.clear()
        grid = policy.sigma_grid(T)
        torch.testing.assert_close(grid, pipe.scheduler.sigmas, rtol=0, atol=3e-7)
        cond = policy.encode_prompts(PROMPTS, with_negative=g > 1)
        ro = sample(policy, cond, noise, Schedule(grid, torch.zeros(T)), guidance_scale=g, dense=False)
    finally:
        hook.remove()
    assert len(times) == T
    for ours_t, theirs_t in zip(times, theirs_times, strict=True):
        torch.testing.assert_close(ours_t[:2], theirs_t, rtol=0, atol=3e-7)
    ours = _latents_as_the_pipeline_returns_them(pipe, ro.latents[:, T])
    diff = (ours - theirs).abs().max().item()
    diff_img = (policy.decode(ro.latents[:, T]) - theirs_img).abs().max().item()
    print(f"FLUX.2 [klein] g={g} {hw}: max |latent diff| {diff:.2e}, max |image diff| {diff_img:.2e}")
    assert diff <= 1e-5 and diff_img <= 1e-5
    assert ours.abs().max() > 0.1


def test_a_dev_checkpoint_and_a_fixed_shift_are_refused(pipe):
    import copy

    from diffusers import Flux2Transformer2DModel

    from densegrpo_fast.config import TrainConfig, load_config

    dev = copy.copy(pipe)
    dev.transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"sets guidance_embeds: a FLUX.2 \[dev\] checkpoint"):
        Flux2KleinPolicy(dev, **OPTS)
    with pytest.raises(
        ValueError, match=r"sampling.shift \(3.0\) with model.family flux2_klein: FLUX.2 \[klein\]"
    ):
        load_config(TrainConfig, None, ["model.family=flux2_klein", "sampling.shift=3.0"])
    cfg = load_config(TrainConfig, None, ["model.family=flux2_klein"])
    assert cfg.sampling.shift is None and cfg.sampling.guidance_scale == cfg.eval.guidance_scale == 4.0
    assert cfg.lora.target_modules[-1] == "attn.to_qkv_mlp_proj"  # (the single-stream blocks' too)


def test_loads_a_diffusers_directory_and_names_missing_parts(klein_dir, policy, tmp_path):
    import shutil

    loaded = load_policy(
        "flux2_klein", str(klein_dir), "cpu", dtype="fp32", offload_text_encoders=True, **OPTS
    )
    assert isinstance(loaded, Flux2KleinPolicy) and loaded.offload_text_encoders
    x = torch.randn(1, *policy.latent_shape)
    sigma = torch.tensor([0.6])
    torch.testing.assert_close(
        loaded.velocity(x, sigma, loaded.encode_prompts(PROMPTS[:1]), 4.0),
        policy.velocity(x, sigma, policy.encode_prompts(PROMPTS[:1]), 4.0),
    )
    broken = tmp_path / "broken"
    shutil.copytree(klein_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ValueError, match=r"not a complete Flux2KleinPipeline checkpoint: missing vae/"):
        Flux2KleinPolicy.load(broken)
    with pytest.raises(
        ValueError, match=r"not in the Hugging Face cache.*hf download black-forest-labs/FLUX.2-klein"
    ):
        Flux2KleinPolicy.load(None, cache_dir=tmp_path / "empty_cache")


def test_an_untied_lm_head_stays_on_the_host(pipe):
    """Qwen3-8B's LM head (FLUX.2 [klein] 9B) is not its input embedding and encoding never calls it: it stays
    in host memory; Qwen3-4B's is the embedding and moves with the decoder."""
    import copy

    assert Flux2KleinPolicy.unused_modules(pipe) == {}  # (tied)
    untied = copy.copy(pipe)
    untied.text_encoder = copy.deepcopy(pipe.text_encoder)
    untied.text_encoder.lm_head.weight = torch.nn.Parameter(untied.text_encoder.lm_head.weight.clone())
    assert set(Flux2KleinPolicy.unused_modules(untied)) == {"text_encoder.lm_head"}


def _overrides(klein_dir, tmp_path, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green dog\na cat\n")
    return [
        "model.family=flux2_klein", f"model.checkpoint={klein_dir}", f"model.resolution={tiny.RESOLUTION}",
        f"model.max_sequence_length={MAX_TOKENS}", f"prompts.dataset={prompts}", "prompts.prompts_per_iteration=2",
        "sampling.num_steps=3", "sampling.group_size=2", "noise.kind=uniform", "reward.name=redness", "lora.rank=4",
        "grpo.train_batch_size=4", f"eval.dataset={prompts}", "eval.num_prompts=2", "eval.num_steps=2",
        "run.iterations=1", f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false", *extra,
    ]  # fmt: skip


def test_one_iteration_through_the_trainer_with_cfg(klein_dir, tmp_path):
    import json

    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.trainer import setup, train

    overrides = _overrides(klein_dir, tmp_path)
    cfg = load_config(TrainConfig, None, overrides)
    probe = setup(
        load_config(TrainConfig, None, [*overrides, f"run.output_dir={tmp_path / 'probe'}"]), progress=False
    )
    mu = compute_empirical_mu(image_seq_len=64, num_steps=3)
    torch.testing.assert_close(probe.schedule.sigmas, flux_sigma_grid(3, mu))
    run_dir = train(cfg, progress=False)
    (step,) = [
        r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "reward_mean" in r
    ]
    assert step["rows_trained"] > 0 and math.isfinite(step["grad_norm"])
    assert_on_policy(step, exact=False)
    assert (run_dir / "lora_ema").is_dir()


def test_the_exported_lora_loads_into_flux2_klein_pipeline(tmp_path):
    """``Flux2KleinPipeline.load_lora_weights`` takes the exported LoRA whole (CFG on; the family's targets, the
    single-stream blocks' fused projection included), and ``lora.init`` starts from it."""
    from densegrpo_fast.config import FLUX2_KLEIN_LORA_TARGETS

    tiny.exported_lora_round_trip(
        tiny.flux2_klein_pipeline,
        Flux2KleinPolicy,
        OPTS,
        PROMPTS,
        4.0,
        tmp_path,
        targets=FLUX2_KLEIN_LORA_TARGETS,
    )


@pytest.mark.slow  # (the slow tier: .ci/run runs it after the default one)
def test_the_memory_estimate_runs_on_fake_weights_and_matches_the_run(klein_dir, tmp_path):
    """The estimate's fake tensors go through Qwen3's decoder (its LM head never called), the adapter's encode
    and the transformer, and land on the run counted for real (prompts are padded to one length): to the byte,
    but for a 12-byte tensor of the rollout's noise schedule (``schedule.std``) that is alive when the real run
    encodes its second iteration's prompts, which the estimate, one iteration, does not have."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.memory import estimate_run, fake_policy, measure_run, new_fake_mode

    torch.set_num_threads(1)

    def config(name):
        extra = ("sampling.group_size=3", "grpo.train_batch_size=6", "grpo.beta=0.04", "run.iterations=2",
                 f"run.output_dir={tmp_path / name / 'run'}")  # fmt: skip
        (tmp_path / name).mkdir()
        return load_config(TrainConfig, None, _overrides(klein_dir, tmp_path / name, *extra))

    real, fake = config("real"), config("fake")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # as the estimate runs
        policy = load_policy("flux2_klein", str(klein_dir), "cpu", **real.model.adapter_options())
        measured = measure_run(real, policy)
        policy, source = fake_policy(fake, new_fake_mode())
        est = estimate_run(fake, policy)
    assert source == str(klein_dir)
    weights = sum(est.weights.values())
    for phase, bytes_ in measured.items():
        assert 0 <= bytes_ - est.phases[phase] <= (12 if phase == "prompt encoding" else 0), phase
    assert measured["rollout + reward"] - weights > 1_000_000
    assert est.calls["transformer"] > 0 and est.calls["text_encoder.model"] > 0


def _sources(folder, n=3, side=32):
    """Random-pixel PNGs s0.png, s1.png, ... of ``side`` px in ``folder``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"s{i}.png")
    return [folder / f"s{i}.png" for i in range(n)]


@pytest.mark.parametrize("g", [1.0, 4.0])
def test_an_edit_reproduces_the_pipeline_with_its_reference_image(pipe, policy, g, tmp_path):
    """Edit prompts: each source goes in as the pipeline's one reference image (given at the output's size,
    64 px: the pipeline refuses smaller references), with CFG (whose negative rows hold it too) and without:
    Flux2KleinPipeline to 1e-5, one prompt per call. Other sources move the result."""
    from PIL import Image

    from densegrpo_fast.prompts import EditPrompt

    T = 4
    policy = policy.at_resolution(64, "model.resolution")
    files = _sources(tmp_path, side=64)
    prompts = [EditPrompt(t, str(f)) for t, f in zip(PROMPTS, files, strict=False)]
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    theirs, theirs_img = [], []
    for i, p in enumerate(
        prompts
    ):  # (one call per prompt: the pipeline's images are one prompt's references)
        with Image.open(p.image) as img:
            image = img.convert("RGB")
        call = dict(prompt=str(p), image=image, height=64, width=64, num_inference_steps=T, guidance_scale=g,
                    max_sequence_length=MAX_TOKENS)  # fmt: skip
        theirs.append(pipe(**call, latents=noise[i : i + 1].clone(), output_type="latent").images)
        theirs_img.append(pipe(**call, latents=noise[i : i + 1].clone(), output_type="pt").images)
    theirs, theirs_img = torch.cat(theirs), torch.cat(theirs_img)
    sched = Schedule(policy.sigma_grid(T), torch.zeros(T))
    cond = policy.encode_prompts(prompts, with_negative=g > 1)
    assert cond.reference.shape == (2, 256, 16) and cond.has_negative == (g > 1)
    ro = sample(policy, cond, noise, sched, guidance_scale=g, dense=False)
    ours = _latents_as_the_pipeline_returns_them(pipe, ro.latents[:, T])
    diff = (ours - theirs).abs().max().item()
    diff_img = (policy.decode(ro.latents[:, T]) - theirs_img).abs().max().item()
    print(f"FLUX.2 [klein] edit g={g}: max |latent diff| {diff:.2e}, max |image diff| {diff_img:.2e}")
    assert diff <= 1e-5 and diff_img <= 1e-5
    other = [EditPrompt(str(p), str(files[2])) for p in prompts]
    moved = sample(policy, policy.encode_prompts(other, with_negative=g > 1), noise, sched, guidance_scale=g,
                   dense=False).latents[:, T]  # fmt: skip
    assert (moved - ro.latents[:, T]).abs().max() > 1e-4  # (1.6e-3 measured: 100 x the tolerance above)


def test_one_iteration_on_edit_records(klein_dir, tmp_path, monkeypatch):
    """FLUX.2 [klein] trains on edit records as well as on text prompts (its prompt file decides)."""
    import json

    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.trainer import train

    files = _sources(tmp_path)
    edits = tmp_path / "edits.jsonl"
    lines = [
        {"prompt": "make it red", "image": files[0].name},
        {"prompt": "add a cat", "image": files[1].name},
    ]
    edits.write_text("".join(json.dumps(line) + "\n" for line in lines))
    cfg = load_config(TrainConfig, None, _overrides(klein_dir, tmp_path, f"prompts.dataset={edits}",
                                                    f"eval.dataset={edits}"))  # fmt: skip
    read = []
    encode = Flux2KleinPolicy._encode_references
    monkeypatch.setattr(
        Flux2KleinPolicy, "_encode_references", lambda self, paths: read.extend(paths) or encode(self, paths)
    )
    with pytest.warns(UserWarning, match=r"the rewards \['redness'\] do not see the sources"):
        run_dir = train(cfg, progress=False)
    assert {str(f.resolve()) for f in files[:2]} == set(read)  # (the sources reached the transformer's input)
    (step,) = [
        r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "reward_mean" in r
    ]
    assert step["rows_trained"] > 0 and math.isfinite(step["grad_norm"])
    assert_on_policy(step, exact=False)


def test_the_memory_estimate_of_an_editing_run_counts_the_reference_tokens(klein_dir, tmp_path, capsys):
    """``memory`` estimates a FLUX.2 [klein] run with the records its config's prompt files hold: edits (each
    call's sequence holds the source's tokens as well) need more in the rollout than text prompts; a prompt file
    it cannot read is estimated as text prompts, and noted."""
    import json

    from densegrpo_fast.memory import run_memory

    files = _sources(tmp_path)
    edits = tmp_path / "edits.jsonl"
    edits.write_text("".join(json.dumps({"prompt": "make it red", "image": f.name}) + "\n" for f in files))
    plain = tmp_path / "prompts.txt"
    plain.write_text("a red circle\n")
    config = tmp_path / "klein.yaml"
    config.write_text(
        f"model: {{family: flux2_klein, checkpoint: {klein_dir}, resolution: {tiny.RESOLUTION}, "
        f"max_sequence_length: {MAX_TOKENS}}}\n"
        "prompts: {prompts_per_iteration: 2}\nsampling: {num_steps: 2, group_size: 2, guidance_scale: 1.0}\n"
        "reward: {name: redness}\nlora: {rank: 4}\ngrpo: {train_batch_size: 4}\n"
    )
    text = run_memory(str(config), [f"prompts.dataset={plain}"], as_json=True)
    edit = run_memory(str(config), [f"prompts.dataset={edits}"], as_json=True)
    assert edit.phases["rollout + reward"] > text.phases["rollout + reward"]
    assert edit.weights == text.weights
    capsys.readouterr()
    unread = run_memory(str(config), ["prompts.dataset=/nonexistent/edits.jsonl", f"eval.dataset={plain}"],
                        as_json=True)  # fmt: skip
    assert unread.phases == text.phases
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any(n.startswith("prompts.dataset='/nonexistent/edits.jsonl' is not readable here") for n in notes)
