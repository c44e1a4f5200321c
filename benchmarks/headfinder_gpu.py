"""GPU cost of one QR probe vs a plain prefill, in the Qwen3-8B shape with random weights (issue 4).

    python benchmarks/headfinder_gpu.py                  # one probe at 32K, bf16, cuda:0
    python benchmarks/headfinder_gpu.py --context 8192 --repeats 2

The model has Qwen3-8B's shape (36 layers, hidden 4096, 32 heads, 8 KV heads, head_dim 128,
intermediate 12288, vocab 151936) and random bf16 weights: speed and memory do not depend on the
weights' values. The probe is built with the toolkit's tiny local tokenizer (nothing downloaded);
its ids are valid in any vocabulary this large.

Measured, each after a warm-up and best of --repeats:
- plain prefill: one forward of the whole query prompt with a KV cache (what any generate starts with);
- QR probe: `headfinder.scores.qr_probe_doc_scores` — prefill of the shared prefix, then the question
  and the null-query suffixes with captured probabilities for every head of every layer.
Targets: probe ≤ 3 s, probe peak memory ≤ 1.2 × the plain prefill's. Prints a table; with --out also
writes it (date, machine, command) as Markdown.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

QWEN3_8B_SHAPE = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1_000_000.0,
    tie_word_embeddings=False,
)


def build_model(device: str, dtype: torch.dtype):
    """A random-weight causal LM in the Qwen3-8B shape, built directly on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(QWEN3_8B_SHAPE)
    rope_theta = shape.pop("rope_theta")
    config = AutoConfig.for_model("qwen3", **shape)
    # transformers 5 keeps RoPE settings in rope_parameters; older configs read rope_theta.
    if hasattr(config, "rope_parameters") and isinstance(config.rope_parameters, dict):
        config.rope_parameters["rope_theta"] = rope_theta
    else:
        config.rope_theta = rope_theta
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def measure(fn, device: str, repeats: int) -> tuple[float, float]:
    """(best seconds, peak GiB allocated during the best-of runs) of `fn()`."""
    best, peak = float("inf"), 0.0
    for _ in range(repeats):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
        peak = max(peak, torch.cuda.max_memory_allocated(device) / 2**30)
    return best, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=32768, help="probe length in tokens (default: %(default)s)")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each; best is kept (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as Markdown here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA device", file=sys.stderr)
        return 2

    from decoder.attention import attach
    from decoder.tiny import tiny_tokenizer
    from headfinder.probes import make_qr_probes
    from headfinder.scores import _forward, _new_cache, qr_probe_doc_scores

    t0 = time.perf_counter()
    model = build_model(args.device, torch.bfloat16)
    attach(model)
    print(f"model built in {time.perf_counter() - t0:.0f} s; "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters; "
          f"weights {torch.cuda.memory_allocated(args.device) / 2**30:.1f} GiB")
    t0 = time.perf_counter()
    probe = make_qr_probes(tiny_tokenizer(), 1, args.context, seed=0)[0]
    print(f"probe: {len(probe.query_ids)} tokens, {probe.num_docs} documents, prefix {probe.prefix_len}, "
          f"question rows {probe.query_rows[1] - probe.query_rows[0]} (built in {time.perf_counter() - t0:.1f} s)")
    ids = torch.tensor([probe.query_ids], device=args.device)

    def plain_prefill():
        with torch.no_grad():
            _forward(model, ids, _new_cache(model))

    def qr_probe():
        qr_probe_doc_scores(model, probe)

    # Warm-up at a short length (kernel selection, allocator) before timing.
    short = make_qr_probes(tiny_tokenizer(), 1, 2048, seed=1)[0]
    qr_probe_doc_scores(model, short)
    with torch.no_grad():
        _forward(model, torch.tensor([short.query_ids], device=args.device), _new_cache(model))

    plain_s, plain_gib = measure(plain_prefill, args.device, args.repeats)
    probe_s, probe_gib = measure(qr_probe, args.device, args.repeats)
    ratio = probe_gib / plain_gib
    rows = [
        ("plain prefill", f"{plain_s:.2f}", f"{plain_gib:.1f}", "—"),
        ("QR probe (prefix + question + null)", f"{probe_s:.2f}", f"{probe_gib:.1f}", f"{ratio:.2f}×"),
    ]
    name = torch.cuda.get_device_name(args.device)
    header = (f"Qwen3-8B shape, random bf16 weights, one QR probe of {len(probe.query_ids)} tokens on {name}; "
              f"torch {torch.__version__}, transformers {__import__('transformers').__version__}")
    table = ["| run | seconds (best of %d) | peak GiB | memory vs plain |" % args.repeats, "|---|---|---|---|"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    verdict = (f"targets: probe ≤ 3 s → {'met' if probe_s <= 3 else 'NOT met'}; "
               f"peak ≤ 1.2 × plain → {'met' if ratio <= 1.2 else 'NOT met'}")
    print(header)
    print("\n".join(table))
    print(verdict)
    if args.out is not None:
        command = "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        args.out.write_text(f"{stamp}, {platform.node()} ({name}), `{command}`\n\n{header}\n\n" + "\n".join(table)
                            + f"\n\n{verdict}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
