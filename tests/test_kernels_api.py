"""The kernels' public surface: argument checks, backend choice, torch.library registration, compile."""

import pytest
import torch

from densegrpo_fast.kernels import group_advantages, sde_log_prob, sde_std, sde_step


def step_args(B=3, shape=(4, 5, 5)):
    x = torch.randn(B, *shape)
    sigma = torch.linspace(1.0, 0.4, B)
    sigma_next = sigma - 0.1
    return dict(
        sample=x,
        velocity=torch.randn_like(x),
        sigma=sigma,
        sigma_next=sigma_next,
        std=sde_std(sigma, 0.7, sigma_guard=0.9),
        noise=torch.randn_like(x),
    )


BAD_STEP = [
    ("velocity", lambda a: torch.randn(3, 4, 5, 6), r"velocity has shape \(3, 4, 5, 6\) but sample has"),
    ("velocity", lambda a: torch.randn(2, 4, 5, 5), "velocity has shape"),
    ("sample", lambda a: a["sample"].to(torch.int32), "sample has dtype torch.int32"),
    ("sigma", lambda a: a["sigma"].double(), "sigma has dtype torch.float64: .*float32"),
    ("sigma", lambda a: a["sigma"][:2], r"sigma has shape \(2,\): it must be \[B\] = \[3\]"),
    ("sigma", lambda a: 0.5, "sigma must be a float32 tensor of shape"),
    ("std", lambda a: torch.tensor([0.1, -0.2, 0.3]), "std must be finite and >= 0"),
    ("sigma_next", lambda a: a["sigma"] + 0.01, "sigma_next must satisfy 0 <= sigma_next < sigma"),
    ("sigma", lambda a: torch.tensor([1.5, 0.9, 0.5]), r"sigma must lie in \(0, 1\]"),
    ("noise", lambda a: torch.randn(3, 4, 5, 5, device="meta"), "noise is on meta but sample is on cpu"),
    ("sample", lambda a: torch.zeros(0, 4), "B >= 1"),
    ("sample", lambda a: torch.zeros(3), r"a batch of scalars is \[B, 1\]"),
    ("sigma", lambda a: torch.tensor(0.5), r"torch.full\(\(3,\), value\)"),
]


@pytest.mark.parametrize("name,make,match", BAD_STEP)
def test_sde_step_bad_input_names_argument_rule_and_fix(name, make, match):
    args = step_args()
    args[name] = make(args)
    with pytest.raises(ValueError, match=match):
        sde_step(**args)


def test_sde_log_prob_bad_input():
    a = step_args()
    with pytest.raises(ValueError, match="next_sample has shape"):
        sde_log_prob(a["sample"], a["velocity"], a["sample"][:, :2], a["sigma"], a["sigma_next"], a["std"])
    with pytest.raises(ValueError, match="ref_velocity has dtype"):
        sde_log_prob(
            a["sample"], a["velocity"], a["sample"], a["sigma"], a["sigma_next"], a["std"],
            ref_velocity=a["velocity"].to(torch.int8),
        )  # fmt: skip
    with pytest.raises(ValueError, match="ref_velocity must be a torch.Tensor, got float"):
        sde_log_prob(
            a["sample"], a["velocity"], a["sample"], a["sigma"], a["sigma_next"], a["std"], ref_velocity=1.0
        )


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_negative_std_past_the_checks_gives_nan_not_a_silent_zero(backend, monkeypatch):
    """On CUDA the value checks are off by default (a host read): a negative std that reaches the op must
    show as NaN, not be taken for an ODE row with log-prob 0 (its step got noise all the same)."""
    monkeypatch.setenv("DENSEGRPO_KERNELS", backend)
    a = step_args()
    std = a["std"].clone()
    std[0] = -0.5
    args = (a["sample"], a["velocity"], a["sample"], a["sigma"], a["sigma_next"])
    log_prob, _ = torch.ops.densegrpo.sde_log_prob(*args, std, None)  # (the op itself: no checks)
    assert log_prob[0].isnan() and log_prob[1:].isfinite().all()


def test_what_an_external_trainer_may_hand_in():
    """Rollout data made under torch.inference_mode, schedule values and rewards that carry gradients, a
    numpy group size: accepted, and gradients reach the velocity only."""
    import numpy as np

    a = step_args()
    with torch.inference_mode():
        x_next, lp_roll, _ = sde_step(**a)
        stored, v_ref = x_next.clone(), a["velocity"] + 0.1
    v = a["velocity"].clone().requires_grad_()
    lp, kl = sde_log_prob(a["sample"], v, stored, a["sigma"], a["sigma_next"], a["std"], ref_velocity=v_ref)
    (lp.sum() + kl.sum()).backward()
    assert torch.equal(lp.detach(), lp_roll) and v.grad is not None and torch.isfinite(v.grad).all()
    level = torch.tensor(0.7, requires_grad=True)  # (a learned noise level, say)
    std = sde_std(a["sigma"], level, sigma_guard=0.9)
    out, lp2, _ = sde_step(**dict(a, std=std))
    assert not out.requires_grad and not lp2.requires_grad  # the rollout is data, not a graph
    r = torch.randn(4, 2, requires_grad=True)
    adv = group_advantages(r, np.int64(2))
    assert not adv.requires_grad and torch.equal(adv, group_advantages(r.detach(), 2))
    half = group_advantages(r.detach(), 2, mask=torch.tensor([1.0, 0.5, 256.0, 0.0]))
    torch.testing.assert_close(half[:2], group_advantages(r.detach()[:2], 2))  # 0.5 and 256 are live rows
    with pytest.raises(ValueError, match=r"group_size \(True\) must be"):
        group_advantages(r, True)
    with pytest.raises(ValueError, match="kl_exact=True needs ref_velocity"):
        sde_log_prob(a["sample"], v, stored, a["sigma"], a["sigma_next"], a["std"], kl_exact=True)
    with pytest.raises(ValueError, match=r"noise_level \(-0.1\) must be >= 0"):
        sde_std(a["sigma"], -0.1, sigma_guard=0.9)


