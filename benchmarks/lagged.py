"""Lagged DySCO (issue 13) against dynamic DySCO: decode speed, and accuracy with token agreement on needles.

`speed`: decode tokens/s of vanilla, dynamic, lagged (plain and biased probabilities) and static DySCO,
batch 1, on one needle prompt per length, exact and fast path, methods interleaved over the repeats (so a
noisy shared CPU slows them alike); the best repeat of each counts.

`agree`: the same needle examples decoded greedily by every variant; per length, accuracy, the paired
difference against dynamic DySCO (wins/losses/ties, sign test) and the token-level agreement with dynamic
DySCO (identical responses; mean share of a dynamic response's tokens before the first difference;
share of token positions equal).

    # this CPU, the embedded SmolLM2 (float32)
    .venv/bin/python benchmarks/lagged.py speed --lengths 1k,2k --new 32 --repeats 3 --out docs/results/lagged-cpu
    .venv/bin/python benchmarks/lagged.py agree --lengths 1k,2k --n 20 --path fast --out docs/results/lagged-cpu
    # the GPU, SmolLM2 from GGUF parts, the examples prepared here (benchmarks/gpu_results.py prepare)
    python3 benchmarks/lagged.py agree --parts /tmp/s --gguf-name SmolLM2-135M-Instruct.Q4_1.gguf --sha256 HEX \
        --size BYTES --device cuda --dtype float32 --examples .gpu_inputs/smollm2.jsonl.gz --lengths 4k,8000 \
        --n 100 --batch 50 --path fast --out $OUT

Writes `speed.json`/`speed.md` or `agree.json`/`agree.md` (every response, its tokens and score) into --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

# SmolLM2-135M-Instruct's 16 QR heads (`headfinder detect --seed 0`), the set of docs/results.md's runs.
SMOLLM2_HEADS = "17:3,18:6,17:4,7:7,8:0,18:7,23:2,14:3,23:7,22:7,21:8,15:6,23:8,23:1,20:6,20:3"
VARIANTS = ("vanilla", "dynamic", "lagged-plain", "lagged-biased", "static")
T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f} s] {message}", flush=True)


def variant_config(variant: str, heads: list[tuple[int, int]]):
    """(method, DyscoConfig or None) of a variant name; DySCO with the published knobs."""
    from decoder.dysco import DyscoConfig

    if variant == "vanilla":
        return "vanilla", None
    base = DyscoConfig(head_set=heads)
    if variant == "dynamic":
        return "dysco", base
    if variant == "static":
        return "dysco", base.replace(selection="static")
    if variant in ("lagged-plain", "lagged-biased"):
        return "dysco", base.replace(selection="lagged", lagged_probs=variant.split("-")[1])
    raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")


def make_decoder(model, tokenizer, variant: str, heads, path: str):
    """The exact `Decoder` or the `FastDecoder` of a variant."""
    from decoder.fast import FastDecoder
    from decoder.generation import Decoder

    method, config = variant_config(variant, heads)
    cls = FastDecoder if path == "fast" else Decoder
    return cls(model, tokenizer, method, dysco=config)


def load(args):
    """Model and tokenizer: the catalogue's (default: the embedded SmolLM2) or a GGUF joined from parts."""
    import torch

    from decoder.loading import load_model

    if args.parts:
        from gpu_results import join_parts

        source = str(join_parts(Path(args.parts), Path(args.join_to) / args.gguf_name, args.sha256 or None,
                                args.size or None))
    else:
        source = args.model
    model, tokenizer = load_model(source, dtype=getattr(torch, args.dtype), device=args.device, progress=False)
    return model, tokenizer


