"""Every shipped config validates and opens with its launch command and prerequisites."""

from pathlib import Path

import pytest

from densegrpo_fast.config import TrainConfig, load_config
from densegrpo_fast.toy.config import ToyPretrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


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
