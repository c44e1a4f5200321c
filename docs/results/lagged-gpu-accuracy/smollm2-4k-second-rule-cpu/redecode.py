"""Re-decode, with the prompt-probing lagged rule, the SmolLM2 4K needles whose first token the first rule changed."""
import json, sys, time
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/benchmarks")
import torch
from pathlib import Path
from gpu_results import load_example_sets
from lagged import SMOLLM2_HEADS, make_decoder, parse_heads
from calibration.tasks import get_task
from calibration.evaluation.batches import example_budget, prompt_ids
from decoder.loading import load_model

old = json.load(open("/work/main/docs/results/lagged-gpu-accuracy/agree.json"))["examples"]
picked = [e for e in old if e["length"] == 4096 and e["dynamic"]["tokens"][:1] != e["lagged-plain"]["tokens"][:1]]
stored, seed = load_example_sets(Path("/work/main/.gpu_inputs/smollm2-needle-s2.jsonl.gz"))
by_id = {e.id: e for e in stored[("needle", 4096)]}
model, tok = load_model("smollm2-135m", dtype=torch.float32, device="cpu", progress=False)
task = get_task("needle")
dec = make_decoder(model, tok, "lagged-plain", parse_heads(SMOLLM2_HEADS), "fast")
out = []
t0 = time.time()
for k in range(0, len(picked), 8):
    chunk = picked[k:k + 8]
    exs = [by_id[e["id"]] for e in chunk]
    enc = [prompt_ids(tok, x) for x in exs]
    budgets = [example_budget(x, None) for x in exs]
    res = dec.generate([a for a, _ in enc], template_mask=[m for _, m in enc], max_new_tokens=max(budgets), eos=None)
    for e, x, ids, reason, b in zip(chunk, exs, res.token_ids, res.finish_reasons, budgets):
        kept = ids[:b]
        if reason == "eos" and len(kept) == len(ids):
            kept = kept[:-1]
        text = tok.decode(kept, skip_special_tokens=True)
        out.append({"id": e["id"], "answer": e["answer"], "tokens": kept, "text": text, "score": float(task.grade(text, x)),
                    "dynamic_gpu": e["dynamic"], "old_lagged_gpu": e["lagged-plain"]})
    print(f"[{time.time()-t0:.0f} s] {len(out)}/{len(picked)}", flush=True)
json.dump(out, open("/tmp/lag38.json", "w"), indent=1)
new = sum(o["score"] for o in out); dyn = sum(o["dynamic_gpu"]["score"] for o in out); old_s = sum(o["old_lagged_gpu"]["score"] for o in out)
same_first = sum(o["tokens"][:1] == o["dynamic_gpu"]["tokens"][:1] for o in out)
ident = sum(o["tokens"] == o["dynamic_gpu"]["tokens"] for o in out)
print(f"n {len(out)}: new lagged {new:.0f}, dynamic (GPU) {dyn:.0f}, first-rule lagged (GPU) {old_s:.0f}; first token = dynamic's {same_first}; identical {ident}")
