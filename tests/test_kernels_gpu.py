"""GPU tier: compiled Triton kernels, CUDA-graph capture and inductor compile. Skipped without CUDA.

Run by benchmarks/gpu_suite.sh on a GPU machine; the CPU tier covers the same math interpreted.
"""

import pytest
import torch
from test_kernels_cps import eager_cps_same_dtype, make_cps_step
from test_kernels_sde import MIXED, eager_step_same_dtype, make_step
from tolerances import assert_close_by_rule

from densegrpo_fast.kernels import (
    group_advantages,
    group_advantages_reference,
    sde_log_prob,
    sde_log_prob_reference,
    sde_std,
    sde_step,
    sde_step_reference,
)

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    monkeypatch.setenv("DENSEGRPO_KERNELS", "triton")


def cuda(*ts):
    return [t.cuda() for t in ts]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(24, 16, 64, 64), (37, 3, 5, 7), (3, 4096, 64)])
def test_compiled_sde_step_and_log_prob(dtype, shape):
    x, v, noise, sigma, sigma_next, std = cuda(*make_step(shape, dtype, ode_rows=(1,)))
    out, lp, ode = sde_step(x, v, sigma, sigma_next, std, noise, write_ode=True)
    d = [t.double() for t in (x, v, sigma, sigma_next, std, noise)]
    ref_out, _, ref_ode = sde_step_reference(*d, write_ode=True)
    eager_out, eager_ode = eager_step_same_dtype(x, v, noise, sigma, sigma_next, std)
    assert_close_by_rule(out, eager_out, ref_out, dtype, "next_sample")
    assert_close_by_rule(ode, eager_ode, ref_ode, dtype, "ode_next")
    ref_lp, _ = sde_log_prob_reference(x.double(), v.double(), out.double(), *d[2:5])
    eager_lp, _ = sde_log_prob_reference(x, v, out, sigma, sigma_next, std)
    assert_close_by_rule(lp, eager_lp, ref_lp, torch.float32, "log_prob")
    # on-policy exactness, compiled: the recomputation returns the rollout's log-prob bit for bit
    again, _ = sde_log_prob(x, v, out, sigma, sigma_next, std)
    assert torch.equal(again, lp)
    with_kl, _ = sde_log_prob(x, v, out, sigma, sigma_next, std, ref_velocity=noise)
    assert torch.equal(with_kl, lp)
    idx = torch.tensor([shape[0] - 1, 0], device="cuda")  # a training micro-batch of the rollout's rows
    part, _ = sde_log_prob(x[idx], v[idx], out[idx], sigma[idx], sigma_next[idx], std[idx])
    assert torch.equal(part, lp[idx])


