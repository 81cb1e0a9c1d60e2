"""``densegrpo-fast validate --load-rewards``: every reward of a config built for real and scored."""

import pytest
import torch

from densegrpo_fast.cli import main
from densegrpo_fast.rewards import _REGISTRY, build_reward, register
from densegrpo_fast.rewards.preflight import STAND_IN, probe_images

RECIPE = "configs/sd35m_pickscore.yaml"
CPU = ["--device", "cpu"]  # (the recipes name model.device=cuda)


@pytest.fixture
def registered():
    """Registers test rewards for one test and takes them out again."""
    names = []

    def add(name, fn):
        register(name)(fn)
        names.append(name)

    yield add
    for n in names:
        _REGISTRY.pop(n)


def _lines(capsys):
    captured = capsys.readouterr()
    return [ln for ln in captured.out.splitlines() if not ln.startswith("checking ")], captured.err


def test_the_toy_config_loads_its_rewards(capsys):
    """Its three eval entries: one with a model of its own, one equal to the training reward (scored by it)."""
    assert main(["validate", "--config", "configs/toy_geneval.yaml", "--load-rewards"]) == 0
    out, _ = _lines(capsys)
    assert out[0].startswith("configs/toy_geneval.yaml: valid")
    assert out[1].startswith("reward 'toy_geneval': built in ") and "two 32 px images scored in" in out[1]
    assert out[2].startswith("eval.rewards.strict 'toy_geneval': built in ")
    assert out[3] == "eval.rewards.exact 'toy_geneval': scored by the training reward's model"
    assert len(out) == 4 and "stand-in" not in "".join(out)  # the toy's prompts are its own


def test_every_failure_is_reported_with_its_fix_and_the_command_fails(tmp_path, capsys):
    """A missing checkpoint and a server that does not answer, both named; the reward that loads still
    reports its scores; the exit status says the run would not start."""
    missing = tmp_path / "nowhere"
    rewards = (
        f"eval.rewards={{pick: {{name: pickscore, kwargs: {{model: {missing}, processor: {missing}}}}}, "
        "srv: {name: remote, kwargs: {url: 'http://127.0.0.1:9', retries: 0, timeout_s: 2}}}"
    )
    code = main(["validate", "--config", RECIPE, "--load-rewards", *CPU, "reward.name=redness",
                 "reward.kwargs={}", "model.resolution=64", rewards])  # fmt: skip
    lines, err = _lines(capsys)
    assert code == 2
    (red,) = [ln for ln in lines if ln.startswith("reward 'redness'")]
    assert "two 64 px images scored in" in red
    (pick,) = [ln for ln in lines if ln.startswith("eval.rewards.pick 'pickscore'")]
    assert "FAILED" in pick and "hf download" in pick and str(missing) in pick
    (srv,) = [ln for ln in lines if ln.startswith("eval.rewards.srv 'remote'")]
    assert "FAILED" in srv and "127.0.0.1:9" in srv
    assert "2 of 3 reward checks failed: eval.rewards.pick, eval.rewards.srv" in err


def test_the_held_out_rewards_score_images_of_eval_resolution(capsys):
    """The training reward sees model.resolution's images, the held-out ones eval.resolution's (non-square:
    the height first, as the setting gives it)."""
    code = main(["validate", "--config", RECIPE, "--load-rewards", *CPU, "reward.name=redness",
                 "reward.kwargs={}", "model.resolution=64", "eval.resolution=[96, 48]",
                 "eval.rewards={jpeg: {name: jpeg_compressibility}}"])  # fmt: skip
    lines, _ = _lines(capsys)
    assert code == 0
    (red,) = [ln for ln in lines if ln.startswith("reward 'redness'")]
    (jpeg,) = [ln for ln in lines if ln.startswith("eval.rewards.jpeg 'jpeg_compressibility'")]
    assert "two 64 px images" in red and "two images 96 px high and 48 px wide" in jpeg


def test_each_server_of_a_list_is_checked(capsys):
    urls = "['http://127.0.0.1:9', 'http://127.0.0.1:11']"
    code = main(["validate", "--config", RECIPE, "--load-rewards", *CPU, "reward.name=remote",
                 f"reward.kwargs={{url: {urls}, retries: 0, timeout_s: 2}}", "eval.rewards={}"])  # fmt: skip
    lines, err = _lines(capsys)
    assert code == 2
    assert [ln.split(":")[0] for ln in lines[1:]] == ["reward[url 0] 'remote'", "reward[url 1] 'remote'"]
    assert "127.0.0.1:11" in lines[2]


