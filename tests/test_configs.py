"""Every shipped config validates and opens with its launch command and prerequisites."""

import re
from pathlib import Path

import pytest

from densegrpo_fast.config import TrainConfig, load_config
from densegrpo_fast.toy.config import ToyPretrainConfig

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
    from densegrpo_fast.policies import flux, sd3
    from densegrpo_fast.policies.pretrained import download_command

    texts = {p: _as_one_line(p.read_text()) for p in [ROOT / "README.md", *CONFIGS]}
    texts |= {p: p.read_text() for p in sorted((ROOT / "densegrpo_fast").rglob("*.py"))}
    for path, text in texts.items():
        bad = re.findall(r"--include\s+'[^']*'\s+'[^']*'", text)
        assert not bad, f"{path.name}: {bad}"
    assert download_command(sd3.DEFAULT_REPO, sd3.COMPONENTS) in texts[ROOT / "README.md"]
    flux_recipe = texts[ROOT / "configs" / "flux_pickscore.yaml"]
    assert download_command(flux.DEFAULT_REPO, flux.COMPONENTS) in flux_recipe
