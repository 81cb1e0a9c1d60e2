"""Reward checkpoints released as torch files (HPS's, ImageReward's): found offline, loaded as tensors only,
put into transformers models of the right architecture with every weight accounted for."""

from __future__ import annotations

from pathlib import Path

import torch

from densegrpo_fast.rewards.clip import quiet_loading


def _first_line(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def resolve_file(value: str, filename: str, hub: str, label: str) -> Path:
    """The checkpoint file: ``value`` itself, ``filename`` inside the folder ``value``, or ``filename`` of the
    hub repo ``value`` in the Hugging Face cache (offline: nothing is downloaded). ``label`` names what it is
    in the errors (e.g. "HPS v2.1 checkpoint"), each with the ``hf download`` of ``filename`` from ``hub``."""
    p = Path(value).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        if (p / filename).is_file():
            return p / filename
        raise ValueError(
            f"reward.kwargs.checkpoint={value!r} is a folder without {filename} ({label}). Fix: give the "
            f"file itself, or a folder holding it (`hf download {hub} {filename} --local-dir DIR`)"
        )
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(value, filename, local_files_only=True))
    except Exception as e:  # not in the cache, or not a repo id at all
        raise ValueError(
            f"reward.kwargs.checkpoint={value!r}: no {label} there, nor {filename} of that hub repo in the "
            f"Hugging Face cache (rewards load offline). Fix: `hf download {hub} {filename}` where there is "
            f"network, or set reward.kwargs.checkpoint to the file ({_first_line(e)})"
        ) from None


def load_tensors(path: Path, fix: str) -> dict[str, torch.Tensor]:
    """The state dict of a torch checkpoint file: a bare state dict or one under ``state_dict``, with
    DistributedDataParallel's ``module.`` prefix dropped. Loaded weights-only (no code runs) and memory-mapped
    where the format allows (the conversions copy what they keep anyway). ``fix`` ends the errors: how to get
    the right file."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # a file in torch's legacy (pre-1.6, not zip) format cannot be mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file; or objects the weights-only unpickler refuses
        raise ValueError(
            f"reward.kwargs.checkpoint={str(path)!r} does not load as a plain checkpoint of tensors "
            f"({_first_line(e)}); it is not loaded with full unpickling, because that runs code. Fix: if the "
            f"download was cut short, fetch it again ({fix})"
        ) from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        held = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(
            f"reward.kwargs.checkpoint={str(path)!r} holds {held}, not a state dict of tensors (bare, or "
            f"under 'state_dict'). Fix: {fix}"
        )
    return {k.removeprefix("module."): v for k, v in state.items()}


def from_state(
    cls, config, state: dict[str, torch.Tensor], misfit: str, fix: str, **model_kwargs
) -> torch.nn.Module:
    """The fp32 transformers model ``cls(config, **model_kwargs)`` holding ``state``, every weight of it: a weight missing,
    unexpected or of another shape raises ValueError (``misfit``: what does not fit; ``fix``: the fix), so
    nothing is silently left at random init. Nothing is initialised at random first."""
    import transformers
    from packaging.version import Version

    # fp32 whatever the file holds; transformers named the keyword ``torch_dtype`` before 4.56
    old = Version(transformers.__version__) < Version("4.56")
    fp32 = {"torch_dtype" if old else "dtype": torch.float32}
    try:
        with quiet_loading():
            model, info = cls.from_pretrained(
                None, config=config, state_dict=state, output_loading_info=True, **fp32, **model_kwargs
            )
    except RuntimeError as e:  # transformers refuses weights of another shape
        raise ValueError(f"{misfit}: weights of another shape ({str(e).splitlines()[0]}). {fix}") from None
    missing = [k for k in info["missing_keys"] if not k.endswith("position_ids")]
    bad = missing + list(info["unexpected_keys"]) + [str(m) for m in info["mismatched_keys"]]
    if bad:
        raise ValueError(
            f"{misfit}: {len(bad)} weights missing, unexpected or of another shape, e.g. {bad[:4]}. {fix}"
        )
    return model
