"""SD3 policy on tiny random components: the contract, diffusers' pipeline reproduced by the engine's
sampler, loading from a diffusers-format directory, the missing-weights message, and one DenseGRPO
iteration through the trainer."""

import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models as tiny
import torch
from tolerances import assert_on_policy

from densegrpo_fast.config import ConfigError, TrainConfig, load_config
from densegrpo_fast.policies import load_policy
from densegrpo_fast.policies.base import Policy, PromptEmbeds
from densegrpo_fast.policies.sd3 import SD3Policy
from densegrpo_fast.rollout import sample
from densegrpo_fast.schedule import Schedule, sigma_grid

PROMPTS = ["a red circle", "two blue squares"]
OPTS = dict(resolution=tiny.RESOLUTION, max_sequence_length=tiny.MAX_T5_TOKENS)


@pytest.fixture(scope="module")
def pipe():
    return tiny.sd3_pipeline(seed=0)


@pytest.fixture(scope="module")
def policy(pipe):
    return SD3Policy(pipe, **OPTS)


@pytest.fixture(scope="module")
def sd3_dir(pipe, tmp_path_factory):
    """The tiny pipeline saved in diffusers format (weights, configs, tokenizers, model_index.json)."""
    root = tmp_path_factory.mktemp("tiny_sd3")
    pipe.save_pretrained(root)
    return root


def test_implements_the_policy_contract(policy, pipe):
    assert isinstance(policy, Policy)
    assert policy.latent_shape == (4, 16, 16) and policy.dtype == torch.float32
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, policy.transformer):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
    cond = policy.encode_prompts(["a red circle", "two blue squares", "a red circle"])
    # the joint sequence: 16 CLIP tokens + 24 T5 tokens, width joint_attention_dim; pooled: two CLIP projections
    assert cond.embeds.shape == (3, 40, 64) and cond.pooled.shape == (3, 64)
    assert cond.neg_embeds.shape == cond.embeds.shape and cond.neg_pooled.shape == cond.pooled.shape
    alone = policy.encode_prompts(["two blue squares"], with_negative=False)
    assert alone.neg_embeds is None
    torch.testing.assert_close(cond.embeds[1], alone.embeds[0], atol=1e-6, rtol=0)
    assert torch.equal(cond.embeds[0], cond.embeds[2])  # one encoder row per distinct prompt, gathered
    empty = policy.encode_prompts([""], with_negative=False)
    torch.testing.assert_close(cond.neg_embeds[2], empty.embeds[0], atol=1e-6, rtol=0)
    images = policy.decode(torch.randn(2, *policy.latent_shape))
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1


def test_cfg_velocity_is_one_batched_call_in_fp32(policy):
    torch.manual_seed(1)
    x = torch.randn(2, *policy.latent_shape)
    sigma = torch.tensor([0.9, 0.3])
    cond = policy.encode_prompts(PROMPTS)
    v_pos = policy.velocity(x, sigma, PromptEmbeds(cond.embeds, cond.pooled))
    v_neg = policy.velocity(x, sigma, PromptEmbeds(cond.neg_embeds, cond.neg_pooled))
    calls = []
    hook = policy.transformer.register_forward_hook(lambda *a: calls.append(1))
    v = policy.velocity(x, sigma, cond, guidance_scale=4.5)
    hook.remove()
    assert len(calls) == 1 and v.dtype == torch.float32 and v.shape == x.shape
    torch.testing.assert_close(v, v_neg + 4.5 * (v_pos - v_neg), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v_pos, v_neg)


def test_bf16_transformer_returns_an_fp32_velocity(pipe, policy):
    import copy

    low = copy.deepcopy(policy)
    low.transformer.to(torch.bfloat16)
    assert low.dtype == torch.bfloat16 and policy.dtype == torch.float32  # the copy owns its transformer
    assert low.pipe is policy.pipe  # ...and shares the frozen encoders and VAE
    x = torch.randn(2, *policy.latent_shape)
    cond = policy.encode_prompts(PROMPTS)
    v16, v32 = (
        low.velocity(x, torch.tensor([0.7, 0.2]), cond, 4.5),
        policy.velocity(x, torch.tensor([0.7, 0.2]), cond, 4.5),
    )
    assert v16.dtype == torch.float32
    assert (v16 - v32).abs().max() < 0.1 * v32.abs().max()


@pytest.mark.parametrize(
    "guidance, hw, negative",
    [(1.0, (32, 32), None), (4.5, (32, 32), None), (4.5, (48, 32), None), (4.5, (32, 32), "blurry, dark")],
)
def test_engine_ode_reproduces_the_diffusers_pipeline(pipe, policy, guidance, hw, negative):
    """Zero noise, the same initial latents: the engine's sampler is StableDiffusion3Pipeline to 1e-5, square
    and portrait ([height, width] = [48, 32]), with the empty negative prompt or another
    (``model.negative_prompt``, the pipeline's ``negative_prompt``)."""
    import copy

    T = 4
    policy = copy.copy(
        policy.at_resolution(hw, "model.resolution")
    )  # (the module's policy keeps its negative)
    if negative is not None:
        policy.set_negative_prompt(negative)
    assert policy.latent_shape == (4, hw[0] // 2, hw[1] // 2)  # (the tiny VAE's factor 2)
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    call = dict(prompt=PROMPTS, height=hw[0], width=hw[1], num_inference_steps=T, guidance_scale=guidance,
                max_sequence_length=tiny.MAX_T5_TOKENS, negative_prompt=negative)  # fmt: skip
    theirs = pipe(**call, latents=noise.clone(), output_type="latent").images
    theirs_img = pipe(**call, latents=noise.clone(), output_type="pt").images

    grid = policy.sigma_grid(T)
    torch.testing.assert_close(grid, pipe.scheduler.sigmas, rtol=0, atol=2e-7)
    assert torch.equal(grid, sigma_grid(T, 3.0))
    sched = Schedule(grid, torch.zeros(T))  # every step an ODE step
    ro = sample(policy, policy.encode_prompts(PROMPTS), noise, sched, guidance_scale=guidance, dense=False)
    ours = ro.latents[:, T]
    diff = (ours - theirs).abs().max().item()
    diff_img = (policy.decode(ours) - theirs_img).abs().max().item()
    print(f"SD3 g={guidance} {hw} negative={negative!r}: max |latent diff| {diff:.2e}, image {diff_img:.2e}")
    assert diff <= 1e-5 and diff_img <= 1e-5
    assert ours.abs().max() > 0.1  # a real trajectory, not a collapsed one


@pytest.mark.parametrize(
    "layout",
    [{"qk_norm": "rms_norm"}, {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}],
    ids=["sd35-large", "sd35-medium"],
)
def test_the_sd35_layouts_sample_as_their_pipeline_and_take_the_adapters(layout):
    """SD3.5-Large's transformer (RMS-normed q/k) and SD3.5-Medium's (also a second attention in its first
    blocks) under model.family=sd3: the engine's ODE is the pipeline's, and LoRA on lora.target_modules
    adapts each block's joint attention (Flow-GRPO's targets; the dual blocks' attn2 is left as Flow-GRPO
    leaves it)."""
    from peft import LoraConfig

    from densegrpo_fast.config import LoRASection

    pipe = tiny.sd3_pipeline(seed=1, **layout)
    policy = SD3Policy(pipe, **OPTS)
    noise = torch.randn(2, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    theirs = pipe(prompt=PROMPTS, height=32, width=32, num_inference_steps=3, guidance_scale=4.5,
                  max_sequence_length=tiny.MAX_T5_TOKENS, latents=noise.clone(), output_type="latent").images  # fmt: skip
    ro = sample(policy, policy.encode_prompts(PROMPTS), noise, Schedule(policy.sigma_grid(3), torch.zeros(3)),
                guidance_scale=4.5, dense=False)  # fmt: skip
    assert (ro.latents[:, 3] - theirs).abs().max() <= 1e-5
    policy.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=LoRASection().target_modules))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in policy.transformer.named_parameters() if ".lora_A." in n}
    blocks = len(policy.transformer.transformer_blocks)
    assert len([n for n in adapted if n.endswith("attn.to_q")]) == blocks
    assert not any(".attn2." in n for n in adapted)
    dual = any(".attn2" in n for n, _ in policy.transformer.named_modules())
    assert dual == ("dual_attention_layers" in layout)


def _device_moves(policy, monkeypatch) -> list[tuple[str, str]]:
    """Records (encoder, device) for each ``.to`` of the policy's text encoders."""
    moves = []
    for name, module in policy.pipe.components.items():
        if name.startswith("text_encoder"):

            def to(device, _module=module, _name=name, _to=module.to):
                moves.append((_name, str(device)))
                return _to(device)

            monkeypatch.setattr(module, "to", to, raising=False)
    return moves


