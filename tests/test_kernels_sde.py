"""sde_step and sde_log_prob on both backends against a float64 reference (densegrpo_fast/ALGORITHM.md
§2)."""

import importlib
import math

import pytest
import torch
from tolerances import ATOL, assert_close_by_rule, interpreter_store_slack, max_err

from densegrpo_fast.kernels import _sde_math as sm
from densegrpo_fast.kernels import (
    cps_std,
    sde_log_prob,
    sde_log_prob_reference,
    sde_std,
    sde_step,
    sde_step_reference,
)

# the package re-exports functions under the modules' names, so fetch the modules themselves
step_module = importlib.import_module("densegrpo_fast.kernels.sde_step")
lp_module = importlib.import_module("densegrpo_fast.kernels.sde_log_prob")

BACKENDS = ["reference", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# B = 1, 3, 37; the SD3.5-M latent (16x64x64), an odd latent, a FLUX-packed row, a tail shorter than a block
SHAPES = [(3, 16, 64, 64), (1, 16, 64, 64), (37, 3, 5, 7), (3, 1024, 64), (4, 1, 33)]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("DENSEGRPO_KERNELS", request.param)
    return request.param


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer an op allocates starts as NaN, so an element the kernel forgets to write fails."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    for module in (step_module, lp_module, sm):  # sm: the per-row log-prob and KL of the Triton path
        monkeypatch.setattr(module, "empty", nan_empty)


def make_step(shape, dtype, seed=0, ode_rows=(), first_row_sigma_one=True, cps_eta=None):
    """Random latents and a per-row schedule: row 0 at sigma = 1 (the guard), ODE rows with std = 0. With
    ``cps_eta``, CPS's noise std of that eta, and the last row, where there are 3 or more, at the grid's end
    (sigma_next = 0)."""
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    x = torch.randn(shape, generator=g).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    noise = torch.randn(shape, generator=g).to(dtype)
    sigma = torch.rand(B, generator=g) * 0.85 + 0.1
    if first_row_sigma_one:
        sigma[0] = 1.0
    sigma_next = sigma * (0.6 + 0.35 * torch.rand(B, generator=g))
    if cps_eta is None:
        std = sde_std(sigma, 0.7, sigma_guard=0.95)
    else:
        if B >= 3:
            sigma_next[-1] = 0.0
        std = cps_std(sigma_next, cps_eta)
    for r in ode_rows:
        if r < B:
            std[r] = 0.0
    return x, v, noise, sigma, sigma_next, std


def f64(*ts):
    return [t.double() for t in ts]


def eager_step_same_dtype(x, v, noise, sigma, sigma_next, std):
    """Flow-GRPO-style eager step computed in the inputs' own dtype (the 'eager' of the tolerance rule)."""
    dt = (sigma_next - sigma).to(x.dtype).view(-1, *[1] * (x.dim() - 1))
    s = sigma.to(x.dtype).view_as(dt)
    sd = std.to(x.dtype).view_as(dt)
    mean = x * (1 + sd**2 / (2 * s) * dt) + v * (1 + sd**2 * (1 - s) / (2 * s)) * dt
    return mean + sd * torch.sqrt(-dt) * noise, x + v * dt


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sde_step_matches_float64(backend, poisoned, shape, dtype):
    x, v, noise, sigma, sigma_next, std = make_step(shape, dtype, ode_rows=(1, 5))
    out, log_prob, ode = sde_step(x, v, sigma, sigma_next, std, noise, write_ode=True)
    assert out.dtype == dtype and ode.dtype == dtype and log_prob.dtype == torch.float32
    assert out.shape == x.shape and log_prob.shape == (shape[0],)

    ref_out, _, ref_ode = sde_step_reference(*f64(x, v, sigma, sigma_next, std, noise), write_ode=True)
    eager_out, eager_ode = eager_step_same_dtype(x, v, noise, sigma, sigma_next, std)
    slack = interpreter_store_slack(backend, dtype)
    assert_close_by_rule(out, eager_out, ref_out, dtype, "next_sample", ulps=slack)
    assert_close_by_rule(ode, eager_ode, ref_ode, dtype, "ode_next", ulps=slack)

    # The log-prob is of the latent as stored: its float64 value at the stored `out`.
    ref_lp, _ = sde_log_prob_reference(*f64(x, v, out, sigma, sigma_next, std))
    eager_lp, _ = sde_log_prob_reference(x, v, out, sigma, sigma_next, std)  # fp32 eager
    assert_close_by_rule(log_prob, eager_lp, ref_lp, torch.float32, "log_prob")


@pytest.mark.parametrize("dtype", DTYPES)
def test_ode_rows_are_plain_euler_with_zero_log_prob(backend, dtype):
    x, v, noise, sigma, sigma_next, std = make_step((3, 4, 9, 9), dtype, ode_rows=(0, 1, 2))
    out, log_prob, ode = sde_step(x, v, sigma, sigma_next, std, noise, write_ode=True)
    assert torch.equal(log_prob, torch.zeros(3))
    # std = 0: the step is the Euler step, bit for bit the same as the completion's first step, so a
    # noise-free step leaves the dense reward unchanged (dR = 0 exactly).
    assert torch.equal(out, ode)
    euler = (x.double() + v.double() * (sigma_next - sigma).double().view(-1, 1, 1, 1)).to(dtype)
    assert max_err(out, euler) <= 2 * torch.finfo(dtype).eps * euler.abs().max().item()
    if dtype == torch.float32:  # the rollout's dtype: its completions step as `x + v * dt` in torch, and a
        # completion of lat[k] must equal that of lat[k + 1] after an ODE step (no fused multiply-add)
        assert torch.equal(ode, x + v * (sigma_next - sigma).view(-1, 1, 1, 1))


def test_sigma_one_guard():
    sigma = torch.tensor([1.0, 0.5])
    std = sde_std(sigma, 0.7, sigma_guard=0.9)
    assert torch.isfinite(std).all()
    assert std[0].item() == pytest.approx(0.7 * math.sqrt(1.0 / (1.0 - 0.9)), rel=1e-6)
    assert std[1].item() == pytest.approx(0.7 * math.sqrt(0.5 / 0.5), rel=1e-6)
    with pytest.raises(ValueError, match="sigma_guard"):
        sde_std(sigma, 0.7, sigma_guard=1.0)


def test_log_prob_is_the_gaussian_density():
    """Independent check of the formula: the per-element mean of torch.distributions.Normal.log_prob."""
    x, v, noise, sigma, sigma_next, std = f64(
        *make_step((2, 3, 4, 4), torch.float64, first_row_sigma_one=False)
    )
    out, lp, _ = sde_step_reference(x, v, sigma, sigma_next, std, noise)
    s, dt = sigma.view(-1, 1, 1, 1), (sigma_next - sigma).view(-1, 1, 1, 1)
    sd = std.view(-1, 1, 1, 1)
    mean = x * (1 + sd**2 / (2 * s) * dt) + v * (1 + sd**2 * (1 - s) / (2 * s)) * dt
    expected = torch.distributions.Normal(mean, sd * torch.sqrt(-dt)).log_prob(out).mean((1, 2, 3))
    torch.testing.assert_close(lp, expected, rtol=1e-12, atol=1e-12)


def test_kl_is_flow_grpos_and_kl_exact_the_gaussian_kl(backend):
    """Independent check of the KL (the float64 comparisons above run the reference against itself on the
    reference path): Flow-GRPO's mean over elements of (mean - mean_ref)^2 / (2 std^2), and with
    ``kl_exact`` torch.distributions' KL between the two step Gaussians (std sqrt(-dt) each)."""
    x, v, noise, sigma, sigma_next, std = make_step((3, 4, 8, 8), torch.float32, first_row_sigma_one=False)
    v_ref = v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(5))
    xn = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    _, kl = sde_log_prob(x, v, xn, sigma, sigma_next, std, ref_velocity=v_ref)
    _, kl_exact = sde_log_prob(x, v, xn, sigma, sigma_next, std, ref_velocity=v_ref, kl_exact=True)
    x, v, v_ref, sigma, sigma_next, std = f64(x, v, v_ref, sigma, sigma_next, std)
    s, dt, sd = sigma.view(-1, 1, 1, 1), (sigma_next - sigma).view(-1, 1, 1, 1), std.view(-1, 1, 1, 1)

    def mean(vel):
        return x * (1 + sd**2 / (2 * s) * dt) + vel * (1 + sd**2 * (1 - s) / (2 * s)) * dt

    flow_grpo = ((mean(v) - mean(v_ref)) ** 2).mean((1, 2, 3)) / (2 * std**2)
    ns = sd * torch.sqrt(-dt)
    gauss = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean(v), ns), torch.distributions.Normal(mean(v_ref), ns)
    ).mean((1, 2, 3))
    assert flow_grpo.min() > 0
    torch.testing.assert_close(kl.double(), flow_grpo, rtol=1e-4, atol=0)
    torch.testing.assert_close(kl_exact.double(), gauss, rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 16, 64, 64), (37, 3, 5, 7)])