def test_non_contiguous_inputs_are_accepted():
    a = step_args(B=3, shape=(6, 4))
    a_t = dict(a, sample=a["sample"].transpose(1, 2).contiguous().transpose(1, 2))
    assert not a_t["sample"].is_contiguous()
    out, lp, _ = sde_step(**a_t)
    out_c, lp_c, _ = sde_step(**a)
    assert torch.equal(out, out_c) and torch.equal(lp, lp_c)


def test_backend_env_var(monkeypatch):
    a = step_args()
    monkeypatch.setenv("DENSEGRPO_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="DENSEGRPO_KERNELS='cuda-please'.*auto, triton, reference"):
        sde_step(**a)
    monkeypatch.setenv("DENSEGRPO_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sde_step(**a)


def test_auto_picks_reference_on_cpu(monkeypatch):
    from densegrpo_fast.kernels._common import backend_for

    monkeypatch.delenv("DENSEGRPO_KERNELS", raising=False)
    assert backend_for(torch.zeros(1)) == "reference"


def test_ops_are_registered_under_densegrpo_namespace():
    for name in ("sde_step", "sde_log_prob", "sde_log_prob_backward", "group_advantages"):
        assert hasattr(torch.ops.densegrpo, name), name


def test_opcheck():
    """torch.library's own consistency checks: schema, fake impl, autograd registration."""
    a = step_args(B=2, shape=(3, 4))
    torch.library.opcheck(
        torch.ops.densegrpo.sde_step.default,
        (a["sample"], a["velocity"], a["sigma"], a["sigma_next"], a["std"], a["noise"], True),
    )
    v = a["velocity"].clone().requires_grad_(True)
    torch.library.opcheck(
        torch.ops.densegrpo.sde_log_prob.default,
        (a["sample"], v, a["noise"], a["sigma"], a["sigma_next"], a["std"], a["velocity"] + 0.1),
    )
    torch.library.opcheck(  # and the CPS step (std 0.05 <= sigma_next)
        torch.ops.densegrpo.sde_step.default,
        (
            a["sample"],
            a["velocity"],
            a["sigma"],
            a["sigma_next"],
            a["std"] * 0 + 0.05,
            a["noise"],
            True,
            True,
        ),
    )
    torch.library.opcheck(
        torch.ops.densegrpo.sde_log_prob.default,
        (a["sample"], v, a["noise"], a["sigma"], a["sigma_next"], a["std"] * 0 + 0.05, a["velocity"], True),
    )
    torch.library.opcheck(
        torch.ops.densegrpo.group_advantages.default, (torch.randn(8, 3), 4, 1e-4, 5.0, None, False)
    )


def test_torch_compile_fullgraph_traces_the_ops():
    a = step_args(B=4, shape=(3, 8))
    rewards = torch.randn(4, 2)

    def one_step_and_loss(sample, velocity, sigma, sigma_next, std, noise, rewards):
        nxt, lp_old, _ = sde_step(sample, velocity, sigma, sigma_next, std, noise)
        lp, kl = sde_log_prob(
            sample, velocity, nxt, sigma, sigma_next, std, ref_velocity=velocity.detach() * 0.9
        )
        adv = group_advantages(rewards, 2)[:, 0]
        ratio = torch.exp(lp - lp_old)
        return (-adv * ratio).mean() + 0.04 * kl.mean()

    eager_v = a["velocity"].clone().requires_grad_(True)
    eager = one_step_and_loss(**dict(a, velocity=eager_v), rewards=rewards)
    eager.backward()
    compiled = torch.compile(one_step_and_loss, fullgraph=True, backend="aot_eager")
    comp_v = a["velocity"].clone().requires_grad_(True)
    loss = compiled(**dict(a, velocity=comp_v), rewards=rewards)
    loss.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(comp_v.grad, eager_v.grad)


def test_the_readme_snippet_runs_as_written():
    """README's "Use the kernels in your trainer" block, run whole: it must stay self-contained."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    start = text.index("```python\n", text.index("## Use the kernels in your trainer")) + len("```python\n")
    exec(compile(text[start : text.index("```", start)], "README.md", "exec"), {})