def test_offloaded_text_encoders_come_to_the_device_only_to_encode(pipe, policy, monkeypatch):
    """On the CPU every device is the host: what is checked is when the encoders move, and that the
    embeddings do not change."""
    offloaded = SD3Policy(pipe, **OPTS)
    moves = _device_moves(offloaded, monkeypatch)
    offloaded.offload_text_encoders_(True)
    names = ["text_encoder", "text_encoder_2", "text_encoder_3"]
    assert moves == [(n, "cpu") for n in names]
    moves.clear()
    cond = offloaded.encode_prompts(PROMPTS)  # the negative too: one round trip for both
    assert moves == [(n, "cpu") for n in names] * 2  # to policy.device (the CPU here), then back
    moves.clear()
    offloaded.encode_prompts(PROMPTS)
    assert len(moves) == 6
    moves.clear()
    policy.encode_prompts(PROMPTS)
    assert moves == []  # not offloaded: never moved
    ref = policy.encode_prompts(PROMPTS)
    for f in ("embeds", "pooled", "neg_embeds", "neg_pooled"):
        torch.testing.assert_close(getattr(cond, f), getattr(ref, f), rtol=0, atol=0)
    offloaded.offload_text_encoders_(False)


def test_an_evaluation_encodes_in_groups_with_the_encoders_off_the_device_while_it_samples():
    """``encoded_batches``: offloaded encoders come to the device once per ENCODE_GROUP batches and leave before
    those batches are sampled; encoders that stay are not moved, and each batch is encoded as it comes."""
    import contextlib

    from densegrpo_fast.policies.base import ENCODE_GROUP, encoded_batches

    class Recorder:
        def __init__(self, offload):
            self.offload_text_encoders, self.events = offload, []

        @contextlib.contextmanager
        def text_encoders_on_device(self):
            self.events.append("in")
            yield
            self.events.append("out")

        def encode_prompts(self, prompts, with_negative=True):
            self.events.append(("encode", tuple(prompts), with_negative))
            return prompts

    n = ENCODE_GROUP + 4
    batches = [[f"p{i}"] for i in range(n)]
    for offload in (True, False):
        policy = Recorder(offload)
        for batch, cond in zip(batches, encoded_batches(policy, batches, with_negative=False), strict=True):
            assert cond == batch
            policy.events.append("sample")
        encodes = [("encode", tuple(b), False) for b in batches]
        if offload:  # (the encoders are out of the device whenever a batch samples)
            group, rest = ENCODE_GROUP, n - ENCODE_GROUP
            assert policy.events == [
                "in",
                *encodes[:group],
                "out",
                *["sample"] * group,
                "in",
                *encodes[group:],
                "out",
                *["sample"] * rest,
            ]
        else:
            assert policy.events == [e for i in range(n) for e in ("in", encodes[i], "out", "sample")]


def test_the_encoders_move_once_in_and_always_back(pipe, monkeypatch):
    """The context on a stand-in device (moves recorded, not made): nested uses move once, and an error
    inside still sends the encoders back to the host."""
    offloaded = SD3Policy(pipe, **OPTS)
    offloaded.offload_text_encoders = True
    monkeypatch.setattr(SD3Policy, "device", property(lambda self: torch.device("meta")))
    moves = []
    for name, module in pipe.components.items():
        if name.startswith("text_encoder"):
            monkeypatch.setattr(
                module, "to", lambda device, _n=name: moves.append((_n, str(device))), raising=False
            )
    names = ["text_encoder", "text_encoder_2", "text_encoder_3"]
    with offloaded.text_encoders_on_device():
        with offloaded.text_encoders_on_device():
            assert moves == [(n, "meta") for n in names]
        assert len(moves) == 3  # the inner exit leaves them on the device
    assert moves[3:] == [(n, "cpu") for n in names]
    moves.clear()
    with pytest.raises(RuntimeError, match="boom"), offloaded.text_encoders_on_device():
        raise RuntimeError("boom")
    assert moves == [(n, "meta") for n in names] + [(n, "cpu") for n in names]
    assert offloaded._encoders_in == 0


def test_loads_a_diffusers_directory(sd3_dir, policy):
    loaded = load_policy(
        "sd3",
        str(sd3_dir),
        "cpu",
        dtype="fp32",
        gradient_checkpointing=True,
        offload_text_encoders=True,
        **OPTS,
    )
    assert isinstance(loaded, SD3Policy) and loaded.latent_shape == policy.latent_shape
    assert loaded.transformer.gradient_checkpointing and loaded.offload_text_encoders
    assert loaded.pipe.vae.dtype == torch.float32
    x = torch.randn(2, *policy.latent_shape)
    sigma = torch.tensor([0.8, 0.4])
    torch.testing.assert_close(
        loaded.velocity(x, sigma, loaded.encode_prompts(PROMPTS), 4.5),
        policy.velocity(x, sigma, policy.encode_prompts(PROMPTS), 4.5),
    )
    low = SD3Policy.load(sd3_dir, dtype="bf16", **OPTS)
    assert low.dtype == torch.bfloat16 and low.pipe.text_encoder_3.dtype == torch.bfloat16
    assert low.pipe.vae.dtype == torch.float32


def test_a_sharded_run_loads_the_transformer_into_host_memory(sd3_dir):
    """``transformer_on_host`` (a sharded run's load, for FSDP2 to move it a block at a time): the transformer
    stays in host memory and everything else goes to the device ("meta" stands in for one here)."""
    loaded = load_policy("sd3", str(sd3_dir), "meta", dtype="fp32", transformer_on_host=True, **OPTS)
    assert {p.device.type for p in loaded.transformer.parameters()} == {"cpu"}
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        assert {p.device.type for p in getattr(loaded.pipe, name).parameters()} == {"meta"}, name
    whole = load_policy("sd3", str(sd3_dir), "meta", dtype="fp32", **OPTS)
    assert {p.device.type for p in whole.transformer.parameters()} == {"meta"}


def test_a_diffusers_that_ignores_the_dtype_keyword_is_refused(sd3_dir, monkeypatch):
    """Releases before ``from_pretrained(dtype=...)`` log the keyword as unused and load fp32."""
    from diffusers import StableDiffusion3Pipeline

    original = StableDiffusion3Pipeline.from_pretrained.__func__

    def older_diffusers(cls, root, dtype=None, **kw):
        return original(cls, root, **kw)

    monkeypatch.setattr(StableDiffusion3Pipeline, "from_pretrained", classmethod(older_diffusers))
    with pytest.raises(ValueError, match=r"loaded transformer in torch.float32 where transformer in "
                       r"torch.bfloat16 was asked for: diffusers .* upgrade diffusers"):  # fmt: skip
        SD3Policy.load(sd3_dir, dtype="bf16", **OPTS)
    assert SD3Policy.load(sd3_dir, dtype="fp32", **OPTS).dtype == torch.float32  # fp32 asked: no error


def test_missing_weights_are_named_with_the_fix(sd3_dir, tmp_path):
    with pytest.raises(
        ValueError, match=r"'/no/such/dir' is neither an existing directory nor a Hugging Face repo id"
    ):
        SD3Policy.load("/no/such/dir")
    with pytest.raises(
        ValueError,
        match=r"is not in the Hugging Face cache .*hf download stabilityai/stable-diffusion-3.5-medium",
    ):
        SD3Policy.load(None, cache_dir=tmp_path / "empty_cache")  # the default repo, not cached here
    partial = tmp_path / "partial"
    partial.mkdir()
    for item in sd3_dir.iterdir():
        if item.name not in ("tokenizer_3", "text_encoder_3"):
            (partial / item.name).symlink_to(item)
    (partial / "text_encoder_3").mkdir()
    (partial / "text_encoder_3" / "config.json").symlink_to(sd3_dir / "text_encoder_3" / "config.json")
    with pytest.raises(ValueError) as e:
        SD3Policy.load(partial)
    msg = str(e.value)
    assert "missing text_encoder_3/<weights>.safetensors, tokenizer_3/" in msg
    assert "hf download stabilityai/stable-diffusion-3.5-medium" in msg and "model.checkpoint" in msg


