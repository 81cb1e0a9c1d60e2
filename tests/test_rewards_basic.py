"""Weight-free rewards (JPEG), the OCR reward with a fake recognizer, the weighted sum, and the registry."""

import io
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from densegrpo_fast.rewards import available, build_reward
from densegrpo_fast.rewards.ocr import levenshtein, normalize_text, ocr_score, quoted_text


def _images(b, h=24, w=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8).float() / 255


def test_new_rewards_are_registered_and_the_import_stays_light():
    new = {"pickscore", "clip_score", "aesthetic", "jpeg_compressibility", "jpeg_incompressibility", "ocr"}
    assert new | {"multi", "remote", "geneval", "redness", "toy_geneval"} <= set(available())
    code = (
        "import sys, densegrpo_fast.rewards\n"
        "heavy = [m for m in ('transformers', 'PIL', 'easyocr', 'http.server') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        # the server runs in other environments (GenEval's): it must not need the training dependencies
        "import densegrpo_fast.cli, densegrpo_fast.rewards.server\n"
        "train = ('transformers', 'diffusers', 'peft', 'pydantic', 'yaml', 'matplotlib')\n"
        "heavy = [m for m in train if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


# --- JPEG ---------------------------------------------------------------------------------------------


def test_jpeg_sizes_are_pil_sizes_in_kb():
    images = torch.cat([torch.full((1, 3, 32, 32), 0.5), _images(2, 32, 32)])  # flat, then noise
    inc = build_reward("jpeg_incompressibility")(images, ["x"] * 3)
    comp = build_reward("jpeg_compressibility")(images, ["x"] * 3)
    assert inc.shape == (3,) and inc.dtype == torch.float32
    assert torch.equal(comp, -inc)
    for i in range(3):  # the same encoding done by hand: uint8 HWC, quality 95, bytes / 1000
        buf = io.BytesIO()
        arr = (images[i] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        assert inc[i].item() == pytest.approx(buf.tell() / 1000, abs=1e-6)
    assert inc[0] < inc[1] and inc[0] < inc[2]  # a flat image compresses far better than noise
    low = build_reward("jpeg_incompressibility", quality=10)(images, ["x"] * 3)
    assert (low[1:] < inc[1:]).all()
    with pytest.raises(ValueError, match=r"quality=0 must be an integer in \[1, 100\]"):
        build_reward("jpeg_compressibility", quality=0)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        build_reward("jpeg_compressibility")(images[:, :1], ["x"] * 3)


# --- OCR ----------------------------------------------------------------------------------------------


def test_quoted_text_takes_the_first_straight_pair_else_the_first_typographic_one():
    assert quoted_text('A sign that says "Open 24 hours" in neon') == "Open 24 hours"
    assert quoted_text('a "first" and a "second"') == "first"
    assert quoted_text("a poster reading “Hello World”, blue") == "Hello World"
    assert quoted_text('mixed “quotes" here') == "quotes"
    assert quoted_text('A “vintage” poster saying "SALE"') == "SALE"  # Flow-GRPO's split('"')[1]
    assert quoted_text("ein Schild „Hallo Welt“") == "Hallo Welt"
    assert quoted_text("une affiche «Bonjour»") == "Bonjour"
    for bad in ["no quotes at all", 'one " only', 'empty "  " quotes']:
        with pytest.raises(ValueError, match="has no text between double quotes") as e:
            quoted_text(bad)
        assert repr(bad) in str(e.value)


def test_edit_distance_and_scores():
    assert levenshtein("kitten", "sitting") == 3 and levenshtein("", "abc") == 3
    assert levenshtein("abc", "") == 3 and levenshtein("flaw", "lawn") == levenshtein("lawn", "flaw") == 2
    assert normalize_text(" Hello\n World\t") == "helloworld"
    # flow_grpo (default): normalised by the target, capped; a target inside the read text scores 1
    assert ocr_score("Hello World", "hello  world") == 1.0
    assert ocr_score("hello", "hallo") == pytest.approx(0.8)
    assert ocr_score("hello", "Big sale: HELLO there") == 1.0
    assert ocr_score("hello", "") == 0.0 and ocr_score("hi", "completely unrelated text") == 0.0
    # max_len: symmetric, extra text costs
    assert ocr_score("hello", "hello world", "max_len") == pytest.approx(1 - 5 / 10)
    assert ocr_score("hello", "hallo", "max_len") == pytest.approx(0.8)
    assert ocr_score("hello", "", "max_len") == 0.0


class FakeRecognizer:
    """Reads a preset text per image and records its calls."""

    def __init__(self, texts):
        self.texts, self.calls = texts, 0

    def read(self, images):
        self.calls += 1
        return list(self.texts[: images.shape[0]])


def test_ocr_reward_with_a_fake_recognizer():
    fake = FakeRecognizer(["OPEN 24 hours", "0pen 24 hours", "open 24", "open 24 hours, all week", ""])
    reward = build_reward("ocr", recognizer=fake)
    prompts = [
        'a sign "Open 24 hours"',
        "a neon “Open 24 Hours”",
        'a "open 24 hours"',
        '"Open 24 hours"',
        '"a"',
    ]
    scores = reward(_images(5), prompts)
    assert scores.dtype == torch.float32 and scores.shape == (5,)
    # target "open24hours" (11 characters): exact, 1 substitution, 5 deletions, inside a longer text, nothing
    assert scores.tolist() == pytest.approx([1.0, 1 - 1 / 11, 1 - 5 / 11, 1.0, 0.0])
    strict = build_reward("ocr", recognizer=fake, normalization="max_len")(_images(5), prompts)
    assert strict.tolist() == pytest.approx([1.0, 1 - 1 / 11, 1 - 5 / 11, 1 - 8 / 19, 0.0])
    calls = fake.calls
    with pytest.raises(ValueError, match="has no text between double quotes"):
        reward(_images(2), ['a "quoted" one', "an unquoted one"])
    assert fake.calls == calls  # the prompts are checked before the recognizer runs
    with pytest.raises(ValueError, match="read 4 texts from 5 images"):
        build_reward("ocr", recognizer=FakeRecognizer(["a"] * 4))(_images(5), ['"a"'] * 5)
    with pytest.raises(ValueError, match="normalization='exact'"):
        build_reward("ocr", recognizer=fake, normalization="exact")


def test_ocr_recognizer_from_a_user_factory(tmp_path, monkeypatch):
    (tmp_path / "my_ocr.py").write_text(
        "class Reader:\n"
        "    def __init__(self, text):\n"
        "        self.text = text\n"
        "    def read(self, images):\n"
        "        return [self.text] * images.shape[0]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = build_reward("ocr", recognizer="my_ocr:Reader", recognizer_kwargs={"text": "Hi"})
    assert reward(_images(2), ['"hi"', '"ho"']).tolist() == [1.0, 0.5]


def test_default_recognizer_without_the_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "easyocr", None)  # import easyocr -> ImportError, installed or not
    with pytest.raises(ValueError, match=r"pip install 'densegrpo-fast\[ocr\]'"):
        build_reward("ocr")


# --- weighted sum -------------------------------------------------------------------------------------


def test_multi_is_the_weighted_sum_of_its_components():
    spec = {
        "red": {"name": "redness", "weight": 0.5},
        "jpeg": {"name": "jpeg_compressibility", "kwargs": {"quality": 80}, "weight": -2},
        "red2": {"name": "redness"},  # weight defaults to 1
    }
    reward = build_reward("multi", rewards=spec)
    images, prompts = _images(3), ["a", "b", "c"]
    red = build_reward("redness")(images, prompts)
    jpeg = build_reward("jpeg_compressibility", quality=80)(images, prompts)
    assert torch.equal(reward(images, prompts), 0.5 * red + -2.0 * jpeg + 1.0 * red)
    parts = reward.components(images, prompts)
    assert list(parts) == ["red", "jpeg", "red2"] and torch.equal(parts["jpeg"], jpeg)
    nested = build_reward(
        "multi", rewards={"inner": {"name": "multi", "kwargs": {"rewards": spec}, "weight": 2}}
    )
    assert torch.equal(nested(images, prompts), 2.0 * reward(images, prompts))


@pytest.mark.parametrize(
    "rewards, match",
    [
        ({}, "must be a non-empty mapping"),
        ({"a": {"kwargs": {}}}, r"rewards.a=.* must be a mapping with 'name'"),
        ({"a": {"name": "redness", "wieght": 1}}, r"unknown keys: \['wieght'\]"),
        ({"a": {"name": "redness", "weight": "high"}}, r"rewards.a.weight='high' must be a finite number"),
        ({"a": {"name": "rednes"}}, "did you mean 'redness'"),
        ({"a": {"name": "redness", "kwargs": [1]}}, r"rewards.a.kwargs=\[1\] must be a mapping"),
        ({"a": {"name": "redness", "weight": float("nan")}}, r"rewards.a.weight=nan must be a finite number"),
    ],
)
def test_multi_config_errors(rewards, match):
    with pytest.raises(ValueError, match=match):
        build_reward("multi", rewards=rewards)


def test_kwargs_problems_found_without_building():
    from densegrpo_fast.rewards import kwargs_problems

    assert kwargs_problems("toy_geneval", {"mode": "strict"}) == []
    assert "is not a toy_geneval mode" in kwargs_problems("toy_geneval", {"mode": "strit"})[0]
    assert "its keywords are ['mode']" in kwargs_problems("toy_geneval", {"mood": "strict"})[0]
    spec = {
        "a": {"name": "rednes"},
        "b": {"name": "toy_geneval", "kwargs": {"mode": "x"}},
        "c": {"name": "redness"},
    }
    found = kwargs_problems("multi", {"rewards": spec})
    assert len(found) == 2
    assert (
        found[0].startswith("reward.kwargs.rewards.a.name='rednes'") and "did you mean 'redness'" in found[0]
    )
    assert found[1].startswith("reward.kwargs.rewards.b: reward.kwargs.mode='x'")


def test_the_rewards_command_lists_every_reward_with_its_keywords(capsys):
    import json

    from densegrpo_fast.cli import main
    from densegrpo_fast.rewards import available

    assert main(["rewards"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [
        ln for ln in lines if ln and not ln.startswith(" ") and not ln.startswith("use one")
    ] == available()
    assert main(["rewards", "aesthetic"]) == 0
    out = capsys.readouterr().out
    assert "keywords: head (required), model='openai/clip-vit-large-patch14'" in out
    assert "documented in: densegrpo_fast.rewards.clip.Aesthetic" in out
    assert main(["rewards", "--json", "imagereward"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["required"] == [] and row["keywords"]["checkpoint"] == "THUDM/ImageReward"
    assert ":func:" not in json.dumps(row) and "``" not in row["summary"]
    assert main(["rewards", "hsp"]) == 2
    assert "did you mean 'hps'" in capsys.readouterr().err


class FakePaddleOCR:
    """``paddleocr.PaddleOCR`` 2.x as the recognizer uses it: answers per image from a preset list."""

    answers: list = []
    made: list = []

    def __init__(self, **kwargs):
        FakePaddleOCR.made.append(kwargs)
        self.seen = []

    def ocr(self, img, cls=True):
        assert cls is False
        self.seen.append(img)
        return self.answers[len(self.seen) - 1]


def test_paddleocr_recognizer_reads_as_flow_grpo(monkeypatch):
    fake = types.ModuleType("paddleocr")
    fake.PaddleOCR, fake.__version__ = FakePaddleOCR, "2.9.1"
    monkeypatch.setitem(sys.modules, "paddleocr", fake)
    FakePaddleOCR.made = []
    box = [[0, 0]] * 4
    page = [[box, ("Open 24", 0.9)], [box, ("junk", 0.0)], [box, (" hours", 0.5)]]
    FakePaddleOCR.answers = [[page], [None]]  # per image: one page of lines; nothing read
    reward = build_reward(
        "ocr", recognizer="paddleocr", recognizer_kwargs={"gpu": False, "rec_model_dir": "/m/rec"}
    )
    assert FakePaddleOCR.made == [
        {"use_angle_cls": False, "lang": "en", "show_log": False, "use_gpu": False, "rec_model_dir": "/m/rec"}
    ]
    images = _images(2)
    assert reward(images, ['"Open 24 hours"', '"Open"']).tolist() == [1.0, 0.0]  # confidence 0 is dropped
    seen = reward.recognizer.ocr.seen
    assert seen[0].dtype == np.uint8 and seen[0].shape == (images.shape[2], images.shape[3], 3)
    assert (seen[0] == (images[0] * 255).round().permute(1, 2, 0).numpy()).all()  # RGB, as Flow-GRPO passes
    del fake.__version__  # (no distribution metadata either: the version is unknown, and not refused)
    assert build_reward("ocr", recognizer="paddleocr", recognizer_kwargs={"gpu": False})
    fake.__version__ = "3.0.0"
    with pytest.raises(ValueError, match=r"PaddleOCR 3.0.0 is installed.*paddleocr==2.9.1"):
        build_reward("ocr", recognizer="paddleocr")
    monkeypatch.setitem(sys.modules, "paddleocr", None)
    with pytest.raises(ValueError, match="paddlepaddle-gpu==2.6.2 paddleocr==2.9.1"):
        build_reward("ocr", recognizer="paddleocr")


@pytest.mark.parametrize(
    "name, kwargs, said",
    [
        ("jpeg_compressibility", {"quality": True}, "quality=True must be an integer in"),
        ("jpeg_incompressibility", {"quality": 500}, "quality=500 must be an integer in"),
        ("pickscore", {"max_batch": 2.5}, "max_batch=2.5 must be a whole number >= 1"),
        ("clip_score", {"dtype": "half"}, "dtype='half' is not one of"),
        ("aesthetic", {"head": "/h.pth", "max_batch": 0}, "max_batch=0 must be a whole number >= 1"),
        ("ocr", {"normalization": "bogus"}, "normalization='bogus' is not one of"),
        ("ocr", {"recognizer": "tesseract"}, "recognizer='tesseract': use 'easyocr', 'paddleocr'"),
        (
            "multi",
            {"rewards": {"a": {"name": "redness", "weight": float("inf")}}},
            "weight=inf must be a finite",
        ),
    ],
)
def test_validate_finds_bad_reward_settings_without_building(name, kwargs, said):
    from densegrpo_fast.rewards import kwargs_problems

    (problem,) = kwargs_problems(name, kwargs)
    assert said in problem


class FakeReader:
    """``easyocr.Reader`` as far as the recognizer touches it: its networks wrapped in DataParallel."""

    made: list = []

    def __init__(self, languages, gpu, **kwargs):
        FakeReader.made.append((languages, gpu))
        self.detector, self.recognizer = self._wrapped(), self._wrapped()
        self.seen = []

    def detect(self, img, reformat=True):
        assert not reformat
        self.seen.append(("detect", img.copy()))
        return [[[0, 4, 0, 2]]], [[]]  # one image: one horizontal box, no free ones

    def recognize(self, img_cv_grey, horizontal_list, free_list, detail=1, reformat=True):
        assert not reformat and horizontal_list == [[0, 4, 0, 2]] and free_list == [] and detail == 1
        self.seen.append(("recognize", img_cv_grey.copy()))
        return [([[0, 0]] * 4, "ab", 0.9), ([[0, 0]] * 4, "c", 0.0)]  # (confidence 0: dropped)

    @staticmethod
    def _wrapped() -> torch.nn.DataParallel:  # (built by hand: DataParallel's own set-up wants GPUs)
        dp = torch.nn.DataParallel.__new__(torch.nn.DataParallel)
        torch.nn.Module.__init__(dp)
        dp.module = torch.nn.Linear(1, 1)
        return dp


def test_easyocr_reads_on_this_processs_device_without_data_parallel(monkeypatch):
    fake = types.ModuleType("easyocr")
    fake.Reader = FakeReader
    monkeypatch.setitem(sys.modules, "easyocr", fake)
    FakeReader.made = []
    from densegrpo_fast.rewards.ocr import EasyOcrRecognizer

    reader = EasyOcrRecognizer(languages="en").reader
    assert FakeReader.made[-1][0] == ["en"]  # one code given as a string, not its letters
    assert not isinstance(reader.detector, torch.nn.DataParallel)
    assert not isinstance(reader.recognizer, torch.nn.DataParallel)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # (rewards are built before set_device)
    monkeypatch.setenv("LOCAL_RANK", "3")  # rank 3 of a node
    EasyOcrRecognizer()
    assert FakeReader.made[-1][1] == "cuda:3"
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # one process: the current device
    EasyOcrRecognizer()
    assert FakeReader.made[-1][1] == "cuda:1"
    EasyOcrRecognizer(gpu=False)
    assert FakeReader.made[-1][1] is False


def test_easyocr_detects_on_rgb_and_recognizes_on_opencvs_grey(monkeypatch):
    """As EasyOCR reads an image file: its detector gets RGB, its recognizer the ITU-R 601 grey copy
    (readtext on an array would take it as BGR: pure red would be 29, not 76)."""
    fake = types.ModuleType("easyocr")
    fake.Reader = FakeReader
    monkeypatch.setitem(sys.modules, "easyocr", fake)
    from densegrpo_fast.rewards.ocr import EasyOcrRecognizer

    recognizer = EasyOcrRecognizer(gpu=False)
    image = torch.zeros(1, 3, 2, 4)
    image[0, 0, :, 0] = image[0, 1, :, 1] = image[0, 2, :, 2] = 1.0  # red, green, blue columns
    image[0, 1, :, 3], image[0, 2, :, 3] = 100 / 255, 200 / 255  # (14- or 16-bit weights give 82)
    assert recognizer.read(image) == ["ab"]
    (_, rgb), (_, grey) = recognizer.reader.seen
    assert rgb.shape == (2, 4, 3)
    assert rgb[0].tolist() == [[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 100, 200]]
    assert grey.dtype == np.uint8 and grey.tolist() == [[76, 150, 29, 81]] * 2  # (OpenCV 4.10's values)
