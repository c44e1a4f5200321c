"""Pair methods across `dysco eval` runs made on the same examples (same task, length, seed, n).

    python benchmarks/pair_runs.py pair kv-heads=RUN_A/results.json prose-heads=RUN_B/results.json \
        --baseline kv-heads:vanilla [--out table.md]
    python benchmarks/pair_runs.py pool S2/results.json:vanilla S2_CAL/results.json:dysco \
        S3/results.json:vanilla S3/results.json:dysco [--out pooled.md]

One `dysco eval` run holds one profile, so two head sets decoded on the same examples live in two
runs; this pairs every `label:method` with the baseline and with each other (paired bootstrap and
sign test: `calibration.evaluation.statistics.paired_comparison`, the eval's own rule) and summarises
each DySCO method's selection recall by outcome. Examples are matched by id; a run whose ids differ
is refused. `pool` takes (baseline, method) column pairs, each pair on its own examples (other
seeds), and pairs the method with the baseline over all of them together and pair by pair.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calibration.evaluation.statistics import paired_comparison, seed_for  # noqa: E402

SELECTION_FIELDS = ("evidence_importance", "evidence_share", "evidence_recall", "selected")


def load_columns(runs: dict[str, Path]) -> tuple[list[str], dict[str, list[float]], dict[str, list[dict]]]:
    """(example ids, {label:method: scores}, {label:method: per-example selection}) over the runs' shared examples."""
    ids, scores, selection = None, {}, {}
    for label, path in runs.items():
        examples = json.loads(path.read_text())["examples"]
        these = [e["id"] for e in examples]
        if ids is None:
            ids = these
        elif these != ids:
            raise SystemExit(f"pair_runs: {path} holds other examples than the first run ({len(these)} vs {len(ids)} "
                             "ids, or another order); pair runs of the same task, length, seed and n")
        for method in examples[0]["scores"]:
            scores[f"{label}:{method}"] = [e["scores"][method] for e in examples]
            if all(e.get("selection", {}).get(method) for e in examples):
                selection[f"{label}:{method}"] = [e["selection"][method] for e in examples]
    return ids or [], scores, selection


def comparison_rows(scores: dict[str, list[float]], baseline: str, seed: int) -> list[dict]:
    """Every column against the baseline, then every other pair of non-baseline columns."""
    others = [c for c in scores if c != baseline]
    pairs = [(c, baseline) for c in others] + list(itertools.combinations(others, 2))
    return [{"method": a, "against": b, **paired_comparison(scores[a], scores[b], seed_for(seed, a, b))}
            for a, b in pairs]


def selection_rows(selection: dict[str, list[dict]], scores: dict[str, list[float]]) -> list[dict]:
    """Mean selection statistics per column and outcome (all, right, wrong)."""
    rows = []
    for column, per_example in selection.items():
        for outcome, keep in (("all", lambda s: True), ("right", lambda s: s > 0.5), ("wrong", lambda s: s <= 0.5)):
            chosen = [sel for sel, s in zip(per_example, scores[column]) if keep(s)]
            if chosen:
                rows.append({"method": column, "outcome": outcome, "n": len(chosen),
                             **{f: mean(sel[f] for sel in chosen) for f in SELECTION_FIELDS}})
    return rows


def load_column(spec: str) -> tuple[list[str], list[float]]:
    """(example ids, scores) of one `PATH:METHOD` column."""
    path, sep, method = spec.rpartition(":")
    if not sep or not Path(path).is_file():
        raise SystemExit(f"pair_runs: {spec!r}: expected PATH:METHOD with PATH a results.json")
    examples = json.loads(Path(path).read_text())["examples"]
    if any(method not in e["scores"] for e in examples):
        raise SystemExit(f"pair_runs: {path} has no method {method!r}; it has {', '.join(examples[0]['scores'])}")
    return [e["id"] for e in examples], [e["scores"][method] for e in examples]


