"""Z-Image policy on tiny random components: the contract (CFG in one batched call, each caption at its own
length, the token mask beside the embeds, the velocity's sign and time), ZImagePipeline's grid, the pipeline
reproduced by the engine's sampler, and the trainer, the LoRA export and the memory estimate on it."""

import math

import pytest
import tiny_models as tiny
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tolerances import assert_on_policy

from densegrpo_fast.policies import load_policy
from densegrpo_fast.policies.base import Policy
from densegrpo_fast.policies.z_image import ZImagePolicy
from densegrpo_fast.rollout import sample
from densegrpo_fast.schedule import Schedule, flux_sigma_grid, resolution_mu

PROMPTS = ["a red circle", "two blue squares beside a tall green tree"]
#: Below the 60 tokens the byte-level tokenizer gives the second prompt in its chat template (the first: 31),
#: so that truncation is exercised.
MAX_TOKENS = 48
OPTS = dict(resolution=tiny.RESOLUTION, max_sequence_length=MAX_TOKENS)


@pytest.fixture(scope="module")
def pipe():
    return tiny.z_image_pipeline(seed=0)


@pytest.fixture(scope="module")
def policy(pipe):
    return ZImagePolicy(pipe, **OPTS)


@pytest.fixture(scope="module")
def z_dir(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_z_image")
    pipe.save_pretrained(root)
    return root


def test_implements_the_policy_contract(policy, pipe):
    assert isinstance(policy, Policy)
    # the engine sees the latent as the transformer takes it: 4 channels, 32 px / VAE factor 2 = 16
    assert policy.latent_shape == (4, 16, 16) and policy.dtype == torch.float32
    for m in (pipe.vae, pipe.text_encoder, policy.transformer):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    cond = policy.encode_prompts([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    assert cond.embeds.shape == (3, MAX_TOKENS, 16) and cond.pooled.shape == (3, MAX_TOKENS)
    assert cond.pooled.sum(1).tolist() == [31, MAX_TOKENS, 31]  # (the second prompt cut)
    assert cond.has_negative and cond.neg_embeds.shape == cond.embeds.shape  # "", padded to the same length
    assert cond.neg_pooled[0].sum() == 19  # (the chat template around the empty prompt)
    assert torch.equal(cond.embeds[0], cond.embeds[2]) and not cond.embeds[0, 31:].any()
    images = policy.decode(torch.randn(2, *policy.latent_shape))
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    with pytest.raises(ValueError, match=r"max_sequence_length \(481\).*places at most 480 caption tokens"):
        ZImagePolicy(pipe, resolution=32, max_sequence_length=481)  # (the tiny rope axis: 512 positions)


@pytest.mark.parametrize("max_tokens", [MAX_TOKENS, 480])
def test_the_prompt_embeds_are_the_pipelines(pipe, max_tokens):
    """The adapter's encode (padded to the batch's longest prompt, spans from the host's token mask) gives
    each prompt ``ZImagePipeline.encode_prompt``'s embeds (every prompt padded to max_sequence_length, its
    tokens picked by a boolean index), within float rounding, cut or not."""
    policy = ZImagePolicy(pipe, resolution=tiny.RESOLUTION, max_sequence_length=max_tokens)
    prompts = [*PROMPTS, ""]
    theirs, _ = pipe.encode_prompt(
        list(prompts), device="cpu", do_classifier_free_guidance=False, max_sequence_length=max_tokens
    )
    ours, mask = policy._encode(prompts)
    assert mask.sum(1).tolist() == [len(t) for t in theirs] == [31, min(60, max_tokens), 19]
    for row, (want, n) in enumerate(zip(theirs, mask.sum(1).tolist(), strict=True)):
        torch.testing.assert_close(ours[row, :n], want, rtol=0, atol=1e-6)
        assert not ours[row, n:].any() and not mask[row, n:].any()


def test_cfg_is_one_batched_call_of_captions_at_their_own_lengths(policy):
    x = torch.randn(2, *policy.latent_shape)
    sigma = torch.tensor([0.9, 0.3])
    cond = policy.encode_prompts(PROMPTS)
    calls = []
    hook = policy.transformer.register_forward_hook(
        lambda m, args, out: calls.append(([len(c) for c in args[2]], args[1].clone()))
    )
    v = policy.velocity(x, sigma, cond, guidance_scale=5.0)
    v_pos = policy.velocity(x, sigma, cond, guidance_scale=1.0)
    v_neg = policy.velocity(x, sigma, policy.encode_prompts(["", ""], with_negative=False))
    hook.remove()
    # positive rows first, then the negative's; each caption at its own token count; time 1 - sigma
    assert [c for c, _ in calls] == [[31, MAX_TOKENS, 19, 19], [31, MAX_TOKENS], [19, 19]]
    torch.testing.assert_close(calls[0][1], torch.tensor([0.1, 0.7, 0.1, 0.7]), rtol=0, atol=1e-7)
    assert v.dtype == torch.float32 and v.shape == x.shape
    torch.testing.assert_close(v, v_neg + 5.0 * (v_pos - v_neg), rtol=0, atol=2e-5)
    # each row gets what it gets alone: its own prompt, encoded alone (another padding), in a call of one row
    alone = policy.velocity(x[:1], sigma[:1], policy.encode_prompts(PROMPTS[:1]), guidance_scale=5.0)
    torch.testing.assert_close(alone, v[:1], rtol=0, atol=2e-5)


def test_the_velocity_is_the_negated_prediction_at_one_minus_sigma(policy):
    """The engine's v = eps - x0: the transformer's output (x0 - eps) negated, at time 1 - sigma."""
    x = torch.randn(1, *policy.latent_shape)
    cond = policy.encode_prompts(PROMPTS[:1], with_negative=False)
    out = policy.transformer([x[0, :, None]], torch.tensor([0.25]), [cond.embeds[0, :31]], return_dict=False)[
        0
    ]
    v = policy.velocity(x, torch.tensor([0.75]), cond)
    torch.testing.assert_close(v[0], -out[0][:, 0], rtol=0, atol=0)


@pytest.mark.parametrize("config", ["turbo", "dynamic"])
@pytest.mark.parametrize("T", [2, 8, 50])
def test_the_grid_is_the_pipelines(pipe, config, T):
    """Z-Image-Turbo's static shift of 3, and a scheduler shifting by the token count, as ZImagePipeline
    sets them (its sigmas: torch's float32 linspace, then the scheduler)."""
    import copy

    import diffusers.pipelines.z_image.pipeline_z_image as zp

    kwargs = {"turbo": {}, "dynamic": dict(shift=1.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                           max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)}[config]  # fmt: skip
    pipe = copy.copy(pipe)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**(kwargs or tiny.architectures.Z_IMAGE_SCHEDULER))
    policy = ZImagePolicy(pipe, **OPTS)
    mu = zp.calculate_shift(policy.image_seq_len, 256, 4096, 0.5, 1.15)
    pipe.scheduler.set_timesteps(sigmas=zp.get_default_z_image_sigmas(T), mu=mu)
    ours = policy.sigma_grid(T)
    torch.testing.assert_close(ours, pipe.scheduler.sigmas, rtol=0, atol=3e-7)
    want = flux_sigma_grid(T, math.log(3.0) if config == "turbo" else resolution_mu(64, 256, 4096, 0.5, 1.15))
    assert torch.equal(ours, want)


@pytest.mark.parametrize(
    "g, hw, tokens", [(5.0, (32, 32), MAX_TOKENS), (1.0, (32, 32), MAX_TOKENS), (5.0, (48, 32), MAX_TOKENS),
                      (5.0, (32, 32), 480)],
)  # fmt: skip
def test_engine_ode_reproduces_the_diffusers_pipeline(pipe, policy, g, hw, tokens):
    """Zero noise, the same initial latents: the engine's sampler is ZImagePipeline to 1e-5, with CFG (the
    engine's 5.0, the pipeline's guidance_scale 4) and without (the pipeline's 0, Z-Image-Turbo's), square
    and portrait ([height, width] = [48, 32]), with prompts cut and, at 480 tokens, not cut (the pipeline then
    pads them to 480, the engine to the longest); the transformer sees the pipeline's times bit for bit."""
    T = 4
    if tokens != MAX_TOKENS:
        policy = ZImagePolicy(pipe, resolution=tiny.RESOLUTION, max_sequence_length=tokens)
    policy = policy.at_resolution(hw, "model.resolution")
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    call = dict(prompt=list(PROMPTS), height=hw[0], width=hw[1], num_inference_steps=T, guidance_scale=g - 1.0,
                max_sequence_length=tokens)  # fmt: skip
    times = []
    hook = policy.transformer.register_forward_hook(lambda m, args, out: times.append(args[1].clone()))
    try:
        theirs = pipe(**call, latents=noise.clone(), output_type="latent").images
        theirs_times, times[:] = list(times), []
        theirs_img = pipe(**{**call, "prompt": list(PROMPTS)}, latents=noise.clone(), output_type="pt").images
        times.clear()
        grid = policy.sigma_grid(T)
        torch.testing.assert_close(grid, pipe.scheduler.sigmas, rtol=0, atol=3e-7)
        cond = policy.encode_prompts(PROMPTS, with_negative=g > 1)
        ro = sample(policy, cond, noise, Schedule(grid, torch.zeros(T)), guidance_scale=g, dense=False)
    finally:
        hook.remove()
    assert all(map(torch.equal, times, theirs_times)) and len(times) == T
    ours = ro.latents[:, T]
    diff = (ours - theirs).abs().max().item()
    diff_img = (policy.decode(ours) - theirs_img).abs().max().item()
    print(
        f"Z-Image g={g} {hw} {tokens} tokens: max |latent diff| {diff:.2e}, max |image diff| {diff_img:.2e}"
    )
    assert diff <= 1e-5 and diff_img <= 1e-5
    assert ours.abs().max() > 0.1


def test_the_family_defaults_target_every_blocks_attention(policy):
    """With model.family z_image the config's LoRA targets are Z-Image's attention projections (every block's,
    the refiners' included), its grid the pipeline's and its CFG 5.0; a config that names them keeps its own."""
    import copy

    from peft import LoraConfig

    from densegrpo_fast.config import TrainConfig, load_config

    cfg = load_config(TrainConfig, None, ["model.family=z_image"])
    assert cfg.sampling.shift is None and cfg.sampling.guidance_scale == cfg.eval.guidance_scale == 5.0
    assert cfg.eval.num_steps == 50 and "lora" not in cfg.model_fields_set
    t = copy.deepcopy(policy).transformer
    t.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=cfg.lora.target_modules))
    names = {n.rsplit(".lora_A", 1)[0] for n, _ in t.named_parameters() if ".lora_A." in n}
    blocks = ["layers.0", "layers.1", "noise_refiner.0", "context_refiner.0"]
    assert names == {f"{b}.attention.{p}" for b in blocks for p in ("to_q", "to_k", "to_v", "to_out.0")}
    own = load_config(TrainConfig, None, ["model.family=z_image", "lora.target_modules=[feed_forward.w1]"])
    assert own.lora.target_modules == ["feed_forward.w1"]
    assert load_config(TrainConfig, None, ["model.family=sd3"]).lora.target_modules[0] == "attn.to_q"


