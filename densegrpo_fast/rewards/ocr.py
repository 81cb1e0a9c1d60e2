"""OCR reward: how well the image spells the text quoted in its prompt.

The target is the text between the first pair of straight double quotes in the prompt, as Flow-GRPO takes
it: ``'A sign that says "Open 24 hours"'`` -> ``Open 24 hours``; a prompt without straight quotes gives the
text between its first pair of typographic ones (``“ ”``, German ``„ “``, French ``« »``). A prompt without
a quoted text, or
with only whitespace between the quotes, is an error (ValueError naming the prompt), not a silent 0: an
OCR prompt set without quotes is a data problem to fix, not a reward to learn from.

Both the target and the recognised text are normalised as Flow-GRPO does: lower-cased, with whitespace
removed (Flow-GRPO removes the space character; every whitespace character is removed here, so a line
break between OCR lines counts as nothing). Then, with ``d`` the Levenshtein distance:

- ``normalization: flow_grpo`` (default; Flow-GRPO's reward and the metric behind the paper's OCR numbers):
  1 if the target occurs inside the recognised text, else ``1 - min(d, len(target)) / len(target)``;
  extra recognised characters cost at most one target's length.
- ``normalization: max_len``: ``1 - d / max(len(target), len(recognised))``, the symmetric normalised edit
  similarity; extra recognised text is penalised.

Both lie in [0, 1] by construction. The recognizer is pluggable: any object with ``read(images [B, 3, H, W]
float in [0, 1]) -> list[str]`` (one string per image, its lines joined). ``recognizer: easyocr`` (default)
builds :class:`EasyOcrRecognizer` (``pip install 'densegrpo-fast[ocr]'``); ``recognizer: paddleocr`` builds
:class:`PaddleOcrRecognizer`, the recognizer behind Flow-GRPO's and the DenseGRPO paper's OCR numbers, set
up as Flow-GRPO sets it up (absolute numbers from EasyOCR are not the paper's); ``recognizer:
"package.module:callable"`` calls a user factory with ``recognizer_kwargs``.
"""

from __future__ import annotations

import re
from typing import Protocol

import torch

from densegrpo_fast.rewards import register
from densegrpo_fast.rewards.images import check_batch, process_cuda_index, refused, to_uint8

_STRAIGHT = re.compile(r'"([^"]*)"')
_TYPOGRAPHIC = re.compile(r'[“„«]([^“”„«»"]*)[”“»"]')  # (closed by a straight one too: mixed typing)
NORMALIZATIONS = ("flow_grpo", "max_len")


class Recognizer(Protocol):
    def read(self, images: torch.Tensor) -> list[str]: ...


def quoted_text(prompt: str) -> str:
    """The text between the first pair of straight double quotes of ``prompt`` (Flow-GRPO's target), else of
    typographic ones."""
    m = _STRAIGHT.search(prompt) or _TYPOGRAPHIC.search(prompt)
    if m is None or not normalize_text(m.group(1)):
        raise ValueError(
            f"OCR prompt {prompt!r} has no text between double quotes: the OCR reward scores the image "
            "against the quoted text (e.g. 'a sign saying \"Open\"'); quote the target text in every prompt"
        )
    return m.group(1)


def normalize_text(text: str) -> str:
    """Lower-case and remove every whitespace character (Flow-GRPO's normalisation, see the module doc)."""
    return "".join(text.split()).lower()


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each of cost 1), two-row dynamic programme."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_score(target: str, recognized: str, normalization: str = "flow_grpo") -> float:
    """Score in [0, 1] of ``recognized`` against ``target`` (both normalised here; see the module doc)."""
    t, r = normalize_text(target), normalize_text(recognized)
    if not t:
        raise ValueError(f"OCR target {target!r} is empty after normalisation: nothing to score against")
    if normalization == "flow_grpo":
        return 1.0 if t in r else 1.0 - min(levenshtein(r, t), len(t)) / len(t)
    if normalization == "max_len":
        return 1.0 - levenshtein(r, t) / max(len(t), len(r))
    raise ValueError(f"reward.kwargs.normalization={normalization!r} is not one of {NORMALIZATIONS}")