def test_the_scores_printed_are_the_reward_s_own_for_the_run_s_prompts(tmp_path, capsys, registered):
    """The training reward sees the training prompts' first draws, an eval reward the first held-out
    prompts; a prompt file missing here gets the stand-in, and the line says so."""
    seen = {}

    def echo(key):
        def reward(images, prompts):
            seen[key] = list(prompts)
            return images.mean((1, 2, 3)) + len(prompts[0])

        return reward

    registered("_echo_train", lambda: echo("train"))
    registered("_echo_eval", lambda: echo("eval"))
    train, held = tmp_path / "train.txt", tmp_path / "test.txt"
    train.write_text("only one training prompt\n")
    held.write_text("first held-out\nsecond held-out\nthird\n")
    code = main(["validate", "--config", RECIPE, "--load-rewards", *CPU, "reward.name=_echo_train",
                 "reward.kwargs={}", f"prompts.dataset={train}", f"eval.dataset={held}",
                 "eval.rewards={e: {name: _echo_eval}}", "model.resolution=48"])  # fmt: skip
    lines, _ = _lines(capsys)
    assert code == 0
    assert seen == {"train": ["only one training prompt"] * 2, "eval": ["first held-out", "second held-out"]}
    means = probe_images(48).mean((1, 2, 3))
    (line,) = [ln for ln in lines if ln.startswith("reward ")]
    assert line.endswith(", ".join(f"{float(m) + len('only one training prompt'):.4g}" for m in means))
    code = main(["validate", "--config", RECIPE, "--load-rewards", *CPU, "reward.name=_echo_train",
                 "reward.kwargs={}", f"prompts.dataset={tmp_path / 'absent.txt'}", "eval.rewards={}"])  # fmt: skip
    lines, _ = _lines(capsys)
    assert code == 0 and seen["train"] == [STAND_IN] * 2
    assert "(stand-in prompt: " in lines[1] and "absent.txt" in lines[1]


@pytest.mark.parametrize(
    "returned, match",
    [
        (lambda images: images.mean(), r"returned shape \(\) for 2 images, not \(2,\)"),
        (lambda images: torch.full((2,), float("nan")), r"returned \[nan, nan\] for 2 images"),
        (lambda images: 1 / 0, r"ZeroDivisionError: division by zero"),
    ],
)
def test_a_reward_that_does_not_return_a_finite_score_per_image_fails(returned, match, capsys, registered):
    import re

    registered("_bad", lambda: lambda images, prompts: returned(images))
    code = main(["validate", "--config", RECIPE, "--load-rewards", *CPU, "reward.name=_bad", "reward.kwargs={}",
                 "eval.rewards={}"])  # fmt: skip
    lines, _ = _lines(capsys)
    assert code == 2 and "FAILED" in lines[1] and re.search(match, lines[1]), lines[1]


def test_the_device_is_checked(capsys):
    assert main(["validate", "--config", RECIPE, "--load-rewards", "--device", "gpu"]) == 2
    assert "--device='gpu' is not a torch device" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["validate", "--config", RECIPE, "--load-rewards"]) == 2  # the recipe's model.device
        err = capsys.readouterr().err
        assert "model.device='cuda', but this torch" in err and "sees no CUDA device" in err
    assert main(["validate", "--config", RECIPE, "--device", "cpu"]) == 2
    assert "applies to --load-rewards only" in capsys.readouterr().err


@pytest.mark.parametrize("size", [16, 100, (48, 32)])
def test_the_probe_images_are_smooth_images_in_range(size):
    img = probe_images(size)
    h, w = (size, size) if isinstance(size, int) else size
    assert img.shape == (2, 3, h, w) and img.min() >= 0 and img.max() <= 1
    assert (img[..., 1:, :] - img[..., :-1, :]).abs().max() < 0.5  # smooth, not noise
    assert torch.equal(img, probe_images(size)) and not torch.equal(img[0], img[1])


def test_a_pairwise_reward_is_checked_on_a_group_and_held_out_by_its_view(capsys):
    """win_rate of redness as the training reward: its two images scored as one group (win rates 1 and 0 for
    two distinct images), and alone by its pointwise view, as the evaluation scores them; as an eval.rewards
    entry, by that view (redness itself)."""
    spec = "{reward: {name: redness}}"
    args = ["validate", "--config", "configs/toy_geneval.yaml", "--load-rewards", "reward.name=win_rate",
            f"reward.kwargs={spec}", "eval.rewards={wins: {name: win_rate, kwargs: {reward: {name: redness}, temperature: 1}}}"]  # fmt: skip
    assert main(args) == 0
    out, _ = _lines(capsys)
    (train,) = [ln for ln in out if ln.startswith("reward 'win_rate'")]
    (held,) = [ln for ln in out if ln.startswith("eval.rewards.wins 'win_rate'")]
    red = build_reward("redness")(probe_images((32, 32)), ["p", "p"]).tolist()
    wins = f"{float(red[0] > red[1]):.4g}, {float(red[1] > red[0]):.4g}"
    alone = f"{red[0]:.4g}, {red[1]:.4g}"
    assert train.endswith(f"{wins} (win rates of the two as one group; alone, as evaluated: {alone})"), train
    assert held.endswith(f"{red[0]:.4g}, {red[1]:.4g}"), (held, red)