def examples_for(args, tokenizer, length: int, n: int):
    """The --task and `n` of its examples at `length` (stored ones when --examples has them)."""
    from calibration.tasks import get_task

    task = get_task(args.task)
    if args.examples:
        from gpu_results import load_example_sets

        stored, seed = load_example_sets(Path(args.examples))
        if (args.task, length) in stored and seed == args.seed and len(stored[(args.task, length)]) >= n:
            return task, stored[(args.task, length)][:n]
        log(f"{args.task} {length}: not in {args.examples} (seed {args.seed}, n {n}); generating here")
    return task, task.generate(tokenizer, n, length, args.seed)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------- speed


def decode_rate(decoder, ids: list[int], mask: list[bool], new: int, device: str) -> float:
    """Decode tokens/s of one greedy generation of `new` tokens (no EOS stop), first token excluded."""
    from decoder.fast import FastDecoder

    if not isinstance(decoder, FastDecoder):  # exact path: the clock at every produced token
        marks: list[float] = []

        def on_step(event) -> None:
            sync(device)
            marks.append(time.perf_counter())

        decoder.generate([ids], template_mask=[mask], max_new_tokens=new, eos=[], callback=on_step)
        return (len(marks) - 1) / (marks[-1] - marks[0])
    out = decoder.generate([ids], template_mask=[mask], max_new_tokens=new, eos=[])
    return 1.0 / out.timings["decode_s_per_token"]


