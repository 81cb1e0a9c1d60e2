"""Every shipped config validates and opens with its launch command and prerequisites."""

import re
from pathlib import Path

import pytest
import torch

from densegrpo_fast.config import ConfigError, TrainConfig, load_config
from densegrpo_fast.toy.config import ToyEvalConfig, ToyPretrainConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_the_recipes_are_there():
    names = {p.stem for p in CONFIGS}
    assert {
        "toy_geneval",
        "toy_pretrain",
        "sd35m_geneval",
        "sd35m_ocr",
        "sd35m_pickscore",
        "flux_pickscore",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates_and_opens_with_its_launch_command(path):
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# densegrpo-fast "), "the first line is the launch command"
    schema = ToyPretrainConfig if path.stem == "toy_pretrain" else TrainConfig
    cfg = load_config(schema, path, [])
    if schema is TrainConfig and cfg.model.family != "toy":
        text = "\n".join(lines[:20])
        assert "Prerequisites" in text and "hf download" in text
        assert cfg.model.dtype == "bf16" and cfg.model.device == "cuda"
        assert cfg.eval.num_steps >= 28 and cfg.eval.rewards, "real-model recipes evaluate by the papers' ODE"


@pytest.mark.parametrize(
    "stem,beta", [("sd35m_geneval", 0.04), ("sd35m_ocr", 0.04), ("sd35m_pickscore", 0.01)]
)
def test_sd35m_recipes_follow_the_paper(stem, beta):
    cfg = load_config(TrainConfig, Path(CONFIGS[0].parent / f"{stem}.yaml"), [])
    assert (cfg.sampling.num_steps, cfg.sampling.group_size, cfg.prompts.prompts_per_iteration) == (
        10,
        24,
        48,
    )
    assert (cfg.model.resolution, cfg.sampling.guidance_scale, cfg.sampling.shift) == (512, 4.5, 3.0)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.optim.lr, cfg.grpo.beta) == (32, 64, 3e-4, beta)
    assert (cfg.eval.num_steps, cfg.eval.guidance_scale) == (40, 4.5)
    assert cfg.dense.mode == "dense" and cfg.noise.kind == "calibrated"


def _as_one_line(text: str) -> str:
    """Commands as a shell reads them: comment markers, line continuations and line breaks made spaces."""
    text = " ".join(line.lstrip().removeprefix("#").strip() for line in text.splitlines())
    return " ".join(text.replace(" \\ ", " ").split())


def test_download_hints_give_each_pattern_its_own_include():
    """``hf download REPO --include A B`` takes B for a file name and then ignores ``--include``: every hint in
    the README, the recipes and the code names one pattern per flag, and the recipes' model hints are the
    engine's own (the pipeline's folders only)."""
    from densegrpo_fast.policies import flux, flux2_klein, flux_kontext, sd3, z_image
    from densegrpo_fast.policies.flux_kontext import FluxKontextPolicy
    from densegrpo_fast.policies.pretrained import download_command

    texts = {p: _as_one_line(p.read_text()) for p in [ROOT / "README.md", *CONFIGS]}
    texts |= {p: p.read_text() for p in sorted((ROOT / "densegrpo_fast").rglob("*.py"))}
    for path, text in texts.items():
        bad = re.findall(r"--include\s+'[^']*'\s+'[^']*'", text)
        assert not bad, f"{path.name}: {bad}"
    assert download_command(sd3.DEFAULT_REPO, sd3.COMPONENTS) in texts[ROOT / "README.md"]
    flux_recipe = texts[ROOT / "configs" / "flux_pickscore.yaml"]
    assert download_command(flux.DEFAULT_REPO, flux.COMPONENTS) in flux_recipe
    kontext_recipe = texts[ROOT / "configs" / "flux_kontext_vlm_judge.yaml"]
    assert download_command(FluxKontextPolicy.default_repo, flux_kontext.COMPONENTS) in kontext_recipe
    z_recipe = texts[ROOT / "configs" / "z_image_pickscore.yaml"]
    assert download_command(z_image.DEFAULT_REPO, z_image.COMPONENTS) in z_recipe
    klein_recipe = texts[ROOT / "configs" / "flux2_klein_pickscore.yaml"]
    assert download_command(flux2_klein.DEFAULT_REPO, flux2_klein.COMPONENTS) in klein_recipe
    from densegrpo_fast.policies import qwen_image_edit
    from densegrpo_fast.policies.qwen_image_edit import QwenImageEditPolicy

    edit_recipe = texts[ROOT / "configs" / "qwen_image_edit_vlm_judge.yaml"]
    assert download_command(QwenImageEditPolicy.default_repo, qwen_image_edit.COMPONENTS) in edit_recipe
    from densegrpo_fast.policies import wan

    wan_recipe = texts[ROOT / "configs" / "wan21_pickscore.yaml"]
    assert download_command(wan.DEFAULT_REPO, wan.COMPONENTS) in wan_recipe
    two = wan.WanPolicy.checkpoint_components({"boundary_ratio": 0.875, "transformer_2": ["diffusers", "x"]})
    a14b_recipe = texts[ROOT / "configs" / "wan22_a14b_pickscore.yaml"]
    assert download_command("Wan-AI/Wan2.2-T2V-A14B-Diffusers", two) in a14b_recipe


