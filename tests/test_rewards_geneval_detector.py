"""GenEval's rules, its detections' selection, the mmdetection glue (a stand-in mmdet) and the CLIP colours
(a tiny random CLIP), for the ``geneval_detector`` reward; and .jsonl prompt files."""

import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_rewards_clip import clip_dir  # noqa: F401  (the tiny CLIP fixture)

from densegrpo_fast.prompts import PromptSource
from densegrpo_fast.rewards import build_reward, kwargs_problems
from densegrpo_fast.rewards.clip import _embedding, clip_preprocess
from densegrpo_fast.rewards.geneval_detector import (
    COLORS,
    TEMPLATES,
    ColourClassifier,
    Detection,
    Settings,
    box_iou,
    check_metadata,
    judge,
    keep,
    load_metadata,
    object_crop,
    parse_result,
    relations,
)


def det(x1, y1, x2, y2, score=0.95, mask=None):
    return Detection((float(x1), float(y1), float(x2), float(y2)), score, mask)


def painted(colour_of):
    """A colour classifier that reads each detection's colour from a table keyed by its box."""
    calls = []

    def colours(cls, dets):
        calls.append((cls, len(dets)))
        return [colour_of[d.box] for d in dets]

    colours.calls = calls
    return colours


# ------------------------------------------------------------------------------------------------ geometry


def test_relations_follow_the_box_centres_with_the_size_margin():
    a, b = (0, 40, 20, 60), (60, 40, 80, 60)  # a's centre 60 px left of b's, same height
    assert relations(a, b) == {"left of"}
    assert relations(b, a) == {"right of"}
    assert relations((40, 0, 60, 20), (40, 60, 60, 80)) == {"above"}  # image y grows downwards
    assert relations((40, 60, 60, 80), (40, 0, 60, 20)) == {"below"}
    # diagonal: both components beyond 0.5 of the offset's length
    assert relations((0, 0, 10, 10), (50, 50, 60, 60)) == {"left of", "above"}
    # the margin: centres 30 px apart, boxes 100 px wide each -> 0.1 * 200 = 20 px taken off: 10 px left,
    # 1/3 of the offset's length, not beyond 0.5; with 0.05, 20 px left: 2/3
    assert relations((0, 0, 100, 10), (30, 0, 130, 10)) == set()
    assert relations((0, 0, 100, 10), (30, 0, 130, 10), threshold=0.05) == {"left of"}
    # offset (-30, -30): x shrunk to -10, y (extent 20) to -28, over |offset| = 42.4: -0.24 and -0.66
    assert relations((0, 0, 100, 10), (30, 30, 130, 40)) == {"above"}
    assert relations((10, 10, 20, 20), (10, 10, 20, 20)) == set()  # same place: no relation


def test_box_iou_counts_pixels_inclusively():
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)  # 5x10 of 10x10 + 10x10 - 50
    assert box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0


def test_keep_thresholds_ranks_caps_and_suppresses():
    dets = {
        "dog": [
            det(0, 0, 9, 9, 0.5),
            det(50, 0, 59, 9, 0.95),
            det(5, 0, 14, 9, 0.3),
            det(80, 0, 89, 9, 0.31),
        ],
        "cat": [det(0, 0, 9, 9, 0.2)],
    }
    kept = keep(dets, "two_object", Settings())
    assert [d.score for d in kept["dog"]] == [0.95, 0.5, 0.31]  # above 0.3 (strictly), most confident first
    assert "cat" not in kept  # a class with nothing above the threshold is absent
    assert [d.score for d in keep(dets, "counting", Settings())["dog"]] == [0.95]  # counting: above 0.9
    assert len(keep(dets, "position", Settings(max_objects=2))["dog"]) == 2
    nms = keep({"dog": [det(0, 0, 9, 9, 0.9), det(5, 0, 14, 9, 0.8), det(50, 0, 59, 9, 0.7)]}, None,
               Settings(max_overlap=0.3))  # fmt: skip
    assert [d.score for d in nms["dog"]] == [0.9, 0.7]  # IoU 1/3 >= 0.3: the second is suppressed
    capped = keep({"dog": [det(0, 0, 9, 9, 0.9), det(5, 0, 14, 9, 0.8), det(50, 0, 59, 9, 0.7)]}, None,
                  Settings(max_objects=2, max_overlap=0.3))  # fmt: skip
    assert [d.score for d in capped["dog"]] == [0.9]  # GenEval caps first, then suppresses


