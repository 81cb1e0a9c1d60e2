"""GenEval scored here: its detector, its colour classifier and its rules, as the reward ``geneval_detector``.

GenEval (Ghosh et al., 2023) checks each image against its prompt's metadata, one JSON object per prompt in
its ``evaluation_metadata.jsonl`` (Flow-GRPO's training set has the same form)::

    {"tag": "position", "prompt": "a photo of a dog right of a bench",
     "include": [{"class": "bench", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]}

``include`` clauses must all hold; an ``exclude`` clause ``{"class": c, "count": n}`` fails when ``n`` or more
``c`` are detected (the counting prompts use it: "exactly 3" is "at least 3, not 4"). ``position: [rel, j]``
places this clause's objects relative to clause ``j``'s.

**The detector** is GenEval's Mask2Former (mmdetection), which pins an old torch: this reward is meant for
``densegrpo-fast serve-reward`` in an environment of its own, and the trainer reaches it with the
``geneval`` client (:mod:`densegrpo_fast.rewards.remote`). The images go to mmdetection as 8-bit BGR arrays,
its convention for arrays (GenEval hands it PNG paths, which mmdetection reads as BGR; Flow-GRPO's server
hands it RGB arrays, so its detector sees red and blue swapped). mmdetection 2.x results (per-class ``[n,
5]`` box arrays and masks) and 3.x results (``pred_instances``) are both read, in requests of at most
``detector_batch`` images. Config and checkpoint must be of the same mmdetection major version: the layer
names differ, mmdetection loads a mismatched checkpoint with a mere warning, and the detector then finds
almost nothing, so the reward refuses to start when a parameter of the model is not in the checkpoint.

**Kept detections**, per class: score above ``threshold`` (0.3; ``counting_threshold`` 0.9 for prompts
tagged ``counting``; compared in float32, as GenEval compares its float32 scores), most confident first
(equal scores last-first, as GenEval's reversed argsort orders the short lists it sorts under the numpy it
pins, 1.23; numpy >= 1.25 may order ties otherwise), at most ``max_objects`` (16), then
greedy non-maximum suppression at IoU ``max_overlap`` (1.0: none, GenEval's default; boxes in GenEval's
inclusive pixel convention).

**Colours** are CLIP zero-shot over GenEval's ten colours: each object is pasted by its mask onto grey
``#999``, cropped to its box, and compared with the mean of three prompt templates per colour (``a photo of
a {colour} {class}``, ``a photo of a {colour}-colored {class}``, ``a photo of a {colour} object``). GenEval
uses OpenCLIP's ViT-L-14 with OpenAI's weights; these are the weights of transformers'
``openai/clip-vit-large-patch14``, which is what ``clip`` names by default, preprocessed on tensors as
OpenCLIP's transform does (:func:`densegrpo_fast.rewards.clip.clip_preprocess` with torchvision's crop).
The crop is PIL's: corners rounded to whole pixels, black outside the image; a box under one pixel wide
keeps one pixel (GenEval's transform fails on an empty crop). GenEval runs CLIP under fp16 autocast, this
reward in ``clip_dtype`` (float32 by default), so a colour call between two close colours may differ.

**Position** of A relative to B: the offset of the box centres, each axis shrunk towards 0 by
``position_threshold`` (0.1) times the two boxes' summed extent on that axis; no relation when both shrunk
components vanish; otherwise, divided by the unshrunk offset's length, a component below -0.5 is "left of" /
"above" and above 0.5 "right of" / "below" (image y grows downwards).

**Scores** (``mode``):

- ``geneval``: GenEval's own 0/1 rule. A clause of count ``n`` takes the ``n`` most confident objects of its
  class (fails with fewer); all ``n`` must have the colour; each must stand in the relation to each object of
  the target clause, which must itself have held. This is the metric of the papers' GenEval tables.
- ``exact``: 0/1, as ``geneval`` but every clause's count must be met exactly (no extra object of the class).
- ``partial`` (default; for training, after Flow-GRPO's GenEval reward): the mean of per-clause terms. A
  count term ``1 - |n - k| / n`` for ``k`` kept objects (negative beyond ``2n``: clutter costs); with a
  colour, a term ``m / n`` for ``m`` of the ``n`` objects in the colour, 0 unless ``k == n``; with a
  position, a term 1 when ``k == n``, the colour held and every pair is in the relation to the target
  clause, which held exactly, else 0. Flow-GRPO's server adds no position term when the colour failed and
  gives a failed position both a 0 and a 1; here each clause has one term per requirement. ``exclude`` clauses
  do not enter (the count term covers them).

Setup: an environment with mmdetection and mmcv and Python >= 3.10 (GenEval's own ``environment.yml`` is
Python 3.9, which this package does not run on; a setup other RL projects' GenEval servers use is
Python 3.11, torch 2.1.2, mmcv 1.x built from source and mmdetection 2.x; not tried here, where
mmdetection does not install), then ``pip install --no-deps -e /path/to/densegrpo-fast`` (the server needs torch, safetensors,
numpy and transformers). Config and checkpoint, one of two pairs: mmdetection 2.x's
``configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py`` with the v2.0 checkpoint
(``..._coco_20220504_001756-743b7d99.pth``), or 3.x's ``mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco.py``
with the v3.0 one (``..._coco_20220504_001756-c9d0c4f2.pth``, which GenEval's ``download_models.sh``
fetches)::

    densegrpo-fast serve-reward --reward geneval_detector --port 8085 --kwargs '{
        "metadata": ["/w/flow_grpo/train_metadata.jsonl", "/w/geneval/evaluation_metadata.jsonl"],
        "detector_config": "/w/mmdet/configs/mask2former/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py",
        "detector_checkpoint": "/w/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco_20220504_001756-743b7d99.pth",
        "class_names": "/w/geneval/evaluation/object_names.txt", "clip": "/w/clip-vit-large-patch14"}'

``class_names``: GenEval's ``object_names.txt`` (its names for the detector's 80 COCO classes, in order,
e.g. "computer mouse" for COCO's "mouse"); without it the detector's own names are used, and a metadata
class not among them is an error at start-up. For held-out scores start a second server with ``"mode":
"geneval"`` and name it in ``eval.rewards``.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from densegrpo_fast.rewards import register
from densegrpo_fast.rewards.images import check_batch, to_uint8

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
MODES = ("partial", "geneval", "exact")
TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
BACKGROUND = 0x99 / 255  # GenEval's grey behind a masked object


@dataclass(frozen=True)
class Settings:
    """GenEval's detection settings (its defaults)."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0
    position_threshold: float = 0.1

    def problems(self) -> list[str]:
        out = []
        for name in ("threshold", "counting_threshold", "max_overlap", "position_threshold"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                out.append(f"reward.kwargs.{name}={v!r} must be a number")
            elif name != "position_threshold" and not 0.0 <= v <= 1.0:
                out.append(f"reward.kwargs.{name}={v} must lie in [0, 1] (GenEval: 0.3, 0.9, 1.0)")
        if (
            not isinstance(self.max_objects, int)
            or isinstance(self.max_objects, bool)
            or self.max_objects < 1
        ):
            out.append(f"reward.kwargs.max_objects={self.max_objects} must be >= 1 (GenEval: 16)")
        if isinstance(self.position_threshold, (int, float)) and self.position_threshold < 0:
            out.append(
                f"reward.kwargs.position_threshold={self.position_threshold} must be >= 0 (GenEval: 0.1)"
            )
        return out


@dataclass
class Detection:
    """One detected object: ``box`` (x1, y1, x2, y2) in pixels, its score, its mask (bool [H, W]) or None."""

    box: tuple[float, float, float, float]
    score: float
    mask: torch.Tensor | None = None


@dataclass
class Verdict:
    """One image judged by the three rules (see the module doc), and why it failed GenEval's, if it did."""

    geneval: bool
    exact: bool
    partial: float
    reasons: list[str] = field(default_factory=list)

    def score(self, mode: str) -> float:
        return self.partial if mode == "partial" else float(getattr(self, mode))


# ----------------------------------------------------------------------------------------------- metadata


TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")  # GenEval's six tasks


def check_metadata(meta: object, where: str) -> dict:
    """``meta`` if it is GenEval metadata (see the module doc), else a ValueError naming ``where``."""

    def bad(rule: str) -> ValueError:
        return ValueError(
            f"{where}: {rule} (GenEval metadata: {{'prompt', 'tag', 'include': [...]}}); got {meta!r}"
        )

    if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
        raise bad("each line must be a JSON object with a 'prompt' string")
    include = meta.get("include")
    if not isinstance(include, list) or not include:
        raise bad("'include' must be a non-empty list of clauses")
    for kind in ("include", "exclude"):
        clauses = meta.get(kind, [])
        if not isinstance(clauses, list):
            raise bad(f"'{kind}' must be a list of clauses")
        for j, c in enumerate(clauses):
            if not isinstance(c, dict) or not isinstance(c.get("class"), str):
                raise bad(f"{kind}[{j}] must be an object with a 'class' name")
            n = c.get("count")
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise bad(f"{kind}[{j}].count must be an integer >= 1")
            if kind == "include" and "color" in c and c["color"] not in COLORS:
                raise bad(f"include[{j}].color must be one of GenEval's colours {list(COLORS)}")
            if kind == "include" and "position" in c:
                pos = c["position"]
                ok = isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS
                if not ok or not isinstance(pos[1], int) or not 0 <= pos[1] < j:
                    raise bad(
                        f"include[{j}].position must be [relation in {list(RELATIONS)}, index of an "
                        "earlier clause]"
                    )
    if meta.get("tag") not in TAGS:
        raise bad(
            f"'tag' must be one of GenEval's tasks {list(TAGS)} (it picks the score threshold: counting's)"
        )
    return meta


def load_metadata(paths: str | Sequence[str]) -> dict[str, dict]:
    """Metadata by prompt, from one or more JSON-lines files. A prompt given twice must have the same
    metadata in both places."""
    table: dict[str, dict] = {}
    for path in [paths] if isinstance(paths, (str, Path)) else list(paths):
        p = Path(path)
        if not p.is_file():
            raise ValueError(
                f"reward.kwargs.metadata: {str(path)!r} is not a file; give GenEval's "
                "evaluation_metadata.jsonl (or Flow-GRPO's train_metadata.jsonl): one JSON object per line"
            )
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                meta = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(
                    f"{path}, line {i}: not JSON ({e}); the file must hold one object per line"
                ) from None
            check_metadata(meta, f"{path}, line {i}")
            old = table.setdefault(meta["prompt"].strip(), meta)  # (the prompt files' prompts are stripped)
            if _rules(old) != _rules(meta):
                raise ValueError(
                    f"{path}, line {i}: prompt {meta['prompt']!r} appears earlier with other requirements; "
                    "a prompt must mean one thing: fix or drop one of the two lines"
                )
    if not table:
        raise ValueError(f"reward.kwargs.metadata={paths!r} holds no prompt")
    return table


def _rules(meta: dict) -> tuple:
    return (
        meta.get("tag"),
        json.dumps(meta["include"], sort_keys=True),
        json.dumps(meta.get("exclude", []), sort_keys=True),
    )


def metadata_classes(table: dict[str, dict]) -> set[str]:
    return {c["class"] for m in table.values() for kind in ("include", "exclude") for c in m.get(kind, [])}


# ------------------------------------------------------------------------------------------------ geometry


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes in GenEval's inclusive pixel convention (a box from x1 to x2 is x2 - x1 + 1 wide)."""

    def area(x1, y1, x2, y2):
        return max(x2 - x1 + 1, 0) * max(y2 - y1 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0.0


def relations(a: Sequence[float], b: Sequence[float], threshold: float = 0.1) -> set[str]:
    """Where box ``a`` lies relative to box ``b`` (a subset of :data:`RELATIONS`; see the module doc)."""
    offset = [(a[i] + a[i + 2]) / 2 - (b[i] + b[i + 2]) / 2 for i in (0, 1)]
    extent = [abs(a[i + 2] - a[i]) + abs(b[i + 2] - b[i]) for i in (0, 1)]
    shrunk = [math.copysign(max(abs(o) - threshold * e, 0.0), o) for o, e in zip(offset, extent, strict=True)]
    if all(abs(s) < 1e-3 for s in shrunk):
        return set()
    norm = math.hypot(*offset)
    dx, dy = shrunk[0] / norm, shrunk[1] / norm
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def keep(
    detections: dict[str, list[Detection]], tag: str | None, settings: Settings
) -> dict[str, list[Detection]]:
    """The detections GenEval counts, per class, most confident first (see the module doc)."""
    cut = _f32(settings.counting_threshold if tag == "counting" else settings.threshold)
    out = {}
    for name, dets in detections.items():
        above = [(i, d) for i, d in enumerate(dets) if _f32(d.score) > cut]
        ranked = [d for _, d in sorted(above, key=lambda t: (-t[1].score, -t[0]))][: settings.max_objects]
        kept: list[Detection] = []
        for d in ranked:
            if settings.max_overlap >= 1 or all(box_iou(d.box, k.box) < settings.max_overlap for k in kept):
                kept.append(d)
        if kept:
            out[name] = kept
    return out


def _f32(x) -> float:
    return float(np.float32(x))


# -------------------------------------------------------------------------------------------------- rules


def judge(
    meta: dict,
    objects: dict[str, list[Detection]],
    colours: Callable[[str, list[Detection]], list[str]],
    position_threshold: float = 0.1,
) -> Verdict:
    """The three verdicts of the module doc for one image. ``objects``: :func:`keep`'s output; ``colours(cls,
    dets)``: the colour name of each detection (called once per coloured clause, on its ``n`` most confident
    objects)."""
    reasons: list[str] = []
    terms: list[float] = []
    geneval = exact = True
    held: list[list[Detection] | None] = []  # per clause: its objects if it held by GenEval's rule
    held_exactly: list[list[Detection] | None] = []
    for c in meta["include"]:
        cls, n = c["class"], c["count"]
        found = objects.get(cls, [])
        k, first = len(found), found[:n]
        ok, ok_exact = k >= n, k == n
        terms.append(1 - abs(n - k) / n)
        if not ok:
            reasons.append(f"expected {cls} >= {n}, found {k}")
        if "color" in c:
            m = 0
            if ok:
                names = colours(cls, first)
                m = names.count(c["color"])
                if m < n:
                    seen = ", ".join(f"{names.count(x)} {x}" for x in COLORS if x in names)
                    reasons.append(f"expected {n} {c['color']} {cls}, found {seen}")
            ok, ok_exact = ok and m == n, ok_exact and m == n
            terms.append(m / n if k == n else 0.0)
        if "position" in c:
            rel, j = c["position"]
            if ok and held[j] is None:
                reasons.append(f"no target for {cls} {rel}: clause {j} did not hold")
            elif ok and not _related(first, held[j], rel, position_threshold):
                reasons.append(f"expected {cls} {rel} clause {j}'s objects")
            ok = ok and held[j] is not None and _related(first, held[j], rel, position_threshold)
            ok_exact = ok_exact and held_exactly[j] is not None
            ok_exact = ok_exact and _related(first, held_exactly[j], rel, position_threshold)
            terms.append(1.0 if ok_exact else 0.0)
        geneval, exact = geneval and ok, exact and ok_exact
        held.append(first if ok else None)
        held_exactly.append(first if ok_exact else None)
    for c in meta.get("exclude", []):
        k = len(objects.get(c["class"], []))
        if k >= c["count"]:
            geneval = exact = False
            reasons.append(f"expected {c['class']} < {c['count']}, found {k}")
    return Verdict(geneval, exact, sum(terms) / len(terms), reasons)


def _related(objs: list[Detection], targets: list[Detection], rel: str, threshold: float) -> bool:
    return all(rel in relations(o.box, t.box, threshold) for o in objs for t in targets)


# ------------------------------------------------------------------------------------------------- colours


class ColourClassifier:
    """GenEval's colour step on CLIP (see the module doc): ``clip`` is a transformers CLIP folder or cached
    hub id (OpenAI's ViT-L/14 by default), ``processor`` its processor folder (default the same)."""

    def __init__(self, clip: str = "openai/clip-vit-large-patch14", processor: str | None = None, *,
                 device: str | None = None, dtype: str = "float32", max_batch: int = 64):  # fmt: skip
        from densegrpo_fast.rewards.clip import ClipEncoder, clip_preprocess

        self.encoder = ClipEncoder(clip, processor, device=device, dtype=dtype, max_batch=max_batch)
        self.preprocess = functools.partial(clip_preprocess, spec=self.encoder.spec, torchvision_crop=True)

    def weights(self, cls: str) -> torch.Tensor:
        """[len(COLORS), D]: each colour's templates' normalised text embeddings, averaged, normalised. (The
        encoder keeps each template's embedding, on its current device: no cache of its own here, which a
        move of the encoder would leave on the old device.)"""
        texts = [t.format(c=c, cls=cls) for c in COLORS for t in TEMPLATES]
        emb = self.encoder.text_embeds(texts).view(len(COLORS), len(TEMPLATES), -1)
        return F.normalize(emb.mean(1), dim=-1)

    def __call__(self, image: torch.Tensor, cls: str, dets: list[Detection]) -> list[str]:
        """The colour of each detection of class ``cls`` in ``image`` ([3, H, W] in [0, 1])."""
        return self.many([(image, cls, dets)])[0]

    @torch.no_grad()
    def many(self, queries: list[tuple[torch.Tensor, str, list[Detection]]]) -> list[list[str]]:
        """:meth:`__call__` for many (image, class, detections) at once: every crop of a request goes through
        CLIP in batches of ``max_batch``, not one forward pass per clause."""
        from densegrpo_fast.rewards.clip import _embedding

        crops, owners = [], []
        for q, (image, _, dets) in enumerate(queries):
            image = image.to(self.encoder.place(image))  # crops and resizes on the model's device
            crops += [self.preprocess(object_crop(image, d)[None]) for d in dets]
            owners += [q] * len(dets)
        if not crops:
            return [[] for _ in queries]
        enc = self.encoder
        emb = torch.cat([
            _embedding(enc.model.get_image_features(pixel_values=p.to(enc.dtype))).float()
            for p in torch.cat(crops).split(enc.max_batch)
        ])  # fmt: skip
        weights = torch.stack([self.weights(queries[q][1]) for q in owners])  # [crops, colours, D]
        best = torch.einsum("nd,ncd->nc", F.normalize(emb, dim=-1), weights).argmax(1).tolist()  # one read
        out: list[list[str]] = [[] for _ in queries]
        for q, i in zip(owners, best, strict=True):
            out[q].append(COLORS[i])
        return out


def object_crop(image: torch.Tensor, det: Detection) -> torch.Tensor:
    """The object on GenEval's grey (by its mask, when it has one), cropped to its box as PIL's ``crop`` does
    (corners rounded to whole pixels, black outside the image), at least one pixel each way.
    [3, H, W] -> [3, h, w]."""
    if det.mask is not None:
        if tuple(det.mask.shape) != tuple(image.shape[-2:]):
            raise ValueError(
                f"a detection mask of shape {tuple(det.mask.shape)} for an image of "
                f"{tuple(image.shape[-2:])}: masks must have the image's size; keep the detector's test "
                "pipeline as GenEval's config has it (mmdetection rescales the masks to the input image)"
            )
        image = torch.where(det.mask.to(image.device, torch.bool), image, torch.full_like(image, BACKGROUND))
    h, w = image.shape[-2:]
    x1, y1, x2, y2 = (round(float(v)) for v in det.box[:4])
    x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
    out = image.new_zeros(image.shape[0], y2 - y1, x2 - x1)
    top, left, bottom, right = max(y1, 0), max(x1, 0), min(y2, h), min(x2, w)
    if bottom > top and right > left:
        out[:, top - y1 : bottom - y1, left - x1 : right - x1] = image[:, top:bottom, left:right]
    return out


# ------------------------------------------------------------------------------------------------ detector


class MMDetDetector:
    """mmdetection's detector built from its config and checkpoint; called on images [B, 3, H, W] in [0, 1],
    it returns each image's detections by class name (all scores; :func:`keep` selects)."""

    def __init__(
        self,
        config: str,
        checkpoint: str,
        device: str = "cuda",
        class_names: str | None = None,
        *,
        batch: int = 8,
        min_score: float = 0.0,
        check_weights: bool = True,
    ):
        try:
            from mmdet.apis import inference_detector, init_detector
        except ImportError as e:
            raise ValueError(
                f"the geneval_detector reward needs mmdetection and mmcv ({type(e).__name__}: {e}), "
                "which pin an old torch: run it as a server in an environment of its own (densegrpo-fast "
                "serve-reward --reward geneval_detector ...) and train with reward.name=geneval (see "
                "densegrpo_fast/rewards/geneval_detector.py)"
            ) from None
        for what, path in (("detector_config", config), ("detector_checkpoint", checkpoint)):
            if not Path(path).is_file():
                raise ValueError(
                    f"reward.kwargs.{what}={path!r} is not a file: give GenEval's Mask2Former config (from "
                    "mmdetection's configs/mask2former/) and the checkpoint of the same mmdetection version "
                    "(the two pairs: densegrpo_fast/rewards/geneval_detector.py)"
                )
        self.model = init_detector(str(config), str(checkpoint), device=device)
        if check_weights:
            check_checkpoint(self.model, checkpoint, config)
        self._infer, self.batch, self.min_score = inference_detector, batch, min_score
        own = _model_classes(self.model)
        if class_names is not None:
            if not Path(class_names).is_file():
                raise ValueError(
                    f"reward.kwargs.class_names={class_names!r} is not a file: give GenEval's "
                    "evaluation/object_names.txt (one class name per line, in the detector's order)"
                )
            names = [
                ln.strip() for ln in Path(class_names).read_text(encoding="utf-8").splitlines() if ln.strip()
            ]
            if own is not None and len(names) != len(own):
                raise ValueError(
                    f"reward.kwargs.class_names={class_names!r} names {len(names)} classes, the detector has "
                    f"{len(own)}: give GenEval's object_names.txt for its 80-class COCO detector"
                )
            self.class_names = names
        elif own is not None:
            self.class_names = list(own)
        else:
            raise ValueError(
                "the detector names no classes: give reward.kwargs.class_names (GenEval's object_names.txt)"
            )

    def __call__(self, images: torch.Tensor) -> list[dict[str, list[Detection]]]:
        bgr = list(to_uint8(images).permute(0, 2, 3, 1).flip(-1).contiguous().numpy())
        out = []
        for i in range(0, len(bgr), self.batch):
            results = self._infer(self.model, bgr[i : i + self.batch])
            out += [parse_result(r, self.class_names, self.min_score) for r in results]
        return out


def check_checkpoint(model: torch.nn.Module, checkpoint: str, config: str) -> None:
    """Refuse a checkpoint that leaves parameters of ``model`` unset: mmdetection loads it with a warning
    only (a 2.x config with a 3.x checkpoint, or the reverse, detects almost nothing)."""
    state = torch.load(str(checkpoint), map_location="cpu", weights_only=False)  # (as mmdetection loads it)
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    names = {k.removeprefix("module.") for k in state}
    missing = [n for n, _ in model.named_parameters() if n not in names]
    if missing:
        raise ValueError(
            f"reward.kwargs.detector_checkpoint={str(checkpoint)!r} lacks {len(missing)} of the parameters "
            f"of the model built from {str(config)!r} (e.g. {missing[:3]}): config and checkpoint are of "
            "different mmdetection versions. Fix: the 2.x config mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py with "
            "the v2.0 checkpoint (..._20220504_001756-743b7d99.pth), or the 3.x config "
            "mask2former_swin-s-p4-w7-224_8xb2-lsj-50e_coco.py with the v3.0 one "
            "(..._20220504_001756-c9d0c4f2.pth)"
        )


def _model_classes(model) -> Sequence[str] | None:
    meta = getattr(model, "dataset_meta", None)  # mmdetection 3.x
    if isinstance(meta, dict) and meta.get("classes"):
        return meta["classes"]
    return getattr(model, "CLASSES", None)  # 2.x


def parse_result(result, names: Sequence[str], min_score: float = 0.0) -> dict[str, list[Detection]]:
    """One image's mmdetection result by class name: a 3.x ``DetDataSample`` (``pred_instances`` with
    ``bboxes``, ``scores``, ``labels``, optional ``masks``) or a 2.x result (per-class ``[n, 5]`` arrays of
    x1, y1, x2, y2, score, optionally paired with per-class mask lists). Detections scoring ``min_score`` or
    less (in float32) are dropped before their masks are copied."""
    out: dict[str, list[Detection]] = {}
    floor = _f32(min_score)
    inst = getattr(result, "pred_instances", None)
    if inst is not None:
        boxes, scores = torch.as_tensor(inst.bboxes).cpu(), torch.as_tensor(inst.scores).cpu()
        labels = torch.as_tensor(inst.labels).cpu()
        masks = getattr(inst, "masks", None)
        if len(labels) and int(labels.max()) >= len(names):
            raise ValueError(
                f"the detector gave label {int(labels.max())} but {len(names)} class names are known: give "
                "reward.kwargs.class_names for this detector's classes (GenEval's object_names.txt for its "
                "COCO one)"
            )
        for i in range(len(scores)):
            if _f32(scores[i]) <= floor:
                continue
            mask = None if masks is None else torch.as_tensor(masks[i]).bool().cpu()
            box = tuple(float(v) for v in boxes[i, :4])
            out.setdefault(names[int(labels[i])], []).append(Detection(box, float(scores[i]), mask))
        return out
    boxes, masks = (
        (result[0], result[1] if len(result) > 1 else None) if isinstance(result, tuple) else (result, None)
    )
    if len(boxes) != len(names):
        raise ValueError(
            f"the detector returned {len(boxes)} classes, the class names are {len(names)}: give "
            "reward.kwargs.class_names for this detector's classes (GenEval's object_names.txt for its "
            "COCO one)"
        )
    for c, arr in enumerate(boxes):
        for i in range(len(arr)):
            if _f32(arr[i][4]) <= floor:
                continue
            mask = None if masks is None else torch.as_tensor(masks[c][i]).bool()
            box = tuple(float(v) for v in arr[i][:4])
            out.setdefault(names[c], []).append(Detection(box, float(arr[i][4]), mask))
    return out


# -------------------------------------------------------------------------------------------------- reward


class GenEvalDetectorReward:
    """Scores by the rule ``mode`` for images and prompts, each prompt looked up in ``metadata``.
    ``detect(images) -> [{class: [Detection]}]`` and ``colours(image, cls, dets) -> [colour]`` are
    :class:`MMDetDetector` and :class:`ColourClassifier` in use, stand-ins in the tests. The verdicts of the
    last batch stay in ``last_verdicts`` (with the reasons an image failed)."""

    def __init__(
        self,
        detect,
        colours,
        metadata: dict[str, dict],
        settings: Settings = Settings(),
        mode: str = "partial",
    ):
        if mode not in MODES:
            raise ValueError(
                f"reward.kwargs.mode={mode!r} is not a geneval_detector mode: choose one of {list(MODES)}"
            )
        self.detect, self.colours, self.metadata = detect, colours, metadata
        self.settings, self.mode = settings, mode
        self.last_verdicts: list[Verdict] = []

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        metas = []
        for p in prompts:
            if p.strip() not in self.metadata:
                raise ValueError(
                    f"prompt {p!r} is not in the GenEval metadata this reward was given: train on "
                    "prompts from those files (prompts.dataset may be the same .jsonl), or add its metadata "
                    "file"
                )
            metas.append(self.metadata[p.strip()])
        image = to_uint8(images).float() / 255  # the 8-bit image GenEval sees (a PNG)
        detections = self.detect(images)
        if len(detections) != len(metas):
            raise RuntimeError(f"the detector answered {len(detections)} results for {len(metas)} images")
        objects = [
            keep(dets, meta.get("tag"), self.settings) for meta, dets in zip(metas, detections, strict=True)
        ]
        # Which objects get a colour depends on the counts alone (a coloured clause whose class has at least
        # its count): all of the batch's are classified at once, and judge reads the answers.
        queries = {
            (i, c["class"], c["count"]): objs[c["class"]][: c["count"]]
            for i, (meta, objs) in enumerate(zip(metas, objects, strict=True))
            for c in meta["include"]
            if "color" in c and len(objs.get(c["class"], [])) >= c["count"]
        }
        many = getattr(self.colours, "many", None)
        asked = [(image[i], cls, dets) for (i, cls, _), dets in queries.items()]
        answers = many(asked) if many else [self.colours(*q) for q in asked]
        table = dict(zip(queries, answers, strict=True))
        verdicts = []
        for i, (meta, objs) in enumerate(zip(metas, objects, strict=True)):
            colours = functools.partial(_answer, table, i)
            verdicts.append(judge(meta, objs, colours, self.settings.position_threshold))
        self.last_verdicts = verdicts
        return torch.tensor([v.score(self.mode) for v in verdicts], dtype=torch.float32, device=images.device)


def _answer(table: dict, i: int, cls: str, dets: list[Detection]) -> list[str]:
    return table[(i, cls, len(dets))]


@register("geneval_detector")
def geneval_detector(
    metadata: str | list[str],
    detector_config: str,
    detector_checkpoint: str,
    clip: str = "openai/clip-vit-large-patch14",
    class_names: str | None = None,
    mode: str = "partial",
    device: str = "cuda",
    clip_dtype: str = "float32",
    detector_batch: int = 8,
    check_weights: bool = True,
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_objects: int = 16,
    max_overlap: float = 1.0,
    position_threshold: float = 0.1,
) -> GenEvalDetectorReward:
    """GenEval scored in this process by its Mask2Former detector and CLIP colours (needs mmdetection:
    serve it from an environment with mmdetection, train with `geneval`); `mode` partial (training), geneval
    (GenEval's 0/1 rule) or exact.

    Details, rules and the server command: :mod:`densegrpo_fast.rewards.geneval_detector`."""
    problems = _geneval_detector_check(mode, threshold, counting_threshold, max_objects, max_overlap,
                                       position_threshold, detector_batch)  # fmt: skip
    if problems:
        raise ValueError("; ".join(problems))
    settings = Settings(threshold, counting_threshold, max_objects, max_overlap, position_threshold)
    table = load_metadata(metadata)
    detector = MMDetDetector(
        detector_config, detector_checkpoint, device, class_names, batch=detector_batch,
        min_score=min(threshold, counting_threshold), check_weights=check_weights,
    )  # fmt: skip
    unknown = sorted(metadata_classes(table) - set(detector.class_names))
    if unknown:
        raise ValueError(
            f"the metadata names classes the detector does not know: {unknown[:8]}: give "
            "reward.kwargs.class_names=GenEval's evaluation/object_names.txt (its names for the detector's "
            "classes, in the detector's order)"
        )
    colours = ColourClassifier(clip, device=device, dtype=clip_dtype)
    return GenEvalDetectorReward(detector, colours, table, settings, mode)


def _geneval_detector_check(
    mode: str = "partial",
    threshold: float = 0.3,
    counting_threshold: float = 0.9,
    max_objects: int = 16,
    max_overlap: float = 1.0,
    position_threshold: float = 0.1,
    detector_batch: int = 8,
    **_: object,
) -> list[str]:
    out = Settings(threshold, counting_threshold, max_objects, max_overlap, position_threshold).problems()
    if mode not in MODES:
        out.append(f"reward.kwargs.mode={mode!r} is not a geneval_detector mode: choose one of {list(MODES)}")
    if not isinstance(detector_batch, int) or isinstance(detector_batch, bool) or detector_batch < 1:
        out.append(
            f"reward.kwargs.detector_batch={detector_batch!r} must be an integer >= 1 (images per call)"
        )
    return out


geneval_detector.check = _geneval_detector_check
