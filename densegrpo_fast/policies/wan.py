"""The Wan policy: diffusers' ``WanPipeline`` components behind :class:`densegrpo_fast.policies.base.Policy`,
the engine's text-to-video family.

Wan 2.1 (T2V 1.3B and 14B) and Wan 2.2 TI2V-5B generate videos from text with one DiT over spatio-temporal
patches, conditioned on UMT5-XXL by cross-attention. Where it differs from the image families:

- **Videos.** A latent is [C, F', H/f, W/f] with F' = (F - 1) / r + 1 latent frames for F video frames (the
  VAE's temporal factor r = 4: F is 4k + 1, ``model.frames``), C and f the VAE's (Wan 2.1: 16 channels,
  f = 8; Wan 2.2's VAE: 48, 16). :meth:`WanPolicy.decode` gives the video [B, 3, F, H, W] in [0, 1], which
  the engine's image rewards score frame by frame (:func:`densegrpo_fast.rewards.video.frame_mean`).
- **Prompts.** The pipeline's UMT5 embeds, each prompt's tokens (at most ``max_sequence_length``, the
  pipeline's 512) followed by zeros up to that length: the transformer attends to the zeros too (there is no
  mask), so every prompt is padded to the full length, as the pipeline pads it. UMT5 has no pooled output:
  the ``pooled`` field holds a [B, 0] tensor.
- **Velocity.** The transformer predicts ``eps - x0`` at timestep ``1000 sigma``, the engine's convention.
  CFG is ``v_neg + g (v_pos - v_neg)`` with the empty negative prompt (the pipeline's default; Wan's model
  card suggests a long negative prompt, which no setting gives yet), in one call of 2B rows where the pipeline
  makes two. Wan 2.2 TI2V-5B's per-token timesteps (``expand_timesteps``) are the same time for every
  token of a text-to-video sample, and are passed so.
- **Sampling grid** (:meth:`WanPolicy.sigma_grid`, used when ``sampling.shift`` is null): the checkpoint's
  scheduler's own sigmas, whatever the resolution. Wan's released scheduler is UniPC with flow sigmas
  (``flow_shift`` 3; Wan suggests 5 for 720p, which the engine does not pick): the engine samples its grid
  with the Euler (ODE) or SDE step, not UniPC's second-order update, and feeds the transformer ``1000 sigma``
  where UniPC feeds it truncated to an integer. A scheduler of
  FlowMatchEulerDiscreteScheduler gives its own grid and is what the pipeline equality test swaps in.

With zero noise, the same initial latents and FlowMatchEulerDiscreteScheduler in the pipeline, the engine's
sampler reproduces ``WanPipeline`` (tests/test_policy_wan.py).

- **Two experts** (Wan 2.2 T2V-A14B: ``transformer_2`` and ``boundary_ratio`` in ``model_index.json``): the
  policy's ``transformer`` is an :class:`ExpertPair`, whose call sends each row to the high-noise expert
  (``transformer``) at timesteps ``1000 sigma >= boundary_ratio x 1000`` and to the low-noise one
  (``transformer_2``) below, as the pipeline switches per step. One call may hold rows of both (a dense
  reward's completions beside the rollout's rows): each expert gets its rows. LoRA trains both (the same
  targets, an adapter each), full fine-tuning trains both, and the export writes one LoRA per expert.
  ``model.guidance_scale_2`` (:meth:`WanPolicy.set_guidance_scale_2`) gives the low-noise expert's rows a CFG
  scale of their own, as the pipeline's ``guidance_scale_2``. ``lora.init`` and ``eval --lora`` take a LoRA
  per expert: the export's folder (the low-noise expert's in ``transformer_2/``), or ``lora.init_2`` /
  ``--lora-2`` beside them. Not supported with two experts: FSDP2 sharding.

Not supported: image-to-video conditioning.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from densegrpo_fast.config import Resolution
from densegrpo_fast.policies.base import PromptEmbeds, cfg_velocity
from densegrpo_fast.policies.pretrained import DiffusersPolicy

DEFAULT_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
COMPONENTS = {
    "transformer": "model", "vae": "model", "text_encoder": "model", "tokenizer": "tokenizer",
    "scheduler": "scheduler",
}  # fmt: skip
#: The pipeline's default frame count (``WanPipeline(num_frames=81)``).
DEFAULT_FRAMES = 81
#: A checkpoint whose ``model_index.json`` names one of the two experts' marks without the other.
HALF_EXPERTS = (
    "{root} sets {has} but not {lacks}: Wan 2.2 A14B's two experts need both (transformer_2, the low-noise expert, "
    "and boundary_ratio, where it takes over), a one-transformer checkpoint neither; fix its model_index.json "
    "(the pipeline's config)"
)
#: The schedulers whose sigmas the engine can sample on (flow-matching ones).
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")


class VideoDecode(torch.nn.Module):
    """The VAE's whole decode of latents [B, C, F', h, w] to videos [B, 3, F, H, W] in [-1, 1], as one module call
    (the VAE itself is held, not registered: its weights stay the pipeline's). Wan's VAE decodes a latent frame at
    a time through a causal cache that each call of its decoder fills; the memory estimate profiles this call
    whole (``decode_call``), where profiling the decoder's calls one at a time would lose the cache."""

    def __init__(self, vae):
        super().__init__()
        self._vae = [vae]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self._vae[0].decode(z, return_dict=False)[0]


class ExpertPair(torch.nn.Module):
    """Wan 2.2 A14B's two experts as one transformer: a call sends each row to ``transformer`` (the high-noise
    expert) where its timestep is at or above ``boundary`` (``boundary_ratio x num_train_timesteps``: 875), to
    ``transformer_2`` below, as ``WanPipeline`` picks its model per step. A call whose rows span the boundary
    makes one call of each expert on its rows, and gives the rows back in their order. The adapter methods the
    engine calls (``add_adapter``, ``disable_adapters``, ``fuse_lora``, ...) apply to both experts; the block
    lists are the experts' (:func:`~densegrpo_fast.policies.base.block_lists`).

    Args:
        transformer: the high-noise expert (a ``WanTransformer3DModel``).
        transformer_2: the low-noise expert, of the same architecture.
        boundary: the timestep where the low-noise expert takes over.
    """

    expert_names = ("transformer", "transformer_2")

    def __init__(self, transformer, transformer_2, boundary: float):
        super().__init__()
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary = float(boundary)

    @property
    def config(self):
        """The high-noise expert's config (the two share their shapes)."""
        return self.transformer.config

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def high_noise(self, timestep: torch.Tensor) -> torch.Tensor:
        """Which rows of ``timestep`` [B] the high-noise expert takes: at or above the boundary, as the pipeline's
        ``t >= boundary_timestep`` (its UniPC timesteps are ``1000 sigma`` truncated to integers, and the
        boundary, 875, is one: the same rows)."""
        return timestep >= self.boundary

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict: bool = False):
        """``(out,)``: each row through its expert; ``timestep`` [B] (or [B, tokens], every token's the same)."""
        high = self.high_noise(timestep if timestep.ndim == 1 else timestep[:, 0])
        n = int(high.sum())  # (a host sync: each call is a whole transformer's)
        if n in (0, len(high)):
            expert = self.transformer if n else self.transformer_2
            return expert(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                          return_dict=False)  # fmt: skip
        rows = [high.nonzero().squeeze(1), (~high).nonzero().squeeze(1)]
        outs = [
            expert(hidden_states=hidden_states[i], timestep=timestep[i], encoder_hidden_states=encoder_hidden_states[i],
                   return_dict=False)[0]
            for expert, i in zip((self.transformer, self.transformer_2), rows, strict=True)
        ]  # fmt: skip
        order = torch.argsort(torch.cat(rows))
        return (torch.cat(outs)[order],)

    def _each(self, method: str, *args) -> None:
        for name in self.expert_names:
            getattr(getattr(self, name), method)(*args)

    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        """The same LoRA config on each expert, an adapter of its own each."""
        for name in self.expert_names:
            getattr(self, name).add_adapter(copy.deepcopy(adapter_config), adapter_name)

    @property
    def peft_config(self) -> dict:
        """The experts' adapter configs (the same on both), as peft reads a model's."""
        return self.transformer.peft_config

    def disable_adapters(self) -> None:
        self._each("disable_adapters")

    def enable_adapters(self) -> None:
        self._each("enable_adapters")

    def enable_gradient_checkpointing(self) -> None:
        self._each("enable_gradient_checkpointing")

    def fuse_lora(self) -> None:
        self._each("fuse_lora")

    def unload_lora(self) -> None:
        self._each("unload_lora")

    def to_json_string(self) -> str:
        """Both experts' configs and the boundary, as JSON (a saved policy's metadata)."""
        return json.dumps({
            **{name: json.loads(getattr(self, name).to_json_string()) for name in self.expert_names},
            "boundary": self.boundary,
        })  # fmt: skip