TOY = ROOT / "configs" / "toy_geneval.yaml"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sampling=3", "sampling.num_steps=4"], "sampling was set to 3 by an earlier override"),
        (
            ["sampling.num_steps=[1"],
            r"override 'sampling.num_steps=\[1': the value is not valid YAML: expected",
        ),
        (["model.device=gpu"], "model.device='gpu' is not a torch device"),
        (["run.seed=-1"], r"run.seed = -1: Input should be greater than or equal to 0"),
        (["eval.seed=8388608"], r"eval.seed = 8388608: Input should be less than or equal to 8388607"),
        (
            ["grpo.trained_steps=[5, 6]"],
            r"grpo.trained_steps \[5, 6\] has no step of the SDE window \[0, 1, 2\]",
        ),
        (["grpo.trained_steps=[]"], "grpo.trained_steps is empty"),
        (["eval.shift=null"], "eval.shift is null .*the toy model has no scheduler"),
        (["eval.rewards.strict.nam=toy_geneval"], "did you mean 'eval.rewards.strict.name'"),
        (["optim.betas=[0.9]"], r"optim.betas = \[0.9\]: too few values \(the one at index 1 is missing\)"),
        (
            ["noise.calibration.path=None"],
            "YAML reads None as the text 'None'; write noise.calibration.path=null",
        ),
        (
            ["prompts.dataset=toy:val"],
            r"prompts.dataset = 'toy:val': the toy splits are toy:train and toy:test",
        ),
        (
            ["reward.name=geneval", "reward.kwargs={url: 8085}"],
            r"reward.kwargs.url=8085: 8085 is not an http\(s\) URL",
        ),
    ],
)
def test_bad_training_configs_are_named_not_tracebacks(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TrainConfig, TOY, overrides)


@pytest.mark.parametrize("value", ["8", "[48, 32, 16]", "[48]", "48x32", "true", "512.0", "[48, 8]", "null"])
def test_an_image_size_that_is_not_one_is_refused_in_one_line(value):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, ["model.family=sd3", f"model.resolution={value}"])
    assert "1 problem(s)" in str(e.value) and "is not an image size: give one side in pixels" in str(e.value)


def test_a_square_pair_is_its_side():
    """``[512, 512]`` and ``512`` are one setting: a resume and a torchrun job's ranks compare the dumped
    configs, which then agree."""
    cfg = load_config(
        TrainConfig, None, ["model.family=sd3", "model.resolution=[512, 512]", "eval.resolution=[64, 48]"]
    )
    assert (cfg.model.resolution, cfg.eval.resolution) == (512, (64, 48))
    assert load_config(TrainConfig, None, ["model.resolution=[512, 512]"]).model.resolution == 512  # (toy)


