"""`dysco`: the umbrella command. Each sub-command lives next to the code it drives.

Sub-commands are found through the `dysco.commands` entry points (pyproject.toml), so this module
names no package above `decoder`: `dysco eval` comes from `calibration` without `decoder` importing
it. Each entry point is a `register_cli(subparsers)` that adds its sub-command and sets `func` on
it; those modules import torch lazily, so `dysco registry …` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

from decoder.threads import quiet_idle_threads

quiet_idle_threads()  # before anything imports torch

ENTRY_POINT_GROUP = "dysco.commands"
# `dysco --help` lists sub-commands in this order; others (a plugin's) follow by name.
_ORDER = ("models", "generate", "registry", "eval")


def _commands() -> list[metadata.EntryPoint]:
    found = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    if not found:
        raise SystemExit("dysco: no sub-commands are registered: reinstall the package (pip install -e .)")
    return sorted(found.values(), key=lambda ep: (_ORDER.index(ep.name) if ep.name in _ORDER else len(_ORDER), ep.name))


def build_parser() -> argparse.ArgumentParser:
    """The `dysco` argument parser with every available sub-command."""
    from decoder.cli_common import examples

    parser = argparse.ArgumentParser(
        prog="dysco",
        description="DySCO decoding toolkit: models, generation, profiles and evaluation.",
        **examples("dysco models pull smollm2-135m", "dysco generate --model smollm2-135m --prompt \"Where does Alice live?\"",
                   "dysco eval --model smollm2-135m --tasks needle,kv --lengths 2k --n 8",
                   "dysco registry list"),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry_point in _commands():
        entry_point.load()(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dysco` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    from decoder.cli_common import one_line_warnings

    with one_line_warnings(f"dysco {args.command}"):
        return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
