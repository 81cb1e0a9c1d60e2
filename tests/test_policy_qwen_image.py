"""Qwen-Image policy on tiny random components: the contract (true CFG with its norm rescale in one batched
call, a token mask beside the embeds, unpacked latents, the video VAE's normalisation), QwenImagePipeline's
grid with its terminal stretch, the pipeline reproduced by the engine's sampler, and the trainer, the LoRA
export and the memory estimate on it."""

import math
from pathlib import Path

import numpy as np
import pytest
import tiny_models as tiny
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from tolerances import assert_on_policy

from densegrpo_fast.policies import load_policy
from densegrpo_fast.policies.base import Policy
from densegrpo_fast.policies.qwen_image import QwenImagePolicy
from densegrpo_fast.rollout import sample
from densegrpo_fast.schedule import Schedule, flux_sigma_grid, resolution_mu

PROMPTS = ["a red circle", "two blue squares beside a tall green tree"]
#: Below the ~170 tokens the tiny byte-level tokenizer gives a prompt, so that truncation is exercised.
MAX_TOKENS = 160
OPTS = dict(resolution=tiny.RESOLUTION, max_sequence_length=MAX_TOKENS)


@pytest.fixture(scope="module")
def pipe():
    return tiny.qwen_image_pipeline(seed=0)


@pytest.fixture(scope="module")
def policy(pipe):
    return QwenImagePolicy(pipe, **OPTS)


