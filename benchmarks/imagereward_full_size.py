"""ImageReward at full size on random weights: the load path and the scoring cost, on this machine.

Writes a random ImageReward checkpoint in the release's layout (BLIP's ``blip.visual_encoder.*`` /
``blip.text_encoder.*`` names, the ``mlp``, BLIP's contrastive projections, ``med_config.json`` beside it),
loads it through the ``imagereward`` reward (conversion, architecture read from the shapes), checks the
model it built against the released architecture (ViT-L/16 at 224 px with 16 heads, BERT-base with
cross-attention), and times scoring. The real weights are not needed; the scores mean nothing.

    python benchmarks/imagereward_full_size.py [--images 8] [--size 512] [--threads 2]

Needs BERT's uncased tokenizer on disk (``hf download bert-base-uncased --include '*.json' --include '*.txt'``), or
writes a stand-in WordPiece vocabulary of the right length (30522 entries) when it is absent.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def release_layout(model) -> dict[str, torch.Tensor]:
    """An :class:`~densegrpo_fast.rewards.imagereward.ImageRewardModel`'s weights under ImageReward's own
    names (the inverse of ``blip_to_transformers``), plus BLIP's unused projections."""
    from densegrpo_fast.rewards.imagereward import _VISION_BLOCK, _VISION_TOP

    top = {v: k for k, v in _VISION_TOP.items()}
    block = {v: k for k, v in _VISION_BLOCK.items()}
    out = {}
    for key, value in model.vision.state_dict().items():
        if key in top:
            out[f"blip.visual_encoder.{top[key]}"] = value
        else:  # encoder.layers.{i}.{suffix}.{weight|bias}
            parts = key.split(".")
            out[f"blip.visual_encoder.blocks.{parts[2]}.{block['.'.join(parts[3:-1])]}.{parts[-1]}"] = value
    out.update({f"blip.text_encoder.{k}": v for k, v in model.text.state_dict().items()})
    out.update({f"mlp.layers.{k}": v for k, v in model.head.state_dict().items()})
    out["blip.vision_proj.weight"], out["blip.vision_proj.bias"] = torch.randn(256, 1024), torch.zeros(256)
    out["blip.text_proj.weight"], out["blip.text_proj.bias"] = torch.randn(256, 768), torch.zeros(256)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import BlipTextModel, BlipVisionConfig, BlipVisionModel

    from densegrpo_fast.rewards import build_reward
    from densegrpo_fast.rewards.clip import aesthetic_head
    from densegrpo_fast.rewards.imagereward import (
        MED_CONFIG,
        VIT_L_16,
        ImageRewardModel,
        _no_init,
        text_config,
    )

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        t0 = time.perf_counter()
        torch.manual_seed(0)
        vcfg = BlipVisionConfig(**VIT_L_16)
        with _no_init():
            model = ImageRewardModel(
                BlipVisionModel(vcfg),
                BlipTextModel(text_config(MED_CONFIG, 1024, "built in"), add_pooling_layer=False),
                aesthetic_head(768),
            )
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        torch.save(release_layout(model), d / "ImageReward.pt")
        (d / "med_config.json").write_text(json.dumps(dict(MED_CONFIG, encoder_width=768)))
        params = sum(p.numel() for p in model.parameters())
        del model
        print(f"random checkpoint written: {params:,} parameters scored, "
              f"{(d / 'ImageReward.pt').stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t0:.1f} s")  # fmt: skip

        tokenizer = "bert-base-uncased"
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        except OSError:
            tokenizer = str(d / "tokenizer")
            Path(tokenizer).mkdir()
            letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
            words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *("##" + c for c in letters)]
            words += [f"[unused{i}]" for i in range(30522 - len(words))]
            (Path(tokenizer) / "vocab.txt").write_text("\n".join(words) + "\n")
            print("bert-base-uncased not on disk: a stand-in vocabulary of 30522 entries")

        t0 = time.perf_counter()
        reward = build_reward("imagereward", checkpoint=str(d), tokenizer=tokenizer)
        load_s = time.perf_counter() - t0
        vision, text = reward.model.vision.config, reward.model.text.config
        seen = (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.image_size,
                vision.patch_size, text.encoder_hidden_size, text.num_attention_heads)  # fmt: skip
        assert seen == (1024, 24, 16, 224, 16, 1024, 12), seen
        assert sum(p.numel() for p in reward.model.parameters()) == params
        print(f"loaded in {load_s:.1f} s: ViT-L/16 at 224 px, 16 heads; BERT-base, 12 heads, cross-attending")

        images = torch.rand(args.images, 3, args.size, args.size)
        prompts = [f"a photo of a cat number {i}" for i in range(args.images)]
        reward(images[:1], prompts[:1])  # warm-up
        t0 = time.perf_counter()
        scores = reward(images, prompts)
        s = time.perf_counter() - t0
        assert scores.shape == (args.images,) and torch.isfinite(scores).all()
        print(f"scored {args.images} images of {args.size} px in {s:.2f} s: {s / args.images * 1000:.0f} ms "
              f"per image, {args.threads} threads, float32")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
