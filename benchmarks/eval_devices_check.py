"""`dysco eval --devices A,B` against one process on the same examples: the merged report must be the same.

A tiny random llama with its tokenizer (`decoder.tiny`, written once into OUT/tiny-llama) is evaluated
twice from this checkout, with the same options: once in one process on `--one` (default cuda:0),
once sharded with `--devices` (default 0,1: this process on cuda:0, a worker on cuda:1, examples
round robin). Every example's responses and scores, per method, must be equal, and so must the
cells, the paired tests and the selection recall; timings are not compared. Batch size 1, so each
example is decoded alone in both runs (a sharded run batches other neighbours together).

    python3 benchmarks/eval_devices_check.py --out OUT/eval            # on two GPUs
    python3 benchmarks/eval_devices_check.py --out OUT/eval-fast --fast  # the fast path (CUDA graphs per GPU)
    python3 benchmarks/eval_devices_check.py --out /tmp/ev --one cpu --devices cpu,cpu   # the CPU dry run

Needs no `pip install`: `dysco eval` is built here from `calibration.evaluation.cli` (as
benchmarks/gpu_research_loop.sh does), and the cache and registry are folders under --out, so no
optuna, mlflow or platformdirs is imported. Prints PASS or FAIL (with the first differences) and
exits 0 or 1; writes OUT/check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADS = "1:0,2:3"  # the tiny llama's 4 layers × 4 heads: one head in each half of the model

# `dysco eval …` from a checkout that is not pip-installed (no entry points there).
DYSCO_EVAL = """
import argparse, sys
from calibration.evaluation.cli import register_cli
parser = argparse.ArgumentParser(prog='dysco')
register_cli(parser.add_subparsers(dest='command', required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(int(args.func(args) or 0))
"""


def write_tiny_checkpoint(folder: Path) -> None:
    """The tiny llama and its tokenizer as a checkpoint folder (kept when there already)."""
    if (folder / "config.json").is_file():
        return
    sys.path.insert(0, str(ROOT))
    from decoder.tiny import tiny_model

    model, tokenizer = tiny_model("llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def run_eval(argv: list[str], log: Path, env: dict) -> tuple[int, float]:
    """`dysco eval ARGV` in a fresh process, its output to `log`: (exit code, seconds)."""
    t0 = time.time()
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, "-c", DYSCO_EVAL, "eval", *argv], stdout=handle, stderr=subprocess.STDOUT,
                              env=env, cwd=ROOT)
    return done.returncode, time.time() - t0


def differences(one: dict, sharded: dict, limit: int = 10) -> list[str]:
    """What differs between two `dysco eval` reports (results.json), beyond timings: at most `limit` lines."""
    found: list[str] = []
    examples = {(e["task"], e["length"], e["index"]): e for e in one["examples"]}
    others = {(e["task"], e["length"], e["index"]): e for e in sharded["examples"]}
    if set(examples) != set(others):
        found.append(f"examples: one process has {sorted(set(examples) - set(others))[:5]} the sharded run lacks, "
                     f"the sharded run {sorted(set(others) - set(examples))[:5]}")
    for key in sorted(set(examples) & set(others)):
        a, b = examples[key], others[key]
        if a["id"] != b["id"]:
            found.append(f"{key}: example id {a['id']} vs {b['id']}")
        for field in ("responses", "scores", "new_tokens", "selection"):
            for method in sorted(set(a[field]) | set(b[field])):
                if a[field].get(method) != b[field].get(method):
                    found.append(f"{key} {method} {field}: {a[field].get(method)!r} vs {b[field].get(method)!r}")
    for field in ("cells", "paired", "selection"):
        if one.get(field) != sharded.get(field):
            found.append(f"{field}: differ ({json.dumps(one.get(field))[:200]} vs {json.dumps(sharded.get(field))[:200]})")
    return found[:limit]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the checkpoint, both reports, logs and check.json")
    parser.add_argument("--one", default="cuda:0", help="the one-process run's --device (default cuda:0)")
    parser.add_argument("--devices", default="0,1", help="the sharded run's --devices (default 0,1)")
    parser.add_argument("--fast", action="store_true", help="both runs on the fast path (--fast)")
    parser.add_argument("--tasks", default="needle,kv")
    parser.add_argument("--lengths", default="1k")
    parser.add_argument("--n", default="6", help="examples per task × length (default 6)")
    parser.add_argument("--max-new-tokens", default="4")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = out / "tiny-llama"
    write_tiny_checkpoint(model)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "DYSCO_CACHE": str(out / "cache"), "DYSCO_REGISTRY": str(out / "registry"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    common = ["--model", str(model), "--heads", HEADS, "--tasks", args.tasks, "--lengths", args.lengths,
              "--n", args.n, "--max-new-tokens", args.max_new_tokens, "--batch-size", "1", "--seed", "0",
              "--json", "--quiet", "--fresh"] + (["--fast"] if args.fast else [])
    runs = {"one": ["--device", args.one], "sharded": ["--devices", args.devices]}
    check: dict = {"one": args.one, "devices": args.devices, "fast": args.fast, "options": common}
    reports = {}
    for name, where in runs.items():
        code, seconds = run_eval([*common, *where, "--out", str(out / name)], out / f"{name}.log", env)
        check[f"{name}_exit"], check[f"{name}_s"] = code, round(seconds, 1)
        report = out / name / "results.json"
        if code == 0 and report.is_file():
            reports[name] = json.loads(report.read_text())
    label = f"dysco eval --devices {args.devices} vs --device {args.one}" + (" (--fast)" if args.fast else "")
    if len(reports) < 2:
        failed = [n for n in runs if n not in reports]
        check["verdict"] = "FAIL"
        check["differences"] = [f"the {n} run failed (exit {check[f'{n}_exit']}; see {out / (n + '.log')})" for n in failed]
    else:
        check["differences"] = differences(reports["one"], reports["sharded"])
        check["examples"] = len(reports["one"]["examples"])
        check["shards"] = reports["sharded"]["config"].get("shards")
        if check["shards"] != len(args.devices.split(",")):
            check["differences"].append(f"the sharded report says shards={check['shards']}")
        check["verdict"] = "FAIL" if check["differences"] else "PASS"
    (out / "check.json").write_text(json.dumps(check, indent=1) + "\n")
    detail = f"{check.get('examples', '?')} examples × {len(reports.get('one', {}).get('config', {}).get('methods', [])) or '?'} " \
             f"methods, one process {check['one_s']} s, sharded {check['sharded_s']} s"
    print(f"{check['verdict']}: {label}: {detail}")
    for line in check["differences"]:
        print(f"  {line}")
    return 0 if check["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
