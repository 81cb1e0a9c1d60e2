"""GenEval-style detector reward for the toy world, with no learned weights, batched over tensors.

Pipeline (all on [B, ...] tensors, no loop over images):

1. **Colour segmentation.** Every pixel is matched to each palette colour's line from the background
   (``bg + alpha * (colour - bg)``, alpha in [0, 1]); it takes the nearest line's colour if it lies within
   ``color_tol`` (RGB distance) of it and at least ``min_alpha`` of the way from the background, and belongs
   to nothing otherwise. Thresholding at half intensity keeps a blurred shape's outline where the sharp
   one was (the 0.5 iso-contour of a blurred edge stays on the edge), so shapes survive blur.
2. **Connected components** per colour (8-connectivity), by iterated max-pooling of pixel ids.
3. **Gates**, so junk never counts as an object: area >= ``min_area`` px, both box sides within
   [``min_side``, ``max_side``], box aspect <= ``max_aspect``, and **template IoU** >= ``min_iou``. The
   template IoU compares the component with the ideal circle, square and triangle drawn in its own bounding
   box (:func:`densegrpo_fast.toy.world.shape_mask`, the renderer's definition); it acts as the solidity
   gate (a blob with holes or a ragged outline matches no template) and as the shape classifier (the best
   template wins). Patch-grid artefacts (4 x 4 blocks) fail the size gates; two objects merged into one blob
   fail the aspect, side or IoU gate; fragments fail the size gates.
4. **Scoring.** Each prompt's requirements (parsed from the prompt string) are checked against the
   detections: ``strict`` = all met (0/1), ``partial`` = fraction met. Position "A left of B" holds when
   some detected A and B have ``x_B - x_A > rel_margin`` px and ``|dx| > |dy|`` (likewise for the others).

Measured on ground-truth renders, noise and blur: see ``densegrpo_fast/toy/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from densegrpo_fast.toy.world import (
    BACKGROUND,
    COLOR_NAMES,
    COLORS,
    RELATIONS,
    SHAPES,
    parse_prompt,
    shape_mask,
)

# Requirement rows encoded as integers: kind, shape, colour, count, relation, other shape.
_KINDS = ("present", "count", "color", "relation")
_MAX_REQS = 4


@lru_cache(maxsize=8)
def _template_areas(size: int) -> torch.Tensor:
    """[len(SHAPES), size+1, size+1] pixel count of each ideal shape drawn in a w x h box (w, h <= size)."""
    out = torch.zeros(len(SHAPES), size + 1, size + 1)
    for w in range(1, size + 1):
        for h in range(1, size + 1):
            u = ((torch.arange(w) + 0.5) / w)[None, :]
            v = ((torch.arange(h) + 0.5) / h)[:, None]
            for i, shape in enumerate(SHAPES):
                out[i, w, h] = shape_mask(shape, u, v).sum()
    return out


@dataclass
class Detections:
    """Objects found in a batch of images, padded to N per image.

    Shape:
        valid: [B, N] bool; shape: [B, N] long (index in SHAPES); color: [B, N] long (index in COLOR_NAMES)
        cx, cy: [B, N] float32 centroid in px (x right, y down); iou: [B, N] float32 best template IoU
    """

    valid: torch.Tensor
    shape: torch.Tensor
    color: torch.Tensor
    cx: torch.Tensor
    cy: torch.Tensor
    iou: torch.Tensor

    def counts(self) -> torch.Tensor:
        """[B, len(SHAPES), len(COLOR_NAMES)] number of detections per shape and colour."""
        B = self.valid.shape[0]
        out = torch.zeros(B, len(SHAPES) * len(COLOR_NAMES), dtype=torch.long, device=self.valid.device)
        idx = self.shape * len(COLOR_NAMES) + self.color
        out.scatter_add_(1, idx.clamp(min=0), self.valid.long())
        return out.view(B, len(SHAPES), len(COLOR_NAMES))


@dataclass
class DetectorSettings:
    """Gates of :func:`detect` (defaults tuned on renders, noise, blur and junk: see the toy README)."""

    color_tol: float = 0.3  # max RGB distance to a palette colour's background-to-colour line
    min_alpha: float = 0.5  # min fraction of the way from background to the colour
    min_area: int = 36  # px; world objects are >= 45 px
    min_side: int = 7  # px, short box side; world objects are 10-13 px, blur can take a triangle's apex
    min_long_side: int = 9  # px, long box side; patch artefacts (and L's of them) are 4 or 8
    max_side: int = 16  # px; two merged objects are wider
    max_aspect: float = 1.45  # box long side / short side; world objects <= 10/9, 3 patches in a row 1.5
    min_iou: float = 0.76  # template IoU; an L of three 4 px blocks scores 0.75 against the square
    rel_margin: float = 3.0  # px a relation's centroid offset must exceed


def _components(masks: torch.Tensor) -> torch.Tensor:
    """8-connected component ids of boolean ``masks`` [M, H, W]: each pixel gets the largest flat index
    (1-based) in its component, 0 off the mask. Iterates max-pooling until nothing changes."""
    M, H, W = masks.shape
    ids = torch.arange(1, H * W + 1, dtype=torch.float32, device=masks.device).view(1, H, W).expand(M, H, W)
    lab = torch.where(masks, ids, torch.zeros((), device=masks.device))
    for i in range(H * W):
        new = torch.where(masks, F.max_pool2d(lab[:, None], 3, 1, 1)[:, 0], lab)
        if i % 4 == 3 and torch.equal(new, lab):
            break
        lab = new
    return lab.long()


def detect(images: torch.Tensor, settings: DetectorSettings | None = None) -> Detections:
    """Find the objects in ``images`` [B, 3, H, W] float in [0, 1]."""
    s = settings or DetectorSettings()
    images = images.float()
    B, _, H, W = images.shape
    dev = images.device
    K = len(COLOR_NAMES)
    bg = torch.tensor(BACKGROUND, device=dev)
    pal = torch.tensor([COLORS[c] for c in COLOR_NAMES], device=dev) - bg  # [K, 3]
    x = (images - bg.view(1, 3, 1, 1)).permute(0, 2, 3, 1).reshape(B, H * W, 1, 3)
    # Each pixel's position along every palette colour's line from the background, and its distance to it.
    alpha = ((x * pal).sum(-1) / (pal * pal).sum(-1)).clamp(0, 1)  # [B, H*W, K]
    resid = (x - alpha[..., None] * pal).norm(dim=-1)  # [B, H*W, K]
    resid, nearest = resid.min(-1)
    alpha = alpha.gather(-1, nearest[..., None])[..., 0]
    fg = (alpha >= s.min_alpha) & (resid < s.color_tol)
    nearest = torch.where(fg, nearest, torch.full_like(nearest, -1))
    masks = nearest.view(B, 1, H, W) == torch.arange(K, device=dev).view(1, K, 1, 1)  # [B, K, H, W]

    flat_masks = masks.view(B * K, H, W)
    used = flat_masks.flatten(1).any(1)  # most (image, colour) masks are empty: skip them
    lab = torch.zeros(B * K, H, W, dtype=torch.long, device=dev)
    lab[used] = _components(flat_masks[used])
    lab = lab.view(B * K, H * W)  # ids in 0..H*W
    slots = H * W + 1
    gid = (torch.arange(B * K, device=dev)[:, None] * slots + lab).view(-1)  # global component id per pixel
    on = masks.view(-1)
    ys, xs = torch.meshgrid(torch.arange(H, device=dev), torch.arange(W, device=dev), indexing="ij")
    xs = xs.reshape(1, -1).expand(B * K, -1).reshape(-1).float()
    ys = ys.reshape(1, -1).expand(B * K, -1).reshape(-1).float()
    n = B * K * slots
    gid_on, x_on, y_on = gid[on], xs[on], ys[on]

    def reduce(vals: torch.Tensor, how: str, init: float) -> torch.Tensor:
        out = torch.full((n,), init, device=dev)
        return out.scatter_reduce_(0, gid_on, vals, how, include_self=True)

    area = reduce(torch.ones_like(x_on), "sum", 0.0)
    sx, sy = reduce(x_on, "sum", 0.0), reduce(y_on, "sum", 0.0)
    x0, x1 = reduce(x_on, "amin", float(W)), reduce(x_on, "amax", -1.0)
    y0, y1 = reduce(y_on, "amin", float(H)), reduce(y_on, "amax", -1.0)
    bw, bh = (x1 - x0 + 1).clamp(min=1), (y1 - y0 + 1).clamp(min=1)

    # Template IoU: each on-pixel's centre in its component's box coordinates, tested against each shape.
    # The box may be extended upward by up to 2 px: a triangle's one-pixel apex is the first thing lost to
    # blur or a generator's soft edges, and the rest of the triangle should still match.
    size = max(H, W)
    areas = _template_areas(size + 2).to(dev)
    u = (x_on + 0.5 - x0[gid_on]) / bw[gid_on]
    ious, exts = [], []
    for i, shape in enumerate(SHAPES):
        best = torch.zeros(n, device=dev)
        best_ext = torch.zeros(n, device=dev)
        for ext in range(3) if shape == "triangle" else range(1):
            v = (y_on + 0.5 - y0[gid_on] + ext) / (bh[gid_on] + ext)
            inter = reduce(shape_mask(shape, u, v).float(), "sum", 0.0)
            ideal = areas[i, bw.long().clamp(max=size), (bh.long() + ext).clamp(max=size + 2)]
            iou_e = inter / (area + ideal - inter).clamp(min=1e-6)
            best_ext = torch.where(iou_e > best, float(ext), best_ext)
            best = torch.maximum(best, iou_e)
        ious.append(best)
        exts.append(best_ext)
    iou, shape_idx = torch.stack(ious, -1).max(-1)  # [n]
    bh = bh + torch.stack(exts, -1).gather(-1, shape_idx[:, None])[:, 0]  # the matched template's box

    aspect = torch.maximum(bw, bh) / torch.minimum(bw, bh)
    keep = (
        (area >= s.min_area)
        & (torch.minimum(bw, bh) >= s.min_side)
        & (torch.maximum(bw, bh) >= s.min_long_side)
        & (torch.maximum(bw, bh) <= s.max_side)
        & (aspect <= s.max_aspect)
        & (iou >= s.min_iou)
    )
    keep = keep.view(B, K * slots)
    N = max(int(keep.sum(1).max()), 1)
    # Pad to N per image: the kept components first (stable order by id), then filler.
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :N]  # [B, N]
    flat = (torch.arange(B, device=dev)[:, None] * (K * slots) + order).view(-1)

    def take(t: torch.Tensor) -> torch.Tensor:
        return t[flat].view(B, N)

    a = take(area).clamp(min=1)
    return Detections(
        valid=keep.gather(1, order),
        shape=take(shape_idx),
        color=(order // slots),
        cx=take(sx) / a + 0.5,
        cy=take(sy) / a + 0.5,
        iou=take(iou),
    )


def encode_requirements(
    prompts: list[str], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Requirement rows of ``prompts``: ints [B, 4, 6] (kind, shape, colour, count, relation, other) and a
    mask [B, 4] of the rows in use. Parses each prompt string (cached)."""
    rows = torch.zeros(len(prompts), _MAX_REQS, 6, dtype=torch.long)
    mask = torch.zeros(len(prompts), _MAX_REQS, dtype=torch.bool)
    for i, text in enumerate(prompts):
        for j, r in enumerate(parse_prompt(text).requirements):
            rows[i, j] = torch.tensor(
                [
                    _KINDS.index(r.kind),
                    SHAPES.index(r.shape),
                    COLOR_NAMES.index(r.color) if r.color else 0,
                    r.count or 0,
                    RELATIONS.index(r.relation) if r.relation else 0,
                    SHAPES.index(r.other) if r.other else 0,
                ]
            )
            mask[i, j] = True
    return rows.to(device), mask.to(device)


