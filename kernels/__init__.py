"""Fused kernels for flow-matching GRPO, usable by any trainer (they depend on torch and triton only).

Each op dispatches to its Triton kernel for CUDA tensors and to its plain-PyTorch ``*_reference``
otherwise; ``DENSEGRPO_KERNELS=auto|triton|reference`` forces a path (``triton`` on CPU tensors needs
``TRITON_INTERPRET=1``). The ops are registered with ``torch.library`` as ``densegrpo::sde_step``,
``densegrpo::sde_log_prob`` and ``densegrpo::group_advantages``, so ``torch.compile`` traces them.
"""

from .group_advantages import group_advantages, group_advantages_reference
from .sde_log_prob import sde_log_prob, sde_log_prob_reference
from .sde_step import sde_std, sde_step, sde_step_reference

__all__ = [
    "group_advantages",
    "group_advantages_reference",
    "sde_log_prob",
    "sde_log_prob_reference",
    "sde_std",
    "sde_step",
    "sde_step_reference",
]
