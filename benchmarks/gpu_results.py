"""Qwen2.5-Coder-0.5B on the GPU: detect its QR heads, then `evaluate` vanilla, AttnTS and DySCO at 8K–32K.

The GPU machine has no network, so the run is prepared here and sent in pieces (docs/results.md has
the whole recipe and the figures it produced):

    # here, on the CPU: the GGUF in <= 60 MB pieces (git-ignored), the examples, the wheels
    split -b 60000000 -d -a 2 ~/.cache/dysco-toolkit/models/qwen2.5-coder-0.5b/source/*.gguf .gguf_parts/part
    .venv/bin/python benchmarks/gpu_results.py prepare --gguf ~/.cache/.../qwen2.5-coder-0.5b-instruct.gguf \
        --tasks mrcr,kv --out .gpu_inputs/examples.jsonl.gz
    # there, on the GPU: join the pieces, check the sha256, load in bf16, detect heads, evaluate
    python benchmarks/gpu_results.py run --parts /tmp/q --examples .gpu_inputs/examples.jsonl.gz \
        --tasks kv,mrcr --batch-sizes 8k:50,16k:25,32640:13 --out $OUT
    # a dry run of the same code on the CPU with any small GGUF split the same way (SmolLM2 here)
    .venv/bin/python benchmarks/gpu_results.py run --parts /tmp/parts --gguf-name SmolLM2-135M-Instruct.Q4_1.gguf \
        --sha256 <hex> --size <bytes> --model-name smollm2-135m --device cpu --dtype float32 \
        --tasks kv --lengths 1k --n 2 --batch-sizes 2 --probes 4 --probe-length 512 --top-k 8 --out /tmp/dry
    # rebuild results.md and accuracy.png from a run's results.json
    .venv/bin/python benchmarks/gpu_results.py render docs/results/qwen2.5-coder-0.5b-gpu

`run` writes into --out, rewriting after every finished task × length so that a run stopped at its
time limit still returns what finished: results.json (`EvalReport.to_dict()` of everything finished
so far), results.md and accuracy.png (tasks may have different lengths when the budget stopped the
run), heads.json (the detected head set and how it was found). It
checks a time budget (--budget-s) before every task × length: when the next one, estimated from the
ones already measured, would not fit, it runs it with fewer examples (never fewer than --min-n) or
skips it, and says so in the log and in results.json's config.

Nothing here imports optuna or mlflow (not on the GPU machine): `calibration.evaluation` and
`headfinder` are imported module by module, never through `calibration.study`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

MODEL_NAME = "qwen2.5-coder-0.5b"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct.gguf"
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_SIZE = 491_400_064
# The model's context is 32,768 tokens; a "32K" prompt must leave room for the answer (MRCR: up to
# ~70 answer tokens + 24 of margin), so the longest length is 32K minus 128.
DEFAULT_LENGTHS = "8k,16k,32640"
T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {message}", flush=True)


# ---------------------------------------------------------------------------------------- inputs


def join_parts(parts_dir: Path, target: Path, sha256: str | None, size: int | None) -> Path:
    """Concatenate parts_dir/part* (sorted) into `target` and check its size and sha256."""
    parts = sorted(p for p in parts_dir.iterdir() if p.name.startswith("part"))
    if not parts:
        raise SystemExit(f"no part* files in {parts_dir}")
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    got = target.stat().st_size
    log(f"joined {len(parts)} parts ({', '.join(p.name for p in parts)}) into {target}: {got:,} bytes, sha256 {digest.hexdigest()}")
    if size is not None and got != size:
        raise SystemExit(f"joined file has {got:,} bytes, expected {size:,}: a part is missing or truncated")
    if sha256 is not None and digest.hexdigest() != sha256:
        raise SystemExit(f"sha256 mismatch: got {digest.hexdigest()}, expected {sha256}")
    return target


def save_example_sets(path: Path, sets: dict[tuple[str, int], list[Any]], seed: int) -> None:
    """One JSON line per example: {"task", "length", "seed", "example"} (gzip when path ends in .gz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for (task, length), examples in sets.items():
            for example in examples:
                fh.write(json.dumps({"task": task, "length": length, "seed": seed, "example": example.to_dict()}, ensure_ascii=False) + "\n")


def load_example_sets(path: Path) -> tuple[dict[tuple[str, int], list[Any]], int | None]:
    from calibration.tasks.base import Example

    opener = gzip.open if path.suffix == ".gz" else open
    sets: dict[tuple[str, int], list[Any]] = {}
    seed = None
    with opener(path, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            record = json.loads(line)
            seed = record["seed"]
            sets.setdefault((record["task"], int(record["length"])), []).append(
                Example.from_dict(record["example"], where=f"{path}:{number}")
            )
    return sets, seed


class StoredTask:
    """A task whose examples were generated beforehand (same tokenizer, same seed); grading is the task's own.

    Synthetic examples at 32K cost seconds each to size on one CPU core; generating them here spares
    that device time. `generate` falls back to the real task for anything not stored.
    """

    def __new__(cls, base, stored: dict[int, list[Any]], seed: int | None):
        from calibration.tasks.base import Task

        class _Stored(Task):
            name = base.name
            description = base.description

            def _generate(self, tokenizer, n, context_tokens, seed_):
                examples = stored.get(context_tokens)
                if examples is not None and seed_ == seed and n <= len(examples):
                    return list(examples[:n])
                log(f"{base.name} {context_tokens}: not stored (n={n}, seed={seed_}); generating on this machine")
                return base.generate(tokenizer, n, context_tokens, seed_)

            def grade(self, response, example):
                return base.grade(response, example)

        return _Stored()


# ---------------------------------------------------------------------------------------- heads


def detect_heads(model, tokenizer, probes: int, length: int, seed: int, k: int) -> dict[str, Any]:
    """Top-k QR heads over `probes` query-focused probes, with split-half stability."""
    import torch

    from headfinder.head_sets import stability_report, top_k_heads
    from headfinder.probes import make_qr_probes
    from headfinder.scores import qr_scores

    started = time.perf_counter()
    probe_set = make_qr_probes(tokenizer, probes, length, seed=seed)
    made = time.perf_counter() - started
    result = qr_scores(model, probe_set, progress=False)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    heads = top_k_heads(result.qr, k)
    half = probes // 2
    stability = None
    if half >= 1:
        stability = stability_report(result.per_probe_qr[:half].mean(0), result.per_probe_qr[half:].mean(0), k=k)
        stability = {key: (float(v) if isinstance(v, (int, float)) else v) for key, v in stability.items()
                     if isinstance(v, (int, float, str, list))}
    return {
        "heads": [list(h) for h in heads],
        "qr_scores": [round(float(result.qr[layer, head]), 6) for layer, head in heads],
        "ndcg": [round(float(result.ndcg[layer, head]), 6) for layer, head in heads],
        "probes": probes,
        "probe_tokens": [len(p.query_ids) for p in probe_set],
        "probe_length": length,
        "seed": seed,
        "top_k": k,
        "split_half_stability": stability,
        "seconds_probes_built": round(made, 2),
        "seconds": round(time.perf_counter() - started, 2),
        "method": "headfinder.qr_scores (QR score, Zhang et al. 2025) over make_qr_probes; top_k_heads",
    }


# ---------------------------------------------------------------------------------------- reports


def merge_reports(reports: list[Any]):
    """One EvalReport from several (disjoint task × length units, same methods and seed)."""
    from calibration.evaluation import EvalReport, SpeedResult

    first = reports[0]
    config = dict(first.config)
    config["tasks"] = list(dict.fromkeys(t for r in reports for t in r.config["tasks"]))
    config["lengths"] = sorted({length for r in reports for length in r.config["lengths"]})
    units = {f"{r.config['tasks'][0]}@{r.config['lengths'][0]}": r for r in reports}
    config["n"] = min(r.config["n"] for r in reports)
    config["n_per_unit"] = {k: r.config["n"] for k, r in units.items()}
    config["batch_size_per_unit"] = {k: r.config["batch_size"] for k, r in units.items()}
    config["seconds_per_unit"] = {k: r.config.get("unit_seconds") for k, r in units.items()}
    config["peak_gib_per_unit"] = {k: r.config.get("peak_gib") for k, r in units.items()}
    # Speed rows are per method × length, pooled over the tasks of that length: pool the units again.
    speed = []
    for method in config["methods"]:
        for length in config["lengths"]:
            parts = [s for r in reports for s in r.speed if (s.method, s.length) == (method, length)]
            if not parts:
                continue
            batches = sum(s.batches for s in parts)
            seconds = sum(s.seconds for s in parts)
            tokens = sum(s.new_tokens for s in parts)
            ttft_sum = sum(s.ttft_s * s.batches for s in parts)
            after_first = seconds - ttft_sum
            decode_tokens = sum(s.decode_tokens_per_s * (s.seconds - s.ttft_s * s.batches) for s in parts)
            speed.append(SpeedResult(
                method=method, length=length, batches=batches, new_tokens=tokens, seconds=seconds,
                ttft_s=ttft_sum / batches if batches else 0.0,
                decode_tokens_per_s=decode_tokens / after_first if after_first > 0 else 0.0,
                tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
            ))
    return EvalReport(
        config=config,
        cells=[c for r in reports for c in r.cells],
        paired=[p for r in reports for p in r.paired],
        speed=speed,
        examples=[e for r in reports for e in r.examples],
        seconds=sum(r.seconds for r in reports),
        selection=[s for r in reports for s in r.selection],
    )


def render(out: Path, report) -> None:
    """results.md and accuracy.png from a (merged) report, atomically."""
    tmp = out / "results.md.tmp"
    tmp.write_text(report.markdown(), encoding="utf-8")
    os.replace(tmp, out / "results.md")
    try:
        report.plot(out / "accuracy.tmp.png")
        os.replace(out / "accuracy.tmp.png", out / "accuracy.png")
    except Exception as err:  # a plot must never cost the numbers
        log(f"plot failed: {type(err).__name__}: {err}")


def write_outputs(out: Path, reports: list[Any], meta: dict[str, Any]):
    """results.json / results.md / accuracy.png for everything finished so far (atomic rewrites)."""
    out.mkdir(parents=True, exist_ok=True)
    report = merge_reports(reports)
    report.config["gpu_results"] = meta
    tmp = out / "results.json.tmp"
    tmp.write_text(report.to_json() + "\n", encoding="utf-8")
    os.replace(tmp, out / "results.json")
    try:
        render(out, report)
    except Exception as err:  # the JSON above holds everything; never stop the run for a table
        log(f"rendering results.md failed: {type(err).__name__}: {err}")
    return report


# ---------------------------------------------------------------------------------------- timing hooks


class Timings:
    """`evaluate`'s hooks: per-method times per unit (`on_batch`), each example's ids encoded once (`prompt_ids`)."""

    def __init__(self) -> None:
        self.memo: dict[str, tuple[list[int], list[bool]]] = {}
        self.units: list[dict[str, Any]] = []
        self.current = ""
        self.first = 0  # self.units[self.first:] belong to the unit being evaluated

    def begin(self, label: str) -> None:
        """Start timing a new task × length unit (or a retry of one)."""
        self.current, self.first = label, len(self.units)

    def prompt_ids(self, tokenizer, example):
        """`calibration.evaluation.prompt_ids`, once per example: the exact and fast paths share the encoding."""
        from calibration.evaluation import prompt_ids

        key = example.id
        if key not in self.memo:
            self.memo[key] = prompt_ids(tokenizer, example)
        return self.memo[key]

    def on_batch(self, done) -> None:
        """Add one decoded batch (a `calibration.evaluation.BatchDone`) to its method's line of the unit."""
        if done.resumed:
            return
        unit = next((u for u in self.units[self.first:] if u["method"] == done.method), None)
        if unit is None:
            unit = {"unit": self.current, "method": done.method, "rows": 0, "steps": 0, "seconds": 0.0,
                    "prefill_s": 0.0, "decode_s": 0.0, "batches": 0, "tokens": 0, "scores": []}
            self.units.append(unit)
        timing = done.run.timings[0]  # includes the shared prefill this method continued from, if any
        unit["rows"] += len(done.examples)
        unit["steps"] += done.budget
        unit["seconds"] += timing.seconds
        unit["prefill_s"] += timing.ttft_s
        unit["decode_s"] += timing.seconds - timing.ttft_s
        unit["batches"] += 1
        unit["tokens"] += timing.new_tokens
        unit["scores"] += done.run.scores

    def log_unit(self) -> None:
        """One line per method of the unit just finished."""
        import torch

        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        for u in self.units[self.first:]:
            mean = sum(u["scores"]) / max(1, len(u["scores"]))
            log(f"  {u['unit']} {u['method']:8s}: {u['rows']} rows in {u['batches']} batches, {u['seconds']:6.1f} s "
                f"(TTFT sum {u['prefill_s']:5.1f} s, decode {u['decode_s']:5.1f} s, {u['tokens']} tokens), "
                f"mean score {100 * mean:5.1f}%, peak {peak:.1f} GiB")


def planned_steps(examples: list[Any], batch: int) -> int:
    """Decode steps the batches of `examples` may take at most: each batch runs to its largest budget."""
    from calibration.evaluation import example_budget

    budgets = [example_budget(e, None) for e in examples]
    return sum(max(budgets[i : i + batch]) for i in range(0, len(budgets), batch))


def estimate_seconds(done: list[dict[str, Any]], length: int, n: int, steps: int) -> float | None:
    """Seconds a unit of `n` examples at `length` with `steps` planned decode steps should take.

    From the last measured unit of each method: prefill seconds per row scaled by
    (length ratio)^1.6 (linear layers ~ L, attention under a padding mask ~ L^2), decode seconds per
    planned step by (length ratio)^0.5 (the KV traffic grows, the per-step overhead does not); a
    ratio below 1 scales prefill linearly and decode not at all. Deliberately pessimistic.
    """
    if not done:
        return None
    total = 0.0
    for method in dict.fromkeys(u["method"] for u in done):
        last = [u for u in done if u["method"] == method][-1]
        ratio = length / last["length"]
        prefill = last["prefill_s"] / last["rows"] * (ratio**1.6 if ratio >= 1 else ratio)
        decode = last["decode_s"] / max(1, last["steps"]) * (ratio**0.5 if ratio >= 1 else 1.0)
        total += prefill * n + decode * steps
    return total * 1.15 + 5.0


# ---------------------------------------------------------------------------------------- commands


def cmd_prepare(args: argparse.Namespace) -> int:
    """Generate and store the examples of every task × length with the model's own tokenizer."""
    from calibration.evaluation import parse_lengths
    from calibration.tasks import get_task

    tokenizer = load_tokenizer(args)
    lengths = parse_lengths(args.lengths)
    sets = {}
    for name in args.tasks.split(","):
        task = get_task(name)
        for length in lengths:
            started = time.perf_counter()
            sets[(name, length)] = task.generate(tokenizer, args.n, length, args.seed)
            tokens = [e.meta.get("prompt_tokens") for e in sets[(name, length)]]
            log(f"{name} {length}: {args.n} examples in {time.perf_counter() - started:.1f} s, prompt tokens {min(tokens)}–{max(tokens)}")
    save_example_sets(Path(args.out), sets, args.seed)
    log(f"wrote {args.out} ({Path(args.out).stat().st_size:,} bytes)")
    return 0


def load_tokenizer(args: argparse.Namespace):
    if args.gguf:
        from transformers import AutoTokenizer

        from decoder.loading import _finish_tokenizer

        path = Path(args.gguf).expanduser()
        return _finish_tokenizer(AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name))
    from decoder.loading import load_model

    return load_model(args.model, progress=False)[1]


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from calibration.evaluation import EvalReport, evaluate, format_length, parse_lengths
    from calibration.tasks import get_task
    from decoder.dysco import DyscoConfig
    from decoder.loading import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget_end = T0 + args.budget_s
    dtype = getattr(torch, args.dtype)
    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
        f"device {args.device}" + (f" ({torch.cuda.get_device_name(0)})" if args.device.startswith("cuda") else ""))

    # 1. the weights
    if args.parts:
        gguf = join_parts(Path(args.parts), Path(args.join_to) / (args.gguf_name or GGUF_NAME), args.sha256 or None, args.size or None)
    else:
        gguf = Path(args.gguf).expanduser()
    started = time.perf_counter()
    model, tokenizer = load_model(str(gguf), dtype=dtype, device=args.device, progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    shape = f"{text_config.num_hidden_layers} layers × {text_config.num_attention_heads} heads ({text_config.num_key_value_heads} KV)"
    log(f"loaded {gguf.name} in {time.perf_counter() - started:.1f} s as {model.dtype} on {args.device}: {model.config.model_type}, "
        f"{shape}, context {text_config.max_position_embeddings}, attention {model.config._attn_implementation}")

    # 2. the head set
    if args.heads:
        heads_info = {"heads": [[int(x) for x in pair.split(":")] for pair in args.heads.split(",")], "method": "given (--heads)"}
    else:
        heads_info = detect_heads(model, tokenizer, args.probes, args.probe_length, args.seed, args.top_k)
    heads_info.update({"model": args.model_name, "gguf": gguf.name, "dtype": args.dtype})
    (out / "heads.json").write_text(json.dumps(heads_info, indent=2) + "\n", encoding="utf-8")
    heads = [tuple(pair) for pair in heads_info["heads"]]
    log(f"head set ({heads_info.get('seconds', 0)} s): {','.join(f'{a}:{b}' for a, b in heads)}; "
        f"split-half stability {heads_info.get('split_half_stability')}")
    dysco = DyscoConfig(head_set=heads)  # the published default knobs

    # 3. the examples
    stored_sets, stored_seed = ({}, None)
    if args.examples:
        stored_sets, stored_seed = load_example_sets(Path(args.examples))
        log(f"examples from {args.examples}: " + ", ".join(f"{t}@{format_length(l)}×{len(v)}" for (t, l), v in stored_sets.items()))
    lengths = parse_lengths(args.lengths)
    batch_sizes = parse_batch_sizes(args.batch_sizes, lengths)
    units = [(task, length) for task in args.tasks.split(",") for length in lengths]
    timings = Timings()
    asked = args.paths.split(",")
    if not asked or any(p not in ("exact", "fast") for p in asked) or len(set(asked)) != len(asked):
        raise SystemExit(f"--paths takes exact, fast or exact,fast; got {args.paths!r}")
    paths = [p for p in ("exact", "fast") if p in asked]  # exact first: the agreement compares against it
    reports: dict[str, list[Any]] = {path: [] for path in paths}
    plan_notes, done_units = [], []

    def note(text: str) -> None:
        """Say it in the log and keep it in results.json's notes."""
        plan_notes.append(text)
        log(text)

    meta = {"command": " ".join(sys.argv), "dtype": args.dtype, "device": args.device,
            "device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
            "head_set": heads_info, "examples_file": args.examples, "budget_s": args.budget_s, "notes": plan_notes,
            "paths": paths, "agreement": {}}

    for task_name, length in units:
        base = get_task(task_name)
        stored = {l: v for (t, l), v in stored_sets.items() if t == task_name}
        task = StoredTask(base, stored, stored_seed) if stored else base
        n, batch = args.n, batch_sizes[length]
        label = f"{task_name}@{format_length(length)}"
        remaining = budget_end - time.perf_counter()
        examples = task.generate(tokenizer, n, length, args.seed)
        # Timings pool the paths of a unit (rows counted once per path), so one path's estimate × paths.
        estimate = estimate_seconds(done_units, length, n * len(paths), planned_steps(examples, batch) * len(paths))
        if estimate is not None and estimate > remaining:
            fit = n
            while fit > 0 and estimate_seconds(done_units, length, fit * len(paths),
                                               planned_steps(examples[:fit], batch) * len(paths)) > remaining:
                fit -= 1
            if fit < args.min_n:
                note(f"{label}: skipped (estimated {estimate:.0f} s for n={n}, {remaining:.0f} s left of the budget)")
                continue
            note(f"{label}: n cut from {n} to {fit} (estimated {estimate:.0f} s for n={n}, {remaining:.0f} s left)")
            n = fit
        log(f"{label}: n={n}, batch {batch}" + (f", estimated {estimate:.0f} s" if estimate is not None else "")
            + f", {remaining:.0f} s of budget left")
        timings.begin(label)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        report = None
        while report is None:
            try:
                report = {}
                for path in paths:
                    try:
                        report[path] = evaluate(
                            model, tokenizer, [task], [length], args.methods, n, args.seed, dysco=dysco,
                            attnts_temperature=args.attnts_temperature, batch_size=batch, model_name=args.model_name,
                            extra_config={"unit_seconds": None}, fast=path == "fast",
                            on_batch=timings.on_batch, prompt_ids=timings.prompt_ids,
                        )
                    except torch.cuda.OutOfMemoryError:
                        raise
                    except Exception as err:
                        if path == paths[0]:
                            raise
                        import traceback

                        traceback.print_exc()  # the first path's results are kept; the failure is noted
                        note(f"{label}: {path} path failed ({type(err).__name__}: {str(err)[:300]})")
            except torch.cuda.OutOfMemoryError as err:
                del timings.units[timings.first:]
                torch.cuda.empty_cache()
                if batch == 1:
                    note(f"{label}: out of memory even at batch 1; skipped")
                    break
                note(f"{label}: out of memory at batch {batch} ({str(err).splitlines()[0][:160]}); retrying at batch {max(1, batch // 2)}")
                batch = max(1, batch // 2)
                started = time.perf_counter()
            except Exception as err:  # keep what finished; go on with the next unit
                import traceback

                traceback.print_exc()
                note(f"{label}: failed ({type(err).__name__}: {str(err)[:300]})")
                break
        if report is None:
            del timings.units[timings.first:]
            continue
        timings.log_unit()
        for path, one in report.items():
            one.config["unit_seconds"] = round(one.seconds, 1)
            one.config["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1) if args.device.startswith("cuda") else None
            reports[path].append(one)
        for unit in timings.units[timings.first:]:
            unit.update({"length": length, "batch": batch})
            unit.pop("scores", None)
            done_units.append(unit)
        if len(report) > 1:
            meta["agreement"][label] = agreement(report["exact"], report["fast"])
            log(f"{label}: fast vs exact: {meta['agreement'][label]}")
        meta["units"] = timings.units
        for path in report:
            write_outputs(out / path if len(paths) > 1 else out, reports[path], meta)
        log(f"{label}: done in {time.perf_counter() - started:.1f} s; wrote results.json, results.md, accuracy.png")

    if not any(reports.values()):
        log("nothing evaluated")
        return 1
    for path in [p for p in paths if reports[p]]:
        final = merge_reports(reports[path])
        print()
        if len(paths) > 1:
            print(f"## {path} path")
        print(final.markdown())
    for text in plan_notes:
        print(f"note: {text}")
    log(f"total {time.perf_counter() - T0:.0f} s")
    return 0


def agreement(exact, fast) -> dict[str, str]:
    """Per method: how many examples the fast path answered exactly as the exact path did."""
    out = {}
    for method in exact.methods:
        same = sum(a["responses"][method] == b["responses"][method] for a, b in zip(exact.examples, fast.examples))
        out[method] = f"{same}/{len(exact.examples)} identical responses"
    return out


def cmd_render(args: argparse.Namespace) -> int:
    """Rewrite results.md and accuracy.png from a results.json written by `run`."""
    from calibration.evaluation import EvalReport

    folder = Path(args.folder)
    report = EvalReport.from_dict(json.loads((folder / "results.json").read_text(encoding="utf-8")))
    render(folder, report)
    print(report.markdown())
    return 0


def parse_batch_sizes(text: str, lengths: list[int]) -> dict[int, int]:
    """'8k:25,16k:25,32640:13' or one number for all -> {length: batch}."""
    from calibration.evaluation import parse_length

    if ":" not in text:
        return {length: int(text) for length in lengths}
    given = {}
    for item in text.split(","):
        key, value = item.split(":")
        given[parse_length(key)] = int(value)
    missing = [length for length in lengths if length not in given]
    if missing:
        raise SystemExit(f"--batch-sizes gives no batch size for length {missing[0]}")
    return given


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--tasks", default="mrcr", help="comma-separated tasks (default: mrcr)")
        p.add_argument("--lengths", default=DEFAULT_LENGTHS, help=f"default: {DEFAULT_LENGTHS}")
        p.add_argument("--n", type=int, default=50, help="examples per task × length (default: 50)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--gguf", default=None, help="a .gguf file (instead of --parts)")
        p.add_argument("--model", default=MODEL_NAME, help="catalogue name whose tokenizer `prepare` uses without --gguf")

    p = sub.add_parser("prepare", help="generate the examples here (CPU) with the model's tokenizer")
    common(p)
    p.add_argument("--out", required=True, help="examples file (.jsonl or .jsonl.gz)")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("run", help="join, load, detect heads, evaluate")
    common(p)
    p.add_argument("--parts", default=None, help="folder of part* pieces of the GGUF (joined in order)")
    p.add_argument("--join-to", default="/tmp/gguf", help="folder the joined GGUF is written to (default: /tmp/gguf)")
    p.add_argument("--gguf-name", default=None, help=f"joined file name (default: {GGUF_NAME})")
    p.add_argument("--sha256", default=GGUF_SHA256, help="expected sha256 of the joined GGUF ('' to skip)")
    p.add_argument("--size", type=int, default=GGUF_SIZE, help="expected size in bytes (0 to skip)")
    p.add_argument("--model-name", default=MODEL_NAME)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--examples", default=None, help="examples file written by `prepare`")
    p.add_argument("--methods", default="vanilla,attnts,dysco")
    p.add_argument("--paths", default="exact", help="exact, fast, or exact,fast: both on the same examples, "
                   "written to --out/exact and --out/fast, with how many responses agree (default: exact)")
    p.add_argument("--batch-sizes", default="8k:25,16k:25,32640:13", help="per length, or one number")
    p.add_argument("--attnts-temperature", type=float, default=None, help="default: evaluate's (0.8)")
    p.add_argument("--heads", default=None, help="L:H,… to skip detection")
    p.add_argument("--probes", type=int, default=16)
    p.add_argument("--probe-length", type=int, default=3072)
    p.add_argument("--top-k", type=int, default=16)
    p.add_argument("--budget-s", type=float, default=420.0, help="wall seconds from start for the whole run (default: 420)")
    p.add_argument("--min-n", type=int, default=20, help="fewest examples a task × length is run with when cut (default: 20)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("render", help="rewrite results.md and accuracy.png from a run's results.json")
    p.add_argument("folder")
    p.set_defaults(func=cmd_render)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
