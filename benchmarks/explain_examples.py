"""Why did DySCO change these answers? Vanilla and DySCO side by side on chosen examples, step by step.

    python benchmarks/explain_examples.py --model qwen2.5-coder-1.5b --profile qwen2.5-coder-1.5b@1 \\
        --task kv --length 8k --seed 2 --indices 84,61,68,3 --steps 12 --out docs/results/RUN/explain

For each example (the same seeded examples `dysco eval` builds: `--n` of them, then `--indices`), both
methods decode greedily on the exact path. Per generated step: the token, the top-3 candidates with
their probabilities, and for DySCO the selection diagnostics of that step (`decoder.dysco.selection_
diagnostics`: positions up-weighted, their importance mass, and the evidence's recall, share and
importance). Also where the up-weighted importance sits inside the evidence: the share on its first
`--head-tokens` value tokens (a copy that starts mid-value points there less). Writes explain.json
and explain.md into --out and prints the markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--profile", required=True, help="registry profile (its heads and knobs)")
    parser.add_argument("--task", required=True)
    parser.add_argument("--length", required=True, help="context length, e.g. 8k")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=100, help="examples generated (as `dysco eval --n`)")
    parser.add_argument("--indices", required=True, help="comma-separated example indices")
    parser.add_argument("--steps", type=int, default=12, help="tokens generated per example")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--force", action="store_true", help="use the profile even if its fingerprint differs")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import torch

    from calibration.evaluation.batches import prompt_ids
    from calibration.evaluation.inputs import parse_length
    from calibration.tasks import evidence_positions, get_task
    from decoder.generation import Decoder
    from decoder.loading import load_model
    from registry import Registry

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    profile = Registry().load(args.profile)  # $DYSCO_REGISTRY or the user's registry
    dysco = Decoder.from_profile(model, tokenizer, profile, force=args.force)
    vanilla = Decoder(model, tokenizer, method="vanilla")
    task = get_task(args.task)
    length = parse_length(args.length)
    examples = task.generate(tokenizer, args.n, length, args.seed)
    rows = []
    for index in (int(i) for i in args.indices.split(",")):
        example = examples[index]
        ids, mask = prompt_ids(tokenizer, example)
        evidence = evidence_positions(tokenizer, example, task.evidence(example), ids) or []
        row = {"index": index, "id": example.id, "answer": example.answer, "prompt_tokens": len(ids),
               "evidence_positions": [min(evidence), max(evidence)] if evidence else None}
        for name, decoder in (("vanilla", vanilla), ("dysco", dysco)):
            began = time.perf_counter()
            out = decoder.generate([ids], template_mask=[mask], max_new_tokens=args.steps, return_logits=True,
                                   return_diagnostics=name == "dysco", evidence=[evidence])
            steps = []
            for step, token in enumerate(out.token_ids[0]):
                probs = torch.softmax(out.logits[0][step].float(), -1)
                top = torch.topk(probs, 3)
                entry = {"token": tokenizer.decode([token]), "top": [
                    [tokenizer.decode([int(t)]), round(float(p), 4)] for p, t in zip(top.values, top.indices)]}
                if out.diagnostics:
                    entry["selection"] = {k: (round(v, 4) if isinstance(v, float) else v)
                                          for k, v in out.diagnostics[0][step].items()}
                steps.append(entry)
            row[name] = {"response": out.texts[0], "score": float(task.grade(out.texts[0], example)),
                         "seconds": round(time.perf_counter() - began, 1), "steps": steps}
        rows.append(row)
        print(f"[{index}] vanilla {row['vanilla']['response']!r} ({row['vanilla']['score']}), "
              f"dysco {row['dysco']['response']!r} ({row['dysco']['score']})", flush=True)

    os.makedirs(args.out, exist_ok=True)
    header = (f"### benchmarks/explain_examples.py — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
              f"- machine: {platform.node() or 'unknown'} ({platform.machine()}), torch {torch.__version__}\n"
              f"- command: `python benchmarks/explain_examples.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n")
    lines = [header]
    for row in rows:
        lines.append(f"\n#### example {row['index']} ({row['prompt_tokens']} tokens; evidence at "
                     f"{row['evidence_positions']}); answer `{row['answer']}`\n")
        lines.append("| step | vanilla token (top-3) | dysco token (top-3) | dysco selected / mass | evidence recall / share / importance |")
        lines.append("|---:|---|---|---|---|")
        for step in range(max(len(row["vanilla"]["steps"]), len(row["dysco"]["steps"]))):
            cells = []
            for name in ("vanilla", "dysco"):
                s = row[name]["steps"][step] if step < len(row[name]["steps"]) else None
                cells.append("" if s is None else f"`{s['token']!r}` (" + ", ".join(f"{t!r} {p:.2f}" for t, p in s["top"]) + ")")
            d = row["dysco"]["steps"][step].get("selection") if step < len(row["dysco"]["steps"]) else None
            sel = "" if not d else f"{d['selected']} / {d['mass']:.2f}"
            ev = "" if not d or d.get("evidence_recall") is None else (
                f"{d['evidence_recall']:.2f} / {d['evidence_share']:.2f} / {d['evidence_importance']:.2f}")
            lines.append(f"| {step} | {cells[0]} | {cells[1]} | {sel} | {ev} |")
        lines.append(f"\nvanilla: `{row['vanilla']['response']}` ({row['vanilla']['score']:.0f}); "
                     f"dysco: `{row['dysco']['response']}` ({row['dysco']['score']:.0f})\n")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "explain.json"), "w") as f:
        json.dump({"args": vars(args), "examples": rows}, f, indent=1)
    with open(os.path.join(args.out, "explain.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
