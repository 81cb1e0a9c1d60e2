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
    bias, a, b = torch.zeros(3), torch.ones(2, 4), torch.ones(4, 3)
    with counter:
        y = torch.empty(4, 4)  # allocation: no kernel
        z = x.view(16)  # a view: no kernel
        _ = x.device, z.shape  # metadata
        y.copy_(x)  # one kernel; counted as in-place ops are: its arguments and its output (y again)
        w = (x + 1).sum()  # two kernels: 64 + 64, then 64 + 4
        w.item()  # a host read
        torch.mm(x, x)  # a matmul: not among the other kernels' bytes; its FLOPs and bytes are kept apart
        torch.addmm(bias, a, b)
    assert counter.launches == 5
    assert counter.host_reads == ["_local_scalar_dense"]
    assert counter.memory_bytes == (64 + 64 + 64) + (64 + 64) + (64 + 4)
    assert counter.gemms == [(2 * 4 * 4 * 4, 3 * 64), (2 * 2 * 4 * 3, 4 * (3 + 8 + 12 + 6))]


def test_memory_bound_matmuls_add_their_byte_time_at_the_call_size():
    """A roofline per matmul, with each matmul's FLOPs and bytes taken from calls of 2 and 3 rows."""
    tflops, tbps = 400.0, 3.0
    # a rank-32 adapter on 1000 tokens a row, fp32: 2 * 1000 * 1536 * 32 FLOPs, 4 * 1000 * (1536 + 32) bytes
    f_row, b_row = 2 * 1000 * 1536 * 32, 4 * 1000 * (1536 + 32)
    lora = [(2 * f_row, 2 * b_row), (3 * f_row, 3 * b_row)]
    big = [(2 * 10**12, 10**9), (3 * 10**12, 10**9)]  # compute-bound: adds nothing
    excess, bound = hvd.gemm_excess_ms([lora[0], big[0]], [lora[1], big[1]], 96, tflops, tbps)
    per_row = (b_row / (tbps * 1e12) - f_row / (tflops * 1e12)) * 1e3
    assert bound == 1 and excess == pytest.approx(96 * per_row, rel=1e-9)
    # weights read once a call (here 300 MB) against FLOPs that grow with the rows: bound at few rows only
    modulation = [(2 * 10**8, 3 * 10**8), (3 * 10**8, 3 * 10**8)]
    assert hvd.gemm_excess_ms([modulation[0]], [modulation[1]], 2, tflops, tbps)[1] == 1
    assert hvd.gemm_excess_ms([modulation[0]], [modulation[1]], 10**6, tflops, tbps) == (0.0, 0)


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
