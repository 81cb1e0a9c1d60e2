"""Command line: parses and dispatches; no logic lives here.

Each subcommand is one ``_add_<name>`` function that declares its arguments and a handler that imports
its implementation lazily (so ``--help`` stays fast and needs no heavy imports).
"""

from __future__ import annotations

import argparse
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
    p = sub.add_parser("eval", help="GenEval-style held-out scores of a toy checkpoint, with a sample grid")
    _add_overrides(p)
    p.add_argument("--checkpoint", default=None, help="model .safetensors (overrides model.checkpoint)")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")

    def handler(args):
        from densegrpo_fast.toy.evaluate import run_eval

        run_eval(args.config, args.overrides, checkpoint=args.checkpoint, as_json=args.json)

    p.set_defaults(handler=handler)


SUBCOMMANDS.append(_add_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="densegrpo-fast",
        description="DenseGRPO for flow-matching text-to-image models (SD3.5, FLUX, and an embedded toy).",
    )
    parser.add_argument("--version", action="version", version=f"densegrpo-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
