"""Reward-aware exploration calibration (DenseGRPO §4.2, Algorithm 1; ALGORITHM.md §5).

Before training, with the pretrained policy: sample N trajectories with the current per-step noise level
``psi``, compute every step reward ``dR_k``, and for each step move ``psi_k`` up by ``eps2`` when gains and
losses are balanced (``|#(dR_k > 0) - #(dR_k < 0)| < eps1``) and down by ``eps2`` otherwise; K rounds.
``dR_k == 0`` counts on neither side. psi is a multiplier of ``sqrt(s / (1 - s))`` (the same scale as
Flow-GRPO's ``a``), clamped to ``[psi_min, psi_max]``; steps outside an SDE window stay at 0. Under CPS
(``noise.sde=cps``) psi is eta, the noise std ``sigma_{k+1} sin(psi_k pi / 2)``, and at most 1; the grid's
last step, noise-free at any eta, is not calibrated and keeps ``noise.level`` in the table.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from densegrpo_fast import distributed
from densegrpo_fast.checkpoint import write_text_atomic
from densegrpo_fast.dense import latent_rewards, step_rewards
from densegrpo_fast.rewards.pairwise import pointwise_spec, pointwise_view
from densegrpo_fast.rollout import initial_noise, sample
from densegrpo_fast.schedule import Schedule, make_schedule, sampler_grid


def calibration_step(
    psi: torch.Tensor,
    dR: torch.Tensor,
    eps1: float,
    eps2: float,
    psi_min: float,
    psi_max: float,
    active: torch.Tensor,
) -> torch.Tensor:
    """One round of Algorithm 1. Shapes: psi [T], dR [N, T], active bool [T] -> psi [T]."""
    pos, neg = balance_counts(dR)
    balanced = (pos - neg).abs() < eps1
    new = torch.where(balanced, psi + eps2, psi - eps2).clamp(psi_min, psi_max)
    # fp32 steps of eps2 drift (0.7 - 70 x 0.01 is 3.7e-7, not 0): a psi within half a step of a bound is
    # the bound, so a step driven to psi_min = 0 is noise-free and not a step with a vanishing std whose
    # log-prob is rounding noise
    for bound in (psi_min, psi_max):
        new = torch.where((new - bound).abs() < eps2 / 2, torch.full_like(new, bound), new)
    return torch.where(active, new, psi)


def balance_counts(dR: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gains and losses per step: ``#(dR_k > 0)`` and ``#(dR_k < 0)``, int64 [T] each (``dR`` [N, T])."""
    return (dR > 0).sum(0), (dR < 0).sum(0)


def balance_note(gains: list[list[int]], losses: list[list[int]], eps1: float, steps: list[int], rows: int):
    """A note when Algorithm 1's balance test was met in under a tenth of the rounds of the calibrated
    ``steps``: psi then only fell, whatever the reward does. For a reward whose dR is rarely exactly 0 (every
    continuous one), ``#gains - #losses`` over ``rows`` rows varies by about sqrt(rows) by chance alone, so
    ``eps1 = 2`` (the paper's) is met by chance only at a few dozen rows (e.g. 2 % of the rounds at 1152 rows,
    the SD3.5 recipes' batch). None when the test was met often enough."""
    moves = [abs(g[k] - loss[k]) < eps1 for g, loss in zip(gains, losses, strict=True) for k in steps]
    if len(gains) < 5 or not moves or sum(moves) >= 0.1 * len(moves):
        return None
    return (
        f"calibration: gains and losses balanced (|#gains - #losses| < eps1 = {eps1:g}) in {sum(moves)} of "
        f"{len(moves)} step-rounds, so psi fell in almost every round. With {rows} rows per round, chance alone "
        f"makes |#gains - #losses| about sqrt({rows}) = {rows**0.5:.0f} for a reward whose dR is rarely 0: "
        "eps1 = 2 suits a few dozen rows. Consider fewer rows per round (noise.calibration.prompts) or a larger "
        "noise.calibration.eps1; psi.png shows the rounds"
    )


