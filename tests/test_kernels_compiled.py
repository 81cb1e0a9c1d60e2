"""The ops' Triton launches compiled for H100/H200 (sm_90) and A100 (sm_80) on the CPU, and their SASS read.

The interpreted tests check the kernels' arithmetic; these check what only the compiled code shows: that
every launch compiles, that each op's Triton path is its Triton launches alone (no torch op in it), that no
kernel spills, that the fp-fusion option reaches every launch, that no approximate division or square root
is left, and that at the real latent shapes every
latent element moves in a 128-bit access (the bandwidth-bound kernels' condition for nearing the copy
bandwidth). benchmarks/compiled_kernels.py does the compiling; it runs in a
subprocess because this process interprets the kernels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compiled_kernels.py"
ARCHS = (90, 80)
ALIGNED = ("[24, 16, 64, 64]", "[8, 4096, 64]")  # SD3.5-M at 512 px, FLUX.1 at 1024 px
ODD = "[3, 3, 5, 7]"  # 105 elements a row: rows start unaligned, no 16-byte access can tile them
MIXED = 4  # at SD3.5-M's shape, fp32 latents: the step with bf16 / fp16 noise, the forward with such a v_ref
CPS = 3 * 3  # at SD3.5-M's shape, 3 dtypes: the CPS step (write_ode), its forward with KL and backward
CALLS = (
    3 * 3 * 6 + MIXED + CPS + 8
)  # 3 shapes x 3 dtypes x 6 calls, the mixed and CPS calls, 8 advantage calls

# Per streaming kernel: (per-row scalars it reads, latent-sized tensors it reads, partial sums it writes,
# latent-sized tensors it writes); the second of each pair applies with the flag (WRITE_ODE or WITH_KL).
STREAMING = {
    "_sde_step_kernel": ("WRITE_ODE", (3, 3), (3, 3), (1, 1), (1, 2)),  # sigma, sigma_next, std; x, v, noise
    "_sde_log_prob_fwd_kernel": ("WITH_KL", (3, 3), (3, 4), (1, 2), (0, 0)),  # + v_ref; sum_sq (+ sum_dv2)
    "_sde_log_prob_bwd_kernel": ("WITH_KL", (4, 5), (3, 4), (0, 0), (1, 1)),  # + grad_lp (+ grad_kl); grad
}


def _narrow(widths: dict) -> int:
    return sum(n for bits, n in widths.items() if int(bits) < 128)


@pytest.fixture(scope="module")
def compiled() -> dict:
    triton = pytest.importorskip("triton", reason="compiling the kernels needs triton")
    try:
        from triton import knobs

        tool = knobs.nvidia.cuobjdump.path
    except Exception as e:  # noqa: BLE001 - any failure to find the NVIDIA backend means: cannot run here
        pytest.skip(f"triton {triton.__version__} has no NVIDIA backend tools here: {e}")
    if not tool or not Path(tool).exists():
        pytest.skip(f"triton {triton.__version__} ships no cuobjdump here")
    # Without Triton's fusion switches, so that a launch without LAUNCH shows (fusion on, and the warning).
    drop = ("TRITON_DEFAULT_FP_FUSION", "TRITON_FORCE_DISABLE_FP_FUSION")
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "TRITON_INTERPRET": "0"}
    cmd = [sys.executable, str(SCRIPT), "--json", "--arch", *map(str, ARCHS)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "TRITON_DEFAULT_FP_FUSION" not in done.stderr, "a launch left fp fusion to Triton's default"
    return json.loads(done.stdout)


@pytest.fixture
def launches(compiled) -> list[dict]:
    return compiled["launches"]


def test_every_op_call_compiles_its_launches_for_each_target(launches):
    by_case = defaultdict(list)
    for r in launches:
        by_case[r["arch"], r["case"]].append(r["kernel"])
    for arch in ARCHS:
        cases = {case: sorted(k) for (a, case), k in by_case.items() if a == arch}
        assert len(cases) == CALLS, sorted(cases)
        for case, kernels in cases.items():
            if case.startswith("sde_step"):
                expected = ["_finish_kernel", "_sde_step_kernel"]
            elif case.endswith("backward"):
                expected = ["_sde_log_prob_bwd_kernel"]
            elif case.startswith("sde_log_prob"):
                expected = ["_finish_kernel", "_sde_log_prob_fwd_kernel"]
            else:
                expected = ["_group_advantages_kernel"]
            assert kernels == expected, (arch, case)


def test_on_a_gpu_each_op_call_is_its_triton_launches_alone(compiled):
    """No torch op runs inside the ops' Triton paths: on a GPU each would be one more kernel launch of a few
    microseconds, where the whole step at SD3.5-M's B = 24 in bf16 moves 12.6 MB (~4 us at an H100's
    3.35 TB/s). The per-row finish (log-prob, KL) and the backward's per-row factors are computed in the
    kernels; before, the Triton paths ran 28 (step), 54 (forward with KL) and 32 (backward) torch ops."""
    expected = {"sde_step": 2, "sde_log_prob": 2, "backward": 1, "group_advantages": 1}
    assert len(compiled["calls"]) == len(ARCHS) * CALLS
    for call in compiled["calls"]:
        assert call["torch_ops"] == [], call
        kind = "backward" if call["case"].endswith("backward") else call["case"].split()[0]
        assert call["triton_launches"] == expected[kind], call


def test_no_launch_spills_pins_fp_fusion_off_or_approximates(launches):
    for r in launches:
        assert (r["stack"], r["local"]) == (0, 0), r
        assert r["fp_fusion"] is False, r  # kernels/_common.LAUNCH reaches every launch
        # Every division and square root is IEEE-rounded (div_rn, sqrt_rn), as in torch and the interpreter.
        assert r["approx_math"] == {}, r
        # No fused multiply-add on the latent stream: the interpreter (the CPU tests) has none, so only the
        # compiled code can show one (an ODE row's x + v * dt must round as the rollout's torch steps do).
        if r["kernel"] in STREAMING:
            assert r["fp32_fma"] == 0, r
        # At the real shapes (all but the control): at most 64 registers a thread, so 8 blocks of 128
        # threads (half the SM's warps) stay resident. (Unaligned rows unroll into scalar accesses.)
        if ODD not in r["case"]:
            assert r["registers"] <= 64, r


@pytest.mark.parametrize("shape", ALIGNED)
def test_at_the_real_shapes_every_latent_element_moves_in_128_bit_accesses(launches, shape):
    checked = 0
    for r in launches:
        if shape not in r["case"] or r["kernel"] not in STREAMING:
            continue
        flag, scalars, tensors, partials, outputs = STREAMING[r["kernel"]]
        on = int(bool(r["constexprs"].get(flag)))
        loads, stores = r["loads"], r["stores"]
        # Every narrow access is one of the kernel's per-row scalars or per-chunk partial sums ...
        assert _narrow(loads) == scalars[on], r
        assert _narrow(stores) == partials[on], r
        # ... and each latent-sized tensor is read (and written) in 128-bit accesses.
        assert loads.get("128", 0) >= tensors[on], r
        assert stores.get("128", 0) >= outputs[on], r
        checked += 1
    # 3 dtypes x (2 steps, 2 forwards, 2 backwards), and the mixed and CPS calls at SD3.5-M's shape
    assert checked == len(ARCHS) * (3 * 6 + (MIXED + CPS if shape == ALIGNED[0] else 0))


def test_the_step_and_its_recomputation_sum_a_row_in_one_order(launches):
    """On-policy exactness on a GPU: ``sde_log_prob`` on the rollout's own (x, v, x') must return the
    log-prob ``sde_step`` wrote bit for bit, so the two kernels' row sums must group their terms alike. Each
    thread adds the 16 bytes of the kernel's narrowest load (4 fp32 or 8 bf16 elements) before the
    cross-thread tree, so a narrower noise or v_ref than the latents would change the grouping of one of
    them (the ops widen such inputs first). Per arch, shape and latent dtype: one grouping for the step, the
    forward and the forward with KL."""
    groups = defaultdict(set)
    for r in launches:
        if r["kernel"] in ("_sde_step_kernel", "_sde_log_prob_fwd_kernel"):
            op, dtype, *rest = r["case"].split()
            shape = " ".join(rest).split("]")[0] + "]"
            groups[r["arch"], dtype, shape].add((r["reduce_per_thread"], r["case"]))
    assert len(groups) == len(ARCHS) * 3 * 3
    for key, seen in groups.items():
        assert len({n for n, _ in seen}) == 1, (key, sorted(seen))
        assert all(n >= 1 for n, _ in seen), (key, sorted(seen))
    fp32 = {n for n, case in groups[90, "fp32", ALIGNED[0]]}
    assert fp32 == {4}, fp32  # 16 bytes of fp32: the grouping the mixed calls must keep


def test_the_width_check_sees_unaligned_rows(launches):
    """The control: where rows cannot be tiled in 16 bytes, the same kernels fall back to narrow accesses."""
    odd = [r for r in launches if ODD in r["case"] and r["kernel"] in STREAMING]
    assert len(odd) == len(ARCHS) * 3 * 6
    for r in odd:
        assert "128" not in r["loads"] and "128" not in r["stores"], r
        _, scalars, *_ = STREAMING[r["kernel"]]
        assert _narrow(r["loads"]) > max(scalars), r
