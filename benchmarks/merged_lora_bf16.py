"""What `lora.merge_for_sampling` changes in a bf16 model: the adapters' effect kept, against bf16's own noise.

Merging folds each adapter into a fresh copy of its base weight, ``bf16(w + delta)`` (trainer.lora_merged).
In a bf16 model ``w`` already sits on the bf16 grid, so the parts of ``delta`` smaller than half a bf16 step
of ``w`` round away, and early in training, when the adapters are small, the merged sampler could sample
(nearly) the base model instead of the policy the update trains. But the unmerged sampler rounds too: peft
adds the fp32 adapter's output to the bf16 layer's and casts the sum back to bf16. Which of the two follows
the trained policy better is a question of the ratio rho = rms(delta) / rms(w), which this script sweeps on
SD3.5-Medium's transformer at full width (1536; 24 layers by default, at 256 px) with random weights, the
recipes' LoRA (r 32, alpha 64, peft's gaussian A, on Flow-GRPO's attention projections) and B scaled so that
every adapted layer has the given rho. One velocity call of one latent row, per rho and variant:

- exact: fp32 weights (the bf16 base upcast) and fp32 adapters, in fp32: the policy in exact arithmetic;
- unmerged: the bf16 base with fp32 adapters, as the recipes roll out and as the update trains;
- merged: ``bf16(w + delta)``, adapters off: ``lora.merge_for_sampling``'s sampler (trainer.lora_merged);
- base: the bf16 base alone.

Reported against the adapters' exact effect ``e = v_exact - v_base_exact`` (both fp32): for each bf16
sampler (unmerged, merged), the share of ``e`` it keeps, ``<v - v_base, e> / |e|^2`` (1 = all of it), and
its distance from the exact policy, ``|v - v_exact| / |e|`` (bf16's rounding alone gives the unmerged one's).

    python benchmarks/merged_lora_bf16.py [--layers 24] [--resolution 256] [--threads 2] [--seed 0] [--json]

SD3.5-M's 24 layers take 9 GB in fp32 and ~15 GB of host memory at the peak (one model, changed in place).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

RHOS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def build(layers: int, width_heads: int = 24, text_tokens: int = 154, seed: int = 0):
    """SD3.5-Medium's transformer cut to ``layers`` (``width_heads`` heads of 64), fp32 random weights
    rounded to the bf16 grid (a bf16 checkpoint's), and its inputs at ``text_tokens`` prompt tokens."""
    from diffusers import SD3Transformer2DModel

    from densegrpo_fast.policies.architectures import SD35M_TRANSFORMER

    torch.manual_seed(seed)
    arch = {**SD35M_TRANSFORMER, "num_layers": layers, "num_attention_heads": width_heads,
            "caption_projection_dim": 64 * width_heads, "dual_attention_layers": tuple(range(min(layers, 13)))}  # fmt: skip
    model = SD3Transformer2DModel(**arch).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model, text_tokens


def add_adapters(model, rho: float, rank: int = 32, alpha: float = 64, seed: int = 1):
    """The recipes' adapters (fp32; added once, in place), with B drawn and scaled so that each adapted
    layer's delta has rms(delta) = rho * rms(w)."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    from densegrpo_fast.config import LoRASection

    if not any(isinstance(m, LoraLayer) for m in model.modules()):
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                     target_modules=LoRASection().target_modules))  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLayer):
                b = m.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=gen))
                delta = m.get_delta_weight("default")
                w = m.get_base_layer().weight
                b.mul_(rho * w.pow(2).mean().sqrt() / delta.pow(2).mean().sqrt())
    return model


@contextlib.contextmanager
def bf16_base(model):
    """``model`` (fp32, its base on the bf16 grid) with its base in bf16 and the adapters kept in fp32, as
    the trainer keeps them; fp32 again after (exactly: the base weights are on the bf16 grid, and the
    buffers are restored). In place: SD3.5-M's 24 layers leave no room for a copy in host memory."""
    adapters = {n: p.data for n, p in model.named_parameters() if "lora_" in n}
    buffers = {n: b.data.clone() for n, b in model.named_buffers()}
    model.to(torch.bfloat16)
    for n, p in model.named_parameters():
        if n in adapters:
            p.data = adapters[n]
    try:
        yield model
    finally:
        model.float()
        for n, p in model.named_parameters():
            if n in adapters:
                p.data = adapters[n]
        for n, b in model.named_buffers():
            b.data = buffers[n]


def merged(model):
    """``model`` with its adapters folded into its base weights in the base's dtype and the adapters off, by
    the trainer's own ``lora_merged`` (what ``lora.merge_for_sampling`` samples with); all back after."""
    from types import SimpleNamespace

    from densegrpo_fast.trainer import lora_merged

    lora = SimpleNamespace(enabled=True, merge_for_sampling=True)
    return lora_merged(
        SimpleNamespace(cfg=SimpleNamespace(lora=lora), policy=SimpleNamespace(transformer=model))
    )


def inputs(model, text_tokens: int, resolution: int, seed: int = 2):
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    side = resolution // 8
    return dict(
        hidden_states=torch.randn(1, cfg.in_channels, side, side, generator=gen),
        encoder_hidden_states=torch.randn(1, text_tokens, cfg.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=gen),
        timestep=torch.tensor([700.0]),
    )


@torch.no_grad()
def velocity(model, x: dict) -> torch.Tensor:
    dtype = next(p.dtype for n, p in model.named_parameters() if "lora_" not in n)
    cast = {k: v.to(dtype) if v.is_floating_point() and k != "timestep" else v for k, v in x.items()}
    return model(**cast, return_dict=False)[0].float()


def _stats(v_sampler, v_base, v_exact, effect) -> tuple[float, float]:
    """The share of the exact effect a bf16 sampler keeps, and its distance from the exact policy, both as
    fractions of the exact effect."""
    n2 = effect.pow(2).sum().item()
    return ((v_sampler - v_base) * effect).sum().item() / n2, (v_sampler - v_exact).norm().item() / n2**0.5


def measure(
    layers: int, resolution: int, rhos=RHOS, width_heads: int = 24, text_tokens: int = 154, seed: int = 0
) -> list[dict]:
    """One model in memory, changed in place (SD3.5-M's 24 layers in fp32 take 9 GB)."""
    model, text_tokens = build(layers, width_heads, text_tokens, seed)
    x = inputs(model, text_tokens, resolution, seed + 2)
    v_base_exact = velocity(model, x)
    with bf16_base(model):
        v_base = velocity(model, x)
    records = []
    for rho in rhos:
        t0 = time.perf_counter()
        add_adapters(model, rho, seed=seed + 1)
        v_exact = velocity(model, x)
        with bf16_base(model):
            v_unmerged = velocity(model, x)
            with merged(model):
                v_merged = velocity(model, x)
        effect = v_exact - v_base_exact  # what the adapters change, in exact arithmetic
        kept_u, err_u = _stats(v_unmerged, v_base, v_exact, effect)
        kept_m, err_m = _stats(v_merged, v_base, v_exact, effect)
        records.append({
            "rho": rho,
            "effect_rel": effect.norm().item() / v_base_exact.norm().item(),
            "kept_unmerged": kept_u, "kept_merged": kept_m,
            "error_unmerged": err_u, "error_merged": err_m,
            "merged_vs_unmerged": (v_merged - v_unmerged).norm().item() / effect.norm().item(),
            "seconds": time.perf_counter() - t0,
        })  # fmt: skip
    return records


def table(records: list[dict]) -> str:
    lines = [
        "| rho = rms(delta) / rms(w) | adapters' effect / velocity | effect kept: unmerged, merged | "
        "distance from exact: unmerged, merged | merged vs unmerged |",
        "|---:|---:|---|---|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['rho']:g} | {r['effect_rel']:.2e} | {r['kept_unmerged']:.3f}, {r['kept_merged']:.3f} | "
            f"{r['error_unmerged']:.3f}, {r['error_merged']:.3f} | {r['merged_vs_unmerged']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24, help="SD3.5-M's first N layers (of 24)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="of the weights, the adapters and the inputs")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    records = measure(args.layers, args.resolution, seed=args.seed)
    print(json.dumps(records, indent=1) if args.json else table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
