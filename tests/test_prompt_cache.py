"""The prompt cache (``model.prompt_cache``, ``densegrpo-fast encode-prompts``): a policy that reads it
loads no text encoder and conditions on what the encoders give, for every pretrained family; the command
encodes a config's prompt files and resumes; training runs on it without encoding; every way a cache can be
wrong for its run is refused with the fix, before the model loads."""

import json

import numpy as np
import pytest
import tiny_models as tiny
import torch
from PIL import Image

from densegrpo_fast.cli import main
from densegrpo_fast.config import TrainConfig, load_config
from densegrpo_fast.policies import adapter_class
from densegrpo_fast.prompt_cache import INDEX, PromptCache, encode_config
from densegrpo_fast.prompts import EditPrompt

OPTS = dict(resolution=tiny.RESOLUTION, max_sequence_length=tiny.MAX_T5_TOKENS)
#: Prompts of unlike token counts (the padded families' rows are trimmed and padded again).
TEXTS = ["a red circle", "two blue squares beside a green triangle under a yellow sky", "a dog"]
PIPELINES = {
    "sd3": tiny.sd3_pipeline, "flux": tiny.flux_pipeline, "qwen_image": tiny.qwen_image_pipeline,
    "z_image": tiny.z_image_pipeline, "flux2_klein": tiny.flux2_klein_pipeline,
    "flux_kontext": tiny.flux_kontext_pipeline,
}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each family's tiny pipeline saved in diffusers format, built on first use."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = tmp_path_factory.mktemp(family)
            PIPELINES[family](seed=0).save_pretrained(made[family])
        return made[family]

    return get


def _write_cache(policy, root, texts):
    """``texts`` encoded by ``policy``'s text encoders into a new cache at ``root``, in two shards."""
    cache = PromptCache(root, policy.prompt_cache_identity(), padded=not policy.pads_prompts, create=True)
    half = len(texts) // 2
    for part in (texts[:half], texts[half:]):
        cache.add(part, *policy._encode(part))
    return cache