def pooled_rows(columns: list[str], seed: int) -> list[dict]:
    """Each (baseline, method) pair of `columns` compared on its examples, then all pairs pooled."""
    if len(columns) < 2 or len(columns) % 2:
        raise SystemExit("pair_runs pool: give columns in pairs, BASELINE_PATH:METHOD NEW_PATH:METHOD, …")
    rows, base_all, new_all = [], [], []
    for base_spec, new_spec in zip(columns[0::2], columns[1::2]):
        (base_ids, base), (new_ids, new) = load_column(base_spec), load_column(new_spec)
        if base_ids != new_ids:
            raise SystemExit(f"pair_runs pool: {base_spec} and {new_spec} hold other examples; pair columns of one "
                             "example set")
        rows.append({"method": new_spec, "against": base_spec, **paired_comparison(new, base, seed_for(seed, new_spec))})
        base_all += base
        new_all += new
    rows.append({"method": "pooled", "against": "pooled", **paired_comparison(new_all, base_all, seed_for(seed, "pool"))})
    return rows


def comparison_table(rows: list[dict]) -> list[str]:
    """Paired comparisons as markdown lines."""
    lines = ["| method | against | n | difference (95% CI) | W/L | sign p |", "|---|---|---:|---|---|---:|"]
    return lines + [f"| {r['method']} | {r['against']} | {r['n']} | {100 * r['mean_difference']:+.1f} "
                    f"[{100 * r['low']:+.1f}, {100 * r['high']:+.1f}] | {r['wins']}W/{r['losses']}L | "
                    f"{r['p_value']:.2g} |" for r in rows]


def render(scores: dict[str, list[float]], comparisons: list[dict], selections: list[dict]) -> str:
    """The three tables as markdown."""
    lines = ["| method | n | score |", "|---|---:|---:|"]
    lines += [f"| {c} | {len(v)} | {100 * mean(v):.1f} |" for c, v in scores.items()]
    lines += ["", *comparison_table(comparisons)]
    if selections:
        lines += ["", "| method | outcome | n | evidence importance | evidence share | evidence recall | selected |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['method']} | {r['outcome']} | {r['n']} | {r['evidence_importance']:.3f} | "
                  f"{r['evidence_share']:.3f} | {r['evidence_recall']:.3f} | {r['selected']:.0f} |" for r in selections]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pair = commands.add_parser("pair", help="pair every column of runs on the same examples")
    pair.add_argument("runs", nargs="+", metavar="LABEL=RESULTS_JSON", help="a run's results.json under a label")
    pair.add_argument("--baseline", required=True, metavar="LABEL:METHOD", help="the column every other is paired with")
    pool = commands.add_parser("pool", help="pool (baseline, method) pairs made on different examples")
    pool.add_argument("columns", nargs="+", metavar="RESULTS_JSON:METHOD", help="baseline then method, pair by pair")
    for sub in (pair, pool):
        sub.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: %(default)s)")
        sub.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) and JSON next to it")
    args = parser.parse_args(argv)
    if args.command == "pool":
        rows = pooled_rows(args.columns, args.seed)
        text = "\n".join(comparison_table(rows)) + "\n"
        print(text, end="")
        if args.out:
            args.out.write_text(text)
            args.out.with_suffix(".json").write_text(json.dumps({"comparisons": rows}, indent=1) + "\n")
        return 0
    runs = {}
    for spec in args.runs:
        label, sep, path = spec.partition("=")
        if not sep or not label or not Path(path).is_file():
            pair.error(f"{spec!r}: expected LABEL=PATH to a results.json")
        runs[label] = Path(path)
    ids, scores, selection = load_columns(runs)
    if args.baseline not in scores:
        pair.error(f"--baseline {args.baseline}: not a column; the runs have {', '.join(scores)}")
    comparisons = comparison_rows(scores, args.baseline, args.seed)
    selections = selection_rows(selection, scores)
    text = render(scores, comparisons, selections)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(
            {"runs": {k: str(v) for k, v in runs.items()}, "examples": len(ids), "comparisons": comparisons,
             "selection": selections}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
