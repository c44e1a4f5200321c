"""Replay a finished calibration study under other objectives: which knobs would it register?

Reads a study database written by `calibrate` (the per-example dev scores of every trial and of
vanilla are stored in it) and, for each loss penalty, ranks the complete trials by
`calibration.study.dev_objective` and applies `choose_knobs` (best trial vs the published defaults,
paired sign test). Nothing is decoded: pruned trials (scored on part of the dev set) are left out.
Trials a penalised study would have pruned differently are a limit of the replay, said in the table.

    python benchmarks/rechoose.py docs/results/smollm2-gpu-calibrate-8000-given-heads/study.db \\
        --loss-penalties 0,1,2 --adopt-p 0.05
"""

from __future__ import annotations

import argparse
import sys

import optuna
from optuna.trial import TrialState

from calibration.study import choose_knobs, dev_objective


def replay(storage: str, penalties: list[float], adopt_p: float) -> list[dict]:
    """One row per loss penalty: the best complete trial under it and the knobs `choose_knobs` keeps."""
    summaries = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summaries[0].study_name, storage=storage)
    vanilla = [float(v) for v in study.user_attrs["baselines"]["vanilla"]["scores"]]
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    rows = []
    for penalty in penalties:
        rescored = []
        for t in complete:
            copy = optuna.trial.create_trial(params=t.params, distributions=t.distributions,
                                             value=dev_objective(t.user_attrs["scores"], vanilla, penalty),
                                             user_attrs=t.user_attrs)
            copy.number = t.number
            rescored.append(copy)
        best = max(rescored, key=lambda t: (t.values[0], -t.number))  # ties: the earliest, as Optuna does
        published = next((t for t in rescored if t.user_attrs.get("published_defaults")), None)
        chosen, why = choose_knobs(best, published, vanilla, penalty, adopt_p)
        rows.append({"loss_penalty": penalty, "best": best, "chosen": chosen, "why": why, "n": len(vanilla),
                     "complete": len(complete)})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the replay as a markdown table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study_db", help="sqlite file of a calibration study")
    p.add_argument("--loss-penalties", default="0,1,2")
    p.add_argument("--adopt-p", type=float, default=0.05)
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = replay(f"sqlite:///{args.study_db}", [float(x) for x in args.loss_penalties.split(",")], args.adopt_p)
    print(f"{rows[0]['complete']} complete trials, {rows[0]['n']} dev examples")
    print("| loss penalty | best trial (objective, score) | published trial | best vs published on dev | registered |")
    print("|---|---|---|---|---|")
    for r in rows:
        b, why = r["best"], r["why"]
        test = f"{why['wins']}W/{why['losses']}L, p = {why['p_value']:.3g}" if "p_value" in why else "same trial"
        print(f"| {r['loss_penalty']:g} | {b.number} ({b.values[0]:.3f}, {sum(b.user_attrs['scores']) / r['n']:.3f}) "
              f"| {why.get('published_trial')} | {test} | trial {r['chosen'].number}"
              f"{' (published)' if r['chosen'].user_attrs.get('published_defaults') else ''} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
