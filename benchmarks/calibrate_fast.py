"""What the shared prefill and the fast path save in a calibration study (issue 12).

Runs the same short study (`calibration.study.calibrate`, in this process, seeded) four times — exact
or fast decoding path, each with its per-batch prefill shared by every trial (what `calibrate` does)
or redone for every evaluation (`--sharing none`: the runner's prefill cache is emptied before each
evaluation, as if there were none) — and prints how long the dev prefills, the baselines (vanilla and
the AttnTS grid) and the trials took, and whether every variant gave the same per-example trial
scores as the first. The model is loaded once; each variant has its own study in a temporary sqlite
file; no MLflow, nothing registered.

    # this CPU: SmolLM2 at ~1.5K tokens
    .venv/bin/python benchmarks/calibrate_fast.py --model smollm2-135m --task kv --context 1536 \\
        --examples 4 --batch-size 2 --trials 4 --max-new-tokens 8
    # a GPU: the issue's target shape (qwen2.5-coder-0.5b at 16K, 24 dev examples, batch 8)
    python benchmarks/calibrate_fast.py --model qwen2.5-coder-0.5b --task kv --context 16384 --examples 24 \\
        --batch-size 8 --trials 30 --device cuda --dtype bfloat16 --paths fast --sharing shared

Head ranking: the model's latest registry profile (a seed profile for the catalogue models), or --heads.
Prints a markdown table; --report FILE also writes it there with the date, machine and command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    load = os.getloadavg()[0]
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"load average {load:.1f} at the end")


def main(argv: list[str] | None = None) -> int:
    """Run the variants and print (and optionally write) the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="kv", help="dev task (default: %(default)s)")
    p.add_argument("--context", type=int, default=1536)
    p.add_argument("--examples", type=int, default=4, help="dev examples (default: %(default)s)")
    p.add_argument("--test-examples", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--heads", help="ranked heads L:H,… instead of the registry's latest profile")
    p.add_argument("--paths", default="exact,fast", help="decoding paths to run: exact, fast or both")
    p.add_argument("--sharing", default="shared,none", help="prefill sharing to run: shared, none or both")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    # One thread on a shared 2-core box (two OpenMP threads spin against other work); try 2 when idle.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", type=Path, help="also write the table (with date, machine, command) here")
    args = p.parse_args(argv)

    import optuna

    import calibration.runner as runner_module
    import decoder.loading as loading
    from calibration.study import CalibrationConfig, calibrate, parse_heads

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # One model load for all variants (each `calibrate` loads it otherwise).
    loading.load_model = functools.lru_cache(maxsize=1)(loading.load_model)
    loading.load_model(args.model, device=args.device, dtype=args.dtype, progress=False)  # as `calibrate` calls it

    # Time every evaluation, by runner (the first a study makes is its dev runner) and method.
    Runner = runner_module.ExampleRunner
    original_evaluate = Runner.evaluate
    log: list[tuple[int, str, float]] = []
    runners: list = []
    clear_before = {"on": False}

    def evaluate(self, method, on_batch=None):
        if self not in runners:
            runners.append(self)
        if clear_before["on"]:
            self._prefills.clear()  # no sharing: this evaluation prefills every batch again
        start = time.perf_counter()
        try:
            return original_evaluate(self, method, on_batch)
        finally:
            log.append((runners.index(self), method.name, time.perf_counter() - start))

    Runner.evaluate = evaluate

    paths = [x for x in args.paths.split(",") if x]
    sharings = [x for x in args.sharing.split(",") if x]
    if not set(paths) <= {"exact", "fast"} or not set(sharings) <= {"shared", "none"}:
        p.error("--paths takes exact,fast and --sharing shared,none")
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            for sharing in sharings:
                log.clear(), runners.clear()
                clear_before["on"] = sharing == "none"
                config = CalibrationConfig(
                    dev=args.task, model=args.model, heads=parse_heads(args.heads) if args.heads else None,
                    trials=args.trials, examples=args.examples, test_examples=args.test_examples,
                    context=args.context, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    storage=f"sqlite:///{tmp}/{path}-{sharing}.db", tracking=False, register=False,
                    registry=os.environ.get("DYSCO_REGISTRY"), attnts_temperatures=(0.9,), threads=args.threads,
                    device=args.device, dtype=args.dtype, fast=path == "fast",
                )
                print(f"[{path}, prefill {sharing}] calibrate …", file=sys.stderr, flush=True)
                start = time.perf_counter()
                result = calibrate(config)
                whole = time.perf_counter() - start
                study = optuna.load_study(study_name=result.study_name, storage=config.storage)
                trials = [(t.params, t.user_attrs.get("scores")) for t in study.trials]
                if reference is None:
                    reference = trials
                dev = [(method, s) for index, method, s in log if index == 0]
                row = {
                    "path": path, "sharing": sharing,
                    "prefill_s": runners[0].prefill_seconds if runners else 0.0,
                    "baselines_s": sum(s for m, s in dev if m != "dysco"),
                    "trials_s": sum(s for m, s in dev if m == "dysco"),
                    "n_trials": sum(m == "dysco" for m, _ in dev),
                    "test_s": sum(s for index, _, s in log if index > 0),
                    "whole_s": whole, "same": trials == reference,
                }
                rows.append(row)
                print(f"  {row}", file=sys.stderr, flush=True)

    table = [
        "| path | prefill | dev prefills s | baselines s | trials s | s / trial | test s | calibrate s | "
        "trials as the first row |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        per = r["trials_s"] / r["n_trials"] if r["n_trials"] else float("nan")
        table.append(
            f"| {r['path']} | {'shared' if r['sharing'] == 'shared' else 'per evaluation'} | {r['prefill_s']:.1f} | "
            f"{r['baselines_s']:.1f} | {r['trials_s']:.1f} | {per:.2f} | {r['test_s']:.1f} | {r['whole_s']:.1f} | "
            f"{'same params and scores' if r['same'] else 'DIFFERENT'} |")
    command = shlex.join(["python", "benchmarks/calibrate_fast.py", *(argv if argv is not None else sys.argv[1:])])
    text = "\n".join([
        f"{dt.datetime.now().strftime('%Y-%m-%d %H:%M')}, {_machine(args.device)}; {args.model}, "
        f"{args.task} at {args.context} tokens, {args.examples} dev examples in batches of {args.batch_size}, "
        f"{args.trials} trials, {args.max_new_tokens} new tokens.",
        f"Command: `{command}`",
        "",
        *table,
        "",
        "Dev prefills: the seconds the dev runner spent prefilling (once per batch when shared, in every "
        "evaluation otherwise; inside the baselines and trials columns). Trials: the DySCO evaluations on dev; "
        "baselines: vanilla and AttnTS on dev (once per study); test: the held-out re-scoring; calibrate: the "
        "whole call (the model was loaded before, once).",
    ])
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
    return 0 if all(r["same"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