def test_the_shards_checked_are_the_variant_free_indexs(tmp_path):
    """from_pretrained (no variant) loads the shards of x.safetensors.index.json, not of an fp16 variant's
    index, which sorts before it by name."""
    import json

    from densegrpo_fast.policies.pretrained import missing_parts

    (tmp_path / "model_index.json").write_text("{}")
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for index, shard in [("diffusion_pytorch_model.fp16", "half-1.safetensors"),
                         ("diffusion_pytorch_model", "full-1.safetensors")]:  # fmt: skip
        (folder / f"{index}.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    (folder / "half-1.safetensors").write_bytes(b"")
    assert missing_parts(tmp_path, {"transformer": "model"}) == ["transformer/full-1.safetensors"]


def test_the_first_look_at_a_checkpoint_keeps_the_full_message(tmp_path):
    """A checkpoint half there (a Hugging Face cache entry with only the index and the transformer's config, as
    an interrupted download leaves it; a directory with only its index) is named as given, with every folder it
    lacks and the whole download command."""
    from densegrpo_fast.policies import adapter_class

    sd3 = adapter_class("sd3")
    snapshot = tmp_path / "cache" / "models--me--mysd3" / "snapshots" / "abc123"
    (snapshot / "transformer").mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    (snapshot / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (snapshot / "transformer" / "config.json").write_text("{}")
    with pytest.raises(ValueError) as e:
        sd3.resolve("me/mysd3", cache_dir=tmp_path / "cache")
    assert "model.checkpoint='me/mysd3'" in str(e.value) and "hf download me/mysd3 " in str(e.value)
    assert "missing transformer/<weights>.safetensors, vae/, text_encoder/" in str(e.value)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "model_index.json").write_text("{}")
    with pytest.raises(
        ValueError, match=r"missing transformer/, vae/, text_encoder/, text_encoder_2/, text_encoder_3/"
    ):
        sd3.resolve(str(bare))
    (bare / "transformer").mkdir()
    (bare / "transformer" / "config.json").write_text("{}")
    (bare / "model_index.json").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(ValueError, match=r"model_index.json is not JSON .*fetch the checkpoint again"):
        sd3.resolve(str(bare))


def test_the_download_hint_fetches_only_the_pipelines_folders(tmp_path):
    """The hint's patterns, read as ``hf download`` reads them (one value per ``--include``, filtered by
    huggingface_hub's own matcher), take the diffusers folders and leave the single-file checkpoints."""
    from huggingface_hub.utils import filter_repo_objects

    from densegrpo_fast.policies.pretrained import download_command
    from densegrpo_fast.policies.sd3 import COMPONENTS, DEFAULT_REPO

    with pytest.raises(ValueError) as e:
        SD3Policy.load("someone/sd3-finetune", cache_dir=tmp_path / "empty_cache")
    assert f"`{download_command('someone/sd3-finetune', COMPONENTS)}`" in str(e.value)  # the repo asked for
    words = shlex.split(download_command(DEFAULT_REPO, COMPONENTS))
    assert words[:3] == ["hf", "download", DEFAULT_REPO]
    flags, patterns = words[3::2], words[4::2]
    # no value the CLI would take for a file name:
    assert set(flags) == {"--include"} and len(flags) == len(patterns)
    repo_files = [
        "model_index.json", "README.md", "sd3.5_medium.safetensors", "text_encoders/clip_g.safetensors",
        "text_encoders/t5xxl_fp16.safetensors", "scheduler/scheduler_config.json", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors", "text_encoder_3/model-00001-of-00002.safetensors",
        "tokenizer_3/spiece.model", "transformer/diffusion_pytorch_model.safetensors",
    ]  # fmt: skip
    kept = set(filter_repo_objects(repo_files, allow_patterns=patterns))
    assert kept == {f for f in repo_files if f == "model_index.json" or f.split("/")[0] in COMPONENTS}
    hf = shutil.which("hf", path=str(Path(sys.executable).parent)) or shutil.which("hf")
    if hf is None:
        pytest.skip("no `hf` command beside this Python or on PATH")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    run = subprocess.run([hf, *words[1:], "--dry-run"], capture_output=True, text=True, timeout=120, env=env)
    said = run.stdout + run.stderr
    assert run.returncode != 0 and "offline" in said.lower(), said  # parsed, and went for the hub
    assert "Ignoring" not in said and "No such option" not in said, said  # with the patterns kept


def test_weights_of_another_shape_or_format_are_named(policy, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.clone() for k, v in policy.transformer.state_dict().items()}
    before = {k: v.clone() for k, v in state.items()}
    state["pos_embed.pos_embed"] = torch.zeros(1, 4, 32)  # (another architecture's)
    wrong = tmp_path / "larger.safetensors"
    save_file(state, str(wrong), metadata={"family": "sd3"})
    with pytest.raises(
        ValueError, match=r"1 weights of another shape \(e.g. pos_embed.pos_embed: \(1, 4, 32\) in"
    ):
        policy.load_weights(wrong)
    after = policy.transformer.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # refused before anything was copied
    pickle = tmp_path / "checkpoint.pt"
    torch.save({"trainable": {}}, pickle)
    with pytest.raises(ValueError, match=r"is not a safetensors file .*policy_ema.safetensors"):
        policy.load_weights(pickle)


def test_resolution_must_fit_the_model(pipe):
    with pytest.raises(ValueError, match=r"model.resolution \(34\) must be a multiple of 4"):
        SD3Policy(pipe, resolution=34)
    with pytest.raises(ValueError, match="beyond this transformer's position embeddings"):
        SD3Policy(pipe, resolution=128)


def test_one_densegrpo_iteration_through_the_trainer(sd3_dir, tmp_path, capsys):
    from densegrpo_fast.trainer import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green dog\n")
    overrides = [
        "model.family=sd3", f"model.checkpoint={sd3_dir}", f"model.resolution={tiny.RESOLUTION}",
        f"model.max_sequence_length={tiny.MAX_T5_TOKENS}", f"prompts.dataset={prompts}", "prompts.prompts_per_iteration=2",
        "sampling.num_steps=3", "sampling.group_size=2", "sampling.shift=null", "noise.kind=uniform", "reward.name=redness",
        "lora.rank=4", "grpo.train_batch_size=4", "grpo.beta=0.04", f"eval.dataset={prompts}", "eval.num_prompts=6",
        "eval.num_steps=2", "run.iterations=1", f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false",
        "run.sample_grid_every=1", "ema.every=1", "run.export_every=1",
    ]  # fmt: skip
    cfg = load_config(TrainConfig, None, overrides)
    run_dir = train(cfg, progress=False)
    # the final export reuses iteration 1's kept one: the policy linked, the adapters copied
    kept = run_dir / "exports" / "iter_00001"
    assert sorted(p.name for p in (kept / "lora_ema").iterdir()) == ["pytorch_lora_weights.safetensors"]
    assert (run_dir / "lora_ema" / "pytorch_lora_weights.safetensors").read_bytes() == (
        kept / "lora_ema" / "pytorch_lora_weights.safetensors"
    ).read_bytes()
    assert (run_dir / "policy_ema.safetensors").stat().st_ino == (
        kept / "policy_ema.safetensors"
    ).stat().st_ino
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (step,) = [r for r in recs if "reward_mean" in r]
    numbers = [v for k, v in step.items() if isinstance(v, float)] + step["dR_mean"] + step["R_mean"]
    assert all(math.isfinite(v) for v in numbers), step
    assert step["rows_trained"] > 0 and step["grad_norm"] > 0
    assert_on_policy(step, exact=False)  # the first update is on-policy
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    lora_b = [t for n, t in ckpt["trainable"].items() if "lora_B" in n]
    assert lora_b and any(t.abs().sum() > 0 for t in lora_b), "LoRA B starts at zero: an update must move it"
    # the export is the transformer with LoRA merged, in diffusers names
    from safetensors.torch import load_file

    exported = load_file(Path(run_dir) / "policy_ema.safetensors")
    assert not any("lora" in k for k in exported)
    base = SD3Policy.load(sd3_dir, dtype="fp32", **OPTS).transformer.state_dict()
    assert exported.keys() == base.keys()
    assert any(not torch.equal(exported[k], base[k]) for k in base)
    assert (run_dir / "samples" / "iter_00001.png").exists()
    # the EMA adapters alone, in diffusers' LoRA format: loaded onto the base pipeline they give the
    # merged export's velocities (the LoRA scale alpha / rank = 2 is folded into lora_B)
    from diffusers import StableDiffusion3Pipeline

    with_lora = StableDiffusion3Pipeline.from_pretrained(sd3_dir, dtype=torch.float32)
    with_lora.load_lora_weights(run_dir / "lora_ema")
    merged = SD3Policy.load(sd3_dir, dtype="fp32", **OPTS)
    merged.load_weights(run_dir / "policy_ema.safetensors")
    lora_policy, x = SD3Policy(with_lora, **OPTS), torch.randn(2, *merged.latent_shape)
    cond = merged.encode_prompts(["a red circle", "a green dog"])
    v_lora = lora_policy.velocity(x, torch.tensor([0.7, 0.3]), cond, 4.5)
    v_merged = merged.velocity(x, torch.tensor([0.7, 0.3]), cond, 4.5)
    v_base = SD3Policy.load(sd3_dir, dtype="fp32", **OPTS).velocity(x, torch.tensor([0.7, 0.3]), cond, 4.5)
    torch.testing.assert_close(v_lora, v_merged, rtol=1e-5, atol=1e-5)
    assert (v_merged - v_base).abs().max() > 100 * (v_lora - v_merged).abs().max(), "the LoRA changes it"

    # the eval command scores the export (or the base model) with eval.rewards, resumably
    from densegrpo_fast.evaluate import run_eval

    export = str(run_dir / "policy_ema.safetensors")
    ev = [*overrides[:4], f"eval.dataset={prompts}", "eval.num_prompts=null", "eval.num_steps=2", "eval.shift=null",
          "eval.guidance_scale=4.5", "eval.batch_size=2", "eval.rewards={red: {name: redness}}"]  # fmt: skip
    trained = run_eval(None, [*ev, f"eval.output_dir={tmp_path / 'ev'}"], checkpoint=export)
    base = run_eval(None, [*ev, f"eval.output_dir={tmp_path / 'ev_base'}"])
    assert trained["num_prompts"] == 3 and trained["num_steps"] == 2
    assert trained["scores"]["red"] != base["scores"]["red"]
    lines = (tmp_path / "ev" / "scores.jsonl").read_text().splitlines()
    assert [json.loads(ln)["prompt"] for ln in lines] == ["a red circle", "two blue squares", "a green dog"]
    # nothing left to do: a second call only rereads the scores
    again = run_eval(None, [*ev, f"eval.output_dir={tmp_path / 'ev'}"], checkpoint=export)
    assert again["scores"] == trained["scores"]
    # a GenEval-style .jsonl: the prompt fields, and each tag's mean in the summary (eval.num_prompts honoured)
    tagged = tmp_path / "tagged.jsonl"
    rows = [("a red circle", "colors"), ("two blue squares", "counting"), ("a green dog", "colors")]
    tagged.write_text("".join(json.dumps({"prompt": p, "tag": t}) + "\n" for p, t in rows))
    out_t = [f"eval.dataset={tagged}", "eval.num_prompts=2", f"eval.output_dir={tmp_path / 'ev_t'}"]
    capsys.readouterr()
    by_tag = run_eval(None, [*ev, *out_t], checkpoint=export)["by_tag"]["red"]
    assert "red mean over tags (over 2 of GenEval's 6 tasks: not its overall)" in capsys.readouterr().out
    first_two = [json.loads(ln)["red"] for ln in lines[:2]]  # the same prompts, indices and seeds
    assert by_tag == pytest.approx({"colors": sum(first_two[0]) / len(first_two[0]),
                                    "counting": sum(first_two[1]) / len(first_two[1])})  # fmt: skip
    # with the blocks compiled (the eager backend runs the captured graphs as they are): the same scores
    compiled = ["model.compile=true", "model.compile_backend=eager", f"eval.output_dir={tmp_path / 'ev_c'}"]
    assert run_eval(None, [*ev, *compiled], checkpoint=export)["scores"] == trained["scores"]
    with pytest.raises(ValueError, match="another protocol"):
        run_eval(None, [*ev, f"eval.output_dir={tmp_path / 'ev'}"])  # the base model into the export's dir
    # scores of another dtype, or of a reward with other settings, are not mixed into the same summary
    for change, said in [("model.dtype=bf16", "dtype: 'fp32' -> 'bf16'"),
                         ("eval.rewards={red: {name: redness, kwargs: {}}, blue: {name: redness}}", "rewards: ")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"another protocol .*{said}"):
            run_eval(None, [*ev, change, f"eval.output_dir={tmp_path / 'ev'}"], checkpoint=export)
    # a policy exported again at the same path (a run that went on) is not resumed onto the old one's scores
    import shutil

    from safetensors.torch import load_file, save_file

    again_path = tmp_path / "again" / "policy_ema.safetensors"
    again_path.parent.mkdir()
    shutil.copy(export, again_path)
    first = run_eval(None, [*ev, f"eval.output_dir={tmp_path / 'ev_again'}"], checkpoint=str(again_path))
    # the same weights written again (a finished run resumed exports again), with safetensors' metadata in
    # another order, as its writer does from one call to the next: other bytes, the same export, resumed
    raw = again_path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__")
    assert len(meta) >= 2
    text = json.dumps(
        {"__metadata__": dict(reversed(meta.items())), **header}, separators=(",", ":")
    ).encode()
    again_path.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n :])
    assert again_path.read_bytes() != raw
    resumed = run_eval(None, [*ev, f"eval.output_dir={tmp_path / 'ev_again'}"], checkpoint=str(again_path))
    assert resumed["scores"] == first["scores"]
    save_file(load_file(str(again_path)), str(again_path), metadata={"family": "sd3", "iteration": "7"})
    with pytest.raises(ValueError, match=r"another protocol \(checkpoint_identity: "):
        run_eval(None, [*ev, f"eval.output_dir={tmp_path / 'ev_again'}"], checkpoint=str(again_path))
    # other weights of the same size and iteration at the same path (a run retrained into its directory):
    # told apart by the digest of the weights loaded
    run_eval(None, [*ev, f"eval.output_dir={tmp_path / 'ev_same'}"], checkpoint=str(again_path))
    save_file({k: v * 2 for k, v in load_file(str(again_path)).items()}, str(again_path),
              metadata={"family": "sd3", "iteration": "7"})  # fmt: skip
    with pytest.raises(ValueError, match=r"another protocol \(weights: "):
        run_eval(None, [*ev, f"eval.output_dir={tmp_path / 'ev_same'}"], checkpoint=str(again_path))
    # the protocol holds absolute paths: the same files named from another working directory resume
    import os

    here, cwd_dir = os.getcwd(), f"eval.output_dir={tmp_path / 'ev_cwd'}"
    try:
        os.chdir(tmp_path)
        first = run_eval(None, [*ev, cwd_dir], checkpoint="again/policy_ema.safetensors")
        os.chdir(again_path.parent)
        assert (
            run_eval(None, [*ev, cwd_dir], checkpoint="policy_ema.safetensors")["scores"] == first["scores"]
        )
    finally:
        os.chdir(here)
    assert json.loads((tmp_path / "ev_cwd" / "protocol.json").read_text())["checkpoint"] == str(again_path)
    assert first["num_prompts"] == 3
    flux_like = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(flux_like), metadata={"family": "flux"})
    with pytest.raises(ValueError, match="model.family 'flux', not 'sd3'"):
        run_eval(None, [*ev, f"eval.output_dir={tmp_path / 'ev2'}"], checkpoint=str(flux_like))
    # the base model's directory replaced at the same path: its weights are told apart (a digest of the loaded
    # weights), so the new model's scores are not mixed with the old one's
    copy = tmp_path / "base_copy"
    shutil.copytree(sd3_dir, copy)
    ev_copy = [*ev, f"model.checkpoint={copy}", f"eval.output_dir={tmp_path / 'ev_copy'}"]
    assert run_eval(None, ev_copy)["scores"] == base["scores"]
    (weights_file,) = (copy / "transformer").glob("*.safetensors")
    w = load_file(str(weights_file))
    save_file({k: v * 1.01 if k == sorted(w)[0] else v for k, v in w.items()}, str(weights_file))
    with pytest.raises(ValueError, match=r"another protocol \(weights: '[0-9a-f]{64}' -> '[0-9a-f]{64}'\)"):
        run_eval(None, ev_copy)