def test_config_files_refuse_yaml_errors_and_keys_given_twice(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("sampling:\n  num_steps: 4\nrun:\n  seed: 1\nsampling:\n  group_size: 4\n")
    with pytest.raises(
        ConfigError, match=r"twice.yaml is not valid YAML: key 'sampling' appears twice \(line 5"
    ):
        load_config(TrainConfig, twice)
    broken = tmp_path / "broken.yaml"
    broken.write_text("sampling:\n  num_steps: [4\n")
    with pytest.raises(ConfigError, match=r"broken.yaml is not valid YAML: .*\(line \d+, column \d+\)"):
        load_config(TrainConfig, broken)
    nested = tmp_path / "nested.yaml"  # the same key in two different mappings is fine
    nested.write_text("sampling:\n  num_steps: 4\neval:\n  num_steps: 4\n")
    assert load_config(TrainConfig, nested).eval.num_steps == 4


def test_the_eval_command_refuses_unknown_sections_and_what_train_refuses():
    with pytest.raises(ConfigError, match="evl: unknown section; did you mean 'eval'"):
        load_config(ToyEvalConfig, TOY, ["evl.num_steps=40"])
    with pytest.raises(ConfigError, match="eval.images_per_prompt"):
        load_config(ToyEvalConfig, TOY, ["eval.images_per_prompt=4"])
    flux = ROOT / "configs" / "flux_pickscore.yaml"
    with pytest.raises(ConfigError, match=r"eval.shift \(3.0\) with model.family flux"):
        load_config(ToyEvalConfig, flux, ["eval.shift=3.0"])
    load_config(ToyEvalConfig, TOY)  # a training config's other sections are fine
    with pytest.raises(ConfigError, match=r"eval.rewards.x.name='nope' is not a registered reward"):
        load_config(ToyEvalConfig, TOY, ["eval.rewards={x: {name: nope}}"])


def test_the_pretraining_config_refuses_what_its_quick_evaluations_would_and_is_named_elsewhere():
    from densegrpo_fast.toy.config import ToyPretrainConfig

    pretrain = ROOT / "configs" / "toy_pretrain.yaml"
    with pytest.raises(ConfigError) as e:  # (each would fail at the first quick evaluation, hours in)
        load_config(ToyPretrainConfig, pretrain, ["eval.shift=null", "eval.rewards={x: {name: nope}}"])
    assert "eval.shift is null" in str(e.value) and "eval.rewards.x.name='nope'" in str(e.value)
    with pytest.raises(
        ConfigError, match=r"arch: unknown key; 'arch' is a section of the toy pretraining's config"
    ):
        load_config(TrainConfig, pretrain)


@pytest.mark.parametrize("command", [TrainConfig, ToyEvalConfig])
def test_samplers_left_out_follow_the_model_family(command, tmp_path):
    """A config without its eval section samples SD3.5 / FLUX.1 as their papers and pipelines do, not with
    the toy's 20 steps at CFG 1.5 and shift 1.0; what a config gives is kept."""
    sampler = ("num_steps", "guidance_scale", "shift", "batch_size", "num_prompts", "output_dir")
    for family, want in [
        ("toy", (20, 1.5, 1.0, 128, 256, "runs/toy_eval")),
        ("sd3", (40, 4.5, 3.0, 16, None, "runs/sd3_eval")),
        ("flux", (28, 3.5, None, 8, None, "runs/flux_eval")),
    ]:
        cfg = load_config(command, None, [f"model.family={family}"])
        assert tuple(getattr(cfg.eval, k) for k in sampler) == want, family
    if command is TrainConfig:
        toy, flux = (load_config(command, None, [f"model.family={f}"]).sampling for f in ("toy", "flux"))
        assert (toy.shift, toy.guidance_scale, flux.shift, flux.guidance_scale) == (3.0, 4.5, None, 3.5)
    if command is TrainConfig:  # filled values stay "not set": validated again with another family, refilled
        cfg = load_config(command, None, ["model.family=sd3"])
        cfg.model = {"family": "flux"}
        assert (cfg.eval.num_steps, cfg.eval.shift, cfg.sampling.shift) == (28, None, None)
        cfg.model = {"family": "toy"}
        assert (cfg.eval.num_steps, cfg.eval.shift, cfg.sampling.guidance_scale) == (20, 1.0, 4.5)
    given = tmp_path / "given.yaml"
    given.write_text("model: {family: sd3}\neval: {num_steps: 7, shift: null}\n")
    cfg = load_config(command, given, ["eval.guidance_scale=2.0"])
    assert (cfg.eval.num_steps, cfg.eval.shift, cfg.eval.guidance_scale, cfg.eval.batch_size) == (
        7,
        None,
        2.0,
        16,
    )


def test_output_dir_on_the_command_line_is_taken_as_written(tmp_path):
    from densegrpo_fast.cli import _train_config, build_parser

    for name in ("exp #2", "2024", "yes", "~"):
        args = build_parser().parse_args(
            ["train", "--config", str(TOY), "--output-dir", str(tmp_path / name)]
        )
        assert _train_config(args).run.output_dir == str(tmp_path / name)


def test_prompt_files_name_their_setting_and_drop_a_bom(tmp_path):
    from densegrpo_fast.prompts import PromptSource

    with pytest.raises(ValueError, match=r"eval.dataset='/missing.txt' is neither"):
        PromptSource("/missing.txt", 0, "eval.dataset")
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffa cat\na dog\n".encode())
    assert PromptSource(str(bom)).heldout(None) == ["a cat", "a dog"]


def test_a_device_this_machine_lacks_is_named_before_any_model_work(tmp_path):
    import torch

    from densegrpo_fast.distributed import check_device

    check_device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"model.device='cuda', but this torch .* sees no CUDA device"):
            check_device("cuda")


