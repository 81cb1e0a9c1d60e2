"""FLUX.1 policy on tiny random components: the contract (guidance as an input, no CFG batch, unpacked
latents), FluxPipeline's resolution-dependent grid, and the pipeline reproduced by the engine's sampler."""

import math

import pytest
import tiny_models as tiny
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tolerances import assert_on_policy

from densegrpo_fast.policies import load_policy
from densegrpo_fast.policies.base import Policy
from densegrpo_fast.policies.flux import FluxPolicy
from densegrpo_fast.rollout import sample
from densegrpo_fast.schedule import Schedule, flux_sigma_grid, resolution_mu, sigma_grid

PROMPTS = ["a red circle", "two blue squares"]
OPTS = dict(resolution=tiny.RESOLUTION, max_sequence_length=tiny.MAX_T5_TOKENS)


@pytest.fixture(scope="module")
def pipe():
    return tiny.flux_pipeline(seed=0)


@pytest.fixture(scope="module")
def policy(pipe):
    return FluxPolicy(pipe, **OPTS)


def test_implements_the_policy_contract(policy, pipe):
    assert isinstance(policy, Policy)
    # the engine sees the unpacked latent: 16 packed channels / (2 x 2) = 4, 32 px / VAE factor 2 = 16
    assert policy.latent_shape == (4, 16, 16) and policy.dtype == torch.float32
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, policy.transformer):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    cond = policy.encode_prompts(["a red circle", "two blue squares", "a red circle"])
    assert cond.embeds.shape == (3, tiny.MAX_T5_TOKENS, 32) and cond.pooled.shape == (3, 32)
    assert cond.neg_embeds is None and cond.neg_pooled is None  # guidance-distilled: no negative prompt
    assert torch.equal(cond.embeds[0], cond.embeds[2])
    images = policy.decode(torch.randn(2, *policy.latent_shape))
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_guidance_is_an_input_not_a_batch(policy):
    x = torch.randn(2, *policy.latent_shape)
    sigma = torch.tensor([0.9, 0.3])
    cond = policy.encode_prompts(PROMPTS)
    rows = []
    hook = policy.transformer.register_forward_hook(lambda m, a, kw, out: rows.append(kw["hidden_states"].shape[0]),
                                                    with_kwargs=True)  # fmt: skip
    v35 = policy.velocity(x, sigma, cond, guidance_scale=3.5)
    v1 = policy.velocity(x, sigma, cond, guidance_scale=1.0)
    hook.remove()
    assert rows == [2, 2] and v35.dtype == torch.float32 and v35.shape == x.shape
    assert not torch.allclose(v35, v1)  # the guidance embedding changes the velocity
    # rows are independent: each row's velocity is what it gets alone (packing keeps rows apart)
    torch.testing.assert_close(policy.velocity(x[1:], sigma[1:], cond.index(slice(1, 2)), 3.5), v35[1:])


def test_schnell_like_checkpoints_take_no_guidance():
    p = FluxPolicy(tiny.flux_pipeline(seed=1, guidance_embeds=False), **OPTS)
    x = torch.randn(1, *p.latent_shape)
    cond = p.encode_prompts(PROMPTS[:1])
    assert p.velocity(x, torch.tensor([0.5]), cond).shape == x.shape
    with pytest.raises(
        ValueError,
        match=r"guidance scale 3.5 \(sampling.guidance_scale, or eval.guidance_scale.*no guidance embedding.*set it to 1",
    ):
        p.velocity(x, torch.tensor([0.5]), cond, guidance_scale=3.5)


@pytest.mark.parametrize("T,seq_len", [(1, 64), (4, 64), (10, 1024), (28, 4096), (50, 6000)])
def test_flux_grid_equals_the_scheduler(T, seq_len):
    mu = resolution_mu(seq_len)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    sched.set_timesteps(sigmas=[1.0 - i * (1 - 1 / T) / max(T - 1, 1) for i in range(T)], mu=mu)
    ours = flux_sigma_grid(T, mu)
    assert ours.shape == (T + 1,) and ours[0] == 1 and ours[-1] == 0
    torch.testing.assert_close(ours, sched.sigmas, rtol=0, atol=3e-7)
    # the same shift formula as SD3's grid, with shift = e^mu, but from s = 1/T instead of the shifted 1/1000
    if T > 1:
        assert not torch.allclose(ours, sigma_grid(T, math.exp(mu)))
    assert math.isclose(resolution_mu(256), 0.5) and math.isclose(resolution_mu(4096), 1.15)


