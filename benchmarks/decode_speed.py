"""Decode speed on one GPU: transformers' generate vs our vanilla, AttnTS and DySCO fast path.

Builds the Qwen3-8B shape (36 layers, hidden 4096, 32 heads, 8 KV heads, head_dim 128, intermediate
12288, vocab 151936) with random bf16 weights directly on the GPU (speed does not depend on the
weights' values) and measures, per (batch, context, method): prefill time, time to first token,
decode ms/token, tokens/s and peak memory, next to the memory-bandwidth floor:

    floor per step = (weights read once + KV cache read once [+ the probe's share]) / copy bandwidth

with the copy bandwidth measured on the same GPU at the start (bytes read + bytes written).

    python benchmarks/decode_speed.py                                   # everything (about 4 min on an H200)
    python benchmarks/decode_speed.py --contexts 16384,32768 --batch8 0 --methods vanilla,dysco --steps 32
    python benchmarks/decode_speed.py --check-only                      # fast path vs exact path, small context
    # issue 13: vanilla / dynamic / lagged / static DySCO, batch 1 and 8, random KV instead of a prefill
    python benchmarks/decode_speed.py --methods vanilla,dysco,dysco-lagged,dysco-static --batch8 16384,32768,65536 \
        --prefill random --kernels 0 --micro 0

Method names: vanilla, attnts, dysco (dynamic), hf (transformers' generate) and variants written
`method-flag-flag`: dysco-static, dysco-lagged (plain probabilities), dysco-lagged-biased, *-nofuse (no
fused small ops), *-nograph (eager steps). `--prefill random` fills the KV buffers with random values
instead of running the prompt through the model (decode speed does not depend on what the cache holds,
and a 128K prefill costs 12 s per row); the prefill and TTFT columns then say nothing.

Writes `bench.json` and `bench.md` (a section for docs/benchmarks.md: date, machine, command, table)
into --out (default: $OUT or ./out) and prints the table last.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

QWEN3_8B_HEADS = [(21, 31), (21, 18), (20, 15), (22, 4), (21, 11), (20, 16), (21, 17), (19, 13), (21, 10), (21, 8),
                  (18, 5), (20, 14), (19, 14), (24, 13), (17, 4), (19, 28)]


DEVICE = "cuda"


def log(*args) -> None:
    print(*args, flush=True)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if DEVICE == "cuda" else float("nan")


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Ceilings
# ------------------------------------------------------------------------------------------------


def time_cuda(fn, reps: int = 10, warmup: int = 3) -> float:
    """Median seconds of `fn()` over `reps` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    if DEVICE != "cuda":
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    times.sort()
    return times[len(times) // 2]


def ceilings() -> dict:
    """Device-to-device copy bandwidth (read + write bytes) and bf16 matmul rate on random data."""
    n = 2 * 1024**3 // 2  # 2 GiB of bf16 each way
    a = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    s = time_cuda(lambda: b.copy_(a))
    copy_bw = 2 * a.numel() * 2 / s
    del a, b
    m = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    s = time_cuda(lambda: m @ m)
    del m
    torch.cuda.empty_cache()
    return {"copy_bw_Bps": copy_bw, "bf16_matmul_flops": 2 * 8192**3 / s}


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


def build_model(layers: int = 36, max_positions: int = 262144, dry: bool = False, dtype: torch.dtype = torch.bfloat16):
    """Qwen3-8B shape, random bf16 weights, initialised on the GPU (dry: a small float32 one on the CPU)."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    dims = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128)
    if dry:
        dims = dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=16)
    config = Qwen3Config(
        **dims, num_hidden_layers=layers, max_position_embeddings=max_positions,
        rope_theta=1_000_000.0, tie_word_embeddings=False, attn_implementation="sdpa",
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if dry else dtype)
    model.eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


class NoTokenizer:
    """Enough of a tokenizer for token-id prompts (the exact Decoder decodes texts at the end)."""

    pad_token_id = 0
    eos_token_id = None
    chat_template = None

    def decode(self, ids, **kwargs) -> str:
        return ""


def weight_bytes(model) -> int:
    """Bytes one decode step must read: every parameter but the embedding table (one row of it)."""
    embed = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - embed.numel() * embed.element_size() + embed.shape[1] * embed.element_size()


def layer_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())


def kv_bytes(model, batch: int, context: int, layers: int | None = None) -> int:
    c = model.config
    layers = c.num_hidden_layers if layers is None else layers
    return 2 * layers * c.num_key_value_heads * c.head_dim * 2 * batch * context


# ------------------------------------------------------------------------------------------------
# Correctness: fast path vs exact path on the real shape
# ------------------------------------------------------------------------------------------------


def check(model, dysco_config, lengths_list=((2048,), (2048, 1500, 900)), new: int = 8) -> list[dict]:
    from decoder.fast import FastDecoder
    from decoder.generation import Decoder

    rows = []
    tok = NoTokenizer()
    gen = torch.Generator().manual_seed(1)
    lagged = dysco_config.replace(selection="lagged")
    for lengths in lengths_list:
        vocab = model.config.vocab_size
        prompts = [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in lengths]
        for label, method, kw in (("vanilla", "vanilla", {}), ("attnts", "attnts", {"temperature": 0.8}),
                                  ("dysco", "dysco", {"dysco": dysco_config}), ("dysco-lagged", "dysco", {"dysco": lagged})):
            exact = Decoder(model, tok, method, **kw).generate(prompts, max_new_tokens=new, return_logits=True, eos=[])
            fast = FastDecoder(model, tok, method, **kw).generate(prompts, max_new_tokens=new, return_logits=True, eos=[])
            for r in range(len(prompts)):
                a, b = exact.logits[r].float(), fast.logits[r].float()
                n = min(len(a), len(b))
                # Compare the logits of the steps up to the first token disagreement (later ones see other inputs).
                agree = 0
                while agree < n and exact.token_ids[r][agree] == fast.token_ids[r][agree]:
                    agree += 1
                upto = max(1, min(n, agree + 1))
                diff = (a[:upto] - b[:upto])
                rows.append({
                    "method": label, "batch": len(prompts), "row": r, "length": lengths[r],
                    "same_tokens": exact.token_ids[r] == fast.token_ids[r], "agree_prefix": agree,
                    "max_abs": diff.abs().max().item(), "rel_l2": (diff.norm() / a[:upto].norm()).item(),
                    # How close the exact path's top two logits are at the first disagreement (a near-tie).
                    "gap_at_disagreement": (a[agree].topk(2).values[0] - a[agree].topk(2).values[1]).item() if agree < n else None,
                })
            del exact, fast
            empty_cache()
    return rows


def graph_time(fn, calls: int = 10, reps: int = 10) -> float:
    """Seconds per `fn()` with launch overhead removed: `calls` calls captured in one CUDA graph."""
    if DEVICE != "cuda":
        return time_cuda(fn, reps=3, warmup=1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_cuda(graph.replay, reps=reps) / calls


KERNEL_CONFIGS = [  # (block_n, num_warps, num_stages, programs_per_sm)
    (64, 4, 3, 4), (64, 4, 3, 8), (64, 4, 4, 8), (64, 8, 3, 4), (128, 4, 2, 4), (128, 4, 3, 4),
    (128, 8, 3, 4), (128, 8, 2, 8), (256, 8, 2, 4), (32, 4, 4, 8),
]


def kernel_bench(model, contexts=(16384, 32768, 131072), configs=KERNEL_CONFIGS) -> tuple[list[dict], dict]:
    """One layer's decode attention, graph-timed: the Triton split-KV kernel over tile configs (picks the
    best, sets it as the kernel's CONFIG for the rest of the run) vs SDPA flash without a bias."""
    from decoder import fast_kernels
    from decoder.dysco import select_positions
    from decoder.fast_kernels import decode_attention_torch, decode_attention_triton

    c = model.config
    out = []
    times: dict[tuple, list[float]] = {cfg: [] for cfg in configs}
    for context in contexts:
        dtype = next(model.parameters()).dtype
        q = torch.randn(1, c.num_attention_heads, c.head_dim, dtype=dtype, device=DEVICE)
        k = torch.randn(1, c.num_key_value_heads, context, c.head_dim, dtype=dtype, device=DEVICE)
        v = torch.randn_like(k)
        bias = torch.zeros(1, context, dtype=torch.float32, device=DEVICE)
        bias[:, ::3] = math.log(2.0)
        t = torch.tensor([context - 1], device=DEVICE)
        ref = decode_attention_torch(q, k, v, bias, t, c.head_dim**-0.5).float()
        floor = 2 * k.numel() * k.element_size()
        for cfg in configs:
            block_n, warps, stages, per_sm = cfg
            fn = lambda: decode_attention_triton(q, k, v, bias, t, c.head_dim**-0.5, block_n=block_n,  # noqa: E731
                                                 num_warps=warps, num_stages=stages, programs_per_sm=per_sm)
            try:
                got = fn().float()
                err = ((got - ref).norm() / ref.norm()).item()
                s = graph_time(fn)
            except Exception as e:  # noqa: BLE001 - a config that does not fit (shared memory): skip it
                log(f"config {cfg} failed: {e}"[:200])
                times[cfg].append(float("inf"))
                continue
            times[cfg].append(s)
            out.append({"context": context, "impl": f"triton n{block_n} w{warps} s{stages} p{per_sm}", "us": s * 1e6,
                        "GBps": floor / s / 1e9, "rel_err": err})
        qs = q[:, :, None]
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(qs, k, v, enable_gqa=True)  # noqa: E731
        try:
            s = graph_time(fn)
            out.append({"context": context, "impl": "sdpa (no bias)", "us": s * 1e6, "GBps": floor / s / 1e9, "rel_err": None})
        except Exception as err:  # noqa: BLE001
            out.append({"context": context, "impl": f"sdpa failed: {err}"[:80], "us": None, "GBps": None, "rel_err": None})
        imp = torch.rand(1, context, device=DEVICE)
        imp /= imp.sum()
        s = graph_time(lambda: select_positions(imp, 0.975, 4096))
        out.append({"context": context, "impl": "select_positions (graph)", "us": s * 1e6, "GBps": None, "rel_err": None})
        del q, k, v
        empty_cache()
    # The best config over all contexts: the least sum of (time / best time at that context).
    best_at = [min(times[cfg][i] for cfg in configs) for i in range(len(contexts))]
    score = {cfg: sum(ts[i] / best_at[i] for i in range(len(contexts))) for cfg, ts in times.items()}
    best = min(score, key=score.get)
    fast_kernels.CONFIG.update(block_n=best[0], num_warps=best[1], num_stages=best[2], programs_per_sm=best[3])
    log("kernel config chosen:", fast_kernels.CONFIG)
    return out, dict(fast_kernels.CONFIG)


def micro_bench(model) -> list[dict]:
    """What a batch-1 step is made of: GEMV rate per weight shape, and the cost of one tiny kernel in a graph."""
    out = []
    c = model.config
    x = torch.randn(1, c.hidden_size, dtype=torch.bfloat16, device=DEVICE)
    shapes = {"q/o_proj 4096x4096": (4096, 4096), "k/v_proj 1024x4096": (1024, 4096),
              "gate/up 12288x4096": (12288, 4096), "down 4096x12288": (4096, 12288), "lm_head 151936x4096": (151936, 4096)}
    for name, (n, k) in shapes.items():
        # Several weights in rotation so that the 60 MB L2 never holds the one being read.
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device=DEVICE) for _ in range(max(1, min(8, 2**31 // (n * k * 2))))]
        xi = torch.randn(1, k, dtype=torch.bfloat16, device=DEVICE)
        def fn(ws=ws, xi=xi):
            for w in ws:
                torch.nn.functional.linear(xi, w)
        s = graph_time(fn, calls=4) / len(ws)
        out.append({"what": f"GEMV {name}", "us": s * 1e6, "GBps": n * k * 2 / s / 1e9})
        del ws
    tiny = torch.zeros(1024, device=DEVICE)
    s = graph_time(lambda: [tiny.add_(1) for _ in range(100)], calls=1) / 100
    out.append({"what": "one tiny elementwise kernel inside a CUDA graph", "us": s * 1e6, "GBps": None})
    empty_cache()
    return out


# ------------------------------------------------------------------------------------------------
# Speed
# ------------------------------------------------------------------------------------------------


def bench_hf(model, batch: int, context: int, steps: int) -> dict:
    """transformers' own greedy generate (its default cache, SDPA); events from a logits processor."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Marks(LogitsProcessor):
        def __init__(self):
            self.events = []

        def __call__(self, input_ids, scores):
            if DEVICE == "cuda":
                e = torch.cuda.Event(enable_timing=True)
                e.record()
            else:
                e = time.perf_counter()
            self.events.append(e)
            return scores

    model.set_attn_implementation("sdpa")
    ids = torch.randint(10, model.config.vocab_size, (batch, context), device=DEVICE)
    marks = Marks()
    sync()
    reset_peak()
    if DEVICE == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        since = lambda a, b: a.elapsed_time(b) / 1000  # noqa: E731
    else:
        start = time.perf_counter()
        since = lambda a, b: b - a  # noqa: E731
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                   do_sample=False, logits_processor=LogitsProcessorList([marks]))
    sync()
    ttft = since(start, marks.events[0])
    decode = since(marks.events[0], marks.events[-1]) / (len(marks.events) - 1)
    return {"prefill_s": ttft, "ttft_s": ttft, "decode_ms": decode * 1e3, "peak_GB": peak_gb()}


def random_prefill(fast) -> None:
    """Make `fast` skip the prompt's forward: random keys and values in the prefilled columns instead."""
    run, device = fast.run, fast.device  # not `fast` itself: a cycle would keep its buffers alive after `del`

    def prefill(shape, ids, pads, n_prefill):
        gen = torch.Generator(device=device).manual_seed(0)
        for layer in run.k:  # k, v: [batch, kv_heads, max_len, head_dim]
            run.k[layer][:, :, :n_prefill].normal_(generator=gen)
            run.v[layer][:, :, :n_prefill].normal_(generator=gen)
        if n_prefill < ids.shape[1]:
            return None
        return torch.randn(ids.shape[0], shape.logits.shape[-1], device=device, generator=gen)  # [batch, vocab]

    fast._prefill = prefill


def bench_fast(model, method: str, batch: int, context: int, steps: int, dysco_config, prefill: str = "model") -> dict:
    from decoder.fast import FastDecoder

    # Variants for the notes: "vanilla-nofuse" (no fused small ops), "vanilla-nograph" (eager steps).
    method, *flags = method.split("-")
    kw = {"dysco": dysco_config} if method == "dysco" else ({"temperature": 0.8} if method == "attnts" else {})
    if "nofuse" in flags:
        kw["fuse"] = False
    if "nograph" in flags:
        kw["cuda_graphs"] = False
    if "static" in flags:
        kw["dysco"] = dysco_config.replace(selection="static")
    if "lagged" in flags:
        kw["dysco"] = dysco_config.replace(selection="lagged", lagged_probs="biased" if "biased" in flags else "plain")
    sync()
    reset_peak()
    fast = FastDecoder(model, None, method, **kw)
    if prefill == "random":
        random_prefill(fast)
    if fast.run.fused is not None:
        log("fused ops:", fast.run.fused.summary())
    ids = torch.randint(10, model.config.vocab_size, (batch, context), device=DEVICE)
    max_len = FastDecoder.bucket(context + steps)
    t0 = time.perf_counter()
    fast.prepare(batch, max_len)  # buffers + graph capture, once per (batch, max_len)
    sync()
    prepare = time.perf_counter() - t0
    out = fast.generate_ids(ids, max_new_tokens=steps, max_len=max_len)
    tm = out.timings
    row = {"prefill_s": tm["prefill_s"], "ttft_s": tm["ttft_s"], "decode_ms": tm["decode_s_per_token"] * 1e3,
           "peak_GB": peak_gb(), "capture_s": prepare}
    del fast, out
    gc.collect()  # the KV buffers of a batch-8 64K row are 82 GB: gone before the next row allocates
    empty_cache()
    return row


def floors(model, batch: int, context: int, bw: float, probe_layers: int) -> dict:
    w = weight_bytes(model)
    kv = kv_bytes(model, batch, context)
    vanilla = (w + kv) / bw
    probe = (probe_layers * layer_bytes(model) + kv_bytes(model, batch, context, probe_layers)) / bw
    return {"floor_vanilla_ms": vanilla * 1e3, "floor_dysco_ms": (vanilla + probe) * 1e3,
            "weights_GB": w / 1e9, "kv_GB": kv / 1e9}


def markdown(meta: dict, rows: list[dict], checks: list[dict], kernels: list[dict], micro: list[dict] = ()) -> str:
    lines = [f"### decode_speed — {meta['date']}", "",
             f"- machine: {meta['machine']}", f"- software: {meta['software']}",
             f"- command: `{meta['command']}`",
             f"- ceilings measured: copy {meta['copy_bw_TBps']:.2f} TB/s (read+write), bf16 matmul {meta['matmul_TFLOPs']:.0f} TFLOP/s",
             f"- decode kernel config: {meta.get('kernel_config', 'default')}",
             f"- DySCO: 16 heads at the published Qwen3-8B positions (probe runs layers 0..{meta['probe_layers'] - 1}), "
             "top_k 4096, top_p 0.975, strength 2, decay 0.75, warmup 8; AttnTS temperature 0.8", ""]
    if rows:
        random = meta.get("prefill") == "random"
        if random:
            lines += ["Prefill: random keys and values (`--prefill random`), so the prefill and TTFT columns are "
                      "the random fill, not a prompt's forward.", ""]
        vanilla = {(r["batch"], r["context"]): r["decode_ms"] for r in rows if r["method"] == "vanilla"}
        lines += ["| batch | context | method | prefill s | TTFT s | decode ms/tok | tok/s | × vanilla | peak GB | floor ms | × floor |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            # static: no probe after its first step; lagged: never (after the importance-only steps)
            probed = r["method"].startswith("dysco") and "static" not in r["method"] and "lagged" not in r["method"]
            floor = r["floor_dysco_ms"] if probed else r["floor_vanilla_ms"]
            base = vanilla.get((r["batch"], r["context"]))
            ratio = f"{r['decode_ms'] / base:.2f}" if base else ""
            lines.append(
                f"| {r['batch']} | {r['context']} | {r['method']} | {r['prefill_s']:.2f} | {r['ttft_s']:.2f} | "
                f"{r['decode_ms']:.2f} | {1000 * r['batch'] / r['decode_ms']:.0f} | {ratio} | {r['peak_GB']:.1f} | {floor:.2f} | "
                f"{r['decode_ms'] / floor:.2f} |")
        lines.append("")
    if checks:
        lines += [f"Fast path vs exact path ({meta.get('dtype', 'bfloat16')}, same model):", "",
                  "| method | batch | row | length | same tokens | agreeing prefix | max abs Δlogit | rel L2 | top-2 gap at first disagreement |",
                  "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
        for c in checks:
            gap = "" if c["gap_at_disagreement"] is None else f"{c['gap_at_disagreement']:.3f}"
            lines.append(f"| {c['method']} | {c['batch']} | {c['row']} | {c['length']} | {c['same_tokens']} | "
                         f"{c['agree_prefix']} | {c['max_abs']:.3f} | {c['rel_l2']:.2e} | {gap} |")
        lines.append("")
    if kernels:
        lines += ["One layer's decode attention (batch 1):", "", "| context | implementation | µs | GB/s (K+V) | rel err |",
                  "|---:|---|---:|---:|---:|"]
        for k in kernels:
            us = "" if k["us"] is None else f"{k['us']:.1f}"
            bw = "" if k["GBps"] is None else f"{k['GBps']:.0f}"
            err = "" if k["rel_err"] is None else f"{k['rel_err']:.1e}"
            lines.append(f"| {k['context']} | {k['impl']} | {us} | {bw} | {err} |")
        lines.append("")
    if micro:
        lines += ["What a batch-1 step is made of (graph-timed):", "", "| what | µs | GB/s |", "|---|---:|---:|"]
        for m in micro:
            bw = "" if m["GBps"] is None else f"{m['GBps']:.0f}"
            lines.append(f"| {m['what']} | {m['us']:.2f} | {bw} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", default="16384,32768,65536,131072")
    parser.add_argument("--batch8", default="16384", help="contexts for the batch-8 rows, e.g. 16384,32768 (0: none)")
    parser.add_argument("--methods", default="hf,vanilla,attnts,dysco")
    parser.add_argument("--steps", type=int, default=64, help="decode steps for our methods")
    parser.add_argument("--hf-steps", type=int, default=16, help="decode steps for transformers' generate")
    parser.add_argument("--extra-methods", default="", help="variants run at --extra-at only, e.g. vanilla-nofuse")
    parser.add_argument("--extra-at", type=int, default=16384)
    parser.add_argument("--check", type=int, default=1, help="run the fast-vs-exact check first")
    parser.add_argument("--check-only", action="store_true")
    parser.add_argument("--kernels", type=int, default=1, help="time the attention kernel alone")
    parser.add_argument("--micro", type=int, default=1, help="time GEMVs and a tiny kernel (what a step is made of)")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--dtype", default="bfloat16", help="model dtype (float32: the check without bf16 noise)")
    parser.add_argument("--dry", action="store_true", help="CPU, a small float32 model: checks the script runs")
    parser.add_argument("--prefill", choices=("model", "random"), default="model",
                        help="random: random KV buffers instead of the prompt's forward (decode timing only)")
    args = parser.parse_args()
    global DEVICE
    if args.dry:
        DEVICE = "cpu"
    os.makedirs(args.out, exist_ok=True)

    from decoder.dysco import DyscoConfig

    import transformers

    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        machine = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs ({platform.node()})"
    else:
        machine = f"CPU dry run ({platform.node()})"
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine,
        "software": f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
        "command": "python benchmarks/decode_speed.py " + " ".join(sys.argv[1:]),
    }
    t0 = time.time()
    ceil = ceilings() if DEVICE == "cuda" else {"copy_bw_Bps": 1e11, "bf16_matmul_flops": 1e12}
    meta["copy_bw_TBps"] = ceil["copy_bw_Bps"] / 1e12
    meta["matmul_TFLOPs"] = ceil["bf16_matmul_flops"] / 1e12
    log(f"ceilings: copy {meta['copy_bw_TBps']:.2f} TB/s, bf16 matmul {meta['matmul_TFLOPs']:.0f} TFLOP/s ({time.time() - t0:.0f}s)")

    model = build_model(dry=args.dry, dtype=getattr(torch, args.dtype))
    meta["dtype"] = args.dtype
    meta["prefill"] = args.prefill
    log(f"model built on {next(model.parameters()).device}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params ({time.time() - t0:.0f}s)")
    dysco_config = DyscoConfig(head_set=QWEN3_8B_HEADS, strength=2.0, top_p=0.975, top_k=4096, decay=0.75, context_warmup=8)
    meta["probe_layers"] = dysco_config.deepest_layer + 1

    results: dict = {"meta": meta, "rows": [], "checks": [], "kernels": [], "micro": []}

    def save():
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, "bench.md"), "w") as f:
            f.write(markdown(meta, results["rows"], results["checks"], results["kernels"], results["micro"]))

    if args.micro:
        results["micro"] = micro_bench(model)
        save()
        for m in results["micro"]:
            log("micro", m)
    if args.kernels:
        results["kernels"], meta["kernel_config"] = kernel_bench(model, contexts=(256,) if args.dry else (16384, 32768, 131072))
        save()
        for k in results["kernels"]:
            log("kernel", k)
    if args.check or args.check_only:
        lengths = ((64,), (64, 40, 20)) if args.dry else ((2048,), (2048, 1500, 900))
        results["checks"] = check(model, dysco_config, lengths)
        save()
        for c in results["checks"]:
            log("check", c)
        log(f"check done ({time.time() - t0:.0f}s)")
    if args.check_only:
        print(markdown(meta, [], results["checks"], results["kernels"], results["micro"]))
        return

    methods = args.methods.split(",")
    cases = [(1, int(c)) for c in args.contexts.split(",") if c]
    cases += [(8, int(c)) for c in args.batch8.split(",") if c and int(c)]
    for batch, context in cases:
        fl = floors(model, batch, context, ceil["copy_bw_Bps"], meta["probe_layers"])
        extra = [m for m in args.extra_methods.split(",") if m] if (batch == 1 and context == args.extra_at) else []
        for method in methods + extra:
            try:
                if method == "hf":
                    row = bench_hf(model, batch, context, args.hf_steps)
                else:
                    row = bench_fast(model, method, batch, context, args.steps, dysco_config, args.prefill)
            except torch.cuda.OutOfMemoryError as err:
                log(f"OOM for {method} at batch {batch}, context {context}: {err}"[:200])
                empty_cache()
                continue
            row.update({"batch": batch, "context": context, "method": method, **fl})
            results["rows"].append(row)
            save()
            log(f"{batch} {context} {method}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)),
                f"({time.time() - t0:.0f}s)")
            empty_cache()
    save()
    print(markdown(meta, results["rows"], results["checks"], results["kernels"], results["micro"]))


if __name__ == "__main__":
    main()
