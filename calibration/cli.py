"""`calibrate`: tune DySCO's knobs for a model on a dev task and register the tuned profile.

    calibrate --dev mrcr --model smollm2-135m --trials 20 --examples 8 --context 1024

Run the same command again after an interruption and the study continues where it stopped
(finished trials are kept). Add `--workers N` to share the study among N processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from decoder.threads import quiet_idle_threads

quiet_idle_threads()  # before anything imports torch

from calibration.errors import CalibrationError  # noqa: E402
from calibration.pareto import SPEED_OBJECTIVES  # noqa: E402
from calibration.space import INTERVENTION_WARMUPS  # noqa: E402
from calibration.storage import DEFAULT_STORAGE  # noqa: E402
from calibration.tasks import TASK_NAMES  # noqa: E402
from calibration.study import (  # noqa: E402
    ATTNTS_TEMPERATURES,
    CalibrationConfig,
    calibrate,
    parse_heads,
    starting_profile,
    task_options,
)
from calibration.tasks import get_task  # noqa: E402
from calibration.workers import parse_devices  # noqa: E402
from decoder.catalogue import CatalogueError  # noqa: E402
from decoder.cli_common import EXIT_RUNTIME, EXIT_USAGE, UsageError, one_line_warnings  # noqa: E402
from decoder.loading import DTYPE_NAMES  # noqa: E402
from registry import (  # noqa: E402
    InvalidReference,
    ProfileValidationError,
    Registry,
    RegistryError,
    parse_intervention_warmup,
    parse_ref,
)
from registry.profile import LAGGED_PROBS, SELECTIONS  # noqa: E402

_EPILOG = """\
examples:
  calibrate --dev mrcr --model smollm2-135m --trials 20
  calibrate --dev kv --model ./my-checkpoint --heads 14:2,17:5,12:0 --context 2048
  calibrate --dev mrcr_2needles.parquet --model qwen2.5-coder-0.5b --profile qwen2.5-coder-0.5b@1
  calibrate --dev mrcr --model smollm2-135m --storage sqlite:///study.db --workers 4
  calibrate --dev mrcr --model qwen3-8b --dtype bfloat16 --devices 0,1 --storage postgresql://me@dbhost/dysco
  calibrate --dev kv --model qwen2.5-coder-0.5b --context 16384 --examples 24 --trials 30 \
      --fast --device cuda --dtype bfloat16 --batch-size 12
  calibrate --dev needle --model smollm2-135m --selection dynamic,lagged,static --speed-objective cost
  calibrate --dev needle --model smollm2-135m --selection dynamic,lagged --speed-objective cost --max-cost 1
  (the same command on another host joins the study: docs/scaling.md)

The study is stored in --storage (default: %(storage)s in this folder) under --study-name
(default: derived from the model, task, examples and head ranking, so the same command
resumes the same study). Trials already finished count towards --trials; a trial left
running by a killed process is marked failed and run again. MLflow runs go to
--tracking-uri (default: sqlite:///mlflow.db in this folder; view them with
`mlflow ui --backend-store-uri sqlite:///mlflow.db`).
""" % {"storage": DEFAULT_STORAGE}


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _heads(text: str) -> list[tuple[int, int]]:
    try:
        return parse_heads(text)
    except CalibrationError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _devices(text: str) -> tuple[str, ...]:
    try:
        return parse_devices(text)
    except CalibrationError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _names(accepted: tuple[str, ...]):
    """An argparse type: a comma-separated list of distinct names among `accepted`."""
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip().lower() for n in text.split(",") if n.strip())
        bad = [n for n in names if n not in accepted]
        if bad or not names or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(
                f"expected distinct names among {','.join(accepted)}, comma-separated, got {text!r}"
            )
        return names

    return parse


def _temperatures(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"temperatures must be positive numbers, got {text!r}")
    return values


def _number(accepts, expected: str):
    """An argparse type: a float that `accepts`, else an error saying what is `expected`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")  # refused below with the same message
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


_non_negative = _number(lambda v: 0 <= v < float("inf"), "a finite number >= 0")
_p_value = _number(lambda v: 0 < v <= 1, "a p-value in (0, 1]")
_positive = _number(lambda v: 0 < v < float("inf"), "a finite number > 0")


