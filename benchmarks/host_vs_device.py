"""Would CUDA graphs speed up the rollout? Launches, host reads, FLOPs and bytes of one transformer call.

A CUDA graph removes the host's cost of launching a call's kernels, nothing else. That pays only where the
host cannot keep ahead of the GPU: where a call's launches take longer on the host than its kernels take on
the device, or where the host waits for the device inside the call (a read of a device value, which drains
the queue). This script counts, on the CPU with fake tensors (shapes only, no arithmetic), what one
velocity call of the engine's adapters makes at the real sizes: the torch ops that launch a kernel (views
and allocations left out), the host reads among them, the FLOPs of the matmuls and attention (torch's
FlopCounterMode), and the bytes every other kernel reads and writes. It also times the host side of the
same calls on a tiny random model of the same architecture on this CPU, per op (the tiny model's kernels
take microseconds, so its calls are nearly all host work).

    python benchmarks/host_vs_device.py                  # SD3.5-M and FLUX.1-dev as their recipes run them
    python benchmarks/host_vs_device.py --tflops 400 --tbps 3 --json

The device time per row is assumed, not measured: the matmuls' and attention's FLOPs at ``--tflops``
(bf16), every other kernel's bytes (element-wise, norms, casts, concatenations) at ``--tbps``, and for the
matmuls whose bytes take longer than their FLOPs at those rates (the LoRA adapters' rank-32 ones), the
difference, at the recipe's call size (a roofline per matmul). The host time
per call is the launches times this CPU's host cost per op. A GPU machine's host is likely faster per op,
but each launch adds the driver's few microseconds. Both sides are estimates of the order of magnitude:
the table is for the crossover, the call size below which a call is host-bound.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.utils._python_dispatch
import torch.utils._pytree
from torch.utils.flop_counter import FlopCounterMode

# aten ops that launch no kernel: allocations, and views torch does not flag as views
_NO_KERNEL = {
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "lift_fresh",
    "_unsafe_view",
}
_HOST_READS = {"_local_scalar_dense", "nonzero", "item", "equal", "is_nonzero"}


# kernels whose time the FLOP count gives (compute-bound at these sizes); the others move memory
_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention"}  # fmt: skip


_GEMMS = {"mm": 0, "addmm": 1, "bmm": 0, "baddbmm": 1}  # the position of the first factor among the args


def _gemm_flops(name: str, args) -> int:
    """2 m k n (times the batch for bmm / baddbmm): what FlopCounterMode counts for them."""
    a, b = args[_GEMMS[name]], args[_GEMMS[name] + 1]
    return 2 * a.numel() * b.shape[-1]


def _distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's distinct elements (a broadcast dimension, stride 0, is read once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        n *= size if stride else 1
    return n * t.element_size()


class OpCount(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten ops that launch a kernel (views and allocations launch none; ``prim`` ops such as
    ``.device`` are metadata), the host reads, and the bytes the non-matmul kernels read and write."""

    def __init__(self):
        super().__init__()
        self.launches = 0
        self.host_reads: list[str] = []
        self.memory_bytes = 0  # inputs + outputs of every launching op but the matmuls and attention
        self.gemms: list[tuple[int, int]] = []  # (FLOPs, bytes in and out) of each matmul

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if name in _HOST_READS:
            self.host_reads.append(name)
        elif func.namespace == "aten" and not func.is_view and name not in _NO_KERNEL:
            self.launches += 1
            flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
            moved = sum(_distinct_bytes(t) for t in flat if isinstance(t, torch.Tensor))
            if name not in _MATMULS:
                self.memory_bytes += moved
            elif name in _GEMMS:
                self.gemms.append((_gemm_flops(name, args), moved))
        return out


def _config(family: str, overrides: list[str]):
    from densegrpo_fast.config import TrainConfig, load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    path = root / ("sd35m_pickscore.yaml" if family == "sd3" else "flux_pickscore.yaml")
    return load_config(TrainConfig, path, ["reward.name=redness", "reward.kwargs={}", *overrides])