def test_keep_orders_ties_last_first_and_compares_in_float32():
    a, b, c = det(0, 0, 9, 9, 0.5), det(20, 0, 29, 9, 0.5), det(40, 0, 49, 9, 0.5)
    assert keep({"dog": [a, b, c]}, None, Settings())["dog"] == [c, b, a]  # as GenEval's reversed argsort
    at = det(0, 0, 9, 9, float(np.float32(0.3)))  # a float32 score equal to float32(0.3), above the float 0.3
    assert at.score > 0.3 and keep({"dog": [at]}, None, Settings()) == {}  # GenEval: not above its threshold


# --------------------------------------------------------------------------------------------------- rules


def test_counts_by_the_three_rules():
    meta = {
        "tag": "two_object",
        "prompt": "p",
        "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}],
    }
    one_each = {"dog": [det(0, 0, 9, 9)], "cat": [det(50, 0, 59, 9)]}
    v = judge(meta, one_each, painted({}))
    assert (v.geneval, v.exact, v.partial) == (True, True, 1.0)
    two_dogs = {"dog": [det(0, 0, 9, 9), det(20, 0, 29, 9)], "cat": [det(50, 0, 59, 9)]}
    v = judge(meta, two_dogs, painted({}))
    assert (v.geneval, v.exact, v.partial) == (True, False, 0.5)  # GenEval counts "at least"; 1 - 1/1 = 0
    v = judge(meta, {"dog": [det(0, 0, 9, 9)]}, painted({}))
    assert (v.geneval, v.exact, v.partial) == (False, False, 0.5)
    assert v.reasons == ["expected cat >= 1, found 0"]
    clutter = {"dog": [det(i * 10, 0, i * 10 + 9, 9) for i in range(4)], "cat": [det(50, 0, 59, 9)]}
    assert judge(meta, clutter, painted({})).partial == pytest.approx(
        (1 - 3 + 1) / 2
    )  # below 0: clutter costs


def test_counting_prompts_use_exclude():
    meta = {
        "tag": "counting", "prompt": "p",
        "include": [{"class": "apple", "count": 3}], "exclude": [{"class": "apple", "count": 4}],
    }  # fmt: skip
    for k, want in [(2, (False, False, 1 - 1 / 3)), (3, (True, True, 1.0)), (4, (False, False, 1 - 1 / 3))]:
        v = judge(meta, {"apple": [det(i * 10, 0, i * 10 + 9, 9) for i in range(k)]}, painted({}))
        assert (v.geneval, v.exact) == want[:2] and v.partial == pytest.approx(want[2]), k


def test_colours_are_asked_of_the_n_most_confident_objects():
    meta = {"tag": "colors", "prompt": "p", "include": [{"class": "car", "count": 1, "color": "red"}]}
    red, blue = det(0, 0, 9, 9, 0.99), det(20, 0, 29, 9, 0.9)
    table = {red.box: "red", blue.box: "blue"}
    colours = painted(table)
    v = judge(meta, {"car": [red, blue]}, colours)
    assert colours.calls == [("car", 1)]  # only the most confident car
    assert (v.geneval, v.exact, v.partial) == (True, False, pytest.approx(0.0 / 2))  # k != n: colour term 0
    v = judge(meta, {"car": [blue, red]}, painted(table))  # the blue one is the more confident
    assert (v.geneval, v.exact) == (False, False) and "expected 1 red car, found 1 blue" in v.reasons[0]
    v = judge(meta, {"car": [red]}, painted(table))
    assert (v.geneval, v.exact, v.partial) == (True, True, 1.0)
    colours = painted(table)
    v = judge(meta, {}, colours)
    assert colours.calls == [] and (v.geneval, v.partial) == (False, 0.0)  # no car: no colour asked


