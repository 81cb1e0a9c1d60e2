"""sde_step and sde_log_prob with ``cps=True`` (coefficients-preserving sampling, Wang & Yu 2025), on both
backends against a float64 reference and against the CPS paper's own form of the step
(densegrpo_fast/ALGORITHM.md §2)."""

import math

import pytest
import torch
from test_kernels_sde import (  # noqa: F401 - backend, poisoned: fixtures
    BACKENDS,
    DTYPES,
    backend,
    f64,
    gradient_against_autograd,
    make_step,
    poisoned,
)
from tolerances import assert_close_by_rule, interpreter_store_slack, max_err

from densegrpo_fast.kernels import cps_std, sde_log_prob, sde_log_prob_reference, sde_step, sde_step_reference

SHAPES = [(3, 16, 64, 64), (1, 16, 64, 64), (37, 3, 5, 7), (3, 1024, 64), (4, 1, 33)]


def make_cps_step(shape, dtype, seed=0, ode_rows=(), eta=0.7):
    """:func:`make_step` with CPS's noise std of ``eta`` (the last row of 3 or more at the grid's end)."""
    return make_step(shape, dtype, seed=seed, ode_rows=ode_rows, cps_eta=eta)


def paper_mean(x, v, sigma, sigma_next, std):
    """The CPS paper's form: the predicted clean image and noise, recombined at sigma_next with the noise
    share that the fresh noise leaves."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    s, sn, sd = (t.view(shape) for t in (sigma, sigma_next, std))
    x0, x1 = x - s * v, x + (1 - s) * v
    return (1 - sn) * x0 + torch.sqrt(sn * sn - sd * sd) * x1


def eager_cps_same_dtype(x, v, noise, sigma, sigma_next, std):
    """The paper's form computed in the inputs' own dtype (the 'eager' of the tolerance rule)."""
    cast = [t.to(x.dtype) for t in (sigma, sigma_next, std)]
    sd = cast[2].view((-1,) + (1,) * (x.dim() - 1))
    return paper_mean(x, v, *cast) + sd * noise


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cps_step_matches_float64(backend, poisoned, shape, dtype):  # noqa: F811
    x, v, noise, sigma, sigma_next, std = make_cps_step(shape, dtype, ode_rows=(1, 5))
    out, log_prob, ode = sde_step(x, v, sigma, sigma_next, std, noise, write_ode=True, cps=True)
    assert out.dtype == dtype and ode.dtype == dtype and log_prob.dtype == torch.float32
    ref_out, _, ref_ode = sde_step_reference(
        *f64(x, v, sigma, sigma_next, std, noise), write_ode=True, cps=True
    )
    eager_out = eager_cps_same_dtype(x, v, noise, sigma, sigma_next, std)
    eager_ode = x + v * (sigma_next - sigma).to(dtype).view((-1,) + (1,) * (x.dim() - 1))
    slack = interpreter_store_slack(backend, dtype)
    assert_close_by_rule(out, eager_out, ref_out, dtype, "next_sample", ulps=slack)
    assert_close_by_rule(ode, eager_ode, ref_ode, dtype, "ode_next", ulps=slack)
    ref_lp, _ = sde_log_prob_reference(*f64(x, v, out, sigma, sigma_next, std), cps=True)
    eager_lp, _ = sde_log_prob_reference(x, v, out, sigma, sigma_next, std, cps=True)
    assert_close_by_rule(log_prob, eager_lp, ref_lp, torch.float32, "log_prob")


def test_the_step_is_the_papers_and_the_log_prob_its_gaussian():
    """Independent of the kernels' ``cx, cv`` form: the paper's x0 / x1 recombination, and the per-element
    mean of torch.distributions.Normal.log_prob with the noise std itself."""
    x, v, noise, sigma, sigma_next, std = f64(*make_cps_step((4, 3, 4, 4), torch.float64))
    out, lp, _ = sde_step_reference(x, v, sigma, sigma_next, std, noise, cps=True)
    mean = paper_mean(x, v, sigma, sigma_next, std)
    sd = std.view(-1, 1, 1, 1)
    torch.testing.assert_close(out, mean + sd * noise, rtol=0, atol=1e-14)
    sde = std > 0  # the last row ends the grid: no noise, log-prob 0
    assert sde.tolist() == [True, True, True, False] and lp[3] == 0
    expected = torch.distributions.Normal(mean[sde], sd[sde]).log_prob(out[sde]).mean((1, 2, 3))
    torch.testing.assert_close(lp[sde], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [0.3, 0.7, 1.0])
def test_the_next_latent_keeps_the_flows_coefficients(eta):
    """The property the sampler is named for: with the true velocity, ``x = (1 - s) x0 + s eps`` steps to
    ``(1 - s') x0 + s' eps'`` with ``eps'`` of unit variance, for any eta (Flow-GRPO's SDE adds more noise
    than that). Checked on 2^20 elements per row."""
    g = torch.Generator().manual_seed(3)
    shape = (3, 1 << 20)
    x0, eps, fresh = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor([1.0, 0.6, 0.3], dtype=torch.float64)
    sigma_next = torch.tensor([0.8, 0.4, 0.1], dtype=torch.float64)
    x = (1 - sigma.view(-1, 1)) * x0 + sigma.view(-1, 1) * eps
    out, _, _ = sde_step_reference(x, eps - x0, sigma, sigma_next, cps_std(sigma_next, eta), fresh, cps=True)
    noise_part = (out - (1 - sigma_next.view(-1, 1)) * x0) / sigma_next.view(-1, 1)
    torch.testing.assert_close(noise_part.std(1), torch.ones(3, dtype=torch.float64), rtol=3e-3, atol=0)
    # eta sets the share of fresh noise: its correlation with the fresh draw is sin(eta pi / 2)
    corr = (noise_part * fresh).mean(1)
    torch.testing.assert_close(corr, torch.full((3,), math.sin(eta * math.pi / 2), dtype=torch.float64),
                               rtol=0, atol=4e-3)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_ode_rows_are_plain_euler_with_zero_log_prob(backend, dtype):  # noqa: F811
    x, v, noise, sigma, sigma_next, std = make_cps_step((37, 4, 9, 9), dtype, ode_rows=range(36))
    assert std[36] == 0  # (the grid's last step: no noise under CPS)
    out, log_prob, ode = sde_step(x, v, sigma, sigma_next, std, noise, write_ode=True, cps=True)
    assert torch.equal(log_prob, torch.zeros(37))
    # the Euler step itself, not the CPS coefficients at std 0 (equal in exact arithmetic, in fp32 they
    # miss dt in the last bit on about one row in five)
    assert torch.equal(out, ode)
    if dtype == torch.float32:
        assert torch.equal(ode, x + v * (sigma_next - sigma).view(-1, 1, 1, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 16, 64, 64), (37, 3, 5, 7)])
def test_on_policy_ratio_is_one_bit_for_bit(backend, dtype, shape):  # noqa: F811
    x, v, noise, sigma, sigma_next, std = make_cps_step(shape, dtype, ode_rows=(1,))
    out, log_prob, _ = sde_step(x, v, sigma, sigma_next, std, noise, cps=True)
    again, _ = sde_log_prob(x, v, out, sigma, sigma_next, std, cps=True)
    with_kl, _ = sde_log_prob(x, v, out, sigma, sigma_next, std, ref_velocity=noise, cps=True)
    assert torch.equal(again, log_prob) and torch.equal(with_kl, log_prob)
    idx = torch.tensor([shape[0] - 1, 0])
    part, _ = sde_log_prob(x[idx], v[idx], out[idx], sigma[idx], sigma_next[idx], std[idx], cps=True)
    assert torch.equal(part, log_prob[idx])
    # and the same step read as Flow-GRPO's would not give it (the flag reaches the recomputation)
    other, _ = sde_log_prob(x, v, out, sigma.clamp(max=0.99), sigma_next, std)
    assert not torch.equal(other, log_prob)


@pytest.mark.parametrize("shape", [(3, 16, 64, 64), (37, 3, 5, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_log_prob_and_kl_match_float64_and_the_kl_is_the_exact_one(backend, poisoned, shape, dtype):  # noqa: F811
    x, v, noise, sigma, sigma_next, std = make_cps_step(shape, dtype, ode_rows=(1,))
    xn = (x.float() + 0.3 * torch.randn(shape, generator=torch.Generator().manual_seed(1))).to(dtype)
    v_ref = (v.float() + 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(2))).to(dtype)
    lp, kl = sde_log_prob(x, v, xn, sigma, sigma_next, std, ref_velocity=v_ref, cps=True)
    ref_lp, ref_kl = sde_log_prob_reference(*f64(x, v, xn, sigma, sigma_next, std, v_ref), cps=True)
    eager_lp, eager_kl = sde_log_prob_reference(x, v, xn, sigma, sigma_next, std, v_ref, cps=True)
    assert_close_by_rule(lp, eager_lp, ref_lp, torch.float32, "log_prob")
    assert_close_by_rule(kl, eager_kl, ref_kl, torch.float32, "kl")
    assert kl[1] == 0 and lp[1] == 0 and kl[-1] == 0  # an ODE row; the grid's last step
    # the exact Gaussian KL between the two steps (noise std `std` each), whatever kl_exact says
    _, kl_exact = sde_log_prob(x, v, xn, sigma, sigma_next, std, ref_velocity=v_ref, kl_exact=True, cps=True)
    assert torch.equal(kl_exact, kl)
    d = f64(x, v, v_ref, sigma, sigma_next, std)
    live = d[5] > 0
    sd = d[5].view((-1,) + (1,) * (x.dim() - 1))
    gauss = torch.distributions.kl_divergence(
        torch.distributions.Normal(paper_mean(d[0], d[1], *d[3:])[live], sd[live]),
        torch.distributions.Normal(paper_mean(d[0], d[2], *d[3:])[live], sd[live]),
    ).flatten(1).mean(1)  # fmt: skip
    torch.testing.assert_close(ref_kl[live], gauss, rtol=1e-9, atol=0)


@pytest.mark.parametrize("with_kl", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_matches_autograd_through_reference(backend, poisoned, with_kl, dtype):  # noqa: F811
    step = make_cps_step((5, 3, 7, 5), dtype, ode_rows=(2,))
    grad = gradient_against_autograd(backend, step, with_kl, cps=True)
    assert torch.equal(grad[2], torch.zeros_like(grad[2]))  # ODE row
    assert torch.equal(grad[4], torch.zeros_like(grad[4]))  # the grid's last step


def test_triton_and_reference_compute_the_same_latents(monkeypatch):
    x, v, noise, sigma, sigma_next, std = make_cps_step((3, 16, 64, 64), torch.float32)
    results = {}
    for be in BACKENDS:
        monkeypatch.setenv("DENSEGRPO_KERNELS", be)
        results[be] = sde_step(x, v, sigma, sigma_next, std, noise, write_ode=True, cps=True)
    assert torch.equal(results["triton"][0], results["reference"][0])
    assert torch.equal(results["triton"][2], results["reference"][2])
    assert max_err(results["triton"][1], results["reference"][1]) <= 1e-5


def test_bad_input_is_refused_with_the_rule():
    x, v, noise, sigma, sigma_next, std = make_cps_step((3, 2, 4), torch.float32)
    too_much = std.clone()
    too_much[1] = sigma_next[1] * 1.01
    with pytest.raises(ValueError, match=r"under cps, std .* must satisfy std <= sigma_next.*cps_std"):
        sde_step(x, v, sigma, sigma_next, too_much, noise, cps=True)
    with pytest.raises(ValueError, match=r"std <= sigma_next"):
        sde_log_prob(x, v, x, sigma, sigma_next, too_much, cps=True)
    for eta in (1.2, -0.1, torch.tensor([0.5, 1.5])):
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\] under CPS"):
            cps_std(sigma_next[:2], eta)
    assert torch.equal(cps_std(sigma_next, 1.0), sigma_next)  # eta 1: all of the next latent's noise fresh
