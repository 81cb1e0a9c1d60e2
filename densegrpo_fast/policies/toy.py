"""The toy policy: a tiny ``SD3Transformer2DModel`` in pixel space with a word-level prompt encoder.

It implements :class:`densegrpo_fast.policies.base.Policy` exactly as the SD3.5 adapter will: the prompt
encoder produces what SD3's transformer receives (token embeddings [B, L, D] and a pooled vector [B, P]),
``velocity`` calls the transformer at ``timestep = 1000 * sigma`` (CFG in one batched call), and ``decode``
maps latents to images in [0, 1]. The latent *is* the image scaled to [-1, 1] (no VAE).

The prompt encoder is a learned word embedding plus a learned position embedding over a fixed vocabulary
(``densegrpo_fast.toy.world.VOCAB``); the pooled vector is the masked mean of the token embeddings passed
through a linear layer. It is trained with the transformer during pretraining and frozen afterwards, like
SD3's CLIP/T5 encoders. The empty prompt (CFG's negative) is all padding and has a zero pooled vector.

Checkpoints are one safetensors file: ``transformer.*`` and ``text_encoder.*`` weights, with the
architecture (:class:`ToyArch`) as JSON in the metadata, so a checkpoint loads with no config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from densegrpo_fast.checkpoint import write_atomic
from densegrpo_fast.policies.base import PromptEmbeds, cfg_velocity, run_dtype
from densegrpo_fast.toy import world

PAD, UNK = 0, 1  # special token ids; words start at 2
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "toy" / "assets" / "toy_sd3.safetensors"


@dataclass(frozen=True)
class ToyArch:
    """Architecture of the toy model (stored in every checkpoint)."""

    image_size: int = world.IMAGE_SIZE
    patch_size: int = 4
    num_layers: int = 6
    num_heads: int = 4
    head_dim: int = 32
    text_dim: int = 64  # D of the token embeddings (SD3's joint_attention_dim)
    pooled_dim: int = 64  # P of the pooled vector (SD3's pooled_projection_dim)
    max_words: int = 8  # L: prompts are padded/truncated to this many words
    vocab: tuple[str, ...] = world.VOCAB


class ToyTextEncoder(nn.Module):
    """Word-level prompt encoder: ``prompts -> (embeds [B, L, D], pooled [B, P])``."""

    def __init__(self, arch: ToyArch):
        super().__init__()
        self.arch = arch
        self.index = {w: i + 2 for i, w in enumerate(arch.vocab)}
        self.tok = nn.Embedding(len(arch.vocab) + 2, arch.text_dim)
        self.pos = nn.Parameter(torch.zeros(arch.max_words, arch.text_dim))
        self.pool = nn.Linear(arch.text_dim, arch.pooled_dim)
        nn.init.normal_(self.tok.weight, std=0.5)
        nn.init.normal_(self.pos, std=0.1)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """[B, L] token ids. An unknown word is an error naming it and the vocabulary."""
        ids = torch.full((len(prompts), self.arch.max_words), PAD, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = p.lower().split()
            if len(words) > self.arch.max_words:
                raise ValueError(
                    f"prompt {p!r} has {len(words)} words; the toy encoder takes at most "
                    f"{self.arch.max_words}"
                )
            for j, w in enumerate(words):
                if w not in self.index:
                    raise ValueError(
                        f"word {w!r} of prompt {p!r} is not in the toy vocabulary {self.arch.vocab}"
                    )
                ids[i, j] = self.index[w]
        return ids

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        real = (ids != PAD).unsqueeze(-1).float()  # [B, L, 1]
        embeds = self.tok(ids) + self.pos * real  # padding carries no position
        pooled = self.pool((embeds * real).sum(1) / real.sum(1).clamp(min=1)) * real.amax(1)
        return embeds, pooled


def build_transformer(arch: ToyArch):
    from diffusers import SD3Transformer2DModel

    width = arch.num_heads * arch.head_dim
    return SD3Transformer2DModel(
        sample_size=arch.image_size,
        patch_size=arch.patch_size,
        in_channels=3,
        out_channels=3,
        num_layers=arch.num_layers,
        attention_head_dim=arch.head_dim,
        num_attention_heads=arch.num_heads,
        joint_attention_dim=arch.text_dim,
        caption_projection_dim=width,
        pooled_projection_dim=arch.pooled_dim,
        pos_embed_max_size=arch.image_size // arch.patch_size,
    )


class ToyPolicy(nn.Module):
    """The toy model behind the :class:`~densegrpo_fast.policies.base.Policy` interface.

    Shape: latents and velocities [B, 3, S, S] float32 (S = ``arch.image_size``), images the same in [0, 1].
    """

    def __init__(self, arch: ToyArch | None = None):
        super().__init__()
        self.arch = arch or ToyArch()
        self.transformer = build_transformer(self.arch)
        self.text_encoder = ToyTextEncoder(self.arch)
        self.latent_shape = (3, self.arch.image_size, self.arch.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return run_dtype(self.transformer)

    def embed(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings and pooled vectors, with gradient (pretraining trains the encoder)."""
        return self.text_encoder(self.text_encoder.tokenize(prompts).to(self.device))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], *, with_negative: bool = True) -> PromptEmbeds:
        return PromptEmbeds.deduplicated(self.embed, prompts, self.embed([""]) if with_negative else None)

    def forward_raw(
        self, x: torch.Tensor, sigma: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor
    ) -> torch.Tensor:
        """One transformer call: velocity [B, 3, S, S] at per-row ``sigma`` [B] (no CFG, keeps grad)."""
        out = self.transformer(
            hidden_states=x.to(self.dtype),
            encoder_hidden_states=embeds.to(self.dtype),
            pooled_projections=pooled.to(self.dtype),
            timestep=(1000.0 * sigma).to(self.dtype),
            return_dict=False,
        )[0]
        return out.float()

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        return cfg_velocity(self.forward_raw, x, sigma, cond, guidance_scale)

    @staticmethod
    def encode_images(images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] in [0, 1] -> latents in [-1, 1]."""
        return images.float() * 2 - 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------------------ checkpoints
    def save(self, path: str | Path, metadata: dict | None = None) -> None:
        """Write weights (fp32) and architecture to one safetensors file, atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"arch": json.dumps(asdict(self.arch)), **{k: str(v) for k, v in (metadata or {}).items()}}
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.state_dict().items()}
        write_atomic(path, lambda tmp: save_file(state, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | Path | None = None, device: torch.device | str = "cpu") -> ToyPolicy:
        """Load a checkpoint written by :meth:`save` (default: the one shipped in the package)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path) if path is not None else DEFAULT_CHECKPOINT
        fix = (
            "reinstall the package (the shipped checkpoint is missing or damaged) or pass a checkpoint path"
            if path == DEFAULT_CHECKPOINT
            else "pass a .safetensors file written by `densegrpo-fast pretrain-toy` or a toy training run "
            "(policy_ema.safetensors), or none (model.checkpoint null, no --checkpoint) for the shipped one"
        )
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ValueError(f"toy checkpoint {str(path)!r} {what}: {fix}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            if "arch" not in meta:
                raise ValueError("no 'arch' metadata")
            arch_d = json.loads(meta["arch"])
            arch_d["vocab"] = tuple(arch_d["vocab"])
            policy = cls(ToyArch(**arch_d))
            policy.load_state_dict(load_file(str(path)))
        except Exception as e:  # a cut file, another format, weights of another architecture
            msg = " ".join(str(e).split())[:300]  # (one line: a state dict error lists every key)
            raise ValueError(
                f"{path} is not a readable toy checkpoint ({type(e).__name__}: {msg}): {fix}"
            ) from None
        return policy.to(device).eval().requires_grad_(False)
