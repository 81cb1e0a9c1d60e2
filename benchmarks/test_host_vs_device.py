"""The counts behind host_vs_device.py, on the full-size SD3.5-M and FLUX.1-dev built with fake tensors.

What the table's reasoning rests on: a rollout's velocity call reads nothing from the device (fake tensors
refuse any read of a value, so the call would raise); its kernel launches do not depend on the number of
rows from two on (so a call's host time is fixed and its device time grows with the rows); and its FLOPs
and the other kernels' bytes grow in proportion to the rows.
"""

from __future__ import annotations

import host_vs_device as hvd
import pytest
import torch

# a CPU count: on a GPU machine the suite's few minutes are for what only the GPU can show
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="counted on the CPU (fake tensors)")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_velocity_call_has_fixed_launches_no_host_read_and_flops_per_row(family):
    pytest.importorskip("diffusers")
    policy, cfg, mode = hvd.fake_policy(family, lora=False)
    g = cfg.sampling.guidance_scale
    # (from 2 rows on: FLUX.1's attention copies its output slices when a call has more than one row)
    two, five = hvd.count_call(policy, 2, g, mode), hvd.count_call(policy, 5, g, mode)
    assert two["host_reads"] == [] and five["host_reads"] == []
    assert two["launches"] == five["launches"] > 1000  # full-size models: thousands of kernels a call
    assert five["flops"] == pytest.approx(2.5 * two["flops"], rel=1e-3)
    # the other kernels' traffic grows with the rows too (the per-call part, the timestep embedding, is small)
    assert five["memory_bytes"] == pytest.approx(2.5 * two["memory_bytes"], rel=0.02)
    # SD3.5-M at 512 px with CFG: two transformer rows of 1024 image + 333 text tokens, ~2 x 2.4 TFLOP;
    # FLUX.1-dev at 512 px: 1024 + 512 tokens through 12 B parameters, ~21 TFLOP (attention: ~15 %, ~8 %)
    expected = 4.9e12 if family == "sd3" else 21.5e12
    assert two["flops"] / 2 == pytest.approx(expected, rel=0.05)


def test_the_op_count_leaves_out_views_allocations_and_metadata_and_the_bytes_matmuls():
    counter = hvd.OpCount()
    x = torch.ones(4, 4)
    with counter:
        y = torch.empty(4, 4)  # allocation: no kernel
        z = x.view(16)  # a view: no kernel
        _ = x.device, z.shape  # metadata
        y.copy_(x)  # one kernel; counted as in-place ops are: its arguments and its output (y again)
        w = (x + 1).sum()  # two kernels: 64 + 64, then 64 + 4
        w.item()  # a host read
        torch.mm(x, x)  # a matmul: its time is its FLOPs, not its bytes
    assert counter.launches == 4
    assert counter.host_reads == ["_local_scalar_dense"]
    assert counter.memory_bytes == (64 + 64 + 64) + (64 + 64) + (64 + 4)


def test_attention_on_the_cpu_is_counted_as_attention():
    """torch's FLOP counter knows the CUDA attention kernels only; CPU_ATTENTION_FLOPS adds the CPU's: two
    matmuls of 2 * Lq * Lk * d FLOPs per head."""
    from torch.utils.flop_counter import FlopCounterMode

    B, H, Lq, Lk, d = 2, 3, 5, 7, 8
    q, k, v = torch.randn(B, H, Lq, d), torch.randn(B, H, Lk, d), torch.randn(B, H, Lk, d)
    plain, counted = (
        FlopCounterMode(display=False),
        FlopCounterMode(display=False, custom_mapping=hvd.CPU_ATTENTION_FLOPS),
    )
    with plain:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with counted:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert plain.get_total_flops() == 0
    assert counted.get_total_flops() == 2 * (2 * B * H * Lq * Lk * d)
