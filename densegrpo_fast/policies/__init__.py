"""Policy adapters, one per model family, behind :class:`densegrpo_fast.policies.base.Policy`."""

from __future__ import annotations

from densegrpo_fast.policies.base import Policy, PromptEmbeds

__all__ = ["Policy", "PromptEmbeds", "load_policy"]


def load_policy(family: str, checkpoint: str | None, device: str) -> Policy:
    """The frozen base policy of ``family`` from ``checkpoint`` on ``device``."""
    if family == "toy":
        from densegrpo_fast.policies.toy import ToyPolicy

        return ToyPolicy.load(checkpoint, device=device)
    raise ValueError(f"model.family={family!r} has no adapter: the families available are ['toy']")
