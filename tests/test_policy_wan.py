"""Wan (text to video) on tiny random components: the contract (video latents, UMT5 prompts padded with zeros
to the full length, CFG in one batched call, videos out), the scheduler's grid, the pipeline reproduced by the
engine's sampler, image rewards on videos, and the trainer, the evaluation and the LoRA export on it."""

import json
import math

import pytest
import tiny_models as tiny
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from tolerances import assert_on_policy

from densegrpo_fast.policies import load_policy
from densegrpo_fast.policies.base import Policy
from densegrpo_fast.policies.wan import WanPolicy
from densegrpo_fast.rewards.video import FrameMean, frame_indices, frame_mean
from densegrpo_fast.rollout import sample
from densegrpo_fast.schedule import Schedule

PROMPTS = ["a red circle", "two blue squares beside a tall green tree"]
MAX_TOKENS = 24  # (the second prompt's 41 characters are cut to 24 tokens)
FRAMES = 5
OPTS = dict(resolution=tiny.RESOLUTION, max_sequence_length=MAX_TOKENS, frames=FRAMES)
#: Wan 2.1's released scheduler (scheduler/scheduler_config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers).
WAN_UNIPC = dict(
    num_train_timesteps=1000, prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
    solver_order=2, solver_type="bh2", final_sigmas_type="zero", lower_order_final=True,
)  # fmt: skip


@pytest.fixture(scope="module")
def pipe():
    return tiny.wan_pipeline(seed=0)


@pytest.fixture(scope="module")
def policy(pipe):
    return WanPolicy(pipe, **OPTS)


@pytest.fixture(scope="module", autouse=True)
def image_only_redness():
    """``redness`` that refuses anything but images [B, 3, H, W] (``redness`` itself would average a video's
    pixels), registered for this module's tests: a path that hands a reward videos unwrapped fails."""
    from densegrpo_fast.rewards import _REGISTRY, build_reward, register

    red = build_reward("redness")

    @register("image_only_redness")
    def factory():
        def reward(images, prompts):
            if images.ndim != 4:
                raise ValueError(f"image_only_redness takes images [B, 3, H, W], got {tuple(images.shape)}")
            return red(images, prompts)

        return reward

    yield
    _REGISTRY.pop("image_only_redness")


@pytest.fixture(scope="module")
def wan_dir(pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_wan")
    pipe.save_pretrained(root)
    return root


def test_implements_the_policy_contract(policy, pipe):
    assert isinstance(policy, Policy) and policy.video
    # 5 frames -> 2 latent frames (temporal factor 4), 32 px / spatial factor 8 = 4
    assert policy.latent_shape == (16, 2, 4, 4) and policy.dtype == torch.float32
    for m in (pipe.vae, pipe.text_encoder, policy.transformer):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    cond = policy.encode_prompts([PROMPTS[0], PROMPTS[1], PROMPTS[0]])
    # every prompt padded to the full length, with zeros after its tokens (</s> included)
    n = len(pipe.tokenizer(PROMPTS[0]).input_ids)
    assert cond.embeds.shape == (3, MAX_TOKENS, 32) and cond.pooled.shape == (3, 0) and 5 < n < MAX_TOKENS
    assert cond.embeds[0, :n].abs().sum(1).gt(0).all() and not cond.embeds[0, n:].any()
    assert cond.embeds[1].abs().sum(1).gt(0).all()  # (cut: no zeros)
    assert torch.equal(cond.embeds[0], cond.embeds[2])
    assert cond.has_negative and cond.neg_embeds.shape == cond.embeds.shape
    assert cond.neg_embeds[0, :1].any() and not cond.neg_embeds[0, 1:].any()  # "": </s> alone
    videos = policy.decode(torch.randn(2, *policy.latent_shape))
    assert videos.shape == (2, 3, FRAMES, 32, 32) and videos.min() >= 0 and videos.max() <= 1


def test_bad_frames_resolutions_and_checkpoints_are_refused(pipe):
    import copy

    with pytest.raises(
        ValueError, match=r"model.frames \(6\): Wan's VAE encodes 1 \+ 4 k frames.*give e.g. 5"
    ):
        WanPolicy(pipe, **{**OPTS, "frames": 6})
    with pytest.raises(ValueError, match=r"model.resolution \(40\).*multiple of 16"):
        WanPolicy(pipe, **{**OPTS, "resolution": 40})
    two = copy.copy(pipe)
    two.register_to_config(boundary_ratio=0.875)
    with pytest.raises(ValueError, match=r"this WanPipeline sets boundary_ratio but not transformer_2"):
        WanPolicy(two, **OPTS)
    with pytest.raises(ValueError, match=r"model.frames \(5\): model.family sd3 makes images"):
        load_policy("sd3", None, "cpu", frames=5)


def test_the_prompt_embeds_are_the_pipelines(pipe, policy):
    theirs, neg = pipe.encode_prompt(
        list(PROMPTS), negative_prompt=None, device="cpu", max_sequence_length=MAX_TOKENS
    )
    cond = policy.encode_prompts(PROMPTS)
    assert torch.equal(cond.embeds, theirs) and torch.equal(cond.neg_embeds, neg)


def test_cfg_is_one_batched_call(policy):
    x = torch.randn(2, *policy.latent_shape)
    sigma = torch.tensor([0.9, 0.3])
    cond = policy.encode_prompts(PROMPTS)
    calls = []
    hook = policy.transformer.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(kwargs["timestep"].clone()), with_kwargs=True
    )
    v = policy.velocity(x, sigma, cond, guidance_scale=5.0)
    v_pos = policy.velocity(x, sigma, cond, guidance_scale=1.0)
    v_neg = policy.velocity(x, sigma, policy.encode_prompts(["", ""], with_negative=False))
    hook.remove()
    assert [len(c) for c in calls] == [4, 2, 2]  # CFG: one call of 2B rows
    torch.testing.assert_close(calls[0], torch.tensor([900.0, 300.0, 900.0, 300.0]), rtol=0, atol=0)
    assert v.dtype == torch.float32 and v.shape == x.shape
    torch.testing.assert_close(v, v_neg + 5.0 * (v_pos - v_neg), rtol=0, atol=2e-5)


@pytest.mark.parametrize("T", [2, 10, 50])
def test_the_grid_is_the_schedulers(pipe, T):
    """Wan's released UniPC (flow sigmas at flow_shift 3) and FlowMatchEuler give the pipeline's sigmas; a
    scheduler of another kind, or UniPC without flow sigmas, is refused."""
    import copy

    for scheduler in (UniPCMultistepScheduler(**WAN_UNIPC), FlowMatchEulerDiscreteScheduler(shift=5.0)):
        other = copy.copy(pipe)
        other.scheduler = scheduler
        ours = WanPolicy(other, **OPTS).sigma_grid(T)
        scheduler.set_timesteps(T)
        theirs = scheduler.sigmas.float()
        assert ours[0] == 1 and theirs[0] in (1, 1 - 1e-6)  # (UniPC's 1 - 1e-6 starts at 1 here)
        assert torch.equal(ours[1:], theirs[1:]) and ours[-1] == 0 and len(ours) == T + 1
        assert (ours.diff() < 0).all()
    bad = copy.copy(pipe)
    bad.scheduler = UniPCMultistepScheduler()
    with pytest.raises(ValueError, match=r"UniPCMultistepScheduler\) does not sample a flow-matching grid"):
        WanPolicy(bad, **OPTS).sigma_grid(T)


