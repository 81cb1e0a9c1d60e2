"""Typed configs: pydantic models, YAML files, dotted ``key=value`` overrides, all errors at once.

Every config section is a :class:`Section` (unknown keys forbidden, one-line ``description`` per field).
:func:`load_config` reads a YAML file, applies overrides such as ``sampling.num_steps=10``, validates, and
raises one :class:`ConfigError` listing every problem with the nearest valid key for each unknown one.
"""

from __future__ import annotations

import copy
import difflib
import math
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class CrossCheckError(ValueError):
    """Raised by a model validator with several problems; :func:`load_config` lists each one."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


class ConfigError(ValueError):
    """One or more config problems, each naming the key, the value, the rule and the fix."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(
            f"{len(problems)} problem(s) in {source}:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def ignored_line(keys: list[str], why: str) -> str:
    """One line of :meth:`TrainConfig.ignored_settings`."""
    return f"{', '.join(keys)} {'is' if len(keys) == 1 else 'are'} ignored: {why}"


def override_keys(overrides: list[str]) -> set[str]:
    """The dotted keys a command line's ``key=value`` overrides set (a mapping value: its keys too)."""

    def walk(tree: dict, prefix: str):
        for k, v in tree.items():
            yield prefix + k
            if isinstance(v, dict):
                yield from walk(v, prefix + k + ".")

    return set(walk(parse_overrides(overrides), ""))


def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the (sub)model that owns ``loc``'s last element."""
    cls: Any = model
    parts = iter(loc[:-1])
    for part in parts:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return []
        cls = field.annotation
        if typing.get_origin(cls) is dict:  # (e.g. eval.rewards: the next part is an entry's name)
            cls = typing.get_args(cls)[1]
            if next(parts, None) is None:
                return []
    return list(getattr(cls, "model_fields", {}))


def _format_errors(model: type[BaseModel], err: dict) -> list[str]:
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, CrossCheckError):
        return cause.problems
    return [_format_error(model, err)]


def _format_error(model: type[BaseModel], err: dict) -> str:
    loc = tuple(str(p) for p in err["loc"])
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        from densegrpo_fast.toy.config import ToyPretrainConfig

        valid = _valid_keys(model, loc)
        near = difflib.get_close_matches(loc[-1], valid, n=1)
        hint = (
            f"did you mean '{'.'.join(loc[:-1] + (near[0],))}'?"
            if near
            else f"valid keys: {', '.join(valid)}"
        )
        if len(loc) == 1 and model is not ToyPretrainConfig and loc[0] in ("arch", "train"):
            hint = f"'{loc[0]}' is a section of the toy pretraining's config: run that with `pretrain-toy`"
        return f"{key}: unknown key; {hint}"
    if err["type"] == "missing" and loc[-1].isdigit():  # (a tuple given too few items: name the tuple)
        where = ".".join(loc[:-1])
        return f"{where} = {err.get('input')!r}: too few values (the one at index {loc[-1]} is missing)"
    msg = err["msg"].removeprefix("Value error, ")  # (a validator's own message says the rule and the fix)
    return f"{key} = {err.get('input')!r}: {msg}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""