@pytest.mark.parametrize("dtypes", MIXED, ids=lambda d: "-".join(str(t).removeprefix("torch.") for t in d))
def test_compiled_on_policy_exactness_with_mixed_dtypes(dtypes):
    """Compiled kernels group a row's partial sums by their narrowest latent load (``_common.widened``): with
    mixed dtypes sde_step and sde_log_prob must still add in one order."""
    x_dt, v_dt, noise_dt, ref_dt = dtypes
    x, v, noise, sigma, sigma_next, std = cuda(*make_step((24, 16, 64, 64), torch.float32, ode_rows=(1,)))
    x, v, noise = x.to(x_dt), v.to(v_dt), noise.to(noise_dt)
    out, lp, _ = sde_step(x, v, sigma, sigma_next, std, noise)
    again, _ = sde_log_prob(x, v, out, sigma, sigma_next, std)
    with_kl, _ = sde_log_prob(x, v, out, sigma, sigma_next, std, ref_velocity=(0.9 * v.float()).to(ref_dt))
    assert torch.equal(again, lp) and torch.equal(with_kl, lp)
    idx = torch.tensor([23, 0], device="cuda")
    part, _ = sde_log_prob(x[idx], v[idx], out[idx], sigma[idx], sigma_next[idx], std[idx])
    assert torch.equal(part, lp[idx])


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_cps_step_log_prob_and_gradient(dtype):
    """The CPS branch compiled: the step against float64 by the rule, the Euler step on ODE rows and at the
    grid's end, the ratio 1 bit for bit, and the gradient with KL against autograd."""
    shape = (24, 16, 64, 64)
    x, v, noise, sigma, sigma_next, std = cuda(*make_cps_step(shape, dtype, ode_rows=(1,)))
    out, lp, ode = sde_step(x, v, sigma, sigma_next, std, noise, write_ode=True, cps=True)
    d = [t.double() for t in (x, v, sigma, sigma_next, std, noise)]
    ref_out, _, _ = sde_step_reference(*d, write_ode=True, cps=True)
    eager_out = eager_cps_same_dtype(x, v, noise, sigma, sigma_next, std)
    assert_close_by_rule(out, eager_out, ref_out, dtype, "next_sample")
    assert torch.equal(out[1], ode[1]) and torch.equal(out[-1], ode[-1]) and lp[1] == 0 and lp[-1] == 0
    again, _ = sde_log_prob(x, v, out, sigma, sigma_next, std, cps=True)
    assert torch.equal(again, lp)
    v_ref = (v.float() + 0.05 * torch.randn_like(v, dtype=torch.float32)).to(dtype)
    vv = v.clone().requires_grad_(True)
    lp2, kl = sde_log_prob(x, vv, out, sigma, sigma_next, std, ref_velocity=v_ref, cps=True)
    assert torch.equal(lp2, lp)
    (lp2.sum() + 0.5 * kl.sum()).backward()

    def grad_of(cast):
        vel = cast(v).detach().requires_grad_(True)
        args = [cast(t) for t in (x, vel, out, sigma, sigma_next, std, v_ref)]
        lp_r, kl_r = sde_log_prob_reference(*args, cps=True)
        return torch.autograd.grad(lp_r.sum() + 0.5 * kl_r.sum(), vel)[0]

    eager = grad_of(lambda t: t.float()).to(dtype)
    assert_close_by_rule(vv.grad.float(), eager, grad_of(lambda t: t.double()), dtype, "dL/dv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_backward_with_kl(dtype):
    shape = (24, 16, 64, 64)
    x, v, noise, sigma, sigma_next, std = cuda(*make_step(shape, dtype, ode_rows=(2,)))
    xn = (x.float() + 0.3 * torch.randn_like(x, dtype=torch.float32)).to(dtype)
    v_ref = (v.float() + 0.05 * torch.randn_like(v, dtype=torch.float32)).to(dtype)
    vv = v.clone().requires_grad_(True)
    lp, kl = sde_log_prob(x, vv, xn, sigma, sigma_next, std, ref_velocity=v_ref)
    (lp.sum() + 0.5 * kl.sum()).backward()

    def grad_of(cast):
        vel = cast(v).detach().requires_grad_(True)
        lp_r, kl_r = sde_log_prob_reference(
            *[cast(t) for t in (x,)], vel, *[cast(t) for t in (xn, sigma, sigma_next, std, v_ref)]
        )
        return torch.autograd.grad(lp_r.sum() + 0.5 * kl_r.sum(), vel)[0]

    eager = grad_of(lambda t: t.float()).to(dtype)  # (rounded as the kernel's gradient is: its final cast)
    assert_close_by_rule(vv.grad.float(), eager, grad_of(lambda t: t.double()), dtype, "dL/dv")


@pytest.mark.parametrize("n", [65535 * 1024 + 3000, 65535 * 4096 + 5000], ids=["bwd-parts", "all-parts"])
def test_compiled_rows_past_the_grid_axis_limit(n):
    """One row longer than CUDA's 65535 programs on a grid's second axis allow in one launch: the backward's
    tiles past 67 M elements (first case), the step's and the forward's chunks past 268 M (second), launched
    in parts; and, in both, the finish's partials past 4096 (16 M elements) added in tiles. Against the
    reference path on the same GPU; fp32 rows of 0.27 / 1.07 GB."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x, v, noise = (torch.randn(1, n, device="cuda", generator=g) for _ in range(3))
    sigma, sigma_next = torch.tensor([0.7], device="cuda"), torch.tensor([0.6], device="cuda")
    std = sde_std(sigma, 0.7, sigma_guard=0.95)
    out, lp, _ = sde_step(x, v, sigma, sigma_next, std, noise)
    ref_out, ref_lp, _ = sde_step_reference(x, v, sigma, sigma_next, std, noise)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lp, ref_lp, rtol=1e-5, atol=0)
    del ref_out
    vv = v.clone().requires_grad_(True)
    again, _ = sde_log_prob(x, vv, out, sigma, sigma_next, std)
    assert torch.equal(again, lp), "on-policy: the ratio is 1"
    (grad,) = torch.autograd.grad(3.0 * again.sum(), vv)
    ref_v = v.clone().requires_grad_(True)
    ref_again, _ = sde_log_prob_reference(x, ref_v, out, sigma, sigma_next, std)
    (ref_grad,) = torch.autograd.grad(3.0 * ref_again.sum(), ref_v)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-12)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()


@pytest.mark.parametrize("global_std", [False, True])
def test_compiled_group_advantages(global_std):
    r = torch.randn(48 * 24, 10, device="cuda")
    r[0, 0], r[24, 1] = 40.0, -40.0  # outliers: with the global std, past the clip both ways
    mask = torch.rand(48 * 24, device="cuda") > 0.1
    mask[[0, 24]] = True
    out = group_advantages(r, 24, mask=mask, global_std=global_std)
    ref = group_advantages_reference(r.double(), 24, mask=mask, global_std=global_std)
    eager = group_advantages_reference(r, 24, mask=mask, global_std=global_std)
    assert_close_by_rule(out, eager, ref, torch.float32, "advantages")
    if global_std:  # (a group's own std bounds one outlier's |z| by sqrt(23) < 5)
        assert out[0, 0].item() == 5.0 and out[24, 1].item() == -5.0


def test_cuda_graph_capture_and_replay():
    """One rollout step + advantages captured once and replayed on new data: no host sync inside."""
    shape = (24, 16, 64, 64)
    x, v, noise, sigma, sigma_next, std = cuda(*make_step(shape, torch.bfloat16))
    rewards = torch.randn(24, 10, device="cuda")
    static = [t.clone() for t in (x, v, noise, sigma, sigma_next, std, rewards)]

    def step(x, v, noise, sigma, sigma_next, std, rewards):
        out, lp, ode = sde_step(x, v, sigma, sigma_next, std, noise, write_ode=True)
        return out, lp, ode, group_advantages(rewards, 6)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(*static)  # warm-up compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(*static)
    fresh = cuda(*make_step(shape, torch.bfloat16, seed=7)) + [torch.randn(24, 10, device="cuda")]
    for buf, new in zip(static, fresh, strict=True):
        buf.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    expected = step(*fresh)
    for got, want in zip(outs, expected, strict=True):
        assert torch.equal(got, want)


def test_inductor_compile_fullgraph():
    shape = (8, 16, 32, 32)
    x, v, noise, sigma, sigma_next, std = cuda(*make_step(shape, torch.bfloat16))

    def f(x, v, noise, sigma, sigma_next, std):
        out, lp, _ = sde_step(x, v, sigma, sigma_next, std, noise)
        lp2, _ = sde_log_prob(x, v, out, sigma, sigma_next, std)
        return torch.exp(lp2 - lp)

    ratio = torch.compile(f, fullgraph=True)(x, v, noise, sigma, sigma_next, std)
    assert torch.equal(ratio, torch.ones_like(ratio))