@pytest.mark.parametrize(
    "g, hw, frames, expand, negative", [(5.0, (32, 32), FRAMES, False, None), (1.0, (32, 32), 9, False, None),
                                        (5.0, (48, 32), 1, False, None), (5.0, (32, 32), FRAMES, True, None),
                                        (5.0, (32, 32), FRAMES, False, "static, blurry, low quality")],
)  # fmt: skip
def test_engine_ode_reproduces_the_diffusers_pipeline(pipe, g, hw, frames, expand, negative):
    """Zero noise, the same initial latents, FlowMatchEulerDiscreteScheduler in the pipeline (an Euler sampler,
    as the engine's): the engine's sampler is WanPipeline to 1e-5 in the latents and the decoded videos, with
    CFG (two calls there, one here) and without, square and portrait, 1, 5 and 9 frames, with Wan 2.2
    TI2V-5B's per-token timesteps, and with a negative prompt (``model.negative_prompt``); the transformer sees
    the pipeline's times bit for bit."""
    T = 4
    pipe = tiny.wan_pipeline(seed=0, expand_timesteps=True) if expand else pipe
    policy = WanPolicy(pipe, resolution=hw, max_sequence_length=MAX_TOKENS, frames=frames)
    if negative is not None:
        policy.set_negative_prompt(negative)
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    call = dict(prompt=list(PROMPTS), height=hw[0], width=hw[1], num_frames=frames, num_inference_steps=T,
                guidance_scale=g, max_sequence_length=MAX_TOKENS, negative_prompt=negative)  # fmt: skip
    times = []
    hook = policy.transformer.register_forward_hook(
        lambda m, args, kwargs, out: times.append(kwargs["timestep"][:1].clone()), with_kwargs=True
    )
    try:
        theirs = pipe(**call, latents=noise.clone(), output_type="latent").frames
        theirs_times = [t for t in times[:: 2 if g > 1 else 1]]  # (the pipeline: cond, then uncond)
        times.clear()
        theirs_video = pipe(**call, latents=noise.clone(), output_type="pt").frames  # [B, F, 3, H, W]
        times.clear()
        grid = policy.sigma_grid(T)
        torch.testing.assert_close(grid, pipe.scheduler.sigmas, rtol=0, atol=0)
        cond = policy.encode_prompts(PROMPTS, with_negative=g > 1)
        ro = sample(policy, cond, noise, Schedule(grid, torch.zeros(T)), guidance_scale=g, dense=False)
    finally:
        hook.remove()
    assert len(times) == T and all(map(torch.equal, times, theirs_times))
    if expand:  # (one time per token: frames x (H/16) x (W/16) of them)
        assert pipe.config.expand_timesteps
    ours = ro.latents[:, T]
    diff = (ours - theirs).abs().max().item()
    video = policy.decode(ours)
    diff_video = (video - theirs_video.permute(0, 2, 1, 3, 4)).abs().max().item()
    print(
        f"Wan g={g} {hw} {frames} frames expand={expand} negative={negative!r}: max |latent diff| {diff:.2e}, "
        f"video {diff_video:.2e}"
    )
    assert diff <= 1e-5 and diff_video <= 1e-5
    assert ours.abs().max() > 0.1 and video.shape == (2, 3, frames, *hw)