def test_on_policy_ratio_is_one_bit_for_bit(backend, dtype, shape):
    x, v, noise, sigma, sigma_next, std = make_step(shape, dtype, ode_rows=(2,))
    out, log_prob, _ = sde_step(x, v, sigma, sigma_next, std, noise)
    again, _ = sde_log_prob(x, v, out, sigma, sigma_next, std)
    assert torch.equal(again, log_prob)
    # With a KL term (the loss of a beta > 0 run), the log-prob is the same floats.
    with_kl, _ = sde_log_prob(x, v, out, sigma, sigma_next, std, ref_velocity=noise)
    assert torch.equal(with_kl, log_prob)
    # A micro-batch of the rollout's rows reproduces them too (tiling never depends on the batch size).
    idx = torch.tensor([shape[0] - 1, 0])
    part, _ = sde_log_prob(x[idx], v[idx], out[idx], sigma[idx], sigma_next[idx], std[idx])
    assert torch.equal(part, log_prob[idx])
    assert torch.equal(torch.exp(again - log_prob), torch.ones_like(log_prob))


# (sample, velocity, noise, ref_velocity) dtypes a trainer may hand in: fp32 latents with a bf16 model's
# velocity, bf16 latents with an fp32 velocity, noise or a reference velocity narrower than both
MIXED = [
    (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16),
    (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32),
    (torch.float32, torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.bfloat16, torch.float16, torch.float16),
]


