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