class EasyOcrRecognizer:
    """EasyOCR (``pip install 'densegrpo-fast[ocr]'``), offline by default.

    ``languages``: EasyOCR language codes (a list; one code as a string is taken as one); ``gpu``: None =
    when CUDA is available, on the current CUDA device (a torchrun process's own), or a device such as
    ``"cuda:1"``. EasyOCR wraps its networks in ``DataParallel`` over every visible GPU, which fails on any
    device but cuda:0 (EasyOCR issues #295, #1456); they are unwrapped here, so each process reads on its
    own GPU. ``model_dir``: where the
    detector and recognizer weights are (EasyOCR's default ``~/.EasyOCR/model``); ``download``: let EasyOCR
    fetch missing weights (off: no network unless asked); ``min_confidence``: recognised pieces at or below
    it are dropped (Flow-GRPO keeps confidence > 0).

    Each image is read as ``Reader.readtext`` reads an image file, with its defaults: the detector sees the
    RGB image, the recognizer its grey copy (:func:`grey`). ``readtext`` itself cannot be given an array: it
    takes a 3-channel array as BGR for the grey copy, which swaps red's and blue's weights (pure red text
    becomes 29 grey, not 76).
    """

    def __init__(
        self,
        languages: tuple[str, ...] | list[str] = ("en",),
        gpu: bool | None = None,
        model_dir: str | None = None,
        download: bool = False,
        min_confidence: float = 0.0,
    ):
        try:
            import easyocr
        except ImportError:
            raise ValueError(
                "reward 'ocr' with recognizer 'easyocr' needs EasyOCR, which is not installed: "
                "pip install 'densegrpo-fast[ocr]' (or give reward.kwargs.recognizer='package.module:factory')"
            ) from None
        if isinstance(languages, str):
            languages = [languages]  # (not its letters)
        if gpu is None or gpu is True:
            gpu = f"cuda:{process_cuda_index()}" if torch.cuda.is_available() else False
        try:
            self.reader = easyocr.Reader(
                list(languages),
                gpu=gpu,
                model_storage_directory=model_dir,
                download_enabled=download,
                verbose=False,
            )
        except (FileNotFoundError, OSError) as e:
            raise ValueError(
                f"EasyOCR could not load its weights (model_dir={model_dir!r}, download={download}): {e}. Fix: "
                "set reward.kwargs.recognizer_kwargs.download=true once (it fetches to model_dir or "
                "~/.EasyOCR/model), or copy the weights there"
            ) from None
        for name in ("detector", "recognizer"):  # one GPU, this process's: not DataParallel over all of them
            net = getattr(self.reader, name, None)
            if isinstance(net, torch.nn.DataParallel):
                setattr(self.reader, name, net.module)
        self.min_confidence = float(min_confidence)

    def read(self, images: torch.Tensor) -> list[str]:
        texts = []
        for arr in to_uint8(images).permute(0, 2, 3, 1).numpy():  # [B, H, W, 3] uint8
            horizontal, free = self.reader.detect(arr, reformat=False)  # (one image: lists of one)
            pieces = self.reader.recognize(grey(arr), horizontal[0], free[0], detail=1, reformat=False)
            texts.append("".join(text for _, text, conf in pieces if conf > self.min_confidence))
        return texts


def grey(rgb):
    """The grey copy of an 8-bit RGB array [..., 3] as OpenCV makes it (``cv2.COLOR_RGB2GRAY``; EasyOCR reads
    an image file's grey copy with ``cv2.imread(..., IMREAD_GRAYSCALE)``, the same ITU-R 601 weights): 15-bit
    fixed point, rounded half up. Equal to OpenCV 4.10's and 5.1's ``cvtColor`` on 10^6 random pixels; 14- or
    16-bit weights, or rounding in floats, differ on 0.1-0.3 % of them."""
    import numpy as np

    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    return ((r * 9798 + g * 19235 + b * 3735 + (1 << 14)) >> 15).astype(np.uint8)


class PaddleOcrRecognizer:
    """PaddleOCR as Flow-GRPO runs it: English, no angle classifier, each image's recognised pieces with a
    confidence above ``min_confidence`` (Flow-GRPO: 0) joined without separators, nothing read = "".

    Install what Flow-GRPO pins, ``pip install paddlepaddle-gpu==2.6.2 paddleocr==2.9.1`` (``paddlepaddle``
    on a machine without CUDA); not an extra of this package (Paddle's wheels are per CUDA version).
    PaddleOCR 2.x fetches its detection and recognition models on first use; without network give their
    folders in ``options`` (``det_model_dir``, ``rec_model_dir``), which go to ``PaddleOCR(...)`` as they
    are. Images go to ``PaddleOCR.ocr`` as 8-bit RGB arrays, as Flow-GRPO hands them over; its answer per
    image is ``[[box, (text, confidence)], ...]``, or ``None`` when nothing is read. PaddleOCR 3.x changed
    the constructor's arguments and the answer: it is refused with the fix. ``gpu``: None = when CUDA is
    available (``use_gpu``).
    """

    def __init__(self, lang: str = "en", gpu: bool | None = None, min_confidence: float = 0.0, **options):
        try:
            import paddleocr
            from paddleocr import PaddleOCR
        except ImportError as e:
            raise ValueError(
                f"reward 'ocr' with recognizer 'paddleocr' needs PaddleOCR ({type(e).__name__}: {e}): "
                "pip install paddlepaddle-gpu==2.6.2 paddleocr==2.9.1 (Flow-GRPO's versions; paddlepaddle "
                "without CUDA), or use recognizer 'easyocr'"
            ) from None
        version = _installed_version("paddleocr") or str(getattr(paddleocr, "__version__", ""))
        if version and not version.startswith("2."):
            raise ValueError(
                f"PaddleOCR {version} is installed; the 'paddleocr' recognizer follows PaddleOCR 2.x, as "
                "Flow-GRPO runs it: pip install paddleocr==2.9.1 (or give a recognizer factory for 3.x)"
            )
        kwargs = dict(use_angle_cls=False, lang=lang, show_log=False)
        kwargs["use_gpu"] = torch.cuda.is_available() if gpu is None else gpu
        if kwargs["use_gpu"] and torch.cuda.is_available():
            kwargs["gpu_id"] = process_cuda_index()  # a torchrun process's own GPU, not every one's 0
        kwargs.update(options)
        self.ocr = PaddleOCR(**kwargs)
        self.min_confidence = float(min_confidence)

    def read(self, images: torch.Tensor) -> list[str]:
        return [
            self._text(self.ocr.ocr(arr, cls=False)) for arr in to_uint8(images).permute(0, 2, 3, 1).numpy()
        ]

    def _text(self, result) -> str:
        page = result[0] if result else None  # one image in, one page out: [box, (text, confidence)] per line
        if not page:
            return ""
        return "".join(text for _, (text, conf) in page if conf > self.min_confidence)