def test_the_trainers_heldout_score_is_the_eval_commands(sd3_dir, tmp_path):
    """The held-out evaluation during training uses the eval command's protocol: the file's first
    eval.num_prompts prompts (not cycled past its end), eval.images_per_prompt each, noise per (prompt, image)."""
    from densegrpo_fast.evaluate import run_eval
    from densegrpo_fast.trainer import heldout_rewards, setup

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green dog\n")
    model = ["model.family=sd3", f"model.checkpoint={sd3_dir}", f"model.resolution={tiny.RESOLUTION}",
             f"model.max_sequence_length={tiny.MAX_T5_TOKENS}"]  # fmt: skip
    ev = [f"eval.dataset={prompts}", "eval.num_prompts=5", "eval.images_per_prompt=2", "eval.num_steps=2",
          "eval.shift=null", "eval.guidance_scale=4.5", "eval.batch_size=4", "eval.seed=3"]  # fmt: skip
    train_cfg = [*model, *ev, f"prompts.dataset={prompts}", "sampling.group_size=2", "noise.kind=uniform",
                 "reward.name=redness", "lora.rank=4", f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false"]  # fmt: skip
    run = setup(load_config(TrainConfig, None, train_cfg), progress=False)  # (LoRA B is 0: the base model)
    ours = heldout_rewards(run)["eval_reward"]
    theirs = run_eval(
        None, [*model, *ev, "eval.rewards={red: {name: redness}}", f"eval.output_dir={tmp_path / 'ev'}"]
    )
    assert theirs["num_prompts"] == 3 and theirs["images_per_prompt"] == 2
    assert ours == pytest.approx(theirs["scores"]["red"], rel=1e-6)
    one = run_eval(None, [*model, *ev, "eval.images_per_prompt=1", "eval.rewards={red: {name: redness}}",
                          f"eval.output_dir={tmp_path / 'ev1'}"])  # fmt: skip
    assert one["scores"]["red"] != pytest.approx(ours, rel=1e-3)  # (the second images count)


def test_the_evaluation_samples_at_eval_resolution(sd3_dir, policy, tmp_path):
    """``eval.resolution``: the eval command and the trainer's held-out evaluation sample images of that side,
    with the same scores, through a policy that shares the transformer; the protocol records the side; a side
    the model cannot sample is refused, naming eval.resolution."""
    from PIL import Image

    from densegrpo_fast.evaluate import run_eval
    from densegrpo_fast.trainer import heldout_rewards, setup

    wide = policy.at_resolution(48)
    assert wide.latent_shape == (4, 24, 24) and wide.transformer is policy.transformer
    assert policy.latent_shape == (4, 16, 16) and policy.at_resolution(tiny.RESOLUTION) is policy
    with pytest.raises(ValueError, match=r"eval.resolution \(80\) is beyond this transformer's position"):
        policy.at_resolution(80)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    model = ["model.family=sd3", f"model.checkpoint={sd3_dir}", f"model.resolution={tiny.RESOLUTION}",
             f"model.max_sequence_length={tiny.MAX_T5_TOKENS}"]  # fmt: skip
    ev = [f"eval.dataset={prompts}", "eval.num_steps=2", "eval.batch_size=4", "eval.resolution=48"]
    out = tmp_path / "ev"
    theirs = run_eval(None, [*model, *ev, "eval.rewards={red: {name: redness}}", "eval.save_images=true",
                             f"eval.output_dir={out}"])  # fmt: skip
    sizes = {Image.open(f).size for f in out.rglob("*.png")}
    assert sizes == {(48, 48)}
    assert (out / "summary.json").read_text().count('"resolution": 48') == 1
    train_cfg = [*model, *ev, f"prompts.dataset={prompts}", "sampling.group_size=2", "noise.kind=uniform",
                 "reward.name=redness", "lora.rank=4", f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false"]  # fmt: skip
    run = setup(load_config(TrainConfig, None, train_cfg), progress=False)
    assert heldout_rewards(run)["eval_reward"] == pytest.approx(theirs["scores"]["red"], rel=1e-6)
    at_32 = run_eval(None, [*model, *ev, "eval.resolution=null", "eval.rewards={red: {name: redness}}",
                            f"eval.output_dir={tmp_path / 'ev32'}"])  # fmt: skip
    assert at_32["scores"]["red"] != pytest.approx(theirs["scores"]["red"], rel=1e-3)
    with pytest.raises(ValueError, match=r"eval.resolution \(40\) must be a multiple of 16"):
        load_config(TrainConfig, None, [*train_cfg, "eval.resolution=40"])
    with pytest.raises(ValueError, match=r"eval.resolution \(64\): the toy model samples 32 px images only"):
        load_config(TrainConfig, None, ["eval.resolution=64"])


def test_non_square_images_train_and_evaluate(sd3_dir, policy, tmp_path):
    """``model.resolution: [height, width]``: an iteration trains on portrait images ([48, 32]) on policy and
    draws them in its sample grid; the eval command samples landscape ones (eval.resolution [32, 48]: PNGs 48
    wide, 32 high), records the size as [height, width] and resumes under it; sizes the model cannot sample
    are refused per side."""
    from PIL import Image

    from densegrpo_fast.evaluate import run_eval
    from densegrpo_fast.trainer import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    model = ["model.family=sd3", f"model.checkpoint={sd3_dir}", "model.resolution=[48, 32]",
             f"model.max_sequence_length={tiny.MAX_T5_TOKENS}"]  # fmt: skip
    ev = [f"eval.dataset={prompts}", "eval.num_steps=2", "eval.batch_size=4", "eval.rewards={}"]
    train_cfg = [*model, *ev, f"prompts.dataset={prompts}", "prompts.prompts_per_iteration=2",
                 "sampling.group_size=2", "sampling.num_steps=3", "noise.kind=uniform", "reward.name=redness",
                 "lora.rank=4", "run.iterations=1", "run.sample_grid_every=1", "run.tensorboard=false",
                 f"run.output_dir={tmp_path / 'run'}"]  # fmt: skip
    run_dir = train(load_config(TrainConfig, None, train_cfg), progress=False)
    (rec,) = [
        json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if "reward_mean" in ln
    ]
    assert_on_policy(rec)
    assert list(run_dir.glob("samples/*.png"))
    out = tmp_path / "ev"
    landscape = [*model, *ev, "eval.resolution=[32, 48]", "eval.rewards={red: {name: redness}}",
                 "eval.save_images=true", f"eval.output_dir={out}"]  # fmt: skip
    first = run_eval(None, landscape)
    assert {Image.open(f).size for f in out.rglob("*.png")} == {(48, 32)}  # (PIL: width, height)
    assert json.loads((out / "protocol.json").read_text())["resolution"] == [32, 48]
    assert run_eval(None, landscape)["scores"] == first["scores"]  # resumed: the protocol compares equal
    with pytest.raises(ConfigError, match=r"resolution \(\[48, 40\]\) must be a multiple of 16 on each side"):
        load_config(TrainConfig, None, [*train_cfg, "model.resolution=[48, 40]"])
    with pytest.raises(ValueError, match=r"resolution \(\[32, 80\]\) is beyond .*at most 64 px a side"):
        policy.at_resolution((32, 80), "model.resolution")


def test_lora_trains_in_fp32_over_a_bf16_transformer(sd3_dir, tmp_path):
    """The recipes' set-up: the transformer in bf16, its LoRA adapters (and so Adam's moments and the EMA)
    in fp32, and old log-probs recomputed at the update's own batch sizes, so the first ratio is exactly 1."""
    from densegrpo_fast.trainer import setup, train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    overrides = [
        "model.family=sd3", f"model.checkpoint={sd3_dir}", f"model.resolution={tiny.RESOLUTION}", "model.dtype=bf16",
        f"model.max_sequence_length={tiny.MAX_T5_TOKENS}", f"prompts.dataset={prompts}", "prompts.prompts_per_iteration=2",
        "sampling.num_steps=3", "sampling.group_size=2", "sampling.shift=null", "noise.kind=uniform", "reward.name=redness",
        "lora.rank=4", "grpo.train_batch_size=3", f"eval.dataset={prompts}", "eval.num_prompts=2", "eval.num_steps=2",
        "run.iterations=1", f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false", "run.sample_grid_every=0",
    ]  # fmt: skip
    run = setup(
        load_config(TrainConfig, None, [*overrides, f"run.output_dir={tmp_path / 'look'}"]), progress=False
    )
    lora = {n: p for n, p in run.policy.transformer.named_parameters() if p.requires_grad}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert run.policy.dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in run.ema.values())
    run_dir = train(load_config(TrainConfig, None, overrides), progress=False)
    (step,) = [
        json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if "reward_mean" in ln
    ]
    assert math.isfinite(step["grad_norm"]) and step["grad_norm"] > 0
    assert step["ratio_dev_first"] is None  # the update recomputed the old log-probs ...
    assert_on_policy(step)  # ... and the rollout's lie within the trainer's limit of them


def test_lora_init_starts_the_adapters_from_a_lora_on_disk(sd3_dir, tmp_path, monkeypatch):
    """A LoRA of rank 4, alpha 2 (scale 0.5), written as a run's lora_ema/ (diffusers' format, the scale folded
    into lora_B) and by peft's PeftModel.save_pretrained (Flow-GRPO's format), starts a run whose adapters
    have alpha 8 (scale 2): the run's first velocities are the LoRA's, and only its own adapter trains."""
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from densegrpo_fast.evaluate import run_eval
    from densegrpo_fast.lora_init import WARM, merge_lora
    from densegrpo_fast.trainer import _reference_velocity, setup, train

    targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"]
    donor = SD3Policy.load(sd3_dir, dtype="fp32", **OPTS)
    torch.manual_seed(0)
    donor.transformer.add_adapter(LoraConfig(r=4, lora_alpha=2, target_modules=targets))
    with torch.no_grad():
        for n, p in donor.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    x, sigma = torch.randn(2, *donor.latent_shape), torch.tensor([0.7, 0.3])
    cond = donor.encode_prompts(["a red circle", "a green dog"])
    want = donor.velocity(x, sigma, cond, 4.5)
    state = get_peft_model_state_dict(donor.transformer)
    donor.save_lora(tmp_path / "lora_ema", state, 2 / 4)
    wrapped = get_peft_model(SD3Policy.load(sd3_dir, dtype="fp32", **OPTS).transformer,
                             LoraConfig(r=4, lora_alpha=2, target_modules=targets))  # fmt: skip
    set_peft_model_state_dict(wrapped, {f"base_model.model.{k}": v for k, v in state.items()})
    wrapped.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "adapter_config.json").exists()

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    base = ["model.family=sd3", f"model.checkpoint={sd3_dir}", f"model.resolution={tiny.RESOLUTION}",
            f"model.max_sequence_length={tiny.MAX_T5_TOKENS}", f"prompts.dataset={prompts}", "sampling.group_size=2",
            "noise.kind=uniform", "reward.name=redness", "lora.rank=4", "lora.alpha=8", f"lora.target_modules={targets}",
            "run.tensorboard=false"]  # fmt: skip

    def started(init, *extra, out="run"):
        cfg = [*base, f"lora.init={init}", f"run.output_dir={tmp_path / out / Path(init).name}", *extra]
        return setup(load_config(TrainConfig, None, cfg), progress=False)

    zero = setup(
        load_config(TrainConfig, None, [*base, f"run.output_dir={tmp_path / 'zero'}"]), progress=False
    )
    v_zero = zero.policy.velocity(x, sigma, cond, 4.5)
    assert (want - v_zero).abs().max() > 1e-2, "the LoRA changes the velocity"
    for init in (
        tmp_path / "lora_ema",
        tmp_path / "lora_ema" / "pytorch_lora_weights.safetensors",
        tmp_path / "peft",
    ):
        run = started(init)
        torch.testing.assert_close(run.policy.velocity(x, sigma, cond, 4.5), want, rtol=1e-5, atol=1e-5)
        trained = [n for n, p in run.policy.transformer.named_parameters() if p.requires_grad]
        assert trained == [n for n, p in zero.policy.transformer.named_parameters() if p.requires_grad]
        assert (
            all(".default." in n for n in trained)
            and run.params
            and all(p.dtype == torch.float32 for p in run.params)
        )
        assert not any(WARM in n for n, _ in run.policy.transformer.named_parameters()), (
            "the loader's adapter is gone"
        )
        g = run.cfg.sampling.guidance_scale  # the KL reference is still the base model
        v_base = zero.policy.velocity(x, sigma, cond, g)
        torch.testing.assert_close(_reference_velocity(run, x, sigma, cond), v_base, rtol=0, atol=1e-6)

    # over a bf16 transformer the run's fp32 adapters hold the file's weights exactly (alpha 8 / r 4 over the
    # file's 0.5, or the 1 of lora_ema, whose B holds the 0.5: B x 1/4 either way, exact in binary)
    for init in (tmp_path / "lora_ema", tmp_path / "peft"):
        own = dict(started(init, "model.dtype=bf16", out="bf16").policy.transformer.named_parameters())
        for key, t in state.items():
            mine = own[key.replace(".weight", ".default.weight")]
            assert mine.dtype == torch.float32
            assert torch.equal(mine, t if "lora_A" in key else t * 0.25), (init.name, key)
    # a resumed run takes its adapters from its checkpoint: the file may be gone
    moved = tmp_path / "moved_lora"
    shutil.copytree(tmp_path / "lora_ema", moved)
    one = [*base, f"lora.init={moved}", f"run.output_dir={tmp_path / 'resumed'}", "run.iterations=1",
           "eval.num_prompts=2", "eval.num_steps=2", f"eval.dataset={prompts}", "run.sample_grid_every=0"]  # fmt: skip
    train(load_config(TrainConfig, None, one), progress=False)
    shutil.rmtree(moved)
    train(load_config(TrainConfig, None, [*one, "run.iterations=2"]), resume=True, progress=False)
    with pytest.raises(ValueError, match=r"lora.init=.*moved_lora' does not exist"):  # a fresh run needs it
        setup(load_config(TrainConfig, None, [*one, f"run.output_dir={tmp_path / 'fresh'}"]), progress=False)

    # eval --lora: the LoRA folded into the base model at its own scale, the adapter gone
    layers = len([k for k in state if "lora_A" in k])
    for lora in (tmp_path / "lora_ema", tmp_path / "peft"):
        merged = SD3Policy.load(sd3_dir, dtype="fp32", **OPTS)
        assert merge_lora(merged, lora) == layers
        torch.testing.assert_close(merged.velocity(x, sigma, cond, 4.5), want, rtol=1e-5, atol=1e-5)
        assert not any("lora" in n for n, _ in merged.transformer.named_parameters())
    # the same layer names with other shapes (an adapter of another size of the model): a clear refusal
    wide = tmp_path / "peft_wide"
    shutil.copytree(tmp_path / "peft", wide)
    tensors = load_file(wide / "adapter_model.safetensors")
    k = next(n for n in tensors if "lora_A" in n)
    save_file(
        {**tensors, k: torch.zeros(tensors[k].shape[0], tensors[k].shape[1] + 8)},
        str(wide / "adapter_model.safetensors"),
    )
    with pytest.raises(
        ValueError,
        match=r"peft_wide.* does not fit this transformer's layers \(size mismatch for .*another size",
    ):
        merge_lora(SD3Policy.load(sd3_dir, dtype="fp32", **OPTS), wide)
    ev = [*base[:4], f"eval.dataset={prompts}", "eval.num_prompts=null", "eval.num_steps=2", "eval.shift=null",
          "eval.guidance_scale=4.5", "eval.batch_size=2", "eval.rewards={red: {name: redness}}"]  # fmt: skip
    peft_dir = str(tmp_path / "peft")
    scored = run_eval(None, [*ev, f"eval.output_dir={tmp_path / 'ev'}"], lora=peft_dir, progress=False)
    plain = run_eval(None, [*ev, f"eval.output_dir={tmp_path / 'ev_base'}"], progress=False)
    assert scored["scores"]["red"] != plain["scores"]["red"]
    # another LoRA at the same path: not resumed onto
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    save_file({k: v * 2 for k, v in load_file(weights).items()}, str(weights))
    with pytest.raises(ValueError, match=r"another protocol \(lora_weights: "):
        run_eval(None, [*ev, f"eval.output_dir={tmp_path / 'ev'}"], lora=peft_dir, progress=False)
    # the same adapters written again with their metadata in another order (safetensors' writer does that
    # from one call to the next): the same LoRA, resumed onto
    from densegrpo_fast.lora_init import lora_identity

    shutil.copytree(tmp_path / "lora_ema", tmp_path / "lora_copy")
    ema_file = tmp_path / "lora_copy" / "pytorch_lora_weights.safetensors"
    before, raw = lora_identity(ema_file.parent), ema_file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(dict(reversed(header.items())), separators=(",", ":")).encode()
    ema_file.write_bytes(raw[:8] + text.ljust(n) + raw[8 + n :])
    assert ema_file.read_bytes() != raw and lora_identity(ema_file.parent) == before
    tensors = load_file(ema_file)
    save_file({k: v + (k == sorted(tensors)[0]) for k, v in tensors.items()}, str(ema_file))
    assert lora_identity(ema_file.parent) != before
    # a peft folder's adapter_config.json (its alpha sets the scale) is part of what is resumed onto
    run_eval(None, [*ev, f"eval.output_dir={tmp_path / 'ev_cfg'}"], lora=peft_dir, progress=False)
    config = tmp_path / "peft" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "lora_alpha": 16}))
    with pytest.raises(ValueError, match=r"another protocol \(lora_config: "):
        run_eval(None, [*ev, f"eval.output_dir={tmp_path / 'ev_cfg'}"], lora=peft_dir, progress=False)
    with pytest.raises(ValueError, match=r"--lora '.*nowhere' does not exist"):
        run_eval(None, [*ev, f"eval.output_dir={tmp_path / 'ev2'}"], lora=str(tmp_path / "nowhere"))

    with pytest.raises(
        ValueError, match=r"has rank 4 \(at .*\), this run's adapters rank 8: set lora.rank=4"
    ):
        started(tmp_path / "peft", "lora.rank=8", out="rank8")
    with pytest.raises(ValueError, match=r"adapts 2 layers that lora.target_modules leaves out \(e.g. "):
        started(tmp_path / "peft", "lora.target_modules=[attn.to_q, attn.to_k, attn.to_v]", out="fewer")
    # a peft folder is read as a plain LoRA or refused: PiSSA & co. (which move the base weights), biases,
    # and files that leave adapted layers without weights
    for change, said in [({"init_lora_weights": "pissa"}, "init_lora_weights='pissa', which changes the base"),
                         ({"lora_bias": True}, "also trains biases or whole modules")]:  # fmt: skip
        odd = tmp_path / f"odd_{next(iter(change))}"
        shutil.copytree(tmp_path / "peft", odd)
        config = json.loads((odd / "adapter_config.json").read_text())
        (odd / "adapter_config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=said):
            started(odd, out=odd.name)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "peft", cut)
    kept = dict(list(load_file(cut / "adapter_model.safetensors").items())[1:])
    save_file(kept, str(cut / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"0 of its weights fit no layer, 1 adapted layers get no weight"):
        started(cut, out="cut")
    # a diffusers file with nothing for the transformer: named, for the run and for eval --lora
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_file({"unet.down.lora_A.weight": torch.zeros(4, 8), "unet.down.lora_B.weight": torch.zeros(8, 4)},
              str(elsewhere / "pytorch_lora_weights.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match=r"lora.init='.*elsewhere' adapts no layer of this transformer"):
        started(elsewhere, out="elsewhere")
    with pytest.raises(ValueError, match=r"--lora '.*elsewhere' adapts no layer of this transformer"):
        merge_lora(SD3Policy.load(sd3_dir, dtype="fp32", **OPTS), elsewhere)
    # the calibrate command calibrates the warm-started policy, as train does
    from densegrpo_fast import trainer

    calibrated = []

    def calibrate(policy, *args, **kwargs):
        calibrated.append(policy.velocity(x, sigma, cond, 4.5))
        return torch.zeros(3)

    monkeypatch.setattr(trainer, "calibrate", calibrate)
    trainer.run_calibration(load_config(TrainConfig, None, [*base, f"lora.init={tmp_path / 'lora_ema'}",
                                                            f"run.output_dir={tmp_path / 'cal'}"]), progress=False)  # fmt: skip
    torch.testing.assert_close(calibrated[0], want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match=r"lora.init starts the pretrained families. adapters"):
        load_config(TrainConfig, None, ["lora.init=" + str(tmp_path / "peft")])


def _full_fine_tuning(sd3_dir, tmp_path, beta: float, extra=()) -> TrainConfig:
    """Full fine-tuning of the tiny SD3 in bf16 (sharded in a simulated job), KL weight ``beta``; ``extra``
    overrides."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    return load_config(TrainConfig, None, [
        "model.family=sd3", f"model.checkpoint={sd3_dir}", f"model.resolution={tiny.RESOLUTION}", "model.dtype=bf16",
        f"model.max_sequence_length={tiny.MAX_T5_TOKENS}", f"prompts.dataset={prompts}", "prompts.prompts_per_iteration=2",
        "sampling.group_size=2", "noise.kind=uniform", "reward.name=redness", "lora.enabled=false", f"grpo.beta={beta}",
        f"eval.dataset={prompts}", f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false", *extra,
    ])  # fmt: skip


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch.distributed with gloo is needed")
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_sharded_run_loads_into_host_memory_and_calibrates_through_its_shards(
    sd3_dir, tmp_path, monkeypatch, lora
):
    """Sharded (full fine-tuning, or LoRA with model.sharding=fsdp): the transformer is loaded into host memory,
    and psi's calibration runs with the transformer already sharded (on a GPU, nothing whole on the device)."""
    from torch.distributed.fsdp import FSDPModule

    from densegrpo_fast import distributed, trainer

    extra = ["lora.enabled=true", "lora.rank=4", "model.sharding=fsdp"] if lora else []
    cfg = _full_fine_tuning(
        sd3_dir, tmp_path, 0, ["noise.kind=calibrated", "noise.calibration.iterations=1", *extra]
    )
    loads, calibrated = [], []
    real_load, real_calibrate = trainer.load_policy, trainer.calibrate

    def load_policy(*args, **kwargs):
        loads.append(kwargs.get("transformer_on_host"))
        return real_load(*args, **kwargs)

    def calibrate(policy, *args, **kwargs):
        calibrated.append(isinstance(policy.transformer, FSDPModule))
        return real_calibrate(policy, *args, **kwargs)

    monkeypatch.setattr(trainer, "load_policy", load_policy)
    monkeypatch.setattr(trainer, "calibrate", calibrate)
    with distributed.simulated_job(2):
        run = trainer.setup(cfg, progress=False)
    assert run.sharded and loads == [True] and calibrated == [True]


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch.distributed with gloo is needed")
def test_sharding_keeps_no_whole_parameter_alive(sd3_dir, tmp_path, monkeypatch):
    """Each unit's whole parameters are upcast to fp32 and replaced by shards; nothing of the set-up may keep
    the old ones (a list of them did: the whole model in fp32 beside its shards until set-up ended)."""
    import gc
    import weakref

    from densegrpo_fast import distributed
    from densegrpo_fast.trainer import setup

    cfg = _full_fine_tuning(sd3_dir, tmp_path, beta=0)
    real, alive = distributed.shard, []

    def shard(module, compute_dtype=None, **kwargs):
        refs = [weakref.ref(p) for p in module.parameters()]
        real(module, compute_dtype, **kwargs)
        gc.collect()
        alive.extend(r() for r in refs if r() is not None and not distributed.is_sharded(r()))

    monkeypatch.setattr(distributed, "shard", shard)
    with distributed.simulated_job(2):
        run = setup(cfg, progress=False)
    assert run.sharded and alive == []


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="torch.distributed with gloo is needed")
def test_the_sharded_kl_reference_is_built_one_block_at_a_time(sd3_dir, tmp_path, monkeypatch):
    """Beside the loaded models, the set-up of sharded full fine-tuning with a KL reference never holds more
    whole (unsharded) weights than the reference's root and one of its blocks: a deep copy of the whole
    transformer, sharded afterwards, held a second whole model (24 GB for FLUX.1 in bf16)."""
    import gc

    from densegrpo_fast import distributed
    from densegrpo_fast.trainer import setup

    cfg = _full_fine_tuning(sd3_dir, tmp_path, beta=0.04)

    def whole_weights() -> int:  # every live unsharded parameter's elements (meta ones hold no memory)
        gc.collect()
        found = [o for o in gc.get_objects() if issubclass(type(o), torch.nn.Parameter)]
        return sum(p.numel() for p in found if not distributed.is_sharded(p) and p.device.type != "meta")

    fresh = dict(SD3Policy.load(sd3_dir, dtype="bf16", **OPTS).transformer.named_parameters())
    policy = SD3Policy.load(sd3_dir, dtype="bf16", **OPTS)
    loaded = whole_weights()
    model = policy.transformer
    blocks = [b for c in model.children() if isinstance(c, torch.nn.ModuleList) for b in c]
    block_numel = [sum(p.numel() for p in b.parameters()) for b in blocks]
    root = sum(p.numel() for p in model.parameters()) - sum(block_numel)
    assert len(blocks) >= 2 and root < sum(block_numel)  # (so a whole copy exceeds the allowance below)
    real, extra = distributed._shard_unit, []

    def unit(m, compute_dtype):
        extra.append(whole_weights() - loaded)
        real(m, compute_dtype)

    monkeypatch.setattr(distributed, "_shard_unit", unit)
    with distributed.simulated_job(2):
        run = setup(cfg, progress=False, policy=policy)
        assert run.sharded and run.reference is not None and extra
        assert max(extra) <= root + max(block_numel), (max(extra), root, block_numel)
        reference = dict(run.reference.named_parameters())  # rank 0's shards of the loaded model
        assert reference.keys() == fresh.keys() and not any(p.requires_grad for p in reference.values())
        assert all(p.dtype == torch.bfloat16 and distributed.is_sharded(p) for p in reference.values())
        for n, p in reference.items():
            assert torch.equal(p.to_local(), distributed.shard_like(fresh[n].detach(), p).to_local()), n


LR = 3e-4  # (optim.lr of the tests' config)


def _close_but_for_adam_sign_flips(ours: dict, theirs: dict, step) -> None:
    """Each tensor of ``ours`` as ``theirs``' to a tenth of the learning rate ``step(name)`` (rtol 1e-3 beyond),
    but for at most 1 % of all their elements, each within ``2 step(name)``. The adapters are a few Adam steps of
    about the learning rate each from where they started (lora_B from 0), whatever the size of their gradients:
    gradients summed in another order change a step by their relative rounding, and one within rounding of 0
    may step the other way. A step lost or doubled (gradients not reduced over the ranks) is a learning rate
    apart on most elements. Measured on an AMD EPYC: at most 1.1e-5 apart (0.04 of a step), but one element of
    11 136 3.6e-5 apart."""
    assert ours.keys() == theirs.keys()
    off, total = 0, 0
    for n, t in theirs.items():
        apart = ~torch.isclose(ours[n], t, rtol=1e-3, atol=0.1 * step(n))
        off, total = off + int(apart.sum()), total + t.numel()
        assert not apart.any() or (ours[n] - t)[apart].abs().max() <= 2 * step(n), (n, (ours[n] - t)[apart])
    assert off <= 0.01 * total, f"{off} of {total} elements apart"


def test_lora_over_a_bf16_base_shards_over_two_processes(sd3_dir, tmp_path):
    """LoRA over an FSDP2-sharded bf16 base (model.sharding=fsdp): the rollouts are the unsharded model's bit for
    bit, the checkpoint holds the fp32 adapters alone, and the export merges them into the whole bf16 base."""
    from safetensors.torch import load_file
    from test_distributed import sharded_bf16_matches_one_process

    model = ["model.family=sd3", f"model.checkpoint={sd3_dir}", f"model.resolution={tiny.RESOLUTION}",
             f"model.max_sequence_length={tiny.MAX_T5_TOKENS}"]  # fmt: skip
    sharded_bf16_matches_one_process(model, tmp_path, lora=True)
    sa, sb = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False) for d in ("run", "one"))
    assert sa["trainable"].keys() == sb["trainable"].keys() and all("lora_" in n for n in sa["trainable"])
    assert all(t.dtype == torch.float32 for t in [*sa["trainable"].values(), *sa["ema"].values()])
    # (the one process summed its rows' gradients in another order)
    _close_but_for_adam_sign_flips(sa["trainable"], sb["trainable"], lambda n: LR)
    exported, one = (load_file(tmp_path / d / "policy_ema.safetensors") for d in ("run", "one"))
    assert exported.keys() == one.keys() and all(t.dtype == one[n].dtype for n, t in exported.items())
    ours, theirs = (
        load_file(next((tmp_path / d / "lora_ema").glob("*.safetensors"))) for d in ("run", "one")
    )  # the EMA adapters in diffusers' LoRA format
    # (alpha / r folded into lora_B: 64 / 4)
    _close_but_for_adam_sign_flips(ours, theirs, lambda n: LR * (64 / 4 if "lora_B" in n else 1))
    # the same job started from those adapters (lora.init) with gradient checkpointing: the sharded rollouts still
    # the unsharded model's bit for bit, the checkpointed blocks recomputed through the shards in the backward
    from test_distributed import records

    init = [*model, "model.gradient_checkpointing=true", f"lora.init={tmp_path / 'run' / 'lora_ema'}"]
    (tmp_path / "again").mkdir()
    step = sharded_bf16_matches_one_process(init, tmp_path / "again", lora=True)
    first = [r for r in records(tmp_path / "run") if "reward_mean" in r][0]
    assert step["reward_mean"] != first["reward_mean"] or step["R_mean"] != first["R_mean"]  # (not from zero)
    sa, sb = (
        torch.load(tmp_path / "again" / d / "checkpoint.pt", weights_only=False) for d in ("run", "one")
    )
    for n, t in sb["trainable"].items():  # (the backward through the recomputed, sharded blocks)
        torch.testing.assert_close(sa["trainable"][n], t, rtol=1e-3, atol=1e-6)