def test_expanded_timesteps_reach_every_token(pipe):
    """Wan 2.2 TI2V-5B's transformer takes a time per token: the adapter gives each of a row's tokens its row's."""
    expand = WanPolicy(tiny.wan_pipeline(seed=0, expand_timesteps=True), **OPTS)
    seen = []
    hook = expand.transformer.register_forward_hook(
        lambda m, args, kwargs, out: seen.append(kwargs["timestep"]), with_kwargs=True
    )
    expand.velocity(
        torch.randn(2, *expand.latent_shape), torch.tensor([0.8, 0.2]), expand.encode_prompts(PROMPTS)
    )
    hook.remove()
    tokens = 2 * (4 // 2) * (4 // 2)  # latent frames x (4 / 2) x (4 / 2)
    assert seen[0].shape == (2, tokens) and expand.tokens == tokens
    assert torch.equal(seen[0], torch.tensor([800.0, 200.0])[:, None].expand(2, tokens))


def test_frame_indices():
    assert frame_indices(9, 4) == [0, 3, 5, 8]
    assert frame_indices(81, 4) == [0, 27, 53, 80]
    assert frame_indices(9, 1) == [4] and frame_indices(9, None) == list(range(9))
    assert frame_indices(3, 4) == [0, 1, 2] and frame_indices(1, 4) == [0]


def test_image_rewards_score_videos_frame_by_frame(policy):
    """An image reward on videos is the mean of its scores of the chosen frames; images pass through, a
    pairwise reward keeps its groups (each frame's batch in row order), and a reward that takes videos whole
    is left alone."""
    from densegrpo_fast.rewards import build_reward
    from densegrpo_fast.rewards.pairwise import pointwise_view, score

    videos = torch.rand(4, 3, 9, 8, 8)
    red = build_reward("redness")
    wrapped = frame_mean(red, 4)
    want = torch.stack([red(videos[:, :, f], PROMPTS * 2) for f in (0, 3, 5, 8)]).mean(0)
    assert torch.equal(wrapped(videos, PROMPTS * 2), want)
    assert torch.equal(wrapped(videos[:, :, 0], PROMPTS * 2), red(videos[:, :, 0], PROMPTS * 2))
    assert isinstance(frame_mean(red, None), FrameMean) and frame_mean(red, 4, video=False) is red
    assert frame_mean(wrapped, 2) is wrapped  # (takes videos already)
    groups = [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    win = frame_mean(build_reward("win_rate", reward={"name": "redness"}, temperature=0.0), 4)
    rates = score(win, videos, groups, group_size=2)
    per_frame = [score(win.image_reward, videos[:, :, f], groups, 2) for f in (0, 3, 5, 8)]
    assert torch.equal(rates, torch.stack(per_frame).mean(0)) and not torch.equal(rates, per_frame[0])
    assert torch.equal(pointwise_view(win)(videos, groups), want)


def test_dense_rewards_decode_only_the_frames_scored(policy):
    """Scoring decodes one video at a time and keeps the frames the reward scores, so a dense reward's batch of
    videos never sits decoded whole; the scores are those of the whole videos, and the reward calls see as many
    images as before (the chunk of rows shrinks by the frames kept)."""
    from densegrpo_fast.dense import latent_rewards
    from densegrpo_fast.rewards import build_reward
    from densegrpo_fast.rewards.video import scoring_decode

    red = build_reward("redness")
    wrapped = frame_mean(red, 2)
    decode, chunk = scoring_decode(policy.decode, wrapped, 256)
    latents = torch.randn(3, *policy.latent_shape)
    full = policy.decode(latents)
    kept = decode(latents)
    assert chunk == 128 and kept.shape == (3, 3, 2, 32, 32)
    torch.testing.assert_close(kept, full[:, :, [0, FRAMES - 1]], rtol=0, atol=1e-6)
    torch.testing.assert_close(
        wrapped(kept, PROMPTS[:1] * 3), wrapped(full, PROMPTS[:1] * 3), rtol=0, atol=1e-6
    )
    assert scoring_decode(policy.decode, red, 256) == (policy.decode, 256)  # (an image reward: as it was)
    assert scoring_decode(policy.decode, frame_mean(red, None), 256)[1] == 256 // FRAMES
    clean = torch.randn(2, 3, *policy.latent_shape)  # [B, T+1, *latent]
    R = latent_rewards(policy.decode, wrapped, clean, PROMPTS, [0, 1])
    want = torch.stack([wrapped(policy.decode(clean[:, k]), PROMPTS) for k in range(3)], 1)
    torch.testing.assert_close(R, want, rtol=0, atol=1e-6)


def _overrides(wan_dir, tmp_path, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green dog\na cat\n")
    return [
        "model.family=wan", f"model.checkpoint={wan_dir}", f"model.resolution={tiny.RESOLUTION}",
        f"model.max_sequence_length={MAX_TOKENS}", f"model.frames={FRAMES}", f"prompts.dataset={prompts}",
        "prompts.prompts_per_iteration=2", "sampling.num_steps=3", "sampling.group_size=2", "noise.kind=uniform",
        "reward.name=image_only_redness", "reward.frames=2", "lora.rank=4", "grpo.train_batch_size=4",
        f"eval.dataset={prompts}", "eval.num_prompts=2", "eval.num_steps=2", "run.iterations=1",
        f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_one_iteration_through_the_trainer(wan_dir, tmp_path, mode, monkeypatch):
    """DenseGRPO (every step's completion decoded to a video and scored on two frames) and Flow-GRPO (the final
    videos) on videos, with a held-out reward of its own frames; a sample grid of frame strips and a GIF of the
    videos, both shown in W&B (a stand-in). The reward refuses videos: every path must hand it frames."""
    import sys

    from test_logging import FakeWandb

    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.trainer import train

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    extra = (
        "run.sample_grid_every=1",
        f"dense.mode={mode}",
        "eval.rewards={mid: {name: image_only_redness, frames: 1}}",
        "run.wandb.enabled=true",
    )
    cfg = load_config(TrainConfig, None, _overrides(wan_dir, tmp_path, *extra))
    assert cfg.lora.target_modules[0] == "attn1.to_q" and cfg.sampling.guidance_scale == 5.0
    from densegrpo_fast.policies.wan import VideoDecode

    decoded, forward = [], VideoDecode.forward
    monkeypatch.setattr(VideoDecode, "forward", lambda self, z: decoded.append(len(z)) or forward(self, z))
    run_dir = train(cfg, progress=False)
    # scoring decodes one video at a time: 4 rows x (T + 1 = 4 latents, dense; the final one, sparse); the
    # sample grid decodes its 4 rows together, each held-out evaluation its 2 prompts
    scored = 4 * (4 if mode == "dense" else 1)
    assert decoded.count(1) == scored and sorted(set(decoded)) == [1, 2, 4]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (step,) = [r for r in records if "reward_mean" in r]
    assert step["rows_trained"] > 0 and math.isfinite(step["grad_norm"])
    assert_on_policy(step, exact=False)
    held_out = [r for r in records if "eval_reward" in r][-1]
    assert held_out["eval_mid"] != held_out["eval_reward"]  # (one frame, the middle one; two frames)
    assert {p.name for p in (run_dir / "samples").iterdir()} == {"iter_00001.png", "iter_00001.gif"}
    shown = {k: v.path for entry in fake.runs[0].logs for k, v in entry.items() if k.startswith("samples")}
    assert shown == {k: str(run_dir / "samples" / f) for k, f in (("samples", "iter_00001.png"),
                                                                   ("samples_video", "iter_00001.gif"))}  # fmt: skip
    (video,) = [entry["samples_video"] for entry in fake.runs[0].logs if "samples_video" in entry]
    assert isinstance(video, FakeWandb.Video)  # (a playing GIF, not a still image)
    assert (run_dir / "lora_ema").is_dir()


def test_the_eval_command_scores_and_saves_videos(wan_dir, tmp_path):
    from PIL import Image

    from densegrpo_fast.evaluate import run_eval

    out = tmp_path / "eval"
    overrides = [o for o in _overrides(wan_dir, tmp_path) if not o.startswith(("run.", "reward."))]
    summary = run_eval(
        None,
        [*overrides, "eval.rewards={red: {name: image_only_redness, frames: 1}}", f"eval.output_dir={out}",
         "eval.save_images=true"],
        progress=False,
    )  # fmt: skip
    assert summary["num_prompts"] == 2 and 0 < summary["scores"]["red"] < 1
    assert summary["frames"] == FRAMES and summary["rewards"]["red"]["frames"] == 1
    gif = Image.open(out / "images" / "00000_0.gif")
    assert gif.n_frames == FRAMES and gif.size == (32, 32)


def test_a_negative_prompt_is_recorded_where_cfg_uses_it(wan_dir, tmp_path):
    """``model.negative_prompt``: the eval command samples with it and records it, refusing to resume its scores
    under another (the family's included, and an older evaluation's, which took the family's); psi's record names
    it where CFG is on (an older table took the family's); unused where CFG is off (noted); refused by the
    guidance-distilled families."""
    from densegrpo_fast.calibration import calibrated_for, calibration_changes
    from densegrpo_fast.config import ConfigError, TrainConfig, load_config
    from densegrpo_fast.evaluate import run_eval

    out = tmp_path / "eval"
    overrides = [o for o in _overrides(wan_dir, tmp_path) if not o.startswith(("run.", "reward."))]
    overrides += ["eval.rewards={red: {name: image_only_redness, frames: 1}}", f"eval.output_dir={out}"]
    summary = run_eval(None, [*overrides, "model.negative_prompt=static, blurry"], progress=False)
    assert summary["negative_prompt"] == "static, blurry" and 0 < summary["scores"]["red"] < 1
    for other in (
        "model.negative_prompt=washed out",
        "model.negative_prompt=null",
    ):  # (null: the family's, "")
        with pytest.raises(ValueError, match=r"negative_prompt"):
            run_eval(None, [*overrides, other], progress=False)
    # an evaluation from before the setting (no negative recorded) sampled with the family's: it resumes under the
    # family's, and not under another
    base = [*overrides, f"eval.output_dir={tmp_path / 'base'}"]
    assert run_eval(None, base, progress=False)["negative_prompt"] == ""
    protocol = json.loads((tmp_path / "base" / "protocol.json").read_text())
    del protocol["negative_prompt"]
    (tmp_path / "base" / "protocol.json").write_text(json.dumps(protocol))
    run_eval(None, [*base, 'model.negative_prompt=""'], progress=False)
    with pytest.raises(ValueError, match=r"negative_prompt"):
        run_eval(None, [*base, "model.negative_prompt=static"], progress=False)
    cfg = load_config(TrainConfig, None, _overrides(wan_dir, tmp_path, "model.negative_prompt=static"))
    assert cfg.sampling.guidance_scale > 1 and calibrated_for(cfg)["negative_prompt"] == "static"
    # a psi table from before the setting was calibrated with the family's negative
    older = {k: v for k, v in calibrated_for(cfg).items() if k != "negative_prompt"}
    assert calibration_changes(older, calibrated_for(cfg), "wan") == "negative_prompt: '' -> 'static'"
    plain = calibrated_for(load_config(TrainConfig, None, _overrides(wan_dir, tmp_path)))
    assert plain["negative_prompt"] == "" and calibration_changes(older, plain, "wan") == ""
    off = ["model.negative_prompt=static", "sampling.guidance_scale=1", "eval.guidance_scale=1"]
    cfg = load_config(TrainConfig, None, _overrides(wan_dir, tmp_path, *off))
    assert "negative_prompt" not in calibrated_for(cfg)
    assert any("model.negative_prompt" in keys for keys, _ in cfg.ignored_settings())
    for family in ("flux", "flux_kontext"):
        with pytest.raises(ConfigError, match=rf"model.family {family} is guidance-distilled"):
            load_config(TrainConfig, None, [f"model.family={family}", "model.negative_prompt=static"])


def test_frames_and_family_defaults_in_the_config():
    from densegrpo_fast.config import WAN_LORA_TARGETS, TrainConfig, load_config

    cfg = load_config(TrainConfig, None, ["model.family=wan"])
    assert cfg.model.video and cfg.sampling.shift is None and cfg.eval.num_steps == 50
    assert cfg.lora.target_modules == WAN_LORA_TARGETS and cfg.reward.frames == 4
    with pytest.raises(
        ValueError, match=r"model.frames \(8\): Wan's VAE encodes 4k \+ 1 frames.*give e.g. 9"
    ):
        load_config(TrainConfig, None, ["model.family=wan", "model.frames=8"])
    with pytest.raises(ValueError, match=r"model.frames \(5\) applies to the video families \(wan\) only"):
        load_config(TrainConfig, None, ["model.family=sd3", "model.frames=5"])
    image = load_config(TrainConfig, None, ["model.family=sd3", "reward.frames=2"])
    why = "model.family=sd3 makes images: reward.frames serves the video families"
    assert image.ignored_settings() == [(["reward.frames"], why)]
    assert load_config(TrainConfig, None, ["model.family=wan", "reward.frames=2"]).ignored_settings() == []
    with pytest.raises(
        ValueError, match=r"max_sequence_length \(513\) with model.family wan: UMT5 takes at most"
    ):
        load_config(TrainConfig, None, ["model.family=wan", "model.max_sequence_length=513"])


def test_loads_a_diffusers_directory_and_names_missing_parts(wan_dir, policy, tmp_path):
    import shutil

    loaded = load_policy("wan", str(wan_dir), "cpu", dtype="fp32", **OPTS)
    assert isinstance(loaded, WanPolicy) and loaded.latent_shape == policy.latent_shape
    x = torch.randn(1, *policy.latent_shape)
    sigma = torch.tensor([0.6])
    torch.testing.assert_close(
        loaded.velocity(x, sigma, loaded.encode_prompts(PROMPTS[:1]), 5.0),
        policy.velocity(x, sigma, policy.encode_prompts(PROMPTS[:1]), 5.0),
    )
    broken = tmp_path / "broken"
    shutil.copytree(wan_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ValueError, match=r"not a complete WanPipeline checkpoint: missing vae/"):
        WanPolicy.load(broken)
    a14b = tmp_path / "a14b"  # (Wan 2.2 A14B's two experts: refused before any weights load)
    shutil.copytree(wan_dir, a14b)
    index = json.loads((a14b / "model_index.json").read_text())
    (a14b / "model_index.json").write_text(json.dumps({**index, "boundary_ratio": 0.875}))
    for weights in (a14b / "transformer").glob("*.safetensors"):  # (nothing reads them)
        weights.write_bytes(b"not weights")
    with pytest.raises(
        ValueError, match=r"a14b sets boundary_ratio but not transformer_2: Wan 2.2 A14B's two"
    ):
        WanPolicy.load(a14b)
    with pytest.raises(
        ValueError, match=r"not in the Hugging Face cache.*hf download Wan-AI/Wan2.1-T2V-1.3B-Diff"
    ):
        WanPolicy.load(None, cache_dir=tmp_path / "empty_cache")


def test_the_exported_lora_loads_into_wan_pipeline(tmp_path):
    """``WanPipeline.load_lora_weights`` takes the exported LoRA whole (CFG on), and ``lora.init`` starts from it."""
    from densegrpo_fast.config import WAN_LORA_TARGETS

    tiny.exported_lora_round_trip(
        tiny.wan_pipeline, WanPolicy, OPTS, PROMPTS, 5.0, tmp_path, targets=WAN_LORA_TARGETS
    )


@pytest.mark.slow  # (the slow tier: .ci/run runs it after the default one)
@pytest.mark.parametrize("experts", [1, 2])
def test_the_memory_estimate_runs_on_fake_weights_and_matches_the_run(request, tmp_path, experts):
    """The estimate's fake tensors go through UMT5, the adapter (with Wan 2.2 A14B's two experts too), the video
    VAE (its whole decode profiled as one call: its decoder's calls share a cache) and the frame-by-frame
    reward, and land on the run counted for real, to the byte."""
    wan_dir = request.getfixturevalue("wan_dir" if experts == 1 else "pair_dir")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.memory import estimate_run, fake_policy, measure_run, new_fake_mode

    torch.set_num_threads(1)

    def config(name):
        extra = ("sampling.group_size=3", "grpo.train_batch_size=6", "grpo.beta=0.04", "run.iterations=2",
                 f"run.output_dir={tmp_path / name / 'run'}")  # fmt: skip
        (tmp_path / name).mkdir()
        return load_config(TrainConfig, None, _overrides(wan_dir, tmp_path / name, *extra))

    real, fake = config("real"), config("fake")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # as the estimate runs
        policy = load_policy("wan", str(wan_dir), "cpu", **real.model.adapter_options())
        measured = measure_run(real, policy)
        policy, source = fake_policy(fake, new_fake_mode())
        est = estimate_run(fake, policy)
    assert source == str(wan_dir)
    weights = sum(est.weights.values())
    for (
        phase,
        bytes_,
    ) in measured.items():  # (12 bytes: as FLUX.2 [klein]'s, schedule.std of the 2nd iteration)
        assert 0 <= bytes_ - est.phases[phase] <= (12 if phase == "prompt encoding" else 0), phase
    assert measured["rollout + reward"] - weights > 1_000_000
    assert est.calls["transformer"] > 0 and est.calls["text_encoder"] > 0 and est.calls["vae.decode"] > 0
    assert est.calls.get("transformer_2", 0) > 0 if experts == 2 else "transformer_2" not in est.weights


def test_the_walkers_see_through_frame_mean():
    """The searches for a reward's models (the memory estimate's ``reward_modules``; ``weights_of``, which the
    cross-rank checks and resumes compare) find as much through a FrameMean, alone or in a dict, as without it,
    at every depth."""
    from densegrpo_fast.distributed import weights_of
    from densegrpo_fast.memory import reward_modules

    class Level:
        def __init__(self, below):
            self.below = below

    for depth in range(1, 8):
        reward = torch.nn.Linear(2, 2)
        for _ in range(depth):
            reward = Level(reward)
        wrapped = frame_mean(reward, 4)
        assert reward_modules(wrapped) == reward_modules(reward)
        assert reward_modules({"a": wrapped}) == reward_modules({"a": reward})
        assert len(weights_of(wrapped)) == len(weights_of(reward))
        assert len(weights_of({"a": wrapped})) == len(weights_of({"a": reward}))
        if depth == 2:  # (within both searches' reach)
            assert reward_modules(wrapped) and len(weights_of({"a": wrapped})) == 2


def test_a_resume_and_a_psi_table_follow_the_frames(wan_dir, tmp_path):
    """A resumed run refuses other frames (the videos', the training reward's, a held-out reward's), and a
    calibration records both frame counts."""
    from densegrpo_fast.calibration import calibrated_for
    from densegrpo_fast.config import TrainConfig, dump_config, load_config
    from densegrpo_fast.trainer import _check_same_run

    base = [*_overrides(wan_dir, tmp_path), "eval.rewards={mid: {name: image_only_redness, frames: 1}}"]
    dump_config(load_config(TrainConfig, None, base), tmp_path / "config.yaml")
    _check_same_run(load_config(TrainConfig, None, base), tmp_path / "config.yaml")
    for change in ("model.frames=9", "reward.frames=3", "eval.rewards.mid.frames=2"):
        with pytest.raises(ValueError, match=r"frames"):
            _check_same_run(load_config(TrainConfig, None, [*base, change]), tmp_path / "config.yaml")
    record = calibrated_for(load_config(TrainConfig, None, base))
    assert record["frames"] == FRAMES and record["reward_frames"] == 2


def test_gif_preview_save_gif_and_video_strips(tmp_path):
    """The sample GIF's preview keeps four videos scaled to 256 px; the GIF tiles them row by row, plays the
    frames in order at the policy's rate; the grid's strips put each video's chosen frames side by side."""
    import numpy as np
    from PIL import Image

    from densegrpo_fast.logging import gif_preview, save_gif, video_strips

    assert gif_preview(torch.rand(6, 3, 2, 480, 832)).shape == (4, 3, 2, 148, 256)
    small = torch.rand(2, 3, 2, 16, 24)
    assert torch.equal(gif_preview(small), small)  # (already small: as it is)
    # five videos of one colour each, two frames (the second darker): tiled 4 to a row, the fifth below
    colours = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]], dtype=torch.float32)
    videos = colours[:, :, None, None, None].expand(5, 3, 2, 8, 10).clone()
    videos[:, :, 1] *= 0.5
    save_gif(videos, tmp_path / "v.gif", fps=16.0)
    gif = Image.open(tmp_path / "v.gif")
    assert gif.n_frames == 2 and gif.size == (40, 16) and gif.info["duration"] in (60, 62, 63)
    for frame, scale in ((0, 1.0), (1, 0.5)):
        gif.seek(frame)
        pixels = np.asarray(gif.convert("RGB"), dtype=np.float32) / 255
        for i, colour in enumerate(colours.tolist()):
            r, c = divmod(i, 4)
            np.testing.assert_allclose(pixels[r * 8 + 4, c * 10 + 5], np.array(colour) * scale, atol=0.02)
        np.testing.assert_allclose(pixels[12, 15], 0, atol=0.02)  # (the empty tile beside the fifth)
    source = torch.rand(2, 3, 9, 4, 6)
    strips = video_strips(source)
    assert strips.shape == (2, 3, 4, 24)
    for k, f in enumerate((0, 3, 5, 8)):  # (frame_indices(9, 4), left to right)
        assert torch.equal(strips[..., 6 * k : 6 * (k + 1)], source[:, :, f])


def test_refusals_of_schedulers_and_checkpoints(pipe, wan_dir, tmp_path):
    """Grids the engine does not reproduce, image-to-video transformers, other Wan pipelines and an index with
    one of Wan 2.2 A14B's two marks alone are refused; the checkpoint ones before any weights load (every
    weight file here is garbage)."""
    import copy
    import shutil

    for kwargs in (dict(use_dynamic_shifting=True), dict(use_karras_sigmas=True),
                   dict(final_sigmas_type="sigma_min")):  # fmt: skip
        other = copy.copy(pipe)
        other.scheduler = UniPCMultistepScheduler(**{**WAN_UNIPC, **kwargs})
        with pytest.raises(ValueError, match=r"the checkpoint's scheduler sets .*does not reproduce"):
            WanPolicy(other, **OPTS).sigma_grid(4)
    i2v = tiny.wan_pipeline(seed=0)
    i2v.transformer.register_to_config(image_dim=8)
    with pytest.raises(ValueError, match=r"sets image_dim: an image-to-video checkpoint"):
        WanPolicy(i2v, **OPTS)
    for name, change in (("a14b", {"boundary_ratio": 0.875}), ("two", {"transformer_2": ["diffusers", "WanTransformer3DModel"]}),
                         ("i2v", {"_class_name": "WanImageToVideoPipeline"})):  # fmt: skip
        root = tmp_path / name
        shutil.copytree(wan_dir, root)
        index = json.loads((root / "model_index.json").read_text())
        (root / "model_index.json").write_text(json.dumps({**index, **change}))
        for weights in root.glob("*/*.safetensors"):  # (nothing may read them)
            weights.write_bytes(b"not weights")
        match = {
            "i2v": r"WanImageToVideoPipeline checkpoint",
            "a14b": r"a14b sets boundary_ratio but not transformer_2",
            "two": r"two sets transformer_2 but not boundary_ratio",
        }[name]
        with pytest.raises(ValueError, match=match):
            WanPolicy.load(root)


def test_a_weighted_sums_parts_and_a_bound_method_reward_on_videos(policy):
    """``stack`` (dense.multi_reward=per_reward) averages each part over the frames; a reward that is a bound
    method still goes through the one-video-at-a-time decode."""
    from densegrpo_fast.rewards import build_reward
    from densegrpo_fast.rewards.video import scoring_decode

    videos = torch.rand(2, 3, 9, 8, 8)
    parts = {"a": {"name": "redness"}, "b": {"name": "redness", "weight": 2.0}}
    total = build_reward("multi", rewards=parts)
    wrapped = frame_mean(total, 4)
    stacked = wrapped.stack(videos, PROMPTS)
    want = torch.stack([total.stack(videos[:, :, f], PROMPTS) for f in (0, 3, 5, 8)]).mean(0)
    assert stacked.shape == (2, 2) and torch.equal(stacked, want)
    assert torch.equal(
        wrapped(videos, PROMPTS), torch.stack([total(videos[:, :, f], PROMPTS) for f in (0, 3, 5, 8)]).mean(0)
    )

    class Scorer:
        def score(self, images, prompts):
            return images.mean((1, 2, 3))

    bound = frame_mean(Scorer().score, 2)
    decode, chunk = scoring_decode(policy.decode, bound, 256)
    assert decode is not policy.decode and chunk == 128
    decode, chunk = scoring_decode(policy.decode, wrapped.stack, 256)  # (a bound method of the wrapper)
    assert decode is not policy.decode and chunk == 64


# --- Wan 2.2 A14B's two experts -------------------------------------------------------------------------------

#: The two experts' boundary_ratio: at T = 4 and shift 3, timesteps 1000 and 858 go to the high-noise expert, 602
#: and 9 to the low-noise one.
RATIO = 0.7


@pytest.fixture(scope="module")
def pair_pipe():
    return tiny.wan_pipeline(seed=0, boundary_ratio=RATIO)


@pytest.fixture(scope="module")
def pair_dir(pair_pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_wan_a14b")
    pair_pipe.save_pretrained(root)
    return root


def _expert_times(pipe):
    """Forward hooks on both experts recording (expert, timestep rows) per call; returns (log, handles)."""
    log, handles = [], []
    for name in ("transformer", "transformer_2"):
        handles.append(getattr(pipe, name).register_forward_hook(
            lambda m, args, kwargs, out, name=name: log.append((name, kwargs["timestep"].clone())), with_kwargs=True
        ))  # fmt: skip
    return log, handles


@pytest.mark.parametrize("g, g2", [(5.0, None), (1.0, None), (5.0, 2.0), (1.0, 3.0)])
def test_two_experts_reproduce_the_diffusers_pipeline(pair_pipe, g, g2):
    """Wan 2.2 A14B's experts: the engine's sampler is WanPipeline (FlowMatchEuler swapped in) to 1e-5 in the
    latents and the videos, each step through the expert the pipeline picks (two steps each here), with the
    low-noise expert's own CFG scale (``guidance_scale_2``) or without."""
    from densegrpo_fast.policies.wan import ExpertPair

    T = 4
    policy = WanPolicy(pair_pipe, **OPTS)
    if g2 is not None:
        policy.set_guidance_scale_2(g2)
    assert isinstance(policy.transformer, ExpertPair) and policy.transformer.boundary == RATIO * 1000
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    call = dict(prompt=list(PROMPTS), height=32, width=32, num_frames=FRAMES, num_inference_steps=T, guidance_scale=g,
                guidance_scale_2=g2, max_sequence_length=MAX_TOKENS)  # fmt: skip
    log, handles = _expert_times(pair_pipe)
    try:
        theirs = pair_pipe(**call, latents=noise.clone(), output_type="latent").frames
        theirs_log = [(n, t[:1]) for n, t in log[:: 2 if g > 1 else 1]]  # (the pipeline: cond, then uncond)
        theirs_video = pair_pipe(**call, latents=noise.clone(), output_type="pt").frames
        log.clear()
        grid = policy.sigma_grid(T)
        cond = policy.encode_prompts(PROMPTS, with_negative=g > 1)
        ro = sample(policy, cond, noise, Schedule(grid, torch.zeros(T)), guidance_scale=g, dense=False)
    finally:
        for h in handles:
            h.remove()
    assert [n for n, _ in theirs_log] == ["transformer"] * 2 + ["transformer_2"] * 2
    assert [n for n, _ in log] == [n for n, _ in theirs_log]
    assert all(torch.equal(t[:1], u) for (_, t), (_, u) in zip(log, theirs_log, strict=True))
    ours = ro.latents[:, T]
    video = policy.decode(ours)
    diff = (ours - theirs).abs().max().item()
    diff_video = (video - theirs_video.permute(0, 2, 1, 3, 4)).abs().max().item()
    print(f"Wan two experts g={g} g2={g2}: max |latent diff| {diff:.2e}, video {diff_video:.2e}")
    assert diff <= 1e-5 and diff_video <= 1e-5 and ours.abs().max() > 0.1


def test_a_call_spanning_the_boundary_sends_each_row_to_its_expert(pair_pipe):
    """Rows on both sides of the boundary in one call (a dense reward's completions beside the rollout's rows):
    each row's velocity and gradient are those of its expert's call on it alone; a call on one side makes one
    expert call."""
    policy = WanPolicy(pair_pipe, **OPTS)
    x = torch.randn(4, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9, 0.3, 0.7, 0.69])  # (0.7: 1000 sigma = 700 is the high-noise expert's)
    cond = policy.encode_prompts(PROMPTS * 2)
    log, handles = _expert_times(pair_pipe)
    try:
        whole = policy.velocity(x, sigma, cond, 5.0)
        # (CFG: 2B rows, each expert two rows of each half)
        assert sorted((n, len(t)) for n, t in log) == [("transformer", 4), ("transformer_2", 4)]
        for i in range(4):
            log.clear()
            one = policy.velocity(x[i : i + 1], sigma[i : i + 1], cond.index(slice(i, i + 1)), 5.0)
            assert [n for n, _ in log] == ["transformer" if i in (0, 2) else "transformer_2"]
            # (a row alone and in a batch of four: another GEMM blocking, 1.1e-6 apart on an AMD EPYC)
            torch.testing.assert_close(whole[i : i + 1], one, rtol=1e-5, atol=5e-6)
    finally:
        for h in handles:
            h.remove()
    v = x.clone().requires_grad_(True)
    policy.forward_raw(v, sigma, cond.embeds, cond.pooled).square().sum().backward()
    for i in range(4):
        u, row = x[i : i + 1].clone().requires_grad_(True), slice(i, i + 1)
        policy.forward_raw(u, sigma[row], cond.embeds[row], cond.pooled[row]).square().sum().backward()
        torch.testing.assert_close(v.grad[i : i + 1], u.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lora", [True, False])
def test_two_experts_train_and_export(pair_dir, tmp_path, lora):
    """One DenseGRPO iteration on two experts: both train (LoRA: an adapter each; full fine-tuning with the KL
    to a frozen copy of both); the export's two LoRA files (the low-noise expert's in ``transformer_2/``) load
    into WanPipeline's two experts and give the velocity of the exported policy, whose saved weights load back."""
    from diffusers import WanPipeline
    from safetensors.torch import load_file

    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.trainer import setup, train

    extra = ("sampling.num_steps=4", "run.eval_every=0", f"lora.enabled={str(lora).lower()}", "grpo.beta=0.04",
             "optim.lr=1e-3", "ema.enabled=false", *(["model.guidance_scale_2=2.0"] if lora else []))  # fmt: skip
    cfg = load_config(TrainConfig, None, _overrides(pair_dir, tmp_path, *extra))
    before = {
        e: load_file(next((pair_dir / e).glob("*.safetensors"))) for e in ("transformer", "transformer_2")
    }
    run_dir = train(cfg, progress=False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (step,) = [r for r in records if "reward_mean" in r]
    assert step["rows_trained"] > 0 and math.isfinite(step["grad_norm"])
    assert_on_policy(
        step, exact=False
    )  # (the update's calls, rows of both experts, give the rollout's log-probs)
    exported = load_policy("wan", str(pair_dir), "cpu", dtype="fp32", **OPTS)
    exported.load_weights(run_dir / "policy_ema.safetensors")
    for name, base in before.items():  # both experts moved
        trained = getattr(exported.transformer, name).state_dict()
        assert any((trained[k] - base[k]).abs().max() > 0 for k in base), name
    x = torch.randn(2, *exported.latent_shape, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.9, 0.3])  # (one row per expert)
    cond = exported.encode_prompts(PROMPTS)
    ours = exported.velocity(x, sigma, cond, 5.0)
    if lora:
        assert {p.relative_to(run_dir / "lora_ema").as_posix() for p in (run_dir / "lora_ema").rglob("*.safetensors")} == {
            "pytorch_lora_weights.safetensors", "transformer_2/pytorch_lora_weights.safetensors"}  # fmt: skip
        pipe = WanPipeline.from_pretrained(pair_dir)
        pipe.load_lora_weights(run_dir / "lora_ema")
        pipe.load_lora_weights(run_dir / "lora_ema" / "transformer_2", load_into_transformer_2=True)
        theirs = WanPolicy(pipe, **OPTS).velocity(x, sigma, cond, 5.0)
        torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
        _the_exported_pair_starts_and_merges(pair_dir, run_dir, extra, tmp_path, (x, sigma, cond), ours)
    else:
        assert not (run_dir / "lora_ema").exists()
    resumed = setup(cfg, resume=True, progress=False)  # (the checkpoint holds both experts' weights)
    assert resumed.iteration == 1


def _the_exported_pair_starts_and_merges(pair_dir, run_dir, extra, tmp_path, inputs, ours):
    """The export's two LoRA files, as its folder or as two paths (``lora.init_2`` / ``--lora-2``): ``eval
    --lora`` merges them and ``lora.init`` starts a run's adapters (another alpha) from them, each expert from its
    own, with the exported policy's velocity; the eval command records the second; an expert's LoRA alone, or the
    pair swapped, is not the exported policy."""
    from peft import LoraConfig

    from densegrpo_fast.config import WAN_LORA_TARGETS, TrainConfig, load_config
    from densegrpo_fast.evaluate import run_eval
    from densegrpo_fast.lora_init import lora_identity, merge_lora, start_adapters_from
    from densegrpo_fast.trainer import setup

    folder = run_dir / "lora_ema"
    high, low = folder / "pytorch_lora_weights.safetensors", folder / "transformer_2"
    fresh = lambda: load_policy("wan", str(pair_dir), "cpu", dtype="fp32", **OPTS)  # noqa: E731
    layers = 2 * 2 * len(WAN_LORA_TARGETS)  # (two experts of two blocks, the targets in each)
    for args in ((folder,), (high, low)):
        merged = fresh()
        assert merge_lora(merged, *args) == layers
        torch.testing.assert_close(merged.velocity(*inputs, 5.0), ours, rtol=0, atol=1e-5)
        started = fresh()
        started.transformer.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=WAN_LORA_TARGETS))
        assert start_adapters_from(started, *args) == layers
        torch.testing.assert_close(started.velocity(*inputs, 5.0), ours, rtol=0, atol=1e-5)
    swapped = fresh()
    merge_lora(swapped, low, high)
    assert (swapped.velocity(*inputs, 5.0) - ours).abs().max() > 1e-3
    # the trainer's warm start from the two files (a run of its own beside the first)
    warm = load_config(TrainConfig, None, _overrides(pair_dir, tmp_path, *extra, f"lora.init={high}",
                                                     f"lora.init_2={low}", f"run.output_dir={tmp_path / 'warm'}"))  # fmt: skip
    run = setup(warm, progress=False)
    started.set_guidance_scale_2(warm.model.guidance_scale_2)  # (the run's: the low-noise rows' own scale)
    torch.testing.assert_close(
        run.policy.velocity(*inputs, 5.0), started.velocity(*inputs, 5.0), rtol=0, atol=1e-5
    )
    out = tmp_path / "eval"
    overrides = [o for o in _overrides(pair_dir, tmp_path) if not o.startswith(("run.", "reward."))]
    overrides += ["eval.rewards={red: {name: image_only_redness, frames: 1}}", f"eval.output_dir={out}"]
    summary = run_eval(None, overrides, lora=str(folder), progress=False)
    assert summary["lora_2"] == str(low)
    assert summary["lora_2_weights"] == lora_identity(low) != lora_identity(high)
    with pytest.raises(ValueError, match=r"lora_2"):  # (another second expert's LoRA: not the same protocol)
        run_eval(None, overrides, lora=str(high), lora_2=str(high), progress=False)
    # the low-noise expert's LoRA as a peft folder (another alpha), beside the high-noise expert's file
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    peft_dir = tmp_path / "peft_low"
    low_expert = started.transformer.transformer_2
    low_expert.peft_config["default"].save_pretrained(str(peft_dir))
    state = get_peft_model_state_dict(low_expert)
    save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in state.items()},
        peft_dir / "adapter_model.safetensors",
    )
    mixed = fresh()
    assert merge_lora(mixed, high, peft_dir) == layers
    torch.testing.assert_close(mixed.velocity(*inputs, 5.0), ours, rtol=0, atol=1e-5)
    # what psi is calibrated on names the low-noise expert's LoRA, from the folder or given apart
    from densegrpo_fast.calibration import calibrated_for

    for extra, second in (
        ((f"lora.init={folder}",), low),
        ((f"lora.init={high}", f"lora.init_2={peft_dir}"), peft_dir),
    ):
        record = calibrated_for(load_config(TrainConfig, None, _overrides(pair_dir, tmp_path, *extra)))
        assert record["lora_init_2"] == str(second.resolve())