def _mapping_without_duplicates(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping says so
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                "while reading a mapping", node.start_mark, f"key {key!r} appears twice", key_node.start_mark
            )
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _yaml(text: str, where: str):
    """``text`` parsed as YAML (keys unique), or a ConfigError naming ``where`` and the parser's reason."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None)
        reason = (
            f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
            if problem and mark is not None
            else " ".join(str(e).split())
        )
        raise ConfigError([f"{where} is not valid YAML: {reason}"]) from None


class _Whole(dict):
    """A mapping given whole on the command line (``reward.kwargs={}``): it replaces, never merges."""


def flat(tree: dict, whole=frozenset(), prefix: str = "") -> dict:
    """A nested dict (a config's ``model_dump``) as ``{"a.b.c": value}``; the dicts named in ``whole`` (and
    empty ones) stay values."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name not in whole:
            out.update(flat(value, whole, name + "."))
        else:
            out[name] = value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """``["a.b=1", "c=[1, 2]"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict = {}
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r}: expected key=value (e.g. sampling.num_steps=10)")
            continue
        key, raw = item.split("=", 1)
        node = tree
        *parents, leaf = key.strip().split(".")
        for depth, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                problems.append(
                    f"override {item!r}: {'.'.join(parents[: depth + 1])} was set to {node!r} by an earlier "
                    "override, which has no keys: drop one of the two"
                )
                break
        else:
            if raw.strip() in ("None", "none", "NONE"):  # (YAML: the text 'None', a valid path or name)
                k, v = key.strip(), raw.strip()
                problems.append(
                    f"override {item!r}: YAML reads {v} as the text {v!r}; write {k}=null for no value (or "
                    f"quote it, {k}='\"{v}\"', for the text)"
                )
                continue
            try:
                value = _yaml(raw, f"override {item!r}: the value") if raw.strip() else None
            except ConfigError as e:
                problems += e.problems
                continue
            node[leaf] = _Whole(value) if isinstance(value, dict) else value
    if problems:
        raise ConfigError(problems, "command-line overrides")
    return tree


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        merge = isinstance(v, dict) and not isinstance(v, _Whole) and isinstance(out.get(k), dict)
        out[k] = _merge(out[k], v) if merge else (dict(v) if isinstance(v, _Whole) else v)
    return out


def load_config(model: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Read ``path`` (YAML), apply dotted ``overrides``, validate into ``model``; all errors at once."""
    data: dict = {}
    source = "config"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigError(
                [f"config file {str(path)!r} {what}: pass an existing YAML file (see configs/)"]
            )
        data = _yaml(path.read_text(), str(path)) or {}
        if not isinstance(data, dict):
            raise ConfigError([f"{path}: top level must be a mapping of sections, got {type(data).__name__}"])
    data = _merge(data, parse_overrides(overrides or []))
    if overrides:
        source = (
            f"{source} with its command-line overrides" if path is not None else "the command-line overrides"
        )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError([p for err in e.errors() for p in _format_errors(model, err)], source) from None


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config (every default filled in) as YAML, whole or not at all (a resumed run reads
    it back)."""
    from densegrpo_fast.checkpoint import write_text_atomic

    write_text_atomic(Path(path), yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


# ============================================================================ the training config tree
# Every section of `densegrpo-fast train`. Defaults follow ALGORITHM.md (Flow-GRPO's recipe, DenseGRPO's
# dense reward and calibration); derived values are properties, never stored twice.

from typing import ClassVar, Literal  # noqa: E402

from pydantic import Field, field_validator, model_validator  # noqa: E402

#: An image size setting (``model.resolution``, ``eval.resolution``): one side in pixels (square images) or
#: [height, width].
Resolution = int | tuple[int, int]


def image_hw(resolution: Resolution) -> tuple[int, int]:
    """(height, width) in pixels of a resolution setting."""
    if isinstance(resolution, int):
        return resolution, resolution
    height, width = resolution
    return int(height), int(width)


def shown_resolution(resolution: Resolution) -> str:
    """A resolution setting as a config writes it (``512``, ``[768, 1344]``): for error messages."""
    return str(resolution) if isinstance(resolution, int) else str(list(image_hw(resolution)))


def _required_resolution(value: Any) -> Any:
    """``model.resolution``: as :func:`_resolution_shape`, and not null."""
    if value is None:
        raise ValueError("null is not an image size: give one side in pixels (512) or [height, width]")
    return _resolution_shape(value)


def _resolution_shape(value: Any) -> Any:
    """A resolution is one side or a pair [height, width], each a whole number of pixels >= 16 (checked
    here, for the field's type and bounds): anything
    else is refused in one message, not one per member of the field's union; a square pair is its side, so
    that ``512`` and ``[512, 512]`` are one setting (a resume and the ranks of a job compare them equal)."""
    if value is None:
        return value  # (eval.resolution: "as model.resolution"; model.resolution: _required_resolution)
    pair = isinstance(value, list | tuple)
    sides = list(value) if pair else [value]
    whole = all(isinstance(v, int) and not isinstance(v, bool) for v in sides)
    if len(sides) != (2 if pair else 1) or not whole or min(sides) < 16:
        shown = sides if pair else repr(value)
        raise ValueError(
            f"{shown} is not an image size: give one side in pixels (512: square images) or [height, width] "
            "([768, 1344]), whole numbers of at least 16"
        )
    return sides[0] if not pair or sides[0] == sides[1] else tuple(sides)


def resolution_record(resolution: Resolution) -> int | list[int]:
    """A resolution setting as records (JSON) hold it: the side when square, else [height, width]; one value
    per size, so that a resumed evaluation compares equal sizes equal."""
    height, width = image_hw(resolution)
    return height if height == width else [height, width]


def resolution_problem(setting: str, resolution: Resolution, multiple: int, why: str) -> str | None:
    """The error naming ``setting`` when a side of ``resolution`` is not a multiple of ``multiple`` (``why``
    says whose factors those are), with the nearest size that is; None when every side is."""
    hw = image_hw(resolution)
    if not any(side % multiple for side in hw):
        return None
    near = [max(multiple, round(side / multiple) * multiple) for side in hw]
    return (
        f"{setting} ({shown_resolution(resolution)}) must be a multiple of {multiple}"
        f"{'' if isinstance(resolution, int) else ' on each side'} ({why}): choose e.g. "
        f"{near[0] if isinstance(resolution, int) else near}"
    )


class ModelSection(Section):
    family: Literal[
        "toy", "sd3", "flux", "flux_kontext", "qwen_image", "qwen_image_edit", "z_image", "flux2_klein", "wan"
    ] = Field(
        "toy",
        description="policy adapter: toy (the embedded model), sd3 (SD3 / SD3.5), flux (FLUX.1), flux_kontext "
        "(FLUX.1 Kontext: edits the source image of each prompt, from a .jsonl prompt file with an 'image' per "
        "line), qwen_image (Qwen-Image), qwen_image_edit (Qwen-Image-Edit-2509 / -2511: edits, as flux_kontext), z_image (Z-Image, Z-Image-Turbo), flux2_klein (FLUX.2 [klein] 4B / 9B, "
        "base or distilled; it edits too, given such a prompt file), wan (Wan 2.1 T2V 1.3B / 14B, Wan 2.2 TI2V-5B, "
        "Wan 2.2 T2V-A14B's two experts: text to video; image rewards score the video's frames, reward.frames)",
    )
    checkpoint: str | None = Field(
        None,
        description="weights; toy: a .safetensors file, null = the shipped one; pretrained families: a "
        "diffusers-format directory or a Hugging Face repo id, null = "
        "stabilityai/stable-diffusion-3.5-medium / black-forest-labs/FLUX.1-dev / "
        "black-forest-labs/FLUX.1-Kontext-dev / Qwen/Qwen-Image / Qwen/Qwen-Image-Edit-2511 / Tongyi-MAI/Z-Image / "
        "black-forest-labs/FLUX.2-klein-base-4B / Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    )
    device: str = Field("cpu", description="torch device (cpu, cuda, cuda:1, ...)")
    num_threads: int = Field(
        1, ge=1, description="torch CPU threads (toy on 2 cores: 2 for training, whose calls are large)"
    )
    dtype: Literal["bf16", "fp16", "fp32"] = Field(
        "fp32",
        description="pretrained families: dtype of the transformer and text encoders (bf16 on GPUs); the VAE "
        "and the SDE math stay fp32",
    )
    autocast: Literal["bf16", "fp16"] | None = Field(
        None,
        description="sample the training rollouts (and calibration) with the transformer's matmuls in this "
        "dtype under torch.autocast; the update runs in the model's dtype and recomputes the old log-probs "
        "itself; weights, SDE math and evaluation are untouched (toy on a CPU with avx512_bf16: bf16 makes "
        "the rollout 1.7x faster)",
    )
    _resolution = field_validator("resolution", mode="before")(_required_resolution)
    resolution: int | tuple[int, int] = Field(
        512,
        description="pretrained families: image side in pixels (square images), or [height, width]; "
        "multiples of 16",
    )
    frames: int | None = Field(
        None,
        ge=1,
        description="video families (wan): frames per video, 4k + 1 (the VAE's temporal factor 4); null = the "
        "pipeline's 81. Each video's latent has (frames - 1) / 4 + 1 frames",
    )
    guidance_scale_2: float | None = Field(
        None,
        ge=1.0,
        description="wan with two experts (Wan 2.2 T2V-A14B): the low-noise expert's CFG scale, in sampling, "
        "training and evaluation alike (WanPipeline's guidance_scale_2; Wan 2.2's examples sample with 4.0 and 3.0 "
        "below the boundary); null: each call's own, sampling.guidance_scale or eval.guidance_scale. As in the "
        "pipeline, a guidance_scale of 1 turns CFG off for both experts",
    )
    negative_prompt: str | None = Field(
        None,
        description="CFG's negative prompt, in sampling, training and evaluation alike (the pipelines' "
        "negative_prompt, e.g. the long one Wan's examples sample with); null: the family's default, the "
        "pipeline's (the empty prompt; Qwen-Image ' '). The families with CFG; unused where the guidance scales "
        "are 1",
    )
    max_sequence_length: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="pretrained families: text tokens per prompt (T5's for SD3 and FLUX.1, at most "
        "512; Qwen2.5-VL's for Qwen-Image, at most 1024; Qwen3's for Z-Image, chat template included, at most "
        "992; Qwen3's for FLUX.2 [klein], chat template included, every prompt padded to it; UMT5's for Wan, at "
        "most 512, every prompt padded to it); null = SD3's 256, FLUX.1's 512, Qwen-Image's, Z-Image's, FLUX.2 "
        "[klein]'s and Wan's 512",
    )
    local_files_only: bool = Field(
        True,
        description="pretrained families: load from the directory or the Hugging Face cache only (false = "
        "download what is missing)",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="pretrained families: recompute transformer activations in backward (less memory, "
        "slower)",
    )
    offload_text_encoders: bool = Field(
        False,
        description="pretrained families: keep the frozen text encoders in host memory and move them to the "
        "device only to encode each iteration's prompts (SD3.5: 10.4 GiB, FLUX.1: 9.1 GiB, Qwen-Image: "
        "13.2 GiB, Z-Image and FLUX.2 [klein] 4B: 7.5 GiB of device memory freed for the rollout and update, for two host-device copies per iteration)",
    )
    prompt_cache: str | None = Field(
        None,
        description="pretrained families: a directory of the prompts' text-encoder outputs, written by "
        "`densegrpo-fast encode-prompts --config <this config>` for prompts.dataset and eval.dataset; the text "
        "encoders are then not loaded (neither device nor host memory holds them) and no iteration encodes. "
        "Refused where it was written by other text encoders or settings, or lacks a prompt",
    )
    compile: bool = Field(
        False,
        description="torch.compile each transformer block (regional compilation: a few graphs per block "
        "type, shared by its layers), fusing the norms, casts and element-wise kernels between the matmuls "
        "(a third to nearly half of an SD3.5-M / FLUX.1 call's device time by the estimate in "
        "benchmarks/RESULTS.md; not measured on a GPU yet); the first calls compile, and the update then "
        "recomputes the old log-probs itself; the memory estimate counts the eager model",
    )
    compile_backend: str = Field(
        "inductor",
        description="torch.compile backend of model.compile (eager, aot_eager: no code generated, for tests)",
    )
    sharding: Literal["auto", "fsdp", "replicate"] = Field(
        "auto",
        description="under torchrun: fsdp shards the transformer over the processes with FSDP2, so that no "
        "GPU holds it whole (each process loads it into host memory, and it goes to the GPU a block at a time): full "
        "fine-tuning trains fp32 shards run in model.dtype, beside a sharded frozen KL reference; LoRA keeps the "
        "frozen base's shards in model.dtype and the adapters' in fp32. replicate keeps a whole copy in each "
        "process; auto = fsdp for full fine-tuning, replicate for LoRA (each call then gathers nothing)",
    )

    #: The fields only the pretrained adapters read (the toy runs fp32 at 32 px from its own file).
    PRETRAINED_ONLY: ClassVar[tuple[str, ...]] = (
        "dtype", "resolution", "frames", "guidance_scale_2", "negative_prompt", "max_sequence_length",
        "local_files_only", "gradient_checkpointing", "offload_text_encoders", "prompt_cache",
    )  # fmt: skip

    def autocast_context(self):
        """The context the training's transformer calls run in: ``torch.autocast`` at ``autocast``, or none."""
        import contextlib

        import torch

        if self.autocast is None:
            return contextlib.nullcontext()
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[self.autocast]
        return torch.autocast(torch.device(self.device).type, dtype=dtype)

    @property
    def video(self) -> bool:
        """Whether the family makes videos (:data:`densegrpo_fast.policies.VIDEO`)."""
        from densegrpo_fast.policies import VIDEO

        return self.family in VIDEO

    def adapter_options(self) -> dict:
        """Keyword arguments of :func:`densegrpo_fast.policies.load_policy` beyond family/checkpoint/device."""
        return {name: getattr(self, name) for name in self.PRETRAINED_ONLY}

    def problems(self) -> list[str]:
        """Cross-checks of this section (collected by :class:`TrainConfig` with the others)."""
        import torch

        out = []
        try:
            torch.device(self.device)
        except RuntimeError as e:
            out.append(f"model.device={self.device!r} is not a torch device ({e}): e.g. cpu, cuda, cuda:1")
        if self.compile:
            from torch._dynamo import list_backends

            known = list_backends(exclude_tags=())
            if self.compile_backend not in known:
                out.append(
                    f"model.compile_backend={self.compile_backend!r} is not a torch.compile backend: choose "
                    f"one of {', '.join(known)} (inductor generates fused kernels; eager and aot_eager check "
                    "the wiring)"
                )
        from densegrpo_fast.policies import TEXT_READS_SOURCES

        if self.prompt_cache is not None and self.family in TEXT_READS_SOURCES:
            out.append(
                f"model.prompt_cache={self.prompt_cache!r} with model.family {self.family}: its text encoder "
                "reads each edit's source image, so a prompt's encoding is not its text's alone and a prompt "
                "cache (keyed by text) cannot hold it: set model.prompt_cache=null"
            )
        if self.family == "toy":
            if self.checkpoint is not None and not Path(self.checkpoint).exists():
                out.append(
                    f"model.checkpoint={self.checkpoint!r} does not exist: give an existing path, or null for "
                    "the model's default"
                )
            for name in self.PRETRAINED_ONLY:
                value = getattr(self, name)
                if name in self.model_fields_set and value != type(self).model_fields[name].default:
                    shown = shown_resolution(value) if name == "resolution" else repr(value)
                    out.append(
                        f"model.{name} ({shown}) applies to the pretrained families only (not the toy): the toy "
                        "model runs fp32 at 32 px from its own checkpoint; remove it"
                    )
            return out
        from densegrpo_fast.policies.pretrained import is_repo_id

        c = self.checkpoint
        if c is not None and not Path(c).expanduser().is_dir() and not is_repo_id(c):
            out.append(
                f"model.checkpoint={c!r} is neither an existing directory nor a Hugging Face repo id "
                f"(owner/name): model.family {self.family} loads a diffusers-format directory (model_index.json "
                "and one folder per component), or a repo from the Hugging Face cache"
            )
        from densegrpo_fast.policies import VIDEO

        if self.frames is not None and self.family not in VIDEO:
            out.append(
                f"model.frames ({self.frames}) applies to the video families ({', '.join(VIDEO)}) only: "
                f"model.family {self.family} makes images; remove it"
            )
        if self.guidance_scale_2 is not None and self.family != "wan":
            out.append(
                f"model.guidance_scale_2 ({self.guidance_scale_2}) is the low-noise expert's CFG scale of Wan 2.2 "
                f"T2V-A14B (model.family wan with two experts): model.family {self.family} has one transformer; "
                "remove it"
            )
        if self.negative_prompt is not None and self.family in ("flux", "flux_kontext"):
            out.append(
                f"model.negative_prompt ({self.negative_prompt[:40]!r}): model.family {self.family} is "
                "guidance-distilled and samples without CFG, so no negative prompt is encoded; remove it"
            )
        if self.family in VIDEO and self.frames is not None and (self.frames - 1) % 4:
            near = max(1, round((self.frames - 1) / 4)) * 4 + 1
            out.append(
                f"model.frames ({self.frames}): Wan's VAE encodes 4k + 1 frames (its temporal factor 4); give e.g. "
                f"{near}"
            )
        if self.family in ("sd3", "flux", "flux_kontext", "wan") and (self.max_sequence_length or 0) > 512:
            out.append(
                f"model.max_sequence_length ({self.max_sequence_length}) with model.family {self.family}: "
                f"{'UMT5' if self.family == 'wan' else 'T5'} takes at most 512 tokens; set it to 512 or less (null: the family's default)"
            )
        if self.family == "z_image" and (self.max_sequence_length or 0) > 992:
            out.append(
                f"model.max_sequence_length ({self.max_sequence_length}) with model.family z_image: Z-Image's "
                "transformer places at most 992 caption tokens (its first rope axis has 1024 positions); set it "
                "to 992 or less (null: the pipeline's 512)"
            )
        bad = resolution_problem(
            "model.resolution", self.resolution, 16, "the VAE's factor 8 x the transformer's 2x2 patches"
        )
        return out if bad is None else [*out, bad]


def _toy_split(value: str) -> str:
    """A dataset's ``toy:`` split must be one the toy world has (files are checked where they are read)."""
    if value.startswith("toy:") and value not in ("toy:train", "toy:test"):
        raise ValueError("the toy splits are toy:train and toy:test (or give a prompt file)")
    return value


class PromptSection(Section):
    _split = field_validator("dataset")(_toy_split)
    dataset: str = Field(
        "toy:train",
        description="toy:train / toy:test, or a text file with one prompt per line (.jsonl: a prompt field per line)",
    )
    prompts_per_iteration: int = Field(
        8, ge=1, description="prompts sampled per iteration (each gets a group)"
    )
    sampling: Literal["uniform", "priority"] = Field(
        "uniform",
        description="uniform: as the dataset draws; priority: each prompt's chance scaled by the non-zero-"
        "advantage fraction of its recent groups (+ priority_floor), so solved and hopeless prompts yield",
    )
    priority_floor: float = Field(
        0.1, gt=0, description="priority sampling: weight kept by a prompt whose groups teach nothing"
    )


class SamplingSection(Section):
    num_steps: int = Field(10, ge=2, le=1000, description="T, the denoising steps of a training rollout")
    shift: float | None = Field(
        3.0,
        gt=0,
        description="sigma-grid shift (SD3.5: 3.0); null = the checkpoint scheduler's own grid "
        "(pretrained families; FLUX.1, Qwen-Image and FLUX.2 [klein]: shifted by resolution, as their pipelines)",
    )
    guidance_scale: float = Field(
        4.5,
        ge=1.0,
        description="CFG scale g of v_neg + g (v_pos - v_neg) in sampling and training, 1 = no CFG (FLUX.1-dev: "
        "its guidance input, 3.5; Qwen-Image: its true CFG scale, 4.0; Z-Image: 1 + ZImagePipeline's "
        "guidance_scale, 5.0 for its 4, and 1.0 for Z-Image-Turbo's 0; FLUX.2 [klein]: its CFG scale, 4.0 "
        "for the base models, 1.0 for the distilled ones)",
    )
    group_size: int = Field(8, ge=2, description="G, samples per prompt")
    share_initial_noise: bool = Field(
        False,
        description="false = each sample of a group from its own initial noise (ALGORITHM.md); true = one "
        "initial noise per group, so only the SDE noise tells its samples apart (DanceGRPO's same-noise "
        "option, Flow-GRPO's same_latent)",
    )
    max_rows_per_call: int | None = Field(None, ge=1, description="cap on rows per transformer call (memory)")
    reward_waves: int = Field(
        1,
        ge=1,
        description="1 = score after the rollout; W > 1 = roll out W waves of whole groups, each scored in "
        "the background while the next rolls out (slow or remote rewards)",
    )


class CalibrationSection(Section):
    iterations: int = Field(20, ge=1, description="K, calibration rounds (Algorithm 1)")
    prompts: int | None = Field(None, ge=1, description="prompts per round (null = prompts_per_iteration)")
    eps1: float = Field(2.0, ge=0, description="balance threshold on |#(dR>0) - #(dR<0)|")
    eps2: float = Field(0.01, gt=0, description="psi step per round")
    psi_min: float = Field(0.0, ge=0, description="lower bound of psi")
    psi_max: float = Field(
        1.5, gt=0, description="upper bound of psi (under noise.sde=cps psi is eta, and 1 bounds it too)"
    )
    path: str | None = Field(
        None, description="psi table (JSON) to use or write; null = <output_dir>/psi.json"
    )


class NoiseSection(Section):
    kind: Literal["uniform", "calibrated"] = Field(
        "calibrated", description="uniform a at every step, or DenseGRPO's calibrated per-step psi"
    )
    sde: Literal["flow_grpo", "cps"] = Field(
        "flow_grpo",
        description="the SDE step: flow_grpo (ALGORITHM.md §2, std = a sqrt(s / (1 - s))), or cps, "
        "coefficients-preserving sampling (Wang & Yu 2025; Flow-GRPO's sde_type: cps): the noise std is "
        "sigma_next sin(eta pi / 2) with the level as eta in [0, 1], and each latent keeps the flow's "
        "(1 - sigma) x0 + sigma eps form, so the exploration adds no excess noise; the grid's last step has none",
    )
    level: float = Field(
        0.7, ge=0, description="a (uniform), and the initial psi of calibration; eta under cps"
    )
    window_start: int | None = Field(
        None, ge=0, description="first SDE step (DenseGRPO-Fast); null = no window"
    )
    window_size: int | None = Field(None, ge=1, description="SDE steps in the window")
    window_move: Literal["fixed", "sliding", "random"] = Field(
        "fixed",
        description="fixed: the window stays at window_start; sliding (MixGRPO): it starts at window_start and "
        "moves one step later every window_every iterations, back to step 0 after the last fit; random: a "
        "start drawn per iteration from 0..num_steps - window_size. A moving window skips the starts where it "
        "would hold no trained step (grpo.trained_steps; by default the grid's last step is not trained) and is "
        "calibrated over every step",
    )
    window_every: int = Field(1, ge=1, description="iterations per one-step move of a sliding window")
    calibration: CalibrationSection = Field(default_factory=CalibrationSection)


class RewardSection(Section):
    name: str = Field("toy_geneval", description="reward in the registry (densegrpo_fast.rewards)")
    kwargs: dict = Field(default_factory=dict, description="keyword arguments of the reward's constructor")
    frames: int | None = Field(
        4,
        ge=1,
        description="video families (wan): the frames of each video an image reward scores, evenly spaced from "
        "the first to the last (1: the middle one), their scores averaged; null = every frame. A reward that "
        "takes videos whole (its `video` attribute) gets them as they are",
    )

    def for_policy(self, reward, video: bool):
        """``reward`` (built from this section) made to score the policy's samples: videos frame by frame
        (:func:`densegrpo_fast.rewards.video.frame_mean`) where ``video``, else itself."""
        from densegrpo_fast.rewards.video import frame_mean

        return frame_mean(reward, self.frames, video)


class DenseSection(Section):
    mode: Literal["dense", "sparse", "dense_baseline"] = Field(
        "dense",
        description="dense (DenseGRPO), sparse (Flow-GRPO), dense_baseline (ablation: normalise R_k+1)",
    )
    completion_steps: int | None = Field(
        None, ge=1, description="n of ODE_n for latent rewards; null = remaining steps (the paper's choice)"
    )
    completion_batching: Literal["fused", "separate"] = Field(
        "fused", description="completion rows in the main rows' call, or in a call of their own"
    )
    global_std: bool = Field(False, description="normalise by the batch std per step instead of the group's")
    multi_reward: Literal["sum", "per_reward"] = Field(
        "sum",
        description="reward.name=multi: sum = the advantages of the weighted sum (GRPO normalises the sum); "
        "per_reward = each component's advantages normalised on their own, then summed with the weights "
        "(MixGRPO's advantage aggregation: no component's scale drowns the others, though dense.adv_eps is "
        "added to each one's std, so a part whose step rewards spread by less than ~1e-3 weighs less; psi is "
        "still calibrated on the sum)",
    )
    adv_eps: float = Field(1e-4, ge=0, description="added to the std in the normalisation")
    adv_clip: float = Field(5.0, gt=0, description="advantages clipped to [-adv_clip, adv_clip]")


class GRPOSection(Section):
    objective: Literal["grpo", "nft", "awm"] = Field(
        "grpo",
        description="grpo: the clipped policy-gradient loss on the SDE steps' log-probs (DenseGRPO, Flow-GRPO); "
        "nft: DiffusionNFT's forward-process loss (the nft section): the old policy samples, each clean "
        "sample is noised afresh at the trained steps' times, and the trained velocity learns from the group-"
        "normalised final reward, with no log-prob; awm: Advantage Weighted Matching (the awm section): the "
        "current policy samples, and each sample's flow-matching loss at fresh noise is weighted by its "
        "advantage, on-policy for the first of grpo.updates_per_iteration (the release's one; later ones train "
        "on older weights' rollouts with no ratio) (both need dense.mode=sparse, noise.kind=uniform, "
        "grpo.filter_zero_advantage=false, and normalise as released with dense.global_std=true; the clip, "
        "ratio and beta settings do not apply)",
    )
    clip_range: float = Field(1e-4, gt=0, description="PPO ratio clip epsilon")
    clip_range_high: float | None = Field(
        None,
        gt=0,
        description="upper clip epsilon: the ratio is clipped to [1 - clip_range, 1 + clip_range_high] (DAPO's "
        "clip-higher; Flow-GRPO's clip_range_gt); null = clip_range",
    )
    beta: float = Field(0.04, ge=0, description="KL weight (0 = no reference forward)")
    kl_target: float | None = Field(
        None,
        gt=0,
        description="adapt the KL weight to hold the iterations' mean KL near this (PPO's adaptive coefficient: "
        "x2 after an iteration whose KL is above 1.5 x target, /2 after one below target / 1.5), starting "
        "from grpo.beta and kept within [beta / 100, beta x 100]; logged as beta; null = grpo.beta throughout",
    )
    kl_exact: bool = Field(
        False, description="exact Gaussian KL instead of Flow-GRPO's form (ALGORITHM.md §2)"
    )
    ratio_norm: bool = Field(
        False,
        description="GRPO-Guard's RatioNorm (arXiv 2510.22319): each pair's log-ratio becomes "
        "step_std * (log_prob - old_log_prob + kl_old), where step_std is its step's noise std and kl_old the "
        "exact KL from the old step's Gaussian to the current one, so the log-ratio's mean over the noise is 0 at "
        "every step instead of below 0; the clip range then bounds this scaled ratio (one tuned without it does "
        "not carry over); the update recomputes the old log-probs and keeps their velocities (one fp32 latent "
        "per pair of its later optimizer steps) (ALGORITHM.md §3)",
    )
    step_weight: Literal["none", "inverse_dt"] = Field(
        "none",
        description="each pair's policy term times a weight of its step: inverse_dt = 1 / |dt| (GRPO-Guard's "
        "gradient reweighting as verl-omni writes it; with ratio_norm the two are the paper's method, and "
        "Flow-Factory's grpo-guard is ratio_norm alone); the KL term is not weighted",
    )
    trained_steps: list[int] | None = Field(
        None,
        description="steps to train; null = every step with noise but the last one: 0 to T - 2 (Flow-GRPO's), or 0 "
        "to T - 3 under noise.sde=cps, where the last step has no noise and the one before it the least "
        "(ALGORITHM.md §2); grpo.objective=nft: every step; awm: 1 to int(0.9 T) - 1 (AWM's GenEval release)",
    )
    step_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="each sample trains a random ceil(fraction x trained steps) of its trained steps, drawn anew "
        "every iteration, before filter_zero_advantage drops pairs (like DanceGRPO's timestep_fraction, which "
        "takes int(fraction x every step): a cheaper update); 1 = every trained step",
    )
    step_draw: Literal["random", "stratified"] = Field(
        "random",
        description="how grpo.step_fraction draws a sample's steps: random = any ceil(fraction x n) of its n "
        "trained steps; stratified = one from each of ceil(fraction x n) runs of the sorted trained steps, of "
        "near-equal count, the first ones one longer (AWM's release: every part of the grid is trained in "
        "each sample)",
    )
    train_batch_size: int = Field(16, ge=1, description="(sample, step) rows per backward pass")
    updates_per_iteration: int = Field(
        1, ge=1, description="optimizer steps per rollout (split over the rows)"
    )
    best_of: int | None = Field(
        None,
        ge=2,
        description="train only the best_of / 2 samples of each group with the highest final reward and the best_of "
        "/ 2 with the lowest (DanceGRPO's best-of-n: a cheaper update on the clearest signal); the advantages are "
        "the whole group's, the others' set to 0; null = every sample",
    )
    filter_zero_advantage: bool = Field(
        True,
        description="skip (sample, step) rows whose advantage is 0, their KL term with them (the loss averages "
        "over the rows kept)",
    )