def cmd_speed(args) -> int:
    import torch

    from calibration.evaluation import parse_lengths, prompt_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args)
    heads = parse_heads(args.heads)
    variants = args.variants.split(",")
    paths = args.paths.split(",")
    rows = []
    for length in parse_lengths(args.lengths):
        _, (example,) = examples_for(args, tokenizer, length, 1)
        ids, mask = prompt_ids(tokenizer, example)
        decoders = {(v, p): make_decoder(model, tokenizer, v, heads, p) for p in paths for v in variants}
        for decoder in decoders.values():  # warm up: allocations, the fast path's buffers
            decode_rate(decoder, ids, mask, 3, args.device)
        rates: dict[tuple[str, str], list[float]] = {key: [] for key in decoders}
        for repeat in range(args.repeats):
            for key, decoder in decoders.items():
                rates[key].append(decode_rate(decoder, ids, mask, args.new, args.device))
                log(f"{length} {key[1]} {key[0]}: {rates[key][-1]:.2f} tokens/s (repeat {repeat + 1})")
        for (variant, path), got in rates.items():
            vanilla = max(rates[("vanilla", path)]) if ("vanilla", path) in rates else None
            rows.append({"length": length, "prompt_tokens": len(ids), "path": path, "variant": variant,
                         "tokens_per_s": max(got), "median_tokens_per_s": statistics.median(got), "all": got,
                         "vs_vanilla": max(got) / vanilla if vanilla else None})
    meta = run_meta(args, model)
    lines = [f"### benchmarks/lagged.py speed — {meta['date']}", "", f"- machine: {meta['machine']}",
             f"- software: {meta['software']}", f"- command: `{meta['command']}`",
             f"- model: {meta['model']} ({args.dtype}), batch 1, {args.new} new tokens (no EOS stop), best of "
             f"{args.repeats} interleaved repeats; DySCO: 16 QR heads, the published knobs", "",
             "| prompt tokens | path | method | decode tokens/s (best) | median | × vanilla |", "|---:|---|---|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['vs_vanilla']:.2f}" if r["vs_vanilla"] else ""
        lines.append(f"| {r['prompt_tokens']} | {r['path']} | {r['variant']} | {r['tokens_per_s']:.2f} | "
                     f"{r['median_tokens_per_s']:.2f} | {ratio} |")
    write(args.out, "speed", {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")
    return 0


# ---------------------------------------------------------------------------------------- agree


def agreement(reference: list[int], other: list[int]) -> tuple[float, int, int]:
    """(share of `reference`'s tokens before the first difference, positions equal, positions compared)."""
    prefix = 0
    while prefix < min(len(reference), len(other)) and reference[prefix] == other[prefix]:
        prefix += 1
    if prefix == len(reference) == len(other):
        share = 1.0
    else:
        share = prefix / max(len(reference), 1)
    width = max(len(reference), len(other))
    equal = sum(a == b for a, b in zip(reference, other))
    return share, equal, width


def cmd_agree(args) -> int:
    from calibration.evaluation import example_budget, parse_lengths, prompt_ids
    from calibration.evaluation import paired_comparison

    model, tokenizer = load(args)
    heads = parse_heads(args.heads)
    variants = args.variants.split(",")
    if "dynamic" not in variants:
        raise SystemExit("agree compares against dynamic DySCO: keep 'dynamic' in --variants")
    records, summary = [], []
    decoders = {v: make_decoder(model, tokenizer, v, heads, args.path) for v in variants}
    for length in parse_lengths(args.lengths):
        task, examples = examples_for(args, tokenizer, length, args.n)
        encoded = [prompt_ids(tokenizer, e) for e in examples]
        budgets = [example_budget(e, None) for e in examples]
        out: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        seconds = {v: 0.0 for v in variants}
        for start in range(0, len(examples), args.batch):
            rows = range(start, min(start + args.batch, len(examples)))
            for variant, decoder in decoders.items():
                began = time.perf_counter()
                result = decoder.generate([encoded[i][0] for i in rows], template_mask=[encoded[i][1] for i in rows],
                                          max_new_tokens=max(budgets[i] for i in rows), eos=None)
                sync(args.device)
                seconds[variant] += time.perf_counter() - began
                for i, ids, reason in zip(rows, result.token_ids, result.finish_reasons):
                    kept = ids[: budgets[i]]  # each row its own budget, as `dysco eval` does
                    if reason == "eos" and len(kept) == len(ids):
                        kept = kept[:-1]
                    text = tokenizer.decode(kept, skip_special_tokens=True)
                    out[variant].append({"tokens": kept, "text": text, "score": float(task.grade(text, examples[i]))})
            log(f"{args.task} {length}: {rows.stop}/{len(examples)} done; " + ", ".join(
                f"{v} {sum(r['score'] for r in out[v]) / len(out[v]):.2f}" for v in variants))
        for i, example in enumerate(examples):
            records.append({"length": length, "id": example.id, "answer": example.answer,
                            **{v: out[v][i] for v in variants}})
        ref = out["dynamic"]
        for variant in variants:
            scores = [r["score"] for r in out[variant]]
            row = {"length": length, "n": len(scores), "variant": variant, "accuracy": sum(scores) / len(scores),
                   "seconds": seconds[variant]}
            if variant != "vanilla" and "vanilla" in out:
                row["vs_vanilla"] = paired_comparison(scores, [r["score"] for r in out["vanilla"]], seed=args.seed)
            if variant != "dynamic":
                row["vs_dynamic"] = paired_comparison(scores, [r["score"] for r in ref], seed=args.seed)
                parts = [agreement(a["tokens"], b["tokens"]) for a, b in zip(ref, out[variant])]
                row["identical"] = sum(a["tokens"] == b["tokens"] for a, b in zip(ref, out[variant]))
                row["prefix_share"] = sum(p[0] for p in parts) / len(parts)
                row["position_agreement"] = sum(p[1] for p in parts) / max(sum(p[2] for p in parts), 1)
            summary.append(row)
    meta = run_meta(args, model)
    lines = [f"### benchmarks/lagged.py agree — {meta['date']}", "", f"- machine: {meta['machine']}",
             f"- software: {meta['software']}", f"- command: `{meta['command']}`",
             f"- model: {meta['model']} ({args.dtype}), {args.path} path, batch {args.batch}, {args.task} (seed {args.seed}), "
             f"greedy, each example's budget = its answer's tokens + 24; DySCO: {len(heads)} QR heads, the published knobs", "",
             "| length | method | n | accuracy | − vanilla (95% CI), W/L/T, sign p | − dynamic (95% CI), W/L/T, sign p | "
             "identical responses | agreeing prefix (share of tokens) | equal token positions | seconds |",
             "|---:|---|---:|---:|---|---|---:|---:|---:|---:|"]

    def paired_text(c) -> str:
        return (f"{100 * c['mean_difference']:+.1f} [{100 * c['low']:+.1f}, {100 * c['high']:+.1f}], "
                f"{c['wins']}W/{c['losses']}L/{c['ties']}T, p = {c['p_value']:.2g}")

    for r in summary:
        versus_vanilla = paired_text(r["vs_vanilla"]) if "vs_vanilla" in r else ""
        if r["variant"] == "dynamic":
            paired = identical = prefix = positions = ""
        else:
            paired = paired_text(r["vs_dynamic"])
            identical = f"{r['identical']}/{r['n']}"
            prefix, positions = f"{r['prefix_share']:.3f}", f"{r['position_agreement']:.3f}"
        lines.append(f"| {r['length']} | {r['variant']} | {r['n']} | {100 * r['accuracy']:.1f} | {versus_vanilla} | {paired} | {identical} | "
                     f"{prefix} | {positions} | {r['seconds']:.1f} |")
    write(args.out, "agree", {"meta": meta, "summary": summary, "examples": records}, "\n".join(lines) + "\n")
    return 0


# ---------------------------------------------------------------------------------------- common


def parse_heads(text: str) -> list[tuple[int, int]]:
    """`L:H,…`, or `@PROFILE.json` for the head set of a profile file (e.g. a seed in registry/seeds/)."""
    from registry import parse_head_set

    if text.startswith("@"):
        return [tuple(pair) for pair in json.loads(Path(text[1:]).read_text(encoding="utf-8"))["head_set"]]
    return parse_head_set(text, "--heads")


def run_meta(args, model) -> dict[str, Any]:
    import torch
    import transformers

    if args.device.startswith("cuda"):
        machine = f"{torch.cuda.get_device_name(0)} ({platform.node()})"
    else:
        machine = f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads ({platform.node()})"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "software": f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        "command": "python benchmarks/lagged.py " + " ".join(sys.argv[1:]),
        "model": getattr(model, "name_or_path", "") or type(model).__name__,
        "heads": args.heads,
    }


def write(out: str, name: str, data: dict, markdown: str) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    (folder / f"{name}.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    log(f"wrote {folder / name}.json and .md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, lengths: str):
        p.add_argument("--model", default="smollm2-135m", help="catalogue name or path (default: the embedded SmolLM2)")
        p.add_argument("--parts", default=None, help="folder of part* pieces of a GGUF (joined in order) instead of --model")
        p.add_argument("--join-to", default="/tmp/gguf")
        p.add_argument("--gguf-name", default="SmolLM2-135M-Instruct.Q4_1.gguf")
        p.add_argument("--sha256", default="", help="expected sha256 of the joined GGUF")
        p.add_argument("--size", type=int, default=0, help="expected size in bytes of the joined GGUF")
        p.add_argument("--device", default="cpu")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--heads", default=SMOLLM2_HEADS,
                       help="DySCO head set L:H,… or @PROFILE.json (default: SmolLM2's 16 QR heads)")
        p.add_argument("--task", default="needle", help="dev task of calibration.tasks (default: needle)")
        p.add_argument("--examples", default=None, help="examples file of `benchmarks/gpu_results.py prepare`")
        p.add_argument("--lengths", default=lengths)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", required=True)

    p = sub.add_parser("speed", help="decode tokens/s, batch 1")
    common(p, "1k,2k")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--paths", default="exact,fast")
    p.add_argument("--new", type=int, default=32, help="new tokens per generation (default 32)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_speed)

    p = sub.add_parser("agree", help="accuracy and token agreement with dynamic DySCO on a task's examples")
    common(p, "1k,2k")
    p.add_argument("--variants", default="vanilla,dynamic,lagged-plain,lagged-biased")
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--path", default="fast", choices=["exact", "fast"])
    p.set_defaults(func=cmd_agree)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
