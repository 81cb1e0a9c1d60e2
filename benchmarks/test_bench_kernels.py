"""Kernel throughput: each op as Triton, as its PyTorch reference, and as the peers' eager formulation.

Shapes: SD3.5-M latents at 512 px (16x64x64) with B = 24 and 48, and FLUX.1 packed latents at 1024 px
(4096 tokens x 64 channels). Bytes moved (the minimum any implementation must touch, written beside each
benchmark) over time gives GB/s; the table also shows it as % of this device's copy bandwidth. On a CPU
the Triton rows skip (the interpreter measures nothing useful) and the others run.
"""

import os

import pytest
import torch
from conftest import DEVICE, graph_time_per_call, rotation, time_per_call
from flow_grpo_eager import flow_grpo_advantages, flow_grpo_log_prob, flow_grpo_sde_step

from densegrpo_fast.kernels import (
    _sde_math,
    cps_std,
    group_advantages,
    group_advantages_reference,
    sde_log_prob,
    sde_log_prob_reference,
    sde_std,
    sde_step,
    sde_step_reference,
)

SHAPES = {"sd35m-b24": (24, 16, 64, 64), "sd35m-b48": (48, 16, 64, 64), "flux-1024px-b8": (8, 4096, 64)}
DTYPES = [torch.bfloat16, torch.float32]
IMPLS = ["triton", "reference", "flow-grpo"]
INNER = 20 if DEVICE.type == "cuda" else 1


def needs(impl):
    if impl == "triton" and DEVICE.type != "cuda":
        pytest.skip("Triton rows need a CUDA device (interpreted Triton measures nothing useful)")


@pytest.fixture
def force_backend(monkeypatch):
    def _force(impl):
        monkeypatch.setenv("DENSEGRPO_KERNELS", "triton" if impl == "triton" else "reference")

    return _force


def schedule(B, T=10):
    """A 10-step SD3 grid (shift 3) with the batch's rows spread over its steps, as in a mixed batch."""
    s = torch.linspace(1.0, 1.0 / T, T)
    sig = torch.cat([3.0 * s / (1 + 2.0 * s), torch.zeros(1)]).to(DEVICE)
    k = torch.arange(B, device=DEVICE) % (T - 1)
    sigma, sigma_next = sig[k], sig[k + 1]
    return sig, k, sigma, sigma_next, sde_std(sigma, 0.7, sigma_guard=sig[1].item())


def latents(shape, dtype, n):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    return [torch.randn(shape, device=DEVICE, generator=g, dtype=torch.float32).to(dtype) for _ in range(n)]


def graphed(fn):
    """The parameters of a CUDA-graph row: each shape and dtype, Triton and the reference (Flow-GRPO's
    formulation reads sigma on the host, so it cannot be captured)."""
    fn = pytest.mark.parametrize("impl", ["triton", "reference"])(fn)
    fn = pytest.mark.parametrize("shape_name", list(SHAPES))(fn)
    return pytest.mark.parametrize("dtype", DTYPES, ids=str)(fn)


def needs_graphs(force_backend, impl):
    if DEVICE.type != "cuda":
        pytest.skip("CUDA graphs need a CUDA device")
    force_backend(impl)


def step_calls(impl, shape, dtype, cps=False):
    """One ``sde_step`` call per input set of the rotation; and the bytes one call moves: it reads x, v, eps
    and writes x' (all in dtype); the log-prob is B floats. ``cps``: the coefficients-preserving step."""
    sig, k, sigma, sigma_next, std = schedule(shape[0])
    if cps:
        std = cps_std(sigma_next, 0.7)
    timesteps = sig[:-1] * 1000
    t = timesteps[k]

    def call(x, v, eps):
        if impl == "flow-grpo":
            return lambda: flow_grpo_sde_step(x, v, t, sig, timesteps, eps)
        if impl == "reference":
            return lambda: sde_step_reference(x, v, sigma, sigma_next, std, eps)
        return lambda: sde_step(x, v, sigma, sigma_next, std, eps, cps=cps)

    x, v, eps = latents(shape, dtype, 3)
    return [call(*inputs) for inputs in rotation(x, v, eps)], 4 * x.numel() * x.element_size()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_sde_step(benchmark, record, force_backend, impl, shape_name, dtype):
    needs(impl)
    force_backend(impl)
    shape = SHAPES[shape_name]
    calls, nbytes = step_calls(impl, shape, dtype)
    record("sde_step", impl, shape, dtype, time_per_call(benchmark, calls, INNER), nbytes)


@graphed
def test_sde_step_graphed(benchmark, record, force_backend, impl, shape_name, dtype):
    """The step as a captured rollout runs it: the device time."""
    needs_graphs(force_backend, impl)
    shape = SHAPES[shape_name]
    calls, nbytes = step_calls(impl, shape, dtype)
    record("sde_step", f"{impl}-graph", shape, dtype, graph_time_per_call(benchmark, calls), nbytes)


@pytest.mark.parametrize("shape_name", ["sd35m-b24", "sd35m-b48"])
def test_sde_step_cps_graphed(benchmark, record, force_backend, shape_name):
    """The CPS step (its own compiled branch: a square root per row more), graphed, bf16: against
    test_sde_step_graphed's Flow-GRPO rows of the same run it should move the same bytes in the same time."""
    needs("triton")
    needs_graphs(force_backend, "triton")
    shape = SHAPES[shape_name]
    calls, nbytes = step_calls("triton", shape, torch.bfloat16, cps=True)
    record(
        "sde_step cps", "triton-graph", shape, torch.bfloat16, graph_time_per_call(benchmark, calls), nbytes
    )


