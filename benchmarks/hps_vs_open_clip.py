"""The ``hps`` reward against OpenCLIP itself, at HPS's real architecture (ViT-H-14), on random weights.

Builds OpenCLIP's ViT-H-14 with random weights (every LayerNorm and bias moved off its init too), saves it
as HPS saves its checkpoints (``{"state_dict": ...}``, fp16 as in ``HPS_v2.1_compressed.pt`` or fp32), writes
a ``base`` folder like ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` without weights (the transformers config of
the architecture, a CLIP tokenizer made from OpenCLIP's own BPE vocabulary and merges, the image
processor), and scores images with ``build_reward("hps", ...)``. The oracle is OpenCLIP's
``encode_image`` / ``encode_text`` (normalised) on the same preprocessed pixels and on OpenCLIP's own tokens
(so its text cleaning and tokenizer are compared too: curly quotes, an HTML entity, a ligature, a prompt past
77 tokens), with images in HPS's own validation transform (transcribed here from its source: the longest
side resized, zero padding; non-square images with a sharp band). Prints the largest score difference and the
load time.

Needs ``open_clip`` importable (``pip install open_clip_torch`` where a torchvision built for your torch is
installed; OpenCLIP's model code does not use torchvision, only its transforms do). About 9 GB of host
memory, ~2 minutes on 2 CPU cores.

    python benchmarks/hps_vs_open_clip.py [--dtype fp16|fp32] [--images 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

PROMPTS = [
    "a photo of an astronaut riding a horse on the moon",
    "A cat wearing a red hat, oil painting, highly detailed!",
    "a neon sign that says \u201copen 24 hours\u201d",  # curly quotes (ftfy straightens them)
    "rock &amp;amp; roll poster, the \ufb01nal show",  # an entity escaped twice, a ligature
    "an extremely detailed matte painting of a vast ancient city " * 4,  # over 77 tokens: truncated
    "two dogs",
]


def base_folder(d: Path, open_clip, model) -> None:
    """transformers config + tokenizer + image processor of OpenCLIP's ViT-H-14, no weights."""
    import transformers
    from transformers import CLIPConfig, CLIPTokenizer

    tok = open_clip.tokenizer.SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # OpenCLIP's -> CLIP's
    (d / "vocab.json").write_text(json.dumps({names.get(k, k): i for k, i in tok.encoder.items()}))
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt")).save_pretrained(str(d))
    v, t = model.visual, model
    text = dict(
        vocab_size=t.vocab_size, hidden_size=t.transformer.width, intermediate_size=4 * t.transformer.width,
        num_hidden_layers=t.transformer.layers, num_attention_heads=t.transformer.resblocks[0].attn.num_heads,
        max_position_embeddings=t.context_length, hidden_act="gelu", bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407,
    )  # fmt: skip
    vision = dict(
        hidden_size=v.transformer.width, intermediate_size=4 * v.transformer.width,
        num_hidden_layers=v.transformer.layers, num_attention_heads=v.transformer.resblocks[0].attn.num_heads,
        image_size=224, patch_size=14, hidden_act="gelu",
    )  # fmt: skip
    CLIPConfig(text_config=text, vision_config=vision, projection_dim=int(v.proj.shape[1])).save_pretrained(
        str(d)
    )
    proc = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    proc(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(str(d))
    (d / "model.safetensors").unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["fp16", "fp32"], default="fp16", help="the checkpoint's dtype")
    ap.add_argument("--images", type=int, default=6)
    args = ap.parse_args()
    import open_clip

    from densegrpo_fast.rewards import build_reward
    from densegrpo_fast.rewards.hps import hps_preprocess_reference, open_clip_clean

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-H-14", pretrained=None).eval()
    for name, p in model.named_parameters():
        if p.ndim == 1 and name != "logit_scale":  # LayerNorms and biases off their init (ones, zeros)
            p.data += 0.05 * torch.randn_like(p)
    if args.dtype == "fp16":  # the checkpoint's rounding, in the oracle as well
        for p in model.parameters():
            p.data = p.data.half().float()
    print(f"OpenCLIP ViT-H-14: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        state = {k: (v.half() if args.dtype == "fp16" else v) for k, v in model.state_dict().items()}
        torch.save({"state_dict": state, "epoch": 1}, tmp / "HPS_v2.1_compressed.pt")
        del state
        (tmp / "base").mkdir()
        base_folder(tmp / "base", open_clip, model)
        t0 = time.perf_counter()
        reward = build_reward("hps", checkpoint=str(tmp), base=str(tmp / "base"), max_batch=2)
        load_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    images = torch.rand(args.images, 3, 512, 768, generator=g)  # not square: HPS pads to 224 x 224
    images = F.avg_pool2d(images, 9, 1, 4)  # smoother, more image-like
    images[:, :, 200:260] = 1.0  # a sharp band: bicubic overshoot, which HPS does not clamp
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.images)]
    t0 = time.perf_counter()
    got = reward(images, prompts)
    score_s = time.perf_counter() - t0
    with torch.no_grad():
        img = model.encode_image(hps_preprocess_reference(images), normalize=True)
        ids = open_clip.get_tokenizer("ViT-H-14")(prompts)
        txt = model.encode_text(ids, normalize=True)
    want = (img * txt).sum(-1)
    ours = reward.clip.tokenizer([open_clip_clean(p) for p in prompts], truncation=True, max_length=77)[
        "input_ids"
    ]  # BOS ... EOT, as the reward tokenises; OpenCLIP then pads with zeros
    same_tokens = all(
        row == ids[i, : len(row)].tolist() and not ids[i, len(row) :].any() for i, row in enumerate(ours)
    )
    print(
        f"checkpoint {args.dtype}: converted and loaded in {load_s:.1f} s; {args.images} images scored in {score_s:.1f} s"
    )
    print(f"tokens identical to OpenCLIP's: {same_tokens}")
    print("scores (hps reward):", [f"{x:.6f}" for x in got.tolist()])
    print("scores (OpenCLIP):  ", [f"{x:.6f}" for x in want.tolist()])
    print(
        f"max |difference| = {(got - want).abs().max().item():.2e}; score spread (std) = {want.std().item():.3f}"
    )


if __name__ == "__main__":
    main()