def build_parser() -> argparse.ArgumentParser:
    """The `calibrate` argument parser."""
    p = argparse.ArgumentParser(
        prog="calibrate",
        description="Tune DySCO's knobs (strength, top_k, top_p, decay, number of heads, intervention warmup) for a model "
        "with an Optuna study on a dev task, compare with vanilla and AttnTS decoding on held-out "
        "test examples, and register the tuned profile as a new version.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = p.add_argument_group("what to calibrate")
    what.add_argument("--dev", required=True, metavar="TASK|PATH",
                      help=f"dev task: {', '.join(TASK_NAMES)} (synthetic, generated at --context), or a "
                      "published-format MRCR file (.parquet/.json/.jsonl)")
    what.add_argument("--model", default="smollm2-135m", metavar="NAME",
                      help="catalogue name, local checkpoint folder or .gguf, or Hub id (default: %(default)s)")
    heads = what.add_mutually_exclusive_group()
    heads.add_argument("--profile", metavar="REF",
                       help="registry profile to start from (its QR head ranking and knobs), e.g. "
                       "smollm2-135m@1; default: the model's latest profile")
    heads.add_argument("--heads", type=_heads, metavar="L:H,…",
                       help="start from this ranked head list instead of a profile, e.g. 14:2,17:5")
    size = p.add_argument_group("examples")
    size.add_argument("--examples", type=_at_least(1), default=8, metavar="N",
                      help="dev examples each trial decodes (default: %(default)s)")
    size.add_argument("--test-examples", type=_at_least(1), metavar="N",
                      help="held-out test examples for the final comparison (default: half of --examples)")
    size.add_argument("--context", type=_at_least(16), default=1024, metavar="TOKENS",
                      help="prompt length in the model's tokens (default: %(default)s)")
    size.add_argument("--needles", type=_at_least(1), metavar="K",
                      help="MRCR only: identical asks per chat (published: 2, 4, 8; default 2)")
    size.add_argument("--max-new-tokens", type=_at_least(1), default=48, metavar="N",
                      help="tokens generated per example (default: %(default)s)")
    size.add_argument("--batch-size", type=_at_least(1), default=1, metavar="N",
                      help="examples decoded together; the pruner sees the score after each batch "
                      "(default: %(default)s)")
    study = p.add_argument_group("study")
    study.add_argument("--trials", type=_at_least(1), default=20, metavar="N",
                       help="finished trials wanted, counting those already in the study (default: %(default)s)")
    study.add_argument("--seed", type=int, default=0, metavar="S",
                       help="seed of the examples, their dev/test split and the TPE sampler (default: %(default)s)")
    study.add_argument("--storage", default=DEFAULT_STORAGE, metavar="URL",
                       help="Optuna storage URL (default: %(default)s). Workers on several hosts share a server "
                       "database: postgresql://USER@HOST/DB or mysql+pymysql://USER@HOST/DB (drivers: pip install "
                       "'dysco-toolkit[storage]')")
    study.add_argument("--study-name", metavar="S", help="study to create or continue (default: derived)")
    study.add_argument("--workers", type=_at_least(1), default=None, metavar="N",
                       help="processes sharing the study, this one included (default: 1, or one per --devices)")
    study.add_argument("--speed-objective", choices=SPEED_OBJECTIVES, default="none",
                       help="a second objective, minimised with the dev objective maximised: cost = forward passes per "
                       "generated token relative to vanilla (a deterministic model: dynamic selection 1 + (deepest "
                       "head layer + 1) / layers, lagged and static 1), measured = decode ms per generated token timed "
                       "in the trial (comparable only on one kind of device). The study becomes two-objective "
                       "(multi-objective TPE) WITHOUT PRUNING (Optuna cannot prune multi-objective trials); the "
                       "output adds the Pareto front: a table, the JSON, MLflow plots/pareto_front.png and the "
                       "registered profile's metrics (default: %(default)s)")
    study.add_argument("--max-cost", type=_positive, metavar="C",
                       help="with --speed-objective: register the most accurate Pareto point costing at most C (in "
                       "the objective's unit; e.g. 1 with cost: one pass per token), still subject to --adopt-p "
                       "against the published knobs when they fit C (default: the most accurate point)")
    study.add_argument("--selection", type=_names(SELECTIONS), metavar="MODE,…",
                       help="search DySCO's selection mode among these: dynamic (probe each step, published), lagged "
                       "(no probe: the previous pass's attention), static (one set); default: not searched, the "
                       "starting profile's mode (dynamic for every shipped profile)")
    study.add_argument("--lagged-probs", type=_names(LAGGED_PROBS), metavar="P,…",
                       help="the lagged trials' choices of probabilities (needs lagged in --selection): plain, biased "
                       "(default: both, searched)")
    study.add_argument("--attnts-temperatures", type=_temperatures, default=ATTNTS_TEMPERATURES,
                       metavar="T,…", help="AttnTS baseline grid; the best on dev is kept "
                       f"(default: {','.join(map(str, ATTNTS_TEMPERATURES))})")
    study.add_argument("--loss-penalty", type=_non_negative, default=1.0, metavar="X",
                       help="objective = dev score - X x the share of dev examples vanilla gets right and the trial "
                       "gets wrong (default: %(default)s; 0: the plain score)")
    study.add_argument("--adopt-p", type=_p_value, default=0.05, metavar="P",
                       help="register the best trial's knobs only if they beat the published defaults on dev with "
                       "a paired sign-test p < P, else the published ones (default: %(default)s; 1: always the best)")
    study.add_argument("--intervention-warmup", metavar="auto|N", default=None,
                       help="fix DySCO's intervention warmup instead of searching it: auto = the chat template's "
                       "generation-prompt length, published default; an integer otherwise (default: searched over "
                       f"{', '.join(map(str, INTERVENTION_WARMUPS))})")
    where = study.add_mutually_exclusive_group()
    where.add_argument("--device", default="cpu", metavar="DEV",
                       help="where the model runs: cpu (default), cuda, cuda:N")
    where.add_argument("--devices", type=_devices, metavar="N,…",
                       help="one worker process per listed GPU on the same study, this one on the first: 0,1 or "
                       "cuda:0,cuda:1 (--workers is then their number)")
    study.add_argument("--fast", action="store_true",
                       help="decode trials, baselines and the test on the fast path (static KV buffers, masked "
                       "batched prefill shared by every trial, CUDA graphs on one GPU; greedy; the same selection "
                       "recall as the exact path); a study is continued only on the path it was made with")
    study.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
                       help="model dtype (default: the checkpoint's own; bfloat16 is the usual choice on a GPU)")
    study.add_argument("--threads", type=_at_least(1), metavar="N",
                       help="torch threads per worker (default: CPU cores / workers)")
    out = p.add_argument_group("tracking and output")
    out.add_argument("--tracking-uri", metavar="URI",
                     help="MLflow tracking store or server (default: sqlite:///mlflow.db here)")
    out.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    out.add_argument("--registry", metavar="DIR", help="profile registry folder (default: $DYSCO_REGISTRY or "
                     "the user data dir)")
    out.add_argument("--no-register", action="store_true", help="score the best trial but register nothing")
    out.add_argument("--json", action="store_true", help="print the result as one JSON object")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def config_from_args(args: argparse.Namespace) -> CalibrationConfig:
    """The `CalibrationConfig` that parsed CLI arguments describe."""
    return CalibrationConfig(
        dev=args.dev, model=args.model, profile=args.profile, heads=args.heads, trials=args.trials,
        examples=args.examples, test_examples=args.test_examples, context=args.context,
        needles=args.needles, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        storage=args.storage, study_name=args.study_name,
        workers=args.workers or (len(args.devices) if args.devices else 1), devices=args.devices,
        tracking_uri=args.tracking_uri, tracking=not args.no_tracking, registry=args.registry,
        register=not args.no_register, seed=args.seed, speed_objective=args.speed_objective,
        attnts_temperatures=args.attnts_temperatures, threads=args.threads,
        intervention_warmup=args.intervention_warmup, device=args.device, dtype=args.dtype,
        loss_penalty=args.loss_penalty, adopt_p=args.adopt_p, fast=args.fast,
        max_cost=args.max_cost,
        selection=args.selection, lagged_probs=args.lagged_probs,
    )


