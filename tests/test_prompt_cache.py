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
from densegrpo_fast.prompt_cache import INDEX, PromptCache, encode_config, prompt_hash
from densegrpo_fast.prompts import EditPrompt

OPTS = dict(resolution=tiny.RESOLUTION, max_sequence_length=tiny.MAX_T5_TOKENS)
#: Prompts of unlike token counts (the padded families' rows are trimmed and padded again).
TEXTS = ["a red circle", "two blue squares beside a green triangle under a yellow sky", "a dog"]
PIPELINES = {
    "sd3": tiny.sd3_pipeline, "flux": tiny.flux_pipeline, "qwen_image": tiny.qwen_image_pipeline,
    "z_image": tiny.z_image_pipeline, "flux2_klein": tiny.flux2_klein_pipeline,
    "flux_kontext": tiny.flux_kontext_pipeline, "wan": tiny.wan_pipeline,
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
    ident, stats = policy.prompt_cache_identity()
    cache = PromptCache(root, ident, padded=not policy.pads_prompts, create=True, stats=stats)
    half = len(texts) // 2
    for part in (texts[:half], texts[half:]):
        cache.add(part, *policy._encode(part))
    return cache


@pytest.mark.parametrize(
    "family", ["sd3", "flux", "qwen_image", "z_image", "flux2_klein", "flux_kontext", "wan"]
)
def test_a_text_only_policy_reads_no_transformer_or_vae_and_encodes_as_the_whole_one(family, checkpoints):
    """What ``encode-prompts`` loads: the transformer and the VAE built on the meta device from their configs
    (no weights read), the text encoders alone on the device, and the same encodings, bit for bit."""
    cls = adapter_class(family)
    opts = OPTS if cls.pads_prompts else {**OPTS, "max_sequence_length": 256}
    whole = cls.load(checkpoints(family), dtype="fp32", **opts)
    text = cls.load(checkpoints(family), dtype="fp32", text_only=True, **opts)
    for name in ("transformer", "vae"):
        tensors = [*getattr(text.pipe, name).parameters(), *getattr(text.pipe, name).buffers()]
        assert tensors and all(t.is_meta for t in tensors), name
    assert text.text_device == torch.device("cpu") and all(
        not p.is_meta for m in text.text_encoders() for p in m.parameters()
    )
    assert text.prompt_cache_identity() == whole.prompt_cache_identity()
    with pytest.raises(ValueError, match="offload_text_encoders and prompt_cache do not combine with it"):
        cls.load(checkpoints(family), dtype="fp32", text_only=True, offload_text_encoders=True, **opts)
    for a, b in zip(whole._encode(TEXTS), text._encode(TEXTS), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["sd3", "flux", "qwen_image", "z_image", "flux2_klein", "wan"])
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


def test_a_negative_prompt_is_encoded_into_the_cache_and_asked_of_it(checkpoints, tmp_path):
    """``model.negative_prompt``: ``encode-prompts`` encodes it beside the prompts, and a run's policy reads it
    from the cache as its CFG negative (what the encoders give it); a cache without the negative a run encodes
    (another, or the family's) is refused before any model loads, naming it."""
    from densegrpo_fast.policies import load_policy
    from densegrpo_fast.prompt_cache import check_covered

    negative = "blurry, dark"
    cfg = _config(checkpoints("sd3"), tmp_path, f"model.negative_prompt={negative}")
    cache, new = encode_config(cfg, progress=False)
    assert new == 4 and cache.missing([negative]) == [] and cache.missing([""]) == [""]
    cached = load_policy("sd3", cfg.model.checkpoint, "cpu", **cfg.model.adapter_options())
    direct = load_policy(
        "sd3", cfg.model.checkpoint, "cpu", **{**cfg.model.adapter_options(), "prompt_cache": None}
    )
    assert cached.text_encoders() == [] and cached.negative_prompt == direct.negative_prompt == negative
    want, got = direct.encode_prompts(["a red circle"]), cached.encode_prompts(["a red circle"])
    torch.testing.assert_close(got.neg_embeds, want.neg_embeds, rtol=1e-6, atol=1e-6)
    plain = load_policy("sd3", cfg.model.checkpoint, "cpu", **{**cfg.model.adapter_options(), "prompt_cache": None,
                                                                "negative_prompt": None})  # fmt: skip
    assert (plain.encode_prompts(["a red circle"]).neg_embeds - want.neg_embeds).abs().max() > 1e-3
    other = _config(checkpoints("sd3"), tmp_path, "model.negative_prompt=washed out")
    with pytest.raises(
        ValueError, match=r"1 prompt\(s\) of model.negative_prompt are not in the prompt cache"
    ):
        check_covered(other, {"prompts.dataset": ["a red circle"]})
    # a run under the family's negative (the empty prompt), which this cache lacks: refused as early
    with pytest.raises(ValueError, match=r"of the family's negative prompt are not in the prompt cache .*''"):
        check_covered(_config(checkpoints("sd3"), tmp_path), {"prompts.dataset": ["a red circle"]})


def test_encode_prompts_reads_no_transformer_or_vae_weight(checkpoints, tmp_path):
    """The command's policy is text-only: a checkpoint without the transformer's and the VAE's weight files (their
    configs only, as `hf download` of the text encoders, tokenizers and those configs leaves it) encodes the same
    cache as the whole one; a whole load refuses it, naming the files."""
    import shutil

    from densegrpo_fast.policies.pretrained import download_command

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints("sd3"), broken)
    for part in ("transformer", "vae"):
        for f in (broken / part).glob("*.safetensors"):
            f.unlink()
    with pytest.raises(
        ValueError, match=r"missing transformer/<weights>.safetensors, vae/<weights>.safetensors"
    ):
        adapter_class("sd3").load(broken, dtype="fp32", **OPTS)
    assert download_command("r/m", {"transformer": "config", "vae": "config", "text_encoder": "model"}) == (
        "hf download r/m --include 'model_index.json' --include 'transformer/config.json' --include "
        "'vae/config.json' --include 'text_encoder/*'"
    )
    (tmp_path / "b").mkdir(), (tmp_path / "w").mkdir()
    got, _ = encode_config(_config(broken, tmp_path / "b"), progress=False)
    want, _ = encode_config(_config(checkpoints("sd3"), tmp_path / "w"), progress=False)
    texts = ["a red circle", "two blue squares", "a green dog", ""]
    for a, b in zip(want.get(texts, "cpu"), got.get(texts, "cpu"), strict=True):
        assert torch.equal(a, b)


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
    # resumed without the cache: its base model cannot be compared with the one the run began from (the
    # digest then covers the text encoders), which is said, rather than "another base model"
    monkeypatch.undo()
    longer = _config(checkpoints("sd3"), tmp_path, "model.prompt_cache=null", "run.iterations=2")
    with pytest.warns(UserWarning, match=r"began with its prompt embeddings from its prompt cache and resumes "
                                         r"with them from its text encoders") as caught:  # fmt: skip
        train(longer, resume=True, progress=False)
    assert not [w for w in caught if "another base model" in str(w.message)]


