"""Time to first token on left-padded batches: the fast path's one masked prefill against the exact path.

Issue 12 asks that the fast path's TTFT on padded batches be no worse than the exact path's (it was
1.8-4.6x worse when the fast path prefilled padded rows one at a time). Random weights in the
Qwen2.5-Coder-0.5B shape (24 layers, hidden 896, 14 heads, 2 KV heads, intermediate 4864), bf16 on a
GPU; prompts of random token ids whose lengths spread over the last `--spread` tokens below the
context (as a dev set's do: kv at 16K spans 16315-16384), so every row but the longest is padded.
Each cell: one warm-up call (the fast path allocates its buffers and captures graphs there), then
the median of `--repeats` timed `generate(..., max_new_tokens=1)` calls per path, vanilla and DySCO
(published knobs, 16 heads at random positions). Speed depends on the shapes, not the weights.

    python benchmarks/ttft_padded.py --out $OUT                      # the H200: 8K and 16K, batch 12
    .venv/bin/python benchmarks/ttft_padded.py --tiny --out /tmp/ttft  # CPU, a tiny shape: checks it runs

Writes `ttft.json` and `ttft.md` (date, machine, command, table) into --out and prints the table.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_speed import NoTokenizer  # noqa: E402  (token-id prompts, no text)


def build_model(tiny: bool, device: str, dtype: torch.dtype):
    """Qwen2.5-Coder-0.5B's shape with random weights (tiny: a small one for the CPU check)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    dims = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2)
    if tiny:
        dims = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2)
    config = Qwen2Config(**dims, max_position_embeddings=32768, rope_theta=1_000_000.0, tie_word_embeddings=True,
                         attn_implementation="sdpa", pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def timed(call, device: str) -> float:
    """Seconds one call takes, the device drained before and after."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Measure every (context, method, path) cell and print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default=None, help="comma-separated prompt lengths (default 8192,16384; tiny: 256)")
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--spread", type=int, default=None, help="rows' lengths spread over this many tokens (default: 1/128 of the context)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default="vanilla,dysco")
    p.add_argument("--tiny", action="store_true", help="CPU, float32, a tiny shape: checks the script runs")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    from decoder.dysco import DyscoConfig
    from decoder.fast import FastDecoder
    from decoder.generation import Decoder

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    contexts = [int(c) for c in (args.contexts or ("256" if args.tiny else "8192,16384")).split(",")]
    model = build_model(args.tiny, device, dtype)
    tokenizer = NoTokenizer()
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    rng = torch.Generator().manual_seed(0)
    qr = sorted({(int(torch.randint(layers // 4, 3 * layers // 4, (1,), generator=rng)),
                  int(torch.randint(0, heads, (1,), generator=rng))) for _ in range(32)})[:16]
    configs = {"vanilla": None, "dysco": DyscoConfig(head_set=qr)}
    rows = []
    for context in contexts:
        spread = args.spread if args.spread is not None else max(context // 128, 2)
        lengths = [context - int(torch.randint(0, spread, (1,), generator=rng)) for _ in range(args.batch)]
        lengths[0] = context  # the longest row sets the padded width
        prompts = [torch.randint(1, model.config.vocab_size, (n,), generator=rng).tolist() for n in lengths]
        masks = [[False] * n for n in lengths]
        for method in args.methods.split(","):
            config = configs[method]
            name = "dysco" if config is not None else "vanilla"
            decoders = {"exact": Decoder(model, tokenizer, name, dysco=config),
                        "fast": FastDecoder(model, tokenizer, name, dysco=config)}
            got = {}
            for path, decoder in decoders.items():
                def call(decoder=decoder):
                    return decoder.generate(prompts, template_mask=masks, max_new_tokens=1, eos=[])

                warm = timed(call, device)
                runs = [timed(call, device) for _ in range(args.repeats)]
                got[path] = {"first_call_s": warm, "median_s": statistics.median(runs), "all_s": runs}
                print(f"{context} {method} {path}: {got[path]['median_s']:.3f} s (first call {warm:.3f} s)", flush=True)
            rows.append({"context": context, "batch": args.batch, "padded_rows": sum(n < context for n in lengths),
                         "min_length": min(lengths), "method": method, **{f"{k}_{path}": v for path, d in got.items() for k, v in d.items()},
                         "fast_over_exact": got["fast"]["median_s"] / got["exact"]["median_s"]})
            del decoders
            if device == "cuda":
                torch.cuda.empty_cache()

    machine = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU {platform.machine()}"
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine,
            "software": f"python {platform.python_version()}, torch {torch.__version__}",
            "command": "python benchmarks/ttft_padded.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    lines = [f"### ttft_padded — {meta['date']}", "", f"- machine: {machine}", f"- software: {meta['software']}",
             f"- command: `{meta['command']}`",
             f"- model: Qwen2.5-Coder-0.5B shape ({'tiny' if args.tiny else 'real'}), random {str(dtype).split('.')[-1]} "
             f"weights; batch {args.batch}, left-padded; median of {args.repeats} calls after one warm-up call", "",
             "| context | method | padded rows | shortest row | exact TTFT s | fast TTFT s | fast ÷ exact | fast first call s |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['method']} | {r['padded_rows']}/{r['batch']} | {r['min_length']} | "
                     f"{r['median_s_exact']:.3f} | {r['median_s_fast']:.3f} | {r['fast_over_exact']:.2f} | "
                     f"{r['first_call_s_fast']:.3f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ttft.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n", encoding="utf-8")
    (out / "ttft.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