class NFTSection(Section):
    """DiffusionNFT's settings (``grpo.objective=nft``; :mod:`densegrpo_fast.nft`), the released ones by default."""

    beta: float = Field(
        1.0, gt=0, description="how far the implicit policies lie from the old one: v+- = v_old +- beta (v - v_old) "
        "(released: 1.0 for GenEval and PickScore, 0.1 for OCR and several rewards)",
    )  # fmt: skip
    adv_scale: float = Field(
        5.0,
        gt=0,
        description="s of r = clip(1/2 + A / (2 s), 0, 1), A the sparse advantage (clip it with dense.adv_clip = s, "
        "normalise with dense.global_std as released); the loss is multiplied by s as in the released code",
    )
    kl: float = Field(
        1e-4, ge=0, description="weight of the mean squared velocity difference to the reference policy (0: no "
        "reference forward)",
    )  # fmt: skip
    old_decay_rate: float = Field(
        1e-3, ge=0, description="the old policy keeps d = min(rate x max(0, step - delay), max) of itself at each "
        "iteration's end, step the optimizer steps so far (0: the old policy is the trained one: on-policy)",
    )  # fmt: skip
    old_decay_max: float = Field(
        0.5, ge=0, lt=1, description="the most d reaches (released: 0.5; OCR: 0.999)"
    )
    old_decay_delay: int = Field(0, ge=0, description="optimizer steps before d grows (released: 0; OCR: 75)")


