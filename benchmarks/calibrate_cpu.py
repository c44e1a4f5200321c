"""A 20-trial calibration of the embedded SmolLM2 on a small synthetic MRCR dev set, on CPU.

    .venv/bin/python benchmarks/calibrate_cpu.py            # ≤ 30 min on 2 cores is the target
    .venv/bin/python benchmarks/calibrate_cpu.py --trials 3 --out /tmp/smoke   # a quick check

Steps: (1) a head-set profile for smollm2-135m — the registry's latest, or a fresh `headfinder
detect` (QR probes) when there is none, timed apart; (2) `calibrate` as a subprocess, timed as a
whole (model load, baselines, trials, test re-scoring, registration, MLflow); (3) the MLflow
runs read back with `mlflow.search_runs`. Prints a table and writes it, with the date, the
machine and the command, to docs/calibrate_cpu.md (or --report).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"


def _run(cmd: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float]:
    print("$", shlex.join(cmd), file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, **kwargs)
    return done, time.perf_counter() - start


def _register_run(folder: Path, registry: Path) -> str:
    """Register a `headfinder detect` output folder (scores.safetensors, head_set.json) as a profile."""
    from safetensors.numpy import load_file

    from decoder.loading import load_model, model_identity
    from registry import Profile, Registry, collect_provenance

    heads = json.loads((folder / "head_set.json").read_text())["heads"]
    scores = {k: v for k, v in load_file(folder / "scores.safetensors").items() if "." not in k}
    model, _ = load_model(MODEL, progress=False)
    profile = Profile(model=model_identity(model, MODEL), head_set=[tuple(h) for h in heads], head_scores=scores,
                      provenance=collect_provenance(source=f"headfinder run {folder}"))
    return Registry(registry).register(profile)


def _head_profile(registry: Path, threads: int, heads_from: Path | None) -> tuple[str, float | None]:
    """The latest smollm2-135m profile in `registry`, detecting QR heads first when there is none."""
    from registry import ProfileNotFound, Registry

    try:
        name, version = Registry(registry).resolve(MODEL)
        if version != "seed":
            return f"{name}@{version}", None
    except ProfileNotFound:
        pass
    if heads_from is not None:
        return _register_run(heads_from, registry), None
    cmd = [sys.executable, "-m", "headfinder.cli", "detect", "--model", MODEL, "--probes", "qr",
           "--n-probes", "8", "--context", "1024", "--top", "16", "--register", "--registry", str(registry),
           "--threads", str(threads), "--out", str(registry.parent / "headfinder"), "--json", "--no-progress"]
    done, seconds = _run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"headfinder failed:\n{done.stderr[-3000:]}")
    name, version = Registry(registry).resolve(MODEL)
    return f"{name}@{version}", seconds


def _mlflow_runs(tracking_uri: str, parent_run_id: str) -> tuple[int, int]:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    runs = mlflow.search_runs(experiment_names=["dysco-calibration"], output_format="list")
    parents = [r for r in runs if r.info.run_id == parent_run_id]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_run_id]
    return len(parents), len(nested)


def main() -> int:
    """Run the benchmark and write its report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dev", default="mrcr", help="dev task (default: %(default)s); e.g. kv, which small models can score on")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--examples", type=int, default=4, help="dev examples (default: %(default)s)")
    p.add_argument("--test-examples", type=int, default=2)
    p.add_argument("--context", type=int, default=1024, help="MRCR prompt tokens (default: %(default)s)")
    p.add_argument("--needles", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=2)
    # One thread: on a shared 2-core box two OpenMP threads per process spin against other work
    # (measured 4-6x slower per token under load); on an idle machine try --threads 2.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "dysco-calibrate-cpu",
                   help="working folder: study, MLflow store, registry (default: %(default)s)")
    p.add_argument("--registry", type=Path, help="registry folder (default: OUT/registry)")
    p.add_argument("--heads-from", type=Path, metavar="DIR",
                   help="a `headfinder detect` output folder to start from instead of running headfinder")
    p.add_argument("--fresh", action="store_true", help="delete the study and MLflow store first")
    p.add_argument("--report", type=Path, default=ROOT / "docs" / "calibrate_cpu.md")
    args = p.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    storage, tracking = args.out / "calibration.db", args.out / "mlflow.db"
    if args.fresh:
        for path in (storage, tracking):
            path.unlink(missing_ok=True)
    registry = args.registry or args.out / "registry"
    profile, headfinder_s = _head_profile(registry, args.threads, args.heads_from)

    cmd = [
        sys.executable, "-m", "calibration.cli", "--dev", args.dev, "--model", MODEL, "--profile", profile,
        "--trials", str(args.trials), "--examples", str(args.examples), "--test-examples", str(args.test_examples),
        "--context", str(args.context), *(["--needles", str(args.needles)] if args.dev == "mrcr" else []),
        "--max-new-tokens", str(args.max_new_tokens),
        "--batch-size", str(args.batch_size), "--threads", str(args.threads),
        "--storage", f"sqlite:///{storage}", "--tracking-uri", f"sqlite:///{tracking}",
        "--registry", str(registry), "--json",
    ]
    load_before = os.getloadavg()
    done, seconds = _run(cmd, stdout=subprocess.PIPE, text=True)
    load_after = os.getloadavg()
    if done.returncode != 0:
        sys.exit(f"calibrate failed with code {done.returncode}")
    result = json.loads(done.stdout)
    parents, nested = _mlflow_runs(f"sqlite:///{tracking}", result["mlflow"]["run_id"])

    rows = [("vanilla", "vanilla"), (f"AttnTS T={result['attnts_temperature']:g}", "attnts"),
            (f"DySCO tuned (trial {result['best_trial']})", "dysco")]
    table = ["| method | dev | test | tokens/s |", "|---|---:|---:|---:|"]
    for label, key in rows:
        table.append(f"| {label} | {result['scores']['dev'][key]:.3f} | {result['scores']['test'][key]:.3f} "
                     f"| {result['tokens_per_s'][key]:.2f} |")
    trials = result["trials"]
    summary = [
        f"- calibration wall time: **{seconds / 60:.1f} min** for {trials['finished']} trials "
        f"({trials['complete']} complete, {trials['pruned']} pruned, {trials['failed']} failed); target ≤ 30 min",
        f"- head-set profile: {profile}" + (f" (headfinder: {headfinder_s / 60:.1f} min, not counted)" if headfinder_s else ""),
        f"- registered: {result['profile_ref']} (parent {result['parent_ref']})",
        f"- MLflow: {parents} parent run, {nested} nested trial runs in sqlite:///{tracking}",
        f"- best knobs: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in result["best_params"].items()),
    ]
    machine = f"{platform.node()} — {platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
              f"Python {platform.python_version()}; load average (1 min) {load_before[0]:.1f} before, " \
              f"{load_after[0]:.1f} after"
    report = "\n".join([
        f"# Calibration on CPU: SmolLM2-135M, {args.dev}",
        "",
        f"Date: {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}  ",
        f"Machine: {machine}  ",
        f"Command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`  ",
        f"Calibrate: `{shlex.join(['calibrate', *cmd[3:]])}`",
        "",
        *summary,
        "",
        *table,
        "",
    ])
    print(report)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
