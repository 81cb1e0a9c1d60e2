"""Start a run's LoRA adapters from a LoRA on disk (``lora.init``): a warm start from an earlier run's
``lora_ema/``, a LoRA trained elsewhere in diffusers' format, or a peft adapter folder (``adapter_config.json``
and ``adapter_model.safetensors``, as Flow-GRPO publishes its LoRAs).

The file is read by the libraries that own its format (diffusers' ``load_lora_weights``, peft's
``LoraConfig`` and ``set_peft_model_state_dict``) into a second adapter, whose weights are then copied into
the run's own adapter (the one ``lora.rank``, ``lora.alpha`` and ``lora.target_modules`` made), ``lora_B``
rescaled so that each layer adds what the file's adapter adds: ``B_run * A * alpha_run / r_run`` equals
``B_file * A * scale_file``. The run then trains its own adapter at its own scale, and the KL reference
stays the base model (adapters disabled), as in Flow-GRPO's ``lora_path``.

Wan 2.2 A14B's two experts take a LoRA each: the high-noise expert's at the path given, the low-noise expert's
(``transformer_2``) at a second path (``lora.init_2``, ``--lora-2``) or in the first's ``transformer_2/`` folder,
where a two-expert run's ``lora_ema/`` export writes it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

WARM = "densegrpo_lora_init"  # the second adapter's name, gone once its weights are copied
_ADAPTER = "default"  # the run's adapter (peft's default name, which the trainer's add_adapter gives it)
_FIX = (
    "give a run's lora_ema/ folder, a diffusers LoRA (a .safetensors file or its folder), or a peft adapter "
    "folder (adapter_config.json and adapter_model.safetensors)"
)

#: The option naming the low-noise expert's LoRA (Wan 2.2 A14B's ``transformer_2``), per option.
SECOND = {"lora.init": "lora.init_2", "--lora": "--lora-2"}
#: The folder of a LoRA folder holding the low-noise expert's LoRA (a run's ``lora_ema/`` export of two experts).
EXPERT_2 = "transformer_2"
_FIX_2 = (
    "give the low-noise expert's LoRA: a two-expert run's lora_ema/transformer_2/ folder, a diffusers LoRA (a "
    ".safetensors file or its folder), or a peft adapter folder"
)


def check_exists(path: str | Path, option: str) -> None:
    """A ValueError, before any model loads, when the LoRA that ``option`` (``lora.init``, ``--lora``, or the
    low-noise expert's ``lora.init_2``, ``--lora-2``) names is not there."""
    if not Path(path).exists():
        fix = _FIX_2 if option in SECOND.values() else _FIX
        raise ValueError(f"{_named(option, path)} does not exist: {fix}")


def _named(option: str, path: str | Path) -> str:
    return f"{option}={str(path)!r}" if option.startswith("lora.") else f"{option} {str(path)!r}"


def second_lora(path: str | Path | None, path_2: str | Path | None) -> Path | None:
    """The low-noise expert's LoRA: ``path_2`` where given, else ``path/transformer_2`` where ``path`` is a
    folder holding one (the layout of a two-expert run's ``lora_ema/``), else None."""
    if path_2 is not None:
        return Path(path_2)
    inner = Path(path) / EXPERT_2 if path is not None else None
    return inner if inner is not None and inner.is_dir() else None


def check_experts(two: bool | None, option: str, path, path_2=None) -> None:
    """A ValueError where the LoRA (``option``: ``lora.init``, ``--lora``, at ``path``; the low-noise expert's
    at ``path_2`` or in ``path``'s ``transformer_2/``) is not there or does not pair with the checkpoint's
    transformers: ``two`` says whether it has two experts (Wan 2.2 A14B; None: not known, not checked)."""
    option_2 = SECOND[option]
    if path is None and path_2 is not None:
        raise ValueError(
            f"{_named(option_2, path_2)} without {option}: the low-noise expert's LoRA comes with the high-noise "
            f"expert's; give both (or {option} alone, a folder holding the second in {EXPERT_2}/)"
        )
    if two is False and path_2 is not None:
        raise ValueError(
            f"{_named(option_2, path_2)} adapts the low-noise expert of a two-expert checkpoint (Wan 2.2 A14B), "
            f"and this checkpoint has one transformer: remove {option_2}"
        )
    check_exists(path, option)
    if path_2 is not None:
        check_exists(path_2, option_2)
        if (Path(path_2) / EXPERT_2).is_dir():  # (its own file is the high-noise expert's)
            raise ValueError(
                f"{_named(option_2, path_2)} is a two-expert export (it holds {EXPERT_2}/): give its {EXPERT_2}/ "
                f"as {option_2}, or the folder alone as {option}"
            )
        if (Path(path) / EXPERT_2).is_dir():
            raise ValueError(
                f"{_named(option, path)} holds the low-noise expert's LoRA in {EXPERT_2}/, and {option_2} names "
                f"another: give the folder alone, or {option_2} with {option} naming the high-noise expert's file"
            )
    second = second_lora(path, path_2)
    if two and second is None:
        raise ValueError(
            f"{_named(option, path)}: this checkpoint has two experts (Wan 2.2 A14B), and a LoRA file adapts one "
            f"transformer: give the low-noise expert's LoRA (transformer_2) too, as {option_2}, or a folder "
            f"holding it in {EXPERT_2}/ (as a two-expert run exports its lora_ema/)"
        )
    if two is False and second is not None:
        own = (
            ""
            if _is_peft_folder(Path(path))
            else " (the folder's own file alone, by its path, if it is meant for this one)"
        )
        raise ValueError(
            f"{_named(option, path)} holds a low-noise expert's LoRA in {EXPERT_2}/ (a Wan 2.2 A14B export), and "
            f"this checkpoint has one transformer: give a LoRA of one transformer{own}"
        )


def check_checkpoint_experts(model, option: str, path, path_2=None) -> None:
    """:func:`check_experts` from the checkpoint's ``model_index.json``, before any model loads. ``model``: the
    config's model section."""
    from densegrpo_fast.policies import has_two_experts

    two = has_two_experts(model.family, model.checkpoint, local_files_only=model.local_files_only)
    check_experts(two, option, path, path_2)


def _experts(policy, option: str, path, path_2) -> list[tuple[str | None, torch.nn.Module, Path, str]]:
    """(expert, its transformer, its LoRA, the LoRA's name in errors) per transformer of ``policy`` the LoRA
    adapts: one of ``policy.transformer`` (expert None), or Wan 2.2 A14B's two experts."""
    names = getattr(policy.transformer, "expert_names", ())
    check_experts(bool(names), option, path, path_2)
    if not names:
        return [(None, policy.transformer, Path(path), _named(option, path))]
    second = second_lora(path, path_2)
    name_2 = (
        _named(SECOND[option], path_2) if path_2 is not None else f"{_named(option, path)} (its {EXPERT_2}/)"
    )
    first, low = names
    return [
        (first, getattr(policy.transformer, first), Path(path), _named(option, path)),
        (low, getattr(policy.transformer, low), second, name_2),
    ]


def start_adapters_from(policy, path: str | Path, path_2: str | Path | None = None) -> int:
    """Set the run's adapter (``"default"``, just added, still at its initial weights) of ``policy.transformer``
    to the LoRA at ``path`` (with two experts, Wan 2.2 A14B: the low-noise expert's to the LoRA at ``path_2``,
    or in ``path``'s ``transformer_2/``); returns the number of layers set. A ValueError names what does not
    fit: another rank, layers the run's ``lora.target_modules`` leave out, text-encoder weights, DoRA."""
    experts = _experts(policy, "lora.init", path, path_2)
    return sum(_start_one(policy, *expert) for expert in experts)


def _start_one(policy, expert: str | None, transformer, path: Path, name: str) -> int:
    """:func:`start_adapters_from` for one transformer (``policy.transformer``, or its ``expert``)."""
    _load(policy, expert, transformer, path, name)
    layers, outside = 0, []
    with torch.no_grad():
        for layer, module in transformer.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if not isinstance(lora_a, torch.nn.ModuleDict) or WARM not in lora_a:
                continue
            if getattr(module, "use_dora", {}).get(WARM, False):
                raise ValueError(f"{name} is a DoRA adapter ({layer}): only plain LoRA starts a run")
            if _ADAPTER not in lora_a:
                outside.append(layer)
                continue
            theirs, ours = lora_a[WARM].weight, lora_a[_ADAPTER].weight
            if theirs.shape != ours.shape:
                both = " (both experts' LoRAs take lora.rank)" if expert is not None else ""
                raise ValueError(
                    f"{name} has rank {theirs.shape[0]} (at {layer}), this run's adapters rank "
                    f"{ours.shape[0]}: set lora.rank={theirs.shape[0]} to start from it{both}"
                )
            ours.copy_(theirs)
            scale = module.scaling[WARM] / module.scaling[_ADAPTER]
            module.lora_B[_ADAPTER].weight.copy_(module.lora_B[WARM].weight.float() * scale)
            layers += 1
    if outside:
        raise ValueError(
            f"{name} adapts {len(outside)} layers that lora.target_modules leaves out (e.g. "
            f"{outside[0]}): add their names to lora.target_modules, or the run would start without them"
        )
    if layers == 0:
        raise ValueError(f"{name} adapts no layer of this transformer: {_FIX} for this model")
    transformer.set_adapter(_ADAPTER)  # (peft marks the active adapter's weights, and only them, trainable)
    transformer.delete_adapters(WARM)
    return layers


def merge_lora(policy, path: str | Path, path_2: str | Path | None = None) -> int:
    """Fold the LoRA at ``path`` (the formats :func:`start_adapters_from` reads, at the file's own rank and
    scale; with two experts, the low-noise expert's from ``path_2`` or ``path``'s ``transformer_2/``) into
    ``policy.transformer``'s weights and drop the adapter: what ``eval --lora`` scores, e.g. a published
    Flow-GRPO LoRA on its base model. Returns the number of layers merged."""
    layers = 0
    for expert, transformer, file, name in _experts(policy, "--lora", path, path_2):
        _load(policy, expert, transformer, file, name)
        mine = sum(
            1
            for m in transformer.modules()
            if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and WARM in m.lora_A
        )
        if mine == 0:
            raise ValueError(f"{name} adapts no layer of this transformer: {_FIX} for this model")
        transformer.fuse_lora(adapter_names=[WARM])
        transformer.unload_lora()
        layers += mine
    return layers


def lora_identity(path: str | Path | None) -> dict | None:
    """What tells one LoRA from another at the same path (an evaluation resumes only onto its own): a sha256
    of its weights file's content. Of a ``.safetensors`` file, its header is hashed with its keys sorted:
    safetensors writes its metadata in another order each time, so the same adapters saved twice (a finished
    run resumed exports its ``lora_ema`` again) differ in their bytes, not in their content."""
    if path is None:
        return None
    file = _weights_file(Path(path))
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        if file.suffix == ".safetensors":
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            digest.update(json.dumps(header, sort_keys=True).encode())
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return {"file": file.name, "sha256": digest.hexdigest()}


def lora_config_identity(path: str | Path | None) -> str | None:
    """The sha256 of a peft folder's ``adapter_config.json`` (its alpha sets the LoRA's scale), beside
    :func:`lora_identity`; None for a LoRA without one."""
    if path is None or not _is_peft_folder(Path(path)):
        return None
    return hashlib.sha256((Path(path) / "adapter_config.json").read_bytes()).hexdigest()


def _load(policy, expert: str | None, transformer, path: Path, name: str) -> None:
    """The LoRA at ``path`` as the adapter WARM of ``transformer`` (``policy.transformer``, or its ``expert``),
    by the library of its format."""
    with warnings.catch_warnings():  # (peft warns of a second adapter beside a run's: that is the point)
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        try:
            if _is_peft_folder(path):
                _load_peft_folder(transformer, path, name)
            else:
                _load_diffusers_lora(policy, expert, transformer, path, name)
        except RuntimeError as e:  # torch's load_state_dict: the layers' names match, their shapes do not
            if "size mismatch" not in str(e):
                raise
            first = next(ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln)
            raise ValueError(
                f"{name} does not fit this transformer's layers ({first}): it was trained for another model "
                "(another family, or another size of this one)"
            ) from None


def _is_peft_folder(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def _weights_file(path: Path) -> Path:
    if _is_peft_folder(path):
        return path / "adapter_model.safetensors"
    return path if path.is_file() else path / "pytorch_lora_weights.safetensors"


def _load_peft_folder(transformer, path: Path, name: str) -> None:
    from peft import LoraConfig
    from safetensors.torch import load_file

    weights = path / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(
            f"{name} holds no adapter_model.safetensors (a pickled adapter_model.bin is not "
            "loaded: unpickling runs code): save the adapter with safe_serialization=True"
        )
    config = LoraConfig.from_pretrained(str(path))
    init = config.init_lora_weights
    if isinstance(init, str) and (init.startswith("pissa") or init in ("olora", "corda", "loftq")):
        raise ValueError(  # (these initialisations move the base weights too)
            f"{name} was made with init_lora_weights={config.init_lora_weights!r}, which changes the base "
            "model's weights too: convert it to a plain LoRA first (peft's save_pretrained with "
            "path_initial_model_for_weight_conversion)"
        )
    if getattr(config, "lora_bias", False) or config.modules_to_save:
        raise ValueError(
            f"{name} also trains biases or whole modules (lora_bias / modules_to_save): only the "
            "lora_A / lora_B pairs of a plain LoRA are read"
        )
    config.init_lora_weights = True  # (the file's weights replace the initial ones)
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(str(weights)).items()}
    transformer.add_adapter(config, adapter_name=WARM)
    _fill_exactly(transformer, state, name)


def _load_diffusers_lora(policy, expert: str | None, transformer, path: Path, name: str) -> None:
    from diffusers.utils import logging as diffusers_logging
    from safetensors import safe_open

    pipe = getattr(policy, "pipe", None)
    if pipe is None:
        raise ValueError(
            f"{name}: a diffusers-format LoRA loads through a pretrained family's pipeline; for this "
            "model give a peft adapter folder"
        )
    folder, weight_name = (
        (path.parent, path.name) if path.is_file() else (path, "pytorch_lora_weights.safetensors")
    )
    file = folder / weight_name
    if not file.is_file() or file.suffix != ".safetensors":
        raise ValueError(f"{name} holds no {weight_name}: {_FIX}")
    with safe_open(str(file), "pt") as f:
        encoders = [k for k in f.keys() if k.startswith(("text_encoder", "lora_te"))]  # noqa: SIM118
    if encoders:
        raise ValueError(
            f"{name} also adapts the text encoders ({len(encoders)} weights, e.g. {encoders[0]}), "
            "which this trainer keeps frozen: give a LoRA of the transformer alone"
        )
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # (it notes, per text encoder, that the file has no LoRA for it)
    try:
        # (the low-noise expert's through the pipeline's transformer_2, which is the pair's)
        second = {"load_into_transformer_2": True} if expert == EXPERT_2 else {}
        pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=WARM, **second)
        # diffusers made the adapter (its ranks and scales) in the model's dtype: the weights again, exactly,
        # from the same conversion of the file's format
        state = type(pipe).lora_state_dict(str(folder), weight_name=weight_name)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    state = state[0] if isinstance(state, tuple) else state
    if WARM not in getattr(transformer, "peft_config", {}):  # (diffusers loaded nothing into it)
        raise ValueError(f"{name} adapts no layer of this transformer: {_FIX} for this model")
    state = {k.removeprefix("transformer."): v for k, v in state.items() if k.startswith("transformer.")}
    if "lora_A" not in next(iter(state)):  # other LoRA namings, renamed as diffusers renames them
        from diffusers.utils import convert_unet_state_dict_to_peft

        state = convert_unet_state_dict_to_peft(state)
    _fill_exactly(transformer, state, name)


def _fill_exactly(transformer, state: dict[str, torch.Tensor], name: str) -> None:
    """The adapter WARM's weights in fp32 (peft made them in the model's dtype, bf16 in the recipes), then
    ``state`` (peft names without the adapter's) loaded into them as the file stores them; a ValueError when
    the file and the adapter do not match weight for weight."""
    from peft.utils import set_peft_model_state_dict

    for n, p in transformer.named_parameters():
        if f".{WARM}." in n:
            p.data = p.data.float()
    result = set_peft_model_state_dict(transformer, state, adapter_name=WARM)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if f".{WARM}." in k]
    if unexpected or missing:
        k = (unexpected or missing)[0]
        raise ValueError(
            f"{name} does not fit this transformer's layers ({len(unexpected)} of its weights fit no layer, "
            f"{len(missing)} adapted layers get no weight; e.g. {k}): it was trained for another model"
        )
