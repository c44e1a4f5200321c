"""A real, short accuracy-and-speed run of vanilla, AttnTS and DySCO on the embedded SmolLM2, on CPU.

It needs a head set, taken from the first of: a `headfinder detect --out DIR` folder given as
`--heads-from DIR` (its head_set.json), the registry's `smollm2-135m@latest`, or QR heads detected
here with `headfinder`'s scorers (query-focused probes, top 16 heads by QR score). Then it runs the
`dysco eval` command itself with those heads, so the figures come from exactly what users run:

    .venv/bin/python benchmarks/eval_cpu.py --tasks needle,kv,mrcr --lengths 2k --n 8 --out docs/eval/smollm2-cpu

Prints the `dysco eval` command it ran, and writes results.md, results.json, accuracy.png (from
`dysco eval`) and heads.json (where the head set came from) into --out.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path


def detect_heads(model, tokenizer, probes: int, length: int, seed: int, k: int) -> list[tuple[int, int]]:
    """Top-`k` QR heads of `model` over `probes` query-focused probes of `length` tokens."""
    from headfinder.head_sets import top_k_heads
    from headfinder.probes import make_qr_probes
    from headfinder.scores import qr_scores

    result = qr_scores(model, make_qr_probes(tokenizer, probes, length, seed=seed), progress=True)
    return top_k_heads(result.qr, k)


def resolve_heads(args: argparse.Namespace) -> tuple[list[tuple[int, int]], dict]:
    """The head set and where it came from: --heads-from, else the registry, else QR detection here."""
    from decoder.loading import load_model
    from registry import ProfileNotFound, Registry

    if args.heads_from is not None:
        found = json.loads((args.heads_from / "head_set.json").read_text())
        if found.get("model") != args.model:
            raise SystemExit(f"{args.heads_from} holds heads of {found.get('model')!r}, not {args.model!r}")
        source = {"source": f"headfinder detect folder {args.heads_from}", "score": found.get("score")}
        summary = args.heads_from / "summary.json"
        if summary.is_file():
            info = json.loads(summary.read_text())
            source.update({k: info.get(k) for k in ("probes", "n_probes", "context", "seed", "top")})
        return [tuple(pair) for pair in found["heads"]], source
    try:
        profile = Registry().load(f"{args.model}@latest")
        return [tuple(pair) for pair in profile.head_set], {
            "source": "registry", "ref": f"{args.model}@latest", "content_hash": profile.content_hash()
        }
    except ProfileNotFound:
        pass
    model, tokenizer = load_model(args.model, progress=False)
    started = time.perf_counter()
    heads = detect_heads(model, tokenizer, args.probes, args.probe_length, args.seed, args.top_k)
    return heads, {
        "source": "headfinder QR scores (benchmarks/eval_cpu.py)", "probes": args.probes,
        "probe_length": args.probe_length, "seed": args.seed, "top_k": args.top_k,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    """Resolve a head set for the model, then run `dysco eval` with it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default="needle,kv,mrcr")
    p.add_argument("--lengths", default="2k")
    p.add_argument("--methods", default="vanilla,attnts,dysco")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--out", default="eval-smollm2-cpu")
    p.add_argument("--heads-from", type=Path, default=None, metavar="DIR", help="a `headfinder detect --out` folder")
    p.add_argument("--probes", type=int, default=8, help="QR probes when the registry has no profile (default 8)")
    p.add_argument("--probe-length", type=int, default=1024, help="tokens per QR probe (default 1024)")
    p.add_argument("--top-k", type=int, default=16, help="heads kept (default 16, as published)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    import torch

    from decoder.cli import main as dysco_main

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    heads, source = resolve_heads(args)
    head_text = ",".join(f"{layer}:{head}" for layer, head in heads)
    (out / "heads.json").write_text(json.dumps({**source, "heads": [list(h) for h in heads]}, indent=2) + "\n")
    print(f"head set ({source['source']}): {head_text}", file=sys.stderr)

    command = [
        "eval", "--model", args.model, "--heads", head_text, "--tasks", args.tasks, "--lengths", args.lengths,
        "--methods", args.methods, "--n", str(args.n), "--seed", str(args.seed), "--out", str(out),
        "--threads", str(args.threads),
    ]
    if args.max_new_tokens is not None:
        command += ["--max-new-tokens", str(args.max_new_tokens)]
    print("running: dysco " + shlex.join(command), file=sys.stderr)
    started = time.perf_counter()
    code = dysco_main(command)
    print(f"dysco eval took {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