@pytest.mark.parametrize("family", ["sd3", "flux", "qwen_image", "z_image", "flux2_klein"])
def test_a_cached_policy_loads_no_text_encoder_and_conditions_as_the_encoders_do(
    family, checkpoints, tmp_path
):
    cls = adapter_class(family)
    # (the families that pad to the batch's longest prompt: room for the prompts' own lengths)
    opts = OPTS if cls.pads_prompts else {**OPTS, "max_sequence_length": 256}
    direct = cls.load(checkpoints(family), dtype="fp32", **opts)
    _write_cache(direct, tmp_path / "cache", [*TEXTS, direct.negative_prompt])
    cached = cls.load(checkpoints(family), dtype="fp32", prompt_cache=tmp_path / "cache", **opts)
    assert cached.text_encoders() == [] and direct.text_encoders() != []
    assert all(
        getattr(cached.pipe, k) is None for k in cached.components if k.startswith(("text_enc", "tokenizer"))
    )
    batch = [TEXTS[1], TEXTS[0], TEXTS[1], TEXTS[2]]  # (a repeat: one table row)
    want, got = direct.encode_prompts(batch), cached.encode_prompts(batch)
    assert want.has_negative == got.has_negative
    for field in want.FIELDS:
        a, b = getattr(want, field), getattr(got, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype, field
            # (SD3's negative: encoded alone here, beside the prompts in the cache; CPU rounding)
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    if not cls.pads_prompts:  # rows of unlike lengths came back padded to the batch's longest
        lengths = want.pooled.sum(1)
        assert len(set(lengths.tolist())) > 1 and want.embeds.shape[1] == int(lengths.max())
    # the velocity follows: the same conditioning, the same model
    x = torch.randn(len(batch), *direct.latent_shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((len(batch),), 0.6)
    torch.testing.assert_close(cached.velocity(x, sigma, got, 4.0), direct.velocity(x, sigma, want, 4.0))


def test_an_editing_family_reads_its_instructions_from_the_cache_and_encodes_its_sources(
    checkpoints, tmp_path
):
    rng = np.random.default_rng(0)
    for name in ("s0.png", "s1.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / name)
    cls = adapter_class("flux_kontext")
    direct = cls.load(checkpoints("flux_kontext"), dtype="fp32", **OPTS)
    _write_cache(direct, tmp_path / "cache", ["make it red", "add a blue square", direct.negative_prompt])
    cached = cls.load(checkpoints("flux_kontext"), dtype="fp32", prompt_cache=tmp_path / "cache", **OPTS)
    batch = [EditPrompt("make it red", str(tmp_path / "s0.png")), EditPrompt("make it red", str(tmp_path / "s1.png")),
             EditPrompt("add a blue square", str(tmp_path / "s0.png"))]  # fmt: skip
    want, got = direct.encode_prompts(batch), cached.encode_prompts(batch)
    for field in ("embeds", "pooled", "reference"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=0, atol=0)
    assert not torch.equal(got.reference[0], got.reference[1])  # (two sources: the cache keys text alone)


def _config(checkpoint, tmp_path, *extra):
    prompts = tmp_path / "prompts.txt"
    if not prompts.exists():
        prompts.write_text("a red circle\ntwo blue squares\n")
    heldout = tmp_path / "heldout.txt"
    if not heldout.exists():
        heldout.write_text("a green dog\na red circle\n")
    return load_config(TrainConfig, None, [
        "model.family=sd3", f"model.checkpoint={checkpoint}", f"model.resolution={tiny.RESOLUTION}",
        f"model.max_sequence_length={tiny.MAX_T5_TOKENS}", f"model.prompt_cache={tmp_path / 'cache'}",
        f"prompts.dataset={prompts}", "prompts.prompts_per_iteration=2", "sampling.num_steps=3",
        "sampling.group_size=2", "sampling.shift=null", "noise.kind=uniform", "reward.name=redness", "lora.rank=4",
        "grpo.train_batch_size=4", f"eval.dataset={heldout}", "eval.num_prompts=2", "eval.num_steps=2",
        "run.iterations=1", "ema.every=1", f"run.output_dir={tmp_path / 'run'}", "run.tensorboard=false",
        "model.num_threads=1",
        *extra,
    ])  # fmt: skip


def test_encode_prompts_writes_the_configs_prompts_then_only_what_is_new(checkpoints, tmp_path, capsys):
    cfg = _config(checkpoints("sd3"), tmp_path)
    cache, new = encode_config(cfg, batch_size=2, shard_prompts=2, progress=False)
    # three distinct prompts over the two files, and SD3's negative (the empty prompt)
    assert new == 4 and len(cache) == 4 and sorted(p.name for p in cache.root.glob("shard_*")) == [
        "shard_00000.safetensors", "shard_00001.safetensors",
    ]  # fmt: skip
    assert cache.missing(["a red circle", "two blue squares", "a green dog", ""]) == []
    (tmp_path / "prompts.txt").write_text("a red circle\ntwo blue squares\na cat on a mat\n")
    (tmp_path / "config.yaml").write_text("model:\n  family: sd3\n")
    args = ["encode-prompts", "--config", str(tmp_path / "config.yaml"), "--no-progress", *_overrides(cfg)]
    assert main(args) == 0
    assert "1 prompt(s) encoded, 5 in the prompt cache" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 prompt(s) encoded, 5 in the prompt cache" in capsys.readouterr().out


def _overrides(cfg) -> list[str]:
    m = cfg.model
    return [f"model.family={m.family}", f"model.checkpoint={m.checkpoint}", f"model.resolution={m.resolution}",
            f"model.max_sequence_length={m.max_sequence_length}", f"model.prompt_cache={m.prompt_cache}",
            f"prompts.dataset={cfg.prompts.dataset}", f"eval.dataset={cfg.eval.dataset}"]  # fmt: skip


def test_training_on_a_cache_never_encodes(checkpoints, tmp_path, monkeypatch):
    from densegrpo_fast.policies.sd3 import SD3Policy
    from densegrpo_fast.trainer import train

    cfg = _config(checkpoints("sd3"), tmp_path)
    encode_config(cfg, progress=False)

    def refuse(self, texts):
        raise AssertionError(f"encoded {texts} with a prompt cache")

    monkeypatch.setattr(SD3Policy, "_encode", refuse)
    run_dir = train(cfg, progress=False)
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("reward_mean" in r for r in recs) and any(k.startswith("eval") for r in recs for k in r)


def test_a_cache_that_does_not_fit_its_run_is_refused_before_the_model_loads(
    checkpoints, tmp_path, monkeypatch
):
    from densegrpo_fast import trainer

    checkpoint = checkpoints("sd3")
    cfg = _config(checkpoint, tmp_path)

    def no_load(*a, **k):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(trainer, "load_policy", no_load)
    with pytest.raises(
        ValueError, match=r"holds no prompt cache .*index.json is missing.*densegrpo-fast encode-prompts"
    ):
        trainer.train(cfg, progress=False)
    with pytest.raises(ValueError, match=r"holds no prompt cache"):
        trainer.run_calibration(cfg)
    monkeypatch.undo()
    encode_config(cfg, progress=False)
    (tmp_path / "heldout.txt").write_text("a green dog\na purple cow\n")
    with pytest.raises(ValueError, match=r"1 prompt\(s\) of eval.dataset are not in the prompt cache .*'a purple "
                                         r"cow'.*encode-prompts --config <this config>` again"):  # fmt: skip
        trainer.train(cfg, progress=False)
    from densegrpo_fast.evaluate import run_eval

    ev = [*_overrides(cfg)[:5], f"eval.dataset={cfg.eval.dataset}", "eval.rewards={red: {name: redness}}",
          f"eval.output_dir={tmp_path / 'ev'}"]  # fmt: skip
    with pytest.raises(ValueError, match=r"1 prompt\(s\) of eval.dataset are not in the prompt cache"):
        run_eval(None, ev)
    # written by other settings or encoders: refused on load, naming what differs
    sd3 = adapter_class("sd3")
    with pytest.raises(
        ValueError, match=r"max_sequence_length \(24 in the cache, 16 here\).*encode into a new directory"
    ):
        sd3.load(checkpoint, dtype="fp32", prompt_cache=tmp_path / "cache", resolution=tiny.RESOLUTION,
                 max_sequence_length=16)  # fmt: skip
    with pytest.raises(ValueError, match=r"dtype \('torch.float32' in the cache, 'torch.bfloat16' here\)"):
        sd3.load(checkpoint, dtype="bf16", prompt_cache=tmp_path / "cache", **OPTS)
    other = tmp_path / "other"
    tiny.sd3_pipeline(seed=1).save_pretrained(other)  # another T5, CLIPs: the same configs, other weights
    with pytest.raises(ValueError, match=r"the text encoders' files \(\d+ differ, e\.g\. text_encoder"):
        sd3.load(other, dtype="fp32", prompt_cache=tmp_path / "cache", **OPTS)
    assert (
        sd3.load(checkpoint, dtype="fp32", prompt_cache=tmp_path / "cache", **OPTS).prompt_cache is not None
    )
    (tmp_path / "cache" / INDEX).write_text("{not json")
    with pytest.raises(ValueError, match=r"is not a prompt cache this version reads"):
        sd3.load(checkpoint, dtype="fp32", prompt_cache=tmp_path / "cache", **OPTS)


def test_the_toy_takes_no_prompt_cache(tmp_path):
    with pytest.raises(ValueError, match=r"model.prompt_cache .* applies to the pretrained families only"):
        load_config(TrainConfig, None, [f"model.prompt_cache={tmp_path}"])
    cfg = load_config(TrainConfig, None, [])
    with pytest.raises(
        ValueError, match=r"model.family=toy: the toy's prompt embedding is a part of its model"
    ):
        encode_config(cfg, progress=False)
    with pytest.raises(ValueError, match=r"model.prompt_cache is not set: give the directory to write"):
        encode_config(load_config(TrainConfig, None, ["model.family=sd3"]), progress=False)
