"""Policy adapters, one per model family, behind :class:`densegrpo_fast.policies.base.Policy`."""

from __future__ import annotations

from densegrpo_fast.policies.base import Policy, PromptEmbeds

__all__ = ["FAMILIES", "Policy", "PromptEmbeds", "load_policy"]

FAMILIES = ("toy", "sd3", "flux")


def load_policy(
    family: str,
    checkpoint: str | None,
    device: str,
    *,
    dtype: str = "fp32",
    resolution: int = 512,
    max_sequence_length: int | None = None,
    local_files_only: bool = True,
    gradient_checkpointing: bool = False,
    offload_text_encoders: bool = False,
) -> Policy:
    """The frozen base policy of ``family`` from ``checkpoint`` on ``device``.

    The keyword options are the model section's (``cfg.model.adapter_options()``) and apply to sd3/flux;
    the toy model loads fp32 from its own file and ignores them (``model.autocast``, which the trainer
    applies, serves every family). ``max_sequence_length=None`` takes the family's default (SD3: 256 T5
    tokens, FLUX.1: 512).
    """
    if family == "toy":
        from densegrpo_fast.policies.toy import ToyPolicy

        return ToyPolicy.load(checkpoint, device=device)
    if family in ("sd3", "flux"):
        if family == "sd3":
            from densegrpo_fast.policies.sd3 import SD3Policy as cls
        else:
            from densegrpo_fast.policies.flux import FluxPolicy as cls
        policy = cls.load(
            checkpoint, device=device, dtype=dtype, resolution=resolution,
            max_sequence_length=max_sequence_length, local_files_only=local_files_only,
            offload_text_encoders=offload_text_encoders,
        )  # fmt: skip
        if gradient_checkpointing:
            policy.transformer.enable_gradient_checkpointing()
        return policy
    raise ValueError(f"model.family={family!r} has no adapter: the families available are {list(FAMILIES)}")
