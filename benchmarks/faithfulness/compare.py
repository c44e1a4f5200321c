"""Token-for-token comparison of dysco-toolkit's DySCO decoder with the authors' published DySCO code.

The published code is princeton-pli/DySCO @ 1f4e3a6 (`dysco/custom_mixin.py`: rescale_generate /
_rescale_sample; `dysco/custom_modeling_llama.py`: RescaleLlamaForCausalLM). It is not part of this
repository: put those two files in $DYSCO_REF_DIR/dysco/ (default /tmp/dysco_ref; the flash/sdpa
attention classes they import and nothing on this path uses may be removed) and make a separate venv
for it, $REF_PY (default /tmp/refvenv/bin/python): torch==2.13.0 and transformers==4.57.6. Ours runs
in this checkout's .venv. docs/faithfulness.md has the result and the pitfalls.

    $REF_PY benchmarks/faithfulness/compare.py all         # everything (~1 h on 1 thread)
    .venv/bin/python benchmarks/faithfulness/compare.py ours   # our API side -> runs/ours/*.pt, runs/inputs.json
    $REF_PY benchmarks/faithfulness/compare.py ref         # published code -> runs/ref/*.pt
    $REF_PY benchmarks/faithfulness/compare.py ref_fixpos  # published code, RoPE positions from 0 (diagnostic)
    $REF_PY benchmarks/faithfulness/compare.py cli         # our CLI (dysco generate --json) -> runs/cli/*.json
    $REF_PY benchmarks/faithfulness/compare.py report      # -> results.json + table

Same inputs on both sides: the token ids and chat-template mask come from our `Decoder.encode`; the published
`obtain_template_sequence_mask` is monkeypatched to return that mask (a non-empty `template_sequences` makes it
run). Greedy, 32 new tokens, no EOS stop on either side (the CLI stops at EOS: its tokens are compared as a prefix).
"""
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# Where things are; every path can be moved with an environment variable.
REF_DIR = os.environ.get("DYSCO_REF_DIR", "/tmp/dysco_ref")  # holds dysco/ (the authors' two files)
RUNS = os.environ.get("DYSCO_REF_RUNS", os.path.join(REF_DIR, "runs"))
MAIN = os.environ.get("DYSCO_TOOLKIT", os.path.abspath(os.path.join(HERE, "..", "..")))
OUR_PY = os.environ.get("OUR_PY", os.path.join(MAIN, ".venv/bin/python"))
REF_PY = os.environ.get("REF_PY", "/tmp/refvenv/bin/python")
CKPT = os.path.expanduser("~/.cache/dysco-toolkit/models/smollm2-135m/checkpoint")
MAX_NEW = 32
VANILLA_PROMPTS = ["short_fact", "story_qa", "long_needle"]
# CLI cases: (prompt, setting); prompts with one user message (the CLI sends the text as one user message).
CLI_CASES = [("short_fact", "a_defaults"), ("kv_lookup", "b_s3_p06_k32"), ("needle_filler", "c_hard"),
             ("multi_doc", "d_static"), ("records_table", "e_iw0"), ("long_needle", "f_iw2"),
             ("story_qa", "g_hard_static"), ("kitchen_notes", "h_k8_s4"), ("long_needle", "a_defaults")]

sys.path.insert(0, HERE)
sys.path.insert(1, REF_DIR)
from prompts import HEADS, SETTINGS, build_prompts  # noqa: E402


def _setup_torch():
    import torch
    torch.set_num_threads(1)
    return torch


