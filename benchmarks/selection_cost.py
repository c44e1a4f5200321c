"""What DySCO's selection diagnostics cost on the fast path: tokens/s with `return_diagnostics` off and on.

One needle prompt per length (its evidence located, so the on runs compute the selection recall too),
the same prompt in every row of a batch, every selection mode of `--variants`, greedy with no EOS stop.
Off and on alternate over the repeats (a noisy shared machine slows both alike); the best repeat of
each counts. Two rates: decode tokens/s (every row's tokens after the first, over the decode time the
fast path measures: the per-step diagnostic work) and end-to-end tokens/s (every generated token over
the whole `generate` call: prefill, decode, and turning the diagnostics into per-step dicts). The on
run must give the off run's tokens (checked). Both rates move by several percent from one repeat to
the next on a shared machine, more than the diagnostics cost, so the diagnostic work of one step
(`FastDecoder._record_selection` on the generation's own buffers, the mean of 200 calls) is also
timed alone and set against the step's time.

    # this CPU, the embedded SmolLM2 (float32)
    .venv/bin/python benchmarks/selection_cost.py --lengths 1k,2k --batch 1,4 --new 32 --repeats 3 \
        --out docs/results/selection-cost-cpu

Writes `selection_cost.json` and `selection_cost.md` into --out.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lagged import SMOLLM2_HEADS, log, parse_heads, variant_config, write  # noqa: E402


def timed(decoder, ids, masks, evidence, new: int, diagnostics: bool) -> tuple[float, float, list[list[int]]]:
    """(decode tokens/s, end-to-end tokens/s, tokens) of one greedy generation of `new` tokens per row."""
    began = time.perf_counter()
    out = decoder.generate(ids, template_mask=masks, max_new_tokens=new, eos=[], return_diagnostics=diagnostics,
                           evidence=evidence if diagnostics else None)
    seconds = time.perf_counter() - began
    if diagnostics:
        assert out.diagnostics is not None and all(len(row) == new for row in out.diagnostics)
    rows = len(ids)
    return rows / out.timings["decode_s_per_token"], rows * new / seconds, out.token_ids


def record_ms(decoder, calls: int = 200) -> float:
    """Milliseconds of one step's diagnostic work alone (`_record_selection`), on the last generation's buffers."""
    shape = decoder._shape
    t = decoder.run.t[decoder.device] - 1  # the last step's column
    up = shape.static_selected | (shape.columns == t)[None, :]
    decoder._record_selection(shape, t, up, t)
    began = time.perf_counter()
    for _ in range(calls):
        decoder._record_selection(shape, t, up, t)
    return 1000.0 * (time.perf_counter() - began) / calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a catalogue name or a checkpoint folder")
    parser.add_argument("--heads", default=SMOLLM2_HEADS, help="QR heads, LAYER:HEAD,… (default: SmolLM2's 16)")
    parser.add_argument("--lengths", default="1k,2k", help="prompt lengths (needle examples)")
    parser.add_argument("--batch", default="1,4", help="batch sizes (the same prompt in every row)")
    parser.add_argument("--variants", default="dynamic,lagged-plain,static", help="DySCO selection modes")
    parser.add_argument("--new", type=int, default=32, help="new tokens per row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="selection-cost-out")
    args = parser.parse_args(argv)

    import torch

    from calibration.evaluation import parse_lengths, prompt_ids
    from calibration.tasks import evidence_positions, get_task
    from decoder.fast import FastDecoder
    from decoder.loading import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, progress=False)
    heads = parse_heads(args.heads)
    task = get_task("needle")
    batches = [int(b) for b in args.batch.split(",")]
    rows = []
    for length in parse_lengths(args.lengths):
        (example,) = task.generate(tokenizer, 1, length, args.seed)
        ids, mask = prompt_ids(tokenizer, example)
        found = evidence_positions(tokenizer, example, task.evidence(example), ids) or []
        if not found:
            raise SystemExit(f"the needle's evidence was not located in the {length}-token prompt")
        for variant in args.variants.split(","):
            method, config = variant_config(variant, heads)
            decoder = FastDecoder(model, tokenizer, method, dysco=config)
            for batch in batches:
                prompts, masks, evidence = [ids] * batch, [mask] * batch, [found] * batch
                for diagnostics in (False, True):  # warm up: buffers and the diagnostics' own allocations
                    timed(decoder, prompts, masks, evidence, 3, diagnostics)
                rates: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
                tokens = {}
                for repeat in range(args.repeats):
                    for diagnostics in (False, True):
                        decode, overall, tokens[diagnostics] = timed(decoder, prompts, masks, evidence, args.new,
                                                                     diagnostics)
                        rates[diagnostics].append((decode, overall))
                        log(f"{length} batch {batch} {variant} diagnostics {'on ' if diagnostics else 'off'}: "
                            f"decode {decode:.2f} tokens/s, end to end {overall:.2f} (repeat {repeat + 1})")
                if tokens[True] != tokens[False]:
                    raise SystemExit(f"{variant} batch {batch}: the diagnostics changed the generated tokens")
                best = {on: (max(r[0] for r in got), max(r[1] for r in got)) for on, got in rates.items()}
                step_ms = 1000.0 * batch / best[False][0]  # one decode step of the whole batch, diagnostics off
                diagnostic_ms = record_ms(decoder)
                rows.append({"length": length, "prompt_tokens": len(ids), "evidence_tokens": len(found),
                             "batch": batch, "variant": variant, "step_ms": step_ms, "diagnostic_ms": diagnostic_ms,
                             "decode_off": best[False][0], "decode_on": best[True][0],
                             "overall_off": best[False][1], "overall_on": best[True][1],
                             "all": {"off": rates[False], "on": rates[True]}})
    import transformers

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads "
                   f"({platform.node()})",
        "software": f"python {platform.python_version()}, torch {torch.__version__}, "
                    f"transformers {transformers.__version__}",
        "command": "python benchmarks/selection_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": args.model,
    }
    lines = [f"### benchmarks/selection_cost.py — {meta['date']}", "", f"- machine: {meta['machine']}",
             f"- software: {meta['software']}", f"- command: `{meta['command']}`",
             f"- model: {meta['model']} (float32), fast path, {args.new} new tokens per row (no EOS stop), best of "
             f"{args.repeats} alternating repeats; DySCO: {len(heads)} QR heads, the published knobs", "",
             "| prompt tokens | batch | selection | decode tokens/s off | on | on / off | end-to-end tokens/s off | on "
             "| on / off | step ms (off) | diagnostics ms/step | share of a step |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['prompt_tokens']} | {r['batch']} | {r['variant']} | {r['decode_off']:.2f} | "
                     f"{r['decode_on']:.2f} | {r['decode_on'] / r['decode_off']:.3f} | {r['overall_off']:.2f} | "
                     f"{r['overall_on']:.2f} | {r['overall_on'] / r['overall_off']:.3f} | {r['step_ms']:.1f} | "
                     f"{r['diagnostic_ms']:.3f} | {100 * r['diagnostic_ms'] / r['step_ms']:.2f}% |")
    write(args.out, "selection_cost", {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
