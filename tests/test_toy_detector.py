"""Detector reward: round trip on renders for every category, crafted failures, junk, noise and blur."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from densegrpo_fast.toy import world
from densegrpo_fast.toy.detector import ToyGenEvalReward, detect, score
from densegrpo_fast.toy.world import (
    CATEGORIES,
    COLORS,
    SHAPES,
    eval_prompts,
    make_prompt,
    prompt_split,
    render,
)

PALETTE = torch.tensor([world.BACKGROUND, *COLORS.values()])


def blank(n: int = 1) -> torch.Tensor:
    img = torch.empty(n, 3, world.IMAGE_SIZE, world.IMAGE_SIZE)
    img[:] = torch.tensor(world.BACKGROUND).view(3, 1, 1)
    return img


def draw(img: torch.Tensor, shape: str, color: str, x0: int, y0: int, side: int = 12) -> torch.Tensor:
    world._draw(img[0], shape, color, x0, y0, side)
    return img


@pytest.mark.parametrize("category", CATEGORIES)
def test_round_trip_on_renders_of_every_category(category):
    rng = np.random.default_rng(CATEGORIES.index(category))
    prompts = [p for part in ("train", "test") for p in prompt_split()[part][category]]
    prompts = [prompts[i] for i in rng.integers(0, len(prompts), 150)]
    s = score(render(prompts, rng), [p.text for p in prompts])
    assert s["strict"].mean() >= 0.99 and s["partial"].mean() >= 0.99
    assert s["exact"].mean() >= 0.99  # a render holds exactly the objects its prompt names


def test_detections_recover_shape_colour_and_position():
    img = draw(draw(blank(), "triangle", "cyan", 2, 18, 11), "circle", "purple", 19, 3, 12)
    d = detect(img)
    assert d.valid.sum() == 2
    got = sorted(
        (SHAPES[s], world.COLOR_NAMES[c], round(x), round(y))
        for s, c, x, y, v in zip(
            *(t[0].tolist() for t in (d.shape, d.color, d.cx, d.cy, d.valid)), strict=True
        )
        if v
    )
    assert got[0][:2] == ("circle", "purple") and abs(got[0][2] - 25) <= 1 and abs(got[0][3] - 9) <= 1
    assert got[1][:2] == ("triangle", "cyan") and got[1][2] < 16 and got[1][3] > 16


def _scores(img, text):
    s = score(img, [text])
    return s["strict"].item(), s["partial"].item()


def test_wrong_count_fails():
    img = draw(draw(blank(), "circle", "red", 2, 2), "circle", "blue", 18, 18)
    assert _scores(img, "two circles") == (1.0, 1.0)
    assert _scores(img, "three circles") == (0.0, 0.5)
    assert _scores(img, "four circles") == (0.0, 0.5)


def test_wrong_colour_fails():
    img = draw(blank(), "circle", "blue", 10, 10)
    assert _scores(img, "a blue circle") == (1.0, 1.0)
    assert _scores(img, "a red circle") == (0.0, 0.5)
    img2 = draw(draw(blank(), "circle", "red", 2, 2), "square", "blue", 18, 18)
    assert _scores(img2, "a red circle and a blue square") == (1.0, 1.0)
    assert _scores(img2, "a blue circle and a red square") == (0.0, 0.5)  # attributes swapped


def test_swapped_positions_fail():
    img = draw(draw(blank(), "circle", "red", 2, 10), "square", "green", 18, 10)
    assert _scores(img, "a circle left of a square")[0] == 1.0
    assert _scores(img, "a square right of a circle")[0] == 1.0
    strict, partial = _scores(img, "a square left of a circle")
    assert strict == 0.0 and partial == pytest.approx(2 / 3)
    assert _scores(img, "a circle above a square")[0] == 0.0  # side by side is not above


def test_wrong_shape_fails():
    for drawn in SHAPES:
        img = draw(blank(), drawn, "yellow", 9, 9)
        for asked in SHAPES:
            assert _scores(img, f"a {asked}")[0] == float(asked == drawn), (drawn, asked)


def test_merged_objects_do_not_count():
    # Two same-coloured squares touching side by side: one 24 x 12 blob, not two squares (nor one).
    img = draw(draw(blank(), "square", "red", 4, 10), "square", "red", 16, 10)
    assert detect(img).valid.sum() == 0
    assert _scores(img, "two squares") == (0.0, 0.0)
    # Two circles overlapping diagonally, and four squares merged into one big block.
    img = draw(draw(blank(), "circle", "blue", 4, 4), "circle", "blue", 12, 12)
    assert _scores(img, "two circles")[0] == 0.0
    big = blank()
    big[:, :, 4:28, 4:28] = torch.tensor(COLORS["green"]).view(3, 1, 1)
    assert _scores(big, "a square") == (0.0, 0.0)


def test_fragmented_objects_do_not_count():
    # A 12 px square cut by a 1 px cross of background into four 5-6 px pieces.
    img = draw(blank(), "square", "red", 10, 10)
    img[:, :, 15, :] = 0
    img[:, :, :, 15] = 0
    assert detect(img).valid.sum() == 0
    # A circle with a hole punched in it (low solidity) is not a circle.
    img = draw(blank(), "circle", "red", 10, 10)
    img[:, :, 13:19, 13:19] = 0
    assert _scores(img, "a circle") == (0.0, 0.0)


@pytest.mark.parametrize("block", [2, 4, 8])
def test_patch_grid_junk_scores_nothing(block):
    n = 300
    g = torch.Generator().manual_seed(block)
    idx = torch.randint(0, len(PALETTE), (n, 32 // block, 32 // block), generator=g)
    junk = PALETTE[idx].permute(0, 3, 1, 2).repeat_interleave(block, 2).repeat_interleave(block, 3)
    s = score(junk, [p.text for p in eval_prompts(n, 0)])
    assert s["strict"].mean() == 0.0
    assert s["partial"].mean() < 0.02
    noise = torch.rand(n, 3, 32, 32, generator=g)
    assert score(noise, [p.text for p in eval_prompts(n, 0)])["partial"].sum() == 0


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    flat = F.pad(x.reshape(-1, 1, *x.shape[2:]), (3, 3, 3, 3), mode="replicate")
    return F.conv2d(F.conv2d(flat, k.view(1, 1, 1, 7)), k.view(1, 1, 7, 1)).view_as(x)


def test_robust_to_mild_noise_and_blur():
    """The documented robustness (toy README): strict >= 0.99 up to noise std 0.1 and blur sigma 1.0."""
    rng = np.random.default_rng(5)
    ps = eval_prompts(240, 2)
    texts = [p.text for p in ps]
    gt = render(ps, rng)
    noisy = (gt + 0.1 * torch.randn(gt.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert score(noisy, texts)["strict"].mean() >= 0.99
    assert score(_blur(gt, 1.0), texts)["strict"].mean() >= 0.99


def test_exact_mode_fails_unrequested_objects():
    img = draw(draw(blank(), "circle", "red", 2, 2), "square", "blue", 18, 2)
    assert score(img, ["a circle left of a square"])["exact"].item() == 1.0
    assert score(img, ["a circle"])["exact"].item() == 0.0  # strict passes it: the square is extra
    assert score(img, ["a circle"])["strict"].item() == 1.0
    assert score(img, ["a red circle"])["exact"].item() == 0.0
    draw(img, "circle", "green", 2, 18)  # two circles and a square
    assert score(img, ["two circles"])["strict"].item() == 1.0
    assert score(img, ["two circles"])["exact"].item() == 0.0
    assert score(img, ["a circle and a square"])["exact"].item() == 0.0
    one = draw(blank(), "triangle", "cyan", 10, 10)
    assert score(one, ["a triangle"])["exact"].item() == 1.0
    assert ToyGenEvalReward("exact")(one, ["a triangle"]).tolist() == [1.0]


def test_extra_flags_more_objects_than_asked_whether_or_not_strict_passes():
    img = draw(draw(draw(blank(), "circle", "red", 2, 2), "square", "blue", 18, 2), "circle", "green", 2, 18)
    prompts = [
        "a circle",
        "two circles",
        "a circle and a square",
        "three circles",
        "four squares",
        "a triangle",
    ]
    s = score(img.expand(len(prompts), -1, -1, -1), prompts)
    assert s["extra"].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]  # 3 objects against 1, 2, 2, 3, 4, 1 asked
    assert s["strict"].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert (s["exact"] <= s["strict"] * (1 - s["extra"])).all()
    one = draw(blank(), "triangle", "cyan", 10, 10)
    assert score(one, ["a triangle"])["extra"].item() == 0.0


def test_count_exact_mode_is_exact_on_counts_only():
    img = draw(draw(draw(blank(), "circle", "red", 2, 2), "circle", "green", 2, 18), "square", "blue", 18, 2)
    s = score(img.expand(3, -1, -1, -1), ["two circles", "a circle left of a square", "a circle"])
    assert s["strict"].tolist() == [1.0, 1.0, 1.0]
    assert s["count_exact"].tolist() == [0.0, 1.0, 1.0]  # only the count is failed by the extra square
    two = draw(draw(blank(), "circle", "red", 2, 2), "circle", "green", 2, 18)
    assert ToyGenEvalReward("count_exact")(two, ["two circles"]).tolist() == [1.0]
    with pytest.raises(ValueError, match="count_exact"):
        ToyGenEvalReward("exactly")


def test_partial_exact_charges_each_surplus_object_as_an_unmet_requirement():
    img = draw(draw(draw(blank(), "circle", "red", 2, 2), "square", "blue", 18, 2), "circle", "green", 2, 18)
    prompts = ["a circle", "two circles", "three circles", "a red circle and a blue square", "a triangle"]
    s = score(img.expand(len(prompts), -1, -1, -1), prompts)
    # met / (requirements + objects beyond the asked ones): 1/(1+2), 2/(2+1), 1/(2+0), 4/(4+1), 0/(1+2)
    assert s["partial_exact"].tolist() == pytest.approx([1 / 3, 2 / 3, 1 / 2, 4 / 5, 0.0])
    assert (s["partial_exact"] <= s["partial"]).all()
    assert ((s["partial_exact"] == 1) == (s["exact"] == 1)).all()
    one = draw(blank(), "triangle", "cyan", 10, 10)
    reward = ToyGenEvalReward("partial_exact")
    assert reward(one.expand(2, -1, -1, -1), ["a triangle", "a square"]).tolist() == [1.0, 0.0]


def test_reward_callable_modes_and_shape_errors():
    rng = np.random.default_rng(0)
    ps = [make_prompt("colors", (("square", "red"),)), make_prompt("counting", (("circle", None),) * 3)]
    img = render(ps, rng)
    img[1] = render([make_prompt("counting", (("circle", None),) * 2)], rng)[0]  # 2 circles, asked for 3
    texts = [p.text for p in ps]
    partial = ToyGenEvalReward()(img, texts)
    strict = ToyGenEvalReward("strict")(img, texts)
    assert partial.dtype == torch.float32 and partial.shape == (2,)
    assert partial.tolist() == [1.0, 0.5] and strict.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="B = len"):
        ToyGenEvalReward()(img, texts[:1])
    with pytest.raises(ValueError, match="mode"):
        ToyGenEvalReward("fuzzy")


def test_eval_prompts_from_a_jsonl_file_read_as_trainings_evaluation_reads_them(tmp_path):
    from densegrpo_fast.toy.evaluate import heldout_prompts

    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a red circle", "tag": "colors"}\n{"prompt": "Two Squares"}\n')
    got = heldout_prompts(str(path), 3, seed=0)
    assert [p.category for p in got] == ["colors", "counting", "colors"]