def test_full_fine_tuning_in_bf16_shards_over_two_processes(sd3_dir, tmp_path):
    """FSDP2 on diffusers' SD3 transformer: fp32 shards (weights, AdamW, EMA), calls in bf16 (mixed
    precision), the first ratio exactly 1, and one process's checkpoint and bf16 export at the end."""
    from test_distributed import sharded_bf16_matches_one_process

    model = ["model.family=sd3", f"model.checkpoint={sd3_dir}", f"model.resolution={tiny.RESOLUTION}",
             f"model.max_sequence_length={tiny.MAX_T5_TOKENS}"]  # fmt: skip
    sharded_bf16_matches_one_process(model, tmp_path)
    run_dir = tmp_path / "run"
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    base_model = SD3Policy.load(sd3_dir, dtype="bf16", **OPTS).transformer
    base = base_model.state_dict()
    assert ckpt["trainable"].keys() == dict(base_model.named_parameters()).keys()  # every parameter trains
    assert all(t.dtype == torch.float32 for t in [*ckpt["trainable"].values(), *ckpt["ema"].values()])
    assert all(s["exp_avg"].dtype == torch.float32 for s in ckpt["optimizer"]["state"].values())
    from safetensors.torch import load_file

    exported = load_file(run_dir / "policy_ema.safetensors")
    assert exported.keys() == base.keys() and all(t.dtype == torch.bfloat16 for t in exported.values())
    assert any(not torch.equal(exported[k], base[k]) for k in base), "the weights moved"


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            ["model.dtype=bf16"],
            r"model.dtype \('bf16'\) applies to the pretrained families only",
        ),
        (
            ["model.offload_text_encoders=true"],
            r"model.offload_text_encoders \(True\) applies to the pretrained families only",
        ),
        (["sampling.shift=null"], "the toy model has no scheduler of its own"),
        (
            ["model.family=sd3", "model.checkpoint=/no/such/dir"],
            "neither an existing directory nor a Hugging Face repo",
        ),
        (
            ["model.family=sd3", "model.resolution=500"],
            r"model.resolution \(500\) must be a multiple of 16.*496",
        ),
        (
            ["model.family=flux", "sampling.shift=3.0"],
            r"sampling.shift \(3.0\) with model.family flux.*sampling.shift=null",
        ),
        (
            ["model.family=flux", "eval.shift=1.0"],
            r"eval.shift \(1.0\) with model.family flux.*eval.shift=null",
        ),
    ],
)
def test_model_section_cross_checks(overrides, match):
    from densegrpo_fast.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(TrainConfig, None, overrides)


