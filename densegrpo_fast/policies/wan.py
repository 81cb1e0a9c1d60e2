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
  (``flow_shift`` 3; Wan suggests 5 for 720p, which the engine does not pick): the engine samples its grid with the Euler (ODE) or SDE step, not UniPC's second-order update,
  and feeds the transformer ``1000 sigma`` where UniPC feeds it truncated to an integer. A scheduler of
  FlowMatchEulerDiscreteScheduler gives its own grid and is what the pipeline equality test swaps in.

With zero noise, the same initial latents and FlowMatchEulerDiscreteScheduler in the pipeline, the engine's
sampler reproduces ``WanPipeline`` (tests/test_policy_wan.py). Not supported: Wan 2.2 A14B's two experts
(``transformer_2`` and ``boundary_ratio``), and image-to-video conditioning.
"""

from __future__ import annotations

import copy
import json

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
#: The refusal of Wan 2.2 A14B's two experts.
TWO_EXPERTS = (
    "{root} has two experts (transformer_2, boundary_ratio: Wan 2.2 A14B), which model.family wan does not sample: "
    "use a one-transformer checkpoint (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, Wan-AI/Wan2.1-T2V-14B-Diffusers, "
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers)"
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
    skip_components = ("transformer_2",)  # (Wan 2.2 A14B's second expert: refused below, so not loaded)

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
        if pipe.config.get("boundary_ratio") is not None or getattr(pipe, "transformer_2", None) is not None:
            raise ValueError(TWO_EXPERTS.format(root="this WanPipeline"))
        if self.transformer.config.get("image_dim") is not None:
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
    def load(cls, path_or_repo_id=None, **kwargs):
        """:meth:`DiffusersPolicy.load`, after refusing, from the checkpoint's ``model_index.json`` and before any
        weights load or download, a pipeline other than ``WanPipeline`` (image to video) and two experts (Wan 2.2
        A14B). A download first fetches ``model_index.json`` and the transformer's config alone."""
        import diffusers

        from densegrpo_fast.policies.pretrained import resolve_pretrained

        local = kwargs.get("local_files_only", True)
        text_only = kwargs.get("text_only")
        root = resolve_pretrained(
            path_or_repo_id or cls.default_repo, pipeline_cls=getattr(diffusers, cls.pipeline_name),
            components={k: "config" if text_only and k in ("transformer", "vae") else v
                        for k, v in cls.components.items()} if local else {"transformer": "config"},
            default_repo=cls.default_repo, local_files_only=local, cache_dir=kwargs.get("cache_dir"),
        )  # fmt: skip
        index = json.loads((root / "model_index.json").read_text())
        named = index.get("_class_name")
        if named != cls.pipeline_name:
            raise ValueError(
                f"{root} is a {named} checkpoint; model.family wan samples WanPipeline's (text to video: Wan 2.1 "
                "T2V, Wan 2.2 TI2V-5B), not image-to-video or other Wan pipelines"
            )
        if index.get("boundary_ratio") is not None or (index.get("transformer_2") or [None])[0] is not None:
            raise ValueError(TWO_EXPERTS.format(root=root))
        return super().load(root if local else path_or_repo_id, **kwargs)

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
        per distinct prompt; with ``with_negative`` the negative prompt's (the empty one), in the same batch."""
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

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """Velocity [B, *latent_shape] float32; CFG ``v_neg + g (v_pos - v_neg)`` when ``guidance_scale``
        ``g != 1`` and negative embeds are present, in one transformer call of 2B rows."""
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
