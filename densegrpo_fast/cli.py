"""Command line: parses and dispatches; no logic lives here.

Each subcommand is one ``_add_<name>`` function that declares its arguments and a handler that imports
its implementation lazily (so ``--help`` stays fast and needs no heavy imports).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from densegrpo_fast import __version__


def _add_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


SUBCOMMANDS: list = []  # filled by the _add_* functions below, in --help order


def _add_pretrain_toy(sub) -> None:
    p = sub.add_parser("pretrain-toy", help="pretrain the embedded toy text-to-image model (resumable)")
    _add_overrides(p)

    def handler(args):
        from densegrpo_fast.toy.pretrain import run_pretrain

        run_pretrain(args.config, args.overrides)

    p.set_defaults(handler=handler)


SUBCOMMANDS.append(_add_pretrain_toy)


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="held-out scores: the toy's GenEval-style report, or eval.rewards on a prompt file "
        "(the pretrained families)",
    )
    _add_overrides(p)
    p.add_argument(
        "--checkpoint",
        default=None,
        help="trained weights: a run's policy_ema.safetensors (toy: any toy checkpoint)",
    )
    p.add_argument(
        "--lora",
        default=None,
        help="pretrained families: a LoRA merged into the model (or --checkpoint) before sampling: a run's "
        "lora_ema/, a diffusers LoRA, or a peft adapter folder (e.g. a published Flow-GRPO LoRA); Wan 2.2 "
        "A14B: the high-noise expert's, the low-noise expert's in its folder's transformer_2/ or --lora-2",
    )
    p.add_argument(
        "--lora-2",
        default=None,
        help="Wan 2.2 A14B: the low-noise expert's LoRA (transformer_2), beside --lora's for the high-noise one",
    )
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (pretrained families)")

    def handler(args):
        from densegrpo_fast.evaluate import run_eval

        run_eval(
            args.config,
            args.overrides,
            checkpoint=args.checkpoint,
            lora=args.lora,
            lora_2=args.lora_2,
            as_json=args.json,
            progress=not args.no_progress,
        )

    p.set_defaults(handler=handler)


SUBCOMMANDS.append(_add_eval)


def _train_config(args):
    """The training config of ``--config`` + overrides, with the command line's run options applied."""
    from densegrpo_fast.config import TrainConfig, load_config

    overrides = list(args.overrides)
    if getattr(args, "output_dir", None) is not None:
        overrides.append(
            f"run.output_dir={json.dumps(args.output_dir)}"
        )  # quoted: '#', 'yes', '2024' stay text
    if getattr(args, "max_iterations", None) is not None:
        overrides.append(f"run.iterations={args.max_iterations}")
    return load_config(TrainConfig, args.config, overrides)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="DenseGRPO (or Flow-GRPO, DiffusionNFT, AWM: grpo.objective) training; resumable with --resume",
    )
    _add_overrides(p)
    p.add_argument("--output-dir", help="run directory (overrides run.output_dir)")
    p.add_argument(
        "--max-iterations",
        type=_positive_int,
        help="sets run.iterations (the run's length: a decaying learning rate ends its schedule there)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in the output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handler(args):
        import warnings

        from densegrpo_fast.config import ignored_line, override_keys
        from densegrpo_fast.distributed import speaks
        from densegrpo_fast.trainer import train

        cfg = _train_config(args)
        given = override_keys(args.overrides)
        for keys, why in cfg.ignored_settings() if speaks() else ():
            if ours := [k for k in keys if k in given]:
                warnings.warn(ignored_line(ours, why), stacklevel=1)
        for caveat in cfg.caveats() if speaks() else ():
            warnings.warn(caveat, stacklevel=1)
        run_dir = train(cfg, resume=args.resume, progress=not args.no_progress)
        if speaks():
            names = ("metrics.jsonl", "reward_curve.png", "samples", "policy_ema.safetensors")
            held = [n + ("/" if (run_dir / n).is_dir() else "") for n in names if (run_dir / n).exists()]
            print(f"run directory: {run_dir} ({', '.join(held)})")

    p.set_defaults(handler=handler)


SUBCOMMANDS.append(_add_train)


def _add_calibrate(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="reward-aware noise calibration (DenseGRPO Algorithm 1) before training"
    )
    _add_overrides(p)
    p.add_argument(
        "--output-dir",
        help="run directory (overrides run.output_dir); psi.json is written there unless "
        "noise.calibration.path is set",
    )

    def handler(args):
        from densegrpo_fast.trainer import run_calibration

        cfg = _train_config(args)
        psi, path = run_calibration(cfg)
        from densegrpo_fast.distributed import speaks

        if speaks():
            print(
                f"psi = {[round(v, 3) for v in psi.tolist()]}\nwritten to {path} and {path.with_suffix('.png')}"
            )
            if cfg.noise.kind != "calibrated":
                print(
                    f"note: noise.kind={cfg.noise.kind}: a run reads this table only with noise.kind=calibrated",
                    file=sys.stderr,
                )

    p.set_defaults(handler=handler)


SUBCOMMANDS.append(_add_calibrate)


def _add_encode_prompts(sub) -> None:
    p = sub.add_parser(
        "encode-prompts",
        help="encode the config's prompt files once into model.prompt_cache (train, calibrate and eval then "
        "load no text encoder); resumable",
    )
    _add_overrides(p)
    p.add_argument(
        "--batch-size", type=_positive_int, default=16, help="prompts per text-encoder call (default 16)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    def handler(args):
        from densegrpo_fast.config import TrainConfig, load_config
        from densegrpo_fast.prompt_cache import encode_config

        cfg = load_config(TrainConfig, args.config, list(args.overrides))
        cache, new = encode_config(cfg, batch_size=args.batch_size, progress=not args.no_progress)
        print(f"{new} prompt(s) encoded, {len(cache)} in the prompt cache {cache.root}")

    p.set_defaults(handler=handler)


SUBCOMMANDS.append(_add_encode_prompts)


def _add_validate(sub) -> None:
    p = sub.add_parser("validate", help="check a training config (every problem at once) without running it")
    _add_overrides(p)
    p.add_argument(
        "--load-rewards",
        action="store_true",
        help="also build every reward of the config with its weights and score two images with each",
    )
    p.add_argument(
        "--device", help="with --load-rewards: where to score (default: the config's model.device)"
    )

    def handler(args):
        import importlib.util

        from densegrpo_fast.logging import WANDB_MISSING

        cfg = _train_config(args)
        if cfg.run.wandb.enabled and importlib.util.find_spec("wandb") is None:
            raise ValueError(WANDB_MISSING)
        if args.device is not None and not args.load_rewards:
            raise ValueError(f"--device {args.device} applies to --load-rewards only: add --load-rewards")
        print(
            f"{args.config}: valid ({cfg.rows_per_iteration} rows per iteration, {cfg.sampling.num_steps} steps)"
        )
        from densegrpo_fast.config import ignored_line
        from densegrpo_fast.prompts import PromptSource, edit_mismatch

        for keys, why in cfg.ignored_settings():
            print(f"note: {ignored_line(keys, why)}", file=sys.stderr)
        for caveat in cfg.caveats():
            print(f"note: {caveat}", file=sys.stderr)
        readable = {}
        for field, dataset in (("prompts.dataset", cfg.prompts.dataset), ("eval.dataset", cfg.eval.dataset)):
            try:
                source = PromptSource(dataset, 0, field)
            except (ValueError, OSError) as e:  # (the prompt sets may live only where training runs)
                print(f"note: not readable on this machine, and `train` needs it: {e}", file=sys.stderr)
                continue
            if bad := edit_mismatch(cfg.model.family, source.edits, field, dataset):
                raise ValueError(bad)
            readable[field] = source.pool()[0]
        if cfg.model.prompt_cache is not None:  # (its identity is checked when the model loads)
            from densegrpo_fast.prompt_cache import coverage_problem, with_negative

            try:
                problem = coverage_problem(cfg.model.prompt_cache, with_negative(cfg, readable))
            except ValueError as e:  # (an index.json this version does not read)
                problem = str(e)
            if problem:
                print(f"note: `train` needs it: {problem}", file=sys.stderr)
        from densegrpo_fast.policies import checkpoint_problem

        m = cfg.model
        if problem := checkpoint_problem(m.family, m.checkpoint, local_files_only=m.local_files_only):
            print(f"note: not on this machine, and `train` needs it: {problem}", file=sys.stderr)
        if args.load_rewards:
            import torch

            from densegrpo_fast.distributed import check_device
            from densegrpo_fast.rewards.preflight import check_rewards

            device = args.device or cfg.model.device
            check_device(device, "--device" if args.device else "model.device")
            device = torch.device(device)

            checked = []
            for c in check_rewards(cfg, device, before=lambda where, name: print(f"checking {where} {name!r} ...",
                                                                                 flush=True)):  # fmt: skip
                print(c.line(), flush=True)
                checked.append(c)
            failed = [c for c in checked if c.error is not None]
            if failed:
                raise ValueError(
                    f"{len(failed)} of {len(checked)} reward checks failed: "
                    f"{', '.join(c.where for c in failed)} (messages above)"
                )

    p.set_defaults(handler=handler)


SUBCOMMANDS.append(_add_validate)


def _add_rewards(sub) -> None:
    p = sub.add_parser("rewards", help="list the registered rewards: what each scores and its keywords")
    p.add_argument("name", nargs="?", help="show only this reward")
    p.add_argument("--json", action="store_true", help="print the list as JSON")

    def handler(args):
        import json
        import textwrap

        from densegrpo_fast.rewards import available, describe, unknown_name

        if args.name is not None and args.name not in available():
            raise ValueError(unknown_name(args.name, "NAME"))
        rows = [describe(n) for n in ([args.name] if args.name else available())]
        if args.json:
            print(json.dumps(rows, indent=2, default=repr))
            return
        for r in rows:
            kw = [f"{k} (required)" for k in r["required"]] + [f"{k}={v!r}" for k, v in r["keywords"].items()]
            kw = ", ".join(kw) or "(none)"
            print(r["name"])
            print(textwrap.fill(r["summary"], 108, initial_indent="  ", subsequent_indent="  "))
            print(textwrap.fill(f"keywords: {kw}", 108, initial_indent="  ", subsequent_indent="    "))
            print(f"  documented in: {r['qualname']}")
        if not args.name:
            print("\nuse one: reward.name=NAME 'reward.kwargs={...}' (or an eval.rewards entry); its keywords "
                  "are explained where it is documented (python -m pydoc THAT.NAME)")  # fmt: skip

    p.set_defaults(handler=handler)


SUBCOMMANDS.append(_add_rewards)


def _add_show_config(sub) -> None:
    p = sub.add_parser("show-config", help="print the resolved training config (defaults filled in) as YAML")
    _add_overrides(p)

    def handler(args):
        import yaml

        print(yaml.safe_dump(_train_config(args).model_dump(mode="json"), sort_keys=False), end="")

    p.set_defaults(handler=handler)


SUBCOMMANDS.append(_add_show_config)


def _add_memory(sub) -> None:
    p = sub.add_parser(
        "memory",
        help="estimate a training config's peak GPU memory on the CPU (fake weights, the trainer's own code); "
        "exits 1 when it does not fit --device-gib with 10 %% headroom",
    )
    _add_overrides(p)
    p.add_argument(
        "--device-gib",
        type=_positive_float,
        default=80.0,
        help='the GPU\'s memory to compare with, in GiB as torch reports it (an "80 GB" card has a little '
        "less than 80)",
    )
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="per process of a torchrun job of N processes (its share of the rows; the transformer sharded "
        "with FSDP2 as model.sharding decides: full fine-tuning by default, LoRA with fsdp; a whole copy per "
        "process under replicate)",
    )
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also show what the peak holds, by origin (a model call, AdamW, or the engine's code line)",
    )

    def handler(args):
        from densegrpo_fast.memory import fits, run_memory

        est = run_memory(
            args.config, args.overrides, device_gib=args.device_gib, as_json=args.json, processes=args.nproc,
            breakdown=args.breakdown,
        )  # fmt: skip
        return 0 if fits(est, args.device_gib) else 1  # (a script's verdict; errors exit 2)

    p.set_defaults(handler=handler)


SUBCOMMANDS.append(_add_memory)


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({e}); e.g. '{{\"quality\": 95}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} must be a JSON object of keyword arguments")
    return value


def _number(kind: type, what: str, ok, rule: str):
    """An argparse type: the text read as ``kind`` (else "is not ``what``"), refused unless ``ok(value)``
    (``rule`` says why)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} {rule}")
        return value

    return parse


_positive_int = _number(int, "a whole number", lambda v: v >= 1, "must be at least 1")
_port = _number(int, "a port number", lambda v: 0 <= v <= 65535, "is not a port: ports run from 0 to 65535")
_positive_float = _number(float, "a number", lambda v: v > 0, "must be positive")


def _add_serve_reward(sub) -> None:
    p = sub.add_parser(
        "serve-reward",
        help="host one reward over HTTP for the `remote` / `geneval` rewards (e.g. geneval_detector in an env with mmdetection)",
    )
    p.add_argument(
        "--reward",
        required=True,
        help="registry name (e.g. pickscore) or a user factory package.module:callable",
    )
    p.add_argument(
        "--kwargs", type=_json_object, default={}, help="the reward's keyword arguments as a JSON object"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (no authentication: keep it trusted)")
    p.add_argument("--port", type=_port, required=True, help="port to listen on (0: any free port)")
    p.add_argument(
        "--max-request-mb", type=float, default=512.0, help="larger requests get 413 (default 512 MiB)"
    )
    p.add_argument(
        "--max-waiting-mb",
        type=float,
        default=None,
        help="request bodies held at once, waiting or scoring (a body counts twice until it is decoded); past "
        "it a request waits before its body is read (default 4x --max-request-mb)",
    )
    p.add_argument(
        "--device",
        default=None,
        help="where the images are scored, e.g. cuda:1 (default: the GPU when there is one and the reward "
        "holds a torch model, else the CPU); a model reward without a device keyword of its own follows them",
    )

    def handler(args):
        from densegrpo_fast.rewards.server import serve

        serve(args.reward, args.kwargs, args.host, args.port, args.max_request_mb, args.max_waiting_mb,
              args.device)  # fmt: skip

    p.set_defaults(handler=handler)


SUBCOMMANDS.append(_add_serve_reward)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="densegrpo-fast",
        description="DenseGRPO for flow-matching text-to-image models (SD3.5, FLUX.1, FLUX.2 [klein], Qwen-Image, Z-Image, and an embedded "
        "toy).",
    )
    parser.add_argument("--version", action="version", version=f"densegrpo-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but ``key=value`` overrides may stand on both sides of an option
    (`--config C a=1 --output-dir D b=2`): argparse takes the first run of them as the positional list and
    leaves the later ones over, which join it in order (a later value of a key wins)."""
    args, rest = parser.parse_known_args(argv)
    if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs the command ``argv`` and returns its exit code; in a process launched by torchrun
    (``WORLD_SIZE`` > 1) a command that succeeds does not return: the process leaves once it is done
    (:func:`densegrpo_fast.distributed.leave`)."""
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        from densegrpo_fast import distributed

        world = distributed.world_size()
        if world > 1 and args.command not in ("train", "eval", "calibrate"):
            raise ValueError(
                f"`{args.command}` runs as one process, but this one was launched as one of {world} (WORLD_SIZE, "
                "torchrun): only `train`, `eval` and `calibrate` run data-parallel; run it without torchrun"
            )
        code = int(args.handler(args) or 0)
        if world > 1:  # a torchrun process whose work is done: leave without the interpreter's teardown
            distributed.leave(code)
        return code
    except ValueError as e:  # a problem the user can fix (config, paths, values): say it, no traceback
        if os.environ.get("DENSEGRPO_TRACEBACK") == "1":
            raise
        print(f"densegrpo-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