def two_experts(index: dict, root) -> bool:
    """Whether a WanPipeline ``model_index.json`` (``index``) names two experts (Wan 2.2 A14B); a ValueError
    where it names one of the two marks alone."""
    marks = {
        "boundary_ratio": index.get("boundary_ratio") is not None,
        "transformer_2": (index.get("transformer_2") or [None])[0] is not None,
    }
    if len(set(marks.values())) == 2:
        has, lacks = sorted(marks, key=lambda k: not marks[k])
        raise ValueError(HALF_EXPERTS.format(root=root, has=has, lacks=lacks))
    return all(marks.values())


class WanPolicy(DiffusersPolicy):
    """Wan (text to video) behind the :class:`~densegrpo_fast.policies.base.Policy` interface.

    Shape: latents and velocities [B, C, F', H/f, W/f] float32 (Wan 2.1 at 33 frames of 480 x 832:
    (16, 9, 60, 104)); videos [B, 3, F, H, W] float32 in [0, 1].

    Args:
        pipe: a ``WanPipeline`` holding the components (on the device, in their dtypes).
        resolution: frame side in pixels (square frames), or (height, width).
        max_sequence_length: UMT5 tokens per prompt, every prompt padded to it (the pipeline's 512).
        frames: video frames F, ``4k + 1`` (the VAE's temporal factor; the pipeline's default 81).
    """

    family = "wan"
    pipeline_name = "WanPipeline"
    components = COMPONENTS
    default_repo = DEFAULT_REPO
    default_max_sequence_length = 512
    model_name = "Wan"
    video = True

    @property
    def fps(self) -> float:
        """Frames a second the videos play at (the sample GIFs): Wan 2.2 TI2V-5B's 24, Wan 2.1's 16."""
        return 24.0 if self.pipe.config.get("expand_timesteps") else 16.0

    def __init__(
        self,
        pipe,
        *,
        resolution: Resolution = 480,
        max_sequence_length: int = 512,
        frames: int | None = None,
    ):
        super().__init__(pipe, resolution=resolution, max_sequence_length=max_sequence_length)
        second = getattr(pipe, "transformer_2", None)
        ratio = pipe.config.get("boundary_ratio")
        if two_experts({"boundary_ratio": ratio, "transformer_2": [second]}, "this WanPipeline"):
            boundary = ratio * pipe.scheduler.config.num_train_timesteps
            self.transformer = ExpertPair(pipe.transformer, second, boundary)
        for expert in (pipe.transformer, second):
            if expert is not None and expert.config.get("image_dim") is not None:
                raise ValueError(
                    "this WanTransformer3DModel sets image_dim: an image-to-video checkpoint, whose image "
                    "conditioning the engine does not feed; model.family wan samples text-to-video checkpoints"
                )
        self.temporal_factor = pipe.vae_scale_factor_temporal
        self.decode_call = VideoDecode(pipe.vae)
        self.frames = DEFAULT_FRAMES if frames is None else frames
        if self.frames < 1 or (self.frames - 1) % self.temporal_factor:
            r = self.temporal_factor
            near = max(1, round((self.frames - 1) / r)) * r + 1
            raise ValueError(
                f"model.frames ({self.frames}): Wan's VAE encodes 1 + {r} k frames (its temporal factor {r}); "
                f"give e.g. {near}"
            )
        self.set_resolution()

    @classmethod
    def check_index(cls, index: dict, root) -> None:
        """Refuse a pipeline other than ``WanPipeline`` (image to video), and an index that names one of the two
        experts' marks alone."""
        named = index.get("_class_name")
        if named != cls.pipeline_name:
            raise ValueError(
                f"{root} is a {named} checkpoint; model.family wan samples WanPipeline's (text to video: Wan 2.1 "
                "T2V, Wan 2.2 TI2V-5B and T2V-A14B), not image-to-video or other Wan pipelines"
            )
        two_experts(index, root)

    @classmethod
    def checkpoint_components(cls, index: dict) -> dict[str, str]:
        """Wan's components, and the low-noise expert ``transformer_2`` of a checkpoint with two (Wan 2.2 A14B)."""
        return {**cls.components, "transformer_2": "model"} if two_experts(index, "") else cls.components

    def set_resolution(self) -> None:
        _, ph, pw = self.transformer.config.patch_size
        height, width = self.check_resolution(
            self.vae_scale_factor * ph,
            f"VAE factor {self.vae_scale_factor} x {self.model_name}'s {ph}x{pw} patches",
        )
        frames = (self.frames - 1) // self.temporal_factor + 1
        self.latent_shape = (self.transformer.config.in_channels, frames, height, width)
        self.tokens = frames * (height // ph) * (width // pw)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``WanPipeline``'s embeds [U, L, D] (L = ``max_sequence_length``: each prompt's tokens, then zeros),
        in the text encoder's dtype, and an empty pooled field [U, 0]."""
        embeds = self.pipe._get_t5_prompt_embeds(
            list(prompts), max_sequence_length=self.max_sequence_length, device=self.text_device
        )
        return embeds, embeds.new_zeros(len(prompts), 0)

    def encode_prompts(self, prompts: list[str], *, with_negative: bool = True) -> PromptEmbeds:
        """``embeds`` [B, L, D] as the pipeline encodes them and an empty ``pooled`` [B, 0], one encoder row
        per distinct prompt; with ``with_negative`` :attr:`negative_prompt`'s (the empty prompt's), in the same
        batch."""
        return self._encode_with_negative(prompts, with_negative)

    def forward_raw(
        self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        """One transformer call: velocity [B, *latent_shape] float32 at per-row ``sigma`` [B] (keeps grad).
        ``pooled`` is unused (UMT5 has none)."""
        t = 1000.0 * sigma.float()
        if self.pipe.config.get("expand_timesteps"):  # Wan 2.2 TI2V-5B: one time per token, all equal here
            t = t[:, None].expand(-1, self.tokens)
        out = self.transformer(
            hidden_states=x.to(self.dtype),
            timestep=t,
            encoder_hidden_states=embeds.to(self.dtype),
            return_dict=False,
        )[0]
        return out.float()

    #: The low-noise expert's CFG scale (``model.guidance_scale_2``; two experts only), or None: the call's own.
    guidance_scale_2: float | None = None

    def set_guidance_scale_2(self, scale: float) -> None:
        """Sample the low-noise expert's rows with CFG ``scale`` whatever the call's (WanPipeline's
        ``guidance_scale_2``); a ValueError for a checkpoint with one transformer, as the pipeline refuses it."""
        if not isinstance(self.transformer, ExpertPair):
            raise ValueError(
                f"model.guidance_scale_2 ({scale}) is the low-noise expert's CFG scale of a checkpoint with two "
                "experts (Wan 2.2 T2V-A14B), and this one has one transformer: remove it"
            )
        self.guidance_scale_2 = float(scale)

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """Velocity [B, *latent_shape] float32; CFG ``v_neg + g (v_pos - v_neg)`` when ``guidance_scale``
        ``g != 1`` and negative embeds are present, in one transformer call of 2B rows. With
        :attr:`guidance_scale_2`, the low-noise expert's rows take that scale instead, as the pipeline's steps
        below the boundary do; as in the pipeline, a ``guidance_scale`` of 1 turns CFG off for every row."""
        second = self.guidance_scale_2
        if second is not None and second != guidance_scale and guidance_scale != 1.0:  # (a scale per row)
            sigma = sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
            high = self.transformer.high_noise(
                1000.0 * sigma.float()
            )  # (forward_raw's times, as the pair splits)
            guidance_scale = torch.where(high, guidance_scale, second)
        return cfg_velocity(self.forward_raw, x, sigma, cond, guidance_scale)

    def sigma_grid(self, num_steps: int) -> torch.Tensor:
        """The checkpoint scheduler's sigmas for ``num_steps`` steps, float32 [T+1], ending at 0: Wan's UniPC
        with flow sigmas (``flow_shift``) or a FlowMatchEulerDiscreteScheduler, each set as the pipeline sets
        it (``set_timesteps(T)``, on a copy; UniPC's first sigma, ``1 - 1e-6``, is 1 here). A ValueError for a
        scheduler of another kind, or one whose shift follows the resolution (``use_dynamic_shifting``, which the
        pipeline does not feed), or whose grid the engine does not reproduce."""
        scheduler = self.pipe.scheduler
        name, cfg = type(scheduler).__name__, scheduler.config
        fix = (
            "use a Wan checkpoint's scheduler (UniPCMultistepScheduler with use_flow_sigmas, or "
            "FlowMatchEulerDiscreteScheduler), or give sampling.shift and eval.shift a number"
        )
        flow = name == "FlowMatchEulerDiscreteScheduler" or (
            name == "UniPCMultistepScheduler"
            and cfg.get("use_flow_sigmas")
            and cfg.get("prediction_type") == "flow_prediction"
        )
        if name not in FLOW_SCHEDULERS or not flow:
            raise ValueError(
                f"the checkpoint's scheduler ({name}) does not sample a flow-matching grid: {fix}"
            )
        bad = [k for k in ("use_dynamic_shifting", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                           "invert_sigmas") if cfg.get(k)]  # fmt: skip
        if bad or cfg.get("final_sigmas_type", "zero") != "zero":
            raise ValueError(
                f"the checkpoint's scheduler sets {bad or ['final_sigmas_type']}, which the engine's wan grid does "
                f"not reproduce: {fix}"
            )
        scheduler = copy.deepcopy(scheduler)
        scheduler.set_timesteps(num_steps, device="cpu")
        sigmas = scheduler.sigmas.to(torch.float32)
        if name == "UniPCMultistepScheduler" and 1 - 1e-5 < sigmas[0] < 1:
            sigmas[0] = (
                1.0  # (UniPC lowers its first sigma by 1e-6 to keep its log-SNR finite: the samplers here start at 1)
            )
        if len(sigmas) != num_steps + 1 or sigmas[-1] != 0:
            raise ValueError(
                f"the checkpoint's scheduler gave {len(sigmas)} sigmas ending at {sigmas[-1]}: {fix}"
            )
        return sigmas

    def save_lora(self, directory, state: dict[str, torch.Tensor], scale: float) -> Path:
        """:meth:`DiffusersPolicy.save_lora`; with two experts, the high-noise expert's LoRA in ``directory``
        and the low-noise one's in ``directory/transformer_2``, which ``WanPipeline`` loads with
        ``load_lora_weights(directory)`` and ``load_lora_weights(directory / "transformer_2",
        load_into_transformer_2=True)``."""
        if not isinstance(self.transformer, ExpertPair):
            return super().save_lora(directory, state, scale)
        directory = Path(directory)
        for name, where in (("transformer", directory), ("transformer_2", directory / "transformer_2")):
            mine = {k.removeprefix(f"{name}."): v for k, v in state.items() if k.startswith(f"{name}.")}
            super().save_lora(where, mine, scale)
        return directory

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, *latent_shape] -> videos [B, 3, F, H, W] float32 in [0, 1], as the pipeline decodes
        (the VAE's per-channel ``latents_mean`` and ``latents_std`` undone first)."""
        vae = self.pipe.vae
        view = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(view).to(latents.device, vae.dtype)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(view).to(latents.device, vae.dtype)
        video = self.decode_call(latents.to(vae.dtype) / inverse_std + mean)
        return (video.float() / 2 + 0.5).clamp(0, 1)