@pytest.mark.parametrize("dtypes", MIXED, ids=lambda d: "-".join(str(t).removeprefix("torch.") for t in d))
def test_on_policy_exactness_with_mixed_dtypes(backend, dtypes):
    x_dt, v_dt, noise_dt, ref_dt = dtypes
    x, v, noise, sigma, sigma_next, std = make_step((5, 3, 17, 9), torch.float32, ode_rows=(1,))
    x, v, noise = x.to(x_dt), v.to(v_dt), noise.to(noise_dt)
    out, log_prob, _ = sde_step(x, v, sigma, sigma_next, std, noise)
    assert out.dtype == x_dt
    again, _ = sde_log_prob(x, v, out, sigma, sigma_next, std)
    with_kl, kl = sde_log_prob(x, v, out, sigma, sigma_next, std, ref_velocity=(0.9 * v.float()).to(ref_dt))
    assert torch.equal(again, log_prob) and torch.equal(with_kl, log_prob) and kl[2:].gt(0).all()
    idx = torch.tensor([4, 0])
    part, _ = sde_log_prob(x[idx], v[idx], out[idx], sigma[idx], sigma_next[idx], std[idx])
    assert torch.equal(part, log_prob[idx])


@pytest.mark.parametrize("shape", [(4, 16, 128, 128), (4, 4096, 64)])  # SD3.5-M at 1024 px, FLUX at 1024
def test_a_micro_batch_of_one_row_reproduces_the_rollout_on_several_threads(monkeypatch, shape):
    """torch's CPU sum of a lone row of 32768 elements or more is split across threads, a batch's rows are
    not: the reference sums a row in the kernels' tiles, so one row alone gets the rollout's floats."""
    monkeypatch.setenv("DENSEGRPO_KERNELS", "reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, v, noise, sigma, sigma_next, std = make_step(shape, torch.float32)
        out, log_prob, _ = sde_step(x, v, sigma, sigma_next, std, noise)
        for r in range(shape[0]):
            one, _ = sde_log_prob(x[r : r + 1], v[r : r + 1], out[r : r + 1], sigma[r : r + 1],
                                  sigma_next[r : r + 1], std[r : r + 1])  # fmt: skip
            assert torch.equal(one, log_prob[r : r + 1]), r
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(3, 16, 64, 64), (37, 3, 5, 7), (4, 1, 33)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sde_log_prob_and_kl_match_float64(backend, poisoned, shape, dtype):
    x, v, noise, sigma, sigma_next, std = make_step(shape, dtype, ode_rows=(1,))
    xn = (x.float() + 0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(1))).to(dtype)
    v_ref = (v.float() + 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(2))).to(dtype)
    lp, kl = sde_log_prob(x, v, xn, sigma, sigma_next, std, ref_velocity=v_ref)
    ref_lp, ref_kl = sde_log_prob_reference(*f64(x, v, xn, sigma, sigma_next, std, v_ref))
    eager_lp, eager_kl = sde_log_prob_reference(x, v, xn, sigma, sigma_next, std, v_ref)
    assert_close_by_rule(lp, eager_lp, ref_lp, torch.float32, "log_prob")
    # KL is a small difference of nearly equal means: the rule's ATOL term is relative to its size
    assert_close_by_rule(kl, eager_kl, ref_kl, torch.float32, "kl")
    assert kl[1].item() == 0.0 and lp[1].item() == 0.0
    _, kl_exact = sde_log_prob(x, v, xn, sigma, sigma_next, std, ref_velocity=v_ref, kl_exact=True)
    torch.testing.assert_close(kl_exact, kl / (sigma - sigma_next), rtol=1e-6, atol=0)


