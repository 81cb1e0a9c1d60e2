"""What the pretrained-model adapters (sd3, flux, qwen_image, z_image, flux2_klein, wan) share: finding weights, and
:class:`DiffusersPolicy`.

Weights are a diffusers-format directory, or a repo in the user's Hugging Face cache. Offline by default:
nothing is downloaded unless the caller asks (``local_files_only=False``). Before any weights load,
:func:`resolve_pretrained` checks that every component the pipeline needs is there and raises one
``ValueError`` naming each missing folder or file and the fix, instead of the first loader's ``OSError``
deep inside diffusers or transformers.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
from pathlib import Path

import torch

from densegrpo_fast.checkpoint import write_atomic
from densegrpo_fast.config import Resolution, image_hw, resolution_problem
from densegrpo_fast.policies.base import PromptEmbeds, run_dtype

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_WEIGHTS = ("*.safetensors", "*.bin")
#: Scheduler options that reshape the sigma grid in ways the engine's grids do not reproduce.
#: (``shift_terminal`` is reproduced by FLUX.1's and Qwen-Image's :meth:`PackedLatentPolicy.sigma_grid`.)
_GRID_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                 "use_flow_sigmas")  # fmt: skip


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``"bf16" | "fp16" | "fp32"`` (the config's names) or a torch dtype -> the torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    return DTYPES[dtype]


def _dtype_keyword() -> str:
    """diffusers' name for ``from_pretrained``'s dtype: ``dtype`` since it deprecated ``torch_dtype`` (2026,
    huggingface/diffusers#14205), ``torch_dtype`` before (the loaded dtypes are checked after either)."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (the deprecation's helper)
    except ImportError:
        return "torch_dtype"
    return "dtype"


def is_repo_id(name: str) -> bool:
    """``owner/name`` with no path that exists locally: a Hugging Face repo id."""
    return bool(_REPO_ID.match(name)) and not Path(name).exists()


def missing_parts(root: Path, components: dict[str, str]) -> list[str]:
    """What ``root`` lacks of a diffusers-format checkpoint: ``model_index.json`` and, for each component
    (``{"transformer": "model", "tokenizer": "tokenizer", "scheduler": "scheduler"}``), its folder with a
    config and, for models, weight files (every shard an index names). A ``"config"`` component is a model of
    which only the config is read (a text-only load's transformer and VAE)."""
    missing = [] if (root / "model_index.json").is_file() else ["model_index.json"]
    for name, kind in components.items():
        folder = root / name
        if not folder.is_dir():
            missing.append(f"{name}/")
            continue
        config = {"model": "config.json", "config": "config.json", "tokenizer": "tokenizer_config.json",
                  "scheduler": "scheduler_config.json", "processor": "preprocessor_config.json"}[kind]  # fmt: skip
        if not (folder / config).is_file() and not (kind == "processor" and _nested_image_processor(folder)):
            missing.append(f"{name}/{config}")
        if kind != "model":
            continue
        # the variant-free index first (an x.fp16.safetensors.index.json names shards from_pretrained skips)
        indexes = sorted(folder.glob("*.index.json"), key=lambda p: (p.name.count("."), p.name))
        if indexes:
            shards = sorted(set(json.loads(indexes[0].read_text())["weight_map"].values()))
            missing += [f"{name}/{s}" for s in shards if not (folder / s).is_file()]
        elif not any(any(folder.glob(p)) for p in _WEIGHTS):
            missing.append(f"{name}/<weights>.safetensors")
    return missing


def _nested_image_processor(folder: Path) -> bool:
    """Whether a processor folder keeps its image processor's settings in ``processor_config.json`` (as
    transformers 5 saves a processor) rather than in ``preprocessor_config.json``."""
    try:
        return "image_processor" in json.loads((folder / "processor_config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def download_command(repo: str, components) -> str:
    """The ``hf download`` command that fetches only what a diffusers pipeline reads from ``repo``:
    ``model_index.json`` and the components' folders. The SD3.5 and FLUX.1 repos also hold single-file
    checkpoints of the same weights, which a whole-repo download would fetch too. One ``--include`` per
    pattern: ``hf download`` reads a second value after one ``--include`` as a file name and then ignores
    every ``--include``."""
    return f"hf download {repo} " + " ".join(f"--include '{p}'" for p in download_patterns(components))


def download_patterns(components: dict[str, str]) -> list[str]:
    """The files of ``components`` a load reads: each folder whole, a ``"config"`` component's config alone."""
    return [
        "model_index.json",
        *(f"{n}/config.json" if k == "config" else f"{n}/*" for n, k in components.items()),
    ]


def resolve_pretrained(
    path_or_repo_id: str | Path,
    *,
    pipeline_cls,
    components: dict[str, str],
    default_repo: str,
    local_files_only: bool = True,
    cache_dir: str | Path | None = None,
    only: dict[str, str] | None = None,
) -> Path:
    """The local directory of a complete diffusers-format checkpoint.

    ``path_or_repo_id`` is a directory, or a repo id looked up in the Hugging Face cache (downloaded with
    ``pipeline_cls.download``, only the files the pipeline needs, when ``local_files_only`` is false).
    Raises a ``ValueError`` naming what is missing and how to get it. ``only``: fetch and check these
    components alone (a first look at ``model_index.json`` and a config), the message still naming all.
    """
    from huggingface_hub import constants, snapshot_download

    name = str(path_or_repo_id)
    repo = name if is_repo_id(name) else default_repo
    fix = (
        f"where there is network, run `{download_command(repo, components)}` (or set "
        "model.local_files_only=false, which also fetches only the pipeline's files; "
        "gated repos need their licence accepted on huggingface.co and `hf auth login` first), or set "
        "model.checkpoint to a local diffusers-format directory (model_index.json and one folder per "
        f"component: {', '.join(components)})"
    )
    if is_repo_id(name):
        cache = Path(cache_dir or constants.HF_HUB_CACHE)
        try:
            if local_files_only:
                root = Path(snapshot_download(name, local_files_only=True, cache_dir=cache_dir))
            elif only is not None or "config" in components.values():  # (no transformer or VAE weights)
                root = Path(
                    snapshot_download(
                        name, cache_dir=cache_dir, allow_patterns=download_patterns(only or components)
                    )
                )
            else:
                root = Path(pipeline_cls.download(name, cache_dir=cache_dir))
        except Exception as e:  # LocalEntryNotFoundError, gated/auth/network errors: all end the same way
            where = "is not in the Hugging Face cache" if local_files_only else "could not be downloaded"
            raise ValueError(
                f"model.checkpoint={name!r} {where} ({cache}; {type(e).__name__}): {fix}"
            ) from None
    else:
        root = Path(name).expanduser()
        if not root.is_dir():
            raise ValueError(
                f"model.checkpoint={name!r} is neither an existing directory nor a Hugging Face repo id "
                f"(owner/name): {fix}"
            )
    missing = missing_parts(root, only or components)
    if missing and only is not None:  # (name every part missing, not just the first look's)
        missing = missing_parts(root, components)
    if missing:
        raise ValueError(
            f"model.checkpoint={name!r} ({root}) is not a complete {pipeline_cls.__name__} checkpoint: "
            f"missing {', '.join(missing)}. Fix: {fix}"
        )
    return root


def _check_loaded_dtypes(pipe, want: torch.dtype) -> None:
    """A ValueError if the transformer or the VAE did not load in the dtype asked for: a diffusers release
    from before ``from_pretrained(dtype=...)`` (the keyword that replaced ``torch_dtype``) logs the keyword
    as unused and loads everything in fp32, which would double the memory and the time without an error."""
    import diffusers

    got = {"transformer": pipe.transformer.dtype, "vae": pipe.vae.dtype}
    if getattr(pipe, "transformer_2", None) is not None:  # (Wan 2.2 A14B's second expert)
        got["transformer_2"] = pipe.transformer_2.dtype
    expected = {"transformer": want, "transformer_2": want, "vae": torch.float32}
    wrong = {k: v for k, v in got.items() if v != expected[k]}
    if wrong:
        raise ValueError(
            f"the pipeline loaded {', '.join(f'{k} in {v}' for k, v in wrong.items())} where "
            f"{', '.join(f'{k} in {expected[k]}' for k in wrong)} was asked for: diffusers "
            f"{diffusers.__version__} ignores from_pretrained's dtype keyword. Fix: upgrade diffusers "
            "(pip install -U diffusers; keep your torch)"
        )


def chat_prompts(tokenizer, prompts: list[str], *, enable_thinking: bool) -> list[str]:
    """Each prompt as one user message in the tokenizer's chat template, with the generation prompt, as
    ``ZImagePipeline`` (``enable_thinking=True``) and ``Flux2KleinPipeline`` (False) render them for Qwen3."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True,
            enable_thinking=enable_thinking,
        )
        for p in prompts
    ]  # fmt: skip


def is_text_encoder(component: str) -> bool:
    """Whether a pipeline component (``pipe.components``' key) is a text encoder: text_encoder, _2, _3."""
    return component.startswith("text_encoder")


def _meta_model(root: Path, component: str, dtype: torch.dtype) -> torch.nn.Module:
    """The pipeline's ``component`` (transformer, vae) built from its config on the meta device: its structure
    and config, no weights read or allocated."""
    import json

    import diffusers

    library, name = json.loads((Path(root) / "model_index.json").read_text())[component]
    model_cls = getattr(diffusers, name)
    with torch.device("meta"):
        model = model_cls.from_config(model_cls.load_config(Path(root) / component))
    if dtype != torch.float32:  # (``_apply``: ModelMixin.to would log about fp32-kept modules it has none of)
        model._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
    return model.eval().requires_grad_(False)


def move_except(module: torch.nn.Module, device, stay: set[int]) -> None:
    """``module.to(device)``, except the submodules whose ``id`` is in ``stay``, which go to host memory
    (where they are already, as a pipeline loaded by :meth:`DiffusersPolicy.load` has them)."""
    if id(module) in stay:
        module.to("cpu")
        return
    if not any(id(m) in stay for m in module.modules()):
        module.to(device)
        return
    module._apply(lambda t: t.to(device), recurse=False)  # (its own parameters and buffers, if any)
    for child in module.children():
        move_except(child, device, stay)


#: ``model.negative_prompt`` for a family without CFG.
NO_CFG = (
    "model.negative_prompt: model.family {family} is guidance-distilled and samples without CFG, so no negative "
    "prompt is encoded; remove it"
)


class DiffusersPolicy:
    """Base of the adapters built on a diffusers pipeline: the parts of the
    :class:`~densegrpo_fast.policies.base.Policy` contract that do not depend on the family.

    Everything is frozen (eval, no grad) on construction; the trainer then adds LoRA to ``transformer``
    or unfreezes it. The VAE decodes one image at a time (``vae.enable_slicing``): dense rewards decode
    T+1 images per trajectory. Subclasses set ``latent_shape`` and implement ``encode_prompts``,
    ``velocity`` and ``sigma_grid``.
    """

    family = ""
    #: Whether the family edits a source image per prompt: None, "required" or "optional"
    #: (:data:`densegrpo_fast.policies.EDITING`).
    edits: str | None = None
    #: Whether the text encoder reads an edit's source image too (Qwen-Image-Edit), so that the encoding of a
    #: prompt is not its text's alone: no prompt cache serves it.
    text_reads_sources = False
    #: Pipeline components :meth:`load` does not load (set to None), e.g. a processor the adapter replaces.
    skip_components: tuple[str, ...] = ()

    def __init__(self, pipe, *, resolution: Resolution, max_sequence_length: int):
        self.pipe = pipe
        self.transformer = pipe.transformer
        self.resolution = resolution  # as the setting gave it (errors quote it); image_hw() reads it
        self.max_sequence_length = max_sequence_length
        # (the pipeline's: 8 for the released VAEs; a video pipeline's spatial factor)
        self.vae_scale_factor = getattr(pipe, "vae_scale_factor", None) or pipe.vae_scale_factor_spatial
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval().requires_grad_(False)
        pipe.vae.enable_slicing()
        pipe.set_progress_bar_config(disable=True)

    def check_resolution(self, multiple: int, why: str) -> tuple[int, int]:
        """The latent (height, width) for ``self.resolution``; a ValueError unless each side of the image is a
        multiple of ``multiple``."""
        bad = resolution_problem(self.resolution_setting, self.resolution, multiple, why)
        if bad is not None:
            raise ValueError(bad)
        return tuple(side // self.vae_scale_factor for side in image_hw(self.resolution))

    #: The setting that gave ``resolution``, for errors: ``model.resolution``, or ``eval.resolution`` for the
    #: policy of :meth:`at_resolution`.
    resolution_setting = "model.resolution"

    def set_resolution(self) -> None:
        """Set ``latent_shape`` (and what else depends on it) for ``self.resolution``, or raise a ValueError
        naming :attr:`resolution_setting` where the model cannot sample it. Each family implements it."""
        raise NotImplementedError

    #: The negative prompt of CFG (the family's default, the pipeline's; ``model.negative_prompt`` sets another
    #: with :meth:`set_negative_prompt`).
    negative_prompt = ""

    #: Whether the family samples with CFG (a negative prompt's call beside each row's).
    has_cfg = True

    def set_negative_prompt(self, text: str) -> None:
        """Encode ``text`` as CFG's negative prompt from now on (``model.negative_prompt``, the pipelines'
        ``negative_prompt``); a ValueError for a family without CFG."""
        if not self.has_cfg:
            raise ValueError(NO_CFG.format(family=self.family))
        self.negative_prompt = text

    #: The :class:`~densegrpo_fast.prompt_cache.PromptCache` that :meth:`_text` reads (``model.prompt_cache``;
    #: the text encoders are then not loaded), or None.
    prompt_cache = None

    def _text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's ``self._encode(texts) -> (embeds, second field)``: read from :attr:`prompt_cache`
        where one is attached (a ValueError naming a prompt it lacks), else run by the text encoders, on the
        device for the call."""
        if self.prompt_cache is not None:
            return self.prompt_cache.get(list(texts), self.device)
        with self.text_encoders_on_device():
            return self._encode(texts)

    def _encode_with_negative(self, prompts: list[str], with_negative: bool) -> PromptEmbeds:
        """``self._encode(texts) -> (embeds, second field)`` run once, on the distinct prompts and, with
        ``with_negative``, :attr:`negative_prompt` after them: in the same batch, so that a family whose
        tokenizer pads to the batch's longest prompt (Qwen-Image, Z-Image) gets the negative at the same
        length. One table row per distinct prompt."""
        extra = [self.negative_prompt] if with_negative else []
        embeds, second = self._text([*dict.fromkeys(prompts), *extra])
        if not with_negative:
            return PromptEmbeds.deduplicated(lambda _: (embeds, second), prompts)
        negative = (embeds[-1:], second[-1:])
        return PromptEmbeds.deduplicated(lambda _: (embeds[:-1], second[:-1]), prompts, negative)

    def _encode_edits(self, prompts: list[str], with_negative: bool) -> PromptEmbeds:
        """:meth:`_encode_with_negative` for :class:`~densegrpo_fast.prompts.EditPrompt` s: each text once
        through the text encoders, each source file once through the family's :meth:`_encode_references`, one
        table row per distinct (instruction, image), the source's tokens in the ``reference`` table."""
        from densegrpo_fast.prompts import EditPrompt, prompt_key, source_image_problem

        plain = [p for p in prompts if not isinstance(p, EditPrompt)]
        if plain and self.edits == "required":
            raise ValueError(source_image_problem(plain[0], self.model_name))
        if plain:
            raise ValueError(
                f"{self.model_name} encodes edits or text prompts, and this batch holds both (the prompt "
                f"{str(plain[0])[:80]!r} has no source image): encode each kind apart, as a prompt file holds one"
            )
        texts = {t: i for i, t in enumerate(dict.fromkeys(map(str, prompts)))}
        extra = [self.negative_prompt] if with_negative else []
        embeds, second = self._text([*texts, *extra])
        negative = (embeds[-1:], second[-1:]) if with_negative else None

        def encode(unique):
            rows = torch.tensor([texts[str(p)] for p in unique], device=embeds.device)
            return embeds[rows], second[rows], self._encode_references([p.image for p in unique])

        return PromptEmbeds.deduplicated(encode, prompts, negative, key=prompt_key)

    @torch.no_grad()
    def _encode_references(self, paths: list[str]) -> torch.Tensor:
        """The source images at ``paths`` as the transformer's tokens [U, N, D] in its dtype: each file read
        once (:func:`~densegrpo_fast.prompts.load_source`, at this policy's image size), preprocessed as the
        pipelines preprocess an image, and encoded by the family's :meth:`_source_tokens`."""
        from densegrpo_fast.prompts import load_source

        height, width = image_hw(self.resolution)
        files = list(dict.fromkeys(paths))
        tokens = []
        for path in files:
            image = self.pipe.image_processor.preprocess(load_source(path, height, width), height, width)
            tokens.append(self._source_tokens(image.to(self.device, self.pipe.vae.dtype)))
        packed = torch.cat(tokens)
        index = {f: i for i, f in enumerate(files)}
        return packed[torch.tensor([index[p] for p in paths], device=packed.device)].to(self.dtype)

    def _source_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """The editing families': one preprocessed source image [1, 3, H, W] as the transformer's tokens
        [1, N, D], as the family's pipeline encodes it."""
        raise NotImplementedError(f"{self.model_name} takes no source image")

    def _checked_reference(self, cond: PromptEmbeds, tokens: int) -> torch.Tensor | None:
        """``cond.reference`` (None for text prompts), or a ValueError where it does not hold ``tokens`` source
        tokens, as many as the sampled image's."""
        reference = cond.reference
        if reference is not None and reference.shape[1] != tokens:
            raise ValueError(
                f"{self.model_name} samples {tokens} tokens beside a source image of as many, and these prompt "
                f"embeds hold {reference.shape[1]} source tokens: encode the EditPrompts with the encode_prompts "
                "of the policy that samples them (at its resolution)"
            )
        return reference

    def guidance_problem(self, scale: float, setting: str) -> str | None:
        """Why this checkpoint cannot sample with CFG scale ``scale`` (the config's ``setting``), or None. The
        trainer and the eval command ask as soon as the policy is loaded, before any sampling; ``velocity``
        refuses the same."""
        return None

    def at_resolution(self, resolution: Resolution, setting: str = "eval.resolution"):
        """This policy sampling images of size ``resolution`` (the held-out evaluation's, ``eval.resolution``):
        a shallow copy that shares every model, weights, adapters and the EMA swap with this one, with its
        own latent shape (and, for the families whose grid follows the token count, its own grid). This
        policy when the size is the same."""
        if image_hw(resolution) == image_hw(self.resolution):
            return self
        other = copy.copy(self)
        other.resolution, other.resolution_setting = resolution, setting
        other.set_resolution()
        return other

    #: Set by each family: the diffusers pipeline class name, the components it needs (see
    #: :func:`missing_parts`), the default repo id and the default T5 length.
    pipeline_name = ""
    components: dict[str, str] = {}
    default_repo = ""
    default_max_sequence_length = 256
    #: Whether the tokenizers pad every prompt to the model's length (SD3, FLUX.1), not to the batch's longest.
    pads_prompts = True

    @classmethod
    def check_index(cls, index: dict, root: Path) -> None:
        """Refuse, from the checkpoint's ``model_index.json`` (``index``, in the directory ``root``) and before any
        weights load or download, a checkpoint this family does not sample, with a ValueError. None here; Wan
        and Qwen-Image-Edit refuse other pipelines of their names."""

    @classmethod
    def checkpoint_components(cls, index: dict) -> dict[str, str]:
        """The components a load reads from the checkpoint whose ``model_index.json`` is ``index`` (see
        :func:`missing_parts`): the family's, and Wan 2.2 A14B's second expert where the index names one."""
        return cls.components

    @classmethod
    def read_index(
        cls,
        path_or_repo_id: str | Path | None = None,
        *,
        local_files_only: bool = True,
        cache_dir: str | Path | None = None,
    ) -> dict:
        """The checkpoint's ``model_index.json`` (default ``cls.default_repo``), read first and alone: a download
        fetches it and the transformer's config, no weights. A ValueError where the checkpoint is not found (as
        :func:`resolve_pretrained` words it), where the file is not JSON, or where :meth:`check_index` refuses
        it."""
        import diffusers

        name = path_or_repo_id or cls.default_repo
        root = resolve_pretrained(
            name, pipeline_cls=getattr(diffusers, cls.pipeline_name), components=cls.components,
            default_repo=cls.default_repo, local_files_only=local_files_only, cache_dir=cache_dir,
            only={"transformer": "config"},
        )  # fmt: skip
        try:
            index = json.loads((root / "model_index.json").read_text())
        except (ValueError, UnicodeDecodeError) as e:  # (e.g. a Git LFS pointer)
            raise ValueError(
                f"{root / 'model_index.json'} is not JSON ({type(e).__name__}: {e}): the checkpoint's index is "
                "damaged or a placeholder; fetch the checkpoint again"
            ) from None
        cls.check_index(index, root)
        return index

    @classmethod
    def resolve(
        cls,
        path_or_repo_id: str | Path | None = None,
        *,
        text_only: bool = False,
        local_files_only: bool = True,
        cache_dir: str | Path | None = None,
    ) -> tuple[Path, dict[str, str]]:
        """The local directory of the checkpoint (:func:`resolve_pretrained`; default ``cls.default_repo``),
        complete for a load, and the components it reads. Its ``model_index.json`` comes first
        (:meth:`read_index`): a checkpoint :meth:`check_index` refuses is refused before any weights are read
        or downloaded, and :meth:`checkpoint_components` names the folders the load needs. ``text_only``: the
        transformers' and the VAE's configs only."""
        import diffusers

        where = dict(local_files_only=local_files_only, cache_dir=cache_dir)
        index = cls.read_index(path_or_repo_id, **where)
        components = {  # (text-only: of the transformers and the VAE, only their configs are read, and needed)
            k: "config" if text_only and (k.startswith("transformer") or k == "vae") else v
            for k, v in cls.checkpoint_components(index).items()
        }
        root = resolve_pretrained(
            path_or_repo_id or cls.default_repo, pipeline_cls=getattr(diffusers, cls.pipeline_name),
            components=components, default_repo=cls.default_repo, **where,
        )  # fmt: skip
        return root, components

    @classmethod
    def load(
        cls,
        path_or_repo_id: str | Path | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str = torch.bfloat16,
        resolution: Resolution = 512,
        frames: int | None = None,
        max_sequence_length: int | None = None,
        local_files_only: bool = True,
        cache_dir: str | Path | None = None,
        offload_text_encoders: bool = False,
        prompt_cache: str | Path | None = None,
        text_only: bool = False,
        transformer_on_host: bool = False,
    ):
        """Load a diffusers-format checkpoint of this family: a directory, or a repo id (default
        ``cls.default_repo``) from the Hugging Face cache; offline unless ``local_files_only`` is false.
        Everything but the VAE (fp32) loads in ``dtype``; ``max_sequence_length=None`` takes the family's.
        ``offload_text_encoders``: the text encoders stay in host memory (:meth:`offload_text_encoders_`).
        ``prompt_cache``: a directory written by ``densegrpo-fast encode-prompts`` for this checkpoint and these
        settings (a ValueError otherwise, before anything loads); the text encoders and tokenizers are then not
        loaded, and every prompt encoded must be in it (:mod:`densegrpo_fast.prompt_cache`). ``text_only``: the
        transformer and the VAE are built from their configs on the meta device, with no weights read, and only
        the text encoders come to ``device``: a policy that encodes prompts (:attr:`text_device`) and does
        nothing else (``densegrpo-fast encode-prompts``). ``transformer_on_host``: the transformer stays in host
        memory, for a sharded run's FSDP2 to move to ``device`` a block at a time as it shards it (so that no
        device ever holds it whole); :attr:`device` is then the host's until it does."""
        import diffusers

        extra = cls.shape_options(frames)
        pipeline_cls = getattr(diffusers, cls.pipeline_name)
        root, components = cls.resolve(
            path_or_repo_id, text_only=text_only, local_files_only=local_files_only, cache_dir=cache_dir
        )
        want = as_dtype(dtype)
        length = cls.default_max_sequence_length if max_sequence_length is None else max_sequence_length
        cache, skipped = None, {k: None for k in cls.skip_components}
        if prompt_cache is not None and cls.text_reads_sources:
            raise ValueError(
                f"model.prompt_cache={str(prompt_cache)!r}: {cls.model_name}'s text encoder reads each edit's "
                "source image, so a prompt's encoding is not its text's alone and a prompt cache (keyed by text) "
                "cannot hold it: set model.prompt_cache=null"
            )
        if prompt_cache is not None:
            from densegrpo_fast.prompt_cache import PromptCache, _read_index, identity

            saved = _read_index(
                Path(prompt_cache)
            )  # (the writer's file stats: files it read are not read again)
            known = saved["stats"] if saved else None
            ident, _ = identity(cls, root, dtype=want, max_sequence_length=length, known=known)
            cache = PromptCache(prompt_cache, ident, padded=not cls.pads_prompts)
            skipped |= {k: None for k in cls.components if is_text_encoder(k) or k.startswith("tokenizer")}
        if text_only and (offload_text_encoders or prompt_cache is not None):
            raise ValueError(
                "text_only loads the text encoders alone, to encode prompts: offload_text_encoders and prompt_cache "
                "do not combine with it"
            )
        if text_only:  # (their configs only: the policy's constructor reads them)
            skipped |= {k: _meta_model(root, k, torch.float32 if k == "vae" else want)
                        for k, kind in components.items() if kind == "config"}  # fmt: skip
        pipe = pipeline_cls.from_pretrained(
            root,
            **{_dtype_keyword(): {"default": want, "vae": torch.float32}},
            local_files_only=True,
            **skipped,
        )
        _check_loaded_dtypes(pipe, want)
        stay = {id(m) for m in cls.unused_modules(pipe).values()}  # (never needed on the device)
        if transformer_on_host:
            stay |= {id(pipe.transformer), id(getattr(pipe, "transformer_2", None))}
        for name, module in pipe.components.items():  # offloaded text encoders stay in host memory
            if text_only and not is_text_encoder(name):
                continue
            if isinstance(module, torch.nn.Module) and not (offload_text_encoders and is_text_encoder(name)):
                move_except(module, device, stay)
        policy = cls(pipe, resolution=resolution, max_sequence_length=length, **extra)
        if text_only:  # (where the encoders are: "cuda" is the current device's index)
            policy._text_device = next(p for m in policy.text_encoders() for p in m.parameters()).device
        policy.offload_text_encoders = offload_text_encoders
        policy.prompt_cache, policy.root = cache, root
        return policy

    #: Whether the family makes videos (:data:`densegrpo_fast.policies.VIDEO`): ``decode`` then gives
    #: [B, 3, F, H, W].
    video = False

    @classmethod
    def shape_options(cls, frames: int | None) -> dict:
        """The constructor's keywords beyond the resolution: a video family's ``frames``; a ValueError where an
        image family is given frames."""
        if not cls.video:
            if frames is not None:
                raise ValueError(
                    f"model.frames ({frames}): model.family {cls.family} makes images; remove it"
                )
            return {}
        return {"frames": frames}

    #: The checkpoint directory :meth:`load` read (None for a pipeline built in memory).
    root: Path | None = None
    _text_device: torch.device | None = None

    @property
    def text_device(self) -> torch.device:
        """Where the text encoders' inputs go: the policy's device, or a text-only policy's (``load(text_only=
        True)``, whose transformer is on the meta device)."""
        return self._text_device if self._text_device is not None else self.device

    def prompt_cache_identity(self, known: dict | None = None) -> tuple[dict, dict]:
        """What a prompt cache written by this policy's text encoders is known by, and its files' stats
        (:func:`~densegrpo_fast.prompt_cache.identity`)."""
        from densegrpo_fast.prompt_cache import identity

        return identity(
            type(self), self.root, dtype=self.dtype, max_sequence_length=self.max_sequence_length, known=known
        )

    def scheduler_config(self, *unsupported: str, fix: str):
        """The checkpoint scheduler's config; a ValueError if it sets an option the engine's grid does not
        reproduce (Karras sigmas, a terminal stretch, ... and ``unsupported``)."""
        cfg = self.pipe.scheduler.config
        bad = [k for k in (*_GRID_OPTIONS, *unsupported) if cfg.get(k)]
        if bad:
            raise ValueError(
                f"the checkpoint's scheduler sets {bad}, which the engine's {self.family} grid does not "
                f"reproduce: {fix}"
            )
        return cfg

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    #: Whether the text encoders live in host memory between encodes (:meth:`offload_text_encoders_`).
    offload_text_encoders = False

    def text_encoders(self) -> list[torch.nn.Module]:
        """The pipeline's text encoders (SD3: two CLIPs and T5; FLUX.1: CLIP and T5; Qwen-Image: Qwen2.5-VL)."""
        return [m for k, m in self.pipe.components.items() if is_text_encoder(k) and m is not None]

    @staticmethod
    def unused_modules(pipe) -> dict[str, torch.nn.Module]:
        """Parts of the pipeline's models that the adapter never calls, by dotted name: they stay in host
        memory, neither loaded onto the device nor moved with an offloaded text encoder (a pipeline built on
        the device sends them to the host at ``offload_text_encoders_``), and the memory estimate does not
        count them. The pipeline itself then no longer runs whole on the device (``pipe(...)``); the
        adapter never calls it. None in SD3 and FLUX.1."""
        return {}

    def _move_text_encoders(self, device) -> None:
        stay = {id(m) for m in self.unused_modules(self.pipe).values()}
        for m in self.text_encoders():
            move_except(m, device, stay)

    def offload_text_encoders_(self, on: bool = True) -> None:
        """Keep the frozen text encoders in host memory (``on``) or on the policy's device. Offloaded, they
        come to the device only inside :meth:`text_encoders_on_device`, i.e. while ``encode_prompts`` runs:
        once per iteration in training, for 10.4 GiB (SD3.5) or 9.1 GiB (FLUX.1) of bf16 weights that the
        rollout and the update then have for themselves."""
        self.offload_text_encoders = on
        self._move_text_encoders("cpu" if on else self.device)

    _encoders_in = 0  # depth of text_encoders_on_device

    @contextlib.contextmanager
    def text_encoders_on_device(self):
        """The text encoders on the policy's device for the duration (a no-op unless offloaded). Nested
        uses move them once: in at the outermost entry, back to the host at its exit (an error included).
        An evaluation holds it around its batches, so that they do not each pay the round trip."""
        if not self.offload_text_encoders:
            yield
            return
        self._encoders_in += 1
        try:
            if self._encoders_in == 1:
                self._move_text_encoders(self.device)
            yield
        finally:
            self._encoders_in -= 1
            if self._encoders_in == 0:
                self._move_text_encoders("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return run_dtype(self.transformer)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, *latent_shape] -> images [B, 3, H, W] float32 in [0, 1], as the pipeline decodes."""
        vae = self.pipe.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """Write the transformer's weights (diffusers names, its dtype) to one safetensors file, its config
        as JSON in the metadata; they load back with ``transformer.load_state_dict`` (:meth:`load_weights`).
        Two experts (Wan 2.2 A14B) write both, their names prefixed ``transformer.`` and ``transformer_2.``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"family": self.family, "config": self.transformer.to_json_string(),
                **{k: str(v) for k, v in (metadata or {}).items()}}  # fmt: skip
        state = {k: v.detach().contiguous().cpu() for k, v in self.transformer.state_dict().items()}
        write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata=meta))

    def save_lora(self, directory: str | Path, state: dict[str, torch.Tensor], scale: float) -> Path:
        """Write LoRA weights ``state`` (peft names, as ``get_peft_model_state_dict`` gives them) in
        diffusers' LoRA format, which ``<Pipeline>.load_lora_weights(directory)`` loads onto the base model.
        The LoRA scale (``alpha / rank``) is folded into ``lora_B``, so the file means the same to a loader
        that reads no alpha (it then takes alpha = rank)."""
        import diffusers

        state = {
            k: (v * scale if ".lora_B." in k else v).detach().contiguous().cpu() for k, v in state.items()
        }
        getattr(diffusers, self.pipeline_name).save_lora_weights(
            Path(directory), transformer_lora_layers=state
        )
        return Path(directory)

    def load_weights(self, path: str | Path) -> None:
        """Load transformer weights written by :meth:`save` (a run's ``policy_ema.safetensors``: the EMA
        weights with LoRA merged) into this policy; a ValueError if they belong to another family or
        architecture."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise ValueError(
                f"--checkpoint {str(path)!r} does not exist: give the policy_ema.safetensors of a training run"
            )
        try:
            with safe_open(str(path), "pt") as f:
                family = (f.metadata() or {}).get("family")
        except Exception as e:  # (e.g. a run's checkpoint.pt, a torch pickle)
            raise ValueError(
                f"--checkpoint {str(path)!r} is not a safetensors file ({type(e).__name__}: {e}): give the "
                "policy_ema.safetensors of a training run (its lora_ema/ folder is for diffusers' "
                "load_lora_weights, its checkpoint.pt for --resume)"
            ) from None
        if family != self.family:
            raise ValueError(
                f"{str(path)!r} holds weights of model.family {family!r}, not {self.family!r}: evaluate it with "
                "the config of the run that wrote it"
            )
        state = load_file(str(path))  # on the host: on the device it would hold the transformer twice
        own = self.transformer.state_dict()
        wrong = [
            (k, tuple(t.shape), tuple(own[k].shape))
            for k, t in state.items()
            if k in own and t.shape != own[k].shape
        ]
        if wrong:
            k, theirs, ours = wrong[0]
            raise ValueError(
                f"{str(path)!r} does not fit this transformer: {len(wrong)} weights of another shape (e.g. {k}: "
                f"{theirs} in the file, {ours} here): it was written for another checkpoint; use the "
                "model.checkpoint of the run that wrote it"
            )
        missing, unexpected = self.transformer.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{str(path)!r} does not fit this transformer ({len(missing)} weights missing, e.g. "
                f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}): it was written for "
                "another checkpoint; use the model.checkpoint of the run that wrote it"
            )

    def __deepcopy__(self, memo):
        """A copy with its own transformer; the frozen encoders, VAE and tokenizers are shared (the
        trainer's export copies the policy to merge LoRA: copying T5-XXL there would cost ~10 GB)."""
        clone = copy.copy(self)
        clone.transformer = copy.deepcopy(self.transformer, memo)
        return clone


class PackedLatentPolicy(DiffusersPolicy):
    """Base of the families whose transformer takes the latent as 2x2 patches packed into tokens and whose
    scheduler shifts its grid by the image's token count (FLUX.1, Qwen-Image), or statically (FLUX.1-schnell,
    Z-Image-Turbo), on the pipelines' ``linspace(1, 1/T, T)``. The engine sees the unpacked latent
    [C, H/f, W/f] (C = the transformer's ``in_channels / 4``); each family packs it in ``velocity``. Z-Image's
    transformer cuts its own patches: its adapter keeps the grid and sets the latent shape itself."""

    #: The model's name in messages, and what to do about a scheduler whose grid the engine does not
    #: reproduce.
    model_name = ""
    scheduler_fix = ""

    def set_resolution(self) -> None:
        height, width = self.check_resolution(
            2 * self.vae_scale_factor,
            f"VAE factor {self.vae_scale_factor} x {self.model_name}'s 2x2 latent patches",
        )
        self.latent_shape = (self.transformer.config.in_channels // 4, height, width)
        self.image_seq_len = (height // 2) * (width // 2)

    def sigma_grid(self, num_steps: int) -> torch.Tensor:
        """The pipeline's grid for this resolution, float32 [T+1]: with the scheduler's dynamic shifting
        ``mu`` follows the image's token count between the config's base and max (FLUX.1-dev, Qwen-Image);
        without it, the static shift (FLUX.1-schnell). The config's ``shift_terminal`` (Qwen-Image's 0.02)
        stretches the grid's end as the pipeline's scheduler does."""
        from densegrpo_fast.schedule import flux_sigma_grid

        fix = self.scheduler_fix
        cfg = self.scheduler_config(fix=fix)
        if cfg.get("use_dynamic_shifting") and cfg.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(
                f"the checkpoint's scheduler uses time_shift_type={cfg.get('time_shift_type')!r}; the engine's "
                f"{self.family} grid is the exponential shift: {fix}"
            )
        terminal = cfg.get("shift_terminal") or None
        if not cfg.get("use_dynamic_shifting"):
            return flux_sigma_grid(num_steps, math.log(cfg.get("shift", 1.0)), terminal)
        return flux_sigma_grid(num_steps, self.dynamic_mu(cfg, num_steps), terminal)

    def dynamic_mu(self, cfg, num_steps: int) -> float:
        """The time shift's ``mu`` of a scheduler with dynamic shifting, as the pipeline computes it: by the
        image's token count between the config's base and max (FLUX.1, Qwen-Image)."""
        from densegrpo_fast.schedule import resolution_mu

        return resolution_mu(
            self.image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15),
        )  # fmt: skip