@pytest.fixture(scope="module")
def qwen_dir(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_qwen_image")
    pipe.save_pretrained(root)
    return root


def test_implements_the_policy_contract(policy, pipe):
    assert isinstance(policy, Policy)
    # the engine sees the unpacked latent: 16 packed channels / (2 x 2) = 4, 32 px / VAE factor 2 = 16
    assert policy.latent_shape == (4, 16, 16) and policy.dtype == torch.float32
    for m in (pipe.vae, pipe.text_encoder, policy.transformer):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    cond = policy.encode_prompts([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    assert cond.embeds.shape == (3, MAX_TOKENS, 16) and cond.pooled.shape == (3, MAX_TOKENS)
    assert cond.has_negative and cond.neg_embeds.shape == cond.embeds.shape  # " ", padded to the same length
    assert torch.equal(cond.embeds[0], cond.embeds[2])
    assert cond.neg_pooled[0].sum() < cond.pooled[0].sum()  # the negative prompt has fewer tokens
    images = policy.decode(torch.randn(2, *policy.latent_shape))
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    with pytest.raises(ValueError, match=r"max_sequence_length \(2000\): QwenImagePipeline takes 1 to 1024"):
        QwenImagePolicy(pipe, resolution=32, max_sequence_length=2000)
    with pytest.raises(
        ValueError, match=r"sets \['zero_cond_t'\]: a guidance-distilled, an edit or a layered"
    ):
        QwenImagePolicy(tiny.qwen_image_pipeline(seed=0, zero_cond_t=True), **OPTS)
    for layered in ("use_additional_t_cond", "use_layer3d_rope"):  # (Qwen-Image-Layered's transformer)
        with pytest.raises(ValueError, match=rf"sets \['{layered}'\]: .*Qwen-Image-Layered"):
            QwenImagePolicy(tiny.qwen_image_pipeline(seed=0, **{layered: True}), **OPTS)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("max_tokens", [MAX_TOKENS, 1024])
def test_the_prompt_embeds_are_the_pipelines(pipe, max_tokens, side):
    """The adapter's encode (spans from the host's token mask, no boolean index of device tensors; the
    tokenizer stopping at the tokens kept) gives ``QwenImagePipeline.encode_prompt``'s embeds and mask: to the
    bit where no prompt is cut, within rounding where one is (a shorter batch), whichever side pads."""
    import copy

    pipe = copy.copy(pipe)
    pipe.tokenizer = copy.deepcopy(pipe.tokenizer)
    pipe.tokenizer.padding_side = side
    policy = QwenImagePolicy(pipe, resolution=tiny.RESOLUTION, max_sequence_length=max_tokens)
    prompts = [*PROMPTS, " "]
    theirs, their_mask = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=max_tokens)
    ours, mask = policy._encode(prompts)
    assert torch.equal(mask, their_mask) and ours.shape == theirs.shape
    whole = (
        QwenImagePolicy(pipe, resolution=tiny.RESOLUTION, max_sequence_length=1024)._encode(prompts)[1].sum(1)
    )
    if max_tokens == 1024:
        assert torch.equal(ours, theirs)
    else:
        assert (whole > max_tokens).any() and (whole <= max_tokens).any()  # one prompt cut, one not
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert mask.sum(1).tolist() == whole.clamp(max=max_tokens).tolist()


def test_libraries_without_the_text_mask_or_the_language_model_are_refused(pipe, monkeypatch):
    import copy

    def old_rope(video_fhw, txt_seq_lens, device):  # (the signature before the mask)
        raise AssertionError("not called")

    old = copy.copy(pipe)
    old.transformer = copy.deepcopy(pipe.transformer)
    old.transformer.pos_embed.forward = old_rope
    with pytest.raises(
        ValueError, match=r"needs a diffusers whose QwenImageTransformer2DModel masks.*pip install -U"
    ):
        QwenImagePolicy(old, **OPTS)
    old = copy.copy(pipe)
    old.text_encoder = copy.deepcopy(pipe.text_encoder)
    old.text_encoder.model = old.text_encoder.model.language_model  # (transformers < 4.52's layout)
    with pytest.raises(ValueError, match=r"needs transformers >= 4.52"):
        QwenImagePolicy(old, **OPTS)


def test_batches_encoded_apart_concatenate_only_at_one_length(policy):
    from densegrpo_fast.policies.base import PromptEmbeds

    short, long_ = policy.encode_prompts(PROMPTS[:1]), policy.encode_prompts(PROMPTS[1:])
    with pytest.raises(ValueError, match=r"rows of other shapes.*encode the prompts together"):
        PromptEmbeds.cat([short, long_])
    both = PromptEmbeds.cat([short, policy.encode_prompts(PROMPTS[:1])])
    assert both.embeds.shape[0] == 2 and torch.equal(both.pooled[0], both.pooled[1])


def test_true_cfg_is_one_batched_call_rescaled_to_the_conditional_norm(policy):
    x = torch.randn(2, *policy.latent_shape)
    sigma = torch.tensor([0.9, 0.3])
    cond = policy.encode_prompts(PROMPTS)
    rows = []
    hook = policy.transformer.register_forward_hook(lambda m, a, kw, out: rows.append(kw["hidden_states"].shape[0]),
                                                    with_kwargs=True)  # fmt: skip
    v = policy.velocity(x, sigma, cond, guidance_scale=4.0)
    v_pos = policy.velocity(x, sigma, cond, guidance_scale=1.0)
    v_neg = policy.velocity(x, sigma, policy.encode_prompts([" ", " "], with_negative=False))
    hook.remove()
    assert rows == [4, 2, 2] and v.dtype == torch.float32 and v.shape == x.shape

    def tokens(u):  # [B, C, H, W] -> the packed 2x2 patch tokens [B, N, 4C], where the norm is taken
        return QwenImagePipeline._pack_latents(u, 2, *policy.latent_shape)

    combined = tokens(v_neg + 4.0 * (v_pos - v_neg))
    want = combined * tokens(v_pos).norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(tokens(v), want, rtol=0, atol=2e-5)
    torch.testing.assert_close(tokens(v).norm(dim=-1), tokens(v_pos).norm(dim=-1))
    # each row gets what it gets alone: its own prompt, encoded alone (another padding), in a call of one row
    alone = policy.velocity(x[1:], sigma[1:], policy.encode_prompts(PROMPTS[1:]), guidance_scale=4.0)
    torch.testing.assert_close(alone, v[1:], rtol=0, atol=2e-5)


@pytest.mark.parametrize("T,seq_len", [(2, 64), (4, 64), (10, 1024), (50, 6000), (20, 10000)])
def test_the_grid_is_the_schedulers_with_its_terminal_stretch(T, seq_len):
    from densegrpo_fast.policies.architectures import QWEN_IMAGE_SCHEDULER as cfg

    mu = resolution_mu(seq_len, 256, 8192, 0.5, 0.9)
    sched = FlowMatchEulerDiscreteScheduler(**cfg)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / T, T), mu=mu)
    ours = flux_sigma_grid(T, mu, shift_terminal=0.02)
    assert ours[0] == 1 and ours[-1] == 0 and math.isclose(ours[-2], 0.02, rel_tol=1e-6)
    torch.testing.assert_close(ours, sched.sigmas, rtol=0, atol=3e-7)
    assert not torch.allclose(ours, flux_sigma_grid(T, mu))  # the stretch moves every point but the first
    with pytest.raises(ValueError, match=r"shift_terminal \(1.0\) must lie in \(0, 1\)"):
        flux_sigma_grid(T, mu, shift_terminal=1.0)


