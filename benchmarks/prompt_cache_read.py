"""How long an iteration's read of a prompt cache takes (``model.prompt_cache``), and its size on disk.

    python benchmarks/prompt_cache_read.py [--prompts 512] [--per-iteration 48] [--shape 333 4096 2048]

Writes a cache of ``--prompts`` random prompts of one family's shape (default SD3.5's: [333, 4096] embeds and a
[2048] pooled vector in bf16) in shards of 256 into a temporary directory, then reads ``--per-iteration``
distinct prompts drawn at random ten times, as a training iteration does, and prints the median. One thread;
the shards were just written, so they are in the page cache (a cold read adds the disk's time).
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time

import torch

from densegrpo_fast.prompt_cache import PromptCache


def measure(prompts: int, per_iteration: int, shape: tuple[int, int, int], draws: int = 10) -> dict:
    L, D, P = shape
    root = tempfile.mkdtemp(prefix="prompt_cache_read_")
    try:
        cache = PromptCache(root, {"family": "benchmark"}, padded=False, create=True)
        texts = [f"prompt number {i}" for i in range(prompts)]
        t0 = time.perf_counter()
        for start in range(0, prompts, 256):
            part = texts[start : start + 256]
            cache.add(part, torch.randn(len(part), L, D).bfloat16(), torch.randn(len(part), P).bfloat16())
        written = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in cache.root.glob("shard_*"))
        rng, times = random.Random(0), []
        for _ in range(draws):
            batch = rng.sample(texts, per_iteration)
            t0 = time.perf_counter()
            embeds, _ = cache.get(batch, "cpu")
            times.append(time.perf_counter() - t0)
        assert embeds.shape == (per_iteration, L, D)
    finally:
        shutil.rmtree(root)
    times.sort()
    return {"mib_per_prompt": size / prompts / 2**20, "gib": size / 2**30, "write_s": written,
            "read_median_ms": 1e3 * times[len(times) // 2], "read_min_ms": 1e3 * times[0],
            "read_max_ms": 1e3 * times[-1]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--per-iteration", type=int, default=48)
    ap.add_argument("--shape", type=int, nargs=3, default=(333, 4096, 2048), metavar=("L", "D", "P"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    r = measure(args.prompts, args.per_iteration, tuple(args.shape))
    print(f"{args.prompts} prompts: {r['gib']:.2f} GiB on disk ({r['mib_per_prompt']:.2f} MiB per prompt), written "
          f"in {r['write_s']:.1f} s; {args.per_iteration} prompts read in median {r['read_median_ms']:.0f} ms "
          f"({r['read_min_ms']:.0f} to {r['read_max_ms']:.0f})")  # fmt: skip


if __name__ == "__main__":
    main()