def test_model_section_accepts_repo_ids_and_passes_the_adapter_options():
    cfg = load_config(TrainConfig, None, ["model.family=sd3", "model.checkpoint=stabilityai/stable-diffusion-3.5-medium",
                                          "model.dtype=bf16", "sampling.shift=null"])  # fmt: skip
    assert cfg.model.adapter_options() == dict(dtype="bf16", resolution=512, frames=None, guidance_scale_2=None,
                                               negative_prompt=None, max_sequence_length=None, local_files_only=True,
                                               gradient_checkpointing=False, offload_text_encoders=False,
                                               prompt_cache=None)  # fmt: skip


def test_the_dtype_keyword_follows_the_installed_diffusers(monkeypatch):
    import diffusers.utils.deprecation_utils as deprecation

    from densegrpo_fast.policies.pretrained import _dtype_keyword

    assert _dtype_keyword() == ("dtype" if hasattr(deprecation, "_resolve_dtype") else "torch_dtype")
    monkeypatch.delattr(deprecation, "_resolve_dtype", raising=False)  # a diffusers from before the rename
    assert _dtype_keyword() == "torch_dtype"


def test_every_model_of_the_pipeline_is_in_the_loaded_weights_the_ranks_compare(sd3_dir):
    from densegrpo_fast.distributed import weights_of

    policy = SD3Policy.load(sd3_dir, **OPTS)
    got = {id(t) for t in weights_of(policy)}
    names = ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"]
    assert all(id(p) in got for n in names for p in getattr(policy.pipe, n).parameters())
    buffers = [b for n in names for b in getattr(policy.pipe, n).buffers()]
    assert buffers and all(id(b) in got for b in buffers)  # (position ids, among others)