def test_the_grid_follows_the_evaluations_resolution(policy):
    """At eval.resolution the image has another token count, and the pipeline's grid follows it."""
    wide = policy.at_resolution(64)
    assert wide.latent_shape == (4, 32, 32) and wide.image_seq_len == 256 and policy.image_seq_len == 64
    mu = resolution_mu(256, 256, 8192, 0.5, 0.9)
    torch.testing.assert_close(wide.sigma_grid(10), flux_sigma_grid(10, mu, 0.02))
    assert not torch.allclose(wide.sigma_grid(10), policy.sigma_grid(10))
    with pytest.raises(ValueError, match=r"eval.resolution \(42\) must be a multiple of 4"):
        policy.at_resolution(42)  # (the tiny VAE's factor 2 x 2x2 patches)


def test_schedulers_whose_grid_is_not_reproduced_are_refused(pipe):
    import copy

    karras = copy.copy(pipe)
    karras.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_karras_sigmas=True
    )
    with pytest.raises(ValueError, match=r"sets \['use_karras_sigmas'\].*Qwen-Image's scheduler config"):
        QwenImagePolicy(karras, **OPTS).sigma_grid(10)
    # SD3's grid has no terminal stretch: a checkpoint whose scheduler asks for one is refused there
    sd3 = tiny.sd3_pipeline(seed=0)
    sd3.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.02)
    from densegrpo_fast.policies.sd3 import SD3Policy

    with pytest.raises(ValueError, match=r"sets \['shift_terminal'\]"):
        SD3Policy(sd3, resolution=tiny.RESOLUTION, max_sequence_length=tiny.MAX_T5_TOKENS).sigma_grid(10)


@pytest.mark.parametrize("g, hw", [(4.0, (32, 32)), (1.0, (32, 32)), (4.0, (48, 32))])
def test_engine_ode_reproduces_the_diffusers_pipeline(pipe, policy, g, hw):
    """Zero noise, the same initial latents: the engine's sampler is QwenImagePipeline to 1e-5, with true CFG
    (negative prompt " ") and without (no negative prompt), square and portrait ([height, width] = [48, 32]:
    the transformer's image shapes and the grid's token count)."""
    T = 4
    policy = policy.at_resolution(hw, "model.resolution")
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    packed = QwenImagePipeline._pack_latents(noise, 2, *policy.latent_shape)
    call = dict(prompt=PROMPTS, height=hw[0], width=hw[1], num_inference_steps=T, true_cfg_scale=g,
                max_sequence_length=MAX_TOKENS, negative_prompt=" " if g > 1 else None)  # fmt: skip
    theirs = pipe(**call, latents=packed.clone(), output_type="latent").images
    theirs = QwenImagePipeline._unpack_latents(theirs, *hw, policy.vae_scale_factor)[:, :, 0]
    theirs_img = pipe(**call, latents=packed.clone(), output_type="pt").images

    grid = policy.sigma_grid(T)
    torch.testing.assert_close(grid, pipe.scheduler.sigmas, rtol=0, atol=3e-7)
    cond = policy.encode_prompts(PROMPTS, with_negative=g > 1)
    ro = sample(policy, cond, noise, Schedule(grid, torch.zeros(T)), guidance_scale=g, dense=False)
    ours = ro.latents[:, T]
    diff = (ours - theirs).abs().max().item()
    diff_img = (policy.decode(ours) - theirs_img).abs().max().item()
    print(f"Qwen-Image g={g} {hw}: max |latent diff| {diff:.2e}, max |image diff| {diff_img:.2e}")
    assert diff <= 1e-5 and diff_img <= 1e-5
    assert ours.abs().max() > 0.1