def save_psi(path: Path, psi: torch.Tensor, trajectory: list[list[float]], meta: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps({"psi": psi.tolist(), "trajectory": trajectory, **meta}, indent=1))


def load_psi(path: Path, num_steps: int) -> tuple[torch.Tensor, list[int], dict]:
    """The psi table at ``path``, the steps its calibration covered (older tables, which do not record
    them: the steps with noise), and the whole record (its settings)."""
    data = json.loads(Path(path).read_text())
    psi = torch.tensor(data["psi"], dtype=torch.float32)
    if psi.shape != (num_steps,):
        raise ValueError(
            f"psi table {path} has {psi.numel()} steps but sampling.num_steps={num_steps}: calibrate again for "
            "this grid (delete the file, or point noise.calibration.path elsewhere)"
        )
    covered = data.get("calibrated_steps", psi.nonzero().flatten().tolist())
    return psi, [int(k) for k in covered], data


def plot_psi(path: Path, trajectory: list[list[float]], schedule: Schedule) -> None:
    """psi per step over the rounds, the calibrated psi against the initial one, and the SDE coefficient
    ``std_k`` (the absolute noise scale; under CPS the noise std) each gives on ``schedule``'s grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traj = torch.tensor(trajectory)
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for k in range(traj.shape[1]):
        axes[0].plot(traj[:, k], label=f"k={k}")
    axes[0].set(xlabel="calibration round", ylabel="psi_k", title="psi per step during calibration")
    axes[0].legend(fontsize=6, ncol=2)
    s = schedule.sigmas[:-1]
    axes[1].plot(range(len(s)), traj[-1], "o-", label="psi_k (calibrated)")
    axes[1].plot(range(len(s)), traj[0], "--", label="initial (uniform)")
    axes[1].set(xlabel="step k", ylabel="psi", title="calibrated noise level")
    axes[1].legend(fontsize=7)
    axes[2].plot(range(len(s)), schedule.with_noise(traj[-1]).std, "o-", label="calibrated")
    axes[2].plot(range(len(s)), schedule.with_noise(traj[0]).std, "--", label="initial (uniform)")
    if schedule.cps:
        axes[2].set(xlabel="step k", ylabel="std_k = s' sin(psi_k pi / 2)", title="CPS noise std")
    else:
        axes[2].set(xlabel="step k", ylabel="std_k = psi_k sqrt(s/(1-s))", title="SDE coefficient")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _second_init(cfg):
    from densegrpo_fast.lora_init import second_lora

    return second_lora(cfg.lora.init, cfg.lora.init_2) if cfg.lora.enabled else None


def calibrated_for(cfg) -> dict:
    """What Algorithm 1 balanced the gains and losses of, beyond the grid, SDE and steps a run checks: the
    policy it sampled (model, its dtype and resolution, warm start), its guidance and the reward (without the
    settings that say only how a reward is reached or batched, at any depth). Paths resolved, so that two
    spellings of one file agree."""
    from densegrpo_fast.config import resolution_record
    from densegrpo_fast.evaluate import resolved_path, scoring_kwargs
    from densegrpo_fast.policies import negative_prompt_of

    # (a pairwise reward is calibrated on its pointwise view: it records that one)
    reward = cfg.reward.model_dump(mode="json")
    reward = pointwise_spec(reward["name"], reward["kwargs"]) or reward
    return {
        "family": cfg.model.family,
        "model": resolved_path(cfg.model.checkpoint),
        "dtype": cfg.model.dtype,
        "resolution": resolution_record(cfg.model.resolution),
        "lora_init": resolved_path(cfg.lora.init) if cfg.lora.enabled else None,
        # (Wan 2.2 A14B's low-noise expert's, given apart or in lora.init's transformer_2/: older tables, without
        # it, stay valid)
        **({"lora_init_2": resolved_path(str(second))} if (second := _second_init(cfg)) is not None else {}),
        "guidance_scale": cfg.sampling.guidance_scale,
        # (Wan 2.2 A14B's low-noise expert's, where it takes effect: older tables, without it, stay valid)
        **(
            {"guidance_scale_2": second}
            if (second := cfg.model.guidance_scale_2) is not None and cfg.sampling.guidance_scale != 1
            else {}
        ),
        # (CFG's negative prompt, where CFG is on: an older table, without it, took the family's)
        **(
            {"negative_prompt": negative}
            if (negative := negative_prompt_of(cfg.model.family, cfg.model.negative_prompt)) is not None
            and cfg.sampling.guidance_scale != 1
            else {}
        ),
        "reward": {"name": reward["name"], "kwargs": scoring_kwargs(reward["kwargs"])},
        # (a video family's psi also follows the videos' frames, and the frames its reward scores)
        **({"frames": cfg.model.frames, "reward_frames": cfg.reward.frames} if cfg.model.video else {}),
    }


def calibration_changes(then: dict, now: dict, family: str) -> str:
    """What differs between a psi table's ``calibrated_for`` (``then``) and this run's (``now``), ``"k: a -> b"``
    joined by ``"; "``. Older tables do not record every entry: those they lack are not compared, but for the
    negative prompt, which a table from before ``model.negative_prompt`` took from the ``family``."""
    from densegrpo_fast.policies import with_family_negative

    then = with_family_negative(then, family)
    return "; ".join(f"{k}: {then[k]!r} -> {v!r}" for k, v in now.items() if k in then and then[k] != v)


def calibrate(
    policy,
    reward_fn,
    prompt_source,
    cfg,
    out_path: Path,
    progress: bool = True,
    dist: distributed.Dist = distributed.SINGLE,
) -> torch.Tensor:
    """Run Algorithm 1 with ``cfg`` (a TrainConfig); writes the psi table (JSON) and its plot.

    In a torchrun job (``dist``) every rank rolls out its slice of each round's rows (SDE noise from a
    stream of its own), the step rewards are gathered, and every rank takes the same step of psi; rank 0
    writes the table."""
    from tqdm import tqdm

    cal = cfg.noise.calibration
    T, G = cfg.sampling.num_steps, cfg.sampling.group_size
    n_prompts = cal.prompts or cfg.prompts.prompts_per_iteration
    if (n_prompts * G) % dist.world:  # (the same answer on every rank)
        raise ValueError(
            f"noise.calibration.prompts x sampling.group_size = {n_prompts * G} calibration rows per round "
            f"cannot be split evenly over {dist.world} processes: choose noise.calibration.prompts so that "
            f"it times the group size is a multiple of {dist.world}"
        )
    # A pairwise reward's win rates average 1/2 in every group, so its step rewards sum to 0 over a group
    # whatever the noise does, and gains would always about balance losses: psi is calibrated on its pointwise
    # view (the reward win_rate compares; the same judge asked of one image), whose gains do tell.
    reward_fn = pointwise_view(reward_fn, f"reward {cfg.reward.name!r}")
    n = cfg.noise
    ws, size = (n.window_start, n.window_size) if n.window_move == "fixed" else (None, None)  # moving: all
    base = make_schedule(
        T,
        cfg.sampling.shift,
        n.level,
        ws,
        size,
        sigmas=sampler_grid(T, cfg.sampling.shift, policy),
        sde=n.sde,
    )
    psi_max = min(cal.psi_max, 1.0) if base.cps else cal.psi_max  # (eta: sin(eta pi / 2) peaks at 1)
    psi = base.noise_level.clone()
    active = base.sde_steps
    trajectory = [psi.tolist()]
    gains, losses = [], []  # per round and step: the counts each round's move of psi was decided on
    device = policy.device
    bar = tqdm(range(cal.iterations), desc="calibrating psi", disable=not progress, dynamic_ncols=True)
    for it in bar:
        sched = base.with_noise(torch.where(active, psi, torch.zeros_like(psi)))
        prompts = [p for p in prompt_source.sample(n_prompts, it, stream="calibration") for _ in range(G)]
        gen = torch.Generator(device=device).manual_seed(cfg.run.seed * 1_000_003 + 7919 * it + 1)
        mine = dist.rows(len(prompts))  # every row in one process
        noise = initial_noise(len(prompts), G, policy.latent_shape, shared=cfg.sampling.share_initial_noise,
                              generator=gen, device=device)[mine]  # fmt: skip
        prompts = prompts[mine]
        if dist.enabled:
            gen = torch.Generator(device=device).manual_seed(
                cfg.run.seed * 1_000_003 + 7919 * it + 2 + dist.rank
            )
        cond = policy.encode_prompts(prompts)
        with cfg.model.autocast_context():  # the numerics training will sample with
            ro = sample(
                policy, cond, noise, sched.to(device), guidance_scale=cfg.sampling.guidance_scale, generator=gen,
                completion_steps=None, completion_batching=cfg.dense.completion_batching,  # (n: ALGORITHM.md §5)
                max_rows_per_call=cfg.sampling.max_rows_per_call,
            )  # fmt: skip
        R = latent_rewards(policy.decode, reward_fn, ro.clean, prompts, ro.completed, group_size=G)
        dR = distributed.gather_rows(dist, step_rewards(R).to(device))  # every rank's rows
        pos, neg = balance_counts(dR.cpu())
        gains.append(pos.tolist())
        losses.append(neg.tolist())
        psi = calibration_step(psi, dR.cpu(), cal.eps1, cal.eps2, cal.psi_min, psi_max, active)
        trajectory.append(psi.tolist())
        bar.set_postfix(psi=" ".join(f"{p:.2f}" for p in psi.tolist()))
    meta = {
        "rounds": cal.iterations,
        "trajectories_per_round": dR.shape[0],  # over every rank
        "eps1": cal.eps1,
        "eps2": cal.eps2,
        "calibrated_steps": active.nonzero().flatten().tolist(),  # what a later run checks its window against
        # the dR estimator the balance was counted on: always the exact one (n = remaining steps), so that a
        # step without noise has dR = 0; tables of older versions may record the run's n
        "completion_steps": None,
        # (not checked by a later run: a shared initial noise leaves each trajectory's law, so the expected
        # counts, as they are; it only correlates a group's rows)
        "share_initial_noise": cfg.sampling.share_initial_noise,
        "sigmas": base.sigmas.tolist(),
        "sde": n.sde,  # psi is a multiple of sqrt(s / (1 - s)) for flow_grpo, eta for cps: a run checks it
        "calibrated_for": calibrated_for(cfg),  # a run that reads the table warns where its own differ
        # the absolute noise scale per step, calibrated and initial (0 outside a fixed window)
        "std": base.with_noise(torch.where(active, psi, torch.zeros_like(psi))).std.tolist(),
        "std_initial": base.std.tolist(),
        "gains": gains,  # [round][step]: #(dR_k > 0) over the round's rows
        "losses": losses,  # [round][step]: #(dR_k < 0)
    }
    note = balance_note(gains, losses, cal.eps1, meta["calibrated_steps"], dR.shape[0])
    if note is not None:
        meta["note"] = note

    def write() -> None:  # rank 0 alone; its error (a full disk) reaches every rank, which waits for it
        save_psi(out_path, psi, trajectory, meta)
        plot_psi(out_path.with_suffix(".png"), trajectory, base)
        if note is not None:
            import warnings

            warnings.warn(note, stacklevel=4)

    distributed.on_main(dist, write)  # the table is written before any rank goes on
    return psi