def _installed_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


#: The recognizers named in ``reward.kwargs.recognizer`` (else a factory ``package.module:callable``).
RECOGNIZERS = {"easyocr": EasyOcrRecognizer, "paddleocr": PaddleOcrRecognizer}


def _build_recognizer(recognizer, recognizer_kwargs: dict) -> Recognizer:
    if not isinstance(recognizer, str):
        if not callable(getattr(recognizer, "read", None)):
            raise ValueError(f"recognizer {recognizer!r} has no read(images) -> list[str] method")
        return recognizer
    if recognizer in RECOGNIZERS:
        return RECOGNIZERS[recognizer](**recognizer_kwargs)
    if ":" in recognizer:
        from densegrpo_fast.rewards.server import load_object

        return _build_recognizer(load_object(recognizer)(**recognizer_kwargs), {})
    raise ValueError(
        f"reward.kwargs.recognizer={recognizer!r}: use 'easyocr', 'paddleocr' or a factory "
        "'package.module:callable' returning an object with read(images) -> list[str]"
    )


def _ocr_problems(recognizer="easyocr", recognizer_kwargs=None, normalization="flow_grpo") -> list[str]:
    """(The reward's ``check``: what ``validate`` finds without building a recognizer.)"""
    out = []
    if normalization not in NORMALIZATIONS:
        out.append(f"reward.kwargs.normalization={normalization!r} is not one of {NORMALIZATIONS}")
    if recognizer_kwargs is not None and not isinstance(recognizer_kwargs, dict):
        out.append(f"reward.kwargs.recognizer_kwargs={recognizer_kwargs!r} must be a mapping of keywords")
    if isinstance(recognizer, str) and recognizer not in RECOGNIZERS and ":" not in recognizer:
        out.append(
            f"reward.kwargs.recognizer={recognizer!r}: use 'easyocr', 'paddleocr' or a factory "
            "'package.module:callable'"
        )
    return out


@register("ocr")
class OcrReward:
    """OCR: how well the image spells the text between the prompt's first pair of quotes, in [0, 1] (by
    default Flow-GRPO's: 1 when the text is read, else 1 - its edit distance over its length; EasyOCR, the
    ``[ocr]`` extra, or PaddleOCR, Flow-GRPO's recognizer).

    kwargs (see the module doc): ``recognizer``, ``recognizer_kwargs``, ``normalization``."""

    check = staticmethod(_ocr_problems)

    def __init__(
        self,
        recognizer: str | Recognizer = "easyocr",
        recognizer_kwargs: dict | None = None,
        normalization: str = "flow_grpo",
    ):
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"reward.kwargs.normalization={normalization!r} is not one of {NORMALIZATIONS}")
        self.normalization = normalization
        self.recognizer = _build_recognizer(recognizer, dict(recognizer_kwargs or {}))

    @staticmethod
    def check_prompts(prompts: list[str]) -> list[str]:
        """The prompts this reward cannot score (no quoted text; see :func:`images.refused`)."""
        return refused(prompts, quoted_text)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        targets = [quoted_text(p) for p in prompts]  # fail on a bad prompt before running OCR
        texts = self.recognizer.read(images)
        if len(texts) != len(targets):
            raise ValueError(f"the recognizer read {len(texts)} texts from {len(targets)} images")
        scores = [ocr_score(t, r, self.normalization) for t, r in zip(targets, texts, strict=True)]
        return torch.tensor(scores, dtype=torch.float32, device=images.device)
