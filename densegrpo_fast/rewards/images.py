"""Image tensor helpers shared by the rewards that leave float tensors (encoders, OCR, the HTTP client)."""

from __future__ import annotations

import torch


def check_batch(images: torch.Tensor, prompts: list[str]) -> None:
    """A reward's input contract: ``images`` [B, 3, H, W] and one prompt per image."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images of shape {shape}: a reward takes [B, 3, H, W] RGB floats in [0, 1]")
    if len(prompts) != images.shape[0]:
        raise ValueError(
            f"{images.shape[0]} images but {len(prompts)} prompts: a reward scores one pair per row"
        )


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] float in [0, 1] -> the same shape as uint8 on the CPU: ``round(255 * clamp(x, 0, 1))``."""
    return images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


def process_cuda_index() -> int:
    """This process's GPU: a torchrun process's own (``LOCAL_RANK``, modulo the visible GPUs, as the trainer
    places it; rewards are built before the trainer sets the current device), else the current device."""
    import os

    n = torch.cuda.device_count()
    if "LOCAL_RANK" in os.environ and n:
        return int(os.environ["LOCAL_RANK"]) % n
    return torch.cuda.current_device()


def refused(prompts: list[str], parse) -> list[str]:
    """The prompts ``parse`` raises ValueError on: a reward's ``check_prompts``, which the trainer asks before
    training, so that a bad line of a prompt file stops the run at its start, not when it is first drawn."""
    bad = []
    for p in prompts:
        try:
            parse(p)
        except ValueError:
            bad.append(p)
    return bad


def place(reward, images: torch.Tensor, *modules: torch.nn.Module) -> torch.device:
    """Where an in-process model reward scores ``images``: its ``device``, else the images'. Its ``modules``
    move there on the first call and whenever that changes (``reward._placed`` records where they are)."""
    device = reward.device or images.device
    if device != reward._placed:
        for module in modules:
            module.to(device)
        reward._placed = device
    return device