def _fail(message: str, as_json: bool, status: int = EXIT_RUNTIME) -> int:
    if as_json:
        print(json.dumps({"error": message}))
    print(f"calibrate: error: {message}", file=sys.stderr)
    return status


def check_arguments(args: argparse.Namespace) -> CalibrationConfig:
    """The config the arguments describe, with everything checked that needs no model (UsageError)."""
    try:
        if args.intervention_warmup is not None:
            args.intervention_warmup = parse_intervention_warmup(args.intervention_warmup, "--intervention-warmup")
        if args.profile is not None:
            parse_ref(args.profile)
        config = config_from_args(args)
        config.validate()
        if not os.path.exists(args.dev):  # an existing file is read (before the model loads) by `calibrate`
            task_options(get_task(args.dev), args.needles)  # an unknown task name, a path that does not exist
    except (InvalidReference, ProfileValidationError, ValueError) as err:  # CalibrationError is a ValueError
        raise UsageError(str(err)) from None
    return config


def _check_profile(config: CalibrationConfig) -> None:
    """Read the registry and the profile to start from now: a corrupt or missing one must not cost a model load."""
    registry = Registry(config.registry)
    if config.heads is None:
        starting_profile(config, registry)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `calibrate` console script."""
    args = build_parser().parse_args(argv)
    with one_line_warnings("calibrate"):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        config = check_arguments(args)
    except UsageError as err:
        return _fail(str(err), args.json, EXIT_USAGE)
    logging.basicConfig(level=logging.WARNING, format="calibrate: %(levelname)s: %(message)s")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar says it better
    try:
        _check_profile(config)
        result = calibrate(config, progress=not args.quiet)
    except (CalibrationError, CatalogueError, RegistryError, OSError) as err:
        return _fail(str(err), args.json)
    except ValueError as err:  # e.g. the decoder refusing a setting; its message names it
        return _fail(f"{type(err).__name__}: {err}", args.json)
    except KeyboardInterrupt:
        print("calibrate: interrupted; rerun the same command to continue the study", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(_report(result))
    return 0


def _report(result: Any) -> str:
    lines = [
        f"study {result.study_name} ({result.storage}): {result.trials['finished']} trials finished "
        f"({result.trials['complete']} complete, {result.trials['pruned']} pruned, "
        f"{result.trials['failed']} failed)",
        "registered knobs: " + ", ".join(f"{k}={_short(v)}" for k, v in result.best_params.items()),
        "",
        result.table(),
        "",
    ]
    if result.profile_ref:
        parent = f" (parent: {result.parent_ref})" if result.parent_ref else ""
        lines.append(f"registered profile {result.profile_ref}{parent}")
    if result.mlflow.get("run_id"):
        lines.append(f"MLflow run {result.mlflow['run_id']} in {result.mlflow['tracking_uri']}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