def zero_cond(policy, rows: int, cfg_on: bool, device=None):
    """Prompt embeds of ``rows`` rows at the adapter's real sequence length, zeros (one table row per row;
    with ``cfg_on`` a negative row too), without running the text encoders."""
    from densegrpo_fast.policies.base import PromptEmbeds

    t = policy.transformer.config
    # SD3: CLIP's tokens (77; fewer in the tests' tiny pipelines), then T5's; FLUX.1: T5's alone; Qwen-Image and
    # Z-Image: their prompts at max_sequence_length (padded to the longest, not to a fixed length)
    length = policy.max_sequence_length + (policy.pipe.tokenizer_max_length if _is_sd3(policy) else 0)
    # (Z-Image's text width: cap_feat_dim; Wan's: text_dim)
    dim = t.get("joint_attention_dim") or t.get("cap_feat_dim") or t.text_dim

    def zeros(*shape):
        return torch.zeros(*shape, device=device)

    def second(n):  # the pooled vector, or Qwen-Image's and Z-Image's token mask (every token kept)
        if getattr(policy, "pads_prompts", True):  # (FLUX.2 [klein]: no pooled vector, a placeholder column)
            return zeros(n, t.get("pooled_projection_dim") or (0 if getattr(policy, "video", False) else 1))
        return torch.ones(n, length, dtype=torch.long, device=device)

    neg = (zeros(1, length, dim), second(1)) if cfg_on else (None, None)
    reference = None
    if (
        getattr(policy, "edits", None) == "required"
    ):  # an editing model's source tokens: as the sampled image's
        _, h, w = policy.latent_shape
        reference = zeros(rows, (h // 2) * (w // 2), t.in_channels)
    return PromptEmbeds(zeros(rows, length, dim), second(rows), *neg, reference=reference)


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the CPU's flash attention (torch counts the CUDA variants only): that of any SDPA."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


#: ``custom_mapping`` for FlopCounterMode that counts attention on the CPU too
CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def _is_sd3(policy) -> bool:
    return hasattr(policy.transformer.config, "caption_projection_dim")  # (FLUX.1's has none)


def count_call(policy, rows: int, guidance: float, mode) -> dict:
    """One ``policy.velocity`` call of ``rows`` latent rows under no_grad (a rollout call), fake tensors."""
    cfg_on = guidance != 1.0 and _is_sd3(policy)
    with mode:
        x = torch.zeros(rows, *policy.latent_shape)
        sigma = torch.full((rows,), 0.7)
        cond = zero_cond(policy, rows, cfg_on)
    counter, flops = OpCount(), FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS)
    with torch.no_grad(), mode, flops, counter:
        policy.velocity(x, sigma, cond, guidance)
    return {
        "launches": counter.launches,
        "host_reads": counter.host_reads,
        "flops": flops.get_total_flops(),
        "memory_bytes": counter.memory_bytes,
        "gemms": counter.gemms,
    }


def gemm_excess_ms(two: list, three: list, rows: int, tflops: float, tbps: float) -> tuple[float, int]:
    """What memory-bound matmuls add over their FLOP time in a call of ``rows`` latent rows, and how many
    they are: each matmul runs at whichever bound is slower, its FLOPs at ``tflops`` or its bytes at
    ``tbps`` (a roofline). Each matmul's FLOPs and bytes are affine in the rows, so the calls counted at 2
    and 3 rows give them at ``rows``. The LoRA adapters' rank-32 matmuls, fp32, read and write whole
    activations for few FLOPs; the transformer's own are compute-bound but for its per-call modulation
    (adaLN) matmuls, whose weights outweigh their few rows."""
    excess, bound = 0.0, 0
    for (f2, b2), (f3, b3) in zip(two, three, strict=True):
        f, b = f2 + (rows - 2) * (f3 - f2), b2 + (rows - 2) * (b3 - b2)
        extra = b / (tbps * 1e12) - f / (tflops * 1e12)
        if extra > 0:
            excess, bound = excess + extra, bound + 1
    return excess * 1e3, bound


def fake_policy(family: str, lora: bool):
    from densegrpo_fast import memory

    cfg = _config(family, [] if lora else ["lora.enabled=false"])
    mode = memory.new_fake_mode()
    policy, _ = memory.fake_policy(cfg, mode)
    if lora:
        from peft import LoraConfig

        config = LoraConfig(
            r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules
        )
        add = lambda: policy.transformer.add_adapter(config)  # noqa: E731
        memory.add_fake_adapter(
            policy.transformer, add, mode, torch.float32
        )  # fp32, as the trainer keeps them
    return policy, cfg, mode


def tiny_host_cost(family: str, lora: bool, repeats: int = 30) -> dict:
    """Host microseconds per launching op on this CPU: a tiny random model of the same architecture (two
    layers, widths of a few dozen) called eagerly, its wall time divided by its op count."""
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import tiny_models

    from densegrpo_fast.policies.flux import FluxPolicy
    from densegrpo_fast.policies.sd3 import SD3Policy

    opts = dict(resolution=tiny_models.RESOLUTION, max_sequence_length=tiny_models.MAX_T5_TOKENS)
    if family == "sd3":
        policy = SD3Policy(tiny_models.sd3_pipeline(), **opts)
    else:
        policy = FluxPolicy(tiny_models.flux_pipeline(), **opts)
    if lora:
        from peft import LoraConfig

        from densegrpo_fast.config import LoRASection

        targets = LoRASection().target_modules
        policy.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    guidance = 4.5 if family == "sd3" else 3.5
    cond = policy.encode_prompts(["a red circle"], with_negative=family == "sd3")
    x, sigma = torch.zeros(1, *policy.latent_shape), torch.full((1,), 0.7)
    counter = OpCount()
    with torch.no_grad():
        with counter:
            policy.velocity(x, sigma, cond, guidance)
        for _ in range(5):
            policy.velocity(x, sigma, cond, guidance)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(repeats):
                policy.velocity(x, sigma, cond, guidance)
            best = min(best, (time.perf_counter() - t0) / repeats)
    return {"launches": counter.launches, "call_ms": best * 1e3, "us_per_op": best * 1e6 / counter.launches}


def measure(tflops: float, tbps: float) -> list[dict]:
    from densegrpo_fast.config import shown_resolution

    torch.set_num_threads(1)
    records = []
    for family in ("sd3", "flux"):
        for lora in (False, True):
            policy, cfg, mode = fake_policy(family, lora)
            guidance = cfg.sampling.guidance_scale
            per_call = cfg.sampling.max_rows_per_call
            # (FLUX.1's attention copies its output slices when a call has more than one row: count at 2)
            two, three = count_call(policy, 2, guidance, mode), count_call(policy, 3, guidance, mode)
            tiny = tiny_host_cost(family, lora)
            flops_row = three["flops"] - two["flops"]
            device_ms_row = flops_row / (tflops * 1e12) * 1e3
            memory_ms_row = (three["memory_bytes"] - two["memory_bytes"]) / (tbps * 1e12) * 1e3
            excess_ms, bound = gemm_excess_ms(two["gemms"], three["gemms"], per_call, tflops, tbps)
            host_ms = three["launches"] * tiny["us_per_op"] / 1e3
            records.append({
                "model": f"{'SD3.5-M' if family == 'sd3' else 'FLUX.1-dev'} "
                f"{shown_resolution(cfg.model.resolution)} px" + (" CFG" if family == "sd3" else ""),
                "lora": lora,
                "launches_per_call": three["launches"],
                "launches_per_call_2_rows": two["launches"],
                "host_reads_per_call": len(three["host_reads"]),
                "gflop_per_row": flops_row / 1e9,
                "tiny_us_per_op": tiny["us_per_op"],
                "tiny_launches": tiny["launches"],
                "host_ms_per_call": host_ms,
                "device_ms_per_row": device_ms_row,
                "memory_gb_per_row": (three["memory_bytes"] - two["memory_bytes"]) / 1e9,
                "memory_ms_per_row": memory_ms_row,
                "memory_bound_gemms_per_recipe_call": bound,
                "memory_bound_gemm_ms_per_row": excess_ms / per_call,  # at the recipe's call size
                "crossover_rows": host_ms / device_ms_row,
                "recipe_rows_per_call": per_call,
                "recipe_device_ms_per_call": device_ms_row * per_call,
            })  # fmt: skip
            del policy
    return records


def table(records: list[dict], tflops: float, tbps: float) -> str:
    lines = [
        "| model | LoRA | kernel launches / call | host reads / call | GFLOP / latent row | host us / op (this CPU) "
        f"| host ms / call | matmul + attention ms / row at {tflops:g} TFLOP/s | host-bound below (latent rows) "
        "| recipe rows / call: matmul + attention ms | other kernels' GB / row "
        f"| their ms / row at {tbps:g} TB/s | memory-bound matmuls / recipe call: their extra ms / row |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in records:
        lines.append(
            f"| {r['model']} | {'r32' if r['lora'] else '-'} | {r['launches_per_call']} | "
            f"{r['host_reads_per_call']} | {r['gflop_per_row']:.0f} | {r['tiny_us_per_op']:.1f} | "
            f"{r['host_ms_per_call']:.1f} | {r['device_ms_per_row']:.2f} | {r['crossover_rows']:.2f} | "
            f"{r['recipe_rows_per_call']}: {r['recipe_device_ms_per_call']:.0f} | "
            f"{r['memory_gb_per_row']:.2f} | {r['memory_ms_per_row']:.2f} | "
            f"{r['memory_bound_gemms_per_recipe_call']}: {r['memory_bound_gemm_ms_per_row']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tflops", type=float, default=400.0, help="assumed sustained bf16 TFLOP/s")
    parser.add_argument(
        "--tbps", type=float, default=3.0, help="assumed achieved memory bandwidth, TB/s (H100: 3.35 peak)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    records = measure(args.tflops, args.tbps)
    print(json.dumps(records, indent=1) if args.json else table(records, args.tflops, args.tbps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