def test_colour_attributes_partial_credit():
    meta = {
        "tag": "color_attr", "prompt": "p",
        "include": [{"class": "car", "count": 1, "color": "red"}, {"class": "bench", "count": 1, "color": "white"}],
    }  # fmt: skip
    car, bench = det(0, 0, 9, 9), det(50, 0, 59, 9)
    v = judge(meta, {"car": [car], "bench": [bench]}, painted({car.box: "red", bench.box: "brown"}))
    assert (v.geneval, v.exact) == (False, False)
    assert v.partial == pytest.approx((1 + 1 + 1 + 0) / 4)  # two count terms, two colour terms


def test_position_is_checked_against_the_target_clause():
    meta = {
        "tag": "position", "prompt": "a dog right of a bench",
        "include": [{"class": "bench", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
    }  # fmt: skip
    bench, dog_right, dog_left = det(0, 40, 20, 60), det(60, 40, 80, 60), det(-60, 40, -40, 60)
    v = judge(meta, {"bench": [bench], "dog": [dog_right]}, painted({}))
    assert (v.geneval, v.exact, v.partial) == (True, True, 1.0)
    v = judge(meta, {"bench": [bench], "dog": [dog_left]}, painted({}))
    assert (v.geneval, v.exact, v.partial) == (False, False, pytest.approx(2 / 3))
    assert v.reasons == ["expected dog right of clause 0's objects"]
    v = judge(meta, {"dog": [dog_right]}, painted({}))  # no bench: the target clause failed
    assert (v.geneval, v.partial) == (False, pytest.approx(1 / 3)) and "did not hold" in v.reasons[-1]
    # two benches: GenEval's rule holds (the most confident bench is the target), the exact one does not
    extra = det(100, 100, 120, 120, 0.5)  # the dog is left of this one: only the first bench is the target
    assert "right of" not in relations(dog_right.box, extra.box)
    v = judge(meta, {"bench": [bench, extra], "dog": [dog_right]}, painted({}))
    assert (v.geneval, v.exact, v.partial) == (True, False, pytest.approx((1 + 0 + 0) / 3))
    # the relation must hold against every object of the target clause
    meta2 = {
        "tag": "position", "prompt": "p",
        "include": [{"class": "bench", "count": 2}, {"class": "dog", "count": 1, "position": ["right of", 0]}],
    }  # fmt: skip
    far = det(100, 40, 120, 60)
    v = judge(meta2, {"bench": [bench, far], "dog": [dog_right]}, painted({}))
    assert (v.geneval, v.exact) == (False, False)


@pytest.mark.parametrize(
    "meta, rule",
    [
        ({"prompt": "p"}, "'include' must be a non-empty list"),
        ({"prompt": "p", "include": [{"class": "dog", "count": 0}]}, "count must be an integer >= 1"),
        ({"prompt": "p", "include": [{"class": "dog", "count": 1, "color": "teal"}]}, "GenEval's colours"),
        ({"prompt": "p", "include": [{"class": "dog", "count": 1, "position": ["left of", 0]}]}, "earlier clause"),
        ({"prompt": "p", "include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["near", 0]}]},
         "relation in"),
        ({"include": [{"class": "dog", "count": 1}]}, "'prompt' string"),
        ({"prompt": "p", "include": [{"class": "dog", "count": 1}]}, "'tag' must be one of GenEval's tasks"),
        ({"prompt": "p", "tag": "Counting", "include": [{"class": "dog", "count": 1}]}, "picks the score threshold"),
    ],
)  # fmt: skip
def test_bad_metadata_is_refused_with_the_rule(meta, rule):
    with pytest.raises(ValueError, match=rule) as e:
        check_metadata(meta, "file.jsonl, line 3")
    assert "file.jsonl, line 3" in str(e.value)


def test_load_metadata_reads_jsonl_and_refuses_contradictions(tmp_path):
    a = {"tag": "single_object", "prompt": "a photo of a dog", "include": [{"class": "dog", "count": 1}]}
    b = {"tag": "single_object", "prompt": "a photo of a cat", "include": [{"class": "cat", "count": 1}]}
    f1, f2 = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    f1.write_text(json.dumps(a) + "\n\n" + json.dumps(b) + "\n")
    f2.write_text(json.dumps(a) + "\n")  # the same prompt with the same rules: fine
    table = load_metadata([str(f1), str(f2)])
    assert sorted(table) == ["a photo of a cat", "a photo of a dog"]
    f2.write_text(json.dumps({**a, "include": [{"class": "dog", "count": 2}]}) + "\n")
    with pytest.raises(ValueError, match="appears earlier with other requirements"):
        load_metadata([str(f1), str(f2)])
    f2.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1: not JSON"):
        load_metadata(str(f2))
    with pytest.raises(ValueError, match="is not a file"):
        load_metadata(str(tmp_path / "missing.jsonl"))


# ----------------------------------------------------------------------------------------------- detector


def test_parse_result_reads_mmdet_2_and_3():
    names = ["dog", "cat", "car"]
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    v2 = (
        [np.array([[1, 2, 3, 4, 0.9], [5, 6, 7, 8, 0.4]]), np.zeros((0, 5)), np.array([[0, 0, 1, 1, 0.7]])],
        [[mask, ~mask], [], [mask]],
    )
    out = parse_result(v2, names)
    assert sorted(out) == ["car", "dog"]
    assert out["dog"][0].box == (1.0, 2.0, 3.0, 4.0) and out["dog"][1].score == pytest.approx(0.4)
    assert torch.equal(out["dog"][1].mask, torch.from_numpy(~mask))
    assert parse_result(v2[0], names)["car"][0].mask is None  # boxes only
    inst = types.SimpleNamespace(
        bboxes=torch.tensor([[1.0, 2, 3, 4], [0, 0, 1, 1]]), scores=torch.tensor([0.9, 0.7]),
        labels=torch.tensor([0, 2]), masks=torch.from_numpy(np.stack([mask, mask])),
    )  # fmt: skip
    out3 = parse_result(types.SimpleNamespace(pred_instances=inst), names)
    assert sorted(out3) == ["car", "dog"] and out3["car"][0].score == pytest.approx(0.7)
    assert torch.equal(out3["dog"][0].mask, torch.from_numpy(mask))
    with pytest.raises(ValueError, match="returned 3 classes.*class_names"):
        parse_result(v2, names[:2])
    assert [d.score for d in parse_result(v2, names, min_score=0.4)["dog"]] == [pytest.approx(0.9)]
    assert sorted(parse_result(types.SimpleNamespace(pred_instances=inst), names, min_score=0.8)) == ["dog"]
    with pytest.raises(ValueError, match="label 2 but 2 class names"):
        parse_result(types.SimpleNamespace(pred_instances=inst), names[:2])


class FakeDetector(torch.nn.Module):
    """What ``mmdet.apis.init_detector`` returns here: 3 classes; it finds one dog box per image, placed
    by where the image's blue channel (BGR channel 0 as mmdetection reads arrays) is brightest."""

    CLASSES = ("dog", "cat", "bench")

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Linear(2, 2)
        self.decoder = torch.nn.ModuleDict({"self_attn": torch.nn.Linear(2, 2)})  # (a 3.x layer name)
        self.seen, self.calls = [], 0


def _fake_inference(model, imgs):
    model.seen.extend(imgs)
    model.calls += 1
    out = []
    for img in imgs:
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        y, x = np.unravel_index(np.argmax(img[..., 0]), img.shape[:2])  # BGR: channel 0 is blue
        out.append(
            ([np.array([[x - 2, y - 2, x + 2, y + 2, 0.95]]), np.zeros((0, 5)), np.zeros((0, 5))], None)
        )
    return out


@pytest.fixture
def fake_mmdet(monkeypatch):
    apis = types.SimpleNamespace(init_detector=lambda config, checkpoint, device: FakeDetector(),
                                 inference_detector=_fake_inference)  # fmt: skip
    mmdet = types.ModuleType("mmdet")
    mmdet.apis = apis
    monkeypatch.setitem(sys.modules, "mmdet", mmdet)
    monkeypatch.setitem(sys.modules, "mmdet.apis", apis)
    return apis


@pytest.fixture
def geneval_files(tmp_path):
    rows = [
        {"tag": "single_object", "prompt": "a photo of a dog", "include": [{"class": "dog", "count": 1}]},
        {"tag": "single_object", "prompt": "a photo of a bench ", "include": [{"class": "bench", "count": 1}]},
        {"tag": "colors", "prompt": "a photo of a red dog", "include": [{"class": "dog", "count": 1, "color": "red"}]},
    ]  # fmt: skip
    meta = tmp_path / "metadata.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mask2former.py").write_text("# config\n")
    torch.save({"meta": {}, "state_dict": FakeDetector().state_dict()}, tmp_path / "mask2former.pth")
    return tmp_path


def _kwargs(d, clip, **extra):
    return dict(metadata=str(d / "metadata.jsonl"), detector_config=str(d / "mask2former.py"),
                detector_checkpoint=str(d / "mask2former.pth"), clip=str(clip), device="cpu", **extra)  # fmt: skip


def test_reward_scores_through_mmdet_in_bgr(fake_mmdet, geneval_files, clip_dir):  # noqa: F811
    reward = build_reward("geneval_detector", **_kwargs(geneval_files, clip_dir, mode="geneval"))
    images = torch.zeros(2, 3, 16, 16)
    images[0, 2, 5, 7] = 1.0  # a blue pixel: the fake finds its dog there (only if it was given BGR)
    images[1, 0, 9, 3] = 1.0  # red only: the fake's argmax over blue lands at (0, 0)
    scores = reward(images, ["a photo of a dog", "a photo of a bench"])
    assert scores.tolist() == [1.0, 0.0] and scores.dtype == torch.float32
    model = reward.detect.model
    assert model.calls == 1 and len(model.seen) == 2
    assert model.seen[0][5, 7, 0] == 255 and model.seen[0][5, 7, 2] == 0  # RGB -> BGR
    assert reward.detect.class_names == ["dog", "cat", "bench"]
    assert reward.last_verdicts[1].reasons == ["expected bench >= 1, found 0"]
    with pytest.raises(ValueError, match="is not in the GenEval metadata"):
        reward(images[:1], ["a photo of a horse"])
    assert reward(images[:1], [" a photo of a dog "]).tolist() == [1.0]  # prompts are matched stripped
    chunked = build_reward("geneval_detector", **_kwargs(geneval_files, clip_dir, detector_batch=1))
    assert chunked(images.repeat(3, 1, 1, 1), ["a photo of a dog", "a photo of a bench"] * 3).tolist() == [
        1.0, 0.0, 1.0, 0.0, 1.0, 0.0,
    ]  # fmt: skip
    assert chunked.detect.model.calls == 6  # one image per call


def test_a_checkpoint_of_the_other_mmdet_version_is_refused(fake_mmdet, geneval_files, clip_dir):  # noqa: F811
    old = {k.replace("self_attn", "attentions.0"): v for k, v in FakeDetector().state_dict().items()}
    torch.save({"state_dict": old}, geneval_files / "mask2former.pth")  # 2.x names for a 3.x model
    with pytest.raises(
        ValueError, match=r"lacks 2 of the parameters.*decoder.self_attn.weight.*v2.0 checkpoint"
    ):
        build_reward("geneval_detector", **_kwargs(geneval_files, clip_dir))
    assert build_reward("geneval_detector", **_kwargs(geneval_files, clip_dir, check_weights=False))
    torch.save(
        {f"module.{k}": v for k, v in FakeDetector().state_dict().items()}, geneval_files / "mask2former.pth"
    )
    assert build_reward("geneval_detector", **_kwargs(geneval_files, clip_dir))  # a bare, DDP-saved state


def test_reward_errors_name_the_fix(fake_mmdet, geneval_files, clip_dir, monkeypatch):  # noqa: F811
    with pytest.raises(ValueError, match="class_names=.* is not a file"):
        build_reward("geneval_detector", **_kwargs(geneval_files, clip_dir, class_names="/nope.txt"))
    (geneval_files / "names.txt").write_text("dog\ncat\n")
    with pytest.raises(ValueError, match="names 2 classes, the detector has 3"):
        build_reward(
            "geneval_detector",
            **_kwargs(geneval_files, clip_dir, class_names=str(geneval_files / "names.txt")),
        )
    (geneval_files / "names.txt").write_text("dog\ncat\nsofa\n")
    with pytest.raises(
        ValueError, match=r"classes the detector does not know: \['bench'\].*object_names.txt"
    ):
        build_reward(
            "geneval_detector",
            **_kwargs(geneval_files, clip_dir, class_names=str(geneval_files / "names.txt")),
        )
    with pytest.raises(ValueError, match="detector_checkpoint=.* is not a file"):
        build_reward(
            "geneval_detector", **{**_kwargs(geneval_files, clip_dir), "detector_checkpoint": "/nope.pth"}
        )
    assert kwargs_problems("geneval_detector", {**_kwargs(geneval_files, clip_dir), "mode": "strict"})
    assert kwargs_problems("geneval_detector", {**_kwargs(geneval_files, clip_dir), "threshold": 1.5})
    assert kwargs_problems("geneval_detector", {**_kwargs(geneval_files, clip_dir), "max_objects": 2.5})
    assert kwargs_problems("geneval_detector", {**_kwargs(geneval_files, clip_dir), "detector_batch": 0})
    assert kwargs_problems("geneval_detector", {**_kwargs(geneval_files, clip_dir), "threshold": "0.3"})
    assert not kwargs_problems("geneval_detector", _kwargs(geneval_files, clip_dir))
    monkeypatch.setitem(sys.modules, "mmdet", None)  # not installed
    monkeypatch.setitem(sys.modules, "mmdet.apis", None)
    with pytest.raises(ValueError, match="needs mmdetection.*serve-reward --reward geneval_detector"):
        build_reward("geneval_detector", **_kwargs(geneval_files, clip_dir))


def test_served_over_loopback(fake_mmdet, geneval_files, clip_dir):  # noqa: F811
    from densegrpo_fast.rewards.server import RewardServer, load_reward

    reward = load_reward("geneval_detector", _kwargs(geneval_files, clip_dir))
    server = RewardServer(reward, name="geneval_detector", port=0).start()
    try:
        client = build_reward("geneval", url=server.url)
        images = torch.zeros(2, 3, 16, 16)
        images[:, 2, 8, 8] = 1.0
        assert client(images, ["a photo of a dog", "a photo of a bench"]).tolist() == [1.0, 0.0]
    finally:
        server.stop()


# ------------------------------------------------------------------------------------------------- colours


def test_object_crop_matches_pil_composite_and_crop():
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 20, 30), generator=g).float() / 255
    mask = torch.zeros(20, 30, dtype=torch.bool)
    mask[4:12, 6:20] = True
    d = det(5.4, 3.6, 20.5, 13.2, mask=mask)
    ours = object_crop(image, d)
    pil = Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy())
    grey = Image.new("RGB", pil.size, color="#999")
    ref = Image.composite(pil, grey, Image.fromarray(mask.numpy())).crop(d.box)
    ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 255
    assert ours.shape == ref.shape and torch.equal((ours * 255).round(), (ref * 255).round())
    for box in [(-3.0, -2.0, 10.0, 25.0), (25.2, 15.5, 34.0, 22.0)]:  # out of the image: PIL pads black
        d = det(*box, mask=mask)
        ref = Image.composite(pil, grey, Image.fromarray(mask.numpy())).crop(box)
        ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float()
        ours = object_crop(image, d)
        assert ours.shape == ref.shape and torch.equal((ours * 255).round(), ref), box
    assert object_crop(image, det(4.0, 4.0, 4.2, 4.0)).shape == (3, 1, 1)  # an empty box keeps a pixel


