"""The headfinder's must-show figures on the embedded SmolLM2, on this CPU (issue 4).

    python benchmarks/headfinder_cpu.py                       # everything, with the CLI's defaults
    python benchmarks/headfinder_cpu.py --threads 1 --workdir /tmp/hf --reuse

Runs, as a user would:
1. `headfinder detect --model smollm2-135m` with its defaults, seed 0 (time target ≤ 10 min);
2. the same with seed 1, a disjoint probe set;
3. `headfinder compare` of the two (target: ≥ 10 of the top 16 shared);
4. `headfinder validate --from <seed-0 run>` (target: ablating the top 16 drops needle accuracy ≥ 3× more
   than 16 random heads, mean of 5 draws).
Each step's wall time and CPU time are recorded with the machine's load average: on a shared machine
the CPU time of a one-thread run is what the wall time would be on an idle core. Prints a Markdown
table and writes it (date, machine, command) into docs/headfinder.md between its benchmark markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- headfinder_cpu:begin -->", "<!-- headfinder_cpu:end -->"


def _headfinder() -> list[str]:
    exe = Path(sys.executable).with_name("headfinder")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "headfinder.cli"]


def run_step(name: str, argv: list[str], workdir: Path) -> dict:
    """Run one headfinder command; record its wall and CPU seconds (kept in WORKDIR/timings.json)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    print(f"[{name}] headfinder {' '.join(argv)}", flush=True)
    done = subprocess.run(_headfinder() + argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-3000:])
        raise SystemExit(f"step {name} failed with exit status {done.returncode}")
    record = {"wall_s": round(wall, 1), "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
              "load_avg_at_start": round(load, 1), "command": "headfinder " + " ".join(argv)}
    timings_path = workdir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    timings[name] = record
    timings_path.write_text(json.dumps(timings, indent=2))
    return json.loads(done.stdout)


def _recorded(workdir: Path, name: str, fallback_s: float | None) -> dict:
    timings_path = workdir / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    return timings.get(name, {"wall_s": fallback_s, "cpu_s": None, "load_avg_at_start": None,
                              "command": "(reused; time from the run's own summary)"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/out/headfinder_cpu"))
    parser.add_argument("--threads", type=int, default=None, help="passed to every headfinder command")
    parser.add_argument("--reuse", action="store_true", help="keep steps whose outputs already exist in --workdir")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "headfinder.md")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    common = ["--model", args.model, "--json", "--no-progress"] + (["--threads", str(args.threads)] if args.threads else [])

    runs = {}
    for seed in (0, 1):
        out = args.workdir / f"seed{seed}"
        name = f"detect seed {seed}"
        if args.reuse and (out / "summary.json").exists():
            summary = json.loads((out / "summary.json").read_text())
            runs[seed] = (summary, _recorded(args.workdir, name, summary["timings"]["total_s"]))
        else:
            result = run_step(name, ["detect", *common, "--seed", str(seed), "--out", str(out)], args.workdir)
            runs[seed] = (result["summary"], _recorded(args.workdir, name, None))
    compare = subprocess.run(_headfinder() + ["compare", str(args.workdir / "seed0"), str(args.workdir / "seed1"),
                                              "--json"], capture_output=True, text=True, check=True)
    stability = json.loads(compare.stdout)

    validate_path = args.workdir / "validate.json"
    if args.reuse and validate_path.exists():
        validation = json.loads(validate_path.read_text())
        validate_time = _recorded(args.workdir, "validate", validation.get("time_s"))
    else:
        validation = run_step("validate", ["validate", *common, "--from", str(args.workdir / "seed0"),
                                           "--out", str(validate_path)], args.workdir)
        validate_time = _recorded(args.workdir, "validate", None)

    summary0, time0 = runs[0]
    summary1, time1 = runs[1]
    random_mean = sum(validation["random_accuracies"]) / len(validation["random_accuracies"])
    ratio = validation["ratio"]
    ratio_text = "∞ (random heads cost nothing)" if ratio == "inf" else ratio if isinstance(ratio, str) else f"{ratio:.1f}×"

    def t(rec: dict) -> str:
        cpu = f", CPU {rec['cpu_s']:.0f} s" if rec.get("cpu_s") is not None else ""
        load = f", load avg {rec['load_avg_at_start']}" if rec.get("load_avg_at_start") is not None else ""
        return f"{rec['wall_s']:.0f} s wall{cpu}{load}" if rec.get("wall_s") is not None else "n/a"

    d = summary0
    rows = [
        ("`detect` with defaults (seed 0): time", t(time0), "≤ 10 min",
         "met" if time0["wall_s"] is not None and time0["wall_s"] <= 600 else "see note"),
        ("  defaults", f"{d['probes']} probes, {d['n_probes']} of each, ≤ {d['context']} tokens, top {d['top']}", "", ""),
        ("  QR / needle scoring (s)", f"{d['timings'].get('qr_s')} / {d['timings'].get('needle_s')}", "", ""),
        ("`detect` seed 1: time", t(time1), "", ""),
        ("stability seed 0 vs 1 (QR, top 16)", f"{stability['top_k_shared']}/16 shared, Spearman {stability['spearman']:.3f}",
         "≥ 10/16", "met" if stability["top_k_shared"] >= 10 else "NOT met"),
        ("split-half stability within seed 0", f"{d['split_half_stability']['top_k_shared']}/16, Spearman "
         f"{d['split_half_stability']['spearman']:.3f}", "", ""),
        ("needle retrieval in detect (seed 0 / 1)", f"{d['needle_probes']['succeeded']}/{d['n_probes']} / "
         f"{summary1['needle_probes']['succeeded']}/{summary1['n_probes']}; heads with retrieval score > 0.1: "
         f"{d['needle_probes']['heads_above_0.1']} of {d['layers'] * d['heads']}", "", ""),
        ("validate: needle accuracy, no ablation", f"{validation['baseline_accuracy']:.3f}", "", ""),
        ("validate: top 16 (QR) zeroed", f"{validation['ablated_accuracy']:.3f} (drop {validation['drop']:.3f})", "", ""),
        ("validate: 16 random heads zeroed", f"{random_mean:.3f} (drop {validation['random_drop']:.3f}; draws "
         + ", ".join(f"{a:.2f}" for a in validation["random_accuracies"]) + ")", "", ""),
        ("validate: drop ratio", ratio_text, "≥ 3×",
         "met" if ratio == "inf" or (not isinstance(ratio, str) and ratio >= 3) else "NOT met"),
        ("validate: setup and time", f"{validation['n_probes']} needle probes ≤ {validation['context_tokens']} tokens, "
         f"seed {validation['seed']}; {t(validate_time)}", "", ""),
    ]
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "python benchmarks/headfinder_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    machine = f"{platform.node()}, {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}"
    table = ["| figure | measured | target | |", "|---|---|---|---|"] + [f"| {a} | {b} | {c} | {e} |" for a, b, c, e in rows]
    top = ", ".join(f"({l},{h})" for l, h in summary0["head_set"])
    block = "\n".join([BEGIN, f"Measured {stamp} on {machine}; `{command}`; model {args.model}, threads "
                       f"{summary0.get('threads')}.", "", *table, "", f"Top 16 QR heads (seed 0): {top}", END])
    print(block)
    if args.docs is not None:
        text = args.docs.read_text() if args.docs.exists() else ""
        if BEGIN in text and END in text:
            text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        args.docs.write_text(text)
        print(f"written into {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