@pytest.mark.parametrize("hw", [(32, 32), (32, 48)])
def test_engine_ode_reproduces_the_diffusers_pipeline(pipe, policy, hw):
    """Zero noise, the same initial latents: the engine's sampler is FluxPipeline to 1e-5, square and
    landscape ([height, width] = [32, 48]: the packed tokens' positions and the grid's token count)."""
    from diffusers import FluxPipeline

    T, g = 4, 3.5
    policy = policy.at_resolution(hw, "model.resolution")
    assert policy.image_seq_len == hw[0] * hw[1] // 16  # (the tiny VAE's factor 2, then 2x2 patches)
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    packed = FluxPipeline._pack_latents(noise, 2, *policy.latent_shape)
    call = dict(prompt=PROMPTS, height=hw[0], width=hw[1], num_inference_steps=T, guidance_scale=g,
                max_sequence_length=tiny.MAX_T5_TOKENS)  # fmt: skip
    theirs = FluxPipeline._unpack_latents(
        pipe(**call, latents=packed.clone(), output_type="latent").images, *hw, policy.vae_scale_factor
    )
    theirs_img = pipe(**call, latents=packed.clone(), output_type="pt").images

    grid = policy.sigma_grid(T)
    torch.testing.assert_close(grid, pipe.scheduler.sigmas, rtol=0, atol=3e-7)
    ro = sample(policy, policy.encode_prompts(PROMPTS), noise, Schedule(grid, torch.zeros(T)), guidance_scale=g,
                dense=False)  # fmt: skip
    ours = ro.latents[:, T]
    diff = (ours - theirs).abs().max().item()
    diff_img = (policy.decode(ours) - theirs_img).abs().max().item()
    print(f"FLUX g={g} {hw}: max |latent diff| {diff:.2e}, max |image diff| {diff_img:.2e}")
    assert diff <= 1e-5 and diff_img <= 1e-5
    assert ours.abs().max() > 0.1


def test_bf16_transformer_sees_the_pipelines_timesteps(pipe):
    """In bf16 the transformer gets FluxPipeline's timestep values at every step of the grid (cast as the
    pipeline casts ``1000 * sigma``, not as the transformer casts a sigma), and from the same first latents
    returns the same velocity, bit for bit."""
    import copy

    from diffusers import FluxPipeline

    bf16 = copy.copy(pipe)  # everything but the VAE in bf16, as the engine loads a checkpoint
    for name in ("transformer", "text_encoder", "text_encoder_2"):
        setattr(bf16, name, copy.deepcopy(getattr(pipe, name)).to(torch.bfloat16))
    policy = FluxPolicy(bf16, **OPTS)
    calls = []  # (the timestep the transformer computes with, its output)
    hook = bf16.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(
            (kwargs["timestep"].to(torch.bfloat16) * 1000, out[0])
        ),
        with_kwargs=True,
    )
    T, g = 4, 3.5
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    packed = FluxPipeline._pack_latents(noise, 2, *policy.latent_shape).to(torch.bfloat16)
    try:
        bf16(prompt=PROMPTS, height=32, width=32, num_inference_steps=T, guidance_scale=g,
             max_sequence_length=tiny.MAX_T5_TOKENS, output_type="latent", latents=packed)  # fmt: skip
        theirs, calls[:] = list(calls), []
        cond, grid = policy.encode_prompts(PROMPTS), policy.sigma_grid(T)
        first = policy.velocity(noise, grid[0].expand(2), cond, g)
        for k in range(1, T):
            policy.velocity(noise, grid[k].expand(2), cond, g)
    finally:
        hook.remove()
    ours_t, theirs_t = [t for t, _ in calls], [t for t, _ in theirs]
    assert all(torch.equal(a, b) for a, b in zip(ours_t, theirs_t, strict=True)), (ours_t, theirs_t)
    own_cast = [(grid[k].to(torch.bfloat16) * 1000).expand(2) for k in range(T)]  # what the old code passed
    assert not all(map(torch.equal, own_cast, theirs_t)), "this grid does not tell the two roundings apart"
    h, w = policy.latent_shape[1:]
    f = policy.vae_scale_factor
    unpacked = FluxPipeline._unpack_latents(theirs[0][1], h * f, w * f, f).float()
    torch.testing.assert_close(first, unpacked, rtol=0, atol=0)


def test_default_lora_targets_cover_both_block_kinds(policy):
    """The config's default targets (Flow-GRPO's SD3 attention projections) exist in FLUX.1 too: the
    double-stream blocks get all eight, the single-stream blocks their q/k/v."""
    import copy

    from peft import LoraConfig

    from densegrpo_fast.config import LoRASection

    t = copy.deepcopy(policy).transformer
    t.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=LoRASection().target_modules))
    names = {n.rsplit(".lora_A", 1)[0] for n, _ in t.named_parameters() if ".lora_A." in n}
    assert "transformer_blocks.0.attn.to_add_out" in names and "transformer_blocks.0.attn.add_q_proj" in names
    assert {"single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_v"} <= names