def test_colour_classifier_is_zero_shot_clip(clip_dir):  # noqa: F811
    from transformers import CLIPModel, CLIPTokenizer

    clf = ColourClassifier(str(clip_dir), device="cpu")
    model, tok = CLIPModel.from_pretrained(str(clip_dir)), CLIPTokenizer.from_pretrained(str(clip_dir))
    texts = [t.format(c=c, cls="dog") for c in COLORS for t in TEMPLATES]
    with torch.no_grad():
        emb = _embedding(model.get_text_features(**tok(texts, padding=True, return_tensors="pt")))
    want = F.normalize(F.normalize(emb, dim=-1).view(len(COLORS), len(TEMPLATES), -1).mean(1), dim=-1)
    torch.testing.assert_close(clf.weights("dog"), want, rtol=1e-5, atol=1e-6)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, 48, 64, generator=g)
    dets = [det(2, 3, 30, 40), det(30, 10, 60, 20, mask=torch.rand(48, 64, generator=g) > 0.5)]
    with torch.no_grad():
        pixels = torch.cat([clip_preprocess(object_crop(image, d)[None], clf.encoder.spec, torchvision_crop=True)
                            for d in dets])  # fmt: skip
        img = F.normalize(_embedding(model.get_image_features(pixel_values=pixels)), dim=-1)
    expect = [COLORS[i] for i in (img @ want.T).argmax(1).tolist()]
    assert clf(image, "dog", dets) == expect
    assert clf(image, "dog", []) == []