class AWMSection(Section):
    """Advantage Weighted Matching's settings (``grpo.objective=awm``; :mod:`densegrpo_fast.awm`), the released
    ones by default (SD3.5-M on GenEval and OCR)."""

    adv_scale: float = Field(
        5.0,
        gt=0,
        description="s of a = clip(A, -s, s) / s, A the sparse advantage (normalise with dense.global_std=true as "
        "released): each sample's weight in [-1, 1]",
    )
    weighting: Literal["ghuber", "uniform", "t"] = Field(
        "ghuber",
        description="how a pair's flow-matching error e enters the loss: ghuber = t ((e + 1e-10)^p - 1e-10^p) / p "
        "(p = awm.power; the release's), uniform = e, t = t e",
    )
    power: float = Field(0.25, gt=0, le=1, description="p of the ghuber weighting (released: 0.25)")
    kl: float = Field(
        3e-3, ge=0, description="weight of the mean squared velocity difference to the reference policy (0: no "
        "reference forward; released: 3e-3 for GenEval and OCR, 1e-4 for PickScore)",
    )  # fmt: skip
    anchor_kl: float = Field(
        1.0, ge=0, description="weight of the mean squared velocity difference to the anchor, a lagged copy of the "
        "trained weights (the release's KL-EMA, which it applies only with a KL to the reference; here it "
        "applies whatever awm.kl is; 0: no anchor kept and no anchor forward)",
    )  # fmt: skip
    anchor_decay_rate: float = Field(
        1e-3, ge=0, description="the anchor keeps d = min(rate x max(0, step - delay), max) of itself at each "
        "iteration's end, step the optimizer steps so far (0: the anchor becomes the trained weights)",
    )  # fmt: skip
    anchor_decay_max: float = Field(0.3, ge=0, lt=1, description="the most d reaches (released: 0.3)")
    anchor_decay_delay: int = Field(0, ge=0, description="optimizer steps before d grows (released: 0)")


