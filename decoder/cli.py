"""`dysco`: the umbrella command. Each sub-command lives next to the code it drives.

Every module named here exposes `register_cli(subparsers)`, which adds its sub-command and sets
`func` on it. Those modules import torch lazily, so `dysco registry …` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from decoder.threads import quiet_idle_threads

quiet_idle_threads()  # before anything imports torch

# (module, what it adds) — order is the order of `dysco --help`.
_SUBCOMMAND_MODULES = (
    "decoder.catalogue",  # dysco models list|pull
    "decoder.generate_cli",  # dysco generate
    "registry.cli",  # dysco registry list|show|diff|tag|export|import
    "calibration.evaluate",  # dysco eval
)


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
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a real missing dependency, not a sub-command still to come
                raise
            continue
        module.register_cli(subparsers)
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
