"""`dysco eval`: the command line over `calibration.evaluation` (parsing, checks before the model
loads, files, MLflow). Registered on the umbrella `dysco` command through the `dysco.commands` entry
point; torch is imported only once the arguments have passed their checks, so `--help` stays fast."""

from __future__ import annotations

import argparse
import json
import math
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from calibration.evaluation.batches import ANSWER_MARGIN_TOKENS
from calibration.errors import CalibrationError
from calibration.evaluation.checkpoint import CHECKPOINT_NAME
from calibration.evaluation.inputs import (
    EvalError,
    check_intervention_warmup,
    check_lengths,
    load_profile,
    parse_heads,
    parse_lengths,
    parse_names,
    resolve_dysco,
    resolve_tasks,
)
from calibration.evaluation.report import log_to_mlflow
from calibration.evaluation.run import DEFAULT_ATTNTS_TEMPERATURE, evaluate
from calibration.tasks import TASK_NAMES, Task
from calibration.workers import WorkerProcesses, check_devices, die_with_parent, parse_devices
from decoder import METHODS
from decoder.cli_common import EXIT_RUNTIME, EXIT_USAGE, UsageError, check_model_options
from decoder import loading  # `loading.load_model`, looked up at call time: tests replace it to prove no model loads
from decoder.loading import checkpoint_on_disk, context_limit, model_name
from registry import InvalidReference, parse_ref


_EPILOG = """\
examples:
  dysco eval --model smollm2-135m --tasks needle,kv --lengths 2k --methods vanilla,dysco --n 8
  dysco eval --model smollm2-135m --heads 14:2,17:5 --tasks mrcr --lengths 2k,4k --n 20 --out eval/smollm2
  dysco eval --model ./my-checkpoint --profile my-model@3 --tasks pathtrans --lengths 4096 --n 50 --json
  dysco eval --model qwen2.5-coder-0.5b --device cuda --dtype bfloat16 --fast --batch-size 16 --tasks kv --lengths 16k
  dysco eval --model qwen3-8b --dtype bfloat16 --devices 0,1,2,3 --tasks mrcr --lengths 32k --n 100

Without --profile or --heads, dysco uses the registry's NAME@latest profile (from `headfinder` or
`calibrate`). Accuracy intervals are 95% percentile bootstraps of the mean (seeded); each method is
compared with vanilla on the same examples by a paired bootstrap of the mean difference and an
exact two-sided sign test; the report also says how much of each answer's evidence DySCO selected
(selection recall; on the exact path and on --fast alike). Writes results.md, results.json (per-example
scores, responses and selection) and accuracy.png into --out. An interrupted run resumes: the same command again reads the batches already
in --out's progress.jsonl back instead of decoding them (--fresh discards them).

--devices 0,1 splits the examples of every task × length over one process per device, round robin
by example index (this process takes examples 0, 2, 4 … on cuda:0, a worker 1, 3, 5 … on cuda:1);
each decodes its share with every method into its own progress file (progress.shard1of2.jsonl …),
and this process merges them in the original order into one report: the same accuracies, intervals
and paired tests as one process on the same examples. Rerun the same command to resume.
"""


def _arg(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def wrapped(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return wrapped


def _task_list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",")]
    resolve_tasks(names)  # unknown names fail while parsing, before the model loads
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise ValueError(f"must be an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a finite number > 0, got {text!r}")
    return value


def _devices(text: str) -> tuple[str, ...]:
    try:
        return parse_devices(text, allow_cpu=True)
    except CalibrationError as err:
        raise ValueError(str(err)) from None


