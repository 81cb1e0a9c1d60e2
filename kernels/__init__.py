"""Fused kernels for flow-matching GRPO, usable by any trainer (they depend on torch and triton only).

Each op dispatches to its Triton kernel for CUDA tensors and to its plain-PyTorch ``*_reference``
otherwise; ``DENSEGRPO_KERNELS=auto|triton|reference`` forces a path (``triton`` on CPU tensors needs
``TRITON_INTERPRET=1``). The ops are registered with ``torch.library`` as ``densegrpo::sde_step``,
``densegrpo::sde_log_prob`` and ``densegrpo::group_advantages``, so ``torch.compile`` traces them.
"""

if __name__ != "densegrpo_fast.kernels":
    # This folder was reached as a top-level `kernels` (the repository root on sys.path, as under
    # `python -m` from the root). That name belongs to another PyPI package, which transformers probes by
    # importing it; registering the densegrpo:: ops a second time from here would corrupt the dispatcher.
    # Stay an empty module without a version, which the probes read as "not installed".
    __all__: list[str] = []
else:
    from .group_advantages import group_advantages, group_advantages_reference
    from .sde_log_prob import sde_log_prob, sde_log_prob_reference
    from .sde_step import cps_std, sde_std, sde_step, sde_step_reference

    __all__ = [
        "cps_std",
        "group_advantages",
        "group_advantages_reference",
        "sde_log_prob",
        "sde_log_prob_reference",
        "sde_std",
        "sde_step",
        "sde_step_reference",
    ]