def test_bf16_transformer_sees_the_pipelines_timesteps(pipe):
    """In bf16 the transformer gets QwenImagePipeline's timestep values at every step of the grid (``1000 *
    sigma`` cast to the model's dtype, then / 1000), and from the same first latents returns the same velocity,
    bit for bit (without CFG: the pipeline runs its two CFG halves as two calls, the engine as one)."""
    import copy

    bf16 = copy.copy(pipe)  # everything but the VAE in bf16, as the engine loads a checkpoint
    for name in ("transformer", "text_encoder"):
        setattr(bf16, name, copy.deepcopy(getattr(pipe, name)).to(torch.bfloat16))
    policy = QwenImagePolicy(bf16, **OPTS)
    calls = []  # (the timestep the transformer computes with, its output)
    hook = bf16.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(
            (kwargs["timestep"].to(torch.bfloat16) * 1000, out[0])
        ),
        with_kwargs=True,
    )
    T = 8
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    packed = QwenImagePipeline._pack_latents(noise, 2, *policy.latent_shape).to(torch.bfloat16)
    try:
        bf16(prompt=PROMPTS, height=32, width=32, num_inference_steps=T, true_cfg_scale=1.0,
             max_sequence_length=MAX_TOKENS, output_type="latent", latents=packed)  # fmt: skip
        theirs, calls[:] = list(calls), []
        cond, grid = policy.encode_prompts(PROMPTS, with_negative=False), policy.sigma_grid(T)
        first = policy.velocity(noise, grid[0].expand(2), cond)
        for k in range(1, T):
            policy.velocity(noise, grid[k].expand(2), cond)
    finally:
        hook.remove()
    ours_t, theirs_t = [t for t, _ in calls], [t for t, _ in theirs]
    assert all(torch.equal(a, b) for a, b in zip(ours_t, theirs_t, strict=True)), (ours_t, theirs_t)
    own_cast = [(grid[k].to(torch.bfloat16) * 1000).expand(2) for k in range(T)]  # the transformer's own cast
    assert not all(map(torch.equal, own_cast, theirs_t)), "this grid does not tell the two roundings apart"
    unpacked = QwenImagePipeline._unpack_latents(theirs[0][1], 32, 32, policy.vae_scale_factor)[:, :, 0]
    torch.testing.assert_close(first, unpacked.float(), rtol=0, atol=0)


