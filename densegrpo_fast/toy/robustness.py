"""Measure the detector reward on ground-truth renders, under noise and blur, and on junk.

``python -m densegrpo_fast.toy.robustness [--n 1200] [--seed 0]`` prints the table quoted in the toy README.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from densegrpo_fast.toy.detector import detect, score
from densegrpo_fast.toy.world import BACKGROUND, COLORS, IMAGE_SIZE, eval_prompts, render, sample_prompts


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (7 taps, replicate padding) of [B, C, H, W]."""
    r = torch.arange(-3, 4, dtype=torch.float32)
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    flat = F.pad(x.reshape(-1, 1, *x.shape[2:]), (3, 3, 3, 3), mode="replicate")
    return F.conv2d(F.conv2d(flat, k.view(1, 1, 1, 7)), k.view(1, 1, 7, 1)).view_as(x)


def patch_junk(n: int, block: int, g: torch.Generator) -> torch.Tensor:
    """Random palette colours in ``block`` x ``block`` cells: what a patch-grid artefact looks like."""
    palette = torch.tensor([BACKGROUND, *COLORS.values()])
    idx = torch.randint(0, len(palette), (n, IMAGE_SIZE // block, IMAGE_SIZE // block), generator=g)
    return palette[idx].permute(0, 3, 1, 2).repeat_interleave(block, 2).repeat_interleave(block, 3)


def measure(n: int = 1200, seed: int = 0) -> list[tuple[str, float, float, float]]:
    """Rows (condition, strict, partial, detections per image) over ``n`` prompts (half train, half test)."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    prompts = sample_prompts("train", n // 2, rng) + eval_prompts(n - n // 2, seed)
    texts = [p.text for p in prompts]
    gt = render(prompts, rng)
    cases: list[tuple[str, torch.Tensor]] = [("ground truth", gt)]
    for std in (0.05, 0.1, 0.15, 0.2):
        cases.append((f"noise std {std}", (gt + std * torch.randn(gt.shape, generator=g)).clamp(0, 1)))
    for sigma in (0.5, 1.0, 1.5):
        cases.append((f"blur sigma {sigma}", gaussian_blur(gt, sigma)))
    for block in (2, 4, 8):
        cases.append((f"junk: {block} px patch grid", patch_junk(n, block, g)))
    cases.append(("junk: uniform noise", torch.rand(gt.shape, generator=g)))
    rows = []
    for name, img in cases:
        s = score(img, texts)
        dets = detect(img).valid.sum(1).float().mean().item()
        rows.append((name, s["strict"].mean().item(), s["partial"].mean().item(), dets))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| condition | strict | partial | detections / image |\n|---|---|---|---|")
    for name, strict, partial, dets in measure(args.n, args.seed):
        print(f"| {name} | {strict:.3f} | {partial:.3f} | {dets:.2f} |")


if __name__ == "__main__":
    main()