def test_two_experts_compile_and_refuse_what_they_do_not_support(pair_pipe, tmp_path):
    """Both experts' blocks compile (regional compilation: each expert's block list) and give the eager
    velocities; FSDP2 sharding is refused with two experts, and so are ``lora.init`` and ``eval --lora`` given
    one LoRA file (which adapts one transformer) without the low-noise expert's."""
    import copy

    from densegrpo_fast import distributed
    from densegrpo_fast.lora_init import merge_lora, start_adapters_from
    from densegrpo_fast.policies.base import block_lists, compile_blocks

    policy = WanPolicy(copy.deepcopy(pair_pipe), **OPTS)
    assert list(block_lists(policy.transformer)) == ["transformer.blocks", "transformer_2.blocks"]
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma, cond = torch.tensor([0.9, 0.3]), policy.encode_prompts(PROMPTS)
    with torch.no_grad():
        eager = policy.velocity(x, sigma, cond, 5.0)
        assert compile_blocks(policy.transformer, "eager") == 4
        torch.testing.assert_close(policy.velocity(x, sigma, cond, 5.0), eager, rtol=1e-5, atol=1e-6)
    with pytest.raises(
        ValueError, match=r"model.sharding: this checkpoint has two experts.*model.sharding=replicate"
    ):
        distributed.shard(policy.transformer, torch.float32)
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"")
    for call, option in ((start_adapters_from, "lora.init"), (merge_lora, "--lora")):
        with pytest.raises(
            ValueError, match=rf"{option}.*has two experts \(Wan 2.2 A14B\), and a LoRA file adapts one"
        ):
            call(policy, lora)