class OptimSection(Section):
    name: Literal["adamw", "adamw8bit"] = Field(
        "adamw",
        description="adamw: torch's AdamW (moments in the weights' dtype); adamw8bit: bitsandbytes' AdamW8bit "
        "(the [bnb] extra), its moments in 8 bits by blocks of 256 (2 bytes a weight, where AdamW takes 8 for "
        "fp32 weights and 4 for bf16 ones; tensors under 4096 weights keep fp32 moments), as Flow-GRPO's "
        "use_8bit_adam: for full fine-tuning in one process or replicated (not with FSDP2's sharded weights)",
    )
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clip")
    schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant",
        description="learning-rate decay after warm-up, from lr to lr * min_lr_ratio at run.iterations "
        "(--max-iterations moves that end, on a resume too)",
    )
    warmup_iterations: int = Field(
        0, ge=0, description="iterations of linear warm-up: iteration i < w runs at lr * (i+1) / (w+1)"
    )
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="final learning rate of a decay, as a fraction of lr"
    )

    def lr_at(self, iteration: int, iterations: int) -> float:
        """The learning rate of iteration ``iteration`` (0-based) of a run of ``iterations``: a function of
        the iteration alone, so a resumed run follows the same schedule with no scheduler state."""
        if iteration < self.warmup_iterations:
            return self.lr * (iteration + 1) / (self.warmup_iterations + 1)
        if self.schedule == "constant":
            return self.lr
        span = max(1, iterations - self.warmup_iterations)
        progress = min(1.0, (iteration - self.warmup_iterations) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.schedule == "cosine" else 1 - progress
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * shape)


class LoRASection(Section):
    enabled: bool = Field(
        True, description="LoRA through peft; false = full fine-tuning (frozen reference copy)"
    )
    merge_for_sampling: bool = Field(
        False,
        description="rollouts and held-out evals run each adapter folded into a temporary copy of its base weight "
        "(one matmul per layer instead of three); the update then recomputes the old log-probs itself, as it "
        "does under model.autocast anyway (toy: 1.2-1.8x faster rollouts)",
    )
    init: str | None = Field(
        None,
        description="pretrained families: start the adapters from this LoRA instead of zero: a run's lora_ema/ "
        "folder, a diffusers LoRA (.safetensors or its folder), or a peft adapter folder (Flow-GRPO's published "
        "LoRAs); its rank must be lora.rank; the KL reference stays the base model. Wan 2.2 A14B's two experts: "
        "the high-noise expert's (transformer), with the low-noise expert's in its folder's transformer_2/ (as a "
        "two-expert run's lora_ema/ holds it) or in lora.init_2",
    )
    init_2: str | None = Field(
        None,
        description="Wan 2.2 A14B: the low-noise expert's LoRA (transformer_2), in lora.init's formats, beside "
        "lora.init's for the high-noise expert (null: lora.init's folder's transformer_2/)",
    )
    rank: int = Field(32, ge=1, description="LoRA r")
    alpha: float = Field(64, gt=0, description="LoRA alpha")
    target_modules: list[str] = Field(
        default_factory=lambda: ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                                 "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"],
        description="module-name suffixes that get adapters (Flow-GRPO's SD3 attention projections; in FLUX.1 the same "
        "names cover the double-stream blocks and the single-stream blocks' q/k/v, in Qwen-Image every block's "
        "attention, to which Flow-GRPO's Qwen-Image recipe adds the MLPs: configs/qwen_image_pickscore.yaml; "
        "model.family z_image defaults to Z-Image's attention.to_q/to_k/to_v/to_out.0, flux2_klein adds its "
        "single-stream blocks' attn.to_qkv_mlp_proj, wan to Wan's attn1 and attn2 to_q/to_k/to_v/to_out.0)",
    )  # fmt: skip


class EMASection(Section):
    enabled: bool = Field(
        True,
        description="keep an EMA of the trained weights for evaluation (false: the exports, still named "
        "policy_ema.safetensors and lora_ema/, hold the trained weights themselves)",
    )
    decay: float = Field(0.9, ge=0, lt=1, description="EMA decay")
    every: int = Field(8, ge=1, description="optimizer steps between EMA updates")
    warmup: bool = Field(
        False,
        description="Flow-GRPO's decay warm-up: the update after optimizer step s decays by min(decay, s / (s + "
        "9)), so early exports follow the trained weights (without it, a 0.97 EMA updated every 4 steps still "
        "holds 74 % of the starting weights after 40 optimizer steps)",
    )


class WandbSection(Section):
    enabled: bool = Field(
        False,
        description="also log metrics and sample grids to Weights & Biases (pip install 'densegrpo-fast[wandb]')",
    )
    project: str = Field("densegrpo-fast", description="W&B project")
    entity: str | None = Field(None, description="W&B team or user (null = your default entity)")
    name: str | None = Field(None, description="W&B run name (null = the run directory's name)")
    tags: list[str] = Field(default_factory=list, description="W&B run tags")
    mode: Literal["online", "offline"] = Field(
        "online",
        description="offline: write the W&B run under the run directory's wandb/ and upload it later with "
        "`wandb sync` (machines without network)",
    )


class RunSection(Section):
    iterations: int = Field(100, ge=1, description="training iterations (rollout + update)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of prompts, noise and initial weights")
    output_dir: str = Field("runs/train", description="run directory (checkpoints, logs, plots)")
    checkpoint_every: int = Field(10, ge=1, description="iterations between checkpoints")
    export_every: int = Field(
        0,
        ge=0,
        description="iterations between kept exports of the EMA policy, each in exports/iter_NNNNN/ (what the "
        "final export writes: policy_ema.safetensors for eval --checkpoint, and lora_ema/ with LoRA), to go "
        "back to an earlier policy; 0 = the final export only",
    )
    keep_exports: int | None = Field(
        None, ge=1, description="kept exports left on disk: the latest this many (null = every one)"
    )
    sample_grid_every: int = Field(10, ge=0, description="iterations between sample-grid PNGs (0 = never)")
    eval_every: int = Field(0, ge=0, description="iterations between held-out evals (0 = only at the end)")
    time_budget_s: float | None = Field(
        None,
        gt=0,
        description="start no iteration after this much training wall time (seconds: the iterations' own, "
        "not the evaluations, checkpoints and export), whatever run.iterations says",
    )
    tensorboard: bool = Field(True, description="write TensorBoard events beside metrics.jsonl")
    wandb: WandbSection = Field(default_factory=WandbSection)
    deterministic: bool = Field(True, description="deterministic algorithms (CPU runs resume bit for bit)")


