"""Each fast-path lever's share of a dynamic DySCO step: all levers on, then each one off in turn.

The levers are `decoder.fast_kernels.LEVERS` (gate/up GEMV, K/V write in the decode kernel, the probe's
tail, residual add + RMSNorm, a Triton split-K GEMV). One run on one GPU, the Qwen3-8B shape with random
bf16 weights and random KV instead of a prefill (as `decode_speed.py --prefill random`), batch 1:

    python benchmarks/levers.py --out $OUT                 # 128K, about 3-5 min on an H200
    python benchmarks/levers.py --tiny --out /tmp/levers   # CPU, a small model: checks the script runs

Rows: vanilla with all levers and with none; dynamic DySCO with all levers, with each one left out
(leave-one-out: its ms/token minus the all-on figure is that lever's saving with the others in place),
with none (the configuration of the earlier 17.65 ms figure), and all on again (drift). Before them,
`--gemv 1` times the Triton GEMV's tiles against cuBLAS on the shapes it replaces (graph-timed, weights
rotated out of L2) and keeps the best tiles for the rows. Floors as in `decode_speed.py` (bytes / copy
bandwidth measured in the same run). Writes `levers.json` and `levers.md` into --out and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import benchmarks.decode_speed as ds  # noqa: E402  (the model, ceilings, floors and random prefill)

GEMV_CONFIGS = [  # (block_n, block_k, split_k, num_warps, num_stages)
    (16, 256, 1, 4, 3), (32, 256, 1, 4, 3), (32, 256, 2, 4, 3), (64, 128, 1, 4, 4), (16, 512, 1, 4, 2),
    (32, 128, 4, 4, 4), (64, 256, 2, 8, 3), (16, 256, 2, 2, 4), (8 * 4, 512, 2, 4, 2), (128, 64, 1, 4, 4),
]


def gemv_sweep(hidden: int, shapes: dict[str, tuple[int, int]]) -> tuple[list[dict], dict]:
    """Graph-time the Triton GEMV's tile configs vs cuBLAS per shape; set the best config (least summed ratio)."""
    from decoder import fast_fused

    rows, ratios = [], {cfg: 0.0 for cfg in GEMV_CONFIGS}
    for name, (n, k) in shapes.items():
        count = max(1, min(8, 2**31 // (n * k * 2))) if ds.DEVICE == "cuda" else 1
        ws = [torch.randn(n, k, dtype=torch.bfloat16 if ds.DEVICE == "cuda" else torch.float32, device=ds.DEVICE)
              for _ in range(count)]
        x = torch.randn(1, k, dtype=ws[0].dtype, device=ds.DEVICE)
        ref = torch.nn.functional.linear(x, ws[0]).float()

        def cublas(ws=ws, x=x):
            for w in ws:
                torch.nn.functional.linear(x, w)

        base = ds.graph_time(cublas, calls=4) / count
        rows.append({"shape": name, "impl": "cuBLAS (F.linear)", "us": base * 1e6, "GBps": n * k * 2 / base / 1e9,
                     "rel_err": None})
        for cfg in GEMV_CONFIGS:
            bn, bk, sk, warps, stages = cfg
            kw = dict(block_n=bn, block_k=bk, split_k=sk, num_warps=warps, num_stages=stages)
            try:
                got = fast_fused.gemv(x, ws[0], **kw).float()
                err = ((got - ref).norm() / ref.norm()).item()

                def fn(ws=ws, x=x, kw=kw):
                    for w in ws:
                        fast_fused.gemv(x, w, **kw)

                s = ds.graph_time(fn, calls=4) / count
            except Exception as e:  # noqa: BLE001 - a tile that does not fit this GPU: skip it
                ds.log(f"gemv config {cfg} failed: {e}"[:200])
                ratios[cfg] = float("inf")
                continue
            ratios[cfg] += s / base
            rows.append({"shape": name, "impl": f"triton n{bn} k{bk} split{sk} w{warps} s{stages}", "us": s * 1e6,
                         "GBps": n * k * 2 / s / 1e9, "rel_err": err})
        del ws
        ds.empty_cache()
    best = min(ratios, key=ratios.get)
    fast_fused.GEMV_CONFIG.update(block_n=best[0], block_k=best[1], split_k=best[2], num_warps=best[3],
                                  num_stages=best[4])
    ds.log("gemv config chosen:", fast_fused.GEMV_CONFIG, f"(mean time / cuBLAS {ratios[best] / len(shapes):.2f})")
    return rows, dict(fast_fused.GEMV_CONFIG)


def run_config(model, method: str, levers: frozenset[str], context: int, steps: int, dysco_config) -> dict:
    """One FastDecoder with `levers`, random KV for the prompt, `steps` greedy steps: decode ms/token."""
    from decoder.fast import FastDecoder

    kw = {"dysco": dysco_config} if method == "dysco" else {}
    ds.sync()
    ds.reset_peak()
    t0 = time.perf_counter()
    fast = FastDecoder(model, None, method, levers=levers, **kw)
    ds.random_prefill(fast)
    summary = fast.run.fused.summary() if fast.run.fused is not None else {}
    ids = torch.randint(10, model.config.vocab_size, (1, context), device=ds.DEVICE)
    max_len = FastDecoder.bucket(context + steps)
    fast.prepare(1, max_len)
    ds.sync()
    setup = time.perf_counter() - t0
    out = fast.generate_ids(ids, max_new_tokens=steps, max_len=max_len)
    row = {"decode_ms": out.timings["decode_s_per_token"] * 1e3, "peak_GB": ds.peak_gb(), "setup_s": setup,
           "fused": summary, "tokens": out.tokens[0].tolist()}
    del fast, out
    gc.collect()
    ds.empty_cache()
    return row


def markdown(meta: dict, rows: list[dict], gemv: list[dict]) -> str:
    lines = [f"### levers — {meta['date']}", "", f"- machine: {meta['machine']}", f"- software: {meta['software']}",
             f"- command: `{meta['command']}`",
             f"- copy bandwidth measured: {meta['copy_bw_TBps']:.2f} TB/s (read+write); batch 1, context "
             f"{meta['context']}, {meta['steps']} steps, random KV; floors: vanilla {meta['floor_vanilla_ms']:.2f} ms, "
             f"DySCO {meta['floor_dysco_ms']:.2f} ms (probe = layers 0..{meta['probe_layers'] - 1} in full)",
             f"- Triton GEMV tiles: {meta.get('gemv_config', 'default')}", ""]
    all_on = {r["method"]: r["decode_ms"] for r in rows if r["label"] == "all levers"}
    lines += ["| method | levers | decode ms/tok | Δ vs all on (ms) | × floor | peak GB |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        floor = meta["floor_dysco_ms"] if r["method"] == "dysco" else meta["floor_vanilla_ms"]
        base = all_on.get(r["method"])
        delta = f"{r['decode_ms'] - base:+.3f}" if base is not None else ""
        lines.append(f"| {r['method']} | {r['label']} | {r['decode_ms']:.3f} | {delta} | {r['decode_ms'] / floor:.3f} | "
                     f"{r['peak_GB']:.1f} |")
    lines.append("")
    if gemv:
        lines += ["Triton GEMV tiles vs cuBLAS (graph-timed, batch 1):", "",
                  "| shape | implementation | µs | GB/s | rel err |", "|---|---|---:|---:|---:|"]
        for g in gemv:
            err = "" if g["rel_err"] is None else f"{g['rel_err']:.1e}"
            lines.append(f"| {g['shape']} | {g['impl']} | {g['us']:.2f} | {g['GBps']:.0f} | {err} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--steps", type=int, default=32, help="decode steps per row")
    parser.add_argument("--gemv", type=int, default=1, help="sweep the Triton GEMV's tiles first (1) or keep the defaults (0)")
    parser.add_argument("--vanilla", type=int, default=1, help="include the vanilla rows")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--tiny", action="store_true", help="CPU, a small float32 model and a short context")
    args = parser.parse_args()
    if args.tiny:
        ds.DEVICE = "cpu"
        args.context = min(args.context, 256)
        args.steps = min(args.steps, 4)
    os.makedirs(args.out, exist_ok=True)

    import transformers

    from decoder.dysco import DyscoConfig
    from decoder.fast_kernels import LEVERS

    if ds.DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        machine = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs ({platform.node()})"
    else:
        machine = f"CPU tiny run ({platform.node()})"
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine,
            "software": f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}",
            "command": "python benchmarks/levers.py " + " ".join(sys.argv[1:]), "context": args.context, "steps": args.steps}
    t0 = time.time()
    ceil = ds.ceilings() if ds.DEVICE == "cuda" else {"copy_bw_Bps": 1e11}
    meta["copy_bw_TBps"] = ceil["copy_bw_Bps"] / 1e12
    model = ds.build_model(dry=args.tiny)
    ds.log(f"model built ({time.time() - t0:.0f}s)")
    dysco_config = DyscoConfig(head_set=ds.QWEN3_8B_HEADS, strength=2.0, top_p=0.975, top_k=4096, decay=0.75,
                               context_warmup=8)
    meta["probe_layers"] = dysco_config.deepest_layer + 1
    meta.update(ds.floors(model, 1, args.context, ceil["copy_bw_Bps"], meta["probe_layers"]))
    results: dict = {"meta": meta, "rows": [], "gemv": []}

    def save():
        with open(os.path.join(args.out, "levers.json"), "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(args.out, "levers.md"), "w") as f:
            f.write(markdown(meta, results["rows"], results["gemv"]))

    if args.gemv and (ds.DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):  # interpreted: a dry run
        c = model.config
        q_rows = c.num_attention_heads * c.head_dim
        qkv_rows = q_rows + 2 * c.num_key_value_heads * c.head_dim
        shapes = {f"o_proj {c.hidden_size}x{q_rows}": (c.hidden_size, q_rows),
                  f"q/k/v {qkv_rows}x{c.hidden_size}": (qkv_rows, c.hidden_size)}
        results["gemv"], meta["gemv_config"] = gemv_sweep(c.hidden_size, shapes)
        save()

    everything = frozenset(LEVERS)
    configs = []
    if args.vanilla:
        configs += [("vanilla", "all levers", everything), ("vanilla", "none", frozenset())]
    configs += [("dysco", "all levers", everything)]
    configs += [("dysco", f"all but {name}", everything - {name}) for name in LEVERS]
    configs += [("dysco", "none", frozenset()), ("dysco", "all levers (again: drift)", everything)]
    for method, label, levers in configs:
        try:
            row = run_config(model, method, levers, args.context, args.steps, dysco_config)
        except Exception as err:  # noqa: BLE001 - one failing configuration must not lose the others
            ds.log(f"{method} / {label} failed: {type(err).__name__}: {err}"[:400])
            ds.empty_cache()
            continue
        row.update(method=method, label=label, levers=sorted(levers))
        results["rows"].append(row)
        save()
        ds.log(f"{method:8s} {label:28s} {row['decode_ms']:8.3f} ms/token  setup {row['setup_s']:.1f}s  "
               f"fused {row['fused']}  ({time.time() - t0:.0f}s)")
    save()
    print(markdown(meta, results["rows"], results["gemv"]))


if __name__ == "__main__":
    main()