# ------------------------------------------------------------------------------------------------
# Our side (run with /work/main/.venv/bin/python)
# ------------------------------------------------------------------------------------------------
def _provenance():
    """Which version of our code ran: git HEAD, the decoder files' state and checksums."""
    import hashlib
    git = lambda *a: subprocess.run(["git", *a], cwd=MAIN, capture_output=True, text=True).stdout.strip()
    files = sorted(f for f in os.listdir(os.path.join(MAIN, "decoder")) if f.endswith(".py"))
    return {"head": git("rev-parse", "HEAD"), "status_decoder": git("status", "--short", "decoder"),
            "md5": {f: hashlib.md5(open(os.path.join(MAIN, "decoder", f), "rb").read()).hexdigest() for f in files},
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def run_ours(only=None, out="ours"):
    torch = _setup_torch()
    sys.path.insert(0, MAIN)
    from decoder.dysco import DyscoConfig
    from decoder.generation import Decoder
    from decoder.loading import load_model

    model, tok = load_model("smollm2-135m", progress=False)
    assert next(model.parameters()).dtype == torch.float32
    os.makedirs(os.path.join(RUNS, out), exist_ok=True)
    with open(os.path.join(RUNS, out, "provenance.json"), "w") as f:
        json.dump(_provenance(), f, indent=1)
    prompts = build_prompts()
    vanilla = Decoder(model, tok, method="vanilla")
    inputs = {"prompts": {}, "settings": {}, "heads": HEADS}
    for name, msgs in prompts.items():
        ids, masks = vanilla.encode([msgs])
        inputs["prompts"][name] = {"messages": msgs, "ids": ids[0], "template": masks[0]}
        print(f"prompt {name}: {len(ids[0])} tokens, {sum(masks[0])} template", flush=True)
    for sname, knobs in SETTINGS.items():
        d = Decoder(model, tok, method="dysco", dysco=DyscoConfig(head_set=HEADS, **knobs))
        inputs["settings"][sname] = dict(knobs, intervention_warmup_resolved=d.intervention_warmup)
    if out == "ours":
        with open(os.path.join(RUNS, "inputs.json"), "w") as f:
            json.dump(inputs, f)
    else:  # a rerun must see the very same inputs
        with open(os.path.join(RUNS, "inputs.json")) as f:
            assert json.load(f) == json.loads(json.dumps(inputs)), "inputs changed since the first run"

    for name in VANILLA_PROMPTS:  # sanity: vanilla greedy
        t0 = time.time()
        r = vanilla.generate([prompts[name]], max_new_tokens=MAX_NEW, eos=[], return_logits=True)
        torch.save({"tokens": r.token_ids[0], "logits": r.logits[0]}, os.path.join(RUNS, out, f"{name}__vanilla.pt"))
        print(f"ours vanilla {name}: {time.time() - t0:.1f}s", flush=True)

    for sname, knobs in SETTINGS.items():
        d = Decoder(model, tok, method="dysco", dysco=DyscoConfig(head_set=HEADS, **knobs))
        for name, msgs in prompts.items():
            if only and (name, sname) not in only:
                continue
            t0 = time.time()
            r = d.generate([msgs], max_new_tokens=MAX_NEW, eos=[], return_logits=True)
            assert r.prompt_ids[0] == inputs["prompts"][name]["ids"]
            assert len(r.token_ids[0]) == MAX_NEW
            torch.save({"tokens": r.token_ids[0], "logits": r.logits[0], "iw": d.intervention_warmup},
                       os.path.join(RUNS, out, f"{name}__{sname}.pt"))
            print(f"{out} {sname} {name}: {time.time() - t0:.1f}s", flush=True)


# ------------------------------------------------------------------------------------------------
# Published side (run with $REF_PY)
# ------------------------------------------------------------------------------------------------
def published_auto_warmup():
    """`intervention_warmup: auto` exactly as run_eval.py computes it (tokenizer rebuilt for transformers 4.57)."""
    from transformers import PreTrainedTokenizerFast
    cfg = json.load(open(f"{CKPT}/tokenizer_config.json"))
    tok = PreTrainedTokenizerFast(tokenizer_file=f"{CKPT}/tokenizer.json", bos_token=cfg["bos_token"],
                                  eos_token=cfg["eos_token"], pad_token=cfg["pad_token"], unk_token=cfg["unk_token"])
    tok.chat_template = open(f"{CKPT}/chat_template.jinja").read()
    hi = [{"role": "user", "content": "Hi"}]
    dummy = tok.apply_chat_template(hi, tokenize=True, add_generation_prompt=True, return_tensors="pt")
    dummy_no_gen = tok.apply_chat_template(hi, tokenize=True, add_generation_prompt=False, return_tensors="pt")
    return int(dummy.shape[1] - dummy_no_gen.shape[1])


def run_ref(variant="ref", only=None):
    torch = _setup_torch()
    sys.path.insert(0, HERE)
    import dysco.custom_mixin as cm
    from dysco.custom_mixin import RescaleConfig
    from dysco.custom_modeling_llama import RescaleLlamaForCausalLM
    from load_ref import load_ref_model

    with open(os.path.join(RUNS, "inputs.json")) as f:
        inputs = json.load(f)
    auto = published_auto_warmup()
    print(f"published auto intervention warmup = {auto}", flush=True)
    model = load_ref_model()
    model.generation_config.eos_token_id = None  # no EOS stop (ours: eos=[])
    # With eos_token_id None, transformers would infer the attention mask from pad_token_id (2 = <|im_end|>, which
    # is in every prompt) and mask the chat template's <|im_end|> tokens out; the published pipeline keeps EOS set
    # (pad == eos, so no inference: all ones). An explicit all-ones attention_mask reproduces that.
    out_dir = os.path.join(RUNS, variant)
    os.makedirs(out_dir, exist_ok=True)

    current = {}

    def patched_template_mask(input_ids, template_sequences):
        assert input_ids.shape[0] == 1 and input_ids[0].tolist() == current["ids"], "input ids differ from ours"
        return torch.tensor([current["template"]], dtype=torch.bool)

    cm.obtain_template_sequence_mask = patched_template_mask

    if variant == "ref_fixpos":
        # Diagnostic only: the published loop truncates input_ids after generate() built the attention mask for
        # the whole prompt, so prepare_inputs_for_generation derives RoPE positions shifted by T = context_warmup
        # + intervention_warmup. Here positions are taken from cache_position instead (0-based, like ours).
        original = RescaleLlamaForCausalLM.prepare_inputs_for_generation

        def prepare(self, input_ids, **kwargs):
            model_inputs = original(self, input_ids, **kwargs)
            model_inputs["position_ids"] = model_inputs["cache_position"].unsqueeze(0)
            return model_inputs

        RescaleLlamaForCausalLM.prepare_inputs_for_generation = prepare

    if variant == "ref":
        for name in VANILLA_PROMPTS:  # sanity: their model, plain transformers greedy generate
            p = inputs["prompts"][name]
            ids = torch.tensor([p["ids"]])
            t0 = time.time()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                                 pad_token_id=2,
                                 return_dict_in_generate=True, output_logits=True)
            torch.save({"tokens": out.sequences[0, ids.shape[1]:].tolist(), "logits": torch.cat(out.logits, 0)},
                       os.path.join(out_dir, f"{name}__vanilla.pt"))
            print(f"{variant} vanilla {name}: {time.time() - t0:.1f}s", flush=True)

    for sname, knobs in inputs["settings"].items():
        iw = auto if knobs["intervention_warmup"] == "auto" else int(knobs["intervention_warmup"])
        assert iw == knobs["intervention_warmup_resolved"], (sname, iw, knobs["intervention_warmup_resolved"])
        for name, p in inputs["prompts"].items():
            if only and (name, sname) not in only:
                continue
            cfg = RescaleConfig(
                selected_heads=[tuple(h) for h in inputs["heads"]],
                top_k=knobs["top_k"], top_p=knobs["top_p"], strength=knobs["strength"],
                decay_factor=knobs["decay"], context_warmup_steps=knobs["context_warmup"],
                intervention_warmup_steps=iw, dynamic_rescale=knobs["selection"] == "dynamic",
                template_sequences=[torch.LongTensor([-1])],  # non-empty: the (patched) mask function runs
            )
            current.update(ids=p["ids"], template=p["template"])
            ids = torch.tensor([p["ids"]])
            t0 = time.time()
            out = model.rescale_generate(ids, attention_mask=torch.ones_like(ids), rescale_config=cfg,
                                         max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=2, return_dict_in_generate=True, output_logits=True)
            tokens = out.sequences[0, ids.shape[1]:].tolist()
            assert out.sequences[0, : ids.shape[1]].tolist() == p["ids"]
            assert len(tokens) == MAX_NEW and len(out.logits) == MAX_NEW
            torch.save({"tokens": tokens, "logits": torch.cat(out.logits, 0), "iw": iw},
                       os.path.join(out_dir, f"{name}__{sname}.pt"))
            print(f"{variant} {sname} {name}: {time.time() - t0:.1f}s", flush=True)


