"""Choose a research round's dev cell and transfer cells from a vanilla scan (`benchmarks/gpu_round.sh`).

    python benchmarks/gpu_round_choose.py SCAN/results.json [MORE/results.json ...] --out choice.json

The dev cell is where calibration can show something both ways: vanilla in [0.25, 0.75], at the
longest such length (DySCO is meant for long contexts), nearest 0.5 among those; failing that, the
cell nearest 0.5 inside [0.1, 0.9]. Every other cell inside [0.1, 0.9] is a transfer cell (longest
first). A scan with no cell inside [0.1, 0.9] is an error: this model has nothing to calibrate here.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOM = (0.25, 0.75)  # vanilla accuracy that leaves room to win and to lose
OFF_FLOOR_AND_CEILING = (0.1, 0.9)


def choose(cells: list[dict]) -> dict:
    """The dev cell and the transfer cells of vanilla `cells` ({task, length, mean})."""
    inside = [c for c in cells if OFF_FLOOR_AND_CEILING[0] <= c["mean"] <= OFF_FLOOR_AND_CEILING[1]]
    if not inside:
        table = ", ".join(f"{c['task']}@{c['length']}={c['mean']:.2f}" for c in cells)
        raise ValueError(f"every scanned cell is at the floor or the ceiling (<0.1 or >0.9): {table}")
    roomy = [c for c in inside if ROOM[0] <= c["mean"] <= ROOM[1]]
    if roomy:
        longest = max(c["length"] for c in roomy)
        dev = min((c for c in roomy if c["length"] == longest), key=lambda c: abs(c["mean"] - 0.5))
    else:
        dev = min(inside, key=lambda c: abs(c["mean"] - 0.5))
    transfer = sorted((c for c in inside if c is not dev), key=lambda c: -c["length"])
    return {
        "task": dev["task"], "length": dev["length"], "vanilla": dev["mean"],
        "transfer": " ".join(f"{c['task']}@{c['length']}" for c in transfer),
        "scan": [{k: c[k] for k in ("task", "length", "mean", "n")} for c in cells],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scans", nargs="+", type=Path, help="results.json of vanilla-only `dysco eval` runs")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    cells = [c for path in args.scans for c in json.loads(path.read_text())["cells"] if c["method"] == "vanilla"]
    try:
        choice = choose(cells)
    except ValueError as error:
        print(f"gpu_round_choose: {error}", file=sys.stderr)
        return 1
    args.out.write_text(json.dumps(choice, indent=1) + "\n")
    print(json.dumps({k: v for k, v in choice.items() if k != "scan"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