def register_cli(subparsers: Any) -> None:
    """Add `dysco eval` to the umbrella command."""
    p = subparsers.add_parser(
        "eval",
        help="compare vanilla, AttnTS and DySCO on the same examples (accuracy with intervals, speed)",
        description="Run every decoding method on the same seeded examples of each task × context length; "
        "report accuracy with 95% bootstrap intervals, a paired test of each method vs vanilla, "
        "time to first token and decode tokens/s; write a markdown table, JSON and a plot.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m", help="catalogue name, local folder or .gguf, or Hub id (default: smollm2-135m)")
    heads = p.add_mutually_exclusive_group()
    heads.add_argument("--profile", metavar="REF", help="registry profile for dysco (NAME@latest, NAME@3, a hash); default: MODEL@latest")
    heads.add_argument("--heads", type=_arg(parse_heads), metavar="L:H,…", help="head set for dysco with the published knobs, e.g. 14:2,17:5")
    p.add_argument("--intervention-warmup", metavar="auto|N", default=None,
                   help="DySCO's intervention warmup: auto = the chat template's generation-prompt length, published "
                   "default; an integer otherwise (prompt tokens before the last one that already get a DySCO step). "
                   "Default: the profile's (auto with --heads)")
    p.add_argument("--tasks", type=_arg(_task_list), default=["needle", "kv"],
                   help=f"comma-separated: {', '.join(TASK_NAMES)}, or an MRCR file / Hub id (default: needle,kv)")
    p.add_argument("--lengths", type=_arg(parse_lengths), default=[2048], help="context lengths, e.g. 2k,4k,8k or 4096 (k = 1024; default: 2k)")
    p.add_argument("--methods", type=_arg(lambda t: parse_names(t, METHODS, "method")), default=list(METHODS),
                   help=f"comma-separated subset of {', '.join(METHODS)} (default: all)")
    p.add_argument("--n", type=_arg(_positive_int), default=8, help="examples per task × length (default: 8; ≥ 50 for intervals that mean much)")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples and the bootstrap (default: 0)")
    p.add_argument("--max-new-tokens", type=_arg(_positive_int), default=None,
                   help=f"new-token cap per example (default: its answer's length + {ANSWER_MARGIN_TOKENS})")
    p.add_argument("--attnts-temperature", type=_arg(_positive_float), default=None,
                   help=f"AttnTS attention temperature (default: the profile's tuned one, else {DEFAULT_ATTNTS_TEMPERATURE})")
    p.add_argument("--batch-size", type=_arg(_positive_int), default=1, help="prompts decoded together (default: 1)")
    p.add_argument("--fast", action="store_true",
                   help="decode on the fast path (static KV buffers, fused biased attention, CUDA graphs on one GPU; "
                   "same greedy tokens as the exact path; worth it on a GPU)")
    where = p.add_mutually_exclusive_group()
    # default None, not "cpu": argparse sees `--device cpu --devices …` as a conflict only when the value is not the default
    where.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cpu)")
    where.add_argument("--devices", type=_arg(_devices), default=None, metavar="D,…",
                       help="one process per device, each on its share of the examples (round robin), one report: "
                       "CUDA indices 0,1 or cuda:0,cuda:1 (after CUDA_VISIBLE_DEVICES), each at most once; "
                       "cpu may be listed several times (one CPU process each)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: the checkpoint's)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where results.md, results.json, accuracy.png go (default: eval-<model>); finished batches are "
                   f"kept in DIR/{CHECKPOINT_NAME}, so the same command run again resumes where it stopped")
    p.add_argument("--fresh", action="store_true", help=f"discard DIR/{CHECKPOINT_NAME} and decode everything again")
    p.add_argument("--tracking-uri", default=None, metavar="URI", help="log the run to this MLflow tracking store (e.g. sqlite:///mlflow.db)")
    p.add_argument("--registry", default=None, metavar="DIR", help="registry root (default: the user's registry)")
    p.add_argument("--force", action="store_true", help="use a profile even if its model fingerprint does not match (warns)")
    p.add_argument("--threads", type=_arg(_positive_int), default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    try:
        return _run_cli(args)
    except UsageError as err:
        print(f"dysco eval: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (EvalError, OSError, ConnectionError) as err:  # what the arguments name fails, or does not fit
        print(f"dysco eval: error: {err}", file=sys.stderr)
        return EXIT_RUNTIME


def _check_cli_arguments(args: argparse.Namespace) -> list[Task]:
    """Every check that needs no model, as a UsageError: a typo must not cost a model load."""
    try:
        tasks = resolve_tasks(args.tasks)
        if args.intervention_warmup is not None:
            args.intervention_warmup = check_intervention_warmup(args.intervention_warmup)
        if args.profile is not None:
            parse_ref(args.profile)
    except (EvalError, InvalidReference) as err:
        raise UsageError(str(err)) from None
    if args.devices is not None:
        try:
            check_devices(args.devices, allow_cpu=True)
        except CalibrationError as err:
            raise UsageError(str(err)) from None
        if len(args.devices) > args.n:
            raise UsageError(f"--devices gives {len(args.devices)} processes but --n is {args.n}: every process needs "
                             "an example; use fewer devices or more examples")
        args.device = args.devices[0]
    elif args.device is None:
        args.device = "cpu"
    check_model_options(args.device, args.dtype)
    if args.out is not None and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file; give a folder for results.md, results.json and accuracy.png")
    return tasks


def _check_lengths_on_disk(spec: str, lengths: Sequence[int], name: str) -> None:
    """The lengths against the model's context from its config alone, when the checkpoint is on disk already."""
    folder = checkpoint_on_disk(spec)
    if folder is None:
        return
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(folder)
    except Exception:  # remote code, a damaged file …: the model load reports it (or rebuilds the cache)
        return
    check_lengths(lengths, context_limit(config), name)


def _load(args: argparse.Namespace, name: str, profile: Any, profile_ref: Any) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The model on `args.device`, DySCO's config and the report's extra config (shared by the workers)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    loading.use_device(args.device)  # a --devices worker on cuda:1 runs its fast path there
    try:
        model, tokenizer = loading.load_model(args.model, dtype=args.dtype, device=args.device, progress=not args.quiet)
    except (ValueError, FileNotFoundError, OSError) as err:
        raise EvalError(f"cannot load model {args.model!r}: {err}") from None
    dysco = None
    extra: dict[str, Any] = {"model_spec": args.model}
    if args.devices is not None:
        extra["devices"] = list(args.devices)
    if "dysco" in args.methods:
        dysco, info = resolve_dysco(model, name, profile=profile, profile_ref=profile_ref, heads=args.heads,
                                    force=args.force, intervention_warmup=args.intervention_warmup)
        extra["dysco_resolved"] = info
        if args.attnts_temperature is None and "attnts_temperature" in info:
            args.attnts_temperature = info["attnts_temperature"]
            extra["attnts_temperature_from_profile"] = True
    return model, tokenizer, dysco, extra


def _evaluate(args: argparse.Namespace, tasks: list[Task], name: str, profile: Any, profile_ref: Any,
              **sharding: Any) -> tuple[Any, Path]:
    """Load, then `evaluate` with the command's options (and `sharding`'s): the report and the progress file."""
    model, tokenizer, dysco, extra = _load(args, name, profile, profile_ref)
    checkpoint = _out(args, name) / CHECKPOINT_NAME
    report = evaluate(
        model, tokenizer, tasks, args.lengths, args.methods, args.n, args.seed,
        dysco=dysco, attnts_temperature=args.attnts_temperature, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, model_name=name, progress=not args.quiet, extra_config=extra, fast=args.fast,
        checkpoint=checkpoint, fresh=args.fresh, **sharding,
    )
    return report, checkpoint


def _out(args: argparse.Namespace, name: str) -> Path:
    return Path(args.out) if args.out else Path(f"eval-{name}")


def _worker_command(args: argparse.Namespace, shard: int, session: str) -> list[str]:
    """The command line of the worker decoding shard `shard` of `args.devices` (`_run_worker`)."""
    options = {k: v for k, v in vars(args).items() if k != "func"}
    options.update(device=args.devices[shard], quiet=True, json=False, tracking_uri=None)
    payload = {"args": options, "shard": shard, "session": session}
    return [sys.executable, "-m", "calibration.evaluation.cli", "--worker", json.dumps(payload)]


def _run_worker(payload: str) -> int:
    """A `dysco eval --devices` worker: decode one shard into its progress file (the parent reports)."""
    die_with_parent()
    spec = json.loads(payload)
    args = argparse.Namespace(**spec["args"])
    if args.heads is not None:  # JSON made the (layer, head) pairs lists
        args.heads = [tuple(pair) for pair in args.heads]
    tasks = resolve_tasks(args.tasks)
    name = model_name(args.model)
    profile = profile_ref = None
    if "dysco" in args.methods and args.heads is None:
        profile_ref, profile = load_profile(name, args.profile, args.registry)
    _evaluate(args, tasks, name, profile, profile_ref, shards=len(args.devices), shard=spec["shard"],
              session=spec["session"])
    return 0


def _run_cli(args: argparse.Namespace) -> int:
    tasks = _check_cli_arguments(args)
    name = model_name(args.model)
    # What the arguments name is read before the model loads too: the profile, the tracking server.
    profile = profile_ref = None
    if "dysco" in args.methods and args.heads is None:
        profile_ref, profile = load_profile(name, args.profile, args.registry)
    if args.tracking_uri:
        from calibration.tracking import check_reachable

        check_reachable(args.tracking_uri, advice="start it (`mlflow server`) or fix --tracking-uri")
    _check_lengths_on_disk(args.model, args.lengths, name)

    out = _out(args, name)
    if args.devices is None or len(args.devices) == 1:
        report, checkpoint = _evaluate(args, tasks, name, profile, profile_ref)
    else:
        # The workers start now, so that they load their models while this process loads its own.
        session = uuid.uuid4().hex
        shards = len(args.devices)
        workers = WorkerProcesses([_worker_command(args, shard, session) for shard in range(1, shards)])
        try:
            report, checkpoint = _evaluate(args, tasks, name, profile, profile_ref, shards=shards,
                                           before_merge=workers.wait, session=session)
        finally:
            workers.stop()
        checkpoint = checkpoint.with_name(f"{checkpoint.stem}.shard*of{shards}{checkpoint.suffix}")  # for the message
    if report.config["resumed_batches"] and not args.quiet:
        print(f"resumed: {report.config['resumed_batches']} finished batches read back from {checkpoint}", file=sys.stderr)
    files = report.save(out)
    if args.tracking_uri:
        report.config["mlflow_run_id"] = log_to_mlflow(report, args.tracking_uri, files)
        files["json"].write_text(report.to_json() + "\n", encoding="utf-8")
    if args.json:
        print(report.to_json())
    else:
        print(report.markdown())
        print(f"wrote {', '.join(str(p) for p in files.values())} in {report.seconds:.0f} s")
    return 0


if __name__ == "__main__":  # a `dysco eval --devices` worker: python -m calibration.evaluation.cli --worker JSON
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        sys.exit("usage: python -m calibration.evaluation.cli --worker JSON (started by `dysco eval --devices`)")
    sys.exit(_run_worker(sys.argv[2]))
