"""The one tolerance table of the test suite, and the rule that uses it (flash-attention's).

An op is computed three ways: the implementation under test, eager PyTorch in the same precision, and a
float64 reference on the same inputs. The test asserts

    max|out - ref64| <= 2 * max|eager - ref64| + ATOL[dtype] * max|ref64|

so the bound follows PyTorch's own rounding error in that precision; ATOL, taken relative to the output's
scale (not floored at 1: a gradient of 1e-4 would then be allowed errors of ATOL itself, its own size in
bf16), only absorbs the case where the eager error happens to be small by luck (a log-prob of -88 summed
over 105 elements carries ~3 ulps of fp32 error on any summation order; eager may land within 0.4). For
outputs that the spec computes in fp32 whatever the input dtype (log-probs, KL, advantages), "the same
precision" is fp32; an output cast to the input dtype at the end (the velocity's gradient) compares with
fp32 eager cast the same way.
"""

import math
import os

import torch

ATOL = {
    torch.float32: 1e-6,
    torch.float16: 1e-4,
    torch.bfloat16: 1e-3,
}


def interpreter_store_slack(backend: str, dtype: torch.dtype) -> int:
    """ULPs to add for a latent stored by the *interpreted* Triton path: its bf16 stores round toward zero
    (up to 1 ulp) where compiled Triton and PyTorch round to nearest. 0 everywhere else."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return 1 if (backend == "triton" and interpreted and dtype == torch.bfloat16) else 0


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_close_by_rule(out, eager, ref64, dtype, what="", ulps=0):
    """``out`` and ``eager`` against ``ref64`` by the rule above; NaN anywhere fails. ``ulps`` widens the
    bound by that many units in the last place of ``dtype`` at the largest |ref64| (see
    :func:`interpreter_store_slack`)."""
    assert not torch.isnan(out).any(), f"{what}: NaN in output (an element left unwritten?)"
    err, err_eager = max_err(out, ref64), max_err(eager, ref64)
    ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(max(ref64.abs().max().item(), 1e-30)))
    scale = ref64.abs().max().item()
    bound = 2 * err_eager + ATOL[dtype] * scale + ulps * ulp
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (eager {err_eager:.3e}, {dtype})"


def assert_on_policy(record: dict, exact: bool = True) -> None:
    """The update's on-policy check in a metrics record. Where the update used the rollout's own log-probs,
    its first ratio is 1: ``ratio_dev_first`` 0 (``exact``) or within 1e-5. Where it recomputed them
    (bf16 / compiled / merged / autocast rollouts; ``ratio_dev_first`` None, as the ratio is 1 by
    construction), the rollout's log-probs lie within the trainer's limit of the recomputed ones."""
    from densegrpo_fast.trainer import ROLLOUT_LP_DEV_LIMIT

    dev = record["ratio_dev_first"]
    if dev is not None:
        assert dev == 0.0 if exact else dev <= 1e-5, record
    else:
        assert record["rollout_lp_dev"] < ROLLOUT_LP_DEV_LIMIT, record