def check_requirements(
    det: Detections, rows: torch.Tensor, mask: torch.Tensor, rel_margin: float = 3.0
) -> torch.Tensor:
    """[B, 4] bool: whether each requirement row holds for its image (False where ``mask`` is False)."""
    counts = det.counts()  # [B, S, K]
    B = counts.shape[0]
    kind, shape, color, count, rel, other = rows.unbind(-1)  # each [B, R]
    bi = torch.arange(B, device=rows.device)[:, None]
    n_shape = counts.sum(-1)[bi, shape]  # [B, R]
    n_color = counts[bi, shape, color]
    # Pairwise relations between detections: [B, N, N] dx, dy from object i to object j.
    dx = det.cx[:, None, :] - det.cx[:, :, None]
    dy = det.cy[:, None, :] - det.cy[:, :, None]
    horiz = dx.abs() > dy.abs()
    rel_ok = torch.stack(
        [
            horiz & (dx > rel_margin),  # i left of j
            horiz & (-dx > rel_margin),  # i right of j
            ~horiz & (dy > rel_margin),  # i above j
            ~horiz & (-dy > rel_margin),  # i below j
        ],
        1,
    )  # [B, 4, N, N]
    both = det.valid[:, :, None] & det.valid[:, None, :]
    is_a = det.shape[:, None, :] == shape[:, :, None]  # [B, R, N]
    is_b = det.shape[:, None, :] == other[:, :, None]
    pair = rel_ok[bi, rel] & both[:, None] & is_a[..., :, None] & is_b[..., None, :]  # [B, R, N, N]
    results = torch.stack(
        [n_shape >= 1, n_shape == count, n_color >= 1, pair.flatten(2).any(-1)], -1
    )  # [B, R, kinds]
    return results.gather(-1, kind[..., None])[..., 0] & mask