# ------------------------------------------------------------------------------------------- prompt files


def test_jsonl_prompt_files_read_the_prompt_field(tmp_path):
    f = tmp_path / "train_metadata.jsonl"
    f.write_text('{"prompt": "a photo of a dog", "tag": "single_object"}\n\n{"prompt": " a cat "}\n')
    assert PromptSource(str(f)).pool()[0] == ["a photo of a dog", "a cat"]
    f.write_text('{"prompt": "a dog"}\n{"text": "a cat"}\n')
    with pytest.raises(ValueError, match="line 2: a .jsonl prompt file holds one JSON object per line"):
        PromptSource(str(f))
    f.write_text('{"prompt": "a dog"\n')
    with pytest.raises(ValueError, match="line 1: not JSON"):
        PromptSource(str(f))


def test_a_batch_is_coloured_in_one_clip_pass(fake_mmdet, geneval_files, clip_dir, monkeypatch):  # noqa: F811
    reward = build_reward("geneval_detector", **_kwargs(geneval_files, clip_dir, mode="geneval"))
    clf = reward.colours
    g = torch.Generator().manual_seed(3)
    images = torch.rand(3, 3, 16, 16, generator=g)
    for i, (y, x) in enumerate([(5, 7), (9, 3), (12, 12)]):
        images[i, 2, y, x] = 1.0  # each image's dog (the fake detector's box around its bluest pixel)
    image8 = (images * 255).round() / 255
    single = [clf(image8[i], "dog", reward.detect(images[i : i + 1])[0]["dog"]) for i in range(3)]
    calls = []
    forward = clf.encoder.model.get_image_features
    monkeypatch.setattr(
        clf.encoder.model, "get_image_features", lambda **kw: calls.append(1) or forward(**kw)
    )
    scores = reward(images, ["a photo of a red dog"] * 3)
    assert len(calls) == 1  # three clauses' crops, one forward pass
    assert scores.tolist() == [float(c == ["red"]) for c in single]
    assert clf.many([]) == [] and clf.many([(image8[0], "dog", [])]) == [[]]