@pytest.mark.parametrize("with_kl", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 16, 64, 64), (5, 3, 7, 5)])
def test_gradient_matches_autograd_through_reference(backend, poisoned, with_kl, dtype, shape):
    grad = gradient_against_autograd(backend, make_step(shape, dtype, ode_rows=(2,)), with_kl)
    assert torch.equal(grad[2], torch.zeros_like(grad[2]))  # ODE row: no gradient


def gradient_against_autograd(backend, step, with_kl: bool, cps: bool = False) -> torch.Tensor:
    """The fused backward's dL/dv of a weighted sum of log-probs (and KLs) against autograd through the
    reference, by the tolerance rule; returns the fused gradient."""
    x, v, noise, sigma, sigma_next, std = step
    shape, dtype = x.shape, x.dtype
    xn = (x.float() + 0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(3))).to(dtype)
    v_ref = (v.float() + 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(7))).to(dtype)
    v_ref = v_ref if with_kl else None
    g = torch.Generator().manual_seed(4)
    w_lp, w_kl = torch.randn(shape[0], generator=g), torch.randn(shape[0], generator=g)

    v_kernel = v.clone().requires_grad_(True)
    lp, kl = sde_log_prob(x, v_kernel, xn, sigma, sigma_next, std, ref_velocity=v_ref, cps=cps)
    ((lp * w_lp).sum() + ((kl * w_kl).sum() if with_kl else 0)).backward()
    assert v_kernel.grad.dtype == dtype

    def autograd_grad(vel, cast):
        vel = vel.detach().requires_grad_(True)
        args = [cast(t) for t in (x, vel, xn, sigma, sigma_next, std)] + [cast(v_ref) if with_kl else None]
        lp_r, kl_r = sde_log_prob_reference(*args, cps=cps)
        total = (lp_r * cast(w_lp)).sum() + ((kl_r * cast(w_kl)).sum() if with_kl else 0)
        (grad,) = torch.autograd.grad(total, vel)
        return grad

    ref = autograd_grad(v.double(), lambda t: t.double())
    # the spec's own precision, rounded to the gradient's dtype as the kernel's is (its error then holds that
    # final rounding: a bf16 gradient of 3e-5 carries ~1e-7 of it, beyond fp32's 1e-11)
    eager = autograd_grad(v.float(), lambda t: t.float()).to(dtype)
    slack = interpreter_store_slack(backend, dtype)  # (interpreted bf16 stores round toward zero)
    assert_close_by_rule(v_kernel.grad.float(), eager, ref, dtype, "dL/dv", ulps=slack)
    return v_kernel.grad


def test_gradient_flows_only_into_velocity():
    x, v, noise, sigma, sigma_next, std = make_step((2, 3, 4, 4), torch.float32)
    xs = x.clone().requires_grad_(True)
    vv = v.clone().requires_grad_(True)
    lp, _ = sde_log_prob(xs, vv, x + 0.1, sigma, sigma_next, std)
    lp.sum().backward()
    assert xs.grad is None and vv.grad is not None and vv.grad.abs().sum() > 0


def test_triton_and_reference_agree_closely(monkeypatch):
    """Both backends implement one spec: the same latents, log-probs that differ by the order of a sum."""
    x, v, noise, sigma, sigma_next, std = make_step((3, 16, 64, 64), torch.float32)
    results = {}
    for be in BACKENDS:
        monkeypatch.setenv("DENSEGRPO_KERNELS", be)
        results[be] = sde_step(x, v, sigma, sigma_next, std, noise, write_ode=True)
    # element-wise, in fp32, the kernel rounds each operation as the reference does: the same floats
    assert torch.equal(results["triton"][0], results["reference"][0])
    assert torch.equal(results["triton"][2], results["reference"][2])
    assert max_err(results["triton"][1], results["reference"][1]) <= 1e-5
    assert ATOL  # one table for the suite