def score(
    images: torch.Tensor, prompts: list[str], settings: DetectorSettings | None = None
) -> dict[str, torch.Tensor]:
    """``{"strict", "partial", "exact", "count_exact", "partial_exact": [B]}`` float32 scores of ``images``
    [B, 3, H, W] against ``prompts``, and ``"extra"`` [B]: 1 where the image holds more accepted objects than the
    prompt asks for (the clutter that ``strict`` lets pass and ``exact`` does not)."""
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != len(prompts):
        raise ValueError(
            f"images must be [B, 3, H, W] with B = len(prompts) = {len(prompts)}, got {tuple(images.shape)}"
        )
    s = settings or DetectorSettings()
    det = detect(images, s)
    rows, mask = encode_requirements(prompts, images.device)
    ok = check_requirements(det, rows, mask, s.rel_margin)
    met = ok.sum(1).float()
    total = mask.sum(1).float()
    strict = met == total
    # Objects the prompt asks for: N for "N <shape>s", else one per named shape ("present" rows).
    kind, count = rows[..., 0], rows[..., 3]
    is_count = (kind == _KINDS.index("count")) & mask
    named = ((kind == _KINDS.index("present")) & mask).sum(1)
    wanted = torch.where(is_count.any(1), (count * is_count).sum(1), named)
    found = det.valid.sum(1)
    exact = strict & (found == wanted)
    count_exact = torch.where(is_count.any(1), exact, strict)
    # Partial credit where each object beyond the asked ones counts as one more unmet requirement, so that
    # the strict pass with nothing extra is the only score of 1 and clutter always costs.
    surplus = (found - wanted).clamp(min=0)
    return {
        "strict": strict.float(),
        "partial": met / total,
        "exact": exact.float(),
        "count_exact": count_exact.float(),
        "partial_exact": met / (total + surplus),
        "extra": (surplus > 0).float(),
    }