def test_loads_a_diffusers_directory_and_names_missing_parts(pipe, policy, tmp_path):
    pipe.save_pretrained(tmp_path / "flux")
    loaded = load_policy(
        "flux", str(tmp_path / "flux"), "cpu", dtype="fp32", offload_text_encoders=True, **OPTS
    )
    assert isinstance(loaded, FluxPolicy) and loaded.offload_text_encoders
    moves = []
    for name in ("text_encoder", "text_encoder_2"):
        module = loaded.pipe.components[name]
        module.to = lambda device, _to=module.to, _name=name: (
            moves.append((_name, str(device))) or _to(device)
        )
    x = torch.randn(1, *policy.latent_shape)
    sigma = torch.tensor([0.6])
    torch.testing.assert_close(
        loaded.velocity(x, sigma, loaded.encode_prompts(PROMPTS[:1]), 3.5),
        policy.velocity(x, sigma, policy.encode_prompts(PROMPTS[:1]), 3.5),
    )
    assert moves == [("text_encoder", "cpu"), ("text_encoder_2", "cpu")] * 2  # in for the encode, then out
    for f in (tmp_path / "flux" / "transformer").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match=r"not a complete FluxPipeline checkpoint: missing transformer/"):
        FluxPolicy.load(tmp_path / "flux")
    with pytest.raises(
        ValueError, match=r"not in the Hugging Face cache.*hf download black-forest-labs/FLUX.1-dev"
    ):
        FluxPolicy.load(None, cache_dir=tmp_path / "empty_cache")


@pytest.mark.parametrize("hw, tokens", [(None, 64), ((48, 32), 96)], ids=["square", "portrait"])
def test_one_iteration_through_the_trainer_on_fluxs_own_grid(pipe, tmp_path, hw, tokens):
    """One iteration on FluxPipeline's grid, whose shift follows the image's token count: square and portrait
    ([height, width] = [48, 32]: 96 packed tokens, not 64)."""
    import json

    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.trainer import setup, train

    pipe.save_pretrained(tmp_path / "flux")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    overrides = [
        "model.family=flux", f"model.checkpoint={tmp_path / 'flux'}", f"model.resolution={tiny.RESOLUTION}",
        f"model.max_sequence_length={tiny.MAX_T5_TOKENS}", f"prompts.dataset={prompts}", "prompts.prompts_per_iteration=2",
        "sampling.num_steps=3", "sampling.group_size=2", "sampling.shift=null", "sampling.guidance_scale=3.5",
        "noise.kind=uniform", "reward.name=redness", "lora.rank=4", "grpo.train_batch_size=4", f"eval.dataset={prompts}",
        "eval.num_prompts=6", "eval.num_steps=2", "eval.guidance_scale=3.5", "eval.shift=null", "run.iterations=1",
        f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false",
        *([f"model.resolution=[{hw[0]}, {hw[1]}]"] if hw else []),
    ]  # fmt: skip
    probe = setup(
        load_config(TrainConfig, None, [*overrides, f"run.output_dir={tmp_path / 'probe'}"]), progress=False
    )
    torch.testing.assert_close(
        probe.schedule.sigmas, flux_sigma_grid(3, resolution_mu(tokens))
    )  # FluxPipeline's grid
    run_dir = train(load_config(TrainConfig, None, overrides), progress=False)
    (step,) = [
        r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "reward_mean" in r
    ]
    assert step["rows_trained"] > 0 and math.isfinite(step["grad_norm"])
    assert_on_policy(step, exact=False)


@pytest.mark.slow  # (the slow tier: .ci/run runs it after the default one)
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch.distributed with gloo is needed")
def test_full_fine_tuning_in_bf16_shards_over_two_processes(pipe, tmp_path):
    """FSDP2 on FLUX.1's transformer (double- and single-stream blocks, each a unit): bf16 calls over fp32
    shards, on-policy first ratio, and the whole bf16 transformer exported."""
    from safetensors.torch import load_file
    from test_distributed import sharded_bf16_matches_one_process

    pipe.save_pretrained(tmp_path / "flux")
    model = ["model.family=flux", f"model.checkpoint={tmp_path / 'flux'}", f"model.resolution={tiny.RESOLUTION}",
             f"model.max_sequence_length={tiny.MAX_T5_TOKENS}", "sampling.guidance_scale=3.5", "eval.guidance_scale=3.5",
             "eval.shift=null"]  # fmt: skip
    sharded_bf16_matches_one_process(model, tmp_path)
    run_dir = tmp_path / "run"
    base = pipe.transformer.state_dict()
    exported = load_file(run_dir / "policy_ema.safetensors")
    assert exported.keys() == base.keys() and all(t.dtype == torch.bfloat16 for t in exported.values())
    assert any(not torch.equal(exported[k], base[k].bfloat16()) for k in base), "the weights moved"


def test_the_exported_lora_loads_into_flux_pipeline(tmp_path):
    """``FluxPipeline.load_lora_weights`` takes the exported LoRA whole, and ``lora.init`` starts from it."""
    tiny.exported_lora_round_trip(tiny.flux_pipeline, FluxPolicy, OPTS, PROMPTS, 3.5, tmp_path)
