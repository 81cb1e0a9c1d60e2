"""Prompt sources: the toy world's splits or a text file, sampled deterministically per iteration.

Iteration ``i`` of stream ``s`` draws from ``numpy.random.default_rng([seed, s, i])``, so a resumed run
draws exactly the prompts it would have drawn: the sampler position is the iteration number (with
:class:`PromptPriority`, the iteration number and the priority table saved in the checkpoint).
:meth:`PromptSource.heldout` is the fixed evaluation list instead (the same prompts every call).

Editing models (FLUX.1 Kontext, FLUX.2 [klein]) take an instruction and a source image: a ``.jsonl`` prompt
file whose lines carry an ``image`` path gives :class:`EditPrompt` s, which are the instruction as a ``str``
(what the text encoders, the rewards and the logs read) carrying the image's path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

STREAMS = {"train": 0, "calibration": 1, "eval": 2}


class EditPrompt(str):
    """An editing instruction with its source image: the instruction as a ``str``, the image's path in
    ``image``.

    It compares and hashes as its text, so a reward or a table that reads prompts as text works unchanged.
    Where the image matters as well (the editing policy's encoding, prompt priority, an evaluation's resume)
    the code keys prompts by :func:`prompt_key`. A str method (``strip``, slicing) returns a plain str,
    without the image."""

    def __new__(cls, text: str, image: str):
        obj = super().__new__(cls, text)
        obj.image = image
        return obj

    def __repr__(self) -> str:
        return f"EditPrompt({str(self)!r}, image={self.image!r})"

    def __reduce__(self):  # (str's own would rebuild it from the text alone)
        return EditPrompt, (str(self), self.image)


def prompt_key(prompt: str) -> tuple[str, str | None]:
    """What identifies a prompt: its text and, for an :class:`EditPrompt`, its source image."""
    return str(prompt), getattr(prompt, "image", None)


def source_image_problem(prompt: str, model: str) -> str | None:
    """Why an editing model (``model`` names it) cannot take ``prompt``: it has no source image."""
    if isinstance(prompt, EditPrompt):
        return None
    return (
        f"{model} edits a source image, and the prompt {str(prompt)[:80]!r} has none: give a .jsonl prompt file "
        'whose lines carry one, {"prompt": "make the sky pink", "image": "sources/0001.png"} (a path '
        "relative to the file, or absolute)"
    )


def load_source(path: str, height: int, width: int):
    """An edit's source image as the editing policy takes it, a PIL image: its EXIF orientation applied (as
    diffusers' ``load_image``), in RGB, resized to cover ``height`` x ``width`` (Lanczos) and centre-cropped
    to it (diffusers' ``resize_mode="crop"``; an image of that size is untouched). A ValueError names a file
    that is not a readable image."""
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            rgb = ImageOps.exif_transpose(img).convert("RGB")
    except (OSError, Image.DecompressionBombError) as e:  # (not an image, cut short, or far too large)
        raise ValueError(
            f"the source image {path!r} cannot be read ({e}): give an image file (PNG, JPEG, WebP, ...) or drop "
            "its line from the prompt file"
        ) from None
    return VaeImageProcessor().resize(rgb, height, width, resize_mode="crop")


def source_pixels(path: str, height: int, width: int):
    """:func:`load_source` as a tensor: [3, height, width] float32 in [0, 1], on the CPU."""
    import torch

    pixels = np.asarray(load_source(path, height, width), dtype=np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1)


def source_blind(edits: bool, rewards: dict) -> str | None:
    """A warning for the rewards of ``rewards`` (name -> reward) that cannot see an edit's source image, where
    the prompts are ``edits``; None where they are not, or where every reward sees the sources (a reward that
    does says so with a true ``sees_sources`` attribute)."""
    blind = [name for name, reward in rewards.items() if not getattr(reward, "sees_sources", False)]
    if not edits or not blind:
        return None
    return (
        f"the prompts are edits of source images, and the rewards {blind} do not see the sources: each scores "
        "the edited image against the instruction as if the instruction were a caption; vlm_judge shows its "
        "judge the source (README, FLUX.1 Kontext)"
    )


def edit_mismatch(family: str, edits: bool, field: str, dataset: str) -> str | None:
    """Why the prompts of the config's ``field`` (``dataset``), which are edits (``edits``) or not, do not
    suit ``model.family=family``; None where they do."""
    from densegrpo_fast.policies import EDITING

    if EDITING.get(family) == "required" and not edits:
        return (
            f"model.family={family} edits source images, and {field}={dataset!r} gives prompts without them: "
            "give a .jsonl prompt file whose lines carry an 'image' path beside the 'prompt' (the instruction)"
        )
    if edits and family not in EDITING:
        return (
            f"{field}={dataset!r} gives source images ('image' on its lines), which model.family={family} "
            f"cannot use (it generates from text alone): use model.family {' or '.join(EDITING)}, or a prompt "
            "file without images"
        )
    return None


def _jsonl(path: Path) -> bool:
    return path.suffix.lower() == ".jsonl"


def prompt_records(path: Path, field: str) -> list[tuple[str, str | None]]:
    """Each prompt of a file with its tag: the non-empty lines of a text file (no tags), or of a ``.jsonl``
    file the ``prompt`` (stripped) and ``tag`` of each line's JSON object (GenEval's metadata files are of
    this form: the tag is its task). A line with an ``image`` (a path relative to the file, or absolute)
    gives an :class:`EditPrompt`. ``field`` names the setting in errors."""
    # lines end at "\n" only (str.splitlines also splits at form feeds, U+0085 and U+2028, which a prompt
    # or a JSON string may hold); -sig: a BOM is dropped
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8-sig").split("\n")]
    if not _jsonl(path):
        return [(ln, None) for ln in lines if ln]
    out, numbers = [], []
    for number, line in enumerate(lines, 1):
        if not line:
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{field}={str(path)!r}, line {number}: not JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise ValueError(
                f"{field}={str(path)!r}, line {number}: a .jsonl prompt file holds one JSON object per line "
                f"with a non-empty 'prompt' string (as GenEval's metadata does); got {line[:80]!r}"
            )
        tag = obj.get("tag")
        prompt = obj["prompt"].strip()
        if "image" in obj:
            image = obj["image"]
            if not isinstance(image, str) or not image.strip():
                raise ValueError(
                    f"{field}={str(path)!r}, line {number}: 'image' must be a non-empty path string (the source "
                    f"image, relative to the file or absolute), got {image!r}"
                )
            source = path.parent / image.strip()
            if not source.is_file():
                raise ValueError(
                    f"{field}={str(path)!r}, line {number}: the image {str(source)!r} is not a file: paths are "
                    "relative to the prompt file's folder (or absolute); mend the path or drop the line"
                )
            # (resolved: a run or an evaluation resumed from another working directory, or given the file
            # by another spelling, keys its prompts the same)
            prompt = EditPrompt(prompt, str(source.resolve()))
        out.append((prompt, None if tag is None else str(tag)))
        numbers.append(number)
    has = [isinstance(p, EditPrompt) for p, _ in out]
    if any(has) and not all(has):
        a, b = numbers[has.index(False)], numbers[has.index(True)]
        raise ValueError(
            f"{field}={str(path)!r}: line {a} has no 'image' and line {b} has one: a prompt file holds edits "
            "(each with its source image) or text prompts, not both"
        )
    return out


def prompt_lines(path: Path, field: str) -> list[str]:
    """The prompts of a file (:func:`prompt_records` without the tags)."""
    return [p for p, _ in prompt_records(path, field)]


def prompt_tags(path: Path, field: str = "eval.dataset") -> list[str | None] | None:
    """The tag of each prompt of a ``.jsonl`` prompt file (GenEval's task: single_object, two_object,
    counting, colors, position, color_attr), None where a line has none; None for a text file or a file
    without any tag. Aligned with :func:`prompt_lines`."""
    tags = [t for _, t in prompt_records(path, field)]
    return tags if any(t is not None for t in tags) else None


class PromptSource:
    """``dataset`` (``field`` names its setting in errors) drawn per iteration, or listed for evaluation."""

    def __init__(self, dataset: str, seed: int = 0, field: str = "prompts.dataset"):
        self.dataset = dataset
        self.seed = seed
        self._lines: list[str] | None = None
        self._pool: tuple[list[str], np.ndarray] | None = None
        if dataset.startswith("toy:"):
            split = dataset.split(":", 1)[1]
            if split not in ("train", "test"):
                raise ValueError(f"{field}={dataset!r}: the toy splits are toy:train and toy:test")
        else:
            path = Path(dataset)
            if not path.is_file():
                raise ValueError(
                    f"{field}={dataset!r} is neither toy:train / toy:test nor an existing file: pass a "
                    "text file with one prompt per line (or a .jsonl file of objects with a 'prompt')"
                )
            self._lines = prompt_lines(path, field)
            if not self._lines:
                raise ValueError(
                    f"{field}={dataset!r} holds no prompt: put one prompt per line (a .jsonl file: one "
                    "object with a 'prompt' per line)"
                )
        #: Whether the prompts are edits (:class:`EditPrompt`, each with its source image).
        self.edits = self._lines is not None and isinstance(self._lines[0], EditPrompt)

    def pool(self) -> tuple[list[str], np.ndarray]:
        """Every prompt the source can draw, with the probability :meth:`sample` draws it by (toy splits: a
        uniform category, then a uniform prompt of it; a file: uniform over its lines, repeats counted).
        Built once; the caller must not modify it."""
        if self._pool is None:
            if self._lines is None:
                from densegrpo_fast.toy import world

                table = world.prompt_split()[self.dataset.split(":", 1)[1]]
                texts = [p.text for c in world.CATEGORIES for p in table[c]]
                probs = [1 / (len(table) * len(table[c])) for c in world.CATEGORIES for _ in table[c]]
                self._pool = texts, np.asarray(probs)
            else:
                self._pool = list(self._lines), np.full(len(self._lines), 1 / len(self._lines))
        return self._pool

    def sample(
        self, n: int, iteration: int, stream: str = "train", weights: np.ndarray | None = None
    ) -> list[str]:
        """``n`` prompts of iteration ``iteration``. ``weights`` (one per :meth:`pool` entry) reweight the
        pool's probabilities, as :class:`PromptPriority` asks; None draws as the source does by itself."""
        rng = np.random.default_rng([self.seed, STREAMS[stream], iteration])
        if weights is not None:
            texts, probs = self.pool()
            probs = probs * weights
            return [texts[i] for i in rng.choice(len(texts), size=n, p=probs / probs.sum())]
        if self._lines is None:
            from densegrpo_fast.toy import world

            return [p.text for p in world.sample_prompts(self.dataset.split(":", 1)[1], n, rng)]
        idx = rng.choice(len(self._lines), size=n, replace=len(self._lines) < n)
        return [self._lines[i] for i in idx]

    def heldout(self, n: int | None) -> list[str]:
        """The evaluation list: ``n`` prompts, the same every call. Toy splits: balanced over categories
        (:func:`densegrpo_fast.toy.world.eval_prompts` with this source's seed, as the eval command uses;
        None = as many as the split has); a file: its first ``n`` lines (None = all), cycled if it has fewer."""
        if self._lines is None:
            from densegrpo_fast.toy import world

            split = self.dataset.split(":", 1)[1]
            n = sum(map(len, world.prompt_split()[split].values())) if n is None else n
            return [p.text for p in world.eval_prompts(n, self.seed, split)]
        n = len(self._lines) if n is None else n
        return [self._lines[i % len(self._lines)] for i in range(n)]


