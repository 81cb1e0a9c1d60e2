"""JPEG compressibility and incompressibility (DDPO's weight-free rewards).

The reward is the size of the image encoded as JPEG at a fixed ``quality`` (default 95, DDPO's), in kB of
1000 bytes: ``jpeg_compressibility`` = -size, ``jpeg_incompressibility`` = +size. Images are quantised to
uint8 (``round(255 * clamp(x, 0, 1))``) in one batched op; the encoding itself is PIL's libjpeg, one call
per image (an encoder has no batched form). PIL releases the GIL while it encodes, but a 512 px image takes
a few milliseconds, so a plain loop is kept.
"""

from __future__ import annotations

import io

import torch

from densegrpo_fast.rewards import register
from densegrpo_fast.rewards.images import check_batch, to_uint8


def jpeg_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Encoded JPEG size of each image in kB (1000 bytes). Shape: [B, 3, H, W] -> [B] float32 (CPU)."""
    from PIL import Image

    sizes = []
    for arr in to_uint8(images).permute(0, 2, 3, 1).numpy():  # [B, H, W, 3]
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


def _quality_problems(quality: int = 95) -> list[str]:
    """(The rewards' ``check``: ``validate`` names a bad quality.)"""
    try:
        _check_quality(quality)
    except ValueError as e:
        return [str(e)]
    return []


def _check_quality(quality: int) -> int:
    if isinstance(quality, bool) or not (isinstance(quality, int) and 1 <= quality <= 100):
        raise ValueError(
            f"reward.kwargs.quality={quality!r} must be an integer in [1, 100] (PIL's JPEG quality scale): "
            "use 95 as DDPO does"
        )
    return quality


def _jpeg_size_reward(sign: float, quality: int):
    quality = _check_quality(quality)

    def reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_batch(images, prompts)
        return sign * jpeg_kb(images, quality).to(images.device)

    return reward


@register("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95):
    """Minus the JPEG size in kB at ``quality``: higher for images that compress well (flat, smooth)."""
    return _jpeg_size_reward(-1.0, quality)


@register("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95):
    """The JPEG size in kB at ``quality``: higher for detailed, high-frequency images."""
    return _jpeg_size_reward(1.0, quality)


jpeg_compressibility.check = _quality_problems
jpeg_incompressibility.check = _quality_problems