MODES = ("partial", "strict", "exact", "count_exact", "partial_exact")


class ToyGenEvalReward:
    """Reward callable: ``reward(images [B, 3, H, W] in [0, 1], prompts) -> [B] float32``.

    ``mode="partial"`` (default) gives the fraction of the prompt's requirements met, as in the
    partial-credit GenEval reward Flow-GRPO trains on; ``mode="strict"`` gives 0/1; ``mode="exact"`` is strict
    and also fails an image holding more objects than the prompt asks for (GenEval does not penalise extra
    objects but in counting: this closes the clutter hack for a training reward); ``mode="count_exact"`` is
    exact on counting prompts and strict on the others (a count is wrong when other shapes crowd the canvas,
    while a relation or a colour binding is not); ``mode="partial_exact"`` is partial credit in which every
    object beyond the asked ones counts as one more unmet requirement (met / (requirements + surplus): a
    graded reward whose only 1 is the exact pass). Knows nothing of models:
    each prompt's requirements come from parsing the prompt string.
    """

    def __init__(self, mode: str = "partial", settings: DetectorSettings | None = None):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} must be one of {', '.join(map(repr, MODES))}")
        self.mode = mode
        self.settings = settings or DetectorSettings()

    @staticmethod
    def check_prompts(prompts: list[str]) -> list[str]:
        """The prompts that are no toy-world prompt (see :func:`densegrpo_fast.rewards.images.refused`)."""
        from densegrpo_fast.rewards.images import refused

        return refused(prompts, parse_prompt)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return score(images, prompts, self.settings)[self.mode]