def test_validate_notes_prompt_files_and_weights_it_cannot_read(capsys, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from densegrpo_fast.cli import main

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # (an empty cache)
    assert main(["validate", "--config", str(ROOT / "configs" / "sd35m_pickscore.yaml")]) == 0
    said = capsys.readouterr()
    assert (
        "note: not on this machine, and `train` needs it: model.checkpoint='stabilityai/stable-diffusion-3.5-"
        "medium' is not in the Hugging Face cache" in said.err
    )
    assert "valid (1152 rows per iteration" in said.out
    assert (
        "note: not readable on this machine, and `train` needs it: prompts.dataset='data/pickscore/train.txt'"
        in said.err  # (notes go to stderr: stdout stays the report scripts read)
    )
    assert main(["validate", "--config", str(TOY)]) == 0
    assert "note:" not in capsys.readouterr().err


def test_settings_a_run_does_not_use_are_noted_and_warned_when_given_on_the_command_line(tmp_path, capsys):
    from densegrpo_fast.cli import main
    from densegrpo_fast.config import ignored_line, override_keys

    over = ["lora.enabled=false", "dense.mode=sparse", "dense.completion_steps=2", "noise.window_every=3",
            "noise.kind=uniform"]  # fmt: skip
    cfg = load_config(TrainConfig, TOY, over)
    lines = [ignored_line(k, w) for k, w in cfg.ignored_settings()]
    assert lines == [
        "lora.rank, lora.alpha, lora.target_modules, lora.merge_for_sampling are ignored: lora.enabled=false "
        "trains the full model",  # (the file's own LoRA settings)
        "dense.completion_steps is ignored: dense.mode=sparse scores the final image only (psi's calibration "
        "completes each latent over all its remaining steps, whatever n)",
        "noise.calibration.iterations is ignored: noise.kind=uniform does not calibrate",  # (the file's)
        "noise.window_every is ignored: noise.window_move=fixed never moves",
    ]
    # calibrated noise samples with completions, sparse or not: then their batching is used, but never their n
    # (calibration completes every latent to the end)
    calibrated = load_config(TrainConfig, TOY, ["dense.mode=sparse", "dense.completion_batching=separate"])
    assert [keys for keys, _ in calibrated.ignored_settings()] == [["dense.completion_steps"]]  # (the file's)
    assert load_config(TrainConfig, TOY).ignored_settings() == []
    edit = load_config(
        TrainConfig, ROOT / "configs" / "qwen_image_edit_vlm_judge.yaml", ["model.max_sequence_length=300"]
    )
    assert [keys for keys, _ in edit.ignored_settings()] == [["model.max_sequence_length"]]
    assert override_keys(["lora={enabled: false, rank: 8}", "a.b=1"]) == {
        "lora",
        "lora.enabled",
        "lora.rank",
        "a",
        "a.b",
    }
    assert main(["validate", "--config", str(TOY), *over]) == 0
    assert "note: dense.completion_steps is ignored" in capsys.readouterr().err
    # train warns of the command line's own (not of the file's LoRA settings), then trains (here: refused later)
    with pytest.warns(UserWarning) as seen:
        code = main(
            [
                "train",
                "--config",
                str(TOY),
                "--output-dir",
                str(tmp_path / "run"),
                *over,
                "prompts.dataset=/none.txt",
            ]
        )
    assert code == 2 and "prompts.dataset='/none.txt'" in capsys.readouterr().err
    said = [str(w.message) for w in seen]
    assert any(
        m.startswith("dense.completion_steps is ignored: dense.mode=sparse scores the final image only")
        for m in said
    )
    assert not any("lora.rank" in m for m in said)


def test_fp16_training_is_refused_fp16_evaluation_is_not():
    """Without loss scaling the update's gradients underflow in fp16 (about 1e-9 per latent element)."""
    with pytest.raises(
        ConfigError, match="model.dtype=fp16 trains without loss scaling.*use model.dtype=bf16"
    ):
        load_config(TrainConfig, None, ["model.family=sd3", "model.dtype=fp16"])
    assert load_config(ToyEvalConfig, None, ["model.family=sd3", "model.dtype=fp16"]).model.dtype == "fp16"
    assert torch.tensor(1e-8, dtype=torch.float16).item() == 0.0  # (what the message is about)


def test_a_window_on_the_untrained_last_step_alone_is_refused():
    with pytest.raises(
        ConfigError, match=r"the window holds only steps that grpo.trained_steps null.*train nothing"
    ):
        load_config(TrainConfig, TOY, ["noise.window_start=9", "noise.window_size=1"])
    load_config(TrainConfig, TOY, ["noise.window_start=9", "noise.window_size=1", "grpo.trained_steps=[9]"])
    load_config(TrainConfig, TOY, ["noise.window_start=8", "noise.window_size=2"])


def test_a_noise_level_of_0_is_refused():
    for kind in ("uniform", "calibrated"):
        with pytest.raises(
            ConfigError, match=r"noise.level is 0: uniform noise would be none.*give a level above 0"
        ):
            load_config(TrainConfig, TOY, [f"noise.kind={kind}", "noise.level=0"])
    load_config(TrainConfig, TOY, ["noise.level=0.05"])


def test_overrides_on_both_sides_of_an_option_all_count(capsys):
    """`--config C a=1 --output-dir D --no-progress b=2 a=3`: argparse alone leaves `b=2 a=3` over as
    unrecognized arguments; they join the overrides in order (the later value of a key wins)."""
    import yaml

    from densegrpo_fast.cli import build_parser, main, parse_args

    argv = ["train", "--config", str(TOY), "run.iterations=7", "--output-dir", "D", "--no-progress",
            "run.seed=3", "run.iterations=9"]  # fmt: skip
    args = parse_args(build_parser(), argv)
    assert args.overrides == ["run.iterations=7", "run.seed=3", "run.iterations=9"]
    assert (args.output_dir, args.no_progress) == ("D", True)
    main(["show-config", "--config", str(TOY), "run.iterations=7", "--config", str(TOY), "run.seed=3"])
    shown = yaml.safe_load(capsys.readouterr().out)
    assert (shown["run"]["iterations"], shown["run"]["seed"]) == (7, 3)
    for extra in ("--no-such-flag", "stray"):  # anything else left over is still refused
        with pytest.raises(SystemExit) as e:
            main(["train", "--config", str(TOY), "run.iterations=7", "--no-progress", extra])
        assert e.value.code == 2 and f"unrecognized arguments: {extra}" in capsys.readouterr().err


def test_the_command_line_refuses_a_port_or_an_iteration_count_out_of_range(capsys):
    from densegrpo_fast.cli import main

    for argv, message in [
        (
            ["serve-reward", "--reward", "redness", "--port", "99999"],
            "'99999' is not a port: ports run from 0",
        ),
        (
            ["train", "--config", str(TOY), "--max-iterations", "0"],
            "--max-iterations: '0' must be at least 1",
        ),
    ]:
        with pytest.raises(SystemExit) as e:  # (argparse's usage error, before any reward or model is built)
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_errors_name_where_the_value_came_from(tmp_path):
    with pytest.raises(
        ConfigError, match=r"1 problem\(s\) in .*toy_geneval.yaml with its command-line overrides"
    ):
        load_config(TrainConfig, TOY, ["sampling.group_size=-4"])
    with pytest.raises(
        ConfigError, match=rf"config file '{tmp_path}' is a directory: pass an existing YAML file"
    ):
        load_config(TrainConfig, tmp_path)