def test_a_padded_familys_cache_written_one_prompt_per_call(checkpoints, tmp_path):
    """Qwen-Image: ``encode-prompts`` one prompt per encoder call (each row its own length, joined, trimmed,
    padded again per batch) and its negative prompt, " ", give what the encoders give in one batch."""
    cls = adapter_class("qwen_image")
    cfg = _config(
        checkpoints("qwen_image"), tmp_path, "model.family=qwen_image", "model.max_sequence_length=256"
    )
    cache, new = encode_config(cfg, batch_size=1, shard_prompts=2, progress=False)
    assert new == 4 and cache.missing([" "]) == []  # three prompts and Qwen-Image's negative
    opts = {**OPTS, "max_sequence_length": 256}
    direct = cls.load(checkpoints("qwen_image"), dtype="fp32", **opts)
    cached = cls.load(checkpoints("qwen_image"), dtype="fp32", prompt_cache=cache.root, **opts)
    batch = ["two blue squares", "a red circle", "a green dog"]
    want, got = direct.encode_prompts(batch), cached.encode_prompts(batch)
    assert len(set(want.pooled.sum(1).tolist())) > 1  # (unlike lengths)
    for field in want.FIELDS[:4]:
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-6, atol=1e-6)


def test_the_files_are_known_by_their_content(tmp_path):
    """A hub snapshot (files linked to blobs named by their sha256) and a copy of it have one identity; a
    weight file changed in its middle, far from its header and its ends, another."""
    import hashlib
    import os

    from densegrpo_fast.prompt_cache import encoder_files

    rng = np.random.default_rng(0)
    weights = rng.integers(0, 256, 9 << 20, dtype=np.uint8).tobytes()  # 9 MiB
    config = b'{"d_model": 16}'
    snapshot, blobs, plain = (
        tmp_path / "hub" / "snapshots" / "abc",
        tmp_path / "hub" / "blobs",
        tmp_path / "plain",
    )
    for root in (snapshot, plain):
        (root / "text_encoder").mkdir(parents=True)
    blobs.mkdir()
    for name, data in (("model.safetensors", weights), ("config.json", config)):
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(blob, snapshot / "text_encoder" / name)
        (plain / "text_encoder" / name).write_bytes(data)
    hub, stats = encoder_files(snapshot)
    copy, _ = encoder_files(plain)
    assert hub == copy and stats["text_encoder/model.safetensors"][2] == hub["text_encoder/model.safetensors"]
    changed = bytearray(weights)
    changed[len(weights) // 2] ^= 1
    (plain / "text_encoder" / "model.safetensors").write_bytes(bytes(changed))
    assert encoder_files(plain)[0]["text_encoder/model.safetensors"] != hub["text_encoder/model.safetensors"]
    # a file of the size and modification time recorded is not read again
    _, seen = encoder_files(plain)
    known = {k: [*v[:2], "recorded"] for k, v in seen.items()}
    assert encoder_files(plain, known)[0]["text_encoder/model.safetensors"] == "recorded"


def test_a_new_shard_never_takes_the_name_of_one_in_use(tmp_path):
    cache = PromptCache(tmp_path / "cache", {"family": "x"}, padded=False, create=True)
    row = lambda v: (torch.full((1, 2, 3), float(v)), torch.full((1, 4), float(v)))  # noqa: E731
    cache.add(["a"], *row(1))
    cache.add(["b"], *row(2))
    cache.add(["a"], *row(3))  # (a re-added prompt: shard 0 now holds no live entry)
    (tmp_path / "cache" / "shard_00003.safetensors").write_bytes(b"left by a killed job")
    cache.add(["c"], *row(4))
    embeds, _ = cache.get(["a", "b", "c"], "cpu")
    assert embeds[:, 0, 0].tolist() == [3.0, 2.0, 4.0]
    assert cache.entries[prompt_hash("c")] == "shard_00004.safetensors"


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


def test_validate_notes_a_missing_or_unreadable_cache_and_a_missing_prompt(checkpoints, tmp_path, capsys):
    cfg = _config(checkpoints("sd3"), tmp_path)
    (tmp_path / "config.yaml").write_text("model:\n  family: sd3\n")
    args = ["validate", "--config", str(tmp_path / "config.yaml"), *_overrides(cfg)]
    assert main(args) == 0
    assert "note: `train` needs it: model.prompt_cache=" in capsys.readouterr().err  # (none written yet)
    encode_config(cfg, progress=False)
    assert main(args) == 0
    assert "prompt cache" not in capsys.readouterr().err
    (tmp_path / "heldout.txt").write_text("a green dog\na purple cow\n")
    assert main(args) == 0
    assert "1 prompt(s) of eval.dataset are not in the prompt cache" in capsys.readouterr().err
    (tmp_path / "cache" / INDEX).write_text("[]")
    assert main(args) == 0
    assert "is not a prompt cache this version reads" in capsys.readouterr().err