@pytest.mark.parametrize("shape_name", ["sd35m-b24", "sd35m-b48"])
@pytest.mark.parametrize("chunk", [1024, 2048, 8192])
def test_sde_step_chunk_sweep(benchmark, record, force_backend, monkeypatch, chunk, shape_name):
    """Elements per program (CHUNK, 4096 by default) at the SD3.5-M shapes, graphed, bf16: fewer per program
    is more programs and more loads in flight, and more partial sums to add (an open question until a GPU
    run; see benchmarks/RESULTS.md). Compare with test_sde_step_graphed's default rows of the same run."""
    needs("triton")
    force_backend("triton")
    monkeypatch.setattr(_sde_math, "CHUNK", chunk)
    shape = SHAPES[shape_name]
    calls, nbytes = step_calls("triton", shape, torch.bfloat16)
    timing = graph_time_per_call(benchmark, calls)
    record(f"sde_step chunk={chunk}", "triton-graph", shape, torch.bfloat16, timing, nbytes)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_sde_log_prob_fwd_bwd(benchmark, record, force_backend, impl, shape_name, dtype):
    needs(impl)
    force_backend(impl)
    shape = SHAPES[shape_name]
    x, v0, xn = latents(shape, dtype, 3)
    sig, k, sigma, sigma_next, std = schedule(shape[0])
    timesteps = sig[:-1] * 1000
    t = timesteps[k]

    def call(x, v, xn):
        if impl == "flow-grpo":
            loss = lambda: flow_grpo_log_prob(x, v, xn, t, sig, timesteps).sum()
        elif impl == "reference":
            loss = lambda: sde_log_prob_reference(x, v, xn, sigma, sigma_next, std)[0].sum()
        else:
            loss = lambda: sde_log_prob(x, v, xn, sigma, sigma_next, std)[0].sum()

        def fn():
            v.grad = None
            loss().backward()

        return fn

    calls = [call(*inputs) for inputs in rotation(x, v0.clone().requires_grad_(True), xn)]
    timing = time_per_call(benchmark, calls, INNER)
    # forward reads x, v, x'; backward reads x, v, x' and writes dL/dv
    record("sde_log_prob fwd+bwd", impl, shape, dtype, timing, 7 * x.numel() * x.element_size())


@graphed
def test_sde_log_prob_fwd_bwd_graphed(benchmark, record, force_backend, impl, shape_name, dtype):
    """Forward and backward as registered ops (what autograd calls), replayed from a CUDA graph: the
    kernels' device time, without autograd's bookkeeping."""
    needs_graphs(force_backend, impl)
    shape = SHAPES[shape_name]
    _, _, sigma, sigma_next, std = schedule(shape[0])
    grad_lp = torch.ones(shape[0], device=DEVICE)
    ops = torch.ops.densegrpo

    def call(x, v, xn):
        def fn():
            ops.sde_log_prob(x, v, xn, sigma, sigma_next, std, None)
            ops.sde_log_prob_backward(grad_lp, grad_lp, x, v, xn, sigma, sigma_next, std, None)

        return fn

    x, v, xn = latents(shape, dtype, 3)
    timing = graph_time_per_call(benchmark, [call(*inputs) for inputs in rotation(x, v, xn)])
    record("sde_log_prob fwd+bwd", f"{impl}-graph", shape, dtype, timing, 7 * x.numel() * x.element_size())


@pytest.mark.parametrize("shape", [(48 * 24, 10), (48 * 24, 1)], ids=["dense-1152x10", "sparse-1152x1"])
@pytest.mark.parametrize("impl", IMPLS)
def test_group_advantages(benchmark, record, force_backend, impl, shape):
    needs(impl)
    force_backend(impl)
    r = torch.randn(shape, device=DEVICE)  # 46 KB: it stays in cache, as a training step's rewards do
    fns = {
        "flow-grpo": lambda: flow_grpo_advantages(r, 24),
        "reference": lambda: group_advantages_reference(r, 24),
        "triton": lambda: group_advantages(r, 24),
    }
    timing = time_per_call(benchmark, fns[impl], INNER)
    record("group_advantages", impl, shape, torch.float32, timing, 2 * r.numel() * 4)


@pytest.mark.skipif(os.environ.get("DENSEGRPO_BENCH_CHECK", "1") == "0", reason="disabled")
def test_benchmarked_paths_agree():
    """The rows compare equal work: all three formulations give the same log-probs here."""
    shape = (4, 16, 16, 16)
    x, v, eps = latents(shape, torch.float32, 3)
    sig, k, sigma, sigma_next, std = schedule(shape[0])
    timesteps = sig[:-1] * 1000
    prev, lp_peer, _ = flow_grpo_sde_step(x, v, timesteps[k], sig, timesteps, eps)
    out, lp, _ = sde_step_reference(x, v, sigma, sigma_next, std, eps)
    torch.testing.assert_close(out, prev, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lp, lp_peer, rtol=1e-4, atol=1e-4)
    lp2 = flow_grpo_log_prob(x, v, out, timesteps[k], sig, timesteps)
    torch.testing.assert_close(lp2, lp, rtol=1e-4, atol=1e-4)