class EvalSection(Section):
    _split = field_validator("dataset")(_toy_split)
    dataset: str = Field(
        "toy:test", description="held-out prompts: toy:test, or a text file (one prompt per line) / .jsonl"
    )
    num_prompts: int | None = Field(
        256,
        ge=1,
        description="held-out prompts (toy: balanced over categories); null = every prompt of the file "
        "(pretrained families: null)",
    )
    images_per_prompt: int = Field(
        1,
        ge=1,
        le=256,  # (the image number is the low 8 bits of its noise seed: image 256 would repeat image 0's)
        description="samples per prompt, each from its own noise (pretrained families; the toy takes 1)",
    )
    num_steps: int = Field(
        20,
        ge=1,
        le=1000,
        description="Euler ODE steps of the evaluation sampler (sd3: 40, flux and flux_kontext: 28, qwen_image: "
        "50, qwen_image_edit: 40, z_image: 50, flux2_klein: 50, wan: 50)",
    )
    guidance_scale: float = Field(
        1.5,
        ge=1.0,
        description="CFG scale of the evaluation sampler, as sampling.guidance_scale (sd3: 4.5, flux: 3.5, "
        "flux_kontext: 2.5, qwen_image and qwen_image_edit: 4.0, z_image: 5.0, flux2_klein: 4.0, wan: 5.0)",
    )
    shift: float | None = Field(
        1.0,
        gt=0,
        description="sigma-grid shift of the evaluation sampler; null = the model's own grid (sd3: 3.0, "
        "flux, flux_kontext, qwen_image, qwen_image_edit, z_image, flux2_klein and wan: null)",
    )
    seed: int = Field(
        0,
        ge=0,
        le=2**23 - 1,
        description="seed of prompt order and initial noise (< 2^23; mixed with the prompt's index and the "
        "image's into each image's noise seed)",
    )
    _resolution = field_validator("resolution", mode="before")(_resolution_shape)
    resolution: int | tuple[int, int] | None = Field(
        None,
        description="pretrained families: image side of the evaluation sampler in pixels, or [height, width]; "
        "multiples of 16; null = model.resolution (e.g. train at 512 and evaluate at the model's native 1024); with model.compile, "
        "the held-out evaluations during training at another side run eagerly (the compiled blocks keep the "
        "training size's graphs)",
    )
    batch_size: int = Field(
        128,
        ge=1,
        description="images (videos) per sampler call (sd3: 16, flux, flux_kontext, qwen_image, qwen_image_edit, "
        "z_image and flux2_klein: 8, wan: 4)",
    )
    output_dir: str = Field(
        "runs/toy_eval",
        description="where the scores (toy: scores.json, samples.png; else scores.jsonl, summary.json) go "
        "(sd3: runs/sd3_eval, flux: runs/flux_eval, flux_kontext: runs/flux_kontext_eval, qwen_image: "
        "runs/qwen_image_eval, qwen_image_edit: runs/qwen_image_edit_eval, z_image: runs/z_image_eval, flux2_klein: runs/flux2_klein_eval, wan: runs/wan_eval)",
    )
    grid_size: int = Field(48, ge=0, description="toy: samples drawn in samples.png (0 = no grid)")
    save_images: bool = Field(
        False,
        description="pretrained families' eval command: also write every sample as a PNG",
    )
    rewards: dict[str, RewardSection] = Field(
        default_factory=dict, description="extra held-out metrics, logged as eval_<key> beside eval_reward"
    )

    def largest_batch(self, processes: int = 1) -> int:
        """Images in the evaluation's largest sampler call, in a job of ``processes`` (each samples its share
        of the prompts' images): ``batch_size``, or the share when smaller."""
        rows = self.num_prompts * self.images_per_prompt if self.num_prompts else None
        share = -(-rows // processes) if rows else self.batch_size
        return min(self.batch_size, share)


# Where a config leaves them out, the samplers' settings follow model.family. EvalSection's field defaults are
# the toy's: a model without its evaluation section is evaluated as the papers and the pipelines sample it
# (SD3.5: 40 steps, CFG 4.5, shift 3.0; FLUX.1-dev: 28 steps, guidance 3.5, its own grid; Qwen-Image: its
# model card's 50 steps, true CFG 4.0, its own grid; Z-Image: its model card's 50 steps and CFG 4, the engine's
# 5.0, its own grid; FLUX.1 Kontext: FluxKontextPipeline's 28 steps, its documented example's guidance 2.5).
# SamplingSection's are SD3.5's: FLUX.1 rolls out with its own grid and guidance 3.5 (Kontext 2.5),
# Qwen-Image with its own grid and CFG 4.0, Z-Image with its own grid and CFG 5.0. LoRA targets Z-Image's
# attention projections, whose names differ from the MMDiTs'.
EVAL_FAMILY_DEFAULTS: dict[str, dict] = {
    "toy": {},
    "sd3": {"num_steps": 40, "guidance_scale": 4.5, "shift": 3.0, "batch_size": 16, "num_prompts": None,
            "output_dir": "runs/sd3_eval"},
    "flux": {"num_steps": 28, "guidance_scale": 3.5, "shift": None, "batch_size": 8, "num_prompts": None,
             "output_dir": "runs/flux_eval"},
    "flux_kontext": {"num_steps": 28, "guidance_scale": 2.5, "shift": None, "batch_size": 8,
                     "num_prompts": None, "output_dir": "runs/flux_kontext_eval"},
    "qwen_image": {"num_steps": 50, "guidance_scale": 4.0, "shift": None, "batch_size": 8,
                   "num_prompts": None, "output_dir": "runs/qwen_image_eval"},
    "qwen_image_edit": {"num_steps": 40, "guidance_scale": 4.0, "shift": None, "batch_size": 8,
                        "num_prompts": None, "output_dir": "runs/qwen_image_edit_eval"},
    "z_image": {"num_steps": 50, "guidance_scale": 5.0, "shift": None, "batch_size": 8, "num_prompts": None,
                "output_dir": "runs/z_image_eval"},
    "flux2_klein": {"num_steps": 50, "guidance_scale": 4.0, "shift": None, "batch_size": 8, "num_prompts": None,
                    "output_dir": "runs/flux2_klein_eval"},
    "wan": {"num_steps": 50, "guidance_scale": 5.0, "shift": None, "batch_size": 4, "num_prompts": None,
            "output_dir": "runs/wan_eval"},
}  # fmt: skip
SAMPLING_FAMILY_DEFAULTS: dict[str, dict] = {
    "toy": {},
    "sd3": {},
    "flux": {"shift": None, "guidance_scale": 3.5},
    "flux_kontext": {"shift": None, "guidance_scale": 2.5},
    "qwen_image": {"shift": None, "guidance_scale": 4.0},
    "qwen_image_edit": {"shift": None, "guidance_scale": 4.0},
    "z_image": {"shift": None, "guidance_scale": 5.0},
    "flux2_klein": {"shift": None, "guidance_scale": 4.0},
    "wan": {"shift": None, "guidance_scale": 5.0},
}
#: Z-Image's attention projections (every block's, the refiners' included): Flow-GRPO's SD3 choice of
#: attention only, in Z-Image's names.
Z_IMAGE_LORA_TARGETS = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"]
#: FLUX.2 [klein]'s: the double-stream blocks' eight attention projections (the SD3 names) and the single-stream
#: blocks' fused q/k/v and MLP input projection (their output projection, ``attn.to_out``, shares its name with the
#: double-stream blocks' ModuleList, which peft cannot adapt).
FLUX2_KLEIN_LORA_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_qkv_mlp_proj",
]
#: Wan's attention projections: each block's self-attention (``attn1``) and cross-attention to the prompt
#: (``attn2``), Flow-GRPO's SD3 choice of attention only, in Wan's names.
WAN_LORA_TARGETS = [f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
LORA_FAMILY_DEFAULTS: dict[str, dict] = {
    "toy": {}, "sd3": {}, "flux": {}, "flux_kontext": {}, "qwen_image": {}, "qwen_image_edit": {},
    "z_image": {"target_modules": Z_IMAGE_LORA_TARGETS},
    "flux2_klein": {"target_modules": FLUX2_KLEIN_LORA_TARGETS},
    "wan": {"target_modules": WAN_LORA_TARGETS},
}  # fmt: skip


def fill_family_defaults(model: ModelSection, **sections: Section) -> None:
    """Give the settings of ``eval`` / ``sampling`` that the config left out their value for
    ``model.family``. They stay "not set" (out of ``model_fields_set``), so a config validated again with
    another family is filled again for it."""
    tables = {
        "eval": EVAL_FAMILY_DEFAULTS,
        "sampling": SAMPLING_FAMILY_DEFAULTS,
        "lora": LORA_FAMILY_DEFAULTS,
    }
    for name, section in sections.items():
        table = tables[name]
        for key in sorted(set().union(*table.values())):  # (a family without the key: the field's default)
            if key not in section.model_fields_set:
                default = type(section).model_fields[key].get_default(call_default_factory=True)
                setattr(section, key, copy.deepcopy(table[model.family].get(key, default)))
                section.model_fields_set.discard(key)  # (assignment marks it set)


#: The fields of an evaluation's ``scores.jsonl`` lines beside the rewards' scores (an edit's ``image``).
SCORE_LINE_FIELDS = ("index", "prompt", "image")


def reward_problems(sections: dict[str, RewardSection]) -> list[str]:
    """Unknown reward names and bad keywords of the reward ``sections`` (dotted name -> section), found
    without building any reward."""
    from densegrpo_fast.rewards import available, kwargs_problems, unknown_name

    problems = []
    for where, r in sections.items():
        key = where.removeprefix("eval.rewards.")
        if key != where and key in SCORE_LINE_FIELDS:
            problems.append(
                f"{where}: the key {key!r} names a field of the evaluation's scores.jsonl lines "
                f"({', '.join(SCORE_LINE_FIELDS)}), which a reward's scores would overwrite: give the reward "
                "another key, e.g. its name"
            )
        if r.name not in available():
            problems.append(unknown_name(r.name, f"{where}.name"))
        else:  # the rewards' own messages name reward.kwargs: say which section they are about
            problems += [
                p if where == "reward" else f"{where}: {p}" for p in kwargs_problems(r.name, r.kwargs)
            ]
    return problems


def model_eval_problems(
    model: ModelSection, ev: EvalSection, sampling: SamplingSection | None = None
) -> list[str]:
    """Cross-checks of the model and eval sections, and of the training grid (``sampling``) when there is
    one: what both ``train`` and ``eval`` refuse."""
    out = []
    if model.family == "toy" and ev.images_per_prompt != 1:
        out.append(
            f"eval.images_per_prompt ({ev.images_per_prompt}): the toy evaluation draws one image per "
            "prompt (its noise is fixed per prompt); set it to 1 and raise eval.num_prompts for more images"
        )
    if ev.resolution is not None and model.family == "toy":
        out.append(
            f"eval.resolution ({shown_resolution(ev.resolution)}): the toy model samples 32 px images only; "
            "remove it"
        )
    elif ev.resolution is not None:
        bad = resolution_problem(
            "eval.resolution", ev.resolution, 16, "the VAE's factor 8 x the transformer's 2x2 patches"
        )
        out += [] if bad is None else [bad]
    shifts = [("eval.shift", ev.shift)]
    if sampling is not None:
        shifts.insert(0, ("sampling.shift", sampling.shift))
    for where, value in shifts:
        if value is None and model.family == "toy":
            out.append(
                f"{where} is null (the model's own grid), but the toy model has no scheduler of its own: "
                "give a number (the toy config uses 1.0, SD3.5 3.0)"
            )
        if value is not None and model.family in (
            "flux",
            "flux_kontext",
            "qwen_image",
            "qwen_image_edit",
            "z_image",
            "flux2_klein",
        ):
            name, pipeline = {
                "flux": ("FLUX.1", "FluxPipeline"),
                "flux_kontext": ("FLUX.1 Kontext", "FluxKontextPipeline"),
                "qwen_image": ("Qwen-Image", "QwenImagePipeline"),
                "qwen_image_edit": ("Qwen-Image-Edit", "QwenImageEditPlusPipeline"),
                "z_image": ("Z-Image", "ZImagePipeline"),
                "flux2_klein": ("FLUX.2 [klein]", "Flux2KleinPipeline"),
            }[model.family]
            grid = (
                "its pipeline's grid (linspace(1, 1/T, T) shifted as its scheduler says, not SD3's grid with "
                "a fixed shift)"
                if model.family == "z_image"
                else "a grid shifted by the image's token count (and FLUX.2 [klein]'s by the step count), not a "
                "fixed shift"
            )
            out.append(
                f"{where} ({value}) with model.family {model.family}: {name} samples on {grid}; set "
                f"{where}=null for {pipeline}'s own grid"
            )
    return out


class TrainConfig(Section):
    """The whole of one training run. ``densegrpo-fast show-config --config X`` prints it resolved."""

    model: ModelSection = Field(default_factory=ModelSection)
    prompts: PromptSection = Field(default_factory=PromptSection)
    sampling: SamplingSection = Field(default_factory=SamplingSection)
    noise: NoiseSection = Field(default_factory=NoiseSection)
    reward: RewardSection = Field(default_factory=RewardSection)
    dense: DenseSection = Field(default_factory=DenseSection)
    grpo: GRPOSection = Field(default_factory=GRPOSection)
    nft: NFTSection = Field(default_factory=NFTSection)
    awm: AWMSection = Field(default_factory=AWMSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    lora: LoRASection = Field(default_factory=LoRASection)
    ema: EMASection = Field(default_factory=EMASection)
    run: RunSection = Field(default_factory=RunSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    def _forward_problems(self) -> list[str]:
        """What the forward-process objectives (grpo.objective=nft or awm) do not combine with: they train on the
        final reward's advantages, with no log-prob."""
        o = self.grpo.objective
        rules = [
            (self.dense.mode != "sparse", f"dense.mode={self.dense.mode!r}: {o} trains on the final reward's "
             "advantages (the step rewards of dense modes would score completions nothing uses)", "dense.mode=sparse"),
            (self.noise.kind == "calibrated", f"noise.kind=calibrated balances dense rewards' gains for GRPO's "
             f"SDE steps; {o} samples with any fixed noise", "noise.kind=uniform (noise.level=0: the ODE sampler "
             f"{'DiffusionNFT' if o == 'nft' else 'AWM on PickScore'} uses)"),
            (self.grpo.filter_zero_advantage, "grpo.filter_zero_advantage: a sample of advantage 0 "
             + ("has r = 1/2, and its nft loss is not 0" if o == "nft" else "still has its awm KL terms"),
             "grpo.filter_zero_advantage=false"),
            (self.grpo.ratio_norm, f"grpo.ratio_norm normalises the SDE log-ratio {o} has none of", "grpo.ratio_norm=false"),
            (self.grpo.kl_target is not None, f"grpo.kl_target adapts GRPO's KL weight; {o}'s is {o}.kl",
             "grpo.kl_target=null"),
            (self.grpo.step_weight != "none", "grpo.step_weight weights GRPO's policy term", "grpo.step_weight=none"),
            (self.grpo.best_of is not None, f"grpo.best_of keeps the extremes of each group; {o} trains every sample "
             "by its advantage", "grpo.best_of=null"),
        ]  # fmt: skip
        return [f"grpo.objective={o} with {what}: set {fix}" for bad, what, fix in rules if bad]

    def trained_steps(self) -> list[int]:
        """``grpo.trained_steps``, or by default every step with noise but the last one (ALGORITHM.md §3):
        Flow-GRPO never trains the grid's last step, whose noise is the smallest; under CPS the last step has
        none, and the one before it the smallest (``sigma[T-1] sin(eta pi / 2)``: 8e-3 on SD3.5's grid). The
        forward-process objectives train times, not SDE steps: nft every time of the grid, awm those AWM's
        GenEval release draws from."""
        if self.grpo.trained_steps is not None:
            return self.grpo.trained_steps
        T = self.sampling.num_steps
        if self.grpo.objective == "nft":  # (every time of the sampler's grid, t = 1 included, as released)
            return list(range(T))
        if self.grpo.objective == "awm":
            # (the times of the release's GenEval and OCR runs: neither t = 1 nor the grid's last tenth)
            return list(range(1, int(0.9 * T))) or list(range(T))
        return list(range(max(0, T - 2) if self.noise.sde == "cps" else T - 1))

    @model_validator(mode="after")
    def _cross_checks(self) -> TrainConfig:
        fill_family_defaults(self.model, eval=self.eval, sampling=self.sampling, lora=self.lora)
        T = self.sampling.num_steps
        problems = []
        if "reward" in self.eval.rewards:
            problems.append(
                "eval.rewards.reward: the key 'reward' is taken (the training reward is logged as eval_reward); "
                "name the metric otherwise, e.g. eval.rewards.pickscore"
            )
        n = self.noise
        if (n.window_start is None) != (n.window_size is None):
            problems.append(
                f"noise.window_start ({n.window_start}) and noise.window_size ({n.window_size}): give both, or "
                "neither for SDE at every step"
            )
        elif n.window_start is not None and n.window_start + n.window_size > T:
            problems.append(
                f"noise.window_start + noise.window_size ({n.window_start} + {n.window_size}) must be <= "
                f"sampling.num_steps ({T}): the window must fit in the grid"
            )
        if n.window_move != "fixed" and n.window_size is None:
            problems.append(
                f"noise.window_move={n.window_move} needs a window: give noise.window_start and noise.window_size "
                "(or window_move=fixed)"
            )
        steps = self.grpo.trained_steps
        grpo_like = self.grpo.objective == "grpo"  # (nft and awm train any step's time, noise or none)
        default = self.trained_steps()
        if steps is None and not default:
            problems.append(
                f"sampling.num_steps={T}{' under noise.sde=cps' if n.sde == 'cps' else ''} leaves no step that "
                "grpo.trained_steps null trains (every step with noise but the last one), so the run would train "
                "nothing; take more steps, or list grpo.trained_steps"
            )
        elif (
            steps is None
            and grpo_like  # (nft and awm train their default steps whatever noise the rollout drew)
            and n.window_move == "fixed"
            and n.window_start is not None
            and n.window_start >= len(default)
        ):
            problems.append(
                f"noise.window_start={n.window_start}, noise.window_size={n.window_size}: the window holds only "
                f"steps that grpo.trained_steps null (steps 0 to {len(default) - 1}{' under noise.sde=cps' if n.sde == 'cps' else ''}) "
                "never trains, so the run would train nothing; start the window earlier, or list grpo.trained_steps"
            )
        for k in steps or []:
            if not 0 <= k < T:
                problems.append(
                    f"grpo.trained_steps contains {k}: steps run from 0 to sampling.num_steps - 1 = {T - 1}"
                )
        if steps is not None and not steps:
            problems.append("grpo.trained_steps is empty: the run would train nothing; list steps, or null")
        elif (
            steps
            and grpo_like
            and n.window_move == "fixed"
            and n.window_start is not None
            and n.window_size is not None
        ):
            window = range(n.window_start, n.window_start + n.window_size)
            if not any(k in window for k in steps):
                problems.append(
                    f"grpo.trained_steps {steps} has no step of the SDE window {list(window)} (noise.window_start, "
                    "noise.window_size): steps outside it have no noise and are never trained, so the run would "
                    "train nothing; list steps of the window"
                )
        if self.grpo.kl_target is not None and self.grpo.beta == 0:
            problems.append(
                "grpo.kl_target adapts the KL weight from grpo.beta, which is 0 (no KL term, no reference): give "
                "grpo.beta > 0 as the starting weight (e.g. 0.04), or leave kl_target null"
            )
        k, G = self.grpo.best_of, self.sampling.group_size
        if k is not None and (k % 2 or k >= G):
            problems.append(
                f"grpo.best_of ({k}) must be even and below sampling.group_size ({G}): it trains the best "
                "best_of / 2 and the worst best_of / 2 samples of each group (null trains them all)"
            )
        if k is not None and not self.grpo.filter_zero_advantage:
            problems.append(
                "grpo.best_of needs grpo.filter_zero_advantage=true: the samples it leaves out get advantage 0 and "
                "are skipped as such (without the filter they would still train their KL term)"
            )
        groups = self.prompts.prompts_per_iteration
        if self.sampling.reward_waves > groups:
            problems.append(
                f"sampling.reward_waves ({self.sampling.reward_waves}) must be <= prompts.prompts_per_iteration "
                f"({groups}): a wave holds whole groups; lower the waves or raise the prompts"
            )
        if self.optim.warmup_iterations >= self.run.iterations:
            problems.append(
                f"optim.warmup_iterations ({self.optim.warmup_iterations}) must be < run.iterations "
                f"({self.run.iterations}): the warm-up would never reach optim.lr; shorten the warm-up"
            )
        # (nft and awm train no log-prob: ODE rollouts serve them)
        if n.level == 0 and self.grpo.objective == "grpo":
            problems.append(
                "noise.level is 0: uniform noise would be none (every step an ODE step, with no log-prob to "
                "train), and calibration starts psi at the level and moves only the steps that start with noise; "
                "give a level above 0 (Flow-GRPO's 0.7; where a calibrated psi table is read, the level is not "
                "used, so any value above 0 serves)"
            )
        if self.noise.calibration.psi_min > self.noise.calibration.psi_max:
            problems.append("noise.calibration.psi_min must be <= psi_max")
        if self.noise.sde == "cps" and steps and T - 1 in steps and grpo_like:
            problems.append(
                f"grpo.trained_steps contains the grid's last step {T - 1}, which has no noise under noise.sde=cps "
                "(its noise std is sigma_next = 0 times eta's share), so it would train nothing; leave it out"
            )
        if self.noise.sde == "cps":
            for key, value in (
                ("level", self.noise.level),
                ("calibration.psi_min", self.noise.calibration.psi_min),
            ):
                if value > 1:
                    problems.append(
                        f"noise.{key} ({value}) must be <= 1 with noise.sde=cps: it is eta, the share of fresh "
                        "noise sin(eta pi / 2), which peaks at 1; use a value in [0, 1] (0.7 is a common start)"
                    )
        problems += self.model.problems()
        if self.model.dtype == "fp16":
            problems.append(
                "model.dtype=fp16 trains without loss scaling: the update's gradients (about 1e-9 to 1e-7 per "
                "latent element at 512 px) fall below fp16's range and vanish, so the run would train almost "
                "nothing; use model.dtype=bf16 (the same memory, fp32's range). The eval command takes fp16"
            )
        if self.dense.multi_reward == "per_reward" and self.reward.name != "multi":
            problems.append(
                f"dense.multi_reward=per_reward normalises the components of a multi reward, and reward.name is "
                f"{self.reward.name!r}: set reward.name=multi with its components, or dense.multi_reward=sum"
            )
        if self.lora.enabled and self.lora.init is not None and self.model.family == "toy":
            problems.append(  # (whether the file exists is train's question: a resumed run need not read it)
                "lora.init starts the pretrained families' adapters: the toy model trains its adapters from "
                "zero; set "
                "lora.init=null"
            )
        if self.lora.enabled and self.lora.init_2 is not None:
            if self.model.family != "wan":
                problems.append(
                    f"lora.init_2 ({self.lora.init_2!r}) starts the low-noise expert of Wan 2.2 T2V-A14B "
                    f"(model.family wan with two experts): model.family {self.model.family} has one transformer; "
                    "remove it"
                )
            elif self.lora.init is None:
                problems.append(
                    f"lora.init_2 ({self.lora.init_2!r}) without lora.init: the low-noise expert's LoRA comes with "
                    "the high-noise expert's; give lora.init too"
                )
        if self.model.sharding == "fsdp" and self.lora.enabled and self.lora.merge_for_sampling:
            problems.append(
                "lora.merge_for_sampling with model.sharding=fsdp: the merge writes each base weight whole, and "
                "FSDP2 holds it in shards; set lora.merge_for_sampling=false, or model.sharding=replicate"
            )
        if self.grpo.objective != "grpo":
            problems += self._forward_problems()
        if self.model.sharding == "fsdp" and self.optim.name == "adamw8bit":
            problems.append(
                "optim.name=adamw8bit with model.sharding=fsdp: bitsandbytes' optimizer does not take FSDP2's "
                "sharded weights; use optim.name=adamw (its state is sharded too), or model.sharding=replicate"
            )
        problems += model_eval_problems(self.model, self.eval, self.sampling)
        sections = {"reward": self.reward, **{f"eval.rewards.{k}": r for k, r in self.eval.rewards.items()}}
        problems += reward_problems(sections)
        if problems:
            raise CrossCheckError(problems)
        return self

    @property
    def rows_per_iteration(self) -> int:
        """B = prompts per iteration x group size."""
        return self.prompts.prompts_per_iteration * self.sampling.group_size

    def caveats(self) -> list[str]:
        """Settings that run, but not as the chosen objective's release runs: ``validate`` notes them and
        ``train`` warns of them (a line each: the setting, what it does, the release's setting)."""
        o, out = self.grpo.objective, []
        if o == "grpo":
            return out
        name = {"nft": "DiffusionNFT", "awm": "AWM"}[o]
        u = self.grpo.updates_per_iteration
        if o == "awm" and u > 1:
            out.append(
                f"grpo.objective=awm with grpo.updates_per_iteration={u}: the optimizer steps after the first "
                "train on the rollouts of older weights, with no ratio to correct for them (AWM's release takes "
                "one step per iteration, on-policy); set grpo.updates_per_iteration=1 for it"
            )
        if not self.dense.global_std:
            out.append(
                f"grpo.objective={o} with dense.global_std=false: each group's own std normalises its advantages "
                f"({name}'s release divides by the whole batch's); set dense.global_std=true for it"
            )
        scale = self.nft.adv_scale if o == "nft" else self.awm.adv_scale
        if self.dense.adv_clip < scale:
            reach = "r within [1/2 - c/(2s), 1/2 + c/(2s)]" if o == "nft" else "a within [-c/s, c/s]"
            out.append(
                f"dense.adv_clip={self.dense.adv_clip} below {o}.adv_scale={scale}: the advantages are clipped to "
                f"+-{self.dense.adv_clip} first, which keeps {reach} (c the clip, s the scale); {name}'s release "
                f"clips at its scale: set dense.adv_clip={scale}"
            )
        return out

    def ignored_settings(self) -> list[tuple[list[str], str]]:
        """Settings the config gives (in its file or overrides) that this run does not use: (dotted keys, why)
        per section. ``validate`` notes them all; ``train`` warns of those given on the command line (a file's
        LoRA settings are no mistake when the command line turns LoRA off)."""
        n = self.noise
        unused = [  # (section's dotted name, section, its fields, whether they are unused, why)
            ("lora", self.lora, ("init", "init_2", "rank", "alpha", "target_modules", "merge_for_sampling"), not self.lora.enabled,
             "lora.enabled=false trains the full model"),
            ("dense", self.dense, ("completion_steps",), self.dense.mode == "sparse",
             "dense.mode=sparse scores the final image only (psi's calibration completes each latent over all "
             "its remaining steps, whatever n)"),
            ("dense", self.dense, ("completion_batching",), self.dense.mode == "sparse" and n.kind == "uniform",
             "dense.mode=sparse with uniform noise scores the final image only, with no completions"),
            ("noise.calibration", n.calibration, type(n.calibration).model_fields, n.kind == "uniform",
             "noise.kind=uniform does not calibrate"),
            ("noise", n, ("window_every",), n.window_move == "fixed", "noise.window_move=fixed never moves"),
            ("ema", self.ema, ("decay", "every"), not self.ema.enabled, "ema.enabled=false keeps no EMA"),
            ("run", self.run, ("keep_exports",), self.run.export_every == 0,
             "run.export_every=0 keeps no export but the final one"),
            ("grpo", self.grpo, ("clip_range", "clip_range_high", "beta", "kl_exact"), self.grpo.objective != "grpo",
             f"grpo.objective={self.grpo.objective} has no ratio to clip, and its KL weight is "
             f"{self.grpo.objective}.kl"),
            ("nft", self.nft, type(self.nft).model_fields, self.grpo.objective != "nft",
             "the nft section serves grpo.objective=nft"),
            ("awm", self.awm, type(self.awm).model_fields, self.grpo.objective != "awm",
             "the awm section serves grpo.objective=awm"),
            ("awm", self.awm, ("anchor_decay_rate", "anchor_decay_max", "anchor_decay_delay"),
             self.grpo.objective == "awm" and self.awm.anchor_kl == 0, "awm.anchor_kl=0 keeps no anchor"),
            ("grpo", self.grpo, ("step_draw",), self.grpo.step_fraction == 1,
             "grpo.step_fraction=1 trains every trained step: nothing is drawn"),
            ("awm", self.awm, ("power",), self.grpo.objective == "awm" and self.awm.weighting != "ghuber",
             f"awm.weighting={self.awm.weighting} has no power (the ghuber weighting's)"),
            ("model", self.model, ("max_sequence_length",), self.model.family == "qwen_image_edit",
             "model.family=qwen_image_edit encodes every token of the instruction with its image's: the pipeline "
             "cuts nothing (only densegrpo-fast memory reads it, as the length of its stand-in prompts)"),
            ("model", self.model, ("guidance_scale_2",),
             self.sampling.guidance_scale == 1 and self.eval.guidance_scale == 1,
             "sampling.guidance_scale and eval.guidance_scale are 1: CFG is off for both experts (as in WanPipeline)"),
            ("model", self.model, ("negative_prompt",),
             self.sampling.guidance_scale == 1 and self.eval.guidance_scale == 1,
             "sampling.guidance_scale and eval.guidance_scale are 1: CFG is off, and the negative prompt changes no sample"),
            ("reward", self.reward, ("frames",), not self.model.video,
             f"model.family={self.model.family} makes images: reward.frames serves the video families"),
            *((f"eval.rewards.{k}", r, ("frames",), not self.model.video,
               f"model.family={self.model.family} makes images: the frames serve the video families")
              for k, r in self.eval.rewards.items()),
        ]  # fmt: skip
        out = []
        for name, section, fields, off, why in unused:
            keys = [f"{name}.{f}" for f in fields if f in section.model_fields_set]
            if off and keys:
                out.append((keys, why))
        return out

    def eval_rewards_built(self) -> dict[str, RewardSection]:
        """The ``eval.rewards`` entries that get a model of their own. One equal to the training reward (the
        recipes name it, for the eval command) is scored by the training reward's model: a second copy would
        cost its weights on the device and a second pass. So is one that scores as a pairwise training reward's
        pointwise view does, which is what the evaluation scores it by."""
        from densegrpo_fast.rewards.pairwise import pointwise_spec, same_scoring

        view = pointwise_spec(self.reward.name, self.reward.kwargs)
        return {
            k: r
            for k, r in self.eval.rewards.items()
            if r != self.reward
            and not (view and r.frames == self.reward.frames and same_scoring(r.name, r.kwargs, view))
        }
