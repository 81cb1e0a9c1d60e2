"""``densegrpo-fast validate --load-rewards``: every reward of a config built for real and scored once."""

import pytest
import torch

from densegrpo_fast.cli import main
from densegrpo_fast.rewards import build_reward
from densegrpo_fast.rewards.preflight import probe_image

RECIPE = "configs/sd35m_pickscore.yaml"


def test_the_toy_config_loads_its_rewards(capsys):
    assert main(["validate", "--config", "configs/toy_geneval.yaml", "--load-rewards"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("configs/toy_geneval.yaml: valid")
    assert out[1].startswith("reward 'toy_geneval': built in ") and "one 32 px image scored in" in out[1]
    assert out[2].startswith("eval.rewards.strict 'toy_geneval': built in ")


def test_every_failure_is_reported_with_its_fix_and_the_command_fails(tmp_path, capsys):
    """A missing checkpoint and a server that does not answer, both named; the reward that loads still
    reports its score; the exit status says the run would not start."""
    missing = tmp_path / "nowhere"
    rewards = (
        f"eval.rewards={{pick: {{name: pickscore, kwargs: {{model: {missing}, processor: {missing}}}}}, "
        "srv: {name: remote, kwargs: {url: 'http://127.0.0.1:9', retries: 0, timeout_s: 2}}}"
    )
    code = main(["validate", "--config", RECIPE, "--load-rewards", "reward.name=redness", "reward.kwargs={}",
                 "model.resolution=64", rewards])  # fmt: skip
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert code == 2
    (red,) = [ln for ln in lines if ln.startswith("reward 'redness'")]
    assert "one 64 px image scored in" in red
    (pick,) = [ln for ln in lines if ln.startswith("eval.rewards.pick 'pickscore'")]
    assert "FAILED" in pick and "hf download" in pick and str(missing) in pick
    (srv,) = [ln for ln in lines if ln.startswith("eval.rewards.srv 'remote'")]
    assert "FAILED" in srv and "127.0.0.1:9" in srv
    assert "2 of 3 rewards did not load or score: eval.rewards.pick, eval.rewards.srv" in captured.err


def test_the_score_printed_is_the_reward_s_own(capsys):
    """The line reports the reward's score of the probe image for the first training prompt (JPEG size: a
    weight-free reward whose value depends on the image)."""
    code = main(["validate", "--config", RECIPE, "--load-rewards", "reward.name=jpeg_compressibility",
                 "reward.kwargs={}", "eval.rewards={}", "model.resolution=48"])  # fmt: skip
    assert code == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("reward ")]
    want = float(build_reward("jpeg_compressibility")(probe_image(48), ["a prompt"])[0])
    assert line.endswith(f": {want:.4g}"), (line, want)


@pytest.mark.parametrize("size", [16, 100])
def test_the_probe_image_is_a_smooth_image_in_range(size):
    img = probe_image(size)
    assert img.shape == (1, 3, size, size) and img.min() >= 0 and img.max() <= 1
    assert (img[..., 1:, :] - img[..., :-1, :]).abs().max() < 0.5  # smooth, not noise
    assert torch.equal(img, probe_image(size))  # the same image every time