class PromptPriority:
    """Priority sampling: each prompt's draw probability scaled by how much of its recent groups trained.

    A group whose samples all score alike has zero advantages and teaches nothing (a prompt the policy
    always or never solves). This keeps, per prompt of the pool, an average of the fraction of its group's
    trained (row, step) advantages that were non-zero (``decay`` weight on the past, per visit) and draws
    prompts in proportion to ``pool probability x (signal + floor)``: unseen prompts start at signal 1,
    solved ones sink to ``floor`` and are still revisited now and then, so a regression is seen.
    """

    def __init__(self, source: PromptSource, floor: float, decay: float = 0.5):
        self.source = source
        texts, _ = source.pool()
        self.index: dict[tuple[str, str | None], list[int]] = {}
        for i, t in enumerate(texts):  # a file may repeat a line: each copy is an entry of the pool
            self.index.setdefault(prompt_key(t), []).append(i)
        self.signal = np.ones(len(texts))
        self.floor = floor
        self.decay = decay

    def sample(self, n: int, iteration: int) -> list[str]:
        return self.source.sample(n, iteration, weights=self.signal + self.floor)

    def observe(self, prompts: list[str], signal: list[float]) -> None:
        """Record each group's non-zero-advantage fraction, in [0, 1]."""
        for text, s in zip(prompts, signal, strict=True):
            i = self.index[prompt_key(text)]
            self.signal[i] = self.decay * self.signal[i] + (1 - self.decay) * s

    def state_dict(self) -> dict:
        return {"signal": self.signal.tolist()}

    def load_state_dict(self, state: dict) -> None:
        signal = np.asarray(state["signal"], dtype=np.float64)
        if signal.shape != self.signal.shape:
            raise ValueError(
                f"the checkpoint's prompt-priority table has {signal.size} prompts, the dataset "
                f"{self.source.dataset!r} {self.signal.size}: resume with the run's own prompts.dataset"
            )
        self.signal = signal
