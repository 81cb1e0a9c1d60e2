"""The toy world: a fixed vocabulary, GenEval-style prompts with machine-readable requirements, a seeded
train/test split of unseen combinations, and a renderer of small RGB images of coloured shapes.

Layout. Images are ``IMAGE_SIZE`` x ``IMAGE_SIZE`` (32 x 32) on a black background. Objects are squares,
circles and upward triangles of side 10-13 px, each in its own cell of a 2 x 2 grid of 16 px cells with a
random offset inside the cell (so objects never touch: at least 2 px apart). Large objects on a coarse
layout keep the three shape classes apart at this resolution (at 7-11 px they blur into one another) and
make "left of" / "above" a matter of cells, which a 3.5 M-parameter model can learn on two CPU cores.

Prompts follow GenEval's six categories; each prompt is a :class:`ToyPrompt` whose ``requirements`` are what
the detector reward checks (``densegrpo_fast.toy.detector``):

=============  ==============================  =============================================
category       example                         requirements (each worth the same partial credit)
=============  ==============================  =============================================
single_object  ``a circle``                    circle present
two_object     ``a circle and a square``       circle present; square present
counting       ``three triangles``             triangle present; exactly 3 triangles
colors         ``a red circle``                circle present; a red circle present
position       ``a circle left of a square``   circle present; square present; a circle left of a square
color_attr     ``a red circle and a blue square``  circle; square; a red circle; a blue square
=============  ==============================  =============================================

Prompts of the colour-free categories are rendered with random colours. The test split holds the
combinations the training prompts never name: six colour-shape pairings (in ``colors`` and in
``color_attr`` prompts that contain one of them), six position triples (each one's converse, e.g.
"a square right of a circle" for "a circle left of a square", stays in training), three (shape, count)
pairs and two ordered object pairs. The three single-object prompts cannot be held out and appear in both.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

IMAGE_SIZE = 32
CELL = 16  # the 2 x 2 layout grid
MIN_SIDE, MAX_SIDE = 10, 13  # object bounding-box side, px (inclusive)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
#: Palette: name -> RGB in [0, 1]. Pairwise distances >= 0.5, >= 0.9 from the background.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.75, 0.20),
    "blue": (0.20, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.15),
    "purple": (0.75, 0.20, 0.85),
    "cyan": (0.15, 0.80, 0.85),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
BACKGROUND: tuple[float, float, float] = (0.0, 0.0, 0.0)
NUMBERS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

#: Every word a prompt may contain (the prompt encoder's vocabulary, after its special tokens).
VOCAB: tuple[str, ...] = (
    ("a", "and", "of", "left", "right", "above", "below")
    + tuple(NUMBERS.values())
    + SHAPES
    + tuple(PLURALS.values())
    + COLOR_NAMES
)

# The held-out combinations (the test split). Each colour and each shape appears in the pairings.
HELD_OUT_PAIRINGS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "triangle"),
        ("green", "square"),
        ("blue", "circle"),
        ("yellow", "circle"),
        ("purple", "square"),
        ("cyan", "triangle"),
    }
)
HELD_OUT_RELATIONS: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("circle", "left of", "square"),
        ("square", "above", "triangle"),
        ("triangle", "right of", "circle"),
        ("square", "below", "circle"),
        ("triangle", "left of", "square"),
        ("circle", "above", "triangle"),
    }
)
HELD_OUT_COUNTS: frozenset[tuple[str, int]] = frozenset({("circle", 4), ("square", 3), ("triangle", 2)})
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("square", "circle"), ("triangle", "square")})


@dataclass(frozen=True)
class Requirement:
    """One checkable claim about an image.

    kind: ``present`` (>= 1 ``shape``), ``count`` (exactly ``count`` ``shape``), ``color`` (>= 1 ``shape``
    of colour ``color``) or ``relation`` (some ``shape`` is ``relation`` some ``other``).
    """

    kind: str
    shape: str
    color: str | None = None
    count: int | None = None
    relation: str | None = None
    other: str | None = None


@dataclass(frozen=True)
class ToyPrompt:
    """A prompt, its category, its requirements and the objects a ground-truth render must contain.

    ``objects`` is a tuple of (shape, colour or None); ``relation`` (for ``position``) says that
    ``objects[0]`` is ``relation`` ``objects[1]``.
    """

    text: str
    category: str
    objects: tuple[tuple[str, str | None], ...]
    relation: str | None = None

    @property
    def requirements(self) -> tuple[Requirement, ...]:
        return _requirements(self)


def _requirements(p: ToyPrompt) -> tuple[Requirement, ...]:
    shapes = list(dict.fromkeys(s for s, _ in p.objects))  # unique, in order
    reqs = [Requirement("present", s) for s in shapes]
    if p.category == "counting":
        reqs.append(Requirement("count", shapes[0], count=len(p.objects)))
    elif p.category in ("colors", "color_attr"):
        reqs += [Requirement("color", s, color=c) for s, c in p.objects]
    elif p.category == "position":
        (a, _), (b, _) = p.objects
        reqs.append(Requirement("relation", a, relation=p.relation, other=b))
    return tuple(reqs)


def _obj(shape: str, color: str | None) -> str:
    return f"a {color} {shape}" if color else f"a {shape}"


def make_prompt(
    category: str, objects: tuple[tuple[str, str | None], ...], relation: str | None = None
) -> ToyPrompt:
    """Build the canonical text for a category and its objects."""
    if category in ("single_object", "colors"):
        text = _obj(*objects[0])
    elif category in ("two_object", "color_attr"):
        text = f"{_obj(*objects[0])} and {_obj(*objects[1])}"
    elif category == "counting":
        text = f"{NUMBERS[len(objects)]} {PLURALS[objects[0][0]]}"
    elif category == "position":
        text = f"{_obj(*objects[0])} {relation} {_obj(*objects[1])}"
    else:
        raise ValueError(f"category {category!r} is not one of {CATEGORIES}")
    return ToyPrompt(text, category, tuple(objects), relation)


@lru_cache(maxsize=4096)
def parse_prompt(text: str) -> ToyPrompt:
    """Recover a prompt's category and requirements from its text (the inverse of :func:`make_prompt`).

    Raises ValueError naming the text and the grammar when the text is not a toy-world prompt.
    """
    words = text.strip().lower().split()  # (as the toy model's tokenizer reads it)
    num_by_word = {w: n for n, w in NUMBERS.items()}
    shape_by_plural = {p: s for s, p in PLURALS.items()}

    def obj(ws: list[str]) -> tuple[str, str | None] | None:
        if len(ws) == 2 and ws[0] == "a" and ws[1] in SHAPES:
            return ws[1], None
        if len(ws) == 3 and ws[0] == "a" and ws[1] in COLORS and ws[2] in SHAPES:
            return ws[2], ws[1]
        return None

    if len(words) == 2 and words[0] in num_by_word and words[1] in shape_by_plural:
        return make_prompt("counting", ((shape_by_plural[words[1]], None),) * num_by_word[words[0]])
    if (o := obj(words)) is not None:
        return make_prompt("colors" if o[1] else "single_object", (o,))
    if "and" in words:
        i = words.index("and")
        a, b = obj(words[:i]), obj(words[i + 1 :])
        if a and b and (a[1] is None) == (b[1] is None) and a[0] != b[0]:
            return make_prompt("color_attr" if a[1] else "two_object", (a, b))
    for rel in RELATIONS:
        rw = rel.split()
        for i in range(len(words) - len(rw) + 1):
            if words[i : i + len(rw)] == rw:
                a, b = obj(words[:i]), obj(words[i + len(rw) :])
                if a and b and a[1] is None and b[1] is None and a[0] != b[0]:
                    return make_prompt("position", (a, b), rel)
    raise ValueError(
        f"prompt {text!r} is not a toy-world prompt: expected one of 'a circle', 'a circle and a square', "
        f"'three circles', 'a red circle', 'a circle left of a square', 'a red circle and a blue square' "
        f"(shapes {SHAPES}, colours {COLOR_NAMES}, relations {RELATIONS}, counts {tuple(NUMBERS.values())})"
    )


@lru_cache(maxsize=1)
def prompt_split() -> dict[str, dict[str, tuple[ToyPrompt, ...]]]:
    """Every prompt of the world, split: ``{"train"|"test": {category: prompts}}`` (fixed, no randomness)."""
    train: dict[str, list[ToyPrompt]] = {c: [] for c in CATEGORIES}
    test: dict[str, list[ToyPrompt]] = {c: [] for c in CATEGORIES}
    for s in SHAPES:
        p = make_prompt("single_object", ((s, None),))
        train["single_object"].append(p)
        test["single_object"].append(p)
    for a, b in itertools.permutations(SHAPES, 2):
        (test if (a, b) in HELD_OUT_PAIRS else train)["two_object"].append(
            make_prompt("two_object", ((a, None), (b, None)))
        )
    for s, n in itertools.product(SHAPES, NUMBERS):
        (test if (s, n) in HELD_OUT_COUNTS else train)["counting"].append(
            make_prompt("counting", ((s, None),) * n)
        )
    for c, s in itertools.product(COLOR_NAMES, SHAPES):
        (test if (c, s) in HELD_OUT_PAIRINGS else train)["colors"].append(make_prompt("colors", ((s, c),)))
    for (a, b), rel in itertools.product(itertools.permutations(SHAPES, 2), RELATIONS):
        (test if (a, rel, b) in HELD_OUT_RELATIONS else train)["position"].append(
            make_prompt("position", ((a, None), (b, None)), rel)
        )
    for (s1, s2), (c1, c2) in itertools.product(
        itertools.permutations(SHAPES, 2), itertools.permutations(COLOR_NAMES, 2)
    ):
        held = (c1, s1) in HELD_OUT_PAIRINGS or (c2, s2) in HELD_OUT_PAIRINGS
        (test if held else train)["color_attr"].append(make_prompt("color_attr", ((s1, c1), (s2, c2))))
    return {
        "train": {c: tuple(v) for c, v in train.items()},
        "test": {c: tuple(v) for c, v in test.items()},
    }


def sample_prompts(split: str, n: int, rng: np.random.Generator) -> list[ToyPrompt]:
    """``n`` prompts of ``split``: a uniform category, then a uniform prompt of that category."""
    table = prompt_split()[split]
    cats = rng.integers(0, len(CATEGORIES), size=n)
    return [table[CATEGORIES[c]][rng.integers(0, len(table[CATEGORIES[c]]))] for c in cats]


def eval_prompts(n: int, seed: int = 0, split: str = "test") -> list[ToyPrompt]:
    """``n`` prompts of ``split`` (held-out by default), balanced over categories (round robin), each
    category cycling through its prompts in a seeded order. Deterministic in (n, seed, split)."""
    rng = np.random.default_rng(seed)
    table = prompt_split()[split]
    orders = {c: [table[c][i] for i in rng.permutation(len(table[c]))] for c in CATEGORIES}
    return [orders[CATEGORIES[i % 6]][(i // 6) % len(orders[CATEGORIES[i % 6]])] for i in range(n)]


# ----------------------------------------------------------------------------------------- rendering


def shape_mask(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Indicator of the ideal ``shape`` at normalised box coordinates ``u`` (right), ``v`` (down) in [0, 1].

    The one definition of the shapes: the renderer draws it and the detector matches templates against it.
    """
    if shape == "square":
        return (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":  # apex at top centre, base at the bottom
        return ((u - 0.5).abs() <= v / 2) & (v <= 1)
    raise ValueError(f"shape {shape!r} is not one of {SHAPES}")


def _draw(img: torch.Tensor, shape: str, color: str, x0: int, y0: int, side: int) -> None:
    coords = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    mask = shape_mask(shape, coords[None, :], coords[:, None])  # [side, side]
    rgb = torch.tensor(COLORS[color]).view(3, 1, 1)
    patch = img[:, y0 : y0 + side, x0 : x0 + side]
    patch[:] = torch.where(mask, rgb, patch)


def _layout(p: ToyPrompt, rng: np.random.Generator) -> list[int]:
    """Cells (0..3, row-major in the 2 x 2 grid) for ``p.objects``."""
    if p.category == "position":
        if p.relation in ("left of", "right of"):
            r = int(rng.integers(2))
            a, b = 2 * r, 2 * r + 1  # a in column 0
        else:
            c = int(rng.integers(2))
            a, b = c, 2 + c  # a in row 0
        return [a, b] if p.relation in ("left of", "above") else [b, a]
    return [int(c) for c in rng.permutation(4)[: len(p.objects)]]


def render(prompts: list[ToyPrompt], rng: np.random.Generator) -> torch.Tensor:
    """Ground-truth images of ``prompts``: [B, 3, IMAGE_SIZE, IMAGE_SIZE] float32 in [0, 1].

    Colour-free objects get a uniformly random palette colour; sizes and in-cell offsets are random.
    Deterministic in the state of ``rng``.
    """
    imgs = torch.empty(len(prompts), 3, IMAGE_SIZE, IMAGE_SIZE)
    imgs[:] = torch.tensor(BACKGROUND).view(3, 1, 1)
    for img, p in zip(imgs, prompts, strict=True):
        for (shape, color), cell in zip(p.objects, _layout(p, rng), strict=True):
            side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
            color = color or COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
            ox, oy = (int(rng.integers(1, CELL - side)) for _ in range(2))  # >= 1 px margin in the cell
            _draw(img, shape, color, (cell % 2) * CELL + ox, (cell // 2) * CELL + oy, side)
    return imgs