def test_default_lora_targets_cover_every_blocks_attention(policy):
    """The config's default targets are all eight attention projections of every block; the recipe's
    (Flow-GRPO's Qwen-Image targets) add both streams' MLPs, and every name there exists."""
    import copy

    import yaml
    from peft import LoraConfig

    from densegrpo_fast.config import LoRASection

    def adapted(targets):
        t = copy.deepcopy(policy).transformer
        t.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=targets))
        return {n.rsplit(".lora_A", 1)[0] for n, _ in t.named_parameters() if ".lora_A." in n}

    names = adapted(LoRASection().target_modules)
    attention = {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    assert names == {f"transformer_blocks.{i}.attn.{p}" for i in range(2) for p in attention}
    recipe = yaml.safe_load(
        (Path(__file__).parents[1] / "configs" / "qwen_image_pickscore.yaml").read_text()
    )["lora"]
    names = adapted(recipe["target_modules"])
    for target in recipe["target_modules"]:
        assert {f"transformer_blocks.{i}.{target}" for i in range(2)} <= names, target


def test_loads_a_diffusers_directory_and_names_missing_parts(qwen_dir, policy, tmp_path):
    import shutil

    loaded = load_policy("qwen_image", str(qwen_dir), "cpu", dtype="fp32", offload_text_encoders=True, **OPTS)
    assert isinstance(loaded, QwenImagePolicy) and loaded.offload_text_encoders
    x = torch.randn(1, *policy.latent_shape)
    sigma = torch.tensor([0.6])
    torch.testing.assert_close(
        loaded.velocity(x, sigma, loaded.encode_prompts(PROMPTS[:1]), 4.0),
        policy.velocity(x, sigma, policy.encode_prompts(PROMPTS[:1]), 4.0),
    )
    broken = tmp_path / "broken"
    shutil.copytree(qwen_dir, broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(
        ValueError, match=r"not a complete QwenImagePipeline checkpoint: missing text_encoder/"
    ):
        QwenImagePolicy.load(broken)
    with pytest.raises(ValueError, match=r"not in the Hugging Face cache.*hf download Qwen/Qwen-Image"):
        QwenImagePolicy.load(None, cache_dir=tmp_path / "empty_cache")


def _overrides(qwen_dir, tmp_path, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green dog\na cat\n")
    return [
        "model.family=qwen_image", f"model.checkpoint={qwen_dir}", f"model.resolution={tiny.RESOLUTION}",
        f"model.max_sequence_length={MAX_TOKENS}", f"prompts.dataset={prompts}", "prompts.prompts_per_iteration=2",
        "sampling.num_steps=3", "sampling.group_size=2", "noise.kind=uniform", "reward.name=redness", "lora.rank=4",
        "grpo.train_batch_size=4", f"eval.dataset={prompts}", "eval.num_prompts=2", "eval.num_steps=2",
        "run.iterations=1", f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("hw, tokens", [(None, 64), ((48, 32), 96)], ids=["square", "portrait"])
def test_one_iteration_through_the_trainer_on_its_own_grid_with_true_cfg(qwen_dir, tmp_path, hw, tokens):
    """Square and portrait ([48, 32]: its grid shifted for 96 tokens, not 64)."""
    import json

    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.trainer import setup, train

    overrides = _overrides(qwen_dir, tmp_path, *([f"model.resolution=[{hw[0]}, {hw[1]}]"] if hw else []))
    cfg = load_config(TrainConfig, None, overrides)
    # the family's defaults: its own grid (no fixed shift) and CFG 4.0, in training and evaluation
    assert (
        cfg.sampling.shift is None and cfg.sampling.guidance_scale == 4.0 and cfg.eval.guidance_scale == 4.0
    )
    probe = setup(
        load_config(TrainConfig, None, [*overrides, f"run.output_dir={tmp_path / 'probe'}"]), progress=False
    )
    torch.testing.assert_close(
        probe.schedule.sigmas, flux_sigma_grid(3, resolution_mu(tokens, 256, 8192, 0.5, 0.9), 0.02)
    )
    run_dir = train(cfg, progress=False)
    (step,) = [
        r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "reward_mean" in r
    ]
    assert step["rows_trained"] > 0 and math.isfinite(step["grad_norm"])
    assert_on_policy(step, exact=False)
    assert (run_dir / "lora_ema").is_dir()


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            ["sampling.shift=3.0"],
            r"sampling.shift \(3.0\) with model.family qwen_image: Qwen-Image samples on a grid",
        ),
        (
            ["model.family=sd3", "model.max_sequence_length=1024"],
            r"max_sequence_length \(1024\).*T5 takes at most",
        ),
    ],
)
def test_config_cross_checks(overrides, match):
    from densegrpo_fast.config import TrainConfig, load_config

    with pytest.raises(ValueError, match=match):
        load_config(
            TrainConfig, None, ["model.family=qwen_image", "model.checkpoint=Qwen/Qwen-Image", *overrides]
        )
    # Qwen-Image's encoder takes up to 1024 tokens
    load_config(TrainConfig, None, ["model.family=qwen_image", "model.max_sequence_length=1024"])


def test_the_vision_tower_and_lm_head_stay_on_the_host(qwen_dir, policy):
    """Qwen2.5-VL's vision tower and LM head, which a text prompt's encoding never calls, are neither loaded
    onto the device nor moved there with an offloaded text encoder ("meta" stands for the device here: what
    goes there loses its values); encoding gives the same embeds without them; a head tied to the input
    embedding moves with the language model."""
    on = lambda m: {p.device.type for p in m.parameters()}  # noqa: E731
    for offload in (False, True):
        loaded = QwenImagePolicy.load(
            qwen_dir, device="meta", dtype="fp32", offload_text_encoders=offload, **OPTS
        )
        encoder = loaded.pipe.text_encoder
        if offload:
            assert on(encoder) == {"cpu"}
            loaded._move_text_encoders(loaded.device)  # (as text_encoders_on_device does)
        assert on(encoder.model.language_model) == on(loaded.transformer) == on(loaded.pipe.vae) == {"meta"}
        assert on(encoder.model.visual) == on(encoder.lm_head) == {"cpu"}
    pipe = tiny.qwen_image_pipeline(seed=0)  # (the fixture's weights)
    unused = QwenImagePolicy.unused_modules(pipe)
    assert set(unused) == {"text_encoder.model.visual", "text_encoder.lm_head"}
    for m in unused.values():
        m.to("meta")
    embeds, mask = QwenImagePolicy(pipe, **OPTS)._encode(PROMPTS)
    theirs = policy._encode(PROMPTS)
    assert torch.equal(embeds, theirs[0]) and torch.equal(mask, theirs[1])
    tied = tiny.qwen_image_pipeline(seed=0)
    tied.text_encoder.lm_head.weight = tied.text_encoder.model.language_model.embed_tokens.weight
    assert set(QwenImagePolicy.unused_modules(tied)) == {"text_encoder.model.visual"}


def test_move_except_sends_the_modules_that_stay_to_the_host():
    """Where a pipeline was built on the device (benchmarks/real_model_iteration.py), the modules that stay
    are sent to the host, not left where they are; the others go to the device."""
    from densegrpo_fast.policies.pretrained import move_except

    moves = []

    class Spy(torch.nn.Linear):
        def to(self, *args, **kwargs):
            moves.append((self, str(args[0])))
            return super().to(*args, **kwargs)

    kept, moved = Spy(2, 2), Spy(2, 2)
    root = torch.nn.Sequential(torch.nn.Sequential(kept, torch.nn.Linear(2, 2)), moved)
    move_except(root, "meta", {id(kept)})
    assert moves == [(kept, "cpu"), (moved, "meta")]
    assert root[0][1].weight.is_meta and moved.weight.is_meta and not kept.weight.is_meta


def test_the_exported_lora_loads_into_qwen_image_pipeline(tmp_path):
    """``QwenImagePipeline.load_lora_weights`` takes the exported LoRA whole (true CFG on), and ``lora.init``
    starts from it."""
    tiny.exported_lora_round_trip(tiny.qwen_image_pipeline, QwenImagePolicy, OPTS, PROMPTS, 4.0, tmp_path)


@pytest.mark.slow  # (the slow tier: .ci/run runs it after the default one)
def test_the_memory_estimate_runs_on_fake_weights_and_matches_the_run(qwen_dir, tmp_path):
    """The estimate's fake tensors go through Qwen2.5-VL, the adapter's encode and the masked attention, and
    land on the run counted for real. Not to the byte as for SD3 (tests/test_memory.py): the transformer's
    rotary tables, cached on first use (the tiny model's: 0.26 MB; Qwen-Image's: 4 MiB of tens of GiB), and
    the tokenizer's host tensors are counted differently, so each phase's live bytes must agree to within
    those tables' bytes."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.memory import estimate_run, fake_policy, measure_run, new_fake_mode

    torch.set_num_threads(1)

    def config(name):
        extra = ("sampling.group_size=3", "grpo.train_batch_size=6", "grpo.beta=0.04", "run.iterations=2",
                 f"run.output_dir={tmp_path / name / 'run'}")  # fmt: skip
        (tmp_path / name).mkdir()
        return load_config(TrainConfig, None, _overrides(qwen_dir, tmp_path / name, *extra))

    real, fake = config("real"), config("fake")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # as the estimate runs
        policy = load_policy("qwen_image", str(qwen_dir), "cpu", **real.model.adapter_options())
        rope = policy.transformer.pos_embed
        slack = 2 * (rope.pos_freqs.nbytes + rope.neg_freqs.nbytes)
        measured = measure_run(real, policy)
        policy, source = fake_policy(fake, new_fake_mode())
        est = estimate_run(fake, policy)
    assert source == str(qwen_dir)
    weights = sum(est.weights.values())
    for phase, bytes_ in measured.items():
        live = bytes_ - weights
        assert abs(est.phases[phase] - bytes_) <= slack, (phase, est.phases[phase] - weights, live)
    assert measured["rollout + reward"] - weights > 10 * slack  # (the slack is small beside what is counted)
    assert est.calls["transformer"] > 0 and est.calls["text_encoder.model"] > 0
    # the text encoder's weights on the device: the language model's alone (no vision tower, no LM head)
    lm = policy.pipe.text_encoder.model.language_model
    assert est.weights["text_encoder"] == sum(t.nbytes for t in (*lm.parameters(), *lm.buffers())) > 0


@pytest.mark.slow  # (the slow tier: .ci/run runs it after the default one)
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch.distributed with gloo is needed")
def test_two_processes_train_what_one_process_trains(qwen_dir, tmp_path):
    """Under torchrun each rank encodes its own prompts, padded to its own longest, where one process sampling
    the ranks' rows as two waves pads them together: the same run up to the rounding that padding brings (SD3's
    and FLUX.1's agree bit for bit, tests/test_distributed.py). LoRA, replicated over the ranks."""
    from test_distributed import TRAIN, python, records, torchrun

    # (TRAIN's config is the toy's: its grids and guidance are set, so the family's defaults do not apply)
    args = [*TRAIN, *_overrides(qwen_dir, tmp_path, "model.num_threads=1", "run.sample_grid_every=0",
                                "eval.rewards={}", "reward.kwargs={}", "grpo.beta=0.04", "sampling.shift=null",
                                "eval.shift=null", "sampling.guidance_scale=4.0", "eval.guidance_scale=4.0")]  # fmt: skip
    done = torchrun([*args, f"run.output_dir={tmp_path / 'two'}"])
    assert done.returncode == 0, done.stderr[-3000:]
    one = python([*args, f"run.output_dir={tmp_path / 'one'}", "sampling.reward_waves=2"])
    assert one.returncode == 0, one.stderr[-3000:]
    (step,), (ref,) = ([r for r in records(tmp_path / d) if "reward_mean" in r] for d in ("two", "one"))
    assert step["rows_trained"] == ref["rows_trained"] > 0
    assert step["grad_norm"] != ref["grad_norm"]  # (padded alike, they would agree bit for bit, as SD3's do)
    # measured: rewards 7e-6 apart (relative), each step's mean reward up to 1.3e-4, the gradient's norm 1.3e-3
    # (normalising by the groups' small spreads magnifies the rounding)
    assert step["reward_mean"] == pytest.approx(ref["reward_mean"], rel=1e-4)
    assert step["R_mean"] == pytest.approx(ref["R_mean"], rel=1e-3)
    assert step["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-2)
    assert_on_policy(step, exact=False)
