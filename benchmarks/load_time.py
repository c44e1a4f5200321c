"""Load time of a catalogue model on this machine: cold process vs. modules already imported.

    python benchmarks/load_time.py [--model smollm2-135m] [--repeats 5]

Each repeat is a fresh Python process, so the page cache is warm but no module is imported. The
table is printed and appended, with date, machine and command, to docs/load_time.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, transformers  # noqa: F401  (the import cost every CLI call pays)
t1 = time.perf_counter()
from decoder.loading import load_model
model, tokenizer = load_model(sys.argv[1], progress=False)
t2 = time.perf_counter()
model, tokenizer = load_model(sys.argv[1], progress=False)
t3 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "first_load": t2 - t1, "second_load": t3 - t2, "cold_total": t2 - t0}))
"""


def main() -> None:
    """Measure and record the load times."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "load_time.md"))
    args = parser.parse_args()

    runs = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", _CHILD, args.model], check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    keys = ("imports", "first_load", "second_load", "cold_total")
    rows = [(k, statistics.median(r[k] for r in runs), min(r[k] for r in runs), max(r[k] for r in runs)) for k in keys]
    load = os.getloadavg()[0]
    table = ["| what | median s | min s | max s |", "|---|---:|---:|---:|"]
    table += [f"| {k} | {m:.2f} | {lo:.2f} | {hi:.2f} |" for k, m, lo, hi in rows]
    header = (
        f"\n## {args.model}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
        f"machine: {platform.node()} ({os.cpu_count()} cores, load average {load:.1f} at the end), "
        f"python {platform.python_version()}; command: `python benchmarks/load_time.py "
        f"--model {args.model} --repeats {args.repeats}`\n\n"
        "`first_load` is `load_model` once torch and transformers are imported; `second_load` the same call again "
        "in that process; `cold_total` a fresh process from start to loaded model.\n\n"
    )
    text = header + "\n".join(table) + "\n"
    print(text)
    path = Path(args.out)
    if not path.exists():
        path.write_text("# Model load time (CPU)\n")
    with path.open("a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