def test_both_experts_take_adapters_checkpointing_and_a_text_only_load(pair_pipe, pair_dir, tmp_path):
    """Adapters on the pair act on both experts: disabled, each row gets the base model's velocity again;
    gradient checkpointing reaches both; a text-only load (encode-prompts) reads neither expert's weights; a
    checkpoint without the second expert's weights is named for it."""
    import copy
    import shutil

    from peft import LoraConfig

    from densegrpo_fast.config import WAN_LORA_TARGETS

    policy = WanPolicy(copy.deepcopy(pair_pipe), **OPTS)
    x = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma, cond = torch.tensor([0.9, 0.3]), policy.encode_prompts(PROMPTS)  # (one row per expert)
    base = policy.velocity(x, sigma, cond, 5.0)
    policy.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=WAN_LORA_TARGETS))
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapted = policy.velocity(x, sigma, cond, 5.0)
    assert ((adapted - base).flatten(1).abs().amax(1) > 1e-2).all()  # (each row: its expert's adapter)
    policy.transformer.disable_adapters()
    torch.testing.assert_close(policy.velocity(x, sigma, cond, 5.0), base, rtol=0, atol=0)
    policy.transformer.enable_adapters()
    torch.testing.assert_close(policy.velocity(x, sigma, cond, 5.0), adapted, rtol=0, atol=0)
    policy.transformer.enable_gradient_checkpointing()
    assert all(
        e.gradient_checkpointing for e in (policy.transformer.transformer, policy.transformer.transformer_2)
    )
    garbage = tmp_path / "garbage"
    shutil.copytree(pair_dir, garbage)
    for weights in [*garbage.glob("transformer*/*.safetensors"), *garbage.glob("vae/*.safetensors")]:
        weights.write_bytes(b"not weights")
    text = WanPolicy.load(garbage, dtype="fp32", text_only=True, **OPTS)
    assert text.transformer.transformer_2.device.type == "meta"
    torch.testing.assert_close(text.encode_prompts(PROMPTS).embeds, cond.embeds)
    for weights in garbage.glob("transformer_2/*.safetensors"):
        weights.unlink()
    with pytest.raises(ValueError, match=r"not a complete WanPipeline checkpoint: missing transformer_2/"):
        WanPolicy.load(garbage)