def test_loads_a_diffusers_directory_and_names_missing_parts(z_dir, policy, tmp_path):
    import shutil

    loaded = load_policy("z_image", str(z_dir), "cpu", dtype="fp32", offload_text_encoders=True, **OPTS)
    assert isinstance(loaded, ZImagePolicy) and loaded.offload_text_encoders
    x = torch.randn(1, *policy.latent_shape)
    sigma = torch.tensor([0.6])
    torch.testing.assert_close(
        loaded.velocity(x, sigma, loaded.encode_prompts(PROMPTS[:1]), 5.0),
        policy.velocity(x, sigma, policy.encode_prompts(PROMPTS[:1]), 5.0),
    )
    broken = tmp_path / "broken"
    shutil.copytree(z_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ValueError, match=r"not a complete ZImagePipeline checkpoint: missing text_encoder/"):
        ZImagePolicy.load(broken)
    with pytest.raises(ValueError, match=r"not in the Hugging Face cache.*hf download Tongyi-MAI/Z-Image "):
        ZImagePolicy.load(None, cache_dir=tmp_path / "empty_cache")


def _overrides(z_dir, tmp_path, *extra, prompts_text="a red circle\ntwo blue squares\na green dog\na cat\n"):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(prompts_text)
    return [
        "model.family=z_image", f"model.checkpoint={z_dir}", f"model.resolution={tiny.RESOLUTION}",
        f"model.max_sequence_length={MAX_TOKENS}", f"prompts.dataset={prompts}", "prompts.prompts_per_iteration=2",
        "sampling.num_steps=3", "sampling.group_size=2", "noise.kind=uniform", "reward.name=redness", "lora.rank=4",
        "grpo.train_batch_size=4", f"eval.dataset={prompts}", "eval.num_prompts=2", "eval.num_steps=2",
        "run.iterations=1", f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("hw", [None, (48, 32)], ids=["square", "portrait"])
def test_one_iteration_through_the_trainer_with_cfg(z_dir, tmp_path, hw):
    import json

    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.trainer import setup, train

    overrides = _overrides(z_dir, tmp_path, *([f"model.resolution=[{hw[0]}, {hw[1]}]"] if hw else []))
    cfg = load_config(TrainConfig, None, overrides)
    probe = setup(
        load_config(TrainConfig, None, [*overrides, f"run.output_dir={tmp_path / 'probe'}"]), progress=False
    )
    torch.testing.assert_close(
        probe.schedule.sigmas, flux_sigma_grid(3, math.log(3.0))
    )  # Turbo's static shift
    run_dir = train(cfg, progress=False)
    (step,) = [
        r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "reward_mean" in r
    ]
    assert step["rows_trained"] > 0 and math.isfinite(step["grad_norm"])
    assert_on_policy(step, exact=False)
    assert (run_dir / "lora_ema").is_dir()


def test_a_fixed_shift_and_a_caption_past_the_rope_are_refused():
    from densegrpo_fast.config import TrainConfig, load_config

    with pytest.raises(
        ValueError, match=r"eval.shift \(3.0\) with model.family z_image: Z-Image samples on its"
    ):
        load_config(TrainConfig, None, ["model.family=z_image", "eval.shift=3.0"])
    with pytest.raises(
        ValueError, match=r"max_sequence_length \(993\) with model.family z_image.*at most 992"
    ):
        load_config(TrainConfig, None, ["model.family=z_image", "model.max_sequence_length=993"])
    load_config(TrainConfig, None, ["model.family=z_image", "model.max_sequence_length=992"])


def test_the_exported_lora_loads_into_z_image_pipeline(tmp_path):
    """``ZImagePipeline.load_lora_weights`` takes the exported LoRA whole (CFG on), and ``lora.init`` starts
    from it."""
    from densegrpo_fast.config import Z_IMAGE_LORA_TARGETS

    tiny.exported_lora_round_trip(
        tiny.z_image_pipeline, ZImagePolicy, OPTS, PROMPTS, 5.0, tmp_path, targets=Z_IMAGE_LORA_TARGETS
    )


@pytest.mark.slow  # (the slow tier: .ci/run runs it after the default one)
def test_the_memory_estimate_runs_on_fake_weights_and_matches_the_run(z_dir, tmp_path):
    """The estimate's fake tensors go through Qwen3, the adapter's encode (each caption counted at the batch's
    length: fake tensors hold no token counts) and the transformer's lists, and land on the run counted for
    real, within the rotary table the transformer caches on first use. The transformer pads each call's rows
    to their longest caption, so counting the negative prompt's rows at the batch's length costs next to
    nothing (108 bytes here). The prompts have one length: the estimate runs the first iteration's prompts,
    the real run's peak may come from the second's, and a longer prompt there would be a difference the
    estimate does not claim to see."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.memory import estimate_run, fake_policy, measure_run, new_fake_mode

    torch.set_num_threads(1)

    def config(name):
        extra = ("sampling.group_size=3", "grpo.train_batch_size=6", "grpo.beta=0.04", "run.iterations=2",
                 f"run.output_dir={tmp_path / name / 'run'}")  # fmt: skip
        (tmp_path / name).mkdir()
        same_length = "a red circle\na blue cubes\na green dogs\na black cat\n"
        return load_config(
            TrainConfig, None, _overrides(z_dir, tmp_path / name, *extra, prompts_text=same_length)
        )

    real, fake = config("real"), config("fake")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # as the estimate runs
        policy = load_policy("z_image", str(z_dir), "cpu", **real.model.adapter_options())
        measured = measure_run(real, policy)
        rope = policy.transformer.rope_embedder.freqs_cis
        slack = 2 * sum(t.nbytes for t in rope)
        policy, source = fake_policy(fake, new_fake_mode())
        est = estimate_run(fake, policy)
    assert source == str(z_dir)
    weights = sum(est.weights.values())
    for phase, bytes_ in measured.items():
        assert abs(est.phases[phase] - bytes_) <= slack, (phase, est.phases[phase] - bytes_, slack)
    assert measured["rollout + reward"] - weights > 10 * slack  # (the slack is small beside what is counted)
    assert est.calls["transformer"] > 0 and est.calls["text_encoder"] > 0