def test_tiling_constants_do_not_depend_on_batch():
    # guard the promise that makes micro-batched recomputation exact
    assert sm.CHUNK % sm.BLOCK == 0


def test_a_row_of_more_chunks_than_a_grid_axis_holds_takes_several_launches(monkeypatch, poisoned):
    """CUDA caps a grid's second axis at 65535 programs (a row of 268 M elements in the forward, 67 M in the
    backward): longer rows launch again from the next chunk, with the same partial sums; and past
    FINISH_BLOCK partials (16 M elements) the finish adds them tile by tile. Caps of 3 programs and 2
    partials stand in for them here: every launch writes its share, the latents and gradients are the
    one-launch ones bit for bit, and the step's log-prob is still the recomputation's bit for bit."""
    monkeypatch.setenv("DENSEGRPO_KERNELS", "triton")
    x, v, noise, sigma, sigma_next, std = make_step((2, 5, 41, 101), torch.bfloat16, ode_rows=(1,))
    vref = (v.float() + 0.01).to(v.dtype)
    launches = []

    def run():
        out, lp, ode = sde_step(x, v, sigma, sigma_next, std, noise, write_ode=True)
        vv = v.clone().requires_grad_()
        lp2, kl = sde_log_prob(x, vv, out, sigma, sigma_next, std, ref_velocity=vref)
        (lp2 * torch.tensor([1.0, -2.0]) + 3 * kl).sum().backward()
        return out, lp, ode, lp2, kl, vv.grad

    one = run()
    assert sm.chunk_launches(6) == [(0, 6)]  # 20705 elements a row: 6 chunks, 21 tiles of the backward
    chunk_launches = sm.chunk_launches
    monkeypatch.setattr(sm, "MAX_GRID_Y", 3)
    monkeypatch.setattr(sm, "chunk_launches", lambda k: launches.append(k) or chunk_launches(k))
    assert chunk_launches(21) == [(0, 3), (3, 3), (6, 3), (9, 3), (12, 3), (15, 3), (18, 3)]
    several = run()
    assert launches == [6, 6, 21], "the step, the forward and the backward each launched in parts"
    for a, b in zip(one, several, strict=True):
        assert torch.equal(a, b)
    monkeypatch.setattr(sm, "FINISH_BLOCK", 2)  # 6 partials in 3 tiles: another order of addition
    tiled = run()
    for k in (0, 2, 5):  # the latents and the gradient (whose factors take no sum) are the same
        assert torch.equal(tiled[k], one[k])
    assert torch.equal(tiled[1], tiled[3]), "on-policy: the ratio is still 1"
    for k in (1, 3, 4):
        torch.testing.assert_close(tiled[k], one[k], rtol=1e-6, atol=0)


def test_the_finish_adds_every_tile_of_partials_and_masks_the_last(monkeypatch):
    """Past FINISH_BLOCK partials a row's are added tile by tile; a cap of 4 stands in for 4096: 6 partials
    make a full tile and a half one, whose masked lanes must not read the next row's."""
    monkeypatch.setenv("DENSEGRPO_KERNELS", "triton")
    monkeypatch.setattr(sm, "FINISH_BLOCK", 4)
    g = torch.Generator().manual_seed(0)
    sum_sq = torch.rand(3, 6, generator=g) * torch.tensor([[1.0], [100.0], [10_000.0]])
    sigma = torch.tensor([0.9, 0.6, 0.3])
    sigma_next, std = sigma - 0.1, sde_std(sigma, 0.7, sigma_guard=0.95)
    lp, kl = sm.finish_rows(sum_sq, 2 * sum_sq, 1000, sigma, sigma_next, std)
    want = sm.finish_log_prob(sum_sq.double().sum(1), 1000, sigma.double(), sigma_next.double(), std.double())
    torch.testing.assert_close(lp.double(), want, rtol=1e-6, atol=0)
    first_tile_only = sm.finish_log_prob(sum_sq[:, :4].double().sum(1), 1000, sigma.double(), sigma_next.double(),
                                         std.double())  # fmt: skip
    assert ((lp.double() - first_tile_only).abs() > 1e-3).all(), "the second tile counts"
    assert kl is not None and (kl > 0).all()