def test_a_lora_pair_is_checked_before_any_model_loads(tmp_path):
    """``check_experts``' rules for a LoRA per expert, on folders alone: the export's folder pairs; one file for two
    experts, a second for one transformer, a second without a first, a second that is a whole export, and a
    folder holding a second beside another second are refused with the options and fix named."""
    from densegrpo_fast.lora_init import check_experts, second_lora

    export = tmp_path / "lora_ema"
    (export / "transformer_2").mkdir(parents=True)
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    (peft / "transformer_2").mkdir()
    file = tmp_path / "high.safetensors"
    file.write_bytes(b"")
    check_experts(True, "lora.init", export)  # (the export's folder: both experts)
    check_experts(True, "--lora", file, export / "transformer_2")
    check_experts(False, "lora.init", file)
    check_experts(None, "lora.init", file)  # (not known: the load checks again)
    assert second_lora(export, None) == export / "transformer_2" and second_lora(file, None) is None
    for two, option, path, path_2, match in (
        (True, "lora.init", file, None, r"lora.init=.*has two experts .*give the low-noise expert's LoRA "
                                        r"\(transformer_2\) too, as lora.init_2"),
        (False, "--lora", file, file, r"--lora-2 .* one transformer: remove --lora-2"),
        (None, "--lora", None, file, r"--lora-2 .* without --lora"),
        (True, "--lora", file, export, r"--lora-2 .*lora_ema' is a two-expert export .*give its transformer_2/ as "
                                       r"--lora-2, or the folder alone as --lora"),
        (True, "lora.init", export, file, r"lora.init=.*lora_ema' holds the low-noise expert's LoRA in "
                                          r"transformer_2/, and lora.init_2 names another"),
        (False, "lora.init", export, None, r"holds a low-noise .*one transformer: give a LoRA of one transformer "
                                           r"\(the folder's own file alone"),
        (False, "lora.init", peft, None, r"one transformer: give a LoRA of one transformer$"),
        (True, "lora.init", file, tmp_path / "nowhere", r"lora.init_2=.*nowhere' does not exist: give the low-noise"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            check_experts(two, option, path, path_2)


def test_two_experts_are_refused_early_where_unsupported(pair_dir, wan_dir, tmp_path, monkeypatch):
    """FSDP2 sharding (asked for, or auto's for full fine-tuning under torchrun) and a LoRA that does not pair
    with the experts (lora.init, eval --lora: one file for two experts; a second expert's LoRA, given apart or in
    the folder's transformer_2/, for one transformer) are refused from the checkpoint's index, before any model
    loads; a one-expert checkpoint is not refused sharding."""
    from densegrpo_fast import distributed, trainer
    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.evaluate import run_eval
    from densegrpo_fast.policies import has_two_experts

    assert has_two_experts("wan", str(pair_dir)) is True and has_two_experts("wan", str(wan_dir)) is False
    assert has_two_experts("wan", str(tmp_path / "nowhere")) is None and has_two_experts("toy", None) is False
    monkeypatch.setattr(trainer, "load_policy", lambda *a, **k: pytest.fail("a model loaded"))
    job = distributed.Dist(rank=0, world=2)
    for extra in (["model.sharding=fsdp"], ["lora.enabled=false"]):
        cfg = load_config(TrainConfig, None, _overrides(pair_dir, tmp_path, *extra))
        with pytest.raises(ValueError, match=r"model.sharding=(fsdp|auto): this checkpoint has two experts"):
            trainer._shards(cfg, job)
        one = load_config(TrainConfig, None, _overrides(wan_dir, tmp_path, *extra))
        assert trainer._shards(one, job) == distributed.fsdp_available()
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(b"")
    cfg = load_config(TrainConfig, None, _overrides(pair_dir, tmp_path, f"lora.init={lora}"))
    with pytest.raises(ValueError, match=r"lora.init=.*has two experts \(Wan 2.2 A14B\), and a LoRA file"):
        trainer.setup(cfg, progress=False)
    overrides = [o for o in _overrides(pair_dir, tmp_path) if not o.startswith(("run.", "reward."))]
    with pytest.raises(ValueError, match=r"--lora .*has two experts \(Wan 2.2 A14B\), and a LoRA file"):
        run_eval(None, [*overrides, "eval.rewards={red: {name: redness}}"], lora=str(lora), progress=False)
    # a second expert's LoRA for one transformer: given apart, or in the folder's transformer_2/
    folder = tmp_path / "lora_ema"
    (folder / "transformer_2").mkdir(parents=True)
    one = [o for o in _overrides(wan_dir, tmp_path) if not o.startswith(("run.", "reward."))]
    for init, second, match in (
        (lora, lora, r"lora.init_2=.* adapts the low-noise expert .* one transformer: remove lora.init_2"),
        (folder, None, r"lora.init=.*lora_ema' holds a low-noise expert's LoRA in transformer_2/"),
    ):
        extra = [f"lora.init={init}", *([f"lora.init_2={second}"] if second else [])]
        with pytest.raises(ValueError, match=match):
            trainer.setup(
                load_config(TrainConfig, None, _overrides(wan_dir, tmp_path, *extra)), progress=False
            )
        with pytest.raises(ValueError, match=match.replace("lora.init_2=", "--lora-2 ").replace("lora.init=", "--lora ")
                           .replace("remove lora.init_2", "remove --lora-2")):  # fmt: skip
            run_eval(None, [*one, "eval.rewards={red: {name: redness}}"], lora=str(init),
                     lora_2=second and str(second), progress=False)  # fmt: skip
    with pytest.raises(
        ValueError, match=r"--lora-2 .* without --lora: the low-noise expert's LoRA comes with"
    ):
        run_eval(None, [*overrides, "eval.rewards={red: {name: redness}}"], lora_2=str(lora), progress=False)
    for extra, match in (
        ([f"lora.init_2={lora}"], r"lora.init_2 .* without lora.init"),
        (
            ["model.family=sd3", f"lora.init={lora}", f"lora.init_2={lora}"],
            r"lora.init_2 .*model.family sd3 has one",
        ),
    ):
        with pytest.raises(ValueError, match=match):
            load_config(TrainConfig, None, _overrides(pair_dir, tmp_path, *extra))


def test_the_low_noise_experts_own_guidance_scale(pair_pipe, pair_dir, wan_dir, tmp_path):
    """``model.guidance_scale_2``: each row of a call takes its expert's scale; the setting reaches the policy
    through the config, is refused for a one-transformer checkpoint and an image family, and is recorded with the
    psi table's calibration (where set)."""
    from densegrpo_fast.calibration import calibrated_for
    from densegrpo_fast.config import TrainConfig, load_config

    policy, plain = WanPolicy(pair_pipe, **OPTS), WanPolicy(pair_pipe, **OPTS)
    policy.set_guidance_scale_2(2.0)
    x = torch.randn(3, *policy.latent_shape, generator=torch.Generator().manual_seed(0))
    # (a row per expert, and one at the boundary: 1000 x 0.7 in float32 is 700.00003, the high-noise expert's)
    sigma, cond = torch.tensor([0.9, 0.3, 0.7]), policy.encode_prompts([*PROMPTS, PROMPTS[0]])
    both = policy.velocity(x, sigma, cond, 5.0)
    for i, g in ((0, 5.0), (1, 2.0), (2, 5.0)):
        row = slice(i, i + 1)
        torch.testing.assert_close(
            both[row], plain.velocity(x[row], sigma[row], cond.index(row), g), rtol=1e-5, atol=1e-6
        )
    torch.testing.assert_close(policy.velocity(x, sigma, cond, 1.0), plain.velocity(x, sigma, cond, 1.0))
    cfg = load_config(TrainConfig, None, _overrides(pair_dir, tmp_path, "model.guidance_scale_2=3.0"))
    loaded = load_policy("wan", str(pair_dir), "cpu", **cfg.model.adapter_options())
    assert loaded.guidance_scale_2 == 3.0 and calibrated_for(cfg)["guidance_scale_2"] == 3.0
    assert "guidance_scale_2" not in calibrated_for(
        load_config(TrainConfig, None, _overrides(pair_dir, tmp_path))
    )
    off = load_config(TrainConfig, None, _overrides(pair_dir, tmp_path, "model.guidance_scale_2=3.0",
                                                    "sampling.guidance_scale=1.0", "eval.guidance_scale=1.0"))  # fmt: skip
    assert "guidance_scale_2" not in calibrated_for(off)  # (CFG off: it changes nothing, and is noted so)
    why = "sampling.guidance_scale and eval.guidance_scale are 1: CFG is off for both experts (as in WanPipeline)"
    assert off.ignored_settings() == [(["model.guidance_scale_2"], why)]
    with pytest.raises(
        ValueError,
        match=r"model.guidance_scale_2 \(3.0\) is the low-noise expert's CFG scale.*has one transformer",
    ):
        load_policy("wan", str(wan_dir), "cpu", **{**cfg.model.adapter_options(), "guidance_scale_2": 3.0})
    with pytest.raises(
        ValueError, match=r"model.guidance_scale_2 \(3.0\) is the low-noise expert's CFG scale of Wan"
    ):
        load_config(TrainConfig, None, ["model.family=sd3", "model.guidance_scale_2=3.0"])


def test_the_eval_command_on_two_experts_records_the_second_scale(pair_dir, tmp_path):
    """The eval command samples the two experts with ``model.guidance_scale_2``, records it in its protocol, and
    refuses to resume its scores under another."""
    from densegrpo_fast.evaluate import run_eval

    out = tmp_path / "eval"
    overrides = [o for o in _overrides(pair_dir, tmp_path) if not o.startswith(("run.", "reward."))]
    overrides += ["eval.rewards={red: {name: image_only_redness, frames: 1}}", f"eval.output_dir={out}"]
    summary = run_eval(None, [*overrides, "model.guidance_scale_2=2.0"], progress=False)
    assert (
        summary["guidance_scale_2"] == 2.0
        and summary["num_prompts"] == 2
        and 0 < summary["scores"]["red"] < 1
    )
    with pytest.raises(ValueError, match=r"guidance_scale_2"):
        run_eval(None, [*overrides, "model.guidance_scale_2=3.0"], progress=False)


def test_the_memory_estimate_builds_wan22_a14b_when_it_is_not_on_disk(tmp_path, monkeypatch):
    """``Wan-AI/Wan2.2-T2V-A14B-Diffusers``, not on disk, is built from the built-in architecture with fake weights
    (two experts of 14.29 B, the boundary at 875); another repo not on disk is still refused."""
    from huggingface_hub import constants

    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.memory import fake_policy, new_fake_mode
    from densegrpo_fast.policies.wan import ExpertPair

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    cfg = load_config(
        TrainConfig,
        None,
        ["model.family=wan", "model.checkpoint=Wan-AI/Wan2.2-T2V-A14B-Diffusers", "model.frames=5"],
    )
    policy, source = fake_policy(cfg, new_fake_mode())
    assert source == "the built-in architecture of Wan-AI/Wan2.2-T2V-A14B-Diffusers (not on disk)"
    assert isinstance(policy.transformer, ExpertPair) and policy.transformer.boundary == 875.0
    for name in ("transformer", "transformer_2"):
        expert = getattr(policy.transformer, name)
        assert sum(p.numel() for p in expert.parameters()) == pytest.approx(14.288e9, rel=1e-3)
    for family, repo in (("wan", "me/not-a-wan-repo"), ("sd3", "Wan-AI/Wan2.2-T2V-A14B-Diffusers")):
        other = load_config(TrainConfig, None, [f"model.family={family}", f"model.checkpoint={repo}"])
        with pytest.raises(ValueError, match=r"not in the Hugging Face cache"):
            fake_policy(other, new_fake_mode())  # (no architecture built in for it)


def test_encode_prompts_serves_two_experts_with_a_second_scale(pair_dir, tmp_path):
    """``encode-prompts`` on an A14B config with ``model.guidance_scale_2`` (a sampling setting no encoder reads)
    writes the cache, and the two experts' policy loads from it without its text encoder."""
    from densegrpo_fast.config import TrainConfig, load_config
    from densegrpo_fast.prompt_cache import encode_config

    extra = ("model.guidance_scale_2=3.0", f"model.prompt_cache={tmp_path / 'cache'}")
    cfg = load_config(TrainConfig, None, _overrides(pair_dir, tmp_path, *extra))
    _, encoded = encode_config(cfg, progress=False)
    assert encoded == 5  # (the file's four prompts and the empty negative one)
    cached = load_policy("wan", str(pair_dir), "cpu", **cfg.model.adapter_options())
    assert cached.text_encoders() == [] and cached.guidance_scale_2 == 3.0
    direct = WanPolicy.load(pair_dir, dtype="fp32", **OPTS)
    torch.testing.assert_close(
        cached.encode_prompts(PROMPTS[:1]).embeds, direct.encode_prompts(PROMPTS[:1]).embeds
    )


def test_a_held_out_entry_equal_to_a_pairwise_rewards_view_shares_its_model_only_at_its_frames():
    """An ``eval.rewards`` entry that scores as a pairwise training reward's pointwise view is scored by that
    reward's model only where it scores the same frames; at other frames it gets a model of its own."""
    from densegrpo_fast.config import TrainConfig, load_config

    wins = "reward={name: win_rate, kwargs: {reward: {name: redness}}, frames: 2}"
    for frames, built in ((2, []), (1, ["red"]), (None, ["red"])):
        entry = f"eval.rewards={{red: {{name: redness, frames: {'null' if frames is None else frames}}}}}"
        cfg = load_config(TrainConfig, None, ["model.family=wan", wins, entry])
        assert sorted(cfg.eval_rewards_built()) == built, frames