# ------------------------------------------------------------------------------------------------
# Our CLI
# ------------------------------------------------------------------------------------------------
def run_cli():
    with open(os.path.join(RUNS, "inputs.json")) as f:
        inputs = json.load(f)
    os.makedirs(os.path.join(RUNS, "cli"), exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    heads = ",".join(f"{l}:{h}" for l, h in HEADS)
    for name, sname in CLI_CASES:
        msgs = inputs["prompts"][name]["messages"]
        assert len(msgs) == 1 and msgs[0]["role"] == "user"
        prompt_file = os.path.join(RUNS, "cli", f"prompt_{name}.txt")
        with open(prompt_file, "w", encoding="utf-8") as f:
            f.write(msgs[0]["content"])
        k = inputs["settings"][sname]
        cmd = [os.path.join(MAIN, ".venv/bin/dysco"), "generate", "--model", "smollm2-135m", "--method", "dysco",
               "--heads", heads, "--strength", str(k["strength"]), "--top-p", str(k["top_p"]),
               "--top-k", str(k["top_k"]), "--decay", str(k["decay"]), "--warmup", str(k["context_warmup"]),
               "--selection", k["selection"], "--intervention-warmup", str(k["intervention_warmup"]),
               "--max-new-tokens", str(MAX_NEW), "--json", "--prompt-file", prompt_file]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=MAIN, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"CLI failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        result["command"] = cmd
        with open(os.path.join(RUNS, "cli", f"{name}__{sname}.json"), "w") as f:
            json.dump(result, f)
        print(f"cli {sname} {name}: {time.time() - t0:.1f}s prompt_tokens={result['prompt_tokens']} "
              f"n={len(result['tokens'])} finish={result['finish_reason']}", flush=True)


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------
def _margin(row):
    top = row.topk(2)
    return float(top.values[0] - top.values[1])


def compare_pair(a, b, decode):
    """a, b: {"tokens", "logits"} of two runs of the same case."""
    ta, tb = a["tokens"], b["tokens"]
    la, lb = a["logits"].float(), b["logits"].float()
    n = min(len(ta), len(tb))
    k = next((i for i in range(n) if ta[i] != tb[i]), None)
    margins_a = [_margin(la[i]) for i in range(n)]
    margins_b = [_margin(lb[i]) for i in range(n)]
    res = {"identical": k is None and len(ta) == len(tb)}
    upto = n if k is None else k
    diffs = [(la[i] - lb[i]).abs().max().item() for i in range(upto)]
    res["max_abs_logit_diff_before_split" if k is not None else "max_abs_logit_diff"] = max(diffs) if diffs else None
    if k is None:
        i_min = min(range(n), key=lambda i: min(margins_a[i], margins_b[i]))
        res["min_margin"] = {"step": i_min, "ours": margins_a[i_min], "ref": margins_b[i_min]}
    else:
        res.update({
            "first_diff_step": k,
            "ours_token": ta[k], "ref_token": tb[k],
            "ours_token_text": decode(ta[k]), "ref_token_text": decode(tb[k]),
            "ours_margin_top1_top2": margins_a[k], "ref_margin_top1_top2": margins_b[k],
            # how much each side prefers its own token over the other side's
            "ours_gap_own_vs_other": float(la[k, ta[k]] - la[k, tb[k]]),
            "ref_gap_own_vs_other": float(lb[k, tb[k]] - lb[k, ta[k]]),
            "abs_logit_diff_at_split": (la[k] - lb[k]).abs().max().item(),
            "ours_text_from_split": decode(ta[k:]), "ref_text_from_split": decode(tb[k:]),
        })
    return res


def report():
    torch = _setup_torch()
    from tokenizers import Tokenizer
    tk = Tokenizer.from_file(f"{CKPT}/tokenizer.json")

    def decode(x):
        return tk.decode([x] if isinstance(x, int) else list(x), skip_special_tokens=False)

    with open(os.path.join(RUNS, "inputs.json")) as f:
        inputs = json.load(f)

    def load(side, name, sname):
        path = os.path.join(RUNS, side, f"{name}__{sname}.pt")
        return torch.load(path) if os.path.exists(path) else None

    results = {"reference": "princeton-pli/DySCO@1f4e3a65e8da4ae16fc61927ba053324c4bb88bf (transformers 4.57.6)",
               "ours": "/work/main decoder (transformers 5.24.0)", "heads": HEADS, "max_new_tokens": MAX_NEW,
               "prompts": {n: {"tokens": len(p["ids"]), "template_tokens": sum(p["template"])}
                           for n, p in inputs["prompts"].items()},
               "settings": inputs["settings"], "vanilla": {}, "cases": [], "cli": []}
    for name in VANILLA_PROMPTS:
        a, b = load("ours", name, "vanilla"), load("ref", name, "vanilla")
        if a is not None and b is not None:
            results["vanilla"][name] = compare_pair(a, b, decode)
    for sname in inputs["settings"]:
        for name in inputs["prompts"]:
            a = load("ours", name, sname)
            b = load("ref", name, sname)
            if a is None or b is None:
                continue
            case = {"prompt": name, "prompt_tokens": len(inputs["prompts"][name]["ids"]), "setting": sname,
                    "ours_vs_ref": compare_pair(a, b, decode), "ours_text": decode(a["tokens"])}
            h = load("ours_head", name, sname)
            if h is not None:
                case["ours_vs_ours_head"] = compare_pair(a, h, decode)
            c = load("ref_fixpos", name, sname)
            if c is not None:
                case["ours_vs_ref_fixpos"] = compare_pair(a, c, decode)
                case["ref_vs_ref_fixpos"] = compare_pair(b, c, decode)
            results["cases"].append(case)
    for name, sname in CLI_CASES:
        path = os.path.join(RUNS, "cli", f"{name}__{sname}.json")
        a, b = load("ours", name, sname), load("ref", name, sname)
        if not os.path.exists(path) or b is None:
            continue
        cli = json.load(open(path))
        toks = cli["tokens"]
        entry = {"prompt": name, "setting": sname, "cli_tokens": len(toks), "finish_reason": cli["finish_reason"],
                 "prompt_tokens_match": cli["prompt_tokens"] == len(inputs["prompts"][name]["ids"]),
                 "cli_knobs": cli["knobs"],
                 "prefix_equal_ref": toks == b["tokens"][: len(toks)],
                 "prefix_equal_ours_api": a is not None and toks == a["tokens"][: len(toks)],
                 "command": " ".join(cli["command"])}
        results["cli"].append(entry)
    # Sensitivity: how far apart do OUR runs land when one rule changes? (If that were as small as the
    # ours-vs-published noise, agreement would prove little.) Logit differences up to the first token split.
    results["sensitivity"] = []
    for s1, s2, what in (("a_defaults", "e_iw0", "intervention_warmup 4 vs 0"),
                         ("a_defaults", "d_static", "dynamic vs static selection"),
                         ("vanilla", "a_defaults", "vanilla vs DySCO defaults")):
        for name in inputs["prompts"]:
            x, y = load("ours", name, s1), load("ours", name, s2)
            if x is None or y is None:
                continue
            r = compare_pair(x, y, decode)
            results["sensitivity"].append({
                "prompt": name, "pair": what, "same_tokens": r["identical"],
                "first_diff_step": r.get("first_diff_step"),
                "max_abs_logit_diff": r.get("max_abs_logit_diff", r.get("max_abs_logit_diff_before_split"))})
    for side in ("ours", "ours_head"):
        path = os.path.join(RUNS, side, "provenance.json")
        if os.path.exists(path):
            results[f"provenance_{side}"] = json.load(open(path))
    with open(os.path.join(REF_DIR, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print_table(results)


def print_table(results):
    print("\nVanilla sanity (ours vs their model + transformers generate):")
    for name, r in results["vanilla"].items():
        d = r.get("max_abs_logit_diff", r.get("max_abs_logit_diff_before_split"))
        print(f"  {name}: identical={r['identical']} max|dlogit|={d:.2e}")
    print("\n| prompt (tokens) | setting | identical | first diff step | ours/ref token | margins ours/ref | "
          "max|dlogit| before split (or all) | fixpos identical |")
    print("|---|---|---|---|---|---|---|---|")
    for c in results["cases"]:
        r = c["ours_vs_ref"]
        fx = c.get("ours_vs_ref_fixpos")
        hd = c.get("ours_vs_ours_head")
        if hd is not None and not hd["identical"]:
            print(f"  !! ours (first run) and ours_head differ on {c['prompt']} {c['setting']}")
        fxs = "-" if fx is None else ("yes" if fx["identical"] else f"no@{fx['first_diff_step']}")
        if r["identical"]:
            print(f"| {c['prompt']} ({c['prompt_tokens']}) | {c['setting']} | yes | - | - | "
                  f"min {min(r['min_margin']['ours'], r['min_margin']['ref']):.3g} @ {r['min_margin']['step']} | "
                  f"{r['max_abs_logit_diff']:.2e} | {fxs} |")
        else:
            print(f"| {c['prompt']} ({c['prompt_tokens']}) | {c['setting']} | no | {r['first_diff_step']} | "
                  f"{r['ours_token_text']!r}/{r['ref_token_text']!r} | {r['ours_margin_top1_top2']:.3g}/"
                  f"{r['ref_margin_top1_top2']:.3g} | {r['max_abs_logit_diff_before_split'] or 0:.2e} | {fxs} |")
    if results.get("sensitivity"):
        print("\nSensitivity (our own runs, one rule changed; max|dlogit| up to the first token split):")
        for e in results["sensitivity"]:
            d = e["max_abs_logit_diff"]
            print(f"  {e['pair']:<30} {e['prompt']:<14} same_tokens={e['same_tokens']!s:<5} "
                  f"split={e['first_diff_step']} max|dlogit|={'-' if d is None else f'{d:.3g}'}")
    n = len(results["cases"])
    same = sum(c["ours_vs_ref"]["identical"] for c in results["cases"])
    print(f"\n{same}/{n} cases identical (ours vs published)")
    if results["cli"]:
        print("\nCLI (dysco generate --json) vs published / our API (prefix up to the CLI's EOS stop):")
        for e in results["cli"]:
            print(f"  {e['prompt']} {e['setting']}: n={e['cli_tokens']} ({e['finish_reason']}) "
                  f"eq_ref={e['prefix_equal_ref']} eq_api={e['prefix_equal_ours_api']} "
                  f"prompt_len_ok={e['prompt_tokens_match']}")


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else "all"
    if cmd == "ours":
        run_ours(out=sys.argv[2] if len(sys.argv) > 2 else "ours")
    elif cmd in ("ref", "ref_fixpos"):
        run_ref(cmd)
    elif cmd == "cli":
        run_cli()
    elif cmd == "report":
        report()
    elif cmd == "all":
        me = os.path.abspath(__file__)
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        for py, sub in ((OUR_PY, "ours"), (REF_PY, "ref"), (REF_PY, "ref_fixpos"), (REF_PY, "cli"),
                        (REF_PY, "report")):
            print(f"=== {sub} ===", flush=True)
            subprocess.run([py, me, sub], check=True, env=env, cwd=MAIN if py == OUR_PY else HERE)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
