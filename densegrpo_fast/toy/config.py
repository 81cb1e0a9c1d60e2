"""Configs of the toy commands.

``eval`` reads the ``model`` and ``eval`` sections of any config file (they are the training config's own
:class:`~densegrpo_fast.config.ModelSection` and :class:`~densegrpo_fast.config.EvalSection`, so
``configs/toy_geneval.yaml`` serves both ``train`` and ``eval``); ``pretrain-toy`` has its own tree.
"""

from __future__ import annotations

import difflib

from pydantic import ConfigDict, Field, model_validator

from densegrpo_fast.config import (
    CrossCheckError,
    EvalSection,
    ModelSection,
    Section,
    fill_family_defaults,
    model_eval_problems,
    reward_problems,
)


class ToyArchSection(Section):
    patch_size: int = Field(4, ge=1, description="transformer patch size (image 32 px / 4 = 8 x 8 tokens)")
    num_layers: int = Field(6, ge=1, description="SD3 joint transformer blocks")
    num_heads: int = Field(4, ge=1, description="attention heads")
    head_dim: int = Field(32, ge=8, description="channels per head (width = heads * head_dim)")
    text_dim: int = Field(64, ge=8, description="token-embedding width D (SD3 joint_attention_dim)")
    pooled_dim: int = Field(64, ge=8, description="pooled-vector width P (SD3 pooled_projection_dim)")


class PretrainSection(Section):
    steps: int = Field(8000, ge=1, description="optimizer steps")
    batch_size: int = Field(64, ge=1, description="freshly rendered images per step")
    lr: float = Field(6e-4, gt=0, description="peak AdamW learning rate")
    warmup_steps: int = Field(200, ge=0, description="linear warm-up steps")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay ends at lr * min_lr_ratio")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, gt=0, description="gradient-norm clip")
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA decay of the exported weights")
    prompt_dropout: float = Field(0.1, ge=0, le=1, description="probability a prompt is replaced by '' (CFG)")
    logit_normal_mean: float = Field(0.0, description="training sigma ~ sigmoid(N(mean, std)) (SD3)")
    logit_normal_std: float = Field(1.0, gt=0, description="see logit_normal_mean")
    seed: int = Field(
        0, ge=0, le=2**31 - 1, description="seed of initial weights and of every step's data and noise"
    )
    init_checkpoint: str | None = Field(
        None,
        description="toy checkpoint (.safetensors) whose weights start the run (continued pretraining; its "
        "arch must equal the config's); null = random initial weights",
    )
    output_dir: str = Field("runs/toy_pretrain", description="state.pt (resume), EMA exports and log.jsonl")
    checkpoint_every: int = Field(250, ge=1, description="steps between resumable checkpoints")
    eval_every: int = Field(0, ge=0, description="steps between quick held-out evals of the EMA (0 = never)")
    eval_prompts: int = Field(96, ge=6, description="held-out prompts in each quick eval")
    device: str = Field("cpu", description="torch device")
    num_threads: int = Field(1, ge=1, description="torch CPU threads")


class ToyPretrainConfig(Section):
    arch: ToyArchSection = Field(default_factory=ToyArchSection)
    train: PretrainSection = Field(default_factory=PretrainSection)
    eval: EvalSection = Field(
        default_factory=lambda: EvalSection(grid_size=0),
        description="sampler (and rewards) of the quick held-out evals during pretraining (train.eval_every); "
        "train.eval_prompts sets their prompt count, and they write no grid and no output_dir",
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> ToyPretrainConfig:
        """What the quick evaluations would otherwise refuse only when the first one runs (hours in)."""
        problems = model_eval_problems(ModelSection(family="toy"), self.eval)
        problems += reward_problems({f"eval.rewards.{k}": r for k, r in self.eval.rewards.items()})
        if problems:
            raise CrossCheckError(problems)
        return self


class ToyEvalConfig(Section):
    """What ``densegrpo-fast eval`` reads: the ``model`` and ``eval`` sections of a config file.

    Other top-level sections (a training config embeds these two beside its own) are left to the commands
    that own them; inside ``model`` and ``eval`` every unknown key is still an error.
    """

    model_config = ConfigDict(extra="ignore", validate_assignment=True, protected_namespaces=())

    model: ModelSection = Field(default_factory=ModelSection)
    eval: EvalSection = Field(default_factory=EvalSection)

    @model_validator(mode="before")
    @classmethod
    def _known_sections(cls, data):
        """A top-level key that is no section of a training config is a typo (``evl:``), not another
        command's section."""
        from densegrpo_fast.config import TrainConfig

        if isinstance(data, dict):
            known = list(TrainConfig.model_fields)
            problems = []
            for key in data:
                if key not in known:
                    near = difflib.get_close_matches(str(key), known, n=1)
                    hint = f"did you mean '{near[0]}'?" if near else f"valid sections: {', '.join(known)}"
                    problems.append(f"{key}: unknown section; {hint}")
            if problems:
                raise CrossCheckError(problems)
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> ToyEvalConfig:
        fill_family_defaults(self.model, eval=self.eval)
        problems = self.model.problems() + model_eval_problems(self.model, self.eval)
        problems += reward_problems({f"eval.rewards.{k}": r for k, r in self.eval.rewards.items()})
        if problems:
            raise CrossCheckError(problems)
        return self
